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


def test_cuda_streamed_run_holds_non_experts_slots_and_kv_only(tmp_path) -> None:
    """Issue 10 item 6: on a GPU the device holds the non-expert weights, the expert slots and the KV cache
    (plus activations and cuBLAS's workspace), not the routed experts: between a 10% and a 90% budget the
    peak device memory grows by the expert slots the budget adds (it would not move if every expert were
    on the device), and it is reported in the metrics JSON."""
    import json

    from realrun.session import run_realrun

    prompts = tmp_path / "p.jsonl"
    prompts.write_text("".join(json.dumps({"token_ids": ids}) + "\n" for ids in PROMPTS.token_ids))
    small, large = (run_realrun("mini-qwen-moe", prompts, "lru", budget, device="cuda", store="ram",
                                max_new_tokens=4, dtype="bfloat16") for budget in ("10%", "90%"))
    slots = large["expert_budget_bytes"] - small["expert_budget_bytes"]
    grown = large["peak_device_bytes"] - small["peak_device_bytes"]
    assert 0.8 * slots <= grown <= 1.2 * slots
    assert small["peak_host_rss_bytes"] > 0
