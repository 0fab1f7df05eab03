"""A small validation runs realrun and the simulator end to end on a tiny model and compares them."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from calibration.calibrate import calibrate
from calibration.validate import (
    format_table,
    link_time_factor,
    relative_error,
    summarize,
    validate_runs,
)
from sim.cli import main
from sim.hardware import LinkModel, load_profile
from traces.errors import UserError


@pytest.fixture(scope="module")
def tiny_setup(tiny_model: tuple[Path, Path], tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path, Path]:
    """(model folder, a quick CPU profile calibrated with the tiny model's shapes, a prompt file)."""
    folder = tmp_path_factory.mktemp("validate")
    profile = folder / "tiny-cpu-disk.toml"
    calibrate(device="cpu", store="disk", out=profile, quick=True, model=str(tiny_model[0]), scratch_dir=folder)
    prompts = folder / "prompts.jsonl"
    prompts.write_text("\n".join(json.dumps({"text": t}) for t in (
        "The quick brown fox jumps over", "Expert offloading moves weights between memory tiers",
        "A stitch in time")) + "\n")
    return tiny_model[0], profile, prompts


@pytest.mark.slow
def test_small_validation_end_to_end(tiny_setup: tuple[Path, Path, Path], tmp_path: Path) -> None:
    """Three presets x two budgets: realrun's trace replays; hit rates agree; errors and summary are consistent;
    with link="observed" each run is replayed at the bandwidth its own copies achieved."""
    model, profile, prompts = tiny_setup
    result = validate_runs(profile=str(profile), model=str(model), presets="lru,fate,cpu-exec", budgets="30%,60%",
                           prompts=str(prompts), max_new_tokens=4, num_prompts=2, store_dir=tmp_path,
                           link="observed", repeats=2)
    rows = result["rows"]
    assert [(r["preset"], r["budget"]) for r in rows] == [("lru", "30%"), ("lru", "60%"), ("fate", "30%"),
                                                         ("fate", "60%"), ("cpu-exec", "30%"), ("cpu-exec", "60%")]
    for r in rows:
        for key in ("prefill_tokens_per_s", "decode_tokens_per_s"):
            m = r[key]
            assert m["measured"] > 0 and m["simulated"] > 0
            assert m["relative_error"] == pytest.approx((m["simulated"] - m["measured"]) / m["measured"])
    lru = [r for r in rows if r["preset"] == "lru"]
    for r in lru + [r for r in rows if r["preset"] == "cpu-exec"]:  # same routing and controller: equal hits
        # (cpu-exec: both pin the experts popular in the prompts, and realrun's pinned slots keep their bytes)
        assert r["hit_rate"]["simulated"] == pytest.approx(r["hit_rate"]["measured"], abs=1e-12)
    assert lru[1]["hit_rate"]["measured"] >= lru[0]["hit_rate"]["measured"]
    assert result["link"] == "observed" and "medians of 2 runs" in format_table(result)
    assert result["link_clock"] == "perf_counter" and all(r["link_clock"] == "perf_counter" for r in rows)
    for r in rows:  # each side's number is the median of its two runs
        for key in ("prefill_tokens_per_s", "decode_tokens_per_s"):
            m = r[key]
            assert len(m["runs_measured"]) == 2 and m["measured"] == pytest.approx(sum(m["runs_measured"]) / 2)
            assert m["simulated"] == pytest.approx(sum(m["runs_simulated"]) / 2)
    assert all(r["link_time_factor"] and r["observed_link_bytes_per_s"] for r in lru)  # misses were loaded
    assert result["summary_with_profile_link"]["configurations"] == 6
    assert "with the profile's link instead" in format_table(result)
    base = load_profile(profile).link.bandwidth_bytes_per_s
    for r in rows:  # each run is replayed at its own link factor
        factors = r["runs_link_time_factor"]
        if None not in factors:
            assert r["simulated_link_bytes_per_s"] == pytest.approx(sum(base / f for f in factors) / 2)
    s = result["summary"]
    pooled = sorted(abs(r[k]["relative_error"]) for r in rows for k in ("prefill_tokens_per_s",
                                                                        "decode_tokens_per_s", "hit_rate"))
    assert s["max_abs_error"] == pooled[-1] and s["configurations"] == 6
    assert "median |error|" in format_table(result)
    assert list(tmp_path.glob("experts-*.bin"))  # stores were built once and kept for reuse


def test_summary_and_relative_error() -> None:
    """Pooled median/max over the three metrics; pass/fail against max_error."""
    def row(p: float, d: float, h: float) -> dict:
        return {k: {"relative_error": v} for k, v in
                zip(("prefill_tokens_per_s", "decode_tokens_per_s", "hit_rate"), (p, d, h), strict=True)}
    s = summarize([row(0.1, -0.02, 0.0), row(-0.3, 0.04, 0.0)], max_error=0.05)
    assert s["median_abs_error"] == pytest.approx(0.03) and s["max_abs_error"] == pytest.approx(0.3)
    assert s["passed"] and not summarize([row(0.1, 0.1, 0.1)], 0.05)["passed"]
    assert relative_error(11.0, 10.0) == pytest.approx(0.1) and relative_error(0.0, 0.0) == 0.0


def test_link_time_factor() -> None:
    """Observed busy seconds over the link's prediction for the same copies; nothing copied gives None."""
    link = LinkModel(bandwidth_bytes_per_s=2e9, latency_s=1e-3, copy_engines=1)
    assert link_time_factor({"copies": 4, "bytes": 4e9, "busy_s": 2 * (2.0 + 4e-3)}, link) == pytest.approx(2.0)
    assert link_time_factor({"copies": 0, "bytes": 0, "busy_s": 0.0}, link) is None
    slowed = load_profile("rtx3090-bound").with_link_slowed(2.0)
    plain = load_profile("rtx3090-bound")
    assert slowed.link.transfer_s(17_000_000) == pytest.approx(2 * plain.link.transfer_s(17_000_000))


@pytest.mark.parametrize("kwargs,message", [
    (dict(presets="lod,nosuch"), "nosuch"),
    (dict(budgets=" , "), "--budgets"),
    (dict(max_error=0.0), "--max-error"),
    (dict(max_new_tokens=1), "--max-new-tokens"),
    (dict(device="cuda"), "cpu device"),
    (dict(link="psychic"), "--link"),
    (dict(repeats=0), "--repeats"),
])
def test_bad_input_is_a_user_error(tiny_setup: tuple[Path, Path, Path], kwargs: dict, message: str) -> None:
    """Unknown presets, empty lists, bad thresholds and a profile of another device kind are refused."""
    model, profile, prompts = tiny_setup
    args = dict(profile=str(profile), model=str(model), prompts=str(prompts)) | kwargs
    with pytest.raises(UserError, match=message):
        validate_runs(**args)


def test_cli_missing_profile_exit_2(tiny_setup: tuple[Path, Path, Path], capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as exit_info:
        main(["validate", "--profile", "/nonexistent/p.toml", "--model", str(tiny_setup[0])])
    assert exit_info.value.code == 2
    assert capsys.readouterr().err.strip().startswith("fatesim: error: no profile file")


@pytest.mark.slow
def test_cli_exits_1_above_max_error(tiny_setup: tuple[Path, Path, Path], tmp_path: Path,
                                     capsys: pytest.CaptureFixture[str]) -> None:
    """With an impossible --max-error the command prints JSON with `summary` and exits 1."""
    model, profile, prompts = tiny_setup
    with pytest.raises(SystemExit) as exit_info:
        main(["validate", "--profile", str(profile), "--model", str(model), "--presets", "lod",
              "--budgets", "50%", "--prompts", str(prompts), "--max-new-tokens", "2", "--num-prompts", "1",
              "--max-error", "1e-12", "--json", "--out", str(tmp_path / "v.json")])
    assert exit_info.value.code == 1
    out = json.loads(capsys.readouterr().out)
    assert set(out["summary"]) >= {"median_abs_error", "max_abs_error"}
    assert json.loads((tmp_path / "v.json").read_text())["summary"] == out["summary"]
