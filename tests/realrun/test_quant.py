"""Packed experts: exact sizes (the simulator's contract) and the round trip against HQQ itself."""

from __future__ import annotations

import dataclasses

import pytest
import torch
from hqq.core.quantize import Quantizer

from realrun.quant import Dequantizer, expert_layout, pack_expert, raw_views
from sim.modelspec import PRECISIONS, get_model_spec, list_model_specs
from traces.errors import UserError


def _small_spec(dtype: str = "float32"):
    return dataclasses.replace(get_model_spec("qwen1.5-moe-a2.7b"), hidden_size=128, expert_intermediate_size=64,
                               dtype=dtype)


def _weights(spec, seed: int = 0) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    h, i = spec.hidden_size, spec.expert_intermediate_size
    return {"gate": torch.randn(i, h, generator=g), "up": torch.randn(i, h, generator=g),
            "down": torch.randn(h, i, generator=g)}


@pytest.mark.parametrize("model", list_model_specs())
@pytest.mark.parametrize("precision", list(PRECISIONS))
def test_layout_bytes_equal_simulator_bytes(model: str, precision: str) -> None:
    """The record realrun moves for one expert is exactly the simulator's expert_bytes, real shapes."""
    spec = get_model_spec(model)
    assert expert_layout(spec, precision).nbytes == spec.expert_bytes(precision)


@pytest.mark.parametrize("precision", list(PRECISIONS))
@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])
def test_packed_record_has_simulator_size(precision: str, dtype: str) -> None:
    """pack_expert returns exactly spec.expert_bytes(precision) bytes, for both model dtypes."""
    spec = _small_spec(dtype)
    record = pack_expert(_weights(spec), expert_layout(spec, precision), optimize=False)
    assert record.dtype == torch.uint8 and record.numel() == spec.expert_bytes(precision)


@pytest.mark.parametrize("precision", ["int8", "int4", "int2"])
def test_dequantized_equals_hqq_dequantize(precision: str) -> None:
    """Our in-place unpacking reproduces HQQ's own Quantizer.dequantize bit for bit."""
    spec = _small_spec()
    weights = _weights(spec, seed=1)
    layout = expert_layout(spec, precision)
    gate_up, down = Dequantizer(layout).unpack_into(pack_expert(weights, layout))
    prec = PRECISIONS[precision]
    for name, ours in (("gate", gate_up[:64]), ("up", gate_up[64:]), ("down", down)):
        codes, meta = Quantizer.quantize(weights[name], nbits=prec.bits, group_size=prec.group_size, axis=1,
                                         optimize=True, compute_dtype=torch.float32, device="cpu")
        meta["compute_dtype"] = torch.float32
        assert torch.equal(Quantizer.dequantize(codes, meta), ours), name


def test_quantisation_error_grows_as_bits_shrink() -> None:
    """int8 < int4 < int2 in mean absolute error, and all are far below the weights' scale."""
    spec = _small_spec()
    weights = _weights(spec, seed=2)
    errors = []
    for precision in ("int8", "int4", "int2"):
        layout = expert_layout(spec, precision)
        _, down = Dequantizer(layout).unpack_into(pack_expert(weights, layout))
        errors.append((down - weights["down"]).abs().mean().item())
    assert errors[0] < errors[1] < errors[2] < 0.5


def test_unquantised_record_round_trips_and_views_are_fused() -> None:
    """bf16 (model dtype) records are the raw weights; raw_views gives transformers' fused gate_up_proj."""
    spec = _small_spec()
    weights = _weights(spec, seed=3)
    layout = expert_layout(spec, "bf16")
    gate_up, down = raw_views(pack_expert(weights, layout), layout)
    assert torch.equal(gate_up, torch.cat([weights["gate"], weights["up"]]))
    assert torch.equal(down, weights["down"])


def test_unpackable_shape_is_a_user_error() -> None:
    """A matrix whose size is not a whole number of packed groups is refused with a UserError."""
    spec = dataclasses.replace(_small_spec(), hidden_size=100, expert_intermediate_size=20)
    with pytest.raises(UserError, match="cannot pack"):
        expert_layout(spec, "int2")


def test_tinygemm_int4_matches_hqq_dequantised_weights() -> None:
    """The CPU int4 kernel path computes the expert the HQQ codes describe (bf16 activations: close)."""
    from realrun.quant import Int4Matmuls

    spec = _small_spec()
    weights = _weights(spec, seed=4)
    tiny = expert_layout(spec, "int4", "tinygemm")
    assert tiny.nbytes == spec.expert_bytes("int4")
    record = pack_expert(weights, tiny)
    gate_up, down = Dequantizer(expert_layout(spec, "int4")).unpack_into(pack_expert(weights, expert_layout(spec, "int4")))
    x = torch.randn(3, spec.hidden_size, generator=torch.Generator().manual_seed(5))
    act = torch.nn.functional.silu
    g, u = torch.nn.functional.linear(x, gate_up).chunk(2, dim=-1)
    expected = torch.nn.functional.linear(act(g) * u, down)
    got = Int4Matmuls(tiny).forward(record, x, act)
    assert torch.allclose(got, expected, rtol=0.05, atol=0.05 * expected.abs().max().item())


def test_tinygemm_packing_is_int4_only() -> None:
    """Only int4 has a CPU kernel layout."""
    with pytest.raises(ValueError):
        expert_layout(_small_spec(), "int2", "tinygemm")
