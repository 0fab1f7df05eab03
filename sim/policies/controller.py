"""OffloadController: every offloading decision, for the simulator and the real engine alike.

The controller owns the per-layer expert caches (which expert sits in which slot, in which precision,
whether its bytes have landed) and composes the six policy families of a `PolicyConfig`. An engine owns
time (sim) or real bytes (realrun) and drives the controller in this order for every forward step (one
prefill chunk of a sequence, or one decode token):

    ctl.start_forward(step, phase, num_tokens)
    for each MoE layer l:
        prefetches = ctl.on_gate_input(l, signals)   # after attention of l: Transfers for layers l+1..
        plan = ctl.on_route(l, expert_ids, token_counts)  # layer l's router output -> LayerPlan
    ctl.on_transfer_started(t) / ctl.on_transfer_done(t)   # whenever the engine starts / lands a copy

Before `on_route(l)` at time t the engine reports every transfer started or landed by t, so the
controller knows which transfers are still queued. The plan then says which queued transfers to drop
(`cancelled`: stale prefetches, and those whose slot an on-demand load takes) and which to move ahead as
on-demand loads (`promoted`); both engines obey it, so a cancelled transfer moves no bytes.

Memory: a slot is taken when the controller decides a transfer (no later than the transfer starts) and
freed when its expert is evicted. A transfer into a slot whose previous occupant is still in flight or
still to be computed in this layer step says so (`after_transfer`, `after_compute`); the engine starts
it no earlier. So the slot count, and with it the expert bytes, never exceeds the budget.

This is the reference: one miss path, one prefetch path, one victim helper, written for reading. The
simulator's fast kernel (sim/kernel) reproduces its decisions exactly and is tested against it.
No simpy, no torch, no cost model: realrun imports this module.
"""

from __future__ import annotations

from collections.abc import Collection, Sequence
from dataclasses import dataclass, field

import numpy as np

from sim.modelspec import ModelSpec
from sim.policies.allocation import allocate
from sim.policies.eviction import FutureAccess, make_eviction
from sim.policies.miss import MissPolicy
from sim.policies.precision import PrecisionPolicy
from sim.policies.prediction import ScoreFn, Signals, make_predictor
from sim.policies.prefetch import PrefetchPolicy
from sim.policies.presets import PolicyConfig
from sim.policies.requirements import loaded_precisions, slot_precision
from traces.errors import UserError

QUEUED, STARTED, DONE, CANCELLED = "queued", "started", "done", "cancelled"
"""Transfer states, in the order a transfer passes through them (or queued -> cancelled)."""


class Transfer:
    """One expert copy into fast memory, decided by the controller, carried out by an engine."""

    __slots__ = ("layer", "expert", "precision", "nbytes", "kind", "slot", "step", "after_transfer",
                 "after_compute", "reuses_slot_of", "state", "used", "start_at", "end_at")

    def __init__(self, layer: int, expert: int, precision: str, nbytes: int, kind: str, slot: int, step: int) -> None:
        self.layer = layer
        self.expert = expert
        self.precision = precision
        self.nbytes = nbytes
        self.kind = kind
        """"demand" (a miss of the running layer), "prefetch" (a prediction) or "preload" (pinned at start)."""
        self.slot = slot
        """Slot index within the layer's cache that the bytes go to."""
        self.step = step
        """Forward step the transfer was decided in (and, for a prefetch, the step it predicts for)."""
        self.after_transfer: Transfer | None = None
        """The slot's previous occupant, evicted while its copy was running: start no earlier than its end."""
        self.after_compute: int | None = None
        """An expert of this layer step that must finish computing first: start no earlier than its compute
        ends (the slot's previous occupant, or with `serial_loads` the expert computed just before)."""
        self.reuses_slot_of: int | None = None
        """An expert of this layer step, computed before this load, whose slot this load takes (it is no
        longer in the cache: an engine computes it from this slot before these bytes land)."""
        self.state = QUEUED
        self.used = False
        """Prefetch: its expert was routed in the step and layer it was fetched for."""
        self.start_at = -1.0
        """Engine bookkeeping: when the copy started (s)."""
        self.end_at = -1.0
        """Engine bookkeeping: when the copy landed (s)."""

    def __repr__(self) -> str:
        return f"Transfer(L{self.layer} E{self.expert} {self.precision} {self.kind} {self.state})"


@dataclass
class LayerPlan:
    """What layer `layer` of forward step `step` does with its routed experts (made by `on_route`)."""

    layer: int
    step: int
    gpu_work: list[tuple[int, int, str, Transfer | None]] = field(default_factory=list)
    """(expert, tokens, precision, transfer to wait for or None) in GPU compute order: hits, substitutes,
    loads."""
    hits: list[int] = field(default_factory=list)
    """Routed experts resident or in flight, in compute order."""
    loads: list[Transfer] = field(default_factory=list)
    """On-demand transfers, in issue (and compute) order."""
    cpu_experts: list[int] = field(default_factory=list)
    substitutions: list[tuple[int, int]] = field(default_factory=list)
    """(routed expert, speculated expert computed in its place)."""
    evictions: list[int] = field(default_factory=list)
    cancelled: list[Transfer] = field(default_factory=list)
    """Queued transfers the engine drops (stale prefetches of this layer, or ones whose slot a load took)."""
    promoted: list[Transfer] = field(default_factory=list)
    """Queued prefetches of this layer now needed: the engine moves them ahead as on-demand loads."""
    cpu_work: list[tuple[int, int]] = field(default_factory=list)
    """(expert, tokens) computed on the CPU."""


class _LayerCache:
    """One layer's slots: expert -> the Transfer that brought it (state DONE once landed)."""

    def __init__(self, slots: int, policy) -> None:
        self.slots = slots
        self.resident: dict[int, Transfer] = {}
        self.free = list(range(slots - 1, -1, -1))
        """Free slot indices (pop() gives the lowest)."""
        self.pinned: set[int] = set()
        self.pending: dict[int, Transfer] = {}
        """Prefetches issued for this layer's next route, by expert."""
        self.selected: set[int] = set()
        """Experts the prefetch policy picked for this layer's next route (resident ones included)."""
        self.policy = policy


class OffloadController:
    """Per-layer expert caches and all policy decisions for one model, budget and policy."""

    def __init__(self, spec: ModelSpec, policy: PolicyConfig, expert_budget_bytes: int, *,
                 decode_prefetch_count: int | None = None, future: FutureAccess | None = None,
                 popularity: np.ndarray | None = None, score_fn: ScoreFn | None = None) -> None:
        """spec: the model's shapes; expert_budget_bytes: fast memory for routed experts (the budget minus
        non-expert weights, shared experts and KV cache); decode_prefetch_count: Fate's n (experts prefetched
        per layer ahead in decode, `sim.policies.prefetch.decode_prefetch_count`; needed by prefetch `fate`);
        future: the trace's routing (belady, oracle); popularity: [L, E] routing counts (popularity
        allocation); score_fn: the learned predictor."""
        self.spec = spec
        self.policy = policy
        self.expert_budget_bytes = int(expert_budget_bytes)
        num_layers, num_experts, top_k = spec.num_moe_layers, spec.num_experts, spec.top_k
        self.num_layers = num_layers
        self.precision = PrecisionPolicy(policy.precision, policy.int2_rate)
        self.miss = MissPolicy(policy.miss, policy.miss_precision)
        self.slot_bytes = spec.expert_bytes(slot_precision(policy))
        """Bytes of one slot: the largest precision this policy loads."""
        if policy.eviction == "belady" and future is None:
            raise UserError("eviction 'belady' needs the trace's future routing (only the simulator has it)")
        if policy.prefetch == "fate" and decode_prefetch_count is None:
            raise ValueError("prefetch 'fate' needs decode_prefetch_count (sim.policies.prefetch.decode_prefetch_count)")
        total_slots = max(0, self.expert_budget_bytes) // self.slot_bytes
        reserve = top_k if self.miss.loads_on_miss() else 0
        alloc = allocate(policy.allocation, total_slots=total_slots, num_layers=num_layers, num_experts=num_experts,
                         top_k=top_k, shallow_layers=policy.shallow_layers, popularity=popularity, reserve=reserve)
        self.slots_per_layer: list[int] = list(alloc.slots_per_layer)
        """Expert slots of each MoE layer; sum * slot_bytes <= expert_budget_bytes."""
        self.caches = [_LayerCache(s, make_eviction(policy.eviction, s, layer, future))
                       for layer, s in enumerate(self.slots_per_layer)]
        self.prefetch = PrefetchPolicy(policy.prefetch, policy.confidence, policy.prefetch_count,
                                       decode_prefetch_count or 1)
        self.prediction_limit = max(top_k, policy.prefetch_count, self.prefetch.fate_decode_count)
        """Most candidates per layer ahead any decode prediction needs."""
        self.predictor = make_predictor(policy.prediction, num_layers=num_layers, num_experts=num_experts,
                                        top_k=top_k, depth=policy.lookahead, eap_history=policy.eap_history,
                                        limit=self.prediction_limit, future=future, score_fn=score_fn)
        self._max_slots = self.expert_budget_bytes // self.slot_bytes
        """Most slots the budget holds (the invariant `_insert` checks)."""
        self.step = -1
        self.phase = "decode"
        self.occupied_slots = 0
        self.peak_slots = 0
        """Most slots ever occupied at once (queued, in flight or resident)."""
        self._stats = _new_stats(num_layers)
        preload_precision = loaded_precisions(policy)[0]
        for layer, experts in enumerate(alloc.pinned):
            cache = self.caches[layer]
            for expert in experts:
                t = self._insert(cache, layer, expert, preload_precision, "preload", cache.free.pop())
                t.state = DONE
                cache.pinned.add(expert)

    @property
    def stats(self) -> dict:
        """Counters the metrics module reads (hits, misses, prefetch outcomes, bytes by kind).

        `routed_predictable` counts the routed pairs of layers > 0, which a predictor at an earlier layer
        could foresee."""
        st = self._stats
        routed = st["routed_per_layer"]
        st["hits"] = sum(st["hits_per_layer"])
        st["misses"] = sum(routed) - st["hits"]
        st["routed_predictable"] = sum(routed) - (routed[0] if routed else 0)
        return st

    # --- engine hooks ------------------------------------------------------------------------------
    def start_forward(self, step: int, phase: str, num_tokens: int) -> None:
        """A new forward step begins: `phase` "prefill" (num_tokens prompt tokens) or "decode" (1)."""
        self.step = step
        self.phase = phase
        self.predictor.begin_step(step, phase)

    def on_transfer_started(self, t: Transfer) -> None:
        if t.state == QUEUED:
            t.state = STARTED

    def on_transfer_done(self, t: Transfer) -> None:
        t.state = DONE
        st = self._stats
        if t.kind == "demand":
            st["bytes_on_demand"] += t.nbytes
        else:
            st["bytes_prefetched"] += t.nbytes
            if t.used:
                st["bytes_prefetch_used"] += t.nbytes

    def on_gate_input(self, layer: int, signals: Signals) -> list[Transfer]:
        """Layer `layer`'s gate input exists: predict the layers ahead and return the prefetches to issue."""
        if self.policy.prefetch == "none":
            return []
        out: list[Transfer] = []
        # one prediction per layer ahead (distinct targets), nearest first
        for target, experts, scores in self.predictor.predict(layer, signals):
            experts, scores = self.prefetch.select_layer(experts, scores, self.phase)
            if len(experts) == 0:
                continue
            cache = self.caches[target]
            cache.selected.update(experts)
            self._prefetch(cache, target, experts, scores, out)
        self._stats["prefetches_issued"] += len(out)
        return out

    def on_route(self, layer: int, routed_ids: np.ndarray | Sequence[int],
                 token_counts: np.ndarray | Sequence[int]) -> LayerPlan:
        """Layer `layer` routed its tokens to the distinct experts `routed_ids` (with `token_counts`): plan
        the layer step. Hits compute first (in routed order), then substitutes, then on-demand loads."""
        ids = [int(e) for e in routed_ids]
        tokens = [int(n) for n in token_counts]
        if len(tokens) != len(ids):
            raise ValueError(f"layer {layer}: {len(ids)} routed experts but {len(tokens)} token counts")
        counts = dict(zip(ids, tokens, strict=True))
        cache = self.caches[layer]
        plan = LayerPlan(layer, self.step)
        if self.policy.eviction == "none":  # nothing kept from one step to the next but what the prefetcher picked for this one
            for expert in [e for e, t in cache.resident.items()
                           if t.state == DONE and e not in cache.pinned and e not in cache.selected]:
                self._evict(cache, expert)
        spare = self._settle_prefetches(cache, ids, plan)
        st = self._stats
        st["prefetch_selected"] += len(cache.selected)
        st["prefetch_covered"] += len(cache.selected.intersection(ids))
        cache.selected.clear()
        st["routed_per_layer"][layer] += len(ids)
        for expert in ids:
            t = cache.resident.get(expert)
            if t is not None:
                plan.hits.append(expert)
                plan.gpu_work.append((expert, counts[expert], t.precision, None if t.state == DONE else t))
        st["hits_per_layer"][layer] += len(plan.hits)
        for expert in plan.hits:
            cache.policy.on_access(expert, self.step)
        misses = [e for e in ids if e not in cache.resident]
        if misses:
            self._plan_misses(cache, layer, ids, counts, misses, spare, plan)
        self.predictor.observe(layer, ids)
        return plan

    def resident_bytes(self) -> int:
        """Bytes of fast memory held by expert slots now (slot bytes x occupied slots)."""
        return self.occupied_slots * self.slot_bytes

    # --- prefetch ------------------------------------------------------------------------------------
    def _prefetch(self, cache: _LayerCache, target: int, experts: Sequence[int], scores: Sequence[float],
                  out: list[Transfer]) -> None:
        """Prefetch the picks for layer `target` that are not resident, best first, while a slot can be had
        (a free one, or a landed expert that is not a pick); append their transfers to `out`."""
        picks = set(experts)  # victims are never picks, so which picks are resident stays as it is now
        fetch = [(e, s) for e, s in zip(experts, scores, strict=True) if e not in cache.resident]
        # fate-hybrid prefill: precisions by the predicted token counts of the picks to fetch
        precisions = self.precision.assign(self.phase, [e for e, _ in fetch], [s for _, s in fetch])
        for (expert, _), precision in zip(fetch, precisions, strict=True):
            if cache.free:
                slot = cache.free.pop()
            else:
                victim = self._victim(cache, exclude=picks, incoming=expert, landed="only", from_step=self.step)
                if victim is None:
                    break
                self._evict(cache, victim)
                self._stats["evictions"] += 1
                slot = cache.free.pop()
            t = self._insert(cache, target, expert, precision, "prefetch", slot)
            cache.pending[expert] = t
            out.append(t)

    def _settle_prefetches(self, cache: _LayerCache, routed: list[int], plan: LayerPlan) -> list[int]:
        """The layer routed: its pending prefetches are used (promoted if still queued), cancelled if stale
        and still queued, or left resident as spare speculated experts (returned, in issue order)."""
        st = self._stats
        spare: list[int] = []
        for expert, t in cache.pending.items():
            if expert in routed:
                t.used = True
                st["prefetches_used"] += 1
                if t.state == DONE:
                    st["bytes_prefetch_used"] += t.nbytes
                elif t.state == QUEUED:
                    plan.promoted.append(t)
            elif t.state == QUEUED and self.policy.cancel_stale:
                t.state = CANCELLED
                plan.cancelled.append(t)
                st["prefetches_cancelled"] += 1
            else:
                spare.append(expert)
        for t in plan.cancelled:
            self._evict(cache, t.expert)
        cache.pending = {}
        return spare

    # --- misses --------------------------------------------------------------------------------------
    def _plan_misses(self, cache: _LayerCache, layer: int, ids: list[int], counts: dict[int, int],
                     misses: list[int], spare: list[int], plan: LayerPlan) -> None:
        """Substitutions, CPU work and on-demand loads for the misses of one layer step."""
        load, cpu, substitutions = self.miss.resolve(misses, spare)
        for routed, substitute in substitutions:
            cache.policy.on_access(substitute, self.step)
            t = cache.resident[substitute]
            plan.gpu_work.append((substitute, counts[routed], t.precision, None if t.state == DONE else t))
        plan.substitutions = substitutions
        plan.cpu_experts = cpu
        plan.cpu_work = [(e, counts[e]) for e in cpu]
        if not load:
            return
        if self.miss.name == "lowbit":
            precision_of = dict.fromkeys(load, self.miss.miss_precision)
        else:  # fate-hybrid prefill: by the step's token counts
            precision_of = dict(zip(ids, self.precision.assign(self.phase, ids, [counts[e] for e in ids]), strict=True))
        in_use = set(ids) | {s for _, s in substitutions}
        whole_step_min = self.policy.eviction == "belady" and len(ids) > cache.slots
        for expert in load:
            t = self._load(cache, layer, expert, precision_of[expert], in_use, whole_step_min, plan)
            if self.policy.serial_loads and plan.gpu_work:  # after every expert before it, this one last
                t.after_compute = plan.gpu_work[-1][0]
            plan.loads.append(t)
            plan.gpu_work.append((expert, counts[expert], t.precision, t))

    def _load(self, cache: _LayerCache, layer: int, expert: int, precision: str, in_use: set[int],
              whole_step_min: bool, plan: LayerPlan) -> Transfer:
        """An on-demand load of `expert` into a free slot, or the slot of the policy's victim among experts not
        in use by this step (landed ones first): a victim still queued is cancelled, one still copying
        finishes first. When every slot holds an expert of this step, the slot of the one computed earliest
        (the load starts once it has computed).

        `whole_step_min` (Belady in a step that routes more experts than the layer has slots, i.e. prefill):
        true MIN over the step's compute order instead: every unpinned expert may go, the experts this step
        computes earlier included, and the one whose next use after this step is farthest goes."""
        reused = old = None
        if cache.free:
            slot = cache.free.pop()
        else:
            if whole_step_min:
                victim = self._victim(cache, exclude=(), incoming=expert, landed="any", from_step=self.step + 1)
            else:
                victim = self._victim(cache, exclude=in_use, incoming=expert, landed="first",
                                      from_step=self.step + 1)
            if victim is None:
                victim = self._computed_victim(cache, layer, plan)
            if any(victim == e for e, _, _, _ in plan.gpu_work):
                reused = victim
            old = self._evict(cache, victim)
            plan.evictions.append(victim)
            self._stats["evictions"] += 1
            slot = cache.free.pop()
        t = self._insert(cache, layer, expert, precision, "demand", slot)
        if reused is not None:  # computed before this load starts, so its bytes have landed by then
            t.after_compute = t.reuses_slot_of = reused
        elif old is not None and old.state == QUEUED:  # never started: no byte of it need move
            old.state = CANCELLED
            plan.cancelled.append(old)
            self._stats["prefetches_cancelled"] += 1
        elif old is not None and old.state == STARTED:
            t.after_transfer = old
        return t

    def _computed_victim(self, cache: _LayerCache, layer: int, plan: LayerPlan) -> int:
        """When every slot holds an expert of this very step: the one computed earliest (not pinned)."""
        for expert, _, _, _ in plan.gpu_work:
            if expert in cache.resident and expert not in cache.pinned:
                return expert
        raise UserError(f"layer {layer} has {cache.slots} slots, all pinned; lower the pinned share or raise the "
                        "budget")

    # --- cache bookkeeping -----------------------------------------------------------------------------
    def _victim(self, cache: _LayerCache, *, exclude: Collection[int], incoming: int, landed: str,
                from_step: int) -> int | None:
        """The eviction policy's choice among the experts of `cache` that may go (not pinned, not in `exclude`)
        for `incoming`; `landed`: "first" (those whose bytes have landed, if any), "only" or "any". Future
        uses (Belady) count from step `from_step` on. None if none may go."""
        evictable = [e for e in cache.resident if e not in exclude and e not in cache.pinned]
        pool = set(evictable)
        if landed != "any":
            done = {e for e in evictable if cache.resident[e].state == DONE}
            pool = done if done or landed == "only" else pool
        if not pool:
            return None
        return cache.policy.victim(pool, incoming, from_step)

    def _insert(self, cache: _LayerCache, layer: int, expert: int, precision: str, kind: str, slot: int) -> Transfer:
        t = Transfer(layer, expert, precision, self.spec.expert_bytes(precision), kind, slot, self.step)
        cache.resident[expert] = t
        cache.policy.on_insert(expert, self.step)
        self.occupied_slots += 1
        self.peak_slots = max(self.peak_slots, self.occupied_slots)
        assert self.occupied_slots <= self._max_slots, "expert budget exceeded"
        return t

    def _evict(self, cache: _LayerCache, expert: int) -> Transfer:
        t = cache.resident.pop(expert)
        if cache.pending.get(expert) is t:
            del cache.pending[expert]
        cache.policy.on_remove(expert)
        cache.free.append(t.slot)
        self.occupied_slots -= 1
        return t


def _new_stats(num_layers: int) -> dict:
    return {
        "hits": 0, "misses": 0, "hits_per_layer": [0] * num_layers, "routed_per_layer": [0] * num_layers,
        "routed_predictable": 0, "prefetches_issued": 0, "prefetches_used": 0, "prefetches_cancelled": 0,
        "prefetch_covered": 0, "prefetch_selected": 0, "evictions": 0, "bytes_on_demand": 0, "bytes_prefetched": 0,
        "bytes_prefetch_used": 0,
    }
