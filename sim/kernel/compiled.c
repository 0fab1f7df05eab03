/* The simulator's fast kernel: the reference engine, link and controller (sim/engine.py, sim/link.py,
 * sim/policies/controller.py) over the flat arrays of sim/kernel/state.py, in C.
 *
 * Every function here mirrors one of the reference's and says which. Floating-point operations happen in
 * the reference's order and the file is compiled without fast-math or FMA contraction (setup.py), so the
 * results are bit-identical to the reference's (tests/sim/test_kernel*.py).
 *
 * The Python side (sim/kernel/__init__.py) passes the named tuples Inputs, Settings, State and Scratch of
 * sim/kernel/state.py; this module checks each field's name, dtype and contiguity against the tables below
 * (ARRAY_FIELDS, SETTING_FIELDS) before it touches anything, and exposes those tables and its constants so
 * that a test can hold them equal to state.py's.
 *
 * Times in seconds, sizes in bytes; shapes as in state.py: S steps, L layers, E experts, P pool transfers.
 */

#define PY_SSIZE_T_CLEAN
#include <Python.h>

#include <math.h>
#include <stdint.h>
#include <stdlib.h>
#include <string.h>

typedef int64_t i64;
typedef double f64;
typedef float f32;
typedef uint8_t b8; /* numpy bool: one byte, 0 or 1 */

/* --- constants (sim/kernel/state.py; CONSTANTS below lets a test compare them) -------------------------- */

enum { QUEUED = 0, STARTED = 1, DONE = 2, CANCELLED = 3 };
enum { DEMAND_KIND = 0, PREFETCH_KIND = 1, PRELOAD_KIND = 2 };
enum { DEMAND_PRIORITY = 0, PREFETCH_PRIORITY = 1 };
enum { INT4 = 2, INT2 = 3, HYBRID = 4 };
enum { LRU = 0, LFU = 1, ARC = 2, BELADY = 3, NO_REUSE = 4 };
enum { NO_PREDICTION = 0, LOOKAHEAD = 1, ORACLE = 2, EAP = 3 };
enum { NO_PREFETCH = 0, FATE = 1, TOPK = 2, ALL = 3 };
enum { WAIT = 0, CPU = 1, SPECULATED = 2, LOWBIT = 3 };
enum { T1 = 1, T2 = 2, B1 = 3, B2 = 4 };
enum {
    ST_PREFETCHES_ISSUED, ST_PREFETCHES_USED, ST_PREFETCHES_CANCELLED, ST_PREFETCH_COVERED, ST_PREFETCH_SELECTED,
    ST_EVICTIONS, ST_BYTES_ON_DEMAND, ST_BYTES_PREFETCHED, ST_BYTES_PREFETCH_USED
};
enum { OK = 0, POOL_EXHAUSTED = 1, ALL_PINNED = 2, BUDGET_EXCEEDED = 3 };
enum { ANY = 0, FIRST = 1, ONLY = 2 };
enum {
    C_FREE_TRANSFERS, C_QUEUE, C_HEAP, C_LINK_SEQ, C_QUEUE_SEQ, C_SERIAL, C_TICK, C_OCCUPIED, C_PEAK, C_STEP,
    C_DEFERRED, C_ERROR, C_EAP_STORED, C_EAP_DECODE, C_COUNTS
};
enum { K_NOW, K_STALL, K_CPU_FREE, K_CPU_EXPERT_FREE, K_CLOCKS };

#define NEVER ((i64)1 << 62)

/* --- the arrays: one table, in the order of Inputs, State and Scratch's fields ---------------------------- */

/* X(name, C type, dtype letter, writable): dtype letters: i int64, d float64, f float32, b bool. */
#define ARRAY_FIELDS(X)                                                                                   \
    /* Inputs */                                                                                          \
    X(route_ptr, i64, 'i', 0) X(route_ids, i64, 'i', 0) X(route_counts, i64, 'i', 0)                      \
    X(step_prefill, b8, 'b', 0) X(step_tokens, i64, 'i', 0) X(step_position, i64, 'i', 0)                 \
    X(attention_s, f64, 'd', 0) X(shared_s, f64, 'd', 0) X(expert_s, f64, 'd', 0)                         \
    X(cpu_expert_s, f64, 'd', 0) X(transfer_s, f64, 'd', 0) X(expert_bytes, i64, 'i', 0)                  \
    X(probs, f32, 'f', 0) X(prefill_ptr, i64, 'i', 0) X(prefill_experts, i64, 'i', 0)                     \
    X(prefill_scores, f64, 'd', 0) X(use_ptr, i64, 'i', 0) X(use_steps, i64, 'i', 0)                      \
    X(pinned_ptr, i64, 'i', 0) X(pinned_experts, i64, 'i', 0) X(slots, i64, 'i', 0)                       \
    /* State */                                                                                           \
    X(resident, i64, 'i', 1) X(pinned, b8, 'b', 1) X(res_list, i64, 'i', 1) X(res_pos, i64, 'i', 1)       \
    X(res_n, i64, 'i', 1) X(free_slots, i64, 'i', 1) X(pending, i64, 'i', 1) X(pending_n, i64, 'i', 1)    \
    X(selected, b8, 'b', 1) X(selected_list, i64, 'i', 1) X(selected_n, i64, 'i', 1)                      \
    X(tick, i64, 'i', 1) X(uses, i64, 'i', 1) X(arc_list, i64, 'i', 1) X(arc_size, i64, 'i', 1)           \
    X(arc_p, f64, 'd', 1) X(arc_adapted, i64, 'i', 1)                                                     \
    X(t_layer, i64, 'i', 1) X(t_expert, i64, 'i', 1) X(t_precision, i64, 'i', 1) X(t_kind, i64, 'i', 1)   \
    X(t_state, i64, 'i', 1) X(t_used, b8, 'b', 1) X(t_start, f64, 'd', 1) X(t_end, f64, 'd', 1)           \
    X(t_after_transfer, i64, 'i', 1) X(t_after_compute, i64, 'i', 1) X(t_serial, i64, 'i', 1)             \
    X(t_cached, b8, 'b', 1) X(t_on_link, b8, 'b', 1) X(t_promote, b8, 'b', 1) X(t_queued, b8, 'b', 1)     \
    X(t_prio, i64, 'i', 1) X(t_ready, f64, 'd', 1) X(t_qseq, i64, 'i', 1) X(free_transfers, i64, 'i', 1)  \
    X(engine_free_at, f64, 'd', 1) X(queue, i64, 'i', 1) X(heap_end, f64, 'd', 1)                         \
    X(heap_seq, i64, 'i', 1) X(heap_tid, i64, 'i', 1)                                                     \
    X(counts, i64, 'i', 1) X(clock, f64, 'd', 1) X(stats, i64, 'i', 1) X(hits_per_layer, i64, 'i', 1)     \
    X(routed_per_layer, i64, 'i', 1) X(step_start_at, f64, 'd', 1) X(step_end_at, f64, 'd', 1)            \
    X(deferred, i64, 'i', 1) X(eap_paths, b8, 'b', 1) X(eap_current, b8, 'b', 1)                          \
    X(eap_score, f64, 'd', 1) X(eap_counts, f64, 'd', 1) X(use_cursor, i64, 'i', 1)                       \
    X(use_next, i64, 'i', 1) X(use_before, i64, 'i', 1)                                                   \
    /* Scratch */                                                                                         \
    X(mark, b8, 'b', 1) X(taken, b8, 'b', 1) X(candidates, i64, 'i', 1) X(in_use, b8, 'b', 1)             \
    X(routed, b8, 'b', 1) X(nothing, b8, 'b', 1) X(fetch_e, i64, 'i', 1) X(fetch_s, f64, 'd', 1)          \
    X(fetch_p, i64, 'i', 1) X(pred_e, i64, 'i', 1) X(pred_s, f64, 'd', 1) X(spare, i64, 'i', 1)           \
    X(misses, i64, 'i', 1) X(miss_tokens, i64, 'i', 1) X(precision_of, i64, 'i', 1) X(work_e, i64, 'i', 1) \
    X(work_tokens, i64, 'i', 1) X(work_precision, i64, 'i', 1) X(work_tid, i64, 'i', 1)                   \
    X(loads, i64, 'i', 1) X(cpu_e, i64, 'i', 1) X(cpu_tokens, i64, 'i', 1) X(sizes, i64, 'i', 1)          \
    X(compute_end, f64, 'd', 1) X(computed, b8, 'b', 1) X(prefetches, i64, 'i', 1) X(order, i64, 'i', 1)

/* The fields of Settings, in order: X(name, C type, Python conversion). */
#define SETTING_FIELDS(X)                                                                                 \
    X(eviction, i64, INT) X(prediction, i64, INT) X(prefetch, i64, INT) X(precision, i64, INT)            \
    X(miss, i64, INT) X(miss_precision, i64, INT) X(preload_precision, i64, INT) X(int2_rate, f64, FLOAT) \
    X(confidence, f64, FLOAT) X(prefetch_count, i64, INT) X(fate_count, i64, INT)                         \
    X(lookahead_limit, i64, INT) X(prefill_depth, i64, INT) X(depth, i64, INT) X(top_k, i64, INT)         \
    X(cancel_stale, i64, INT) X(serial_loads, i64, INT) X(copy_engines, i64, INT)                         \
    X(predictor_latency_s, f64, FLOAT) X(router_s, f64, FLOAT) X(copy_contention, f64, FLOAT)             \
    X(cpu_on_stream, i64, INT) X(max_slots, i64, INT)

#define DECLARE_ARRAY(name, ctype, letter, writable) ctype *name;
#define DECLARE_SETTING(name, ctype, conv) ctype name;

typedef struct {
    ARRAY_FIELDS(DECLARE_ARRAY)
    /* dimensions read off the arrays */
    i64 L;            /* MoE layers: len(slots) */
    i64 E;            /* experts: len(routed) */
    i64 S;            /* steps: len(step_tokens) */
    i64 engines;      /* copy engines: len(engine_free_at) */
    i64 expert_cols;  /* expert_s.shape[1]: most tokens + 1 */
    i64 probs_d, probs_t, probs_l, probs_e; /* probs' shape */
    i64 eap_n;        /* eap_paths.shape[0]: stored paths kept */
    /* what the reference keeps in Python lists: link start and end times, in start order */
    f64 *starts, *ends;
    i64 n_started, room_started;
    int out_of_memory;
    i64 *order_buf; /* assign_precisions' order, [E] */
} Replay;

typedef struct {
    SETTING_FIELDS(DECLARE_SETTING)
} Settings;

#define AT2(array, row, cols, col) ((array)[(row) * (cols) + (col)])

/* --- the link (sim/link.py, sim/policies/transfer_queue.py) ----------------------------------------------- */

/* Whether queued transfer a starts before b: (priority, ready time, submission order). */
static inline int before(const Replay *r, i64 a, i64 b) {
    if (r->t_prio[a] != r->t_prio[b]) return r->t_prio[a] < r->t_prio[b];
    if (r->t_ready[a] != r->t_ready[b]) return r->t_ready[a] < r->t_ready[b];
    return r->t_qseq[a] < r->t_qseq[b];
}

static int queue_remove(Replay *r, i64 tid) {
    i64 n = r->counts[C_QUEUE];
    i64 *q = r->queue;
    for (i64 i = 0; i < n; i++) {
        if (q[i] == tid) {
            for (i64 j = i; j < n - 1; j++) q[j] = q[j + 1];
            r->counts[C_QUEUE] = n - 1;
            r->t_queued[tid] = 0;
            return 1;
        }
    }
    return 0;
}

/* Link.submit / TransferQueue.submit. */
static void link_submit(Replay *r, i64 tid, f64 ready_at, i64 priority) {
    if (r->t_state[tid] == CANCELLED) return;
    if (r->t_promote[tid]) {
        r->t_promote[tid] = 0;
        priority = DEMAND_PRIORITY;
    }
    r->counts[C_QUEUE_SEQ] += 1;
    r->t_prio[tid] = priority;
    r->t_ready[tid] = ready_at;
    r->t_qseq[tid] = r->counts[C_QUEUE_SEQ];
    r->queue[r->counts[C_QUEUE]] = tid;
    r->counts[C_QUEUE] += 1;
    r->t_queued[tid] = 1;
    r->t_on_link[tid] = 1;
}

/* Link.cancel: drop a queued transfer. */
static void link_cancel(Replay *r, i64 tid) {
    r->t_promote[tid] = 0;
    if (r->t_queued[tid]) {
        queue_remove(r, tid);
        r->t_on_link[tid] = 0;
    }
}

/* Link.promote: on-demand priority for a queued (or not yet submitted) transfer. */
static void link_promote(Replay *r, i64 tid) {
    if (r->t_queued[tid])
        r->t_prio[tid] = DEMAND_PRIORITY;
    else
        r->t_promote[tid] = 1;
}

static void heap_push(Replay *r, f64 end, i64 seq, i64 tid) {
    i64 i = r->counts[C_HEAP];
    r->counts[C_HEAP] = i + 1;
    while (i > 0) {
        i64 parent = (i - 1) / 2;
        if (r->heap_end[parent] < end || (r->heap_end[parent] == end && r->heap_seq[parent] < seq)) break;
        r->heap_end[i] = r->heap_end[parent];
        r->heap_seq[i] = r->heap_seq[parent];
        r->heap_tid[i] = r->heap_tid[parent];
        i = parent;
    }
    r->heap_end[i] = end;
    r->heap_seq[i] = seq;
    r->heap_tid[i] = tid;
}

static i64 heap_pop(Replay *r) {
    i64 top = r->heap_tid[0];
    i64 n = r->counts[C_HEAP] - 1;
    r->counts[C_HEAP] = n;
    if (n > 0) {
        f64 end = r->heap_end[n];
        i64 seq = r->heap_seq[n], tid = r->heap_tid[n];
        i64 i = 0;
        for (;;) {
            i64 child = 2 * i + 1;
            if (child >= n) break;
            i64 right = child + 1;
            if (right < n && (r->heap_end[right] < r->heap_end[child] ||
                              (r->heap_end[right] == r->heap_end[child] && r->heap_seq[right] < r->heap_seq[child])))
                child = right;
            if (end < r->heap_end[child] || (end == r->heap_end[child] && seq < r->heap_seq[child])) break;
            r->heap_end[i] = r->heap_end[child];
            r->heap_seq[i] = r->heap_seq[child];
            r->heap_tid[i] = r->heap_tid[child];
            i = child;
        }
        r->heap_end[i] = end;
        r->heap_seq[i] = seq;
        r->heap_tid[i] = tid;
    }
    return top;
}

static void record_start(Replay *r, f64 start, f64 end) {
    if (r->n_started == r->room_started) {
        i64 room = r->room_started ? 2 * r->room_started : 1024;
        f64 *starts = realloc(r->starts, (size_t)room * sizeof(f64));
        if (starts) r->starts = starts;
        f64 *ends = starts ? realloc(r->ends, (size_t)room * sizeof(f64)) : NULL;
        if (ends) r->ends = ends;
        if (!starts || !ends) {
            r->out_of_memory = 1;
            return;
        }
        r->room_started = room;
    }
    r->starts[r->n_started] = start;
    r->ends[r->n_started] = end;
    r->n_started += 1;
}

static void transfer_done(Replay *r, i64 tid);

/* Link._start_next: start the next transfer if it starts before `until`; whether one started. */
static int start_next(Replay *r, f64 until) {
    i64 n = r->counts[C_QUEUE];
    if (n == 0) return 0;
    f64 *free_at = r->engine_free_at;
    i64 engine = 0;
    f64 f = free_at[0];
    for (i64 e = 1; e < r->engines; e++) {
        if (free_at[e] < f) {
            f = free_at[e];
            engine = e;
        }
    }
    /* TransferQueue.next_start(f): the best ready by f, else the best of the earliest ready */
    i64 best = -1;
    f64 earliest = INFINITY;
    int have_earliest = 0;
    for (i64 i = 0; i < n; i++) {
        i64 tid = r->queue[i];
        f64 ready = r->t_ready[tid];
        if (ready <= f) {
            if (best < 0 || before(r, tid, best)) best = tid;
        } else if (!have_earliest || ready < earliest) {
            earliest = ready;
            have_earliest = 1;
        }
    }
    if (best < 0) {
        for (i64 i = 0; i < n; i++) {
            i64 tid = r->queue[i];
            if (r->t_ready[tid] <= earliest && (best < 0 || before(r, tid, best))) best = tid;
        }
    }
    f64 start = r->t_ready[best] > f ? r->t_ready[best] : f;
    if (start >= until) return 0;
    queue_remove(r, best);
    r->counts[C_LINK_SEQ] += 1;
    f64 end = start + r->transfer_s[r->t_precision[best]];
    free_at[engine] = end;
    r->t_start[best] = start;
    r->t_end[best] = end;
    record_start(r, start, end);
    if (r->t_state[best] == QUEUED) r->t_state[best] = STARTED; /* controller.on_transfer_started */
    heap_push(r, end, r->counts[C_LINK_SEQ], best);
    return 1;
}

/* Link.advance: start what starts before `until`, report what landed by it. */
static void link_advance(Replay *r, f64 until) {
    while (r->counts[C_QUEUE] > 0 && start_next(r, until)) {
    }
    while (r->counts[C_HEAP] > 0 && r->heap_end[0] <= until) transfer_done(r, heap_pop(r));
}

/* Link.end_of: when `tid` lands, starting queued transfers in order until it has started. */
static f64 link_end_of(Replay *r, i64 tid) {
    while (r->t_start[tid] < 0.0) {
        if (!start_next(r, INFINITY)) return -1.0; /* never submitted: cannot happen in a consistent replay */
    }
    return r->t_end[tid];
}

/* Link.busy_until. */
static f64 link_busy_until(const Replay *r, f64 now) {
    f64 work = 0.0;
    for (i64 e = 0; e < r->engines; e++)
        if (r->engine_free_at[e] > now) work += r->engine_free_at[e] - now;
    for (i64 i = 0; i < r->counts[C_QUEUE]; i++) {
        i64 tid = r->queue[i];
        if (r->t_ready[tid] <= now) work += r->transfer_s[r->t_precision[tid]];
    }
    return now + work / (f64)r->engines;
}

/* The transfer index is free for reuse (nothing refers to it any more). */
static void release(Replay *r, i64 tid) {
    r->free_transfers[r->counts[C_FREE_TRANSFERS]] = tid;
    r->counts[C_FREE_TRANSFERS] += 1;
}

/* OffloadController.on_transfer_done (and the transfer leaves the link). */
static void transfer_done(Replay *r, i64 tid) {
    r->t_state[tid] = DONE;
    r->t_on_link[tid] = 0;
    i64 nbytes = r->expert_bytes[r->t_precision[tid]];
    if (r->t_kind[tid] == DEMAND_KIND) {
        r->stats[ST_BYTES_ON_DEMAND] += nbytes;
    } else {
        r->stats[ST_BYTES_PREFETCHED] += nbytes;
        if (r->t_used[tid]) r->stats[ST_BYTES_PREFETCH_USED] += nbytes;
    }
    if (!r->t_cached[tid]) release(r, tid);
}

/* --- eviction policies (sim/policies/eviction.py) ---------------------------------------------------------- */

static inline i64 next_tick(Replay *r) { return ++r->counts[C_TICK]; }

/* The least recently listed expert of ARC list `lst` in `layer`. */
static i64 arc_oldest(const Replay *r, i64 layer, i64 lst) {
    i64 best = -1;
    for (i64 e = 0; e < r->E; e++)
        if (AT2(r->arc_list, layer, r->E, e) == lst &&
            (best < 0 || AT2(r->tick, layer, r->E, e) < AT2(r->tick, layer, r->E, best)))
            best = e;
    return best;
}

static void arc_move(Replay *r, i64 layer, i64 expert, i64 lst) {
    i64 old = AT2(r->arc_list, layer, r->E, expert);
    if (old) AT2(r->arc_size, layer, 5, old) -= 1;
    AT2(r->arc_list, layer, r->E, expert) = lst;
    if (lst) {
        AT2(r->arc_size, layer, 5, lst) += 1;
        AT2(r->tick, layer, r->E, expert) = next_tick(r);
    }
}

/* ARC._trim_ghosts. */
static void arc_trim(Replay *r, i64 layer) {
    i64 c = r->slots[layer] > 1 ? r->slots[layer] : 1;
    i64 *size = r->arc_size + layer * 5;
    while (size[B1] > 0 && size[T1] + size[B1] > c) arc_move(r, layer, arc_oldest(r, layer, B1), 0);
    while (size[B2] > 0 && size[T1] + size[T2] + size[B1] + size[B2] > 2 * c)
        arc_move(r, layer, arc_oldest(r, layer, B2), 0);
}

/* ARC._adapt. Python's min(a, b) is b only if b < a, max(a, b) b only if b > a: kept so. */
static void arc_adapt(Replay *r, i64 layer, i64 incoming) {
    if (incoming < 0 || incoming == r->arc_adapted[layer]) return;
    r->arc_adapted[layer] = incoming;
    f64 c = (f64)(r->slots[layer] > 1 ? r->slots[layer] : 1);
    i64 n1 = AT2(r->arc_size, layer, 5, B1), n2 = AT2(r->arc_size, layer, 5, B2);
    i64 lst = AT2(r->arc_list, layer, r->E, incoming);
    if (lst == B1) {
        f64 ratio = (f64)n2 / (f64)n1;
        f64 p = r->arc_p[layer] + (1.0 > ratio ? 1.0 : ratio);
        r->arc_p[layer] = p < c ? p : c;
    } else if (lst == B2) {
        f64 ratio = (f64)n1 / (f64)n2;
        f64 p = r->arc_p[layer] - (1.0 > ratio ? 1.0 : ratio);
        r->arc_p[layer] = p > 0.0 ? p : 0.0;
    }
}

/* EvictionPolicy.on_insert. */
static void policy_insert(Replay *r, const Settings *cfg, i64 layer, i64 expert) {
    if (cfg->eviction == LRU) {
        AT2(r->tick, layer, r->E, expert) = next_tick(r);
    } else if (cfg->eviction == LFU) {
        AT2(r->tick, layer, r->E, expert) = next_tick(r);
        AT2(r->uses, layer, r->E, expert) = 1;
    } else if (cfg->eviction == ARC) {
        arc_adapt(r, layer, expert);
        r->arc_adapted[layer] = -1;
        i64 lst = AT2(r->arc_list, layer, r->E, expert);
        arc_move(r, layer, expert, (lst == B1 || lst == B2) ? T2 : T1);
        arc_trim(r, layer);
    }
}

/* EvictionPolicy.on_access. */
static void policy_access(Replay *r, const Settings *cfg, i64 layer, i64 expert) {
    if (cfg->eviction == LRU) {
        AT2(r->tick, layer, r->E, expert) = next_tick(r);
    } else if (cfg->eviction == LFU) {
        AT2(r->tick, layer, r->E, expert) = next_tick(r);
        AT2(r->uses, layer, r->E, expert) += 1;
    } else if (cfg->eviction == ARC) {
        arc_move(r, layer, expert, T2);
    }
}

/* EvictionPolicy.on_remove. */
static void policy_remove(Replay *r, const Settings *cfg, i64 layer, i64 expert) {
    if (cfg->eviction == ARC) {
        i64 lst = AT2(r->arc_list, layer, r->E, expert);
        if (lst == T1)
            arc_move(r, layer, expert, B1);
        else if (lst == T2)
            arc_move(r, layer, expert, B2);
        arc_trim(r, layer);
    }
}

/* FutureAccess.next_use: the first step >= `step` that routes the expert. The replay asks with steps that
 * never decrease for one expert, so a cursor per expert walks its uses forward once, and use_next (the use
 * at the cursor) answers most questions without reading use_steps. A step earlier than the use before the
 * cursor searches (numpy's searchsorted, side left), leaving the cursor where it is: a replay never asks so
 * (victims are asked for the step of a prefetch or the next one, and a layer's prefetches come before its
 * loads), but next_use stays right for any order of questions. */
static i64 next_use(Replay *r, i64 layer, i64 expert, i64 step) {
    i64 k = layer * r->E + expert;
    if (r->use_before[k] >= step) { /* asked for an earlier step than before */
        const i64 *uses = r->use_steps;
        i64 a = r->use_ptr[k], b = r->use_ptr[k + 1], hi = b;
        while (a < b) {
            i64 mid = a + (b - a) / 2;
            if (uses[mid] < step)
                a = mid + 1;
            else
                b = mid;
        }
        return a < hi ? uses[a] : NEVER;
    }
    if (r->use_next[k] >= step) return r->use_next[k];
    const i64 *uses = r->use_steps;
    i64 lo = r->use_ptr[k], hi = r->use_ptr[k + 1], i = r->use_cursor[k];
    while (i < hi && uses[i] < step) i++;
    r->use_cursor[k] = i;
    r->use_before[k] = i > lo ? uses[i - 1] : -1;
    r->use_next[k] = i < hi ? uses[i] : NEVER;
    return r->use_next[k];
}

/* EvictionPolicy.victim among candidates[:n] (n > 0): the candidate with the smallest key (k1, k2). */
static i64 policy_victim(Replay *r, const Settings *cfg, i64 layer, const i64 *candidates, i64 n, i64 incoming,
                         i64 from_step) {
    i64 eviction = cfg->eviction;
    const i64 *tick = r->tick + layer * r->E, *uses = r->uses + layer * r->E, *arc_list = r->arc_list + layer * r->E;
    i64 first_list = T1;
    if (eviction == ARC) {
        arc_adapt(r, layer, incoming);
        i64 n1 = AT2(r->arc_size, layer, 5, T1);
        f64 p = r->arc_p[layer];
        if (!(n1 && ((f64)n1 > p || ((f64)n1 == p && arc_list[incoming] == B2)))) first_list = T2;
    }
    i64 best = -1, best1 = 0, best2 = 0;
    for (i64 i = 0; i < n; i++) {
        i64 e = candidates[i], k1, k2;
        if (eviction == LRU) { /* least recently used */
            k1 = tick[e];
            k2 = 0;
        } else if (eviction == LFU) { /* least used since insertion, then least recently */
            k1 = uses[e];
            k2 = tick[e];
        } else if (eviction == ARC) { /* REPLACE's list first, least recently listed first */
            k1 = arc_list[e] == first_list ? 0 : 1;
            k2 = tick[e];
        } else if (eviction == BELADY) { /* farthest next use; ties: the lowest id */
            k1 = -next_use(r, layer, e, from_step);
            k2 = e;
        } else { /* no reuse: the lowest id */
            k1 = e;
            k2 = 0;
        }
        if (best < 0 || k1 < best1 || (k1 == best1 && k2 < best2)) {
            best = e;
            best1 = k1;
            best2 = k2;
        }
    }
    return best;
}

/* --- the controller (sim/policies/controller.py) ------------------------------------------------------------ */

static void fail(Replay *r, i64 code) {
    if (r->counts[C_ERROR] == OK) r->counts[C_ERROR] = code;
}

/* OffloadController._insert: a transfer of `expert` into a slot already taken, cached at once. */
static i64 new_transfer(Replay *r, const Settings *cfg, i64 layer, i64 expert, i64 precision, i64 kind) {
    i64 n = r->counts[C_FREE_TRANSFERS];
    if (n == 0) {
        fail(r, POOL_EXHAUSTED);
        return 0;
    }
    i64 tid = r->free_transfers[n - 1];
    r->counts[C_FREE_TRANSFERS] = n - 1;
    r->t_layer[tid] = layer;
    r->t_expert[tid] = expert;
    r->t_precision[tid] = precision;
    r->t_kind[tid] = kind;
    r->t_state[tid] = QUEUED;
    r->t_used[tid] = 0;
    r->t_start[tid] = -1.0;
    r->t_end[tid] = -1.0;
    r->t_after_transfer[tid] = -1;
    r->t_after_compute[tid] = -1;
    r->counts[C_SERIAL] += 1;
    r->t_serial[tid] = r->counts[C_SERIAL];
    r->t_cached[tid] = 1;
    r->t_on_link[tid] = 0;
    r->t_promote[tid] = 0;
    r->t_queued[tid] = 0;
    AT2(r->resident, layer, r->E, expert) = tid;
    AT2(r->res_pos, layer, r->E, expert) = r->res_n[layer];
    AT2(r->res_list, layer, r->E, r->res_n[layer]) = expert;
    r->res_n[layer] += 1;
    policy_insert(r, cfg, layer, expert);
    r->counts[C_OCCUPIED] += 1;
    if (r->counts[C_OCCUPIED] > r->counts[C_PEAK]) r->counts[C_PEAK] = r->counts[C_OCCUPIED];
    if (r->counts[C_OCCUPIED] > cfg->max_slots) fail(r, BUDGET_EXCEEDED);
    return tid;
}

/* OffloadController._evict; the transfer index is released once the layer step ends (and it left the link). */
static i64 evict(Replay *r, const Settings *cfg, i64 layer, i64 expert) {
    i64 E = r->E;
    i64 tid = AT2(r->resident, layer, E, expert);
    AT2(r->resident, layer, E, expert) = -1;
    i64 last = AT2(r->res_list, layer, E, r->res_n[layer] - 1); /* the last listed takes its place */
    AT2(r->res_list, layer, E, AT2(r->res_pos, layer, E, expert)) = last;
    AT2(r->res_pos, layer, E, last) = AT2(r->res_pos, layer, E, expert);
    r->res_n[layer] -= 1;
    if (AT2(r->pending, layer, E, expert) == tid) {
        AT2(r->pending, layer, E, expert) = -1;
        r->pending_n[layer] -= 1;
    }
    policy_remove(r, cfg, layer, expert);
    r->free_slots[layer] += 1;
    r->counts[C_OCCUPIED] -= 1;
    r->t_cached[tid] = 0;
    r->deferred[r->counts[C_DEFERRED]] = tid;
    r->counts[C_DEFERRED] += 1;
    return tid;
}

/* OffloadController._victim: the policy's choice among experts not pinned and not in `exclude`; -1 if none. */
static i64 victim(Replay *r, const Settings *cfg, i64 layer, const b8 *exclude, i64 incoming, int landed,
                  i64 from_step) {
    i64 E = r->E, n = 0, n_done = 0;
    i64 *candidates = r->candidates;
    const i64 *res_list = r->res_list + layer * E, *resident = r->resident + layer * E;
    const b8 *pinned = r->pinned + layer * E;
    for (i64 i = 0; i < r->res_n[layer]; i++) {
        i64 e = res_list[i];
        if (exclude[e] || pinned[e]) continue;
        if (landed != ANY && r->t_state[resident[e]] == DONE) { /* landed ones to the front */
            candidates[n] = candidates[n_done];
            candidates[n_done] = e;
            n_done += 1;
        } else {
            candidates[n] = e;
        }
        n += 1;
    }
    if (landed == ONLY || (landed == FIRST && n_done > 0)) n = n_done;
    if (n == 0) return -1;
    return policy_victim(r, cfg, layer, candidates, n, incoming, from_step);
}

/* PrecisionPolicy.assign for the first n experts (counts: tokens, or predicted tokens). */
static void assign_precisions(Replay *r, const Settings *cfg, int prefill, const i64 *experts, const f64 *counts,
                              i64 n, i64 *out) {
    if (cfg->precision != HYBRID) {
        for (i64 i = 0; i < n; i++) out[i] = cfg->precision;
        return;
    }
    for (i64 i = 0; i < n; i++) out[i] = INT4;
    if (!prefill || cfg->int2_rate <= 0.0) return;
    f64 total = 0.0;
    for (i64 i = 0; i < n; i++) total += counts[i];
    i64 *order = r->order_buf; /* least popular first; ties: the higher expert id first */
    for (i64 i = 0; i < n; i++) {
        i64 j = i;
        while (j > 0 && (counts[order[j - 1]] > counts[i] ||
                         (counts[order[j - 1]] == counts[i] && experts[order[j - 1]] < experts[i]))) {
            order[j] = order[j - 1];
            j -= 1;
        }
        order[j] = i;
    }
    f64 mass = 0.0;
    for (i64 k = 0; k < n; k++) {
        i64 i = order[k];
        if (mass + counts[i] > cfg->int2_rate * total) break;
        mass += counts[i];
        out[i] = INT2;
    }
}

/* PrefetchPolicy.select_layer: how many of the first n predicted experts to prefetch (kept in place). */
static i64 select_layer(const Settings *cfg, int prefill, i64 *experts, f64 *scores, i64 n) {
    if (cfg->prefetch == FATE && !prefill) {
        if (cfg->confidence > 0.0) {
            i64 kept = 0;
            for (i64 i = 0; i < n; i++) {
                if (scores[i] >= cfg->confidence && kept < cfg->fate_count) {
                    experts[kept] = experts[i];
                    scores[kept] = scores[i];
                    kept += 1;
                }
            }
            return kept;
        }
        return n < cfg->fate_count ? n : cfg->fate_count;
    }
    if (cfg->prefetch == TOPK) return n < cfg->prefetch_count ? n : cfg->prefetch_count;
    return n;
}

/* OffloadController._prefetch: the picks for layer `target` not resident, best first, while a slot can be
 * had; returns the prefetches issued so far (appended to `out`). */
static i64 prefetch(Replay *r, const Settings *cfg, i64 step, i64 target, const i64 *experts, const f64 *scores,
                    i64 n, i64 *out, i64 n_out) {
    i64 E = r->E;
    b8 *picks = r->mark;
    memset(picks, 0, (size_t)E);
    i64 m = 0;
    for (i64 i = 0; i < n; i++) {
        picks[experts[i]] = 1;
        if (AT2(r->resident, target, E, experts[i]) < 0) {
            r->fetch_e[m] = experts[i];
            r->fetch_s[m] = scores[i];
            m += 1;
        }
    }
    assign_precisions(r, cfg, r->step_prefill[step], r->fetch_e, r->fetch_s, m, r->fetch_p);
    for (i64 i = 0; i < m; i++) {
        i64 expert = r->fetch_e[i];
        if (r->free_slots[target] == 0) {
            i64 v = victim(r, cfg, target, picks, expert, ONLY, step);
            if (v < 0) break;
            evict(r, cfg, target, v);
            r->stats[ST_EVICTIONS] += 1;
        }
        r->free_slots[target] -= 1;
        i64 tid = new_transfer(r, cfg, target, expert, r->fetch_p[i], PREFETCH_KIND);
        if (r->counts[C_ERROR] == POOL_EXHAUSTED) return n_out; /* the replay stops: no transfer to record */
        AT2(r->pending, target, E, expert) = tid;
        r->pending_n[target] += 1;
        out[n_out] = tid;
        n_out += 1;
    }
    return n_out;
}

/* prediction._rank of one probability row of `num_experts`: the experts with p > 0, highest first (ties:
 * lower id), at most `limit`. One for float32 rows (look-ahead probabilities), one for float64 (eap counts). */
#define RANK_ROW(name, type)                                                                                  \
    static i64 name(const type *row, i64 num_experts, i64 limit, i64 *experts, f64 *scores, b8 *taken) {      \
        i64 n = 0;                                                                                            \
        if (num_experts <= 0) return 0;                                                                       \
        memset(taken, 0, (size_t)num_experts);                                                                \
        i64 rounds = limit < num_experts ? limit : num_experts;                                               \
        for (i64 round = 0; round < rounds; round++) {                                                        \
            i64 best = -1;                                                                                    \
            for (i64 e = 0; e < num_experts; e++) {                                                           \
                type p = row[e];                                                                              \
                if (p > 0 && !taken[e] && (best < 0 || p > row[best])) best = e;                              \
            }                                                                                                 \
            if (best < 0) break;                                                                              \
            taken[best] = 1;                                                                                  \
            experts[n] = best;                                                                                \
            scores[n] = (f64)row[best];                                                                       \
            n += 1;                                                                                           \
        }                                                                                                     \
        return n;                                                                                             \
    }
RANK_ROW(rank_row_f32, f32)
RANK_ROW(rank_row_f64, f64)

static i64 select_and_prefetch(Replay *r, const Settings *cfg, i64 step, i64 target, i64 *experts, f64 *scores,
                               i64 n, i64 *out, i64 n_out) {
    i64 kept = select_layer(cfg, r->step_prefill[step], experts, scores, n);
    if (kept == 0) return n_out;
    for (i64 i = 0; i < kept; i++) {
        i64 e = experts[i];
        if (!AT2(r->selected, target, r->E, e)) {
            AT2(r->selected, target, r->E, e) = 1;
            AT2(r->selected_list, target, r->E, r->selected_n[target]) = e;
            r->selected_n[target] += 1;
        }
    }
    return prefetch(r, cfg, step, target, experts, scores, kept, out, n_out);
}

/* EapPredictor.begin_step: store the path of the decode step that ended, start an empty one. */
static void eap_begin_step(Replay *r, i64 step) {
    size_t path = (size_t)(r->L * r->E);
    if (r->counts[C_EAP_DECODE] == 1) {
        i64 stored = r->counts[C_EAP_STORED];
        int any = 0;
        for (size_t i = 0; i < path && !any; i++) any = r->eap_current[i];
        if (any) {
            memcpy(r->eap_paths + (size_t)(stored % r->eap_n) * path, r->eap_current, path);
            r->counts[C_EAP_STORED] = stored + 1;
        }
    }
    memset(r->eap_current, 0, path);
    for (i64 h = 0; h < r->eap_n; h++) r->eap_score[h] = 0.0;
    r->counts[C_EAP_DECODE] = r->step_prefill[step] ? 0 : 1;
}

/* EapPredictor.observe: the layer's routed experts join the path; in decode, each stored path scores the
 * experts it shares with them. */
static void eap_observe(Replay *r, i64 step, i64 layer) {
    i64 row = step * r->L + layer;
    i64 lo = r->route_ptr[row], hi = r->route_ptr[row + 1];
    for (i64 j = lo; j < hi; j++) AT2(r->eap_current, layer, r->E, r->route_ids[j]) = 1;
    if (r->counts[C_EAP_DECODE] == 1 && r->counts[C_EAP_STORED] > 0) {
        i64 stored = r->counts[C_EAP_STORED];
        i64 kept = stored < r->eap_n ? stored : r->eap_n; /* the rest are empty: they add 0 */
        for (i64 h = 0; h < kept; h++) {
            i64 shared = 0;
            const b8 *path = r->eap_paths + (h * r->L + layer) * r->E;
            for (i64 j = lo; j < hi; j++)
                if (path[r->route_ids[j]]) shared += 1;
            r->eap_score[h] += (f64)shared;
        }
    }
}

/* EapPredictor.predict and the prefetches of its predictions; how many were issued. */
static i64 eap_predict(Replay *r, const Settings *cfg, i64 step, i64 layer, i64 *out) {
    i64 L = r->L, E = r->E, history = r->eap_n;
    i64 stored = r->counts[C_EAP_STORED];
    i64 n = stored < history ? stored : history;
    i64 n_out = 0;
    if (n == 0) return 0;
    if (r->step_prefill[step]) { /* by how many stored paths route each expert (ties: lower id) */
        for (i64 d = 0; d < cfg->depth; d++) {
            i64 target = layer + d + 1;
            if (target >= L) break;
            f64 *counts = r->eap_counts;
            for (i64 e = 0; e < E; e++) {
                i64 c = 0;
                for (i64 h = 0; h < n; h++)
                    if (r->eap_paths[(h * L + target) * E + e]) c += 1;
                counts[e] = (f64)c;
            }
            i64 m = rank_row_f64(counts, E, E, r->pred_e, r->pred_s, r->taken);
            n_out = select_and_prefetch(r, cfg, step, target, r->pred_e, r->pred_s, m, out, n_out);
        }
        return n_out;
    }
    i64 best = -1; /* the most similar stored path; ties go to the most recent one */
    f64 best_score = 0.0;
    for (i64 i = 0; i < n; i++) {
        i64 h = (stored - 1 - i) % history;
        if (best < 0 || r->eap_score[h] > best_score) {
            best = h;
            best_score = r->eap_score[h];
        }
    }
    for (i64 d = 0; d < cfg->depth; d++) {
        i64 target = layer + d + 1;
        if (target >= L) break;
        i64 m = 0;
        for (i64 e = 0; e < E; e++) { /* its experts in that layer, by id, each with confidence 1 */
            if (r->eap_paths[(best * L + target) * E + e]) {
                r->pred_e[m] = e;
                r->pred_s[m] = 1.0;
                m += 1;
            }
        }
        n_out = select_and_prefetch(r, cfg, step, target, r->pred_e, r->pred_s, m, out, n_out);
    }
    return n_out;
}

/* OffloadController.on_gate_input: the prefetches for the layers ahead (into `out`); how many. */
static i64 gate_input(Replay *r, const Settings *cfg, i64 step, i64 layer, i64 *out) {
    if (cfg->prefetch == NO_PREFETCH) return 0;
    i64 L = r->L;
    i64 n_out = 0;
    if (cfg->prediction == LOOKAHEAD) {
        i64 depth = cfg->depth < r->probs_d ? cfg->depth : r->probs_d;
        for (i64 d = 0; d < depth; d++) {
            i64 target = layer + d + 1;
            if (target >= L) break;
            i64 n;
            if (r->step_tokens[step] == 1) { /* by probability */
                const f32 *row = r->probs + ((d * r->probs_t + r->step_position[step]) * r->probs_l + layer) * r->probs_e;
                n = rank_row_f32(row, r->probs_e, cfg->lookahead_limit, r->pred_e, r->pred_s, r->taken);
            } else { /* by predicted popularity, ranked in advance */
                i64 row = (step * L + layer) * cfg->prefill_depth + d;
                i64 lo = r->prefill_ptr[row], hi = r->prefill_ptr[row + 1];
                n = hi - lo;
                for (i64 i = 0; i < n; i++) {
                    r->pred_e[i] = r->prefill_experts[lo + i];
                    r->pred_s[i] = r->prefill_scores[lo + i];
                }
            }
            n_out = select_and_prefetch(r, cfg, step, target, r->pred_e, r->pred_s, n, out, n_out);
        }
    } else if (cfg->prediction == EAP) {
        n_out = eap_predict(r, cfg, step, layer, out);
    } else if (cfg->prediction == ORACLE) { /* the routes to come, most tokens first (ties: lower id) */
        for (i64 d = 0; d < cfg->depth; d++) {
            i64 target = layer + d + 1;
            if (target >= L) break;
            i64 row = step * L + target;
            i64 lo = r->route_ptr[row], hi = r->route_ptr[row + 1];
            i64 n = 0;
            for (i64 j = lo; j < hi; j++) {
                i64 k = n;
                while (k > 0 && r->route_counts[r->pred_e[k - 1]] < r->route_counts[j]) {
                    r->pred_e[k] = r->pred_e[k - 1];
                    k -= 1;
                }
                r->pred_e[k] = j;
                n += 1;
            }
            for (i64 k = 0; k < n; k++) {
                i64 j = r->pred_e[k];
                r->pred_s[k] = (f64)r->route_counts[j];
                r->pred_e[k] = r->route_ids[j];
            }
            n_out = select_and_prefetch(r, cfg, step, target, r->pred_e, r->pred_s, n, out, n_out);
        }
    }
    r->stats[ST_PREFETCHES_ISSUED] += n_out;
    return n_out;
}

static void work(Replay *r, i64 expert, i64 tokens, i64 precision, i64 tid) {
    i64 n = r->sizes[0];
    r->work_e[n] = expert;
    r->work_tokens[n] = tokens;
    r->work_precision[n] = precision;
    r->work_tid[n] = tid;
    r->sizes[0] = n + 1;
}

/* OffloadController._load: an on-demand load into a free slot or a victim's (see there). */
static i64 load(Replay *r, const Settings *cfg, i64 step, i64 layer, i64 expert, i64 precision, int whole_step_min) {
    i64 E = r->E;
    i64 reused = -1, old = -1;
    if (r->free_slots[layer] == 0) {
        i64 v;
        if (whole_step_min)
            v = victim(r, cfg, layer, r->nothing, expert, ANY, step + 1);
        else
            v = victim(r, cfg, layer, r->in_use, expert, FIRST, step + 1);
        if (v < 0) { /* every slot holds an expert of this step: the one computed earliest */
            for (i64 k = 0; k < r->sizes[0]; k++) {
                i64 e = r->work_e[k];
                if (AT2(r->resident, layer, E, e) >= 0 && !AT2(r->pinned, layer, E, e)) {
                    v = e;
                    break;
                }
            }
            if (v < 0) {
                fail(r, ALL_PINNED);
                return 0;
            }
        }
        for (i64 k = 0; k < r->sizes[0]; k++) {
            if (r->work_e[k] == v) {
                reused = v;
                break;
            }
        }
        old = evict(r, cfg, layer, v);
        r->stats[ST_EVICTIONS] += 1;
    }
    r->free_slots[layer] -= 1;
    i64 tid = new_transfer(r, cfg, layer, expert, precision, DEMAND_KIND);
    if (reused >= 0) {
        r->t_after_compute[tid] = reused;
    } else if (old >= 0 && r->t_state[old] == QUEUED) {
        r->t_state[old] = CANCELLED;
        link_cancel(r, old);
        r->stats[ST_PREFETCHES_CANCELLED] += 1;
    } else if (old >= 0 && r->t_state[old] == STARTED) {
        r->t_after_transfer[tid] = old;
    }
    return tid;
}

/* OffloadController.on_route: the plan of the layer step into the scratch lists (work, loads, CPU work); the
 * link's cancellations and promotions done at once. */
static void on_route(Replay *r, const Settings *cfg, i64 step, i64 layer) {
    i64 E = r->E;
    i64 row = step * r->L + layer;
    i64 lo = r->route_ptr[row], hi = r->route_ptr[row + 1];
    i64 m = hi - lo;
    b8 *routed = r->routed;
    memset(routed, 0, (size_t)E);
    for (i64 j = lo; j < hi; j++) routed[r->route_ids[j]] = 1;
    r->sizes[0] = r->sizes[1] = r->sizes[2] = 0;
    if (cfg->eviction == NO_REUSE) { /* nothing kept but what the prefetcher picked for this step */
        for (i64 i = r->res_n[layer] - 1; i >= 0; i--) { /* backwards: an eviction moves the last listed to i */
            i64 e = AT2(r->res_list, layer, E, i);
            i64 tid = AT2(r->resident, layer, E, e);
            if (r->t_state[tid] == DONE && !AT2(r->pinned, layer, E, e) && !AT2(r->selected, layer, E, e))
                evict(r, cfg, layer, e);
        }
    }
    /* settle the pending prefetches, in issue order */
    i64 *pending = r->pending + layer * E;
    i64 n_pending = 0;
    if (r->pending_n[layer] > 0) {
        for (i64 e = 0; e < E; e++) {
            i64 tid = pending[e];
            if (tid >= 0) {
                i64 k = n_pending;
                while (k > 0 && r->t_serial[pending[r->order[k - 1]]] > r->t_serial[tid]) {
                    r->order[k] = r->order[k - 1];
                    k -= 1;
                }
                r->order[k] = e;
                n_pending += 1;
            }
        }
    }
    i64 n_spare = 0, n_cancelled = 0;
    for (i64 k = 0; k < n_pending; k++) {
        i64 e = r->order[k];
        i64 tid = pending[e];
        if (routed[e]) {
            r->t_used[tid] = 1;
            r->stats[ST_PREFETCHES_USED] += 1;
            if (r->t_state[tid] == DONE)
                r->stats[ST_BYTES_PREFETCH_USED] += r->expert_bytes[r->t_precision[tid]];
            else if (r->t_state[tid] == QUEUED)
                link_promote(r, tid);
        } else if (r->t_state[tid] == QUEUED && cfg->cancel_stale) {
            r->t_state[tid] = CANCELLED;
            r->loads[n_cancelled] = e;
            n_cancelled += 1;
            r->stats[ST_PREFETCHES_CANCELLED] += 1;
        } else {
            r->spare[n_spare] = e;
            n_spare += 1;
        }
    }
    for (i64 k = 0; k < n_cancelled; k++) {
        i64 e = r->loads[k];
        link_cancel(r, pending[e]);
        evict(r, cfg, layer, e);
    }
    if (r->pending_n[layer] > 0) {
        for (i64 e = 0; e < E; e++) pending[e] = -1;
        r->pending_n[layer] = 0;
    }
    i64 covered = 0;
    for (i64 k = 0; k < r->selected_n[layer]; k++) {
        i64 e = AT2(r->selected_list, layer, E, k);
        if (routed[e]) covered += 1;
        AT2(r->selected, layer, E, e) = 0;
    }
    r->stats[ST_PREFETCH_SELECTED] += r->selected_n[layer];
    r->stats[ST_PREFETCH_COVERED] += covered;
    r->selected_n[layer] = 0;
    r->routed_per_layer[layer] += m;
    for (i64 j = lo; j < hi; j++) { /* hits, in routed order */
        i64 e = r->route_ids[j];
        i64 tid = AT2(r->resident, layer, E, e);
        if (tid >= 0) work(r, e, r->route_counts[j], r->t_precision[tid], r->t_state[tid] != DONE ? tid : -1);
    }
    i64 hits = r->sizes[0];
    r->hits_per_layer[layer] += hits;
    for (i64 k = 0; k < hits; k++) policy_access(r, cfg, layer, r->work_e[k]);
    i64 n_miss = 0;
    for (i64 j = lo; j < hi; j++) {
        i64 e = r->route_ids[j];
        if (AT2(r->resident, layer, E, e) < 0) {
            r->misses[n_miss] = e;
            r->miss_tokens[n_miss] = r->route_counts[j];
            n_miss += 1;
        }
    }
    if (n_miss == 0) return;
    if (cfg->miss == CPU) {
        for (i64 k = 0; k < n_miss; k++) {
            r->cpu_e[k] = r->misses[k];
            r->cpu_tokens[k] = r->miss_tokens[k];
        }
        r->sizes[2] = n_miss;
        return;
    }
    i64 n_sub = cfg->miss == SPECULATED ? (n_miss < n_spare ? n_miss : n_spare) : 0;
    memcpy(r->in_use, routed, (size_t)E);
    for (i64 k = 0; k < n_sub; k++) { /* a spare speculated expert computes in place of a missing routed one */
        i64 sub = r->spare[k];
        policy_access(r, cfg, layer, sub);
        i64 tid = AT2(r->resident, layer, E, sub);
        work(r, sub, r->miss_tokens[k], r->t_precision[tid], r->t_state[tid] != DONE ? tid : -1);
        r->in_use[sub] = 1;
    }
    if (n_sub == n_miss) return;
    if (cfg->miss == LOWBIT) {
        for (i64 k = n_sub; k < n_miss; k++) r->precision_of[r->misses[k]] = cfg->miss_precision;
    } else { /* by the step's token counts (fate-hybrid prefill) */
        for (i64 i = 0; i < m; i++) {
            r->fetch_e[i] = r->route_ids[lo + i];
            r->fetch_s[i] = (f64)r->route_counts[lo + i];
        }
        assign_precisions(r, cfg, r->step_prefill[step], r->fetch_e, r->fetch_s, m, r->fetch_p);
        for (i64 i = 0; i < m; i++) r->precision_of[r->fetch_e[i]] = r->fetch_p[i];
    }
    int whole_step_min = cfg->eviction == BELADY && m > r->slots[layer];
    for (i64 k = n_sub; k < n_miss; k++) {
        i64 e = r->misses[k];
        i64 tid = load(r, cfg, step, layer, e, r->precision_of[e], whole_step_min);
        if (r->counts[C_ERROR] != OK && r->counts[C_ERROR] != BUDGET_EXCEEDED) return; /* no transfer: stop */
        if (cfg->serial_loads && r->sizes[0] > 0) r->t_after_compute[tid] = r->work_e[r->sizes[0] - 1];
        r->loads[r->sizes[1]] = tid;
        r->sizes[1] += 1;
        work(r, e, r->miss_tokens[k], r->t_precision[tid], tid);
    }
}

/* --- the engine (sim/engine.py) ------------------------------------------------------------------------------ */

/* Engine._duration: compute time with copy contention. */
static f64 duration(const Replay *r, const Settings *cfg, f64 now, f64 work_s) {
    if (cfg->copy_contention == 1.0) return work_s;
    f64 busy_s = link_busy_until(r, now) - now;
    if (busy_s <= 0.0) return work_s;
    f64 slowed_s = work_s * cfg->copy_contention;
    if (slowed_s <= busy_s) return slowed_s;
    return busy_s + work_s - busy_s / cfg->copy_contention;
}

/* Engine._post_loads: submits the loads whose dependencies allow; updates *posted and *ready_at. */
static void post_loads(Replay *r, i64 *posted, f64 *ready_at) {
    while (*posted < r->sizes[1]) {
        i64 tid = r->loads[*posted];
        i64 after = r->t_after_compute[tid];
        if (after >= 0) {
            if (!r->computed[after]) break;
            if (r->compute_end[after] > *ready_at) *ready_at = r->compute_end[after];
        }
        i64 before_tid = r->t_after_transfer[tid];
        if (before_tid >= 0) {
            f64 end = link_end_of(r, before_tid);
            if (end > *ready_at) *ready_at = end;
        }
        link_submit(r, tid, *ready_at, DEMAND_PRIORITY);
        *posted += 1;
    }
}

/* Engine._routed_experts: the GPU work of the layer step in plan order. */
static void routed_experts(Replay *r, const Settings *cfg, f64 route_at) {
    f64 *clock = r->clock;
    i64 posted = 0;
    f64 ready_at = route_at;
    memset(r->computed, 0, (size_t)r->E);
    for (i64 k = 0; k < r->sizes[0]; k++) {
        post_loads(r, &posted, &ready_at);
        i64 tid = r->work_tid[k];
        if (tid >= 0 && r->t_state[tid] != DONE) { /* in flight as of the route: wait for its bytes */
            f64 at = link_end_of(r, tid);
            if (at > clock[K_NOW]) {
                clock[K_STALL] += at - clock[K_NOW];
                clock[K_NOW] = at;
            }
        }
        f64 now = clock[K_NOW];
        clock[K_NOW] = now + duration(r, cfg, now, AT2(r->expert_s, r->work_precision[k], r->expert_cols,
                                                         r->work_tokens[k]));
        r->compute_end[r->work_e[k]] = clock[K_NOW];
        r->computed[r->work_e[k]] = 1;
    }
}

static void release_deferred(Replay *r) {
    for (i64 k = 0; k < r->counts[C_DEFERRED]; k++) {
        i64 tid = r->deferred[k];
        if (!r->t_cached[tid] && !r->t_on_link[tid]) release(r, tid);
    }
    r->counts[C_DEFERRED] = 0;
}

/* Engine.gpu_stream over every step, with the closed-form CPU predictor thread, then Engine.run's drain;
 * returns the result code and sets *busy_s (link busy seconds within the makespan). */
static i64 replay(Replay *r, const Settings *cfg, f64 *busy_s) {
    i64 L = r->L, S = r->S;
    f64 *clock = r->clock;
    *busy_s = 0.0;
    for (i64 layer = 0; layer < L; layer++) { /* the allocation's pinned experts, preloaded */
        for (i64 j = r->pinned_ptr[layer]; j < r->pinned_ptr[layer + 1]; j++) {
            i64 expert = r->pinned_experts[j];
            r->free_slots[layer] -= 1;
            i64 tid = new_transfer(r, cfg, layer, expert, cfg->preload_precision, PRELOAD_KIND);
            if (r->counts[C_ERROR] == POOL_EXHAUSTED) return r->counts[C_ERROR];
            r->t_state[tid] = DONE;
            AT2(r->pinned, layer, r->E, expert) = 1;
        }
    }
    if (r->counts[C_ERROR] != OK) return r->counts[C_ERROR];
    int predicts = cfg->prefetch != NO_PREFETCH;
    int eap = predicts && cfg->prediction == EAP; /* (its arrays are dummies otherwise) */
    for (i64 step = 0; step < S; step++) {
        r->counts[C_STEP] = step;
        if (eap) eap_begin_step(r, step);
        r->step_start_at[step] = clock[K_NOW];
        f64 attention_s = r->attention_s[step];
        for (i64 layer = 0; layer < L; layer++) {
            f64 now = clock[K_NOW];
            clock[K_NOW] = now + duration(r, cfg, now, attention_s);
            link_advance(r, clock[K_NOW]);
            if (predicts) {
                i64 n = gate_input(r, cfg, step, layer, r->prefetches);
                if (r->counts[C_ERROR] == POOL_EXHAUSTED) return r->counts[C_ERROR];
                f64 start = clock[K_NOW] > clock[K_CPU_FREE] ? clock[K_NOW] : clock[K_CPU_FREE];
                f64 done = start + cfg->predictor_latency_s;
                clock[K_CPU_FREE] = done;
                for (i64 k = 0; k < n; k++) link_submit(r, r->prefetches[k], done, PREFETCH_PRIORITY);
            }
            clock[K_NOW] += cfg->router_s;
            link_advance(r, clock[K_NOW]);
            f64 route_at = clock[K_NOW];
            on_route(r, cfg, step, layer);
            if (r->counts[C_ERROR] != OK) return r->counts[C_ERROR];
            if (eap) eap_observe(r, step, layer); /* (the controller observes at the end of on_route) */
            f64 cpu_done_at = route_at;
            if (!cfg->cpu_on_stream) { /* the CPU expert thread */
                for (i64 k = 0; k < r->sizes[2]; k++) {
                    f64 start = route_at > clock[K_CPU_EXPERT_FREE] ? route_at : clock[K_CPU_EXPERT_FREE];
                    cpu_done_at = start + r->cpu_expert_s[r->cpu_tokens[k]];
                    clock[K_CPU_EXPERT_FREE] = cpu_done_at;
                }
            }
            routed_experts(r, cfg, route_at);
            if (cfg->cpu_on_stream) {
                for (i64 k = 0; k < r->sizes[2]; k++) {
                    f64 t = clock[K_NOW];
                    clock[K_NOW] = t + duration(r, cfg, t, r->cpu_expert_s[r->cpu_tokens[k]]);
                }
            } else if (cpu_done_at > clock[K_NOW]) {
                clock[K_STALL] += cpu_done_at - clock[K_NOW];
                clock[K_NOW] = cpu_done_at;
            }
            f64 shared_s = r->shared_s[step];
            if (shared_s != 0.0) {
                f64 t = clock[K_NOW];
                clock[K_NOW] = t + duration(r, cfg, t, shared_s);
            }
            release_deferred(r);
            if (r->out_of_memory) return r->counts[C_ERROR];
        }
        r->step_end_at[step] = clock[K_NOW];
    }
    f64 makespan = S ? r->step_end_at[S - 1] : 0.0;
    link_advance(r, INFINITY);
    f64 busy = 0.0;
    for (i64 i = 0; i < r->n_started; i++)
        if (r->starts[i] < makespan) busy += (r->ends[i] < makespan ? r->ends[i] : makespan) - r->starts[i];
    *busy_s = busy;
    return r->counts[C_ERROR];
}

/* --- Python interface ------------------------------------------------------------------------------------------ */

#define COUNT_ONE(...) +1
static const Py_ssize_t NUM_ARRAYS = 0 ARRAY_FIELDS(COUNT_ONE);
static const Py_ssize_t NUM_SETTINGS = 0 SETTING_FIELDS(COUNT_ONE);

#define ARRAY_NAME(name, ctype, letter, writable) #name,
#define ARRAY_LETTER(name, ctype, letter, writable) letter,
#define ARRAY_WRITABLE(name, ctype, letter, writable) writable,
#define SETTING_NAME(name, ctype, conv) #name,
static const char *const ARRAY_NAMES[] = {ARRAY_FIELDS(ARRAY_NAME)};
static const char ARRAY_LETTERS[] = {ARRAY_FIELDS(ARRAY_LETTER)};
static const int ARRAY_WRITABLES[] = {ARRAY_FIELDS(ARRAY_WRITABLE)};
static const char *const SETTING_NAMES[] = {SETTING_FIELDS(SETTING_NAME)};

/* Whether a buffer's format is the dtype `letter` stands for (int64 is 'l' or 'q' by platform). */
static int format_is(const Py_buffer *view, char letter) {
    const char *f = view->format ? view->format : "B";
    if (*f == '<' || *f == '=' || *f == '@') f++;
    if (f[1] != '\0') return 0;
    switch (letter) {
    case 'i': return (*f == 'l' || *f == 'q') && view->itemsize == 8;
    case 'd': return *f == 'd' && view->itemsize == 8;
    case 'f': return *f == 'f' && view->itemsize == 4;
    case 'b': return *f == '?' && view->itemsize == 1;
    }
    return 0;
}

typedef struct {
    Py_buffer views[256];
    Py_ssize_t n_views;
} Views;

static void release_views(Views *views) {
    for (Py_ssize_t i = 0; i < views->n_views; i++) PyBuffer_Release(&views->views[i]);
    views->n_views = 0;
}

/* Point r's arrays at the fields of the named tuples (Inputs, State, Scratch), checking names and dtypes. */
static int bind_arrays(Replay *r, PyObject *tuples[3], Views *views) {
    void **slots[] = {
#define ARRAY_SLOT(name, ctype, letter, writable) (void **)&r->name,
        ARRAY_FIELDS(ARRAY_SLOT)
#undef ARRAY_SLOT
    };
    Py_ssize_t index = 0;
    for (int t = 0; t < 3; t++) {
        PyObject *tuple = tuples[t];
        if (!PyTuple_Check(tuple)) {
            PyErr_SetString(PyExc_TypeError, "the kernel takes the named tuples of sim/kernel/state.py");
            return -1;
        }
        PyObject *fields = PyObject_GetAttrString((PyObject *)Py_TYPE(tuple), "_fields");
        if (!fields) return -1;
        Py_ssize_t n = PyTuple_GET_SIZE(tuple);
        if (!PyTuple_Check(fields) || PyTuple_GET_SIZE(fields) != n || index + n > NUM_ARRAYS) {
            Py_DECREF(fields);
            PyErr_SetString(PyExc_TypeError, "the kernel's array tables disagree with sim/kernel/state.py");
            return -1;
        }
        for (Py_ssize_t i = 0; i < n; i++, index++) {
            const char *name = PyUnicode_AsUTF8(PyTuple_GET_ITEM(fields, i));
            if (!name || strcmp(name, ARRAY_NAMES[index]) != 0) {
                Py_DECREF(fields);
                if (name) PyErr_Format(PyExc_TypeError, "kernel field %zd is %s, state.py says %s", index,
                                       ARRAY_NAMES[index], name);
                return -1;
            }
            int flags = PyBUF_C_CONTIGUOUS | PyBUF_FORMAT | (ARRAY_WRITABLES[index] ? PyBUF_WRITABLE : 0);
            Py_buffer *view = &views->views[views->n_views];
            if (PyObject_GetBuffer(PyTuple_GET_ITEM(tuple, i), view, flags) < 0) {
                Py_DECREF(fields);
                PyErr_Format(PyExc_TypeError, "kernel array %s: not a C-contiguous%s array", name,
                             ARRAY_WRITABLES[index] ? " writable" : "");
                return -1;
            }
            views->n_views += 1;
            if (!format_is(view, ARRAY_LETTERS[index])) {
                Py_DECREF(fields);
                PyErr_Format(PyExc_TypeError, "kernel array %s has format %s, expected dtype code %c", name,
                             view->format ? view->format : "B", ARRAY_LETTERS[index]);
                return -1;
            }
            *slots[index] = view->buf;
        }
        Py_DECREF(fields);
    }
    if (index != NUM_ARRAYS) {
        PyErr_SetString(PyExc_TypeError, "the kernel's array tables disagree with sim/kernel/state.py");
        return -1;
    }
    return 0;
}

static Py_ssize_t view_length(const Views *views, const char *name, int axis) {
    for (Py_ssize_t i = 0; i < NUM_ARRAYS; i++)
        if (strcmp(ARRAY_NAMES[i], name) == 0) {
            const Py_buffer *view = &views->views[i];
            return axis < view->ndim ? view->shape[axis] : 1;
        }
    return 0;
}

static int bind_settings(Settings *cfg, PyObject *settings) {
    if (!PyTuple_Check(settings) || PyTuple_GET_SIZE(settings) != NUM_SETTINGS) {
        PyErr_SetString(PyExc_TypeError, "the kernel's settings table disagrees with sim/kernel/state.py");
        return -1;
    }
    Py_ssize_t i = 0;
#define INT(item) PyLong_AsLongLong(item)
#define FLOAT(item) PyFloat_AsDouble(item)
#define SETTING_READ(name, ctype, conv)                     \
    cfg->name = (ctype)conv(PyTuple_GET_ITEM(settings, i)); \
    if (PyErr_Occurred()) return -1;                        \
    i++;
    SETTING_FIELDS(SETTING_READ)
#undef SETTING_READ
#undef INT
#undef FLOAT
    return 0;
}

/* Binds everything; the dimensions; the scratch that is not an argument. */
static int prepare(Replay *r, Settings *cfg, PyObject *args, Views *views) {
    memset(r, 0, sizeof(*r));
    PyObject *data, *settings, *state, *scratch;
    if (!PyArg_ParseTuple(args, "OOOO", &data, &settings, &state, &scratch)) return -1;
    PyObject *tuples[3] = {data, state, scratch};
    if (bind_arrays(r, tuples, views) < 0 || bind_settings(cfg, settings) < 0) return -1;
    r->L = view_length(views, "slots", 0);
    r->E = view_length(views, "routed", 0);
    r->S = view_length(views, "step_tokens", 0);
    r->engines = view_length(views, "engine_free_at", 0);
    r->expert_cols = view_length(views, "expert_s", 1);
    r->probs_d = view_length(views, "probs", 0);
    r->probs_t = view_length(views, "probs", 1);
    r->probs_l = view_length(views, "probs", 2);
    r->probs_e = view_length(views, "probs", 3);
    r->eap_n = view_length(views, "eap_paths", 0);
    if (r->engines < 1 || r->E < 1) {
        PyErr_SetString(PyExc_ValueError, "the kernel needs at least one copy engine and one expert");
        return -1;
    }
    r->order_buf = malloc((size_t)r->E * sizeof(i64));
    if (!r->order_buf) {
        PyErr_NoMemory();
        return -1;
    }
    return 0;
}

static void finish(Replay *r, Views *views) {
    free(r->order_buf);
    free(r->starts);
    free(r->ends);
    release_views(views);
}

static PyObject *run(PyObject *self, PyObject *args) {
    (void)self;
    Replay r;
    Settings cfg;
    Views views = {.n_views = 0};
    if (prepare(&r, &cfg, args, &views) < 0) {
        finish(&r, &views);
        return NULL;
    }
    i64 code;
    f64 busy_s;
    Py_BEGIN_ALLOW_THREADS
    code = replay(&r, &cfg, &busy_s);
    Py_END_ALLOW_THREADS
    int out_of_memory = r.out_of_memory;
    finish(&r, &views);
    if (out_of_memory) return PyErr_NoMemory();
    return Py_BuildValue("(Ld)", (long long)code, busy_s);
}

/* For tests/sim/test_kernel_link.py: a script of link operations (codes 0 submit, 1 promote, 2 cancel, with
 * transfer, priority and ready time), then the link drained; start times land in State.t_start. */
static PyObject *drive_link(PyObject *self, PyObject *args) {
    (void)self;
    PyObject *data, *settings, *state, *scratch, *ops;
    if (!PyArg_ParseTuple(args, "OOOOO", &data, &settings, &state, &scratch, &ops)) return NULL;
    PyObject *inner = Py_BuildValue("(OOOO)", data, settings, state, scratch);
    if (!inner) return NULL;
    Replay r;
    Settings cfg;
    Views views = {.n_views = 0};
    int ok = prepare(&r, &cfg, inner, &views) == 0;
    Py_DECREF(inner);
    PyObject *seq = ok ? PySequence_Fast(ops, "ops must be a sequence of (code, tid, priority, ready_at)") : NULL;
    for (Py_ssize_t i = 0; seq && i < PySequence_Fast_GET_SIZE(seq); i++) {
        long long code, tid, priority;
        double ready_at;
        if (!PyArg_ParseTuple(PySequence_Fast_GET_ITEM(seq, i), "LLLd", &code, &tid, &priority, &ready_at)) {
            Py_CLEAR(seq);
            break;
        }
        if (code == 0)
            link_submit(&r, tid, ready_at, priority);
        else if (code == 1)
            link_promote(&r, tid);
        else
            link_cancel(&r, tid);
    }
    if (seq) {
        while (start_next(&r, INFINITY)) {
        }
    }
    Py_XDECREF(seq);
    finish(&r, &views);
    if (!seq) return NULL;
    Py_RETURN_NONE;
}

static PyObject *tables(void) {
    PyObject *arrays = PyTuple_New(NUM_ARRAYS), *settings = PyTuple_New(NUM_SETTINGS);
    if (!arrays || !settings) goto error;
    for (Py_ssize_t i = 0; i < NUM_ARRAYS; i++) {
        PyObject *name = PyUnicode_FromString(ARRAY_NAMES[i]);
        if (!name) goto error;
        PyTuple_SET_ITEM(arrays, i, name);
    }
    for (Py_ssize_t i = 0; i < NUM_SETTINGS; i++) {
        PyObject *name = PyUnicode_FromString(SETTING_NAMES[i]);
        if (!name) goto error;
        PyTuple_SET_ITEM(settings, i, name);
    }
    return Py_BuildValue("(NN)", arrays, settings);
error:
    Py_XDECREF(arrays);
    Py_XDECREF(settings);
    return NULL;
}

#define CONSTANT(name) {#name, name},
static const struct {
    const char *name;
    long value;
} CONSTANT_TABLE[] = {
    CONSTANT(QUEUED) CONSTANT(STARTED) CONSTANT(DONE) CONSTANT(CANCELLED) CONSTANT(DEMAND_KIND)
    CONSTANT(PREFETCH_KIND) CONSTANT(PRELOAD_KIND) CONSTANT(DEMAND_PRIORITY) CONSTANT(PREFETCH_PRIORITY)
    CONSTANT(INT4) CONSTANT(INT2) CONSTANT(HYBRID) CONSTANT(LRU) CONSTANT(LFU) CONSTANT(ARC) CONSTANT(BELADY) CONSTANT(NO_REUSE)
    CONSTANT(NO_PREDICTION) CONSTANT(LOOKAHEAD) CONSTANT(ORACLE) CONSTANT(EAP) CONSTANT(NO_PREFETCH) CONSTANT(FATE)
    CONSTANT(TOPK) CONSTANT(ALL) CONSTANT(WAIT) CONSTANT(CPU) CONSTANT(SPECULATED) CONSTANT(LOWBIT) CONSTANT(T1)
    CONSTANT(T2) CONSTANT(B1) CONSTANT(B2) CONSTANT(ST_PREFETCHES_ISSUED) CONSTANT(ST_PREFETCHES_USED)
    CONSTANT(ST_PREFETCHES_CANCELLED) CONSTANT(ST_PREFETCH_COVERED) CONSTANT(ST_PREFETCH_SELECTED)
    CONSTANT(ST_EVICTIONS) CONSTANT(ST_BYTES_ON_DEMAND) CONSTANT(ST_BYTES_PREFETCHED) CONSTANT(ST_BYTES_PREFETCH_USED)
    CONSTANT(OK) CONSTANT(POOL_EXHAUSTED) CONSTANT(ALL_PINNED) CONSTANT(BUDGET_EXCEEDED) CONSTANT(ANY) CONSTANT(FIRST)
    CONSTANT(ONLY) CONSTANT(C_FREE_TRANSFERS) CONSTANT(C_QUEUE) CONSTANT(C_HEAP) CONSTANT(C_LINK_SEQ)
    CONSTANT(C_QUEUE_SEQ) CONSTANT(C_SERIAL) CONSTANT(C_TICK) CONSTANT(C_OCCUPIED) CONSTANT(C_PEAK) CONSTANT(C_STEP)
    CONSTANT(C_DEFERRED) CONSTANT(C_ERROR) CONSTANT(C_EAP_STORED) CONSTANT(C_EAP_DECODE) CONSTANT(C_COUNTS)
    CONSTANT(NEVER) CONSTANT(K_NOW) CONSTANT(K_STALL) CONSTANT(K_CPU_FREE) CONSTANT(K_CPU_EXPERT_FREE) CONSTANT(K_CLOCKS)
};

/* {name: value} of the constants above, for the test that holds them equal to sim/kernel/state.py's. */
static PyObject *constant_table(void) {
    PyObject *table = PyDict_New();
    for (size_t i = 0; table && i < sizeof(CONSTANT_TABLE) / sizeof(CONSTANT_TABLE[0]); i++) {
        PyObject *value = PyLong_FromLong(CONSTANT_TABLE[i].value);
        if (!value || PyDict_SetItemString(table, CONSTANT_TABLE[i].name, value) < 0) Py_CLEAR(table);
        Py_XDECREF(value);
    }
    return table;
}

static PyMethodDef METHODS[] = {
    {"run", run, METH_VARARGS,
     "run(inputs, settings, state, scratch) -> (code, link_busy_s): replay every step; results in state's arrays."},
    {"drive_link", drive_link, METH_VARARGS,
     "drive_link(inputs, settings, state, scratch, ops): link operations, then drain (for tests)."},
    {NULL, NULL, 0, NULL},
};

static struct PyModuleDef MODULE = {PyModuleDef_HEAD_INIT, "_compiled", "The simulator's compiled replay kernel.",
                                    -1, METHODS};

#ifndef SOURCE_SHA256
#define SOURCE_SHA256 ""
#endif

PyMODINIT_FUNC PyInit__compiled(void) {
    PyObject *module = PyModule_Create(&MODULE);
    if (!module) return NULL;
    PyObject *names = tables();
    PyObject *constants = constant_table();
    if (!names || !constants || PyModule_AddObject(module, "TABLES", names) < 0) {
        Py_XDECREF(names);
        Py_XDECREF(constants);
        Py_DECREF(module);
        return NULL;
    }
    if (PyModule_AddObject(module, "CONSTANTS", constants) < 0 ||
        PyModule_AddStringConstant(module, "SOURCE_SHA256", SOURCE_SHA256) < 0) {
        Py_DECREF(module);
        return NULL;
    }
    return module;
}
