"""Slow tiers: where the routed experts live when they are not in fast memory.

Every expert of every MoE layer is kept in each precision a run may ask for, as the flat records of
`realrun.quant`. A store only copies a record into a destination buffer (`read_into`); which records to
copy and when is the controller's business, and the I/O thread (`realrun.loader`) runs the copies.

- `RamStore`: host RAM, one tensor [L, E, record_bytes] per precision (pinned when a CUDA device reads it,
  so host->device copies can run asynchronously on a copy stream).
- `DiskStore`: one file read with O_DIRECT: the page cache is bypassed, every read really comes from the
  SSD, as it would for a model that does not fit in RAM. Records start at 4 KiB boundaries and reads go
  into page-aligned buffers of whole 4 KiB blocks, which O_DIRECT requires.

File layout of a disk store: a 4 KiB header (JSON, zero padded: magic, version, layers, experts,
precisions with their record bytes and file offsets, the fingerprint of the weights it was built from),
then, per precision, L x E records of `stride` bytes each (record bytes rounded up to 4 KiB).
"""

from __future__ import annotations

import json
import mmap
import os
from collections.abc import Callable, Iterator
from pathlib import Path

import torch

from realrun.checkpoint import pread_at_least
from realrun.quant import ExpertLayout
from traces.atomic import atomic_output
from traces.errors import UserError

BLOCK_BYTES = 4096
"""O_DIRECT transfer unit: offsets, lengths and buffer addresses are multiples of it."""
MAGIC = "fatesim-expert-store"
VERSION = 1

RecordSource = Callable[[int, int, str], torch.Tensor]
"""(layer, expert, precision) -> the expert's uint8 record (see `realrun.quant.pack_expert`)."""


def round_up(nbytes: int, unit: int = BLOCK_BYTES) -> int:
    """`nbytes` rounded up to a multiple of `unit`."""
    return -(-nbytes // unit) * unit


def aligned_buffer(nbytes: int) -> torch.Tensor:
    """A page-aligned uint8 CPU tensor of `nbytes` bytes (anonymous mmap), usable as an O_DIRECT target."""
    # private, not Python's default shared mapping: the pages count as the process's own memory (not
    # shmem) and go back to the system as soon as the last tensor on them is freed
    region = mmap.mmap(-1, max(nbytes, 1), flags=mmap.MAP_PRIVATE | mmap.MAP_ANONYMOUS)
    # torch.frombuffer keeps `region` alive through the tensor's storage.
    return torch.frombuffer(region, dtype=torch.uint8, count=nbytes) if nbytes else torch.empty(0, dtype=torch.uint8)


class SlowStore:
    """Interface of a slow tier: records of (layer, expert, precision), copied on request."""

    layouts: dict[str, ExpertLayout]
    """Precision -> layout of its records."""
    num_layers: int
    num_experts: int
    host_staging: bool = False
    """True when `read_into` needs an aligned host destination (a device with its own memory stages reads
    through one)."""

    def read_into(self, layer: int, expert: int, precision: str, dst: torch.Tensor) -> int:
        """Copy the record into `dst` (uint8, at least `padded_bytes(precision)` long); return bytes read."""
        raise NotImplementedError

    def host_record(self, layer: int, expert: int, precision: str) -> torch.Tensor | None:
        """The record in host RAM without a copy, if this store has it there (for CPU execution)."""
        return None

    def padded_bytes(self, precision: str) -> int:
        """Bytes a destination buffer must have for one record of `precision`."""
        return self.layouts[precision].nbytes

    def close(self) -> None:
        """Release files; the store is unusable afterwards."""

    def _check(self, layer: int, expert: int, precision: str) -> ExpertLayout:
        if precision not in self.layouts:
            raise KeyError(f"store holds no {precision} copies (it has {', '.join(self.layouts)})")
        if not (0 <= layer < self.num_layers and 0 <= expert < self.num_experts):
            raise IndexError(f"expert ({layer}, {expert}) outside {self.num_layers} layers x {self.num_experts}")
        return self.layouts[precision]


class RamStore(SlowStore):
    """All records in host RAM, one contiguous tensor per precision; pinned for asynchronous H2D copies."""

    def __init__(
        self, layouts: dict[str, ExpertLayout], num_layers: int, num_experts: int, source: RecordSource,
        *, pin_memory: bool = False, layer_done: Callable[[int], None] | None = None,
    ) -> None:
        """`layer_done(l)` is called once every record of layer l is in (the caller may free its weights)."""
        self.layouts = dict(layouts)
        self.num_layers = num_layers
        self.num_experts = num_experts
        self.pinned = pin_memory
        """True when the records are page-locked (CUDA copies from them run asynchronously)."""
        self._records = {p: torch.empty(num_layers, num_experts, lay.nbytes, dtype=torch.uint8, pin_memory=pin_memory)
                         for p, lay in self.layouts.items()}
        for layer in range(num_layers):  # layer by layer, so the model's copy can shrink as the store grows
            for expert in range(num_experts):  # all of an expert's precisions in turn: a source reads it once
                for precision, block in self._records.items():
                    block[layer, expert] = source(layer, expert, precision)
            if layer_done is not None:
                layer_done(layer)

    def read_into(self, layer: int, expert: int, precision: str, dst: torch.Tensor) -> int:
        layout = self._check(layer, expert, precision)
        # non_blocking only matters for pinned -> CUDA; the caller runs this under its copy stream.
        dst[: layout.nbytes].copy_(self._records[precision][layer, expert], non_blocking=self.pinned)
        return layout.nbytes

    def host_record(self, layer: int, expert: int, precision: str) -> torch.Tensor:
        self._check(layer, expert, precision)
        return self._records[precision][layer, expert]


class DiskStore(SlowStore):
    """Records in one file, read with O_DIRECT into 4 KiB-aligned buffers (no page cache)."""

    host_staging = True

    def __init__(self, path: str | os.PathLike[str], *, direct: bool = True) -> None:
        self.path = Path(path)
        header = read_header(self.path)
        self.num_layers = int(header["num_layers"])
        self.num_experts = int(header["num_experts"])
        self.fingerprint = str(header["fingerprint"])
        """Identifies the weights and precisions the file was built from."""
        self._offsets = {p: int(v["offset"]) for p, v in header["precisions"].items()}
        self._strides = {p: int(v["stride"]) for p, v in header["precisions"].items()}
        self._record_bytes = {p: int(v["nbytes"]) for p, v in header["precisions"].items()}
        self.layouts: dict[str, ExpertLayout] = {}
        self.direct = direct
        """True when reads bypass the page cache (O_DIRECT)."""
        flags = os.O_RDONLY | (os.O_DIRECT if direct else 0)
        try:
            self._fd = os.open(self.path, flags)
        except OSError as error:
            raise UserError(f"cannot open expert store {self.path} with O_DIRECT: {error.strerror}; "
                            "put it on a file system that supports direct I/O (not tmpfs)") from None

    def attach_layouts(self, layouts: dict[str, ExpertLayout]) -> None:
        """Give the store the layouts of its records (checked against the header's record sizes)."""
        for precision, layout in layouts.items():
            if self._record_bytes.get(precision) != layout.nbytes:
                raise UserError(f"expert store {self.path} has no {precision} records of {layout.nbytes} bytes; "
                                "delete it so it is rebuilt")
        self.layouts = dict(layouts)

    def padded_bytes(self, precision: str) -> int:
        return self._strides[precision]

    def read_into(self, layer: int, expert: int, precision: str, dst: torch.Tensor) -> int:
        self._check(layer, expert, precision)
        stride = self._strides[precision]
        offset = self._offsets[precision] + (layer * self.num_experts + expert) * stride
        if dst.device.type != "cpu":
            raise ValueError("DiskStore reads into host buffers; stage device copies through one")
        if dst.numel() < stride or dst.data_ptr() % BLOCK_BYTES:
            raise ValueError(f"O_DIRECT needs a {BLOCK_BYTES}-aligned buffer of >= {stride} bytes")
        pread_at_least(self._fd, memoryview(dst[:stride].numpy()).cast("B"), offset, stride,
                       f"expert ({layer}, {expert}, {precision}) from {self.path}")
        return self._record_bytes[precision]

    def close(self) -> None:
        if self._fd >= 0:
            os.close(self._fd)
            self._fd = -1


def read_header(path: Path) -> dict:
    """The JSON header of a disk store, or UserError if `path` is not one."""
    try:
        with open(path, "rb") as f:
            raw = f.read(BLOCK_BYTES)
    except FileNotFoundError:
        raise UserError(f"no expert store at {path}") from None
    try:
        header = json.loads(raw.rstrip(b"\0").decode())
    except (UnicodeDecodeError, json.JSONDecodeError):
        raise UserError(f"{path} is not an expert store (bad header); delete it so it is rebuilt") from None
    if header.get("magic") != MAGIC or header.get("version") != VERSION:
        raise UserError(f"{path} is not a version-{VERSION} expert store; delete it so it is rebuilt")
    return header


def write_disk_store(
    path: str | os.PathLike[str], layouts: dict[str, ExpertLayout], num_layers: int, num_experts: int,
    source: RecordSource, fingerprint: str, progress: Callable[[int], None] | None = None,
) -> None:
    """Write every record of every precision to a disk store at `path` (atomically)."""
    offsets: dict[str, dict[str, int]] = {}
    offset = BLOCK_BYTES
    for precision, layout in layouts.items():
        stride = round_up(layout.nbytes)
        offsets[precision] = {"offset": offset, "stride": stride, "nbytes": layout.nbytes}
        offset += stride * num_layers * num_experts
    header = json.dumps({"magic": MAGIC, "version": VERSION, "num_layers": num_layers, "num_experts": num_experts,
                         "fingerprint": fingerprint, "precisions": offsets}).encode()
    if len(header) > BLOCK_BYTES:
        raise ValueError("store header does not fit in one block")
    with atomic_output(path) as tmp, open(tmp, "wb") as f:
        f.write(header.ljust(BLOCK_BYTES, b"\0"))
        # expert by expert, every precision of one expert in turn: a source reading a checkpoint reads each
        # expert once (records land at their precision's offset, so the file layout is unchanged)
        for layer in range(num_layers):
            for expert in range(num_experts):
                for precision, layout in layouts.items():
                    info = offsets[precision]
                    f.seek(info["offset"] + (layer * num_experts + expert) * info["stride"])
                    f.write(source(layer, expert, precision).numpy().tobytes())
                    f.write(bytes(info["stride"] - layout.nbytes))
                    if progress is not None:
                        progress(1)


def iter_keys(num_layers: int, num_experts: int, precisions: list[str]) -> Iterator[tuple[int, int, str]]:
    """All (layer, expert, precision) keys in file order."""
    for precision in precisions:
        for layer in range(num_layers):
            for expert in range(num_experts):
                yield layer, expert, precision


def reusable_disk_store(
    layouts: dict[str, ExpertLayout], num_layers: int, num_experts: int, source: RecordSource, fingerprint: str, *,
    store_path: Path | None = None, store_dir: Path | None = None, progress: Callable[[int], None] | None = None,
) -> DiskStore:
    """The disk store at `store_path` (or `store_dir`/experts-<fingerprint>.bin): reused when its header's
    fingerprint matches, else written from `source` (atomically: a half-written store is never reused)."""
    if store_path is None:
        if store_dir is None:
            raise UserError("a disk store needs a file path or a folder")
        store_dir.mkdir(parents=True, exist_ok=True)
        store_path = store_dir / f"experts-{fingerprint}.bin"
    reuse = False
    if store_path.exists():
        try:
            reuse = read_header(store_path).get("fingerprint") == fingerprint
        except UserError:
            reuse = False
    if not reuse:
        write_disk_store(store_path, layouts, num_layers, num_experts, source, fingerprint, progress=progress)
    store = DiskStore(store_path)
    store.attach_layouts(layouts)
    return store
