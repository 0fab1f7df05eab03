"""Trace format v1: per-token expert routing of an MoE model, in one memory-mappable safetensors file.

A trace holds, for T token positions (stored sequence by sequence, in execution order) and the L MoE
layers of a model, the k routed experts of each token and their gate weights, plus optional full router
logits, cross-layer look-ahead logits and router inputs. Letters used in shape comments:

    T  token positions         L  MoE layers (len(model_config.moe_layer_indices))
    k  routed experts/token    E  routed experts per layer
    D  look-ahead depth        H  hidden size

The file is a plain safetensors file (8-byte little-endian header length, JSON header, raw little-endian
tensor bytes); its header metadata holds the strings `format`, `version`, `model`, `model_config`,
`source`, `prompts`, `created` and optionally `hf_config` (the JSON ones as JSON text). We read and write
the container ourselves so that reading is a true memory map and writing streams each tensor without a
second in-memory copy; tests check that the `safetensors` library reads our files and we read its files.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import os
import struct
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import numpy as np

from traces.atomic import atomic_output
from traces.errors import UserError

FORMAT_NAME = "fatesim-trace"
FORMAT_VERSION = 1
SUPPORTED_VERSIONS = (1,)

ARCHITECTURES = ("qwen2_moe", "deepseek", "deepseek_v2", "deepseek_v3", "mixtral", "olmoe", "qwen3_moe")
DTYPES = ("bfloat16", "float16", "float32")

# tensor name -> (numpy dtype, shape letters); order = layout order in the file (largest items first, so
# every tensor starts at an offset aligned to its item size).
REQUIRED_TENSORS: dict[str, tuple[np.dtype, str]] = {
    "token_ids": (np.dtype("<i4"), "T"),
    "seq_ids": (np.dtype("<i4"), "T"),
    "positions": (np.dtype("<i4"), "T"),
    "topk_ids": (np.dtype("<i2"), "TLk"),
    "topk_weights": (np.dtype("<f2"), "TLk"),
    "is_prefill": (np.dtype("u1"), "T"),
}
OPTIONAL_TENSORS: dict[str, tuple[np.dtype, str]] = {
    "router_logits": (np.dtype("<f2"), "TLE"),
    "lookahead_logits": (np.dtype("<f2"), "DTLE"),
    "gate_inputs": (np.dtype("<f2"), "TLH"),
}
_LAYOUT_ORDER = ("token_ids", "seq_ids", "positions", "topk_ids", "topk_weights", "router_logits",
                 "lookahead_logits", "gate_inputs", "is_prefill")
_SAFETENSORS_DTYPES = {"I32": np.dtype("<i4"), "I16": np.dtype("<i2"), "F16": np.dtype("<f2"),
                       "U8": np.dtype("u1"), "I64": np.dtype("<i8"), "F32": np.dtype("<f4"),
                       "I8": np.dtype("i1"), "BOOL": np.dtype("?"), "F64": np.dtype("<f8"),
                       "U16": np.dtype("<u2"), "U32": np.dtype("<u4"), "U64": np.dtype("<u8")}
_DTYPE_CODES = {dtype: code for code, dtype in _SAFETENSORS_DTYPES.items()}
_MAX_HEADER_BYTES = 100 * 1024 * 1024  # the safetensors library's own limit


class TraceError(UserError):
    """A trace file or Trace object that breaks the format; the message names the file, tensor and problem."""


@dataclass(frozen=True)
class TraceModelConfig:
    """The routing-relevant shape of the model a trace came from (header key `model_config`)."""

    architecture: str
    """HF model family: one of ARCHITECTURES."""
    num_layers: int
    """Decoder layers in total (dense and MoE)."""
    moe_layer_indices: tuple[int, ...]
    """Decoder indices of the MoE layers, ascending; len == L."""
    num_experts: int
    """Routed experts per MoE layer (E)."""
    top_k: int
    """Routed experts per token (k)."""
    num_shared_experts: int
    """Always-active shared experts per MoE layer (not in the trace)."""
    hidden_size: int
    """Model width H."""
    expert_intermediate_size: int
    """Intermediate size of one routed expert."""
    shared_expert_intermediate_size: int
    """Intermediate size summed over all shared experts (0 if none)."""
    dtype: str
    """Weight dtype of the source model: one of DTYPES."""

    def to_dict(self) -> dict[str, Any]:
        """JSON-ready dict (moe_layer_indices as a list)."""
        d = dataclasses.asdict(self)
        d["moe_layer_indices"] = list(self.moe_layer_indices)
        return d

    @classmethod
    def from_dict(cls, d: Any) -> TraceModelConfig:
        """Build from a parsed `model_config` JSON object; TraceError on missing, unknown or mistyped keys."""
        if not isinstance(d, dict):
            raise TraceError("model_config is not a JSON object")
        names = [f.name for f in dataclasses.fields(cls)]
        missing = [n for n in names if n not in d]
        if missing:
            raise TraceError(f"model_config lacks {', '.join(missing)}")
        unknown = sorted(set(d) - set(names))
        if unknown:
            raise TraceError(f"model_config has unknown keys {', '.join(unknown)}")
        indices = d["moe_layer_indices"]
        if not isinstance(indices, (list, tuple)):
            raise TraceError("model_config.moe_layer_indices is not a list")
        return cls(**{**d, "moe_layer_indices": tuple(indices)})


@dataclass(frozen=True, eq=False)
class Trace:
    """One routing trace. Arrays may be read-only memory maps; see the module docstring for the letters.

    Not comparable with `==` (arrays); compare `content_hash()` or the fields.
    """

    model: str
    """Model name (HF id) or path it was recorded from / imported for."""
    model_config: TraceModelConfig
    source: dict
    """{"kind": "recorded"|"imported", ...provenance, "assumptions": [str, ...]}."""
    prompts: dict
    """{"name": ..., "sha256": ...} or {} when unknown."""
    created: str
    """ISO-8601 UTC time of creation."""
    token_ids: np.ndarray  # [T] int32, -1 where unknown
    seq_ids: np.ndarray  # [T] int32
    positions: np.ndarray  # [T] int32, position within its sequence
    is_prefill: np.ndarray  # [T] uint8, 1 = prompt token
    topk_ids: np.ndarray  # [T, L, k] int16
    topk_weights: np.ndarray  # [T, L, k] float16
    router_logits: np.ndarray | None = None  # [T, L, E] float16
    lookahead_logits: np.ndarray | None = None  # [D, T, L, E] float16; entries with l+d >= L meaningless
    gate_inputs: np.ndarray | None = None  # [T, L, H] float16
    hf_config: dict | None = None
    """The source model's full config.json, when recorded."""

    @property
    def num_tokens(self) -> int:
        """T."""
        return int(self.topk_ids.shape[0])

    @property
    def num_moe_layers(self) -> int:
        """L."""
        return int(self.topk_ids.shape[1])

    @property
    def num_experts(self) -> int:
        """E (from model_config)."""
        return int(self.model_config.num_experts)

    @property
    def top_k(self) -> int:
        """k."""
        return int(self.topk_ids.shape[2])

    @property
    def lookahead_depth(self) -> int:
        """D, or 0 when the trace has no look-ahead logits."""
        return 0 if self.lookahead_logits is None else int(self.lookahead_logits.shape[0])

    @property
    def num_sequences(self) -> int:
        """Number of sequences (requests)."""
        return len(self.sequence_slices())

    @property
    def num_prefill_tokens(self) -> int:
        """Positions with is_prefill == 1."""
        return int(np.count_nonzero(self.is_prefill))

    @property
    def num_decode_tokens(self) -> int:
        """Positions with is_prefill == 0."""
        return self.num_tokens - self.num_prefill_tokens

    def optional_tensors(self) -> list[str]:
        """Names of the optional tensors this trace carries."""
        return [name for name in OPTIONAL_TENSORS if getattr(self, name) is not None]

    def sequence_slices(self) -> list[slice]:
        """One slice of token positions per sequence, in storage (= execution) order."""
        seq = np.asarray(self.seq_ids)
        if seq.size == 0:
            return []
        starts = np.concatenate([[0], np.flatnonzero(seq[1:] != seq[:-1]) + 1, [seq.size]])
        return [slice(int(a), int(b)) for a, b in zip(starts[:-1], starts[1:], strict=True)]

    def tensors(self) -> dict[str, np.ndarray]:
        """All tensors present, by file name."""
        names = list(REQUIRED_TENSORS) + self.optional_tensors()
        return {name: getattr(self, name) for name in names}

    def content_hash(self) -> str:
        """sha256 (hex) over model_config and every tensor's name, dtype, shape and bytes.

        Independent of `created`, `source`, `prompts` and `model`, so two imports of the same log hash alike.
        Hashes the bytes in place (memory maps are streamed, not copied): ~1 s per GB.
        """
        h = hashlib.sha256()
        h.update(json.dumps(self.model_config.to_dict(), sort_keys=True).encode())
        for name in _LAYOUT_ORDER:
            array = getattr(self, name)
            if array is None:
                continue
            array = np.ascontiguousarray(array)
            h.update(f"\n{name}:{array.dtype.str}:{list(array.shape)}\n".encode())
            flat = array.reshape(-1).view(np.uint8) if array.size else np.empty(0, np.uint8)
            step = 64 * 1024 * 1024
            for start in range(0, flat.size, step):
                h.update(flat[start:start + step].data)
        return h.hexdigest()


def utc_now_iso() -> str:
    """Current UTC time as ISO-8601 with a Z suffix, to the second."""
    return datetime.now(UTC).strftime("%Y-%m-%dT%H:%M:%SZ")


# --------------------------------------------------------------------------------------------------------
# validation


def validate_trace(trace: Trace) -> None:
    """Check every invariant of format v1; raise TraceError naming the tensor and the problem."""
    _validate_metadata(trace)
    cfg = trace.model_config
    _validate_model_config(cfg)
    dims = _validate_shapes(trace, cfg)
    _validate_values(trace, dims)


def _validate_metadata(trace: Trace) -> None:
    if not isinstance(trace.model, str) or not trace.model:
        raise TraceError("model must be a non-empty string")
    if not isinstance(trace.model_config, TraceModelConfig):
        raise TraceError("model_config must be a TraceModelConfig")
    if not isinstance(trace.source, dict):
        raise TraceError("source must be a dict")
    kind = trace.source.get("kind")
    if not isinstance(kind, str) or not kind:
        raise TraceError("source lacks a 'kind' string (e.g. 'recorded' or 'imported')")
    assumptions = trace.source.get("assumptions", [])
    if not isinstance(assumptions, list) or not all(isinstance(a, str) for a in assumptions):
        raise TraceError("source.assumptions must be a list of strings")
    if not isinstance(trace.prompts, dict):
        raise TraceError("prompts must be a dict ({} when unknown)")
    if not isinstance(trace.created, str):
        raise TraceError("created must be an ISO-8601 string")
    if trace.hf_config is not None and not isinstance(trace.hf_config, dict):
        raise TraceError("hf_config must be a dict or None")
    for name in ("source", "prompts", "hf_config"):
        try:
            json.dumps(getattr(trace, name))
        except (TypeError, ValueError) as error:
            raise TraceError(f"{name} is not JSON-serialisable: {error}") from None


def _validate_model_config(cfg: TraceModelConfig) -> None:
    ints = ("num_layers", "num_experts", "top_k", "num_shared_experts", "hidden_size",
            "expert_intermediate_size", "shared_expert_intermediate_size")
    for name in ints:
        value = getattr(cfg, name)
        if not isinstance(value, int) or isinstance(value, bool) or value < 0:
            raise TraceError(f"model_config.{name} must be a non-negative integer, got {value!r}")
    if cfg.architecture not in ARCHITECTURES:
        raise TraceError(f"model_config.architecture {cfg.architecture!r} is not one of {', '.join(ARCHITECTURES)}")
    if cfg.dtype not in DTYPES:
        raise TraceError(f"model_config.dtype {cfg.dtype!r} is not one of {', '.join(DTYPES)}")
    if cfg.num_layers < 1 or cfg.hidden_size < 1 or cfg.expert_intermediate_size < 1:
        raise TraceError("model_config.num_layers, hidden_size and expert_intermediate_size must be >= 1")
    if not 1 <= cfg.top_k <= cfg.num_experts:
        raise TraceError(f"model_config.top_k {cfg.top_k} must be in [1, num_experts={cfg.num_experts}]")
    if cfg.num_experts > np.iinfo(np.int16).max:
        raise TraceError(f"model_config.num_experts {cfg.num_experts} exceeds int16 expert ids")
    idx = cfg.moe_layer_indices
    if not isinstance(idx, tuple) or not idx or not all(isinstance(i, int) for i in idx):
        raise TraceError("model_config.moe_layer_indices must be a non-empty tuple of integers")
    if list(idx) != sorted(set(idx)) or idx[0] < 0 or idx[-1] >= cfg.num_layers:
        raise TraceError(f"model_config.moe_layer_indices must be strictly ascending in [0, num_layers="
                         f"{cfg.num_layers}), got {list(idx)}")


def _validate_shapes(trace: Trace, cfg: TraceModelConfig) -> dict[str, int]:
    dims: dict[str, int] = {"L": len(cfg.moe_layer_indices), "k": cfg.top_k, "E": cfg.num_experts,
                            "H": cfg.hidden_size}
    topk = trace.topk_ids
    if not isinstance(topk, np.ndarray) or topk.ndim != 3:
        raise TraceError(f"tensor topk_ids must be a 3-d array [T, L, k], got shape {getattr(topk, 'shape', None)}")
    dims["T"] = int(topk.shape[0])
    if dims["T"] == 0:
        raise TraceError("trace has no tokens (T = 0)")
    if trace.lookahead_logits is not None:
        if not isinstance(trace.lookahead_logits, np.ndarray) or trace.lookahead_logits.ndim != 4:
            raise TraceError("tensor lookahead_logits must be a 4-d array [D, T, L, E]")
        dims["D"] = int(trace.lookahead_logits.shape[0])
        if dims["D"] < 1:
            raise TraceError("tensor lookahead_logits has depth D = 0; leave it out instead")
    for name, (dtype, letters) in {**REQUIRED_TENSORS, **OPTIONAL_TENSORS}.items():
        array = getattr(trace, name)
        if array is None:
            if name in REQUIRED_TENSORS:
                raise TraceError(f"required tensor {name} is missing")
            continue
        if not isinstance(array, np.ndarray):
            raise TraceError(f"tensor {name} must be a numpy array, got {type(array).__name__}")
        if array.dtype != dtype:
            raise TraceError(f"tensor {name} has dtype {array.dtype}, expected {dtype.name}")
        expected = tuple(dims[c] for c in letters)
        if tuple(array.shape) != expected:
            legend = ", ".join(f"{c}={dims[c]}" for c in letters)
            raise TraceError(f"tensor {name} has shape {list(array.shape)}, expected "
                             f"[{', '.join(letters)}] = {list(expected)} ({legend})")
    return dims


def _all_finite(array: np.ndarray, chunk_elements: int = 1 << 16) -> bool:
    """np.isfinite(array).all(), in chunks that stay in cache (a GB-sized memory map needs no GB-sized
    temporary). float16 is checked on its bits: a value is nan or inf exactly when its five exponent bits
    are all set, i.e. its bits without the sign are >= 0x7C00 (numpy's isfinite on float16 converts every
    value to float32 first, ~4x slower)."""
    flat = array.reshape(-1)
    if flat.dtype == np.float16:
        bits = flat.view(np.uint16)
        scratch = np.empty(min(chunk_elements, bits.size), np.uint16)
        for i in range(0, bits.size, chunk_elements):
            chunk = bits[i:i + chunk_elements]
            if np.bitwise_and(chunk, 0x7FFF, out=scratch[:chunk.size]).max() >= 0x7C00:
                return False
        return True
    return all(np.isfinite(flat[i:i + chunk_elements]).all() for i in range(0, flat.size, chunk_elements))


def _validate_values(trace: Trace, dims: dict[str, int]) -> None:
    ids = trace.topk_ids
    lo, hi = int(ids.min()), int(ids.max())
    if lo < 0 or hi >= dims["E"]:
        bad = np.argwhere((ids < 0) | (ids >= dims["E"]))[0]
        raise TraceError(f"tensor topk_ids has expert id {int(ids[tuple(bad)])} at token {bad[0]}, "
                         f"MoE layer {bad[1]}, outside [0, {dims['E']})")
    if dims["k"] > 1:
        s = np.sort(ids, axis=2)
        dup = np.argwhere(s[:, :, 1:] == s[:, :, :-1])
        if dup.size:
            raise TraceError(f"tensor topk_ids repeats an expert within one token's top-k (token {dup[0][0]}, "
                             f"MoE layer {dup[0][1]})")
    for name in ("topk_weights", "router_logits", "lookahead_logits", "gate_inputs"):
        array = getattr(trace, name)
        if array is not None and not _all_finite(array):
            raise TraceError(f"tensor {name} has non-finite values (nan or inf)")
    if int(trace.token_ids.min()) < -1:
        raise TraceError("tensor token_ids has values below -1 (use -1 for unknown tokens)")
    flags = trace.is_prefill
    if int(flags.max()) > 1:
        raise TraceError("tensor is_prefill must hold only 0 and 1")
    seq = np.asarray(trace.seq_ids)
    pos = np.asarray(trace.positions)
    if int(seq.min()) < 0:
        raise TraceError("tensor seq_ids has negative values")
    slices = trace.sequence_slices()
    run_ids = [int(seq[s.start]) for s in slices]
    if len(set(run_ids)) != len(run_ids):
        repeated = next(i for i in run_ids if run_ids.count(i) > 1)
        raise TraceError(f"tensor seq_ids: sequence {repeated} is split into several runs; tokens must be "
                         "stored sequence by sequence")
    if int(pos.min()) < 0:
        raise TraceError("tensor positions has negative values")
    same_seq = seq[1:] == seq[:-1]
    gap = np.flatnonzero(same_seq & (pos[1:] != pos[:-1] + 1))
    if gap.size:
        t = int(gap[0]) + 1
        raise TraceError(f"tensor positions is not contiguous within sequence {int(seq[t])}: token {t} has "
                         f"position {int(pos[t])} after {int(pos[t - 1])}")
    back = np.flatnonzero(same_seq & (flags[1:] > flags[:-1]))
    if back.size:
        t = int(back[0]) + 1
        raise TraceError(f"tensor is_prefill: sequence {int(seq[t])} has a prefill position ({int(pos[t])}) "
                         "after a decode position; prefill must come first")


# --------------------------------------------------------------------------------------------------------
# writing


def _metadata(trace: Trace) -> dict[str, str]:
    meta = {
        "format": FORMAT_NAME,
        "version": str(FORMAT_VERSION),
        "model": trace.model,
        "model_config": json.dumps(trace.model_config.to_dict(), sort_keys=True),
        "source": json.dumps(trace.source, sort_keys=True),
        "prompts": json.dumps(trace.prompts, sort_keys=True),
        "created": trace.created,
    }
    if trace.hf_config is not None:
        meta["hf_config"] = json.dumps(trace.hf_config, sort_keys=True)
    return meta


def write_trace(trace: Trace, path: str | os.PathLike[str]) -> None:
    """Validate `trace` and write it atomically to `path` as a safetensors file."""
    validate_trace(trace)
    arrays = trace.tensors()
    write_safetensors(path, {name: arrays[name] for name in _LAYOUT_ORDER if name in arrays}, _metadata(trace))


def write_safetensors(path: str | os.PathLike[str], arrays: dict[str, np.ndarray], metadata: dict[str, str]) -> None:
    """Write `arrays` (in this order) and string `metadata` atomically to `path` as a safetensors file whose
    bytes depend only on them, the metadata in the given order (the safetensors library writes it in hash map
    order, which differs from run to run)."""
    arrays = {name: np.ascontiguousarray(a) for name, a in arrays.items()}
    header: dict[str, Any] = {"__metadata__": dict(metadata)}
    offset = 0
    for name, array in arrays.items():
        header[name] = {"dtype": _DTYPE_CODES[array.dtype], "shape": list(array.shape),
                        "data_offsets": [offset, offset + array.nbytes]}
        offset += array.nbytes
    header_bytes = json.dumps(header, separators=(",", ":")).encode()
    header_bytes += b" " * (-len(header_bytes) % 8)  # data starts 8-aligned, as the spec's writer does
    with atomic_output(path) as tmp, open(tmp, "wb") as f:
        f.write(struct.pack("<Q", len(header_bytes)))
        f.write(header_bytes)
        for array in arrays.values():
            f.write(array.reshape(-1).view(np.uint8).data)


# --------------------------------------------------------------------------------------------------------
# reading


class SafetensorsHeaderError(ValueError):
    """A file whose safetensors header cannot be read; the message says why (callers add the file and what
    to do)."""


def parse_safetensors_header(path: Path) -> tuple[dict[str, Any], bytes, int, int]:
    """(header JSON object, its raw bytes, data start offset, file size in bytes) of a safetensors file; the
    one header reader of traces and checkpoints. SafetensorsHeaderError when it is not one (OSError as open
    raises it)."""
    size = path.stat().st_size
    with open(path, "rb") as f:
        head = f.read(8)
        if len(head) < 8:
            raise SafetensorsHeaderError(f"only {size} bytes")
        (n,) = struct.unpack("<Q", head)
        if n > _MAX_HEADER_BYTES or 8 + n > size:
            raise SafetensorsHeaderError(f"header length {n} does not fit the {size}-byte file: truncated, or "
                                         "another kind of file")
        raw = f.read(n)
    try:
        header = json.loads(raw.decode("utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError):
        raise SafetensorsHeaderError("header is not JSON") from None
    if not isinstance(header, dict):
        raise SafetensorsHeaderError("header is not a JSON object")
    return header, raw, 8 + n, size


def _read_header(path: Path) -> tuple[dict[str, Any], int, int]:
    """Parse a trace's safetensors header; returns (header, data start offset, file size in bytes)."""
    if path.stat().st_size == 0:
        raise TraceError(f"{path}: file is empty, not a fatesim trace")
    try:
        header, _, data_start, size = parse_safetensors_header(path)
    except SafetensorsHeaderError as error:
        raise TraceError(f"{path}: not a safetensors file ({error})") from None
    return header, data_start, size


def _check_identity(path: Path, meta: Any) -> dict[str, str]:
    if not isinstance(meta, dict) or "format" not in meta:
        raise TraceError(f"{path}: a safetensors file without fatesim metadata, not a fatesim trace "
                         "(import routing logs with `fatesim trace import`)")
    if meta["format"] != FORMAT_NAME:
        raise TraceError(f"{path}: format is {meta['format']!r}, expected {FORMAT_NAME!r}")
    version = meta.get("version")
    supported = ", ".join(str(v) for v in SUPPORTED_VERSIONS)
    if version not in [str(v) for v in SUPPORTED_VERSIONS]:
        raise TraceError(f"{path}: trace format version {version!r} is not supported; this fatesim reads "
                         f"version {supported} (re-record or re-import the trace)")
    for key in ("model", "model_config", "source", "prompts", "created"):
        if key not in meta:
            raise TraceError(f"{path}: header metadata lacks {key!r}")
    return meta


def _json_field(path: Path, meta: dict[str, str], key: str) -> Any:
    try:
        return json.loads(meta[key])
    except (TypeError, json.JSONDecodeError):
        raise TraceError(f"{path}: header metadata {key!r} is not valid JSON") from None


def _load_arrays(path: Path, header: dict[str, Any], data_start: int, size: int,
                 mmap: bool) -> dict[str, np.ndarray]:
    known = {**REQUIRED_TENSORS, **OPTIONAL_TENSORS}
    entries = {name: e for name, e in header.items() if name != "__metadata__"}
    unknown = sorted(set(entries) - set(known))
    if unknown:
        raise TraceError(f"{path}: unknown tensor(s) {', '.join(unknown)}; format v1 has {', '.join(known)}")
    for name in REQUIRED_TENSORS:
        if name not in entries:
            raise TraceError(f"{path}: required tensor {name} is missing")
    buffer = np.memmap(path, dtype=np.uint8, mode="r") if mmap else np.fromfile(path, dtype=np.uint8)
    arrays: dict[str, np.ndarray] = {}
    for name, entry in entries.items():
        try:
            dtype = _SAFETENSORS_DTYPES[entry["dtype"]]
            shape = tuple(int(s) for s in entry["shape"])
            begin, end = (int(o) for o in entry["data_offsets"])
        except (KeyError, TypeError, ValueError):
            raise TraceError(f"{path}: tensor {name} has a malformed header entry {entry!r}") from None
        if dtype != known[name][0]:
            raise TraceError(f"{path}: tensor {name} has dtype {entry['dtype']}, expected "
                             f"{_DTYPE_CODES[known[name][0]]}")
        nbytes = int(np.prod(shape, dtype=np.int64)) * dtype.itemsize
        if end - begin != nbytes or begin < 0:
            raise TraceError(f"{path}: tensor {name} has {end - begin} bytes for shape {list(shape)}, "
                             f"expected {nbytes}")
        if data_start + end > size:
            raise TraceError(f"{path}: file is truncated: tensor {name} needs bytes up to "
                             f"{data_start + end} but the file has {size}")
        arrays[name] = buffer[data_start + begin:data_start + end].view(dtype).reshape(shape)
    return arrays


def read_trace(path: str | os.PathLike[str], *, mmap: bool = True) -> Trace:
    """Read and validate a trace file; arrays are read-only memory maps unless mmap=False.

    Raises TraceError (a UserError) naming the file, the tensor and the problem.
    """
    path = Path(path)
    if not path.exists():
        raise TraceError(f"{path}: no such file")
    if path.is_dir():
        raise TraceError(f"{path}: is a folder, expected a trace file (.safetensors)")
    header, data_start, size = _read_header(path)
    meta = _check_identity(path, header.get("__metadata__"))
    arrays = _load_arrays(path, header, data_start, size, mmap)
    try:
        trace = Trace(
            model=meta["model"],
            model_config=TraceModelConfig.from_dict(_json_field(path, meta, "model_config")),
            source=_json_field(path, meta, "source"),
            prompts=_json_field(path, meta, "prompts"),
            created=meta["created"],
            hf_config=_json_field(path, meta, "hf_config") if "hf_config" in meta else None,
            **arrays,
        )
        validate_trace(trace)
    except TraceError as error:
        if str(error).startswith(f"{path}:"):
            raise
        raise TraceError(f"{path}: {error}") from None
    return trace
