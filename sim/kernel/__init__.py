"""The simulator's fast kernel: the reference engine and controller's replay, compiled, over flat arrays.

`replay` (sim/replay.py) runs a configuration here when `unsupported(policy)` is None and no timeline is
asked for; otherwise it runs the reference engine (sim/engine.py with sim/policies/controller.py). Both
give the same metrics bit for bit (tests/sim/test_kernel*.py). The kernel is C (sim/kernel/compiled.c), a
CPython extension that `pip install -e .` (`make install`) builds with the machine's C compiler: no
compiler at run time, no start-up cost beyond loading a shared library.

Not in the kernel (the reference engine runs these): the `learned` predictor and any other predictor
outside `crosslayer`, `speculative`, `noisy-oracle`, `oracle`, `eap`, `none` (they call Python code per
layer), and timelines. Where the extension was not built (no C compiler at install), `unsupported` says so
and every replay runs in the reference engine, with one warning per process.
"""

from __future__ import annotations

import hashlib
import importlib
import sys
from functools import cache
from pathlib import Path
from types import ModuleType

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

SOURCE = Path(__file__).with_name("compiled.c")


@cache
def compiled() -> ModuleType | None:
    """The extension module, or None (with one warning on stderr) where it was not built. A module built from
    an older compiled.c than the one beside it is refused: its results would not be this source's."""
    try:
        _compiled = importlib.import_module("sim.kernel._compiled")
    except ImportError:
        print("fatesim: the compiled replay kernel is not built (no C compiler when fatesim was installed?): "
              "replays run in the reference engine, 5-50x slower; `make install` builds it", file=sys.stderr)
        return None
    if SOURCE.exists() and hashlib.sha256(SOURCE.read_bytes()).hexdigest() != _compiled.SOURCE_SHA256:
        raise UserError(f"the compiled replay kernel was built from an older {SOURCE}; rebuild it: `make install` "
                        "(or `python setup.py build_ext --inplace`)")
    return _compiled


def unsupported(policy: PolicyConfig) -> str | None:
    """Why the kernel cannot replay `policy` (then the reference engine does), or None."""
    if policy.prediction not in PREDICTIONS:
        return f"prediction {policy.prediction!r} runs in the reference engine"
    if compiled() is None:
        return "the compiled kernel is not built"
    return None


def replay(workload: Workload, ctl: OffloadController, costs: CostModel) -> EngineResult:
    """Replay `workload` under `ctl`'s policy (the controller as constructed, untouched otherwise) and fill its
    counters as the reference engine would; the EngineResult has no spans."""
    from sim.kernel.prepare import inputs

    data, config = inputs(workload, ctl, costs)
    num_layers, num_experts = workload.num_layers, workload.num_experts
    room = (config.depth + 8) * num_experts
    pool = sum(ctl.slots_per_layer) + 2 * room + 256
    core = compiled()
    policy = ctl.policy
    eap_history = int(policy.eap_history) if policy.prediction == "eap" and policy.prefetch != "none" else 0
    while True:
        state = new_state(data, config, num_layers, num_experts, pool, eap_history)
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
