"""The reference engine: one GPU stream, the copy engines and the CPU predictor replaying forward steps.

Per MoE layer of every forward step (README, "Engine semantics"):

    GPU stream   attention ──▶ router ──▶ experts: hits first, then each miss as its bytes arrive ──▶ shared experts
                       │ gate input         │ on-demand loads
    CPU thread         ▼ predictor (latency) ──▶ prefetches for layers l+1..
    link               on-demand before prefetch; latency + bytes / bandwidth per copy engine

Order of decisions (fixed, so equal inputs give equal outputs): at the gate input of layer l the link is
advanced to that instant, then the controller predicts and the CPU thread posts its prefetches stamped with
the time its decision is done; at the router output the link is advanced again, the controller plans the
layer (cancelling and promoting queued transfers), and its on-demand loads are posted in plan order, each
once its slot is free. Experts the CPU computes (miss policy `cpu`) run on a second CPU thread in parallel
with the GPU; the GPU waits for their results before the shared experts.

The link is a closed-form busy-until timeline (sim/link.py) and the GPU stream one generator that yields
each instant it waits until: `run(mode="simpy")` drives it with a SimPy GPU process and a SimPy CPU
predictor process, `run(mode="loop")` with a plain loop and the CPU thread in closed form; both give
identical results. This engine drives the `OffloadController` itself; the simulator's fast kernel
(sim/kernel) reproduces its results exactly for the policies it supports.
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass, field

from sim.costs import CostModel
from sim.link import DEMAND, PREFETCH, Link
from sim.policies.controller import DONE, LayerPlan, OffloadController, Transfer
from sim.policies.prediction import Signals
from sim.workload import Step, Workload


@dataclass
class EngineResult:
    """Times of one replay, in seconds from its start."""

    step_start_at: list[float]
    step_end_at: list[float]
    gpu_stall_s: float
    """GPU time spent waiting for expert bytes or CPU-computed experts."""
    makespan_s: float
    link_busy_s: float
    """Copy-engine time (summed over engines) spent moving bytes before the makespan."""
    copy_engines: int
    gpu_spans: list[tuple[str, float, float, dict]] = field(default_factory=list)
    cpu_spans: list[tuple[str, float, float, dict]] = field(default_factory=list)
    link_spans: list[tuple[int, float, float, Transfer]] = field(default_factory=list)


class Engine:
    """Replays a workload through a controller on a cost model."""

    def __init__(self, workload: Workload, ctl: OffloadController, costs: CostModel, *, record: bool = False) -> None:
        self.workload = workload
        self.ctl = ctl
        self.costs = costs
        self.record = record
        """Keep per-span records for a timeline."""
        hw = costs.hw
        self.link = Link(hw.link.copy_engines, costs.transfer_s, ctl.on_transfer_started, ctl.on_transfer_done,
                         record=record)
        self.predictor_latency_s = hw.cpu.predictor_latency_s
        self.router_s = hw.gpu.kernel_launch_s
        self.predicts = ctl.policy.prefetch != "none"
        self.cpu_free_at = 0.0
        """CPU predictor thread (closed form): busy until."""
        self.cpu_expert_free_at = 0.0
        """CPU expert thread: busy until."""
        self.cpu_is_device = hw.device_kind == "cpu"
        """On a CPU device there is no second processor: experts the miss policy sends to "the CPU" run on
        the compute stream itself, after the layer's other experts (realrun's order)."""
        self.copy_contention = hw.copy_contention
        """Compute slows by this factor while the link moves bytes (see `_duration`)."""
        self.now = 0.0
        """The GPU stream's clock (s)."""
        self.stall_s = 0.0
        self.step_start_at: list[float] = []
        self.step_end_at: list[float] = []
        self.gpu_spans: list[tuple[str, float, float, dict]] = []
        self.cpu_spans: list[tuple[str, float, float, dict]] = []
        self._post_prefetches = self._post_closed_form

    # --- the CPU predictor thread --------------------------------------------------------------------
    def _post_closed_form(self, gate_at: float, prefetches: list[Transfer]) -> None:
        start = max(self.cpu_free_at, gate_at)
        done = start + self.predictor_latency_s
        self.cpu_free_at = done
        self._submit_prefetches(start, done, prefetches)

    def _submit_prefetches(self, start: float, done: float, prefetches: list[Transfer]) -> None:
        if self.record:
            self.cpu_spans.append(("predict", start, done, {"prefetches": len(prefetches)}))
        for t in prefetches:
            self.link.submit(t, done, PREFETCH)

    # --- the GPU stream ------------------------------------------------------------------------------
    def gpu_stream(self) -> Iterator[float]:
        """Replay every step, yielding each instant the stream waits until (for the SimPy driver)."""
        for step in self.workload.steps:
            self.ctl.start_forward(step.index, step.phase, step.num_tokens)
            self.step_start_at.append(self.now)
            attention_s = self.costs.attention_s(step.num_tokens, step.context)
            for layer, (ids, counts) in enumerate(self.workload.routes(step.index)):
                yield from self._layer(step, layer, ids, counts, attention_s)
            self.step_end_at.append(self.now)

    def _layer(self, step: Step, layer: int, ids, counts, attention_s: float) -> Iterator[float]:
        """One MoE layer of `step`: attention, prediction, router, the routed experts, the shared experts."""
        ctl, link = self.ctl, self.link
        self._run_on_gpu("attention", attention_s, {"layer": layer, "step": step.index})
        yield self.now
        link.advance(self.now)
        if self.predicts:
            probs = self.workload.lookahead_probs
            signals = Signals(step.index, step.phase, step.num_tokens, None if probs is None else
                              probs[:, step.token_start:step.token_start + step.num_tokens, layer, :])
            self._post_prefetches(self.now, ctl.on_gate_input(layer, signals))
        self.now += self.router_s
        yield self.now
        link.advance(self.now)
        route_at = self.now
        plan = ctl.on_route(layer, ids, counts)
        for t in plan.cancelled:
            link.cancel(t)
        for t in plan.promoted:
            link.promote(t)
        cpu_done_at = route_at if self.cpu_is_device else self._cpu_thread(plan, route_at)
        yield from self._routed_experts(plan, route_at)
        if self.cpu_is_device:
            for expert, tokens in plan.cpu_work:
                self._run_on_gpu(f"cpu expert {expert}", self.costs.cpu_expert_s(tokens), {"layer": layer, "tokens": tokens})
        else:
            self._stall_until(cpu_done_at, {"layer": layer, "waiting": "cpu"})
        shared_s = self.costs.shared_s(step.num_tokens)
        if shared_s:
            self._run_on_gpu("shared experts", shared_s, {"layer": layer})
        yield self.now

    def _cpu_thread(self, plan: LayerPlan, route_at: float) -> float:
        """The CPU expert thread computes the plan's CPU work from `route_at` on; returns when it is done."""
        done = route_at
        for expert, tokens in plan.cpu_work:
            start = max(self.cpu_expert_free_at, route_at)
            self.cpu_expert_free_at = done = start + self.costs.cpu_expert_s(tokens)
            if self.record:
                self.cpu_spans.append((f"cpu expert {expert}", start, done, {"layer": plan.layer}))
        return done

    def _routed_experts(self, plan: LayerPlan, route_at: float) -> Iterator[float]:
        """GPU work in plan order (hits, substitutes, loads); each on-demand load is posted once the slot it
        reuses is free, each expert in flight waited for."""
        loads, posted, ready_at = plan.loads, 0, route_at
        compute_end: dict[int, float] = {}
        for expert, tokens, precision, t in plan.gpu_work:
            posted, ready_at = self._post_loads(loads, posted, ready_at, compute_end)
            if t is not None and t.state != DONE:  # in flight (as of the route): wait for its bytes
                if self._stall_until(self.link.end_of(t), {"layer": plan.layer, "expert": expert}):
                    yield self.now
            self._run_on_gpu(f"expert {expert}", self.costs.expert_s(tokens, precision),
                             {"layer": plan.layer, "tokens": tokens, "precision": precision})
            compute_end[expert] = self.now

    def _post_loads(self, loads: list[Transfer], posted: int, ready_at: float,
                    compute_end: dict[int, float]) -> tuple[int, float]:
        """Post, in order from `posted`, every on-demand load whose slot-free time is known (what it waits for
        computed or landed); returns (loads posted so far, their latest ready time)."""
        while posted < len(loads):
            load = loads[posted]
            if load.after_compute is not None:
                if load.after_compute not in compute_end:
                    break
                ready_at = max(ready_at, compute_end[load.after_compute])
            if load.after_transfer is not None:
                ready_at = max(ready_at, self.link.end_of(load.after_transfer))
            self.link.submit(load, ready_at, DEMAND)
            posted += 1
        return posted, ready_at

    def _run_on_gpu(self, name: str, work_s: float, args: dict) -> None:
        start = self.now
        self.now = start + self._duration(start, work_s)
        if self.record:
            self.gpu_spans.append((name, start, self.now, args))

    def _stall_until(self, at: float, args: dict) -> bool:
        """The GPU waits until `at` if that is later than now; returns whether it waited."""
        if at <= self.now:
            return False
        if self.record:
            self.gpu_spans.append(("stall", self.now, at, args))
        self.stall_s += at - self.now
        self.now = at
        return True

    def _duration(self, now: float, work_s: float) -> float:
        """Seconds a compute operation of `work_s` seconds (alone) takes from `now`.

        With `copy_contention` > 1 it runs that many times slower while the link is busy; the link counts
        as busy until it has done the work it holds at `now` (`Link.busy_until`): transfers posted during the
        operation do not slow it. A CPU device's transfers share its memory bus and cores with compute."""
        if self.copy_contention == 1.0:
            return work_s
        busy_s = self.link.busy_until(now) - now
        if busy_s <= 0.0:
            return work_s
        slowed_s = work_s * self.copy_contention
        if slowed_s <= busy_s:
            return slowed_s
        return busy_s + work_s - busy_s / self.copy_contention

    # --- drivers -------------------------------------------------------------------------------------
    def run(self, mode: str = "loop") -> EngineResult:
        """Replay the whole workload; `mode` "loop" (plain loop) or "simpy" (SimPy processes)."""
        if mode == "loop":
            for _ in self.gpu_stream():
                pass
        elif mode == "simpy":
            self._run_simpy()
        else:
            raise ValueError(f"mode must be 'loop' or 'simpy', not {mode!r}")
        ctl = self.ctl
        assert ctl.peak_slots * ctl.slot_bytes <= ctl.expert_budget_bytes, "expert budget exceeded"
        makespan = self.step_end_at[-1] if self.step_end_at else 0.0
        self.link.drain()
        busy = sum(min(t.end_at, makespan) - t.start_at for t in self.link.started if t.start_at < makespan)
        return EngineResult(self.step_start_at, self.step_end_at, self.stall_s, makespan, busy,
                            len(self.link.free_at), self.gpu_spans, self.cpu_spans, self.link.spans)

    def _run_simpy(self) -> None:
        import simpy  # here: a replay in the other modes does not pay for importing it (~0.04 s CPU)

        env = simpy.Environment()
        requests: simpy.Store = simpy.Store(env)

        def post(gate_at: float, prefetches: list[Transfer]) -> None:
            requests.put(prefetches)

        def gpu() -> Iterator[simpy.Event]:
            for until in self.gpu_stream():
                if until > env.now:
                    yield env.timeout(until - env.now)

        def cpu_predictor() -> Iterator[simpy.Event]:
            while True:
                prefetches = yield requests.get()
                start = env.now
                self._submit_prefetches(start, start + self.predictor_latency_s, prefetches)
                yield env.timeout(self.predictor_latency_s)

        self._post_prefetches = post
        done = env.process(gpu())
        env.process(cpu_predictor())
        env.run(until=done)
