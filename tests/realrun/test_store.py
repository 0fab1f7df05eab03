"""Slow tiers: exact bytes back from disk (O_DIRECT) and RAM; bad files refused. The I/O thread: test_loader.py."""

from __future__ import annotations

import dataclasses
from pathlib import Path

import pytest
import torch

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
