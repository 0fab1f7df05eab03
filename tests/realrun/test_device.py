"""The stream and event rules, checked without a GPU: the fake device's happens-before log, and the engine
run unchanged on it (the fake only logs, and in lazy mode lands copies as late as a GPU may)."""

from __future__ import annotations

import threading
import time
from contextlib import contextmanager

import pytest
import torch

from realrun.device import HOST, HostDevice, HostEvent, PendingTimes
from realrun.engine import OffloadEngine, moe_blocks, spec_of
from realrun.fake_device import FakeDevice
from realrun.runner import build_store, expert_budget, greedy_generate, popularity_counts, storage_precisions
from sim.costs import CostModel
from sim.hardware import load_profile
from sim.policies.controller import OffloadController, Transfer
from sim.policies.prefetch import decode_prefetch_count
from sim.policies.presets import build_policy
from sim.units import parse_budget
from tests.realrun.conftest import NEW_TOKENS, PROMPTS, fresh

CPU = torch.device("cpu")
SLOT = ("slot", 0, 0)


# --- the fake's rules on hand-written sequences ------------------------------------------------------
def test_a_read_after_waiting_on_the_copy_event_is_ordered() -> None:
    dev = FakeDevice()
    dev.issue(dev.copy, lambda: None, writes={SLOT: torch.zeros(1)})
    landed = dev.record(dev.copy)
    dev.wait(dev.compute, landed)
    dev.access(dev.compute, SLOT)
    assert dev.violations() == []


def test_a_read_without_waiting_is_a_violation() -> None:
    dev = FakeDevice()
    dev.issue(dev.copy, lambda: None, writes={SLOT: torch.zeros(1)})
    dev.record(dev.copy)
    dev.access(dev.compute, SLOT)
    assert len(dev.violations()) == 1 and "read of ('slot', 0, 0) on compute" in dev.violations()[0]


def test_the_host_seeing_an_event_complete_orders_later_work() -> None:
    """A query that answered True (the engine's `landed`) orders what the host issues afterwards."""
    dev = FakeDevice()
    dev.issue(dev.copy, lambda: None, writes={SLOT: torch.zeros(1)})
    landed = dev.record(dev.copy)
    assert landed.query()
    dev.access(dev.compute, SLOT)
    assert dev.violations() == []


def test_overwriting_a_slot_before_its_last_use_is_a_violation_unless_the_copy_waits() -> None:
    for waits in (False, True):
        dev = FakeDevice()
        dev.access(dev.compute, SLOT)
        freed = dev.record(dev.compute)
        if waits:
            dev.wait(dev.copy, freed)
        dev.issue(dev.copy, lambda: None, writes={SLOT: torch.zeros(1)})
        assert (dev.violations() == []) == waits


def test_lazy_copies_land_only_when_waited_for() -> None:
    """Lazy mode: the copy stream's bytes appear when another stream or the host waits for them."""
    dev = FakeDevice(lazy=True)
    slot = torch.zeros(4)
    dev.issue(dev.copy, lambda: slot.fill_(7), writes={SLOT: slot})
    landed = dev.record(dev.copy)
    assert torch.equal(slot, torch.zeros(4)) and not landed.query()
    dev.wait(dev.compute, landed)
    assert torch.equal(slot, torch.full((4,), 7.0)) and landed.query()


def test_host_threads_are_agents_too() -> None:
    """A worker thread reading a buffer the compute stream wrote must wait for the write's event."""
    import threading

    for waits in (False, True):
        dev = FakeDevice()
        dev.issue(dev.compute, lambda: None, writes={("in",): torch.zeros(1)})
        ready = dev.record(dev.compute)

        def worker(dev=dev, ready=ready, waits=waits) -> None:
            if waits:
                dev.wait(HOST, ready)
            dev.access(HOST, ("in",))
        t = threading.Thread(target=worker, name="worker")
        t.start()
        t.join()
        assert (dev.violations() == []) == waits


def test_pending_times_read_completed_pairs_in_order() -> None:
    dev = HostDevice()
    times = PendingTimes(dev)
    got = []
    times.add(HostEvent(1.0), HostEvent(3.5), lambda s, e: got.append(e - s))
    times.add(HostEvent(4.0), HostEvent(4.25), lambda s, e: got.append(e - s))
    times.settle()
    assert got == [2.5, 0.25] and len(times) == 0


def test_pending_times_wait_for_events_that_have_not_completed() -> None:
    dev = FakeDevice(lazy=True)
    dev.issue(dev.copy, lambda: None, writes={SLOT: torch.zeros(1)})
    start, end = dev.record(dev.copy), dev.record(dev.copy)
    times = PendingTimes(dev)
    got = []
    times.add(start, end, lambda s, e: got.append((s, e)))
    times.settle()
    assert got == [] and len(times) == 1
    times.settle(block=True)
    assert got == [(start.at, end.at)]


# --- the engine on the fake device ---------------------------------------------------------------------
def open_engine(references, arch: str, preset: str, overrides: dict, dev, *, budget: str = "50%",
                spy=None) -> OffloadEngine:
    """realrun's steps (as run_offloaded, RAM tier) up to an open engine on `dev`."""
    model = fresh(references, arch)
    policy = build_policy(preset, overrides)
    spec = spec_of(model, f"tiny-{arch}")
    kv = max(len(p) for p in PROMPTS.token_ids) + NEW_TOKENS
    experts = expert_budget(parse_budget(budget, spec, kv), spec, kv)
    popularity = (popularity_counts(model, PROMPTS.token_ids, CPU, spec.num_moe_layers, spec.num_experts)
                  if policy.allocation == "popularity" else None)
    slow, layouts = build_store(spec, moe_blocks(model), storage_precisions(policy), "ram", CPU)
    count = decode_prefetch_count(CostModel(spec, load_profile("rtx3090-bound")))
    ctl = OffloadController(spec, policy, experts, popularity=popularity, decode_prefetch_count=count)
    if spy is not None:
        spy(ctl)
    return OffloadEngine(model, spec, ctl, slow, layouts, CPU, lookahead=policy.lookahead, dev=dev)


def run_on_device(references, arch: str, preset: str, overrides: dict, dev, *, budget: str = "50%", spy=None):
    """The engine on `dev` generating PROMPTS: (closed engine, Generation)."""
    with open_engine(references, arch, preset, overrides, dev, budget=budget, spy=spy) as engine:
        gen = greedy_generate(engine.model, PROMPTS.token_ids, NEW_TOKENS, CPU, on_forward=engine.start_forward,
                              keep_logits=True)
    return engine, gen


# lossless presets that exercise prefetch (fate), tight-budget slot reuse within a layer step (lru 30%),
# speculation's prefetches (speculate, waiting on misses) and the CPU worker (cpu-exec)
FAKE_CASES = [("fate", {"precision": "bf16", "miss": "wait"}, "50%"), ("lru", {}, "30%"), ("speculate", {"miss": "wait"}, "50%"),
              ("cpu-exec", {}, "50%")]


@pytest.mark.parametrize("preset, overrides, budget", FAKE_CASES)
def test_engine_on_a_lazy_fake_device_is_exact_and_keeps_the_stream_rules(references, preset, overrides,
                                                                          budget) -> None:
    """Copies land as late as a GPU may: the logits are still bit-equal to transformers, and every slot
    read is ordered after its copy, every copy after the slot's last read."""
    reuse = []

    def spy(ctl) -> None:  # note when a load reuses the slot of an expert computed earlier in its step
        route = ctl.on_route

        def on_route(*args):
            plan = route(*args)
            reuse.extend(t for t in plan.loads if t.after_compute is not None)
            return plan
        ctl.on_route = on_route

    dev = FakeDevice(lazy=True)
    engine, gen = run_on_device(references, "qwen2_moe", preset, overrides, dev, budget=budget, spy=spy)
    ref = references["qwen2_moe"][1]
    assert gen.generated == ref.generated
    assert all(torch.equal(a, b) for a, b in zip(gen.logits, ref.logits, strict=True))
    assert dev.violations() == []
    reads = dev.accesses("slot")
    assert any(op.kind == "write" for op in reads) and any(op.kind == "read" for op in reads)
    assert engine.stall_s >= 0 and (engine.loader.busy_s > 0) == (preset != "cpu-exec")  # cpu-exec never copies
    if preset == "lru":
        assert reuse, "the tight budget should make a load reuse a slot within a layer step"
    if preset == "cpu-exec":
        worker = [op for op in dev.accesses("cpu-in") if op.agent.startswith("host:realrun-cpu")]
        assert worker, "CPU experts run on the worker thread"


def test_every_slot_read_has_a_wait_on_its_copy_event_before_it(references) -> None:
    """The rule as the log states it, independently of the vector clocks: between the last copy into a slot
    and the compute stream's read of it, the compute stream (or the compute thread, on seeing it complete)
    waited on an event the copy stream recorded after that copy."""
    dev = FakeDevice(lazy=True)
    run_on_device(references, "qwen2_moe", "lru", {}, dev, budget="30%")
    recorded_at = {id(op.target): i for i, op in enumerate(dev.log) if op.kind == "record" and op.agent == "copy"}
    last_write: dict = {}
    waits: list[tuple[int, object]] = []  # (position, event or "all") of waits that order the compute stream
    checked = 0
    for i, op in enumerate(dev.log):
        if op.kind == "write" and op.agent == "copy":
            last_write[op.target] = i
        elif op.kind == "wait" and op.agent in ("compute", "host:MainThread"):
            waits.append((i, op.target))
        elif op.kind == "read" and op.agent == "compute" and op.target[0] == "slot":
            w = last_write[op.target]
            assert any(w < j < i and (target == "all" or recorded_at.get(id(target), -1) > w)
                       for j, target in waits), f"read {i} of {op.target} not after a wait on its copy {w}"
            checked += 1
    assert checked > 50


# --- a slot refilled while its previous copy is queued or running ----------------------------------------
def _held(engine: OffloadEngine) -> threading.Event:
    """Hold the I/O thread inside its next copy until the returned event is set."""
    gate = threading.Event()
    engine.loader.fail_hook = lambda copy: gate.wait()
    return gate


@contextmanager
def _engine_with_held_copies(references, busy: bool = False):
    """(fake device, lru engine in a prefill step, gate): the I/O thread stops inside its next copy until the
    gate is set; with `busy`, that copy is a demand load of another layer, already started, so the transfers a
    test submits next wait in the queue. The gate is opened and the engine closed afterwards."""
    dev = FakeDevice(lazy=True)
    engine = open_engine(references, "qwen2_moe", "lru", {}, dev)
    gate = _held(engine)
    try:
        engine.start_forward(0, "prefill", 1)
        if busy:
            blocker = Transfer(1, 0, "bf16", 0, "demand", 0, 0)
            engine._submit(blocker)
            _wait_started(engine, blocker)
        yield dev, engine, gate
    finally:
        gate.set()
        engine.close()


def _slot_holds(engine: OffloadEngine, layer: int, slot: int, expert: int) -> bool:
    record, layout = engine._slot_record(layer, slot, expert, "bf16")
    return torch.equal(record[: layout.nbytes], engine.store.host_record(layer, expert, "bf16"))


def test_a_load_into_the_slot_of_a_queued_prefetch_lands_after_it(references) -> None:
    """The controller evicts a queued prefetch and gives its slot to an on-demand load (the simulator then
    moves both, in queue order): the load starts only after the prefetch ran, although demand copies go
    first, so the slot ends up holding the load's expert."""
    with _engine_with_held_copies(references, busy=True) as (dev, engine, gate):
        prefetch = Transfer(0, 3, "bf16", 0, "prefetch", 0, 0)
        load = Transfer(0, 5, "bf16", 0, "demand", 0, 0)
        load.after_transfer = prefetch
        engine._submit(prefetch)
        engine._submit(load)
        gate.set()
        engine._await(load)
        dev.access(dev.compute, ("slot", 0, 0))
        engine.loader.close()  # every copy issued has landed: nothing later overwrites the slot
        assert _slot_holds(engine, 0, 0, 5)
        assert engine._copies[prefetch].issued_at <= engine._copies[load].started_at
        assert dev.violations() == []


def test_a_cancel_that_comes_after_the_copy_started_still_orders_the_slot(references) -> None:
    """The race: the I/O thread started a prefetch before the controller's cancel arrived. The engine stops
    reporting it (the controller dropped it), counts the race, and the next copy into that slot lands after
    it, so the slot holds the new expert."""
    with _engine_with_held_copies(references) as (dev, engine, gate):
        stale = Transfer(0, 3, "bf16", 0, "prefetch", 0, 0)
        engine._submit(stale)
        _wait_started(engine, stale)
        engine._cancel(stale)
        assert engine.cancel_races == 1 and stale not in engine._copies
        assert all(c.tag is not stale for c in engine._in_flight)
        load = Transfer(0, 5, "bf16", 0, "demand", 0, 0)
        engine._submit(load)
        gate.set()
        engine._await(load)
        dev.access(dev.compute, ("slot", 0, 0))
        engine.loader.close()  # every copy issued has landed: nothing later overwrites the slot
        assert _slot_holds(engine, 0, 0, 5)
        assert dev.violations() == []


def test_a_promoted_prefetch_overtakes_prefetches_queued_before_it(references) -> None:
    """The controller promotes a queued prefetch its layer now needs (`plan.promoted`): the engine passes it
    on to the I/O thread, which then starts it before a prefetch queued earlier, as the simulated link does.
    (Without the engine's hand-over, the queue keeps submission order and the earlier prefetch goes first.)"""
    from sim.policies.controller import LayerPlan

    with _engine_with_held_copies(references, busy=True) as (_, engine, gate):
        early = Transfer(0, 3, "bf16", 0, "prefetch", 0, 0)
        needed = Transfer(0, 4, "bf16", 0, "prefetch", 1, 0)
        engine._submit(early)
        engine._submit(needed)
        engine._execute(LayerPlan(layer=0, step=0, promoted=[needed]), None, None, None, None, None)
        gate.set()
        engine._await(early)
        engine._await(needed)
        assert engine._copies[needed].started_at < engine._copies[early].started_at


def _wait_started(engine: OffloadEngine, t: Transfer) -> None:
    copy = engine._copies[t]
    while copy.started_at is None:
        time.sleep(0.001)
