"""`python -m sim.bench` (`make bench`): how fast fatesim is, measured as a user sees it.

Each command of issue 14's speed targets runs as a subprocess of this tree's code (`python -m sim.cli ...`,
what the `fatesim` script runs), timed from process start to exit: imports, reading the trace, building the
workload, the compiled kernel (sim/kernel/compiled.c, built at install), the replay, the output. The
tree's Python files are byte-compiled first, as an install does (this VM sets PYTHONDONTWRITEBYTECODE, so
without it every process would compile ~30 modules from source, ~50 ms). The table gives for each the
layer-steps (one MoE layer of one forward step), the best wall time of `--repeat` runs (`--slow-repeat` for
plan and train-estimator; an untimed run before them, but for train-estimator, which brings the trace
into the page cache), layer-steps per second of that wall time, the target and whether it is met, and the CPU time of that run (user + system,
this machine's cores being shared, the figure one core delivers). Below it the in-process replay rates
(best of `--repeat` after a warm-up, the trace already loaded) show the start-up cost apart.

The inputs:
- `esft-*`: the ESFT `intent` routing log (`../shared/realtraces/deepseek-ai__ESFT`, 8,222 tokens, first 16
  positions of each sequence as prompt), imported once into `$FATESIM_CACHE/bench` (default
  ~/.cache/fatesim/bench; the import is timed apart, not part of the replay figure);
- `demo-fate`, `train-estimator`: the demo trace `traces/data/mini-qwen-moe.safetensors` (`make trace`);
- `plan`: the README's capacity-planning example on the Mixtral decode log
  (`../shared/realtraces/Mario928__speculative-moe`), imported once likewise.
A command whose input is missing is skipped with one line saying why; no figure is made up.
"""

from __future__ import annotations

import os
import platform
import re
import shlex
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path

import click

REPO = Path(__file__).resolve().parent.parent
REALTRACES = REPO.parent / "shared" / "realtraces"
ESFT_LOG = REALTRACES / "deepseek-ai__ESFT" / "expert_scores" / "intent"
MIXTRAL_LOGS = [REALTRACES / "Mario928__speculative-moe" / "routing_data_collected" / f"{name}_2_routing.jsonl"
                for name in ("gsm8k", "humaneval")]
DEMO_TRACE = REPO / "traces" / "data" / "mini-qwen-moe.safetensors"
REPLAY_ARGS = ("--hw", "rtx3090-bound", "--memory-budget", "25%")


def cache_dir() -> Path:
    """Where the imported logs are kept between runs: $FATESIM_CACHE/bench (default ~/.cache/fatesim/bench)."""
    root = os.environ.get("FATESIM_CACHE") or str(Path.home() / ".cache" / "fatesim")
    return Path(root) / "bench"


@dataclass
class Run:
    wall_s: float
    cpu_s: float
    returncode: int
    stdout: str
    stderr: str
    load: float


@dataclass
class Case:
    name: str
    args: list[str]
    """fatesim arguments (the command is `python -m sim.cli ARGS`)."""
    target: str
    """What issue 14 asks: ("rate", minimum layer-steps/s wall) or ("wall", maximum seconds)."""
    bound: float
    repeat: int
    warm_up: bool = True
    """One untimed run first (brings the trace file into the page cache, as a user's second run finds it)."""
    missing: str | None = None
    """Why this case cannot run here (its input is missing), or None."""
    runs: list[Run] = field(default_factory=list)
    layer_steps: int | None = None


def timed_fatesim(args: list[str], env: dict[str, str]) -> Run:
    """Run `fatesim ARGS` (this tree's code) as a subprocess: wall time from start to exit, and its CPU time
    (user + system; the child has been reaped when communicate returns, so RUSAGE_CHILDREN grew by it)."""
    import resource

    load = os.getloadavg()[0]
    before = resource.getrusage(resource.RUSAGE_CHILDREN)
    start = time.perf_counter()
    proc = subprocess.Popen([sys.executable, "-m", "sim.cli", *args], cwd=REPO, env=env, stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True)
    stdout, stderr = proc.communicate()
    wall = time.perf_counter() - start
    after = resource.getrusage(resource.RUSAGE_CHILDREN)
    cpu = (after.ru_utime - before.ru_utime) + (after.ru_stime - before.ru_stime)
    return Run(wall, cpu, proc.returncode, stdout, stderr, load)


def child_env() -> dict[str, str]:
    env = dict(os.environ)
    env["PYTHONPATH"] = str(REPO) + (os.pathsep + env["PYTHONPATH"] if env.get("PYTHONPATH") else "")
    env.setdefault("PYTHONHASHSEED", "0")
    return env


def ensure_import(out: Path, import_args: list[str], env: dict[str, str], sources: list[Path]) -> str | None:
    """Import a public log into the bench cache once; None when `out` is there, else why it cannot be."""
    if out.is_file():
        return None
    absent = [str(p) for p in sources if not p.exists()]
    if absent:
        return f"input missing: {absent[0]}"
    out.parent.mkdir(parents=True, exist_ok=True)
    run = timed_fatesim([*import_args, "--out", str(out)], env)
    if run.returncode != 0:
        return f"import failed: {run.stderr.strip().splitlines()[-1] if run.stderr.strip() else run.returncode}"
    click.echo(f"imported {out.name} into {out.parent} in {run.wall_s:.1f} s (once; not part of any figure)")
    return None


def cases(repeat: int, slow_repeat: int, env: dict[str, str], out_dir: Path) -> list[Case]:
    folder = cache_dir()
    esft = folder / "esft-intent-p16.safetensors"
    mixtral = folder / "mixtral-decode.safetensors"
    esft_missing = ensure_import(esft, ["trace", "import", "esft", str(ESFT_LOG), "--prompt-tokens", "16"], env,
                                 [ESFT_LOG])
    mixtral_missing = ensure_import(mixtral, ["trace", "import", "mixtral-jsonl", *map(str, MIXTRAL_LOGS)], env,
                                    MIXTRAL_LOGS)
    demo_missing = None if DEMO_TRACE.is_file() else f"input missing: {DEMO_TRACE} (make trace records it)"
    out = []
    for policy in ("lru", "oracle"):
        out.append(Case(f"esft-{policy}", ["replay", "--trace", str(esft), "--policy", policy, *REPLAY_ARGS, "--json"],
                        "rate", 300_000, repeat, esft_missing))
    out.append(Case("demo-fate", ["replay", "--trace", str(DEMO_TRACE), "--as-model", "qwen1.5-moe-a2.7b",
                                  "--policy", "fate", *REPLAY_ARGS, "--json"], "rate", 200_000, repeat, demo_missing))
    out.append(Case("plan", ["plan", "--model", "mixtral-8x7b", "--hw", "h100-bound", "--target-decode", "5",
                             "--trace", str(mixtral), "--quiet"], "wall", 10.0, slow_repeat, mixtral_missing))
    out.append(Case("train-estimator", ["train-estimator", "--trace", str(DEMO_TRACE), "--out",
                                        str(out_dir / "estimator.safetensors"), "--quiet"], "wall", 60.0,
                    slow_repeat, warm_up=False, missing=demo_missing))
    return out


def shown(case: Case) -> str:
    """The command as a user types it, with the cache folder shortened."""
    text = "fatesim " + shlex.join(case.args)
    text = re.sub(r"\S*/fatesim-bench-[^/\s]+/", "", text)  # the temporary output folder
    return text.replace(str(cache_dir()), "$BENCH").replace(str(REPO) + "/", "").replace(" --json", "")


def in_process(case: Case, repeat: int) -> tuple[int, float, float, float]:
    """(layer-steps, best wall s, best CPU s, first-replay wall s) of `replay` in this process, trace loaded once."""
    from sim.replay import load, replay

    args = case.args
    trace = args[args.index("--trace") + 1]
    kwargs = dict(policy=args[args.index("--policy") + 1], hw="rtx3090-bound", memory_budget="25%")
    if "--as-model" in args:
        kwargs["as_model"] = args[args.index("--as-model") + 1]
    loaded = load(trace)
    start = time.perf_counter()
    steps = replay(loaded, **kwargs)["layer_steps"]  # warm-up: derived arrays, the kernel module
    first = time.perf_counter() - start
    best_wall = best_cpu = float("inf")
    for _ in range(repeat):
        wall, cpu = time.perf_counter(), time.process_time()
        replay(loaded, **kwargs)
        best_wall, best_cpu = min(best_wall, time.perf_counter() - wall), min(best_cpu, time.process_time() - cpu)
    return steps, best_wall, best_cpu, first


def phases(case: Case, env: dict[str, str], repeat: int) -> dict[str, float]:
    """Seconds of each phase of one replay process of `case` (the README's table): the imports, timed as a
    process (`import sim.replay_cli` minus an empty interpreter), then the rest in this process, each the best
    of `repeat`, on a freshly read trace (so the look-ahead softmax and the kernel's derived arrays are
    computed, not cached)."""
    from sim import kernel
    from sim.kernel.prepare import inputs
    from sim.policies.requirements import lookahead_probabilities
    from sim.replay import load, replay
    from sim.workload import build_workload
    from traces.format import read_trace, validate_trace

    def best(work) -> float:
        times = []
        for _ in range(repeat):
            start = time.perf_counter()
            work()
            times.append(time.perf_counter() - start)
        return min(times)

    def process(code: str) -> float:
        return min(timed_fatesim_code(code, env) for _ in range(repeat))

    args = case.args
    path = args[args.index("--trace") + 1]
    kwargs = dict(policy=args[args.index("--policy") + 1], hw="rtx3090-bound", memory_budget="25%")
    if "--as-model" in args:
        kwargs["as_model"] = args[args.index("--as-model") + 1]
    out = {"imports (python, numpy, click, sim)": process("import sim.cli, sim.replay_cli") - process("pass")}
    trace = read_trace(path)
    out["reading and checking the trace"] = best(lambda: read_trace(path))
    out["  of which checking"] = best(lambda: validate_trace(trace))
    out["content hash (on its own thread)"] = best(trace.content_hash)
    out["the workload"] = best(lambda: build_workload(trace))
    if trace.lookahead_logits is not None:
        out["look-ahead softmax"] = best(lambda: lookahead_probabilities(trace.lookahead_logits))
    captured: dict[str, tuple] = {}
    kernel_replay = kernel.replay

    def timed_kernel(workload, ctl, costs):
        if workload.has_lookahead:
            _ = workload.lookahead_probs  # the softmax, timed above
        start = time.perf_counter()
        inputs(workload, ctl, costs)
        middle = time.perf_counter()
        result = kernel_replay(workload, ctl, costs)  # inputs again (cached derived arrays), then the run
        captured.setdefault("times", [])
        captured["times"].append((middle - start, time.perf_counter() - middle))
        return result

    kernel.replay = timed_kernel
    try:
        for _ in range(repeat):
            replay(load(read_trace(path)), **kwargs)
    finally:
        kernel.replay = kernel_replay
    out["the kernel's inputs (prefill rankings, cost tables)"] = min(t[0] for t in captured["times"])
    out["the kernel (with its inputs again, cached)"] = min(t[1] for t in captured["times"])
    return out


def timed_fatesim_code(code: str, env: dict[str, str]) -> float:
    """Wall seconds of `python -c CODE` with this tree on the path."""
    start = time.perf_counter()
    subprocess.run([sys.executable, "-c", code], cwd=REPO, env=env, check=True)
    return time.perf_counter() - start


@click.command()
@click.option("--repeat", default=3, show_default=True, help="Runs of each replay command; the best is reported.")
@click.option("--slow-repeat", default=1, show_default=True, help="Runs of plan and train-estimator.")
@click.option("--phases", "phases_too", is_flag=True, help="Also time the phases of one replay process of each replay case.")
@click.option("--only", default=None, help="Comma-separated cases: esft-lru,esft-oracle,demo-fate,plan,train-estimator.")
def main(repeat: int, slow_repeat: int, phases_too: bool, only: str | None) -> None:
    """Time fatesim's commands as whole processes against issue 14's targets, then the in-process rates."""
    import compileall
    import json

    env = child_env()
    for package in ("sim", "traces", "realrun", "calibration"):
        compileall.compile_dir(REPO / package, quiet=1)
    click.echo(f"command: python -m sim.bench {' '.join(sys.argv[1:])}".rstrip())
    click.echo(f"machine: {platform.machine()}, {os.cpu_count()} cores, Python {platform.python_version()}, "
               f"load average {' '.join(f'{x:.2f}' for x in os.getloadavg())} at start")
    with tempfile.TemporaryDirectory(prefix="fatesim-bench-") as tmp:
        todo = cases(repeat, slow_repeat, env, Path(tmp))
        if only:
            wanted = {name.strip() for name in only.split(",")}
            unknown = wanted - {c.name for c in todo}
            if unknown:
                raise click.BadParameter(f"unknown case(s) {sorted(unknown)}", param_hint="--only")
            todo = [c for c in todo if c.name in wanted]
        for case in todo:
            if case.missing:
                click.echo(f"skip {case.name}: {case.missing}")
                continue
            warm = timed_fatesim(case.args, env) if case.warm_up else None
            if warm is not None and warm.returncode != 0:
                case.missing = f"failed: {warm.stderr.strip().splitlines()[-1] if warm.stderr.strip() else warm.returncode}"
                click.echo(f"skip {case.name}: {case.missing}")
                continue
            for _ in range(case.repeat):
                run = timed_fatesim(case.args, env)
                if run.returncode != 0:
                    case.missing = f"failed (exit {run.returncode}): {run.stderr.strip()[-300:]}"
                    break
                case.runs.append(run)
            if case.missing:
                click.echo(f"skip {case.name}: {case.missing}")
                continue
            if case.target == "rate":
                case.layer_steps = int(json.loads(case.runs[0].stdout)["layer_steps"])
            best = min(case.runs, key=lambda r: r.wall_s)
            click.echo(f"ran {case.name}: best {best.wall_s:.2f} s wall of {len(case.runs)} "
                       f"({', '.join(f'{r.wall_s:.2f}' for r in case.runs)}), load {best.load:.2f}", err=True)
        click.echo("")
        click.echo(f"{'case':16} {'layer-steps':>11} {'wall s':>7} {'CPU s':>6} {'steps/s wall':>12} "
                   f"{'target':>14} {'met':>4} {'load':>5}  command")
        for case in todo:
            if not case.runs:
                continue
            best = min(case.runs, key=lambda r: r.wall_s)
            if case.target == "rate":
                rate = case.layer_steps / best.wall_s
                target, met, steps, rate_s = (f">= {case.bound:,.0f}/s", rate >= case.bound, f"{case.layer_steps:,}",
                                              f"{rate:,.0f}")
            else:
                target, met, steps, rate_s = f"<= {case.bound:.0f} s", best.wall_s <= case.bound, "–", "–"
            click.echo(f"{case.name:16} {steps:>11} {best.wall_s:7.2f} {best.cpu_s:6.2f} {rate_s:>12} {target:>14} "
                       f"{'yes' if met else 'NO':>4} {best.load:5.2f}  {shown(case)}")
        rated = [c for c in todo if c.target == "rate" and c.runs]
        if rated:
            click.echo("")
            click.echo(f"in-process replay (trace loaded once, after a warm-up replay; best of {repeat}):")
            for case in rated:
                steps, wall, cpu, first = in_process(case, repeat)
                click.echo(f"{case.name:16} {steps:>11,} layer-steps: {steps / wall:,.0f}/s wall, {steps / cpu:,.0f}/s "
                           f"CPU (first replay of the process {first:.2f} s wall), load {os.getloadavg()[0]:.2f}")
        if phases_too:
            for case in rated:
                click.echo("")
                click.echo(f"phases of one {case.name} process (s; best of {repeat}):")
                for name, seconds in phases(case, env, repeat).items():
                    click.echo(f"  {name:48} {seconds:6.3f}")
    click.echo(f"load average {' '.join(f'{x:.2f}' for x in os.getloadavg())} at the end")


if __name__ == "__main__":
    main()
