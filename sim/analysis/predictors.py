"""How well can each predictor name the experts of a layer before its router runs?

Every predictor scores the E experts of a *target* MoE layer j for each token; we compare its choice with
the k experts the token really routed to at j. Two ways to choose (the Fate paper):
* **top-k**: the k highest-scoring experts (precision = recall then, both |chosen ∩ routed| / k);
* **threshold**: every expert whose score is >= τ (Fate prefetches only "confident" experts): precision =
  |chosen ∩ routed| / |chosen|, recall = |chosen ∩ routed| / |routed|. Scores are probabilities.
Counts are pooled over tokens (and layers, for the model row), separately for prefill and decode tokens.

The predictors (scores for target layer j of token t):
* ``gate_d{d}`` — cross-layer gate (Fate): softmax of the trace's look-ahead logits, layer j's router applied
  to the gate input of layer j-d. Needs `lookahead_logits`.
* ``path`` — expert activation path (EAP-style): the token's routed sets at layers 0..j-1 are matched
  against a library of earlier tokens (overlap summed over layers); the score is the share of the 8 best
  matches that routed e at j.
* ``popularity`` — the share of library tokens that routed e at j (static, per layer).
* ``learned_d{d}`` — the learned estimator (`estimator.py`) from the gate input of layer j-d. Trained on
  the library split unless an estimator file is given. Needs `gate_inputs`.
* ``oracle`` — the routed set itself (precision = recall = 1; the bar).
Prefill is also scored per **step** (`prefill_steps`): one prompt's tokens are processed together, so the
prefetcher needs the union of their experts; a predictor then fetches the union of its per-token top-k
(or confident) experts, and precision/recall are over those sets, pooled over prompts and layers.
Library and evaluation: sequences are split in two halves (first half = library, used for training the
path, popularity and learned predictors; second half = evaluation for every predictor). A trace with one
sequence is split by tokens.

Also: cosine similarity of adjacent layers' gate inputs (when recorded), and per-layer popularity skew
(Gini coefficient of expert counts, share of the k most popular experts, normalised entropy).
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

import numpy as np

from traces.errors import UserError

DEFAULT_THRESHOLD = 0.1
"""Confidence threshold τ on a predictor's score. Fate prefetches the experts its cross-layer gate is
confident about; the paper does not pin one number for every model, so τ is a parameter (`--threshold`)."""

PATH_NEIGHBOURS = 8
"""How many best-matching library paths vote in the `path` predictor."""

MAX_LIBRARY_TOKENS = 4096
"""The path predictor's library is capped (evenly subsampled) to bound its [T_eval, T_lib] similarity."""


def multi_hot(ids: np.ndarray, num_experts: int) -> np.ndarray:
    """[..., k] ids (negative = none) -> [..., E] bool."""
    ids = np.asarray(ids).astype(np.int64)
    out = np.zeros((*ids.shape[:-1], num_experts), dtype=bool)
    valid = ids >= 0
    index = np.nonzero(valid)
    out[(*index[:-1], ids[valid])] = True
    return out


def softmax(logits: np.ndarray) -> np.ndarray:
    """Softmax over the last axis, float32."""
    x = np.asarray(logits, dtype=np.float32)
    x = x - x.max(axis=-1, keepdims=True)
    e = np.exp(x)
    return e / e.sum(axis=-1, keepdims=True)


def match_counts(scores: np.ndarray, actual: np.ndarray, k: int, threshold: float) -> dict[str, np.ndarray]:
    """Per-token counts for scores [N, E] against actual multi-hot [N, E].

    Returns {"topk_tp", "thr_tp", "thr_pred", "actual"}, each [N] int64. Top-k picks the k highest scores
    (ties: lower expert id), threshold picks scores >= `threshold`.
    """
    n, e = scores.shape
    if n == 0:
        zero = np.zeros(0, dtype=np.int64)
        return {"topk_tp": zero, "thr_tp": zero, "thr_pred": zero, "actual": zero}
    order = np.argsort(-scores, axis=1, kind="stable")[:, :k]  # [N, k]
    topk_tp = np.take_along_axis(actual, order, axis=1).sum(axis=1)
    chosen = scores >= threshold
    return {"topk_tp": topk_tp.astype(np.int64), "thr_tp": (chosen & actual).sum(axis=1).astype(np.int64),
            "thr_pred": chosen.sum(axis=1).astype(np.int64), "actual": actual.sum(axis=1).astype(np.int64)}


def _summarise(counts: dict[str, int], k: int, tokens: int) -> dict:
    """Precision/recall at top-k and at the threshold from pooled counts (fractions; None if undefined)."""
    actual = counts["actual"]
    topk = counts["topk_tp"] / (k * tokens) if tokens else None
    return {
        "tokens": tokens,
        "topk": {"precision": topk, "recall": (counts["topk_tp"] / actual) if actual else None},
        "threshold": {
            "precision": (counts["thr_tp"] / counts["thr_pred"]) if counts["thr_pred"] else None,
            "recall": (counts["thr_tp"] / actual) if actual else None,
            "chosen_per_token": (counts["thr_pred"] / tokens) if tokens else None,
        },
    }


def prefill_step_counts(scores: np.ndarray, actual: np.ndarray, steps: list[np.ndarray], k: int,
                        threshold: float) -> dict[str, int]:
    """Set-level counts over prefill steps: a step (one sequence's prompt) fetches the union of its tokens'
    chosen experts; it needs the union of their routed experts. Fate's prefill prefetch works on this set.

    Returns {"steps", "needed", "topk_tp", "topk_pred", "thr_tp", "thr_pred"} summed over steps.
    """
    counts = dict.fromkeys(("steps", "needed", "topk_tp", "topk_pred", "thr_tp", "thr_pred"), 0)
    order = np.argsort(-scores, axis=1, kind="stable")[:, :k]  # [N, k]
    for rows in steps:
        need = actual[rows].any(axis=0)  # [E]
        topk = np.zeros(scores.shape[1], dtype=bool)
        topk[order[rows].ravel()] = True
        conf = (scores[rows] >= threshold).any(axis=0)
        counts["steps"] += 1
        counts["needed"] += int(need.sum())
        counts["topk_tp"] += int((topk & need).sum())
        counts["topk_pred"] += int(topk.sum())
        counts["thr_tp"] += int((conf & need).sum())
        counts["thr_pred"] += int(conf.sum())
    return counts


def _summarise_steps(c: dict[str, int]) -> dict:
    """Precision/recall of the per-step expert sets (fractions; None where undefined)."""
    def frac(a: int, b: int) -> float | None:
        return a / b if b else None

    return {"steps": c["steps"], "experts_needed_per_step": frac(c["needed"], c["steps"]),
            "topk": {"precision": frac(c["topk_tp"], c["topk_pred"]), "recall": frac(c["topk_tp"], c["needed"])},
            "threshold": {"precision": frac(c["thr_tp"], c["thr_pred"]), "recall": frac(c["thr_tp"], c["needed"]),
                          "chosen_per_step": frac(c["thr_pred"], c["steps"])}}


def split_library(seq_slices: Sequence[slice], num_tokens: int) -> tuple[np.ndarray, np.ndarray]:
    """Boolean masks [T] (library, evaluation): first half of the sequences vs the rest (tokens if one)."""
    library = np.zeros(num_tokens, dtype=bool)
    if len(seq_slices) >= 2:
        for sl in seq_slices[: len(seq_slices) // 2]:
            library[sl] = True
    else:
        library[: num_tokens // 2] = True
    return library, ~library


def popularity_skew(ids_layer: np.ndarray, num_experts: int, k: int) -> dict:
    """Skew of one layer's expert counts: Gini (0 = uniform), top-k share, normalised entropy (1 = uniform)."""
    counts = np.bincount(ids_layer[ids_layer >= 0].astype(np.int64), minlength=num_experts).astype(np.float64)
    total = counts.sum()
    if total == 0:
        return {"gini": None, "top_k_share": None, "entropy": None}
    sorted_counts = np.sort(counts)
    ranks = np.arange(1, num_experts + 1)
    gini = float((2 * ranks - num_experts - 1) @ sorted_counts / (num_experts * total))
    p = counts / total
    entropy = float(-(p[p > 0] * np.log(p[p > 0])).sum() / np.log(num_experts)) if num_experts > 1 else 1.0
    return {"gini": gini, "top_k_share": float(sorted_counts[-k:].sum() / total), "entropy": entropy}


def path_scores(hot: np.ndarray, library: np.ndarray, evaluation: np.ndarray, target: int,
                neighbours: int = PATH_NEIGHBOURS) -> np.ndarray:
    """EAP-style scores [N_eval, E] for layer `target` (>= 1) from layers 0..target-1 of each token's path.

    `hot` is the multi-hot routing [T, L, E]; library/evaluation are [T] masks.
    """
    lib_idx = np.flatnonzero(library)
    if lib_idx.size > MAX_LIBRARY_TOKENS:
        lib_idx = lib_idx[np.linspace(0, lib_idx.size - 1, MAX_LIBRARY_TOKENS).astype(np.int64)]
    ev = hot[evaluation][:, :target].reshape(int(evaluation.sum()), -1).astype(np.float32)  # [N, target·E]
    lib = hot[lib_idx][:, :target].reshape(lib_idx.size, -1).astype(np.float32)  # [M, target·E]
    similarity = ev @ lib.T  # [N, M] overlap summed over layers
    nn = min(neighbours, lib_idx.size)
    best = np.argpartition(-similarity, nn - 1, axis=1)[:, :nn]  # [N, nn]
    return hot[lib_idx][:, target][best].mean(axis=1).astype(np.float32)  # [N, E]


def adjacent_cosine(gate_inputs: np.ndarray) -> list[float]:
    """Mean over tokens of cos(gate input of layer l, of layer l+1), for l = 0..L-2."""
    out = []
    for layer in range(gate_inputs.shape[1] - 1):
        a = np.asarray(gate_inputs[:, layer], dtype=np.float32)
        b = np.asarray(gate_inputs[:, layer + 1], dtype=np.float32)
        denom = np.linalg.norm(a, axis=1) * np.linalg.norm(b, axis=1)
        cos = (a * b).sum(axis=1) / np.maximum(denom, 1e-12)
        out.append(float(cos.mean()))
    return out


def predictor_report(trace, threshold: float = DEFAULT_THRESHOLD, estimator=None, estimator_depth: int = 2,
                     estimator_steps: int = 300, predictors: Sequence[str] | None = None,
                     progress: Callable[[int], None] | None = None) -> dict:
    """Per-layer precision/recall of every available predictor on a `Trace` (see the module docstring).

    `estimator` is a `LearnedEstimator` to evaluate (else one is trained on the library split when the
    trace has gate inputs). `predictors` restricts the families: among "gate", "path", "popularity",
    "learned", "oracle". JSON: ``{"layers": [{"layer", "predictors": {name: {"prefill": ..., "decode": ...}},
    "cosine_next", "skew"}], "model": {"predictors": ...}, "params": ...}``; values are fractions.
    `progress(1)` after each training step of a fresh estimator (`will_train` says if one is) and each layer.
    """
    families = set(predictors or ("gate", "path", "popularity", "learned", "oracle"))
    unknown = families - {"gate", "path", "popularity", "learned", "oracle"}
    if unknown:
        raise UserError(f"unknown predictor {sorted(unknown)[0]!r}; choose from gate, path, popularity, learned, oracle")
    if not 0.0 < threshold <= 1.0:
        raise UserError(f"threshold must be in (0, 1], got {threshold}")
    ids = np.asarray(trace.topk_ids)
    num_tokens, num_layers, k = ids.shape
    num_experts = trace.num_experts
    hot = multi_hot(ids, num_experts)  # [T, L, E]
    library, evaluation = split_library(trace.sequence_slices(), num_tokens)
    prefill = np.asarray(trace.is_prefill).astype(bool)[evaluation]  # [N]
    eval_seq = np.asarray(trace.seq_ids)[evaluation]  # [N]
    prefill_steps = [np.flatnonzero(prefill & (eval_seq == s)) for s in np.unique(eval_seq[prefill])]
    if predictors is not None and "gate" in families and trace.lookahead_logits is None:
        raise UserError("trace has no lookahead_logits; the cross-layer gate predictor needs them (record with look-ahead)")
    if predictors is not None and "learned" in families and trace.gate_inputs is None and estimator is None:
        raise UserError("trace has no gate_inputs; the learned estimator needs them (record with gate inputs)")

    if "learned" in families and estimator is None and trace.gate_inputs is not None and library.any():
        from sim.analysis.estimator import train_estimator

        estimator = train_estimator(trace, depth=estimator_depth, steps=estimator_steps, token_mask=library,
                                    progress=progress)
    if estimator is not None and estimator.num_experts != num_experts:
        raise UserError(f"estimator predicts {estimator.num_experts} experts, the trace has {num_experts}")

    lib_pop = hot[library].mean(axis=0) if library.any() else hot.mean(axis=0)  # [L, E]
    pooled: dict[str, dict[str, dict[str, int]]] = {}
    pooled_steps: dict[str, dict[str, int]] = {}
    layers_out = []
    for j in range(num_layers):
        actual = hot[evaluation][:, j]  # [N, E]
        scored: dict[str, np.ndarray] = {}
        if "oracle" in families:
            scored["oracle"] = actual.astype(np.float32)
        if "popularity" in families:
            scored["popularity"] = np.broadcast_to(lib_pop[j], actual.shape)
        if "path" in families and j >= 1 and library.any():
            scored["path"] = path_scores(hot, library, evaluation, j)
        if "gate" in families and trace.lookahead_logits is not None:
            for d in range(1, trace.lookahead_depth + 1):
                if j - d >= 0:
                    logits = np.asarray(trace.lookahead_logits[d - 1][:, j - d])[evaluation]  # [N, E]
                    scored[f"gate_d{d}"] = softmax(logits)
        if "learned" in families and estimator is not None and trace.gate_inputs is not None:
            for d in range(1, estimator.depth + 1):
                if j - d >= 0:
                    x = np.asarray(trace.gate_inputs[:, j - d])[evaluation]  # [N, H]
                    scored[f"learned_d{d}"] = estimator.scores(j - d, x)[:, d - 1]
        entry: dict = {"layer": int(trace.model_config.moe_layer_indices[j]), "predictors": {}}
        for name, scores in scored.items():
            if prefill_steps and name != "oracle":
                step_counts = prefill_step_counts(np.asarray(scores), actual, prefill_steps, k, threshold)
                entry.setdefault("prefill_steps", {})[name] = _summarise_steps(step_counts)
                acc_steps = pooled_steps.setdefault(name, dict.fromkeys(step_counts, 0))
                for key, value in step_counts.items():
                    acc_steps[key] += value
            per_token = match_counts(np.asarray(scores), actual, k, threshold)
            entry["predictors"][name] = {}
            for phase, mask in (("prefill", prefill), ("decode", ~prefill)):
                counts = {key: int(value[mask].sum()) for key, value in per_token.items()}
                entry["predictors"][name][phase] = _summarise(counts, k, int(mask.sum()))
                acc = pooled.setdefault(name, {}).setdefault(phase, {key: 0 for key in counts})
                acc["tokens"] = acc.get("tokens", 0) + int(mask.sum())
                for key, value in counts.items():
                    acc[key] += value
        entry["skew"] = popularity_skew(ids[:, j], num_experts, k)
        layers_out.append(entry)
        if progress is not None:
            progress(1)
    if trace.gate_inputs is not None:
        for j, cos in enumerate(adjacent_cosine(np.asarray(trace.gate_inputs))):
            layers_out[j]["cosine_next"] = cos
    model = {"predictors": {name: {phase: _summarise(c, k, c.pop("tokens")) for phase, c in phases.items()}
                            for name, phases in pooled.items()},
             "prefill_steps": {name: _summarise_steps(c) for name, c in pooled_steps.items()}}
    model["skew"] = {"mean_gini": float(np.mean([e["skew"]["gini"] or 0.0 for e in layers_out])),
                     "mean_top_k_share": float(np.mean([e["skew"]["top_k_share"] or 0.0 for e in layers_out]))}
    if trace.gate_inputs is not None:
        cos = [e["cosine_next"] for e in layers_out if "cosine_next" in e]
        model["cosine_next_mean"] = float(np.mean(cos)) if cos else None
    params = {"threshold": threshold, "top_k": k, "num_experts": num_experts, "library_tokens": int(library.sum()),
              "evaluation_tokens": int(evaluation.sum()), "evaluation_prefill_tokens": int(prefill.sum()),
              "evaluation_decode_tokens": int((~prefill).sum()), "model": trace.model,
              "estimator": (estimator.metadata if estimator is not None else None)}
    return {"layers": layers_out, "model": model, "params": params}


def will_train(trace, estimator, predictors: Sequence[str] | None) -> bool:
    """Whether `predictor_report` trains an estimator first (its progress then counts the steps too)."""
    families = set(predictors or ("gate", "path", "popularity", "learned", "oracle"))
    library, _ = split_library(trace.sequence_slices(), trace.num_tokens)
    return "learned" in families and estimator is None and trace.gate_inputs is not None and bool(library.any())


def format_predictors(report: dict) -> str:
    """Plain-text table of the model-level rows of a `predictor_report` (percent), then per-layer top-k."""
    def pct(value: float | None) -> str:
        return "   –  " if value is None else f"{100 * value:6.2f}"

    lines = [f"threshold τ = {report['params']['threshold']}; library {report['params']['library_tokens']} tokens, "
             f"evaluation {report['params']['evaluation_tokens']} "
             f"({report['params']['evaluation_prefill_tokens']} prefill, {report['params']['evaluation_decode_tokens']} decode)",
             f"{'predictor':<12} {'phase':<8} {'P@k':>6} {'R@k':>6} {'P@τ':>6} {'R@τ':>6} {'n@τ':>6}"]
    for name, phases in report["model"]["predictors"].items():
        for phase, s in phases.items():
            if not s["tokens"]:
                continue
            chosen = s["threshold"]["chosen_per_token"]
            lines.append(f"{name:<12} {phase:<8} {pct(s['topk']['precision'])} {pct(s['topk']['recall'])} "
                         f"{pct(s['threshold']['precision'])} {pct(s['threshold']['recall'])} "
                         f"{'   –  ' if chosen is None else f'{chosen:6.2f}'}")
    if report["model"].get("prefill_steps"):
        lines.append("prefill steps (the set of experts a whole prompt needs, per layer):")
        for name, st in report["model"]["prefill_steps"].items():
            chosen = st["threshold"]["chosen_per_step"]
            lines.append(f"{name:<12} {'step':<8} {pct(st['topk']['precision'])} {pct(st['topk']['recall'])} "
                         f"{pct(st['threshold']['precision'])} {pct(st['threshold']['recall'])} "
                         f"{'   –  ' if chosen is None else f'{chosen:6.2f}'}  ({st['steps']} prompt-layer sets, "
                         f"{st['experts_needed_per_step']:.1f} experts needed per set)")
    skew = report["model"]["skew"]
    cos = report["model"].get("cosine_next_mean")
    lines.append(f"popularity skew: mean Gini {skew['mean_gini']:.3f}, mean top-k share {100 * skew['mean_top_k_share']:.1f}%"
                 + ("" if cos is None else f"; mean cosine of adjacent gate inputs {cos:.3f}"))
    names = list(report["model"]["predictors"])
    lines.append("")
    lines.append("per layer, precision@k over all evaluation tokens:")
    lines.append(f"{'layer':>5} " + " ".join(f"{n:>12}" for n in names) + f" {'gini':>6} {'cos→next':>8}")
    for entry in report["layers"]:
        cells = []
        for name in names:
            p = entry["predictors"].get(name)
            if p is None:
                cells.append(f"{'–':>12}")
                continue
            tokens = p["prefill"]["tokens"] + p["decode"]["tokens"]
            tp = sum((p[ph]["topk"]["precision"] or 0.0) * p[ph]["tokens"] for ph in ("prefill", "decode"))
            cells.append(f"{100 * tp / tokens:12.2f}" if tokens else f"{'–':>12}")
        gini = entry["skew"]["gini"]
        cos = entry.get("cosine_next")
        lines.append(f"{entry['layer']:>5} " + " ".join(cells) + f" {'–' if gini is None else f'{gini:.3f}':>6}"
                     f" {'–' if cos is None else f'{cos:.3f}':>8}")
    return "\n".join(lines)
