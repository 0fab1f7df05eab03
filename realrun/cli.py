"""`fatesim realrun`: run a model for real with its routed experts offloaded, under a policy preset."""

from __future__ import annotations

import json
from pathlib import Path

import click


@click.command()
@click.option("--model", required=True,
              help="An embedded model (mini-qwen-moe, mini-deepseek-moe) or a local Hugging Face model folder "
                   "(config.json and safetensors weights).")
@click.option("--prompts", "prompts_path", required=True, type=click.Path(exists=True, dir_okay=False, path_type=Path),
              help='Prompt file: JSON lines, each {"text": ...} or {"token_ids": [...]}.')
@click.option("--policy", required=True, help="Policy preset (lod, lru, fate, speculate, cpu-exec, ...; see "
              "`fatesim policies`).")
@click.option("--memory-budget", required=True,
              help="Fast-memory budget: bytes with a unit (6GiB, 512MB) or a percentage of the routed-expert "
                   "bytes on top of everything else (25%), as in `fatesim replay`.")
@click.option("--device", type=click.Choice(["cpu", "cuda"]), default="cpu", show_default=True,
              help="Where the model computes; cuda copies experts from pinned host memory on a copy stream.")
@click.option("--store", type=click.Choice(["disk", "ram"]), default="disk", show_default=True,
              help="Slow tier: a file read with O_DIRECT (real SSD reads) or host RAM.")
@click.option("--dtype", type=click.Choice(["auto", "bfloat16", "float16", "float32"]), default="auto",
              show_default=True,
              help="Compute dtype of the non-expert weights and activations (experts stay stored in their transfer "
                   "precision and are cast at use). auto: float32 on a CPU, the checkpoint's dtype on CUDA. bfloat16 "
                   "matmuls are several times slower than float32 on CPUs without AVX512-BF16/AMX; on CPUs with it "
                   "(the 2-core AMD EPYC dev VM: one Qwen1.5-MoE expert at 64 tokens 7.9 ms bf16 vs 19.2 ms fp32) "
                   "--dtype bfloat16 is faster.")
@click.option("--max-new-tokens", type=click.IntRange(min=1), default=32, show_default=True,
              help="Tokens generated per prompt (greedy).")
@click.option("--json", "as_json", is_flag=True, help="Print the metrics JSON (with `generated`) instead of a summary.")
@click.option("--timeline", type=click.Path(dir_okay=False, path_type=Path), default=None,
              help="Write a Chrome trace-event timeline (Perfetto) of the run to this file.")
@click.option("--trace-out", type=click.Path(dir_okay=False, path_type=Path), default=None,
              help="Write the routing trace of this very run (trace format v1, .safetensors) to this file.")
@click.option("--set", "settings", multiple=True, metavar="KEY=VALUE",
              help="Override a policy component or parameter, as in `fatesim replay` (e.g. --set precision=bf16).")
@click.option("--quant-optimize/--no-quant-optimize", default=True, show_default=True,
              help="Quantise INT8/INT4/INT2 experts with HQQ's optimiser (about 3.7 s per Qwen1.5-MoE expert on one "
                   "core, once per checkpoint: the store is reused), or with plain min/max rounding (about 0.5 s; "
                   "for speed benchmarks on random weights, where accuracy does not matter).")
def realrun(model: str, prompts_path: Path, policy: str, memory_budget: str, device: str, store: str,
            dtype: str, max_new_tokens: int, as_json: bool, timeline: Path | None,
            trace_out: Path | None, settings: tuple[str, ...], quant_optimize: bool) -> None:
    """Run a model for real with offloaded experts under a policy; print replay's metrics."""
    from sim.policies.presets import build_policy, parse_overrides
    from traces.paths import check_output

    # Mistakes fail now, not after importing torch and loading the model.
    overrides = parse_overrides(settings)
    build_policy(policy, overrides)
    for option, path in (("--timeline", timeline), ("--trace-out", trace_out)):
        if path is not None:
            check_output(path, inputs=[prompts_path], what=option)
    from tqdm import tqdm

    from realrun.session import run_realrun

    with tqdm(desc=f"realrun {policy}", unit="step", disable=None, leave=False) as bar:

        def set_total(steps: int) -> None:
            bar.total = steps
            bar.refresh()

        result = run_realrun(model, prompts_path, policy, memory_budget, device=device, store=store,
                             max_new_tokens=max_new_tokens, overrides=overrides,
                             timeline=timeline, trace_out=trace_out, progress=bar.update,
                             progress_total=set_total, dtype=dtype, optimize_quant=quant_optimize)
    if as_json:
        click.echo(json.dumps(result, indent=2))
        return
    b = result["bytes_transferred"]
    click.echo(f"{result['model']} · {result['policy']} · budget {result['memory_budget_bytes'] / 2**20:.1f} MiB "
               f"· {device}/{store} · profile {result['profile']}")
    click.echo(f"prefill {result['prefill_tokens_per_s']:.1f} tok/s (ttft {result['ttft_s'] * 1e3:.1f} ms)  "
               f"decode {result['decode_tokens_per_s']:.2f} tok/s (tpot {result['tpot_s'] * 1e3:.1f} ms)")
    click.echo(f"hit rate {result['hit_rate']:.3f}  prefetch precision {result['prefetch_precision']:.3f} "
               f"recall {result['prefetch_recall']:.3f}  stall {result['gpu_stall_s']:.3f} s  "
               f"link busy {result['link_busy_fraction']:.1%}")
    click.echo(f"bytes: on-demand {b['on_demand'] / 2**20:.1f} MiB, prefetch used {b['prefetch_used'] / 2**20:.1f} "
               f"MiB, wasted {b['prefetch_wasted'] / 2**20:.1f} MiB")
    lengths = [len(tokens) for tokens in result["generated"]]
    click.echo(f"generated {sum(lengths)} tokens for {len(lengths)} prompts (--json lists them)")
