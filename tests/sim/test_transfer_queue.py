"""The start-order rule shared by the simulated link and realrun's I/O thread (sim/policies/transfer_queue.py)."""

from __future__ import annotations

import pytest

from sim.policies.transfer_queue import DEMAND, PREFETCH, TransferQueue, priority_of


class Item:
    """A transfer stand-in compared by identity, as Transfer and realrun's Copy are."""

    def __init__(self, name: str) -> None:
        self.name = name

    def __repr__(self) -> str:
        return self.name


def drain(queue: TransferQueue, free_at: float = 0.0) -> list[tuple[float, str]]:
    """Start everything on one engine whose transfers take 1 s; (start time, item) in start order."""
    out = []
    while queue:
        start, item = queue.next_start(free_at)
        queue.take(item)
        out.append((start, item.name))
        free_at = start + 1.0
    return out


def test_demand_starts_before_earlier_prefetches() -> None:
    q: TransferQueue[Item] = TransferQueue()
    q.submit(Item("p1"), PREFETCH)
    q.submit(Item("p2"), PREFETCH)
    q.submit(Item("d1"), DEMAND)
    assert drain(q) == [(0.0, "d1"), (1.0, "p1"), (2.0, "p2")]


def test_fifo_within_a_priority_and_ready_time_before_submission_order() -> None:
    q: TransferQueue[Item] = TransferQueue()
    q.submit(Item("late"), DEMAND, ready_at=0.5)
    q.submit(Item("early"), DEMAND, ready_at=0.2)
    q.submit(Item("early2"), DEMAND, ready_at=0.2)
    # the engine is free at 1.0: all are ready; the earlier-ready ones go first, FIFO among equals
    assert drain(q, free_at=1.0) == [(1.0, "early"), (2.0, "early2"), (3.0, "late")]


def test_a_ready_prefetch_is_not_held_back_for_a_demand_not_yet_ready() -> None:
    q: TransferQueue[Item] = TransferQueue()
    q.submit(Item("d"), DEMAND, ready_at=5.0)
    q.submit(Item("p"), PREFETCH, ready_at=0.0)
    assert drain(q) == [(0.0, "p"), (5.0, "d")]


def test_an_idle_engine_waits_for_the_earliest_ready_and_takes_the_best_of_those() -> None:
    q: TransferQueue[Item] = TransferQueue()
    q.submit(Item("p"), PREFETCH, ready_at=3.0)
    q.submit(Item("d"), DEMAND, ready_at=3.0)
    q.submit(Item("d_later"), DEMAND, ready_at=4.0)
    assert q.next_start(0.0)[1].name == "d"
    assert drain(q) == [(3.0, "d"), (4.0, "d_later"), (5.0, "p")]


def test_promotion_keeps_submission_order_among_demands() -> None:
    q: TransferQueue[Item] = TransferQueue()
    p1, d1 = Item("p1"), Item("d1")
    q.submit(Item("p0"), PREFETCH)
    q.submit(p1, PREFETCH)
    q.submit(d1, DEMAND)
    q.promote(p1)
    assert drain(q) == [(0.0, "p1"), (1.0, "d1"), (2.0, "p0")]


def test_promotion_before_submission_applies_on_submission() -> None:
    q: TransferQueue[Item] = TransferQueue()
    early = Item("promoted-early")
    q.submit(Item("p0"), PREFETCH)
    q.promote(early)
    q.submit(early, PREFETCH)
    assert drain(q) == [(0.0, "promoted-early"), (1.0, "p0")]
    q.submit(early, PREFETCH)  # the early promotion was used up
    q.submit(Item("d"), DEMAND)
    assert drain(q) == [(0.0, "d"), (1.0, "promoted-early")]


def test_cancel_only_queued() -> None:
    q: TransferQueue[Item] = TransferQueue()
    a, b, never = Item("a"), Item("b"), Item("never")
    q.submit(a, PREFETCH)
    q.submit(b, PREFETCH)
    assert q.cancel(a) is True
    assert a not in q and b in q and len(q) == 1
    _, first = q.next_start(0.0)
    q.take(first)
    assert q.cancel(b) is False  # started
    assert q.cancel(never) is False
    with pytest.raises(KeyError):
        q.take(b)


def test_ready_by_lists_ready_items_in_submission_order() -> None:
    q: TransferQueue[Item] = TransferQueue()
    for name, ready in (("x", 2.0), ("y", 0.0), ("z", 1.0)):
        q.submit(Item(name), PREFETCH, ready)
    assert [i.name for i in q.ready_by(1.0)] == ["y", "z"]
    assert [i.name for i in q] == ["x", "y", "z"]


def test_priority_of_kinds() -> None:
    assert priority_of("demand") == DEMAND
    assert priority_of("prefetch") == PREFETCH == priority_of("preload")
    assert q_empty_next_start() is None


def q_empty_next_start():
    return TransferQueue().next_start(0.0)
