"""`fatesim validate`: the simulator against realrun, configuration by configuration.

For each (preset, budget) pair: realrun runs the model for real (CPU or CUDA, disk or RAM tier) and records
the routing trace of that very run; the simulator replays that trace with the same policy, the same
budget in bytes and the hardware profile under test. Both report the metrics of sim/metrics.py; we compare
prefill tokens/s, decode tokens/s and hit rate and give each the relative error (sim - real) / real.

Fairness between the two sides:
- realrun's controller is given the same profile as the simulator (it only matters for Fate's decode
  prefetch count), so both make the same decisions on the same routing;
- the budget is resolved once by realrun (its KV-cache reserve) and replayed as that exact byte count;
- realrun's disk store is built once per set of precisions and reused (`store_dir`), with HQQ's plain
  rounding (`optimize_quant=False`): quantisation quality changes the routing, which the trace records,
  not the timing;
- one untimed warm-up run precedes the measured ones (thread pools, the store file); realrun touches its
  slot memory when it allocates it, before the clock starts.

The link: every row also reports what realrun's slow tier really delivered in that run: the bytes of its
finished copies over their busy time (each copy's start and end events: CUDA events on a GPU, where an
asynchronous copy's host time would only be its enqueue; perf_counter on the CPU; `link_clock`), and that
busy time over what the profile's link predicts for the same copies (`link_time_factor`). With `link="profile"` (the default) the simulator uses the
profile's link as calibrated: the end-to-end check. With `link="observed"` it replays each run with the
link slowed (or sped up) by that run's factor: on a machine whose disk speed wanders (this VM's: 1.0-3.1
GB/s within minutes), that separates the simulator's modelling error from the hardware's drift between
calibration and run. Everything else stays as calibrated; the rows then also carry the end-to-end
numbers (`with_profile_link`, `summary_with_profile_link`), replayed from the same runs.

The summary pools the absolute relative errors of the three metrics over all configurations (median and
max) and reports them per metric too; `passed` is median <= max_error.
"""

from __future__ import annotations

import json
import os
import statistics
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from sim.hardware import LinkModel
from traces.errors import UserError
from traces.recorder import tokenizer_of

DEFAULT_PRESETS = ("lod", "lru", "fate", "speculate", "cpu-exec")
DEFAULT_BUDGETS = ("25%", "50%", "75%")
LINK_MODES = ("profile", "observed")
METRICS = ("prefill_tokens_per_s", "decode_tokens_per_s", "hit_rate")


def _split(text: str | None, default: tuple[str, ...], what: str) -> tuple[str, ...]:
    if text is None:
        return default
    items = tuple(s.strip() for s in text.split(",") if s.strip())
    if not items:
        raise UserError(f"--{what} is empty; give a comma-separated list")
    return items


def relative_error(simulated: float, measured: float) -> float:
    """(simulated - measured) / measured; 0 when both are 0, infinity when only the measurement is 0."""
    if measured == 0:
        return 0.0 if simulated == 0 else float("inf")
    return (simulated - measured) / measured


def _median_or_none(values: list[float | None]) -> float | None:
    present = [v for v in values if v is not None]
    return statistics.median(present) if present else None


def link_time_factor(io: dict[str, float], link: LinkModel) -> float | None:
    """realrun's I/O busy seconds over the profile link's seconds for the same copies (latency + bytes /
    bandwidth each); None when the run copied nothing."""
    if io["copies"] == 0 or io["busy_s"] <= 0:
        return None
    return io["busy_s"] / (io["copies"] * link.latency_s + io["bytes"] / link.bandwidth_bytes_per_s)


def validate_runs(*, profile: str, model: str, max_error: float = 0.05, budgets: str | None = None,
                  presets: str | None = None, store: str = "disk", device: str = "cpu",
                  prompts: str | None = None, max_new_tokens: int | None = None, num_prompts: int = 4,
                  store_dir: str | Path | None = None, warmup: bool = True, threads: int = 1,
                  link: str = "profile", repeats: int = 1,
                  progress: Callable[[str], None] | None = None) -> dict[str, Any]:
    """Run every (preset, budget) configuration under realrun and the simulator; the comparison as a dict.

    `model` is a model folder, a default model name, or "bench" (realrun's random Qwen-shaped model, see
    `calibration.calibrate.resolve_bench_alias`). Models without a tokenizer get seeded random token-id
    prompts unless `prompts` is given. `threads`: torch intra-op threads for realrun (default 1, as the
    calibration).
    """
    from calibration.microbench import torch_threads

    with torch_threads(threads):
        return _validate(profile=profile, model=model, max_error=max_error, budgets=budgets, presets=presets,
                         store=store, device=device, prompts=prompts, max_new_tokens=max_new_tokens,
                         num_prompts=num_prompts, store_dir=store_dir, warmup=warmup, link=link,
                         repeats=repeats, progress=progress)


def _validate(*, profile: str, model: str, max_error: float, budgets: str | None, presets: str | None,
              store: str, device: str, prompts: str | None, max_new_tokens: int | None, num_prompts: int,
              store_dir: str | Path | None, warmup: bool, link: str, repeats: int,
              progress: Callable[[str], None] | None) -> dict[str, Any]:
    from calibration.calibrate import resolve_bench_alias
    from sim.hardware import load_profile
    from sim.policies.presets import build_policy
    from sim.replay import replay

    if not 0 < max_error:
        raise UserError(f"--max-error must be a positive fraction, not {max_error}")
    if link not in LINK_MODES:
        raise UserError(f"--link must be one of {', '.join(LINK_MODES)}, not {link!r}")
    if repeats < 1:
        raise UserError(f"--repeats must be at least 1, not {repeats}")
    if max_new_tokens is not None and max_new_tokens < 2:
        raise UserError("--max-new-tokens must be at least 2 (one prefill token and a decode step)")
    preset_list = _split(presets, DEFAULT_PRESETS, "presets")
    budget_list = _split(budgets, DEFAULT_BUDGETS, "budgets")
    policies = {name: build_policy(name) for name in preset_list}  # UserError on unknown presets, up front
    hw = load_profile(profile)
    if hw.device_kind != device:
        raise UserError(f"profile {profile} describes a {hw.device_kind} device but --device is {device}; "
                        "validate a profile on the machine kind it was calibrated for")
    if num_prompts < 1:
        raise UserError(f"--num-prompts must be at least 1, not {num_prompts}")
    new_tokens = max_new_tokens or 16
    model_folder = _model_folder(resolve_bench_alias(model))
    work = tempfile.TemporaryDirectory(prefix="fatesim-validate-", dir=os.environ.get("FATESIM_STORE_DIR"))
    if prompts is None and tokenizer_of(model_folder) is None:
        source_prompts = random_token_prompts(model_folder, num_prompts, Path(work.name) / "random.jsonl")
    else:
        source_prompts = Path(prompts) if prompts else default_prompts()
    prompt_path = first_prompts(source_prompts, num_prompts, Path(work.name) / "prompts.jsonl")
    stores = Path(store_dir) if store_dir else Path(work.name)
    if not stores.is_dir():
        raise UserError(f"--store-dir {stores} is not a folder")
    rows: list[dict[str, Any]] = []
    try:
        def run_real(name: str, budget: str, trace_path: Path | None) -> dict[str, Any]:
            # realrun's own steps (as run_realrun), calling run_streamed for store reuse without HQQ's
            # optimiser: the model is streamed afresh each run because the engine takes its experts apart.
            from realrun.runner import storage_precisions
            from realrun.session import load_prompts, run_streamed
            from realrun.streaming import load_streaming

            prompt_set = load_prompts(prompt_path, tokenizer_of(model_folder))
            precisions = "-".join(storage_precisions(policies[name]))
            # streamed from the checkpoint in its own dtype (as before: the profiles were fitted on it)
            streamed = load_streaming(model_folder, _torch_device(device), "stored", name=model)
            try:
                result, _ = run_streamed(
                    streamed, prompt_set, model_name=model,
                    policy=policies[name], memory_budget=budget, device=_torch_device(device),
                    store=store_of(name), max_new_tokens=new_tokens,
                    store_path=stores / f"experts-{store_of(name)}-{precisions}.bin", profile=hw,
                    optimize_quant=False, trace_out=trace_path)
            finally:
                streamed.checkpoint.close()
            return result

        def store_of(name: str) -> str:
            # realrun computes missed experts on the CPU from their host-RAM copy: cpu-exec needs the RAM
            # tier. It never loads a miss, so the tier only holds what the CPU reads.
            return "ram" if policies[name].miss == "cpu" else store

        if warmup:
            run_real(preset_list[0], budget_list[-1], None)
        def one_run(name: str, budget: str, trace_path: Path) -> dict[str, Any]:
            """realrun once, then the simulator on that run's trace: the metrics of both sides."""
            started = time.perf_counter()
            real = run_real(name, budget, trace_path)
            wall_s = time.perf_counter() - started
            io = real["io"]
            factor = link_time_factor(io, hw.link)
            run_hw = hw.with_link_slowed(factor) if link == "observed" and factor else hw
            budget_bytes = int(real["memory_budget_bytes"])
            sim = replay(trace_path, policy=policies[name], hw=run_hw, memory_budget=budget_bytes)
            # the end-to-end numbers too, from the same run: no second realrun
            plain = sim if run_hw is hw else replay(trace_path, policy=policies[name], hw=hw,
                                                    memory_budget=budget_bytes)
            return {"real": real, "sim": sim, "plain": plain, "wall_s": wall_s, "factor": factor, "clock": io["clock"],
                    "observed": io["bytes"] / io["busy_s"] if factor else None,
                    "simulated_link": run_hw.link.bandwidth_bytes_per_s}

        for name in preset_list:
            for budget in budget_list:
                trace_path = Path(work.name) / f"{name}-{budget.replace('%', 'pct')}.safetensors"
                runs = [one_run(name, budget, trace_path) for _ in range(repeats)]
                row: dict[str, Any] = {
                    "preset": name, "budget": budget, "store": store_of(name),
                    "memory_budget_bytes": int(runs[0]["real"]["memory_budget_bytes"]), "repeats": repeats,
                    "realrun_wall_s": sum(r["wall_s"] for r in runs),
                    "link_time_factor": _median_or_none([r["factor"] for r in runs]),
                    "runs_link_time_factor": [r["factor"] for r in runs],
                    "observed_link_bytes_per_s": _median_or_none([r["observed"] for r in runs]),
                    "link_clock": runs[0]["clock"],
                    "simulated_link_bytes_per_s": statistics.median(r["simulated_link"] for r in runs)}
                for key in METRICS:  # medians over the repeats, on each side, then the error of the medians
                    measured = statistics.median(float(r["real"][key]) for r in runs)
                    simulated = statistics.median(float(r["sim"][key]) for r in runs)
                    row[key] = {"measured": measured, "simulated": simulated,
                                "relative_error": relative_error(simulated, measured)}
                    if repeats > 1:
                        row[key]["runs_measured"] = [float(r["real"][key]) for r in runs]
                        row[key]["runs_simulated"] = [float(r["sim"][key]) for r in runs]
                row["measured_stall_s"] = statistics.median(float(r["real"]["gpu_stall_s"]) for r in runs)
                row["simulated_stall_s"] = statistics.median(float(r["sim"]["gpu_stall_s"]) for r in runs)
                if link != "profile":
                    row["with_profile_link"] = {}
                    for key in METRICS:
                        simulated = statistics.median(float(r["plain"][key]) for r in runs)
                        row["with_profile_link"][key] = {
                            "simulated": simulated, "relative_error": relative_error(simulated, row[key]["measured"])}
                rows.append(row)
                if progress:
                    progress(f"{name} {budget}")
    finally:
        work.cleanup()
    return {"profile": hw.name, "profile_provenance": hw.provenance, "model": model, "device": device,
            "link_clock": rows[0]["link_clock"] if rows else None,
            "store": store, "link": link, "prompts": str(source_prompts), "num_prompts": num_prompts,
            "max_new_tokens": new_tokens, "repeats": repeats,
            "load_average": list(os.getloadavg()), "rows": rows, "summary": summarize(rows, max_error),
            "summary_with_profile_link": summarize([r | r.get("with_profile_link", {}) for r in rows], max_error)}


def summarize(rows: list[dict[str, Any]], max_error: float) -> dict[str, Any]:
    """Median and max absolute relative error, pooled over METRICS and per metric; `passed` vs max_error."""
    pooled = [abs(r[k]["relative_error"]) for r in rows for k in METRICS]
    if not pooled:
        raise UserError("no configurations were validated")
    per_metric = {k: {"median_abs_error": statistics.median(abs(r[k]["relative_error"]) for r in rows),
                      "max_abs_error": max(abs(r[k]["relative_error"]) for r in rows)} for k in METRICS}
    median = statistics.median(pooled)
    return {"configurations": len(rows), "median_abs_error": median, "max_abs_error": max(pooled),
            "per_metric": per_metric, "max_error": max_error, "passed": median <= max_error}


def _model_folder(model: str) -> Path:
    from realrun.session import resolve_model_dir

    return Path(resolve_model_dir(model))


def random_token_prompts(folder: Path, count: int, target: Path, tokens: int = 32, seed: int = 0) -> Path:
    """Seeded random token-id prompts (realrun.bench's) for a model without a tokenizer, as JSON lines."""
    from realrun.bench import random_prompts
    from sim.modelspec import ModelSpec

    vocab = ModelSpec.from_config_file(folder).vocab_size
    lines = [json.dumps({"token_ids": ids}) for ids in random_prompts(count, tokens, vocab, seed).token_ids]
    target.write_text("\n".join(lines) + "\n", encoding="utf-8")
    return target




def _torch_device(device: str) -> Any:
    import torch

    if device == "cuda" and not torch.cuda.is_available():
        raise UserError("--device cuda but torch sees no CUDA GPU; use --device cpu")
    return torch.device(device)


def default_prompts() -> Path:
    """The repository's default prompt set (`traces.promptset.DEFAULT_PROMPTS`)."""
    from traces.promptset import DEFAULT_PROMPTS

    return DEFAULT_PROMPTS


def first_prompts(source: Path, count: int, target: Path) -> Path:
    """Copy the first `count` prompts (non-blank lines) of a JSON-lines prompt file to `target`."""
    if not source.is_file():
        raise UserError(f"no prompt file at {source}")
    lines = [line for line in source.read_text(encoding="utf-8").splitlines() if line.strip()][:count]
    if not lines:
        raise UserError(f"prompt file {source} holds no prompts")
    target.write_text("\n".join(lines) + "\n", encoding="utf-8")
    return target


def format_table(result: dict[str, Any]) -> str:
    """The comparison as a plain-text table, one configuration per line, then the summary."""
    head = (f"{'preset':<10} {'budget':>6} | {'prefill tok/s real':>17} {'sim':>8} {'err':>7} | "
            f"{'decode tok/s real':>17} {'sim':>8} {'err':>7} | {'hit real':>8} {'sim':>6} {'err':>7} | "
            f"{'link GB/s real':>14} {'sim':>5}")
    lines = [f"profile {result['profile']} · model {result['model']} · {result['device']}/{result['store']} · "
             f"{result['max_new_tokens']} new tokens per prompt · simulated link: {result['link']}"
             + (f" · medians of {result['repeats']} runs" if result.get("repeats", 1) > 1 else ""),
             head, "-" * len(head)]
    for r in result["rows"]:
        cells = []
        for key, fmt in (("prefill_tokens_per_s", "{:17.2f} {:8.2f}"), ("decode_tokens_per_s", "{:17.3f} {:8.3f}"),
                         ("hit_rate", "{:8.3f} {:6.3f}")):
            m = r[key]
            cells.append(fmt.format(m["measured"], m["simulated"]) + f" {m['relative_error']:+7.1%}")
        observed = r["observed_link_bytes_per_s"]
        cells.append(("–" if observed is None else f"{observed / 1e9:.2f}").rjust(14)
                     + f" {r['simulated_link_bytes_per_s'] / 1e9:5.2f}")
        lines.append(f"{r['preset']:<10} {r['budget']:>6} | " + " | ".join(cells))
    s = result["summary"]
    lines.append(f"median |error| {s['median_abs_error']:.1%}, max |error| {s['max_abs_error']:.1%} over "
                 f"{s['configurations']} configurations x 3 metrics; "
                 + ", ".join(f"{k.removesuffix('_tokens_per_s')} median {v['median_abs_error']:.1%}"
                             for k, v in s["per_metric"].items())
                 + f" -> {'PASS' if s['passed'] else 'FAIL'} (--max-error {s['max_error']:.0%})")
    if result["link"] != "profile":
        p = result["summary_with_profile_link"]
        lines.append(f"with the profile's link instead (end to end): median |error| {p['median_abs_error']:.1%}, "
                     f"max |error| {p['max_abs_error']:.1%}; "
                     + ", ".join(f"{k.removesuffix('_tokens_per_s')} median {v['median_abs_error']:.1%}"
                                 for k, v in p["per_metric"].items()))
    return "\n".join(lines)


def write_json(result: dict[str, Any], path: str | Path) -> None:
    """Write the comparison as JSON, atomically."""
    from traces.atomic import atomic_output

    with atomic_output(path) as tmp:
        tmp.write_text(json.dumps(result, indent=2))
