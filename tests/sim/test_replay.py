"""replay() on real routing logs and synthetic traces: metric keys, bounds, budget, determinism, refusals."""

from __future__ import annotations

import pytest
from sim_fixtures import head, tiny_profile, tiny_trace

from sim.metrics import METRIC_KEYS
from sim.policies.presets import PRESETS, build_policy
from sim.replay import load, replay, replay_many
from sim.synthetic import synthetic_trace
from traces.errors import UserError

ESFT = "deepseek-ai__ESFT/expert_scores/intent"
LOSSLESS_GPU = [name for name in PRESETS if build_policy(name).miss in ("wait", "speculated")]
"""Presets that execute every expert on the GPU from bytes moved in their own precision."""


@pytest.fixture(scope="module")
def esft(realtraces):
    from traces.importers.esft import import_esft

    return load(head(import_esft([realtraces / ESFT], prompt_tokens=16), 150))


@pytest.fixture(scope="module")
def synthetic():
    return load(synthetic_trace(sequences=2, prompt_tokens=16, decode_tokens=30, seed=11))


def test_metrics_json_has_the_contract_keys(synthetic) -> None:
    m = replay(synthetic, policy="fate", memory_budget="25%")
    for key in METRIC_KEYS + ("policy", "policy_components", "memory_budget_bytes", "profile", "model", "trace_hash"):
        assert key in m, key
    assert set(m["bytes_transferred"]) == {"on_demand", "prefetch_used", "prefetch_wasted", "total"}
    assert len(m["hit_rate_per_layer"]) == 24 and m["layer_steps"] == 24 * (2 + 2 * 30)
    assert m["policy"] == "fate" and m["policy_components"]["eviction"] == "arc"


@pytest.mark.parametrize("budget", ["10%", "30%"])
def test_oracle_is_never_slower_than_a_preset_at_its_precision_synthetic(synthetic, budget: str) -> None:
    for name in LOSSLESS_GPU:
        m = replay(synthetic, policy=name, memory_budget=budget)
        o = replay(synthetic, policy="oracle", memory_budget=budget,
                   overrides={"precision": build_policy(name).precision})
        assert o["decode_tokens_per_s"] >= m["decode_tokens_per_s"] * (1 - 1e-9), name
        assert o["prefill_tokens_per_s"] >= m["prefill_tokens_per_s"] * (1 - 1e-9), name


def test_oracle_is_never_slower_on_real_deepseek_routing(esft) -> None:
    """ESFT (DeepSeek-V2-Lite, no look-ahead logits): the presets that can run without them."""
    for name, hw in (("lod", "rtx3090-bound"), ("lru", "h100-bound"), ("eap", "gtx1080ti-bound")):
        m = replay(esft, policy=name, hw=hw, memory_budget="20%")
        o = replay(esft, policy="oracle", hw=hw, memory_budget="20%")
        assert o["decode_tokens_per_s"] >= m["decode_tokens_per_s"], (name, hw)
        assert o["prefill_tokens_per_s"] >= m["prefill_tokens_per_s"], (name, hw)


@pytest.mark.parametrize("budget", ["10%", "20%", "45%"])
def test_belady_hit_rate_bounds_lru_lfu_arc(esft, synthetic, budget: str) -> None:
    """Same slots, no prefetch: Belady's hit rate is at least LRU's, LFU's and ARC's."""
    for loaded in (esft, synthetic):
        rates = {e: replay(loaded, policy="lru", memory_budget=budget, overrides={"eviction": e})["hit_rate"]
                 for e in ("belady", "lru", "lfu", "arc")}
        assert rates["belady"] >= max(rates["lru"], rates["lfu"], rates["arc"]), rates


def test_budget_is_respected_on_real_routing(esft) -> None:
    for name in ("lru", "eap", "cpu-exec", "hobbit", "oracle"):
        m = replay(esft, policy=name, memory_budget="12%")
        assert m["peak_expert_bytes"] <= m["expert_budget_bytes"], name


def test_replay_many_equals_single_replays(synthetic) -> None:
    configs = [dict(policy="lru", memory_budget="20%"), dict(policy="fate", hw="h100-bound", memory_budget="30%")]
    assert replay_many(synthetic, configs) == [replay(synthetic, **c) for c in configs]


def test_as_model_replays_with_another_models_shapes() -> None:
    """A Qwen-shaped synthetic trace replayed as Qwen1.5-MoE moves that model's expert bytes."""
    trace = synthetic_trace(sequences=1, prompt_tokens=4, decode_tokens=10, model="mini-qwen", hidden_size=256,
                            expert_intermediate_size=64, shared_expert_intermediate_size=0)
    small = replay(trace, policy="lod", memory_budget="30%")
    big = replay(trace, policy="lod", memory_budget="30%", as_model="qwen1.5-moe-a2.7b")
    assert big["model"] == "qwen1.5-moe-a2.7b"
    assert big["bytes_transferred"]["on_demand"] > 100 * small["bytes_transferred"]["on_demand"]


@pytest.mark.parametrize("kwargs, message", [
    (dict(policy="nope"), "unknown policy 'nope'; choose one of lod"),
    (dict(hw="nope"), "unknown hardware profile 'nope'"),
    (dict(memory_budget="1MB"), "plus one layer's top-1 experts"),
    (dict(as_model="mixtral-8x7b"), "pick a model with the same routing structure"),
    (dict(policy="fate"), "lacks; use --set prediction=noisy-oracle"),
    (dict(overrides={"eviction": "fifo"}, policy="lru"), "choose one of lru, lfu, arc, belady, none"),
])
def test_bad_input_is_a_one_line_user_error(kwargs: dict, message: str) -> None:
    trace = tiny_trace([[[0], [1]], [[2], [3]]], num_experts=4)
    args = dict(policy="lru", hw=tiny_profile(), memory_budget="50%") | kwargs
    with pytest.raises(UserError) as info:
        replay(trace, **args)
    text = str(info.value)
    assert "\n" not in text
    assert message.replace("lacks; ", "lacks look-ahead") in text or message in text


def test_budget_below_top_k_slots_per_layer_is_refused(synthetic) -> None:
    with pytest.raises(UserError, match="fewer than top-4 experts in each of the 24 MoE layers"):
        replay(synthetic, policy="lru", memory_budget="3%")


def test_learned_predictor_hook_receives_signals_and_drives_prefetch(synthetic) -> None:
    """A score_fn that knows the next layer's routing makes the `learned` predictor perfect."""
    import numpy as np

    seen = []

    def score_fn(layer: int, signals) -> np.ndarray:
        seen.append((signals.step, signals.phase))
        ids, counts = synthetic.workload.future.routed(signals.step, layer + 1)
        scores = np.zeros(60)
        scores[ids] = counts
        return scores

    m = replay(synthetic, policy="lru", memory_budget="30%", score_fn=score_fn,
               overrides={"prediction": "learned", "prefetch": "all"})
    assert m["prefetch_precision"] == 1.0 and m["prefetch_recall"] == 1.0
    assert {phase for _, phase in seen} == {"prefill", "decode"}
    with pytest.raises(UserError, match="needs a trained estimator"):
        replay(synthetic, policy="lru", memory_budget="30%", overrides={"prediction": "learned", "prefetch": "all"})
