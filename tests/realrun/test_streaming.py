"""Streaming a checkpoint folder into realrun: tiny random checkpoints written by transformers'
`save_pretrained` (per-expert names, Mixtral's block_sparse_moe names, several shards) and one converted to
the fused layout, run from the disk and RAM tiers with the lossless presets: tokens and logits equal to
transformers' own in-memory model (`from_pretrained`) in the same dtype."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

from realrun.runner import greedy_generate
from realrun.session import run_streamed
from realrun.streaming import load_streaming
from sim.policies.presets import build_policy
from tests.realrun.conftest import NEW_TOKENS, PROMPTS

CPU = torch.device("cpu")
COMMON = dict(vocab_size=128, hidden_size=64, num_hidden_layers=3, num_attention_heads=4, num_key_value_heads=2,
              num_experts_per_tok=2, max_position_embeddings=128, tie_word_embeddings=False)


def _configs() -> dict:
    from transformers import (
        DeepseekV2Config,
        DeepseekV3Config,
        MixtralConfig,
        OlmoeConfig,
        Qwen2MoeConfig,
        Qwen3MoeConfig,
    )

    mla = dict(kv_lora_rank=16, qk_rope_head_dim=8, qk_nope_head_dim=8, v_head_dim=16, first_k_dense_replace=1,
               n_routed_experts=8, n_shared_experts=1, moe_intermediate_size=32, intermediate_size=128)
    return {
        "qwen2_moe": Qwen2MoeConfig(**COMMON, num_experts=8, moe_intermediate_size=32, intermediate_size=128,
                                    shared_expert_intermediate_size=64),
        "qwen3_moe": Qwen3MoeConfig(**COMMON, num_experts=8, moe_intermediate_size=32, intermediate_size=128,
                                    head_dim=16),
        "mixtral": MixtralConfig(**COMMON, num_local_experts=8, intermediate_size=32),
        "olmoe": OlmoeConfig(**COMMON, num_experts=8, intermediate_size=32),
        "deepseek_v2": DeepseekV2Config(**{**COMMON, "num_key_value_heads": 4}, **mla, q_lora_rank=None,
                                        topk_method="greedy", n_group=1, topk_group=1),
        "deepseek_v3": DeepseekV3Config(**{**COMMON, "num_key_value_heads": 4}, **mla, q_lora_rank=32, n_group=2,
                                        topk_group=1),
    }


def write_checkpoint(arch: str, folder: Path, *, shard: str | None = None, seed: int = 0) -> Path:
    """A random bf16 checkpoint of `arch` saved by transformers itself (`save_pretrained`)."""
    from transformers import AutoModelForCausalLM

    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_config(_configs()[arch])
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():  # a large std, so routing varies from token to token
        for p in model.parameters():
            if p.dim() > 1:
                p.copy_(torch.randn(p.shape, generator=g) * 0.2)
    model.to(torch.bfloat16).save_pretrained(folder, max_shard_size=shard or "5GB")
    return folder


def to_fused(src: Path, dst: Path) -> Path:
    """Rewrite a single-file per-expert checkpoint in transformers' fused in-memory layout
    (`mlp.experts.gate_up_proj` [E, 2I, H], `mlp.experts.down_proj` [E, H, I])."""
    import re

    dst.mkdir()
    tensors = load_file(src / "model.safetensors")
    out, experts = {}, {}
    for name, t in tensors.items():
        m = re.match(r"(.*\.mlp\.experts)\.(\d+)\.(gate|up|down)_proj\.weight$", name)
        if m:
            experts.setdefault(m.group(1), {})[(int(m.group(2)), m.group(3))] = t
        else:
            out[name] = t
    for prefix, parts in experts.items():
        n = 1 + max(e for e, _ in parts)
        out[f"{prefix}.gate_up_proj"] = torch.stack([torch.cat([parts[(e, "gate")], parts[(e, "up")]]) for e in range(n)])
        out[f"{prefix}.down_proj"] = torch.stack([parts[(e, "down")] for e in range(n)])
    save_file(out, dst / "model.safetensors", metadata={"format": "pt"})
    (dst / "config.json").write_text((src / "config.json").read_text())
    return dst


@pytest.fixture(scope="module")
def checkpoints(tmp_path_factory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("ckpt")
    out = {arch: write_checkpoint(arch, root / arch, shard="60KB" if arch == "qwen2_moe" else None)
           for arch in _configs()}
    out["qwen2_moe-fused"] = to_fused(write_checkpoint("qwen2_moe", root / "qwen-single"), root / "qwen-fused")
    return out


def reference(folder: Path, dtype: torch.dtype):
    """transformers' own in-memory model of the folder, and its greedy tokens and logits."""
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(folder, dtype=dtype, experts_implementation="eager").eval()
    return greedy_generate(model, PROMPTS.token_ids, NEW_TOKENS, CPU, keep_logits=True)


LOSSLESS = {"lod": {}, "lru": {}, "fate": {"precision": "bf16", "miss": "wait"}}


def streamed_run(folder: Path, preset: str, store: str, dtype: str, tmp_path: Path):
    streamed = load_streaming(folder, CPU, dtype)
    try:
        return run_streamed(streamed, PROMPTS, model_name=folder.name, policy=build_policy(preset, LOSSLESS[preset]),
                            memory_budget="50%", device=CPU, store=store, max_new_tokens=NEW_TOKENS,
                            store_dir=tmp_path, profile="rtx3090-bound", keep_logits=True)
    finally:
        streamed.checkpoint.close()


def _assert_equal(gen, ref) -> None:
    assert gen.generated == ref.generated
    for ours, theirs in zip(gen.logits, ref.logits, strict=True):
        assert torch.equal(ours, theirs)


@pytest.mark.parametrize("arch", list(_configs()) + ["qwen2_moe-fused"])
def test_every_architecture_streams_bit_exactly(checkpoints, arch: str, tmp_path: Path) -> None:
    """Each supported architecture, lru from the checkpoint (disk tier) and lod from the RAM tier, in the
    checkpoint's dtype: tokens and logits equal transformers' in-memory run."""
    folder = checkpoints[arch]
    ref = reference(folder, torch.bfloat16)
    for preset, store in (("lru", "disk"), ("lod", "ram")):
        _, gen = streamed_run(folder, preset, store, "bfloat16", tmp_path)
        _assert_equal(gen, ref)


@pytest.mark.parametrize("preset", list(LOSSLESS))
@pytest.mark.parametrize("store", ["disk", "ram"])
def test_lossless_presets_in_float32_compute(checkpoints, preset: str, store: str, tmp_path: Path) -> None:
    """--dtype float32 on a bf16 checkpoint (the CPU default): experts cast at use give transformers'
    float32 model (bf16 weights upcast) exactly, with prefetching presets too."""
    folder = checkpoints["qwen2_moe"]
    _, gen = streamed_run(folder, preset, store, "float32", tmp_path)
    _assert_equal(gen, reference(folder, torch.float32))


def test_sharded_checkpoint_really_has_shards(checkpoints) -> None:
    """The multi-shard case above is one: several files and an index, experts spread over them."""
    index = json.loads((checkpoints["qwen2_moe"] / "model.safetensors.index.json").read_text())
    files = {f for k, f in index["weight_map"].items() if ".experts." in k}
    assert len(files) >= 3


@pytest.mark.parametrize("name", ["mini-qwen-moe", "mini-deepseek-moe"])
def test_embedded_models_stream_bit_exactly(name: str, tmp_path: Path) -> None:
    """The embedded default models, disk tier, lru, float32 compute."""
    folder = Path(__file__).resolve().parents[2] / "traces" / "models" / name
    _, gen = streamed_run(folder, "lru", "disk", "float32", tmp_path)
    _assert_equal(gen, reference(folder, torch.float32))


def test_ram_tier_reads_each_expert_once_for_all_its_precisions(checkpoints, monkeypatch) -> None:
    """Filling the RAM tier with bf16 and INT4 copies reads each expert from the checkpoint once, not once per
    precision (the source keeps the expert it last read)."""
    from realrun.checkpoint import Checkpoint
    from realrun.ckptstore import CheckpointStore, build_checkpoint_store
    from realrun.streaming import checkpoint_spec

    reads = []
    real = CheckpointStore.read_into
    monkeypatch.setattr(CheckpointStore, "read_into",
                        lambda self, *args: reads.append(args[:2]) or real(self, *args))
    with Checkpoint(checkpoints["qwen2_moe"]) as checkpoint:
        spec = checkpoint_spec(checkpoint, "tiny")
        store, _ = build_checkpoint_store(checkpoint, spec, ["bf16", "int4"], "ram", torch.device("cpu"),
                                          optimize=False)
        store.close()
    assert len(reads) == len(set(reads)) == spec.num_moe_layers * spec.num_experts
