"""Model specs: byte sizes computed from configs, not typed in."""

import json

import pytest

from sim.modelspec import PRECISIONS, ModelSpec, get_model_spec, list_model_specs
from traces.errors import UserError


def test_qwen_expert_bytes_match_the_published_sizes():
    """Qwen1.5-MoE: 3 x 2048 x 1408 weights; 17.3 MB bf16, ~5.4 MB int4 g64, ~4.3 MB int2 g32 (fp32 scale+zero)."""
    spec = get_model_spec("qwen1.5-moe-a2.7b")
    n = 2048 * 1408
    assert spec.expert_bytes("bf16") == 3 * n * 2 == 17_301_504
    assert spec.expert_bytes("int4") == 3 * (n // 2 + (n // 64) * 8) == 5_406_720
    assert spec.expert_bytes("int2") == 3 * (n // 4 + (n // 32) * 8) == 4_325_376
    assert spec.expert_bytes("int8") == 3 * (n + (n // 64) * 8)


def test_precision_rounds_partial_bytes_and_groups_up():
    """7 int2 weights need 2 bytes of codes and, at group 32, one group of metadata."""
    assert PRECISIONS["int2"].matrix_bytes(7) == 2 + 8
    assert PRECISIONS["int4"].matrix_bytes(65) == 33 + 2 * 8


@pytest.mark.parametrize(
    "name, moe_layers, experts, top_k, billions",
    [
        ("qwen1.5-moe-a2.7b", 24, 60, 4, 14.3),
        ("deepseek-moe-16b", 27, 64, 6, 16.4),
        ("deepseek-v2-lite", 26, 64, 6, 15.7),
        ("mixtral-8x7b", 32, 8, 2, 46.7),
        ("olmoe-1b-7b", 16, 64, 8, 6.9),
        ("qwen3-30b-a3b", 48, 128, 8, 30.5),
    ],
)
def test_builtin_specs_have_the_published_structure_and_parameter_count(name, moe_layers, experts, top_k, billions):
    spec = get_model_spec(name)
    assert (spec.num_moe_layers, spec.num_experts, spec.top_k) == (moe_layers, experts, top_k)
    total_params = (spec.routed_expert_bytes_total() + spec.shared_expert_bytes_total + spec.non_expert_bytes) / 2
    assert total_params / 1e9 == pytest.approx(billions, abs=0.1)


def test_deepseek_first_layer_is_dense():
    spec = get_model_spec("deepseek-moe-16b")
    assert spec.moe_layer_indices == tuple(range(1, 28))
    assert spec.num_shared_experts == 2 and spec.shared_expert_intermediate_size == 2 * 1408


def test_mla_kv_cache_is_the_compressed_width():
    """DeepSeek-V2-Lite caches kv_lora_rank + rope dims per layer: (512 + 64) x 27 layers x 2 bytes."""
    assert get_model_spec("deepseek-v2-lite").kv_cache_bytes_per_token() == (512 + 64) * 27 * 2


def test_spec_from_config_file_in_a_model_directory(tmp_path):
    cfg = {"model_type": "mixtral", "num_hidden_layers": 2, "hidden_size": 8, "intermediate_size": 16,
           "num_local_experts": 4, "num_experts_per_tok": 2, "num_attention_heads": 2, "vocab_size": 10}
    (tmp_path / "config.json").write_text(json.dumps(cfg))
    spec = get_model_spec(str(tmp_path))
    assert spec.expert_params == 3 * 8 * 16 and spec.moe_layer_indices == (0, 1)
    assert spec.expert_flops(5) == 2 * 3 * 8 * 16 * 5


def test_unknown_model_and_architecture_are_user_errors(tmp_path):
    with pytest.raises(UserError, match="unknown model 'gpt-5'"):
        get_model_spec("gpt-5")
    with pytest.raises(UserError, match="not a supported MoE architecture"):
        ModelSpec.from_hf_config({"model_type": "llama"})
    with pytest.raises(UserError, match="lacks the key"):
        ModelSpec.from_hf_config({"model_type": "olmoe"})
    (tmp_path / "config.json").write_text("{not json")
    with pytest.raises(UserError, match="not valid JSON"):
        get_model_spec(str(tmp_path))


def test_list_names_all_builtins():
    assert len(list_model_specs()) == 6
