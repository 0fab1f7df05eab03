"""Capacity planning on a tiny case with a known answer (a stand-in replay whose speed is a known
function of the budget)."""

from __future__ import annotations

import pytest
from conftest import make_structured_trace

from sim.analysis.plan import plan
from sim.modelspec import get_model_spec
from traces.errors import UserError
from traces.format import write_trace

MODEL = "qwen1.5-moe-a2.7b"
SPEC = get_model_spec(MODEL)
SEQ_LEN = 4
RESIDENT = SPEC.resident_bytes(SEQ_LEN)
"""What replay (sim/budget.py) counts as resident: the KV cache of the trace's longest sequence included."""
ROUTED = SPEC.routed_expert_bytes_total("bf16")
SPEED = {"lod": 10.0, "fate": 20.0}


def linear_runner(trace, *, policy, hw, memory_budget, as_model, overrides) -> dict:
    """decode tokens/s = SPEED[policy] * (share of the experts resident): lod reaches 5 tok/s at 50%,
    fate at 25%."""
    assert as_model == MODEL
    share = (int(memory_budget) - RESIDENT) / ROUTED
    if share < 0:
        raise UserError("budget below the resident part")
    return {"decode_tokens_per_s": SPEED[policy] * share, "prefill_tokens_per_s": 100.0 * share}


@pytest.fixture
def trace_file(tmp_path):
    path = tmp_path / "q.safetensors"
    write_trace(make_structured_trace(num_sequences=2, seq_len=SEQ_LEN, num_layers=24, num_experts=60, top_k=4,
                                      hidden=8), path)
    return path


def test_target_finds_smallest_budget_and_policy(trace_file) -> None:
    result = plan(MODEL, "h100-bound", target_decode=5.0, trace=trace_file, policies=["lod", "fate"],
                  runner=linear_runner)
    step = SPEC.expert_bytes("bf16")
    by_policy = {r.policy: r for r in result.rows}
    assert result.rows[0].policy == "fate"
    assert abs(by_policy["fate"].budget_bytes - (RESIDENT + 0.25 * ROUTED)) <= step
    assert abs(by_policy["lod"].budget_bytes - (RESIDENT + 0.5 * ROUTED)) <= step
    assert by_policy["fate"].decode_tokens_per_s >= 5.0
    assert result.answer.startswith("") and "with fate reaches 5 decode tokens/s" in result.answer
    assert "fate" in result.table().splitlines()[1]


def test_unreachable_target_says_so(trace_file) -> None:
    result = plan(MODEL, "h100-bound", target_decode=25.0, trace=trace_file, policies=["lod", "fate"],
                  runner=linear_runner)
    assert result.answer.startswith("no policy reaches 25 decode tokens/s")
    assert all(r.budget_bytes is None for r in result.rows)
    assert {r.decode_tokens_per_s for r in result.rows} == {10.0, 20.0}


def test_budget_mode_picks_fastest(trace_file) -> None:
    result = plan(MODEL, "h100-bound", budget="50%", trace=trace_file, policies=["lod", "fate"],
                  runner=linear_runner)
    assert [r.policy for r in result.rows] == ["fate", "lod"]
    assert result.rows[0].decode_tokens_per_s == pytest.approx(10.0, rel=1e-6)
    assert result.answer.startswith("best at")


def test_bad_requests(trace_file) -> None:
    with pytest.raises(UserError, match="exactly one"):
        plan(MODEL, "h100-bound", trace=trace_file, runner=linear_runner)
    with pytest.raises(UserError, match="unknown"):
        plan(MODEL, "h100-bound", target_decode=1.0, trace=trace_file, policies=["nosuch"], runner=linear_runner)
