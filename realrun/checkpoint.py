"""A Hugging Face checkpoint folder read tensor by tensor, without loading the model.

A folder holds `config.json` and either `model.safetensors` or shards `model-XXXXX-of-YYYYY.safetensors`
listed by `model.safetensors.index.json`. A safetensors file is an 8-byte little-endian header length, a
JSON header (tensor name -> dtype, shape, `data_offsets` [begin, end) relative to the end of the header),
then the raw tensor bytes. `Checkpoint` parses every header once (no tensor data), checks that each file
really holds the bytes its header promises, and reads single tensors with `os.pread` (no mmap: the file's
pages never count as this process's memory, so the resident size is exactly what we keep).

Routed experts are located, not read: `expert_tensors(layer, expert)` gives the file and byte range of the
expert's gate [I, H], up [I, H] and down [H, I] matrices, for the three namings found in published
checkpoints (what transformers 5.24's `save_pretrained` writes as well; it reverts its fused layout on save):

- per expert: `model.layers.{i}.mlp.experts.{e}.gate_proj.weight` / `up_proj` / `down_proj` (Qwen2-MoE,
  Qwen3-MoE, DeepSeek-V2/V3, OLMoE);
- Mixtral: `model.layers.{i}.block_sparse_moe.experts.{e}.w1.weight` (gate) / `w3` (up) / `w2` (down);
- fused (transformers' in-memory layout): `model.layers.{i}.mlp.experts.gate_up_proj` [E, 2I, H] and
  `down_proj` [E, H, I]; one expert's gate, up and down are then byte slices of those.

Every inconsistency (missing shard, truncated file, index naming a missing file, a tensor whose shape
disagrees with config.json) is a `UserError` naming the file and the tensor.
"""

from __future__ import annotations

import hashlib
import json
import os
from dataclasses import dataclass
from pathlib import Path

import torch

from traces.errors import UserError
from traces.format import SafetensorsHeaderError, parse_safetensors_header

SAFETENSORS_DTYPES: dict[str, torch.dtype] = {
    "BF16": torch.bfloat16, "F16": torch.float16, "F32": torch.float32, "F64": torch.float64,
    "I64": torch.int64, "I32": torch.int32, "I16": torch.int16, "I8": torch.int8, "U8": torch.uint8,
    "BOOL": torch.bool,
}
"""safetensors dtype names -> torch dtypes this reader supports (FP8 checkpoints are not among them)."""
INDEX_NAME = "model.safetensors.index.json"
SINGLE_NAME = "model.safetensors"


@dataclass(frozen=True)
class TensorEntry:
    """Where one tensor's bytes lie in a checkpoint file."""

    name: str
    path: Path
    dtype: torch.dtype
    shape: tuple[int, ...]
    offset: int
    """Absolute byte offset of the first byte in the file."""
    nbytes: int


def read_safetensors_header(path: Path) -> tuple[dict[str, TensorEntry], bytes]:
    """The tensors of one safetensors file and its raw header bytes; UserError if the file is missing,
    not a safetensors file, or shorter than its header says (truncated)."""
    try:
        header, raw, data_start, size = parse_safetensors_header(path)
    except FileNotFoundError:
        raise UserError(f"checkpoint file {path} is missing; re-download the model") from None
    except SafetensorsHeaderError as error:
        raise UserError(f"{path} is not a readable safetensors file ({error}); re-download it") from None
    header.pop("__metadata__", None)
    tensors = {}
    for name, info in header.items():
        dtype = SAFETENSORS_DTYPES.get(info.get("dtype"))
        if dtype is None:
            raise UserError(f"tensor {name} in {path} has dtype {info.get('dtype')}, which realrun cannot read "
                            f"(it reads {', '.join(SAFETENSORS_DTYPES)}; FP8 checkpoints are not supported)")
        shape = tuple(int(d) for d in info["shape"])
        begin, end = (int(v) for v in info["data_offsets"])
        numel = 1
        for d in shape:
            numel *= d
        if end - begin != numel * dtype.itemsize:
            raise UserError(f"tensor {name} in {path}: {end - begin} bytes for shape {list(shape)} "
                            f"{info['dtype']}; the file is corrupt, re-download it")
        if data_start + end > size:
            raise UserError(f"{path} is truncated: tensor {name} ends at byte {data_start + end} but the file has "
                            f"{size} bytes; re-download it")
        tensors[name] = TensorEntry(name, path, dtype, shape, data_start + begin, end - begin)
    return tensors, raw


def pread_at_least(fd: int, view: memoryview, offset: int, need: int, what: str) -> None:
    """Read from file offset `offset` into `view` until at least its first `need` bytes are in (preadv may
    return short counts; an O_DIRECT read of whole blocks may stop short at the end of the file, past
    `need`). OSError naming `what` when the file ends before `need` bytes."""
    done = 0
    while done < need:
        got = os.preadv(fd, [view[done:]], offset + done)
        if got <= 0:
            raise OSError(f"short read of {what}")
        done += got


@dataclass(frozen=True)
class ExpertTensors:
    """The three matrices of one routed expert: entries whose byte ranges hold gate, up and down."""

    gate: TensorEntry
    up: TensorEntry
    down: TensorEntry

    def parts(self) -> tuple[TensorEntry, TensorEntry, TensorEntry]:
        """(gate, up, down): the order of a `realrun.quant` bf16 record."""
        return self.gate, self.up, self.down


class Checkpoint:
    """A Hugging Face checkpoint folder: its config and where each tensor lies (see the module docstring)."""

    def __init__(self, folder: str | os.PathLike[str]) -> None:
        self.folder = Path(folder)
        config_path = self.folder / "config.json"
        if not config_path.is_file():
            raise UserError(f"{self.folder} has no config.json; is it a Hugging Face model folder?")
        try:
            self.config: dict = json.loads(config_path.read_text(encoding="utf-8"))
        except json.JSONDecodeError as error:
            raise UserError(f"{config_path} is not valid JSON ({error.msg}); fix or re-download it") from None
        self.files = self._files()
        """The safetensors files, in name order."""
        self.tensors: dict[str, TensorEntry] = {}
        self._headers: dict[Path, bytes] = {}
        for path in self.files:
            tensors, raw = read_safetensors_header(path)
            self._headers[path] = raw
            self.tensors.update(tensors)
        if self._index is not None:
            for name, file in self._index.items():
                entry = self.tensors.get(name)
                if entry is None or entry.path.name != file:
                    raise UserError(f"{self.folder / INDEX_NAME} puts tensor {name} in {file}, which does not hold "
                                    "it; re-download the model")
        self._fds: dict[Path, int] = {}

    def _files(self) -> list[Path]:
        index = self.folder / INDEX_NAME
        self._index: dict[str, str] | None = None
        if index.is_file():
            try:
                weight_map = json.loads(index.read_text(encoding="utf-8"))["weight_map"]
            except (json.JSONDecodeError, KeyError, TypeError):
                raise UserError(f"{index} has no weight_map; re-download the model") from None
            self._index = {str(k): str(v) for k, v in weight_map.items()}
            names = sorted(set(self._index.values()))
            for name in names:
                if not (self.folder / name).is_file():
                    raise UserError(f"{index} names {name}, which is not in {self.folder}; re-download the model")
            return [self.folder / name for name in names]
        single = self.folder / SINGLE_NAME
        if single.is_file():
            return [single]
        raise UserError(f"{self.folder} has neither {SINGLE_NAME} nor {INDEX_NAME}; realrun reads safetensors "
                        "checkpoints only")

    # --- identity ----------------------------------------------------------------------------------
    def fingerprint(self) -> str:
        """Identifies the checkpoint's bytes cheaply: config, every file's name, size, mtime and header."""
        h = hashlib.sha256(json.dumps(self.config, sort_keys=True).encode())
        for path in self.files:
            st = path.stat()
            h.update(json.dumps([path.name, st.st_size, st.st_mtime_ns]).encode())
            h.update(self._headers[path])
        return h.hexdigest()[:16]

    # --- reading -----------------------------------------------------------------------------------
    def _fd(self, path: Path) -> int:
        fd = self._fds.get(path)
        if fd is None:
            fd = self._fds[path] = os.open(path, os.O_RDONLY)
        return fd

    def read(self, name: str) -> torch.Tensor:
        """Tensor `name` as stored (its checkpoint dtype), in fresh CPU memory."""
        entry = self.entry(name)
        buf = torch.empty(entry.nbytes, dtype=torch.uint8)
        if entry.nbytes:
            try:
                pread_at_least(self._fd(entry.path), memoryview(buf.numpy()).cast("B"), entry.offset, entry.nbytes,
                               f"tensor {name} from {entry.path}")
            except OSError as error:
                raise UserError(f"{error}; the file changed while running?") from None
        return buf.view(entry.dtype).view(entry.shape)

    def entry(self, name: str) -> TensorEntry:
        """Where tensor `name` lies; UserError naming the folder when the checkpoint lacks it."""
        entry = self.tensors.get(name)
        if entry is None:
            raise UserError(f"checkpoint {self.folder} has no tensor {name}; is it complete?")
        return entry

    def close(self) -> None:
        """Close the files opened by `read`."""
        for fd in self._fds.values():
            os.close(fd)
        self._fds.clear()

    def __enter__(self) -> Checkpoint:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    # --- routed experts ----------------------------------------------------------------------------
    def expert_tensors(self, decoder_layer: int, expert: int, num_experts: int, hidden_size: int,
                       intermediate_size: int) -> ExpertTensors:
        """Where routed expert `expert` of decoder layer `decoder_layer` lies (see the module docstring);
        UserError naming the tensor and file when it is missing or its shape disagrees with config.json."""
        i, e, hid, inter = decoder_layer, expert, hidden_size, intermediate_size
        for prefix in ("model.layers", "layers"):
            per_expert = {"gate": f"{prefix}.{i}.mlp.experts.{e}.gate_proj.weight",
                          "up": f"{prefix}.{i}.mlp.experts.{e}.up_proj.weight",
                          "down": f"{prefix}.{i}.mlp.experts.{e}.down_proj.weight"}
            mixtral = {"gate": f"{prefix}.{i}.block_sparse_moe.experts.{e}.w1.weight",
                       "up": f"{prefix}.{i}.block_sparse_moe.experts.{e}.w3.weight",
                       "down": f"{prefix}.{i}.block_sparse_moe.experts.{e}.w2.weight"}
            for names in (per_expert, mixtral):
                if names["gate"] in self.tensors:
                    expected = {"gate": (inter, hid), "up": (inter, hid), "down": (hid, inter)}
                    parts = {k: self._checked(n, expected[k]) for k, n in names.items()}
                    return ExpertTensors(**parts)
            fused_gate_up = f"{prefix}.{i}.mlp.experts.gate_up_proj"
            if fused_gate_up in self.tensors:
                gate_up = self._checked(fused_gate_up, (num_experts, 2 * inter, hid))
                down = self._checked(f"{prefix}.{i}.mlp.experts.down_proj", (num_experts, hid, inter))
                return ExpertTensors(_slice(gate_up, e, 0, inter), _slice(gate_up, e, inter, inter),
                                     _slice(down, e, 0, hid))
        raise UserError(f"checkpoint {self.folder} has no weights for routed expert {e} of layer {i} (looked for "
                        f"model.layers.{i}.mlp.experts.{e}.gate_proj.weight, the Mixtral name "
                        f"...block_sparse_moe.experts.{e}.w1.weight and fused ...mlp.experts.gate_up_proj)")

    def _checked(self, name: str, shape: tuple[int, ...]) -> TensorEntry:
        entry = self.entry(name)
        if entry.shape != shape:
            raise UserError(f"tensor {name} in {entry.path} has shape {list(entry.shape)}, but config.json implies "
                            f"{list(shape)}; the checkpoint and its config disagree")
        if not entry.dtype.is_floating_point:
            raise UserError(f"tensor {name} in {entry.path} is {entry.dtype}, not a float type; quantised "
                            "checkpoints are not supported")
        return entry


def _slice(fused: TensorEntry, expert: int, first_row: int, rows: int) -> TensorEntry:
    """Rows [first_row, first_row + rows) of expert `expert` of a fused [E, R, C] tensor, as an entry."""
    _, total_rows, cols = fused.shape
    row_bytes = cols * fused.dtype.itemsize
    offset = fused.offset + (expert * total_rows + first_row) * row_bytes
    return TensorEntry(f"{fused.name}[{expert}, {first_row}:{first_row + rows}]", fused.path, fused.dtype,
                       (rows, cols), offset, rows * row_bytes)
