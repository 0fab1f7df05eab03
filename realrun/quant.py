"""Packed experts: one routed expert in one precision as one flat byte record, and back.

An expert is three matrices, gate [I, H], up [I, H] and down [H, I] (I = expert intermediate size,
H = hidden size). In precision `bf16` (the model's own dtype, unquantised; the name follows
`sim.modelspec.PRECISIONS`) the record is the raw weights, gate|up|down. In `int8`/`int4`/`int2` each matrix
is quantised with HQQ (`hqq.core.quantize.Quantizer`, affine, groups of `group_size` consecutive weights,
axis 1) and stored as HQQ's bit-packed uint8 codes followed by the float32 scale and float32 zero of each
group. The record of every precision is exactly `sim.modelspec.ModelSpec.expert_bytes(precision)` bytes
long, so the bytes realrun moves are the bytes the simulator assumes.

`pack_expert` / `Dequantizer.unpack_into` are the codec pair (round trip tested against HQQ's own
`Quantizer.dequantize`); `ExpertLayout` is the self-describing metadata: shapes, offsets, precision, packing.

Two packings of the same HQQ codes, of the same byte size:
- `hqq`: HQQ's own bit packing; dequantised in fast memory (`Dequantizer`): the portable form, used on CUDA.
- `tinygemm` (int4 only, CPU): the codes in the layout of PyTorch's CPU int4 kernel
  (`aten._weight_int4pack_mm_for_cpu`, gpt-fast's int4 path) and scale/zero in its convention
  (w = (q - 8) * scale + zero, [K/group, N]), still float32. A CPU expert then multiplies straight from the
  packed slot (`Int4Matmuls`): dequantising 35 MB of float32 weights per expert use would cost more CPU time
  than reading the bf16 expert from an NVMe disk, which turns the point of INT4 transfers upside down.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from hqq.core.quantize import Quantizer

from sim.modelspec import PRECISIONS, ModelSpec, get_precision
from traces.errors import UserError

TORCH_DTYPES = {"bfloat16": torch.bfloat16, "float16": torch.float16, "float32": torch.float32}
"""Model dtype names (as in config.json and ModelSpec.dtype) -> torch dtypes."""


def torch_dtype(name: str) -> torch.dtype:
    """The torch dtype called `name` ("bfloat16", "float16", "float32")."""
    if name not in TORCH_DTYPES:
        raise UserError(f"unsupported dtype {name!r}; use one of {', '.join(TORCH_DTYPES)}")
    return TORCH_DTYPES[name]


@dataclass(frozen=True)
class MatrixLayout:
    """Where one packed matrix lies inside an expert record (byte offsets from the record start)."""

    name: str
    """"gate", "up" or "down"."""
    shape: tuple[int, int]
    """[rows, cols] of the unpacked matrix."""
    offset: int
    """First byte of the codes (or of the raw weights for `bf16`)."""
    code_bytes: int
    """Bytes of the codes (or raw weights)."""
    groups: int
    """Quantisation groups (0 for `bf16`); scale then zero follow the codes, `4 * groups` bytes each."""

    @property
    def numel(self) -> int:
        return self.shape[0] * self.shape[1]

    @property
    def scale_offset(self) -> int:
        return self.offset + self.code_bytes

    @property
    def zero_offset(self) -> int:
        return self.offset + self.code_bytes + 4 * self.groups

    @property
    def end(self) -> int:
        return self.offset + self.code_bytes + 8 * self.groups


@dataclass(frozen=True)
class ExpertLayout:
    """The byte layout of one routed expert in one precision (same for every expert of a model)."""

    precision: str
    hidden_size: int
    """H, bytes-free: the model's hidden size."""
    intermediate_size: int
    """I: the expert's intermediate size."""
    dtype: torch.dtype
    """dtype of the unpacked weights (the model's dtype)."""
    matrices: tuple[MatrixLayout, MatrixLayout, MatrixLayout]
    nbytes: int
    """Bytes of the whole record."""
    packing: str = "hqq"
    """"hqq" or "tinygemm" (see the module docstring); same bytes either way."""

    @property
    def bits(self) -> int:
        return PRECISIONS[self.precision].bits

    @property
    def group_size(self) -> int:
        return PRECISIONS[self.precision].group_size


PACKINGS = ("hqq", "tinygemm")


def expert_layout(spec: ModelSpec, precision: str, packing: str = "hqq") -> ExpertLayout:
    """The layout of one expert of `spec` in `precision`; UserError if HQQ cannot pack its shapes."""
    prec = get_precision(precision)
    if packing not in PACKINGS or (packing == "tinygemm" and precision != "int4"):
        raise ValueError(f"packing {packing!r} is not available for {precision}")
    hidden, inter = spec.hidden_size, spec.expert_intermediate_size
    dtype = torch_dtype(spec.dtype)
    shapes = (("gate", (inter, hidden)), ("up", (inter, hidden)), ("down", (hidden, inter)))
    matrices = []
    offset = 0
    for name, shape in shapes:
        numel = shape[0] * shape[1]
        if prec.group_size == 0:
            code_bytes, groups = numel * dtype.itemsize, 0
        else:
            per_byte = 8 // prec.bits
            # HQQ packs along the group axis: the number of groups must split evenly into bytes.
            if numel % prec.group_size or (numel // prec.group_size) % per_byte:
                raise UserError(
                    f"cannot pack a {shape[0]}x{shape[1]} expert matrix in {precision}: its size must be a "
                    f"multiple of {prec.group_size * per_byte} weights"
                )
            if packing == "tinygemm" and shape[1] % prec.group_size:
                raise UserError(f"the CPU int4 kernel needs rows of a multiple of {prec.group_size} weights, "
                                f"not {shape[1]}")
            code_bytes, groups = numel * prec.bits // 8, numel // prec.group_size
        matrices.append(MatrixLayout(name, shape, offset, code_bytes, groups))
        offset = matrices[-1].end
    layout = ExpertLayout(precision, hidden, inter, dtype, tuple(matrices), offset, packing)  # type: ignore[arg-type]
    if layout.nbytes != spec.expert_bytes(precision):  # the contract with the simulator
        raise AssertionError(f"{precision} record {layout.nbytes} B != spec {spec.expert_bytes(precision)} B")
    return layout


def split_fused(gate_up: torch.Tensor, down: torch.Tensor) -> dict[str, torch.Tensor]:
    """transformers' fused expert weights -> {"gate": [I, H], "up": [I, H], "down": [H, I]}."""
    gate, up = gate_up.chunk(2, dim=0)  # gate_up_proj is [2I, H], gate first (its forward chunks the output)
    return {"gate": gate, "up": up, "down": down}


@torch.inference_mode()
def pack_expert(
    weights: dict[str, torch.Tensor], layout: ExpertLayout, *, optimize: bool = True
) -> torch.Tensor:
    """One expert's weights -> a uint8 record of exactly `layout.nbytes` bytes.

    `optimize=True` runs HQQ's proximal zero-point solver (about 3 s for a 2816x2048 matrix on one CPU
    core); `optimize=False` is HQQ's plain min/max rounding, for benchmarks where quality does not matter.
    """
    record = torch.empty(layout.nbytes, dtype=torch.uint8)
    for m in layout.matrices:
        w = weights[m.name].detach().to("cpu")
        if tuple(w.shape) != m.shape:
            raise ValueError(f"{m.name} has shape {tuple(w.shape)}, layout expects {m.shape}")
        if layout.group_size == 0:
            raw = w.to(layout.dtype).contiguous().view(-1).view(torch.uint8)
            record[m.offset : m.offset + m.code_bytes] = raw
            continue
        if layout.packing == "tinygemm":
            _pack_tinygemm(w, m, layout, record, optimize)
            continue
        codes, meta = Quantizer.quantize(
            w.float(), nbits=layout.bits, group_size=layout.group_size, axis=1, optimize=optimize,
            bitpack=True, compute_dtype=torch.float32, device="cpu",
        )
        record[m.offset : m.offset + m.code_bytes] = codes.contiguous().view(-1)
        record[m.scale_offset : m.zero_offset] = meta["scale"].float().contiguous().view(-1).view(torch.uint8)
        record[m.zero_offset : m.end] = meta["zero"].float().contiguous().view(-1).view(torch.uint8)
    return record


def _pack_tinygemm(w: torch.Tensor, m: MatrixLayout, layout: ExpertLayout, record: torch.Tensor,
                   optimize: bool) -> None:
    """HQQ int4 codes of one [N, K] matrix, stored in the CPU int4 kernel's layout and convention."""
    g = layout.group_size
    codes, meta = Quantizer.quantize(w.float(), nbits=4, group_size=g, axis=1, optimize=optimize, bitpack=False,
                                     compute_dtype=torch.float32, device="cpu")
    n_rows, k = m.shape
    q = codes.reshape(n_rows, k).to(torch.int32)  # [N, K], 0..15
    packed = torch.ops.aten._convert_weight_to_int4pack_for_cpu(q, 1)  # [N, K / 2] uint8
    scale = meta["scale"].float().reshape(n_rows, k // g)  # HQQ: w = (q - zero) * scale
    zero = meta["zero"].float().reshape(n_rows, k // g)
    tg_zero = (8.0 - zero) * scale  # kernel: w = (q - 8) * scale + tg_zero
    record[m.offset : m.offset + m.code_bytes] = packed.contiguous().view(-1)
    record[m.scale_offset : m.zero_offset] = scale.t().contiguous().view(-1).view(torch.uint8)  # [K/g, N]
    record[m.zero_offset : m.end] = tg_zero.t().contiguous().view(-1).view(torch.uint8)


class Int4Matmuls:
    """CPU int4 experts computed straight from `tinygemm`-packed records (no dequantised weights).

    `forward(record, x, act_fn)` = down(act(gate(x)) * up(x)) for x [n, H]; activations go through the
    kernel in bfloat16 (its fast path), results come back in x's dtype.
    """

    def __init__(self, layout: ExpertLayout) -> None:
        if layout.packing != "tinygemm":
            raise ValueError("Int4Matmuls needs a tinygemm-packed layout")
        self.layout = layout

    def _mm(self, record: torch.Tensor, m: MatrixLayout, x: torch.Tensor) -> torch.Tensor:
        n_rows, k = m.shape
        g = self.layout.group_size
        codes = record[m.offset : m.offset + m.code_bytes].view(n_rows, k // 2)
        scale = record[m.scale_offset : m.zero_offset].view(torch.float32).view(k // g, n_rows)
        zero = record[m.zero_offset : m.end].view(torch.float32).view(k // g, n_rows)
        scales_and_zeros = torch.stack([scale, zero], dim=-1).to(torch.bfloat16)  # [K/g, N, 2], tiny
        return torch.ops.aten._weight_int4pack_mm_for_cpu(x, codes, g, scales_and_zeros)

    def forward(self, record: torch.Tensor, x: torch.Tensor, act_fn) -> torch.Tensor:
        gate, up, down = self.layout.matrices
        xb = x.to(torch.bfloat16)
        h = act_fn(self._mm(record, gate, xb).float()) * self._mm(record, up, xb).float()
        return self._mm(record, down, h.to(torch.bfloat16)).to(x.dtype)


def raw_views(record: torch.Tensor, layout: ExpertLayout) -> tuple[torch.Tensor, torch.Tensor]:
    """Zero-copy views of a `bf16` (unquantised) record: (gate_up [2I, H], down [H, I]) in the model dtype.

    gate and up lie back to back, so together they are exactly transformers' fused gate_up_proj.
    """
    if layout.group_size != 0:
        raise ValueError("raw_views needs an unquantised record")
    gate, _, down = layout.matrices
    weights = record[: layout.nbytes].view(layout.dtype)
    itemsize = layout.dtype.itemsize
    gate_up = weights[gate.offset // itemsize : (gate.offset + 2 * gate.code_bytes) // itemsize]
    down_w = weights[down.offset // itemsize : down.end // itemsize]
    return gate_up.view(2 * layout.intermediate_size, layout.hidden_size), down_w.view(*down.shape)


class Dequantizer:
    """Unpacks records of one layout into preallocated weight buffers (allocates once, in fast memory).

    `unpack_into(record)` returns (gate_up [2I, H], down [H, I]) views of its own buffers, valid until the
    next call. Works on whatever device `record` and the buffers live on (CPU or CUDA).
    """

    def __init__(self, layout: ExpertLayout, device: torch.device | str = "cpu") -> None:
        if layout.packing != "hqq":
            raise ValueError("Dequantizer reads hqq-packed records; tinygemm ones go through Int4Matmuls")
        self.layout = layout
        h, i = layout.hidden_size, layout.intermediate_size
        self.gate_up = torch.empty(2 * i, h, dtype=layout.dtype, device=device)
        """Output: fused gate|up weights [2I, H]."""
        self.down = torch.empty(h, i, dtype=layout.dtype, device=device)
        """Output: down weights [H, I]."""
        per_byte = 8 // layout.bits if layout.group_size else 1
        largest = max(m.code_bytes for m in layout.matrices)
        # One scratch for unpacked codes, reused by every matrix: no allocation per expert.
        self._codes = torch.empty(largest * per_byte, dtype=torch.uint8, device=device)

    def unpack_into(self, record: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Dequantise `record` (uint8, at least `layout.nbytes` long) into the buffers; return them."""
        lay = self.layout
        if lay.group_size == 0:
            gate_up, down = raw_views(record, lay)
            self.gate_up.copy_(gate_up)
            self.down.copy_(down)
            return self.gate_up, self.down
        outs = {"gate": self.gate_up[: lay.intermediate_size], "up": self.gate_up[lay.intermediate_size :],
                "down": self.down}
        for m in lay.matrices:
            self._unpack_matrix(record, m, outs[m.name])
        return self.gate_up, self.down

    def _unpack_matrix(self, record: torch.Tensor, m: MatrixLayout, out: torch.Tensor) -> None:
        lay = self.layout
        g = lay.group_size
        packed = record[m.offset : m.offset + m.code_bytes].view(-1, g)  # HQQ layout: [groups / per_byte, g]
        rows = packed.shape[0]
        codes = self._codes[: m.numel].view(m.groups, g)  # [groups, g] like HQQ's unpacked W_q
        bits = lay.bits
        per_byte = 8 // bits
        mask = (1 << bits) - 1
        for j in range(per_byte):  # HQQ puts the j-th block of rows in bits (8 - bits*(j+1)) .. of each byte
            shift = 8 - bits * (j + 1)
            block = codes[j * rows : (j + 1) * rows]
            if shift:
                torch.bitwise_right_shift(packed, shift, out=block)
                block.bitwise_and_(mask)
            else:
                torch.bitwise_and(packed, mask, out=block)
        scale = record[m.scale_offset : m.zero_offset].view(torch.float32).view(m.groups, 1)
        zero = record[m.zero_offset : m.end].view(torch.float32).view(m.groups, 1)
        w = out.view(m.groups, g)
        # (W_q - zero) * scale in float32 as HQQ does, written straight into the model-dtype buffer.
        if w.dtype == torch.float32:
            torch.sub(codes, zero, out=w)
            w.mul_(scale)
        else:
            w.copy_((codes - zero).mul_(scale))
