"""An independent SimPy model of the engine semantics (README, "Engine semantics") against sim/engine.py (and so the kernel).

Written from the brief, not from sim/engine.py or sim/link.py: one process per transfer on a SimPy
`PriorityResource` of copy engines (on-demand before prefetch, then by when the transfer became ready,
then by submission order; a queued prefetch that is needed now is promoted; a stale queued one cancelled),
one GPU process (attention -> router -> experts, hits first, each miss as its bytes arrive -> shared
experts), a CPU predictor thread and a CPU expert thread as one-at-a-time resources. The policy is the
same `OffloadController` (it is the policy, not the engine). The controller learns which copies started
(before now) and landed (by now) before each of its decisions.
"""

from __future__ import annotations

import pytest
import simpy
from sim_fixtures import tiny_profile, tiny_trace

from sim.costs import CostModel
from sim.policies.controller import DONE, OffloadController
from sim.policies.prediction import Signals
from sim.policies.prefetch import decode_prefetch_count
from sim.policies.presets import build_policy
from sim.replay import load, replay, resolve_spec
from sim.synthetic import synthetic_trace


class _Request(simpy.resources.resource.PriorityRequest):
    """A copy-engine request ordered by (priority, ready time, submission order)."""

    def __init__(self, resource, key: tuple) -> None:
        self.priority, self.preempt, self.time = key[0], False, resource._env.now
        self.key = key
        simpy.resources.resource.Request.__init__(self, resource)


class Model:
    """The engine semantics (README, "Engine semantics") in SimPy; `run()` returns (step start times, step end times, GPU stall s)."""

    def __init__(self, workload, ctl: OffloadController, costs: CostModel) -> None:
        self.w, self.ctl, self.costs, self.hw = workload, ctl, costs, costs.hw
        self.env = simpy.Environment()
        self.copy = simpy.PriorityResource(self.env, capacity=self.hw.link.copy_engines)
        self.predictor = simpy.Resource(self.env, capacity=1)
        self.cpu = simpy.Resource(self.env, capacity=1)
        self.info: dict = {}  # transfer -> its copy's bookkeeping
        self.submitted = 0
        self.stall_s = 0.0

    # --- transfers -----------------------------------------------------------------------------------
    def _info(self, t) -> dict:
        if t not in self.info:
            self.info[t] = {"start": None, "end": None, "request": None, "cancelled": False, "promoted": False,
                            "landed": self.env.event(), "reported": set()}
        return self.info[t]

    def submit(self, t, demand: bool) -> None:
        """The transfer is ready now: it queues for a copy engine (a process of its own)."""
        info = self._info(t)
        if info["cancelled"]:
            return
        self.submitted += 1
        info.update(seq=self.submitted, ready=self.env.now, demand=demand)
        self.env.process(self._copy(t, info, 0 if demand or info["promoted"] else 1))

    def _copy(self, t, info, priority: int):
        request = _Request(self.copy, (priority, info["ready"], info["seq"]))
        info["request"] = request
        yield request
        info["start"] = self.env.now
        yield self.env.timeout(self.costs.transfer_s(t.nbytes))
        info["end"] = self.env.now
        self.copy.release(request)
        info["landed"].succeed()

    def promote(self, t) -> None:
        """A queued prefetch is needed now: on-demand priority, same place otherwise."""
        info = self._info(t)
        info["promoted"] = True
        request = info["request"]
        if request is not None and not request.triggered:
            request.cancel()
            self.env.process(self._copy(t, info, 0))

    def cancel(self, t) -> None:
        info = self._info(t)
        info["cancelled"] = True
        if info["request"] is not None and not info["request"].triggered:
            info["request"].cancel()

    def report(self, now: float | None = None) -> None:
        """Tell the controller what started before now and what landed by now (in landing order)."""
        now = self.env.now if now is None else now
        for t, info in self.info.items():
            if info["start"] is not None and info["start"] < now and "started" not in info["reported"]:
                info["reported"].add("started")
                self.ctl.on_transfer_started(t)
        landed = sorted((info["end"], info["start"], info["seq"], t) for t, info in self.info.items()
                        if info["end"] is not None and info["end"] <= now and "done" not in info["reported"])
        for _, _, _, t in landed:
            self.info[t]["reported"].add("done")
            self.ctl.on_transfer_done(t)

    # --- the CPU threads and the GPU stream -----------------------------------------------------------
    def _predict(self, prefetches):
        with self.predictor.request() as turn:
            yield turn
            yield self.env.timeout(self.hw.cpu.predictor_latency_s)
            for t in prefetches:
                self.submit(t, demand=False)

    def _cpu_experts(self, work, done):
        with self.cpu.request() as turn:
            yield turn
            for _, tokens in work:
                yield self.env.timeout(self.costs.cpu_expert_s(tokens))
        done.succeed()

    def _load(self, t, previous, computed):
        """An on-demand load goes out in plan order, once its slot is free."""
        if previous is not None:
            yield previous
        if t.after_compute is not None:
            yield computed[t.after_compute]
        if t.after_transfer is not None:
            yield self._info(t.after_transfer)["landed"]
        self.submit(t, demand=True)

    def _wait(self, event):
        if not event.triggered:
            before = self.env.now
            yield event
            self.stall_s += self.env.now - before

    def _gpu(self, starts, ends):
        env, ctl, costs = self.env, self.ctl, self.costs
        probs = self.w.lookahead_probs
        for step in self.w.steps:
            ctl.start_forward(step.index, step.phase, step.num_tokens)
            starts.append(env.now)
            tokens = slice(step.token_start, step.token_start + step.num_tokens)
            for layer, (ids, counts) in enumerate(self.w.routes(step.index)):
                yield env.timeout(costs.attention_s(step.num_tokens, step.context))
                self.report()
                if ctl.policy.prefetch != "none":
                    lookahead = None if probs is None else probs[:, tokens, layer]
                    prefetches = ctl.on_gate_input(layer, Signals(step.index, step.phase, step.num_tokens, lookahead))
                    for t in prefetches:
                        self._info(t)
                    env.process(self._predict(prefetches))
                yield env.timeout(self.hw.gpu.kernel_launch_s)
                self.report()
                plan = ctl.on_route(layer, ids, counts)
                for t in plan.cancelled:
                    self.cancel(t)
                for t in plan.promoted:
                    self.promote(t)
                cpu_done = env.event()
                env.process(self._cpu_experts(plan.cpu_work, cpu_done))
                computed = {e: env.event() for e, _, _, _ in plan.gpu_work}
                previous = None
                for t in plan.loads:
                    self._info(t)
                    previous = env.process(self._load(t, previous, computed))
                for expert, n, precision, t in plan.gpu_work:
                    if t is not None and t.state != DONE:  # in flight at the route: compute once it lands
                        yield from self._wait(self._info(t)["landed"])
                    yield env.timeout(costs.expert_s(n, precision))
                    computed[expert].succeed()
                yield from self._wait(cpu_done)
                shared = costs.shared_s(step.num_tokens)
                if shared:
                    yield env.timeout(shared)
            ends.append(env.now)

    def run(self):
        starts, ends = [], []
        self.env.run(until=self.env.process(self._gpu(starts, ends)))
        self.env.run()  # the copies still queued run to the end
        self.report(float("inf"))
        return starts, ends, self.stall_s


def _model(loaded, policy: str, hw, budget, overrides=None):
    workload = loaded.workload
    spec = resolve_spec(loaded.trace, None)
    costs = CostModel(spec, hw)
    config = build_policy(policy, overrides)
    expert_budget = budget - spec.resident_bytes(workload.max_context)
    ctl = OffloadController(spec, config, expert_budget, decode_prefetch_count=decode_prefetch_count(costs),
                            future=workload.future, popularity=workload.popularity)
    starts, ends, stall = Model(workload, ctl, costs).run()
    return starts, ends, stall, ctl.stats


def _engine(loaded, policy, hw, budget, overrides=None):
    from sim.engine import Engine

    workload = loaded.workload
    spec = resolve_spec(loaded.trace, None)
    costs = CostModel(spec, hw)
    ctl = OffloadController(spec, build_policy(policy, overrides), budget - spec.resident_bytes(workload.max_context),
                            decode_prefetch_count=decode_prefetch_count(costs), future=workload.future,
                            popularity=workload.popularity)
    result = Engine(workload, ctl, costs).run()
    return result.step_start_at, result.step_end_at, result.gpu_stall_s, ctl.stats


def test_load_on_demand_by_hand_in_the_model() -> None:
    """The model on its own, top-2 lod, one copy engine: each layer step = 2 copies + 1 expert."""
    trace = tiny_trace([[[0, 1], [2, 3]], [[0, 1], [2, 3]]], num_experts=4)
    loaded, hw = load(trace), tiny_profile()
    spec = resolve_spec(trace, None)
    budget = spec.resident_bytes(trace.num_tokens) + 4 * 2 * spec.expert_bytes("bf16")
    _, ends, stall, _ = _model(loaded, "lod", hw, budget)
    costs = CostModel(spec, hw)
    x, e = hw.link.transfer_s(spec.expert_bytes("bf16")), costs.expert_s(1, "bf16")
    layer = [costs.attention_s(1, p + 1) + hw.gpu.kernel_launch_s + 2 * x + e for p in (0, 1)]
    assert ends[-1] == pytest.approx(2 * layer[0] + 2 * layer[1], rel=1e-12)
    assert e == pytest.approx(x) and stall == pytest.approx(4 * x, rel=1e-9)  # each first copy, unhidden


@pytest.mark.parametrize("policy", ["lod", "lru", "oracle", "fate", "mixtral-offloading", "speculate",
                                    "speculate-stream", "cpu-exec", "hobbit"])
@pytest.mark.parametrize("engines, bandwidth", [(1, 1.0e9), (2, 2.0e8), (1, 5.0e7)])
def test_the_model_agrees_with_the_engine(policy: str, engines: int, bandwidth: float) -> None:
    loaded = load(synthetic_trace(num_layers=4, num_experts=12, top_k=2, sequences=2, prompt_tokens=5,
                                  decode_tokens=12, seed=11, lookahead_depth=2, hidden_size=64,
                                  expert_intermediate_size=32, shared_expert_intermediate_size=32, model="tiny-moe"))
    hw = tiny_profile(link__copy_engines=engines, link__bandwidth_bytes_per_s=bandwidth)
    spec = resolve_spec(loaded.trace, None)
    budget = spec.resident_bytes(loaded.workload.max_context) + 4 * 5 * spec.expert_bytes("bf16")
    m_starts, m_ends, m_stall, m_stats = _model(loaded, policy, hw, budget)
    e_starts, e_ends, e_stall, e_stats = _engine(loaded, policy, hw, budget)
    assert m_stats == e_stats
    assert m_ends == pytest.approx(e_ends, rel=1e-9, abs=1e-15)
    assert m_starts == pytest.approx(e_starts, rel=1e-9, abs=1e-15)
    assert m_stall == pytest.approx(e_stall, rel=1e-9, abs=1e-15)
    fast = replay(loaded, policy=policy, hw=hw, memory_budget=budget)
    assert fast["tpot_s"] == pytest.approx(replay(loaded, policy=policy, hw=hw, memory_budget=budget,
                                                  mode="engine")["tpot_s"], rel=0)

