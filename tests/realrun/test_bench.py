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


def test_bench_runs_every_contender_on_a_small_model(tmp_path) -> None:
    """The whole benchmark pipeline, on shrunken shapes: every contender generates the same tokens (lossless
    ones) and reports rates and ratios."""
    from realrun.bench import run_bench

    small = dict(vocab_size=256, hidden_size=64, intermediate_size=128, moe_intermediate_size=64,
                 shared_expert_intermediate_size=128, num_attention_heads=4, num_key_value_heads=4, num_experts=8,
                 num_experts_per_tok=2)
    report = run_bench(num_layers=2, num_prompts=2, prompt_tokens=6, new_tokens=3, budget="40%", cache=tmp_path,
                       contenders=("lod", "lru", "fate", "accelerate-disk", "in-ram"), model_overrides=small)
    results = report["results"]
    assert results["lod"]["decode_vs_lod"] == 1.0
    assert results["lod"]["generated"] == results["lru"]["generated"] == results["in-ram"]["generated"]
    assert results["accelerate-disk"]["generated"] == results["in-ram"]["generated"]
    assert "disk" in results["accelerate-disk"]["placement"]
    assert all(r["prefill_tokens_per_s"] > 0 and r["decode_tokens_per_s"] > 0 for r in results.values())
