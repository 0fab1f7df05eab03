"""`python -m sim.bench`: how fast the simulator replays, in MoE layer-steps per second.

A layer-step is one MoE layer of one forward step (a prefill chunk or a decode token). We replay a
synthetic Qwen1.5-MoE-shaped trace (24 MoE layers, 60 experts, top-4, look-ahead logits, 1 sequence of 32
prompt and N decode tokens) under `lod`, `lru` and `fate` on the RTX 3090 profile at a 25% budget, best
of `--repeat` runs (`lod` also through the general engine loop, without its closed form), and time a
100-configuration sweep (5 presets x 5 budgets x 4 profiles) on a shorter trace
with `replay_many`. Wall time and this process's CPU time are both reported: on a shared machine the CPU
figure is what one core delivers.
"""

from __future__ import annotations

import os
import platform
import sys
import time

import click

from sim.replay import load, replay, replay_many
from sim.synthetic import synthetic_trace

SWEEP_POLICIES = ("lod", "lru", "eap", "fate", "oracle")
SWEEP_BUDGETS = ("10%", "20%", "30%", "40%", "50%")
SWEEP_PROFILES = ("rtx3090-bound", "gtx1080ti-bound", "rtx4090-bound", "h100-bound")


def _timed(fn) -> tuple[float, float, object]:
    wall, cpu = time.perf_counter(), time.process_time()
    out = fn()
    return time.perf_counter() - wall, time.process_time() - cpu, out


@click.command()
@click.option("--decode-tokens", default=1000, show_default=True, help="Decode tokens of the benchmark trace.")
@click.option("--sweep-decode-tokens", default=200, show_default=True, help="Decode tokens of the sweep's trace.")
@click.option("--repeat", default=3, show_default=True, help="Runs per policy; the best is reported.")
def main(decode_tokens: int, sweep_decode_tokens: int, repeat: int) -> None:
    """Print layer-steps per second for lod, lru and fate, and the wall time of a 100-configuration sweep."""
    command = "python -m sim.bench " + " ".join(sys.argv[1:])
    load_avg = os.getloadavg()[0] if hasattr(os, "getloadavg") else float("nan")
    click.echo(f"command: {command.strip()}")
    click.echo(f"machine: {platform.machine()} {platform.processor() or ''}, {os.cpu_count()} cores, Python "
               f"{platform.python_version()}, load average {load_avg:.2f} at start")
    _, build_s, loaded = _timed(lambda: load(synthetic_trace(sequences=1, prompt_tokens=32,
                                                              decode_tokens=decode_tokens, seed=0)))
    click.echo(f"trace: 24 layers, 60 experts, top-4, 32 prompt + {decode_tokens} decode tokens "
               f"(prepared in {build_s:.2f} s CPU)")
    for policy, mode, label in (("lod", "fast", "lod (closed form, sim/fastpath.py)"),
                                ("lod", "engine", "lod (engine loop)"), ("lru", "fast", "lru (engine loop)"),
                                ("fate", "fast", "fate (engine loop)")):
        best_wall = best_cpu = float("inf")
        steps = 0
        for _ in range(repeat):
            wall, cpu, m = _timed(lambda p=policy, md=mode: replay(loaded, policy=p, hw="rtx3090-bound",
                                                                   memory_budget="25%", mode=md))
            best_wall, best_cpu, steps = min(best_wall, wall), min(best_cpu, cpu), m["layer_steps"]
        click.echo(f"{label:>34}: {steps} layer-steps, {steps / best_wall:,.0f} layer-steps/s wall, "
                   f"{steps / best_cpu:,.0f} layer-steps/s CPU (best of {repeat})")
    sweep_trace = load(synthetic_trace(sequences=1, prompt_tokens=32, decode_tokens=sweep_decode_tokens, seed=1))
    configs = [dict(policy=p, memory_budget=b, hw=h) for p in SWEEP_POLICIES for b in SWEEP_BUDGETS
               for h in SWEEP_PROFILES]
    wall, cpu, results = _timed(lambda: replay_many(sweep_trace, configs))
    steps = sum(r["layer_steps"] for r in results)
    click.echo(f"sweep: {len(configs)} configurations x 32 prompt + {sweep_decode_tokens} decode tokens in "
               f"{wall:.1f} s wall ({cpu:.1f} s CPU, {steps / cpu:,.0f} layer-steps/s CPU)")


if __name__ == "__main__":
    main()
