"""Slow tiers filled straight from a checkpoint folder, one expert at a time (never a loaded model).

- `CheckpointStore`: the `bf16` records (the checkpoint's own dtype) served from the checkpoint's safetensors
  files themselves with O_DIRECT: no second copy on disk. For each (layer, expert) it knows the byte ranges
  of gate, up and down; ranges in one file closer than `MERGE_GAP_BYTES` are read as one run of whole 4 KiB
  blocks (safetensors sorts names, so an expert's down|gate|up usually lie back to back: one read) into a
  page-aligned bounce buffer, and the three matrices are copied out in record order gate|up|down.

  Cost of that extra copy, measured on the 2-core development VM (virtio disk, one 16.5 MiB Qwen1.5-MoE
  bf16 expert record, median of 8): the O_DIRECT read takes 44 ms (0.39 GB/s), the bounce -> record copy
  2.9 ms (6 GB/s), i.e. the copy adds ~6% to a record's read. The DiskStore avoids it by storing records in
  their final layout, at the price of a second full copy of the experts on disk.
- `build_checkpoint_store`: the slow tier a run needs. RAM: every precision packed layer by layer from the
  checkpoint. Disk: `bf16` from `CheckpointStore`; quantised precisions from a store file (the
  `realrun.store` format) built once from the checkpoint, keyed by the checkpoint's fingerprint and the
  packing options, reused across runs (written atomically: a half-built file is never used).
"""

from __future__ import annotations

import hashlib
import json
import os
import sys
import threading
from dataclasses import dataclass
from pathlib import Path

import torch

from realrun.checkpoint import Checkpoint, pread_at_least
from realrun.quant import ExpertLayout, expert_layout, pack_expert, raw_views, split_fused
from realrun.store import (
    BLOCK_BYTES,
    VERSION,
    DiskStore,
    RamStore,
    RecordSource,
    SlowStore,
    aligned_buffer,
    reusable_disk_store,
    round_up,
)
from sim.modelspec import ModelSpec
from traces.errors import UserError

MERGE_GAP_BYTES = 1 << 20
"""Ranges of one expert in one file closer than this are read in one run (reading a small gap costs less
than a second read's latency)."""


@dataclass(frozen=True)
class _Piece:
    record_offset: int
    run_offset: int
    nbytes: int


@dataclass(frozen=True)
class _Run:
    """One O_DIRECT read: whole blocks of one file, and the matrices cut out of it."""

    path: Path
    offset: int
    """4 KiB-aligned file offset."""
    needed_bytes: int
    """Bytes from `offset` that hold data (the read is rounded up to whole blocks)."""
    pieces: tuple[_Piece, ...]


class CheckpointStore(SlowStore):
    """`bf16` records read from the checkpoint's safetensors files with O_DIRECT (see the module docstring)."""

    host_staging = False

    def __init__(self, checkpoint: Checkpoint, spec: ModelSpec, layout: ExpertLayout, *, direct: bool = True) -> None:
        if layout.group_size:
            raise ValueError("a checkpoint holds the unquantised experts only")
        self.layouts = {layout.precision: layout}
        self.num_layers = spec.num_moe_layers
        self.num_experts = spec.num_experts
        self.direct = direct
        self._plans: list[list[tuple[_Run, ...]]] = []
        offsets = {m.name: m.offset for m in layout.matrices}
        for decoder_layer in spec.moe_layer_indices:
            row = []
            for expert in range(spec.num_experts):
                parts = checkpoint.expert_tensors(decoder_layer, expert, spec.num_experts, spec.hidden_size,
                                                  spec.expert_intermediate_size)
                for part in parts.parts():
                    if part.dtype != layout.dtype:
                        raise UserError(f"tensor {part.name} in {part.path} is {part.dtype}, the other experts "
                                        f"{layout.dtype}; realrun needs one expert dtype")
                row.append(_plan(zip(("gate", "up", "down"), parts.parts(), strict=True), offsets))
            self._plans.append(row)
        self._bounce = aligned_buffer(max(round_up(r.needed_bytes) for row in self._plans for p in row for r in p))
        self._lock = threading.Lock()  # one bounce buffer: the I/O thread and start-up reads take turns
        self._fds: dict[Path, int] = {}
        flags = os.O_RDONLY | (os.O_DIRECT if direct else 0)
        for path in sorted({r.path for row in self._plans for p in row for r in p}):
            try:
                self._fds[path] = os.open(path, flags)
            except OSError as error:
                self.close()
                raise UserError(f"cannot open {path} with O_DIRECT: {error.strerror}; put the model on a file "
                                "system that supports direct I/O (not tmpfs), or use --store ram") from None

    def read_into(self, layer: int, expert: int, precision: str, dst: torch.Tensor) -> int:
        layout = self._check(layer, expert, precision)
        if dst.numel() < layout.nbytes:
            raise ValueError(f"destination of {dst.numel()} bytes is smaller than a record ({layout.nbytes})")
        with self._lock:
            for run in self._plans[layer][expert]:
                length = round_up(run.needed_bytes)
                pread_at_least(self._fds[run.path], memoryview(self._bounce[:length].numpy()).cast("B"), run.offset,
                               run.needed_bytes, f"expert ({layer}, {expert}) from {run.path}")
                for piece in run.pieces:
                    src = self._bounce[piece.run_offset : piece.run_offset + piece.nbytes]
                    dst[piece.record_offset : piece.record_offset + piece.nbytes].copy_(src)
        return layout.nbytes

    def close(self) -> None:
        for fd in self._fds.values():
            os.close(fd)
        self._fds.clear()


def _plan(parts, offsets: dict[str, int]) -> tuple[_Run, ...]:
    """The reads that fetch one expert's matrices: per file, ranges merged when closer than the gap."""
    by_file: dict[Path, list] = {}
    for name, entry in parts:
        by_file.setdefault(entry.path, []).append((entry.offset, entry.nbytes, offsets[name]))
    runs = []
    for path, ranges in by_file.items():
        ranges.sort()
        group = [ranges[0]]
        for r in ranges[1:]:
            last_end = group[-1][0] + group[-1][1]
            if r[0] - last_end <= MERGE_GAP_BYTES:
                group.append(r)
                continue
            runs.append(_make_run(path, group))
            group = [r]
        runs.append(_make_run(path, group))
    return tuple(runs)


def _make_run(path: Path, group: list[tuple[int, int, int]]) -> _Run:
    start = group[0][0] // BLOCK_BYTES * BLOCK_BYTES
    end = max(off + n for off, n, _ in group)
    pieces = tuple(_Piece(rec, off - start, n) for off, n, rec in group)
    return _Run(path, start, end - start, pieces)


class PrecisionStores(SlowStore):
    """Several stores behind one interface, each serving some precisions (bf16 from the checkpoint,
    quantised ones from a store file)."""

    def __init__(self, stores: dict[str, SlowStore]) -> None:
        self._stores = stores
        self.layouts = {}
        for store in dict.fromkeys(stores.values()):
            self.layouts.update({p: lay for p, lay in store.layouts.items() if p in stores})
        first = next(iter(stores.values()))
        self.num_layers, self.num_experts = first.num_layers, first.num_experts
        self.host_staging = any(getattr(s, "host_staging", False) for s in stores.values())

    def read_into(self, layer: int, expert: int, precision: str, dst: torch.Tensor) -> int:
        self._check(layer, expert, precision)
        return self._stores[precision].read_into(layer, expert, precision, dst)

    def padded_bytes(self, precision: str) -> int:
        return self._stores[precision].padded_bytes(precision)

    def close(self) -> None:
        for store in dict.fromkeys(self._stores.values()):
            store.close()


def checkpoint_source(records: CheckpointStore, layouts: dict[str, ExpertLayout], *, optimize: bool) -> RecordSource:
    """(layer, expert, precision) -> record, read from the checkpoint (the last expert's bf16 record is kept,
    so packing one expert in several precisions reads it once)."""
    raw_layout = records.layouts["bf16"]
    last: dict[tuple[int, int], torch.Tensor] = {}

    def source(layer: int, expert: int, precision: str) -> torch.Tensor:
        key = (layer, expert)
        if key not in last:
            last.clear()
            record = torch.empty(raw_layout.nbytes, dtype=torch.uint8)
            records.read_into(layer, expert, "bf16", record)
            last[key] = record
        record = last[key]
        if precision == "bf16":
            return record
        gate_up, down = raw_views(record, raw_layout)
        return pack_expert(split_fused(gate_up, down), layouts[precision], optimize=optimize)

    return source


def store_fingerprint(checkpoint: Checkpoint, layouts: dict[str, ExpertLayout], optimize: bool) -> str:
    """Identifies a quantised store: the checkpoint's bytes (`Checkpoint.fingerprint`), precisions, packings,
    HQQ's optimiser switch and the versions that shape the packed bytes."""
    import hqq

    key = [VERSION, torch.__version__, getattr(hqq, "__version__", "?"), checkpoint.fingerprint(),
           sorted(f"{p}:{lay.packing}:{lay.nbytes}" for p, lay in layouts.items()), optimize]
    return hashlib.sha256(json.dumps(key).encode()).hexdigest()[:16]


def build_checkpoint_store(checkpoint: Checkpoint, spec: ModelSpec, precisions: list[str], kind: str,
                           device: torch.device, *, store_path: Path | None = None, store_dir: Path | None = None,
                           optimize: bool = True) -> tuple[SlowStore, dict[str, ExpertLayout]]:
    """The slow tier holding every expert in `precisions`, filled from `checkpoint` (module docstring).

    "ram": a `RamStore` (pinned for CUDA) packed layer by layer. "disk": bf16 from the checkpoint files;
    quantised precisions from `store_path` (or `store_dir`/experts-<fingerprint>.bin), reused when its
    fingerprint matches, else built with a progress bar on stderr.
    """
    from realrun.runner import packing_for

    layouts = {p: expert_layout(spec, p, packing_for(spec, p, device)) for p in precisions}
    raw_layout = layouts["bf16"] if "bf16" in layouts else expert_layout(spec, "bf16")
    records = CheckpointStore(checkpoint, spec, raw_layout)
    try:
        if kind == "ram":
            ram = RamStore(layouts, spec.num_moe_layers, spec.num_experts,
                           checkpoint_source(records, layouts, optimize=optimize), pin_memory=device.type == "cuda")
            records.close()
            return ram, layouts
        if kind != "disk":
            raise UserError(f"unknown store {kind!r}; choose disk or ram")
        quantised = {p: lay for p, lay in layouts.items() if lay.group_size}
        stores: dict[str, SlowStore] = {p: records for p in layouts if p not in quantised}
        if quantised:
            packed = _quantised_store(checkpoint, spec, records, quantised, store_path, store_dir, optimize)
            stores.update({p: packed for p in quantised})
        if "bf16" not in layouts:
            records.close()
        if set(stores) == {"bf16"}:
            return records, layouts
        return PrecisionStores(stores), layouts
    except BaseException:
        records.close()
        raise


def _quantised_store(checkpoint: Checkpoint, spec: ModelSpec, records: CheckpointStore,
                     layouts: dict[str, ExpertLayout], store_path: Path | None, store_dir: Path | None,
                     optimize: bool) -> DiskStore:
    from tqdm import tqdm

    fingerprint = store_fingerprint(checkpoint, layouts, optimize)
    total = spec.num_moe_layers * spec.num_experts * len(layouts)
    with tqdm(total=total, desc=f"packing {'+'.join(layouts)} experts", unit="expert", file=sys.stderr,
              disable=None, leave=False) as bar:  # only advances when the store is (re)built
        return reusable_disk_store(layouts, spec.num_moe_layers, spec.num_experts,
                                   checkpoint_source(records, layouts, optimize=optimize), fingerprint,
                                   store_path=store_path, store_dir=store_dir, progress=bar.update)
