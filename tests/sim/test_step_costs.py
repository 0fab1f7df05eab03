"""Costs of a forward step outside the experts: the vocabulary head and the attention correction."""

from __future__ import annotations

import pytest

from sim.modelspec import get_model_spec


def test_lm_head_size_and_flops_from_the_config() -> None:
    """Qwen1.5-MoE: a 151,936 x 2,048 bf16 head (untied), 2 FLOPs per weight per position."""
    spec = get_model_spec("qwen1.5-moe-a2.7b")
    assert spec.lm_head_bytes == 151_936 * 2_048 * 2
    assert spec.lm_head_flops(1) == pytest.approx(2.0 * 151_936 * 2_048)
    assert spec.lm_head_flops(3) == pytest.approx(3 * spec.lm_head_flops(1))


def test_attention_includes_the_scaled_attention_and_a_share_of_the_head() -> None:
    """attention_s = overhead + attention (x its token_scale) + router + head_s / MoE layers, exactly."""
    from sim.costs import CostModel
    from sim.hardware import load_profile, profile_from_dict

    spec = get_model_spec("qwen1.5-moe-a2.7b")
    plain_hw = load_profile("rtx3090-bound")
    data = plain_hw.to_toml_dict()
    data["gpu"]["token_scale"] = {"tokens": [1, 16], "attention": [0.5, 2.0], "lm_head": [3.0, 3.0]}
    scaled_hw = profile_from_dict(data)
    plain, scaled = CostModel(spec, plain_hw), CostModel(spec, scaled_hw)
    gpu = plain_hw.gpu
    head = gpu.op_s(spec.lm_head_flops(1), spec.lm_head_bytes)
    assert plain.head_s() == pytest.approx(head) and scaled.head_s() == pytest.approx(3 * head)
    for tokens, context, factor in ((1, 100, 0.5), (16, 16, 2.0)):
        attn = gpu.op_s(spec.attention_flops(tokens, context), spec.attention_bytes(context))
        router = gpu.op_s(spec.router_flops(tokens), spec.router_params * spec.weight_bytes)
        assert plain.attention_s(tokens, context) == pytest.approx(
            plain_hw.layer_overhead_s + attn + router + head / 24)
        assert scaled.attention_s(tokens, context) == pytest.approx(
            plain_hw.layer_overhead_s + factor * attn + router + 3 * head / 24)
