"""Eviction: which resident expert of a layer's cache makes room for an incoming one.

One policy object per MoE layer. The controller owns the cache contents (which experts are resident, in
flight or pinned) and asks the policy only two things: keep your bookkeeping up to date (`on_insert`,
`on_access`, `on_remove`) and pick a victim among the experts it may evict (`victim`). Candidates exclude
pinned experts and experts in use by the current layer step (and the controller offers landed experts
first), so every policy here is "the classic algorithm restricted to the evictable set".

- `lru`: least recently used.
- `lfu`: least frequently used since insertion (in-cache frequency), ties broken by recency.
- `arc`: adaptive replacement cache (Megiddo & Modha, FAST 2003) with recency list T1, frequency list T2,
  their ghost lists B1, B2 and the adaptive target p; capacity c = the layer's slots.
- `belady`: evict the expert whose next use lies farthest in the future (needs `FutureAccess`; the bound).
- `none`: no reuse: before each layer step the controller drops every landed expert of the layer but those
  the prefetcher picked for this step (pure load on demand without a prefetcher; with one, a stream of
  experts fetched ahead of their layer and dropped after it, as in Speculating Experts' engine).
"""

from __future__ import annotations

import bisect
from collections import OrderedDict
from collections.abc import Sequence
from functools import cached_property
from itertools import chain

import numpy as np

EVICTIONS = ("lru", "lfu", "arc", "belady", "none")
"""Valid eviction policy names."""

NEVER = 1 << 62
"""Next-use step of an expert that is never used again."""


class FutureAccess:
    """The trace's future, for Belady eviction and the oracle predictor.

    Built from the routes of every (forward step, MoE layer) in flat arrays: row s * L + l of
    `route_ids` / `route_counts` (from `route_ptr[row]` to `route_ptr[row + 1]`) holds the experts that step
    and layer route to, ascending, and the tokens each receives."""

    def __init__(self, route_ptr: np.ndarray, route_ids: np.ndarray, route_counts: np.ndarray, num_layers: int,
                 num_experts: int) -> None:
        self.route_ptr, self.route_ids, self.route_counts = route_ptr, route_ids, route_counts
        self.num_layers, self.num_experts = num_layers, num_experts

    @cached_property
    def _uses(self) -> tuple[np.ndarray, np.ndarray]:
        """(use_ptr, use_steps), built on first use: only Belady asks for them (~60 ms on a 1M-route log)."""
        rows = np.repeat(np.arange(len(self.route_ptr) - 1, dtype=np.int64), np.diff(self.route_ptr))
        cells = self.num_layers * self.num_experts
        key = (rows % self.num_layers) * self.num_experts + self.route_ids  # (layer, expert) of each route entry
        # entries are in step order, so a stable sort keeps each key's steps ascending; numpy sorts 16-bit
        # keys stably by radix sort, ~4x faster than int64's merge sort, with the same order
        order = np.argsort(key.astype(np.uint16) if cells <= 1 << 16 else key, kind="stable")
        use_ptr = np.zeros(cells + 1, np.int64)
        np.cumsum(np.bincount(key, minlength=cells), out=use_ptr[1:])
        return use_ptr, (rows // self.num_layers)[order]

    @property
    def use_ptr(self) -> np.ndarray:
        """[L * E + 1]: the steps routing (layer l, expert e) are use_steps[use_ptr[l * E + e]:use_ptr[l * E + e + 1]]."""
        return self._uses[0]

    @property
    def use_steps(self) -> np.ndarray:
        """Steps routing each (layer, expert), ascending (see `use_ptr`)."""
        return self._uses[1]

    @classmethod
    def from_routes(cls, routes: Sequence[Sequence[tuple[np.ndarray, np.ndarray]]], num_layers: int,
                    num_experts: int | None = None) -> FutureAccess:
        """From `routes[step][layer] = (expert_ids ascending, token_counts)`."""
        flat = [pair for layers in routes for pair in layers]
        ids = np.concatenate([np.asarray(i, np.int64) for i, _ in flat]) if flat else np.zeros(0, np.int64)
        counts = np.concatenate([np.asarray(c, np.int64) for _, c in flat]) if flat else np.zeros(0, np.int64)
        ptr = np.zeros(len(flat) + 1, np.int64)
        np.cumsum([len(i) for i, _ in flat], out=ptr[1:])
        return cls(ptr, ids, counts, num_layers, num_experts or int(ids.max(initial=-1)) + 1)

    def next_use(self, layer: int, expert: int, step: int) -> int:
        """First step >= `step` in which `layer` routes to `expert`, or NEVER."""
        k = layer * self.num_experts + expert
        lo, hi = self.use_ptr[k], self.use_ptr[k + 1]
        i = lo + bisect.bisect_left(self.use_steps[lo:hi], step)
        return int(self.use_steps[i]) if i < hi else NEVER

    def routed(self, step: int, layer: int) -> tuple[np.ndarray, np.ndarray]:
        """(expert_ids, token_counts) of `layer` in forward step `step`."""
        row = step * self.num_layers + layer
        lo, hi = self.route_ptr[row], self.route_ptr[row + 1]
        return self.route_ids[lo:hi], self.route_counts[lo:hi]

    def step_routes(self, step: int) -> list[tuple[np.ndarray, np.ndarray]]:
        """`routed(step, l)` of every layer l."""
        return [self.routed(step, layer) for layer in range(self.num_layers)]


class LRU:
    """Least recently used."""

    name = "lru"

    def __init__(self, capacity: int) -> None:
        self.order: OrderedDict[int, None] = OrderedDict()
        """Resident experts, least recently used first."""

    def on_insert(self, expert: int, step: int) -> None:
        self.order[expert] = None
        self.order.move_to_end(expert)

    def on_access(self, expert: int, step: int) -> None:
        self.order.move_to_end(expert)

    def on_remove(self, expert: int) -> None:
        self.order.pop(expert, None)

    def victim(self, candidates: set[int], incoming: int | None, step: int) -> int:
        for expert in self.order:
            if expert in candidates:
                return expert
        raise ValueError("no evictable expert among the candidates")


class LFU:
    """Least frequently used since insertion; ties go to the least recently used."""

    name = "lfu"

    def __init__(self, capacity: int) -> None:
        self.count: dict[int, int] = {}
        """Uses of each resident expert since it was inserted."""
        self.last: dict[int, int] = {}
        """Tick of each resident expert's last use (a counter, not a time)."""
        self._tick = 0

    def on_insert(self, expert: int, step: int) -> None:
        self._tick += 1
        self.count[expert] = 1
        self.last[expert] = self._tick

    def on_access(self, expert: int, step: int) -> None:
        self._tick += 1
        self.count[expert] += 1
        self.last[expert] = self._tick

    def on_remove(self, expert: int) -> None:
        self.count.pop(expert, None)
        self.last.pop(expert, None)

    def victim(self, candidates: set[int], incoming: int | None, step: int) -> int:
        return min(candidates, key=lambda e: (self.count[e], self.last[e]))


class ARC:
    """Adaptive replacement cache (Megiddo & Modha, FAST 2003): T1 (seen once), T2 (seen twice or more),
    ghosts B1, B2 of recently evicted experts, and the adaptive target p for |T1|.

    A miss on a ghost first adapts p (a B1 ghost grows it by max(|B2| / |B1|, 1), a B2 ghost shrinks it by
    max(|B1| / |B2|, 1), from the list sizes before anything is evicted for it), then REPLACE picks the
    victim, then the expert enters T2 (a ghost) or T1 (new). The controller asks `victim(candidates, x)`
    before `on_insert(x)` whenever x needs an occupied slot, so that order holds; with a free slot,
    `on_insert` adapts p itself."""

    name = "arc"

    def __init__(self, capacity: int) -> None:
        self.c = max(1, capacity)
        """Cache size in experts (the layer's slots)."""
        self.p = 0.0
        """Adaptive target size of T1."""
        self.t1: OrderedDict[int, None] = OrderedDict()
        self.t2: OrderedDict[int, None] = OrderedDict()
        self.b1: OrderedDict[int, None] = OrderedDict()
        self.b2: OrderedDict[int, None] = OrderedDict()
        self._adapted_for: int | None = None
        """The incoming expert p was last adapted for (by `victim`), until it is inserted."""

    def _adapt(self, incoming: int | None) -> None:
        """Adapt p to a ghost hit of `incoming` (once per insertion)."""
        if incoming is None or incoming == self._adapted_for:
            return
        self._adapted_for = incoming
        b1, b2 = self.b1, self.b2
        if incoming in b1:
            self.p = min(float(self.c), self.p + max(len(b2) / len(b1), 1.0))
        elif incoming in b2:
            self.p = max(0.0, self.p - max(len(b1) / len(b2), 1.0))

    def victim(self, candidates: set[int], incoming: int | None, step: int) -> int:
        """ARC's REPLACE for `incoming`: the least recently used of T1 if |T1| exceeds p (or equals it and
        `incoming` is a B2 ghost), else of T2; the other list when the first holds no candidate."""
        self._adapt(incoming)
        t1, t2 = self.t1, self.t2
        n1 = len(t1)
        if n1 and (n1 > self.p or (n1 == self.p and incoming in self.b2)):
            order = chain(t1, t2)
        else:
            order = chain(t2, t1)
        for expert in order:
            if expert in candidates:
                return expert
        raise ValueError("no evictable expert among the candidates")

    def on_insert(self, expert: int, step: int) -> None:
        self._adapt(expert)  # no-op when `victim` adapted p for it already
        self._adapted_for = None
        if expert in self.b1:  # a ghost hit: to the frequent list
            del self.b1[expert]
            self.t2[expert] = None
        elif expert in self.b2:
            del self.b2[expert]
            self.t2[expert] = None
        else:
            self.t1[expert] = None
        self._trim_ghosts()

    def on_access(self, expert: int, step: int) -> None:
        self.t1.pop(expert, None)
        self.t2[expert] = None
        self.t2.move_to_end(expert)

    def on_remove(self, expert: int) -> None:
        """An evicted expert leaves a ghost in B1 (from T1) or B2 (from T2)."""
        if expert in self.t1:
            del self.t1[expert]
            self.b1[expert] = None
        elif expert in self.t2:
            del self.t2[expert]
            self.b2[expert] = None
        self._trim_ghosts()

    def _trim_ghosts(self) -> None:
        """Forget the oldest ghosts while |T1| + |B1| > c or all four lists hold more than 2c."""
        t1, b1, b2, c = self.t1, self.b1, self.b2, self.c
        while b1 and len(t1) + len(b1) > c:
            b1.popitem(False)
        while b2 and len(t1) + len(self.t2) + len(b1) + len(b2) > 2 * c:
            b2.popitem(False)


class _NoBookkeeping:
    """Policies whose victim needs no record of past accesses: every notification is ignored."""

    def on_insert(self, expert: int, step: int) -> None:
        pass

    def on_access(self, expert: int, step: int) -> None:
        pass

    def on_remove(self, expert: int) -> None:
        pass


class Belady(_NoBookkeeping):
    """Evict the candidate whose next use is farthest away (ties: the lowest expert id)."""

    name = "belady"

    def __init__(self, capacity: int, layer: int, future: FutureAccess) -> None:
        self.layer = layer
        self.future = future

    def victim(self, candidates: set[int], incoming: int | None, step: int) -> int:
        nxt = self.future.next_use
        return max(sorted(candidates), key=lambda e: nxt(self.layer, e, step))


class NoReuse(_NoBookkeeping):
    """`none`: no bookkeeping (the controller empties the layer before each step); victim = lowest id."""

    name = "none"

    def __init__(self, capacity: int) -> None:
        pass

    def victim(self, candidates: set[int], incoming: int | None, step: int) -> int:
        return min(candidates)


EvictionPolicy = LRU | LFU | ARC | Belady | NoReuse


def make_eviction(name: str, capacity: int, layer: int, future: FutureAccess | None) -> EvictionPolicy:
    """The eviction policy `name` for one layer of `capacity` slots."""
    if name == "lru":
        return LRU(capacity)
    if name == "none":
        return NoReuse(capacity)
    if name == "lfu":
        return LFU(capacity)
    if name == "arc":
        return ARC(capacity)
    if name == "belady":
        if future is None:
            raise ValueError("belady eviction needs the future access sequence")
        return Belady(capacity, layer, future)
    raise ValueError(f"unknown eviction {name!r}; choose one of {', '.join(EVICTIONS)}")


def simulate_cache(name: str, capacity: int, accesses: Sequence[int]) -> tuple[list[bool], list[int | None]]:
    """Run a single cache of `capacity` over an access string; return (hit per access, victim per access).

    The reference semantics of each policy on its own (one expert per step, nothing in flight); the
    tests check hand-computed sequences against it.
    """
    future = FutureAccess.from_routes([[(np.array([a]), np.array([1]))] for a in accesses], num_layers=1)
    policy = make_eviction(name, capacity, 0, future)
    resident: set[int] = set()
    hits: list[bool] = []
    victims: list[int | None] = []
    for step, expert in enumerate(accesses):
        if expert in resident:
            policy.on_access(expert, step)
            hits.append(True)
            victims.append(None)
            continue
        victim = None
        if len(resident) >= capacity:
            victim = policy.victim(resident - {expert}, expert, step + 1)
            resident.discard(victim)
            policy.on_remove(victim)
        resident.add(expert)
        policy.on_insert(expert, step)
        hits.append(False)
        victims.append(victim)
    return hits, victims
