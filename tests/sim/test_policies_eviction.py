"""Eviction policies on hand-made access strings, and Belady's optimality on random ones."""

from __future__ import annotations

import numpy as np
import pytest

from sim.policies.eviction import ARC, NEVER, FutureAccess, simulate_cache


def test_lru_sequence() -> None:
    """LRU evicts the least recently used: 1 2 1 3 -> evict 2; 4 -> evict 1."""
    hits, victims = simulate_cache("lru", 2, [1, 2, 1, 3, 4, 3, 1])
    assert hits == [False, False, True, False, False, True, False]
    assert victims == [None, None, None, 2, 1, None, 4]


def test_lfu_sequence() -> None:
    """LFU evicts the least used since insertion; ties go to the least recently used."""
    hits, victims = simulate_cache("lfu", 2, [1, 1, 2, 3, 2, 4, 1])
    # 3 evicts 2 (1 was used twice); 2 evicts 3 (used once); 4 evicts 2 (used once); 1 still hits
    assert hits == [False, True, False, False, False, False, True]
    assert victims == [None, None, None, 2, 3, 2, None]


def test_arc_sequence_and_ghost_adaptation() -> None:
    """ARC: a re-referenced expert moves to T2 and survives a scan; a B1 ghost hit grows p."""
    hits, victims = simulate_cache("arc", 2, [1, 2, 1, 3, 4, 1, 2])
    assert hits == [False, False, True, False, False, True, False]
    assert victims == [None, None, None, 2, 3, None, 4]
    arc = ARC(2)
    for e in (1, 2):
        arc.on_insert(e, 0)
    arc.on_access(1, 1)  # T1=[2], T2=[1]
    victim = arc.victim({1, 2}, 3, 2)
    assert victim == 2
    arc.on_remove(2)  # ghost in B1
    arc.on_insert(3, 2)
    assert list(arc.b1) == [2] and arc.p == 0.0
    victim = arc.victim({1, 3}, 2, 3)  # 2 is a B1 ghost: p grows to 1, |T1| = 1 is not > 1 -> evict from T2
    assert victim == 1
    arc.on_remove(1)
    arc.on_insert(2, 3)
    assert arc.p == 1.0 and list(arc.t2) == [2] and list(arc.t1) == [3]
    assert list(arc.b2) == [1] and list(arc.b1) == []
    victim = arc.victim({2, 3}, 1, 4)  # 1 is a B2 ghost: p shrinks by max(|B1|/|B2|, 1) = 1, to 0
    assert arc.p == 0.0 and victim == 3  # |T1| = 1 > p: T1's LRU goes


def test_belady_sequence() -> None:
    """Belady evicts the expert used farthest in the future (never used again first)."""
    hits, victims = simulate_cache("belady", 2, [1, 2, 3, 1, 2, 4, 1])
    # at 3: 1 next at 3, 2 next at 4 -> evict 2; at 2: 1 next at 6, 3 never -> evict 3; at 4: 1 next 6, 2 never
    assert hits == [False, False, False, True, False, False, True]
    assert victims == [None, None, 2, None, 3, 2, None]


def test_future_access_next_use() -> None:
    routes = [[(np.array([0, 2]), np.array([1, 1]))], [(np.array([1]), np.array([1]))],
              [(np.array([2]), np.array([3]))]]
    future = FutureAccess.from_routes(routes, num_layers=1)
    assert future.next_use(0, 2, 0) == 0
    assert future.next_use(0, 2, 1) == 2
    assert future.next_use(0, 0, 1) == NEVER


@pytest.mark.parametrize("capacity", [1, 2, 4, 7])
def test_belady_hit_rate_is_at_least_every_other_policy(capacity: int) -> None:
    """On random skewed access strings Belady's hits bound LRU, LFU and ARC at equal capacity."""
    rng = np.random.default_rng(capacity)
    for _ in range(5):
        accesses = rng.zipf(1.3, size=400) % 16
        best = sum(simulate_cache("belady", capacity, accesses.tolist())[0])
        for name in ("lru", "lfu", "arc"):
            assert best >= sum(simulate_cache(name, capacity, accesses.tolist())[0]), name
