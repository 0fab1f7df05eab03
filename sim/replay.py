"""`replay`: a trace under a policy, a memory budget and a machine -> the metrics JSON (sim/metrics.py).

    result = replay("mini.safetensors", policy="fate", hw="rtx3090-bound", memory_budget="25%")

`replay_many` runs many configurations on one loaded trace, sharing the parsed trace, its forward steps,
the future-access index and the content hash (what a sweep needs).
"""

from __future__ import annotations

import os
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from sim import kernel
from sim.background import Background
from sim.budget import resolve_budget
from sim.costs import CostModel
from sim.engine import Engine
from sim.hardware import HardwareProfile, load_profile
from sim.layersubset import check_layers, layer_coverage
from sim.metrics import cache_warnings, compute_metrics, run_notes
from sim.modelspec import ModelSpec, check_same_structure, get_model_spec
from sim.policies.controller import OffloadController
from sim.policies.noisy_oracle import describe, noisy_oracle_signals, recall_from_report
from sim.policies.prediction import NEEDS_LOOKAHEAD
from sim.policies.prefetch import decode_prefetch_count
from sim.policies.presets import PolicyConfig, build_policy
from sim.timeline import check_window, write_timeline
from sim.units import format_bytes
from sim.workload import Workload, build_workload
from traces.errors import UserError
from traces.format import Trace, read_trace
from traces.paths import check_output


@dataclass(frozen=True)
class LoadedTrace:
    """A trace prepared once for any number of replays."""

    trace: Trace
    workload: Workload
    content_hash: Background[str] = field(compare=False, repr=False)
    """`Trace.content_hash()`, computed on a thread of its own (hashlib releases the GIL while it hashes, ~40 ms
    per 70 MB of tensors), overlapping the workload and the replay."""
    path: str | None = None
    """The file it was read from (None: built in memory); no output may be written over it."""
    signals: dict = field(default_factory=dict, compare=False, repr=False)
    """Noisy-oracle look-ahead signals made for this trace, by (depth, recall, seed): replays share them."""

    @property
    def trace_hash(self) -> str:
        """`Trace.content_hash()` of the trace (sha256 hex)."""
        return self.content_hash.result()


def load(trace: Trace | str | os.PathLike[str] | LoadedTrace) -> LoadedTrace:
    """Read (if a path) and prepare a trace for replays."""
    if isinstance(trace, LoadedTrace):
        return trace
    path = None
    if not isinstance(trace, Trace):
        path = str(trace)
        trace = read_trace(trace)
    content_hash = Background(trace.content_hash, "fatesim-trace-hash")
    return LoadedTrace(trace, build_workload(trace, softmax_in_background=True), content_hash, path)


def resolve_spec(trace: Trace, as_model: str | None, layers_subset: bool = False) -> ModelSpec:
    """The trace's own model spec, or `as_model`'s when its routing structure matches the trace.

    A trace that logs only some of its model's MoE layers is refused unless `layers_subset`; then the
    spec is a model made of those layers only (sim/layersubset.py)."""
    _, subset = check_layers(trace, layers_subset, as_model)
    if subset is not None:
        return subset
    if as_model is None:
        return ModelSpec.from_trace(trace)
    spec = get_model_spec(as_model)
    check_same_structure(spec, trace)
    return spec


def _noisy_oracle_workload(loaded: LoadedTrace, config: PolicyConfig) -> Workload:
    """The workload with look-ahead signals made by the noisy oracle (sim/policies/noisy_oracle.py)."""
    trace = loaded.trace
    depth = config.lookahead
    recall: Any = config.predictor_recall
    key = (depth, recall, config.predictor_seed)
    if key not in loaded.signals:
        if isinstance(recall, str):
            recall = recall_from_report(recall, tuple(trace.model_config.moe_layer_indices), depth)
        loaded.signals.clear()  # one set at a time: they take D x T x L x E floats
        loaded.signals[key] = noisy_oracle_signals(trace.topk_ids, trace.is_prefill, trace.num_experts, depth,
                                                   recall, config.predictor_seed)
    return loaded.workload.with_lookahead_probs(loaded.signals[key])


def replay(trace: Trace | str | os.PathLike[str] | LoadedTrace, policy: str | PolicyConfig = "fate",
           hw: str | Path | HardwareProfile = "rtx3090-bound", memory_budget: str | int = "25%",
           as_model: str | None = None, overrides: dict[str, Any] | None = None,
           timeline: str | Path | None = None, *, mode: str = "fast",
           score_fn: Callable[[int, Any], np.ndarray] | None = None, layers_subset: bool = False,
           timeline_window: tuple[float, float] | None = None, budget_option: str = "--memory-budget",
           budget_accounting: str = "fatesim") -> dict[str, Any]:
    """Replay `trace` and return the metrics JSON (keys in sim.metrics.METRIC_KEYS plus the inputs).

    policy: a preset name (with `overrides`, as `--set`) or a built PolicyConfig; hw: a profile name, TOML
    path or profile; memory_budget: total fast memory ("6GiB", "25%", or int bytes; sim/budget.py), at
    most the profile's device memory; as_model: replay with another model's shapes; timeline: write a
    Chrome trace-event JSON there (only the spans overlapping `timeline_window` = (start_s, end_s) when
    given); mode: "fast" (the compiled kernel of sim/kernel where the policy allows it, else the reference
    engine's plain loop), "engine" (always the reference engine's loop) or "simpy" (its SimPy processes) --
    all give identical results; score_fn: the learned predictor's scores; layers_subset: replay a trace
    that logs only some of its model's MoE layers as a model of those layers (refused otherwise);
    budget_option: how the budget was given, for messages ("--memory-budget", "--budget", "grid key
    'budget'"); budget_accounting: "fatesim" (sim/budget.py) or "fate" (the budget is what the Fate paper
    calls "N GB", sized as Fate's official code does: `sim.accounting`).
    """
    if mode not in ("fast", "engine", "simpy"):
        raise ValueError(f"mode must be 'fast', 'engine' or 'simpy', not {mode!r}")
    loaded = load(trace)
    if timeline is not None:
        check_output(timeline, inputs=[loaded.path] if loaded.path else [], what="--timeline")
    if timeline_window is not None:
        check_window(timeline_window)
    trace_obj, workload = loaded.trace, loaded.workload
    coverage = layer_coverage(trace_obj)
    spec = resolve_spec(trace_obj, as_model, layers_subset)
    profile = hw if isinstance(hw, HardwareProfile) else load_profile(hw)
    if budget_accounting not in ("fatesim", "fate"):
        raise UserError(f"--budget-accounting must be fatesim or fate, not {budget_accounting!r}")
    config = (policy if isinstance(policy, PolicyConfig)
              else build_policy(policy, overrides, model_type=spec.model_type))
    assumptions: list[str] = []
    if config.prediction == "noisy-oracle" and config.prefetch != "none":
        workload = _noisy_oracle_workload(loaded, config)
        assumptions.append(describe(config.predictor_recall, config.predictor_seed))
    elif config.prediction in NEEDS_LOOKAHEAD and not workload.has_lookahead and config.prefetch != "none":
        raise UserError(f"policy {config.name!r} predicts with look-ahead logits, which trace {trace_obj.model} lacks; "
                        "use --set prediction=noisy-oracle (an assumed predictor made from the trace's future, "
                        "see --set predictor_recall), eap or none, or record the trace with look-ahead logits")
    if coverage.partial:
        assumptions.append(f"{coverage.note()} of {coverage.model or trace_obj.model} replayed (decoder layers "
                           f"{list(coverage.logged)}), as a model made of these layers only: throughput, bytes and "
                           "budget cover them, not the whole model")
    budget = resolve_budget(memory_budget if not isinstance(memory_budget, np.integer) else int(memory_budget),
                            spec, kv_tokens=workload.max_context, device_memory_bytes=profile.memory_bytes,
                            device=f"profile {profile.name}", option=budget_option)
    budget_bytes, resident, expert_budget = budget.total_bytes, budget.resident_bytes, budget.expert_bytes
    if budget_accounting == "fate":
        config, expert_budget, resident = _fate_budget(spec, config, memory_budget, budget_bytes, workload.max_context)
    slot_need = spec.num_moe_layers * spec.top_k
    if expert_budget < spec.top_k * spec.expert_bytes("int2"):
        raise UserError(f"memory budget {format_bytes(budget_bytes)} is below the non-expert weights, shared experts "
                        f"and KV cache ({format_bytes(resident)}) plus one layer's top-{spec.top_k} experts; "
                        f"raise {budget_option} (a percentage such as 25% is relative to the routed experts)")
    costs = CostModel(spec, profile)
    try:
        ctl = OffloadController(spec, config, expert_budget, decode_prefetch_count=decode_prefetch_count(costs),
                                future=workload.future, popularity=workload.popularity, score_fn=score_fn)
    except UserError as error:
        if "expert slots" not in str(error):
            raise
        need = resident + slot_need * spec.expert_bytes("bf16")
        raise UserError(f"memory budget {format_bytes(budget_bytes)} leaves room for fewer than top-{spec.top_k} "
                        f"experts in each of the {spec.num_moe_layers} MoE layers under {config.name!r}; raise "
                        f"{budget_option} to at least {format_bytes(need)} (bf16 slots)") from None
    if mode == "fast" and timeline is None and kernel.unsupported(config) is None:
        result = kernel.replay(workload, ctl, costs)
    else:
        result = Engine(workload, ctl, costs, record=timeline is not None).run("simpy" if mode == "simpy" else "loop")
    metrics = compute_metrics(
        phases=[s.phase for s in workload.steps], num_tokens=[s.num_tokens for s in workload.steps],
        step_start_at=result.step_start_at, step_end_at=result.step_end_at, stats=ctl.stats,
        gpu_stall_s=result.gpu_stall_s, link_busy_s=result.link_busy_s, makespan_s=result.makespan_s,
        copy_engines=result.copy_engines, num_layers=workload.num_layers)
    if timeline is not None:
        write_timeline(result, timeline, window=timeline_window)
    metrics.update({
        "policy": config.name,
        "policy_components": config.components(),
        "memory_budget_bytes": budget_bytes,
        "expert_budget_bytes": expert_budget,
        "kv_cache_tokens": budget.kv_tokens,
        "slots_per_layer": ctl.slots_per_layer,
        "peak_expert_bytes": ctl.peak_slots * ctl.slot_bytes,
        "profile": profile.name,
        "model": spec.name,
        "trace_hash": loaded.trace_hash,
        **run_notes(replayed_layers=coverage.logged, model_layers=len(coverage.model_layers or coverage.logged),
                    assumptions=assumptions, warnings=cache_warnings(config, ctl)),
    })
    return metrics


def _fate_budget(spec: ModelSpec, config: PolicyConfig, memory_budget: str | int, budget_bytes: int,
                 max_context: int) -> tuple[PolicyConfig, int, int]:
    """(policy, expert budget, bytes outside the experts) under Fate's accounting of `budget_bytes`."""
    from sim.accounting import KV_RESERVE_TOKENS, sim_expert_budget

    if str(memory_budget).strip().endswith("%"):
        raise UserError("--budget-accounting fate takes the paper's budget as a size (the paper's 10 GB is 10GiB), "
                        "not a percentage")
    if max_context > KV_RESERVE_TOKENS:
        raise UserError(f"Fate's accounting reserves KV cache for {KV_RESERVE_TOKENS} tokens but the trace's longest "
                        f"sequence has {max_context}; use --budget-accounting fatesim")
    sim = sim_expert_budget(spec, budget_bytes, config)
    return sim.policy, sim.expert_budget_bytes, budget_bytes - sim.expert_budget_bytes


def replay_many(trace: Trace | str | os.PathLike[str] | LoadedTrace,
                configs: Iterable[dict[str, Any]]) -> list[dict[str, Any]]:
    """Replay one trace under many configurations (each a dict of `replay`'s keyword arguments); the first
    UserError stops it (`sim.compare.compare` goes on past failures)."""
    loaded = load(trace)
    return [replay(loaded, **config) for config in configs]
