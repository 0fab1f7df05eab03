"""The noisy oracle: look-ahead signals from the trace's future at an assumed recall, so every look-ahead
policy runs on traces without look-ahead logits (real logs), and says it assumed a predictor."""

from __future__ import annotations

import dataclasses
import json

import numpy as np
import pytest

from sim.policies.noisy_oracle import noisy_oracle_signals, rank_values, recall_from_report
from sim.policies.prediction import make_predictor
from sim.replay import replay
from sim.synthetic import synthetic_trace
from tests.cli_run import run_cli as _run
from traces.errors import UserError
from traces.format import write_trace

E, K = 16, 3


def routing(tokens: int = 4000, layers: int = 4, seed: int = 0) -> np.ndarray:
    """[T, L, k] distinct experts per row, uniformly random."""
    rng = np.random.default_rng(seed)
    return np.argsort(rng.random((tokens, layers, E)), axis=2)[:, :, :K].astype(np.int16)


def topk_hits(probs: np.ndarray, ids: np.ndarray, d: int, first: int = K) -> np.ndarray:
    """[T, L-d, first] whether the expert at rank r of the signal for layer l+d was routed there."""
    order = np.argsort(-probs[d - 1], axis=-1, kind="stable")[:, : ids.shape[1] - d, :first]
    routed = np.zeros((ids.shape[0], ids.shape[1] - d, E), dtype=bool)
    np.put_along_axis(routed, ids[:, d:].astype(np.intp), True, axis=2)
    return np.take_along_axis(routed, order, axis=2)


@pytest.mark.parametrize("recall, expected", [(1.0, 1.0), (0.0, 0.0)])
def test_recall_one_is_the_oracle_and_zero_never_names_a_routed_expert(recall: float, expected: float) -> None:
    ids = routing(200)
    probs = noisy_oracle_signals(ids, np.zeros(200, bool), E, depth=2, recall=recall, seed=1)
    for d in (1, 2):
        assert topk_hits(probs, ids, d).mean() == expected


def test_recall_holds_at_every_rank_and_misses_spread_over_the_rest() -> None:
    """Top-k precision = recall = 0.7; the first-ranked expert is routed with the same probability (found
    experts do not come first), and routed experts not found sit anywhere below rank k, uniformly."""
    ids = routing(6000)
    probs = noisy_oracle_signals(ids, np.zeros(6000, bool), E, depth=1, recall=0.7, seed=2)
    hits = topk_hits(probs, ids, 1)
    assert hits.mean() == pytest.approx(0.7, abs=0.01)
    for r in range(K):
        assert hits[..., r].mean() == pytest.approx(0.7, abs=0.02), r
    rest = topk_hits(probs, ids, 1, first=E)[..., K:]  # ranks k..E-1
    per_rank = rest.mean(axis=(0, 1))
    assert per_rank.sum() == pytest.approx(0.3 * K, abs=0.05)
    assert per_rank.max() - per_rank.min() < 0.03  # no rank after k is favoured


def test_per_layer_and_phase_recall_is_honoured() -> None:
    ids = routing(400, layers=3)
    prefill = np.arange(400) < 200
    recall = np.zeros((1, 3, 2), dtype=np.float32)
    recall[0, 0] = (1.0, 0.0)  # layer 0 -> 1: perfect in prefill, blind in decode
    recall[0, 1] = (0.0, 1.0)  # layer 1 -> 2: the other way round
    probs = noisy_oracle_signals(ids, prefill, E, depth=1, recall=recall, seed=3)
    hits = topk_hits(probs, ids, 1)  # [T, 2, k]
    assert hits[prefill, 0].all() and not hits[~prefill, 0].any()
    assert not hits[prefill, 1].any() and hits[~prefill, 1].all()


def test_signals_are_distributions_without_ties_and_deterministic() -> None:
    """Every signal sums to 1 with no two experts tied (no tie-break decides a ranking); a seed gives one
    set of signals."""
    ids = routing(300)
    probs = noisy_oracle_signals(ids, np.ones(300, bool), E, 2, 0.5, seed=4)
    assert np.allclose(probs.sum(axis=-1), 1.0, atol=1e-6)
    assert probs.dtype == np.float32
    live = probs[0, :, :-1, :]  # depth 1: every source layer but the last has a target
    assert all(len(np.unique(row)) == E for row in live.reshape(-1, E)[:50])
    again = noisy_oracle_signals(ids, np.ones(300, bool), E, 2, 0.5, seed=4)
    other = noisy_oracle_signals(ids, np.ones(300, bool), E, 2, 0.5, seed=5)
    assert np.array_equal(probs, again) and not np.array_equal(probs, other)
    values = rank_values(E, K)
    assert np.all(np.diff(values) < 0) and values[:K].sum() == pytest.approx(0.9, abs=1e-3)


def no_lookahead(trace):
    return dataclasses.replace(trace, lookahead_logits=None)


@pytest.fixture(scope="module")
def real_like():
    """A Qwen-shaped trace without look-ahead logits, as every imported real log is."""
    return no_lookahead(synthetic_trace(sequences=2, prompt_tokens=12, decode_tokens=40, seed=6))


@pytest.mark.parametrize("policy", ["fate", "mixtral-offloading", "speculate"])
def test_every_lookahead_preset_runs_on_a_trace_without_lookahead(real_like, policy: str) -> None:
    with pytest.raises(UserError, match="prediction=noisy-oracle"):
        replay(real_like, policy=policy, memory_budget="25%")
    m = replay(real_like, policy=policy, memory_budget="25%", overrides={"prediction": "noisy-oracle"})
    assert m["prefetch_precision"] > 0 and m["policy_components"]["prediction"] == "noisy-oracle"
    (assumption,) = m["assumptions"]
    assert "assumed predictor" in assumption and "recall 0.84 (seed 0)" in assumption


def test_recall_one_prefetches_only_routed_experts_and_zero_never_does() -> None:
    """mixtral-offloading prefetches its predictor's first 2 of k = 4 experts per decode token: every pick is
    routed when the oracle is perfect, none is when it finds nothing. (Decode only: in prefill a blind
    prediction for one token can still name an expert another token of the prompt routes to.)"""
    decode_only = no_lookahead(synthetic_trace(sequences=2, prompt_tokens=0, decode_tokens=40, seed=8))
    perfect = replay(decode_only, policy="mixtral-offloading", memory_budget="25%",
                     overrides={"prediction": "noisy-oracle", "predictor_recall": "1"})
    blind = replay(decode_only, policy="mixtral-offloading", memory_budget="25%",
                   overrides={"prediction": "noisy-oracle", "predictor_recall": "0"})
    assert perfect["prefetch_precision"] == 1.0
    assert blind["prefetch_precision"] == 0.0 and blind["bytes_transferred"]["prefetch_used"] == 0


def test_fast_and_reference_engine_paths_agree_on_noisy_oracle_signals(real_like) -> None:
    """The compiled kernel (fast) and the reference engine (SimPy) give identical replays on the signals."""
    args = dict(policy="fate", memory_budget="20%", overrides={"prediction": "noisy-oracle"})
    assert replay(real_like, **args, mode="fast") == replay(real_like, **args, mode="simpy")


def test_per_layer_recall_from_a_predictors_report(tmp_path) -> None:
    from sim.analysis.predictors import predictor_report

    recorded = synthetic_trace(num_layers=6, num_experts=16, top_k=2, sequences=4, prompt_tokens=6,
                               decode_tokens=12, lookahead_noise=1.0, seed=7, model="tiny",
                               hidden_size=64, expert_intermediate_size=32, shared_expert_intermediate_size=0)
    report = predictor_report(recorded, predictors=["gate"])
    path = tmp_path / "pred.json"
    path.write_text(json.dumps(report))
    rec = recall_from_report(path, tuple(range(6)), depth=1)
    gate = report["layers"][3]["predictors"]["gate_d1"]
    assert rec[0, 2, 0] == pytest.approx(gate["prefill"]["topk"]["recall"])  # source layer 2 predicts layer 3
    assert rec[0, 2, 1] == pytest.approx(gate["decode"]["topk"]["recall"])
    assert rec.shape == (1, 6, 2) and np.all(rec[0, 5] == 0)  # the last layer predicts nothing
    subset = recall_from_report(path, (1, 3, 5), depth=1)  # matched by decoder index
    assert subset[0, 0, 1] == pytest.approx(report["layers"][3]["predictors"]["gate_d1"]["decode"]["topk"]["recall"])
    with pytest.raises(UserError, match="no gate_d2"):
        recall_from_report(path, tuple(range(6)), depth=2)
    with pytest.raises(UserError, match="neither include"):
        recall_from_report(path, tuple(range(9)), depth=1)
    with pytest.raises(UserError, match="does not exist"):
        recall_from_report(tmp_path / "none.json", (0,), depth=1)
    (tmp_path / "bad.json").write_text("[1, 2]")
    with pytest.raises(UserError, match="not an `analyze predictors --json` report"):
        recall_from_report(tmp_path / "bad.json", (0,), depth=1)
    trace = no_lookahead(recorded)
    m = replay(trace, policy="fate", hw="h100-bound", memory_budget="30%",
               overrides={"prediction": "noisy-oracle", "predictor_recall": str(path)})
    assert m["policy_components"]["predictor_recall"] == str(path)
    assert f"per-layer recall from {path}" in m["assumptions"][0]


def test_realrun_cannot_use_it() -> None:
    with pytest.raises(UserError, match="simulator has it, realrun not"):
        make_predictor("noisy-oracle", num_layers=2, num_experts=4, top_k=1, depth=1, eap_history=1, future=None)


def test_compare_keeps_the_rows_it_can_compute(capsys, tmp_path, real_like) -> None:
    """Issue 12 item 7: on a trace without look-ahead logits the default list used to fail outright."""
    path = tmp_path / "r.safetensors"
    write_trace(real_like, path)
    code, out, err = _run(capsys, ["compare", "--trace", str(path), "--policies", "lod,fate,lru", "--quiet"])
    assert code == 1, err
    lines = out.splitlines()
    assert [line.split()[0] for line in lines[1:3]] == ["lod", "lru"]
    assert any(line.startswith("fate: cannot run: policy 'fate' predicts with look-ahead logits") for line in lines)
    code, out, err = _run(capsys, ["compare", "--trace", str(path), "--policies",
                                   "lod,fate:prediction=noisy-oracle", "--json", "--quiet"])
    assert code == 0, err
    data = json.loads(out)
    assert [r["policy"] for r in data["results"]] == ["lod", "fate:prediction=noisy-oracle"] and data["failed"] == []
    code, out, err = _run(capsys, ["compare", "--trace", str(path), "--policies", "fate,speculate", "--quiet"])
    assert code == 2 and err.startswith("fatesim: error: no policy could run: fate: ")


def test_plan_takes_set_like_replay(capsys, tmp_path, real_like) -> None:
    path = tmp_path / "r.safetensors"
    write_trace(real_like, path)
    base = ["plan", "--model", "qwen1.5-moe-a2.7b", "--hw", "h100-bound", "--budget", "30%", "--trace", str(path),
            "--policy", "fate", "--quiet"]
    code, out, _ = _run(capsys, base)
    assert code == 0 and "predicts with look-ahead logits" in out
    code, out, err = _run(capsys, base + ["--set", "prediction=noisy-oracle", "--set", "predictor_recall=0.9"])
    assert code == 0, err
    assert out.startswith("best at") and "with fate" not in out and out.splitlines()[3].startswith("fate")
    code, _, err = _run(capsys, base + ["--set", "predictor_recall=2"])
    assert code == 2 and "predictor_recall=2" in err
