"""sim/link.py by hand: copy engines that take 1 s per transfer, their start order, promotion, cancel, callbacks."""

from __future__ import annotations

import pytest

from sim.link import DEMAND, PREFETCH, Link
from sim.policies.controller import CANCELLED, Transfer


def _link(engines: int = 1) -> tuple[Link, list[tuple[str, str, float]]]:
    log: list[tuple[str, str, float]] = []

    def started(t: Transfer) -> None:
        log.append(("start", t.kind + str(t.expert), t.start_at))

    def landed(t: Transfer) -> None:
        log.append(("done", t.kind + str(t.expert), t.end_at))

    return Link(engines, lambda nbytes: 1.0, started, landed), log


def _t(expert: int, kind: str = "prefetch") -> Transfer:
    return Transfer(0, expert, "bf16", 100, kind, expert, 0)


def _starts(log) -> list[tuple[str, float]]:
    return [(name, at) for what, name, at in log if what == "start"]


def test_demand_goes_before_prefetches_submitted_earlier() -> None:
    link, log = _link()
    p1, p2, d = _t(1), _t(2), _t(3, "demand")
    link.submit(p1, 0.0, PREFETCH)
    link.submit(p2, 0.0, PREFETCH)
    link.submit(d, 0.0, DEMAND)
    link.drain()
    assert _starts(log) == [("demand3", 0.0), ("prefetch1", 1.0), ("prefetch2", 2.0)]


def test_a_transfer_starts_no_earlier_than_it_is_ready_and_an_idle_engine_waits() -> None:
    link, log = _link()
    d, p = _t(1, "demand"), _t(2)
    link.submit(d, 5.0, DEMAND)
    link.submit(p, 0.5, PREFETCH)
    link.drain()
    assert _starts(log) == [("prefetch2", 0.5), ("demand1", 5.0)]
    assert link.end_of(d) == 6.0


def test_promotion_after_and_before_submission() -> None:
    link, log = _link()
    p1, p2, p3 = _t(1), _t(2), _t(3)
    for t in (p1, p2):
        link.submit(t, 0.0, PREFETCH)
    link.promote(p2)  # queued: now an on-demand load, ahead of p1
    link.promote(p3)  # not submitted yet: on-demand once submitted
    link.submit(p3, 0.0, PREFETCH)
    link.drain()
    assert _starts(log) == [("prefetch2", 0.0), ("prefetch3", 1.0), ("prefetch1", 2.0)]


def test_cancel_drops_only_a_queued_transfer() -> None:
    link, log = _link()
    a, b = _t(1), _t(2)
    link.submit(a, 0.0, PREFETCH)
    link.submit(b, 0.0, PREFETCH)
    link.advance(0.5)  # a starts at 0
    link.cancel(a)  # too late: it lands
    link.cancel(b)
    b.state = CANCELLED
    link.submit(b, 0.0, PREFETCH)  # a cancelled transfer is never queued again
    link.drain()
    assert _starts(log) == [("prefetch1", 0.0)] and b.start_at < 0


def test_two_engines_share_the_queue() -> None:
    link, log = _link(2)
    ts = [_t(i) for i in range(3)]
    for t in ts:
        link.submit(t, 0.0, PREFETCH)
    link.drain()
    assert _starts(log) == [("prefetch0", 0.0), ("prefetch1", 0.0), ("prefetch2", 1.0)]


def test_advance_starts_what_starts_before_and_reports_what_lands_by() -> None:
    link, log = _link()
    a, b = _t(1), _t(2)
    link.submit(a, 0.0, PREFETCH)
    link.submit(b, 1.0, PREFETCH)
    link.advance(1.0)  # a starts at 0 and lands at 1; b would start at 1: not before 1
    assert log == [("start", "prefetch1", 0.0), ("done", "prefetch1", 1.0)] and b.start_at < 0
    assert link.busy_until(1.0) == pytest.approx(2.0)  # b is ready: one more second of work
    assert link.end_of(b) == 2.0


def test_busy_until_shares_the_work_over_the_engines() -> None:
    link, _ = _link(2)
    for i in range(3):
        link.submit(_t(i), 0.0, PREFETCH)
    assert link.busy_until(0.0) == pytest.approx(1.5)
