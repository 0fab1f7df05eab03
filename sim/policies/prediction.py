"""Prediction: which experts the layers ahead will route to, decided when layer l's gate input exists.

A predictor gets `Signals` at layer l (after attention, before layer l's router) and returns one
`Prediction` per layer ahead, experts most likely first with a score (decode: a probability; prefill:
a predicted token count). Predictors see only what a real system would see at that moment, except
`oracle`, which reads the trace's future (the bound).

- `none`: predicts nothing.
- `crosslayer`: Fate (arXiv 2502.12224): the gate of layer l+d applied to layer l's gate input
  (`Signals.lookahead_probs`); decode ranks experts by that probability, prefill by how many prompt
  tokens have the expert in their predicted top-k (predicted popularity).
- `eap`: expert activation path: the running token's path so far (layers < l) is matched against the
  paths of earlier decoded tokens, and the most similar one's experts at l+1.. are predicted (the Fate
  paper's EAP baseline; path tracing as in MoE-Infinity, arXiv 2401.14361). Prefill: the experts most
  often used at l+1 in the stored paths.
- `speculative`: Speculating Experts (arXiv 2603.19289): the quasi-hidden state (layer l's gate input)
  through the gates of the next `lookahead` layers, top-k of each; the miss policy `speculated` may then
  execute these experts instead of missing routed ones.
- `oracle`: the experts the trace actually routes to at l+1.., by token count.
- `noisy-oracle`: the cross-layer predictor reading look-ahead signals that the simulator makes from the
  trace's future routing at an assumed recall (`predictor_recall`; sim/policies/noisy_oracle.py): how
  the look-ahead policies would do on traces without look-ahead logits. Simulator only.
- `learned`: scores from an injected callable `score_fn(layer, signals) -> [E] scores for layer + 1`
  (the learned estimator of sim.analysis plugs in here).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import NamedTuple

import numpy as np

from sim.policies.eviction import FutureAccess
from traces.errors import UserError

PREDICTIONS = ("none", "crosslayer", "eap", "speculative", "oracle", "learned", "noisy-oracle")
"""Valid predictor names."""

NEEDS_LOOKAHEAD = ("crosslayer", "speculative", "noisy-oracle")
"""Predictors that read look-ahead signals: the trace's look-ahead logits (crosslayer, speculative; a trace
without them cannot drive these) or the noisy oracle's, which the replay makes from the trace's routing."""


@dataclass
class Signals:
    """What the CPU predictor may read at layer l of one forward step."""

    step: int
    """Index of the forward step (a prefill chunk of one sequence, or one decode token)."""
    phase: str
    """"prefill" or "decode"."""
    num_tokens: int
    """Tokens in this step (1 in decode)."""
    lookahead_probs: np.ndarray | None = None
    """[D, n, E] softmax over E of the gates of layers l+1..l+D applied to layer l's gate input; n = tokens
    (`sim.policies.requirements.lookahead_probabilities`)."""


ScoreFn = Callable[[int, Signals], np.ndarray]
"""The learned predictor's scores: score_fn(layer, signals) -> [E] non-negative scores of layer + 1."""


class Prediction(NamedTuple):
    """Experts predicted for one layer ahead, most likely first."""

    layer: int
    experts: tuple[int, ...] | list[int]
    scores: tuple[float, ...] | list[float]
    """Decode: probability-like confidence in [0, 1]; prefill: predicted token count."""


def _rank(scores: np.ndarray, limit: int) -> tuple[tuple[int, ...], tuple[float, ...]]:
    """Experts with score > 0, highest first (ties: lower id), at most `limit`: an expert with score 0 (a
    probability that underflowed, an expert no token picked) is never predicted."""
    order = np.argsort(-scores, kind="stable")[:limit]
    order = order[scores[order] > 0]
    return tuple(order.tolist()), tuple(scores[order].tolist())


class NoPredictor:
    name = "none"

    def begin_step(self, step: int, phase: str) -> None:
        pass

    def predict(self, layer: int, signals: Signals) -> list[Prediction]:
        return []

    def observe(self, layer: int, routed_ids: np.ndarray) -> None:
        pass


class LookaheadPredictor:
    """Cross-layer gate (Fate) and speculative quasi-hidden state (Speculating Experts) predictors."""

    def __init__(self, name: str, num_layers: int, num_experts: int, top_k: int, depth: int, limit: int) -> None:
        self.name = name
        self.limit = limit
        """Decode: candidates returned per layer ahead (the prefetch policy never takes more)."""
        self.num_layers = num_layers
        self.num_experts = num_experts
        self.top_k = top_k
        self.depth = depth
        """How many layers ahead to predict (<= the look-ahead depth D of the signals)."""

    def begin_step(self, step: int, phase: str) -> None:
        pass

    def observe(self, layer: int, routed_ids: np.ndarray) -> None:
        pass

    def predict(self, layer: int, signals: Signals) -> list[Prediction]:
        probs = signals.lookahead_probs  # [D, n, E]
        if probs is None:
            raise UserError(f"predictor {self.name!r} needs look-ahead logits; record the trace with them "
                            "or --set prediction=eap|none")
        out = []
        for d in range(min(self.depth, probs.shape[0])):
            target = layer + d + 1
            if target >= self.num_layers:
                break
            p = probs[d]  # [n, E]
            if p.shape[0] == 1:  # decode: by probability
                experts, values = _rank(p[0], self.top_k if self.name == "speculative" else self.limit)
            else:  # prefill: by predicted popularity
                experts, values = _rank(predicted_counts(p, self.top_k), self.num_experts)
            out.append(Prediction(target, experts, values))
        return out


def predicted_counts(probs: np.ndarray, top_k: int) -> np.ndarray:
    """[E] float64: how many of the tokens ([n, E] probabilities) have each expert among their top-k (ties
    within a token broken as numpy's argpartition breaks them)."""
    top = np.argpartition(-probs, top_k - 1, axis=1)[:, :top_k]  # [n, k]
    return np.bincount(top.ravel(), minlength=probs.shape[1]).astype(np.float64)


class EapPredictor:
    """Expert activation path: the most similar earlier path (by experts shared layer by layer so far)."""

    name = "eap"

    def __init__(self, num_layers: int, num_experts: int, top_k: int, depth: int, history: int) -> None:
        self.num_layers = num_layers
        self.num_experts = num_experts
        self.top_k = top_k
        self.depth = depth
        self.history = history
        """Paths kept (most recent)."""
        self.paths = np.full((history, num_layers, num_experts), False)
        """[N, L, E] multi-hot path of each stored decode token (ring buffer)."""
        self.stored = 0
        self.current = np.full((num_layers, num_experts), False)
        self.score = np.zeros(history)
        self.phase = "decode"

    def begin_step(self, step: int, phase: str) -> None:
        if self.phase == "decode" and self.current.any():
            self.paths[self.stored % self.history] = self.current
            self.stored += 1
        self.current = np.full((self.num_layers, self.num_experts), False)
        self.score = np.zeros(self.history)
        self.phase = phase

    def observe(self, layer: int, routed_ids: np.ndarray) -> None:
        self.current[layer, routed_ids] = True
        if self.phase == "decode" and self.stored:
            self.score += self.paths[:, layer, routed_ids].sum(axis=1)

    def predict(self, layer: int, signals: Signals) -> list[Prediction]:
        n = min(self.stored, self.history)
        if n == 0:
            return []
        out = []
        if signals.phase == "prefill":
            for d in range(self.depth):
                target = layer + d + 1
                if target < self.num_layers:
                    counts = self.paths[:n, target].sum(axis=0).astype(np.float64)
                    out.append(Prediction(target, *_rank(counts, self.num_experts)))
            return out
        # most similar stored path; ties go to the most recent one
        newest_first = (self.stored - 1 - np.arange(n)) % self.history
        best = int(newest_first[np.argmax(self.score[newest_first])])
        for d in range(self.depth):
            target = layer + d + 1
            if target < self.num_layers:
                experts = tuple(int(e) for e in np.flatnonzero(self.paths[best, target]))
                out.append(Prediction(target, experts, tuple(1.0 for _ in experts)))
        return out


class OraclePredictor:
    """The trace's own future routing (an upper bound on any predictor)."""

    name = "oracle"

    def __init__(self, num_layers: int, depth: int, future: FutureAccess) -> None:
        self.num_layers = num_layers
        self.depth = depth
        self.future = future

    def begin_step(self, step: int, phase: str) -> None:
        pass

    def observe(self, layer: int, routed_ids: np.ndarray) -> None:
        pass

    def predict(self, layer: int, signals: Signals) -> list[Prediction]:
        out = []
        for d in range(self.depth):
            target = layer + d + 1
            if target >= self.num_layers:
                break
            ids, counts = self.future.routed(signals.step, target)
            order = np.argsort(-counts, kind="stable")
            out.append(Prediction(target, tuple(int(ids[i]) for i in order),
                                  tuple(float(counts[i]) for i in order)))
        return out


class LearnedPredictor:
    """A predictor whose per-expert scores for layer l+1 come from an injected callable."""

    name = "learned"

    def __init__(self, num_layers: int, num_experts: int, score_fn: Callable[[int, Signals], np.ndarray]) -> None:
        self.num_layers = num_layers
        self.num_experts = num_experts
        self.score_fn = score_fn
        """score_fn(layer, signals) -> [E] non-negative scores of layer + 1's experts."""

    def begin_step(self, step: int, phase: str) -> None:
        pass

    def observe(self, layer: int, routed_ids: np.ndarray) -> None:
        pass

    def predict(self, layer: int, signals: Signals) -> list[Prediction]:
        if layer + 1 >= self.num_layers:
            return []
        scores = np.asarray(self.score_fn(layer, signals), dtype=np.float64)
        return [Prediction(layer + 1, *_rank(scores, self.num_experts))]


Predictor = NoPredictor | LookaheadPredictor | EapPredictor | OraclePredictor | LearnedPredictor


@dataclass(frozen=True)
class PredictorInputs:
    """Everything a predictor may be built from (`make_predictor`'s arguments)."""

    num_layers: int
    num_experts: int
    top_k: int
    depth: int
    eap_history: int
    limit: int
    future: FutureAccess | None
    score_fn: ScoreFn | None


def _oracle(name: str, a: PredictorInputs) -> Predictor:
    if a.future is None:
        raise UserError("predictor 'oracle' needs the trace's future routing")
    return OraclePredictor(a.num_layers, a.depth, a.future)


def _noisy_oracle(name: str, a: PredictorInputs) -> Predictor:
    if a.future is None:
        raise UserError("predictor 'noisy-oracle' reads the trace's future routing: the simulator has it, realrun not")
    return LookaheadPredictor(name, a.num_layers, a.num_experts, a.top_k, a.depth, a.limit or a.num_experts)


def _learned(name: str, a: PredictorInputs) -> Predictor:
    if a.score_fn is None:
        raise UserError("predictor 'learned' needs a trained estimator (score_fn); see `fatesim train-estimator`")
    return LearnedPredictor(a.num_layers, a.num_experts, a.score_fn)


BUILDERS: dict[str, Callable[[str, PredictorInputs], Predictor]] = {
    "none": lambda name, a: NoPredictor(),
    "crosslayer": lambda name, a: LookaheadPredictor(name, a.num_layers, a.num_experts, a.top_k, a.depth,
                                                     a.limit or a.num_experts),
    "speculative": lambda name, a: LookaheadPredictor(name, a.num_layers, a.num_experts, a.top_k, a.depth,
                                                      a.limit or a.num_experts),
    "noisy-oracle": _noisy_oracle,
    "eap": lambda name, a: EapPredictor(a.num_layers, a.num_experts, a.top_k, a.depth, a.eap_history),
    "oracle": _oracle,
    "learned": _learned,
}
"""name -> builder(name, inputs): the registry of predictors (a new predictor adds its name to PREDICTIONS and
a builder here; a builder raises UserError when the inputs lack what the predictor needs)."""


def make_predictor(name: str, *, num_layers: int, num_experts: int, top_k: int, depth: int, eap_history: int,
                   limit: int = 0, future: FutureAccess | None = None, score_fn: ScoreFn | None = None) -> Predictor:
    """The predictor `name`; UserError when it lacks what it needs (future, score_fn)."""
    if name not in BUILDERS:
        raise UserError(f"unknown prediction {name!r}; choose one of {', '.join(PREDICTIONS)}")
    inputs = PredictorInputs(num_layers, num_experts, top_k, depth, eap_history, limit, future, score_fn)
    return BUILDERS[name](name, inputs)
