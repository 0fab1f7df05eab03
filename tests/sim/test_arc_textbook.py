"""ARC through replay's own path against Megiddo & Modha's ARC, written here from the paper (FAST 2003, Fig. 4).

On a top-1 decode trace every layer step requests one expert, so each layer's cache sees a plain access
string and replay's hit counts must be those of textbook ARC exactly. On a top-k trace a layer step
requests k experts at once: the reference serves the hits first and then each miss in ascending id
order, REPLACE skipping experts of the same step (they are needed now), which is the controller's rule.
"""

from __future__ import annotations

import numpy as np
import pytest
from sim_fixtures import tiny_profile, tiny_trace

from sim.replay import replay, resolve_spec


class TextbookArc:
    """ARC(c) exactly as the paper's pseudo-code, with an optional set of pages REPLACE may not take."""

    def __init__(self, c: int) -> None:
        self.c, self.p = c, 0.0
        self.t1: list[int] = []  # LRU first
        self.t2: list[int] = []
        self.b1: list[int] = []
        self.b2: list[int] = []

    def resident(self, x: int) -> bool:
        return x in self.t1 or x in self.t2

    def hit(self, x: int) -> None:  # Case I
        (self.t1 if x in self.t1 else self.t2).remove(x)
        self.t2.append(x)

    def _lru(self, pages: list[int], keep: set[int]) -> int | None:
        return next((x for x in pages if x not in keep), None)

    def _replace(self, x: int, keep: set[int]) -> None:
        first, other = ((self.t1, self.b1), (self.t2, self.b2))
        if not (self.t1 and ((x in self.b2 and len(self.t1) == self.p) or len(self.t1) > self.p)):
            first, other = other, first
        for t, b in (first, other):  # the chosen list's LRU page not needed now, else the other list's
            victim = self._lru(t, keep)
            if victim is not None:
                t.remove(victim)
                b.append(victim)
                return
        raise AssertionError("nothing to replace")

    def miss(self, x: int, keep: set[int] = frozenset()) -> None:
        c = self.c
        if x in self.b1:  # Case II
            self.p = min(self.p + max(len(self.b2) / len(self.b1), 1.0), c)
            self._replace(x, keep)
            self.b1.remove(x)
            self.t2.append(x)
        elif x in self.b2:  # Case III
            self.p = max(self.p - max(len(self.b1) / len(self.b2), 1.0), 0.0)
            self._replace(x, keep)
            self.b2.remove(x)
            self.t2.append(x)
        else:  # Case IV
            l1 = len(self.t1) + len(self.b1)
            total = l1 + len(self.t2) + len(self.b2)
            if l1 == c:
                if len(self.t1) < c:
                    self.b1.pop(0)
                    self._replace(x, keep)
                else:
                    victim = self._lru(self.t1, keep)
                    self.t1.remove(victim)
            elif total >= c:
                if total == 2 * c:
                    self.b2.pop(0)
                self._replace(x, keep)
            self.t1.append(x)


def textbook_hits(steps: list[list[int]], c: int) -> int:
    """Hits of one layer's cache over `steps` (each the experts one layer step requests)."""
    arc, hits = TextbookArc(c), 0
    for requested in steps:
        present = [x for x in sorted(requested) if arc.resident(x)]
        for x in present:
            arc.hit(x)
        hits += len(present)
        for x in sorted(requested):
            if not arc.resident(x):
                arc.miss(x, keep=set(requested))
    return hits


def _replayed_hits(topk: np.ndarray, num_experts: int, slots: int) -> list[int]:
    trace = tiny_trace(topk.tolist(), num_experts=num_experts)
    spec = resolve_spec(trace, None)
    budget = spec.resident_bytes(trace.num_tokens) + slots * trace.num_moe_layers * spec.expert_bytes("bf16")
    m = replay(trace, policy="lru", hw=tiny_profile(), memory_budget=budget, overrides={"eviction": "arc"})
    assert m["slots_per_layer"] == [slots] * trace.num_moe_layers
    routed = topk.shape[0] * topk.shape[2]
    return [round(rate * routed) for rate in m["hit_rate_per_layer"]]


def _routing(rng: np.random.Generator, tokens: int, layers: int, num_experts: int, top_k: int) -> np.ndarray:
    """Skewed, phase-shifting popularity (so ghosts of both lists get hit) with distinct experts per token."""
    out = np.empty((tokens, layers, top_k), dtype=np.int64)
    for t in range(tokens):
        hot = (t // 40) % 2  # two working sets that alternate: B1 and B2 hits both happen
        weights = np.where((np.arange(num_experts) % 2) == hot, 4.0, 1.0) / np.arange(1, num_experts + 1) ** 0.7
        for layer in range(layers):
            out[t, layer] = rng.choice(num_experts, size=top_k, replace=False, p=weights / weights.sum())
    return out


@pytest.mark.parametrize("seed, slots", [(0, 2), (1, 3), (2, 5), (3, 4)])
def test_replay_is_textbook_arc_on_single_expert_steps(seed: int, slots: int) -> None:
    topk = _routing(np.random.default_rng(seed), tokens=400, layers=2, num_experts=12, top_k=1)
    expected = [textbook_hits([[int(x)] for x in topk[:, layer, 0]], slots) for layer in range(2)]
    assert _replayed_hits(topk, 12, slots) == expected


@pytest.mark.parametrize("seed, slots", [(4, 3), (5, 5)])
def test_replay_is_textbook_arc_with_batched_requests(seed: int, slots: int) -> None:
    topk = _routing(np.random.default_rng(seed), tokens=300, layers=2, num_experts=12, top_k=2)
    expected = [textbook_hits([[int(x) for x in topk[t, layer]] for t in range(topk.shape[0])], slots)
                for layer in range(2)]
    assert _replayed_hits(topk, 12, slots) == expected


def test_the_reference_is_not_lru() -> None:
    """The same strings under plain LRU give other hit counts (so the comparison above can fail)."""
    topk = _routing(np.random.default_rng(0), tokens=400, layers=2, num_experts=12, top_k=1)
    trace = tiny_trace(topk.tolist(), num_experts=12)
    spec = resolve_spec(trace, None)
    budget = spec.resident_bytes(trace.num_tokens) + 2 * 2 * spec.expert_bytes("bf16")
    lru = replay(trace, policy="lru", hw=tiny_profile(), memory_budget=budget)
    assert [round(r * 400) for r in lru["hit_rate_per_layer"]] != [
        textbook_hits([[int(x)] for x in topk[:, layer, 0]], 2) for layer in range(2)]
