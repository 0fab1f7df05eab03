"""The order in which queued expert transfers start: one rule, shared by the simulated link and realrun.

A transfer waits in the queue from its submission until a copy engine (sim) or the I/O thread (realrun)
starts it. Each queued transfer has a priority (on-demand loads before prefetches: README, "Engine semantics") and a ready
time (when it was submitted and its slot is free; realrun's copies are ready when submitted). When an
engine frees up at time f, it starts, among the transfers ready by f, the best by
(priority, ready time, submission order); when none is ready yet it idles until the earliest ready time
and starts the best of those ready then. A started transfer is never preempted.

A queued prefetch that the running layer now needs is promoted: it keeps its place in submission order
but gets on-demand priority. A promotion may arrive before the engine has submitted the transfer (the
simulator's predictor thread posts prefetches with a delay); it then applies on submission. Only a
transfer that has not started can be cancelled.

No simpy, no torch: `sim/link.py` and `realrun/loader.py` both keep their queue in a `TransferQueue`.
"""

from __future__ import annotations

from collections.abc import Hashable, Iterator
from typing import Generic, TypeVar

DEMAND, PREFETCH = 0, 1
"""Priorities: lower starts first."""

Item = TypeVar("Item", bound=Hashable)


def priority_of(kind: str) -> int:
    """The queue priority of a transfer of `kind` ("demand" before anything else)."""
    return DEMAND if kind == "demand" else PREFETCH


class TransferQueue(Generic[Item]):
    """Transfers not yet started, in the start order of the module docstring (items compared by identity)."""

    def __init__(self) -> None:
        self._entries: list[list] = []
        """[priority, ready_at, seq, item] per queued transfer (a few at a time: found by scanning)."""
        self._seq = 0
        self._promote_on_submit: set[Item] = set()
        """Items promoted before they were submitted."""

    def __len__(self) -> int:
        return len(self._entries)

    def __bool__(self) -> bool:
        return bool(self._entries)

    def __contains__(self, item: Item) -> bool:
        return self._entry(item) is not None

    def __iter__(self) -> Iterator[Item]:
        """Queued items in submission order."""
        return (entry[3] for entry in self._entries)

    def submit(self, item: Item, priority: int, ready_at: float = 0.0) -> None:
        """Queue `item`, startable from `ready_at` (s) on."""
        if self._promote_on_submit and item in self._promote_on_submit:
            self._promote_on_submit.discard(item)
            priority = DEMAND
        self._seq += 1
        self._entries.append([priority, ready_at, self._seq, item])

    def promote(self, item: Item) -> None:
        """Give a queued (or not yet submitted) transfer on-demand priority; it keeps its submission order."""
        entry = self._entry(item)
        if entry is None:
            self._promote_on_submit.add(item)
        else:
            entry[0] = DEMAND

    def cancel(self, item: Item) -> bool:
        """Drop a queued transfer; False when it is not queued (already started, or never submitted)."""
        self._promote_on_submit.discard(item)
        entry = self._entry(item)
        if entry is None:
            return False
        self._entries.remove(entry)
        return True

    def next_start(self, free_at: float) -> tuple[float, Item] | None:
        """(start time, item) of the transfer an engine free at `free_at` starts next; None when empty.
        Changes nothing: `take` the item to start it."""
        entries = self._entries
        if not entries:
            return None
        best = None
        earliest = None
        for entry in entries:  # the best (priority, ready_at, seq) among entries ready by `free_at`
            ready = entry[1]
            if ready <= free_at:
                if best is None or entry[:3] < best[:3]:
                    best = entry
            elif earliest is None or ready < earliest:
                earliest = ready
        if best is None:  # nothing ready yet: the engine idles until the earliest ready time
            for entry in entries:
                if entry[1] <= earliest and (best is None or entry[:3] < best[:3]):
                    best = entry
        return max(free_at, best[1]), best[3]

    def take(self, item: Item) -> None:
        """Remove `item` from the queue as it starts."""
        entry = self._entry(item)
        if entry is None:
            raise KeyError(f"{item!r} is not queued")
        self._entries.remove(entry)

    def ready_by(self, now: float) -> Iterator[Item]:
        """Queued items ready by `now`, in submission order."""
        return (entry[3] for entry in self._entries if entry[1] <= now)

    def _entry(self, item: Item) -> list | None:
        for entry in self._entries:
            if entry[3] is item:
                return entry
        return None
