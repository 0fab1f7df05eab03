"""`make bench-scale` end to end at tiny scale: it generates the checkpoint, runs `fatesim realrun` as child
processes and writes a JSON with every figure; and its pieces (peak RSS of one child, option detection,
failures) do what they say."""

from __future__ import annotations

import json
import sys
from pathlib import Path

from click.testing import CliRunner

from realrun.bench_scale import main, run_child
from tests.realrun.test_checkpoint_gen import TINY_QWEN


def test_bench_scale_end_to_end_on_a_tiny_model(tmp_path: Path) -> None:
    """lod, fate and fate again as subprocesses: plausible figures, the first fate run builds its store and the
    second reuses it, the streaming trace recorder runs, and --delete-after leaves no model."""
    config = tmp_path / "tiny-qwen.json"
    config.write_text(json.dumps(TINY_QWEN))
    out = tmp_path / "report.json"
    cache = tmp_path / "cache"
    result = CliRunner().invoke(main, [
        "--models", "", "--config", str(config), "--policies", "lod,fate", "--budget", "40%", "--prompt-tokens", "8",
        "--new-tokens", "3", "--cache", str(cache), "--max-shard-gb", "0.0001", "--delete-after", "--threads", "1",
        "--out", str(out)])
    assert result.exit_code == 0, result.output + repr(result.exception)
    report = json.loads(out.read_text())
    assert {"command", "date", "machine", "models"} <= set(report)
    assert report["machine"]["host"] and report["machine"]["cores"] >= 1
    entry = report["models"]["tiny-qwen"]
    ck = entry["checkpoint"]
    assert not ck["reused"] and ck["num_shards"] >= 2 and ck["bytes_on_disk"] >= ck["total_bytes"] > 0
    assert [r["run"] for r in entry["runs"]] == ["lod", "fate", "fate (again)"]
    for run in entry["runs"]:
        assert run["status"] == "ok", run
        assert run["command"].startswith("fatesim realrun --model ") and "--memory-budget 40%" in run["command"]
        assert 50 * 2**20 < run["peak_rss_bytes"] < 8 * 2**30  # torch is in there; the model is tiny
        assert run["wall_s"] > 0 and run["prefill_tokens_per_s"] > 0 and run["decode_tokens_per_s"] > 0
        assert run["generated_tokens"] == 3
        assert run["slow_tier_bytes_read"] > 0 and run["slow_tier_reads"] > 0  # 40%: experts come from disk
        assert 0 <= run["hit_rate"] <= 1
    lod, fate, again = entry["runs"]
    assert not lod["stores_created"] and fate["stores_created"] and not again["stores_created"]
    assert "fate_store_build_s_estimate" in entry
    trace = entry["trace_record"]
    assert trace["status"] == "ok", trace
    assert trace["peak_rss_bytes"] > 0 and trace["trace_bytes"] > 0
    assert not (cache / "tiny-qwen").exists() and not (cache / "tiny-qwen.runs").exists()
    assert "| tiny-qwen | fate (again) | ok |" in result.output and "| tiny-qwen | trace record |" in result.output


def test_a_failing_child_is_recorded_and_fails_the_command(tmp_path: Path) -> None:
    """A budget too small for top-k slots: realrun exits 2; the JSON says so with its stderr, exit status 1."""
    config = tmp_path / "tiny-qwen.json"
    config.write_text(json.dumps(TINY_QWEN))
    out = tmp_path / "report.json"
    result = CliRunner().invoke(main, [
        "--models", "", "--config", str(config), "--policies", "lod", "--budget", "1%", "--prompt-tokens", "4",
        "--new-tokens", "1", "--cache", str(tmp_path / "cache"), "--no-trace", "--out", str(out)])
    assert result.exit_code == 1
    run = json.loads(out.read_text())["models"]["tiny-qwen"]["runs"][0]
    assert run["status"] == "failed" and run["returncode"] == 2 and "fatesim: error:" in run["stderr_tail"]
    assert (tmp_path / "cache" / "tiny-qwen").is_dir()  # kept without --delete-after


def test_peak_rss_is_the_childs_own() -> None:
    """A child that touches 300 MB reports at least that; a bare interpreter reports its own ~10-20 MB, not
    the peak of the child before it nor that of this (pytest, torch-importing, 100s of MB) process."""
    import resource

    assert resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024 > 100 * 2**20  # the bias to avoid
    big = run_child([sys.executable, "-c", "b = bytearray(300 * 2**20); b[::4096] = b'x' * len(b[::4096])"], {})
    small = run_child([sys.executable, "-c", "pass"], {})
    assert big.status == small.status == "ok"
    assert big.peak_rss_bytes > 300 * 2**20 and 0 < small.peak_rss_bytes < 40 * 2**20


def test_child_status_timeout_and_signal() -> None:
    slow = run_child([sys.executable, "-c", "import time; time.sleep(30)"], {}, timeout_s=1)
    assert slow.status == "timeout" and slow.returncode == -9 and slow.wall_s < 20
    failed = run_child([sys.executable, "-c", "import sys; sys.exit(3)"], {})
    assert failed.status == "failed" and failed.returncode == 3


