"""Fate's defaults as the official code runs it: per-model INT2 share, 4 shallow layers (fewer when they do
not fit), INT4 on-demand loads."""

from __future__ import annotations

import pytest

from sim.hardware import load_profile
from sim.modelspec import get_model_spec
from sim.policies.allocation import allocate
from sim.policies.controller import OffloadController
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
    """A prefill miss under fate is an INT4 load (the code's `load_weights()` at quan_bit 4), even for an
    expert the hybrid policy would send as INT2; the slot stays INT4-sized."""
    spec = get_model_spec("qwen1.5-moe-a2.7b")
    fate = build_policy("fate")
    ctl = OffloadController(spec, fate, 2000 * spec.expert_bytes("int4"), hw=load_profile("rtx3090-bound"))
    assert ctl.slot_bytes == spec.expert_bytes("int4")
    ctl.start_forward(0, "prefill", 100)
    deep = 10  # a layer that is not fully cached (nothing resident yet)
    plan = ctl.on_route(deep, [1, 2, 3, 4, 5], [90, 5, 2, 2, 1])
    assert [t.precision for t in plan.loads] == ["int4"] * 5
    assert ctl.precision.assign("prefill", [1, 2, 3, 4, 5], [90, 5, 2, 2, 1]).count("int2") > 0


@pytest.mark.parametrize("as_model,layers,experts,k,rate", [("deepseek-moe-16b", 27, 64, 6, 0.5),
                                                           ("qwen1.5-moe-a2.7b", 24, 60, 4, 0.3)])
def test_replay_applies_the_model_default(as_model: str, layers: int, experts: int, k: int, rate: float) -> None:
    from sim.replay import replay
    from sim.synthetic import synthetic_trace

    trace = synthetic_trace(num_layers=layers, num_experts=experts, top_k=k, sequences=1, prompt_tokens=8,
                            decode_tokens=4, seed=2)
    result = replay(trace, "fate", "rtx3090-bound", "50%", as_model=as_model)
    assert result["policy_components"]["int2_rate"] == rate
