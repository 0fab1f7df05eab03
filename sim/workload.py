"""A trace turned into forward steps: what the engines replay, computed once per trace.

A forward step is one prefill chunk (all prompt tokens of a sequence, processed together per layer) or
one decode token. Sequences run one after another (batch size 1), in the trace's storage order. For each
step and MoE layer we keep the distinct routed experts (ascending) and how many of the step's tokens each
received; an expert's compute time depends on that count. The routes of all steps live in three flat
arrays (`route_ptr`, `route_ids`, `route_counts`, row s * L + l), built with a few numpy operations.
The look-ahead probabilities and the future-access index are computed on first use.
"""

from __future__ import annotations

import copy
import threading
from functools import cached_property
from typing import NamedTuple

import numpy as np

from sim.background import Background
from sim.policies.eviction import FutureAccess
from sim.policies.requirements import lookahead_probabilities


class Step(NamedTuple):
    """One forward step (a named tuple: a trace has thousands, built in one pass)."""

    index: int
    seq_id: int
    phase: str
    """"prefill" or "decode"."""
    token_start: int
    """First trace position of the step."""
    num_tokens: int
    context: int
    """KV positions each token of the step attends to at most (positions before it plus itself)."""


class Workload:
    """All forward steps of a trace plus what the policies derive from it."""

    def __init__(self, steps: tuple[Step, ...], num_layers: int, num_experts: int, top_k: int,
                 route_ptr: np.ndarray, route_ids: np.ndarray, route_counts: np.ndarray, popularity: np.ndarray,
                 lookahead_logits: np.ndarray | None, max_context: int,
                 lookahead_probs: Background[np.ndarray] | None = None) -> None:
        self.steps = steps
        self.num_layers = num_layers
        self.num_experts = num_experts
        self.top_k = top_k
        self.route_ptr = route_ptr
        """[S * L + 1] int64: the routes of step s, layer l are row s * L + l of route_ids / route_counts."""
        self.route_ids = route_ids
        """int64 expert ids, ascending within a row."""
        self.route_counts = route_counts
        """int64 tokens of the step routed to each expert."""
        self.popularity = popularity
        """[L, E] tokens routed to each expert in the trace's prompts (prefill positions; every position when the
        trace has none): the profiling pass of static pinning, which realrun runs on the same prompts."""
        self.lookahead_logits = lookahead_logits
        """[D, T, L, E] float16 as recorded, or None."""
        self.max_context = max_context
        """Longest sequence (KV-cache tokens the budget must hold)."""
        self.derived: dict = {}
        """Arrays that replays derive from the trace and share (the kernel's inputs, by key)."""
        self._probs: np.ndarray | None = None
        self._probs_pending = lookahead_probs
        self._probs_lock = threading.Lock()

    @property
    def has_lookahead(self) -> bool:
        """Whether look-ahead probabilities exist: from recorded logits, or given (`with_lookahead_probs`)."""
        return self.lookahead_logits is not None or self._probs is not None

    def with_lookahead_probs(self, probs: np.ndarray) -> Workload:
        """This workload with look-ahead probabilities [D, T, L, E] made elsewhere (the noisy oracle's) in
        place of the recorded ones; steps, routes and the future index are shared, derived arrays are not."""
        other = copy.copy(self)
        other._probs, other._probs_pending, other._probs_lock = probs, None, threading.Lock()
        other.derived = {}
        return other

    @property
    def lookahead_probs(self) -> np.ndarray | None:
        """[D, T, L, E] float32 softmax over E of the look-ahead logits, or None; computed once, by the first
        caller or by the thread `build_workload(..., softmax_in_background=True)` started."""
        with self._probs_lock:
            if self._probs is None and self._probs_pending is not None:
                self._probs, self._probs_pending = self._probs_pending.result(), None
            if self._probs is None and self.lookahead_logits is not None:
                self._probs = lookahead_probabilities(self.lookahead_logits)
            return self._probs

    @cached_property
    def future(self) -> FutureAccess:
        """The routes indexed for Belady and the oracle predictor."""
        return FutureAccess(self.route_ptr, self.route_ids, self.route_counts, self.num_layers, self.num_experts)

    def routes(self, step: int) -> list[tuple[np.ndarray, np.ndarray]]:
        """(expert ids, token counts) of each MoE layer in forward step `step`."""
        return self.future.step_routes(step)


def _concatenate(parts: list[np.ndarray], dtype) -> np.ndarray:
    return np.concatenate(parts).astype(dtype) if parts else np.zeros(0, dtype)


def build_workload(trace, softmax_in_background: bool = False) -> Workload:
    """The forward steps of `trace` (a traces.format.Trace). With `softmax_in_background`, the look-ahead
    probabilities are computed on a thread of their own from the start (numpy releases the GIL in the
    softmax's operations: its ~0.1 s per 17.6 M logits overlaps with building the steps and what the caller
    does next); the simulator's `load` asks for it, since most policies read them."""
    logits = trace.lookahead_logits
    pending = (Background(lambda: lookahead_probabilities(logits), "fatesim-lookahead-softmax")
               if softmax_in_background and logits is not None else None)
    topk = np.asarray(trace.topk_ids).astype(np.int64)  # [T, L, k]
    num_tokens, num_layers, top_k = topk.shape
    num_experts = int(trace.model_config.num_experts)
    is_prefill = np.asarray(trace.is_prefill).astype(bool)
    seq_ids = np.asarray(trace.seq_ids)
    positions = np.asarray(trace.positions).astype(np.int64)
    starts, sizes, prefill, seqs, contexts = [], [], [], [], []
    max_context = 0
    for sl in trace.sequence_slices():  # a prefill step (the prompt), then one step per decode position
        n_prefill = int(np.count_nonzero(is_prefill[sl]))
        start_pos = int(positions[sl.start])
        max_context = max(max_context, start_pos + sl.stop - sl.start)
        decode = np.arange(sl.start + n_prefill, sl.stop)
        if n_prefill:
            decode_starts = np.concatenate([[sl.start], decode])
            decode_sizes = np.concatenate([[n_prefill], np.ones(decode.size, np.int64)])
            decode_prefill = np.concatenate([[True], np.zeros(decode.size, bool)])
            decode_contexts = np.concatenate([[start_pos + n_prefill], positions[decode] + 1])
        else:
            decode_starts, decode_sizes = decode, np.ones(decode.size, np.int64)
            decode_prefill, decode_contexts = np.zeros(decode.size, bool), positions[decode] + 1
        starts.append(decode_starts)
        sizes.append(decode_sizes)
        prefill.append(decode_prefill)
        contexts.append(decode_contexts)
        seqs.append(np.full(decode_starts.size, int(seq_ids[sl.start]), np.int64))
    step_start, step_size = _concatenate(starts, np.int64), _concatenate(sizes, np.int64)
    step_prefill, step_seq, step_context = (_concatenate(prefill, bool), _concatenate(seqs, np.int64),
                                            _concatenate(contexts, np.int64))
    num_steps = step_start.size
    phases = ("decode", "prefill")
    steps = tuple(map(Step._make, zip(range(step_start.size), step_seq.tolist(),
                                      [phases[p] for p in step_prefill.tolist()], step_start.tolist(),
                                      step_size.tolist(), step_context.tolist(), strict=True)))
    # each position's routes go to its step's row; a row's experts ascending, with how many tokens chose each
    step_of = np.repeat(np.arange(num_steps, dtype=np.int64), step_size)
    rows = step_of[:, None] * num_layers + np.arange(num_layers)[None, :]  # [T, L]
    keys = np.sort((rows[:, :, None] * num_experts + topk).ravel(), kind="stable")  # nearly sorted already
    first = np.ones(keys.size, bool)
    np.not_equal(keys[1:], keys[:-1], out=first[1:])
    starts_at = np.flatnonzero(first)
    cell = keys[starts_at]  # distinct (row, expert) cells, in row order, experts ascending
    cell_counts = np.diff(np.append(starts_at, keys.size))
    route_ids = cell % num_experts
    route_rows = cell // num_experts
    route_ptr = np.zeros(num_steps * num_layers + 1, np.int64)
    np.cumsum(np.bincount(route_rows, minlength=num_steps * num_layers), out=route_ptr[1:])
    profiled = topk[is_prefill] if np.any(is_prefill) else topk
    layer_keys = (np.arange(num_layers)[None, :, None] * num_experts + profiled).ravel()
    popularity = np.bincount(layer_keys, minlength=num_layers * num_experts).reshape(num_layers, num_experts)
    return Workload(steps, num_layers, num_experts, int(top_k), route_ptr, route_ids.astype(np.int64),
                    cell_counts.astype(np.int64), popularity.astype(np.int64),
                    None if trace.lookahead_logits is None else np.asarray(trace.lookahead_logits), max_context,
                    pending)
