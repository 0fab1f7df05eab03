"""The engine on hand-computed tiny traces, and the SimPy driver against the fast driver."""

from __future__ import annotations

import json

import pytest
from sim_fixtures import tiny_profile, tiny_trace

from sim.costs import CostModel
from sim.policies.presets import PRESETS, build_policy
from sim.replay import load, replay, resolve_spec
from sim.synthetic import synthetic_trace

HW = tiny_profile()


def _setup(trace, slots: int):
    spec = resolve_spec(trace, None)
    costs = CostModel(spec, HW)
    budget = spec.resident_bytes(trace.num_tokens) + slots * spec.expert_bytes("bf16")
    return spec, costs, budget


def _decode_compute_s(costs: CostModel, trace) -> float:
    """Attention + router of every layer of every decode token (context = position + 1)."""
    router_s = HW.gpu.kernel_launch_s
    return sum(trace.num_moe_layers * (costs.attention_s(1, int(p) + 1) + router_s) for p in trace.positions)


def test_load_on_demand_decode_time_is_the_sum_of_compute_and_transfers() -> None:
    """Top-1 lod: every layer step = attention + router + one transfer + one expert, nothing overlaps."""
    trace = tiny_trace([[[0], [1]], [[0], [2]], [[3], [1]]], num_experts=4)
    spec, costs, budget = _setup(trace, slots=2)
    x = HW.link.latency_s + spec.expert_bytes("bf16") / HW.link.bandwidth_bytes_per_s
    e = costs.expert_s(1, "bf16")
    assert x == pytest.approx(13.288e-6) and e == pytest.approx(13.288e-6)
    total = _decode_compute_s(costs, trace) + 6 * (x + e)
    m = replay(trace, policy="lod", hw=HW, memory_budget=budget)
    assert m["tpot_s"] == pytest.approx(total / 3, rel=1e-12)
    assert m["decode_tokens_per_s"] == pytest.approx(3 / total, rel=1e-12)
    assert m["gpu_stall_s"] == pytest.approx(6 * x, rel=1e-12)
    assert m["bytes_transferred"]["on_demand"] == 6 * spec.expert_bytes("bf16")
    assert m["hit_rate"] == 0.0 and m["layer_steps"] == 6


def test_load_on_demand_overlaps_compute_with_the_next_transfer() -> None:
    """Top-2 lod: the first expert computes while the second arrives: layer = 2 transfers + 1 expert."""
    trace = tiny_trace([[[0, 1], [2, 3]], [[0, 1], [2, 3]]], num_experts=4)
    spec, costs, budget = _setup(trace, slots=4)
    x = HW.link.transfer_s(spec.expert_bytes("bf16"))
    e = costs.expert_s(1, "bf16")
    total = _decode_compute_s(costs, trace) + 4 * (2 * x + e)
    m = replay(trace, policy="lod", hw=HW, memory_budget=budget)
    assert m["tpot_s"] * 2 == pytest.approx(total, rel=1e-12)


def test_a_cache_that_holds_everything_stalls_only_on_compulsory_misses() -> None:
    """LRU with room for every expert: 4 distinct (layer, expert) pairs -> 4 stalls of one transfer each."""
    trace = tiny_trace([[[0], [2]], [[1], [2]], [[0], [3]], [[1], [2]]], num_experts=4)
    spec, costs, budget = _setup(trace, slots=8)
    x = HW.link.transfer_s(spec.expert_bytes("bf16"))
    e = costs.expert_s(1, "bf16")
    m = replay(trace, policy="lru", hw=HW, memory_budget=budget)
    assert m["gpu_stall_s"] == pytest.approx(4 * x, rel=1e-12)
    assert m["hit_rate"] == pytest.approx(4 / 8)
    assert m["bytes_transferred"]["on_demand"] == 4 * spec.expert_bytes("bf16")
    total = _decode_compute_s(costs, trace) + 8 * e + 4 * x
    assert m["tpot_s"] * 4 == pytest.approx(total, rel=1e-12)


def test_a_correct_prefetch_hides_a_transfer_shorter_than_the_layer() -> None:
    """Oracle prefetch of layer 1 at layer 0's gate input lands before layer 1 needs it: only the very first
    (layer 0) miss stalls; attention alone (~32 µs) outlasts a transfer (~13 µs)."""
    trace = tiny_trace([[[0], [1]], [[0], [2]], [[0], [3]]], num_experts=4)
    spec, costs, budget = _setup(trace, slots=4)
    x = HW.link.transfer_s(spec.expert_bytes("bf16"))
    assert costs.attention_s(1, 1) > x
    m = replay(trace, policy="oracle", hw=HW, memory_budget=budget)
    assert m["gpu_stall_s"] == pytest.approx(x, rel=1e-12)
    assert m["prefetch_precision"] == 1.0 and m["prefetch_recall"] == 1.0
    assert m["bytes_transferred"]["prefetch_used"] == 3 * spec.expert_bytes("bf16")
    none = replay(trace, policy="oracle", hw=HW, memory_budget=budget, overrides={"prefetch": "none"})
    assert none["gpu_stall_s"] == pytest.approx(4 * x, rel=1e-12)


def test_prefill_with_fewer_slots_than_experts_reuses_slots_in_compute_order() -> None:
    """lod prefill of 4 tokens over 4 experts with 2 slots: the 3rd load waits for the 1st expert's compute."""
    trace = tiny_trace([[[0]], [[1]], [[2]], [[3]], [[0]]], num_experts=4, prefill=4)
    spec, costs, budget = _setup(trace, slots=1 * 2)
    x = HW.link.transfer_s(spec.expert_bytes("bf16"))
    e = costs.expert_s(1, "bf16")
    route = costs.attention_s(4, 4) + HW.gpu.kernel_launch_s
    link, gpu, computed = route, route, []
    for i in range(4):  # load i may start once its slot is free: slot of expert i-2 after its compute
        start = max(link, computed[i - 2] if i >= 2 else route)
        link = start + x
        gpu = max(gpu, link) + e
        computed.append(gpu)
    m = replay(trace, policy="lod", hw=HW, memory_budget=budget)
    assert m["ttft_s"] == pytest.approx(gpu, rel=1e-12)
    assert m["peak_expert_bytes"] <= budget - spec.resident_bytes(trace.num_tokens)


@pytest.fixture(scope="module")
def small_synthetic():
    return load(synthetic_trace(sequences=2, prompt_tokens=12, decode_tokens=25, seed=3))


@pytest.mark.parametrize("policy", list(PRESETS))
def test_simpy_driver_matches_the_fast_driver(small_synthetic, policy: str) -> None:
    """The SimPy processes and the closed-form loop give identical metrics for every preset."""
    fast = replay(small_synthetic, policy=policy, memory_budget="15%")
    simpy = replay(small_synthetic, policy=policy, memory_budget="15%", mode="simpy")
    assert fast == simpy


@pytest.mark.parametrize("budget", ["8%", "15%", "40%"])
def test_resident_expert_bytes_never_exceed_the_budget(small_synthetic, budget: str) -> None:
    for policy in PRESETS:
        m = replay(small_synthetic, policy=policy, memory_budget=budget)
        assert 0 < m["peak_expert_bytes"] <= m["expert_budget_bytes"], policy


def test_equal_inputs_give_identical_outputs(small_synthetic) -> None:
    a = replay(small_synthetic, policy="fate", memory_budget="20%")
    b = replay(load(synthetic_trace(sequences=2, prompt_tokens=12, decode_tokens=25, seed=3)), policy="fate",
               memory_budget="20%")
    assert a == b


def test_timeline_has_one_track_per_resource(small_synthetic, tmp_path) -> None:
    path = tmp_path / "t.json"
    m = replay(small_synthetic, policy="fate", memory_budget="15%", timeline=path)
    events = json.loads(path.read_text())["traceEvents"]
    names = {e["args"]["name"] for e in events if e["ph"] == "M" and e["name"] == "thread_name"}
    assert names == {"GPU stream", "CPU predictor", "CPU experts", "copy engine 0"}
    spans = [e for e in events if e["ph"] == "X"]
    assert all(e["dur"] >= 0 for e in spans)
    assert sum(e["tid"] == 10 for e in spans) > 0
    last = max(e["ts"] + e["dur"] for e in spans if e["tid"] == 1)
    steps = m["layer_steps"] // 24
    assert last == pytest.approx((steps - 2 * 1) * m["tpot_s"] * 1e6 + 2 * m["ttft_s"] * 1e6, rel=1e-6)


@pytest.mark.parametrize("policy", ["fate", "speculate", "mixtral-offloading"])
def test_presorted_lookahead_rankings_match_sorting_each_time(small_synthetic, policy: str) -> None:
    """The engine's pre-sorted look-ahead rankings (a speed path) change no decision."""
    from sim.engine import Engine
    from sim.hardware import load_profile
    from sim.policies.controller import OffloadController

    spec = resolve_spec(small_synthetic.trace, None)
    hw = load_profile("rtx3090-bound")
    results = []
    for presorted in (True, False):
        workload = small_synthetic.workload
        ctl = OffloadController(spec, build_policy(policy), 3 << 30, hw=hw, future=workload.future,
                                popularity=workload.popularity)
        out = Engine(workload, ctl, CostModel(spec, hw), presorted=presorted).run()
        results.append((out.step_end_at, out.gpu_stall_s, ctl.stats))
    assert results[0] == results[1]


@pytest.mark.parametrize("budget", ["7%", "15%", "60%"])
def test_lod_closed_form_matches_the_engine(small_synthetic, budget: str) -> None:
    """sim/fastpath.py replays load-on-demand with the engine's arithmetic: identical metrics, including
    prefill steps that route more experts than a layer has slots (7%: 4 slots) and quantised transfers."""
    for overrides in ({}, {"precision": "int4"}):
        fast = replay(small_synthetic, policy="lod", memory_budget=budget, overrides=overrides)
        engine = replay(small_synthetic, policy="lod", memory_budget=budget, overrides=overrides, mode="engine")
        assert fast == engine


@pytest.mark.parametrize("policy, overrides", [
    ("fate", {"cancel_stale": "false"}), ("speculate", {"cancel_stale": "false", "lookahead": "2"}),
    ("eap", {}), ("lod", {}), ("cpu-exec", {}),
])
def test_two_copy_engines_and_kept_stale_prefetches(policy: str, overrides: dict) -> None:
    """Two copy engines, stale prefetches left to land: SimPy and the plain loop agree, the budget holds,
    and a second copy engine never slows a replay down."""
    loaded = load(synthetic_trace(sequences=1, prompt_tokens=10, decode_tokens=20, seed=4, lookahead_depth=2))
    hw2 = tiny_profile(link__copy_engines=2, link__bandwidth_bytes_per_s=2.0e8)
    hw1 = tiny_profile(link__bandwidth_bytes_per_s=2.0e8)
    two = replay(loaded, policy=policy, hw=hw2, memory_budget="12%", overrides=overrides, mode="engine")
    assert two == replay(loaded, policy=policy, hw=hw2, memory_budget="12%", overrides=overrides, mode="simpy")
    assert two["peak_expert_bytes"] <= two["expert_budget_bytes"]
    one = replay(loaded, policy=policy, hw=hw1, memory_budget="12%", overrides=overrides, mode="engine")
    if policy in ("lod", "cpu-exec"):  # decisions do not depend on timing: only the link differs
        assert two["tpot_s"] <= one["tpot_s"] * (1 + 1e-12)
