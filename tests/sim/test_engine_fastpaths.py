"""The engine's and controller's speed paths against their plain references: identical results.

The fast loop (whole-step list conversion, pre-sorted rankings, inline predictor thread, expert-time
tables), the controller's set-free victim search (a scan of the policy's `preference`, which also gates its
one-function demand-miss path `_load_misses`), its prefetch picks taken straight from the rankings
(`_prefetch_ranked`, used only when rankings are passed) and its skipping of eviction bookkeeping in layers
that hold every expert are what make cache and prefetch presets replay quickly; each is checked here
against the plain path it replaces, for every preset."""

from __future__ import annotations

import random

import pytest

from sim.costs import CostModel
from sim.engine import Engine
from sim.hardware import load_profile
from sim.policies.controller import OffloadController
from sim.policies.eviction import ARC, LRU, make_eviction
from sim.policies.presets import PRESETS, build_policy
from sim.replay import load, resolve_spec
from sim.synthetic import synthetic_trace
from sim.units import parse_budget


class _SetsOnly:
    """An eviction policy with its `preference` hidden (None): the controller then builds candidate sets."""

    preference = None

    def __init__(self, policy) -> None:
        self._policy = policy

    def __getattr__(self, name: str):
        return getattr(self._policy, name)


@pytest.fixture(scope="module")
def small():
    return load(synthetic_trace(sequences=2, prompt_tokens=12, decode_tokens=25, seed=3))


def _run(loaded, policy: str, budget: str, *, reference: bool):
    workload = loaded.workload
    spec = resolve_spec(loaded.trace, None)
    hw = load_profile("rtx3090-bound")
    expert_budget = parse_budget(budget, spec, kv_tokens=workload.max_context) - spec.resident_bytes(
        workload.max_context)
    ctl = OffloadController(spec, build_policy(policy), expert_budget, hw=hw, future=workload.future,
                            popularity=workload.popularity)
    if reference:
        for layer, cache in enumerate(ctl.caches):
            # the preset's own policy even where a layer holds every expert (the controller skips it there)
            own = make_eviction(ctl.policy.eviction, cache.slots, layer, workload.future)
            for expert in cache.resident:  # pinned at construction
                own.on_insert(expert, 0)
            cache.policy = _SetsOnly(own)
    out = Engine(workload, ctl, CostModel(spec, hw), reference=reference).run()
    return (out.step_start_at, out.step_end_at, out.gpu_stall_s, out.makespan_s, out.link_busy_s, ctl.stats,
            ctl.peak_slots, ctl.occupied_slots)


@pytest.mark.parametrize("policy", list(PRESETS))
@pytest.mark.parametrize("budget", ["8%", "25%"])
def test_fast_loop_matches_the_reference_loop(small, policy: str, budget: str) -> None:
    """Every preset: the fast engine loop and controller paths give bit-identical times and counters."""
    assert _run(small, policy, budget, reference=False) == _run(small, policy, budget, reference=True)


@pytest.mark.parametrize("cls", [LRU, ARC])
def test_preference_scan_picks_what_victim_picks(cls) -> None:
    """The first candidate in `preference` order is exactly the victim of the candidate-set API."""
    rng = random.Random(0)
    policy = cls(8)
    resident: set[int] = set()
    for step in range(400):
        expert = rng.randrange(20)
        if expert in resident:
            policy.on_access(expert, step)
        else:
            if len(resident) >= 8:
                candidates = {e for e in resident if rng.random() < 0.5}
                found = next((e for e in policy.preference(expert) if e in candidates), None)
                if candidates:
                    assert found == policy.victim(candidates, expert, step)
                    resident.discard(found)
                    policy.on_remove(found)
                else:
                    assert found is None
                    continue
            resident.add(expert)
            policy.on_insert(expert, step)


@pytest.mark.parametrize("cls", [LRU, ARC])
def test_on_access_many_is_on_access_in_order(cls) -> None:
    """The batched hit bookkeeping leaves the policy exactly as one on_access per hit would."""
    rng = random.Random(1)
    batched, single = cls(6), cls(6)
    for expert in range(6):
        batched.on_insert(expert, 0)
        single.on_insert(expert, 0)
    for step in range(200):
        hits = rng.sample(range(6), 3)
        batched.on_access_many(hits, step)
        for expert in hits:
            single.on_access(expert, step)
        assert vars(batched) == vars(single)
