"""The kernel's flat arrays: the replay's inputs (`Inputs`), its settings (`Settings`) and its state (`State`).

Codes stand for names (the C kernel works on numbers; sim/kernel/compiled.c has the same constants and the
same field order, and tests/sim/test_kernel.py holds them equal): see the constants below. Shapes: S forward
steps, L MoE layers, E experts, T trace positions, D look-ahead depth, P transfer slots of the pool (a
transfer's index is reused once it is neither cached nor on the link). Times in seconds, sizes in bytes.
"""

from __future__ import annotations

from typing import NamedTuple

import numpy as np

from sim.policies.eviction import NEVER

# transfer states and kinds, as sim.policies.controller
QUEUED, STARTED, DONE, CANCELLED = 0, 1, 2, 3
DEMAND_KIND, PREFETCH_KIND, PRELOAD_KIND = 0, 1, 2
DEMAND_PRIORITY, PREFETCH_PRIORITY = 0, 1
"""Link priorities (sim.policies.transfer_queue): lower starts first."""

PRECISIONS = ("bf16", "int8", "int4", "int2")
"""Precision codes are indices into this tuple."""
HYBRID = 4
"""Precision policy code of fate-hybrid (the others are their precision's code)."""

EVICTIONS = {"lru": 0, "lfu": 1, "arc": 2, "belady": 3, "none": 4}
LRU, LFU, ARC, BELADY, NO_REUSE = 0, 1, 2, 3, 4
PREDICTIONS = {"none": 0, "crosslayer": 1, "speculative": 1, "noisy-oracle": 1, "oracle": 2, "eap": 3}
NO_PREDICTION, LOOKAHEAD, ORACLE, EAP = 0, 1, 2, 3
PREFETCHES = {"none": 0, "fate": 1, "topk": 2, "all": 3}
NO_PREFETCH, FATE, TOPK, ALL = 0, 1, 2, 3
MISSES = {"wait": 0, "cpu": 1, "speculated": 2, "lowbit": 3}
WAIT, CPU, SPECULATED, LOWBIT = 0, 1, 2, 3

T1, T2, B1, B2 = 1, 2, 3, 4
"""ARC list of an expert (0: in none)."""

# stats indices (the controller's counters)
(ST_PREFETCHES_ISSUED, ST_PREFETCHES_USED, ST_PREFETCHES_CANCELLED, ST_PREFETCH_COVERED, ST_PREFETCH_SELECTED,
 ST_EVICTIONS, ST_BYTES_ON_DEMAND, ST_BYTES_PREFETCHED, ST_BYTES_PREFETCH_USED) = range(9)
STAT_NAMES = ("prefetches_issued", "prefetches_used", "prefetches_cancelled", "prefetch_covered",
              "prefetch_selected", "evictions", "bytes_on_demand", "bytes_prefetched", "bytes_prefetch_used")

# result codes
OK, POOL_EXHAUSTED, ALL_PINNED, BUDGET_EXCEEDED = 0, 1, 2, 3
ANY, FIRST, ONLY = 0, 1, 2
"""Whether a victim must have landed: any expert, landed ones first, landed ones only."""


class Inputs(NamedTuple):
    """The trace and the costs, read only."""

    route_ptr: np.ndarray
    """[S * L + 1] int64: routes of step s, layer l are route_ids/route_counts[ptr[s*L+l]:ptr[s*L+l+1]]."""
    route_ids: np.ndarray
    """int64, ascending within a layer step."""
    route_counts: np.ndarray
    """int64 tokens per routed expert."""
    step_prefill: np.ndarray
    """[S] bool."""
    step_tokens: np.ndarray
    """[S] int64."""
    step_position: np.ndarray
    """[S] int64 first trace position of the step."""
    attention_s: np.ndarray
    """[S] float64 attention (and the rest before the experts) of one layer of the step."""
    shared_s: np.ndarray
    """[S] float64 shared experts of one layer of the step."""
    expert_s: np.ndarray
    """[4, N + 1] float64 GPU time of one expert by precision code and tokens (N: most tokens routed)."""
    cpu_expert_s: np.ndarray
    """[N + 1] float64 CPU time of one expert by tokens."""
    transfer_s: np.ndarray
    """[4] float64 link time of one expert by precision code."""
    expert_bytes: np.ndarray
    """[4] int64 bytes of one expert by precision code."""
    probs: np.ndarray
    """[D, T, L, E] float32 look-ahead probabilities (a [1, 1, 1, 1] dummy when unused)."""
    prefill_ptr: np.ndarray
    """[(S * L) * D + 1] int64: look-ahead prediction of a prefill step of more than one token for layer l
    from layer l's gate input, depth d: prefill_experts/scores[ptr[(s*L+l)*D+d]:...]."""
    prefill_experts: np.ndarray
    prefill_scores: np.ndarray
    use_ptr: np.ndarray
    """[L * E + 1] int64: steps routing expert e in layer l are use_steps[ptr[l*E+e]:ptr[l*E+e+1]] (Belady)."""
    use_steps: np.ndarray
    pinned_ptr: np.ndarray
    """[L + 1] int64: the experts pinned in layer l, in preload order: pinned_experts[ptr[l]:ptr[l+1]]."""
    pinned_experts: np.ndarray
    slots: np.ndarray
    """[L] int64 slots of each layer."""


class Settings(NamedTuple):
    """The policy and the machine, as numbers."""

    eviction: int
    prediction: int
    prefetch: int
    precision: int
    """A precision code, or HYBRID."""
    miss: int
    miss_precision: int
    preload_precision: int
    int2_rate: float
    confidence: float
    prefetch_count: int
    fate_count: int
    lookahead_limit: int
    """Candidates of a one-token look-ahead prediction (crosslayer: the controller's limit; speculative: k)."""
    prefill_depth: int
    """Look-ahead predictions stored per prefill step and layer (`Inputs.prefill_ptr`)."""
    depth: int
    """Layers ahead a predictor predicts for."""
    top_k: int
    cancel_stale: bool
    serial_loads: bool
    copy_engines: int
    predictor_latency_s: float
    router_s: float
    copy_contention: float
    cpu_on_stream: bool
    max_slots: int
    """Slots the expert budget holds (the invariant)."""


class State(NamedTuple):
    """Everything a replay changes."""

    resident: np.ndarray
    """[L, E] int64 transfer index of the expert's copy, or -1."""
    pinned: np.ndarray
    """[L, E] bool."""
    res_list: np.ndarray
    """[L, E] int64 the cached experts of each layer (any order); res_n[L] of them; res_pos[L, E] the index of
    an expert in its layer's list."""
    res_pos: np.ndarray
    res_n: np.ndarray
    free_slots: np.ndarray
    """[L] int64."""
    pending: np.ndarray
    """[L, E] int64 prefetch issued for the layer's next route, or -1; pending_n[L] of them."""
    pending_n: np.ndarray
    selected: np.ndarray
    """[L, E] bool: picked by the prefetch policy for the layer's next route."""
    selected_list: np.ndarray
    """[L, E] int64 the picks, in order of picking; selected_n[L] of them."""
    selected_n: np.ndarray
    tick: np.ndarray
    """[L, E] int64 order of the eviction lists (LRU recency; ARC position in its list; LFU last use)."""
    uses: np.ndarray
    """[L, E] int64 LFU uses since insertion."""
    arc_list: np.ndarray
    """[L, E] int64 T1, T2, B1, B2 or 0."""
    arc_size: np.ndarray
    """[L, 5] int64 experts in each ARC list (index by list code)."""
    arc_p: np.ndarray
    """[L] float64 ARC's target size of T1."""
    arc_adapted: np.ndarray
    """[L] int64 the incoming expert p was adapted for, or -1."""
    # transfers (a pool of P)
    t_layer: np.ndarray
    t_expert: np.ndarray
    t_precision: np.ndarray
    t_kind: np.ndarray
    t_state: np.ndarray
    t_used: np.ndarray
    t_start: np.ndarray
    t_end: np.ndarray
    t_after_transfer: np.ndarray
    t_after_compute: np.ndarray
    t_serial: np.ndarray
    """Creation order (a transfer index is reused, this is not)."""
    t_cached: np.ndarray
    """Whether the transfer is its expert's copy in the cache."""
    t_on_link: np.ndarray
    """Whether the transfer is queued or in flight (not yet reported landed)."""
    t_promote: np.ndarray
    """Promoted before it was submitted: gets on-demand priority on submission."""
    t_queued: np.ndarray
    """Whether it is in the link's queue."""
    t_prio: np.ndarray
    t_ready: np.ndarray
    t_qseq: np.ndarray
    free_transfers: np.ndarray
    """Stack of unused transfer indices; counts[C_FREE_TRANSFERS] of them."""
    # link
    engine_free_at: np.ndarray
    """[copy engines] float64."""
    queue: np.ndarray
    """[P] int64 queued transfers in submission order; counts[C_QUEUE] of them."""
    heap_end: np.ndarray
    heap_seq: np.ndarray
    heap_tid: np.ndarray
    """In flight, a heap by (end, start order); counts[C_HEAP] of them."""
    # the rest
    counts: np.ndarray
    """int64 scalars: see the C_ constants."""
    clock: np.ndarray
    """float64 scalars: see the K_ constants."""
    stats: np.ndarray
    """int64 controller counters (ST_ constants)."""
    hits_per_layer: np.ndarray
    routed_per_layer: np.ndarray
    step_start_at: np.ndarray
    step_end_at: np.ndarray
    deferred: np.ndarray
    """Transfers evicted or cancelled in the running layer step, freed when it ends; counts[C_DEFERRED]."""
    # the eap predictor (sim.policies.prediction.EapPredictor; [1, 1, 1], [1, 1], [1] when unused)
    eap_paths: np.ndarray
    """[N, L, E] bool multi-hot path of each stored decode step (a ring of N = eap_history);
    counts[C_EAP_STORED] stored so far."""
    eap_current: np.ndarray
    """[L, E] bool the running step's path."""
    eap_score: np.ndarray
    """[N] float64 experts the running decode step shares with each stored path, layer by layer so far."""
    eap_counts: np.ndarray
    """[E] float64 prefill prediction: stored paths routing each expert of the target layer."""
    use_cursor: np.ndarray
    """[L * E] int64 (Belady) per expert, the index into use_steps of its next use from the last step asked."""
    use_next: np.ndarray
    """[L * E] int64 (Belady) use_steps at the cursor, or NEVER: most questions are answered from this small
    array, without touching use_steps (a cache miss per eviction candidate on a long trace)."""
    use_before: np.ndarray
    """[L * E] int64 (Belady) use_steps just before the cursor, or -1 (an earlier step than that searches)."""


(C_FREE_TRANSFERS, C_QUEUE, C_HEAP, C_LINK_SEQ, C_QUEUE_SEQ, C_SERIAL, C_TICK, C_OCCUPIED, C_PEAK, C_STEP,
 C_DEFERRED, C_ERROR, C_EAP_STORED, C_EAP_DECODE, C_COUNTS) = range(15)
"""C_EAP_DECODE: the eap predictor's phase (1: decode, its phase before the first step)."""
(K_NOW, K_STALL, K_CPU_FREE, K_CPU_EXPERT_FREE, K_CLOCKS) = range(5)


def new_state(inputs: Inputs, settings: Settings, num_layers: int, num_experts: int, pool: int,
              eap_history: int = 0) -> State:
    """Fresh state for a replay with room for `pool` live transfers (and `eap_history` eap paths)."""
    shape = (num_layers, num_experts)
    eap = (eap_history, num_layers, num_experts) if eap_history else (1, 1, 1)
    counts = [0] * C_COUNTS
    counts[C_FREE_TRANSFERS], counts[C_EAP_DECODE] = pool, 1
    steps = len(inputs.step_tokens)
    f64, i64 = np.float64, np.int64
    return State(
        resident=np.full(shape, -1, i64), pinned=np.zeros(shape, np.bool_), res_list=np.zeros(shape, i64),
        res_pos=np.zeros(shape, i64), res_n=np.zeros(num_layers, i64), free_slots=inputs.slots.copy(),
        pending=np.full(shape, -1, i64), pending_n=np.zeros(num_layers, i64), selected=np.zeros(shape, np.bool_), selected_list=np.zeros(shape, i64),
        selected_n=np.zeros(num_layers, i64), tick=np.zeros(shape, i64), uses=np.zeros(shape, i64),
        arc_list=np.zeros(shape, i64), arc_size=np.zeros((num_layers, 5), i64), arc_p=np.zeros(num_layers, f64),
        arc_adapted=np.full(num_layers, -1, i64),
        t_layer=np.zeros(pool, i64), t_expert=np.zeros(pool, i64), t_precision=np.zeros(pool, i64),
        t_kind=np.zeros(pool, i64), t_state=np.zeros(pool, i64), t_used=np.zeros(pool, np.bool_),
        t_start=np.zeros(pool, f64), t_end=np.zeros(pool, f64), t_after_transfer=np.full(pool, -1, i64),
        t_after_compute=np.full(pool, -1, i64), t_serial=np.zeros(pool, i64), t_cached=np.zeros(pool, np.bool_),
        t_on_link=np.zeros(pool, np.bool_), t_promote=np.zeros(pool, np.bool_), t_queued=np.zeros(pool, np.bool_),
        t_prio=np.zeros(pool, i64), t_ready=np.zeros(pool, f64), t_qseq=np.zeros(pool, i64),
        free_transfers=np.arange(pool - 1, -1, -1, dtype=i64),
        engine_free_at=np.zeros(settings.copy_engines, f64), queue=np.zeros(pool, i64),
        heap_end=np.zeros(pool, f64), heap_seq=np.zeros(pool, i64), heap_tid=np.zeros(pool, i64),
        counts=np.array(counts, i64), clock=np.zeros(K_CLOCKS, f64),
        stats=np.zeros(len(STAT_NAMES), i64), hits_per_layer=np.zeros(num_layers, i64),
        routed_per_layer=np.zeros(num_layers, i64), step_start_at=np.zeros(steps, f64),
        step_end_at=np.zeros(steps, f64), deferred=np.zeros(pool, i64),
        eap_paths=np.zeros(eap, np.bool_), eap_current=np.zeros(eap[1:], np.bool_), eap_score=np.zeros(eap[0], f64),
        eap_counts=np.zeros(eap[2], f64), use_cursor=inputs.use_ptr[:-1].copy(),
        use_next=_first_uses(inputs.use_ptr, inputs.use_steps), use_before=np.full(len(inputs.use_ptr) - 1, -1, i64),
    )


def _first_uses(use_ptr: np.ndarray, use_steps: np.ndarray) -> np.ndarray:
    """use_steps[use_ptr[k]] for every expert k that is used, NEVER for the others."""
    first, end = use_ptr[:-1], use_ptr[1:]
    used = first < end
    out = np.full(first.shape, NEVER, np.int64)
    out[used] = use_steps[first[used]]
    return out


class Scratch(NamedTuple):
    """Per layer step working space (E: experts, W: prefetches one gate input may issue)."""

    mark: np.ndarray
    """[E] bool."""
    taken: np.ndarray
    """[E] bool."""
    candidates: np.ndarray
    """[E] int64."""
    in_use: np.ndarray
    """[E] bool."""
    routed: np.ndarray
    """[E] bool."""
    nothing: np.ndarray
    """[E] bool, all False."""
    fetch_e: np.ndarray
    fetch_s: np.ndarray
    fetch_p: np.ndarray
    pred_e: np.ndarray
    pred_s: np.ndarray
    spare: np.ndarray
    misses: np.ndarray
    miss_tokens: np.ndarray
    precision_of: np.ndarray
    """[E] int64 load precision of each routed expert."""
    work_e: np.ndarray
    """GPU work of the layer step: expert, tokens, precision, transfer to wait for (-1 none); work_n of them."""
    work_tokens: np.ndarray
    work_precision: np.ndarray
    work_tid: np.ndarray
    loads: np.ndarray
    cpu_e: np.ndarray
    cpu_tokens: np.ndarray
    sizes: np.ndarray
    """int64 [work_n, loads_n, cpu_n]."""
    compute_end: np.ndarray
    """[E] float64 when each expert of the layer step finished computing."""
    computed: np.ndarray
    """[E] bool."""
    prefetches: np.ndarray
    """[W] int64 transfers one gate input issued."""
    order: np.ndarray
    """[E] int64."""


def new_scratch(num_experts: int, prefetch_room: int) -> Scratch:
    e = num_experts
    b, i, f = np.bool_, np.int64, np.float64
    return Scratch(np.zeros(e, b), np.zeros(e, b), np.zeros(e, i), np.zeros(e, b), np.zeros(e, b), np.zeros(e, b),
                   np.zeros(e, i), np.zeros(e, f), np.zeros(e, i), np.zeros(e, i), np.zeros(e, f), np.zeros(e, i),
                   np.zeros(e, i), np.zeros(e, i), np.zeros(e, i), np.zeros(e, i), np.zeros(e, i), np.zeros(e, i),
                   np.zeros(e, i), np.zeros(e, i), np.zeros(e, i), np.zeros(e, i), np.zeros(3, i), np.zeros(e, f),
                   np.zeros(e, b), np.zeros(prefetch_room, i), np.zeros(e, i))
