"""Click commands of the calibration package: `calibrate`, `validate`, `accuracy`.

Each command checks nothing itself beyond what click parses and calls one library function; the library
raises `UserError` for bad input, which `sim.cli.main` prints as one line with exit code 2.
"""

from __future__ import annotations

import json
import sys
from collections.abc import Callable

import click


def _tqdm_progress(total: int) -> Callable[[str], None]:
    from tqdm import tqdm

    bar = tqdm(total=total, unit="point", desc="calibrating", file=sys.stderr, leave=True)

    def step(label: str) -> None:
        bar.set_postfix_str(label, refresh=False)
        bar.update(1)
        if bar.n >= total:
            bar.close()

    return step


@click.command()
@click.option("--device", type=click.Choice(["cpu", "cuda"]), default="cpu", show_default=True,
              help="Compute device to measure: the CPU (experts cached in RAM) or a CUDA GPU.")
@click.option("--store", type=click.Choice(["disk", "ram"]), default="disk", show_default=True,
              help="Where offloaded experts live: disk (O_DIRECT reads) or host RAM (pinned on CUDA).")
@click.option("--out", required=True, type=click.Path(dir_okay=False),
              help="Profile TOML to write (atomically).")
@click.option("--plots", "plots_dir", type=click.Path(file_okay=False), default=None,
              help="Folder for fit-against-measurement PNGs and the raw points (points.json).")
@click.option("--quick", is_flag=True,
              help="Few sizes, 2 repeats: about 25 s of CPU time instead of about 2 minutes (one core).")
@click.option("--model", default="qwen1.5-moe-a2.7b", show_default=True,
              help="Model whose shapes and dtype are measured: a built-in spec, a config.json folder, or "
                   "'bench' (realrun's Qwen-shaped float32 benchmark model).")
@click.option("--dtype", "compute_dtype", type=click.Choice(["bfloat16", "float16", "float32"]), default=None,
              help="Compute dtype of the benchmarks [default: the model's dtype, as realrun computes].")
@click.option("--scratch", "scratch_dir", type=click.Path(file_okay=False), default=None,
              help="Folder for the disk benchmark's scratch file [default: the temp folder].")
@click.option("--threads", type=int, default=1, show_default=True,
              help="torch intra-op threads while measuring (1: stable on small shared machines, as realrun's bench).")
def calibrate(device: str, store: str, out: str, plots_dir: str | None, quick: bool, model: str,
              compute_dtype: str | None, scratch_dir: str | None, threads: int) -> None:
    """Measure this machine and write a hardware profile (fitted with scipy)."""
    from calibration.calibrate import calibrate as run

    cal = run(device=device, store=store, out=out, plots_dir=plots_dir, quick=quick, model=model,
              compute_dtype=compute_dtype, scratch_dir=scratch_dir, threads=threads,
              progress_factory=_tqdm_progress)
    p = cal.profile
    click.echo(f"wrote {out}: link {p.link.latency_s * 1e6:.1f} µs + bytes / "
               f"{p.link.bandwidth_bytes_per_s / 1e9:.3f} GB/s (fit error {cal.link.rel_rms_error:.1%}); "
               f"compute {p.gpu.matmul_flops_per_s / 1e9:.1f} GFLOP/s, {p.gpu.memory_bytes_per_s / 1e9:.1f} GB/s, "
               f"launch {p.gpu.kernel_launch_s * 1e6:.1f} µs (fit error {cal.compute.rel_rms_error:.1%})")


@click.command()
@click.option("--profile", required=True, help="Hardware profile (shipped name or .toml path) the simulator uses.")
@click.option("--model", required=True,
              help="Model realrun runs: a default model name, a model folder, or 'bench' (realrun's random "
                   "Qwen-shaped model with the real expert sizes).")
@click.option("--max-error", type=float, default=0.05, show_default=True,
              help="Exit 1 when the median absolute relative error exceeds this fraction.")
@click.option("--json", "as_json", is_flag=True, help="Print the full result as JSON instead of a table.")
@click.option("--budgets", default=None,
              help="Comma-separated memory budgets [default: 25%,50%,75%].")
@click.option("--presets", default=None,
              help="Comma-separated policy presets [default: lod,lru,fate,speculate,cpu-exec].")
@click.option("--store", type=click.Choice(["disk", "ram"]), default="disk", show_default=True,
              help="realrun's expert store.")
@click.option("--device", type=click.Choice(["cpu", "cuda"]), default="cpu", show_default=True,
              help="realrun's compute device.")
@click.option("--prompts", default=None,
              help="JSON-lines prompt file ({\"text\"} or {\"token_ids\"} per line) [default: traces/prompts/default.jsonl].")
@click.option("--max-new-tokens", type=int, default=16, show_default=True,
              help="Tokens generated per prompt (the first by the prefill step).")
@click.option("--num-prompts", type=int, default=4, show_default=True,
              help="How many prompts of the prompt file each configuration runs.")
@click.option("--store-dir", type=click.Path(file_okay=False), default=None,
              help="Folder for realrun's expert stores, reused across runs [default: a temporary folder].")
@click.option("--out", "out_path", type=click.Path(dir_okay=False), default=None,
              help="Also write the full result as JSON to this file.")
@click.option("--threads", type=int, default=1, show_default=True, help="torch intra-op threads for realrun.")
@click.option("--link", type=click.Choice(["profile", "observed"]), default="profile", show_default=True,
              help="Link bandwidth the simulator uses: the profile's, or the one realrun's slow tier delivered "
                   "in each run (separates model error from a disk whose speed drifts).")
@click.option("--repeats", type=int, default=1, show_default=True,
              help="realrun runs per configuration; both sides report medians over them.")
def validate(profile: str, model: str, max_error: float, as_json: bool, budgets: str | None,
             presets: str | None, store: str, device: str, prompts: str | None,
             max_new_tokens: int, num_prompts: int, store_dir: str | None, out_path: str | None,
             threads: int, link: str, repeats: int) -> None:
    """Run realrun and the simulator on the same runs; print measured vs simulated with errors."""
    from tqdm import tqdm

    from calibration.validate import DEFAULT_BUDGETS, DEFAULT_PRESETS, format_table, validate_runs, write_json

    total = (len(presets.split(",")) if presets else len(DEFAULT_PRESETS)) * (
        len(budgets.split(",")) if budgets else len(DEFAULT_BUDGETS))
    with tqdm(total=total, desc="validating", unit="config", file=sys.stderr, disable=None) as bar:
        def step(label: str) -> None:
            bar.set_postfix_str(label, refresh=False)
            bar.update(1)

        result = validate_runs(profile=profile, model=model, max_error=max_error, budgets=budgets,
                               presets=presets, store=store, device=device, prompts=prompts,
                               max_new_tokens=max_new_tokens, num_prompts=num_prompts, store_dir=store_dir,
                               threads=threads, link=link, repeats=repeats, progress=step)
    if out_path:
        write_json(result, out_path)
    click.echo(json.dumps(result, indent=2) if as_json else format_table(result))
    if not result["summary"]["passed"]:
        sys.exit(1)


@click.command()
@click.option("--model", required=True, help="A default model name or a model folder.")
@click.option("--text", "text_path", required=True, type=click.Path(dir_okay=False),
              help="Held-out text file (UTF-8).")
@click.option("--json", "as_json", is_flag=True, help="Print JSON instead of a table.")
@click.option("--max-tokens", type=int, default=1024, show_default=True,
              help="Tokens of the text scored for perplexity.")
@click.option("--generate-tokens", type=int, default=32, show_default=True,
              help="Greedy tokens generated per prompt for agreement.")
@click.option("--budget", default="50%", show_default=True,
              help="Fast-memory budget of the speculate variant's expert cache (percentage or bytes).")
@click.option("--variants", default=",".join(("lossless", "int4", "int2", "fate-hybrid", "speculate")),
              show_default=True, help="Comma-separated variants to score.")
def accuracy(model: str, text_path: str, as_json: bool, max_tokens: int, generate_tokens: int,
             budget: str, variants: str) -> None:
    """Perplexity and greedy agreement of INT4, INT2, Fate's hybrid and speculative execution."""
    from calibration.accuracy import format_accuracy, measure_accuracy

    result = measure_accuracy(model=model, text_path=text_path, max_tokens=max_tokens,
                              generate_tokens=generate_tokens, budget=budget,
                              variants=tuple(v.strip() for v in variants.split(",") if v.strip()))
    click.echo(json.dumps(result, indent=2) if as_json else format_accuracy(result))
