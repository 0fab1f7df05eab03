"""`fatesim replay`, `fatesim policies`, `fatesim profiles`: thin click commands over sim.replay."""

from __future__ import annotations

import json

import click

from sim.units import format_bytes
from traces.errors import UserError


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
@click.option("--timeline-window", default=None, metavar="START:END",
              help="Only the timeline's spans that overlap this window of simulated time, in seconds (e.g. 2.5:2.6).")
@click.option("--layers-subset", is_flag=True,
              help="Replay a trace that logs only some of its model's MoE layers, as a model of those layers "
                   "(refused without this flag; every output then says so).")
@click.option("--estimator", type=click.Path(dir_okay=False), default=None,
              help="A learned estimator (`fatesim train-estimator`) used as the prediction policy; the trace "
                   "must hold gate inputs.")
def replay(trace_path: str, policy: str, hw: str, memory_budget: str, as_model: str | None, budget_accounting: str,
           settings: tuple[str, ...], as_json: bool, timeline: str | None, timeline_window: str | None,
           layers_subset: bool, estimator: str | None) -> None:
    """Replay a trace under a policy, memory budget and hardware profile."""
    from sim.policies.presets import build_policy, parse_overrides
    from sim.replay import load
    from sim.replay import replay as run_replay
    from sim.timeline import parse_window
    from traces.paths import check_output

    overrides = parse_overrides(settings)
    build_policy(policy, overrides)  # bad names fail before the trace is read
    window = parse_window(timeline_window) if timeline_window is not None else None
    if window is not None and timeline is None:
        raise UserError("--timeline-window needs --timeline FILE.json")
    if timeline is not None:
        check_output(timeline, inputs=[trace_path, estimator], what="--timeline")
    loaded = load(trace_path)
    score_fn = None
    if estimator:
        from sim.analysis.estimator import estimator_predictor, make_score_fn

        trace = loaded.trace
        learned = estimator_predictor(estimator, trace.num_moe_layers, trace.num_experts)
        score_fn = make_score_fn(learned, trace)
        overrides.setdefault("prediction", "learned")
    metrics = run_replay(loaded, policy=policy, hw=hw, memory_budget=memory_budget, as_model=as_model,
                         overrides=overrides, timeline=timeline, score_fn=score_fn, layers_subset=layers_subset,
                         timeline_window=window, budget_accounting=budget_accounting)
    if as_json:
        click.echo(json.dumps(metrics, sort_keys=False))
        return
    click.echo(format_table(metrics))
    if timeline:
        click.echo(f"timeline: {timeline}")


def phase_rate(m: dict, phase: str) -> str:
    """Tokens per second of one phase, or "–" when the trace has no tokens of that phase."""
    if not m.get(f"{phase}_tokens", 1):
        return "–"
    return f"{m[f'{phase}_tokens_per_s']:.1f}" if phase == "prefill" else f"{m[f'{phase}_tokens_per_s']:.2f}"


def policy_label(m: dict) -> str:
    """The preset's name, with what --set (or --estimator) changed: "fate + eviction=lru, lookahead=2"."""
    from sim.policies.presets import PRESETS, build_policy

    if m["policy"] not in PRESETS:
        return m["policy"]
    preset = build_policy(m["policy"]).components()
    changes = {k: v for k, v in m["policy_components"].items() if preset.get(k) != v}
    return m["policy"] + (" + " + ", ".join(f"{k}={v}" for k, v in changes.items()) if changes else "")


def layers_label(m: dict) -> str:
    """"" for a whole model, else " (5 of 24 MoE layers)"."""
    layers = m.get("moe_layers")
    if not layers or layers["replayed"] == layers["of_model"]:
        return ""
    return f" ({layers['replayed']} of {layers['of_model']} MoE layers)"


def format_table(m: dict) -> str:
    """The short human summary of one replay: what ran (effective components), how fast, and why."""
    b = m["bytes_transferred"]
    c = m["policy_components"]
    only = layers_label(m)
    prefill = "–" if phase_rate(m, "prefill") == "–" else (f"{phase_rate(m, 'prefill')} tokens/s, TTFT "
                                                           f"{m['ttft_s'] * 1e3:.1f} ms")
    decode = "–" if phase_rate(m, "decode") == "–" else (f"{phase_rate(m, 'decode')} tokens/s, TPOT "
                                                         f"{m['tpot_s'] * 1e3:.2f} ms")
    rows = [
        ("policy", f"{policy_label(m)} on {m['profile']}, model {m['model']}{only}"),
        ("components", " ".join(f"{k}={c[k]}" for k in ("allocation", "eviction", "prediction", "prefetch",
                                                          "precision", "miss"))),
        ("memory budget", f"{format_bytes(m['memory_budget_bytes'])} ({format_bytes(m['expert_budget_bytes'])} "
                          f"for experts, {min(m['slots_per_layer'])}-{max(m['slots_per_layer'])} slots/layer)"),
        ("prefill", prefill + (only if prefill != "–" else " (no prefill tokens in the trace)")),
        ("decode", decode + (only if decode != "–" else " (no decode tokens in the trace)")),
        ("hit rate", f"{m['hit_rate']:.3f}"),
        ("prefetch", f"precision {m['prefetch_precision']:.3f}, recall {m['prefetch_recall']:.3f}"),
        ("bytes moved", f"{format_bytes(b['total'])} (on demand {format_bytes(b['on_demand'])}, prefetch used "
                        f"{format_bytes(b['prefetch_used'])}, wasted {format_bytes(b['prefetch_wasted'])})"),
        ("GPU stall", f"{m['gpu_stall_s']:.3f} s; link busy {100 * m['link_busy_fraction']:.1f}%"),
        ("layer steps", f"{m['layer_steps']}{only}"),
    ]
    rows += [("assumption", a) for a in m.get("assumptions", [])]
    rows += [("warning", w) for w in m.get("warnings", [])]
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


@click.command()
@click.option("--json", "as_json", is_flag=True, help="Print the specs as JSON.")
def models(as_json: bool) -> None:
    """List the built-in model specs (names for --as-model, plan --model and trace import --model-spec)."""
    from sim.modelspec import get_model_spec, list_model_specs
    from traces.model_configs import HF_IDS

    rows = []
    for name in list_model_specs():
        spec = get_model_spec(name)
        rows.append({
            "name": name, "hf_id": HF_IDS.get(name, ""), "model_type": spec.model_type,
            "decoder_layers": spec.num_layers, "moe_layers": spec.num_moe_layers,
            "moe_layer_indices": list(spec.moe_layer_indices), "experts": spec.num_experts, "top_k": spec.top_k,
            "shared_experts": spec.num_shared_experts, "hidden_size": spec.hidden_size,
            "expert_bytes": {p: spec.expert_bytes(p) for p in ("bf16", "int8", "int4", "int2")},
            "routed_expert_bytes": spec.routed_expert_bytes_total("bf16"),
            "non_expert_bytes": spec.non_expert_bytes, "shared_expert_bytes": spec.shared_expert_bytes_total,
            "kv_cache_bytes_per_token": spec.kv_cache_bytes_per_token(),
        })
    if as_json:
        click.echo(json.dumps(rows))
        return
    for r in rows:
        first, last = r["moe_layer_indices"][0], r["moe_layer_indices"][-1]
        click.echo(f"{r['name']}: {r['hf_id']} ({r['model_type']})")
        click.echo(f"    {r['moe_layers']} MoE layers of {r['decoder_layers']} ({first}..{last}), {r['experts']} experts "
                   f"top-{r['top_k']}, {r['shared_experts']} shared; expert {format_bytes(r['expert_bytes']['bf16'])} "
                   f"bf16 / {format_bytes(r['expert_bytes']['int4'])} int4; routed experts "
                   f"{format_bytes(r['routed_expert_bytes'])}, everything else "
                   f"{format_bytes(r['non_expert_bytes'] + r['shared_expert_bytes'])} + "
                   f"{format_bytes(r['kv_cache_bytes_per_token'])} KV per token")
    click.echo("A config.json path (or a model folder) works wherever a name does.")
