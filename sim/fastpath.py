"""Closed-form replay of load-on-demand policies: the engine's arithmetic without its bookkeeping.

Under a policy that keeps nothing between steps (eviction `none`), prefetches nothing and waits for every
miss, with one copy engine, each layer step starts with an idle link and no expert of its own resident,
so its timeline is a short recurrence: load i is ready at the router output (or, when the step routes
more experts than the layer has slots, once expert i - slots has computed), starts when the copy engine
is free, and expert i computes once its bytes landed and expert i - 1 finished. `replay_lod` runs exactly
the floating-point operations of `sim.engine.Engine` in the same order, so results are identical (tests
compare the two on every kind of step); it just skips the Transfer objects, the link queue and the
controller calls, which is what makes `lod` sweeps fast.
"""

from __future__ import annotations

from sim.costs import CostModel
from sim.engine import EngineResult
from sim.hardware import HardwareProfile
from sim.policies.controller import OffloadController
from sim.workload import Workload


def eligible(ctl: OffloadController, hw: HardwareProfile) -> bool:
    """Whether `ctl`'s policy on `hw` is one this closed form replays exactly (one copy engine, compute
    that the link does not slow)."""
    p = ctl.policy
    return (p.eviction == "none" and p.prefetch == "none" and p.miss == "wait" and p.precision != "fate-hybrid"
            and not p.serial_loads
            and hw.link.copy_engines == 1 and hw.copy_contention == 1.0 and not any(c.pinned for c in ctl.caches))


def replay_lod(workload: Workload, ctl: OffloadController, costs: CostModel) -> EngineResult:
    """The EngineResult of replaying `workload` under `ctl`'s load-on-demand policy; fills `ctl.stats`."""
    precision = ctl.policy.precision
    nbytes = ctl.spec.expert_bytes(precision)
    x = costs.transfer_s(nbytes)
    expert_s = costs.expert_s
    router_s = costs.hw.gpu.kernel_launch_s
    slots = ctl.slots_per_layer
    st = ctl.stats
    routed_per_layer = st["routed_per_layer"]  # hits stay 0: nothing is resident when routed; the totals
    # (misses, routed_predictable) are summed from these per-layer counts when `ctl.stats` is read
    occupied = [0] * len(slots)
    total_occupied = peak = 0
    now = link_free = stall = busy = 0.0
    routed = evictions = 0
    starts: list[float] = []
    ends: list[float] = []
    for step in workload.steps:
        n = step.num_tokens
        attn_s = costs.attention_s(n, step.context)
        shared_s = costs.shared_s(n)
        starts.append(now)
        for layer, (_, counts) in enumerate(step.routes):
            now += attn_s
            now += router_s
            route_at = now
            counts_list = counts.tolist()
            m = len(counts_list)
            routed += m
            routed_per_layer[layer] += m
            s = slots[layer]
            total_occupied += min(m, s) - occupied[layer]
            occupied[layer] = min(m, s)
            peak = max(peak, total_occupied)
            assert total_occupied * ctl.slot_bytes <= ctl.expert_budget_bytes, "expert budget exceeded"
            compute_end: list[float] = []
            ready = route_at
            for i, tokens in enumerate(counts_list):
                if i >= s:  # the slot of expert i - s, free once it has computed
                    evictions += 1
                    ready = max(ready, compute_end[i - s])
                start = max(link_free, ready)
                arrive = link_free = start + x
                busy += arrive - start  # as the engine sums it, for bit-identical results
                if arrive > now:
                    stall += arrive - now
                    now = arrive
                now = now + expert_s(tokens, precision)
                compute_end.append(now)
            if shared_s:
                now += shared_s
        ends.append(now)
    st["evictions"] += evictions
    st["bytes_on_demand"] += routed * nbytes
    ctl.occupied_slots = total_occupied
    ctl.peak_slots = max(ctl.peak_slots, peak)
    makespan = ends[-1] if ends else 0.0
    return EngineResult(starts, ends, stall, makespan, busy, 1)
