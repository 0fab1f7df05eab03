"""The kernel's link primitives (sim/kernel/compiled.c: link_submit, link_promote, link_cancel, start_next) against
the start-order rule of sim/policies/transfer_queue.py, driven directly.

The differential tests (test_kernel.py) cannot reach every branch: the kernel's closed-form predictor thread
submits each prefetch as soon as it is issued, so a promotion never comes before its submission there and the
kernel's promote-on-submit path is dead code in a replay. Here a script of submissions, promotions and
cancellations is run on the kernel's queue and on a TransferQueue, one copy engine, and the start orders and
times must agree (and match hand-computed ones).
"""

from __future__ import annotations

import numpy as np
import pytest
from sim_fixtures import tiny_profile, tiny_trace

from sim import kernel
from sim.kernel.prepare import inputs
from sim.kernel.state import DEMAND_PRIORITY, PREFETCH_PRIORITY, new_scratch, new_state
from sim.policies.transfer_queue import DEMAND, PREFETCH, TransferQueue
from sim.replay import load, replay

SUBMIT, PROMOTE, CANCEL = 0, 1, 2


class _Captured(Exception):
    pass


@pytest.fixture(scope="module")
def arrays():
    """The kernel's inputs and settings for a tiny trace (one copy engine), captured from replay."""
    captured = {}

    def capture(workload, ctl, costs):
        captured["args"] = (workload, ctl, costs)
        raise _Captured

    trace = load(tiny_trace([[[0], [1]], [[1], [0]]], num_experts=4))
    patch = pytest.MonkeyPatch()
    patch.setattr(kernel, "replay", capture)
    try:
        with pytest.raises(_Captured):
            replay(trace, policy="lru", hw=tiny_profile(), memory_budget="100%", mode="fast")
    finally:
        patch.undo()
    workload, ctl, costs = captured["args"]
    data, cfg = inputs(workload, ctl, costs)
    assert cfg.copy_engines == 1
    return data, cfg, workload.num_layers, workload.num_experts


def _kernel_order(arrays, ops, pool: int = 16) -> list[tuple[float, int]]:
    """(start time, transfer) in start order after running `ops` [(code, tid, priority, ready_at)] on the
    kernel's link and draining it."""
    data, cfg, num_layers, num_experts = arrays
    state = new_state(data, cfg, num_layers, num_experts, pool)
    state.t_start[:] = -1.0
    scratch = new_scratch(num_experts, 4)
    kernel.compiled().drive_link(data, cfg, state, scratch, ops)
    started = [tid for tid in range(pool) if state.t_start[tid] >= 0.0]
    return sorted((float(state.t_start[tid]), tid) for tid in started)


def _queue_order(ops, duration: float) -> list[tuple[float, int]]:
    """The same script on a TransferQueue drained by one engine whose transfers take `duration`."""
    q: TransferQueue[int] = TransferQueue()
    items: dict[int, object] = {}
    for code, tid, prio, ready in ops:
        item = items.setdefault(tid, object())  # TransferQueue compares items by identity
        if code == SUBMIT:
            q.submit(item, DEMAND if prio == DEMAND_PRIORITY else PREFETCH, ready)
        elif code == PROMOTE:
            q.promote(item)
        else:
            q.cancel(item)
    name = {id(item): tid for tid, item in items.items()}
    out, free_at = [], 0.0
    while q:
        start, item = q.next_start(free_at)
        q.take(item)
        out.append((start, name[id(item)]))
        free_at = start + duration
    return out


def test_demand_before_prefetch_and_promotion_after_submission(arrays) -> None:
    d = float(arrays[0].transfer_s[0])
    ops = [(SUBMIT, 0, PREFETCH_PRIORITY, 0.0), (SUBMIT, 1, PREFETCH_PRIORITY, 0.0),
           (SUBMIT, 2, DEMAND_PRIORITY, 0.0), (PROMOTE, 1, 0, 0.0)]
    # 1 (promoted: demand, submitted before 2), then the demand 2, then the prefetch 0
    assert _kernel_order(arrays, ops) == [(0.0, 1), (d, 2), (2 * d, 0)]


def test_promotion_before_submission_applies_on_submission(arrays) -> None:
    """A prefetch promoted before it is submitted starts with on-demand priority (Link.promote's docstring:
    the predictor thread may post it later); the promotion is used up by that submission."""
    d = float(arrays[0].transfer_s[0])
    ops = [(SUBMIT, 0, PREFETCH_PRIORITY, 0.0), (PROMOTE, 1, 0, 0.0), (SUBMIT, 1, PREFETCH_PRIORITY, 0.0),
           (SUBMIT, 2, DEMAND_PRIORITY, 0.0)]
    assert _kernel_order(arrays, ops) == [(0.0, 1), (d, 2), (2 * d, 0)]
    # a cancellation drops a promotion made before submission
    ops = [(SUBMIT, 0, PREFETCH_PRIORITY, 0.0), (PROMOTE, 1, 0, 0.0), (CANCEL, 1, 0, 0.0),
           (SUBMIT, 1, PREFETCH_PRIORITY, 0.0)]
    assert _kernel_order(arrays, ops) == [(0.0, 0), (d, 1)]


def test_random_scripts_agree_with_the_transfer_queue(arrays) -> None:
    d = float(arrays[0].transfer_s[0])
    rng = np.random.default_rng(14)
    for _ in range(300):
        ops, submitted = [], set()
        for _ in range(int(rng.integers(1, 12))):
            tid = int(rng.integers(0, 6))
            code = int(rng.choice([SUBMIT, SUBMIT, PROMOTE, CANCEL]))
            if code == SUBMIT:
                if tid in submitted:
                    continue
                submitted.add(tid)
            ops.append((code, tid, int(rng.integers(0, 2)), float(rng.integers(0, 4)) * d / 2))
        assert _kernel_order(arrays, ops) == _queue_order(ops, d), ops
