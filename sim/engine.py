"""The SimPy engine: one GPU stream, the copy engines and the CPU predictor replaying forward steps.

Per MoE layer of every forward step (DESIGN §6):

    GPU stream   attention ──▶ router ──▶ experts: hits first, then each miss as its bytes arrive ──▶ shared experts
                       │ gate input         │ on-demand loads
    CPU thread         ▼ predictor (latency) ──▶ prefetches for layers l+1..
    link               on-demand before prefetch; latency + bytes / bandwidth per copy engine

Order of decisions (fixed, so equal inputs give equal outputs): at the gate input of layer l the link is
advanced to that instant, then the controller predicts and the CPU thread posts its prefetches stamped with
the time its decision is done; at the router output the link is advanced again, the controller plans the
layer (cancelling stale and promoting needed prefetches), and its on-demand loads are posted in plan order,
each once its slot is free. Experts the CPU computes (miss policy `cpu`) run on a second CPU thread in
parallel with the GPU; the GPU waits for their results before the shared experts.

Speed: no SimPy process per expert or transfer. The link is a closed-form busy-until timeline
(sim/link.py), durations are memoised (sim/costs.py), and the GPU stream is one generator that yields the
instants it must wait until. `run(..., mode="simpy")` drives it with a SimPy GPU process and a SimPy CPU
predictor process; `mode="loop"` drives the same generator with a plain loop and the CPU thread in closed
form. Tests check that both give identical results.
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass, field

import simpy

from sim.costs import CostModel
from sim.link import DEMAND, PREFETCH, Link
from sim.policies.controller import OffloadController, Transfer
from sim.policies.prediction import NEEDS_LOOKAHEAD, Signals
from sim.workload import RANK_DEPTH, Workload


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

    def __init__(self, workload: Workload, ctl: OffloadController, costs: CostModel, *, record: bool = False,
                 presorted: bool = True) -> None:
        self.workload = workload
        self.ctl = ctl
        self.costs = costs
        self.record = record
        """Keep per-span records for a timeline (slower)."""
        hw = costs.hw
        self.link = Link(hw.link.copy_engines, costs.transfer_s, ctl.on_transfer_started, ctl.on_transfer_done,
                         record=record)
        self.predictor_latency_s = hw.cpu.predictor_latency_s
        self.predicts = ctl.policy.prefetch != "none"
        uses_rank = ctl.policy.prediction in NEEDS_LOOKAHEAD and ctl.prediction_limit <= RANK_DEPTH
        self.rank = workload.lookahead_rank if presorted and uses_rank else None
        """Pre-sorted look-ahead rankings handed to decode predictions (same result as sorting each time)."""
        self.cpu_free_at = 0.0
        """Closed-form CPU predictor thread: busy until (fast mode)."""
        self.cpu_expert_free_at = 0.0
        """CPU expert thread: busy until."""
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
        """Replay every step; yields each instant the stream waits until (for the SimPy driver)."""
        ctl, link, costs, record = self.ctl, self.link, self.costs, self.record
        probs = self.workload.lookahead_probs
        rank = self.rank
        signals = Signals(0, "decode", 1)  # refilled per layer; predictors do not keep it
        expert_s, cpu_expert_s = costs.expert_s, costs.cpu_expert_s
        now = 0.0
        for step in self.workload.steps:
            n = step.num_tokens
            attn_s = costs.attention_s(n, step.context)
            router_s = costs.hw.gpu.kernel_launch_s
            shared_s = costs.shared_s(n)
            ctl.start_forward(step.index, step.phase, n)
            signals.step, signals.phase, signals.num_tokens = step.index, step.phase, n
            signals.lookahead_rank = None
            ranked = rank is not None and n == 1 and self.predicts
            if ranked:  # one conversion per step: [L][D][m] lists of experts and probabilities
                signals.lookahead_probs = None
                step_ids = rank[0][:, step.token_start].transpose(1, 0, 2).tolist()
                step_probs = rank[1][:, step.token_start].transpose(1, 0, 2).tolist()
            self.step_start_at.append(now)
            t0 = step.token_start
            for layer, (ids, counts) in enumerate(step.routes):
                gate_at = now + attn_s
                if record:
                    self.gpu_spans.append(("attention", now, gate_at, {"layer": layer, "step": step.index}))
                now = gate_at
                yield now
                if link.queue or link.in_flight:
                    link.advance(now)
                if self.predicts:
                    if ranked:
                        signals.lookahead_rank = (step_ids[layer], step_probs[layer])
                    elif probs is not None:
                        signals.lookahead_probs = probs[:, t0:t0 + n, layer, :]
                    self._post_prefetches(now, ctl.on_gate_input(layer, signals))
                now += router_s
                yield now
                if link.queue or link.in_flight:
                    link.advance(now)
                route_at = now
                plan = ctl.on_route(layer, ids, counts)
                assert ctl.occupied_slots * ctl.slot_bytes <= ctl.expert_budget_bytes, "expert budget exceeded"
                for t in plan.cancelled:
                    link.cancel(t)
                for t in plan.promoted:
                    link.promote(t)
                cpu_done = route_at
                for expert, tokens in plan.cpu_work:
                    start = max(self.cpu_expert_free_at, route_at)
                    self.cpu_expert_free_at = cpu_done = start + cpu_expert_s(tokens)
                    if record:
                        self.cpu_spans.append((f"cpu expert {expert}", start, cpu_done, {"layer": layer}))
                loads, posted, ready = plan.loads, 0, route_at
                compute_end: dict[int, float] = {}
                for expert, tokens, precision, t in plan.gpu_work:
                    while posted < len(loads):  # post every load whose slot-free time is known, in order
                        load = loads[posted]
                        if load.after_compute is not None and load.after_compute not in compute_end:
                            break
                        if load.after_compute is not None:
                            ready = max(ready, compute_end[load.after_compute])
                        if load.after_transfer is not None:
                            ready = max(ready, link.end_of(load.after_transfer))
                        link.submit(load, ready, DEMAND)
                        posted += 1
                    if t is not None and t.state != "done":
                        arrive = link.end_of(t)
                        if arrive > now:
                            if record:
                                self.gpu_spans.append(("stall", now, arrive, {"layer": layer, "expert": expert}))
                            self.stall_s += arrive - now
                            now = arrive
                            yield now
                    done = now + expert_s(tokens, precision)
                    if record:
                        self.gpu_spans.append((f"expert {expert}", now, done,
                                               {"layer": layer, "tokens": tokens, "precision": precision}))
                    now = done
                    compute_end[expert] = now
                if cpu_done > now:
                    if record:
                        self.gpu_spans.append(("stall", now, cpu_done, {"layer": layer, "waiting": "cpu"}))
                    self.stall_s += cpu_done - now
                    now = cpu_done
                if shared_s:
                    if record:
                        self.gpu_spans.append(("shared experts", now, now + shared_s, {"layer": layer}))
                    now += shared_s
                yield now
            self.step_end_at.append(now)

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
        makespan = self.step_end_at[-1] if self.step_end_at else 0.0
        self.link.drain()
        busy = sum(min(t.end_at, makespan) - t.start_at for t in self.link.started if t.start_at < makespan)
        return EngineResult(self.step_start_at, self.step_end_at, self.stall_s, makespan, busy,
                            len(self.link.free_at), self.gpu_spans, self.cpu_spans, self.link.spans)

    def _run_simpy(self) -> None:
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
