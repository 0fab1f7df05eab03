"""Plots: PNG files are written and are valid PNGs; bad inputs are one-line errors."""

from __future__ import annotations

import json

import pytest

from sim.analysis.plot import plot_results
from sim.analysis.sweep import write_results
from traces.errors import UserError

PNG_MAGIC = b"\x89PNG\r\n\x1a\n"


def _rows() -> list[dict]:
    rows = []
    for policy, speed in (("lod", 1.0), ("lru", 1.6), ("fate", 3.0)):
        for share in (0.1, 0.25, 0.5, 0.75, 1.0):
            budget = int((4 + 10 * share) * 2**30)
            rows.append({"status": "ok", "policy": policy, "budget": f"{share:.0%}", "profile": "rtx3090-bound",
                         "model": "qwen1.5-moe-a2.7b", "memory_budget_bytes": budget,
                         "decode_tokens_per_s": speed * (1 + 4 * share), "prefill_tokens_per_s": 50 * speed * (1 + share),
                         "hit_rate_per_layer": json.dumps([min(1.0, share * speed * (1 - layer / 40)) for layer in range(24)])})
    rows.append({"status": "error", "policy": "eap", "budget": "10%", "profile": "rtx3090-bound", "error": "x"})
    return rows


def _timeline(path) -> None:
    events = [{"ph": "M", "name": "thread_name", "pid": 1, "tid": 0, "args": {"name": "GPU stream"}},
              {"ph": "M", "name": "thread_name", "pid": 1, "tid": 1, "args": {"name": "copy engine 0"}},
              {"ph": "M", "name": "thread_name", "pid": 1, "tid": 2, "args": {"name": "CPU predictor"}}]
    t = 0.0
    for layer in range(30):
        events.append({"ph": "X", "pid": 1, "tid": 0, "ts": t, "dur": 80.0, "name": f"attention L{layer}", "cat": "attention"})
        events.append({"ph": "X", "pid": 1, "tid": 0, "ts": t + 90, "dur": 120.0, "name": f"experts L{layer}", "cat": "experts"})
        events.append({"ph": "X", "pid": 1, "tid": 1, "ts": t + 10, "dur": 150.0, "name": "prefetch", "cat": "prefetch"})
        events.append({"ph": "X", "pid": 1, "tid": 2, "ts": t + 80, "dur": 20.0, "name": "predict", "cat": "predictor"})
        t += 230.0
    path.write_text(json.dumps({"traceEvents": events}))


@pytest.mark.parametrize("suffix", [".csv", ".parquet"])
def test_plots_are_pngs(tmp_path, suffix: str) -> None:
    results = tmp_path / f"r{suffix}"
    write_results(_rows(), results)
    timeline = tmp_path / "tl.json"
    _timeline(timeline)
    paths = plot_results(results, tmp_path / "png", timeline=timeline)
    assert sorted(p.name for p in paths) == ["hit_rate_per_layer.png", "throughput_vs_budget.png", "timeline.png"]
    for p in paths:
        data = p.read_bytes()
        assert data.startswith(PNG_MAGIC) and len(data) > 10_000


def test_bad_inputs(tmp_path) -> None:
    with pytest.raises(UserError, match="does not exist"):
        plot_results(tmp_path / "none.csv", tmp_path / "png")
    bad = tmp_path / "tl.json"
    bad.write_text("{not json")
    with pytest.raises(UserError, match="not JSON"):
        plot_results(None, tmp_path / "png", timeline=bad)
    results = tmp_path / "r.csv"
    write_results([{"status": "error", "policy": "lod"}], results)
    with pytest.raises(UserError, match="no successful"):
        plot_results(results, tmp_path / "png")
