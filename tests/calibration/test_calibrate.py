"""A quick calibration runs end to end, writes a profile the simulator loads, and refuses bad input."""

from __future__ import annotations

import tomllib
from pathlib import Path

import pytest

from calibration.calibrate import calibrate
from sim.cli import main
from sim.hardware import load_profile, profile_from_dict
from traces.errors import UserError


@pytest.fixture(scope="module")
def quick_calibration(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path]:
    folder = tmp_path_factory.mktemp("calib")
    out = folder / "quick-cpu-disk.toml"
    main(["calibrate", "--device", "cpu", "--store", "disk", "--out", str(out), "--quick",
          "--plots", str(folder / "plots"), "--scratch", str(folder), "--threads", "1"])
    return out, folder / "plots"


def test_profile_loads_and_round_trips(quick_calibration: tuple[Path, Path]) -> None:
    """The written TOML loads with sim.hardware and survives a write/read round trip unchanged."""
    out = quick_calibration[0]
    profile = load_profile(out)
    assert profile.device_kind == "cpu" and profile.name == "quick-cpu-disk"
    assert profile.provenance.startswith("calibrated on ") and "fatesim calibrate" in profile.provenance
    assert "torch" in profile.provenance and "threads 1" in profile.provenance
    assert 1e6 < profile.link.bandwidth_bytes_per_s < 1e12
    assert profile.link.latency_s < 0.01
    assert profile.gpu.matmul_flops_per_s > 1e8
    again = profile_from_dict(tomllib.loads(out.read_text()), source=str(out))
    assert again.to_toml_dict() == profile.to_toml_dict()


def test_plots_and_points_written(quick_calibration: tuple[Path, Path]) -> None:
    """--plots writes one PNG per fitted model and the raw points."""
    plots = quick_calibration[1]
    for name in ("link.png", "compute.png", "token_scale.png", "dequant.png", "points.json"):
        assert (plots / name).stat().st_size > 0
    assert (plots / "link.png").read_bytes()[:4] == b"\x89PNG"


def test_no_scratch_file_left(quick_calibration: tuple[Path, Path]) -> None:
    """The disk benchmark removes its scratch file, and the atomic write leaves no temporary."""
    folder = quick_calibration[0].parent
    assert not list(folder.glob("fatesim-calib-*")) and not list(folder.glob(".*.tmp"))


@pytest.mark.parametrize("kwargs,message", [
    (dict(device="cpu", store="disk", out="profile.json"), "must end in .toml"),
    (dict(device="tpu", store="disk", out="p.toml"), "--device"),
    (dict(device="cpu", store="tape", out="p.toml"), "--store"),
    (dict(device="cpu", store="ram", out="p.toml", threads=0), "--threads"),
    (dict(device="cpu", store="ram", out="p.toml", model="no-such-model"), "unknown model"),
    (dict(device="cpu", store="ram", out="p.toml", compute_dtype="int3"), "--dtype"),
])
def test_bad_input_is_a_user_error(tmp_path: Path, kwargs: dict, message: str) -> None:
    """Bad options raise UserError naming the problem, before anything is measured."""
    kwargs = dict(kwargs, out=str(tmp_path / kwargs["out"]), quick=True)
    with pytest.raises(UserError, match=message):
        calibrate(**kwargs)


def test_cli_exit_code_2_on_missing_folder(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    """A user mistake through the CLI is one line on stderr and exit code 2."""
    with pytest.raises(SystemExit) as exit_info:
        main(["calibrate", "--quick", "--out", str(tmp_path / "missing" / "p.toml")])
    assert exit_info.value.code == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("fatesim: error:") and "does not exist" in err[0]


@pytest.mark.cuda
def test_quick_cuda_calibration(tmp_path: Path) -> None:
    """On a GPU: pinned host->device copies and CUDA compute give a loadable cuda profile."""
    out = tmp_path / "cuda.toml"
    cal = calibrate(device="cuda", store="ram", out=out, quick=True)
    profile = load_profile(out)
    assert profile.device_kind == "cuda"
    assert profile.link.bandwidth_bytes_per_s > 1e9
    assert cal.cpu.matmul_flops_per_s > 0
