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
predictor process; `mode="loop"` drives the same generator with a plain loop (no suspensions) and the CPU
thread in closed form. The plain loop also converts each step's routes and rankings to Python lists at
once and reads expert times from dict tables; `Engine(reference=True)` takes none of these paths. Tests
check that all of them give identical results (tests/sim/test_engine.py, test_engine_fastpaths.py).
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from dataclasses import dataclass, field

import numpy as np
import simpy

from sim.costs import CostModel
from sim.link import DEMAND, PREFETCH, Link
from sim.policies.controller import DONE, OffloadController, Transfer
from sim.policies.prediction import NEEDS_LOOKAHEAD, Signals
from sim.workload import RANK_DEPTH, Step, Workload


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


class _ExpertTimes(dict):
    """precision -> {tokens: GPU seconds of one expert}, filled from `CostModel.expert_s` on first use.

    Speed: two C-level dict lookups per computed expert instead of an lru_cache call with a tuple key
    (~4 per layer step)."""

    def __init__(self, expert_s: Callable[[int, str], float]) -> None:
        super().__init__()
        self.expert_s = expert_s

    def __missing__(self, precision: str) -> dict[int, float]:
        self[precision] = table = _TimesByTokens(self.expert_s, precision)
        return table


class _TimesByTokens(dict):
    """tokens -> GPU seconds of one expert stored in `precision` (one row of `_ExpertTimes`)."""

    def __init__(self, expert_s: Callable[[int, str], float], precision: str) -> None:
        super().__init__()
        self.expert_s, self.precision = expert_s, precision

    def __missing__(self, tokens: int) -> float:
        self[tokens] = s = self.expert_s(tokens, self.precision)
        return s


class Engine:
    """Replays a workload through a controller on a cost model."""

    def __init__(self, workload: Workload, ctl: OffloadController, costs: CostModel, *, record: bool = False,
                 presorted: bool = True, reference: bool = False) -> None:
        self.workload = workload
        self.ctl = ctl
        self.costs = costs
        self.record = record
        """Keep per-span records for a timeline (slower)."""
        self.reference = reference
        """Take none of the speed paths (pre-sorted rankings, whole-step list conversion, inline predictor
        thread): the plain reference the tests compare the fast loop with."""
        presorted = presorted and not reference
        hw = costs.hw
        self.link = Link(hw.link.copy_engines, costs.transfer_s, ctl.on_transfer_started, ctl.on_transfer_done,
                         record=record)
        self.predictor_latency_s = hw.cpu.predictor_latency_s
        self.predicts = ctl.policy.prefetch != "none"
        uses_rank = ctl.policy.prediction in NEEDS_LOOKAHEAD and ctl.prediction_limit <= RANK_DEPTH
        self.rank: tuple[np.ndarray, np.ndarray] | None = None
        """Pre-sorted look-ahead rankings handed to decode predictions (same result as sorting each time):
        (experts, probabilities) [T, L, D, m], cut to the m candidates a decode prediction can use (the
        controller's `ranked_picks` where it takes a fixed prefix, else `prediction_limit`: the predictors
        slice to at most that) and laid out so that one position's rankings are contiguous (one `tolist()`
        each per step; ~2x faster than transposing every step, and converting 1 column instead of 4 under
        fate on the RTX 3090 profile saves ~4 µs per step)."""
        if presorted and uses_rank:
            m = ctl.prediction_limit if ctl.ranked_picks is None else ctl.ranked_picks
            self.rank = tuple(np.ascontiguousarray(a[..., :m].transpose(1, 2, 0, 3)) for a in workload.lookahead_rank)
        self.cpu_free_at = 0.0
        """Closed-form CPU predictor thread: busy until (fast mode)."""
        self.cpu_expert_free_at = 0.0
        """CPU expert thread: busy until."""
        self.cpu_is_device = hw.device_kind == "cpu"
        """On a CPU device there is no second processor: experts the miss policy sends to "the CPU" run on
        the compute stream itself, after the layer's other experts (realrun's order)."""
        self.copy_contention = hw.copy_contention
        """Compute slows by this factor while the link moves bytes (see `_contended`)."""
        self.stall_s = 0.0
        self.step_start_at: list[float] = []
        self.step_end_at: list[float] = []
        self.gpu_spans: list[tuple[str, float, float, dict]] = []
        self.cpu_spans: list[tuple[str, float, float, dict]] = []
        self._post_prefetches = self._post_closed_form
        self._ones = [1] * workload.top_k
        """Token counts of a decode layer step with k distinct experts (shared: the controller only reads it)."""

    # --- the CPU predictor thread --------------------------------------------------------------------
    def _post_closed_form(self, gate_at: float, prefetches: list[Transfer]) -> None:
        start = max(self.cpu_free_at, gate_at)
        done = start + self.predictor_latency_s
        self.cpu_free_at = done
        if prefetches or self.record:  # most decode predictions pick only resident experts: nothing to post
            self._submit_prefetches(start, done, prefetches)

    def _submit_prefetches(self, start: float, done: float, prefetches: list[Transfer]) -> None:
        if self.record:
            self.cpu_spans.append(("predict", start, done, {"prefetches": len(prefetches)}))
        for t in prefetches:
            self.link.submit(t, done, PREFETCH)

    # --- per-step inputs -----------------------------------------------------------------------------
    def _step_routes(self, step: Step) -> tuple[list, list]:
        """(expert ids [L][m], token counts [L][m]) of `step` as Python lists.

        Speed: the controller works on lists; a decode step whose k experts are distinct in every layer
        (always, for real routers) is one row of `decode_ids`, converted with a single `tolist()` (~24x
        fewer numpy calls than one per layer)."""
        routes = step.routes
        if self.reference:  # numpy arrays, as realrun passes them: the controller converts each layer
            return [ids for ids, _ in routes], [counts for _, counts in routes]
        workload = self.workload
        if step.num_tokens == 1 and workload.decode_ids is not None and workload.decode_distinct[step.token_start]:
            return workload.decode_ids[step.token_start].tolist(), [self._ones] * len(routes)
        return [ids.tolist() for ids, _ in routes], [counts.tolist() for _, counts in routes]

    def _step_ranking(self, step: Step) -> list[tuple[list, list]]:
        """Look-ahead rankings of a decode step: per layer, ([D][m] experts, [D][m] probabilities) as lists."""
        ids, probs = self.rank
        t = step.token_start
        return list(zip(ids[t].tolist(), probs[t].tolist(), strict=True))

    # --- the GPU stream ------------------------------------------------------------------------------
    def gpu_stream(self, sync: bool = True) -> Iterator[float]:
        """Replay every step; with `sync`, yields each instant the stream waits until (for the SimPy driver).

        Speed: the plain loop passes sync=False, as it does nothing at those instants; it then skips the
        four generator suspensions per layer step, which changes no result."""
        ctl, link, costs, record = self.ctl, self.link, self.costs, self.record
        probs = self.workload.lookahead_probs
        rank = self.rank
        predicts = self.predicts
        signals = Signals(0, "decode", 1)  # refilled per layer; predictors do not keep it
        # Speed: bound methods, costs and the predictor thread's busy-until kept in locals for the per-layer
        # loop (each attribute lookup ~50 ns, ~20 per layer).
        expert_s, cpu_expert_s = _ExpertTimes(costs.expert_s), costs.cpu_expert_s
        on_gate_input, on_route, post = ctl.on_gate_input, ctl.on_route, self._post_prefetches
        router_s = costs.hw.gpu.kernel_launch_s
        closed_form = post == self._post_closed_form and not self.reference
        predictor_latency_s = self.predictor_latency_s
        cpu_free_at = self.cpu_free_at
        shared_by_tokens: dict[int, float] = {}  # costs.shared_s is not memoised; decode steps repeat n = 1
        contended = self.copy_contention != 1.0  # only calibrated CPU profiles: datasheet ones skip the check
        cpu_on_stream = self.cpu_is_device
        step_start_at, step_end_at = self.step_start_at, self.step_end_at
        now = 0.0
        for step in self.workload.steps:
            n = step.num_tokens
            attn_s = costs.attention_s(n, step.context)
            shared_s = shared_by_tokens.get(n)
            if shared_s is None:
                shared_by_tokens[n] = shared_s = costs.shared_s(n)
            ctl.start_forward(step.index, step.phase, n)
            signals.step, signals.phase, signals.num_tokens = step.index, step.phase, n
            signals.lookahead_rank = None
            ranked = rank is not None and n == 1 and predicts and step.phase == "decode"
            if ranked:
                signals.lookahead_probs = None
                ranks = self._step_ranking(step)
            ids_rows, counts_rows = self._step_routes(step)
            step_start_at.append(now)
            t0 = step.token_start
            for layer in range(len(ids_rows)):
                gate_at = now + (self._contended(now, attn_s) if contended else attn_s)
                if record:
                    self.gpu_spans.append(("attention", now, gate_at, {"layer": layer, "step": step.index}))
                now = gate_at
                if sync:
                    yield now
                if link.queue or link.in_flight:
                    link.advance(now)
                if predicts:
                    if ranked:
                        signals.lookahead_rank = ranks[layer]
                    elif probs is not None:
                        signals.lookahead_probs = probs[:, t0:t0 + n, layer, :]
                    prefetches = on_gate_input(layer, signals)
                    if closed_form:  # the CPU predictor thread in closed form, inline (one call fewer per layer)
                        start = cpu_free_at if cpu_free_at >= now else now
                        cpu_free_at = done = start + predictor_latency_s
                        if prefetches or record:
                            self._submit_prefetches(start, done, prefetches)
                    else:
                        post(now, prefetches)
                now += router_s
                if sync:
                    yield now
                if link.queue or link.in_flight:
                    link.advance(now)
                route_at = now
                plan = on_route(layer, ids_rows[layer], counts_rows[layer])
                for t in plan.cancelled:
                    link.cancel(t)
                for t in plan.promoted:
                    link.promote(t)
                cpu_done = route_at
                for expert, tokens in (() if cpu_on_stream else plan.cpu_work):
                    start = max(self.cpu_expert_free_at, route_at)
                    self.cpu_expert_free_at = cpu_done = start + cpu_expert_s(tokens)
                    if record:
                        self.cpu_spans.append((f"cpu expert {expert}", start, cpu_done, {"layer": layer}))
                # GPU work in plan order: hits, substitutes, then loads, each on-demand load posted once the
                # slot it reuses is free. Speed: no sub-generators or helper calls here but for posting loads
                # (one per layer step and per stall cost ~1 µs each); only this loop yields.
                loads = plan.loads
                n_loads = posted = 0
                if loads:
                    n_loads, ready, compute_end = len(loads), route_at, {}
                for expert, tokens, precision, t in plan.gpu_work:
                    if posted < n_loads:
                        posted, ready = self._post_loads(loads, posted, ready, compute_end)
                    if t is not None and t.state is not DONE:  # in flight: wait for its bytes
                        arrive = t.end_at if t.start_at >= 0.0 else link.end_of(t)
                        if arrive > now:
                            if record:
                                self.gpu_spans.append(("stall", now, arrive, {"layer": layer, "expert": expert}))
                            self.stall_s += arrive - now
                            now = arrive
                            if sync:
                                yield now
                    done = now + (self._contended(now, expert_s[precision][tokens]) if contended
                                  else expert_s[precision][tokens])
                    if record:
                        self.gpu_spans.append((f"expert {expert}", now, done,
                                               {"layer": layer, "tokens": tokens, "precision": precision}))
                    now = done
                    if n_loads:
                        compute_end[expert] = now
                if cpu_on_stream:
                    for expert, tokens in plan.cpu_work:
                        done = now + (self._contended(now, cpu_expert_s(tokens)) if contended
                                      else cpu_expert_s(tokens))
                        if record:
                            self.gpu_spans.append((f"cpu expert {expert}", now, done,
                                                   {"layer": layer, "tokens": tokens}))
                        now = done
                elif cpu_done > now:
                    if record:
                        self.gpu_spans.append(("stall", now, cpu_done, {"layer": layer, "waiting": "cpu"}))
                    self.stall_s += cpu_done - now
                    now = cpu_done
                if shared_s:
                    done = now + (self._contended(now, shared_s) if contended else shared_s)
                    if record:
                        self.gpu_spans.append(("shared experts", now, done, {"layer": layer}))
                    now = done
                if sync:
                    yield now
            step_end_at.append(now)
        if closed_form:
            self.cpu_free_at = cpu_free_at

    def _contended(self, now: float, work_s: float) -> float:
        """Seconds a compute operation of `work_s` seconds (alone) takes from `now` while the link works.

        While the link is busy the operation runs `copy_contention` times slower; the link counts as busy
        until it has done the work it holds at `now` (`Link.busy_until`): transfers posted during the
        operation do not slow it. A CPU device's transfers share its memory bus and cores with compute."""
        busy_s = self.link.busy_until(now) - now
        if busy_s <= 0.0:
            return work_s
        slowed_s = work_s * self.copy_contention
        if slowed_s <= busy_s:
            return slowed_s
        return busy_s + work_s - busy_s / self.copy_contention

    def _post_loads(self, loads: list[Transfer], posted: int, ready: float,
                    compute_end: dict[int, float]) -> tuple[int, float]:
        """Post, in order from `posted`, every on-demand load whose slot-free time is known (its slot's
        previous occupant computed or landed); returns (loads posted so far, their latest ready time)."""
        link = self.link
        while posted < len(loads):
            load = loads[posted]
            if load.after_compute is not None and load.after_compute not in compute_end:
                break
            if load.after_compute is not None:
                ready = max(ready, compute_end[load.after_compute])
            if load.after_transfer is not None:
                ready = max(ready, link.end_of(load.after_transfer))
            link.submit(load, ready, DEMAND)
            posted += 1
        return posted, ready

    # --- drivers -------------------------------------------------------------------------------------
    def run(self, mode: str = "loop") -> EngineResult:
        """Replay the whole workload; `mode` "loop" (plain loop) or "simpy" (SimPy processes)."""
        if mode == "loop":
            for _ in self.gpu_stream(sync=False):
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
