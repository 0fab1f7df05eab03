"""The I/O thread: the shared start-order rule, slots refilled in order, errors and shutdown, event timing."""

from __future__ import annotations

import threading
import time
from pathlib import Path

import pytest
import torch

from realrun.device import HostDevice
from realrun.fake_device import FakeDevice
from realrun.loader import Copy, Loader
from realrun.store import DiskStore, RamStore, aligned_buffer, write_disk_store
from tests.realrun.test_store import EXPERTS, LAYERS, _layouts, _record


@pytest.fixture
def store() -> RamStore:
    return RamStore(_layouts(), LAYERS, EXPERTS, _record)


def _copy(store, layer: int, expert: int, kind: str, dst: torch.Tensor | None = None, after: Copy | None = None) -> Copy:
    dst = aligned_buffer(store.padded_bytes("bf16")) if dst is None else dst
    return Copy(layer, expert, "bf16", dst, kind, key=("slot", id(dst)), after=after)


def _wait_started(copy: Copy) -> None:
    while copy.started_at is None:
        time.sleep(0.001)


class Held:
    """Holds the I/O thread inside its first copy until `release()`; records the start order."""

    def __init__(self, loader: Loader) -> None:
        self.gate = threading.Event()
        self.order: list[Copy] = []

        def hook(copy: Copy) -> None:
            self.order.append(copy)
            self.gate.wait()
        loader.fail_hook = hook

    def release(self) -> None:
        self.gate.set()


def test_copies_land_and_their_times_are_settled(store: RamStore) -> None:
    """Every submitted copy lands in its slot; after close, each has one span and busy_s is their sum."""
    with Loader(store, HostDevice()) as loader:
        copies = [loader.submit(_copy(store, 1, e, "prefetch")) for e in range(EXPERTS)]
        for c in copies:
            loader.wait(c)
            assert c.landed()
    for c in copies:
        assert torch.equal(c.dst[: c.nbytes], _record(1, c.expert, "bf16"))
    assert sorted(id(c) for _, _, c in loader.spans) == sorted(id(c) for c in copies)
    assert loader.busy_s == pytest.approx(sum(end - start for start, end, _ in loader.spans))
    assert all(start <= end for start, end, _ in loader.spans) and not loader.alive


def test_start_order_is_the_transfer_queue_rule(store: RamStore) -> None:
    """Demand before prefetch, then submission order; a promoted prefetch keeps its place among demands;
    a cancelled copy never starts; a started one cannot be cancelled."""
    loader = Loader(store, HostDevice())
    held = Held(loader)
    try:
        first = loader.submit(_copy(store, 0, 0, "prefetch"))
        _wait_started(first)
        p1, p2 = (loader.submit(_copy(store, 0, e, "prefetch")) for e in (1, 2))
        d1 = loader.submit(_copy(store, 1, 0, "demand"))
        p3 = loader.submit(_copy(store, 1, 1, "prefetch"))
        d2 = loader.submit(_copy(store, 1, 2, "demand"))
        loader.promote(p2)  # submitted before d1: it now starts before d1
        assert loader.cancel(p3) and p3.cancelled and p3.done
        assert not loader.cancel(first) and not first.cancelled
        held.release()
        for c in (first, p1, p2, d1, d2):
            loader.wait(c)
        assert held.order == [first, p2, d1, d2, p1]
        assert p3.started_at is None
    finally:
        held.release()
        loader.close()


def test_waiting_for_a_queued_copy_does_not_reorder_the_queue(store: RamStore) -> None:
    """The simulator's link serves its queue in order whatever the GPU waits for; so does the thread."""
    loader = Loader(store, HostDevice())
    held = Held(loader)
    try:
        first = loader.submit(_copy(store, 0, 0, "demand"))
        _wait_started(first)
        a, b = (loader.submit(_copy(store, 0, e, "demand")) for e in (1, 2))
        waiter = threading.Thread(target=loader.wait, args=(b,))
        waiter.start()
        time.sleep(0.02)  # the compute thread is blocked on b
        held.release()
        waiter.join()
        loader.wait(a)
        assert held.order == [first, a, b]
    finally:
        held.release()
        loader.close()


def test_a_copy_into_a_slot_waits_for_the_queued_copy_before_it(store: RamStore) -> None:
    """A demand copy into a slot whose previous (prefetch) copy is still queued is held back until that copy
    ran, although demand copies start first: the older bytes never land on top of the newer ones."""
    loader = Loader(store, HostDevice())
    held = Held(loader)
    slot = aligned_buffer(store.padded_bytes("bf16"))
    try:
        first = loader.submit(_copy(store, 0, 0, "demand"))
        _wait_started(first)
        old = loader.submit(_copy(store, 1, 1, "prefetch", dst=slot))
        new = loader.submit(_copy(store, 1, 2, "demand", dst=slot, after=old))
        other = loader.submit(_copy(store, 0, 3, "demand"))
        held.release()
        for c in (old, new, other):
            loader.wait(c)
        assert held.order == [first, other, old, new]
        assert torch.equal(slot[: new.nbytes], _record(1, 2, "bf16"))
    finally:
        held.release()
        loader.close()


def test_cancelling_the_queued_copy_before_releases_the_one_held_behind_it(store: RamStore) -> None:
    loader = Loader(store, HostDevice())
    held = Held(loader)
    slot = aligned_buffer(store.padded_bytes("bf16"))
    try:
        first = loader.submit(_copy(store, 0, 0, "demand"))
        _wait_started(first)
        old = loader.submit(_copy(store, 1, 1, "prefetch", dst=slot))
        new = loader.submit(_copy(store, 1, 2, "demand", dst=slot, after=old))
        assert loader.cancel(old)
        held.release()
        loader.wait(new)
        assert held.order == [first, new] and old.started_at is None
        assert torch.equal(slot[: new.nbytes], _record(1, 2, "bf16"))
    finally:
        held.release()
        loader.close()


def test_a_cancel_that_comes_too_late_still_orders_the_slot(store: RamStore) -> None:
    """The race: the I/O thread took a prefetch before the controller's cancel arrived. The cancel fails,
    the bytes land, and the next copy into that slot starts only after them, so the slot ends up holding
    the new expert (one copy stream: by stream order; the copy also waits on the old copy's end event)."""
    dev = FakeDevice()
    loader = Loader(store, dev)
    held = Held(loader)
    slot = aligned_buffer(store.padded_bytes("bf16"))
    try:
        old = loader.submit(_copy(store, 1, 1, "prefetch", dst=slot))
        _wait_started(old)
        assert not loader.cancel(old)
        new = loader.submit(_copy(store, 1, 2, "demand", dst=slot, after=old))
        held.release()
        loader.wait(new)
        dev.wait(dev.compute, new.end)
        dev.access(dev.compute, new.key)
        assert held.order == [old, new]
        assert new.started_at >= old.issued_at
        assert torch.equal(slot[: new.nbytes], _record(1, 2, "bf16"))
        waits = [op for op in dev.log if op.agent == "copy" and op.kind == "wait"]
        assert any(op.target is old.end for op in waits)
        assert dev.violations() == []
    finally:
        held.release()
        loader.close()


def test_copies_on_the_fake_device_are_ordered_after_the_slot_free_event(store: RamStore) -> None:
    """A copy carrying the slot's last-use event waits for it on the copy stream before writing."""
    dev = FakeDevice()
    slot = aligned_buffer(store.padded_bytes("bf16"))
    key = ("slot", id(slot))
    dev.access(dev.compute, key)  # the compute stream reads the slot's old contents
    freed = dev.record(dev.compute)
    with Loader(store, dev) as loader:
        copy = loader.submit(Copy(0, 1, "bf16", slot, "demand", key=key, slot_free=freed))
        loader.wait(copy)
    assert dev.violations() == []
    copy_ops = [op for op in dev.log if op.agent == "copy"]
    assert copy_ops[0].kind == "wait" and copy_ops[0].target is freed
    assert [op.kind for op in copy_ops[1:]] == ["record", "write", "record"]


def test_io_error_reaches_the_compute_thread_and_thread_exits(store: RamStore) -> None:
    """An injected read failure is re-raised by wait(); the I/O thread has stopped; close() re-raises."""
    loader = Loader(store, HostDevice())

    def fail(copy: Copy) -> None:
        if copy.expert == 2:
            raise OSError("injected read failure")

    loader.fail_hook = fail
    ok = loader.submit(_copy(store, 0, 1, "demand"))
    loader.wait(ok)
    bad = loader.submit(_copy(store, 0, 2, "demand"))
    queued = loader.submit(_copy(store, 0, 3, "prefetch"))
    with pytest.raises(RuntimeError, match="injected read failure"):
        loader.wait(bad)
    loader._thread.join(timeout=5)
    assert not loader.alive
    assert ok.landed() and queued.done  # queued copies are released, not left hanging
    with pytest.raises(RuntimeError):
        loader.close()


def test_keyboard_interrupt_stops_the_thread(store: RamStore) -> None:
    """Ctrl-C in the compute thread inside the loader's context: the thread is joined, the interrupt kept."""
    with pytest.raises(KeyboardInterrupt):
        with Loader(store, HostDevice()) as loader:
            for e in range(EXPERTS):
                loader.submit(_copy(store, 1, e, "prefetch"))
            raise KeyboardInterrupt
    assert not loader.alive


def test_disk_store_on_a_device_with_its_own_memory_goes_through_staging(tmp_path: Path) -> None:
    """A disk store feeding separate fast memory reads into the staging buffer, then copies up."""
    layouts = _layouts()
    path = tmp_path / "experts.bin"
    write_disk_store(path, layouts, LAYERS, EXPERTS, _record, fingerprint="test")
    disk = DiskStore(path)
    disk.attach_layouts(layouts)
    dev = FakeDevice(lazy=True)
    try:
        with Loader(disk, dev, staging_bytes=disk.padded_bytes("bf16")) as loader:
            copies = [loader.submit(_copy(disk, 1, e, "demand", dst=torch.zeros(disk.padded_bytes("bf16"),
                                                                                   dtype=torch.uint8)))
                      for e in range(EXPERTS)]
            for c in copies:
                loader.wait(c)
                assert c.landed()  # the thread waited for each copy before reusing the staging buffer
                assert torch.equal(c.dst[: c.nbytes], _record(1, c.expert, "bf16"))
    finally:
        disk.close()
