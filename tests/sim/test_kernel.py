"""The compiled kernel (sim/kernel) against the reference engine and controller: identical metrics.

Hypothesis draws tiny traces (random routing, look-ahead logits from a handful of extreme values, so that
probabilities underflow to 0 and tie), a preset with random `--set` overrides, a GPU or CPU profile with
one or two copy engines and a fast or slow link, and a budget from one layer's top-k to every expert.
"""

from __future__ import annotations

import sys

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from sim_fixtures import tiny_profile, tiny_trace

from sim import kernel
from sim.policies.presets import PRESETS, build_policy
from sim.replay import load, replay, resolve_spec
from sim.synthetic import synthetic_trace
from traces.errors import UserError

LOGITS = np.array([-60000.0, -40.0, -1.0, 0.0, 0.5, 3.0, 40.0, 60000.0], dtype=np.float16)
"""Look-ahead logit values: softmax over them underflows to exactly 0 and ties often."""

OVERRIDES = {
    "eviction": ["lru", "lfu", "arc", "belady", "none"],
    "prefetch": ["none", "fate", "topk", "all"],
    "prediction": ["none", "crosslayer", "speculative", "oracle", "eap"],
    "eap_history": ["1", "2", "256"],  # 1, 2: the ring of stored paths wraps
    "precision": ["bf16", "int4", "fate-hybrid"],
    "miss": ["wait", "cpu", "speculated", "lowbit"],
    "allocation": ["uniform", "shallow", "popularity"],
    "lookahead": ["1", "2"],
    "prefetch_count": ["1", "2", "5"],
    "confidence": ["0", "0.2"],
    "cancel_stale": ["true", "false"],
    "serial_loads": ["true", "false"],
    "int2_rate": ["0.3", "0.9"],
}


@st.composite
def cases(draw):
    num_layers = draw(st.integers(2, 3))
    num_experts = draw(st.integers(3, 8))
    top_k = draw(st.integers(1, min(2, num_experts)))
    sequences = draw(st.integers(1, 2))
    prefill = draw(st.integers(0, 5))
    per_seq = prefill + draw(st.integers(1, 6))
    rng = np.random.default_rng(draw(st.integers(0, 2**32 - 1)))
    topk = [[rng.choice(num_experts, size=top_k, replace=False).tolist() for _ in range(num_layers)]
            for _ in range(sequences * per_seq)]
    depth = draw(st.integers(1, 2))
    lookahead = rng.choice(LOGITS, size=(depth, sequences * per_seq, num_layers, num_experts)).astype(np.float16)
    trace = tiny_trace(topk, num_experts=num_experts, prefill=prefill, sequences=sequences, lookahead=lookahead)
    preset = draw(st.sampled_from(sorted(PRESETS)))
    keys = draw(st.lists(st.sampled_from(sorted(OVERRIDES)), max_size=4, unique=True))
    overrides = {key: draw(st.sampled_from(OVERRIDES[key])) for key in keys}
    hw = tiny_profile(link__copy_engines=draw(st.integers(1, 2)),
                      link__bandwidth_bytes_per_s=draw(st.sampled_from([1.0e9, 5.0e7])),
                      device__kind=draw(st.sampled_from(["cuda", "cpu"])),
                      gpu__copy_contention=draw(st.sampled_from([1.0, 1.7])))  # 1.7: a calibrated CPU profile
    slots = draw(st.integers(top_k, num_experts))
    return trace, preset, overrides, hw, slots


def _budget(trace, slots: int) -> int:
    spec = resolve_spec(trace, None)
    return spec.resident_bytes(trace.num_tokens) + slots * trace.num_moe_layers * spec.expert_bytes("bf16")


def _both(trace, preset, overrides, hw, budget):
    out = []
    for mode in ("fast", "engine"):
        try:
            out.append(replay(trace, policy=preset, hw=hw, memory_budget=budget, overrides=overrides, mode=mode))
        except UserError as error:
            out.append(("error", str(error)))
    return out


@settings(max_examples=250, deadline=None, derandomize=True, suppress_health_check=[HealthCheck.too_slow])
@given(cases())
def test_kernel_equals_the_reference_controller(case) -> None:
    trace, preset, overrides, hw, slots = case
    fast, reference = _both(trace, preset, overrides, hw, _budget(trace, slots))
    assert fast == reference


@pytest.mark.parametrize("preset", sorted(PRESETS))
@pytest.mark.parametrize("profile", ["rtx3090-bound", "sim/profiles/this-machine-cpu-disk.toml"])
def test_every_preset_on_a_synthetic_trace(preset: str, profile: str) -> None:
    loaded = load(synthetic_trace(sequences=2, prompt_tokens=10, decode_tokens=20, seed=5, lookahead_depth=2))
    for budget in ("8%", "30%"):
        fast, reference = _both(loaded, preset, {}, profile, budget)
        assert fast == reference, (preset, profile, budget)


def test_the_fallback_decision(monkeypatch, tmp_path) -> None:
    """Predictors that call Python code per layer (learned) run in the reference engine; the others (eap
    included) in the kernel; a timeline always in the reference engine."""
    assert kernel.unsupported(build_policy("fate", {"prediction": "learned"})) is not None
    for name in PRESETS:
        assert kernel.unsupported(build_policy(name)) is None, name
    loaded = load(synthetic_trace(sequences=1, prompt_tokens=6, decode_tokens=5, seed=1))

    def no_kernel(*args, **kwargs):
        raise AssertionError("the kernel ran")

    with monkeypatch.context() as patch:
        patch.setattr(kernel, "replay", no_kernel)
        replay(loaded, policy="eap", memory_budget="20%", timeline=tmp_path / "timeline.json")
        with pytest.raises(AssertionError, match="the kernel ran"):
            replay(loaded, policy="eap", memory_budget="20%")


@pytest.mark.parametrize("preset, overrides", [
    ("mixtral-offloading", {"cancel_stale": "false", "prefetch_count": "4"}),
    ("speculate", {"cancel_stale": "false"}),
    ("fate", {"cancel_stale": "false", "prefetch": "all"}),
])
def test_victims_in_flight(preset: str, overrides: dict) -> None:
    """Stale prefetches left copying on a slow link: demand loads choose between landed experts and copies in
    flight (landed first), and cancel the queued ones they displace."""
    loaded = load(synthetic_trace(sequences=2, prompt_tokens=8, decode_tokens=30, seed=9, lookahead_depth=2,
                                  lookahead_noise=2.0))
    hw = tiny_profile(link__bandwidth_bytes_per_s=3.0e7)
    for budget in ("6%", "12%"):
        fast, reference = _both(loaded, preset, overrides, hw, budget)
        assert fast == reference, (preset, budget)


def test_the_compiled_kernel_is_built_from_this_source() -> None:
    """The test environment has the extension (a failed build would otherwise make every test above compare
    the reference engine with itself), built from the compiled.c beside it."""
    import hashlib

    module = kernel.compiled()
    assert module is not None, "sim/kernel/_compiled is not built: `make install`"
    assert module.SOURCE_SHA256 == hashlib.sha256(kernel.SOURCE.read_bytes()).hexdigest()


def test_the_kernel_tables_and_constants_are_state_py_s() -> None:
    from sim.kernel import state

    module = kernel.compiled()
    arrays, settings_ = module.TABLES
    assert arrays == state.Inputs._fields + state.State._fields + state.Scratch._fields
    assert settings_ == state.Settings._fields
    for name, value in module.CONSTANTS.items():
        expected = state.PRECISIONS.index(name.lower()) if name in ("INT4", "INT2") else getattr(state, name)
        assert value == expected, name


def test_the_kernel_refuses_arrays_of_the_wrong_kind() -> None:
    """compiled.c checks every array's dtype, contiguity and writability before it runs."""
    from sim.kernel.prepare import inputs
    from sim.kernel.state import POOL_EXHAUSTED, new_scratch, new_state

    class Captured(Exception):
        pass

    def capture(workload, ctl, costs):
        raise Captured(workload, ctl, costs)

    loaded = load(synthetic_trace(sequences=1, prompt_tokens=4, decode_tokens=3, seed=2))
    patch = pytest.MonkeyPatch()
    patch.setattr(kernel, "replay", capture)
    try:
        with pytest.raises(Captured) as caught:
            replay(loaded, policy="lru", memory_budget="30%")
    finally:
        patch.undo()
    workload, ctl, costs = caught.value.args
    data, cfg = inputs(workload, ctl, costs)
    state = new_state(data, cfg, workload.num_layers, workload.num_experts, 4096)
    scratch = new_scratch(workload.num_experts, 8)
    run = kernel.compiled().run
    with pytest.raises(TypeError, match="tick has format i"):
        run(data, cfg, state._replace(tick=state.tick.astype(np.int32)), scratch)
    with pytest.raises(TypeError, match="resident: not a C-contiguous writable array"):
        run(data, cfg, state._replace(resident=state.resident[:, ::-1]), scratch)
    read_only = state.clock.copy()
    read_only.flags.writeable = False
    with pytest.raises(TypeError, match="clock: not a C-contiguous writable array"):
        run(data, cfg, state._replace(clock=read_only), scratch)
    with pytest.raises(TypeError, match="named tuples"):
        run(list(data), cfg, state, scratch)
    code, busy_s = run(data, cfg, state, scratch)
    assert code == 0 and busy_s >= 0.0
    # a pool too small for the transfers alive at once stops the replay with a code (replay retries larger)
    tiny = new_state(data, cfg, workload.num_layers, workload.num_experts, 2)
    assert run(data, cfg, tiny, new_scratch(workload.num_experts, 8))[0] == POOL_EXHAUSTED


def test_without_the_extension_replays_run_in_the_reference_engine(monkeypatch, capsys) -> None:
    loaded = load(synthetic_trace(sequences=1, prompt_tokens=6, decode_tokens=5, seed=3, lookahead_depth=1))
    expected = replay(loaded, policy="fate", memory_budget="20%", mode="engine")
    monkeypatch.setitem(sys.modules, "sim.kernel._compiled", None)  # import fails, as without a compiler
    kernel.compiled.cache_clear()
    try:
        assert kernel.unsupported(build_policy("fate")) == "the compiled kernel is not built"
        assert replay(loaded, policy="fate", memory_budget="20%") == expected
        assert "the compiled replay kernel is not built" in capsys.readouterr().err
    finally:
        kernel.compiled.cache_clear()


def test_an_extension_built_from_an_older_source_is_refused(monkeypatch) -> None:
    monkeypatch.setattr(kernel.compiled(), "SOURCE_SHA256", "0" * 64)
    kernel.compiled.cache_clear()
    try:
        with pytest.raises(UserError, match="built from an older .*compiled.c; rebuild it: `make install`"):
            kernel.compiled()
    finally:
        monkeypatch.undo()
        kernel.compiled.cache_clear()


def test_a_prediction_at_exactly_the_confidence_is_prefetched() -> None:
    """Fate keeps decode predictions with confidence >= the threshold: two tied experts whose logits leave
    every other at probability 0 get exactly 0.5 each (softmax in float32), so at confidence 0.5 both are
    prefetched in decode and at 0.51 neither (the prefill prefetches, ranked by popularity, are the same);
    the kernel agrees with the reference either way."""
    num_layers, num_experts, tokens = 3, 6, 8
    lookahead = np.full((1, tokens, num_layers, num_experts), -60000.0, np.float16)
    lookahead[..., 1] = lookahead[..., 4] = 60000.0
    loaded = load(tiny_trace([[[0]] * num_layers] * tokens, num_experts=num_experts, prefill=2, lookahead=lookahead))
    prefetched = {}
    for confidence in ("0.5", "0.51"):
        fast, reference = _both(loaded, "fate", {"confidence": confidence, "lookahead": "1"}, tiny_profile(),
                                _budget(loaded.trace, 3))
        assert fast == reference
        moved = fast["bytes_transferred"]
        prefetched[confidence] = moved["prefetch_used"] + moved["prefetch_wasted"]
    assert prefetched["0.5"] == 2 * prefetched["0.51"] > 0
