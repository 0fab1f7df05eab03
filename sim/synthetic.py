"""Synthetic routing traces with the structure real MoE routing has, for tests and `python -m sim.bench`.

Per MoE layer, expert popularity follows a Zipf law; a token's router logits mix that popularity, a
per-sequence topic bias, the previous token's choice at the same layer (temporal locality) and noise.
Look-ahead logits (what a cross-layer predictor sees at layer l for layer l+d) are the true logits of
layer l+d plus noise of `lookahead_noise` standard deviations, so predictor accuracy is tunable.
Deterministic for a given seed.
"""

from __future__ import annotations

import numpy as np

from traces.format import Trace, TraceModelConfig, utc_now_iso


def synthetic_trace(*, num_layers: int = 24, num_experts: int = 60, top_k: int = 4, sequences: int = 2,
                    prompt_tokens: int = 32, decode_tokens: int = 500, lookahead_depth: int = 1,
                    lookahead_noise: float = 0.5, locality: float = 1.5, zipf: float = 1.0, seed: int = 0,
                    model: str = "qwen1.5-moe-a2.7b", hidden_size: int = 2048, expert_intermediate_size: int = 1408,
                    shared_expert_intermediate_size: int = 5632, architecture: str = "qwen2_moe") -> Trace:
    """A trace of `sequences` sequences, each `prompt_tokens` prefill then `decode_tokens` decode positions."""
    rng = np.random.default_rng(seed)
    per_seq = prompt_tokens + decode_tokens
    total = sequences * per_seq
    ranks = np.arange(1, num_experts + 1, dtype=np.float64)
    popularity = np.stack([np.log(1.0 / ranks ** zipf)[rng.permutation(num_experts)] for _ in range(num_layers)])
    logits = np.empty((total, num_layers, num_experts), dtype=np.float32)  # [T, L, E]
    topk = np.empty((total, num_layers, top_k), dtype=np.int16)  # [T, L, k]
    for s in range(sequences):
        topic = rng.normal(0.0, 1.0, size=(num_layers, num_experts))
        prev = np.zeros((num_layers, num_experts))
        for i in range(per_seq):
            t = s * per_seq + i
            z = popularity + topic + locality * prev + rng.gumbel(size=(num_layers, num_experts))
            logits[t] = z
            chosen = np.argpartition(-z, top_k - 1, axis=1)[:, :top_k]
            topk[t] = chosen
            prev = np.zeros((num_layers, num_experts))
            np.put_along_axis(prev, chosen, 1.0, axis=1)
    weights = np.full((total, num_layers, top_k), 1.0 / top_k, dtype=np.float16)
    lookahead = None
    if lookahead_depth:
        lookahead = np.zeros((lookahead_depth, total, num_layers, num_experts), dtype=np.float16)
        for d in range(1, lookahead_depth + 1):
            noisy = logits[:, d:, :] + lookahead_noise * rng.normal(size=logits[:, d:, :].shape)
            lookahead[d - 1, :, : num_layers - d, :] = noisy.astype(np.float16)
    seq_ids = np.repeat(np.arange(sequences, dtype=np.int32), per_seq)
    positions = np.tile(np.arange(per_seq, dtype=np.int32), sequences)
    is_prefill = np.tile((np.arange(per_seq) < prompt_tokens).astype(np.uint8), sequences)
    config = TraceModelConfig(
        architecture=architecture, num_layers=num_layers, moe_layer_indices=tuple(range(num_layers)),
        num_experts=num_experts, top_k=top_k, num_shared_experts=1 if shared_expert_intermediate_size else 0,
        hidden_size=hidden_size, expert_intermediate_size=expert_intermediate_size,
        shared_expert_intermediate_size=shared_expert_intermediate_size, dtype="bfloat16")
    return Trace(
        model=model, model_config=config,
        source={"kind": "synthetic", "generator": "sim.synthetic.synthetic_trace", "seed": seed,
                "assumptions": ["Zipf popularity, topic bias, temporal locality; look-ahead = true logits + noise"]},
        prompts={}, created=utc_now_iso(), token_ids=np.full(total, -1, dtype=np.int32), seq_ids=seq_ids,
        positions=positions, is_prefill=is_prefill, topk_ids=topk, topk_weights=weights, router_logits=None,
        lookahead_logits=lookahead, gate_inputs=None)
