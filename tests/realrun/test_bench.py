"""The benchmark's generated model really has Qwen1.5-MoE-A2.7B's expert shapes."""

from __future__ import annotations

from realrun.bench import format_table, qwen_shaped_config
from sim.modelspec import ModelSpec, get_model_spec


def test_bench_model_has_qwen_expert_shapes() -> None:
    """Hidden 2048, 60 experts of 1408, top-4, shared 4x1408: the same bytes per expert as the real model."""
    cfg = {"model_type": "qwen2_moe", **qwen_shaped_config(3)}
    ours, qwen = ModelSpec.from_hf_config(cfg, name="bench"), get_model_spec("qwen1.5-moe-a2.7b")
    for attr in ("hidden_size", "num_experts", "top_k", "expert_intermediate_size", "shared_expert_intermediate_size",
                 "num_attention_heads"):
        assert getattr(ours, attr) == getattr(qwen, attr), attr
    assert ours.num_moe_layers == 3
    assert ours.expert_bytes("int4") == qwen.expert_bytes("int4")


def test_table_reports_ratios_to_lod() -> None:
    """The Markdown table prints each contender's rates and its ratio to lod."""
    report = {"results": {
        "lod": {"prefill_tokens_per_s": 2.0, "decode_tokens_per_s": 0.5, "prefill_vs_lod": 1.0, "decode_vs_lod": 1.0,
                "hit_rate": 0.1},
        "fate": {"prefill_tokens_per_s": 6.0, "decode_tokens_per_s": 2.5, "prefill_vs_lod": 3.0, "decode_vs_lod": 5.0,
                 "hit_rate": 0.6}}}
    table = format_table(report)
    assert "| fate | 6.00 | 2.500 | 3.00x | 5.00x | 0.600 |" in table
