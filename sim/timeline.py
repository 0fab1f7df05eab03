"""Chrome trace-event JSON of a replay (opens in Perfetto and chrome://tracing).

One process ("fatesim"), one track (thread) per resource: the GPU stream, each copy engine, the CPU
predictor thread and the CPU expert thread. Complete events ("ph": "X"). This module is the only place
seconds become trace time, and it does so exactly: every span's start and end are rounded once to whole
nanoseconds and `dur` is end − start in those nanoseconds, so spans that touch or nest in the replay
touch or nest in the file (rounding them separately left 1 ns overlaps). `ts` and `dur` are written in
microseconds with exactly three decimals, the decimal form of those nanoseconds.

A window (start_s, end_s) keeps only the spans that overlap it (whole, not clipped), so a timeline of a
long replay stays small; events are streamed to the file, never held as one string.
"""

from __future__ import annotations

import json
import re
from collections.abc import Iterator
from pathlib import Path
from typing import IO

from sim.engine import EngineResult
from traces.errors import UserError

GPU_TID, CPU_TID, CPU_EXPERT_TID, LINK_TID0 = 1, 2, 3, 10
"""Track ids: copy engine i is LINK_TID0 + i."""


def ns(seconds: float) -> int:
    """Seconds -> whole nanoseconds (round half to even, as Python's round); monotone, so ordered instants
    stay ordered."""
    return round(seconds * 1e9)


def us_text(nanoseconds: int) -> str:
    """Whole nanoseconds as exact microseconds with three decimals: 1234567 -> '1234.567'."""
    sign = "-" if nanoseconds < 0 else ""
    whole, frac = divmod(abs(nanoseconds), 1000)
    return f"{sign}{whole}.{frac:03d}"


def parse_window(text: str) -> tuple[float, float]:
    """`--timeline-window START:END` (seconds) -> (start_s, end_s); UserError when it is not that."""
    match = re.fullmatch(r"\s*([0-9]*\.?[0-9]+(?:[eE][+-]?[0-9]+)?)\s*:\s*([0-9]*\.?[0-9]+(?:[eE][+-]?[0-9]+)?)\s*",
                         str(text))
    if not match:
        raise UserError(f"--timeline-window {text!r}: write START:END in seconds of simulated time, e.g. 2.5:2.6")
    window = (float(match.group(1)), float(match.group(2)))
    check_window(window)
    return window


def check_window(window: tuple[float, float]) -> None:
    """UserError unless 0 <= start < end."""
    start, end = window
    if not 0.0 <= start < end:
        raise UserError(f"--timeline-window {start:g}:{end:g}: the start must be >= 0 and before the end")


def _spans(result: EngineResult) -> Iterator[tuple[int, str, float, float, dict]]:
    """(track id, name, start_s, end_s, args) of every span of the replay."""
    for name, start, end, args in result.gpu_spans:
        yield GPU_TID, name, start, end, args
    for name, start, end, args in result.cpu_spans:
        yield (CPU_TID if name == "predict" else CPU_EXPERT_TID), name, start, end, args
    for engine, start, end, t in result.link_spans:
        yield (LINK_TID0 + engine, f"{t.kind} L{t.layer} E{t.expert}", start, end,
               {"layer": t.layer, "expert": t.expert, "precision": t.precision, "bytes": t.nbytes,
                "kind": t.kind, "used": t.used})


def _event_text(tid: int, name: str, start_ns: int, end_ns: int, args: dict) -> str:
    return (f'{{"ph":"X","pid":1,"tid":{tid},"name":{json.dumps(name)},"ts":{us_text(start_ns)},'
            f'"dur":{us_text(end_ns - start_ns)},"args":{json.dumps(args, separators=(",", ":"))}}}')


def timeline_lines(result: EngineResult, window: tuple[float, float] | None = None) -> Iterator[str]:
    """The JSON text of the timeline in pieces (metadata events first)."""
    names = {GPU_TID: "GPU stream", CPU_TID: "CPU predictor", CPU_EXPERT_TID: "CPU experts"}
    names.update({LINK_TID0 + i: f"copy engine {i}" for i in range(result.copy_engines)})
    yield '{"displayTimeUnit":"ms","traceEvents":[\n'
    yield '{"ph":"M","pid":1,"name":"process_name","args":{"name":"fatesim"}}'
    for tid, name in names.items():
        yield f',\n{{"ph":"M","pid":1,"tid":{tid},"name":"thread_name","args":{{"name":{json.dumps(name)}}}}}'
    lo, hi = (ns(window[0]), ns(window[1])) if window is not None else (None, None)
    for tid, name, start, end, args in _spans(result):
        start_ns, end_ns = ns(start), ns(end)
        if lo is not None and (end_ns < lo or start_ns > hi):
            continue
        yield ",\n" + _event_text(tid, name, start_ns, end_ns, args)
    yield "\n]}\n"


def timeline_events(result: EngineResult, window: tuple[float, float] | None = None) -> list[dict]:
    """The trace events of one replay as dicts, metadata first (for tests and small replays)."""
    return json.loads("".join(timeline_lines(result, window)))["traceEvents"]


def _write(handle: IO[str], result: EngineResult, window: tuple[float, float] | None) -> None:
    buffer: list[str] = []
    size = 0
    for piece in timeline_lines(result, window):
        buffer.append(piece)
        size += len(piece)
        if size > 1 << 20:
            handle.write("".join(buffer))
            buffer, size = [], 0
    handle.write("".join(buffer))


def write_timeline(result: EngineResult, path: str | Path, window: tuple[float, float] | None = None) -> None:
    """Write the replay's timeline to `path` atomically (only spans overlapping `window`, if given)."""
    from traces.atomic import atomic_output

    with atomic_output(path) as tmp, open(tmp, "w") as handle:
        _write(handle, result, window)
