"""Hardware profiles: shipped set, validation and the time models."""

import tomllib

import pytest

from sim.hardware import list_profiles, load_profile, profile_from_dict, write_profile
from traces.errors import UserError


def test_shipped_profiles_include_the_fate_papers_two_pcs():
    names = list_profiles()
    assert {"rtx3090-bound", "gtx1080ti-bound", "rtx4090-bound", "a100-bound", "h100-bound"} <= set(names)
    for name in names:
        profile = load_profile(name)
        assert profile.provenance and profile.name == name


def test_link_time_is_latency_plus_bytes_over_bandwidth():
    link = load_profile("rtx3090-bound").link
    assert link.transfer_s(12_000_000) == pytest.approx(1e-5 + 1e-3)


def test_roofline_takes_the_slower_of_compute_and_memory():
    gpu = load_profile("rtx3090-bound").gpu
    assert gpu.op_s(flops=50e12 * 1e-3, nbytes=0) == pytest.approx(5e-6 + 1e-3)
    assert gpu.op_s(flops=0, nbytes=800e9 * 2e-3) == pytest.approx(5e-6 + 2e-3)


def test_dequant_time():
    dq = load_profile("rtx3090-bound").dequant
    assert dq.dequant_s("bf16", 10**9) == 0.0
    assert dq.dequant_s("int4", 300 * 10**6) == pytest.approx(1e-3)


def test_profile_round_trips_through_toml(tmp_path):
    original = load_profile("h100-bound")
    write_profile(original, tmp_path / "copy.toml")
    again = load_profile(tmp_path / "copy.toml")
    assert again.to_toml_dict() == original.to_toml_dict()
    assert not list(tmp_path.glob("*.tmp"))


def test_with_link_bandwidth_changes_only_the_link():
    base = load_profile("rtx3090-bound")
    faster = base.with_link_bandwidth(24e9)
    assert faster.link.bandwidth_bytes_per_s == 24e9 and faster.gpu == base.gpu


def test_bad_profiles_name_file_and_key(tmp_path):
    with pytest.raises(UserError, match="unknown hardware profile 'tpu'.*rtx3090-bound"):
        load_profile("tpu")
    with pytest.raises(UserError, match="no profile file"):
        load_profile(tmp_path / "missing.toml")
    data = load_profile("rtx3090-bound").to_toml_dict()
    del data["link"]["latency_s"]
    with pytest.raises(UserError, match=r"lacks \[link\] latency_s"):
        profile_from_dict(data, "x.toml")
    data = load_profile("rtx3090-bound").to_toml_dict()
    data["link"]["bandwidth_bytes_per_s"] = -1.0
    with pytest.raises(UserError, match="must be > 0"):
        profile_from_dict(data, "x.toml")
    (tmp_path / "bad.toml").write_text("name = [")
    with pytest.raises(UserError, match="not valid TOML"):
        load_profile(tmp_path / "bad.toml")


def test_shipped_files_are_plain_toml():
    from sim.hardware import PROFILES_DIR
    for path in PROFILES_DIR.glob("*.toml"):
        assert "device" in tomllib.loads(path.read_text())


@pytest.mark.parametrize("old,new", [("rtx3090-pcie3", "rtx3090-bound"), ("gtx1080ti-pcie3", "gtx1080ti-bound"),
                                     ("a100-pcie4", "a100-bound"), ("h100-pcie5", "h100-bound"),
                                     ("rtx4090-pcie4", "rtx4090-bound")])
def test_old_profile_names_say_what_they_became(old, new):
    """Renamed shipped profiles are refused with the new name, not aliased (the user picks the engine)."""
    with pytest.raises(UserError, match=f"'{old}' was renamed: use '{new}'"):
        load_profile(old)
