"""OffloadController decisions, driven by hand (no engine): prefetch, cancellation, promotion, misses, budget."""

from __future__ import annotations

import numpy as np
import pytest

from sim.hardware import load_profile
from sim.modelspec import get_model_spec
from sim.policies.controller import CANCELLED, DONE, OffloadController
from sim.policies.prediction import Signals
from sim.policies.presets import build_policy

SPEC = get_model_spec("qwen1.5-moe-a2.7b")  # 24 layers, 60 experts, top-4
HW = load_profile("rtx3090-bound")
BF16 = SPEC.expert_bytes("bf16")


def _ctl(policy: str, slots_per_layer: int, guess: int | None = None, **overrides) -> OffloadController:
    def score_fn(layer: int, signals: Signals) -> np.ndarray:
        scores = np.zeros(SPEC.num_experts)
        scores[guess] = 1.0
        return scores

    config = build_policy(policy, overrides)
    pop = np.arange(SPEC.num_experts, dtype=float)[None, :].repeat(SPEC.num_moe_layers, axis=0)
    return OffloadController(SPEC, config, slots_per_layer * SPEC.num_moe_layers * BF16, hw=HW,
                             popularity=pop, score_fn=score_fn if guess is not None else None)


def _done(ctl: OffloadController, transfers) -> None:
    for t in transfers:
        ctl.on_transfer_started(t)
        ctl.on_transfer_done(t)


ROUTE = (np.array([1, 2, 3, 4]), np.ones(4, dtype=np.int64))


def test_hits_after_loads_and_lru_eviction() -> None:
    ctl = _ctl("lru", 4)
    ctl.start_forward(0, "decode", 1)
    plan = ctl.on_route(0, *ROUTE)
    assert plan.hits == [] and [t.expert for t in plan.loads] == [1, 2, 3, 4]
    assert all(t.kind == "demand" and t.nbytes == BF16 for t in plan.loads)
    _done(ctl, plan.loads)
    ctl.start_forward(1, "decode", 1)
    plan = ctl.on_route(0, np.array([1, 2, 5, 6]), np.ones(4, dtype=np.int64))
    assert plan.hits == [1, 2] and plan.evictions == [3, 4]
    assert ctl.stats["hits"] == 2 and ctl.stats["misses"] == 6


def test_stale_queued_prefetch_is_cancelled_and_frees_its_slot() -> None:
    ctl = _ctl("lru", 4, guess=9, prediction="learned", prefetch="topk", prefetch_count="1")
    ctl.start_forward(0, "decode", 1)
    [prefetch] = ctl.on_gate_input(0, Signals(0, "decode", 1))
    assert (prefetch.layer, prefetch.expert, prefetch.kind) == (1, 9, "prefetch")
    ctl.on_route(0, *ROUTE)
    plan = ctl.on_route(1, *ROUTE)  # 9 not routed and never started: cancelled
    assert plan.cancelled == [prefetch] and prefetch.state == CANCELLED
    assert 9 not in ctl.caches[1].resident and len(ctl.caches[1].resident) == 4
    assert (ctl.stats["prefetch_selected"], ctl.stats["prefetch_covered"]) == (1, 0)


def test_needed_queued_prefetch_is_promoted_and_counts_as_a_hit() -> None:
    ctl = _ctl("lru", 4, guess=3, prediction="learned", prefetch="topk", prefetch_count="1")
    ctl.start_forward(0, "decode", 1)
    [prefetch] = ctl.on_gate_input(0, Signals(0, "decode", 1))
    ctl.on_route(0, *ROUTE)
    plan = ctl.on_route(1, *ROUTE)
    assert plan.promoted == [prefetch] and plan.hits == [3]
    assert plan.gpu_work[0] == (3, 1, "bf16", prefetch)  # computed once its bytes land
    _done(ctl, [prefetch])
    assert ctl.stats["bytes_prefetch_used"] == BF16


def test_started_stale_prefetch_lands_as_waste_and_can_be_executed_speculatively() -> None:
    """Speculating Experts: a speculated expert already in flight replaces a missing routed one."""
    ctl = _ctl("lru", 4, guess=9, prediction="learned", prefetch="topk", prefetch_count="1", miss="speculated")
    ctl.start_forward(0, "decode", 1)
    [prefetch] = ctl.on_gate_input(0, Signals(0, "decode", 1))
    ctl.on_transfer_started(prefetch)
    ctl.on_route(0, *ROUTE)
    plan = ctl.on_route(1, *ROUTE)
    assert plan.cancelled == [] and plan.substitutions == [(1, 9)]
    assert [t.expert for t in plan.loads] == [2, 3, 4]
    ctl.on_transfer_done(prefetch)
    assert ctl.stats["bytes_prefetched"] == BF16 and ctl.stats["bytes_prefetch_used"] == 0


def test_cpu_misses_are_computed_on_the_cpu_and_pinned_experts_stay() -> None:
    ctl = _ctl("cpu-exec", 4)
    assert ctl.caches[0].pinned == {59, 58, 57, 56}
    ctl.start_forward(0, "decode", 1)
    plan = ctl.on_route(0, np.array([1, 57, 58, 59]), np.ones(4, dtype=np.int64))
    assert plan.hits == [57, 58, 59] and plan.cpu_experts == [1] and plan.loads == []


def test_lowbit_misses_load_int2_copies() -> None:
    ctl = _ctl("hobbit", 4)
    ctl.start_forward(0, "decode", 1)
    plan = ctl.on_route(0, *ROUTE)
    assert {t.precision for t in plan.loads} == {"int2"}
    assert all(t.nbytes == SPEC.expert_bytes("int2") for t in plan.loads)


@pytest.mark.parametrize("policy", ["lru", "fate", "speculate", "eap", "mixtral-offloading", "hobbit"])
def test_slots_are_never_oversubscribed_under_random_completion_order(policy: str) -> None:
    """Random routes, random landing order: no layer ever holds more experts than its slots."""
    rng = np.random.default_rng(7)
    ctl = _ctl(policy, 5)
    in_flight = []
    for step in range(30):
        phase = "prefill" if step % 10 == 0 else "decode"
        n = 16 if phase == "prefill" else 1
        ctl.start_forward(step, phase, n)
        for layer in range(SPEC.num_moe_layers):
            probs = rng.dirichlet(np.ones(SPEC.num_experts), size=(1, n)).astype(np.float32)
            in_flight += ctl.on_gate_input(layer, Signals(step, phase, n, probs))
            for t in list(in_flight):
                if rng.random() < 0.5:
                    ctl.on_transfer_started(t)
                    if rng.random() < 0.5:
                        ctl.on_transfer_done(t)
                        in_flight.remove(t)
            ids = rng.choice(SPEC.num_experts, size=(n, 4), replace=True)
            experts, counts = np.unique(ids, return_counts=True)
            plan = ctl.on_route(layer, experts, counts)
            in_flight = [t for t in in_flight if t.state != CANCELLED]
            in_flight += plan.loads
            for cache, slots in zip(ctl.caches, ctl.slots_per_layer, strict=True):
                assert len(cache.resident) <= slots
                assert len({t.slot for t in cache.resident.values()}) == len(cache.resident)
        _done(ctl, in_flight)
        in_flight = []
    assert ctl.peak_slots * ctl.slot_bytes <= ctl.expert_budget_bytes
    assert all(t.state == DONE for c in ctl.caches for t in c.resident.values())
