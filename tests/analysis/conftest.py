"""Synthetic traces with known structure for the analysis tests."""

from __future__ import annotations

import numpy as np
import pytest

from traces.format import Trace, TraceModelConfig


def make_structured_trace(seed: int = 0, token_seed: int | None = None, num_sequences: int = 8, seq_len: int = 40, num_layers: int = 4,
                          num_experts: int = 16, top_k: int = 2, hidden: int = 32,
                          gate_noise: float = 0.5) -> Trace:
    """A trace whose routing is a function of the gate inputs.

    Gate inputs x[t, l] ~ N(0, 1)^H; layer j routes top-k of (x[t, max(j-1, 0)] @ A_j) — the experts of
    layer j+1 are a linear function of layer j's gate input, which a learned estimator can find and
    popularity cannot. Look-ahead logits (D=1) are that same product plus noise (`gate_noise`).
    `seed` fixes the router matrices (the model), `token_seed` the gate inputs (the prompts; default
    `seed`): two traces with one seed and different token seeds come from the same model.
    First half of each sequence is prefill.
    """
    rng = np.random.default_rng(seed)  # the "model": router matrices
    a = rng.standard_normal((num_layers, hidden, num_experts)).astype(np.float32)  # [L, H, E]
    rng = np.random.default_rng(seed if token_seed is None else token_seed)  # the "prompts"
    t = num_sequences * seq_len
    x = rng.standard_normal((t, num_layers, hidden)).astype(np.float32)  # [T, L, H]
    logits = np.empty((t, num_layers, num_experts), dtype=np.float32)
    for j in range(num_layers):
        logits[:, j] = x[:, max(j - 1, 0)] @ a[j]
    topk = np.argsort(-logits, axis=2)[:, :, :top_k].astype(np.int16)
    weights = np.full(topk.shape, 1.0 / top_k, dtype=np.float16)
    look = np.zeros((1, t, num_layers, num_experts), dtype=np.float32)
    look[0, :, : num_layers - 1] = logits[:, 1:] + gate_noise * rng.standard_normal(
        (t, num_layers - 1, num_experts))
    cfg = TraceModelConfig(architecture="qwen2_moe", num_layers=num_layers,
                           moe_layer_indices=tuple(range(num_layers)), num_experts=num_experts, top_k=top_k,
                           num_shared_experts=0, hidden_size=hidden, expert_intermediate_size=64,
                           shared_expert_intermediate_size=0, dtype="bfloat16")
    seq = np.repeat(np.arange(num_sequences, dtype=np.int32), seq_len)
    pos = np.tile(np.arange(seq_len, dtype=np.int32), num_sequences)
    return Trace(model="synthetic-structured", model_config=cfg, source={"kind": "recorded", "note": "test"},
                 prompts={}, created="2026-01-01T00:00:00Z", token_ids=np.full(t, -1, dtype=np.int32),
                 seq_ids=seq, positions=pos, is_prefill=(pos < seq_len // 2).astype(np.uint8), topk_ids=topk,
                 topk_weights=weights, router_logits=None, lookahead_logits=look.astype(np.float16),
                 gate_inputs=x.astype(np.float16))


@pytest.fixture
def structured_trace() -> Trace:
    return make_structured_trace()
