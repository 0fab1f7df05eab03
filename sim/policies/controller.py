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
controller knows which prefetches are still queued: those that went stale are cancelled (the engine drops
them) and those now needed are promoted (the engine moves them ahead as on-demand loads).

Memory: a slot is taken when the controller decides a transfer (no later than the transfer starts) and
freed when its expert is evicted. A transfer into a slot whose previous occupant is still in flight or
still to be computed in this layer step says so (`after_transfer`, `after_compute`); the engine starts
it no earlier. So the slot count, and with it the expert bytes, never exceeds the budget.

No simpy, no torch: realrun imports this module.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

import numpy as np

from sim.costs import CostModel
from sim.hardware import HardwareProfile
from sim.modelspec import ModelSpec
from sim.policies.allocation import allocate
from sim.policies.eviction import FutureAccess, make_eviction
from sim.policies.miss import MissPolicy
from sim.policies.precision import PrecisionPolicy, largest
from sim.policies.prediction import LookaheadPredictor, Signals, make_predictor
from sim.policies.prefetch import PrefetchPolicy, fate_decode_count
from sim.policies.presets import PolicyConfig
from traces.errors import UserError

QUEUED, STARTED, DONE, CANCELLED = "queued", "started", "done", "cancelled"
"""Transfer states, in the order a transfer passes through them (or queued -> cancelled)."""


class Transfer:
    """One expert copy into fast memory, decided by the controller, carried out by an engine."""

    __slots__ = ("layer", "expert", "precision", "nbytes", "kind", "slot", "step", "after_transfer",
                 "after_compute", "state", "used", "start_at", "end_at")

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
        """The slot's previous occupant, still in flight: start no earlier than its end."""
        self.after_compute: int | None = None
        """An expert of this layer step that held the slot: start no earlier than its compute ends."""
        self.state = QUEUED
        self.used = False
        """Prefetch: its expert was routed in the step and layer it was fetched for."""
        self.start_at = -1.0
        """Engine bookkeeping: when the copy started (s)."""
        self.end_at = -1.0
        """Engine bookkeeping: when the copy landed (s)."""

    def __repr__(self) -> str:
        return f"Transfer(L{self.layer} E{self.expert} {self.precision} {self.kind} {self.state})"


class _NoItems(list):
    """The shared, empty, read-only list that LayerPlan fields start as (they are replaced, never mutated)."""

    def _refuse(self, *args, **kwargs):
        raise TypeError("a LayerPlan's empty default is shared: assign a new list instead")

    append = extend = insert = remove = pop = clear = sort = reverse = _refuse
    __setitem__ = __delitem__ = __iadd__ = __imul__ = _refuse


NO_ITEMS = _NoItems()


class LayerPlan:
    """What layer `layer` of forward step `step` does with its routed experts (made by `on_route`).

    Speed: every field is a slot (read at slot speed by the engine on every layer step), made with no
    `__init__` (`LayerPlan()` ~0.1 µs; a constructor with arguments ~0.4 µs) and filled by `on_route`; the fields
    most layer steps leave empty share the read-only empty list `NO_ITEMS` until there is something to
    say, so a decode layer step with every expert resident allocates one list, not nine."""

    __slots__ = ("layer", "step", "gpu_work", "hits", "loads", "cpu_experts", "substitutions", "evictions",
                 "cancelled", "promoted", "cpu_work")

    layer: int
    step: int
    gpu_work: list[tuple[int, int, str, Transfer | None]]
    """(expert, tokens, precision, transfer to wait for or None) in GPU compute order: hits, substitutes,
    loads."""
    hits: list[int]
    """Routed experts resident or in flight, in compute order."""
    loads: list[Transfer]
    """On-demand transfers, in issue (and compute) order."""
    cpu_experts: list[int]
    substitutions: list[tuple[int, int]]
    """(routed expert, speculated expert computed in its place)."""
    evictions: list[int]
    cancelled: list[Transfer]
    """Queued prefetches of this layer that went stale: the engine drops them."""
    promoted: list[Transfer]
    """Queued prefetches of this layer now needed: the engine moves them ahead as on-demand loads."""
    cpu_work: list[tuple[int, int]]
    """(expert, tokens) computed on the CPU."""


class _LayerCache:
    """One layer's slots: expert -> the Transfer that brought it (state DONE once landed)."""

    __slots__ = ("slots", "resident", "free", "pinned", "pending", "selected", "policy")

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

    def __init__(self, spec: ModelSpec, policy: PolicyConfig, expert_budget_bytes: int, *, hw: HardwareProfile,
                 future: FutureAccess | None = None, popularity: np.ndarray | None = None,
                 score_fn: Callable[[int, Signals], np.ndarray] | None = None) -> None:
        """spec/hw: shapes and speeds; expert_budget_bytes: fast memory for routed experts (the budget minus
        non-expert weights, shared experts and KV cache); future: the trace's routing (belady, oracle);
        popularity: [L, E] routing counts (popularity allocation); score_fn: the learned predictor."""
        self.spec = spec
        self.policy = policy
        self.expert_budget_bytes = int(expert_budget_bytes)
        num_layers, num_experts, top_k = spec.num_moe_layers, spec.num_experts, spec.top_k
        self.num_layers = num_layers
        self._num_experts = num_experts
        self.precision = PrecisionPolicy(policy.precision, policy.int2_rate)
        self.miss = MissPolicy(policy.miss, policy.miss_precision)
        stored = self.precision.storage_precisions()
        if policy.miss == "lowbit":
            stored = stored + (policy.miss_precision,)
        self.slot_bytes = spec.expert_bytes(largest(stored))
        """Bytes of one slot: the largest precision this policy loads."""
        if policy.eviction == "belady" and future is None:
            raise UserError("eviction 'belady' needs the trace's future routing (only the simulator has it)")
        total_slots = max(0, self.expert_budget_bytes) // self.slot_bytes
        reserve = 0 if not self.miss.loads_on_miss() else top_k
        alloc = allocate(policy.allocation, total_slots=total_slots, num_layers=num_layers, num_experts=num_experts,
                         top_k=top_k, shallow_layers=policy.shallow_layers, popularity=popularity, reserve=reserve)
        self.slots_per_layer: list[int] = list(alloc.slots_per_layer)
        """Expert slots of each MoE layer; sum * slot_bytes <= expert_budget_bytes."""
        self.caches = [_LayerCache(s, make_eviction(policy.eviction, s, layer, future, num_experts))
                       for layer, s in enumerate(self.slots_per_layer)]
        costs = CostModel(spec, hw)
        self.prefetch = PrefetchPolicy(
            policy.prefetch, policy.confidence, policy.prefetch_count,
            fate_decode_count(costs.decode_layer_s("int4"), costs.transfer_s(spec.expert_bytes("int4"))))
        limit = max(top_k, policy.prefetch_count, self.prefetch.fate_decode_count)
        self.prediction_limit = limit
        """Most candidates per layer ahead any decode prediction needs."""
        self.predictor = make_predictor(policy.prediction, num_layers=num_layers, num_experts=num_experts,
                                        top_k=top_k, depth=policy.lookahead, eap_history=policy.eap_history,
                                        limit=limit, future=future, score_fn=score_fn)
        self._predict, self._select = self.predictor.predict, self.prefetch.select_layer
        """Bound once: on_gate_input runs on every layer step."""
        keep = self.prefetch.decode_prefix()
        self.ranked_picks: int | None = None
        """Decode with rankings sorted in advance (`Signals.lookahead_rank`), a one-layer look-ahead predictor
        and a prefetch policy that keeps a fixed number of its best: predict + select pick this many of the
        next layer's best-ranked experts (`on_gate_input` then takes them without either call, and a decode
        ranking needs no more candidates than this)."""
        if isinstance(self.predictor, LookaheadPredictor) and self.predictor.depth == 1 and keep is not None:
            self.ranked_picks = min(self.predictor.decode_limit, keep)
        self._bytes = {p: spec.expert_bytes(p) for p in ("bf16", "int8", "int4", "int2")}
        """Bytes of one expert in each precision."""
        self._max_slots = self.expert_budget_bytes // self.slot_bytes
        """Most slots the budget holds (the invariant `_insert` checks)."""
        self._no_reuse = policy.eviction == "none"
        self._loads_every_miss = policy.miss in ("wait", "lowbit")
        """Whether the miss policy loads every miss (no CPU work, no substitutes): `_load_misses` applies."""
        self._no_prefetch = policy.prefetch == "none"
        self._observes = policy.prediction == "eap"
        """Only the EAP predictor learns from routes (the others' observe is a no-op)."""
        self.step = -1
        self.phase = "decode"
        self._load_precision = self._uniform_load_precision()
        """Precision of every on-demand load in this forward step, or None when it depends on the experts."""
        self._prefetch_precision = self.precision.uniform(self.phase)
        """Precision of every prefetch in this forward step, or None when it depends on the experts."""
        self.occupied_slots = 0
        self.peak_slots = 0
        """Most slots ever occupied at once (queued, in flight or resident)."""
        self._stats = _new_stats(num_layers)
        self._hits_per_layer: list[int] = self._stats["hits_per_layer"]
        self._routed_per_layer: list[int] = self._stats["routed_per_layer"]
        for layer, experts in enumerate(alloc.pinned):
            cache = self.caches[layer]
            for expert in experts:
                t = self._insert(cache, layer, expert, stored[0], "preload", cache.free.pop())
                t.state = DONE
                cache.pinned.add(expert)

    @property
    def stats(self) -> dict:
        """Counters the metrics module reads (hits, misses, prefetch outcomes, bytes by kind).

        The totals `hits`, `misses` and `routed_predictable` (routed to layers > 0, which a predictor at an
        earlier layer could foresee) are summed from the per-layer counts on each read; speed: that keeps
        three dict updates off every layer step."""
        st = self._stats
        hits, routed = st["hits_per_layer"], st["routed_per_layer"]
        st["hits"] = sum(hits)
        st["misses"] = sum(routed) - st["hits"]
        st["routed_predictable"] = sum(routed) - (routed[0] if routed else 0)
        return st

    # --- engine hooks ------------------------------------------------------------------------------
    def start_forward(self, step: int, phase: str, num_tokens: int) -> None:
        """A new forward step begins: `phase` "prefill" (num_tokens prompt tokens) or "decode" (1)."""
        self.step = step
        self.phase = phase
        self._load_precision = self._uniform_load_precision()
        self._prefetch_precision = self.precision.uniform(phase)
        self.predictor.begin_step(step, phase)

    def _uniform_load_precision(self) -> str | None:
        """The precision of every on-demand load in the current phase, or None when it depends on the experts."""
        return self.policy.miss_precision if self.miss.name == "lowbit" else self.precision.uniform(self.phase)

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
        if self._no_prefetch:
            return NO_ITEMS
        rank = signals.lookahead_rank
        if rank is not None and self.ranked_picks is not None and signals.num_tokens == 1 and self.phase == "decode":
            return self._prefetch_ranked(layer, rank)
        phase, select, caches = self.phase, self._select, self.caches
        out: list[Transfer] = NO_ITEMS
        # One prediction per layer ahead (distinct targets), so the picks need no grouping by layer.
        for target, experts, scores in self._predict(layer, signals):
            experts, scores = select(experts, scores, phase)
            if not experts:
                continue
            cache = caches[target]
            resident = cache.resident
            cache.selected.update(experts)
            for e in experts:
                if e not in resident:
                    break
            else:  # the common decode case: every pick already resident or in flight
                continue
            if out is NO_ITEMS:
                out = []
            self._prefetch_into(cache, target, experts, scores, out)
        if out:
            self._stats["prefetches_issued"] += len(out)
        return out

    def _prefetch_ranked(self, layer: int, rank: tuple[list[list[int]], list[list[float]]]) -> list[Transfer]:
        """`on_gate_input` for a decode step with pre-sorted rankings where the picks are a fixed prefix of
        the next layer's ranking (`ranked_picks`): the same picks and prefetches as predict + select.

        Speed: runs on every decode layer step under fate; no Prediction, no predictor or prefetch-policy
        call. tests/sim/test_engine_fastpaths.py checks it against the reference engine, which sorts
        instead (`Engine(reference=True)` passes no rankings)."""
        target = layer + 1
        ids = rank[0]
        if target >= self.num_layers or not ids:
            return NO_ITEMS
        n = self.ranked_picks
        experts = ids[0][:n]
        if not experts:
            return NO_ITEMS
        cache = self.caches[target]
        cache.selected.update(experts)
        resident = cache.resident
        for e in experts:
            if e not in resident:
                break
        else:  # the common case: every pick already resident or in flight
            return NO_ITEMS
        out: list[Transfer] = []
        self._prefetch_into(cache, target, experts, rank[1][0][:n], out)
        if out:
            self._stats["prefetches_issued"] += len(out)
        return out

    def _prefetch_into(self, cache: _LayerCache, target: int, experts: Sequence[int], scores: Sequence[float],
                       out: list[Transfer]) -> None:
        """Prefetch the picks for layer `target` that are not resident, best first, while slots can be freed;
        append their transfers to `out`."""
        resident = cache.resident
        wanted = set(experts)  # victims are never picks, so which picks are resident stays as it is now
        fixed = self._prefetch_precision
        if fixed is None:  # fate-hybrid in prefill: by the predicted token counts of the picks to fetch
            items = [(e, s) for e, s in zip(experts, scores, strict=True) if e not in resident]
            precisions = self.precision.assign(self.phase, [e for e, _ in items], [s for _, s in items])
            by_expert = dict(zip([e for e, _ in items], precisions, strict=True))
        for expert in experts:
            if expert in resident:
                continue
            slot = self._free_slot(cache, target, wanted, expert)
            if slot is None:
                break
            t = self._insert(cache, target, expert, fixed or by_expert[expert], "prefetch", slot)
            cache.pending[expert] = t
            out.append(t)

    def on_route(self, layer: int, routed_ids: np.ndarray | list[int],
                 token_counts: np.ndarray | list[int]) -> LayerPlan:
        """Layer `layer` routed its tokens to `routed_ids` (distinct, with `token_counts`): plan its experts.

        Both may be numpy arrays or Python lists (the simulator converts a whole step at once)."""
        cache = self.caches[layer]
        ids = routed_ids if type(routed_ids) is list else routed_ids.tolist()
        tokens = token_counts if type(token_counts) is list else token_counts.tolist()
        n_ids = len(ids)
        if len(tokens) != n_ids:
            raise ValueError(f"layer {layer}: {n_ids} routed experts but {len(tokens)} token counts")
        plan = LayerPlan()
        plan.layer, plan.step, plan.gpu_work = layer, self.step, []
        plan.hits = plan.loads = plan.cpu_experts = plan.substitutions = plan.evictions = NO_ITEMS
        plan.cancelled = plan.promoted = plan.cpu_work = NO_ITEMS
        resident = cache.resident
        if self._no_reuse:
            for expert in [e for e, t in resident.items() if t.state == DONE and e not in cache.pinned]:
                self._evict(cache, expert)
        spare: list[int] = NO_ITEMS
        if cache.pending:
            spare = []
            self._settle_prefetches(cache, ids, plan, spare)
        st = self._stats
        selected = cache.selected
        if selected:
            st["prefetch_selected"] += len(selected)
            covered = 0  # a loop over the few picks: no intersection set to build
            for e in selected:
                if e in ids:
                    covered += 1
            st["prefetch_covered"] += covered
            selected.clear()
        self._routed_per_layer[layer] += n_ids
        # Speed: plain loops, not comprehensions, on the per-layer path (Python 3.11 builds a function object
        # per comprehension, ~0.3 µs, more than the 4-expert loop itself), and an index, not zip (making a zip
        # costs ~0.25 µs, ~0.5 µs with its strict keyword); the expert -> tokens dict is built only when a
        # layer step misses.
        work = plan.gpu_work
        get = resident.get
        i = 0
        for e in ids:
            t = get(e)
            if t is not None:
                work.append((e, tokens[i], t.precision, None if t.state is DONE else t))
            i += 1
        n_hits = len(work)  # so far the work is the hits
        self._hits_per_layer[layer] += n_hits
        if n_hits:
            hits = list(ids) if n_hits == n_ids else [w[0] for w in work]
            if cache.policy.records_accesses:
                cache.policy.on_access_many(hits, self.step)
            plan.hits = hits
        if n_hits < n_ids:
            if self._loads_every_miss and self._load_precision is not None and cache.policy.preference is not None:
                self._load_misses(cache, layer, ids, tokens, plan)
            else:
                misses = []
                for e in ids:
                    if e not in resident:
                        misses.append(e)
                self._plan_misses(cache, layer, ids, dict(zip(ids, tokens, strict=False)), misses, spare, plan)
        if self._observes:
            self.predictor.observe(layer, ids)
        # The budget holds at every instant: `_insert` checks each new peak of occupied slots, the only
        # moments the occupied count can first exceed it (cheaper than a check per layer step).
        return plan

    def _settle_prefetches(self, cache: _LayerCache, routed: list[int], plan: LayerPlan,
                           spare: list[int]) -> None:
        """The layer routed: its pending prefetches are used (promoted if still queued), cancelled if stale
        and still queued, or left resident as spare speculated experts."""
        st = self._stats
        promoted: list[Transfer] = []
        cancelled: list[Transfer] = []
        for expert, t in list(cache.pending.items()):
            if expert in routed:
                t.used = True
                st["prefetches_used"] += 1
                if t.state == DONE:
                    st["bytes_prefetch_used"] += t.nbytes
                elif t.state == QUEUED:
                    promoted.append(t)
            elif t.state == QUEUED and self.policy.cancel_stale:
                t.state = CANCELLED
                cancelled.append(t)
                self._evict(cache, expert)
                st["prefetches_cancelled"] += 1
            else:
                spare.append(expert)
        cache.pending = {}
        if promoted:
            plan.promoted = promoted
        if cancelled:
            plan.cancelled = cancelled

    def _plan_misses(self, cache: _LayerCache, layer: int, ids: list[int], counts: dict[int, int],
                     misses: list[int], spare: list[int], plan: LayerPlan) -> None:
        """Substitutions, CPU work and on-demand loads for the misses of one layer step."""
        resident, work = cache.resident, plan.gpu_work
        load, cpu, substitutions = self.miss.resolve(misses, spare)
        if substitutions:
            policy = cache.policy
            for routed, substitute in substitutions:
                policy.on_access(substitute, self.step)
                t = resident[substitute]
                work.append((substitute, counts[routed], t.precision, None if t.state is DONE else t))
            plan.substitutions = substitutions
        if cpu:
            plan.cpu_experts = cpu
            plan.cpu_work = [(e, counts[e]) for e in cpu]
        if not load:
            return
        fixed = self._load_precision
        if fixed is None:  # fate-hybrid in prefill: by the step's token counts
            every = self.precision.assign(self.phase, ids, [counts[e] for e in ids])
            by_expert = dict(zip(ids, every, strict=True))
        loads: list[Transfer] = []
        plan.loads = loads
        free = cache.free
        for expert in load:
            precision = fixed or by_expert[expert]
            if free:
                t = self._insert(cache, layer, expert, precision, "demand", free.pop())
            else:
                slot, after_t, after_c = self._demand_slot(cache, layer, counts, plan)
                t = self._insert(cache, layer, expert, precision, "demand", slot)
                t.after_transfer, t.after_compute = after_t, after_c
            loads.append(t)
            work.append((expert, counts[expert], precision, t))

    def _load_misses(self, cache: _LayerCache, layer: int, ids: list[int], tokens: list[int],
                     plan: LayerPlan) -> None:
        """`_plan_misses` where the miss policy loads every miss in one precision and the eviction policy
        exposes its `preference`: the same loads, slots and victims in one function.

        Speed: a demand miss is the costliest common event of a replay; this path makes none of the ~8 calls
        (`resolve`, `_demand_slot`, `preference`, `_evict`, `_insert`, ...) per miss that the general path
        does. tests/sim/test_engine_fastpaths.py checks it against the general path for every preset."""
        resident, pinned, policy, free = cache.resident, cache.pinned, cache.policy, cache.free
        precision = self._load_precision
        nbytes, step, work = self._bytes[precision], self.step, plan.gpu_work
        loads: list[Transfer] = []
        plan.loads = loads
        misses = []  # all first: the fallback below may evict a hit routed after the miss being placed
        i = 0
        for expert in ids:
            if expert not in resident:
                misses.append((expert, tokens[i]))
            i += 1
        for expert, n in misses:
            after_t = after_c = None
            if free:
                slot = free.pop()
            else:  # the policy's victim among experts not routed and not pinned, landed ones first
                victim = None
                for e in policy.preference(None):
                    t = resident.get(e)
                    if t is not None and t.state is DONE and e not in ids and e not in pinned:
                        victim = e
                        break
                else:
                    for e in policy.preference(None):
                        if e in resident and e not in ids and e not in pinned:
                            victim = e
                            break
                if victim is None:  # every slot holds an expert of this very step: the general path's fallback
                    slot, after_t, after_c = self._demand_slot(cache, layer, ids, plan)
                else:
                    old = resident.pop(victim)
                    if cache.pending.get(victim) is old:
                        del cache.pending[victim]
                    policy.on_remove(victim)
                    self.occupied_slots -= 1
                    slot = old.slot
                    if old.state is not DONE:
                        after_t = old
                    if plan.evictions is NO_ITEMS:
                        plan.evictions = [victim]
                    else:
                        plan.evictions.append(victim)
                    self._stats["evictions"] += 1
            t = Transfer(layer, expert, precision, nbytes, "demand", slot, step)
            t.after_transfer, t.after_compute = after_t, after_c
            resident[expert] = t
            policy.on_insert(expert, step)
            self.occupied_slots += 1
            if self.occupied_slots > self.peak_slots:
                self.peak_slots = self.occupied_slots
                assert self.peak_slots <= self._max_slots, "expert budget exceeded"
            loads.append(t)
            work.append((expert, n, precision, t))

    # --- internals -----------------------------------------------------------------------------------
    def resident_bytes(self) -> int:
        """Bytes of fast memory held by expert slots now (slot bytes x occupied slots)."""
        return self.occupied_slots * self.slot_bytes

    def _insert(self, cache: _LayerCache, layer: int, expert: int, precision: str, kind: str, slot: int) -> Transfer:
        t = Transfer(layer, expert, precision, self._bytes[precision], kind, slot, self.step)
        cache.resident[expert] = t
        cache.policy.on_insert(expert, self.step)
        self.occupied_slots += 1
        if self.occupied_slots > self.peak_slots:
            self.peak_slots = self.occupied_slots
            assert self.peak_slots <= self._max_slots, "expert budget exceeded"
        return t

    def _evict(self, cache: _LayerCache, expert: int) -> Transfer:
        t = cache.resident.pop(expert)
        if cache.pending.get(expert) is t:
            del cache.pending[expert]
        cache.policy.on_remove(expert)
        cache.free.append(t.slot)
        self.occupied_slots -= 1
        return t

    def _free_slot(self, cache: _LayerCache, layer: int, protected: set[int], incoming: int) -> int | None:
        """A slot for a prefetch: a free one, or one of an arrived, unprotected, unpinned expert; else None."""
        if cache.free:
            return cache.free.pop()
        resident, pinned, policy = cache.resident, cache.pinned, cache.policy
        if policy.preference is not None:  # scans the policy's order: no candidate set to build (see LRU)
            for victim in policy.preference(incoming):
                t = resident.get(victim)
                if t is not None and t.state is DONE and victim not in protected and victim not in pinned:
                    break
            else:
                return None
        else:
            candidates = {e for e, t in resident.items() if t.state == DONE and e not in protected and e not in pinned}
            if not candidates:
                return None
            victim = policy.victim(candidates, incoming, self.step)
        self._stats["evictions"] += 1
        self._evict(cache, victim)
        return cache.free.pop()

    def _demand_slot(self, cache: _LayerCache, layer: int, routed: dict[int, int],
                     plan: LayerPlan) -> tuple[int, Transfer | None, int | None]:
        """A slot for an on-demand load and what must finish before its bytes may land there: the policy's
        victim among experts not routed, not in use by `plan` so far and not pinned, preferring those
        whose bytes landed."""
        # In use: the plan's GPU work so far, i.e. routed experts plus speculated substitutes.
        busy = {s for _, s in plan.substitutions} if plan.substitutions else ()
        resident, pinned, policy = cache.resident, cache.pinned, cache.policy
        if policy.preference is not None:  # scans the policy's order: no candidate sets to build (see LRU)
            victim = None
            for e in policy.preference(None):  # landed experts first
                t = resident.get(e)
                if (t is not None and t.state is DONE and e not in routed and e not in pinned
                        and e not in busy):
                    victim = e
                    break
            else:
                for e in policy.preference(None):
                    if e in resident and e not in routed and e not in pinned and e not in busy:
                        victim = e
                        break
        else:
            others = {e for e in resident if e not in routed and e not in busy and e not in pinned}
            pool = {e for e in others if resident[e].state == DONE} or others
            victim = policy.victim(pool, None, self.step) if pool else None
        if victim is not None:
            t = self._evict(cache, victim)
            plan.evictions = [*plan.evictions, victim]
            self._stats["evictions"] += 1
            return cache.free.pop(), (None if t.state is DONE else t), None
        # every slot holds an expert of this very step: reuse the earliest one computed (not pinned)
        for expert, _, _, _ in plan.gpu_work:
            if expert in resident and expert not in pinned:
                t = self._evict(cache, expert)
                plan.evictions = [*plan.evictions, expert]
                self._stats["evictions"] += 1
                return cache.free.pop(), (None if t.state is DONE else t), expert
        raise UserError(f"layer {layer} has {cache.slots} slots, all pinned; lower the pinned share or raise the budget")

def _new_stats(num_layers: int) -> dict:
    return {
        "hits": 0, "misses": 0, "hits_per_layer": [0] * num_layers, "routed_per_layer": [0] * num_layers,
        "routed_predictable": 0, "prefetches_issued": 0, "prefetches_used": 0, "prefetches_cancelled": 0,
        "prefetch_covered": 0, "prefetch_selected": 0, "evictions": 0, "bytes_on_demand": 0, "bytes_prefetched": 0,
        "bytes_prefetch_used": 0,
    }
