"""`make bench-scale`: realrun on full-size random checkpoints, every run a `fatesim` subprocess.

For each model (a `realrun.checkpoint_gen` preset: Qwen1.5-MoE-A2.7B by default, the DeepSeekMoE-16B
substitute with `--models`, or any config.json with `--config`):

1. generate the random-weight checkpoint shard by shard into `--cache` (`$FATESIM_CACHE/scale` or
   `~/.cache/fatesim/scale`, never into git), or reuse a complete one made from the same config and seed;
2. write the prompts: random token ids (`{"token_ids": [...]}` lines; the checkpoint has no tokenizer);
3. run `fatesim realrun --policy P --store disk --memory-budget B --max-new-tokens N --json` for each policy
   (and fate a second time, `--repeat-fate`: the first fate run builds its quantised store, the second
   reuses it), each as a child process: wall time and peak RSS (the rusage of that very child, see
   `PEAK_RSS_WRAPPER`),
   and from its JSON prefill and decode tokens/s, bytes read from the slow tier, hit rate; the expert
   stores each run created in the children's `$FATESIM_CACHE/stores` (a folder of this bench's own);
4. run `fatesim trace record --model DIR --prompts P --out T --lookahead 2 --memory-budget B` (the
   streaming recorder, in the same `--dtype`);
5. with `--delete-after`, delete the checkpoint and everything the runs wrote, before the next model (one
   model on disk at a time: the machine this was written on has 75 GB free).

It prints a Markdown table and writes a JSON (atomically) with every figure, the exact command lines, host
and date. The children only use the command line (`fatesim realrun` and `trace record` stream the
checkpoint: `realrun.streaming`), so the figures are what a user gets. A child that fails (exit status,
signal, or `--timeout-s`) is recorded with its stderr tail and makes this command exit 1 once the JSON is
written.
"""

from __future__ import annotations

import json
import os
import platform
import shlex
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import click

from realrun.checkpoint_gen import (
    DEFAULT_MAX_SHARD_BYTES,
    PRESETS,
    SUBSTITUTIONS,
    preset_config,
    write_checkpoint,
)
from traces.atomic import atomic_output
from traces.errors import UserError

DEFAULT_CACHE = Path(os.environ.get("FATESIM_CACHE", Path.home() / ".cache" / "fatesim")) / "scale"
REPO_ROOT = Path(__file__).resolve().parent.parent
"""The checkout the children import `sim`, `realrun` and `traces` from (this file's, not an installed one)."""
FATESIM_MAIN = ["-m", "sim.cli"]
"""What the `fatesim` console script runs (`sim.cli:main`)."""


@dataclass(frozen=True)
class ChildRun:
    """One finished child process."""

    argv: list[str]
    status: str
    """"ok", "failed" (non-zero exit or signal) or "timeout"."""
    returncode: int
    """Exit status, or minus the signal number."""
    wall_s: float
    peak_rss_bytes: int
    """The child's own maximum resident set (ru_maxrss via `PEAK_RSS_WRAPPER`); 0 when unknown."""
    stdout: str
    stderr: str


# Linux charges a child the peak RSS of the memory map it replaced at exec: for a child spawned straight from
# this process (vfork) that is this process's own peak, gigabytes after generating a checkpoint. So every
# child runs under this small wrapper, which forks it from its own ~10 MB map, waits for it with os.wait4 and
# writes the grandchild's own rusage; the wrapper's size is the only bias (measured in the tests).
PEAK_RSS_WRAPPER = """
import os, sys
pid = os.fork()
if pid == 0:
    try:
        os.execv(sys.argv[2], sys.argv[2:])
    finally:
        os._exit(127)
_, status, usage = os.wait4(pid, 0)
with open(sys.argv[1], "w") as f:
    f.write(f"{os.waitstatus_to_exitcode(status)} {usage.ru_maxrss}")
"""


def run_child(argv: list[str], env: dict[str, str], timeout_s: float | None = None) -> ChildRun:
    """Run `argv` to completion under `PEAK_RSS_WRAPPER`: its exit status and its own peak RSS. A timeout
    kills its whole process group (the peak RSS is then unknown: 0)."""
    with tempfile.TemporaryFile() as out, tempfile.TemporaryFile() as err, \
            tempfile.TemporaryDirectory(prefix="bench-scale-") as tmp:
        report = Path(tmp) / "rusage"
        start = time.perf_counter()
        proc = subprocess.Popen([sys.executable, "-c", PEAK_RSS_WRAPPER, str(report), *argv], stdout=out,
                                stderr=err, env=env, cwd=REPO_ROOT, start_new_session=True)
        try:
            proc.wait(timeout=timeout_s)
            timed_out = False
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)  # the wrapper and the run it started
            proc.wait()
            timed_out = True
        wall_s = time.perf_counter() - start
        out.seek(0)
        err.seek(0)
        stdout, stderr = out.read().decode(errors="replace"), err.read().decode(errors="replace")
        fields = report.read_text().split() if report.exists() else []
    if len(fields) == 2:
        returncode, peak_kib = int(fields[0]), int(fields[1])
    else:  # the wrapper itself died (killed at the timeout): no rusage
        returncode, peak_kib = proc.returncode, 0
    status = "timeout" if timed_out else "ok" if returncode == 0 else "failed"
    return ChildRun(argv, status, returncode, wall_s, peak_kib * 1024, stdout, stderr)


def fatesim_argv(*args: str) -> list[str]:
    """argv running `fatesim ARGS` with this interpreter."""
    return [sys.executable, *FATESIM_MAIN, *args]


def shown(argv: list[str]) -> str:
    """The command line as a user would type it (`fatesim ...`) for a fatesim argv, else quoted argv."""
    if argv[1:3] == FATESIM_MAIN:
        return shlex.join(["fatesim", *argv[3:]])
    return shlex.join(argv)


def child_env(store_cache: Path, threads: int | None) -> dict[str, str]:
    """The children's environment: this checkout first on the path, their own $FATESIM_CACHE (so the
    expert stores they build are this bench's to measure and delete), optionally a thread count."""
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join([str(REPO_ROOT), *filter(None, [env.get("PYTHONPATH")])])
    env["FATESIM_CACHE"] = str(store_cache)
    if threads is not None:
        env["OMP_NUM_THREADS"] = env["MKL_NUM_THREADS"] = str(threads)
    return env


def write_prompts(path: Path, num_prompts: int, prompt_tokens: int, vocab_size: int, seed: int) -> None:
    """Random token-id prompts (seeded), one JSON line each."""
    import numpy as np

    rng = np.random.default_rng(seed)
    lines = [json.dumps({"token_ids": rng.integers(0, vocab_size, prompt_tokens).tolist()})
             for _ in range(num_prompts)]
    with atomic_output(path) as tmp:
        tmp.write_text("\n".join(lines) + "\n")


def folder_files(folder: Path) -> dict[str, int]:
    """Relative path -> bytes of every file under `folder` (empty if it does not exist)."""
    if not folder.is_dir():
        return {}
    return {str(p.relative_to(folder)): p.stat().st_size for p in folder.rglob("*") if p.is_file()}


def parse_json_output(stdout: str) -> dict[str, Any]:
    """The metrics JSON a `--json` child printed (from its first line that opens an object)."""
    lines = stdout.splitlines()
    for i, line in enumerate(lines):
        if line.startswith("{"):
            return json.loads("\n".join(lines[i:]))
    raise ValueError("no JSON object in the output")


def realrun_figures(result: dict[str, Any]) -> dict[str, Any]:
    """The figures of one realrun metrics JSON this bench reports (`sim.metrics` keys plus realrun's `io`)."""
    io = result.get("io") or {}
    figures = {
        "prefill_tokens_per_s": result["prefill_tokens_per_s"],
        "decode_tokens_per_s": result["decode_tokens_per_s"],
        "ttft_s": result.get("ttft_s"), "tpot_s": result.get("tpot_s"), "hit_rate": result.get("hit_rate"),
        "slow_tier_bytes_read": io.get("bytes"),
        "slow_tier_reads": io.get("copies"),
        "slow_tier_observed_bytes_per_s": io.get("observed_bytes_per_s"),
        "bytes_transferred": result.get("bytes_transferred"),
        "memory_budget_bytes": result.get("memory_budget_bytes"),
        "expert_budget_bytes": result.get("expert_budget_bytes"),
        "peak_expert_bytes": result.get("peak_expert_bytes"),
        "profile": result.get("profile"),
        "generated_tokens": sum(len(g) for g in result.get("generated", [])),
    }
    # whatever the loader reports about building or loading (keys the streaming work may add), as given
    figures["reported_load_and_store"] = {k: v for k, v in result.items()
                                          if any(w in k for w in ("store", "build", "load"))}
    return figures


def _child_record(run: ChildRun) -> dict[str, Any]:
    record: dict[str, Any] = {"command": shown(run.argv), "argv": run.argv, "status": run.status,
                              "returncode": run.returncode, "wall_s": run.wall_s,
                              "peak_rss_bytes": run.peak_rss_bytes}
    if run.status != "ok":
        record["stderr_tail"] = run.stderr[-2000:]
    return record


def bench_model(name: str, config: dict[str, Any], *, cache: Path, policies: tuple[str, ...], budget: str,
                num_prompts: int, prompt_tokens: int, new_tokens: int, repeat_fate: bool, trace: bool,
                delete_after: bool, seed: int, max_shard_bytes: int, timeout_s: float | None,
                threads: int | None, dtype: str | None, echo: Any = click.echo) -> dict[str, Any]:
    """Generate (or reuse) one model's checkpoint, run every child on it, return its part of the report."""
    folder = cache / name
    work = cache / f"{name}.runs"  # prompts, the children's stores, the trace: everything but the checkpoint
    store_cache = work / "fatesim-cache"
    store_cache.mkdir(parents=True, exist_ok=True)
    env = child_env(store_cache, threads)
    echo(f"== {name}: checkpoint {folder}", err=True)
    stats = write_checkpoint(folder, config, seed=seed, max_shard_bytes=max_shard_bytes,
                             name=name if name in PRESETS else None,
                             progress=lambda f, done, n: echo(f"   wrote {f} ({done}/{n})", err=True))
    # the write-back of a just-written 28 GB checkpoint competes with the runs' O_DIRECT reads (lod decoded
    # 0.16 tok/s instead of 0.84 right after generation): flush it before timing anything
    started = time.perf_counter()
    os.sync()
    entry: dict[str, Any] = {
        "checkpoint": {**stats.as_dict(), "bytes_on_disk": sum(folder_files(folder).values()),
                       "sync_s": time.perf_counter() - started},
        "config": {k: v for k, v in config.items()},
        "substitution": SUBSTITUTIONS.get(name),
        "workload": {"prompts": num_prompts, "prompt_tokens": prompt_tokens, "new_tokens": new_tokens,
                     "budget": budget, "store": "disk", "dtype": dtype, "threads": threads},
        "runs": [],
    }
    prompts = work / "prompts.jsonl"
    write_prompts(prompts, num_prompts, prompt_tokens, int(config["vocab_size"]), seed)
    dtype_args = ["--dtype", dtype] if dtype is not None else []
    # random weights: HQQ's optimiser would spend ~90 min on one core for accuracy nobody measures here
    extra = [*dtype_args, "--no-quant-optimize"]
    entry["workload"]["quantisation"] = "plain min/max rounding (--no-quant-optimize)"
    labels = list(policies) + (["fate"] if repeat_fate and "fate" in policies else [])
    seen: set[str] = set()
    try:
        for policy in labels:
            label = policy if policy not in seen else f"{policy} (again)"
            seen.add(policy)
            before = folder_files(store_cache / "stores")
            argv = fatesim_argv("realrun", "--model", str(folder), "--prompts", str(prompts), "--policy", policy,
                                "--store", "disk", "--memory-budget", budget, "--max-new-tokens", str(new_tokens),
                                "--json", *extra)
            echo(f"   {label}: {shown(argv)}", err=True)
            run = run_child(argv, env, timeout_s)
            record = {"run": label, "policy": policy, **_child_record(run)}
            after = folder_files(store_cache / "stores")
            record["stores_created"] = {k: v for k, v in after.items() if k not in before}
            if run.status == "ok":
                try:
                    record.update(realrun_figures(parse_json_output(run.stdout)))
                except (ValueError, KeyError) as error:
                    record.update(status="failed", error=f"unreadable metrics JSON: {error}",
                                  stdout_tail=run.stdout[-2000:])
            entry["runs"].append(record)
        firsts = [r for r in entry["runs"] if r["run"] == "fate" and r["status"] == "ok"]
        again = [r for r in entry["runs"] if r["run"] == "fate (again)" and r["status"] == "ok"]
        if firsts and again and firsts[0]["stores_created"] and not again[0]["stores_created"]:
            # the second run found the store and skipped building it; everything else is the same run
            entry["fate_store_build_s_estimate"] = firsts[0]["wall_s"] - again[0]["wall_s"]
        entry["trace_record"] = bench_trace(folder, prompts, work, budget, new_tokens, env, timeout_s, echo,
                                            dtype_args) if trace else {"status": "not run", "reason": "--no-trace"}
        entry["bytes_written_by_runs"] = sum(folder_files(work).values())
    finally:
        if delete_after:
            shutil.rmtree(folder, ignore_errors=True)
            shutil.rmtree(work, ignore_errors=True)
            entry["deleted_after"] = [str(folder), str(work)]
    return entry


def bench_trace(folder: Path, prompts: Path, work: Path, budget: str, new_tokens: int, env: dict[str, str],
                timeout_s: float | None, echo: Any, dtype_args: list[str]) -> dict[str, Any]:
    """One streaming `fatesim trace record` run (the model offloaded within `budget`)."""
    out = work / "trace.safetensors"
    argv = fatesim_argv("trace", "record", "--model", str(folder), "--prompts", str(prompts), "--out", str(out),
                        "--lookahead", "2", "--memory-budget", budget, "--max-new-tokens", str(new_tokens),
                        *dtype_args)
    echo(f"   trace record: {shown(argv)}", err=True)
    run = run_child(argv, env, timeout_s)
    record = _child_record(run)
    if run.status == "ok":
        record["trace_bytes"] = out.stat().st_size if out.exists() else None
    return record


def machine() -> dict[str, Any]:
    """Where the figures were measured."""
    import torch
    import transformers

    cpu = platform.processor() or platform.machine()
    try:
        cpu = next(line.split(":", 1)[1].strip() for line in Path("/proc/cpuinfo").read_text().splitlines()
                   if line.startswith("model name"))
    except (OSError, StopIteration):
        pass
    mem = None
    try:
        mem = int(next(line.split()[1] for line in Path("/proc/meminfo").read_text().splitlines()
                       if line.startswith("MemTotal"))) * 1024
    except (OSError, StopIteration):
        pass
    try:
        commit = subprocess.run(["git", "rev-parse", "HEAD"], cwd=REPO_ROOT, capture_output=True, text=True,
                                check=False).stdout.strip() or None
    except OSError:
        commit = None
    return {"host": platform.node(), "cpu": cpu, "cores": os.cpu_count(), "memory_bytes": mem,
            "python": platform.python_version(), "torch": torch.__version__,
            "transformers": transformers.__version__, "commit": commit}


def human_bytes(nbytes: float | None) -> str:
    """1234567 -> "1.23 MB" (decimal units, as disk sizes are quoted); "–" for None."""
    if nbytes is None:
        return "–"
    for unit, scale in (("GB", 1e9), ("MB", 1e6), ("kB", 1e3)):
        if abs(nbytes) >= scale:
            return f"{nbytes / scale:.2f} {unit}"
    return f"{nbytes:.0f} B"


def format_table(report: dict[str, Any]) -> str:
    """One Markdown row per child run (and the trace recorder), per model; then the checkpoint's line."""
    lines = ["| model | run | status | wall s | peak RSS | prefill tok/s | decode tok/s | slow tier read "
             "| stores built |", "|---|---|---|---:|---:|---:|---:|---:|---:|"]

    def num(value: Any, fmt: str) -> str:
        return format(value, fmt) if isinstance(value, (int, float)) else "–"

    for name, entry in report["models"].items():
        ck = entry["checkpoint"]
        for r in entry["runs"] + [{"run": "trace record", **entry["trace_record"]}]:
            built = sum(r["stores_created"].values()) if "stores_created" in r else None
            lines.append(
                f"| {name} | {r['run']} | {r['status']} | {num(r.get('wall_s'), '.1f')} | "
                f"{human_bytes(r.get('peak_rss_bytes'))} | {num(r.get('prefill_tokens_per_s'), '.2f')} | "
                f"{num(r.get('decode_tokens_per_s'), '.3f')} | {human_bytes(r.get('slow_tier_bytes_read'))} | "
                f"{human_bytes(built)} |")
        made = ("reused" if ck["reused"] else
                f"generated in {ck['wall_s']:.1f} s ({human_bytes(ck['bytes_per_s'])}/s)")
        trace = entry["trace_record"]
        lines.append(f"\n{name}: checkpoint {human_bytes(ck['bytes_on_disk'])} on disk, {made}; fate store build "
                     f"≈ {num(entry.get('fate_store_build_s_estimate'), '.1f')} s (wall of fate minus fate again); "
                     f"trace record: {trace['status']}" + (f" ({trace['reason']})" if "reason" in trace else "") + "\n")
    return "\n".join(lines)


@click.command()
@click.option("--models", default="qwen1.5-moe-a2.7b", show_default=True,
              help=f"Comma-separated presets ({', '.join(PRESETS)}); empty with --config.")
@click.option("--config", "configs", multiple=True, type=click.Path(exists=True, dir_okay=False, path_type=Path),
              help="Also bench the model of this config.json (named after the file); repeatable.")
@click.option("--policies", default="lod,lru,fate", show_default=True)
@click.option("--budget", default="10%", show_default=True, help="--memory-budget of every run.")
@click.option("--prompts", "num_prompts", type=click.IntRange(min=1), default=1, show_default=True)
@click.option("--prompt-tokens", type=click.IntRange(min=1), default=64, show_default=True)
@click.option("--new-tokens", type=click.IntRange(min=1), default=8, show_default=True)
@click.option("--repeat-fate/--no-repeat-fate", default=True, show_default=True,
              help="Run fate twice: the first builds its quantised store, the second reuses it.")
@click.option("--trace/--no-trace", default=True, show_default=True,
              help="Also run the streaming `fatesim trace record --memory-budget`.")
@click.option("--delete-after/--keep", default=False, show_default=True,
              help="Delete each checkpoint and what its runs wrote once its runs are done.")
@click.option("--cache", type=click.Path(file_okay=False, path_type=Path), default=DEFAULT_CACHE, show_default=True)
@click.option("--seed", type=int, default=0, show_default=True, help="Weights and prompts.")
@click.option("--max-shard-gb", type=click.FloatRange(min=0.000001), default=DEFAULT_MAX_SHARD_BYTES / 1e9,
              show_default=True)
@click.option("--timeout-s", type=click.FloatRange(min=1), default=None, help="Kill a child after this long.")
@click.option("--threads", type=click.IntRange(min=1), default=None, help="OMP_NUM_THREADS of the children.")
@click.option("--dtype", default=None, help="--dtype of every realrun and trace record run (default: theirs, auto).")
@click.option("--out", type=click.Path(dir_okay=False, path_type=Path), default=None, help="Write the JSON here.")
def main(models: str, configs: tuple[Path, ...], policies: str, budget: str, num_prompts: int, prompt_tokens: int,
         new_tokens: int, repeat_fate: bool, trace: bool, delete_after: bool, cache: Path, seed: int,
         max_shard_gb: float, timeout_s: float | None, threads: int | None, dtype: str | None,
         out: Path | None) -> None:
    """Full-size random checkpoints through `fatesim realrun` (lod, lru, fate) and `trace record`."""
    chosen = [(m, preset_config(m)) for m in (s.strip() for s in models.split(",")) if m]
    chosen += [(p.stem, json.loads(p.read_text())) for p in configs]
    if not chosen:
        raise UserError("nothing to bench: give --models or --config")
    cache.mkdir(parents=True, exist_ok=True)
    report: dict[str, Any] = {
        "command": shlex.join([Path(sys.executable).name, "-m", "realrun.bench_scale", *sys.argv[1:]]),
        "date": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()), "machine": machine(), "cache": str(cache),
        "models": {},
    }
    for name, config in chosen:  # one checkpoint on disk at a time with --delete-after
        report["models"][name] = bench_model(
            name, config, cache=cache, policies=tuple(p.strip() for p in policies.split(",") if p.strip()),
            budget=budget, num_prompts=num_prompts, prompt_tokens=prompt_tokens, new_tokens=new_tokens,
            repeat_fate=repeat_fate, trace=trace, delete_after=delete_after, seed=seed,
            max_shard_bytes=int(max_shard_gb * 1e9), timeout_s=timeout_s, threads=threads, dtype=dtype)
    click.echo(format_table(report))
    if out is not None:
        with atomic_output(out) as tmp:
            tmp.write_text(json.dumps(report, indent=2) + "\n")
    failed = [f"{n}/{r['run']}" for n, e in report["models"].items()
              for r in e["runs"] + [e["trace_record"]] if r["status"] not in ("ok", "not run")]
    if failed:
        click.echo(f"bench-scale: failed runs: {', '.join(failed)} (stderr tails in the JSON)", err=True)
        raise SystemExit(1)


def cli() -> None:
    """Entry point: UserError becomes one line and exit status 2, as in `fatesim`."""
    try:
        main.main(standalone_mode=False)
    except UserError as error:
        click.echo(f"bench-scale: error: {error}", err=True)
        raise SystemExit(2) from None
    except click.ClickException as error:
        error.show()
        raise SystemExit(2) from None


if __name__ == "__main__":
    cli()
