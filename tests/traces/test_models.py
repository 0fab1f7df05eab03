"""The embedded default models: they load, have the published routing structure, and record.

mini-qwen-moe copies Qwen1.5-MoE-A2.7B's structure (24 MoE layers, 60 experts top-4, one shared expert);
mini-deepseek-moe copies DeepSeekMoE-16B's (28 layers, layer 0 dense, 27 MoE layers, 64 experts top-6,
2 shared experts). Their training.json states data source, licence and the held-out routing statistics.
"""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch

from traces.errors import UserError
from traces.format import read_trace
from traces.modelzoo import EMBEDDED_MODELS, resolve_model
from traces.promptset import DEFAULT_PROMPTS, load_prompts
from traces.recorder import load_model, record_trace
from traces.routercapture import find_routers

STRUCTURE = {
    # name: (architecture, layers, MoE layer indices, experts, top-k, shared experts)
    "mini-qwen-moe": ("qwen2_moe", 24, tuple(range(24)), 60, 4, 1),
    "mini-deepseek-moe": ("deepseek_v2", 28, tuple(range(1, 28)), 64, 6, 2),
}


@pytest.mark.parametrize("name", list(STRUCTURE))
def test_embedded_model_structure(name):
    """Loads with AutoModelForCausalLM; layers, MoE layers, experts, top-k and shared experts as published."""
    arch, layers, moe_layers, experts, top_k, shared = STRUCTURE[name]
    model, tokenizer, folder = load_model(name, "cpu")
    assert model.config.model_type == arch
    assert model.config.num_hidden_layers == layers
    routers = find_routers(model)
    assert tuple(i for i, _ in routers) == moe_layers
    assert all(r.num_experts == experts and r.top_k == top_k for _, r in routers)
    if arch == "qwen2_moe":
        assert model.config.shared_expert_intermediate_size > 0
        assert hasattr(model.model.layers[0].mlp, "shared_expert")
    else:
        assert model.config.first_k_dense_replace == 1 and model.config.n_shared_experts == shared
        assert not hasattr(model.model.layers[0].mlp, "gate")          # layer 0 is a dense MLP
    assert (folder / "model.safetensors").stat().st_size <= 25 * 2**20
    assert tokenizer.decode(tokenizer("def f(x): return x")["input_ids"]) == "def f(x): return x"
    info = json.loads((folder / "training.json").read_text())
    assert info["data"]["licence"].startswith("PSF")
    assert info["held_out_perplexity"] > 1 and info["train_perplexity"] > 1
    stats = info["routing_held_out"]
    # Routing structure, not collapse: every layer uses most experts, yet consecutive tokens share
    # experts and the next layer's gate predicts better than chance.
    assert stats["popularity"]["entropy_norm"] > 0.7
    assert stats["temporal_overlap"]["mean"] > stats["temporal_overlap"]["random_baseline"]
    assert stats["cross_layer_precision_d1"]["mean"] > stats["cross_layer_precision_d1"]["random_baseline"]


@pytest.mark.parametrize("name", list(STRUCTURE))
def test_embedded_model_records(name, tmp_path):
    """A short recording from the embedded model gives a valid trace with the model's shape."""
    prompts = tmp_path / "p.jsonl"
    prompts.write_text("".join(json.dumps({"text": t}) + "\n" for t in load_prompts(DEFAULT_PROMPTS)[:2]))
    torch.manual_seed(0)
    trace = record_trace(name, prompts, tmp_path / "t.safetensors", max_new_tokens=3, lookahead=2, progress=False)
    back = read_trace(tmp_path / "t.safetensors")
    arch, layers, moe_layers, experts, top_k, shared = STRUCTURE[name]
    cfg = back.model_config
    assert (cfg.architecture, cfg.num_layers, cfg.moe_layer_indices, cfg.num_experts, cfg.top_k,
            cfg.num_shared_experts) == (arch, layers, moe_layers, experts, top_k, shared)
    assert cfg.dtype == "bfloat16"
    assert back.model == name and back.num_sequences == 2 and back.num_decode_tokens == 6
    assert back.lookahead_logits.shape == (2, trace.num_tokens, len(moe_layers), experts)
    assert not back.lookahead_logits[1, :, -2:].any() and back.lookahead_logits[1, :, 0].any()
    assert np.all(back.topk_ids >= 0) and back.topk_ids.shape[2] == top_k


def test_default_prompt_set():
    """At least 100 prompts of several kinds, unique ids, non-empty text."""
    lines = [json.loads(line) for line in DEFAULT_PROMPTS.read_text().splitlines() if line.strip()]
    assert len(lines) >= 100
    assert len({item["id"] for item in lines}) == len(lines)
    assert len({item["kind"] for item in lines}) >= 8
    assert all(item["text"].strip() for item in lines)
    assert load_prompts(DEFAULT_PROMPTS) == [item["text"] for item in lines]


def test_model_resolution():
    """Embedded names resolve to their folders; a folder without config.json and hub ids are refused."""
    for name, folder in EMBEDDED_MODELS.items():
        assert resolve_model(name) == folder
    with pytest.raises(UserError, match="no config.json"):
        resolve_model(str(DEFAULT_PROMPTS.parent))
    with pytest.raises(UserError, match="embedded model"):
        resolve_model("deepseek-ai/deepseek-moe-16b-base")
