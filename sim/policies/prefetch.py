"""Prefetch scheduling: which predicted experts to fetch, how many, and what happens to stale ones.

Given the predictor's ranked experts for the layers ahead, a prefetch policy picks the ones worth a
transfer. Already resident (or in flight) experts are skipped by the controller; the controller also caps
a layer's prefetches at its free-able slots. On-demand loads always go before prefetches on the link
(the engines enforce it), and a prefetch still queued when its layer routes elsewhere is cancelled
(`cancel_stale`).

- `none`: no prefetching.
- `fate`: Fate (arXiv 2502.12224). Decode: n = floor(decode layer time / INT4 expert transfer time)
  experts per layer ahead (at least 1), those with confidence >= `confidence`; a prefetch that cannot
  arrive within the layer it hides behind only steals link time. Prefill: every predicted expert, in
  predicted-popularity order (most tokens first), so the most useful bytes arrive first.
- `topk`: the predictor's first `prefetch_count` experts per layer ahead (mixtral-offloading style).
- `all`: every predicted expert (used with the oracle predictor: fetch exactly the future).
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING

from sim.policies.prediction import Prediction

if TYPE_CHECKING:  # the controller must not depend on the cost model; its callers do
    from sim.costs import CostModel

PREFETCHES = ("none", "fate", "topk", "all")
"""Valid prefetch policy names."""


@dataclass(frozen=True)
class PrefetchPolicy:
    """How many of the predicted experts to fetch."""

    name: str
    confidence: float
    """Decode: minimum predicted probability to prefetch (`fate`)."""
    prefetch_count: int
    """Experts per layer ahead for `topk`."""
    fate_decode_count: int
    """Fate's n = floor(layer time / INT4 transfer time), at least 1 (`decode_prefetch_count`)."""

    def select(self, predictions: list[Prediction], phase: str) -> list[tuple[int, int, float]]:
        """(layer, expert, score) to prefetch, in issue order (nearest layer first, best first)."""
        out: list[tuple[int, int, float]] = []
        for layer, experts, scores in predictions:
            experts, scores = self.select_layer(experts, scores, phase)
            out.extend((layer, e, s) for e, s in zip(experts, scores, strict=True))
        return out

    def select_layer(self, experts: Sequence[int], scores: Sequence[float],
                     phase: str) -> tuple[Sequence[int], Sequence[float]]:
        """The experts (and scores) to prefetch of one layer's prediction, best first."""
        name = self.name
        if name == "fate" and phase == "decode":  # first: it runs on every decode layer step under fate
            count = self.fate_decode_count
            if self.confidence > 0.0:
                keep = [i for i, s in enumerate(scores) if s >= self.confidence][:count]
                return [experts[i] for i in keep], [scores[i] for i in keep]
        elif name == "topk":
            count = self.prefetch_count
        elif name == "none":
            return (), ()
        else:
            count = len(experts)
        return experts[:count], scores[:count]


def fate_decode_count(decode_layer_s: float, int4_transfer_s: float) -> int:
    """Fate's prefetch count in decode: how many INT4 experts the link moves during one layer (>= 1)."""
    return max(1, math.floor(decode_layer_s / int4_transfer_s))


def decode_prefetch_count(costs: CostModel) -> int:
    """Fate's n on `costs`' model and hardware: INT4 experts the link moves during one decode layer (>= 1),
    what an engine passes to `OffloadController(decode_prefetch_count=...)`."""
    return fate_decode_count(costs.decode_layer_s("int4"), costs.transfer_s(costs.spec.expert_bytes("int4")))
