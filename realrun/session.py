"""`run_realrun`: the library function behind `fatesim realrun` (and what calibration's validation calls).

One call: resolve and load the model, tokenize the prompts, pick the policy, size the budget, build (or
reuse) the slow tier, hand the model to an `OffloadEngine`, generate greedily with a progress bar, and
return the metrics JSON of `fatesim replay` plus `generated`; optionally write the Chrome timeline and the
routing trace of that very run.

The controller needs a hardware profile only for Fate's decode prefetch count (layer time / INT4 transfer
time). Unless one is given, realrun measures this machine at start-up in well under a second: the slow
tier's read bandwidth on real records and the time of one real expert at 1 and 64 tokens; the profile name
in the JSON says "realrun-measured" and its provenance says how.
"""

from __future__ import annotations

import os
import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from realrun.engine import OffloadEngine, RouteRecord, moe_blocks, spec_of
from realrun.quant import ExpertLayout, raw_views
from realrun.runner import (
    Generation,
    build_store,
    expert_budget,
    greedy_generate,
    popularity_counts,
    storage_precisions,
)
from realrun.store import SlowStore, aligned_buffer
from realrun.streaming import StreamedModel, load_streaming
from sim.budget import host_memory_bytes, resolve_budget
from sim.costs import CostModel
from sim.hardware import HardwareProfile, load_profile, profile_from_dict
from sim.metrics import cache_warnings, compute_metrics, run_notes
from sim.modelspec import ModelSpec
from sim.policies.allocation import allocate
from sim.policies.controller import OffloadController
from sim.policies.prefetch import decode_prefetch_count
from sim.policies.presets import PolicyConfig, build_policy
from traces.errors import UserError
from traces.recorder import DTYPE_CHOICES, tokenizer_of

DEFAULT_MAX_NEW_TOKENS = 32
STORE_DIR = Path(os.environ.get("FATESIM_CACHE", Path.home() / ".cache" / "fatesim")) / "stores"
"""Where `fatesim realrun` keeps disk stores between runs ($FATESIM_CACHE/stores)."""


@dataclass(frozen=True)
class Prompts:
    """Tokenized prompts and where they came from."""

    token_ids: list[list[int]]
    name: str
    sha256: str


def load_prompts(path: str | os.PathLike[str], tokenizer: Any) -> Prompts:
    """Tokenized prompts of a prompt file (`traces.promptset.prompt_token_ids`: text, or JSON lines with
    "token_ids" for a model without a tokenizer), with the file's identity."""
    from traces.promptset import prompt_token_ids, prompts_identity

    identity = prompts_identity(Path(path))
    return Prompts(prompt_token_ids(Path(path), tokenizer), identity["name"], identity["sha256"])


def resolve_model_dir(name_or_path: str) -> Path:
    """A model folder: an embedded default model name or a local Hugging Face folder (`traces.modelzoo`)."""
    from traces.modelzoo import resolve_model

    return resolve_model(name_or_path)


def load_model(folder: Path, device: torch.device, dtype: torch.dtype | str = "auto") -> nn.Module:
    """The model in a HF folder, in eval mode on `device`, with transformers' eager experts loop; `dtype`
    "auto" keeps the stored dtype."""
    from transformers import AutoModelForCausalLM
    from transformers.utils import logging as hf_logging

    if not (folder / "config.json").exists():
        raise UserError(f"{folder} has no config.json; is it a Hugging Face model folder?")
    hf_logging.disable_progress_bar()  # our own tqdm bar reports progress
    model = AutoModelForCausalLM.from_pretrained(folder, dtype=dtype, experts_implementation="eager")
    return model.to(device).eval()


def measure_profile(spec: ModelSpec, store: SlowStore, layouts: dict[str, ExpertLayout],
                    device: torch.device, compute_dtype: torch.dtype | None = None) -> HardwareProfile:
    """A profile of this machine from real records and a real expert (see the module docstring), the expert
    timed in `compute_dtype` (the run's `--dtype`; None: the records' own), as the run computes it."""
    precision = max(layouts, key=lambda p: layouts[p].nbytes)
    layout = layouts[precision]
    buf = aligned_buffer(store.padded_bytes(precision))
    reads = min(4, spec.num_moe_layers * spec.num_experts)
    start = time.perf_counter()
    for i in range(reads):
        store.read_into(i % spec.num_moe_layers, i // spec.num_moe_layers, precision, buf)
    read_s = (time.perf_counter() - start) / reads
    link_bw = layout.nbytes / read_s
    # one expert at 1 token (weight-read bound) and at 64 tokens (FLOP bound), from real weights
    if "bf16" in layouts:
        record = aligned_buffer(store.padded_bytes("bf16"))
        store.read_into(0, 0, "bf16", record)
        gate_up, down = raw_views(record, layouts["bf16"])
    else:
        dtype = layout.dtype
        gate_up = torch.randn(2 * spec.expert_intermediate_size, spec.hidden_size, dtype=dtype)
        down = torch.randn(spec.hidden_size, spec.expert_intermediate_size, dtype=dtype)
    gate_up, down = gate_up.to(device, compute_dtype), down.to(device, compute_dtype)

    def expert_s(tokens: int) -> float:
        x = torch.randn(tokens, spec.hidden_size, dtype=gate_up.dtype, device=device)
        best = float("inf")
        for _ in range(3):
            if device.type == "cuda":
                torch.cuda.synchronize(device)
            t0 = time.perf_counter()
            g, u = torch.nn.functional.linear(x, gate_up).chunk(2, dim=-1)
            torch.nn.functional.linear(torch.nn.functional.silu(g) * u, down)
            if device.type == "cuda":
                torch.cuda.synchronize(device)
            best = min(best, time.perf_counter() - t0)
        return best

    weight_bytes = spec.expert_params * spec.weight_bytes
    mem_bw = weight_bytes / expert_s(1)
    flops = spec.expert_flops(64) / expert_s(64)
    data = {
        "name": "realrun-measured",
        "description": f"{device.type} device, {type(store).__name__} slow tier, measured at start-up",
        "provenance": f"measured by realrun at {time.strftime('%Y-%m-%dT%H:%M:%SZ', time.gmtime())}: "
                      f"{reads} {precision} record reads, one expert at 1 and 64 tokens",
        "device": {"kind": device.type, "memory_bytes": 1},
        "link": {"bandwidth_bytes_per_s": link_bw, "latency_s": 0.0, "copy_engines": 1},
        "gpu": {"matmul_flops_per_s": flops, "memory_bytes_per_s": mem_bw, "kernel_launch_s": 0.0,
                "layer_overhead_s": 0.0},
        "dequant": {"int8_bytes_per_s": mem_bw, "int4_bytes_per_s": mem_bw, "int2_bytes_per_s": mem_bw},
        "cpu": {"matmul_flops_per_s": flops, "memory_bytes_per_s": mem_bw, "predictor_latency_s": 0.0},
    }
    return profile_from_dict(data, source="realrun start-up measurement")


def build_trace(routes: list[list[RouteRecord]], gen: Generation, prompts: Prompts, spec: ModelSpec,
                model: nn.Module, model_name: str, policy: PolicyConfig) -> Any:
    """The routing trace of this very run (trace format v1), with router and look-ahead logits."""
    from traces.format import Trace, TraceModelConfig, utc_now_iso

    token_ids, seq_ids, positions, is_prefill = [], [], [], []
    step = 0
    for seq, (prompt, new) in enumerate(zip(prompts.token_ids, gen.generated, strict=True)):
        fed = list(prompt) + list(new[:-1])  # every token that went through the model
        token_ids += fed
        seq_ids += [seq] * len(fed)
        positions += list(range(len(fed)))
        is_prefill += [1] * len(prompt) + [0] * (len(fed) - len(prompt))
        step += len(new)
    num_layers = spec.num_moe_layers
    per_step = [(np.stack([r.topk_ids for r in step_routes], axis=1),        # [N, L, k]
                 np.stack([r.topk_weights for r in step_routes], axis=1),
                 np.stack([r.router_logits for r in step_routes], axis=1),    # [N, L, E]
                 np.stack([r.lookahead_logits for r in step_routes], axis=2))  # [D, N, L, E]
                for step_routes in routes]
    if any(p[0].shape[1] != num_layers for p in per_step):
        raise RuntimeError("a forward step did not route every MoE layer once")
    mc = TraceModelConfig(
        architecture=spec.model_type, num_layers=spec.num_layers, moe_layer_indices=tuple(spec.moe_layer_indices),
        num_experts=spec.num_experts, top_k=spec.top_k, num_shared_experts=spec.num_shared_experts,
        hidden_size=spec.hidden_size, expert_intermediate_size=spec.expert_intermediate_size,
        shared_expert_intermediate_size=spec.shared_expert_intermediate_size, dtype=spec.dtype)
    return Trace(
        model=model_name, model_config=mc,
        source={"kind": "recorded", "recorder": "fatesim realrun", "policy": policy.name,
                "note": "routing of an offloaded run; lossy policies (int4/int2, speculation) change it"},
        prompts={"name": prompts.name, "sha256": prompts.sha256}, created=utc_now_iso(),
        token_ids=np.asarray(token_ids, dtype=np.int32), seq_ids=np.asarray(seq_ids, dtype=np.int32),
        positions=np.asarray(positions, dtype=np.int32), is_prefill=np.asarray(is_prefill, dtype=np.uint8),
        topk_ids=np.concatenate([p[0] for p in per_step]).astype(np.int16),
        topk_weights=np.concatenate([p[1] for p in per_step]).astype(np.float16),
        router_logits=np.concatenate([p[2] for p in per_step]).astype(np.float16),
        lookahead_logits=np.concatenate([p[3] for p in per_step], axis=1).astype(np.float16),
        gate_inputs=None, hf_config=model.config.to_dict(),
    )


def device_memory_bytes(device: torch.device) -> int:
    """Fast memory of the device realrun computes on: the GPU's memory, or host RAM on a CPU."""
    if device.type == "cuda":
        return int(torch.cuda.get_device_properties(device).total_memory)
    return host_memory_bytes()


def check_slots(policy: PolicyConfig, spec: ModelSpec, experts_budget: int) -> None:
    """UserError, before any weight is loaded, when the budget cannot give every layer top-k slots (the
    allocation policy's own rule, applied to the slot size the controller will use)."""
    slot_bytes = max(spec.expert_bytes(p) for p in storage_precisions(policy))
    allocate("uniform", total_slots=experts_budget // slot_bytes, num_layers=spec.num_moe_layers,
             num_experts=spec.num_experts, top_k=spec.top_k)


def run_offloaded(model: nn.Module, prompts: Prompts, *, model_name: str, policy: PolicyConfig,
                  memory_budget: str | int, device: torch.device, store: str = "disk",
                  max_new_tokens: int = DEFAULT_MAX_NEW_TOKENS, store_path: Path | None = None,
                  store_dir: Path | None = None,
                  profile: str | HardwareProfile | None = None, optimize_quant: bool = True,
                  timeline: Path | None = None, trace_out: Path | None = None, keep_logits: bool = False,
                  progress: Callable[[int], None] | None = None,
                  engine_hook: Callable[[OffloadEngine], None] | None = None) -> tuple[dict[str, Any], Generation]:
    """Run an already loaded (in-memory) model offloaded; returns (metrics JSON with `generated`, the Generation).

    The model's expert weights are packed into the slow tier and then dropped from the model. The CLI
    streams instead (`run_streamed`); this path serves tests and callers that hold a model already.
    `engine_hook(engine)` runs once the engine exists (tests inject failures through it).
    """
    spec = spec_of(model, model_name)
    blocks = moe_blocks(model)
    total, experts_budget = budgets(memory_budget, spec, _kv_tokens(prompts, max_new_tokens), device)
    popularity = None
    if policy.allocation == "popularity":
        popularity = popularity_counts(model, prompts.token_ids, device, spec.num_moe_layers, spec.num_experts)
    with torch.inference_mode():  # untimed warm-up (kernels, allocator, thread pool) on the plain path
        model(input_ids=torch.tensor([prompts.token_ids[0][:8]], device=device))
    tmp = None
    if store == "disk" and store_path is None and store_dir is None:
        tmp = tempfile.TemporaryDirectory(prefix="realrun-")
        store_path = Path(tmp.name) / "experts.bin"
    try:
        slow, layouts = build_store(spec, blocks, storage_precisions(policy), store, device, store_path=store_path,
                                    store_dir=store_dir, optimize=optimize_quant)
        return _serve(model, spec, prompts, slow, layouts, model_name=model_name, policy=policy, total=total,
                      experts_budget=experts_budget, popularity=popularity, device=device,
                      max_new_tokens=max_new_tokens, profile=profile, timeline=timeline, trace_out=trace_out,
                      keep_logits=keep_logits, progress=progress, engine_hook=engine_hook)
    finally:
        if tmp is not None:
            tmp.cleanup()


def run_streamed(streamed: StreamedModel, prompts: Prompts, *, model_name: str, policy: PolicyConfig,
                 memory_budget: str | int, device: torch.device, store: str = "disk",
                 max_new_tokens: int = DEFAULT_MAX_NEW_TOKENS, store_path: Path | None = None,
                 store_dir: Path | None = None, profile: str | HardwareProfile | None = None,
                 optimize_quant: bool = True, timeline: Path | None = None, trace_out: Path | None = None,
                 keep_logits: bool = False, progress: Callable[[int], None] | None = None,
                 engine_hook: Callable[[OffloadEngine], None] | None = None) -> tuple[dict[str, Any], Generation]:
    """Run a model built by `realrun.streaming.load_streaming`: its experts go from the checkpoint straight
    into the slow tier (`realrun.ckptstore`; bf16 is read from the checkpoint files themselves on the disk
    tier, quantised copies from a store file kept in `store_dir` or at `store_path`). The warm-up forward
    and popularity prefills run their experts straight from the slow tier (`StoreExperts`)."""
    from realrun.ckptstore import build_checkpoint_store
    from realrun.experts import StoreExperts

    spec, model = streamed.spec, streamed.model
    total, experts_budget = budgets(memory_budget, spec, _kv_tokens(prompts, max_new_tokens), device)
    tmp = None
    if store == "disk" and store_path is None and store_dir is None:
        tmp = tempfile.TemporaryDirectory(prefix="realrun-")
        store_dir = Path(tmp.name)
    try:
        slow, layouts = build_checkpoint_store(streamed.checkpoint, spec, storage_precisions(policy), store, device,
                                               store_path=store_path, store_dir=store_dir, optimize=optimize_quant)
        try:
            StoreExperts(slow, layouts, device).install(model)
            popularity = None
            if policy.allocation == "popularity":
                popularity = popularity_counts(model, prompts.token_ids, device, spec.num_moe_layers,
                                               spec.num_experts)
            with torch.inference_mode():  # untimed warm-up, as run_offloaded's
                model(input_ids=torch.tensor([prompts.token_ids[0][:8]], device=device))
        except BaseException:
            slow.close()
            raise
        return _serve(model, spec, prompts, slow, layouts, model_name=model_name, policy=policy, total=total,
                      experts_budget=experts_budget, popularity=popularity, device=device,
                      max_new_tokens=max_new_tokens, profile=profile, timeline=timeline, trace_out=trace_out,
                      keep_logits=keep_logits, progress=progress, engine_hook=engine_hook)
    finally:
        if tmp is not None:
            tmp.cleanup()


def _kv_tokens(prompts: Prompts, max_new_tokens: int) -> int:
    """The longest context of the run: sequences run one at a time, so one sequence's KV cache is resident."""
    return max(len(p) for p in prompts.token_ids) + max_new_tokens


def budgets(memory_budget: str | int, spec: ModelSpec, kv_tokens: int, device: torch.device) -> tuple[int, int]:
    """(total budget bytes, expert budget bytes) of `--memory-budget` for a KV cache of `kv_tokens` tokens
    (`sim.budget.resolve_budget`: at most the device's memory)."""
    total = resolve_budget(memory_budget, spec, kv_tokens=kv_tokens, device_memory_bytes=device_memory_bytes(device),
                           device=f"this {device.type} device").total_bytes
    return total, expert_budget(total, spec, kv_tokens)


def _serve(model: nn.Module, spec: ModelSpec, prompts: Prompts, slow: SlowStore, layouts: dict[str, ExpertLayout], *,
           model_name: str, policy: PolicyConfig, total: int, experts_budget: int, popularity: np.ndarray | None,
           device: torch.device, max_new_tokens: int, profile: str | HardwareProfile | None,
           timeline: Path | None, trace_out: Path | None, keep_logits: bool,
           progress: Callable[[int], None] | None,
           engine_hook: Callable[[OffloadEngine], None] | None) -> tuple[dict[str, Any], Generation]:
    """The timed, offloaded run on a built slow tier (closed on return), and its metrics JSON."""
    try:
        hw = (profile if isinstance(profile, HardwareProfile)
              else load_profile(profile) if profile
              else measure_profile(spec, slow, layouts, device, model.get_input_embeddings().weight.dtype))
        ctl = OffloadController(spec, policy, experts_budget, popularity=popularity,
                                decode_prefetch_count=decode_prefetch_count(CostModel(spec, hw)))
        with OffloadEngine(model, spec, ctl, slow, layouts, device, record_routes=trace_out is not None,
                           lookahead=policy.lookahead) as engine:
            if engine_hook is not None:
                engine_hook(engine)
            run_start = time.perf_counter()
            gen = greedy_generate(model, prompts.token_ids, max_new_tokens, device,
                                  on_forward=engine.start_forward, keep_logits=keep_logits, progress=progress)
            run_end = time.perf_counter()
    finally:
        slow.close()
    trace = build_trace(engine.routes, gen, prompts, spec, model, model_name, policy) if trace_out else None
    result = compute_metrics(
        phases=gen.phases, num_tokens=gen.num_tokens, step_start_at=gen.step_start_at, step_end_at=gen.step_end_at,
        stats=ctl.stats, gpu_stall_s=engine.stall_s, link_busy_s=engine.loader.busy_s,
        makespan_s=run_end - run_start, copy_engines=1, num_layers=spec.num_moe_layers)
    result.update({
        "policy": policy.name, "policy_components": policy.components(), "memory_budget_bytes": total,
        "expert_budget_bytes": experts_budget, "slots_per_layer": list(ctl.slots_per_layer),
        "peak_expert_bytes": ctl.peak_slots * ctl.slot_bytes, "profile": hw.name, "model": model_name,
        "kv_cache_tokens": _kv_tokens(prompts, max_new_tokens),
        **run_notes(replayed_layers=spec.moe_layer_indices, model_layers=spec.num_moe_layers, assumptions=[],
                    warnings=cache_warnings(policy, ctl)),
        "trace_hash": trace.content_hash() if trace is not None else None,
        "generated": gen.generated,
        "io": io_observed(engine),
        **peak_memory(device),
    })
    if trace_out is not None:
        from traces.format import write_trace
        write_trace(trace, trace_out)
    if timeline is not None:
        write_timeline(engine, run_start, timeline)
    return result, gen


def peak_memory(device: torch.device) -> dict[str, int | None]:
    """`peak_device_bytes`: the most GPU memory torch held at once (weights, slots, KV cache, activations;
    None on a CPU device, where fast memory is host RAM); `peak_host_rss_bytes`: this process's peak
    resident set (Linux's ru_maxrss), which on a CPU device includes everything."""
    import resource

    device_peak = int(torch.cuda.max_memory_allocated(device)) if device.type == "cuda" else None
    return {"peak_device_bytes": device_peak,
            "peak_host_rss_bytes": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024}


def io_observed(engine: OffloadEngine) -> dict[str, Any]:
    """What the slow tier really delivered in this run: finished copies, their bytes and the copy stream's
    busy seconds from each copy's start and end events (CUDA events on a GPU, perf_counter on the host:
    `clock`), so `bytes / (busy_s - copies * latency)` is the bandwidth the hardware gave."""
    spans = engine.loader.spans
    nbytes, busy_s = int(sum(copy.nbytes for _, _, copy in spans)), float(engine.loader.busy_s)
    return {"copies": len(spans), "bytes": nbytes, "busy_s": busy_s,
            "observed_bytes_per_s": nbytes / busy_s if busy_s > 0 else None, "clock": engine.dev.clock,
            "cancelled_after_start": engine.cancel_races}


def write_timeline(engine: OffloadEngine, origin_at: float, path: Path) -> None:
    """The run's Chrome trace (sim.timeline's schema): compute thread, I/O thread, predictor."""
    from sim.engine import EngineResult
    from sim.timeline import write_timeline as write

    gpu = [(s.name, s.start_at - origin_at, s.end_at - origin_at, s.args) for s in engine.spans
           if s.track == "compute" and s.start_at >= origin_at]
    cpu = [("predict", s.start_at - origin_at, s.end_at - origin_at, s.args) for s in engine.spans
           if s.track == "predictor" and s.start_at >= origin_at]
    link = [(0, start - origin_at, end - origin_at, copy.tag) for start, end, copy in engine.loader.spans
            if start >= origin_at]
    result = EngineResult(step_start_at=[], step_end_at=[], gpu_stall_s=engine.stall_s, makespan_s=0.0,
                          link_busy_s=engine.loader.busy_s, copy_engines=1, gpu_spans=gpu, cpu_spans=cpu,
                          link_spans=link)
    write(result, path)


def run_realrun(model: str, prompts: str | os.PathLike[str] | None, policy: str, memory_budget: str, *,
                device: str = "cpu", store: str = "disk", max_new_tokens: int = DEFAULT_MAX_NEW_TOKENS,
                overrides: dict[str, Any] | None = None, timeline: str | os.PathLike[str] | None = None,
                trace_out: str | os.PathLike[str] | None = None, profile: str | None = None,
                store_path: str | os.PathLike[str] | None = None,
                progress: Callable[[int], None] | None = None,
                progress_total: Callable[[int], None] | None = None, dtype: str = "auto",
                optimize_quant: bool = True) -> dict[str, Any]:
    """`fatesim realrun`: the metrics JSON of `fatesim replay` plus `generated` (token ids per prompt).

    prompts: a prompt file, or None for `traces.promptset.DEFAULT_PROMPTS`; progress(n) is called after each
    forward step, progress_total(steps) once the step count is known; profile: a hardware profile for
    the controller (name or .toml), or None to measure this machine at start-up; store_path: where the disk
    store lives, or None for `STORE_DIR`/experts-<fingerprint>.bin (reused while the weights and options
    match: quantising a model with HQQ is done once); dtype: compute dtype of the non-expert weights and
    activations (`traces.recorder.DTYPE_CHOICES`; "auto" = float32 on a CPU, the checkpoint's on CUDA);
    optimize_quant: HQQ's optimiser for quantised experts (False: plain rounding, for speed benchmarks).

    The model is streamed from its checkpoint (`realrun.streaming`): it never has to fit in RAM whole.
    """
    if prompts is None:
        from traces.promptset import DEFAULT_PROMPTS
        prompts = DEFAULT_PROMPTS
    if device == "cuda" and not torch.cuda.is_available():
        raise UserError("--device cuda but torch sees no CUDA GPU; use --device cpu")
    if device not in ("cpu", "cuda"):
        raise UserError(f"unknown device {device!r}; choose cpu or cuda")
    if max_new_tokens < 1:
        raise UserError(f"--max-new-tokens {max_new_tokens} must be at least 1")
    if dtype not in DTYPE_CHOICES:
        raise UserError(f"unknown --dtype {dtype!r}; choose one of {', '.join(DTYPE_CHOICES)}")
    pol = build_policy(policy, overrides)
    dev = torch.device(device)
    folder = resolve_model_dir(model)
    # Check the budget against the config before loading any weights: a user mistake fails in a second.
    spec = ModelSpec.from_config_file(folder)
    prompt_set = load_prompts(prompts, tokenizer_of(folder))
    budget_bytes, experts_bytes = budgets(memory_budget, spec, _kv_tokens(prompt_set, max_new_tokens), dev)
    check_slots(pol, spec, experts_bytes)
    if progress_total is not None:
        progress_total(len(prompt_set.token_ids) * max_new_tokens)  # one tick per forward step
    if dev.type == "cuda":  # peak_device_bytes covers loading too
        torch.cuda.reset_peak_memory_stats(dev)
    streamed = load_streaming(folder, dev, dtype, name=model)
    try:
        result, _ = run_streamed(
            streamed, prompt_set, model_name=model, policy=pol, memory_budget=budget_bytes, device=dev, store=store,
            max_new_tokens=max_new_tokens, store_path=Path(store_path) if store_path else None, store_dir=STORE_DIR,
            profile=profile, optimize_quant=optimize_quant,
            timeline=Path(timeline) if timeline else None, trace_out=Path(trace_out) if trace_out else None,
            progress=progress)
    finally:
        streamed.checkpoint.close()
    return result
