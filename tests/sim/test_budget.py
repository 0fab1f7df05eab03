"""One budget definition (sim/budget.py) and its device-memory check, through every command that takes one."""

from __future__ import annotations

import json

import pytest

from sim.budget import largest_share, resolve_budget
from sim.modelspec import get_model_spec
from sim.replay import load, replay
from sim.synthetic import synthetic_trace
from tests.cli_run import run_cli as _run
from traces.errors import UserError
from traces.format import write_trace

QWEN = get_model_spec("qwen1.5-moe-a2.7b")
GTX_BYTES = 11811160064  # sim/profiles/gtx1080ti-bound.toml: an 11 GiB card


@pytest.fixture(scope="module")
def qwen_trace(tmp_path_factory):
    """A Qwen1.5-MoE-shaped trace: 2 sequences of 8 + 12 positions (max context 20 tokens)."""
    path = tmp_path_factory.mktemp("budget") / "q.safetensors"
    write_trace(synthetic_trace(sequences=2, prompt_tokens=8, decode_tokens=12, seed=4), path)
    return path


def test_percentage_is_resident_with_the_kv_cache_plus_that_share_of_the_experts() -> None:
    b = resolve_budget("25%", QWEN, kv_tokens=20)
    assert b.resident_bytes == QWEN.non_expert_bytes + QWEN.shared_expert_bytes_total + 20 * QWEN.kv_cache_bytes_per_token()
    assert b.total_bytes == b.resident_bytes + QWEN.routed_expert_bytes_total("bf16") // 4
    assert b.expert_bytes == b.total_bytes - b.resident_bytes and b.kv_tokens == 20
    assert resolve_budget("6GiB", QWEN, kv_tokens=20).total_bytes == 6 * 2**30
    assert resolve_budget(12345, QWEN, kv_tokens=0).total_bytes == 12345


def test_a_budget_above_the_device_names_both_figures_and_what_fits() -> None:
    with pytest.raises(UserError) as info:
        resolve_budget("100%", QWEN, kv_tokens=20, device_memory_bytes=GTX_BYTES, device="profile gtx1080ti-bound")
    text = str(info.value)
    assert "26.67 GiB" in text and "11.00 GiB" in text and "gtx1080ti-bound" in text and "\n" not in text
    share = largest_share(QWEN, 20, GTX_BYTES)
    assert f"({share:g}% of the routed experts)" in text
    assert resolve_budget(f"{share}%", QWEN, kv_tokens=20, device_memory_bytes=GTX_BYTES).total_bytes <= GTX_BYTES
    with pytest.raises(UserError):
        resolve_budget(f"{share + 0.1:.1f}%", QWEN, kv_tokens=20, device_memory_bytes=GTX_BYTES)
    with pytest.raises(UserError, match="at most 1.00 KiB; qwen1.5-moe-a2.7b's non-expert weights"):
        resolve_budget("2KiB", QWEN, kv_tokens=0, device_memory_bytes=1024)
    assert resolve_budget("11GiB", QWEN, kv_tokens=0, device_memory_bytes=GTX_BYTES).total_bytes == 11 * 2**30


def test_replay_refuses_a_budget_larger_than_the_profiles_device(qwen_trace) -> None:
    with pytest.raises(UserError, match="more than the 11.00 GiB of memory of profile gtx1080ti-bound"):
        replay(qwen_trace, policy="lru", hw="gtx1080ti-bound", memory_budget="100%")
    with pytest.raises(UserError, match="--memory-budget 500GiB"):
        replay(qwen_trace, policy="lru", hw="h100-bound", memory_budget="500GiB")
    ok = replay(qwen_trace, policy="lru", hw="h100-bound", memory_budget="100%")
    assert ok["memory_budget_bytes"] <= 85899345920 and ok["kv_cache_tokens"] == 20


@pytest.mark.parametrize("command", [
    ["replay", "--policy", "lru", "--memory-budget", "100%"],
    ["compare", "--policies", "lod,lru", "--memory-budget", "100%"],
])
def test_commands_refuse_it_with_one_line(capsys, qwen_trace, command: list[str]) -> None:
    code, out, err = _run(capsys, command[:1] + ["--trace", str(qwen_trace), "--hw", "gtx1080ti-bound"] + command[1:])
    assert code == 2 and out == ""
    assert err.startswith("fatesim: error: --memory-budget 100% is 26.") and err.count("\n") == 1
    assert "11.00 GiB of memory of profile gtx1080ti-bound" in err


def test_plan_budget_and_target_stay_within_the_device(capsys, qwen_trace) -> None:
    code, _, err = _run(capsys, ["plan", "--model", "qwen1.5-moe-a2.7b", "--hw", "rtx3090-bound", "--budget", "500GiB",
                                 "--trace", str(qwen_trace), "--policy", "lru", "--quiet"])
    assert code == 2 and "--budget 500GiB is 500.00 GiB, more than the 24.00 GiB" in err


def test_plan_and_replay_read_a_percentage_as_the_same_bytes(qwen_trace) -> None:
    """Issue 12 item 6: `plan --budget 25%` and `replay --memory-budget 25%` were different bytes."""
    from sim.analysis.plan import plan

    result = plan("qwen1.5-moe-a2.7b", "h100-bound", budget="25%", trace=qwen_trace, policies=["lru"])
    replayed = replay(qwen_trace, policy="lru", hw="h100-bound", memory_budget="25%")
    assert result.rows[0].budget_bytes == replayed["memory_budget_bytes"]
    assert result.rows[0].decode_tokens_per_s == replayed["decode_tokens_per_s"]
    assert result.expert_share(replayed["memory_budget_bytes"]) == pytest.approx(0.25, abs=1e-9)


def test_sweep_marks_configurations_above_the_device_failed_with_the_reason(tmp_path, qwen_trace) -> None:
    from sim.analysis.sweep import parse_grid, run_sweep

    configs = parse_grid('policy = ["lru"]\nbudget = ["10%", "100%"]\nprofile = ["gtx1080ti-bound"]\n')
    outcome = run_sweep(qwen_trace, configs, tmp_path / "cache", progress=False)
    status = {row["budget"]: row["status"] for row in outcome.rows}
    assert status == {"10%": "ok", "100%": "error"}
    (config, error), = outcome.failed
    assert config.budget == "100%"
    assert "grid key 'budget' 100% is 26." in error and "11.00 GiB of memory of profile gtx1080ti-bound" in error
    assert "--memory-budget" not in error


def test_sweep_failures_name_the_grid_key_not_the_replay_option(capsys, tmp_path, qwen_trace) -> None:
    """Issue 12 item 13: a too-small budget in a sweep said "raise --memory-budget"."""
    grid = tmp_path / "g.toml"
    grid.write_text('policy = ["lru"]\nbudget = ["1%", "20%"]\nlink_bandwidth = ["16GB"]\n')
    code, out, err = _run(capsys, ["sweep", "--trace", str(qwen_trace), "--grid", str(grid), "--out",
                                   str(tmp_path / "r.csv"), "--quiet"])
    assert code == 1 and "1 failed" in out
    assert "failed: policy=lru budget=1% profile=rtx3090-bound link_bandwidth=16 GB/s:" in err
    assert "raise grid key 'budget'" in err and "--memory-budget" not in err


def test_loaded_trace_json_kv_term_is_the_longest_sequence(qwen_trace) -> None:
    loaded = load(qwen_trace)
    assert loaded.workload.max_context == 20
    m = replay(loaded, policy="lod", memory_budget="10%")
    assert m["memory_budget_bytes"] == QWEN.resident_bytes(20) + int(0.10 * QWEN.routed_expert_bytes_total("bf16"))
    assert json.loads(json.dumps(m))["kv_cache_tokens"] == 20
