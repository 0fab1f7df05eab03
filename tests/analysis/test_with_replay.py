"""Sweep, plan and the learned predictor against the real simulator (sim.replay) on a small synthetic trace."""

from __future__ import annotations

import numpy as np
import pytest

from sim.analysis.estimator import LearnedEstimator, make_score_fn, save_estimator, step_token_slices
from sim.analysis.plan import plan
from sim.analysis.sweep import parse_grid, run_sweep
from sim.modelspec import get_model_spec
from sim.replay import replay
from sim.synthetic import synthetic_trace
from traces.format import write_trace


@pytest.fixture(scope="module")
def small_trace(tmp_path_factory):
    trace = synthetic_trace(num_layers=4, num_experts=8, top_k=2, sequences=2, prompt_tokens=8, decode_tokens=24,
                            model="tiny-moe", hidden_size=256, expert_intermediate_size=512,
                            shared_expert_intermediate_size=0, seed=3)
    path = tmp_path_factory.mktemp("t") / "tiny.safetensors"
    write_trace(trace, path)
    return trace, path


def test_sweep_runs_replay_and_caches(small_trace, tmp_path) -> None:
    """lod never hits; a full budget with lru beats lod; a re-run computes nothing."""
    _, path = small_trace
    configs = parse_grid('policy = ["lod", "lru"]\nbudget = ["25%", "100%"]\n')
    first = run_sweep(path, configs, tmp_path / "c", progress=False)
    assert first.computed == 4 and not first.failed
    by = {(r["policy"], r["budget"]): r for r in first.rows}
    assert by[("lod", "100%")]["hit_rate"] == 0.0
    assert by[("lru", "100%")]["decode_tokens_per_s"] > by[("lod", "100%")]["decode_tokens_per_s"]
    second = run_sweep(path, configs, tmp_path / "c", progress=False)
    assert second.computed == 0 and second.cached == 4
    assert [r["decode_tokens_per_s"] for r in second.rows] == [r["decode_tokens_per_s"] for r in first.rows]


def test_plan_with_replay(tmp_path) -> None:
    """On a Qwen-shaped trace: the answer meets the target, and the same policy two experts' bytes below
    the answer does not (LRU decode speed grows with the budget here)."""
    trace = synthetic_trace(sequences=1, prompt_tokens=8, decode_tokens=16, seed=1)
    path = tmp_path / "q.safetensors"
    write_trace(trace, path)
    speed = {b: replay(trace, policy="lru", hw="rtx3090-bound", memory_budget=b)["decode_tokens_per_s"]
             for b in ("10%", "85%")}  # 100% of Qwen1.5-MoE (26.7 GiB) does not fit the RTX 3090's 24 GiB
    target = (speed["10%"] + speed["85%"]) / 2
    result = plan("qwen1.5-moe-a2.7b", "rtx3090-bound", target_decode=target, trace=path, policies=["lru"])
    row = result.rows[0]
    assert row.policy == "lru" and row.decode_tokens_per_s >= target
    assert "with lru reaches" in result.answer
    below = row.budget_bytes - 2 * get_model_spec("qwen1.5-moe-a2.7b").expert_bytes("bf16")
    assert replay(trace, policy="lru", hw="rtx3090-bound", memory_budget=below)["decode_tokens_per_s"] < target


def test_learned_score_fn_drives_replay(small_trace, tmp_path) -> None:
    """An estimator plugs into replay's `learned` predictor; steps map to the engine's step numbering."""
    trace, _ = small_trace
    num_layers, e = trace.num_moe_layers, trace.num_experts
    hidden = 16
    gate = np.random.default_rng(0).standard_normal((trace.num_tokens, num_layers, hidden)).astype(np.float16)
    import dataclasses

    with_gate = dataclasses.replace(trace, gate_inputs=gate)
    est = LearnedEstimator(np.zeros((num_layers, 1, hidden, e), np.float32), np.zeros((num_layers, 1, e), np.float32),
                           {"model": "tiny-moe"})
    save_estimator(est, tmp_path / "e.safetensors")
    steps = step_token_slices(with_gate)
    assert len(steps) == 2 * (1 + 24) and steps[0] == slice(0, 8) and steps[1] == slice(8, 9)
    metrics = replay(with_gate, policy="lru", hw="rtx3090-bound", memory_budget="50%",
                     overrides={"prediction": "learned", "prefetch": "topk"}, score_fn=make_score_fn(est, with_gate))
    assert metrics["decode_tokens_per_s"] > 0
