"""`fatesim compare`: one trace under several policies, one comparison table (what `make demo` prints).

    fatesim compare --trace mini.safetensors --as-model qwen1.5-moe-a2.7b --hw rtx3090-bound \\
        --memory-budget 25% --policies lod,lru,eap,fate,oracle

Every policy replays the same trace, loaded once; speedups are over the first policy listed.
"""

from __future__ import annotations

import json
import sys
from dataclasses import dataclass
from typing import Any

import click

from sim.policies.presets import build_policy, parse_overrides
from sim.replay import load, replay
from traces.errors import UserError


def parse_policy_entry(entry: str) -> tuple[str, dict[str, str]]:
    """`"oracle:precision=fate-hybrid:eviction=lru"` -> ("oracle", {"precision": "fate-hybrid", ...})."""
    name, *settings = entry.split(":")
    return name.strip(), parse_overrides(settings)


@dataclass
class Comparison:
    """The rows that ran and, for each policy that could not, why."""

    results: list[dict[str, Any]]
    failed: list[tuple[str, str]]
    """(entry as written, the one-line reason)."""


def compare(trace: Any, policies: list[str], *, hw: str = "rtx3090-bound", memory_budget: str = "25%",
            as_model: str | None = None, layers_subset: bool = False, budget_accounting: str = "fatesim",
            quiet: bool = True) -> Comparison:
    """The metrics of `trace` under each of `policies` (same hardware, budget and shapes).

    Each entry is a preset name, optionally followed by `:key=value` overrides as `--set` takes them;
    the result's `policy` is the entry as written, so the table tells the variants apart. A policy that
    cannot run on this trace (a UserError: it needs look-ahead logits, the budget is too small for it,
    ...) is listed in `failed` with the reason; the others still run. Names that are wrong (an unknown
    preset or key) are refused before anything runs.
    """
    from sim.budget import resolve_budget
    from sim.hardware import load_profile
    from sim.progress import progress_bar
    from sim.replay import resolve_spec

    entries = [(entry, *parse_policy_entry(entry)) for entry in policies]
    for _, name, overrides in entries:
        build_policy(name, overrides)
    loaded = load(trace)
    # What fails for every policy alike (a layer subset without the flag, a budget beyond the device) is one
    # error, not a table of identical lines: checked once, before any replay.
    profile = load_profile(hw)
    spec = resolve_spec(loaded.trace, as_model, layers_subset)
    resolve_budget(memory_budget, spec, kv_tokens=loaded.workload.max_context,
                   device_memory_bytes=profile.memory_bytes, device=f"profile {profile.name}")
    results, failed = [], []
    with progress_bar(len(entries), "compare", "policy", quiet) as bar:
        for entry, name, overrides in entries:
            bar.set_postfix_str(entry)
            try:
                result = replay(loaded, policy=name, overrides=overrides, hw=profile, memory_budget=memory_budget,
                                as_model=as_model, layers_subset=layers_subset,
                                budget_accounting=budget_accounting)
            except UserError as error:
                failed.append((entry, str(error)))
            else:
                result["policy"] = entry
                results.append(result)
            bar.update(1)
    return Comparison(results, failed)


def _rate(m: dict[str, Any], phase: str) -> str:
    if not m.get(f"{phase}_tokens", 1):
        return "–"
    value = m[f"{phase}_tokens_per_s"]
    return f"{value:.1f}" if phase == "prefill" else f"{value:.2f}"


def format_comparison(comparison: Comparison | list[dict[str, Any]]) -> str:
    """A text table: prefill and decode tokens/s, hit rate, prefetch precision and recall, speedups over the
    first row that ran; then one line per policy that could not run, and what every row assumed."""
    if isinstance(comparison, list):
        comparison = Comparison(comparison, [])
    results = comparison.results
    lines: list[str] = []
    if results:
        base = results[0]
        header = ("policy", "prefill tok/s", "decode tok/s", "hit rate", "pf precision", "pf recall",
                  f"prefill x {base['policy']}", f"decode x {base['policy']}")
        rows = [header]
        for m in results:
            def ratio(phase: str, m: dict[str, Any] = m) -> str:
                key = f"{phase}_tokens_per_s"
                return f"{m[key] / base[key]:.2f}" if base[key] and m.get(f"{phase}_tokens", 1) else "–"
            rows.append((m["policy"], _rate(m, "prefill"), _rate(m, "decode"), f"{m['hit_rate']:.3f}",
                         f"{m['prefetch_precision']:.3f}", f"{m['prefetch_recall']:.3f}", ratio("prefill"),
                         ratio("decode")))
        widths = [max(len(r[i]) for r in rows) for i in range(len(header))]
        lines = ["  ".join(cell.rjust(w) if i else cell.ljust(w) for i, (cell, w) in
                           enumerate(zip(r, widths, strict=True))) for r in rows]
    for entry, reason in comparison.failed:
        lines.append(f"{entry}: cannot run: {reason}")
    if results:
        first = results[0]
        layers = first.get("moe_layers") or {}
        only = (f" ({layers['replayed']} of {layers['of_model']} MoE layers)"
                if layers and layers["replayed"] != layers["of_model"] else "")
        lines.append(f"model {first['model']}{only}, profile {first['profile']}, budget "
                     f"{first['memory_budget_bytes']:,} bytes")
        notes: dict[str, list[str]] = {}  # note -> policies it applies to
        for m in results:
            for kind, key in (("assumption", "assumptions"), ("warning", "warnings")):
                for note in m.get(key, []):
                    notes.setdefault(f"{kind}: {note}", []).append(m["policy"])
        for note, who in notes.items():
            kind, _, text = note.partition(": ")
            lines.append(note if len(who) == len(results) else f"{kind} ({', '.join(who)}): {text}")
    return "\n".join(lines)


@click.command()
@click.option("--trace", "trace_path", required=True, type=click.Path(dir_okay=False), help="Trace file.")
@click.option("--policies", default="lod,lru,eap,fate,oracle", show_default=True,
              help="Comma-separated presets, each optionally with :key=value overrides (e.g. "
                   "fate:prediction=noisy-oracle); speedups are over the first that runs.")
@click.option("--hw", default="rtx3090-bound", show_default=True, help="Hardware profile name or .toml path.")
@click.option("--memory-budget", default="25%", show_default=True,
              help="Total fast memory (6GiB, 512MB or 25%), as in `fatesim replay`.")
@click.option("--as-model", default=None, help="Replay with this model's shapes (same layers, experts, top-k).")
@click.option("--layers-subset", is_flag=True,
              help="Replay a trace that logs only some of its model's MoE layers, as a model of those layers.")
@click.option("--budget-accounting", type=click.Choice(["fatesim", "fate"]), default="fatesim", show_default=True,
              help="How the budget is sized: fatesim's, or Fate's official code's (the paper's '10 GB' is 10GiB).")
@click.option("--json", "as_json", is_flag=True,
              help="Print {\"results\": [metrics JSON, ...], \"failed\": [{\"policy\", \"error\"}]} instead.")
@click.option("--quiet", is_flag=True, help="No progress bar on stderr (there is none when stderr is not a terminal).")
def main(trace_path: str, policies: str, hw: str, memory_budget: str, as_model: str | None, layers_subset: bool,
         budget_accounting: str, as_json: bool, quiet: bool) -> None:
    """Replay one trace under several policies and print one comparison table.

    A policy that cannot run on this trace gets one line saying why; the others still make the table
    (exit status 1 when some could not run, 2 when none could)."""
    names = [p.strip() for p in policies.split(",") if p.strip()]
    if not names:
        raise UserError("--policies is empty; give comma-separated presets such as lod,fate")
    comparison = compare(trace_path, names, hw=hw, memory_budget=memory_budget, as_model=as_model,
                         layers_subset=layers_subset, budget_accounting=budget_accounting, quiet=quiet)
    if not comparison.results:
        raise UserError("no policy could run: " + "; ".join(f"{e}: {r}" for e, r in comparison.failed))
    if as_json:
        click.echo(json.dumps({"results": comparison.results,
                               "failed": [{"policy": e, "error": r} for e, r in comparison.failed]}))
    else:
        click.echo(format_comparison(comparison))
    if comparison.failed:
        sys.exit(1)


if __name__ == "__main__":
    from sim.cli import main as fatesim_main

    fatesim_main(["compare", *sys.argv[1:]])
