"""`fatesim replay`, `fatesim policies`, `fatesim profiles`: thin click commands over sim.replay."""

from __future__ import annotations

import json

import click

from sim.units import format_bytes


@click.command()
@click.option("--trace", "trace_path", required=True, type=click.Path(dir_okay=False),
              help="Trace file (.safetensors, format v1).")
@click.option("--policy", default="fate", show_default=True, help="Policy preset; `fatesim policies` lists them.")
@click.option("--hw", default="rtx3090-bound", show_default=True,
              help="Hardware profile name or .toml path; `fatesim profiles` lists them.")
@click.option("--memory-budget", default="25%", show_default=True,
              help="Total fast memory: bytes with a unit (6GiB, 512MB) or a percentage of the routed-expert bytes "
                   "on top of everything else (25%).")
@click.option("--as-model", default=None, help="Replay with this model's shapes (same layers, experts and top-k).")
@click.option("--budget-accounting", type=click.Choice(["fatesim", "fate"]), default="fatesim", show_default=True,
              help="How the budget is sized: fatesim's (everything but the routed experts, then the cache), or as "
                   "Fate's official code does (the paper's '10 GB' is 10GiB; see sim/accounting.py).")
@click.option("--set", "settings", multiple=True, metavar="KEY=VALUE",
              help="Override a policy component or parameter, e.g. --set eviction=lru --set int2_rate=0.5.")
@click.option("--json", "as_json", is_flag=True, help="Print the metrics JSON instead of a table.")
@click.option("--timeline", type=click.Path(dir_okay=False), default=None,
              help="Write a Chrome trace-event JSON (open in Perfetto).")
@click.option("--estimator", type=click.Path(dir_okay=False), default=None,
              help="A learned estimator (`fatesim train-estimator`) used as the prediction policy; the trace "
                   "must hold gate inputs.")
def replay(trace_path: str, policy: str, hw: str, memory_budget: str, as_model: str | None, budget_accounting: str,
           settings: tuple[str, ...], as_json: bool, timeline: str | None, estimator: str | None) -> None:
    """Replay a trace under a policy, memory budget and hardware profile."""
    from sim.policies.presets import parse_overrides
    from sim.replay import load
    from sim.replay import replay as run_replay

    overrides = parse_overrides(settings)
    loaded = load(trace_path)
    score_fn = None
    if estimator:
        from sim.analysis.estimator import estimator_predictor, make_score_fn

        trace = loaded.trace
        learned = estimator_predictor(estimator, trace.num_moe_layers, trace.num_experts)
        score_fn = make_score_fn(learned, trace)
        overrides.setdefault("prediction", "learned")
    metrics = run_replay(loaded, policy=policy, hw=hw, memory_budget=memory_budget, as_model=as_model,
                         overrides=overrides, timeline=timeline, score_fn=score_fn,
                         budget_accounting=budget_accounting)
    if as_json:
        click.echo(json.dumps(metrics, sort_keys=False))
        return
    click.echo(format_table(metrics))
    if timeline:
        click.echo(f"timeline: {timeline}")


def format_table(m: dict) -> str:
    """The short human summary of one replay."""
    b = m["bytes_transferred"]
    rows = [
        ("policy", f"{m['policy']} on {m['profile']}, model {m['model']}"),
        ("memory budget", f"{format_bytes(m['memory_budget_bytes'])} ({format_bytes(m['expert_budget_bytes'])} "
                          f"for experts, {min(m['slots_per_layer'])}-{max(m['slots_per_layer'])} slots/layer)"),
        ("prefill", f"{m['prefill_tokens_per_s']:.1f} tokens/s, TTFT {m['ttft_s'] * 1e3:.1f} ms"),
        ("decode", f"{m['decode_tokens_per_s']:.2f} tokens/s, TPOT {m['tpot_s'] * 1e3:.2f} ms"),
        ("hit rate", f"{m['hit_rate']:.3f}"),
        ("prefetch", f"precision {m['prefetch_precision']:.3f}, recall {m['prefetch_recall']:.3f}"),
        ("bytes moved", f"{format_bytes(b['total'])} (on demand {format_bytes(b['on_demand'])}, prefetch used "
                        f"{format_bytes(b['prefetch_used'])}, wasted {format_bytes(b['prefetch_wasted'])})"),
        ("GPU stall", f"{m['gpu_stall_s']:.3f} s; link busy {100 * m['link_busy_fraction']:.1f}%"),
        ("layer steps", f"{m['layer_steps']}"),
    ]
    width = max(len(k) for k, _ in rows)
    return "\n".join(f"{k:<{width}}  {v}" for k, v in rows)


@click.command()
@click.option("--json", "as_json", is_flag=True, help="Print the presets as JSON.")
def policies(as_json: bool) -> None:
    """List the policy presets, their components and sources."""
    from sim.policies.presets import PRESETS, build_policy

    built = {name: build_policy(name) for name in PRESETS}
    if as_json:
        click.echo(json.dumps({n: {**p.components(), "description": p.description, "source": p.source}
                               for n, p in built.items()}))
        return
    for name, p in built.items():
        click.echo(f"{name}: {p.description}")
        click.echo(f"    allocation={p.allocation} eviction={p.eviction} prediction={p.prediction} "
                   f"prefetch={p.prefetch} precision={p.precision} miss={p.miss}")
        click.echo(f"    source: {p.source}")
    click.echo("Override any component or parameter with --set key=value.")


@click.command()
@click.option("--json", "as_json", is_flag=True, help="Print the profiles as JSON.")
def profiles(as_json: bool) -> None:
    """List the shipped hardware profiles with their provenance."""
    from sim.hardware import list_profiles, load_profile

    loaded = [load_profile(name) for name in list_profiles()]
    if as_json:
        click.echo(json.dumps({p.name: p.to_toml_dict() for p in loaded}))
        return
    for p in loaded:
        click.echo(f"{p.name}: {p.description}")
        click.echo(f"    link {p.link.bandwidth_bytes_per_s / 1e9:g} GB/s x {p.link.copy_engines}, "
                   f"memory {format_bytes(p.memory_bytes)}; provenance: {p.provenance}")
