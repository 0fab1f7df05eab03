"""A tiny random Qwen2-MoE model folder (with tokenizer and held-out text) shared by the calibration tests."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

TEXT = ("The quick brown fox jumps over the lazy dog. A stitch in time saves nine. " * 8
        + "Expert offloading moves weights between memory tiers while the model keeps generating text. " * 8)


@pytest.fixture(scope="session")
def tiny_model(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path]:
    """A 4-layer Qwen2-MoE with 8 experts top-2 and a byte-level BPE tokenizer, saved as bf16; and a text."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast, Qwen2MoeConfig, Qwen2MoeForCausalLM

    folder = tmp_path_factory.mktemp("tiny-qwen")
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    tok.train_from_iterator([TEXT], trainer=trainers.BpeTrainer(
        vocab_size=300, special_tokens=["<eos>"], show_progress=False,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet()))
    tokenizer = PreTrainedTokenizerFast(tokenizer_object=tok, eos_token="<eos>", pad_token="<eos>")
    config = Qwen2MoeConfig(vocab_size=len(tokenizer), hidden_size=64, intermediate_size=128,
                            moe_intermediate_size=64, shared_expert_intermediate_size=64, num_hidden_layers=4,
                            num_attention_heads=4, num_key_value_heads=4, num_experts=8, num_experts_per_tok=2,
                            max_position_embeddings=512, torch_dtype="bfloat16")
    torch.manual_seed(0)
    model = Qwen2MoeForCausalLM(config)
    with torch.no_grad():  # random init is tiny; larger weights make routing and outputs input-dependent
        for p in model.parameters():
            p.mul_(4.0)
    model.to(torch.bfloat16).save_pretrained(folder, safe_serialization=True)
    tokenizer.save_pretrained(folder)
    text = folder.parent / "heldout.txt"
    text.write_text(TEXT)
    return folder, text
