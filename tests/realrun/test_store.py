"""Slow tiers and the I/O thread: exact bytes back, demand before prefetch, clean shutdown on errors."""

from __future__ import annotations

import dataclasses
import threading
from pathlib import Path

import pytest
import torch

from realrun.loader import Copy, Loader
from realrun.quant import expert_layout
from realrun.store import BLOCK_BYTES, DiskStore, RamStore, aligned_buffer, write_disk_store
from sim.modelspec import get_model_spec
from traces.errors import UserError

LAYERS, EXPERTS = 2, 4


def _layouts():
    spec = dataclasses.replace(get_model_spec("qwen1.5-moe-a2.7b"), hidden_size=128, expert_intermediate_size=64,
                               dtype="float32")
    return {p: expert_layout(spec, p) for p in ("bf16", "int4")}


def _record(layer: int, expert: int, precision: str) -> torch.Tensor:
    nbytes = _layouts()[precision].nbytes
    g = torch.Generator().manual_seed(1000 * layer + 10 * expert + len(precision))
    return torch.randint(0, 256, (nbytes,), generator=g, dtype=torch.uint8)


@pytest.fixture
def disk_store(tmp_path: Path) -> DiskStore:
    layouts = _layouts()
    path = tmp_path / "experts.bin"
    write_disk_store(path, layouts, LAYERS, EXPERTS, _record, fingerprint="test")
    store = DiskStore(path)
    store.attach_layouts(layouts)
    yield store
    store.close()


def test_disk_store_reads_back_every_record_with_o_direct(disk_store: DiskStore) -> None:
    """Each (layer, expert, precision) read from the file (O_DIRECT, aligned buffer) equals what was written."""
    assert disk_store.direct
    for precision in ("bf16", "int4"):
        dst = aligned_buffer(disk_store.padded_bytes(precision))
        assert dst.data_ptr() % BLOCK_BYTES == 0
        for layer in range(LAYERS):
            for expert in range(EXPERTS):
                nbytes = disk_store.read_into(layer, expert, precision, dst)
                assert torch.equal(dst[:nbytes], _record(layer, expert, precision))


def test_disk_store_refuses_unaligned_buffer(disk_store: DiskStore) -> None:
    """O_DIRECT needs 4 KiB alignment; a misaligned destination is a programming error, caught early."""
    dst = aligned_buffer(disk_store.padded_bytes("int4") + BLOCK_BYTES)[1:]
    with pytest.raises(ValueError, match="aligned"):
        disk_store.read_into(0, 0, "int4", dst)


def test_not_a_store_is_a_user_error(tmp_path: Path) -> None:
    """Opening a file that is not an expert store says so in one line."""
    bogus = tmp_path / "x.bin"
    bogus.write_bytes(b"hello")
    with pytest.raises(UserError, match="not an expert store"):
        DiskStore(bogus)


def test_ram_store_matches_disk_store(disk_store: DiskStore) -> None:
    """RamStore returns the same bytes as the disk store, and exposes them without a copy."""
    ram = RamStore(_layouts(), LAYERS, EXPERTS, _record)
    dst = torch.empty(ram.padded_bytes("bf16"), dtype=torch.uint8)
    ram.read_into(1, 3, "bf16", dst)
    assert torch.equal(dst, _record(1, 3, "bf16"))
    assert torch.equal(ram.host_record(0, 2, "int4"), _record(0, 2, "int4"))


def _copy(store, layer: int, expert: int, kind: str, precision: str = "bf16") -> Copy:
    return Copy(layer, expert, precision, aligned_buffer(store.padded_bytes(precision)), kind)


def test_loader_copies_and_reports_completion(disk_store: DiskStore) -> None:
    """Submitted copies land in their slots; drain_completed reports each once; busy time is counted."""
    with Loader(disk_store, torch.device("cpu")) as loader:
        copies = [loader.submit(_copy(disk_store, 1, e, "prefetch")) for e in range(EXPERTS)]
        for c in copies:
            loader.wait(c)
        done = loader.drain_completed()
        assert loader.drain_completed() == []
    assert {c.expert for c in done} == set(range(EXPERTS))
    for c in copies:
        assert torch.equal(c.dst[: c.nbytes], _record(1, c.expert, "bf16"))
        assert c.started_at is not None and c.done_at >= c.started_at
    assert loader.busy_s > 0 and not loader.alive


def test_demand_copies_overtake_queued_prefetches(disk_store: DiskStore) -> None:
    """With the thread held, a demand copy submitted after prefetches runs before all of them."""
    gate = threading.Event()
    loader = Loader(disk_store, torch.device("cpu"))
    loader.fail_hook = lambda copy: gate.wait()
    try:
        first = loader.submit(_copy(disk_store, 0, 0, "prefetch"))  # occupies the thread until the gate opens
        while first.started_at is None:
            threading.Event().wait(0.001)
        prefetches = [loader.submit(_copy(disk_store, 0, e, "prefetch")) for e in (1, 2)]
        demand = loader.submit(_copy(disk_store, 1, 3, "demand"))
        cancelled = loader.submit(_copy(disk_store, 1, 0, "prefetch"))
        assert loader.cancel(cancelled) and cancelled.cancelled
        gate.set()
        for c in [first, *prefetches, demand]:
            loader.wait(c)
        assert demand.started_at < min(p.started_at for p in prefetches)
        assert cancelled.started_at is None
    finally:
        gate.set()
        loader.close()


def test_io_error_reaches_the_compute_thread_and_thread_exits(disk_store: DiskStore) -> None:
    """An injected read failure is re-raised by wait(); the I/O thread has stopped; close() is clean."""
    loader = Loader(disk_store, torch.device("cpu"))

    def fail(copy: Copy) -> None:
        if copy.expert == 2:
            raise OSError("injected read failure")

    loader.fail_hook = fail
    ok = loader.submit(_copy(disk_store, 0, 1, "demand"))
    loader.wait(ok)
    bad = loader.submit(_copy(disk_store, 0, 2, "demand"))
    queued = loader.submit(_copy(disk_store, 0, 3, "prefetch"))
    with pytest.raises(RuntimeError, match="injected read failure"):
        loader.wait(bad)
    loader._thread.join(timeout=5)
    assert not loader.alive
    assert ok.done_at is not None and queued.done  # queued copies are released, not left hanging
    with pytest.raises(RuntimeError):
        loader.close()


def test_keyboard_interrupt_stops_the_thread(disk_store: DiskStore) -> None:
    """Ctrl-C in the compute thread inside the loader's context: the thread is joined, the interrupt kept."""
    with pytest.raises(KeyboardInterrupt):
        with Loader(disk_store, torch.device("cpu")) as loader:
            for e in range(EXPERTS):
                loader.submit(_copy(disk_store, 1, e, "prefetch"))
            raise KeyboardInterrupt
    assert not loader.alive
