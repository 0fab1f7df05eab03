"""Traces that log only some MoE layers: refused unless --layers-subset, then every output says so."""

from __future__ import annotations

import dataclasses
import json

import pytest

from sim.layersubset import layer_coverage, subset_spec
from sim.modelspec import get_model_spec
from sim.replay import load, replay, resolve_spec
from sim.synthetic import synthetic_trace
from tests.cli_run import run_cli as _run
from traces.errors import UserError
from traces.format import TraceModelConfig, write_trace

LOGGED = (0, 8, 12, 18, 23)
QWEN = get_model_spec("qwen1.5-moe-a2.7b")


def partial_trace():
    """Five of Qwen1.5-MoE's 24 MoE layers, attributed as the vLLM importer does (HF id + source.model_spec)."""
    t = synthetic_trace(num_layers=5, sequences=2, prompt_tokens=6, decode_tokens=10, seed=3, lookahead_depth=0)
    cfg = dataclasses.replace(t.model_config, num_layers=24, moe_layer_indices=LOGGED)
    return dataclasses.replace(t, model="Qwen/Qwen1.5-MoE-A2.7B-Chat", model_config=cfg,
                               source={"kind": "imported", "model_spec": "qwen1.5-moe-a2.7b", "assumptions": []})


@pytest.fixture(scope="module")
def partial_file(tmp_path_factory):
    path = tmp_path_factory.mktemp("subset") / "five.safetensors"
    write_trace(partial_trace(), path)
    return path


def test_coverage_knows_the_models_layers() -> None:
    cov = layer_coverage(partial_trace())
    assert cov.partial and cov.logged == LOGGED and len(cov.model_layers) == 24 and cov.note() == "5 of 24 MoE layers"
    full = synthetic_trace(sequences=1, prompt_tokens=2, decode_tokens=2)  # model qwen1.5-moe-a2.7b, 24 layers
    assert not layer_coverage(full).partial and layer_coverage(full).note() == "24 of 24 MoE layers"
    unknown = dataclasses.replace(full, model="someone/else")
    assert layer_coverage(unknown).model_layers is None and not layer_coverage(unknown).partial


def test_subset_spec_is_the_model_made_of_those_layers_only() -> None:
    """Hand count: Qwen's layers are all MoE, so each dropped layer takes its attention, router, two norms,
    shared expert, routed experts and KV cache with it; embedding and head stay."""
    sub = subset_spec(QWEN, LOGGED)
    dropped = 24 - 5
    per_layer = QWEN.attention_params + QWEN.router_params + 2 * QWEN.hidden_size
    assert sub.num_layers == 5 and sub.num_moe_layers == 5 and sub.num_dense_layers == 0
    assert sub.non_expert_params == QWEN.non_expert_params - dropped * per_layer
    assert sub.kv_cache_bytes_per_token() * 24 == QWEN.kv_cache_bytes_per_token() * 5
    assert sub.routed_expert_bytes_total() * 24 == QWEN.routed_expert_bytes_total() * 5
    assert sub.shared_expert_bytes_total * 24 == QWEN.shared_expert_bytes_total * 5
    assert sub.expert_bytes("int4") == QWEN.expert_bytes("int4")
    with pytest.raises(UserError, match="has no MoE layer 0"):
        subset_spec(get_model_spec("deepseek-v2-lite"), (0, 5))


def test_a_partial_trace_is_refused_without_the_flag() -> None:
    with pytest.raises(UserError) as info:
        replay(partial_trace(), policy="lru", memory_budget="25%")
    text = str(info.value)
    assert "5 of 24 MoE layers of qwen1.5-moe-a2.7b" in text and "--layers-subset" in text and "\n" not in text


def test_with_the_flag_the_json_says_5_of_24() -> None:
    m = replay(partial_trace(), policy="lru", memory_budget="25%", layers_subset=True)
    assert m["moe_layers"] == {"replayed": 5, "of_model": 24, "decoder_indices": list(LOGGED)}
    assert any("5 of 24 MoE layers" in a for a in m["assumptions"])
    assert m["model"] == "qwen1.5-moe-a2.7b" and len(m["hit_rate_per_layer"]) == 5
    sub = subset_spec(QWEN, LOGGED)
    assert m["memory_budget_bytes"] == sub.resident_bytes(16) + int(0.25 * sub.routed_expert_bytes_total())
    assert resolve_spec(partial_trace(), None, layers_subset=True) == sub


def test_every_replay_output_line_that_reports_a_figure_says_so(capsys, partial_file) -> None:
    code, out, err = _run(capsys, ["replay", "--trace", str(partial_file), "--policy", "lru", "--layers-subset"])
    assert code == 0, err
    lines = {line.split("  ")[0]: line for line in out.splitlines()}
    for label in ("policy", "prefill", "decode", "layer steps", "assumption"):
        assert "5 of 24 MoE layers" in lines[label], label
    code, out, err = _run(capsys, ["replay", "--trace", str(partial_file), "--policy", "lru"])
    assert code == 2 and "--layers-subset" in err and err.count("\n") == 1


def test_compare_plan_and_sweep_say_so_too(capsys, tmp_path, partial_file) -> None:
    code, out, err = _run(capsys, ["compare", "--trace", str(partial_file), "--policies", "lod,lru", "--layers-subset"])
    assert code == 0, err
    footer = [line for line in out.splitlines() if line.startswith("model ")]
    assert footer and "(5 of 24 MoE layers)" in footer[0]
    assert any(line.startswith("assumption: 5 of 24 MoE layers") for line in out.splitlines())
    code, _, err = _run(capsys, ["compare", "--trace", str(partial_file), "--policies", "lod,lru"])
    assert code == 2 and "--layers-subset" in err and err.count("\n") == 1
    code, out, err = _run(capsys, ["plan", "--model", "qwen1.5-moe-a2.7b", "--hw", "h100-bound", "--budget", "20%",
                                   "--trace", str(partial_file), "--policy", "lru", "--layers-subset", "--quiet"])
    assert code == 0, err
    assert "5 of 24 MoE layers replayed" in out.splitlines()[0]
    from sim.analysis.sweep import parse_grid, run_sweep

    grid = 'policy = ["lru"]\nlayers_subset = [false, true]\n'
    outcome = run_sweep(partial_file, parse_grid(grid), tmp_path / "c", progress=False)
    refused, ok = outcome.rows
    assert refused["status"] == "error" and "--layers-subset" in refused["error"]
    assert ok["status"] == "ok" and json.loads(ok["moe_layers"])["of_model"] == 24


def test_real_vllm_logs_of_five_layers(realtraces, tmp_path) -> None:
    """The weiran0129 vLLM logs (Qwen1.5-MoE layers 0, 8, 12, 18, 23) as the README imports them."""
    from traces.importers.vllm_jsonl import import_vllm_jsonl

    logs = sorted((realtraces / "weiran0129__vLLM-MoE-Logger" / "Logs").glob("moe_layer*.jsonl"))
    trace = load(import_vllm_jsonl(logs))
    with pytest.raises(UserError, match="5 of 24 MoE layers"):
        replay(trace, policy="lod")
    m = replay(trace, policy="lod", layers_subset=True)
    assert m["moe_layers"]["replayed"] == 5 and m["moe_layers"]["of_model"] == 24
    assert m["model"] == "qwen1.5-moe-a2.7b"


def test_a_trace_of_every_layer_needs_no_flag_and_is_unchanged_by_it() -> None:
    full = synthetic_trace(sequences=1, prompt_tokens=4, decode_tokens=6, seed=1)
    plain = replay(full, policy="lru", memory_budget="25%")
    flagged = replay(full, policy="lru", memory_budget="25%", layers_subset=True)
    assert plain == flagged and plain["moe_layers"]["replayed"] == plain["moe_layers"]["of_model"] == 24
    assert plain["assumptions"] == []


def test_an_unknown_models_trace_is_taken_as_whole() -> None:
    cfg = TraceModelConfig(architecture="qwen2_moe", num_layers=24, moe_layer_indices=LOGGED, num_experts=60, top_k=4,
                           num_shared_experts=1, hidden_size=2048, expert_intermediate_size=1408,
                           shared_expert_intermediate_size=5632, dtype="bfloat16")
    t = dataclasses.replace(partial_trace(), model="somebody/else", model_config=cfg, source={"kind": "imported"})
    assert replay(t, policy="lru", memory_budget="25%")["moe_layers"]["of_model"] == 5
