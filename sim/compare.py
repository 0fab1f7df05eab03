"""`fatesim compare`: one trace under several policies, one comparison table (what `make demo` prints).

    fatesim compare --trace mini.safetensors --as-model qwen1.5-moe-a2.7b --hw rtx3090-bound \\
        --memory-budget 25% --policies lod,lru,eap,fate,oracle

Every policy replays the same loaded trace (`replay_many`); speedups are over the first policy listed.
"""

from __future__ import annotations

import json
import sys
from typing import Any

import click

from sim.policies.presets import parse_overrides
from sim.replay import load, replay_many
from traces.errors import UserError


def parse_policy_entry(entry: str) -> tuple[str, dict[str, str]]:
    """`"oracle:precision=fate-hybrid:eviction=lru"` -> ("oracle", {"precision": "fate-hybrid", ...})."""
    name, *settings = entry.split(":")
    return name.strip(), parse_overrides(settings)


def compare(trace: Any, policies: list[str], *, hw: str = "rtx3090-bound", memory_budget: str = "25%",
            as_model: str | None = None, budget_accounting: str = "fatesim") -> list[dict[str, Any]]:
    """The metrics of `trace` under each of `policies` (same hardware, budget and shapes).

    Each entry is a preset name, optionally followed by `:key=value` overrides as `--set` takes them;
    the result's `policy` is the entry as written, so the table tells the variants apart.
    """
    loaded = load(trace)
    configs = []
    for entry in policies:
        name, overrides = parse_policy_entry(entry)
        configs.append(dict(policy=name, overrides=overrides, hw=hw, memory_budget=memory_budget, as_model=as_model,
                            budget_accounting=budget_accounting))
    results = replay_many(loaded, configs)
    for entry, result in zip(policies, results, strict=True):
        result["policy"] = entry
    return results


def format_comparison(results: list[dict[str, Any]]) -> str:
    """A text table: prefill and decode tokens/s, hit rate, prefetch precision and recall, speedups."""
    base = results[0]
    header = ("policy", "prefill tok/s", "decode tok/s", "hit rate", "pf precision", "pf recall",
              f"prefill x {base['policy']}", f"decode x {base['policy']}")
    rows = [header]
    for m in results:
        def ratio(key: str, m: dict[str, Any] = m) -> str:
            return f"{m[key] / base[key]:.2f}" if base[key] else "-"
        rows.append((m["policy"], f"{m['prefill_tokens_per_s']:.1f}", f"{m['decode_tokens_per_s']:.2f}",
                     f"{m['hit_rate']:.3f}", f"{m['prefetch_precision']:.3f}", f"{m['prefetch_recall']:.3f}",
                     ratio("prefill_tokens_per_s"), ratio("decode_tokens_per_s")))
    widths = [max(len(r[i]) for r in rows) for i in range(len(header))]
    lines = ["  ".join(cell.rjust(w) if i else cell.ljust(w) for i, (cell, w) in enumerate(zip(r, widths, strict=True)))
             for r in rows]
    first = results[0]
    lines.append(f"model {first['model']}, profile {first['profile']}, budget {first['memory_budget_bytes']:,} bytes")
    return "\n".join(lines)


@click.command()
@click.option("--trace", "trace_path", required=True, type=click.Path(dir_okay=False), help="Trace file.")
@click.option("--policies", default="lod,lru,eap,fate,oracle", show_default=True,
              help="Comma-separated presets, each optionally with :key=value overrides; speedups are over the first.")
@click.option("--hw", default="rtx3090-bound", show_default=True, help="Hardware profile name or .toml path.")
@click.option("--memory-budget", default="25%", show_default=True, help="Total fast memory (6GiB, 512MB or 25%).")
@click.option("--as-model", default=None, help="Replay with this model's shapes (same layers, experts, top-k).")
@click.option("--budget-accounting", type=click.Choice(["fatesim", "fate"]), default="fatesim", show_default=True,
              help="How the budget is sized: fatesim's, or Fate's official code's (the paper's '10 GB' is 10GiB).")
@click.option("--json", "as_json", is_flag=True, help="Print the list of metrics JSON objects instead.")
def main(trace_path: str, policies: str, hw: str, memory_budget: str, as_model: str | None, budget_accounting: str,
         as_json: bool) -> None:
    """Replay one trace under several policies and print one comparison table."""
    names = [p.strip() for p in policies.split(",") if p.strip()]
    if not names:
        raise UserError("--policies is empty; give comma-separated presets such as lod,fate")
    results = compare(trace_path, names, hw=hw, memory_budget=memory_budget, as_model=as_model,
                      budget_accounting=budget_accounting)
    click.echo(json.dumps(results) if as_json else format_comparison(results))


if __name__ == "__main__":
    from sim.cli import main as fatesim_main

    fatesim_main(["compare", *sys.argv[1:]])
