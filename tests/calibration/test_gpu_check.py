"""`make gpu-check` without a GPU: its arguments, its skip paths, its time boxes, its merged validation."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import pytest

from calibration.gpu_check import Check, main, profile_name, run_check, validation_merged
from calibration.validate import summarize


def _main(argv: list[str]) -> int:
    codes: list[int] = []
    main(argv, exit=codes.append)
    return codes[0] if codes else 0


@pytest.mark.parametrize("args, message", [
    (["--only", "env,gpu-burn"], "--only takes"),
    (["--budget-s", "0"], "--budget-s"),
    (["--threads", "0"], "--threads"),
    (["--scratch", "/nonexistent/folder"], "--scratch"),
])
def test_bad_arguments_are_one_line_and_exit_2(tmp_path: Path, capsys: pytest.CaptureFixture[str], args, message) -> None:
    assert _main(["--out", str(tmp_path / "out"), *args]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and message in err[0]


def test_out_that_is_a_file_is_refused(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    file = tmp_path / "results"
    file.write_text("x")
    assert _main(["--out", str(file)]) == 2
    assert "not a folder" in capsys.readouterr().err


@pytest.mark.parametrize("name, gen, expected", [
    ("NVIDIA H200", "5", "h200-pcie5"), ("NVIDIA H100 80GB HBM3", "5", "h100-pcie5"),
    ("NVIDIA GeForce RTX 3090", "4", "rtx3090-pcie4"), ("NVIDIA A100-SXM4-80GB", "4", "a100-pcie4"),
    ("NVIDIA H200", "[N/A]", "h200-pciex"),
])
def test_profile_name(name: str, gen: str, expected: str) -> None:
    assert profile_name({"gpu": name, "pcie_gen_max": gen}) == expected


def test_without_cuda_every_gpu_step_is_skipped_with_its_reason(tmp_path: Path) -> None:
    """On this machine (no CUDA): the GPU steps skip with one line each, the summary says so, exit 0."""
    pytest.importorskip("torch")
    import torch

    if torch.cuda.is_available():
        pytest.skip("this test is about a machine without CUDA")
    code = run_check(tmp_path, budget_s=60, only=("env", "bitexact", "calibrate", "validate", "fullsize"),
                     threads=1, scratch=None)
    assert code == 0
    summary = json.loads((tmp_path / "summary.json").read_text())
    steps = {s["name"]: s for s in summary["steps"]}
    assert steps["env"]["status"] == "ok" and summary["env"]["cuda"] is False
    for name in ("bitexact", "calibrate", "validate", "fullsize"):
        assert steps[name]["status"] == "skipped" and "no CUDA" in steps[name]["detail"]
    log = (tmp_path / "log.txt").read_text()
    assert "bitexact: skipped: torch sees no CUDA GPU" in log


def test_a_step_that_overruns_is_stopped_and_the_next_one_runs(tmp_path: Path) -> None:
    check = Check(tmp_path, budget_s=30, scratch=tmp_path, threads=1)
    slow = check.run("slow", [sys.executable, "-c", "import time; time.sleep(30)"], limit_s=1.5)
    quick = check.run("quick", [sys.executable, "-c", "print('hello from the next step')"], limit_s=10)
    failing = check.run("failing", [sys.executable, "-c", "raise SystemExit(3)"], limit_s=10)
    assert (slow.status, quick.status, failing.status) == ("timeout", "ok", "failed")
    assert 1.4 < slow.seconds < 10
    assert "hello from the next step" in (tmp_path / "log.txt").read_text()


def test_no_step_runs_past_the_budget(tmp_path: Path) -> None:
    check = Check(tmp_path, budget_s=0.5, scratch=tmp_path, threads=1)
    result = check.run("late", [sys.executable, "-c", "print(1)"], limit_s=60)
    assert result.status == "skipped" and "no time left" in result.detail


def _row(preset: str, budget: str, errors: tuple[float, float, float]) -> dict:
    keys = ("prefill_tokens_per_s", "decode_tokens_per_s", "hit_rate")
    row = {"preset": preset, "budget": budget}
    for key, err in zip(keys, errors, strict=True):
        row[key] = {"measured": 1.0, "simulated": 1.0 + err, "relative_error": err}
    row["with_profile_link"] = {k: {"simulated": 1.0 + 2 * e, "relative_error": 2 * e}
                                for k, e in zip(keys, errors, strict=True)}
    return row


def test_per_preset_validations_merge_into_one_summary() -> None:
    parts = [{"profile": "h200-pcie5", "model": "m", "rows": [_row("lod", "25%", (0.01, -0.02, 0.0))],
              "summary": {}}, {"profile": "h200-pcie5", "model": "m", "rows": [_row("fate", "25%", (0.2, 0.03, 0.0))],
                               "summary": {}}]
    merged = validation_merged(parts)
    assert [r["preset"] for r in merged["rows"]] == ["lod", "fate"] and merged["profile"] == "h200-pcie5"
    assert merged["summary"] == summarize(merged["rows"], 0.05)
    assert merged["summary"]["max_abs_error"] == pytest.approx(0.2)
    assert merged["summary_with_profile_link"]["max_abs_error"] == pytest.approx(0.4)
