"""Commands of sim.analysis: `analyze lrc|predictors`, `train-estimator`, `sweep`, `plot`, `plan`.

Each command parses its options and calls one library function; errors in user input are `UserError`s,
which the CLI root turns into one line and exit code 2.
"""

from __future__ import annotations

import json
import sys

import click

from traces.errors import UserError


def _int_list(text: str, what: str) -> list[int]:
    try:
        values = [int(v) for v in text.split(",") if v.strip()]
    except ValueError:
        raise UserError(f"{what} must be comma-separated integers such as 4,16,64, got {text!r}") from None
    if not values:
        raise UserError(f"{what} is empty")
    return values


def _float_list(text: str, what: str) -> list[float]:
    try:
        values = [float(v) for v in text.split(",") if v.strip()]
    except ValueError:
        raise UserError(f"{what} must be comma-separated numbers such as 1,2,3, got {text!r}") from None
    if not values:
        raise UserError(f"{what} is empty")
    return values


def _read(path: str):
    from traces.format import read_trace

    return read_trace(path)


def _check_out(out: str | None, inputs: list[str | None], suffixes: tuple[str, ...] | None = None) -> None:
    """An output path that cannot be written (or would overwrite an input) fails before any work."""
    if out is not None:
        from traces.paths import check_output

        check_output(out, inputs=inputs, suffixes=suffixes, what="--out")


def _write_json(data: dict, out: str | None) -> None:
    text = json.dumps(data, indent=2, sort_keys=False)
    if out is None:
        click.echo(text)
        return
    from traces.atomic import atomic_output

    with atomic_output(out) as tmp:
        tmp.write_text(text + "\n")


@click.group()
def analyze() -> None:
    """Routing analyses of a trace: local routing consistency, predictor accuracy."""


@analyze.command("lrc")
@click.option("--trace", "trace_path", required=True, help="Trace file (.safetensors).")
@click.option("--m", "m_text", default="16", show_default=True,
              help="Window lengths in tokens, comma-separated (e.g. 4,16,64,256).")
@click.option("--rho", "rho_text", default="2", show_default=True,
              help="Cache sizes as multiples of top-k (rho*k slots per layer), comma-separated.")
@click.option("--no-baselines", is_flag=True, help="Skip the LRU, LFU and Belady hit rates.")
@click.option("--json", "as_json", is_flag=True, help="Print the JSON report instead of the table.")
@click.option("--out", default=None, help="Write the JSON report to this file.")
@click.option("--quiet", is_flag=True, help="No progress bar on stderr (there is none when stderr is not a terminal).")
def lrc(trace_path: str, m_text: str, rho_text: str, no_baselines: bool, as_json: bool, out: str | None,
        quiet: bool) -> None:
    """Local routing consistency (SRP, SCH; Liang et al.) per MoE layer and for the model, with LRU, LFU
    and Belady hit rates at the same cache sizes. Values in the table are percent; in JSON, fractions."""
    from sim.analysis.lrc import format_lrc, lrc_work_units, trace_lrc
    from sim.progress import progress_bar

    ms, rhos = _int_list(m_text, "--m"), _float_list(rho_text, "--rho")
    _check_out(out, [trace_path])
    trace = _read(trace_path)
    with progress_bar(lrc_work_units(ms, rhos, not no_baselines), "lrc", "pass", quiet) as bar:
        report = trace_lrc(trace, ms=ms, rhos=rhos, baselines=not no_baselines, progress=bar.update)
    if out is not None:
        _write_json(report, out)
    if as_json:
        _write_json(report, None)
    else:
        click.echo(format_lrc(report))


@analyze.command("predictors")
@click.option("--trace", "trace_path", required=True, help="Trace file (.safetensors).")
@click.option("--threshold", default=None, type=float,
              help="Confidence threshold tau on predictor scores (probabilities) [default: 0.1].")
@click.option("--estimator", "estimator_path", default=None,
              help="A trained estimator (.safetensors) to evaluate; default: train one on the library half.")
@click.option("--depth", default=2, show_default=True, type=int, help="Layers ahead for a freshly trained estimator.")
@click.option("--predictor", "families", multiple=True,
              help="Restrict to these families (gate, path, popularity, learned, oracle); repeatable.")
@click.option("--json", "as_json", is_flag=True, help="Print the JSON report instead of the table.")
@click.option("--out", default=None, help="Write the JSON report to this file.")
@click.option("--quiet", is_flag=True, help="No progress bar on stderr (there is none when stderr is not a terminal).")
def predictors(trace_path: str, threshold: float | None, estimator_path: str | None, depth: int,
               families: tuple[str, ...], as_json: bool, out: str | None, quiet: bool) -> None:
    """Per-layer precision and recall of each expert predictor (top-k and at a confidence threshold,
    prefill and decode apart), adjacent-layer gate-input cosine similarity and popularity skew."""
    from sim.analysis.estimator import load_estimator
    from sim.analysis.predictors import DEFAULT_THRESHOLD, format_predictors, predictor_report, will_train
    from sim.progress import progress_bar

    if depth < 1:
        raise UserError(f"--depth must be >= 1, got {depth}")
    _check_out(out, [trace_path, estimator_path])
    estimator = load_estimator(estimator_path) if estimator_path else None
    trace = _read(trace_path)
    if estimator is not None and (estimator.num_experts != trace.num_experts
                                  or estimator.num_layers != trace.num_moe_layers):
        raise UserError(f"estimator {estimator_path} is for {estimator.num_layers} MoE layers x {estimator.num_experts} "
                        f"experts, trace {trace_path} has {trace.num_moe_layers} x {trace.num_experts}")
    chosen = list(families) or None
    train_steps = 300
    work = trace.num_moe_layers + (train_steps if will_train(trace, estimator, chosen) else 0)
    with progress_bar(work, "predictors", "step", quiet) as bar:
        report = predictor_report(trace, threshold=DEFAULT_THRESHOLD if threshold is None else threshold,
                                  estimator=estimator, estimator_depth=depth, estimator_steps=train_steps,
                                  predictors=chosen, progress=bar.update)
    if out is not None:
        _write_json(report, out)
    if as_json:
        _write_json(report, None)
    else:
        click.echo(format_predictors(report))


@click.command("train-estimator")
@click.option("--trace", "trace_path", required=True, help="Training trace, recorded with gate inputs.")
@click.option("--out", required=True, help="Where to write the estimator (.safetensors).")
@click.option("--depth", default=2, show_default=True, type=int, help="Layers ahead to predict (D).")
@click.option("--steps", default=300, show_default=True, type=int, help="Full-batch Adam steps.")
@click.option("--eval-trace", default=None, help="Evaluate on this trace afterwards (same model).")
@click.option("--quiet", is_flag=True, help="No progress bar on stderr (there is none when stderr is not a terminal).")
def train_estimator(trace_path: str, out: str, depth: int, steps: int, eval_trace: str | None, quiet: bool) -> None:
    """Train the learned expert estimator (per-layer linear heads on gate inputs) and save it."""
    from sim.analysis.estimator import save_estimator
    from sim.analysis.estimator import train_estimator as train
    from sim.analysis.predictors import format_predictors, predictor_report
    from sim.progress import progress_bar

    if steps < 1:
        raise UserError(f"--steps must be >= 1, got {steps}")
    if depth < 1:
        raise UserError(f"--depth must be >= 1, got {depth}")
    _check_out(out, [trace_path, eval_trace], suffixes=(".safetensors",))
    trace = _read(trace_path)
    if trace.gate_inputs is None:
        raise UserError(f"trace {trace_path} has no gate_inputs; record one with --gate-inputs to train an estimator")
    evaluation = _read(eval_trace) if eval_trace is not None else None  # checked before the training
    if evaluation is not None and (evaluation.num_experts, evaluation.num_moe_layers) != (trace.num_experts,
                                                                                           trace.num_moe_layers):
        raise UserError(f"--eval-trace {eval_trace} has {evaluation.num_moe_layers} MoE layers x "
                        f"{evaluation.num_experts} experts, the training trace {trace.num_moe_layers} x "
                        f"{trace.num_experts}; evaluate on a trace of the same model")
    with progress_bar(steps, "train-estimator", "step", quiet) as bar:
        estimator = train(trace, depth=depth, steps=steps, progress=bar.update)
    save_estimator(estimator, out)
    meta = estimator.metadata
    click.echo(f"trained on {meta['train_tokens']} tokens of {meta['model']} ({meta['num_layers']} MoE layers, "
               f"depth {depth}, {steps} steps, final loss {meta['final_loss']:.4f}) -> {out}")
    if evaluation is not None:
        report = predictor_report(evaluation, estimator=estimator, predictors=["learned", "popularity", "oracle"])
        click.echo(format_predictors(report).split("\n\n")[0])


@click.command("sweep")
@click.option("--trace", "trace_path", required=True, help="Trace file to replay.")
@click.option("--grid", required=True,
              help="Grid TOML: lists of policy, budget, profile, link_bandwidth (bytes/s, or a size such as 12GB read "
                   "per second), as_model, estimator, layers_subset, and [set] policy keys.")
@click.option("--out", required=True, help="Results file, .csv or .parquet.")
@click.option("--workers", default=1, show_default=True, type=int, help="Local worker processes.")
@click.option("--ray", "ray_address", default=None,
              help="Run on a Ray cluster at this address (host:port, ray://host:port, auto, or 'local').")
@click.option("--cache-dir", default=None, help="Result cache folder [default: .sweep-cache beside --out].")
@click.option("--quiet", "--no-progress", "no_progress", is_flag=True,
              help="No progress bar on stderr (there is none when stderr is not a terminal).")
def sweep(trace_path: str, grid: str, out: str, workers: int, ray_address: str | None, cache_dir: str | None,
          no_progress: bool) -> None:
    """Replay the cartesian product of a grid; only configurations not in the cache are computed.

    Exit status 1 when some configuration failed (each is reported; the others' results are written)."""
    from sim.analysis.sweep import sweep as run

    outcome = run(trace_path, grid, out, workers=workers, ray_address=ray_address, cache_dir=cache_dir,
                  progress=not no_progress)
    click.echo(f"{len(outcome.rows)} configurations: {outcome.computed} computed, {outcome.cached} from cache, "
               f"{len(outcome.failed)} failed -> {out}")
    for config, error in outcome.failed:
        extra = [f"{k}={v}" for k, v in config.overrides]
        if config.link_bandwidth_bytes_per_s is not None:
            extra.insert(0, f"link_bandwidth={config.link_bandwidth_bytes_per_s / 1e9:g} GB/s")
        if config.as_model:
            extra.insert(0, f"as_model={config.as_model}")
        click.echo(f"failed: policy={config.policy} budget={config.budget} profile={config.profile}"
                   f"{' ' + ' '.join(extra) if extra else ''}: {error}", err=True)
    if outcome.failed:
        sys.exit(1)


@click.command("plot")
@click.argument("results", required=False)
@click.option("--out", required=True, help="Folder for the PNG files (created if missing).")
@click.option("--timeline", default=None, help="A Chrome trace-event timeline (from `fatesim replay --timeline`).")
@click.option("--window-ms", default=None, type=float,
              help="Length of the timeline excerpt in ms, more than 0 [default: enough for 150 events].")
@click.option("--start-ms", default=0.0, show_default=True, type=float, help="Where the timeline excerpt starts, in ms.")
def plot(results: str | None, out: str, timeline: str | None, window_ms: float | None, start_ms: float) -> None:
    """PNG plots: throughput vs budget per policy, hit rate per layer, timeline excerpt."""
    from sim.analysis.plot import plot_results

    for path in plot_results(results, out, timeline=timeline,
                             window_s=None if window_ms is None else window_ms / 1e3, start_s=start_ms / 1e3):
        click.echo(str(path))


@click.command("plan")
@click.option("--model", required=True, help="Model spec name (`fatesim models` lists them), e.g. qwen1.5-moe-a2.7b.")
@click.option("--hw", required=True, help="Hardware profile name or .toml file.")
@click.option("--target-decode", default=None, type=float, help="Decode throughput to reach, tokens/s.")
@click.option("--budget", default=None,
              help="Instead: the fast-memory budget (e.g. 12GiB or 25%, read as replay's --memory-budget) to get the "
                   "best policy for.")
@click.option("--trace", "trace_path", default=None, help="Routing trace [default: a traces/data trace of the same structure].")
@click.option("--policy", "policies", multiple=True, help="Consider only these presets; repeatable [default: all but oracle].")
@click.option("--set", "settings", multiple=True, metavar="KEY=VALUE",
              help="Override a policy component or parameter of every policy, as in `fatesim replay` "
                   "(e.g. --set prediction=noisy-oracle on a trace without look-ahead logits).")
@click.option("--layers-subset", is_flag=True,
              help="The trace logs only some of the model's MoE layers: plan for a model made of those layers.")
@click.option("--quiet", is_flag=True, help="No progress bar on stderr (there is none when stderr is not a terminal).")
def plan(model: str, hw: str, target_decode: float | None, budget: str | None, trace_path: str | None,
         policies: tuple[str, ...], settings: tuple[str, ...], layers_subset: bool, quiet: bool) -> None:
    """Smallest budget and policy meeting a decode target, or the best policy at a budget."""
    from sim.analysis.plan import plan as run
    from sim.policies.presets import parse_overrides

    result = run(model, hw, target_decode=target_decode, budget=budget, trace=trace_path,
                 policies=list(policies) or None, overrides=parse_overrides(settings), layers_subset=layers_subset,
                 quiet=quiet)
    click.echo(result.answer)
    click.echo("")
    click.echo(result.table())
