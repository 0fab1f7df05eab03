"""`fatesim calibrate`: measure this machine, fit the profile, write it (and optionally plots).

One library function, `calibrate`, does the whole job: microbenchmarks (`calibration.microbench`), fits
(`calibration.fit`), the profile TOML through `sim.hardware.write_profile` (atomic), a JSON file of the raw
points beside the plots. The written profile is read back with `load_profile` before we return, so a
profile that the simulator cannot load is never reported as a success.
"""

from __future__ import annotations

import json
import os
import platform
import shlex
from collections.abc import Callable
from dataclasses import asdict
from pathlib import Path

import numpy as np
import scipy
import torch

from calibration.fit import Calibration, build_profile, provenance_line
from calibration.microbench import BenchPlan, count_steps, default_plan, run_all, torch_threads
from sim.hardware import load_profile, write_profile
from sim.modelspec import get_model_spec
from traces.atomic import atomic_output
from traces.errors import UserError


def host_memory_bytes() -> int:
    """Physical RAM of this host, in bytes."""
    return int(os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES"))


def device_memory_bytes(device: str) -> int:
    """Fast memory of the compute device: GPU memory on CUDA, host RAM on the CPU."""
    if device == "cuda":
        return int(torch.cuda.get_device_properties(0).total_memory)
    return host_memory_bytes()


def versions() -> dict[str, str]:
    """Software that shapes the measured numbers."""
    found = {"python": platform.python_version(), "torch": torch.__version__, "numpy": np.__version__,
             "scipy": scipy.__version__, "threads": str(torch.get_num_threads())}
    if torch.cuda.is_available():
        found["cuda"] = str(torch.version.cuda)
    return found


def describe_machine(device: str, store: str, plan: BenchPlan, model: str) -> str:
    """One line about what was measured: CPU or GPU, store, load average, shapes."""
    if device == "cuda":
        what = f"{torch.cuda.get_device_name(0)} GPU, experts pinned in host RAM"
    else:
        what = f"{platform.processor() or platform.machine()} CPU x{os.cpu_count()}, experts on " + (
            "disk (O_DIRECT)" if store == "disk" else "host RAM")
    load = os.getloadavg()[0] if hasattr(os, "getloadavg") else float("nan")
    return (f"{what}; compute in {str(plan.compute_dtype).removeprefix('torch.')}; shapes of {model}; "
            f"1-min load average {load:.2f} while measuring")


BENCH_LAYERS = 3
"""Decoder layers of realrun's benchmark model used by `--model bench` (realrun.bench's default)."""


def resolve_bench_alias(model: str) -> str:
    """"bench" -> the folder of realrun's random Qwen-shaped benchmark model (generated once, cached)."""
    if model != "bench":
        return model
    from realrun.bench import DEFAULT_CACHE, generate_model

    return str(generate_model(DEFAULT_CACHE / f"qwen-moe-shapes-L{BENCH_LAYERS}", BENCH_LAYERS))


def canonical_command(*, device: str, store: str, out: str | Path, plots_dir: str | Path | None, quick: bool,
                      model: str, compute_dtype: str | None, scratch_dir: str | Path | None,
                      threads: int) -> str:
    """The `fatesim calibrate` command line that reproduces a run with these arguments."""
    words = ["fatesim", "calibrate", "--device", device, "--store", store, "--out", str(out)]
    if plots_dir is not None:
        words += ["--plots", str(plots_dir)]
    if quick:
        words.append("--quick")
    if model != "qwen1.5-moe-a2.7b":
        words += ["--model", model]
    if compute_dtype is not None:
        words += ["--dtype", compute_dtype]
    if scratch_dir is not None:
        words += ["--scratch", str(scratch_dir)]
    if threads != 1:
        words += ["--threads", str(threads)]
    return shlex.join(words)


def calibrate(*, device: str, store: str, out: str | Path, plots_dir: str | Path | None = None,
              quick: bool = False, model: str = "qwen1.5-moe-a2.7b", compute_dtype: str | None = None,
              scratch_dir: str | Path | None = None, name: str | None = None, command: str | None = None,
              threads: int = 1,
              progress_factory: Callable[[int], Callable[[str], None]] | None = None) -> Calibration:
    """Measure, fit and write a hardware profile to `out`; return the calibration.

    `compute_dtype` defaults to the model's own dtype, which is what realrun computes in (it loads
    models with `dtype="auto"`); on a CPU without AMX, bf16 matmuls are several times slower than float32.
    `threads` sets torch's intra-op threads for the run (default 1, see `microbench.torch_threads`).
    `model` may be "bench" (realrun's Qwen-shaped benchmark model, see `resolve_bench_alias`).
    `progress_factory(total)` returns a callback invoked once per measured point.
    """
    from realrun.quant import TORCH_DTYPES

    out = Path(out)
    if out.suffix != ".toml":
        raise UserError(f"--out {out} must end in .toml")
    if not out.parent.is_dir() and str(out.parent):
        raise UserError(f"cannot write {out}: folder {out.parent} does not exist")
    if compute_dtype is not None and compute_dtype not in TORCH_DTYPES:
        raise UserError(f"--dtype must be one of {', '.join(TORCH_DTYPES)}, not {compute_dtype!r}")
    if scratch_dir is not None and not Path(scratch_dir).is_dir():
        raise UserError(f"--scratch {scratch_dir} is not a folder")
    if threads < 1:
        raise UserError(f"--threads must be >= 1, not {threads}")
    spec = get_model_spec(resolve_bench_alias(model))
    dtype_name = compute_dtype or spec.dtype  # realrun loads models with dtype="auto": their own dtype
    plan = default_plan(device, store, quick=quick, compute_dtype=TORCH_DTYPES[dtype_name],
                        scratch_dir=Path(scratch_dir) if scratch_dir else None)

    progress = progress_factory(count_steps(plan, spec.num_experts)) if progress_factory else (lambda _: None)
    with torch_threads(threads):
        points = run_all(plan, spec, progress)
        measured_versions = versions()
    command = command or canonical_command(device=device, store=store, out=out, plots_dir=plots_dir, quick=quick,
                                           model=model, compute_dtype=compute_dtype, scratch_dir=scratch_dir,
                                           threads=threads)
    calibration = build_profile(
        points,
        name=name or out.stem,
        device_kind=device,
        memory_bytes=device_memory_bytes(device),
        copy_engines=1,  # realrun moves experts with one I/O thread (disk) or one copy stream (CUDA)
        description=describe_machine(device, store, plan, model) + ("; quick calibration" if quick else ""),
        provenance=provenance_line(command, measured_versions),
    )
    write_profile(calibration.profile, out)
    load_profile(out)  # the simulator must be able to read what we wrote
    if plots_dir is not None:
        from calibration.plots import plot_calibration

        folder = Path(plots_dir)
        folder.mkdir(parents=True, exist_ok=True)
        plot_calibration(calibration, folder)
        with atomic_output(folder / "points.json") as tmp:
            tmp.write_text(json.dumps([asdict(p) for p in points], indent=1))
    return calibration
