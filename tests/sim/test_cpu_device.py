"""A CPU compute device: CPU-executed experts share the compute stream, and transfers slow compute."""

from __future__ import annotations

import pytest
from sim_fixtures import tiny_profile, tiny_trace

from sim.costs import CostModel
from sim.policies.presets import PRESETS
from sim.replay import load, replay, resolve_spec
from sim.synthetic import synthetic_trace


def _costs(trace, hw) -> tuple[CostModel, float, float]:
    spec = resolve_spec(trace, None)
    costs = CostModel(spec, hw)
    return costs, hw.link.transfer_s(spec.expert_bytes("bf16")), costs.expert_s(1, "bf16")


def test_cpu_executed_experts_run_after_the_device_experts_on_a_cpu_device() -> None:
    """cpu-exec, top-2, two slots pinned to experts 0 and 1 (the most popular): the last token's expert 2
    runs "on the CPU". A GPU overlaps it with expert 0 (the layer takes max of both); a CPU device runs it
    after expert 0 on the same stream (the sum), with no stall."""
    trace = tiny_trace([[[0, 1]], [[0, 1]], [[0, 2]]], num_experts=4)
    results = {}
    for kind in ("cuda", "cpu"):
        hw = tiny_profile(device__kind=kind, cpu__memory_bytes_per_s=0.5e9)  # CPU expert: 2x the bytes time
        costs, _, e = _costs(trace, hw)
        spec = resolve_spec(trace, None)
        budget = spec.resident_bytes(trace.num_tokens) + 2 * spec.expert_bytes("bf16")
        results[kind] = (replay(trace, policy="cpu-exec", hw=hw, memory_budget=budget), costs, e)
    (gpu, costs, e), (cpu, _, _) = results["cuda"], results["cpu"]
    c = costs.cpu_expert_s(1)
    assert c == pytest.approx(2 * e - 2 * HW_ROUTER_S)  # 2x the bytes time, no launch cost on the CPU
    assert gpu["hit_rate"] == pytest.approx(5 / 6)
    step = [costs.attention_s(1, p + 1) + HW_ROUTER_S for p in range(3)]
    assert gpu["tpot_s"] * 3 == pytest.approx(step[0] + step[1] + step[2] + 2 * e + 2 * e + max(e, c), rel=1e-12)
    assert cpu["tpot_s"] * 3 == pytest.approx(step[0] + step[1] + step[2] + 2 * e + 2 * e + e + c, rel=1e-12)
    assert gpu["gpu_stall_s"] == pytest.approx(c - e, rel=1e-12) and cpu["gpu_stall_s"] == 0.0


HW_ROUTER_S = tiny_profile().gpu.kernel_launch_s


def test_compute_beside_a_transfer_slows_by_the_contention_factor() -> None:
    """Top-2 lod with x = e (tiny profile) and copy_contention 2: expert 0 computes while expert 1's load
    is in flight for x, so it takes x + (e - x / 2) = 1.5 e; expert 1 then starts on an idle link. Per
    layer: x + 1.5 e + e instead of 2x + e."""
    trace = tiny_trace([[[0, 1], [2, 3]], [[0, 1], [2, 3]]], num_experts=4)
    plain_hw, slow_hw = tiny_profile(), tiny_profile(gpu__copy_contention=2.0)
    costs, x, e = _costs(trace, plain_hw)
    assert x == pytest.approx(e)
    spec = resolve_spec(trace, None)
    budget = spec.resident_bytes(trace.num_tokens) + 4 * spec.expert_bytes("bf16")
    compute = sum(2 * (costs.attention_s(1, p + 1) + HW_ROUTER_S) for p in range(2))
    plain = replay(trace, policy="lod", hw=plain_hw, memory_budget=budget)
    slow = replay(trace, policy="lod", hw=slow_hw, memory_budget=budget)
    assert plain["tpot_s"] * 2 == pytest.approx(compute + 4 * (2 * x + e), rel=1e-12)
    assert slow["tpot_s"] * 2 == pytest.approx(compute + 4 * (x + 1.5 * e + e), rel=1e-12)


@pytest.fixture(scope="module")
def small_synthetic():
    return load(synthetic_trace(sequences=2, prompt_tokens=12, decode_tokens=25, seed=3))


@pytest.mark.parametrize("policy", list(PRESETS))
def test_drivers_agree_on_a_contended_cpu_device(small_synthetic, policy: str) -> None:
    """The SimPy driver and the plain loop give identical metrics with contention and CPU execution on the
    compute stream; contention never makes a replay faster."""
    hw = tiny_profile(device__kind="cpu", gpu__copy_contention=1.3)
    fast = replay(small_synthetic, policy=policy, hw=hw, memory_budget="15%")
    assert fast == replay(small_synthetic, policy=policy, hw=hw, memory_budget="15%", mode="simpy")
    plain = replay(small_synthetic, policy=policy, hw=tiny_profile(device__kind="cpu"), memory_budget="15%")
    assert fast["decode_tokens_per_s"] <= plain["decode_tokens_per_s"]
    assert fast["prefill_tokens_per_s"] <= plain["prefill_tokens_per_s"]
