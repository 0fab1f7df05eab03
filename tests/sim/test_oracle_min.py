"""Belady through replay's own path is MIN (Belady 1966), prefill steps that need more experts than slots included.

The reference below is written from the definition: per layer, each forward step requests its distinct
experts; hits are served first, then each miss in ascending id order; a miss with no free slot evicts the
expert whose next request lies farthest in the future (never: farthest of all; ties: the lowest id),
among every cached expert when the step requests more experts than the cache holds, else among those the
step does not request (they are needed together).
"""

from __future__ import annotations

import numpy as np
import pytest
from sim_fixtures import tiny_profile, tiny_trace

from sim.replay import load, replay, resolve_spec


def min_hits(steps: list[list[int]], capacity: int) -> int:
    """Hits of one layer's cache of `capacity` over the steps' requested experts, under MIN."""
    def next_request(expert: int, after: int) -> int:
        return next((s for s in range(after + 1, len(steps)) if expert in steps[s]), len(steps) + 1)

    cache: set[int] = set()
    hits = 0
    for index, requested in enumerate(steps):
        hits += len(cache & set(requested))
        overfull = len(requested) > capacity
        for expert in sorted(set(requested) - cache):
            if len(cache) >= capacity:
                candidates = cache if overfull else cache - set(requested)
                victim = max(sorted(candidates), key=lambda e: next_request(e, index))
                cache.remove(victim)
            cache.add(expert)
    return hits


def _steps(workload, layer: int) -> list[list[int]]:
    return [workload.routes(step.index)[layer][0].tolist() for step in workload.steps]


@pytest.mark.parametrize("seed, slots, prefill", [(0, 3, 10), (1, 4, 12), (2, 6, 16), (3, 2, 6)])
def test_belady_hits_are_min_hits(seed: int, slots: int, prefill: int) -> None:
    rng = np.random.default_rng(seed)
    tokens, layers, num_experts = 3 * (prefill + 15), 2, 12
    topk = np.stack([rng.choice(num_experts, size=(layers, 2), replace=False, p=None) for _ in range(tokens)])
    trace = tiny_trace(topk.tolist(), num_experts=num_experts, prefill=prefill, sequences=3)
    loaded = load(trace)
    spec = resolve_spec(trace, None)
    budget = spec.resident_bytes(loaded.workload.max_context) + slots * layers * spec.expert_bytes("bf16")
    m = replay(loaded, policy="oracle", hw=tiny_profile(), memory_budget=budget, overrides={"prefetch": "none"})
    assert m["slots_per_layer"] == [slots] * layers
    for layer in range(layers):
        steps = _steps(loaded.workload, layer)
        routed = sum(len(s) for s in steps)
        assert any(len(s) > slots for s in steps)  # the case the fix is about happens
        assert round(m["hit_rate_per_layer"][layer] * routed) == min_hits(steps, slots)


def test_min_beats_reusing_the_earliest_computed_expert() -> None:
    """A hand case: 2 slots, the prefill step needs experts 0 1 2, the next step needs 0 again. MIN keeps 0
    (evicting 1, computed before 2 and never used again); the earliest-computed rule would evict 0."""
    topk = [[[0]], [[1]], [[2]], [[0]]]  # 3 prompt tokens (one prefill step: {0, 1, 2}), then decode 0
    trace = tiny_trace(topk, num_experts=4, prefill=3)
    spec = resolve_spec(trace, None)
    budget = spec.resident_bytes(4) + 2 * spec.expert_bytes("bf16")
    m = replay(trace, policy="oracle", hw=tiny_profile(), memory_budget=budget, overrides={"prefetch": "none"})
    assert m["hit_rate"] == pytest.approx(1 / 4)  # the decode step's 0 hits
