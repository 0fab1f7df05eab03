"""Model configs: the built-in models' config.json fields, and the routing structure of any MoE config.

`BUILTIN_CONFIGS` holds the fields of each model's Hugging Face config.json that fatesim reads, copied from
the published files (the hub ids are in `HF_IDS`). `routing_config` reads the routing structure (MoE
layers, experts, top-k, shared experts) out of such a config; the importers attribute traces with it and
`sim.modelspec` builds its specs on it, so every model's shape is written down once.
"""

from __future__ import annotations

from typing import Any

from traces.format import TraceModelConfig

MOE_MODEL_TYPES = ("qwen2_moe", "qwen3_moe", "deepseek", "deepseek_v2", "deepseek_v3", "mixtral", "olmoe")
"""HF `model_type`s whose routing structure `routing_config` knows."""

BUILTIN_CONFIGS: dict[str, dict[str, Any]] = {
    "qwen1.5-moe-a2.7b": {
        "model_type": "qwen2_moe", "num_hidden_layers": 24, "hidden_size": 2048, "intermediate_size": 5632,
        "moe_intermediate_size": 1408, "shared_expert_intermediate_size": 5632, "num_experts": 60,
        "num_experts_per_tok": 4, "decoder_sparse_step": 1, "mlp_only_layers": [], "num_attention_heads": 16,
        "num_key_value_heads": 16, "vocab_size": 151936, "tie_word_embeddings": False, "torch_dtype": "bfloat16",
    },
    "deepseek-moe-16b": {
        "model_type": "deepseek", "num_hidden_layers": 28, "hidden_size": 2048, "intermediate_size": 10944,
        "moe_intermediate_size": 1408, "n_routed_experts": 64, "n_shared_experts": 2, "num_experts_per_tok": 6,
        "first_k_dense_replace": 1, "moe_layer_freq": 1, "num_attention_heads": 16, "num_key_value_heads": 16,
        "vocab_size": 102400, "tie_word_embeddings": False, "torch_dtype": "bfloat16",
    },
    "deepseek-v2-lite": {
        "model_type": "deepseek_v2", "num_hidden_layers": 27, "hidden_size": 2048, "intermediate_size": 10944,
        "moe_intermediate_size": 1408, "n_routed_experts": 64, "n_shared_experts": 2, "num_experts_per_tok": 6,
        "first_k_dense_replace": 1, "moe_layer_freq": 1, "num_attention_heads": 16, "num_key_value_heads": 16,
        "q_lora_rank": None, "kv_lora_rank": 512, "qk_nope_head_dim": 128, "qk_rope_head_dim": 64,
        "v_head_dim": 128, "vocab_size": 102400, "tie_word_embeddings": False, "torch_dtype": "bfloat16",
    },
    "mixtral-8x7b": {
        "model_type": "mixtral", "num_hidden_layers": 32, "hidden_size": 4096, "intermediate_size": 14336,
        "num_local_experts": 8, "num_experts_per_tok": 2, "num_attention_heads": 32, "num_key_value_heads": 8,
        "vocab_size": 32000, "tie_word_embeddings": False, "torch_dtype": "bfloat16",
    },
    "olmoe-1b-7b": {
        "model_type": "olmoe", "num_hidden_layers": 16, "hidden_size": 2048, "intermediate_size": 1024,
        "num_experts": 64, "num_experts_per_tok": 8, "num_attention_heads": 16, "num_key_value_heads": 16,
        "vocab_size": 50304, "tie_word_embeddings": False, "torch_dtype": "bfloat16",
    },
    "qwen3-30b-a3b": {
        "model_type": "qwen3_moe", "num_hidden_layers": 48, "hidden_size": 2048, "intermediate_size": 6144,
        "moe_intermediate_size": 768, "num_experts": 128, "num_experts_per_tok": 8, "decoder_sparse_step": 1,
        "mlp_only_layers": [], "num_attention_heads": 32, "num_key_value_heads": 4, "head_dim": 128,
        "vocab_size": 151936, "tie_word_embeddings": False, "torch_dtype": "bfloat16",
    },
}

HF_IDS: dict[str, str] = {
    "qwen1.5-moe-a2.7b": "Qwen/Qwen1.5-MoE-A2.7B",
    "deepseek-moe-16b": "deepseek-ai/deepseek-moe-16b-base",
    "deepseek-v2-lite": "deepseek-ai/DeepSeek-V2-Lite",
    "mixtral-8x7b": "mistralai/Mixtral-8x7B-v0.1",
    "olmoe-1b-7b": "allenai/OLMoE-1B-7B-0924",
    "qwen3-30b-a3b": "Qwen/Qwen3-30B-A3B",
}
"""Built-in name -> the Hugging Face id its config was copied from."""


def routing_config(cfg: dict[str, Any]) -> TraceModelConfig:
    """The routing structure of an MoE model from its config.json dict (`model_type` in MOE_MODEL_TYPES).

    Raises KeyError naming a missing field; the caller says which config lacked it.
    """
    model_type = cfg["model_type"]
    layers = int(cfg["num_hidden_layers"])
    if model_type in ("qwen2_moe", "qwen3_moe"):
        # transformers 5.x writes Qwen3-MoE's count as num_local_experts; the hub's configs say num_experts
        experts = int(cfg["num_experts"] if "num_experts" in cfg else cfg["num_local_experts"])
        expert_inter = int(cfg["moe_intermediate_size"])
        shared_inter = int(cfg.get("shared_expert_intermediate_size") or 0)
        num_shared = 1 if shared_inter else 0
        step = int(cfg.get("decoder_sparse_step") or 1)
        mlp_only = set(cfg.get("mlp_only_layers") or [])
        moe = [i for i in range(layers) if i not in mlp_only and experts > 0 and (i + 1) % step == 0]
    elif model_type in ("deepseek", "deepseek_v2", "deepseek_v3"):
        experts, expert_inter = int(cfg["n_routed_experts"]), int(cfg["moe_intermediate_size"])
        num_shared = int(cfg.get("n_shared_experts") or 0)
        shared_inter = num_shared * expert_inter
        first_dense = int(cfg.get("first_k_dense_replace") or 0)
        freq = int(cfg.get("moe_layer_freq") or 1)
        moe = [i for i in range(layers) if i >= first_dense and i % freq == 0]
    else:  # mixtral, olmoe: every layer is MoE, `intermediate_size` is the expert's
        experts = int(cfg["num_local_experts"] if model_type == "mixtral" else cfg["num_experts"])
        expert_inter, num_shared, shared_inter = int(cfg["intermediate_size"]), 0, 0
        moe = list(range(layers))
    dtype = str(cfg.get("torch_dtype") or cfg.get("dtype") or "bfloat16")
    return TraceModelConfig(
        architecture=model_type, num_layers=layers, moe_layer_indices=tuple(moe), num_experts=experts,
        top_k=int(cfg["num_experts_per_tok"]), num_shared_experts=num_shared, hidden_size=int(cfg["hidden_size"]),
        expert_intermediate_size=expert_inter, shared_expert_intermediate_size=shared_inter,
        dtype=dtype if dtype in ("bfloat16", "float16", "float32") else "bfloat16",
    )
