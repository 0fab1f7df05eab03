"""The CUDA path: pinned host slow tier, copy stream, events. Skipped without a CUDA GPU."""

from __future__ import annotations

import copy

import pytest
import torch

from realrun.runner import greedy_generate
from realrun.session import run_offloaded
from sim.policies.presets import build_policy
from tests.realrun.conftest import NEW_TOKENS, PROMPTS, tiny_qwen

pytestmark = pytest.mark.cuda


@pytest.mark.parametrize("preset, overrides, store", [
    ("lod", {}, "ram"), ("lru", {}, "ram"), ("fate", {"precision": "bf16", "miss": "wait"}, "ram"), ("lru", {}, "disk"),
    ("cpu-exec", {}, "ram"),
])
def test_cuda_lossless_matches_plain_model(preset: str, overrides: dict, store: str) -> None:
    """On the GPU, a lossless run gives the plain model's tokens and logits (same kernels, same order)."""
    dev = torch.device("cuda")
    plain = tiny_qwen().to(dev)
    ref = greedy_generate(plain, PROMPTS.token_ids, NEW_TOKENS, dev, keep_logits=True)
    result, gen = run_offloaded(copy.deepcopy(plain), PROMPTS, model_name="tiny", policy=build_policy(preset, overrides),
                                memory_budget="50%", device=dev, store=store, max_new_tokens=NEW_TOKENS,
                                keep_logits=True)
    assert gen.generated == ref.generated
    for ours, theirs in zip(gen.logits, ref.logits, strict=True):
        torch.testing.assert_close(ours, theirs, rtol=0, atol=1e-5)


def test_cuda_quantised_fate_runs() -> None:
    """INT4/INT2 dequantisation on the device and prefetch on the copy stream, end to end."""
    dev = torch.device("cuda")
    result, gen = run_offloaded(tiny_qwen().to(dev), PROMPTS, model_name="tiny", policy=build_policy("fate"),
                                memory_budget="50%", device=dev, store="ram", max_new_tokens=NEW_TOKENS)
    assert result["bytes_transferred"]["total"] > 0
    assert all(len(g) == NEW_TOKENS for g in gen.generated)
