"""The compiled replay loop: the reference engine, link and controller (sim/engine.py, sim/link.py,
sim/policies/controller.py) over flat arrays, compiled by numba.

Every function here mirrors one of the reference's and says which; floating-point operations happen in
the reference's order (numba compiles without fast-math, so results are bit-identical). The state lives
in the arrays of `sim.kernel.state.State`; `run` replays all steps and returns a result code.
"""

from __future__ import annotations

import numpy as np
from numba import njit, types
from numba.core import cgutils
from numba.experimental import structref
from numba.extending import intrinsic

from sim.kernel.state import (
    ALL_PINNED,
    ANY,
    ARC,
    B1,
    B2,
    BELADY,
    BUDGET_EXCEEDED,
    C_DEFERRED,
    C_EAP_DECODE,
    C_EAP_STORED,
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
    EAP,
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


# --- one struct of all arrays --------------------------------------------------------------------------------
# The helpers below take the replay's arrays as one StructRef (a pointer): passed as the three named tuples
# of sim/kernel/state.py, every call would copy and reference-count each of their ~100 arrays (~0.5 µs a
# call, measured; 60 µs per layer step). The struct's arrays are untracked views (see `_pack`).


@structref.register
class ReplayStruct(types.StructRef):
    """The fields of Inputs, State and Scratch (their names are distinct), by reference."""

    def preprocess_fields(self, fields):
        return tuple((name, types.unliteral(typ)) for name, typ in fields)


@intrinsic
def _pack(typingctx, inputs, state, scratch):
    """A ReplayStruct of every array of the three named tuples, as views that hold no reference (the named
    tuples, alive for the whole call of `run`, keep the arrays alive): reading a field then costs no atomic
    reference count (those were ~90% of the kernel's time)."""
    tuples = (inputs, state, scratch)
    fields = [(name, typ) for tup in tuples for name, typ in zip(tup.fields, tup.types, strict=True)]
    struct_type = ReplayStruct(fields)

    def codegen(context, builder, signature, args):
        struct = structref_new_codegen(context, builder, struct_type)
        data = structref._Utils(context, builder, struct_type).get_data_struct(struct)
        for tup, value in zip(tuples, args, strict=True):
            for i, (name, typ) in enumerate(zip(tup.fields, tup.types, strict=True)):
                array = context.make_array(typ)(context, builder, value=builder.extract_value(value, i))
                array.meminfo = cgutils.get_null_value(array.meminfo.type)  # untracked: no atomics on access
                array.parent = cgutils.get_null_value(array.parent.type)
                setattr(data, name, array._getvalue())
        return struct

    return struct_type(inputs, state, scratch), codegen


def structref_new_codegen(context, builder, struct_type):
    """structref.new's code: a zeroed struct with its destructor (decrefs the members when it dies)."""
    from numba.experimental.jitclass.base import imp_dtor

    model = context.data_model_manager[struct_type.get_data_type()]
    alloc_type = model.get_value_type()
    meminfo = context.nrt.meminfo_alloc_dtor(builder, context.get_constant(types.uintp, context.get_abi_sizeof(alloc_type)),
                                            imp_dtor(context, builder.module, struct_type))
    data_pointer = builder.bitcast(context.nrt.meminfo_data(builder, meminfo), alloc_type.as_pointer())
    builder.store(cgutils.get_null_value(alloc_type), data_pointer)
    inst = context.make_helper(builder, struct_type)
    inst.meminfo = meminfo
    return inst._getvalue()
NEVER = 1 << 62
INF = np.inf

# --- the link (sim/link.py, sim/policies/transfer_queue.py) ---------------------------------------------


@njit(cache=True)
def _before(rs, a, b):
    """Whether queued transfer a starts before b: (priority, ready time, submission order)."""
    if rs.t_prio[a] != rs.t_prio[b]:
        return rs.t_prio[a] < rs.t_prio[b]
    if rs.t_ready[a] != rs.t_ready[b]:
        return rs.t_ready[a] < rs.t_ready[b]
    return rs.t_qseq[a] < rs.t_qseq[b]


@njit(cache=True)
def _queue_remove(rs, tid):
    n = rs.counts[C_QUEUE]
    q = rs.queue
    for i in range(n):
        if q[i] == tid:
            for j in range(i, n - 1):
                q[j] = q[j + 1]
            rs.counts[C_QUEUE] = n - 1
            rs.t_queued[tid] = False
            return True
    return False


@njit(cache=True)
def link_submit(rs, tid, ready_at, priority):
    """Link.submit / TransferQueue.submit."""
    if rs.t_state[tid] == CANCELLED:
        return
    if rs.t_promote[tid]:
        rs.t_promote[tid] = False
        priority = DEMAND_PRIORITY
    rs.counts[C_QUEUE_SEQ] += 1
    rs.t_prio[tid] = priority
    rs.t_ready[tid] = ready_at
    rs.t_qseq[tid] = rs.counts[C_QUEUE_SEQ]
    rs.queue[rs.counts[C_QUEUE]] = tid
    rs.counts[C_QUEUE] += 1
    rs.t_queued[tid] = True
    rs.t_on_link[tid] = True


@njit(cache=True)
def link_cancel(rs, tid):
    """Link.cancel: drop a queued transfer."""
    rs.t_promote[tid] = False
    if rs.t_queued[tid]:
        _queue_remove(rs, tid)
        rs.t_on_link[tid] = False


@njit(cache=True)
def link_promote(rs, tid):
    """Link.promote: on-demand priority for a queued (or not yet submitted) transfer."""
    if rs.t_queued[tid]:
        rs.t_prio[tid] = DEMAND_PRIORITY
    else:
        rs.t_promote[tid] = True


@njit(cache=True)
def _heap_push(rs, end, seq, tid):
    i = rs.counts[C_HEAP]
    rs.counts[C_HEAP] = i + 1
    while i > 0:
        parent = (i - 1) // 2
        if rs.heap_end[parent] < end or (rs.heap_end[parent] == end and rs.heap_seq[parent] < seq):
            break
        rs.heap_end[i], rs.heap_seq[i], rs.heap_tid[i] = rs.heap_end[parent], rs.heap_seq[parent], rs.heap_tid[parent]
        i = parent
    rs.heap_end[i], rs.heap_seq[i], rs.heap_tid[i] = end, seq, tid


@njit(cache=True)
def _heap_pop(rs):
    top = rs.heap_tid[0]
    n = rs.counts[C_HEAP] - 1
    rs.counts[C_HEAP] = n
    if n > 0:
        end, seq, tid = rs.heap_end[n], rs.heap_seq[n], rs.heap_tid[n]
        i = 0
        while True:
            child = 2 * i + 1
            if child >= n:
                break
            right = child + 1
            if right < n and (rs.heap_end[right] < rs.heap_end[child]
                              or (rs.heap_end[right] == rs.heap_end[child] and rs.heap_seq[right] < rs.heap_seq[child])):
                child = right
            if end < rs.heap_end[child] or (end == rs.heap_end[child] and seq < rs.heap_seq[child]):
                break
            rs.heap_end[i], rs.heap_seq[i], rs.heap_tid[i] = rs.heap_end[child], rs.heap_seq[child], rs.heap_tid[child]
            i = child
        rs.heap_end[i], rs.heap_seq[i], rs.heap_tid[i] = end, seq, tid
    return top


@njit(cache=True)
def _start_next(rs, until, starts, ends):
    """Link._start_next: start the next transfer if it starts before `until`; whether one started."""
    n = rs.counts[C_QUEUE]
    if n == 0:
        return False
    free_at = rs.engine_free_at
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
        tid = rs.queue[i]
        ready = rs.t_ready[tid]
        if ready <= f:
            if best < 0 or _before(rs, tid, best):
                best = tid
        elif not have_earliest or ready < earliest:
            earliest = ready
            have_earliest = True
    if best < 0:
        for i in range(n):
            tid = rs.queue[i]
            if rs.t_ready[tid] <= earliest and (best < 0 or _before(rs, tid, best)):
                best = tid
    start = max(f, rs.t_ready[best])
    if start >= until:
        return False
    _queue_remove(rs, best)
    rs.counts[C_LINK_SEQ] += 1
    end = start + rs.transfer_s[rs.t_precision[best]]
    free_at[engine] = end
    rs.t_start[best] = start
    rs.t_end[best] = end
    starts.append(start)
    ends.append(end)
    if rs.t_state[best] == QUEUED:  # controller.on_transfer_started
        rs.t_state[best] = STARTED
    _heap_push(rs, end, rs.counts[C_LINK_SEQ], best)
    return True


@njit(cache=True)
def link_advance(rs, until, starts, ends):
    """Link.advance: start what starts before `until`, report what landed by it."""
    while rs.counts[C_QUEUE] > 0 and _start_next(rs, until, starts, ends):
        pass
    while rs.counts[C_HEAP] > 0 and rs.heap_end[0] <= until:
        _transfer_done(rs, _heap_pop(rs))


@njit(cache=True)
def link_end_of(rs, tid, starts, ends):
    """Link.end_of: when `tid` lands, starting queued transfers in order until it has started."""
    while rs.t_start[tid] < 0.0:
        if not _start_next(rs, INF, starts, ends):
            return -1.0  # never submitted: cannot happen in a consistent replay
    return rs.t_end[tid]


@njit(cache=True)
def link_busy_until(rs, now):
    """Link.busy_until."""
    work = 0.0
    free_at = rs.engine_free_at
    for e in range(free_at.shape[0]):
        if free_at[e] > now:
            work += free_at[e] - now
    for i in range(rs.counts[C_QUEUE]):
        tid = rs.queue[i]
        if rs.t_ready[tid] <= now:
            work += rs.transfer_s[rs.t_precision[tid]]
    return now + work / free_at.shape[0]


@njit(cache=True)
def _transfer_done(rs, tid):
    """OffloadController.on_transfer_done (and the transfer leaves the link)."""
    rs.t_state[tid] = DONE
    rs.t_on_link[tid] = False
    nbytes = rs.expert_bytes[rs.t_precision[tid]]
    if rs.t_kind[tid] == DEMAND_KIND:
        rs.stats[ST_BYTES_ON_DEMAND] += nbytes
    else:
        rs.stats[ST_BYTES_PREFETCHED] += nbytes
        if rs.t_used[tid]:
            rs.stats[ST_BYTES_PREFETCH_USED] += nbytes
    if not rs.t_cached[tid]:
        _release(rs, tid)


@njit(cache=True)
def _release(rs, tid):
    """The transfer index is free for reuse (nothing refers to it any more)."""
    rs.free_transfers[rs.counts[C_FREE_TRANSFERS]] = tid
    rs.counts[C_FREE_TRANSFERS] += 1


# --- eviction policies (sim/policies/eviction.py) ----------------------------------------------------------


@njit(cache=True)
def _next_tick(rs):
    rs.counts[C_TICK] += 1
    return rs.counts[C_TICK]


@njit(cache=True)
def _arc_oldest(rs, layer, lst):
    """The least recently listed expert of ARC list `lst` in `layer`."""
    best = -1
    for e in range(rs.arc_list.shape[1]):
        if rs.arc_list[layer, e] == lst and (best < 0 or rs.tick[layer, e] < rs.tick[layer, best]):
            best = e
    return best


@njit(cache=True)
def _arc_move(rs, layer, expert, lst):
    old = rs.arc_list[layer, expert]
    if old:
        rs.arc_size[layer, old] -= 1
    rs.arc_list[layer, expert] = lst
    if lst:
        rs.arc_size[layer, lst] += 1
        rs.tick[layer, expert] = _next_tick(rs)


@njit(cache=True)
def _arc_trim(rs, layer):
    """ARC._trim_ghosts."""
    c = max(1, rs.slots[layer])
    size = rs.arc_size
    while size[layer, B1] > 0 and size[layer, T1] + size[layer, B1] > c:
        _arc_move(rs, layer, _arc_oldest(rs, layer, B1), 0)
    while size[layer, B2] > 0 and size[layer, T1] + size[layer, T2] + size[layer, B1] + size[layer, B2] > 2 * c:
        _arc_move(rs, layer, _arc_oldest(rs, layer, B2), 0)


@njit(cache=True)
def _arc_adapt(rs, layer, incoming):
    """ARC._adapt."""
    if incoming < 0 or incoming == rs.arc_adapted[layer]:
        return
    rs.arc_adapted[layer] = incoming
    c = float(max(1, rs.slots[layer]))
    n1, n2 = rs.arc_size[layer, B1], rs.arc_size[layer, B2]
    if rs.arc_list[layer, incoming] == B1:
        rs.arc_p[layer] = min(c, rs.arc_p[layer] + max(n2 / n1, 1.0))
    elif rs.arc_list[layer, incoming] == B2:
        rs.arc_p[layer] = max(0.0, rs.arc_p[layer] - max(n1 / n2, 1.0))


@njit(cache=True)
def policy_insert(rs, cfg, layer, expert):
    """EvictionPolicy.on_insert."""
    if cfg.eviction == LRU:
        rs.tick[layer, expert] = _next_tick(rs)
    elif cfg.eviction == LFU:
        rs.tick[layer, expert] = _next_tick(rs)
        rs.uses[layer, expert] = 1
    elif cfg.eviction == ARC:
        _arc_adapt(rs, layer, expert)
        rs.arc_adapted[layer] = -1
        lst = rs.arc_list[layer, expert]
        _arc_move(rs, layer, expert, T2 if lst == B1 or lst == B2 else T1)
        _arc_trim(rs, layer)


@njit(cache=True)
def policy_access(rs, cfg, layer, expert):
    """EvictionPolicy.on_access."""
    if cfg.eviction == LRU:
        rs.tick[layer, expert] = _next_tick(rs)
    elif cfg.eviction == LFU:
        rs.tick[layer, expert] = _next_tick(rs)
        rs.uses[layer, expert] += 1
    elif cfg.eviction == ARC:
        _arc_move(rs, layer, expert, T2)


@njit(cache=True)
def policy_remove(rs, cfg, layer, expert):
    """EvictionPolicy.on_remove."""
    if cfg.eviction == ARC:
        lst = rs.arc_list[layer, expert]
        if lst == T1:
            _arc_move(rs, layer, expert, B1)
        elif lst == T2:
            _arc_move(rs, layer, expert, B2)
        _arc_trim(rs, layer)


@njit(cache=True)
def _next_use(rs, layer, expert, step, num_experts):
    """FutureAccess.next_use: the first step >= `step` that routes the expert. The replay asks with steps
    that never decrease for one expert, so a cursor per expert walks its uses forward once (a binary search
    per candidate of every eviction: 0.45 s CPU of the ESFT log's oracle replay, 0.31 s with the cursor); a
    smaller step than before searches."""
    k = layer * num_experts + expert
    lo, hi = rs.use_ptr[k], rs.use_ptr[k + 1]
    uses = rs.use_steps
    i = rs.use_cursor[k]
    if i > lo and uses[i - 1] >= step:  # asked for an earlier step than before
        i = lo + np.searchsorted(uses[lo:hi], step)
    else:
        while i < hi and uses[i] < step:
            i += 1
        rs.use_cursor[k] = i
    return uses[i] if i < hi else NEVER


@njit(cache=True)
def policy_victim(rs, cfg, layer, candidates, n, incoming, from_step, num_experts):
    """EvictionPolicy.victim among candidates[:n] (n > 0): the candidate with the smallest key (k1, k2)."""
    eviction = cfg.eviction
    tick, uses, arc_list = rs.tick, rs.uses, rs.arc_list  # locals: a field read costs a reference count
    first_list = T1
    if eviction == ARC:
        _arc_adapt(rs, layer, incoming)
        n1 = rs.arc_size[layer, T1]
        p = rs.arc_p[layer]
        if not (n1 and (n1 > p or (n1 == p and arc_list[layer, incoming] == B2))):
            first_list = T2
    best, best1, best2 = -1, 0, 0
    for i in range(n):
        e = candidates[i]
        if eviction == LRU:  # least recently used
            k1, k2 = tick[layer, e], 0
        elif eviction == LFU:  # least used since insertion, then least recently
            k1, k2 = uses[layer, e], tick[layer, e]
        elif eviction == ARC:  # REPLACE's list first, least recently listed first
            k1, k2 = (0 if arc_list[layer, e] == first_list else 1), tick[layer, e]
        elif eviction == BELADY:  # farthest next use; ties: the lowest id
            k1, k2 = -_next_use(rs, layer, e, from_step, num_experts), e
        else:  # no reuse: the lowest id
            k1, k2 = e, 0
        if best < 0 or k1 < best1 or (k1 == best1 and k2 < best2):
            best, best1, best2 = e, k1, k2
    return best


# --- the controller (sim/policies/controller.py) -----------------------------------------------------------


@njit(cache=True)
def _fail(rs, code):
    if rs.counts[C_ERROR] == OK:
        rs.counts[C_ERROR] = code


@njit(cache=True)
def new_transfer(rs, cfg, layer, expert, precision, kind):
    """OffloadController._insert: a transfer of `expert` into a slot already taken, cached at once."""
    n = rs.counts[C_FREE_TRANSFERS]
    if n == 0:
        _fail(rs, POOL_EXHAUSTED)
        return 0
    tid = rs.free_transfers[n - 1]
    rs.counts[C_FREE_TRANSFERS] = n - 1
    rs.t_layer[tid], rs.t_expert[tid], rs.t_precision[tid], rs.t_kind[tid] = layer, expert, precision, kind
    rs.t_state[tid] = QUEUED
    rs.t_used[tid] = False
    rs.t_start[tid] = -1.0
    rs.t_end[tid] = -1.0
    rs.t_after_transfer[tid] = -1
    rs.t_after_compute[tid] = -1
    rs.counts[C_SERIAL] += 1
    rs.t_serial[tid] = rs.counts[C_SERIAL]
    rs.t_cached[tid] = True
    rs.t_on_link[tid] = False
    rs.t_promote[tid] = False
    rs.t_queued[tid] = False
    rs.resident[layer, expert] = tid
    rs.res_pos[layer, expert] = rs.res_n[layer]
    rs.res_list[layer, rs.res_n[layer]] = expert
    rs.res_n[layer] += 1
    policy_insert(rs, cfg, layer, expert)
    rs.counts[C_OCCUPIED] += 1
    if rs.counts[C_OCCUPIED] > rs.counts[C_PEAK]:
        rs.counts[C_PEAK] = rs.counts[C_OCCUPIED]
    if rs.counts[C_OCCUPIED] > cfg.max_slots:
        _fail(rs, BUDGET_EXCEEDED)
    return tid


@njit(cache=True)
def evict(rs, cfg, layer, expert):
    """OffloadController._evict; the transfer index is released once the layer step ends (and it left the link)."""
    tid = rs.resident[layer, expert]
    rs.resident[layer, expert] = -1
    last = rs.res_list[layer, rs.res_n[layer] - 1]  # the last listed takes its place
    rs.res_list[layer, rs.res_pos[layer, expert]] = last
    rs.res_pos[layer, last] = rs.res_pos[layer, expert]
    rs.res_n[layer] -= 1
    if rs.pending[layer, expert] == tid:
        rs.pending[layer, expert] = -1
        rs.pending_n[layer] -= 1
    policy_remove(rs, cfg, layer, expert)
    rs.free_slots[layer] += 1
    rs.counts[C_OCCUPIED] -= 1
    rs.t_cached[tid] = False
    rs.deferred[rs.counts[C_DEFERRED]] = tid
    rs.counts[C_DEFERRED] += 1
    return tid


@njit(cache=True)
def victim(rs, cfg, layer, exclude, incoming, landed, from_step):
    """OffloadController._victim: the policy's choice among experts not pinned and not in `exclude`; -1 if none."""
    n = 0
    n_done = 0
    candidates, res_list, pinned, resident, state = rs.candidates, rs.res_list, rs.pinned, rs.resident, rs.t_state
    for i in range(rs.res_n[layer]):
        e = res_list[layer, i]
        if exclude[e] or pinned[layer, e]:
            continue
        if landed != ANY and state[resident[layer, e]] == DONE:  # landed ones to the front
            candidates[n] = candidates[n_done]
            candidates[n_done] = e
            n_done += 1
        else:
            candidates[n] = e
        n += 1
    if landed == ONLY or (landed == FIRST and n_done > 0):
        n = n_done
    if n == 0:
        return -1
    return policy_victim(rs, cfg, layer, candidates, n, incoming, from_step, exclude.shape[0])


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
def _prefetch(rs, cfg, step, target, experts, scores, n, out, n_out):
    """OffloadController._prefetch: the picks for layer `target` not resident, best first, while a slot can
    be had; returns the prefetches issued so far (appended to `out`)."""
    picks = rs.mark
    picks[:] = False
    m = 0
    for i in range(n):
        picks[experts[i]] = True
        if rs.resident[target, experts[i]] < 0:
            rs.fetch_e[m] = experts[i]
            rs.fetch_s[m] = scores[i]
            m += 1
    assign_precisions(cfg, rs.step_prefill[step], rs.fetch_e, rs.fetch_s, m, rs.fetch_p)
    for i in range(m):
        expert = rs.fetch_e[i]
        if rs.free_slots[target] == 0:
            v = victim(rs, cfg, target, picks, expert, ONLY, step)
            if v < 0:
                break
            evict(rs, cfg, target, v)
            rs.stats[ST_EVICTIONS] += 1
        rs.free_slots[target] -= 1
        tid = new_transfer(rs, cfg, target, expert, rs.fetch_p[i], PREFETCH_KIND)
        rs.pending[target, expert] = tid
        rs.pending_n[target] += 1
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
def _select_and_prefetch(rs, cfg, step, target, experts, scores, n, out, n_out):
    kept = _select(cfg, rs.step_prefill[step], experts, scores, n)
    if kept == 0:
        return n_out
    for i in range(kept):
        e = experts[i]
        if not rs.selected[target, e]:
            rs.selected[target, e] = True
            rs.selected_list[target, rs.selected_n[target]] = e
            rs.selected_n[target] += 1
    return _prefetch(rs, cfg, step, target, experts, scores, kept, out, n_out)


@njit(cache=True)
def _eap_begin_step(rs, step):
    """EapPredictor.begin_step: store the path of the decode step that ended, start an empty one."""
    if rs.counts[C_EAP_DECODE] == 1:
        stored = rs.counts[C_EAP_STORED]
        if rs.eap_current.any():
            rs.eap_paths[stored % rs.eap_paths.shape[0]] = rs.eap_current
            rs.counts[C_EAP_STORED] = stored + 1
    rs.eap_current[:] = False
    rs.eap_score[:] = 0.0
    rs.counts[C_EAP_DECODE] = 0 if rs.step_prefill[step] else 1


@njit(cache=True)
def _eap_observe(rs, step, layer):
    """EapPredictor.observe: the layer's routed experts join the path; in decode, each stored path scores the
    experts it shares with them."""
    row = step * rs.slots.shape[0] + layer
    lo, hi = rs.route_ptr[row], rs.route_ptr[row + 1]
    for j in range(lo, hi):
        rs.eap_current[layer, rs.route_ids[j]] = True
    if rs.counts[C_EAP_DECODE] == 1 and rs.counts[C_EAP_STORED] > 0:
        for h in range(min(rs.counts[C_EAP_STORED], rs.eap_paths.shape[0])):  # the rest are empty: they add 0
            shared = 0
            for j in range(lo, hi):
                if rs.eap_paths[h, layer, rs.route_ids[j]]:
                    shared += 1
            rs.eap_score[h] += shared


@njit(cache=True)
def _eap_predict(rs, cfg, step, layer, out):
    """EapPredictor.predict and the prefetches of its predictions; how many were issued."""
    num_layers, num_experts = rs.slots.shape[0], rs.routed.shape[0]
    history = rs.eap_paths.shape[0]
    stored = rs.counts[C_EAP_STORED]
    n = min(stored, history)
    n_out = 0
    if n == 0:
        return 0
    if rs.step_prefill[step]:  # by how many stored paths route each expert (ties: lower id)
        for d in range(cfg.depth):
            target = layer + d + 1
            if target >= num_layers:
                break
            counts = rs.eap_counts
            for e in range(num_experts):
                c = 0
                for h in range(n):
                    if rs.eap_paths[h, target, e]:
                        c += 1
                counts[e] = c
            m = _rank_row(counts, num_experts, rs.pred_e, rs.pred_s, rs.taken)
            n_out = _select_and_prefetch(rs, cfg, step, target, rs.pred_e, rs.pred_s, m, out, n_out)
        return n_out
    best, best_score = -1, 0.0  # the most similar stored path; ties go to the most recent one
    for i in range(n):
        h = (stored - 1 - i) % history
        if best < 0 or rs.eap_score[h] > best_score:
            best, best_score = h, rs.eap_score[h]
    for d in range(cfg.depth):
        target = layer + d + 1
        if target >= num_layers:
            break
        m = 0
        for e in range(num_experts):  # its experts in that layer, by id, each with confidence 1
            if rs.eap_paths[best, target, e]:
                rs.pred_e[m] = e
                rs.pred_s[m] = 1.0
                m += 1
        n_out = _select_and_prefetch(rs, cfg, step, target, rs.pred_e, rs.pred_s, m, out, n_out)
    return n_out


@njit(cache=True)
def gate_input(rs, cfg, step, layer, out):
    """OffloadController.on_gate_input: the prefetches for the layers ahead (into `out`); how many."""
    if cfg.prefetch == NO_PREFETCH:
        return 0
    num_layers = rs.slots.shape[0]
    n_out = 0
    if cfg.prediction == LOOKAHEAD:
        for d in range(min(cfg.depth, rs.probs.shape[0])):
            target = layer + d + 1
            if target >= num_layers:
                break
            if rs.step_tokens[step] == 1:  # by probability
                n = _rank_row(rs.probs[d, rs.step_position[step], layer], cfg.lookahead_limit, rs.pred_e, rs.pred_s,
                              rs.taken)
            else:  # by predicted popularity, ranked in advance
                row = (step * num_layers + layer) * cfg.prefill_depth + d
                lo, hi = rs.prefill_ptr[row], rs.prefill_ptr[row + 1]
                n = hi - lo
                for i in range(n):
                    rs.pred_e[i] = rs.prefill_experts[lo + i]
                    rs.pred_s[i] = rs.prefill_scores[lo + i]
            n_out = _select_and_prefetch(rs, cfg, step, target, rs.pred_e, rs.pred_s, n, out, n_out)
    elif cfg.prediction == EAP:
        n_out = _eap_predict(rs, cfg, step, layer, out)
    elif cfg.prediction == ORACLE:  # the routes to come, most tokens first (ties: lower id)
        for d in range(cfg.depth):
            target = layer + d + 1
            if target >= num_layers:
                break
            row = step * num_layers + target
            lo, hi = rs.route_ptr[row], rs.route_ptr[row + 1]
            n = 0
            for j in range(lo, hi):
                k = n
                while k > 0 and rs.route_counts[rs.pred_e[k - 1]] < rs.route_counts[j]:
                    rs.pred_e[k] = rs.pred_e[k - 1]
                    k -= 1
                rs.pred_e[k] = j
                n += 1
            for k in range(n):
                j = rs.pred_e[k]
                rs.pred_s[k] = float(rs.route_counts[j])
                rs.pred_e[k] = rs.route_ids[j]
            n_out = _select_and_prefetch(rs, cfg, step, target, rs.pred_e, rs.pred_s, n, out, n_out)
    rs.stats[ST_PREFETCHES_ISSUED] += n_out
    return n_out


@njit(cache=True)
def _work(rs, expert, tokens, precision, tid):
    n = rs.sizes[0]
    rs.work_e[n], rs.work_tokens[n], rs.work_precision[n], rs.work_tid[n] = expert, tokens, precision, tid
    rs.sizes[0] = n + 1


@njit(cache=True)
def _load(rs, cfg, step, layer, expert, precision, whole_step_min):
    """OffloadController._load: an on-demand load into a free slot or a victim's (see there)."""
    reused = -1
    old = -1
    if rs.free_slots[layer] == 0:
        if whole_step_min:
            v = victim(rs, cfg, layer, rs.nothing, expert, ANY, step + 1)
        else:
            v = victim(rs, cfg, layer, rs.in_use, expert, FIRST, step + 1)
        if v < 0:  # every slot holds an expert of this step: the one computed earliest
            for k in range(rs.sizes[0]):
                e = rs.work_e[k]
                if rs.resident[layer, e] >= 0 and not rs.pinned[layer, e]:
                    v = e
                    break
            if v < 0:
                _fail(rs, ALL_PINNED)
                return 0
        for k in range(rs.sizes[0]):
            if rs.work_e[k] == v:
                reused = v
                break
        old = evict(rs, cfg, layer, v)
        rs.stats[ST_EVICTIONS] += 1
    rs.free_slots[layer] -= 1
    tid = new_transfer(rs, cfg, layer, expert, precision, DEMAND_KIND)
    if reused >= 0:
        rs.t_after_compute[tid] = reused
    elif old >= 0 and rs.t_state[old] == QUEUED:
        rs.t_state[old] = CANCELLED
        link_cancel(rs, old)
        rs.stats[ST_PREFETCHES_CANCELLED] += 1
    elif old >= 0 and rs.t_state[old] == STARTED:
        rs.t_after_transfer[tid] = old
    return tid


@njit(cache=True)
def on_route(rs, cfg, step, layer):
    """OffloadController.on_route: the plan of the layer step into the scratch lists (work, loads, CPU work);
    the link's cancellations and promotions done at once."""
    num_layers = rs.slots.shape[0]
    num_experts = rs.routed.shape[0]
    row = step * num_layers + layer
    lo, hi = rs.route_ptr[row], rs.route_ptr[row + 1]
    m = hi - lo
    routed = rs.routed
    routed[:] = False
    for j in range(lo, hi):
        routed[rs.route_ids[j]] = True
    rs.sizes[:] = 0
    if cfg.eviction == NO_REUSE:  # nothing kept but what the prefetcher picked for this step
        for i in range(rs.res_n[layer] - 1, -1, -1):  # backwards: an eviction moves the last listed to i
            e = rs.res_list[layer, i]
            tid = rs.resident[layer, e]
            if rs.t_state[tid] == DONE and not rs.pinned[layer, e] and not rs.selected[layer, e]:
                evict(rs, cfg, layer, e)
    # settle the pending prefetches, in issue order
    n_pending = 0
    for e in range(num_experts if rs.pending_n[layer] > 0 else 0):
        tid = rs.pending[layer, e]
        if tid >= 0:
            k = n_pending
            while k > 0 and rs.t_serial[rs.pending[layer, rs.order[k - 1]]] > rs.t_serial[tid]:
                rs.order[k] = rs.order[k - 1]
                k -= 1
            rs.order[k] = e
            n_pending += 1
    n_spare = 0
    n_cancelled = 0
    for k in range(n_pending):
        e = rs.order[k]
        tid = rs.pending[layer, e]
        if routed[e]:
            rs.t_used[tid] = True
            rs.stats[ST_PREFETCHES_USED] += 1
            if rs.t_state[tid] == DONE:
                rs.stats[ST_BYTES_PREFETCH_USED] += rs.expert_bytes[rs.t_precision[tid]]
            elif rs.t_state[tid] == QUEUED:
                link_promote(rs, tid)
        elif rs.t_state[tid] == QUEUED and cfg.cancel_stale:
            rs.t_state[tid] = CANCELLED
            rs.loads[n_cancelled] = e
            n_cancelled += 1
            rs.stats[ST_PREFETCHES_CANCELLED] += 1
        else:
            rs.spare[n_spare] = e
            n_spare += 1
    for k in range(n_cancelled):
        e = rs.loads[k]
        link_cancel(rs, rs.pending[layer, e])
        evict(rs, cfg, layer, e)
    if rs.pending_n[layer] > 0:
        rs.pending[layer, :] = -1
        rs.pending_n[layer] = 0
    covered = 0
    for k in range(rs.selected_n[layer]):
        e = rs.selected_list[layer, k]
        if routed[e]:
            covered += 1
        rs.selected[layer, e] = False
    rs.stats[ST_PREFETCH_SELECTED] += rs.selected_n[layer]
    rs.stats[ST_PREFETCH_COVERED] += covered
    rs.selected_n[layer] = 0
    rs.routed_per_layer[layer] += m
    for j in range(lo, hi):  # hits, in routed order
        e = rs.route_ids[j]
        tid = rs.resident[layer, e]
        if tid >= 0:
            _work(rs, e, rs.route_counts[j], rs.t_precision[tid], tid if rs.t_state[tid] != DONE else -1)
    hits = rs.sizes[0]
    rs.hits_per_layer[layer] += hits
    for k in range(hits):
        policy_access(rs, cfg, layer, rs.work_e[k])
    n_miss = 0
    for j in range(lo, hi):
        e = rs.route_ids[j]
        if rs.resident[layer, e] < 0:
            rs.misses[n_miss] = e
            rs.miss_tokens[n_miss] = rs.route_counts[j]
            n_miss += 1
    if n_miss == 0:
        return
    if cfg.miss == CPU:
        for k in range(n_miss):
            rs.cpu_e[k], rs.cpu_tokens[k] = rs.misses[k], rs.miss_tokens[k]
        rs.sizes[2] = n_miss
        return
    n_sub = min(n_miss, n_spare) if cfg.miss == SPECULATED else 0
    for e in range(num_experts):
        rs.in_use[e] = routed[e]
    for k in range(n_sub):  # a spare speculated expert computes in place of a missing routed one
        sub = rs.spare[k]
        policy_access(rs, cfg, layer, sub)
        tid = rs.resident[layer, sub]
        _work(rs, sub, rs.miss_tokens[k], rs.t_precision[tid], tid if rs.t_state[tid] != DONE else -1)
        rs.in_use[sub] = True
    if n_sub == n_miss:
        return
    if cfg.miss == LOWBIT:
        for k in range(n_sub, n_miss):
            rs.precision_of[rs.misses[k]] = cfg.miss_precision
    else:  # by the step's token counts (fate-hybrid prefill)
        for i in range(m):
            rs.fetch_e[i] = rs.route_ids[lo + i]
            rs.fetch_s[i] = float(rs.route_counts[lo + i])
        assign_precisions(cfg, rs.step_prefill[step], rs.fetch_e, rs.fetch_s, m, rs.fetch_p)
        for i in range(m):
            rs.precision_of[rs.fetch_e[i]] = rs.fetch_p[i]
    whole_step_min = cfg.eviction == BELADY and m > rs.slots[layer]
    for k in range(n_sub, n_miss):
        e = rs.misses[k]
        tid = _load(rs, cfg, step, layer, e, rs.precision_of[e], whole_step_min)
        if cfg.serial_loads and rs.sizes[0] > 0:
            rs.t_after_compute[tid] = rs.work_e[rs.sizes[0] - 1]
        rs.loads[rs.sizes[1]] = tid
        rs.sizes[1] += 1
        _work(rs, e, rs.miss_tokens[k], rs.t_precision[tid], tid)


# --- the engine (sim/engine.py) ------------------------------------------------------------------------------


@njit(cache=True)
def duration(rs, cfg, now, work_s):
    """Engine._duration: compute time with copy contention."""
    if cfg.copy_contention == 1.0:
        return work_s
    busy_s = link_busy_until(rs, now) - now
    if busy_s <= 0.0:
        return work_s
    slowed_s = work_s * cfg.copy_contention
    if slowed_s <= busy_s:
        return slowed_s
    return busy_s + work_s - busy_s / cfg.copy_contention


@njit(cache=True)
def _post_loads(rs, posted, ready_at, starts, ends):
    """Engine._post_loads; returns (posted, ready_at)."""
    while posted < rs.sizes[1]:
        tid = rs.loads[posted]
        after = rs.t_after_compute[tid]
        if after >= 0:
            if not rs.computed[after]:
                break
            ready_at = max(ready_at, rs.compute_end[after])
        before = rs.t_after_transfer[tid]
        if before >= 0:
            ready_at = max(ready_at, link_end_of(rs, before, starts, ends))
        link_submit(rs, tid, ready_at, DEMAND_PRIORITY)
        posted += 1
    return posted, ready_at


@njit(cache=True)
def _routed_experts(rs, cfg, route_at, starts, ends):
    """Engine._routed_experts: the GPU work of the layer step in plan order."""
    clock = rs.clock
    posted = 0
    ready_at = route_at
    rs.computed[:] = False
    for k in range(rs.sizes[0]):
        posted, ready_at = _post_loads(rs, posted, ready_at, starts, ends)
        tid = rs.work_tid[k]
        if tid >= 0 and rs.t_state[tid] != DONE:  # in flight as of the route: wait for its bytes
            at = link_end_of(rs, tid, starts, ends)
            if at > clock[K_NOW]:
                clock[K_STALL] += at - clock[K_NOW]
                clock[K_NOW] = at
        now = clock[K_NOW]
        clock[K_NOW] = now + duration(rs, cfg, now, rs.expert_s[rs.work_precision[k], rs.work_tokens[k]])
        rs.compute_end[rs.work_e[k]] = clock[K_NOW]
        rs.computed[rs.work_e[k]] = True


@njit(cache=True)
def _release_deferred(rs):
    for k in range(rs.counts[C_DEFERRED]):
        tid = rs.deferred[k]
        if not rs.t_cached[tid] and not rs.t_on_link[tid]:
            _release(rs, tid)
    rs.counts[C_DEFERRED] = 0


@njit(cache=True)
def run(inputs, cfg, state, scratch):
    """Replay every step (Engine.gpu_stream with the closed-form CPU predictor thread, then Engine.run's drain);
    returns (result code, link busy seconds). The results are in `state`'s arrays."""
    return _replay(_pack(inputs, state, scratch), cfg)


@njit(cache=True)
def _replay(rs, cfg):
    num_layers = rs.slots.shape[0]
    num_steps = rs.step_tokens.shape[0]
    clock = rs.clock
    starts = [0.0]
    ends = [0.0]
    starts.pop()
    ends.pop()
    for layer in range(num_layers):  # the allocation's pinned experts, preloaded
        for j in range(rs.pinned_ptr[layer], rs.pinned_ptr[layer + 1]):
            expert = rs.pinned_experts[j]
            rs.free_slots[layer] -= 1
            tid = new_transfer(rs, cfg, layer, expert, cfg.preload_precision, PRELOAD_KIND)
            rs.t_state[tid] = DONE
            rs.pinned[layer, expert] = True
    if rs.counts[C_ERROR] != OK:
        return rs.counts[C_ERROR], 0.0
    predicts = cfg.prefetch != NO_PREFETCH
    eap = predicts and cfg.prediction == EAP  # (its arrays are dummies otherwise)
    for step in range(num_steps):
        rs.counts[C_STEP] = step
        if eap:
            _eap_begin_step(rs, step)
        rs.step_start_at[step] = clock[K_NOW]
        attention_s = rs.attention_s[step]
        for layer in range(num_layers):
            now = clock[K_NOW]
            clock[K_NOW] = now + duration(rs, cfg, now, attention_s)
            link_advance(rs, clock[K_NOW], starts, ends)
            if predicts:
                n = gate_input(rs, cfg, step, layer, rs.prefetches)
                start = max(clock[K_CPU_FREE], clock[K_NOW])
                done = start + cfg.predictor_latency_s
                clock[K_CPU_FREE] = done
                for k in range(n):
                    link_submit(rs, rs.prefetches[k], done, PREFETCH_PRIORITY)
            clock[K_NOW] += cfg.router_s
            link_advance(rs, clock[K_NOW], starts, ends)
            route_at = clock[K_NOW]
            on_route(rs, cfg, step, layer)
            if rs.counts[C_ERROR] != OK:
                return rs.counts[C_ERROR], 0.0
            if eap:  # (the controller observes at the end of on_route; nothing reads the predictor in between)
                _eap_observe(rs, step, layer)
            cpu_done_at = route_at
            if not cfg.cpu_on_stream:  # the CPU expert thread
                for k in range(rs.sizes[2]):
                    start = max(clock[K_CPU_EXPERT_FREE], route_at)
                    cpu_done_at = start + rs.cpu_expert_s[rs.cpu_tokens[k]]
                    clock[K_CPU_EXPERT_FREE] = cpu_done_at
            _routed_experts(rs, cfg, route_at, starts, ends)
            if cfg.cpu_on_stream:
                for k in range(rs.sizes[2]):
                    now = clock[K_NOW]
                    clock[K_NOW] = now + duration(rs, cfg, now, rs.cpu_expert_s[rs.cpu_tokens[k]])
            elif cpu_done_at > clock[K_NOW]:
                clock[K_STALL] += cpu_done_at - clock[K_NOW]
                clock[K_NOW] = cpu_done_at
            shared_s = rs.shared_s[step]
            if shared_s:
                now = clock[K_NOW]
                clock[K_NOW] = now + duration(rs, cfg, now, shared_s)
            _release_deferred(rs)
        rs.step_end_at[step] = clock[K_NOW]
    makespan = rs.step_end_at[num_steps - 1] if num_steps else 0.0
    link_advance(rs, INF, starts, ends)
    busy = 0.0
    for i in range(len(starts)):
        if starts[i] < makespan:
            busy += min(ends[i], makespan) - starts[i]
    return rs.counts[C_ERROR], busy
