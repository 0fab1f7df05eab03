"""The compiled replay loop: the reference engine, link and controller (sim/engine.py, sim/link.py,
sim/policies/controller.py) over flat arrays, compiled by numba.

Every function here mirrors one of the reference's and says which; floating-point operations happen in
the reference's order (numba compiles without fast-math, so results are bit-identical). The state lives
in the arrays of `sim.kernel.state.State`; `run` replays all steps and returns a result code.
"""

from __future__ import annotations

import numpy as np
from numba import njit

from sim.kernel.state import (
    ALL_PINNED,
    ANY,
    ARC,
    B1,
    B2,
    BELADY,
    BUDGET_EXCEEDED,
    C_DEFERRED,
    C_ERROR,
    C_FREE_TRANSFERS,
    C_HEAP,
    C_LINK_SEQ,
    C_OCCUPIED,
    C_PEAK,
    C_QUEUE,
    C_QUEUE_SEQ,
    C_SERIAL,
    C_STEP,
    C_TICK,
    CANCELLED,
    CPU,
    DEMAND_KIND,
    DEMAND_PRIORITY,
    DONE,
    FATE,
    FIRST,
    HYBRID,
    K_CPU_EXPERT_FREE,
    K_CPU_FREE,
    K_NOW,
    K_STALL,
    LFU,
    LOOKAHEAD,
    LOWBIT,
    LRU,
    NO_PREFETCH,
    NO_REUSE,
    OK,
    ONLY,
    ORACLE,
    POOL_EXHAUSTED,
    PREFETCH_KIND,
    PREFETCH_PRIORITY,
    PRELOAD_KIND,
    QUEUED,
    SPECULATED,
    ST_BYTES_ON_DEMAND,
    ST_BYTES_PREFETCH_USED,
    ST_BYTES_PREFETCHED,
    ST_EVICTIONS,
    ST_PREFETCH_COVERED,
    ST_PREFETCH_SELECTED,
    ST_PREFETCHES_CANCELLED,
    ST_PREFETCHES_ISSUED,
    ST_PREFETCHES_USED,
    STARTED,
    T1,
    T2,
    TOPK,
)

INT4, INT2 = 2, 3
NEVER = 1 << 62
INF = np.inf

# --- the link (sim/link.py, sim/policies/transfer_queue.py) ---------------------------------------------


@njit(cache=True)
def _before(st, a, b):
    """Whether queued transfer a starts before b: (priority, ready time, submission order)."""
    if st.t_prio[a] != st.t_prio[b]:
        return st.t_prio[a] < st.t_prio[b]
    if st.t_ready[a] != st.t_ready[b]:
        return st.t_ready[a] < st.t_ready[b]
    return st.t_qseq[a] < st.t_qseq[b]


@njit(cache=True)
def _queue_remove(st, tid):
    n = st.counts[C_QUEUE]
    q = st.queue
    for i in range(n):
        if q[i] == tid:
            for j in range(i, n - 1):
                q[j] = q[j + 1]
            st.counts[C_QUEUE] = n - 1
            st.t_queued[tid] = False
            return True
    return False


@njit(cache=True)
def link_submit(st, tid, ready_at, priority):
    """Link.submit / TransferQueue.submit."""
    if st.t_state[tid] == CANCELLED:
        return
    if st.t_promote[tid]:
        st.t_promote[tid] = False
        priority = DEMAND_PRIORITY
    st.counts[C_QUEUE_SEQ] += 1
    st.t_prio[tid] = priority
    st.t_ready[tid] = ready_at
    st.t_qseq[tid] = st.counts[C_QUEUE_SEQ]
    st.queue[st.counts[C_QUEUE]] = tid
    st.counts[C_QUEUE] += 1
    st.t_queued[tid] = True
    st.t_on_link[tid] = True


@njit(cache=True)
def link_cancel(st, tid):
    """Link.cancel: drop a queued transfer."""
    st.t_promote[tid] = False
    if st.t_queued[tid]:
        _queue_remove(st, tid)
        st.t_on_link[tid] = False


@njit(cache=True)
def link_promote(st, tid):
    """Link.promote: on-demand priority for a queued (or not yet submitted) transfer."""
    if st.t_queued[tid]:
        st.t_prio[tid] = DEMAND_PRIORITY
    else:
        st.t_promote[tid] = True


@njit(cache=True)
def _heap_push(st, end, seq, tid):
    i = st.counts[C_HEAP]
    st.counts[C_HEAP] = i + 1
    while i > 0:
        parent = (i - 1) // 2
        if st.heap_end[parent] < end or (st.heap_end[parent] == end and st.heap_seq[parent] < seq):
            break
        st.heap_end[i], st.heap_seq[i], st.heap_tid[i] = st.heap_end[parent], st.heap_seq[parent], st.heap_tid[parent]
        i = parent
    st.heap_end[i], st.heap_seq[i], st.heap_tid[i] = end, seq, tid


@njit(cache=True)
def _heap_pop(st):
    top = st.heap_tid[0]
    n = st.counts[C_HEAP] - 1
    st.counts[C_HEAP] = n
    if n > 0:
        end, seq, tid = st.heap_end[n], st.heap_seq[n], st.heap_tid[n]
        i = 0
        while True:
            child = 2 * i + 1
            if child >= n:
                break
            right = child + 1
            if right < n and (st.heap_end[right] < st.heap_end[child]
                              or (st.heap_end[right] == st.heap_end[child] and st.heap_seq[right] < st.heap_seq[child])):
                child = right
            if end < st.heap_end[child] or (end == st.heap_end[child] and seq < st.heap_seq[child]):
                break
            st.heap_end[i], st.heap_seq[i], st.heap_tid[i] = st.heap_end[child], st.heap_seq[child], st.heap_tid[child]
            i = child
        st.heap_end[i], st.heap_seq[i], st.heap_tid[i] = end, seq, tid
    return top


@njit(cache=True)
def _start_next(st, inp, until, starts, ends):
    """Link._start_next: start the next transfer if it starts before `until`; whether one started."""
    n = st.counts[C_QUEUE]
    if n == 0:
        return False
    free_at = st.engine_free_at
    engine = 0
    f = free_at[0]
    for e in range(1, free_at.shape[0]):
        if free_at[e] < f:
            f = free_at[e]
            engine = e
    # TransferQueue.next_start(f): the best ready by f, else the best of the earliest ready
    best = -1
    earliest = INF
    have_earliest = False
    for i in range(n):
        tid = st.queue[i]
        ready = st.t_ready[tid]
        if ready <= f:
            if best < 0 or _before(st, tid, best):
                best = tid
        elif not have_earliest or ready < earliest:
            earliest = ready
            have_earliest = True
    if best < 0:
        for i in range(n):
            tid = st.queue[i]
            if st.t_ready[tid] <= earliest and (best < 0 or _before(st, tid, best)):
                best = tid
    start = max(f, st.t_ready[best])
    if start >= until:
        return False
    _queue_remove(st, best)
    st.counts[C_LINK_SEQ] += 1
    end = start + inp.transfer_s[st.t_precision[best]]
    free_at[engine] = end
    st.t_start[best] = start
    st.t_end[best] = end
    starts.append(start)
    ends.append(end)
    if st.t_state[best] == QUEUED:  # controller.on_transfer_started
        st.t_state[best] = STARTED
    _heap_push(st, end, st.counts[C_LINK_SEQ], best)
    return True


@njit(cache=True)
def link_advance(st, inp, until, starts, ends):
    """Link.advance: start what starts before `until`, report what landed by it."""
    while st.counts[C_QUEUE] > 0 and _start_next(st, inp, until, starts, ends):
        pass
    while st.counts[C_HEAP] > 0 and st.heap_end[0] <= until:
        _transfer_done(st, inp, _heap_pop(st))


@njit(cache=True)
def link_end_of(st, inp, tid, starts, ends):
    """Link.end_of: when `tid` lands, starting queued transfers in order until it has started."""
    while st.t_start[tid] < 0.0:
        if not _start_next(st, inp, INF, starts, ends):
            return -1.0  # never submitted: cannot happen in a consistent replay
    return st.t_end[tid]


@njit(cache=True)
def link_busy_until(st, inp, now):
    """Link.busy_until."""
    work = 0.0
    free_at = st.engine_free_at
    for e in range(free_at.shape[0]):
        if free_at[e] > now:
            work += free_at[e] - now
    for i in range(st.counts[C_QUEUE]):
        tid = st.queue[i]
        if st.t_ready[tid] <= now:
            work += inp.transfer_s[st.t_precision[tid]]
    return now + work / free_at.shape[0]


@njit(cache=True)
def _transfer_done(st, inp, tid):
    """OffloadController.on_transfer_done (and the transfer leaves the link)."""
    st.t_state[tid] = DONE
    st.t_on_link[tid] = False
    nbytes = inp.expert_bytes[st.t_precision[tid]]
    if st.t_kind[tid] == DEMAND_KIND:
        st.stats[ST_BYTES_ON_DEMAND] += nbytes
    else:
        st.stats[ST_BYTES_PREFETCHED] += nbytes
        if st.t_used[tid]:
            st.stats[ST_BYTES_PREFETCH_USED] += nbytes
    if not st.t_cached[tid]:
        _release(st, tid)


@njit(cache=True)
def _release(st, tid):
    """The transfer index is free for reuse (nothing refers to it any more)."""
    st.free_transfers[st.counts[C_FREE_TRANSFERS]] = tid
    st.counts[C_FREE_TRANSFERS] += 1


# --- eviction policies (sim/policies/eviction.py) ----------------------------------------------------------


@njit(cache=True)
def _next_tick(st):
    st.counts[C_TICK] += 1
    return st.counts[C_TICK]


@njit(cache=True)
def _arc_oldest(st, layer, lst):
    """The least recently listed expert of ARC list `lst` in `layer`."""
    best = -1
    for e in range(st.arc_list.shape[1]):
        if st.arc_list[layer, e] == lst and (best < 0 or st.tick[layer, e] < st.tick[layer, best]):
            best = e
    return best


@njit(cache=True)
def _arc_move(st, layer, expert, lst):
    old = st.arc_list[layer, expert]
    if old:
        st.arc_size[layer, old] -= 1
    st.arc_list[layer, expert] = lst
    if lst:
        st.arc_size[layer, lst] += 1
        st.tick[layer, expert] = _next_tick(st)


@njit(cache=True)
def _arc_trim(st, inp, layer):
    """ARC._trim_ghosts."""
    c = max(1, inp.slots[layer])
    size = st.arc_size
    while size[layer, B1] > 0 and size[layer, T1] + size[layer, B1] > c:
        _arc_move(st, layer, _arc_oldest(st, layer, B1), 0)
    while size[layer, B2] > 0 and size[layer, T1] + size[layer, T2] + size[layer, B1] + size[layer, B2] > 2 * c:
        _arc_move(st, layer, _arc_oldest(st, layer, B2), 0)


@njit(cache=True)
def _arc_adapt(st, inp, layer, incoming):
    """ARC._adapt."""
    if incoming < 0 or incoming == st.arc_adapted[layer]:
        return
    st.arc_adapted[layer] = incoming
    c = float(max(1, inp.slots[layer]))
    n1, n2 = st.arc_size[layer, B1], st.arc_size[layer, B2]
    if st.arc_list[layer, incoming] == B1:
        st.arc_p[layer] = min(c, st.arc_p[layer] + max(n2 / n1, 1.0))
    elif st.arc_list[layer, incoming] == B2:
        st.arc_p[layer] = max(0.0, st.arc_p[layer] - max(n1 / n2, 1.0))


@njit(cache=True)
def policy_insert(st, inp, cfg, layer, expert):
    """EvictionPolicy.on_insert."""
    if cfg.eviction == LRU:
        st.tick[layer, expert] = _next_tick(st)
    elif cfg.eviction == LFU:
        st.tick[layer, expert] = _next_tick(st)
        st.uses[layer, expert] = 1
    elif cfg.eviction == ARC:
        _arc_adapt(st, inp, layer, expert)
        st.arc_adapted[layer] = -1
        lst = st.arc_list[layer, expert]
        _arc_move(st, layer, expert, T2 if lst == B1 or lst == B2 else T1)
        _arc_trim(st, inp, layer)


@njit(cache=True)
def policy_access(st, cfg, layer, expert):
    """EvictionPolicy.on_access."""
    if cfg.eviction == LRU:
        st.tick[layer, expert] = _next_tick(st)
    elif cfg.eviction == LFU:
        st.tick[layer, expert] = _next_tick(st)
        st.uses[layer, expert] += 1
    elif cfg.eviction == ARC:
        _arc_move(st, layer, expert, T2)


@njit(cache=True)
def policy_remove(st, inp, cfg, layer, expert):
    """EvictionPolicy.on_remove."""
    if cfg.eviction == ARC:
        lst = st.arc_list[layer, expert]
        if lst == T1:
            _arc_move(st, layer, expert, B1)
        elif lst == T2:
            _arc_move(st, layer, expert, B2)
        _arc_trim(st, inp, layer)


@njit(cache=True)
def _next_use(inp, layer, expert, step, num_experts):
    """FutureAccess.next_use."""
    k = layer * num_experts + expert
    lo, hi = inp.use_ptr[k], inp.use_ptr[k + 1]
    i = lo + np.searchsorted(inp.use_steps[lo:hi], step)
    return inp.use_steps[i] if i < hi else NEVER


@njit(cache=True)
def policy_victim(st, inp, cfg, layer, pool, incoming, from_step):
    """EvictionPolicy.victim among the experts e with pool[e]."""
    num_experts = pool.shape[0]
    best = -1
    if cfg.eviction == LRU:
        for e in range(num_experts):
            if pool[e] and (best < 0 or st.tick[layer, e] < st.tick[layer, best]):
                best = e
    elif cfg.eviction == LFU:
        for e in range(num_experts):
            if pool[e] and (best < 0 or st.uses[layer, e] < st.uses[layer, best]
                            or (st.uses[layer, e] == st.uses[layer, best] and st.tick[layer, e] < st.tick[layer, best])):
                best = e
    elif cfg.eviction == ARC:
        _arc_adapt(st, inp, layer, incoming)
        n1 = st.arc_size[layer, T1]
        p = st.arc_p[layer]
        first, second = T2, T1
        if n1 and (n1 > p or (n1 == p and st.arc_list[layer, incoming] == B2)):
            first, second = T1, T2
        for lst in (first, second):
            for e in range(num_experts):
                if pool[e] and st.arc_list[layer, e] == lst and (best < 0 or st.tick[layer, e] < st.tick[layer, best]):
                    best = e
            if best >= 0:
                break
    elif cfg.eviction == BELADY:  # farthest next use; ties: the lowest id
        far = -1
        for e in range(num_experts):
            if pool[e]:
                nxt = _next_use(inp, layer, e, from_step, num_experts)
                if nxt > far:
                    far = nxt
                    best = e
    else:  # no reuse: the lowest id
        for e in range(num_experts):
            if pool[e]:
                return e
    return best


# --- the controller (sim/policies/controller.py) -----------------------------------------------------------


@njit(cache=True)
def _fail(st, code):
    if st.counts[C_ERROR] == OK:
        st.counts[C_ERROR] = code


@njit(cache=True)
def new_transfer(st, inp, cfg, layer, expert, precision, kind):
    """OffloadController._insert: a transfer of `expert` into a slot already taken, cached at once."""
    n = st.counts[C_FREE_TRANSFERS]
    if n == 0:
        _fail(st, POOL_EXHAUSTED)
        return 0
    tid = st.free_transfers[n - 1]
    st.counts[C_FREE_TRANSFERS] = n - 1
    st.t_layer[tid], st.t_expert[tid], st.t_precision[tid], st.t_kind[tid] = layer, expert, precision, kind
    st.t_state[tid] = QUEUED
    st.t_used[tid] = False
    st.t_start[tid] = -1.0
    st.t_end[tid] = -1.0
    st.t_after_transfer[tid] = -1
    st.t_after_compute[tid] = -1
    st.counts[C_SERIAL] += 1
    st.t_serial[tid] = st.counts[C_SERIAL]
    st.t_cached[tid] = True
    st.t_on_link[tid] = False
    st.t_promote[tid] = False
    st.t_queued[tid] = False
    st.resident[layer, expert] = tid
    policy_insert(st, inp, cfg, layer, expert)
    st.counts[C_OCCUPIED] += 1
    if st.counts[C_OCCUPIED] > st.counts[C_PEAK]:
        st.counts[C_PEAK] = st.counts[C_OCCUPIED]
    if st.counts[C_OCCUPIED] > cfg.max_slots:
        _fail(st, BUDGET_EXCEEDED)
    return tid


@njit(cache=True)
def evict(st, inp, cfg, layer, expert):
    """OffloadController._evict; the transfer index is released once the layer step ends (and it left the link)."""
    tid = st.resident[layer, expert]
    st.resident[layer, expert] = -1
    if st.pending[layer, expert] == tid:
        st.pending[layer, expert] = -1
    policy_remove(st, inp, cfg, layer, expert)
    st.free_slots[layer] += 1
    st.counts[C_OCCUPIED] -= 1
    st.t_cached[tid] = False
    st.deferred[st.counts[C_DEFERRED]] = tid
    st.counts[C_DEFERRED] += 1
    return tid


@njit(cache=True)
def victim(st, inp, cfg, layer, exclude, incoming, landed, from_step, pool):
    """OffloadController._victim: the policy's choice among experts not pinned and not in `exclude`; -1 if none."""
    num_experts = pool.shape[0]
    any_pool = False
    any_done = False
    for e in range(num_experts):
        tid = st.resident[layer, e]
        ok = tid >= 0 and not exclude[e] and not st.pinned[layer, e]
        pool[e] = ok
        if ok:
            any_pool = True
            if st.t_state[tid] == DONE:
                any_done = True
    if landed != ANY and (any_done or landed == ONLY):
        any_pool = any_done
        for e in range(num_experts):
            if pool[e] and st.t_state[st.resident[layer, e]] != DONE:
                pool[e] = False
    if not any_pool:
        return -1
    return policy_victim(st, inp, cfg, layer, pool, incoming, from_step)


@njit(cache=True)
def assign_precisions(cfg, prefill, experts, counts, n, out):
    """PrecisionPolicy.assign for the first n experts (counts: tokens, or predicted tokens)."""
    if cfg.precision != HYBRID:
        out[:n] = cfg.precision
        return
    out[:n] = INT4
    if not prefill or cfg.int2_rate <= 0.0:
        return
    total = 0.0
    for i in range(n):
        total += counts[i]
    order = np.empty(n, np.int64)  # least popular first; ties: the higher expert id first
    for i in range(n):
        j = i
        while j > 0 and (counts[order[j - 1]] > counts[i]
                         or (counts[order[j - 1]] == counts[i] and experts[order[j - 1]] < experts[i])):
            order[j] = order[j - 1]
            j -= 1
        order[j] = i
    mass = 0.0
    for i in order:
        if mass + counts[i] > cfg.int2_rate * total:
            break
        mass += counts[i]
        out[i] = INT2


@njit(cache=True)
def _select(cfg, prefill, experts, scores, n):
    """PrefetchPolicy.select_layer: how many of the first n predicted experts to prefetch (kept in place)."""
    if cfg.prefetch == FATE and not prefill:
        if cfg.confidence > 0.0:
            kept = 0
            for i in range(n):
                if scores[i] >= cfg.confidence and kept < cfg.fate_count:
                    experts[kept] = experts[i]
                    scores[kept] = scores[i]
                    kept += 1
            return kept
        return min(n, cfg.fate_count)
    if cfg.prefetch == TOPK:
        return min(n, cfg.prefetch_count)
    return n


@njit(cache=True)
def _prefetch(st, inp, cfg, step, target, experts, scores, n, out, n_out, sc):
    """OffloadController._prefetch: the picks for layer `target` not resident, best first, while a slot can
    be had; returns the prefetches issued so far (appended to `out`)."""
    picks = sc.mark
    picks[:] = False
    m = 0
    for i in range(n):
        picks[experts[i]] = True
        if st.resident[target, experts[i]] < 0:
            sc.fetch_e[m] = experts[i]
            sc.fetch_s[m] = scores[i]
            m += 1
    assign_precisions(cfg, inp.step_prefill[step], sc.fetch_e, sc.fetch_s, m, sc.fetch_p)
    for i in range(m):
        expert = sc.fetch_e[i]
        if st.free_slots[target] == 0:
            v = victim(st, inp, cfg, target, picks, expert, ONLY, step, sc.pool)
            if v < 0:
                break
            evict(st, inp, cfg, target, v)
            st.stats[ST_EVICTIONS] += 1
        st.free_slots[target] -= 1
        tid = new_transfer(st, inp, cfg, target, expert, sc.fetch_p[i], PREFETCH_KIND)
        st.pending[target, expert] = tid
        out[n_out] = tid
        n_out += 1
    return n_out


@njit(cache=True)
def _rank_row(row, limit, experts, scores, taken):
    """prediction._rank of one probability row: the experts with p > 0, highest first (ties: lower id), at
    most `limit`."""
    n = 0
    num_experts = row.shape[0]
    taken[:] = False
    for _ in range(min(limit, num_experts)):
        best = -1
        for e in range(num_experts):
            p = row[e]
            if p > 0 and not taken[e] and (best < 0 or p > row[best]):
                best = e
        if best < 0:
            break
        taken[best] = True
        experts[n] = best
        scores[n] = row[best]
        n += 1
    return n


@njit(cache=True)
def _select_and_prefetch(st, inp, cfg, step, target, experts, scores, n, out, n_out, sc):
    kept = _select(cfg, inp.step_prefill[step], experts, scores, n)
    if kept == 0:
        return n_out
    for i in range(kept):
        e = experts[i]
        if not st.selected[target, e]:
            st.selected[target, e] = True
            st.selected_list[target, st.selected_n[target]] = e
            st.selected_n[target] += 1
    return _prefetch(st, inp, cfg, step, target, experts, scores, kept, out, n_out, sc)


@njit(cache=True)
def gate_input(st, inp, cfg, step, layer, out, sc):
    """OffloadController.on_gate_input: the prefetches for the layers ahead (into `out`); how many."""
    if cfg.prefetch == NO_PREFETCH:
        return 0
    num_layers = inp.slots.shape[0]
    n_out = 0
    if cfg.prediction == LOOKAHEAD:
        for d in range(min(cfg.depth, inp.probs.shape[0])):
            target = layer + d + 1
            if target >= num_layers:
                break
            if inp.step_tokens[step] == 1:  # by probability
                n = _rank_row(inp.probs[d, inp.step_position[step], layer], cfg.lookahead_limit, sc.pred_e, sc.pred_s,
                              sc.taken)
            else:  # by predicted popularity, ranked in advance
                row = (step * num_layers + layer) * cfg.prefill_depth + d
                lo, hi = inp.prefill_ptr[row], inp.prefill_ptr[row + 1]
                n = hi - lo
                sc.pred_e[:n] = inp.prefill_experts[lo:hi]
                sc.pred_s[:n] = inp.prefill_scores[lo:hi]
            n_out = _select_and_prefetch(st, inp, cfg, step, target, sc.pred_e, sc.pred_s, n, out, n_out, sc)
    elif cfg.prediction == ORACLE:  # the routes to come, most tokens first (ties: lower id)
        for d in range(cfg.depth):
            target = layer + d + 1
            if target >= num_layers:
                break
            row = step * num_layers + target
            lo, hi = inp.route_ptr[row], inp.route_ptr[row + 1]
            n = 0
            for j in range(lo, hi):
                k = n
                while k > 0 and inp.route_counts[sc.pred_e[k - 1]] < inp.route_counts[j]:
                    sc.pred_e[k] = sc.pred_e[k - 1]
                    k -= 1
                sc.pred_e[k] = j
                n += 1
            for k in range(n):
                j = sc.pred_e[k]
                sc.pred_s[k] = float(inp.route_counts[j])
                sc.pred_e[k] = inp.route_ids[j]
            n_out = _select_and_prefetch(st, inp, cfg, step, target, sc.pred_e, sc.pred_s, n, out, n_out, sc)
    st.stats[ST_PREFETCHES_ISSUED] += n_out
    return n_out


@njit(cache=True)
def _work(sc, expert, tokens, precision, tid):
    n = sc.sizes[0]
    sc.work_e[n], sc.work_tokens[n], sc.work_precision[n], sc.work_tid[n] = expert, tokens, precision, tid
    sc.sizes[0] = n + 1


@njit(cache=True)
def _load(st, inp, cfg, step, layer, expert, precision, whole_step_min, sc):
    """OffloadController._load: an on-demand load into a free slot or a victim's (see there)."""
    reused = -1
    old = -1
    if st.free_slots[layer] == 0:
        if whole_step_min:
            v = victim(st, inp, cfg, layer, sc.nothing, expert, ANY, step + 1, sc.pool)
        else:
            v = victim(st, inp, cfg, layer, sc.in_use, expert, FIRST, step + 1, sc.pool)
        if v < 0:  # every slot holds an expert of this step: the one computed earliest
            for k in range(sc.sizes[0]):
                e = sc.work_e[k]
                if st.resident[layer, e] >= 0 and not st.pinned[layer, e]:
                    v = e
                    break
            if v < 0:
                _fail(st, ALL_PINNED)
                return 0
        for k in range(sc.sizes[0]):
            if sc.work_e[k] == v:
                reused = v
                break
        old = evict(st, inp, cfg, layer, v)
        st.stats[ST_EVICTIONS] += 1
    st.free_slots[layer] -= 1
    tid = new_transfer(st, inp, cfg, layer, expert, precision, DEMAND_KIND)
    if reused >= 0:
        st.t_after_compute[tid] = reused
    elif old >= 0 and st.t_state[old] == QUEUED:
        st.t_state[old] = CANCELLED
        link_cancel(st, old)
        st.stats[ST_PREFETCHES_CANCELLED] += 1
    elif old >= 0 and st.t_state[old] == STARTED:
        st.t_after_transfer[tid] = old
    return tid


@njit(cache=True)
def on_route(st, inp, cfg, step, layer, sc):
    """OffloadController.on_route: the plan of the layer step into the scratch lists (work, loads, CPU work);
    the link's cancellations and promotions done at once."""
    num_layers = inp.slots.shape[0]
    num_experts = sc.routed.shape[0]
    row = step * num_layers + layer
    lo, hi = inp.route_ptr[row], inp.route_ptr[row + 1]
    m = hi - lo
    routed = sc.routed
    routed[:] = False
    for j in range(lo, hi):
        routed[inp.route_ids[j]] = True
    sc.sizes[:] = 0
    if cfg.eviction == NO_REUSE:  # nothing kept but what the prefetcher picked for this step
        for e in range(num_experts):
            tid = st.resident[layer, e]
            if tid >= 0 and st.t_state[tid] == DONE and not st.pinned[layer, e] and not st.selected[layer, e]:
                evict(st, inp, cfg, layer, e)
    # settle the pending prefetches, in issue order
    n_pending = 0
    for e in range(num_experts):
        tid = st.pending[layer, e]
        if tid >= 0:
            k = n_pending
            while k > 0 and st.t_serial[st.pending[layer, sc.order[k - 1]]] > st.t_serial[tid]:
                sc.order[k] = sc.order[k - 1]
                k -= 1
            sc.order[k] = e
            n_pending += 1
    n_spare = 0
    n_cancelled = 0
    for k in range(n_pending):
        e = sc.order[k]
        tid = st.pending[layer, e]
        if routed[e]:
            st.t_used[tid] = True
            st.stats[ST_PREFETCHES_USED] += 1
            if st.t_state[tid] == DONE:
                st.stats[ST_BYTES_PREFETCH_USED] += inp.expert_bytes[st.t_precision[tid]]
            elif st.t_state[tid] == QUEUED:
                link_promote(st, tid)
        elif st.t_state[tid] == QUEUED and cfg.cancel_stale:
            st.t_state[tid] = CANCELLED
            sc.loads[n_cancelled] = e
            n_cancelled += 1
            st.stats[ST_PREFETCHES_CANCELLED] += 1
        else:
            sc.spare[n_spare] = e
            n_spare += 1
    for k in range(n_cancelled):
        e = sc.loads[k]
        link_cancel(st, st.pending[layer, e])
        evict(st, inp, cfg, layer, e)
    st.pending[layer, :] = -1
    covered = 0
    for k in range(st.selected_n[layer]):
        e = st.selected_list[layer, k]
        if routed[e]:
            covered += 1
        st.selected[layer, e] = False
    st.stats[ST_PREFETCH_SELECTED] += st.selected_n[layer]
    st.stats[ST_PREFETCH_COVERED] += covered
    st.selected_n[layer] = 0
    st.routed_per_layer[layer] += m
    for j in range(lo, hi):  # hits, in routed order
        e = inp.route_ids[j]
        tid = st.resident[layer, e]
        if tid >= 0:
            _work(sc, e, inp.route_counts[j], st.t_precision[tid], tid if st.t_state[tid] != DONE else -1)
    hits = sc.sizes[0]
    st.hits_per_layer[layer] += hits
    for k in range(hits):
        policy_access(st, cfg, layer, sc.work_e[k])
    n_miss = 0
    for j in range(lo, hi):
        e = inp.route_ids[j]
        if st.resident[layer, e] < 0:
            sc.misses[n_miss] = e
            sc.miss_tokens[n_miss] = inp.route_counts[j]
            n_miss += 1
    if n_miss == 0:
        return
    if cfg.miss == CPU:
        for k in range(n_miss):
            sc.cpu_e[k], sc.cpu_tokens[k] = sc.misses[k], sc.miss_tokens[k]
        sc.sizes[2] = n_miss
        return
    n_sub = min(n_miss, n_spare) if cfg.miss == SPECULATED else 0
    sc.in_use[:] = routed
    for k in range(n_sub):  # a spare speculated expert computes in place of a missing routed one
        sub = sc.spare[k]
        policy_access(st, cfg, layer, sub)
        tid = st.resident[layer, sub]
        _work(sc, sub, sc.miss_tokens[k], st.t_precision[tid], tid if st.t_state[tid] != DONE else -1)
        sc.in_use[sub] = True
    if n_sub == n_miss:
        return
    if cfg.miss == LOWBIT:
        for k in range(n_sub, n_miss):
            sc.precision_of[sc.misses[k]] = cfg.miss_precision
    else:  # by the step's token counts (fate-hybrid prefill)
        for i in range(m):
            sc.fetch_e[i] = inp.route_ids[lo + i]
            sc.fetch_s[i] = float(inp.route_counts[lo + i])
        assign_precisions(cfg, inp.step_prefill[step], sc.fetch_e, sc.fetch_s, m, sc.fetch_p)
        for i in range(m):
            sc.precision_of[sc.fetch_e[i]] = sc.fetch_p[i]
    whole_step_min = cfg.eviction == BELADY and m > inp.slots[layer]
    for k in range(n_sub, n_miss):
        e = sc.misses[k]
        tid = _load(st, inp, cfg, step, layer, e, sc.precision_of[e], whole_step_min, sc)
        if cfg.serial_loads and sc.sizes[0] > 0:
            st.t_after_compute[tid] = sc.work_e[sc.sizes[0] - 1]
        sc.loads[sc.sizes[1]] = tid
        sc.sizes[1] += 1
        _work(sc, e, sc.miss_tokens[k], st.t_precision[tid], tid)


# --- the engine (sim/engine.py) ------------------------------------------------------------------------------


@njit(cache=True)
def duration(st, inp, cfg, now, work_s):
    """Engine._duration: compute time with copy contention."""
    if cfg.copy_contention == 1.0:
        return work_s
    busy_s = link_busy_until(st, inp, now) - now
    if busy_s <= 0.0:
        return work_s
    slowed_s = work_s * cfg.copy_contention
    if slowed_s <= busy_s:
        return slowed_s
    return busy_s + work_s - busy_s / cfg.copy_contention


@njit(cache=True)
def _post_loads(st, inp, posted, ready_at, sc, starts, ends):
    """Engine._post_loads; returns (posted, ready_at)."""
    while posted < sc.sizes[1]:
        tid = sc.loads[posted]
        after = st.t_after_compute[tid]
        if after >= 0:
            if not sc.computed[after]:
                break
            ready_at = max(ready_at, sc.compute_end[after])
        before = st.t_after_transfer[tid]
        if before >= 0:
            ready_at = max(ready_at, link_end_of(st, inp, before, starts, ends))
        link_submit(st, tid, ready_at, DEMAND_PRIORITY)
        posted += 1
    return posted, ready_at


@njit(cache=True)
def _routed_experts(st, inp, cfg, route_at, sc, starts, ends):
    """Engine._routed_experts: the GPU work of the layer step in plan order."""
    clock = st.clock
    posted = 0
    ready_at = route_at
    sc.computed[:] = False
    for k in range(sc.sizes[0]):
        posted, ready_at = _post_loads(st, inp, posted, ready_at, sc, starts, ends)
        tid = sc.work_tid[k]
        if tid >= 0 and st.t_state[tid] != DONE:  # in flight as of the route: wait for its bytes
            at = link_end_of(st, inp, tid, starts, ends)
            if at > clock[K_NOW]:
                clock[K_STALL] += at - clock[K_NOW]
                clock[K_NOW] = at
        now = clock[K_NOW]
        clock[K_NOW] = now + duration(st, inp, cfg, now, inp.expert_s[sc.work_precision[k], sc.work_tokens[k]])
        sc.compute_end[sc.work_e[k]] = clock[K_NOW]
        sc.computed[sc.work_e[k]] = True


@njit(cache=True)
def _release_deferred(st):
    for k in range(st.counts[C_DEFERRED]):
        tid = st.deferred[k]
        if not st.t_cached[tid] and not st.t_on_link[tid]:
            _release(st, tid)
    st.counts[C_DEFERRED] = 0


@njit(cache=True)
def run(inp, cfg, st, sc):
    """Replay every step (Engine.gpu_stream with the closed-form CPU predictor thread, then Engine.run's drain);
    returns (result code, link busy seconds)."""
    num_layers = inp.slots.shape[0]
    num_steps = inp.step_tokens.shape[0]
    clock = st.clock
    starts = [0.0]
    ends = [0.0]
    starts.pop()
    ends.pop()
    for layer in range(num_layers):  # the allocation's pinned experts, preloaded
        for j in range(inp.pinned_ptr[layer], inp.pinned_ptr[layer + 1]):
            expert = inp.pinned_experts[j]
            st.free_slots[layer] -= 1
            tid = new_transfer(st, inp, cfg, layer, expert, cfg.preload_precision, PRELOAD_KIND)
            st.t_state[tid] = DONE
            st.pinned[layer, expert] = True
    if st.counts[C_ERROR] != OK:
        return st.counts[C_ERROR], 0.0
    predicts = cfg.prefetch != NO_PREFETCH
    for step in range(num_steps):
        st.counts[C_STEP] = step
        st.step_start_at[step] = clock[K_NOW]
        attention_s = inp.attention_s[step]
        for layer in range(num_layers):
            now = clock[K_NOW]
            clock[K_NOW] = now + duration(st, inp, cfg, now, attention_s)
            link_advance(st, inp, clock[K_NOW], starts, ends)
            if predicts:
                n = gate_input(st, inp, cfg, step, layer, sc.prefetches, sc)
                start = max(clock[K_CPU_FREE], clock[K_NOW])
                done = start + cfg.predictor_latency_s
                clock[K_CPU_FREE] = done
                for k in range(n):
                    link_submit(st, sc.prefetches[k], done, PREFETCH_PRIORITY)
            clock[K_NOW] += cfg.router_s
            link_advance(st, inp, clock[K_NOW], starts, ends)
            route_at = clock[K_NOW]
            on_route(st, inp, cfg, step, layer, sc)
            if st.counts[C_ERROR] != OK:
                return st.counts[C_ERROR], 0.0
            cpu_done_at = route_at
            if not cfg.cpu_on_stream:  # the CPU expert thread
                for k in range(sc.sizes[2]):
                    start = max(clock[K_CPU_EXPERT_FREE], route_at)
                    cpu_done_at = start + inp.cpu_expert_s[sc.cpu_tokens[k]]
                    clock[K_CPU_EXPERT_FREE] = cpu_done_at
            _routed_experts(st, inp, cfg, route_at, sc, starts, ends)
            if cfg.cpu_on_stream:
                for k in range(sc.sizes[2]):
                    now = clock[K_NOW]
                    clock[K_NOW] = now + duration(st, inp, cfg, now, inp.cpu_expert_s[sc.cpu_tokens[k]])
            elif cpu_done_at > clock[K_NOW]:
                clock[K_STALL] += cpu_done_at - clock[K_NOW]
                clock[K_NOW] = cpu_done_at
            shared_s = inp.shared_s[step]
            if shared_s:
                now = clock[K_NOW]
                clock[K_NOW] = now + duration(st, inp, cfg, now, shared_s)
            _release_deferred(st)
        st.step_end_at[step] = clock[K_NOW]
    makespan = st.step_end_at[num_steps - 1] if num_steps else 0.0
    link_advance(st, inp, INF, starts, ends)
    busy = 0.0
    for i in range(len(starts)):
        if starts[i] < makespan:
            busy += min(ends[i], makespan) - starts[i]
    return st.counts[C_ERROR], busy
