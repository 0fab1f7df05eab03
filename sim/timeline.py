"""Chrome trace-event JSON of a replay (opens in Perfetto and chrome://tracing).

One process ("fatesim"), one track (thread) per resource: the GPU stream, each copy engine, the CPU
predictor thread and the CPU expert thread. Complete events ("ph": "X") with microsecond timestamps;
this module is the only place seconds become microseconds.
"""

from __future__ import annotations

import json
from pathlib import Path

from sim.engine import EngineResult

GPU_TID, CPU_TID, CPU_EXPERT_TID, LINK_TID0 = 1, 2, 3, 10
"""Track ids: copy engine i is LINK_TID0 + i."""


def _us(seconds: float) -> float:
    return round(seconds * 1e6, 3)


def timeline_events(result: EngineResult) -> list[dict]:
    """The trace events of one replay, metadata first."""
    events: list[dict] = [{"ph": "M", "pid": 1, "name": "process_name", "args": {"name": "fatesim"}}]
    names = {GPU_TID: "GPU stream", CPU_TID: "CPU predictor", CPU_EXPERT_TID: "CPU experts"}
    names.update({LINK_TID0 + i: f"copy engine {i}" for i in range(result.copy_engines)})
    for tid, name in names.items():
        events.append({"ph": "M", "pid": 1, "tid": tid, "name": "thread_name", "args": {"name": name}})
    for name, start, end, args in result.gpu_spans:
        events.append({"ph": "X", "pid": 1, "tid": GPU_TID, "name": name, "ts": _us(start), "dur": _us(end - start),
                       "args": args})
    for name, start, end, args in result.cpu_spans:
        tid = CPU_TID if name == "predict" else CPU_EXPERT_TID
        events.append({"ph": "X", "pid": 1, "tid": tid, "name": name, "ts": _us(start), "dur": _us(end - start),
                       "args": args})
    for engine, start, end, t in result.link_spans:
        events.append({"ph": "X", "pid": 1, "tid": LINK_TID0 + engine, "name": f"{t.kind} L{t.layer} E{t.expert}",
                       "ts": _us(start), "dur": _us(end - start),
                       "args": {"layer": t.layer, "expert": t.expert, "precision": t.precision, "bytes": t.nbytes,
                                "kind": t.kind, "used": t.used}})
    return events


def write_timeline(result: EngineResult, path: str | Path) -> None:
    """Write the replay's timeline to `path` atomically."""
    from traces.atomic import atomic_output

    with atomic_output(path) as tmp:
        tmp.write_text(json.dumps({"traceEvents": timeline_events(result), "displayTimeUnit": "ms"}))
