"""A trace turned into forward steps: what the engine replays, computed once per trace.

A forward step is one prefill chunk (all prompt tokens of a sequence, processed together per layer) or
one decode token. Sequences run one after another (batch size 1), in the trace's storage order. For each
step and MoE layer we keep the distinct routed experts and how many of the step's tokens each received;
an expert's compute time depends on that count. The look-ahead logits become probabilities once here.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from sim.policies.eviction import FutureAccess
from sim.policies.requirements import lookahead_probabilities

RANK_DEPTH = 32
"""Experts kept per pre-sorted look-ahead ranking (no prefetch policy takes more per layer in decode)."""


@dataclass(frozen=True)
class Step:
    """One forward step."""

    index: int
    seq_id: int
    phase: str
    """"prefill" or "decode"."""
    token_start: int
    """First trace position of the step."""
    num_tokens: int
    context: int
    """KV positions each token of the step attends to at most (positions before it plus itself)."""
    routes: tuple[tuple[np.ndarray, np.ndarray], ...]
    """routes[l] = (expert ids ascending, token counts) of MoE layer l."""


@dataclass(frozen=True)
class Workload:
    """All forward steps of a trace plus what the policies derive from it."""

    steps: tuple[Step, ...]
    num_layers: int
    num_experts: int
    top_k: int
    popularity: np.ndarray
    """[L, E] tokens routed to each expert in the trace's prompts (prefill positions; every position when the
    trace has none): the profiling pass of static pinning, which realrun runs on the same prompts."""
    lookahead_probs: np.ndarray | None
    """[D, T, L, E] float32 softmax over E of the look-ahead logits, or None."""
    lookahead_rank: tuple[np.ndarray, np.ndarray] | None
    """(experts [D, T, L, m], probs [D, T, L, m]): the look-ahead probabilities sorted best first (ties: lower
    id), m = min(E, RANK_DEPTH); computed once so decode predictions need no sort."""
    future: FutureAccess
    max_context: int
    """Longest sequence (KV-cache tokens the budget must hold)."""
    decode_ids: np.ndarray | None = None
    """[T, L, k] int64 routed experts of each position, ascending: where a decode token's k experts are
    distinct (always, for real routers) its routes are this row, so the engine converts a whole step to
    Python lists with one `tolist()` instead of one per layer."""
    decode_distinct: np.ndarray | None = None
    """[T] bool: whether the position's k experts are distinct in every layer (its row of `decode_ids` is
    then its decode routes)."""


def build_workload(trace) -> Workload:
    """The forward steps of `trace` (a traces.format.Trace)."""
    topk = np.asarray(trace.topk_ids).astype(np.int64)  # [T, L, k]
    num_tokens, num_layers, _ = topk.shape
    num_experts = int(trace.model_config.num_experts)
    is_prefill = np.asarray(trace.is_prefill)
    seq_ids = np.asarray(trace.seq_ids)
    positions = np.asarray(trace.positions)
    steps: list[Step] = []
    decode_sorted = np.sort(topk, axis=2)  # [T, L, k]
    ones = np.ones(topk.shape[2], dtype=np.int64)
    max_context = 0
    for sl in trace.sequence_slices():
        seq = int(seq_ids[sl.start])
        n_prefill = int(np.count_nonzero(is_prefill[sl]))
        start_pos = int(positions[sl.start])
        max_context = max(max_context, start_pos + sl.stop - sl.start)
        if n_prefill:
            routes = []
            block = topk[sl.start:sl.start + n_prefill]  # [n, L, k]
            for layer in range(num_layers):
                ids, counts = np.unique(block[:, layer, :], return_counts=True)
                routes.append((ids, counts))
            steps.append(Step(len(steps), seq, "prefill", sl.start, n_prefill, start_pos + n_prefill, tuple(routes)))
        for t in range(sl.start + n_prefill, sl.stop):
            rows = decode_sorted[t]
            routes = []
            for layer in range(num_layers):
                ids = rows[layer]
                if ids.size > 1 and np.any(ids[1:] == ids[:-1]):
                    ids, counts = np.unique(ids, return_counts=True)
                    routes.append((ids, counts))
                else:
                    routes.append((ids, ones))
            steps.append(Step(len(steps), seq, "decode", t, 1, int(positions[t]) + 1, tuple(routes)))
    profiled = topk[is_prefill.astype(bool)] if np.any(is_prefill) else topk
    popularity = np.zeros((num_layers, num_experts), dtype=np.int64)
    for layer in range(num_layers):
        popularity[layer] = np.bincount(profiled[:, layer, :].ravel(), minlength=num_experts)[:num_experts]
    probs = rank = None
    if trace.lookahead_logits is not None:
        probs = lookahead_probabilities(trace.lookahead_logits)
        order = np.argsort(-probs, axis=-1, kind="stable")[..., :RANK_DEPTH]  # [D, T, L, m]
        rank = (order.astype(np.int16), np.take_along_axis(probs, order, axis=-1))
    future = FutureAccess([s.routes for s in steps], num_layers)
    distinct = (np.diff(decode_sorted, axis=2) != 0).all(axis=(1, 2))
    return Workload(tuple(steps), num_layers, num_experts, int(topk.shape[2]), popularity, probs, rank, future,
                    max_context, decode_sorted, distinct)
