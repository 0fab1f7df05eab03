"""Fate's budget accounting against slot counts computed by hand from the official code's formulas.

Hand computation (MiB, as the code works; Qwen1.5-MoE-A2.7B: H 2048, V 151936, 24 layers, 60 experts,
16 heads x 128, max positions 8192, expert 1408, shared 5632):
  embeddings 2x151936x2048x2 B = 1187.0 MiB, attention 768 MiB, biases 0.28, rotary 192.0, norms 0.19,
  shared-expert gates 2.25, routers 5.625, KV(1024) 192, hidden 8, shared experts 24 x 66 = 1584,
  metadata 0.3 x 193 x 24 = 1389.6  -> reserved 5328.95 MiB;
  INT4 expert = 16.5 / 4 + 3 x 0.34375 = 5.15625 MiB.
  10 GiB: (10240 - 5328.95) / 5.15625 = 952.4 -> 952 slots; 952 // 60 = 15 >= 4 -> 4 full layers,
          (952 - 240) // 20 = 35 per deeper layer.
  12 GiB: 6959.05 / 5.15625 = 1349.6 -> 1349; (1349 - 240) // 20 = 55.
   6 GiB: 815.05 / 5.15625 = 158.07 -> 158 slots; 158 // 60 = 2 -> layers 0, 1 full, layer 2 gets 38, rest 0.
  16 GiB: 11055.05 MiB > 24 x 60 x 5.15625 = 7425 -> everything resident in INT4 (no offload).
DeepSeekMoE-16B (28 layers, 27 MoE, 64 experts, 2 shared of 1408, dense 10944, V 102400, max positions 4096):
  embeddings 800, attention 896, rotary 112.0, norms 0.22, routers 7, KV 224, hidden 8, shared 28 x 33 = 924,
  dense 128.25, metadata 0.3 x 205 x 28 = 1722, added back 1400 -> reserved 3421.48 MiB.
  10 GiB: 6818.52 / 5.15625 = 1322.4 -> 1322; 4 full, (1322 - 256) // 23 = 46.
   6 GiB: 2722.52 / 5.15625 = 528.0 -> 528; 4 full, (528 - 256) // 23 = 11.
"""

from __future__ import annotations

import pytest

from sim.accounting import GIB, MIB, fate_accounting, sim_expert_budget
from sim.modelspec import get_model_spec
from sim.policies.presets import build_policy
from traces.errors import UserError

QWEN = get_model_spec("qwen1.5-moe-a2.7b")
DEEPSEEK = get_model_spec("deepseek-moe-16b")


def test_int4_expert_is_fatesims_int4_size() -> None:
    acc = fate_accounting(QWEN, 10 * GIB)
    assert acc.int4_expert_bytes == 5.15625 * MIB == QWEN.expert_bytes("int4")


@pytest.mark.parametrize("spec,gib,reserved_mib", [(QWEN, 10, 5328.95), (DEEPSEEK, 10, 3421.48)])
def test_reserved_total(spec, gib: int, reserved_mib: float) -> None:
    acc = fate_accounting(spec, gib * GIB)
    assert acc.reserved_total_bytes / MIB == pytest.approx(reserved_mib, abs=0.01)
    assert acc.available_bytes == pytest.approx(gib * GIB - acc.reserved_total_bytes)


def test_metadata_reserve_is_1_36_gib_for_qwen() -> None:
    items = fate_accounting(QWEN, 10 * GIB).reserved_bytes
    assert items["metadata and prefetch"] / MIB == pytest.approx(1389.6)
    assert items["KV cache (1024 tokens)"] == 2 * 1024 * 24 * 2048 * 2


@pytest.mark.parametrize("spec,gib,cache,full,slots", [
    (QWEN, 10, 952, 4, (60,) * 4 + (35,) * 20),
    (QWEN, 6, 158, 2, (60, 60, 38) + (0,) * 21),
    (QWEN, 12, 1349, 4, (60,) * 4 + (55,) * 20),  # 6959.05 / 5.15625 = 1349.6: the code floors
    (DEEPSEEK, 10, 1322, 4, (64,) * 4 + (46,) * 23),
    (DEEPSEEK, 6, 528, 4, (64,) * 4 + (11,) * 23),
])
def test_paper_budgets_give_the_hand_computed_slots(spec, gib: int, cache: int, full: int,
                                                     slots: tuple[int, ...]) -> None:
    acc = fate_accounting(spec, gib * GIB)
    assert acc.mode == "offload"
    assert acc.cache_slots == cache
    assert acc.slots_per_layer == slots
    assert acc.fully_cached_layers == full


def test_large_budget_offloads_nothing() -> None:
    acc = fate_accounting(QWEN, 16 * GIB)
    assert acc.mode == "all-int4" and acc.slots_per_layer == (60,) * 24


def test_budget_below_the_reserve_is_a_user_error() -> None:
    with pytest.raises(UserError, match="below the 5.20 GiB Fate's code reserves"):
        fate_accounting(QWEN, 5 * GIB)


def test_models_the_code_does_not_cover_are_refused() -> None:
    with pytest.raises(UserError, match="Qwen1.5-MoE, DeepSeekMoE and Mixtral only"):
        fate_accounting(get_model_spec("olmoe-1b-7b"), 10 * GIB, max_position_embeddings=4096)


def test_sim_budget_for_fate_is_the_codes_cache_in_int4_slots() -> None:
    """4 full layers + 35 per deeper layer, as slots of fate's INT4 size, shallow_layers 4."""
    budget = sim_expert_budget(QWEN, 10 * GIB, build_policy("fate"))
    assert budget.expert_budget_bytes == (4 * 60 + 20 * 35) * QWEN.expert_bytes("int4")
    assert budget.policy.shallow_layers == 4 and not budget.adjusted


def test_sim_budget_floors_empty_layers_at_top_k_and_says_so() -> None:
    """6 GiB Qwen: the code caches 60, 60, 38 and nothing deeper; fatesim needs k = 4 working slots per
    layer: 2 full layers and (38 + 21 x 4) spread over the 22 deeper ones."""
    budget = sim_expert_budget(QWEN, 6 * GIB, build_policy("fate"))
    assert budget.expert_budget_bytes == (60 + 60 + 38 + 21 * 4) * QWEN.expert_bytes("int4")
    assert budget.policy.shallow_layers == 2 and budget.adjusted


def test_sim_budget_for_other_policies_is_the_available_bytes_floored_at_top_k() -> None:
    lod = build_policy("lod")
    roomy = sim_expert_budget(DEEPSEEK, 10 * GIB, lod)
    assert roomy.expert_budget_bytes == int(roomy.accounting.available_bytes) and not roomy.adjusted
    tight = sim_expert_budget(QWEN, 6 * GIB, lod)  # 815 MiB < 24 x 4 bf16 experts (1584 MiB)
    assert tight.expert_budget_bytes == 24 * 4 * QWEN.expert_bytes("bf16") and tight.adjusted


def test_fatesim_25_percent_is_fate_at_10_to_11_gib() -> None:
    """25% of Qwen's bf16 routed-expert bytes (6,228,541,440) = 1152 INT4 slots of 5,406,720 bytes -> 5328.95 +
    1152 x 5.15625 MiB = 11.0 GiB;
    DeepSeek: 1382 slots -> 3421.48 + 1382 x 5.15625 MiB = 10.3 GiB."""
    from sim.accounting import fate_budget_for_cache, fatesim_share_in_fate_gib

    assert fatesim_share_in_fate_gib(QWEN, 0.25) == pytest.approx((5328.95 + 1152 * 5.15625) / 1024, abs=1e-3)
    assert fatesim_share_in_fate_gib(DEEPSEEK, 0.25) == pytest.approx((3421.48 + 1382 * 5.15625) / 1024, abs=1e-3)
    assert fate_accounting(QWEN, int(fate_budget_for_cache(QWEN, 952)) + 1).cache_slots == 952


def _small_qwen_trace(decode_tokens: int = 8):
    from sim.synthetic import synthetic_trace

    return synthetic_trace(sequences=1, prompt_tokens=16, decode_tokens=decode_tokens, seed=3)


def test_replay_with_fate_accounting_gets_the_codes_cache() -> None:
    from sim.replay import replay

    trace = _small_qwen_trace()
    fate = replay(trace, "fate", "rtx3090-bound", 10 * GIB, budget_accounting="fate")
    assert fate["expert_budget_bytes"] == (4 * 60 + 20 * 35) * QWEN.expert_bytes("int4")
    assert fate["slots_per_layer"] == [60] * 4 + [35] * 20
    assert fate["memory_budget_bytes"] == 10 * GIB
    lod = replay(trace, "lod", "rtx3090-bound", "10GiB", budget_accounting="fate")
    assert lod["expert_budget_bytes"] == int(fate_accounting(QWEN, 10 * GIB).available_bytes)


@pytest.mark.parametrize("budget,decode,message", [
    ("25%", 8, "takes the paper's budget as a size"),
    ("10GiB", 1100, "reserves KV cache for 1024 tokens"),
])
def test_replay_with_fate_accounting_refuses_what_the_code_cannot_size(budget: str, decode: int, message: str) -> None:
    from sim.replay import replay

    with pytest.raises(UserError, match=message):
        replay(_small_qwen_trace(decode), "fate", "rtx3090-bound", budget, budget_accounting="fate")
    with pytest.raises(UserError, match="must be fatesim or fate"):
        replay(_small_qwen_trace(), "fate", "rtx3090-bound", budget, budget_accounting="paper")
