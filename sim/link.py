"""The host-to-device link: copy engines serving a priority queue of expert transfers, in closed form.

No SimPy process per transfer: the link keeps, per copy engine, the time it is busy until, and a queue of
transfers not yet started. Each transfer has a ready time (when it was submitted and its slot is free)
and a priority (on-demand loads before prefetches). Whenever an engine frees up at time f, it starts, among
the transfers ready by `max(f, earliest ready)`, the one with the best (priority, ready time, submission
order); a started transfer is never preempted and takes `latency + bytes / bandwidth`.

Starts are decided lazily: `advance(until)` starts everything that starts strictly before `until`, and
`end_of(t)` starts transfers until `t` has started. That is exact as long as nothing submitted later could
start earlier, which the engine guarantees (see sim/engine.py). Every start and landing is reported to the
controller through the callbacks, in time order.
"""

from __future__ import annotations

import heapq
from collections.abc import Callable

from sim.policies.controller import CANCELLED, Transfer
from sim.policies.transfer_queue import DEMAND, PREFETCH, TransferQueue

__all__ = ["DEMAND", "PREFETCH", "Link"]

_NEVER = float("inf")


class Link:
    """Copy engines with a closed-form busy-until timeline."""

    def __init__(self, copy_engines: int, duration_s: Callable[[int], float],
                 on_start: Callable[[Transfer], None], on_done: Callable[[Transfer], None],
                 record: bool = False) -> None:
        self.free_at = [0.0] * copy_engines
        """When each copy engine finishes its current transfer (s)."""
        self.duration_s = duration_s
        self.on_start = on_start
        self.on_done = on_done
        self.queue: TransferQueue[Transfer] = TransferQueue()
        """Transfers submitted and not yet started."""
        self.in_flight: list[tuple[float, int, Transfer]] = []
        """Heap of (end_at, seq, transfer) started and not yet reported landed."""
        self.seq = 0
        self.busy_s = 0.0
        """Sum of transfer durations started so far."""
        self.started: list[Transfer] = []
        """Every transfer started, in start order."""
        self.record = record
        self.spans: list[tuple[int, float, float, Transfer]] = []
        """(engine, start_at, end_at, transfer) of every transfer, when recording."""

    def submit(self, t: Transfer, ready_at: float, priority: int) -> None:
        """Queue `t`; it may start from `ready_at` on. A cancelled transfer is ignored."""
        if t.state == CANCELLED:
            return
        self.queue.submit(t, priority, ready_at)

    def cancel(self, t: Transfer) -> None:
        """Drop a queued (not started) transfer."""
        self.queue.cancel(t)

    def promote(self, t: Transfer) -> None:
        """A queued (or not yet submitted) prefetch is now needed by the running layer: serve it as an
        on-demand load."""
        self.queue.promote(t)

    def _start_next(self, until: float) -> bool:
        """Start the next transfer if it starts before `until`; return whether one started."""
        queue = self.queue
        if not queue:
            return False
        free_at = self.free_at
        if len(free_at) == 1:
            engine, start = 0, free_at[0]
        else:
            start = min(free_at)
            engine = free_at.index(start)
        start, t = queue.next_start(start)
        if start >= until:
            return False
        queue.take(t)
        self.seq += 1
        duration = self.duration_s(t.nbytes)
        end = start + duration
        free_at[engine] = end
        self.busy_s += duration
        t.start_at, t.end_at = start, end
        self.started.append(t)
        if self.record:
            self.spans.append((engine, start, end, t))
        self.on_start(t)
        heapq.heappush(self.in_flight, (end, self.seq, t))
        return True

    def advance(self, until: float) -> None:
        """Start every transfer that starts before `until` and report those landed by `until`."""
        queue = self.queue
        while queue and self._start_next(until):
            pass
        in_flight, on_done, pop = self.in_flight, self.on_done, heapq.heappop
        while in_flight and in_flight[0][0] <= until:
            on_done(pop(in_flight)[2])

    def end_of(self, t: Transfer) -> float:
        """When `t` lands, starting queued transfers in order until it has started."""
        while t.start_at < 0.0:
            if not self._start_next(_NEVER):
                raise RuntimeError(f"{t} was never submitted to the link")
        return t.end_at

    def busy_until(self, now: float) -> float:
        """When the link would run out of the work it holds at `now` (the rest of the transfers in flight and
        the queued ones ready by `now`), working without pause; `now` when it is idle. Several copy engines
        share the work evenly. Changes nothing (no transfer is started)."""
        work = 0.0
        for free in self.free_at:
            if free > now:
                work += free - now
        for t in self.queue.ready_by(now):
            work += self.duration_s(t.nbytes)
        return now + work / len(self.free_at)

    def drain(self) -> float:
        """Run the queue empty; return when the last transfer lands."""
        self.advance(float("inf"))
        return max(self.free_at)
