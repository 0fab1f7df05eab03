"""Sweeps: grid parsing, caching by configuration hash, failure isolation, local processes and Ray."""

from __future__ import annotations

import sys

import pytest
from conftest import make_structured_trace

from sim.analysis.sweep import parse_grid, read_results, run_sweep, sweep
from traces.errors import UserError
from traces.format import write_trace

CALLS: list[str] = []


def toy_runner(trace, *, policy, hw, memory_budget, as_model, overrides) -> dict:
    """A stand-in for sim.replay.replay with a metric that depends on the configuration; fails for 'lru'."""
    CALLS.append(policy)
    if policy == "lru":
        raise RuntimeError("boom\nsecond line")
    budget = float(memory_budget.rstrip("%"))
    return {"decode_tokens_per_s": budget * (2.0 if policy == "fate" else 1.0) + overrides.get("int2_rate", 0.0),
            "hit_rate": budget / 100.0, "hit_rate_per_layer": [budget / 100.0] * trace.num_moe_layers,
            "bytes_transferred": {"on_demand": 10, "total": 12}, "profile": getattr(hw, "name", hw)}


GRID = """
policy = ["lod", "fate"]
budget = ["10%", "50%"]
profile = "rtx3090-bound"
[set]
int2_rate = [0.3, 0.5]
"""


@pytest.fixture
def trace_file(tmp_path):
    path = tmp_path / "t.safetensors"
    write_trace(make_structured_trace(num_sequences=2, seq_len=8, hidden=8), path)
    return path


def test_grid_is_a_cartesian_product() -> None:
    configs = parse_grid('link_bandwidth = ["12GB", 25e9]\n' + GRID)
    assert len(configs) == 2 * 2 * 2 * 2
    assert {c.link_bandwidth_bytes_per_s for c in configs} == {12e9, 25e9}
    assert configs[0].overrides == (("int2_rate", 0.3),)


@pytest.mark.parametrize("text, message", [
    ("policy = [", "not valid TOML"),
    ('policy = ["lod"]\nbudgets = ["1%"]', "unknown key 'budgets'"),
    ('budget = ["1%"]', "no 'policy'"),
    ("policy = []", "empty list"),
    ('policy = ["lod"]\nlink_bandwidth = ["fast"]', "cannot read size"),
])
def test_bad_grids_are_user_errors(text: str, message: str) -> None:
    with pytest.raises(UserError, match=message):
        parse_grid(text)


def test_unknown_preset_refused_before_running(trace_file, tmp_path) -> None:
    with pytest.raises(UserError, match="nosuch"):
        run_sweep(trace_file, parse_grid('policy = ["nosuch"]'), tmp_path / "c", runner=toy_runner, progress=False)


def test_cache_and_failure_isolation(trace_file, tmp_path) -> None:
    """First run computes all 8 (one failing config among 3 policies x 2 budgets -> 2 failures, 4 ok);
    a re-run computes only the failed ones; one more budget computes only its configurations."""
    grid = 'policy = ["lod", "lru", "fate"]\nbudget = ["10%", "50%"]\n'
    CALLS.clear()
    first = run_sweep(trace_file, parse_grid(grid), tmp_path / "c", runner=toy_runner, progress=False)
    assert first.computed == 6 and len(CALLS) == 6 and first.cached == 0
    assert [r["status"] for r in first.rows] == ["ok", "ok", "error", "error", "ok", "ok"]
    assert first.rows[2]["error"] == "RuntimeError: boom second line"
    assert first.rows[4]["decode_tokens_per_s"] == 20.0 and first.rows[4]["bytes_total"] == 12
    CALLS.clear()
    second = run_sweep(trace_file, parse_grid(grid), tmp_path / "c", runner=toy_runner, progress=False)
    assert CALLS == ["lru", "lru"] and second.cached == 4
    assert [r.get("decode_tokens_per_s") for r in second.rows] == [r.get("decode_tokens_per_s") for r in first.rows]
    CALLS.clear()
    run_sweep(trace_file, parse_grid(grid.replace('"50%"]', '"50%", "70%"]')), tmp_path / "c",
              runner=toy_runner, progress=False)
    assert sorted(CALLS) == ["fate", "lod", "lru", "lru", "lru"]


def test_process_pool_and_results_files(trace_file, tmp_path) -> None:
    """Two worker processes; CSV and Parquet files read back with the same values; unwritable output."""
    grid = tmp_path / "g.toml"
    grid.write_text(GRID)
    for name in ("r.csv", "r.parquet"):
        outcome = sweep(str(trace_file), str(grid), str(tmp_path / name), workers=2, progress=False,
                        runner=toy_runner)
        rows = read_results(tmp_path / name)
        assert len(rows) == 8 and all(r["status"] == "ok" for r in rows)
        assert [r["decode_tokens_per_s"] for r in rows] == [r["decode_tokens_per_s"] for r in outcome.rows]
    with pytest.raises(UserError, match="cannot write"):
        sweep(str(trace_file), str(grid), str(tmp_path / "missing" / "r.csv"), runner=toy_runner)
    with pytest.raises(UserError, match=r"\.csv or \.parquet"):
        sweep(str(trace_file), str(grid), str(tmp_path / "r.txt"), runner=toy_runner)


def test_unreachable_ray_is_a_user_error(trace_file, tmp_path) -> None:
    with pytest.raises(UserError, match="cannot reach Ray"):
        run_sweep(trace_file, parse_grid('policy = ["lod"]'), tmp_path / "c", runner=toy_runner,
                  ray_address="127.0.0.1:1", progress=False)


@pytest.mark.slow
def test_ray_local_cluster(trace_file, tmp_path) -> None:
    """A local one-CPU Ray runs the grid as tasks; results equal the in-process run's."""
    pytest.importorskip("ray")
    import ray
    import ray.cloudpickle

    ray.cloudpickle.register_pickle_by_value(sys.modules[__name__])  # workers cannot import this test module
    ray.init(num_cpus=1, include_dashboard=False, log_to_driver=False)
    try:
        remote = run_sweep(trace_file, parse_grid(GRID), tmp_path / "ray", runner=toy_runner,
                           ray_address="auto", progress=False)
    finally:
        ray.shutdown()
    local = run_sweep(trace_file, parse_grid(GRID), tmp_path / "local", runner=toy_runner, progress=False)
    assert [r["decode_tokens_per_s"] for r in remote.rows] == [r["decode_tokens_per_s"] for r in local.rows]


def test_config_columns_win_over_metric_keys(trace_file, tmp_path) -> None:
    """The runner reports the profile as 'rtx3090-bound@25GB/s'; the row keeps the grid's profile name and
    the bandwidth in its own column (plots group by them)."""
    configs = parse_grid('policy = ["lod"]\nlink_bandwidth = ["25GB"]\n')
    row = run_sweep(trace_file, configs, tmp_path / "c", runner=toy_runner, progress=False).rows[0]
    assert row["profile"] == "rtx3090-bound" and row["link_bandwidth_bytes_per_s"] == 25e9
