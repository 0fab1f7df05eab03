"""PNG figures from sweep results and timelines (matplotlib, Agg backend: no display needed).

* `throughput_vs_budget[-<profile>].png`: decode and prefill tokens/s against the fast-memory budget, one
  line per policy (and per value of any other swept key), like the Fate paper's figures.
* `hit_rate_per_layer[-<profile>].png`: expert hit rate per MoE layer, one line per policy, one panel per
  budget (at most four budgets, spread over the swept range).
* `timeline.png`: a Gantt excerpt of a Chrome trace-event timeline (`fatesim replay --timeline`): one row
  per track (GPU stream, copy engine, CPU thread), the first `window_s` seconds.
"""

from __future__ import annotations

import json
import os
import re
from collections import defaultdict
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from traces.atomic import atomic_output
from traces.errors import UserError

_CONFIG_KEYS = ("profile", "link_bandwidth_bytes_per_s", "as_model", "estimator")
_KIND_COLOURS = {"attention": "#4C72B0", "expert": "#55A868", "shared": "#8172B2", "stall": "#F2B8B8",
                 "demand": "#C44E52", "prefetch": "#DD8452", "predict": "#937860", "cpu": "#64B5CD"}
"""Fixed colours for the span kinds the simulator's timeline writer uses; others cycle through tab10."""
DEFAULT_TIMELINE_EVENTS = 150
"""The default excerpt spans this many events from its start: a few layers, each span still visible."""


def _pyplot():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def _file_part(text: str) -> str:
    """`text` made safe inside a file name (a profile such as 'h100@25GB/s' has a slash)."""
    return re.sub(r"[^A-Za-z0-9._-]+", "_", text).strip("_")


def _save(fig, path: Path) -> Path:
    with atomic_output(path) as tmp:
        fig.savefig(tmp, format="png", dpi=130, bbox_inches="tight")
    _pyplot().close(fig)
    return path


def _varying(rows: list[dict], keys: Sequence[str]) -> list[str]:
    return [k for k in keys if len({str(r.get(k)) for r in rows}) > 1]


def _label(row: dict, extra: Sequence[str]) -> str:
    parts = [str(row["policy"])]
    for key in extra:
        value = row.get(key)
        if key == "link_bandwidth_bytes_per_s":
            parts.append("link=profile" if value in (None, "") else f"link={float(value) / 1e9:g}GB/s")
        else:
            parts.append(f"{key.removeprefix('set.')}={value}")
    return ", ".join(parts)


_LINESTYLES = ("-", "--", ":", "-.")
_MARKERS = ("o", "s", "^", "D", "v", "P")


def _style(row: dict, extra: Sequence[str], policies: list[str], variants: list[tuple]) -> dict[str, Any]:
    """Colour by policy, line style and marker by the value of the other swept keys (stable across panels)."""
    import matplotlib

    colours = matplotlib.colormaps["tab10"]
    variant = variants.index(tuple(str(row.get(k)) for k in extra))
    return {"color": colours(policies.index(str(row["policy"])) % 10),
            "linestyle": _LINESTYLES[variant % len(_LINESTYLES)], "marker": _MARKERS[variant % len(_MARKERS)]}


def _style_keys(rows: list[dict], extra: Sequence[str]) -> tuple[list[str], list[tuple]]:
    return (sorted({str(r["policy"]) for r in rows}), sorted({tuple(str(r.get(k)) for k in extra) for r in rows}))


def _budget_gib(row: dict) -> float:
    value = row.get("memory_budget_bytes")
    if value in (None, ""):
        raise UserError("results lack memory_budget_bytes; plot needs rows written by `fatesim sweep`")
    return float(value) / 2**30


def _ok_rows(rows: list[dict]) -> list[dict]:
    ok = [r for r in rows if r.get("status", "ok") == "ok"]
    if not ok:
        raise UserError("the results hold no successful configuration to plot")
    return ok


def _by_profile(rows: list[dict]) -> dict[str, list[dict]]:
    groups: dict[str, list[dict]] = defaultdict(list)
    for r in rows:
        groups[str(r.get("profile", ""))].append(r)
    return dict(groups)


def plot_throughput(rows: list[dict], out_dir: Path) -> list[Path]:
    """Decode and prefill tokens/s vs budget (GiB), a line per policy (+ varying keys); one PNG per profile."""
    plt = _pyplot()
    rows = _ok_rows(rows)
    groups = _by_profile(rows)
    paths = []
    for profile, prow in groups.items():
        extra = _varying(prow, [k for k in _CONFIG_KEYS if k != "profile"] +
                         sorted({k for r in prow for k in r if k.startswith("set.")}))
        lines: dict[str, list[dict]] = defaultdict(list)
        for r in prow:
            lines[_label(r, extra)].append(r)
        metrics = [(m, t) for m, t in (("decode_tokens_per_s", "Decode"), ("prefill_tokens_per_s", "Prefill"))
                   if any(r.get(m) not in (None, "", 0, 0.0) for r in prow)]  # a decode-only trace has no prefill
        if not metrics:
            continue
        fig, axes = plt.subplots(1, len(metrics), figsize=(5.5 * len(metrics) + 0.5, 4.2), squeeze=False)
        axes = axes[0]
        policies, variants = _style_keys(prow, extra)
        for ax, (metric, title) in zip(axes, metrics, strict=True):
            for label, lrows in sorted(lines.items()):
                pts = sorted((_budget_gib(r), float(r[metric])) for r in lrows if r.get(metric) not in (None, ""))
                if pts:
                    ax.plot([p[0] for p in pts], [p[1] for p in pts], label=label,
                            **_style(lrows[0], extra, policies, variants))
            ax.set_xlabel("fast-memory budget (GiB)")
            ax.set_ylabel("tokens / s")
            ax.set_title(f"{title} throughput")
            ax.grid(True, alpha=0.3)
            ax.set_ylim(bottom=0)
        axes[-1].legend(fontsize=8, loc="upper left", bbox_to_anchor=(1.02, 1.0))
        model = prow[0].get("model", "")
        fig.suptitle(f"{model} on {profile}".strip(), y=1.02)
        name = "throughput_vs_budget" + (f"-{_file_part(profile)}" if len(groups) > 1 else "") + ".png"
        paths.append(_save(fig, out_dir / name))
    return paths


def _per_layer(row: dict) -> list[float] | None:
    value = row.get("hit_rate_per_layer")
    if value in (None, ""):
        return None
    return json.loads(value) if isinstance(value, str) else list(value)


def plot_hit_rate_per_layer(rows: list[dict], out_dir: Path) -> list[Path]:
    """Hit rate per MoE layer, a line per policy, one panel per budget (<= 4); one PNG per profile."""
    plt = _pyplot()
    rows = [r for r in _ok_rows(rows) if _per_layer(r) is not None]
    if not rows:
        return []
    groups = _by_profile(rows)
    paths = []
    for profile, prow in groups.items():
        budgets = sorted({_budget_gib(r) for r in prow})
        if len(budgets) > 4:
            budgets = [budgets[round(i * (len(budgets) - 1) / 3)] for i in range(4)]
        extra = _varying(prow, [k for k in _CONFIG_KEYS if k != "profile"] +
                         sorted({k for r in prow for k in r if k.startswith("set.")}))
        policies, variants = _style_keys(prow, extra)
        fig, axes = plt.subplots(1, len(budgets), figsize=(4.2 * len(budgets), 3.8), squeeze=False, sharey=True)
        for ax, budget in zip(axes[0], budgets, strict=True):
            for r in sorted((r for r in prow if _budget_gib(r) == budget), key=lambda r: _label(r, extra)):
                per_layer = _per_layer(r)
                style = _style(r, extra, policies, variants) | {"marker": "."}
                ax.plot(range(len(per_layer)), [100 * v for v in per_layer], label=_label(r, extra), **style)
            ax.set_title(f"budget {budget:.2f} GiB")
            ax.set_xlabel("MoE layer")
            ax.grid(True, alpha=0.3)
            ax.set_ylim(0, 101)
        axes[0][0].set_ylabel("expert hit rate (%)")
        axes[0][-1].legend(fontsize=8, loc="upper left", bbox_to_anchor=(1.02, 1.0))
        fig.suptitle(f"{prow[0].get('model', '')} on {profile}: hit rate per layer".strip(), y=1.03)
        name = "hit_rate_per_layer" + (f"-{_file_part(profile)}" if len(groups) > 1 else "") + ".png"
        paths.append(_save(fig, out_dir / name))
    return paths


def read_timeline(path: str | os.PathLike[str]) -> tuple[dict[tuple, str], list[dict]]:
    """(track names by (pid, tid), complete events with ts/dur in µs) of a Chrome trace-event JSON file."""
    try:
        data = json.loads(Path(path).read_text())
    except FileNotFoundError:
        raise UserError(f"timeline file {path} does not exist; write one with `fatesim replay --timeline`") from None
    except (json.JSONDecodeError, UnicodeDecodeError) as error:
        raise UserError(f"timeline {path} is not JSON: {error}") from None
    events = data.get("traceEvents") if isinstance(data, dict) else data
    if not isinstance(events, list):
        raise UserError(f"timeline {path} is not a Chrome trace (no traceEvents list)")
    names: dict[tuple, str] = {}
    process: dict[Any, str] = {}
    spans = []
    for e in events:
        if not isinstance(e, dict):
            continue
        if e.get("ph") == "M" and e.get("name") == "thread_name":
            names[(e.get("pid"), e.get("tid"))] = str(e.get("args", {}).get("name", e.get("tid")))
        elif e.get("ph") == "M" and e.get("name") == "process_name":
            process[e.get("pid")] = str(e.get("args", {}).get("name", e.get("pid")))
        elif e.get("ph") == "X" and "ts" in e:
            spans.append(e)
    for key in {(e.get("pid"), e.get("tid")) for e in spans}:
        if key not in names:
            names[key] = f"{process.get(key[0], key[0])}/{key[1]}"
    return names, spans


def plot_timeline(path: str | os.PathLike[str], out_dir: Path, window_s: float | None = None,
                  start_s: float = 0.0, data: tuple[dict[tuple, str], list[dict]] | None = None) -> Path:
    """Gantt of the timeline's spans from `start_s` (after the first event) for `window_s` seconds
    (default: long enough for DEFAULT_TIMELINE_EVENTS events); `data`: `read_timeline(path)` if read."""
    plt = _pyplot()
    from matplotlib.patches import Patch

    names, spans = data if data is not None else read_timeline(path)
    if not spans:
        raise UserError(f"timeline {path} has no complete ('X') events to draw")
    t0 = min(float(e["ts"]) for e in spans)
    t_end = max(float(e["ts"]) + float(e.get("dur", 0)) for e in spans)
    lo = t0 + start_s * 1e6
    if window_s is None:
        ordered = sorted(float(e["ts"]) for e in spans if float(e["ts"]) >= lo)
        if not ordered:
            raise UserError(f"timeline {path} has no events after {start_s * 1e3:g} ms")
        last = ordered[min(len(ordered) - 1, DEFAULT_TIMELINE_EVENTS)]
        window_s = max((last - lo) * 1e-6, (t_end - lo) * 1e-6 if last == ordered[-1] else 0.0, 1e-6)
    hi = lo + window_s * 1e6
    tracks = sorted(names, key=lambda k: (str(names[k]).lower().startswith("cpu"), str(names[k])))
    row_of = {k: i for i, k in enumerate(tracks)}
    cmap = plt.get_cmap("tab10")
    kinds: dict[str, Any] = {}
    fig, ax = plt.subplots(figsize=(12, 0.55 * len(tracks) + 1.6))
    for e in spans:
        ts, dur = float(e["ts"]), float(e.get("dur", 0))
        if ts + dur < lo or ts > hi:
            continue
        kind = str(e.get("cat") or str(e.get("name", "")).split(" ")[0])
        if kind not in kinds:
            kinds[kind] = _KIND_COLOURS.get(kind.lower(), cmap(len(kinds) % 10))
        y = row_of[(e.get("pid"), e.get("tid"))]
        x0, x1 = max(ts, lo), min(ts + dur, hi)
        ax.barh(y, (x1 - x0) / 1e3, left=(x0 - t0) / 1e3, height=0.7, color=kinds[kind], edgecolor="none")
    ax.set_yticks(range(len(tracks)))
    ax.set_yticklabels([names[k] for k in tracks])
    ax.invert_yaxis()
    ax.set_xlim((lo - t0) / 1e3, (hi - t0) / 1e3)
    ax.set_xlabel("time (ms)")
    ax.grid(True, axis="x", alpha=0.3)
    ax.legend(handles=[Patch(color=c, label=k) for k, c in kinds.items()], fontsize=8, loc="upper left",
              bbox_to_anchor=(1.01, 1.0))
    ax.set_title(f"timeline excerpt: {window_s * 1e3:.2f} ms from t = {start_s * 1e3:.2f} ms ({Path(path).name})")
    return _save(fig, out_dir / "timeline.png")


def plot_results(results: str | os.PathLike[str] | None, out_dir: str | os.PathLike[str],
                 timeline: str | os.PathLike[str] | None = None, window_s: float | None = None,
                 start_s: float = 0.0) -> list[Path]:
    """`fatesim plot`: every figure the inputs allow, into `out_dir` (created if missing); returns the paths."""
    from sim.analysis.sweep import read_results
    from traces.paths import check_output_folder

    if results is None and timeline is None:
        raise UserError("give a results file (from `fatesim sweep`), a --timeline file, or both")
    if window_s is not None and not window_s > 0:
        raise UserError(f"--window-ms must be more than 0, got {window_s * 1e3:g}")
    if not start_s >= 0:
        raise UserError(f"--start-ms must be 0 or more, got {start_s * 1e3:g}")
    out = check_output_folder(out_dir, what="--out")
    rows = read_results(results) if results is not None else None  # inputs read (and checked) before any output
    timeline_data = read_timeline(timeline) if timeline is not None else None
    try:
        out.mkdir(parents=True, exist_ok=True)
    except OSError as error:
        raise UserError(f"cannot create output folder {out}: {error.strerror}") from None
    paths: list[Path] = []
    if rows is not None:
        paths += plot_throughput(rows, out)
        paths += plot_hit_rate_per_layer(rows, out)
    if timeline is not None:
        paths.append(plot_timeline(timeline, out, window_s=window_s, start_s=start_s, data=timeline_data))
    return paths
