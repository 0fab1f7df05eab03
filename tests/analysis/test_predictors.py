"""Predictor analysis on a trace with known structure."""

from __future__ import annotations

import dataclasses

import numpy as np
import pytest

from sim.analysis.predictors import match_counts, popularity_skew, predictor_report
from traces.errors import UserError


def test_match_counts_hand_computed() -> None:
    """E=4, k=2: scores (.5,.3,.15,.05) vs routed {0,2}: top-2 picks {0,1} -> 1 hit; τ=0.2 picks {0,1} ->
    precision 1/2; τ=0.1 picks {0,1,2} -> 2 hits of 3 chosen."""
    scores = np.array([[0.5, 0.3, 0.15, 0.05]])
    actual = np.array([[True, False, True, False]])
    assert match_counts(scores, actual, 2, 0.2) == {"topk_tp": [1], "thr_tp": [1], "thr_pred": [2], "actual": [2]}
    c = match_counts(scores, actual, 2, 0.1)
    assert (c["thr_tp"][0], c["thr_pred"][0]) == (2, 3)


def test_skew() -> None:
    """Uniform counts: Gini 0, entropy 1; all mass on one expert of 4: Gini 3/4, top-1 share 1."""
    assert popularity_skew(np.array([0, 1, 2, 3]), 4, 1)["gini"] == pytest.approx(0.0)
    s = popularity_skew(np.array([2, 2, 2, 2]), 4, 1)
    assert s["gini"] == pytest.approx(0.75) and s["top_k_share"] == 1.0 and s["entropy"] == 0.0


def test_report_ranks_predictors(structured_trace) -> None:
    """Oracle is exact; the (noisy) cross-layer gate and the learned estimator beat popularity by far; the
    layer-0 entry has no cross-layer predictor; prefill and decode are reported apart."""
    report = predictor_report(structured_trace, estimator_depth=1, estimator_steps=100)
    model = report["model"]["predictors"]
    for phase in ("prefill", "decode"):
        assert model["oracle"][phase]["topk"]["precision"] == 1.0
        pop = model["popularity"][phase]["topk"]["precision"]
        assert model["gate_d1"][phase]["topk"]["precision"] > pop + 0.5
        assert model["learned_d1"][phase]["topk"]["precision"] > pop + 0.3
    assert "gate_d1" not in report["layers"][0]["predictors"]
    assert report["params"]["evaluation_prefill_tokens"] == report["params"]["evaluation_decode_tokens"] == 80
    assert len([e for e in report["layers"] if "cosine_next" in e]) == structured_trace.num_moe_layers - 1


def test_missing_tensors_are_user_errors(structured_trace) -> None:
    bare = dataclasses.replace(structured_trace, lookahead_logits=None, gate_inputs=None)
    with pytest.raises(UserError, match="lookahead_logits"):
        predictor_report(bare, predictors=["gate"])
    with pytest.raises(UserError, match="gate_inputs"):
        predictor_report(bare, predictors=["learned"])
    report = predictor_report(bare)  # without restriction: what the trace allows
    assert set(report["model"]["predictors"]) == {"oracle", "popularity", "path"}


def test_prefill_step_sets_hand_computed() -> None:
    """E=4, k=1, one prefill step of two tokens. Scores favour expert 0 then 1; routed {0} and {2}.
    Top-1 union {0,1} vs needed {0,2}: 1 of 2 right, recall 1/2. τ=0.3 picks 0 and 1 (tok 0), 1 (tok 1)."""
    from sim.analysis.predictors import prefill_step_counts

    scores = np.array([[0.6, 0.35, 0.05, 0.0], [0.2, 0.5, 0.25, 0.05]])
    actual = np.array([[True, False, False, False], [False, False, True, False]])
    c = prefill_step_counts(scores, actual, [np.array([0, 1])], 1, 0.3)
    assert c == {"steps": 1, "needed": 2, "topk_tp": 1, "topk_pred": 2, "thr_tp": 1, "thr_pred": 2}
