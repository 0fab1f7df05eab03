"""The simulator's fast kernel: the reference engine and controller's replay, compiled, over flat arrays.

`replay` (sim/replay.py) runs a configuration here when `unsupported(policy)` is None and no timeline is
asked for; otherwise it runs the reference engine (sim/engine.py with sim/policies/controller.py). Both
give the same metrics bit for bit (tests/sim/test_kernel*.py). The kernel is numba-compiled (on-disk
cache: the first replay after an install compiles for ~a minute, later processes load the machine code).

Not in the kernel (the reference engine runs these): the `learned` predictor and any other predictor
outside `crosslayer`, `speculative`, `noisy-oracle`, `oracle`, `eap`, `none` (they call Python code per
layer), and timelines.
"""

from __future__ import annotations

import sys
from contextlib import contextmanager

from sim.costs import CostModel
from sim.engine import EngineResult
from sim.kernel.state import (
    ALL_PINNED,
    BUDGET_EXCEEDED,
    C_OCCUPIED,
    C_PEAK,
    K_STALL,
    OK,
    POOL_EXHAUSTED,
    PREDICTIONS,
    STAT_NAMES,
    new_scratch,
    new_state,
)
from sim.policies.controller import OffloadController
from sim.policies.presets import PolicyConfig
from sim.workload import Workload
from traces.errors import UserError


def unsupported(policy: PolicyConfig) -> str | None:
    """Why the kernel cannot replay `policy` (then the reference engine does), or None."""
    if policy.prediction not in PREDICTIONS:
        return f"prediction {policy.prediction!r} runs in the reference engine"
    return None


@contextmanager
def _numba_without_scipy():
    """numba imports scipy.linalg on start-up (~0.3-0.6 s) only to learn whether BLAS is there for np.dot
    and friends; the kernel uses none, so hide scipy while numba starts (unless something loaded it)."""
    hidden = "scipy" not in sys.modules
    if hidden:
        sys.modules["scipy"] = None  # `import scipy...` raises ImportError
    try:
        yield
    finally:
        if hidden and sys.modules.get("scipy", 0) is None:
            del sys.modules["scipy"]


def _core():
    with _numba_without_scipy():
        from sim.kernel import core
    return core


def replay(workload: Workload, ctl: OffloadController, costs: CostModel) -> EngineResult:
    """Replay `workload` under `ctl`'s policy (the controller as constructed, untouched otherwise) and fill its
    counters as the reference engine would; the EngineResult has no spans."""
    from sim.kernel.prepare import inputs

    data, config = inputs(workload, ctl, costs)
    num_layers, num_experts = workload.num_layers, workload.num_experts
    room = (config.depth + 8) * num_experts
    pool = sum(ctl.slots_per_layer) + 2 * room + 256
    core = _core()
    policy = ctl.policy
    eap_history = int(policy.eap_history) if policy.prediction == "eap" and policy.prefetch != "none" else 0
    while True:
        state = new_state(data, config, num_layers, num_experts, pool, eap_history)
        with _numba_without_scipy():
            code, busy_s = core.run(data, config, state, new_scratch(num_experts, config.depth * num_experts + 1))
        if code != POOL_EXHAUSTED:
            break
        pool *= 2  # more transfers alive at once than estimated: once more with room for them
    if code == ALL_PINNED:
        raise UserError("a layer's slots are all pinned; lower the pinned share or raise the budget")
    if code == BUDGET_EXCEEDED:
        raise AssertionError("expert budget exceeded")
    assert code == OK, code
    stats = ctl._stats
    for name, value in zip(STAT_NAMES, state.stats.tolist(), strict=True):
        stats[name] = value
    stats["hits_per_layer"] = state.hits_per_layer.tolist()
    stats["routed_per_layer"] = state.routed_per_layer.tolist()
    ctl.occupied_slots = int(state.counts[C_OCCUPIED])
    ctl.peak_slots = int(state.counts[C_PEAK])
    ends = state.step_end_at.tolist()
    return EngineResult(state.step_start_at.tolist(), ends, float(state.clock[K_STALL]), ends[-1] if ends else 0.0,
                        float(busy_s), int(config.copy_engines))


__all__ = ["replay", "unsupported"]
