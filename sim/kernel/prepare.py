"""The kernel's inputs from a workload, a controller and a cost model (see sim/kernel/state.py).

Arrays that depend only on the trace (the ranked look-ahead predictions of prefill steps, the future
index) are kept in `Workload.derived` and shared by every replay of that trace; the cost tables depend
on the model and hardware and are built per replay (a few hundred `CostModel` calls at most).
"""

from __future__ import annotations

import numpy as np

from sim.costs import CostModel
from sim.kernel.state import (
    EVICTIONS,
    HYBRID,
    MISSES,
    PRECISIONS,
    PREDICTIONS,
    PREFETCHES,
    Inputs,
    Settings,
)
from sim.policies.controller import OffloadController
from sim.policies.requirements import loaded_precisions, needs_lookahead
from sim.workload import Workload

_NONE_I64 = np.zeros(1, np.int64)
_NONE_F64 = np.zeros(1, np.float64)


def _precision_code(name: str) -> int:
    return PRECISIONS.index(name)


def settings(ctl: OffloadController, costs: CostModel, prefill_depth: int) -> Settings:
    """The policy, budget and machine as numbers."""
    policy, hw = ctl.policy, costs.hw
    return Settings(
        eviction=EVICTIONS[policy.eviction], prediction=PREDICTIONS[policy.prediction],
        prefetch=PREFETCHES[policy.prefetch],
        precision=HYBRID if policy.precision == "fate-hybrid" else _precision_code(policy.precision),
        miss=MISSES[policy.miss], miss_precision=_precision_code(policy.miss_precision),
        preload_precision=_precision_code(loaded_precisions(policy)[0]), int2_rate=float(policy.int2_rate),
        confidence=float(policy.confidence), prefetch_count=int(policy.prefetch_count),
        fate_count=int(ctl.prefetch.fate_decode_count),
        lookahead_limit=int(ctl.spec.top_k if policy.prediction == "speculative" else ctl.prediction_limit),
        prefill_depth=prefill_depth, depth=int(policy.lookahead), top_k=int(ctl.spec.top_k),
        cancel_stale=bool(policy.cancel_stale), serial_loads=bool(policy.serial_loads),
        copy_engines=int(hw.link.copy_engines), predictor_latency_s=float(hw.cpu.predictor_latency_s),
        router_s=float(hw.gpu.kernel_launch_s), copy_contention=float(hw.copy_contention),
        cpu_on_stream=hw.device_kind == "cpu", max_slots=int(ctl.expert_budget_bytes // ctl.slot_bytes))


def inputs(workload: Workload, ctl: OffloadController, costs: CostModel) -> tuple[Inputs, Settings]:
    """Everything the kernel reads for replaying `workload` under `ctl`'s policy on `costs`."""
    policy, spec = ctl.policy, ctl.spec
    steps = workload.steps
    tokens = np.fromiter((s.num_tokens for s in steps), np.int64, len(steps))
    contexts = np.fromiter((s.context for s in steps), np.int64, len(steps))
    max_tokens = int(workload.route_counts.max(initial=1))
    expert_s = np.zeros((len(PRECISIONS), max_tokens + 1))
    cpu_expert_s = np.zeros(max_tokens + 1)
    for n in np.flatnonzero(np.bincount(workload.route_counts)).tolist():  # np.unique, without its sort
        for p, name in enumerate(PRECISIONS):
            expert_s[p, n] = costs.expert_s(n, name)
        if policy.miss == "cpu":
            cpu_expert_s[n] = costs.cpu_expert_s(n)
    attention_s, shared_s = np.zeros(len(steps)), np.zeros(len(steps))
    attention: dict[tuple[int, int], float] = {}
    shared: dict[int, float] = {}
    for i, (n, c) in enumerate(zip(tokens.tolist(), contexts.tolist(), strict=True)):
        if (n, c) not in attention:
            attention[(n, c)] = costs.attention_s(n, c)
        if n not in shared:
            shared[n] = costs.shared_s(n)
        attention_s[i], shared_s[i] = attention[(n, c)], shared[n]
    expert_bytes = np.array([spec.expert_bytes(p) for p in PRECISIONS], np.int64)
    transfer_s = np.array([costs.transfer_s(int(b)) for b in expert_bytes])
    lookahead = needs_lookahead(policy)
    probs = workload.lookahead_probs if lookahead else np.zeros((1, 1, 1, 1), np.float32)
    prefill_depth = min(policy.lookahead, probs.shape[0]) if lookahead else 1
    prefill = (_prefill_predictions(workload, prefill_depth, spec.top_k) if lookahead
               else (np.zeros(len(steps) * workload.num_layers + 1, np.int64), _NONE_I64, _NONE_F64))
    future = workload.future if policy.eviction == "belady" else None
    pinned = [list(cache.resident) for cache in ctl.caches]  # preloaded (pinned) experts, in preload order
    pinned_ptr = np.zeros(len(pinned) + 1, np.int64)
    np.cumsum([len(p) for p in pinned], out=pinned_ptr[1:])
    data = Inputs(
        route_ptr=workload.route_ptr, route_ids=workload.route_ids, route_counts=workload.route_counts,
        step_prefill=np.fromiter((s.phase == "prefill" for s in steps), np.bool_, len(steps)), step_tokens=tokens,
        step_position=np.fromiter((s.token_start for s in steps), np.int64, len(steps)), attention_s=attention_s,
        shared_s=shared_s, expert_s=expert_s, cpu_expert_s=cpu_expert_s, transfer_s=transfer_s,
        expert_bytes=expert_bytes, probs=probs, prefill_ptr=prefill[0], prefill_experts=prefill[1],
        prefill_scores=prefill[2], use_ptr=_NONE_I64 if future is None else future.use_ptr,
        use_steps=_NONE_I64 if future is None else future.use_steps, pinned_ptr=pinned_ptr,
        pinned_experts=np.array([e for p in pinned for e in p] or [0], np.int64),
        slots=np.array(ctl.slots_per_layer, np.int64))
    return data, settings(ctl, costs, prefill_depth)


def _prefill_predictions(workload: Workload, depth: int, top_k: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """The look-ahead predictor's ranking for every prefill step of more than one token, layer and depth d:
    experts by how many of the step's tokens have them in their top-k of the look-ahead probabilities, most
    first (ties: lower id), those with a count of 0 left out (`LookaheadPredictor.predict`, vectorised per
    step); flat, row (step * L + layer) * depth + d."""
    key = ("prefill predictions", depth, top_k)
    if key in workload.derived:
        return workload.derived[key]
    probs = workload.lookahead_probs  # [D, T, L, E]
    num_layers, num_experts = workload.num_layers, workload.num_experts
    lengths = np.zeros((len(workload.steps), num_layers, depth), np.int64)
    experts, scores = [], []
    cell = (np.arange(depth)[:, None, None, None] * num_layers + np.arange(num_layers)[None, None, :, None]) * num_experts
    for step in workload.steps:
        if step.num_tokens == 1:
            continue
        block = probs[:depth, step.token_start:step.token_start + step.num_tokens]  # [d, n, L, E]
        top = np.argpartition(-block, top_k - 1, axis=-1)[..., :top_k]  # per token, as predicted_counts
        counts = np.bincount((cell + top).ravel(), minlength=depth * num_layers * num_experts)
        counts = counts.reshape(depth, num_layers, num_experts).astype(np.float64).transpose(1, 0, 2)  # [L, d, E]
        order = np.argsort(-counts, axis=-1, kind="stable")
        ranked = np.take_along_axis(counts, order, axis=-1)
        keep = ranked > 0
        lengths[step.index] = keep.sum(axis=-1)
        experts.append(order[keep])
        scores.append(ranked[keep])
    ptr = np.zeros(lengths.size + 1, np.int64)
    np.cumsum(lengths.ravel(), out=ptr[1:])
    out = (ptr, np.concatenate(experts).astype(np.int64) if experts else _NONE_I64,
           np.concatenate(scores) if scores else _NONE_F64)
    workload.derived[key] = out
    return out
