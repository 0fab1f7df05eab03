"""The shard-by-shard checkpoint generator writes what the hub serves: transformers loads it with no missing
or unexpected keys, its state dict is the generated tensors, and the folder is complete or absent."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from safetensors import safe_open

from realrun.checkpoint_gen import (
    INDEX_NAME,
    PRESETS,
    hub_tensors,
    preset_config,
    write_checkpoint,
)
from traces.errors import UserError

TINY_QWEN = preset_config("qwen1.5-moe-a2.7b", vocab_size=256, hidden_size=64, intermediate_size=96,
                          moe_intermediate_size=32, shared_expert_intermediate_size=48, num_hidden_layers=3,
                          num_attention_heads=4, num_key_value_heads=2, num_experts=8, num_experts_per_tok=2,
                          max_position_embeddings=128, bos_token_id=0, eos_token_id=0)
TINY_DEEPSEEK = preset_config("deepseek-moe-16b-as-deepseek-v2", vocab_size=256, hidden_size=64,
                              intermediate_size=96, moe_intermediate_size=32, num_hidden_layers=3,
                              num_attention_heads=4, num_key_value_heads=4, n_routed_experts=8, n_shared_experts=2,
                              num_experts_per_tok=3, kv_lora_rank=16, qk_nope_head_dim=8, qk_rope_head_dim=8,
                              v_head_dim=16, max_position_embeddings=128, bos_token_id=0, eos_token_id=0)
SHARD_BYTES = 60_000  # the tiny models are ~0.3 MB: several shards


def _files(folder: Path) -> dict[str, torch.Tensor]:
    """Every tensor in the folder's shards, read with safetensors (not transformers)."""
    index = json.loads((folder / INDEX_NAME).read_text())
    out = {}
    for fname in sorted(set(index["weight_map"].values())):
        with safe_open(folder / fname, "pt") as f:
            for key in f.keys():  # noqa: SIM118 (safe_open is not a dict)
                assert index["weight_map"][key] == fname
                out[key] = f.get_tensor(key)
    assert set(out) == set(index["weight_map"])
    return out


def _qwen_hub_names(cfg: dict) -> set[str]:
    """The Qwen1.5-MoE hub checkpoint's tensor names, written out by hand from the published file list."""
    names = {"model.embed_tokens.weight", "model.norm.weight", "lm_head.weight"}
    for i in range(cfg["num_hidden_layers"]):
        p = f"model.layers.{i}."
        names |= {p + "input_layernorm.weight", p + "post_attention_layernorm.weight", p + "mlp.gate.weight",
                  p + "mlp.shared_expert_gate.weight"}
        names |= {p + f"self_attn.{m}_proj.{w}" for m in "qkv" for w in ("weight", "bias")}
        names.add(p + "self_attn.o_proj.weight")
        names |= {p + f"mlp.shared_expert.{m}_proj.weight" for m in ("gate", "up", "down")}
        names |= {p + f"mlp.experts.{e}.{m}_proj.weight" for e in range(cfg["num_experts"])
                  for m in ("gate", "up", "down")}
    return names


def test_qwen_names_and_shapes_are_the_hubs(tmp_path: Path) -> None:
    """Per-expert names and shapes, q/k/v biases, shared expert and its gate, untied lm_head: the hub's."""
    stats = write_checkpoint(tmp_path / "m", TINY_QWEN, max_shard_bytes=SHARD_BYTES)
    tensors = _files(tmp_path / "m")
    assert set(tensors) == _qwen_hub_names(TINY_QWEN)
    assert tensors["model.layers.2.mlp.experts.7.gate_proj.weight"].shape == (32, 64)  # [I, H]
    assert tensors["model.layers.2.mlp.experts.7.up_proj.weight"].shape == (32, 64)
    assert tensors["model.layers.2.mlp.experts.7.down_proj.weight"].shape == (64, 32)  # [H, I]
    assert tensors["model.layers.0.mlp.shared_expert_gate.weight"].shape == (1, 64)
    assert tensors["model.layers.0.self_attn.k_proj.bias"].shape == (32,)  # 2 kv heads x 16
    assert all(t.dtype == torch.bfloat16 for t in tensors.values())
    index = json.loads((tmp_path / "m" / INDEX_NAME).read_text())
    assert index["metadata"]["total_size"] == sum(t.numel() * 2 for t in tensors.values()) == stats.total_bytes
    assert stats.num_shards >= 2 and len(set(index["weight_map"].values())) == stats.num_shards
    files = sorted(p.name for p in (tmp_path / "m").glob("*.safetensors"))
    assert files == [f"model-{i:05d}-of-{stats.num_shards:05d}.safetensors" for i in range(1, stats.num_shards + 1)]
    for fname in files:  # no shard over the limit: one shard's tensors is all the generator holds
        with safe_open(tmp_path / "m" / fname, "pt") as f:
            assert sum(f.get_tensor(k).numel() * 2 for k in f.keys()) <= SHARD_BYTES  # noqa: SIM118


@pytest.mark.parametrize("config", [TINY_QWEN, TINY_DEEPSEEK], ids=["qwen2_moe", "deepseek_v2"])
def test_transformers_loads_it_and_its_state_dict_is_the_files(tmp_path: Path, config: dict) -> None:
    """from_pretrained: no missing, unexpected or mismatched keys; finite logits; every parameter (fused
    experts included) equals the tensors in the shards."""
    from transformers import AutoModelForCausalLM

    write_checkpoint(tmp_path / "m", config, max_shard_bytes=SHARD_BYTES)
    model, info = AutoModelForCausalLM.from_pretrained(tmp_path / "m", output_loading_info=True,
                                                       dtype=torch.bfloat16)
    assert not info["missing_keys"] and not info["unexpected_keys"] and not info["mismatched_keys"], info
    with torch.inference_mode():
        logits = model(input_ids=torch.tensor([[1, 5, 9, 200, 33, 7]])).logits
    assert torch.isfinite(logits).all() and logits.float().std() > 0
    files = _files(tmp_path / "m")
    state = model.state_dict()
    used = set()
    for key, value in state.items():
        if key.endswith("mlp.experts.gate_up_proj"):
            prefix = key.removesuffix("gate_up_proj")
            expected = torch.stack([torch.cat([files[f"{prefix}{e}.gate_proj.weight"],
                                               files[f"{prefix}{e}.up_proj.weight"]]) for e in range(value.shape[0])])
            used |= {f"{prefix}{e}.{m}_proj.weight" for e in range(value.shape[0]) for m in ("gate", "up")}
        elif key.endswith("mlp.experts.down_proj"):
            prefix = key.removesuffix("down_proj")
            expected = torch.stack([files[f"{prefix}{e}.down_proj.weight"] for e in range(value.shape[0])])
            used |= {f"{prefix}{e}.down_proj.weight" for e in range(value.shape[0])}
        else:
            expected = files[key]
            used.add(key)
        assert torch.equal(value, expected), key
    assert used == set(files)


def test_values_are_small_random_and_norms_one(tmp_path: Path) -> None:
    """Random tensors: std near 0.019, both signs, no two experts alike; norm weights exactly 1."""
    write_checkpoint(tmp_path / "m", TINY_DEEPSEEK, max_shard_bytes=SHARD_BYTES)
    t = _files(tmp_path / "m")
    w = t["model.layers.1.mlp.experts.0.gate_proj.weight"].float()
    assert 0.017 < w.std() < 0.021 and (w > 0).any() and (w < 0).any() and w.abs().max() < 2 ** -5
    assert not torch.equal(w, t["model.layers.1.mlp.experts.1.gate_proj.weight"].float())
    for key in ("model.norm.weight", "model.layers.0.input_layernorm.weight",
                "model.layers.2.self_attn.kv_a_layernorm.weight"):
        assert torch.equal(t[key], torch.ones_like(t[key])), key


def test_values_do_not_depend_on_the_sharding_and_the_seed_changes_them(tmp_path: Path) -> None:
    """Each tensor depends on (seed, name) only."""
    write_checkpoint(tmp_path / "a", TINY_QWEN, max_shard_bytes=SHARD_BYTES)
    write_checkpoint(tmp_path / "b", TINY_QWEN, max_shard_bytes=10 * SHARD_BYTES)
    write_checkpoint(tmp_path / "c", TINY_QWEN, max_shard_bytes=SHARD_BYTES, seed=1)
    a, b, c = _files(tmp_path / "a"), _files(tmp_path / "b"), _files(tmp_path / "c")
    assert len(list((tmp_path / "a").glob("*.safetensors"))) > len(list((tmp_path / "b").glob("*.safetensors")))
    assert all(torch.equal(a[k], b[k]) for k in a)
    key = "model.layers.0.mlp.experts.3.down_proj.weight"
    assert not torch.equal(a[key], c[key])


def test_folder_appears_complete_or_not_at_all(tmp_path: Path) -> None:
    """A failure after the first shard leaves neither the folder nor its .partial; a later run writes it."""
    def fail_after_first(fname: str, done: int, count: int) -> None:
        assert (tmp_path / "m.partial" / fname).exists() and not (tmp_path / "m").exists()
        raise RuntimeError("disk full")

    with pytest.raises(RuntimeError, match="disk full"):
        write_checkpoint(tmp_path / "m", TINY_QWEN, max_shard_bytes=SHARD_BYTES, progress=fail_after_first)
    assert sorted(p.name for p in tmp_path.iterdir()) == []
    first = write_checkpoint(tmp_path / "m", TINY_QWEN, max_shard_bytes=SHARD_BYTES, name="tiny")
    assert not first.reused and first.num_shards >= 2
    assert sorted(p.name for p in tmp_path.iterdir()) == ["m"]
    config = json.loads((tmp_path / "m" / "config.json").read_text())
    assert config["model_type"] == "qwen2_moe" and config["fatesim_generator"]["preset"] == "tiny"


def test_reuse_only_what_the_same_config_and_seed_wrote(tmp_path: Path) -> None:
    """A complete folder from the same inputs is reused; another seed or config rewrites it; a folder with a
    shard missing is not complete."""
    assert not write_checkpoint(tmp_path / "m", TINY_QWEN, max_shard_bytes=SHARD_BYTES).reused
    assert write_checkpoint(tmp_path / "m", TINY_QWEN, max_shard_bytes=SHARD_BYTES).reused
    assert not write_checkpoint(tmp_path / "m", TINY_QWEN, max_shard_bytes=SHARD_BYTES, seed=3).reused
    assert not write_checkpoint(tmp_path / "m", {**TINY_QWEN, "num_experts": 6}, seed=3,
                                max_shard_bytes=SHARD_BYTES).reused
    next((tmp_path / "m").glob("model-00002-*.safetensors")).unlink()
    assert not write_checkpoint(tmp_path / "m", {**TINY_QWEN, "num_experts": 6}, seed=3,
                                max_shard_bytes=SHARD_BYTES).reused


def test_full_size_presets_have_the_published_sizes() -> None:
    """From the meta-device model: Qwen1.5-MoE-A2.7B is 14.3B parameters (28.6 GB in bf16), the DeepSeekMoE-16B
    substitute has DeepSeekMoE-16B's 64 x 1408 experts in 27 MoE layers plus 2 shared, and 16.2B parameters
    (the real model's 16.4B less the MLA-vs-MHA attention difference)."""
    qwen, _ = hub_tensors(PRESETS["qwen1.5-moe-a2.7b"])
    assert sum(t.nbytes for t in qwen) == 28_631_568_384
    deepseek, arch = hub_tensors(PRESETS["deepseek-moe-16b-as-deepseek-v2"])
    assert arch == "DeepseekV2ForCausalLM"
    experts = [t for t in deepseek if ".mlp.experts." in t.name]
    assert len(experts) == 27 * 64 * 3 and {t.shape for t in experts} == {(1408, 2048), (2048, 1408)}
    assert {t.shape for t in deepseek if "shared_experts.down_proj" in t.name} == {(2048, 2816)}
    assert 16.1e9 < sum(t.nbytes for t in deepseek) / 2 < 16.4e9


def test_unsupported_model_type_is_a_user_error(tmp_path: Path) -> None:
    with pytest.raises(UserError, match="not supported"):
        write_checkpoint(tmp_path / "m", {"model_type": "deepseek", "hidden_size": 8})


def test_gpu_check_calls_this_generator() -> None:
    """calibration.gpu_check's full-size step writes its checkpoint with `write_preset(folder, model, seed)`."""
    import inspect

    from calibration import gpu_check
    from realrun.checkpoint_gen import write_preset

    assert list(inspect.signature(write_preset).parameters) == ["folder", "model", "seed"]
    assert "write_preset(folder, \"qwen1.5-moe-a2.7b\", seed=0)" in inspect.getsource(gpu_check.fullsize)
