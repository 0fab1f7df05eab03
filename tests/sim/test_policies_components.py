"""Allocation, prediction, prefetch, precision and miss policies on small hand-made inputs."""

from __future__ import annotations

import subprocess
import sys

import numpy as np
import pytest

from sim.policies.allocation import allocate
from sim.policies.eviction import FutureAccess
from sim.policies.miss import MissPolicy
from sim.policies.precision import PrecisionPolicy
from sim.policies.prediction import EapPredictor, Signals, make_predictor
from sim.policies.prefetch import PrefetchPolicy, fate_decode_count
from traces.errors import UserError


def test_uniform_allocation_gives_the_remainder_to_shallow_layers() -> None:
    alloc = allocate("uniform", total_slots=14, num_layers=4, num_experts=8, top_k=2)
    assert alloc.slots_per_layer == (4, 4, 3, 3)


def test_shallow_allocation_caches_shallow_layers_fully() -> None:
    """Fate: as many shallow layers fully cached as fit while deeper layers keep 2k slots."""
    alloc = allocate("shallow", total_slots=30, num_layers=4, num_experts=8, top_k=2)
    # 2 full layers (16) + 2 x 4 = 24 <= 30, 3 full (24) + 4 = 28 <= 30, 4 full = 32 > 30
    assert alloc.slots_per_layer == (8, 8, 8, 6)
    fixed = allocate("shallow", total_slots=30, num_layers=4, num_experts=8, top_k=2, shallow_layers=1)
    assert fixed.slots_per_layer == (8, 8, 7, 7)


def test_popularity_allocation_pins_the_most_popular() -> None:
    pop = np.array([[1, 9, 5, 0], [7, 0, 0, 3]])
    alloc = allocate("popularity", total_slots=6, num_layers=2, num_experts=4, top_k=1, popularity=pop, reserve=1)
    assert alloc.pinned == ((1, 2), (0, 3))


def test_allocation_refuses_fewer_than_top_k_slots_per_layer() -> None:
    with pytest.raises(UserError, match="need at least 8"):
        allocate("uniform", total_slots=7, num_layers=4, num_experts=8, top_k=2)


def _probs(rows: list[list[float]]) -> np.ndarray:
    return np.asarray(rows, dtype=np.float32)[:, None, :]  # [D, 1, E]


def test_crosslayer_ranks_by_lookahead_probability() -> None:
    pred = make_predictor("crosslayer", num_layers=3, num_experts=4, top_k=2, depth=2, eap_history=8)
    out = pred.predict(0, Signals(0, "decode", 1, _probs([[0.1, 0.6, 0.0, 0.3], [0.5, 0.0, 0.5, 0.0]])))
    assert [p.layer for p in out] == [1, 2]
    assert out[0].experts == (1, 3, 0)
    assert out[1].experts == (0, 2)


def test_crosslayer_prefill_ranks_by_predicted_token_count() -> None:
    pred = make_predictor("crosslayer", num_layers=2, num_experts=4, top_k=1, depth=1, eap_history=8)
    probs = np.asarray([[[0.7, 0.1, 0.1, 0.1], [0.1, 0.1, 0.7, 0.1], [0.1, 0.1, 0.8, 0.0]]], np.float32)
    out = pred.predict(0, Signals(0, "prefill", 3, probs))
    assert out[0].experts == (2, 0) and out[0].scores == (2.0, 1.0)


def test_lookahead_predictors_refuse_without_lookahead() -> None:
    pred = make_predictor("speculative", num_layers=2, num_experts=4, top_k=1, depth=1, eap_history=8)
    with pytest.raises(UserError, match="look-ahead"):
        pred.predict(0, Signals(0, "decode", 1, None))


def test_eap_predicts_the_most_similar_earlier_path() -> None:
    """Two stored paths; the running token matches the second one at layer 0, so its layer 1 is predicted."""
    eap = EapPredictor(num_layers=3, num_experts=6, top_k=1, depth=1, history=4)
    for path in ([0, 1, 2], [3, 4, 5]):
        eap.begin_step(0, "decode")
        for layer, e in enumerate(path):
            eap.observe(layer, np.array([e]))
    eap.begin_step(2, "decode")
    eap.observe(0, np.array([3]))
    out = eap.predict(1, Signals(2, "decode", 1))
    assert out[0].layer == 2 and out[0].experts == (5,)


def test_oracle_and_learned_predictors() -> None:
    future = FutureAccess.from_routes([[(np.array([0]), np.array([1])), (np.array([1, 3]), np.array([1, 4]))]], num_layers=2)
    oracle = make_predictor("oracle", num_layers=2, num_experts=4, top_k=2, depth=1, eap_history=8, future=future)
    assert oracle.predict(0, Signals(0, "prefill", 5))[0].experts == (3, 1)
    learned = make_predictor("learned", num_layers=2, num_experts=4, top_k=2, depth=1, eap_history=8,
                             score_fn=lambda layer, s: np.array([0.0, 0.2, 0.9, 0.1]))
    assert learned.predict(0, Signals(0, "decode", 1))[0].experts == (2, 1, 3)
    with pytest.raises(UserError, match="estimator"):
        make_predictor("learned", num_layers=2, num_experts=4, top_k=2, depth=1, eap_history=8)


def test_fate_prefetch_count_and_selection() -> None:
    """n = floor(layer time / INT4 transfer time), at least 1; confident experts only in decode."""
    assert fate_decode_count(1.0e-3, 0.3e-3) == 3
    assert fate_decode_count(0.1e-3, 0.3e-3) == 1
    from sim.policies.prediction import Prediction
    preds = [Prediction(1, (5, 2, 7, 1), (0.5, 0.3, 0.15, 0.05))]
    fate = PrefetchPolicy("fate", confidence=0.1, prefetch_count=2, fate_decode_count=4)
    assert fate.select(preds, "decode") == [(1, 5, 0.5), (1, 2, 0.3), (1, 7, 0.15)]
    assert len(fate.select(preds, "prefill")) == 4
    topk = PrefetchPolicy("topk", confidence=0.0, prefetch_count=2, fate_decode_count=4)
    assert [e for _, e, _ in topk.select(preds, "decode")] == [5, 2]


def test_fate_hybrid_precision() -> None:
    """Prefill: least popular experts go INT2 while they stay within int2_rate of the mass; decode INT4."""
    hybrid = PrecisionPolicy("fate-hybrid", int2_rate=0.3)
    # mass 20: 1 + 2 + 3 = 6 <= 6 -> INT2, then 4 would exceed
    assert hybrid.assign("prefill", [0, 1, 2, 3, 4], [10, 1, 4, 2, 3]) == ["int4", "int2", "int4", "int2", "int2"]
    assert hybrid.assign("decode", [0, 1], [1, 1]) == ["int4", "int4"]
    assert PrecisionPolicy("int8", 0.3).assign("prefill", [0], [3]) == ["int8"]


def test_miss_policies() -> None:
    assert MissPolicy("cpu", "int2").resolve([1, 2], [5]).cpu == [1, 2]
    spec = MissPolicy("speculated", "int2").resolve([1, 2], [5])
    assert spec.substitutions == [(1, 5)] and spec.load == [2]
    assert MissPolicy("wait", "int2").resolve([1], [5]).load == [1]


def test_policies_import_neither_simpy_nor_torch() -> None:
    """realrun imports the policies: they must not pull in simpy or torch."""
    code = ("import sys, sim.policies.controller, sim.policies.presets; "
            "bad = [m for m in ('simpy', 'torch') if m in sys.modules]; print(bad); sys.exit(1 if bad else 0)")
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert done.returncode == 0, done.stdout + done.stderr
