"""Tiny seeded MoE models (random weights, float32) and prompts for the realrun tests.

The Qwen model's expert widths are whole int4 groups (64), so its int4 experts take the CPU int4 kernel
path; the DeepSeek models' (32) take the HQQ dequantisation path.
"""

from __future__ import annotations

import copy

import pytest
import torch

from realrun.runner import greedy_generate
from realrun.session import Prompts

PROMPTS = Prompts(token_ids=[[1, 5, 9, 20, 33, 7, 61, 2], [3, 4, 100, 2, 17]], name="tiny", sha256="0" * 64)
NEW_TOKENS = 5


def _init(model: torch.nn.Module, seed: int) -> torch.nn.Module:
    """Normal weights with a large std so routing varies from token to token."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in model.parameters():
            if p.dim() > 1:
                p.copy_(torch.randn(p.shape, generator=g) * 0.2)
    return model.eval()


def tiny_qwen(top_k: int = 2) -> torch.nn.Module:
    from transformers import Qwen2MoeConfig, Qwen2MoeForCausalLM

    cfg = Qwen2MoeConfig(vocab_size=128, hidden_size=64, intermediate_size=128, moe_intermediate_size=64,
                         shared_expert_intermediate_size=64, num_hidden_layers=3, num_attention_heads=4,
                         num_key_value_heads=2, num_experts=8, num_experts_per_tok=top_k, max_position_embeddings=128,
                         experts_implementation="eager")
    torch.manual_seed(0)
    return _init(Qwen2MoeForCausalLM(cfg), 0)


def tiny_deepseek_v2() -> torch.nn.Module:
    from transformers import DeepseekV2Config, DeepseekV2ForCausalLM

    cfg = DeepseekV2Config(vocab_size=128, hidden_size=64, intermediate_size=128, moe_intermediate_size=32,
                           num_hidden_layers=3, num_attention_heads=4, num_key_value_heads=4, n_routed_experts=8,
                           n_shared_experts=1, num_experts_per_tok=2, first_k_dense_replace=1, kv_lora_rank=16,
                           q_lora_rank=None, qk_rope_head_dim=8, qk_nope_head_dim=8, v_head_dim=16,
                           topk_method="greedy", n_group=1, topk_group=1, max_position_embeddings=128,
                           experts_implementation="eager")
    torch.manual_seed(1)
    return _init(DeepseekV2ForCausalLM(cfg), 1)


def tiny_deepseek_v3() -> torch.nn.Module:
    from transformers import DeepseekV3Config, DeepseekV3ForCausalLM

    cfg = DeepseekV3Config(vocab_size=128, hidden_size=64, intermediate_size=128, moe_intermediate_size=32,
                           num_hidden_layers=3, num_attention_heads=4, num_key_value_heads=4, n_routed_experts=8,
                           n_shared_experts=1, num_experts_per_tok=2, first_k_dense_replace=1, kv_lora_rank=16,
                           q_lora_rank=32, qk_rope_head_dim=8, qk_nope_head_dim=8, v_head_dim=16, n_group=2,
                           topk_group=1, max_position_embeddings=128, experts_implementation="eager")
    torch.manual_seed(2)
    return _init(DeepseekV3ForCausalLM(cfg), 2)


MODELS = {"qwen2_moe": tiny_qwen, "deepseek_v2": tiny_deepseek_v2, "deepseek_v3": tiny_deepseek_v3}


@pytest.fixture(autouse=True)
def _threads():
    """Two cores shared with other work: keep torch to one thread in these tests."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


@pytest.fixture(scope="module")
def references() -> dict:
    """Per architecture: (plain model, its greedy Generation with logits) — the ground truth."""
    torch.set_num_threads(1)
    out = {}
    for name, make in MODELS.items():
        model = make()
        out[name] = (model, greedy_generate(model, PROMPTS.token_ids, NEW_TOKENS, torch.device("cpu"),
                                            keep_logits=True))
    return out


def fresh(references: dict, arch: str) -> torch.nn.Module:
    """A copy of the reference model that a run may take apart."""
    return copy.deepcopy(references[arch][0])
