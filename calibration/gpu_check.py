"""`make gpu-check`: everything that needs a CUDA GPU, once, in at most 8 minutes, into one folder to commit.

    python -m calibration.gpu_check --out gpu-check/<name> [--budget-s 480] [--only STEP,...] [--threads 8]

Steps, in this order; each runs as a subprocess with its own time limit (and never past the overall
budget), so a failure, a hang or a crash in one is logged and the next one still runs:

1. `env`: the GPU, its PCIe generation and width (nvidia-smi), driver, CUDA, torch and transformers.
2. `pytest-cuda`: `pytest -m cuda` (the copy stream and its events, event timing of copies and stalls,
   CPU experts beside the GPU, calibration on CUDA). Without a GPU every test skips.
3. `bitexact`: realrun on CUDA against transformers on CUDA for the lossless presets on both embedded
   models: generated tokens and every step's logits must be bit-equal (cpu-exec's missed experts run on
   the CPU, so it is reported with its largest difference instead).
4. `bench-model`: a random bf16 checkpoint with Qwen1.5-MoE-A2.7B's MoE shapes and 3 decoder layers
   (~3.4 GB, generated on the GPU; calibration and validation use it, as `make validate` uses `bench`).
5. `calibrate`: `fatesim calibrate --device cuda --store ram` on that model into `<gpu>-pcie<gen>.toml`
   (the quick plan when less than `FULL_CALIBRATION_S` is left). Copy it into `sim/profiles/` to ship it.
6. `validate`: `fatesim validate --device cuda --store ram --link observed` with that profile, one
   subprocess per preset (lod, lru, cpu-exec, speculate, fate: fate last, its INT4/INT2 packing is the
   slowest) x budgets 25%, 50%; merged into `validation.json` with one summary over all rows.
7. `fullsize`: realrun on a full-size Qwen1.5-MoE-A2.7B-shaped checkpoint (28.6 GB, written by
   `realrun.checkpoint_gen`, streamed by `realrun.streaming`) at a 20% budget, INT4/INT2 packed without
   HQQ's optimiser (random weights; with it, ~90 min of CPU): skipped with one line when less than
   `FULLSIZE_MIN_S` is left (run it alone with `--only fullsize --budget-s 600`).

Files written (the GPU tool returns at most 8): summary.json (every step's status, seconds and result),
log.txt (every step's output), the profile, calibration-points.json, validation.json, fullsize.json.
Exit status 1 when a step failed or ran out of time, else 0 (skipped steps are not failures).
"""

from __future__ import annotations

import argparse
import json
import os
import re
import shutil
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from traces.errors import UserError

STEPS = ("env", "pytest-cuda", "bitexact", "bench-model", "calibrate", "validate", "fullsize")
STEP_LIMIT_S = {"env": 30, "pytest-cuda": 120, "bitexact": 90, "bench-model": 90, "calibrate": 150,
                "validate": 240, "fullsize": 600}
"""Most seconds each step may take (the overall budget may leave it less)."""
FULL_CALIBRATION_S = 150
"""Below this much time left, `calibrate` measures the quick plan."""
VALIDATE_PRESETS = ("lod", "lru", "cpu-exec", "speculate", "fate")
VALIDATE_BUDGETS = "25%,50%"
VALIDATE_MIN_S = 30
"""A preset's validation is not started with less time than this left."""
BITEXACT_PRESETS = {"lod": {}, "lru": {}, "fate": {"precision": "bf16"}, "speculate": {"miss": "wait"},
                    "mixtral-offloading": {"precision": "bf16"}, "eap": {}, "cpu-exec": {}}
"""Lossless presets (overrides that make them so); cpu-exec computes missed experts on the CPU."""
BITEXACT_MODELS = ("mini-qwen-moe", "mini-deepseek-moe")
FULLSIZE_MIN_S = 240
FULLSIZE_POLICIES = ("lru", "fate")
CLI = ["-m", "sim.cli"]
"""`fatesim` without the console script (the GPU machine has no installed package)."""


@dataclass
class StepResult:
    name: str
    status: str
    """"ok", "failed", "timeout" or "skipped"."""
    seconds: float
    detail: str = ""


class Check:
    """The output folder, the log, the clock and the step results of one gpu-check run."""

    def __init__(self, out: Path, budget_s: float, scratch: Path, threads: int) -> None:
        self.out = out
        self.scratch = scratch
        self.threads = threads
        self.deadline = time.monotonic() + budget_s
        self.results: list[StepResult] = []
        self.facts: dict[str, Any] = {}
        self.log_path = out / "log.txt"

    def left_s(self) -> float:
        return self.deadline - time.monotonic()

    def log(self, text: str) -> None:
        with open(self.log_path, "a", encoding="utf-8") as f:
            f.write(text if text.endswith("\n") else text + "\n")
        print(text.rstrip("\n"), flush=True)

    def run(self, name: str, argv: list[str], limit_s: float, env: dict[str, str] | None = None) -> StepResult:
        """Run `argv` for at most `limit_s` seconds (and never past the deadline), its output into the log."""
        limit = min(limit_s, self.left_s())
        if limit <= 1:
            return self.skip(name, "no time left in the budget")
        self.log(f"\n===== {name}: {' '.join(argv)} (limit {limit:.0f} s)")
        started = time.monotonic()
        with open(self.log_path, "a", encoding="utf-8") as log:
            try:
                proc = subprocess.run(argv, stdout=log, stderr=subprocess.STDOUT, timeout=limit,
                                      env={**os.environ, **(env or {})}, check=False)
            except subprocess.TimeoutExpired:
                return self.done(name, "timeout", started, f"stopped after {limit:.0f} s")
        return self.done(name, "ok" if proc.returncode == 0 else "failed", started, f"exit {proc.returncode}")

    def done(self, name: str, status: str, started: float, detail: str) -> StepResult:
        result = StepResult(name, status, time.monotonic() - started, detail)
        self.results.append(result)
        self.log(f"----- {name}: {status} in {result.seconds:.1f} s ({detail})")
        return result

    def skip(self, name: str, why: str) -> StepResult:
        result = StepResult(name, "skipped", 0.0, why)
        self.results.append(result)
        self.log(f"----- {name}: skipped: {why}")
        return result

    def step(self, name: str, *args: str, limit_s: float | None = None) -> StepResult:
        """Run one of this module's own steps (`--step NAME`) as a subprocess."""
        argv = [sys.executable, "-m", "calibration.gpu_check", "--step", name, "--out", str(self.out),
                "--scratch", str(self.scratch), "--threads", str(self.threads), *args]
        return self.run(name, argv, STEP_LIMIT_S[name] if limit_s is None else limit_s)

    def write_summary(self) -> None:
        summary = {"steps": [r.__dict__ for r in self.results], **self.facts}
        write_json(self.out / "summary.json", summary)


def write_json(path: Path, data: Any) -> None:
    from traces.atomic import atomic_output

    with atomic_output(path) as tmp:
        tmp.write_text(json.dumps(data, indent=2, default=str))


def read_json(path: Path) -> Any:
    return json.loads(path.read_text()) if path.is_file() else None


# --- the steps that run in this module's own subprocess --------------------------------------------------
def gpu_facts() -> dict[str, Any]:
    """The GPU and the software around it; {"cuda": False} without one."""
    import platform

    import torch
    import transformers

    facts: dict[str, Any] = {"cuda": torch.cuda.is_available(), "torch": torch.__version__,
                             "transformers": transformers.__version__, "python": platform.python_version(),
                             "cpu_count": os.cpu_count()}
    if not facts["cuda"]:
        return facts
    props = torch.cuda.get_device_properties(0)
    facts.update(gpu=torch.cuda.get_device_name(0), gpu_memory_bytes=int(props.total_memory),
                 cuda_runtime=torch.version.cuda)
    query = "name,driver_version,pcie.link.gen.max,pcie.link.gen.current,pcie.link.width.max,pcie.link.width.current"
    try:
        out = subprocess.run(["nvidia-smi", f"--query-gpu={query}", "--format=csv,noheader,nounits"],
                             capture_output=True, text=True, timeout=20, check=True).stdout.splitlines()[0]
        keys = ("smi_name", "driver", "pcie_gen_max", "pcie_gen_current", "pcie_width_max", "pcie_width_current")
        facts.update(dict(zip(keys, (v.strip() for v in out.split(",")), strict=True)))
    except (OSError, subprocess.SubprocessError, IndexError, ValueError) as error:
        facts["nvidia_smi_error"] = repr(error)
    return facts


def profile_name(facts: dict[str, Any]) -> str:
    """`<gpu>-pcie<gen>` from the GPU's name and its maximum PCIe generation: "NVIDIA H200" and 5 ->
    "h200-pcie5", "NVIDIA GeForce RTX 3090" and 4 -> "rtx3090-pcie4"; "x" for an unknown generation."""
    words = [w for w in re.split(r"[^a-z0-9]+", str(facts.get("gpu", "")).lower()) if w and w != "nvidia"]
    at = next((i for i, w in enumerate(words) if any(c.isdigit() for c in w)), None)
    if at is None:
        gpu = words[0] if words else "gpu"
    else:
        gpu = words[at - 1] + words[at] if words[at].isdigit() and at > 0 else words[at]
    gen = str(facts.get("pcie_gen_max", "")).strip()
    return f"{gpu}-pcie{gen if gen.isdigit() else 'x'}"


def junit_counts(path: Path) -> dict[str, int] | None:
    """Tests, failures, errors and skips of a pytest JUnit XML report (None when there is none)."""
    import xml.etree.ElementTree as ET

    if not path.is_file():
        return None
    root = ET.parse(path).getroot()
    suite = root if root.tag == "testsuite" else root.find("testsuite")
    return {k: int(suite.get(k, 0)) for k in ("tests", "failures", "errors", "skipped")}


def bitexact() -> dict[str, Any]:
    """realrun vs transformers on CUDA, lossless presets on the embedded models (see the module docstring)."""

    import torch

    from realrun.runner import greedy_generate
    from realrun.session import load_model, load_prompts, resolve_model_dir, run_streamed
    from realrun.streaming import load_streaming
    from sim.policies.presets import build_policy
    from traces.promptset import DEFAULT_PROMPTS
    from traces.recorder import tokenizer_of

    dev = torch.device("cuda")
    rows = []
    for name in BITEXACT_MODELS:
        folder = resolve_model_dir(name)
        prompts = load_prompts(DEFAULT_PROMPTS, tokenizer_of(folder))
        prompts = type(prompts)(prompts.token_ids[:2], prompts.name, prompts.sha256)
        plain = load_model(folder, dev)
        ref = greedy_generate(plain, prompts.token_ids, 8, dev, keep_logits=True)
        for preset, overrides in BITEXACT_PRESETS.items():
            started = time.perf_counter()
            streamed = load_streaming(folder, dev, "stored", name=name)  # the CLI's path, on the GPU
            try:
                result, gen = run_streamed(streamed, prompts, model_name=name,
                                           policy=build_policy(preset, overrides), memory_budget="50%", device=dev,
                                           store="ram", max_new_tokens=8, keep_logits=True)
            finally:
                streamed.checkpoint.close()
            diff = max(float((a - b).abs().max()) for a, b in zip(gen.logits, ref.logits, strict=True))
            rows.append({"model": name, "preset": preset, "overrides": overrides,
                         "tokens_equal": gen.generated == ref.generated,
                         "logits_bit_equal": all(torch.equal(a, b) for a, b in zip(gen.logits, ref.logits,
                                                                                    strict=True)),
                         "max_abs_logit_diff": diff, "gpu_stall_s": result["gpu_stall_s"],
                         "io": result["io"], "seconds": time.perf_counter() - started})
            print(json.dumps(rows[-1]), flush=True)
    exact = [r for r in rows if r["preset"] != "cpu-exec"]
    return {"rows": rows, "passed": all(r["logits_bit_equal"] and r["tokens_equal"] for r in exact)}


def bench_model(folder: Path, num_layers: int = 3) -> Path:
    """A random bf16 Qwen1.5-MoE-shaped checkpoint (`realrun.bench`'s shapes), generated on the GPU."""
    import torch
    from transformers import Qwen2MoeConfig, Qwen2MoeForCausalLM

    from realrun.bench import qwen_shaped_config

    if (folder / "config.json").is_file():
        return folder
    torch.manual_seed(0)
    with torch.device("cuda"):
        model = Qwen2MoeForCausalLM(Qwen2MoeConfig(**qwen_shaped_config(num_layers, dtype="bfloat16")))
    model = model.to(torch.bfloat16).eval()
    tmp = folder.with_name(folder.name + ".partial")
    shutil.rmtree(tmp, ignore_errors=True)
    model.save_pretrained(tmp, max_shard_size="1GB")
    os.replace(tmp, folder)
    return folder


def fullsize(scratch: Path, threads: int) -> dict[str, Any]:
    """Write the full-size checkpoint, then `fatesim realrun` each of FULLSIZE_POLICIES on it at 20%."""
    from realrun.checkpoint_gen import write_preset

    folder = scratch / "qwen1.5-moe-a2.7b-random"
    started = time.perf_counter()
    write_preset(folder, "qwen1.5-moe-a2.7b", seed=0)
    report: dict[str, Any] = {"checkpoint": str(folder), "generate_s": time.perf_counter() - started, "runs": []}
    for policy in FULLSIZE_POLICIES:
        started = time.perf_counter()
        proc = subprocess.run([sys.executable, *CLI, "realrun", "--model", str(folder), "--policy", policy,
                               "--memory-budget", "20%", "--device", "cuda", "--store", "ram",
                               "--max-new-tokens", "8", "--json", "--no-quant-optimize"], capture_output=True,
                              text=True, check=False)
        print(proc.stderr[-4000:], flush=True)
        run: dict[str, Any] = {"policy": policy, "exit": proc.returncode, "wall_s": time.perf_counter() - started}
        if proc.returncode == 0:
            metrics = json.loads(proc.stdout)
            run.update({k: metrics.get(k) for k in ("prefill_tokens_per_s", "decode_tokens_per_s", "hit_rate",
                                                    "gpu_stall_s", "memory_budget_bytes", "peak_device_bytes",
                                                    "io")})
        report["runs"].append(run)
    return report


def validation_merged(parts: list[dict[str, Any]], max_error: float = 0.05) -> dict[str, Any]:
    """One validation result from per-preset results: their rows, and one summary over all of them."""
    from calibration.validate import summarize

    rows = [row for part in parts for row in part["rows"]]
    merged = {k: v for k, v in parts[0].items() if k not in ("rows", "summary", "summary_with_profile_link")}
    merged.update(rows=rows, summary=summarize(rows, max_error),
                  summary_with_profile_link=summarize([r | r.get("with_profile_link", {}) for r in rows], max_error))
    return merged


# --- the driver ------------------------------------------------------------------------------------------
def run_check(out: Path, *, budget_s: float, only: tuple[str, ...], threads: int, scratch: Path | None,
              keep_scratch: bool = False) -> int:
    """All steps (or `only` those), see the module docstring; returns the exit status."""
    out.mkdir(parents=True, exist_ok=True)
    work = Path(tempfile.mkdtemp(prefix="fatesim-gpu-check-", dir=scratch))
    check = Check(out, budget_s, work, threads)
    check.log(f"gpu-check into {out} ({budget_s:.0f} s budget, steps: {', '.join(only)}, scratch {work})")
    started = time.monotonic()
    try:
        _steps(check, only)
    finally:
        check.facts["total_s"] = time.monotonic() - started
        check.write_summary()
        if not keep_scratch:
            shutil.rmtree(work, ignore_errors=True)
    bad = [r.name for r in check.results if r.status in ("failed", "timeout")]
    check.log(f"gpu-check done in {check.facts['total_s']:.0f} s: "
              + ("every step ok or skipped" if not bad else f"not ok: {', '.join(bad)}"))
    return 1 if bad else 0


def _steps(check: Check, only: tuple[str, ...]) -> None:
    facts = gpu_facts()
    check.facts["env"] = facts
    if "env" in only:
        check.log("env: " + json.dumps(facts))
        check.results.append(StepResult("env", "ok", 0.0, facts.get("gpu", "no CUDA GPU")))
    if "pytest-cuda" in only:
        report = check.scratch / "pytest-cuda.xml"
        check.run("pytest-cuda", [sys.executable, "-m", "pytest", "-m", "cuda", "-q", "-rs", "-p", "no:cacheprovider",
                                  f"--junitxml={report}", "tests/realrun", "tests/calibration"],
                  STEP_LIMIT_S["pytest-cuda"])
        check.facts["pytest_cuda"] = junit_counts(report)
    cuda = facts["cuda"]

    def needs_cuda(name: str) -> bool:
        if name in only and not cuda:
            check.skip(name, "torch sees no CUDA GPU")
        return name in only and cuda

    if needs_cuda("bitexact"):
        check.step("bitexact")
        check.facts["bitexact"] = read_json(check.out / ".bitexact.json")
        (check.out / ".bitexact.json").unlink(missing_ok=True)
    model = check.scratch / "bench-bf16-L3"
    if any(s in only for s in ("calibrate", "validate")) and cuda:
        check.step("bench-model", str(model))
    profile = check.out / f"{profile_name(facts)}.toml"
    if needs_cuda("calibrate"):
        if not (model / "config.json").is_file():
            check.skip("calibrate", "no bench model (bench-model failed)")
        else:
            quick = check.left_s() < FULL_CALIBRATION_S + VALIDATE_MIN_S * len(VALIDATE_PRESETS)
            plots = check.scratch / "calibration-plots"
            result = check.run("calibrate", [sys.executable, *CLI, "calibrate", "--device", "cuda", "--store", "ram",
                                             "--model", str(model), "--out", str(profile), "--plots", str(plots),
                                             "--threads", str(check.threads), *(["--quick"] if quick else [])],
                               STEP_LIMIT_S["calibrate"])
            result.detail += ", quick plan" if quick else ", full plan"
            if (plots / "points.json").is_file():
                shutil.copy(plots / "points.json", check.out / "calibration-points.json")
            check.facts["profile"] = profile.name if profile.is_file() else None
    if needs_cuda("validate"):
        if not profile.is_file() or not (model / "config.json").is_file():
            check.skip("validate", f"no profile {profile.name} (calibrate did not write it)")
        else:
            _validate(check, model, profile)
    if "fullsize" in only:
        why = None if cuda else "torch sees no CUDA GPU"
        if why is None and check.left_s() < FULLSIZE_MIN_S:
            why = f"{check.left_s():.0f} s left, it needs {FULLSIZE_MIN_S} s (run --only fullsize)"
        if why is not None:
            check.skip("fullsize", why)
        else:
            check.step("fullsize", limit_s=check.left_s())
            check.facts["fullsize"] = read_json(check.out / "fullsize.json")


def _validate(check: Check, model: Path, profile: Path) -> None:
    parts, started = [], time.monotonic()
    for preset in VALIDATE_PRESETS:
        if check.left_s() < VALIDATE_MIN_S:
            check.skip(f"validate {preset}", f"{check.left_s():.0f} s left")
            continue
        part = check.scratch / f"validate-{preset}.json"
        check.run(f"validate {preset}", [
            sys.executable, *CLI, "validate", "--profile", str(profile), "--model", str(model),
            "--presets", preset, "--budgets", VALIDATE_BUDGETS, "--device", "cuda", "--store", "ram",
            "--link", "observed", "--num-prompts", "2", "--max-new-tokens", "8", "--threads", str(check.threads),
            "--store-dir", str(check.scratch), "--out", str(part)], STEP_LIMIT_S["validate"])
        if check.results[-1].status == "failed" and part.is_file():
            check.results[-1].status = "ok"  # validate exits 1 when its own error target is missed: not a crash
            check.results[-1].detail += " (error above --max-error; see validation.json)"
        if part.is_file():
            parts.append(read_json(part))
    if parts:
        from calibration.validate import format_table

        merged = validation_merged(parts)
        write_json(check.out / "validation.json", merged)
        check.log(format_table(merged))
        check.facts["validation"] = {"summary": merged["summary"],
                                     "summary_with_profile_link": merged["summary_with_profile_link"],
                                     "seconds": time.monotonic() - started}


def _run_own_step(name: str, out: Path, scratch: Path, threads: int, args: list[str]) -> None:
    import torch

    torch.set_num_threads(threads)
    if name == "bitexact":
        write_json(out / ".bitexact.json", bitexact())
        if not read_json(out / ".bitexact.json")["passed"]:
            raise SystemExit("bitexact: a lossless preset differs from transformers (see the rows above)")
    elif name == "bench-model":
        bench_model(Path(args[0]))
    elif name == "fullsize":
        write_json(out / "fullsize.json", fullsize(scratch, threads))
    else:
        raise UserError(f"unknown step {name!r}")


def parse_only(text: str | None) -> tuple[str, ...]:
    if text is None:
        return STEPS
    steps = tuple(s.strip() for s in text.split(",") if s.strip())
    unknown = [s for s in steps if s not in STEPS]
    if not steps or unknown:
        raise UserError(f"--only takes a comma-separated list of {', '.join(STEPS)}; not {text!r}")
    return steps


def main(argv: list[str] | None = None, *, exit: Callable[[int], None] = sys.exit) -> None:
    parser = argparse.ArgumentParser(prog="python -m calibration.gpu_check", description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", type=Path, required=True, help="folder for the results (created)")
    parser.add_argument("--budget-s", type=float, default=480.0, help="overall time limit in seconds (default 480)")
    parser.add_argument("--only", default=None, help=f"comma-separated steps of {', '.join(STEPS)} (default: all)")
    parser.add_argument("--threads", type=int, default=8, help="torch CPU threads for realrun and calibration")
    parser.add_argument("--scratch", type=Path, default=None, help="folder for generated models and stores")
    parser.add_argument("--keep-scratch", action="store_true", help="keep the generated models and stores")
    parser.add_argument("--step", default=None, help=argparse.SUPPRESS)  # one step, in its own subprocess
    parser.add_argument("args", nargs="*", help=argparse.SUPPRESS)
    ns = parser.parse_args(argv)
    try:
        if ns.budget_s <= 0 or ns.threads < 1:
            raise UserError("--budget-s must be positive and --threads at least 1")
        if ns.out.exists() and not ns.out.is_dir():
            raise UserError(f"--out {ns.out} exists and is not a folder")
        if ns.scratch is not None and not ns.scratch.is_dir():
            raise UserError(f"--scratch {ns.scratch} is not a folder")
        if ns.step is not None:
            _run_own_step(ns.step, ns.out, ns.scratch, ns.threads, ns.args)
            return
        exit(run_check(ns.out, budget_s=ns.budget_s, only=parse_only(ns.only), threads=ns.threads,
                       scratch=ns.scratch, keep_scratch=ns.keep_scratch))
    except UserError as error:
        print(f"gpu-check: error: {error}", file=sys.stderr)
        exit(2)


if __name__ == "__main__":
    main()
