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
