"""Timelines: exact integer-nanosecond spans (touching spans touch, nested ones nest, per track), a window
of simulated time, and streaming output.

Perfetto's trace processor cannot be installed here (the `perfetto` package downloads its binary at run
time), so the file is checked the way it would read it: every `ts`/`dur` parsed as an exact decimal of
microseconds, and every track's spans must nest or follow one another."""

from __future__ import annotations

import json
from decimal import Decimal

import pytest

from sim.engine import EngineResult
from sim.replay import replay
from sim.synthetic import synthetic_trace
from sim.timeline import (
    GPU_TID,
    ns,
    parse_window,
    timeline_events,
    us_text,
    write_timeline,
)
from traces.errors import UserError


def exact_spans(path) -> dict[int, list[tuple[int, int, str]]]:
    """track -> [(start_ns, end_ns, name)], ts and dur read as exact decimals (never through a float)."""
    data = json.loads(path.read_text(), parse_float=Decimal)
    tracks: dict[int, list[tuple[int, int, str]]] = {}
    for e in data["traceEvents"]:
        if e["ph"] != "X":
            continue
        start, dur = Decimal(e["ts"]) * 1000, Decimal(e["dur"]) * 1000
        assert start == start.to_integral_value() and dur == dur.to_integral_value(), e  # whole nanoseconds
        assert dur >= 0, e
        tracks.setdefault(e["tid"], []).append((int(start), int(start + dur), e["name"]))
    return tracks


def overlaps(spans: list[tuple[int, int, str]]) -> list[tuple]:
    """Pairs of spans of one track that overlap without one containing the other."""
    bad = []
    stack: list[tuple[int, int, str]] = []
    for span in sorted(spans, key=lambda s: (s[0], -s[1])):
        while stack and stack[-1][1] <= span[0]:
            stack.pop()
        if stack and span[1] > stack[-1][1]:
            bad.append((stack[-1], span))
        stack.append(span)
    return bad


def test_nanoseconds_are_exact_and_monotone() -> None:
    assert us_text(1234567) == "1234.567" and us_text(5) == "0.005" and us_text(0) == "0.000"
    assert us_text(-1500) == "-1.500"
    assert ns(1e-9) == 1 and ns(0.1234567894) == 123456789
    xs = sorted([0.1 * i / 7 + 1e-10 * (i % 3) for i in range(500)])
    assert [ns(x) for x in xs] == sorted(ns(x) for x in xs)


def test_touching_spans_touch_where_separate_rounding_overlapped_them() -> None:
    """ts and dur rounded to 0.001 µs apiece gave 0.001 + 1.000 > 1.000: a 1 ns overlap. Now end = next start."""
    result = EngineResult(step_start_at=[], step_end_at=[], gpu_stall_s=0.0, makespan_s=2e-6, link_busy_s=0.0,
                          copy_engines=1,
                          gpu_spans=[("a", 0.6e-9, 1000.4e-9, {}), ("b", 1000.4e-9, 2000e-9, {}),
                                     ("c", 1200e-9, 1500.4e-9, {})])
    (a, b, c) = [e for e in timeline_events(result) if e["ph"] == "X"]
    assert (a["ts"], a["dur"], b["ts"], b["dur"]) == (0.001, 0.999, 1.0, 1.0)
    old_end_a = round(0.6e-9 * 1e6, 3) + round((1000.4e-9 - 0.6e-9) * 1e6, 3)
    assert old_end_a > round(1000.4e-9 * 1e6, 3)  # the bug this replaces
    assert c["ts"] == 1.2 and c["dur"] == 0.3


@pytest.fixture(scope="module")
def fate_timeline(tmp_path_factory):
    path = tmp_path_factory.mktemp("tl") / "fate.json"
    trace = synthetic_trace(sequences=2, prompt_tokens=16, decode_tokens=30, seed=5)
    m = replay(trace, policy="fate", memory_budget="15%", timeline=path)
    return path, m, trace


def test_every_track_nests_or_follows_in_exact_nanoseconds(fate_timeline) -> None:
    path, _, _ = fate_timeline
    tracks = exact_spans(path)
    assert GPU_TID in tracks and any(tid >= 10 for tid in tracks) and sum(map(len, tracks.values())) > 1000
    for tid, spans in tracks.items():
        assert overlaps(spans) == [], tid


def test_a_window_keeps_only_the_spans_that_overlap_it(fate_timeline, tmp_path) -> None:
    path, m, trace = fate_timeline
    full = exact_spans(path)
    end_s = max(end for spans in full.values() for _, end, _ in spans) / 1e9
    window = (0.3 * end_s, 0.35 * end_s)
    cut = tmp_path / "cut.json"
    again = replay(trace, policy="fate", memory_budget="15%", timeline=cut, timeline_window=window)
    assert again == m  # a timeline never changes the replay
    lo, hi = ns(window[0]), ns(window[1])
    kept = exact_spans(cut)
    expected = {tid: sorted(s for s in spans if s[1] >= lo and s[0] <= hi) for tid, spans in full.items()}
    assert {tid: sorted(spans) for tid, spans in kept.items()} == {t: s for t, s in expected.items() if s}
    assert 0 < cut.stat().st_size < path.stat().st_size / 5
    names = [e for e in json.loads(cut.read_text())["traceEvents"] if e["ph"] == "M"]
    assert {"GPU stream", "copy engine 0"} <= {e["args"]["name"] for e in names if e["name"] == "thread_name"}


@pytest.mark.parametrize("text", ["", "1", "2:1", "1:1", "-1:2", "a:b", "1:2:3"])
def test_bad_windows_are_one_line_errors(text: str) -> None:
    with pytest.raises(UserError, match="--timeline-window"):
        parse_window(text)


def test_window_text() -> None:
    assert parse_window("2.5:2.6") == (2.5, 2.6) and parse_window(" 0 : 1e-3 ") == (0.0, 0.001)


def test_writer_streams_through_a_temporary_file(tmp_path) -> None:
    result = EngineResult(step_start_at=[], step_end_at=[], gpu_stall_s=0.0, makespan_s=1.0, link_busy_s=0.0,
                          copy_engines=2, gpu_spans=[("x", 0.0, 1e-3, {"layer": 1})])
    out = tmp_path / "t.json"
    write_timeline(result, out)
    data = json.loads(out.read_text())
    assert data["displayTimeUnit"] == "ms" and [p.name for p in tmp_path.iterdir()] == ["t.json"]
    assert [e["args"]["name"] for e in data["traceEvents"] if e.get("name") == "thread_name"] == [
        "GPU stream", "CPU predictor", "CPU experts", "copy engine 0", "copy engine 1"]
