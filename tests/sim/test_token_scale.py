"""Per-token corrections to the roofline (`sim.hardware.TokenScales`) and how `sim.costs` applies them."""

from __future__ import annotations

import math
import tomllib

import pytest
import tomli_w

from sim.costs import CostModel
from sim.hardware import TokenScales, load_profile, profile_from_dict
from sim.modelspec import get_model_spec
from traces.errors import UserError

SCALES = TokenScales(tokens=(1, 4, 16), columns=(("expert_bf16", (1.0, 3.0, 2.0)), ("expert_int4", (0.5, 0.5, 0.5)),
                                                  ("shared", (2.0, 2.0, 1.0))))


def test_factor_at_calibrated_points_between_and_outside() -> None:
    """Exact at the table's token counts, linear in log(tokens) between them, the end's value outside."""
    assert SCALES.factor("expert_bf16", 1) == 1.0
    assert SCALES.factor("expert_bf16", 4) == 3.0
    assert SCALES.factor("expert_bf16", 2) == pytest.approx(2.0)  # halfway in log between 1 and 4
    assert SCALES.factor("expert_bf16", 8) == pytest.approx(2.5)  # halfway in log between 4 and 16
    assert SCALES.factor("expert_bf16", 3) == pytest.approx(1.0 + 2.0 * math.log(3) / math.log(4))
    assert SCALES.factor("expert_bf16", 512) == 2.0
    assert SCALES.factor("expert_int8", 4) is None
    assert TokenScales().factor("expert_bf16", 1) is None


def _profile_dict(**gpu_extra: object) -> dict:
    data = load_profile("rtx3090-bound").to_toml_dict()
    data["gpu"].update(gpu_extra)
    return data


def test_profile_round_trips_its_tables() -> None:
    table = SCALES.to_toml_dict()
    data = _profile_dict(token_scale=table)
    data["cpu"]["token_scale"] = {"tokens": [1, 2], "expert_bf16": [1.5, 2.5]}
    profile = profile_from_dict(tomllib.loads(tomli_w.dumps(data)), source="t.toml")
    assert profile.gpu_token_scale == SCALES
    assert profile.cpu_token_scale == TokenScales(tokens=(1, 2), columns=(("expert_bf16", (1.5, 2.5)),))
    assert profile.to_toml_dict() == data


@pytest.mark.parametrize("table,message", [
    ({"tokens": [4, 1], "expert_bf16": [1.0, 1.0]}, "strictly increasing"),
    ({"tokens": [], "expert_bf16": []}, "strictly increasing"),
    ({"tokens": [1, 2], "expert_bf16": [1.0]}, "must list 2 positive numbers"),
    ({"tokens": [1, 2], "expert_bf16": [1.0, -1.0]}, "must list 2 positive numbers"),
    ({"tokens": [1, 2], "expert_fp8": [1.0, 1.0]}, "unknown column 'expert_fp8'"),
    ("fast", "must be a table"),
])
def test_bad_tables_are_user_errors(table: object, message: str) -> None:
    with pytest.raises(UserError, match=message):
        profile_from_dict(_profile_dict(token_scale=table), source="bad.toml")


def test_costs_apply_the_corrections() -> None:
    """bf16 experts and shared experts are scaled; a precision with its own column drops the dequant term;
    one without it is the scaled unquantised expert plus dequantisation; the CPU uses its own table."""
    spec = get_model_spec("qwen1.5-moe-a2.7b")
    plain = load_profile("rtx3090-bound")
    data = _profile_dict(token_scale=SCALES.to_toml_dict())
    data["cpu"]["token_scale"] = {"tokens": [1], "expert_bf16": [4.0]}
    scaled = profile_from_dict(data)
    base, costs = CostModel(spec, plain), CostModel(spec, scaled)
    dequant8 = plain.dequant.dequant_s("int8", spec.expert_bytes("bf16"))
    for tokens, factor in ((1, 1.0), (2, 2.0), (4, 3.0), (64, 2.0)):
        assert costs.expert_s(tokens, "bf16") == pytest.approx(base.expert_s(tokens, "bf16") * factor)
        assert costs.expert_s(tokens, "int8") == pytest.approx(base.expert_s(tokens, "bf16") * factor + dequant8)
        assert costs.expert_s(tokens, "int4") == pytest.approx(base.expert_s(tokens, "bf16") * 0.5)
    assert costs.shared_s(1) == pytest.approx(base.shared_s(1) * 2.0)
    assert costs.shared_s(16) == pytest.approx(base.shared_s(16))
    assert costs.cpu_expert_s(3) == pytest.approx(base.cpu_expert_s(3) * 4.0)


def test_shipped_gpu_profiles_have_no_corrections() -> None:
    """Datasheet profiles are pure rooflines: the corrections come only from a calibration."""
    for name in ("rtx3090-bound", "gtx1080ti-bound", "rtx4090-bound", "a100-bound", "h100-bound"):
        profile = load_profile(name)
        assert not profile.gpu_token_scale.columns and not profile.cpu_token_scale.columns


def test_copy_contention_is_optional_checked_and_round_trips() -> None:
    """Absent: 1.0 (and not written back); below 1 is refused; a measured value survives the round trip."""
    assert load_profile("rtx3090-bound").copy_contention == 1.0
    assert "copy_contention" not in load_profile("rtx3090-bound").to_toml_dict()["gpu"]
    with pytest.raises(UserError, match="copy_contention must be >= 1"):
        profile_from_dict(_profile_dict(copy_contention=0.5), source="bad.toml")
    profile = profile_from_dict(_profile_dict(copy_contention=1.25))
    assert profile.copy_contention == 1.25
    assert profile_from_dict(profile.to_toml_dict()).copy_contention == 1.25


def test_times_is_the_factor_or_one() -> None:
    assert SCALES.times("expert_bf16", 4) == 3.0
    assert SCALES.times("expert_int8", 4) == 1.0
