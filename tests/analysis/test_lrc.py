"""Local routing consistency: exact SRP/SCH and baseline hit rates on hand-made sequences."""

from __future__ import annotations

import numpy as np
import pytest

from sim.analysis.lrc import cache_hits, lrc_report, srp_from_histogram, window_count_histogram
from traces.errors import UserError


def _ids(*tokens: int) -> np.ndarray:
    """One layer, k = 1: [T, 1, 1]."""
    return np.array(tokens, dtype=np.int16).reshape(-1, 1, 1)


def test_srp_hand_computed() -> None:
    """Sequence 0,0,1,0 (k=1, E=3), m=2: windows (0,0) (0,1) (1,0).

    Counts per window over experts 0,1,2: (2,0,0) (1,1,0) (1,1,0) -> N(0)=4, N(1)=4, N(2)=1, Σ f·N(f) = 6.
    α=1: 2·6 / (2·5 + 6) = 0.75;  α=2: 2·2 / (2·1 + 6) = 0.5.  SRP = 0.75 at α = 1.
    """
    hist = window_count_histogram(_ids(0, 0, 1, 0)[:, 0, :], [slice(0, 4)], 2, 3)
    assert hist.tolist() == [4, 4, 1]
    assert srp_from_histogram(hist) == (0.75, 1)


def test_srp_windows_do_not_cross_sequences() -> None:
    """Sequences (0,0) (1,1) and a too-short (2): only windows (0,0) and (1,1) exist.

    N(2) = 2, N(0) = 4 (E=3) -> α=2 gives 2·4 / (2·2 + 4) = 1.0. A window across the boundary, (0,1),
    would add two pairs with f=1 and lower it.
    """
    ids = _ids(0, 0, 1, 1, 2)[:, 0, :]
    hist = window_count_histogram(ids, [slice(0, 2), slice(2, 4), slice(4, 5)], 2, 3)
    assert hist.tolist() == [4, 0, 2]
    assert srp_from_histogram(hist)[0] == 1.0


def test_sch_lru_belady_hand_computed() -> None:
    """Sequence 0,1,2,0,1, k=1, 2 slots (ρ=2), m=2.

    SCH: t2 evicts 0 or 1; both used once in t3..t4 -> tie, LRU evicts 0. t3: 0 misses; in t4 expert 1 is
    used, 2 is not -> evict 2. t4: 1 hits. 1 hit / 5.
    LRU: t2 evicts 0, t3 evicts 1, t4 misses -> 0 / 5.
    Belady: t2 evicts 1 (next use t4, after 0's t3); t3 hits; t4 misses -> 1 / 5.
    """
    ids = _ids(0, 1, 2, 0, 1)
    sl = [slice(0, 5)]
    assert cache_hits(ids, sl, 2, "sch", 3, m=2)[0].tolist() == [1]
    assert cache_hits(ids, sl, 2, "lru", 3)[0].tolist() == [0]
    assert cache_hits(ids, sl, 2, "belady", 3)[0].tolist() == [1]
    assert cache_hits(ids, sl, 2, "sch", 3, m=2)[1].tolist() == [5]


def test_sch_short_lookahead_differs_from_belady() -> None:
    """Sequence 0,1,2,1,0,0,0, k=1, 2 slots.

    SCH m=1: t2 looks at t3 only: 1 used, 0 not -> evict 0. t3 hit (1). t4: 0 misses; next token t5 uses
    0 only -> 1 and 2 both 0, LRU: 2 (t2) before 1 (t3) -> evict 2. t5, t6 hit. 3 hits.
    Belady: t2: next use of 0 is t4, of 1 is t3 -> evict 0. Same from then on: 3 hits.
    SCH m=3 at t2 counts t3..t5: 0 twice, 1 once -> evict 1; t3 misses (evict 2: count in t4..t6 is 0),
    t4..t6 hit -> 3 hits as well; LRU: t2 evicts 0, t3 hits, t4 evicts 2 (LRU: 2 at t2, 1 at t3) -> 3 hits.
    LFU (counts 0:1, 1:1 at t2, tie -> LRU evicts 0) gives the same 3.
    """
    ids = _ids(0, 1, 2, 1, 0, 0, 0)
    sl = [slice(0, 7)]
    for policy, m in (("sch", 1), ("sch", 3), ("belady", 16), ("lru", 16), ("lfu", 16)):
        assert cache_hits(ids, sl, 2, policy, 3, m=m)[0].tolist() == [3], policy


def test_lfu_keeps_the_frequent_expert() -> None:
    """Sequence 0,0,1,2,0 with 2 slots: at t2 LRU evicts 0 (used t1, 1 used t2) -> t4 misses: 1 hit.

    LFU at t3 evicts 1 (count 1 < 2) -> t4 hits: 2 hits.
    """
    ids = _ids(0, 0, 1, 2, 0)
    sl = [slice(0, 5)]
    assert cache_hits(ids, sl, 2, "lru", 3)[0].tolist() == [1]
    assert cache_hits(ids, sl, 2, "lfu", 3)[0].tolist() == [2]


def test_cache_empty_at_each_sequence_start() -> None:
    """Sequences (0) (0): the second 0 is a first touch of its sequence, so a miss: 0 hits."""
    ids = _ids(0, 0)
    assert cache_hits(ids, [slice(0, 1), slice(1, 2)], 2, "sch", 3)[0].tolist() == [0]
    assert cache_hits(ids, [slice(0, 2)], 2, "sch", 3)[0].tolist() == [1]


def test_current_token_experts_are_never_evicted_and_hits_judged_before_token() -> None:
    """k=2, 2 slots, tokens {0,1} {1,2} {2,0}: t0 two misses; t1: 1 hits, 2 must evict 0 (1 is in use);
    t2: 2 hits, 0 evicts 1. 2 hits of 6 accesses, for every policy."""
    ids = np.array([[0, 1], [1, 2], [2, 0]], dtype=np.int16).reshape(3, 1, 2)
    for policy in ("sch", "lru", "lfu", "belady"):
        hits, acc = cache_hits(ids, [slice(0, 3)], 2, policy, 3)
        assert (hits.tolist(), acc.tolist()) == ([2], [6]), policy


def test_report_pools_layers() -> None:
    """Two layers: layer 0 = 0,0,0 (LRU 2 hits / 3), layer 1 = 0,1,2 (0 / 3); model LRU = 2 / 6."""
    ids = np.array([[0, 0], [0, 1], [0, 2]], dtype=np.int16).reshape(3, 2, 1)
    report = lrc_report(ids, [slice(0, 3)], 3, ms=(2,), rhos=(1, 2), layer_names=(1, 2))
    assert [entry["layer"] for entry in report["layers"]] == [1, 2]
    assert report["layers"][0]["lru"]["1"] == pytest.approx(2 / 3)
    assert report["layers"][1]["lru"]["2"] == 0.0
    assert report["model"]["lru"]["1"] == pytest.approx(2 / 6)
    # Layer 0 windows (0,0) x2 -> SRP 1; layer 1 windows (0,1) (1,2): α=1 gives 2·4 / (2·4 + 4) = 2/3.
    assert report["layers"][0]["srp"]["2"] == 1.0
    assert report["layers"][1]["srp"]["2"] == pytest.approx(2 / 3)
    assert set(report["model"]["sch"]) == {"1", "2"}


def test_bad_rho_is_a_user_error() -> None:
    with pytest.raises(UserError):
        lrc_report(_ids(0, 1), [slice(0, 2)], 3, rhos=(0.5,))


def test_sch_static_hand_computed() -> None:
    """Sequence 0,0,1,0, k=1, one slot, m=2: windows (0,0) (0,1) (1,0) keep their top expert: 2+1+1 of 6."""
    from sim.analysis.lrc import segment_cache_coverage

    assert segment_cache_coverage(_ids(0, 0, 1, 0)[:, 0, :], [slice(0, 4)], 2, 1, 3) == (4, 6)
    report = lrc_report(_ids(0, 0, 1, 0), [slice(0, 4)], 3, ms=(2,), rhos=(1,))
    assert report["model"]["sch_static"]["1"]["2"] == pytest.approx(4 / 6)


def test_no_window_is_none_not_zero() -> None:
    """Sequences shorter than m have no window: SRP and SCH-static are undefined (None), not 0."""
    report = lrc_report(_ids(0, 1, 2), [slice(0, 3)], 3, ms=(4,), rhos=(1,), baselines=False)
    assert report["model"]["srp"]["4"] is None and report["model"]["sch_static"]["1"]["4"] is None
    assert report["model"]["sch"]["1"]["4"] == 0.0  # the cache itself still runs: 0 hits of 3


def test_baselines_agree_with_the_policy_classes() -> None:
    """k = 1, one sequence: LRU, LFU and Belady hit counts equal sim.policies.eviction's reference caches
    on random access strings (their semantics are the definition; ours is the vectorised, multi-layer one)."""
    from sim.policies.eviction import simulate_cache

    rng = np.random.default_rng(0)
    for trial in range(20):
        accesses = rng.integers(0, 6, size=40)
        slots = int(rng.integers(1, 5))
        for policy in ("lru", "lfu", "belady"):
            ours = cache_hits(accesses.reshape(-1, 1, 1), [slice(0, 40)], slots, policy, 6)[0][0]
            ref = sum(simulate_cache(policy, slots, accesses.tolist())[0])
            assert ours == ref, (trial, policy, slots)
