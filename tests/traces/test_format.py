"""Trace format v1: exact round trip, compatibility with the safetensors library, and one test per
validation failure, each checking that the message names the file, the tensor and the problem."""

from __future__ import annotations

import dataclasses
import json
import struct
from pathlib import Path

import numpy as np
import pytest
from safetensors import safe_open
from safetensors.numpy import save_file

from traces.errors import UserError
from traces.format import (
    FORMAT_NAME,
    FORMAT_VERSION,
    Trace,
    TraceError,
    TraceModelConfig,
    read_trace,
    validate_trace,
    write_trace,
)

CFG = TraceModelConfig(architecture="qwen2_moe", num_layers=4, moe_layer_indices=(1, 2, 3), num_experts=8,
                       top_k=2, num_shared_experts=1, hidden_size=16, expert_intermediate_size=32,
                       shared_expert_intermediate_size=64, dtype="bfloat16")


def make_trace(rng: np.random.Generator, *, optional: bool = True, lengths=(5, 7), prompt=3) -> Trace:
    """Two sequences, prefill positions first; random distinct top-k ids per (token, layer)."""
    T, L, k, E, H, D = sum(lengths), 3, 2, 8, 16, 2
    seq = np.concatenate([np.full(n, i, np.int32) for i, n in enumerate(lengths)])
    pos = np.concatenate([np.arange(n, dtype=np.int32) for n in lengths])
    ids = np.argsort(rng.random((T, L, E)), axis=2)[:, :, :k].astype(np.int16)
    return Trace(
        model="test/model", model_config=CFG,
        source={"kind": "recorded", "assumptions": ["synthetic"]}, prompts={"name": "p", "sha256": "0" * 64},
        created="2026-11-23T04:00:00Z",
        token_ids=rng.integers(-1, 1000, T).astype(np.int32), seq_ids=seq, positions=pos,
        is_prefill=(pos < prompt).astype(np.uint8), topk_ids=ids,
        topk_weights=rng.random((T, L, k)).astype(np.float16),
        router_logits=rng.standard_normal((T, L, E)).astype(np.float16) if optional else None,
        lookahead_logits=rng.standard_normal((D, T, L, E)).astype(np.float16) if optional else None,
        gate_inputs=rng.standard_normal((T, L, H)).astype(np.float16) if optional else None,
        hf_config={"model_type": "qwen2_moe", "num_experts": 8} if optional else None,
    )


def assert_same(a: Trace, b: Trace) -> None:
    for field in dataclasses.fields(Trace):
        x, y = getattr(a, field.name), getattr(b, field.name)
        if isinstance(x, np.ndarray) or isinstance(y, np.ndarray):
            assert x.dtype == y.dtype and x.shape == y.shape, field.name
            assert np.array_equal(x, y), field.name
        else:
            assert x == y, field.name


@pytest.mark.parametrize("mmap", [True, False])
@pytest.mark.parametrize("optional", [True, False])
def test_round_trip_is_exact(tmp_path: Path, rng, mmap: bool, optional: bool) -> None:
    """write_trace then read_trace gives back every field and every tensor bit for bit."""
    trace = make_trace(rng, optional=optional)
    path = tmp_path / "t.safetensors"
    write_trace(trace, path)
    back = read_trace(path, mmap=mmap)
    assert_same(trace, back)
    assert back.content_hash() == trace.content_hash()
    if mmap:
        assert not back.topk_ids.flags.writeable


def test_properties(rng) -> None:
    """Counts follow the tensors: T, L, k, E, D, sequences, prefill and decode tokens, slices."""
    trace = make_trace(rng)
    assert (trace.num_tokens, trace.num_moe_layers, trace.top_k, trace.num_experts) == (12, 3, 2, 8)
    assert trace.lookahead_depth == 2 and make_trace(rng, optional=False).lookahead_depth == 0
    assert trace.num_sequences == 2
    assert trace.sequence_slices() == [slice(0, 5), slice(5, 12)]
    assert (trace.num_prefill_tokens, trace.num_decode_tokens) == (6, 6)
    assert trace.optional_tensors() == ["router_logits", "lookahead_logits", "gate_inputs"]


def test_content_hash_ignores_provenance_but_not_routing(rng) -> None:
    """The hash covers tensors and model_config only: a new `created` keeps it, one changed id does not."""
    trace = make_trace(rng)
    same = dataclasses.replace(trace, created="2030-01-01T00:00:00Z", source={"kind": "imported"})
    assert same.content_hash() == trace.content_hash()
    ids = trace.topk_ids.copy()
    ids[0, 0, 0] = (ids[0, 0, 0] + 1) % 8 if (ids[0, 0, 0] + 1) % 8 != ids[0, 0, 1] else (ids[0, 0, 0] + 2) % 8
    assert dataclasses.replace(trace, topk_ids=ids).content_hash() != trace.content_hash()
    other_cfg = dataclasses.replace(CFG, dtype="float16")
    assert dataclasses.replace(trace, model_config=other_cfg).content_hash() != trace.content_hash()


def test_file_is_plain_safetensors(tmp_path: Path, rng) -> None:
    """The safetensors library reads our files (tensors and string metadata)."""
    trace = make_trace(rng)
    path = tmp_path / "t.safetensors"
    write_trace(trace, path)
    with safe_open(str(path), framework="numpy") as f:
        meta = f.metadata()
        assert np.array_equal(f.get_tensor("topk_ids"), trace.topk_ids)
        assert np.array_equal(f.get_tensor("gate_inputs"), trace.gate_inputs)
    assert meta["format"] == FORMAT_NAME and meta["version"] == str(FORMAT_VERSION)
    assert json.loads(meta["model_config"])["moe_layer_indices"] == [1, 2, 3]


def test_reads_file_written_by_safetensors_library(tmp_path: Path, rng) -> None:
    """A file written by safetensors.numpy.save_file with our metadata reads back equal."""
    trace = make_trace(rng, optional=False)
    path = tmp_path / "lib.safetensors"
    meta = {"format": FORMAT_NAME, "version": "1", "model": trace.model,
            "model_config": json.dumps(trace.model_config.to_dict()), "source": json.dumps(trace.source),
            "prompts": json.dumps(trace.prompts), "created": trace.created}
    save_file(trace.tensors(), str(path), metadata=meta)
    assert_same(trace, read_trace(path))


# ---- failures of the file as a whole ---------------------------------------------------------------------


def expect_error(path: Path, *fragments: str) -> str:
    with pytest.raises(TraceError) as info:
        read_trace(path)
    message = str(info.value)
    assert "\n" not in message
    assert str(path) in message
    for fragment in fragments:
        assert fragment in message, message
    assert isinstance(info.value, UserError)
    return message


def test_empty_file(tmp_path: Path) -> None:
    """A zero-byte file is reported as empty."""
    path = tmp_path / "empty.safetensors"
    path.write_bytes(b"")
    expect_error(path, "empty")


def test_png_renamed(tmp_path: Path) -> None:
    """A PNG with a .safetensors name is 'not a safetensors file'."""
    path = tmp_path / "picture.safetensors"
    path.write_bytes(b"\x89PNG\r\n\x1a\n" + b"\x00\x00\x00\rIHDR" + bytes(200))
    expect_error(path, "not a safetensors file")


def test_truncated_file(tmp_path: Path, rng) -> None:
    """Cutting the tail off a trace names the tensor whose bytes are missing."""
    path = tmp_path / "t.safetensors"
    write_trace(make_trace(rng), path)
    data = path.read_bytes()
    path.write_bytes(data[:-10])
    expect_error(path, "truncated", "is_prefill")
    path.write_bytes(data[:20])
    expect_error(path, "not a safetensors file")


def test_header_not_json(tmp_path: Path) -> None:
    """A plausible length followed by garbage is not a safetensors file."""
    path = tmp_path / "junk.safetensors"
    path.write_bytes(struct.pack("<Q", 16) + b"\xff" * 16 + bytes(8))
    expect_error(path, "not a safetensors file", "not JSON")


def test_missing_file_and_folder(tmp_path: Path) -> None:
    """A path that does not exist, or a folder, is a one-line error too."""
    expect_error(tmp_path / "nope.safetensors", "no such file")
    expect_error(tmp_path, "folder")


def _rewrite_meta(path: Path, **changes: str | None) -> None:
    """Rewrite header metadata in place (same tensors), through the safetensors library."""
    with safe_open(str(path), framework="numpy") as f:
        meta = dict(f.metadata())
        tensors = {name: f.get_tensor(name) for name in f.keys()}
    for key, value in changes.items():
        if value is None:
            meta.pop(key)
        else:
            meta[key] = value
    save_file(tensors, str(path), metadata=meta)


def test_wrong_version(tmp_path: Path, rng) -> None:
    """A future version is refused, saying which versions this build reads."""
    path = tmp_path / "t.safetensors"
    write_trace(make_trace(rng), path)
    _rewrite_meta(path, version="2")
    expect_error(path, "version '2' is not supported", "reads version 1")


def test_wrong_format_name(tmp_path: Path, rng) -> None:
    """Another format name is refused with both names."""
    path = tmp_path / "t.safetensors"
    write_trace(make_trace(rng), path)
    _rewrite_meta(path, format="other-trace")
    expect_error(path, "'other-trace'", FORMAT_NAME)


def test_plain_safetensors_without_metadata(tmp_path: Path) -> None:
    """A model checkpoint (safetensors without our metadata) is not a trace."""
    path = tmp_path / "weights.safetensors"
    save_file({"w": np.zeros((2, 2), np.float32)}, str(path))
    expect_error(path, "without fatesim metadata")


def test_missing_required_tensor_and_wrong_dtype(tmp_path: Path, rng) -> None:
    """A missing required tensor, an unknown tensor and a wrong dtype are each named."""
    trace = make_trace(rng, optional=False)
    meta = {"format": FORMAT_NAME, "version": "1", "model": "m",
            "model_config": json.dumps(CFG.to_dict()), "source": '{"kind": "imported"}', "prompts": "{}",
            "created": "x"}
    path = tmp_path / "t.safetensors"
    tensors = trace.tensors()
    save_file({n: a for n, a in tensors.items() if n != "positions"}, str(path), metadata=meta)
    expect_error(path, "required tensor positions is missing")
    save_file({**tensors, "extra": np.zeros(3, np.int32)}, str(path), metadata=meta)
    expect_error(path, "unknown tensor(s) extra")
    save_file({**tensors, "topk_ids": tensors["topk_ids"].astype(np.int32)}, str(path), metadata=meta)
    expect_error(path, "tensor topk_ids has dtype I32, expected I16")


# ---- failures of the content (checked on write and on read) -----------------------------------------------


def corrupt_and_read(tmp_path: Path, trace: Trace) -> str:
    """Write tensors that break an invariant (bypassing write_trace's check), then read them back."""
    path = tmp_path / "bad.safetensors"
    from traces.format import _metadata  # the exact header write_trace would produce

    save_file({n: np.ascontiguousarray(a) for n, a in trace.tensors().items()}, str(path),
              metadata=_metadata(trace))
    return expect_error(path)


def test_id_out_of_range(tmp_path: Path, rng) -> None:
    """An expert id >= E is reported with its token and layer."""
    trace = make_trace(rng)
    ids = trace.topk_ids.copy()
    ids[4, 1, 1] = 8
    bad = dataclasses.replace(trace, topk_ids=ids)
    message = corrupt_and_read(tmp_path, bad)
    assert "topk_ids" in message and "expert id 8 at token 4, MoE layer 1, outside [0, 8)" in message
    with pytest.raises(TraceError, match="outside"):
        write_trace(bad, tmp_path / "never.safetensors")


def test_shape_mismatch(tmp_path: Path, rng) -> None:
    """topk_weights with the wrong k, router_logits with the wrong E, gate_inputs with the wrong H."""
    trace = make_trace(rng)
    for name, shape in [("topk_weights", (12, 3, 3)), ("router_logits", (12, 3, 7)), ("gate_inputs", (12, 3, 8)),
                        ("seq_ids", (11,))]:
        dtype = getattr(trace, name).dtype
        bad = dataclasses.replace(trace, **{name: np.zeros(shape, dtype)})
        message = corrupt_and_read(tmp_path, bad)
        assert f"tensor {name} has shape {list(shape)}" in message


def test_duplicate_expert_in_topk(rng) -> None:
    """The same expert twice in one token's top-k is refused."""
    trace = make_trace(rng)
    ids = trace.topk_ids.copy()
    ids[2, 0, 1] = ids[2, 0, 0]
    with pytest.raises(TraceError, match="repeats an expert .*token 2, MoE layer 0"):
        validate_trace(dataclasses.replace(trace, topk_ids=ids))


def test_positions_and_sequences(rng) -> None:
    """Gaps in positions, a sequence split in two runs, prefill after decode and bad flags are refused."""
    trace = make_trace(rng)
    pos = trace.positions.copy()
    pos[3] = 9
    with pytest.raises(TraceError, match="positions is not contiguous within sequence 0: token 3"):
        validate_trace(dataclasses.replace(trace, positions=pos))
    seq = trace.seq_ids.copy()
    seq[8:] = 0
    pos = np.concatenate([np.arange(5), np.arange(3), np.arange(4)]).astype(np.int32)
    with pytest.raises(TraceError, match="sequence 0 is split"):
        validate_trace(dataclasses.replace(trace, seq_ids=seq, positions=pos))
    flags = trace.is_prefill.copy()
    flags[4] = 1
    with pytest.raises(TraceError, match="prefill position \\(4\\) after a decode position"):
        validate_trace(dataclasses.replace(trace, is_prefill=flags))
    flags = trace.is_prefill.copy()
    flags[0] = 2
    with pytest.raises(TraceError, match="only 0 and 1"):
        validate_trace(dataclasses.replace(trace, is_prefill=flags))


def test_positions_may_start_late(rng) -> None:
    """A sequence may start at its first recorded position (e.g. a decode-only import)."""
    trace = make_trace(rng)
    validate_trace(dataclasses.replace(trace, positions=trace.positions + 40,
                                       is_prefill=np.zeros_like(trace.is_prefill)))


def test_model_config_checks(rng) -> None:
    """top_k > E, unsorted MoE layer indices and unknown architectures are refused."""
    trace = make_trace(rng)
    for change, pattern in [({"moe_layer_indices": (3, 2, 1)}, "strictly ascending"),
                            ({"moe_layer_indices": (1, 2, 9)}, "strictly ascending"),
                            ({"architecture": "gpt2"}, "architecture 'gpt2'"),
                            ({"dtype": "int8"}, "dtype 'int8'")]:
        with pytest.raises(TraceError, match=pattern):
            validate_trace(dataclasses.replace(trace, model_config=dataclasses.replace(CFG, **change)))
    with pytest.raises(TraceError, match="model_config lacks top_k"):
        TraceModelConfig.from_dict({k: v for k, v in CFG.to_dict().items() if k != "top_k"})


def test_failed_write_leaves_no_file(tmp_path: Path, rng, monkeypatch) -> None:
    """A trace that fails validation, or a write that dies midway, leaves no output or temp file."""
    trace = make_trace(rng)
    ids = trace.topk_ids.copy()
    ids[0, 0, 0] = -3
    target = tmp_path / "out.safetensors"
    with pytest.raises(TraceError):
        write_trace(dataclasses.replace(trace, topk_ids=ids), target)
    assert list(tmp_path.iterdir()) == []

    import traces.format as fmt

    class DiskFull:
        """A file whose third write (the first tensor's bytes, after length and header) fails."""

        def __init__(self, path, mode):
            self.file = open(path, mode)  # noqa: SIM115
            self.writes = 0

        def __enter__(self):
            return self

        def __exit__(self, *exc):
            self.file.close()

        def write(self, data):
            self.writes += 1
            if self.writes == 3:
                raise OSError("disk full")
            return self.file.write(data)

    monkeypatch.setattr(fmt, "open", DiskFull, raising=False)
    with pytest.raises(OSError, match="disk full"):
        write_trace(trace, target)
    assert list(tmp_path.iterdir()) == []


def test_write_into_missing_folder(tmp_path: Path, rng) -> None:
    """Writing into a folder that does not exist is a UserError, not a traceback."""
    with pytest.raises(UserError, match="does not exist"):
        write_trace(make_trace(rng), tmp_path / "no" / "t.safetensors")


def test_non_finite_values_and_token_ids(rng) -> None:
    """NaN gate weights, inf look-ahead logits and token ids below -1 are refused."""
    trace = make_trace(rng)
    weights = trace.topk_weights.copy()
    weights[1, 2, 0] = np.nan
    with pytest.raises(TraceError, match="tensor topk_weights has non-finite values"):
        validate_trace(dataclasses.replace(trace, topk_weights=weights))
    look = trace.lookahead_logits.copy()
    look[1, 0, 0, 0] = np.inf
    with pytest.raises(TraceError, match="tensor lookahead_logits has non-finite values"):
        validate_trace(dataclasses.replace(trace, lookahead_logits=look))
    tokens = trace.token_ids.copy()
    tokens[0] = -2
    with pytest.raises(TraceError, match="token_ids has values below -1"):
        validate_trace(dataclasses.replace(trace, token_ids=tokens))
