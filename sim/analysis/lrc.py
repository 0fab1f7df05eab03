"""Local routing consistency (Liang et al., ICLR 2026) and the cache hit rates it bounds.

How stable is a layer's routing over a few consecutive tokens? Two numbers answer it (Liang et al.; the
definitions below are the ones this project uses, README "Local routing consistency"):

* **SRP** (segment routing best performance). Slide a window of m tokens (stride 1, never across a
  sequence boundary) over each sequence; f(e) is how many of the window's tokens route to expert e. Predict
  "e is active for the whole window" iff f(e) >= α. Pooled over every (window, expert) pair of a layer (or
  of the model), with N(f) the number of pairs whose count is f,
  ``F1(α) = 2·Σ_{f>=α} f·N(f) / (m·Σ_{f>=α} N(f) + Σ_f f·N(f))`` and SRP = max over α in 1..m.
  (Precision is Σ_{f>=α} f·N(f) / (m·Σ_{f>=α} N(f)), recall Σ_{f>=α} f·N(f) / Σ_f f·N(f).)
* **SCH** (segment cache best hit rate). A per-layer cache of ρ·k slots, empty at each sequence start.
  At token t its k routed experts are looked up against the state *before* token t; then each miss is
  inserted, in routing order. When the cache is full the victim is the resident expert that is used the
  fewest times in the next m tokens (t+1 .. t+m, cut at the sequence's end), ties broken least recently
  used; experts routed by token t itself are never victims (they are being computed).

**SCH-static** (ours, to compare with the published numbers): the best *fixed* set of ρ·k experts per
window — for each window of m tokens (stride 1, inside a sequence), the share of its k·m activations that
go to its ρ·k most used experts, pooled. It has no cold misses and no eviction order, so it is not a
demand-paged cache; it is what a cache loaded with perfect knowledge at the start of each segment gets.

For comparison, the same cache size is simulated with LRU, LFU (uses since insertion, ties LRU — the
semantics of `sim.policies.eviction.LFU`) and Belady (evict the resident whose next use is furthest away; never-again first; ties LRU).
All hit rates are pooled: hits / accesses over every token (and every layer, for the model figure).

Shapes: T tokens, L MoE layers, k experts per token, E routed experts, C cache slots, W windows.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

import numpy as np

from traces.errors import UserError

CACHE_POLICIES = ("sch", "lru", "lfu", "belady")


def window_count_histogram(
    ids: np.ndarray, slices: Sequence[slice], m: int, num_experts: int
) -> np.ndarray:
    """N(f) for one layer: how many (window, expert) pairs have count f, for f = 0..m.

    `ids` is [T, k] (negative ids are ignored); windows of m tokens, stride 1, inside each sequence
    slice only (a sequence shorter than m contributes no window). Returns int64 [m + 1].
    """
    hist = np.zeros(m + 1, dtype=np.int64)
    for sl in slices:
        seq = ids[sl]  # [n, k]
        n = seq.shape[0]
        if n < m:
            continue
        onehot = np.zeros((n + 1, num_experts), dtype=np.int32)  # row t+1: token t
        rows, cols = np.nonzero(seq >= 0)
        np.add.at(onehot, (rows + 1, seq[rows, cols].astype(np.int64)), 1)
        cum = np.cumsum(onehot, axis=0)  # [n+1, E]
        counts = cum[m:] - cum[: n + 1 - m]  # [W, E], W = n - m + 1
        hist += np.bincount(counts.ravel(), minlength=m + 1)[: m + 1]
    return hist


def srp_from_histogram(hist: np.ndarray) -> tuple[float | None, int | None]:
    """(SRP, best α) from N(f), f = 0..m (see the module docstring). SRP is a fraction in [0, 1];
    (None, None) when there is no window (every sequence shorter than m)."""
    m = hist.shape[0] - 1
    f = np.arange(m + 1, dtype=np.float64)
    mass = f * hist  # f·N(f)
    total_mass = mass.sum()
    if total_mass == 0:
        return None, None
    best, best_alpha = -1.0, 1
    for alpha in range(1, m + 1):
        tp = mass[alpha:].sum()
        predicted = m * hist[alpha:].sum()
        f1 = 2.0 * tp / (predicted + total_mass)
        if f1 > best:
            best, best_alpha = f1, alpha
    return float(best), best_alpha


def segment_cache_coverage(
    ids: np.ndarray, slices: Sequence[slice], m: int, slots: int, num_experts: int
) -> tuple[int, int]:
    """SCH-static for one layer: (activations covered by each window's `slots` most used experts, all
    activations in windows), summed over windows of m tokens, stride 1, inside each sequence. `ids` [T, k]."""
    covered = total = 0
    for sl in slices:
        seq = ids[sl]  # [n, k]
        n = seq.shape[0]
        if n < m:
            continue
        onehot = np.zeros((n + 1, num_experts), dtype=np.int32)
        rows, cols = np.nonzero(seq >= 0)
        np.add.at(onehot, (rows + 1, seq[rows, cols].astype(np.int64)), 1)
        cum = np.cumsum(onehot, axis=0)
        counts = cum[m:] - cum[: n + 1 - m]  # [W, E]
        covered += int(np.sort(counts, axis=1)[:, -slots:].sum())
        total += int(counts.sum())
    return covered, total


def _future_counts(seq: np.ndarray, m: int, num_experts: int) -> np.ndarray:
    """[n, L, E] int32: how often each expert is routed in tokens t+1 .. t+m of this sequence."""
    n, num_layers, _ = seq.shape
    onehot = np.zeros((n + 1, num_layers, num_experts), dtype=np.int32)
    t_idx, l_idx, j_idx = np.nonzero(seq >= 0)
    np.add.at(onehot, (t_idx + 1, l_idx, seq[t_idx, l_idx, j_idx].astype(np.int64)), 1)
    cum = np.cumsum(onehot, axis=0)  # cum[t] = tokens 0 .. t-1
    start = np.arange(n) + 1
    stop = np.minimum(start + m, n)
    return cum[stop] - cum[start]


def _next_use(seq: np.ndarray, num_experts: int) -> np.ndarray:
    """[n, L, E] int32: the next token after t that routes to the expert, n if none in this sequence."""
    n, num_layers, _ = seq.shape
    nxt = np.full((n, num_layers, num_experts), n, dtype=np.int32)
    running = np.full((num_layers, num_experts), n, dtype=np.int32)
    layer_of = np.arange(num_layers)[:, None]
    for t in range(n - 1, -1, -1):
        nxt[t] = running
        row = seq[t]  # [L, k]
        valid = row >= 0
        running[np.broadcast_to(layer_of, row.shape)[valid], row[valid]] = t
    return nxt


def cache_hits(
    ids: np.ndarray,
    slices: Sequence[slice],
    slots: int,
    policy: str,
    num_experts: int,
    m: int = 16,
) -> tuple[np.ndarray, np.ndarray]:
    """Simulate a per-layer expert cache of `slots` experts; returns (hits [L], accesses [L]).

    `ids` is [T, L, k] routed experts (negative ids are no access). `policy` is one of CACHE_POLICIES;
    `m` is SCH's look-ahead in tokens. The cache is emptied at the start of each sequence slice; all
    layers are simulated in lockstep (vectorised over L).
    """
    if policy not in CACHE_POLICIES:
        raise UserError(f"unknown cache policy {policy!r}; choose one of {', '.join(CACHE_POLICIES)}")
    _, num_layers, k = ids.shape
    if slots < k:
        raise UserError(f"a cache of {slots} slots cannot hold one token's {k} experts; use rho >= 1")
    hits = np.zeros(num_layers, dtype=np.int64)
    accesses = np.zeros(num_layers, dtype=np.int64)
    layers = np.arange(num_layers)
    for sl in slices:
        seq = np.asarray(ids[sl]).astype(np.int64)  # [n, L, k]
        n = seq.shape[0]
        if n == 0:
            continue
        tie = n + 2  # last-used times are < n: key = score * tie + last_used orders by score, then LRU
        future = _future_counts(seq, m, num_experts) if policy == "sch" else None
        nxt = _next_use(seq, num_experts) if policy == "belady" else None
        cache = np.full((num_layers, slots), -1, dtype=np.int64)  # [L, C] expert id, -1 empty
        last = np.full((num_layers, slots), -1, dtype=np.int64)  # [L, C] token of last use
        uses = np.zeros((num_layers, slots), dtype=np.int64)  # [L, C] uses since insertion (LFU)
        for t in range(n):
            row = seq[t]  # [L, k]
            valid = row >= 0
            present = cache[:, :, None] == row[:, None, :]  # [L, C, k]
            hit = present.any(axis=1) & valid  # [L, k]
            hits += hit.sum(axis=1)
            accesses += valid.sum(axis=1)
            protected = present.any(axis=2)  # [L, C] residents used by token t
            last[protected] = t
            uses[protected] += 1
            for j in range(k):
                need = valid[:, j] & ~hit[:, j]  # [L]
                if not need.any():
                    continue
                resident = np.where(cache >= 0, cache, 0)
                if policy == "lru":
                    score = np.zeros_like(last)
                elif policy == "lfu":
                    score = uses
                elif policy == "sch":
                    score = future[t][layers[:, None], resident]
                else:  # belady: furthest next use first
                    score = n - nxt[t][layers[:, None], resident]
                key = score * tie + last
                key[cache < 0] = -1  # an empty slot is always taken first
                key[protected] = np.iinfo(np.int64).max
                victim = np.argmin(key, axis=1)  # [L]
                rows = layers[need]
                cache[rows, victim[need]] = row[need, j]
                last[rows, victim[need]] = t
                uses[rows, victim[need]] = 1
                protected[rows, victim[need]] = True
    return hits, accesses


def _as_fraction(num: float, den: float) -> float | None:
    """num / den, or None when there is nothing to count (no window, no access)."""
    return float(num) / float(den) if den else None


def lrc_report(
    topk_ids: np.ndarray,
    slices: Sequence[slice],
    num_experts: int,
    ms: Sequence[int] = (16,),
    rhos: Sequence[float] = (2,),
    layer_names: Sequence[int] | None = None,
    baselines: bool = True,
    progress: Callable[[int], None] | None = None,
) -> dict:
    """SRP and SCH per layer and for the model, plus LRU/LFU/Belady hit rates at the same cache sizes.

    `topk_ids` is [T, L, k]; `slices` the sequences (token ranges); `ms` window lengths in tokens;
    `rhos` cache sizes as multiples of k (ρ·k slots, rounded down). Values are fractions. JSON layout:
    ``{"layers": [{"layer": l, "srp": {"16": x}, "srp_alpha": {"16": a}, "sch": {"2": {"16": y}},
    "sch_static": {"2": {"16": z}},
    "lru": {"2": z}, "lfu": {...}, "belady": {...}}], "model": {same keys}, "params": {...}}``.
    `progress(1)` is called after each of `lrc_work_units(ms, rhos, baselines)` pieces of work.
    """
    tick = progress if progress is not None else (lambda n: None)
    topk_ids = np.asarray(topk_ids)
    if topk_ids.ndim != 3:
        raise UserError(f"topk_ids must be [T, L, k], got shape {topk_ids.shape}")
    _, num_layers, k = topk_ids.shape
    if any(m < 1 for m in ms):
        raise UserError(f"window lengths must be >= 1 token, got {list(ms)}")
    if any(rho * k < k for rho in rhos):
        raise UserError(f"cache sizes rho must be >= 1 (rho·k slots must hold one token), got {list(rhos)}")
    names = list(layer_names) if layer_names is not None else list(range(num_layers))
    layers = [{"layer": int(names[li])} for li in range(num_layers)]
    model: dict = {}

    srp_l: dict = {}
    for m in ms:
        pooled = np.zeros(m + 1, dtype=np.int64)
        for li in range(num_layers):
            hist = window_count_histogram(topk_ids[:, li, :], slices, m, num_experts)
            pooled += hist
            value, alpha = srp_from_histogram(hist)
            layers[li].setdefault("srp", {})[str(m)] = value
            layers[li].setdefault("srp_alpha", {})[str(m)] = alpha
        srp_l[str(m)] = srp_from_histogram(pooled)
        tick(1)
    model["srp"] = {key: v for key, (v, _) in srp_l.items()}
    model["srp_alpha"] = {key: a for key, (_, a) in srp_l.items()}

    def record(name: str, rho_key: str, m_key: str | None, hits: np.ndarray, acc: np.ndarray) -> None:
        for li in range(num_layers):
            slot = layers[li].setdefault(name, {})
            value = _as_fraction(hits[li], acc[li])
            if m_key is None:
                slot[rho_key] = value
            else:
                slot.setdefault(rho_key, {})[m_key] = value
        slot = model.setdefault(name, {})
        value = _as_fraction(hits.sum(), acc.sum())
        if m_key is None:
            slot[rho_key] = value
        else:
            slot.setdefault(rho_key, {})[m_key] = value

    for rho in rhos:
        rho_key = f"{rho:g}"
        slots = int(rho * k)
        for m in ms:
            hits, acc = cache_hits(topk_ids, slices, slots, "sch", num_experts, m=m)
            record("sch", rho_key, str(m), hits, acc)
            pairs = [segment_cache_coverage(topk_ids[:, li, :], slices, m, slots, num_experts)
                     for li in range(num_layers)]
            record("sch_static", rho_key, str(m), np.array([p[0] for p in pairs]), np.array([p[1] for p in pairs]))
            tick(1)
        if baselines:
            for policy in ("lru", "lfu", "belady"):
                hits, acc = cache_hits(topk_ids, slices, slots, policy, num_experts)
                record(policy, rho_key, None, hits, acc)
                tick(1)
    params = {"m": [int(m) for m in ms], "rho": [float(r) for r in rhos], "top_k": int(k),
              "num_experts": int(num_experts), "num_tokens": int(topk_ids.shape[0]),
              "num_sequences": len(slices)}
    return {"layers": layers, "model": model, "params": params}


def lrc_work_units(ms: Sequence[int], rhos: Sequence[float], baselines: bool) -> int:
    """How many times `lrc_report` calls `progress(1)`."""
    return len(ms) + len(rhos) * (len(ms) + (3 if baselines else 0))


def trace_lrc(trace, ms: Sequence[int] = (16,), rhos: Sequence[float] = (2,), baselines: bool = True,
              progress: Callable[[int], None] | None = None) -> dict:
    """`lrc_report` on a `traces.format.Trace`; layers are named by their decoder index."""
    report = lrc_report(
        np.asarray(trace.topk_ids),
        trace.sequence_slices(),
        trace.num_experts,
        ms=ms,
        rhos=rhos,
        layer_names=trace.model_config.moe_layer_indices,
        baselines=baselines,
        progress=progress,
    )
    report["params"]["model"] = trace.model
    report["params"]["trace_hash"] = trace.content_hash()
    return report


def format_lrc(report: dict) -> str:
    """A plain-text table of an `lrc_report`, values in percent ("–": no window of that length)."""
    params = report["params"]
    ms, rhos = params["m"], params["rho"]
    cols = [f"SRP m={m}" for m in ms]
    cols += [f"SCH ρ={r:g} m={m}" for r in rhos for m in ms]
    cols += [f"SCHst ρ={r:g} m={m}" for r in rhos for m in ms]
    for name in ("lru", "lfu", "belady"):
        if name in report["model"]:
            cols += [f"{name.upper()} ρ={r:g}" for r in rhos]

    def pct(value: float | None) -> str:
        return "–" if value is None else f"{100 * value:.2f}"

    def row(entry: dict) -> list[str]:
        out = [pct(entry["srp"][str(m)]) for m in ms]
        out += [pct(entry["sch"][f"{r:g}"][str(m)]) for r in rhos for m in ms]
        out += [pct(entry["sch_static"][f"{r:g}"][str(m)]) for r in rhos for m in ms]
        for name in ("lru", "lfu", "belady"):
            if name in entry:
                out += [pct(entry[name][f"{r:g}"]) for r in rhos]
        return out

    widths = [max(len(c), 6) for c in cols]
    lines = ["layer  " + "  ".join(c.rjust(w) for c, w in zip(cols, widths, strict=True))]
    for entry in report["layers"]:
        lines.append(f"{entry['layer']:>5}  " + "  ".join(v.rjust(w) for v, w in zip(row(entry), widths, strict=True)))
    lines.append("model  " + "  ".join(v.rjust(w) for v, w in zip(row(report["model"]), widths, strict=True)))
    return "\n".join(lines)
