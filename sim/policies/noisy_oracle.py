"""The noisy oracle: look-ahead signals made from a trace's own future routing, at an assumed recall.

Real routing logs carry no look-ahead logits, so the look-ahead predictors (Fate's cross-layer gate,
mixtral-offloading's, Speculating Experts') have nothing to read on them. `prediction=noisy-oracle`
gives them a stand-in: for every token, MoE layer l and depth d, each of the k experts the token really
routes to at layer l+d is predicted with probability `recall` (independently, seeded), and the other
places of the predicted top-k are filled with random experts the token does not route to. The signal is
a probability vector over the E experts in which the k predicted experts rank first, in random order,
and the others follow in random order. The predicted experts share probability 0.9 and the others 0.1,
each group falling by 0.1% per rank so that no two experts tie (`rank_values`).

so top-k precision and recall of the signal are both `recall` on average, and a prefetcher that keeps
fewer than k picks gets predicted experts in random order (never the true ones first). The predictor
that reads it is the cross-layer one (decode: by probability; prefill: by predicted token count), so
fate, mixtral-offloading and speculate run unchanged on any trace.

This is an assumption about a predictor, not a measurement: every output of such a replay says so.
`recall` is one number (default 0.84, the Fate paper's decode prediction accuracy on Qwen1.5-MoE,
arXiv 2502.12224 §3) or per layer and phase from an `fatesim analyze predictors --json` report of
another trace (its `gate_d{d}` top-k recall of each target layer).
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import numpy as np

from traces.errors import UserError

DEFAULT_RECALL = 0.84
"""Fate (arXiv 2502.12224 §3): cross-layer prediction accuracy ≈84% in decode on Qwen1.5-MoE."""

PREDICTED_MASS = 0.9
"""Probability mass of the k predicted experts (the rest share 1 − this)."""

PHASES = ("prefill", "decode")


PERMUTATIONS = 8192
"""Random orders of the E experts are drawn from a table of this many random permutations (made from the
seed per replay): each row picks one at random, which keeps every draw O(k) per row instead of a sort."""


def noisy_oracle_signals(topk_ids: np.ndarray, is_prefill: np.ndarray, num_experts: int, depth: int,
                         recall: float | np.ndarray, seed: int) -> np.ndarray:
    """Look-ahead signals (module docstring) from the routing `topk_ids` [T, L, k]: the probabilities
    [D, T, L, E] float32.

    recall: one number, or [D, L, 2] per depth, source layer l (predicting l + d) and phase (0 prefill,
    1 decode). Entries whose target layer is past the last are uniform (never read).
    """
    ids = np.asarray(topk_ids).astype(np.intp)
    num_tokens, num_layers, k = ids.shape
    e = int(num_experts)
    if depth < 1:
        raise ValueError(f"depth must be >= 1, got {depth}")
    rec = np.asarray(recall, dtype=np.float32)
    if rec.ndim == 0:
        rec = np.broadcast_to(rec, (depth, num_layers, 2))
    if rec.shape != (depth, num_layers, 2):
        raise ValueError(f"recall must be a number or [{depth}, {num_layers}, 2], got shape {rec.shape}")
    phase = (~np.asarray(is_prefill).astype(bool)).astype(np.intp)  # [T] 0 prefill, 1 decode
    values = rank_values(e, k)  # probability of each rank, strictly decreasing: no ties to break
    probs = np.empty((depth, num_tokens, num_layers, e), dtype=np.float32)
    for d in range(1, depth + 1):
        probs[d - 1, :, max(0, num_layers - d):, :] = 1.0 / e  # targets past the last layer: never read
    rng = np.random.default_rng(seed)
    perms = np.argsort(rng.random((PERMUTATIONS, e)), axis=1).astype(np.int16)  # [P, E] random orders
    places = np.argsort(perms, axis=1)  # [P, E] place of each expert in its order (intp: an index)
    for d in range(1, depth + 1):
        n = num_layers - d  # source layers 0..n-1 predict layers d..L-1
        if n <= 0 or num_tokens == 0:
            continue
        rows = num_tokens * n
        truth = ids[:, d:, :].reshape(rows, k)  # experts routed at the target layers
        # Which routed experts the predictor finds: each with probability recall(d, l, phase of t).
        p_keep = rec[d - 1, :n, :][:, phase].T.reshape(rows, 1)
        kept = rng.random((rows, k), dtype=np.float32) < p_keep
        candidates, taken = _fillers(truth, k - kept.sum(axis=1), perms, rng)
        chosen = np.concatenate([truth, candidates], axis=1)
        predicted = chosen[np.concatenate([kept, taken], axis=1)].reshape(rows, k)  # exactly k per row
        # Order: the predicted experts first, then the others, each group in the order of a fresh random
        # permutation drawn independently of the selection (found and filler experts are equally likely
        # at any rank). Worked out in "place" space (place p of the row's permutation): a predicted place's
        # rank is the number of predicted places before it, another's is k + p minus that number.
        b = rng.integers(0, PERMUTATIONS, rows)
        place = places[b]  # [rows, E] place of each expert in the row's order
        marked = np.zeros((rows, e), dtype=bool)  # [rows, places]: a predicted expert sits there
        np.put_along_axis(marked, np.take_along_axis(place, predicted, axis=1), True, axis=1)
        before = np.cumsum(marked, axis=1, dtype=np.int16) - marked  # predicted places before p
        rank_at = np.where(marked, before, np.int16(k) + np.arange(e, dtype=np.int16) - before)
        rank = np.take_along_axis(rank_at, place, axis=1)  # [rows, E] rank of each expert
        probs[d - 1, :, :n, :] = np.take(values, rank).reshape(num_tokens, n, e)
    return probs


def _fillers(truth: np.ndarray, count: np.ndarray, perms: np.ndarray,
             rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray]:
    """(candidates [rows, c], taken [rows, c]): the first `count` experts not in `truth` [rows, k] in a
    random order per row are the candidates where `taken`. The first c experts outside a k-set lie among
    the first c + k places of the order, so only those places are looked at."""
    rows, k = truth.shape
    e = perms.shape[1]
    a = rng.integers(0, perms.shape[0], rows)
    candidates = perms[a, : min(2 * k, e)].astype(np.intp)  # [rows, 2k] the first places of the row's order
    routed = np.zeros((rows, e), dtype=bool)
    np.put_along_axis(routed, truth, True, axis=1)
    free = ~np.take_along_axis(routed, candidates, axis=1)
    return candidates, free & (np.cumsum(free, axis=1) <= count[:, None])


def rank_values(num_experts: int, top_k: int) -> np.ndarray:
    """[E] float32 probability of each rank: the k predicted ones share PREDICTED_MASS, the rest the
    remainder, each group falling by 0.1% per rank (so no two are equal), normalised to sum 1."""
    e, k = int(num_experts), int(top_k)
    ranks = np.arange(e, dtype=np.float64)
    base = np.where(ranks < k, PREDICTED_MASS / k, (1.0 - PREDICTED_MASS) / max(1, e - k))
    within = np.where(ranks < k, ranks, ranks - k)
    values = base * (1.0 - 0.001 * within)
    return (values / values.sum()).astype(np.float32)


def recall_from_report(path: str | Path, moe_layer_indices: tuple[int, ...], depth: int) -> np.ndarray:
    """[D, L, 2] recall per depth, source layer and phase from an `analyze predictors --json` report.

    Layers are matched by decoder index when the report has every layer of this trace (the `layer` of
    its entries), else by position when it has as many layers; a phase the report has no tokens of takes
    the other phase's value, and a layer with neither the model-level value of that predictor."""
    try:
        report = json.loads(Path(path).read_text())
    except FileNotFoundError:
        raise UserError(f"predictor_recall file {path} does not exist; write one with "
                        "`fatesim analyze predictors --trace OTHER --json --out FILE`") from None
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as error:
        raise UserError(f"predictor_recall file {path} is not a readable JSON report ({error})") from None
    layers = report.get("layers") if isinstance(report, dict) else None
    if not isinstance(layers, list) or not layers or not all(isinstance(x, dict) and "layer" in x for x in layers):
        raise UserError(f"predictor_recall file {path} is not an `analyze predictors --json` report (no 'layers')")
    by_index = {int(x["layer"]): x for x in layers}
    num_layers = len(moe_layer_indices)
    if all(i in by_index for i in moe_layer_indices):
        entries = [by_index[i] for i in moe_layer_indices]
    elif len(layers) == num_layers:
        entries = list(layers)
    else:
        raise UserError(f"predictor_recall file {path} covers decoder layers {sorted(by_index)}, which neither "
                        f"include this trace's MoE layers {list(moe_layer_indices)} nor number {num_layers}")
    model = report.get("model", {}).get("predictors", {})
    out = np.zeros((depth, num_layers, 2), dtype=np.float32)
    for d in range(1, depth + 1):
        name = f"gate_d{d}"
        if name not in model:
            raise UserError(f"predictor_recall file {path} has no {name} predictor (the cross-layer gate {d} "
                            f"layer(s) ahead); make it from a trace recorded with --lookahead {max(d, 2)}")
        overall = _recall(model[name])
        for source in range(num_layers - d):
            values = _recall(entries[source + d].get("predictors", {}).get(name, {}))
            for p in range(2):
                value = values[p] if values[p] is not None else values[1 - p]
                if value is None:
                    value = overall[p] if overall[p] is not None else overall[1 - p]
                if value is None:
                    raise UserError(f"predictor_recall file {path}: {name} has no recall at all")
                out[d - 1, source, p] = value
    return out


def _recall(entry: Any) -> list[float | None]:
    """[prefill, decode] top-k recall of one predictor entry (None where it has no tokens)."""
    values: list[float | None] = []
    for phase in PHASES:
        try:
            value = entry[phase]["topk"]["recall"]
        except (KeyError, TypeError):
            value = None
        values.append(None if value is None else float(value))
    return values


def describe(recall: float | str, seed: int) -> str:
    """The assumption line every output of a noisy-oracle replay carries."""
    source = (f"recall {float(recall):g}" if not isinstance(recall, str)
              else f"per-layer recall from {recall}")
    return (f"prediction noisy-oracle is an assumed predictor, not a measured one: each expert the trace routes "
            f"to at a layer ahead is predicted with {source} (seed {seed}), the rest of the top-k at random")
