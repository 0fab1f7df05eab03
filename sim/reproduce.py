"""`fatesim reproduce fate|speculate|lrc`: the papers' setups in the simulator, side by side with their tables.

`reproduce fate` replays the Fate paper's grid: {Qwen1.5-MoE, DeepSeekMoE-16B} (routing of the embedded
stand-ins, `sim.paper_traces`, prompts of exactly 512 tokens, 32 decoded) x {rtx3090-hf-eager,
gtx1080ti-hf-eager} x {lod, eap, fate} (and the baseline variants, `VARIANTS`) x the paper's budgets under
Fate's budget accounting (`sim.accounting`), then sets every figure of `sim.papers.FATE_FIGURES` beside
its simulated value, marked fit-target or prediction and P or S. `reproduce speculate` and `reproduce lrc`
live in `sim.reproduce_tables`; `python -m sim.reproduce fit` refits the hf-eager profiles
(`sim.reproduce_fit`).
"""

from __future__ import annotations

import json
import sys
import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from typing import Any

import click

from sim.accounting import GIB
from sim.hardware import HardwareProfile, load_profile
from sim.paper_traces import PAPER_MODELS, paper_trace
from sim.papers import FATE_FIGURES, PaperFigure
from sim.replay import LoadedTrace, load, replay
from traces.errors import UserError

MACHINES = ("rtx3090", "gtx1080ti")
BUDGETS_GB = {"rtx3090": (6, 8, 10, 12, 14, 16, 20, 24), "gtx1080ti": (6, 7, 8, 9, 10, 11)}
"""The paper's budgets: 6-24 GB on the RTX 3090 (24 GB card; every 2 GB up to 16, where Fate's cache already
holds every expert in INT4 for both models, then 20 and 24), 6-11 GB on the GTX 1080 Ti (11 GB card)."""
REFERENCE_GB = {"rtx3090": 24, "gtx1080ti": 11}
"""Where single-value figures are compared: Fate's code's default budget (`--memory_budget 0`: the whole
device), as the secondary sources do not state one. The span over `BUDGETS_GB` is printed beside."""
PROMPT_TOKENS = 512

SERIAL_LOD_OVERRIDES = {"serial_loads": "true"}
"""Load-on-demand with serial copies (each load starts after the previous expert of the step computed): the
controller option `serial_loads`."""

VARIANTS: dict[str, tuple[str, dict[str, str]]] = {
    "lod": ("lod", {}),
    "eap": ("eap", {}),
    "fate": ("fate", {}),
    "lod:serial": ("lod", SERIAL_LOD_OVERRIDES),
    "eap:prefetch_count=2": ("eap", {"prefetch_count": "2"}),
    "eap:prefetch_count=8": ("eap", {"prefetch_count": "8"}),
    "eap:precision=int4": ("eap", {"precision": "int4"}),
    "eap:precision=int4:prefetch_count=8": ("eap", {"precision": "int4", "prefetch_count": "8"}),
}
"""Policies of the grid: the three presets and the baseline variants (the paper defines neither its EAP nor
whether its load-on-demand overlaps copies, so the figures report the range the variants span)."""


@dataclass(frozen=True)
class GridRun:
    model: str
    hw: str
    budget_gb: int
    policy: str
    prefill_tokens_per_s: float
    decode_tokens_per_s: float
    hit_rate: float
    prompt_tokens: int = PROMPT_TOKENS
    accounting: str = "fate"

    def to_json(self) -> dict[str, Any]:
        return {"model": self.model, "hw": self.hw, "budget_gb": self.budget_gb, "accounting": self.accounting,
                "policy": self.policy, "prompt_tokens": self.prompt_tokens,
                "prefill_tokens_per_s": self.prefill_tokens_per_s, "decode_tokens_per_s": self.decode_tokens_per_s,
                "hit_rate": self.hit_rate}


def run_one(loaded: LoadedTrace, model: str, hw: HardwareProfile, budget_gb: int, variant: str) -> GridRun:
    """One replay of the grid: `variant` of `VARIANTS` at the paper's `budget_gb` under Fate's accounting."""
    preset, overrides = VARIANTS[variant]
    m = replay(loaded, preset, hw, int(budget_gb * GIB), as_model=model, overrides=overrides,
               budget_accounting="fate")
    return GridRun(model, hw.name, budget_gb, variant, m["prefill_tokens_per_s"], m["decode_tokens_per_s"],
                   m["hit_rate"])


def load_grid_traces(progress: Callable[[str], None] | None = None) -> dict[str, LoadedTrace]:
    """The 512-token traces of the grid's models (recorded once, then cached)."""
    return {model: load(paper_trace(model, PROMPT_TOKENS, progress=progress)) for model in PAPER_MODELS}


def run_grid(traces: dict[str, LoadedTrace], profiles: Iterable[HardwareProfile],
             variants: Iterable[str] | None = None) -> list[GridRun]:
    """Every (model, profile, budget, variant) of the grid; profiles named `<machine>-<engine>`."""
    names = list(variants or VARIANTS)
    runs = []
    for hw in profiles:
        machine = machine_of(hw.name)
        for model, loaded in traces.items():
            for budget in BUDGETS_GB[machine]:
                runs.extend(run_one(loaded, model, hw, budget, v) for v in names)
    return runs


def machine_of(profile_name: str) -> str:
    for machine in MACHINES:
        if profile_name.startswith(machine + "-"):
            return machine
    raise UserError(f"profile {profile_name!r} is not one of the Fate paper's machines ({', '.join(MACHINES)})")


# --- figures ------------------------------------------------------------------------------------------

class Grid:
    """Look-ups into grid runs."""

    def __init__(self, runs: list[GridRun]) -> None:
        self.runs = runs
        self._by = {(r.model, r.hw, r.budget_gb, r.policy): r for r in runs}

    def get(self, model: str, hw: str, budget: int, policy: str) -> GridRun | None:
        return self._by.get((model, hw, budget, policy))

    def series(self, model: str, hw: str, policy: str, key: str) -> list[tuple[int, float]]:
        return sorted((r.budget_gb, getattr(r, key)) for r in self.runs
                      if r.model == model and r.hw == hw and r.policy == policy)

    def ratios(self, num: str, den: str, key: str, hws: Iterable[str]) -> list[tuple[float, GridRun]]:
        """num/den of `key` for every (model, hw, budget) where both ran."""
        out = []
        for r in self.runs:
            if r.policy != num or r.hw not in hws:
                continue
            base = self.get(r.model, r.hw, r.budget_gb, den)
            if base is not None and getattr(base, key) > 0:
                out.append((getattr(r, key) / getattr(base, key), r))
        return out


SHORT = {"qwen1.5-moe-a2.7b": "Qwen", "deepseek-moe-16b": "DeepSeek"}


def _at(run: GridRun) -> str:
    return f"{SHORT[run.model]} {machine_of(run.hw)} {run.budget_gb} GB"


def figure_value(fig: PaperFigure, grid: Grid, engine: str, accuracy: dict[str, float]) -> dict[str, Any]:
    """The simulated value of `fig` on `grid`'s `<machine>-<engine>` runs: value, where, span."""
    hws = [f"{m}-{engine}" for m in MACHINES]
    ratio = {"fate_vs_lod_prefill": ("lod", "prefill_tokens_per_s"), "fate_vs_eap_prefill": ("eap", "prefill_tokens_per_s"),
             "fate_vs_lod_decode": ("lod", "decode_tokens_per_s"), "fate_vs_eap_decode": ("eap", "decode_tokens_per_s")}
    if fig.key in ratio:
        base, key = ratio[fig.key]
        found = grid.ratios("fate", base, key, hws)
        if not found:
            return {"value": None}
        best, run = max(found, key=lambda x: x[0])
        out = {"value": best, "at": f"max over the grid: {_at(run)}", "span": (min(f[0] for f in found), best)}
        variants = [v for v in VARIANTS if v.startswith(base) and v != base]
        spans = [max(x[0] for x in grid.ratios("fate", v, key, hws)) for v in variants
                 if grid.ratios("fate", v, key, hws)]
        if spans:
            out["variants"] = (min([best, *spans]), max([best, *spans]))
        return out
    if fig.key.startswith("prefetch_accuracy"):
        return {"value": accuracy.get(fig.key), "at": accuracy.get(fig.key + "_at", "")}
    if fig.key == "fate_hit_rate":  # the source names no machine or model: the first machine, Qwen
        machine, model_short, policy, key = "rtx3090", "qwen", "fate", "hit_rate"
    else:  # "<machine>_<model>_<policy>_<phase>"
        machine, model_short, policy, phase = fig.key.split("_")
        key = f"{phase}_tokens_per_s"
    model = next(m for m, s in SHORT.items() if s.lower() == model_short)
    hw = f"{machine}-{engine}"
    ref = grid.get(model, hw, REFERENCE_GB[machine], policy)
    if ref is None:
        return {"value": None}
    series = [v for _, v in grid.series(model, hw, policy, key)]
    out = {"value": getattr(ref, key), "at": _at(ref), "span": (min(series), max(series))}
    variants = [v for v in VARIANTS if v.startswith(policy + ":")]
    values = [getattr(r, key) for v in variants if (r := grid.get(model, hw, REFERENCE_GB[machine], v))]
    if values:
        out["variants"] = (min([out["value"], *values]), max([out["value"], *values]))
    return out


def prefetch_accuracy(loaded: LoadedTrace) -> dict[str, float]:
    """Fate's cross-layer gate (next layer) on the Qwen stand-in's 512-token trace: prefill = precision of
    the union of every prompt token's top-k (what Fate's code prefetches for the next layer), decode =
    precision of the token's top-k (`fatesim analyze predictors`, rows `gate_d1 step` and `gate_d1 decode`)."""
    from sim.analysis.predictors import predictor_report

    report = predictor_report(loaded.trace, predictors=["gate"])["model"]
    return {"prefetch_accuracy_prefill": report["prefill_steps"]["gate_d1"]["topk"]["precision"],
            "prefetch_accuracy_prefill_at": "Qwen stand-in, union of the prompt's top-4 next-layer predictions",
            "prefetch_accuracy_decode": report["predictors"]["gate_d1"]["decode"]["topk"]["precision"],
            "prefetch_accuracy_decode_at": "Qwen stand-in, top-4 next-layer prediction per decode token"}


def fate_rows(grid: Grid, accuracy: dict[str, float], engine: str = "hf-eager") -> list[dict[str, Any]]:
    """One row per figure of `FATE_FIGURES`: paper, simulated, error, where, span, role, source."""
    rows = []
    for fig in FATE_FIGURES:
        sim = figure_value(fig, grid, engine, accuracy)
        value = sim.get("value")
        error = None if value is None else (value - fig.value) / fig.value
        rows.append({"key": fig.key, "figure": fig.what, "paper": fig.value, "unit": fig.unit, "source": fig.source,
                     "role": fig.role, "simulated": value, "error": error, "at": sim.get("at", ""),
                     "span": sim.get("span"), "variants": sim.get("variants"), "engine": engine})
    return rows


def _fmt(value: float | None, unit: str) -> str:
    if value is None:
        return "–"
    if unit == "%":
        return f"{100 * value:.2f}%"
    if unit == "x":
        return f"{value:.2f}x"
    return f"{value:.1f}" if value >= 10 else f"{value:.2f}"


def format_fate(rows: list[dict[str, Any]], bound_rows: list[dict[str, Any]] | None = None) -> str:
    """The paper-vs-simulated table (plain text)."""
    header = ["figure", "src", "role", "paper", "simulated", "error", "where", "span (budgets)", "baseline variants"]
    if bound_rows:
        header.insert(6, "bound")
    lines = [header]
    bound = {r["key"]: r for r in bound_rows or []}
    for r in rows:
        span = "" if not r["span"] else f"{_fmt(r['span'][0], r['unit'])}–{_fmt(r['span'][1], r['unit'])}"
        var = "" if not r["variants"] else f"{_fmt(r['variants'][0], r['unit'])}–{_fmt(r['variants'][1], r['unit'])}"
        err = "–" if r["error"] is None else f"{100 * r['error']:+.1f}%"
        line = [r["figure"], r["source"], r["role"], _fmt(r["paper"], r["unit"]), _fmt(r["simulated"], r["unit"]), err,
                r["at"], span, var]
        if bound_rows:
            line.insert(6, _fmt(bound[r["key"]]["simulated"], r["unit"]))
        lines.append(line)
    widths = [max(len(str(row[i])) for row in lines) for i in range(len(header))]
    text = ["  ".join(str(c).ljust(w) for c, w in zip(row, widths, strict=True)).rstrip() for row in lines]
    preds = [r for r in rows if r["role"] == "prediction" and r["error"] is not None]
    within = sum(abs(r["error"]) <= 0.20 for r in preds)
    text.append(f"predictions within 20% of the paper: {within} of {len(preds)}; fit targets reproduce the fit")
    return "\n".join(text)


def reproduce_fate(progress: Callable[[str], None] | None = None, *, with_bound: bool = True) -> dict[str, Any]:
    """The whole `reproduce fate`: traces, grid on the hf-eager (and bound) profiles, figure rows."""
    start = time.perf_counter()
    traces = load_grid_traces(progress)
    profiles = [load_profile(f"{m}-hf-eager") for m in MACHINES]
    runs = run_grid(traces, profiles)
    if with_bound:  # the efficient-engine bound of the three presets, beside
        runs += run_grid(traces, [load_profile(f"{m}-bound") for m in MACHINES], ("lod", "eap", "fate"))
        profiles += [load_profile(f"{m}-bound") for m in MACHINES]
    grid = Grid(runs)
    accuracy = prefetch_accuracy(traces["qwen1.5-moe-a2.7b"])
    rows = fate_rows(grid, accuracy)
    bound_rows = fate_rows(grid, accuracy, engine="bound") if with_bound else None
    return {"figures": rows, "bound_figures": bound_rows, "runs": [r.to_json() for r in runs],
            "profiles": {p.name: p.provenance for p in profiles},
            "traces": {m: {"trace_hash": t.trace_hash, "model": t.trace.model} for m, t in traces.items()},
            "seconds": time.perf_counter() - start}


@click.command()
@click.argument("what", type=click.Choice(["fate", "speculate", "lrc"]))
@click.option("--json", "as_json", is_flag=True, help="Print JSON (figures and every run) instead of a table.")
@click.option("--realtraces", type=click.Path(file_okay=False), default=None,
              help="lrc: folder of the public routing logs (default $FATESIM_REALTRACES or ../shared/realtraces).")
def reproduce(what: str, as_json: bool, realtraces: str | None) -> None:
    """Reproduce a paper's table: fate (Fate, arXiv 2502.12224), speculate, lrc."""
    def say(message: str) -> None:
        click.echo(message, err=True)

    if what == "fate":
        result = reproduce_fate(say)
        if as_json:
            click.echo(json.dumps(result))
            return
        click.echo(format_fate(result["figures"], result["bound_figures"]))
        click.echo(f"{len(result['runs'])} replays in {result['seconds']:.0f} s; profiles: "
                   + "; ".join(f"{k}: {v}" for k, v in result["profiles"].items() if "hf-eager" in k))
        return
    from sim.reproduce_tables import format_lrc_table, format_speculate, reproduce_lrc, reproduce_speculate

    if what == "speculate":
        result = reproduce_speculate(say)
        click.echo(json.dumps(result) if as_json else format_speculate(result))
    else:
        result = reproduce_lrc(realtraces, say)
        click.echo(json.dumps(result) if as_json else format_lrc_table(result))


if __name__ == "__main__":
    if sys.argv[1:2] == ["fit"]:
        from sim.reproduce_fit import main as fit_main

        fit_main(sys.argv[2:])
    else:
        from sim.cli import main as fatesim_main

        fatesim_main(["reproduce", *sys.argv[1:]])
