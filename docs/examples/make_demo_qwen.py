"""A small random Qwen2-MoE model and two token-id prompts for the README's realrun example.

    python docs/examples/make_demo_qwen.py /tmp/rr

writes /tmp/rr/demo-qwen (config.json + model.safetensors: 4 layers, 16 experts top-2, hidden 256,
float32, seeded) and /tmp/rr/prompts.jsonl (two prompts of 24 and 16 random token ids).
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

import torch
from transformers import Qwen2MoeConfig, Qwen2MoeForCausalLM


def main(out: Path) -> None:
    out.mkdir(parents=True, exist_ok=True)
    cfg = Qwen2MoeConfig(vocab_size=1024, hidden_size=256, intermediate_size=512, moe_intermediate_size=256,
                         shared_expert_intermediate_size=256, num_hidden_layers=4, num_attention_heads=4,
                         num_key_value_heads=2, num_experts=16, num_experts_per_tok=2, max_position_embeddings=256,
                         torch_dtype="float32")
    torch.manual_seed(0)
    model = Qwen2MoeForCausalLM(cfg).to(torch.float32)
    model.save_pretrained(out / "demo-qwen")
    generator = torch.Generator().manual_seed(1)
    lines = [json.dumps({"token_ids": torch.randint(0, cfg.vocab_size, (n,), generator=generator).tolist()})
             for n in (24, 16)]
    (out / "prompts.jsonl").write_text("\n".join(lines) + "\n")
    print(f"wrote {out / 'demo-qwen'} and {out / 'prompts.jsonl'}")


if __name__ == "__main__":
    main(Path(sys.argv[1] if len(sys.argv) > 1 else "/tmp/rr"))
