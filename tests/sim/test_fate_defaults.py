"""Fate's defaults as the official code runs it: per-model INT2 share, 4 shallow layers (fewer when they do
not fit), INT4 on-demand loads."""

from __future__ import annotations

import pytest

from sim.modelspec import get_model_spec
from sim.policies.allocation import allocate
from sim.policies.presets import build_policy, model_family


@pytest.mark.parametrize("model_type,rate", [("deepseek", 0.5), ("deepseek_v2", 0.5), ("qwen2_moe", 0.3),
                                             ("mixtral", 0.3), (None, 0.3)])
def test_int2_rate_follows_the_model_family(model_type: str | None, rate: float) -> None:
    assert build_policy("fate", model_type=model_type).int2_rate == rate


def test_set_overrides_the_model_default() -> None:
    assert build_policy("fate", {"int2_rate": "0.1"}, model_type="deepseek").int2_rate == 0.1


def test_other_presets_have_no_model_defaults() -> None:
    assert build_policy("lod", model_type="deepseek") == build_policy("lod")
    assert model_family("qwen3_moe") == "qwen" and model_family("something-else") is None


def test_fate_caches_four_shallow_layers_and_loads_misses_in_int4() -> None:
    fate = build_policy("fate")
    assert fate.shallow_layers == 4 and fate.miss == "lowbit" and fate.miss_precision == "int4"


def test_shallow_layers_falls_back_to_as_many_as_fit() -> None:
    """8 experts, top-2, 4 layers: 4 full layers need 32 slots; 20 slots hold 2 full + 2 x 2."""
    assert allocate("shallow", total_slots=40, num_layers=4, num_experts=8, top_k=2,
                    shallow_layers=4).slots_per_layer == (8, 8, 8, 8)
    assert allocate("shallow", total_slots=20, num_layers=4, num_experts=8, top_k=2,
                    shallow_layers=4).slots_per_layer == (8, 8, 2, 2)
    assert allocate("shallow", total_slots=9, num_layers=4, num_experts=8, top_k=2,
                    shallow_layers=4).slots_per_layer == (3, 2, 2, 2)


def test_prefill_misses_load_int4_while_prefetches_stay_hybrid() -> None:
    """Under fate every on-demand load is INT4 (the code's `load_weights()` at quan_bit 4): the on-demand
    bytes are a whole number of INT4 experts; with `miss=wait` prefill misses follow the INT4/INT2 hybrid and
    are not (the check can fail)."""
    from sim.replay import replay
    from sim.synthetic import synthetic_trace

    spec = get_model_spec("qwen1.5-moe-a2.7b")
    trace = synthetic_trace(sequences=2, prompt_tokens=64, decode_tokens=4, seed=5)
    fate = replay(trace, "fate", "rtx3090-bound", "10%")["bytes_transferred"]["on_demand"]
    hybrid = replay(trace, "fate", "rtx3090-bound", "10%", overrides={"miss": "wait"})["bytes_transferred"]["on_demand"]
    assert fate > 0 and fate % spec.expert_bytes("int4") == 0
    assert hybrid % spec.expert_bytes("int4") != 0


@pytest.mark.parametrize("as_model,layers,experts,k,rate", [("deepseek-moe-16b", 27, 64, 6, 0.5),
                                                           ("qwen1.5-moe-a2.7b", 24, 60, 4, 0.3)])
def test_replay_applies_the_model_default(as_model: str, layers: int, experts: int, k: int, rate: float) -> None:
    from sim.replay import replay
    from sim.synthetic import synthetic_trace

    trace = synthetic_trace(num_layers=layers, num_experts=experts, top_k=k, sequences=1, prompt_tokens=8,
                            decode_tokens=4, seed=2)
    result = replay(trace, "fate", "rtx3090-bound", "50%", as_model=as_model)
    assert result["policy_components"]["int2_rate"] == rate
