"""Engine overheads: the `[engine]` table of a profile, its validation, and where `CostModel` charges it."""

from __future__ import annotations

import dataclasses

import pytest

from sim.costs import CostModel
from sim.hardware import EngineOverheads, load_profile, profile_from_dict
from sim.modelspec import get_model_spec
from traces.errors import UserError

PER_EXPERT_S, PER_LAYER_S, PER_DEQUANT_S = 7e-4, 3e-4, 2e-4


def _with_engine(table: dict | None, base: str = "rtx3090-bound") -> dict:
    data = load_profile(base).to_toml_dict()
    if table is not None:
        data["engine"] = table
    return data


def test_absent_table_is_an_efficient_engine_and_is_not_written_back() -> None:
    profile = load_profile("rtx3090-bound")
    assert profile.engine == EngineOverheads(0.0, 0.0, 0.0)
    assert "engine" not in profile.to_toml_dict()


def test_table_round_trips_and_missing_keys_default_to_zero() -> None:
    profile = profile_from_dict(_with_engine({"per_expert_s": PER_EXPERT_S}))
    assert profile.engine == EngineOverheads(per_expert_s=PER_EXPERT_S)
    again = profile_from_dict(profile.to_toml_dict())
    assert again.engine == profile.engine and again.to_toml_dict() == profile.to_toml_dict()


@pytest.mark.parametrize("table,message", [
    ({"per_expert_s": -1e-6}, "per_expert_s must be a finite number of seconds >= 0"),
    ({"per_moe_layer_s": float("inf")}, "per_moe_layer_s must be a finite"),
    ({"per_expert_s": "fast"}, "per_expert_s must be a float"),
    ({"per_token_s": 1e-3}, "unknown key 'per_token_s'"),
    ("slow", r"\[engine\] must be a table"),
])
def test_bad_tables_are_user_errors(table: object, message: str) -> None:
    with pytest.raises(UserError, match=message):
        profile_from_dict(_with_engine(table), source="bad.toml")


@pytest.fixture(scope="module")
def pair() -> tuple[CostModel, CostModel]:
    """The same machine without and with engine overheads, on Qwen1.5-MoE shapes."""
    spec = get_model_spec("qwen1.5-moe-a2.7b")
    plain = load_profile("rtx3090-bound")
    eager = dataclasses.replace(plain, engine=EngineOverheads(PER_EXPERT_S, PER_LAYER_S, PER_DEQUANT_S))
    return CostModel(spec, plain), CostModel(spec, eager)


@pytest.mark.parametrize("tokens", [1, 7, 512])
def test_expert_pays_dispatch_and_quantised_experts_pay_dequant_calls(pair, tokens: int) -> None:
    """Exact sums: bf16 + per-expert; int4/int2 + per-expert + per-dequant; independent of the token count."""
    plain, eager = pair
    assert eager.expert_s(tokens, "bf16") == pytest.approx(plain.expert_s(tokens, "bf16") + PER_EXPERT_S, rel=1e-12)
    for precision in ("int8", "int4", "int2"):
        assert eager.expert_s(tokens, precision) == pytest.approx(
            plain.expert_s(tokens, precision) + PER_EXPERT_S + PER_DEQUANT_S, rel=1e-12)
    assert eager.cpu_expert_s(tokens) == pytest.approx(plain.cpu_expert_s(tokens) + PER_EXPERT_S, rel=1e-12)


def test_layer_cost_enters_once_per_moe_layer(pair) -> None:
    plain, eager = pair
    for tokens, context in ((1, 600), (512, 512)):
        assert eager.attention_s(tokens, context) == pytest.approx(
            plain.attention_s(tokens, context) + PER_LAYER_S, rel=1e-12)
    assert eager.shared_s(1) == plain.shared_s(1) and eager.head_s() == plain.head_s()


def test_decode_layer_time_includes_every_overhead(pair) -> None:
    """Fate's prefetch count divides this layer time by a transfer: the overheads must be in it."""
    plain, eager = pair
    k = plain.spec.top_k
    extra = PER_LAYER_S + k * (PER_EXPERT_S + PER_DEQUANT_S)
    assert eager.decode_layer_s("int4") == pytest.approx(plain.decode_layer_s("int4") + extra, rel=1e-12)


def test_measured_precision_column_is_not_charged_the_dequant_call() -> None:
    """A calibrated `expert_int4` correction was timed on the quantised path: no per-dequant on top."""
    spec = get_model_spec("qwen1.5-moe-a2.7b")
    data = _with_engine({"per_expert_s": PER_EXPERT_S, "per_dequant_s": PER_DEQUANT_S})
    data["gpu"]["token_scale"] = {"tokens": [1], "expert_int4": [2.0]}
    costs = CostModel(spec, profile_from_dict(data))
    roofline = CostModel(spec, load_profile("rtx3090-bound")).expert_s(1, "bf16")
    assert costs.expert_s(1, "int4") == pytest.approx(2.0 * roofline + PER_EXPERT_S, rel=1e-12)
    dequant2 = load_profile("rtx3090-bound").dequant.dequant_s("int2", spec.expert_bytes("bf16"))
    assert costs.expert_s(1, "int2") == pytest.approx(roofline + dequant2 + PER_DEQUANT_S + PER_EXPERT_S, rel=1e-12)
