"""The metrics JSON: the one place a replay's times and counters become the metrics JSON.

Sim and realrun emit the same keys (ARCHITECTURE.md "Replay API"):

| key | meaning | unit |
|---|---|---|
| prefill_tokens_per_s | prompt tokens / time spent in prefill steps (0 when there are none) | tokens/s |
| decode_tokens_per_s | generated tokens / time spent in decode steps (0 when there are none) | tokens/s |
| prefill_tokens, decode_tokens | tokens of each phase replayed (0: the phase is absent, its rates mean nothing) | count |
| ttft_s | mean over sequences of the prefill step's duration (time to first token) | s |
| tpot_s | mean decode step duration (time per output token) | s |
| hit_rate | routed (expert, layer step) pairs resident or in flight when routed / all routed pairs | 0..1 |
| hit_rate_per_layer | the same per MoE layer | list of 0..1 |
| prefetch_precision | experts the prefetcher picked for a layer step (resident or not) that were routed there / experts picked | 0..1 |
| prefetch_recall | routed (expert, layer step) pairs the prefetcher had picked / routed pairs of layers 1..L-1 (layer 0 has no predictor) | 0..1 |
| bytes_transferred | on_demand, prefetch_used, prefetch_wasted, total | bytes |
| gpu_stall_s | GPU time waiting for expert bytes or CPU-computed experts | s |
| link_busy_fraction | copy-engine busy time / (makespan x copy engines) | 0..1 |
| layer_steps | MoE layers x forward steps replayed | count |

Inputs follow them (ARCHITECTURE.md "Replay API"), among them `run_notes`: `moe_layers` (which of the model's
MoE layers ran), `assumptions` (what the numbers rest on that no measurement gave: a noisy-oracle
predictor, a layer subset) and `warnings` (a configuration that ran, but probably not as meant).
"""

from __future__ import annotations

from typing import Any

METRIC_KEYS = ("prefill_tokens_per_s", "decode_tokens_per_s", "prefill_tokens", "decode_tokens", "ttft_s", "tpot_s",
               "hit_rate", "hit_rate_per_layer", "prefetch_precision", "prefetch_recall", "bytes_transferred",
               "gpu_stall_s", "link_busy_fraction", "layer_steps")
"""Measured keys, in output order; the input keys follow (policy, policy_components, ...)."""


def _ratio(num: float, den: float) -> float:
    return float(num) / float(den) if den else 0.0


def compute_metrics(*, phases: list[str], num_tokens: list[int], step_start_at: list[float],
                    step_end_at: list[float], stats: dict[str, Any], gpu_stall_s: float, link_busy_s: float,
                    makespan_s: float, copy_engines: int, num_layers: int) -> dict[str, Any]:
    """The measured half of the metrics JSON, from per-step times and the controller's counters."""
    prefill_s = decode_s = 0.0
    prefill_tokens = decode_tokens = 0
    ttfts: list[float] = []
    for phase, n, start, end in zip(phases, num_tokens, step_start_at, step_end_at, strict=True):
        if phase == "prefill":
            prefill_s += end - start
            prefill_tokens += n
            ttfts.append(end - start)
        else:
            decode_s += end - start
            decode_tokens += n
    on_demand = int(stats["bytes_on_demand"])
    used = int(stats["bytes_prefetch_used"])
    moved = int(stats["bytes_prefetched"])
    routed = stats["routed_per_layer"]
    return {
        "prefill_tokens_per_s": _ratio(prefill_tokens, prefill_s),
        "decode_tokens_per_s": _ratio(decode_tokens, decode_s),
        "prefill_tokens": prefill_tokens,
        "decode_tokens": decode_tokens,
        "ttft_s": _ratio(sum(ttfts), len(ttfts)),
        "tpot_s": _ratio(decode_s, decode_tokens),
        "hit_rate": _ratio(stats["hits"], stats["hits"] + stats["misses"]),
        "hit_rate_per_layer": [_ratio(h, r) for h, r in zip(stats["hits_per_layer"], routed, strict=True)],
        "prefetch_precision": _ratio(stats["prefetch_covered"], stats["prefetch_selected"]),
        "prefetch_recall": _ratio(stats["prefetch_covered"], stats["routed_predictable"]),
        "bytes_transferred": {"on_demand": on_demand, "prefetch_used": used, "prefetch_wasted": moved - used,
                              "total": on_demand + moved},
        "gpu_stall_s": float(gpu_stall_s),
        "link_busy_fraction": _ratio(link_busy_s, makespan_s * copy_engines),
        "layer_steps": len(phases) * num_layers,
    }


def run_notes(*, replayed_layers: list[int] | tuple[int, ...], model_layers: int, assumptions: list[str],
              warnings: list[str]) -> dict[str, Any]:
    """The `moe_layers`, `assumptions` and `warnings` keys (the same in sim and realrun)."""
    return {"moe_layers": {"replayed": len(replayed_layers), "of_model": int(model_layers),
                           "decoder_indices": [int(i) for i in replayed_layers]},
            "assumptions": list(assumptions), "warnings": list(warnings)}


def cache_warnings(policy: Any, ctl: Any) -> list[str]:
    """A warning when an OffloadController `ctl` of `policy` never held an expert although it had slots."""
    from sim.units import format_bytes

    slots = sum(ctl.slots_per_layer)
    if ctl.peak_slots or not slots:
        return []
    if policy.miss == "cpu":
        why = (f"miss=cpu computes every miss on the CPU and loads none, allocation={policy.allocation} pins "
               f"nothing and prefetch={policy.prefetch} fetched nothing")
        fix = "use allocation=popularity (as cpu-exec) or a prefetch policy to fill the cache"
    else:
        why, fix = "no expert was ever loaded into fast memory", "check the policy's components"
    return [f"the expert cache stayed empty ({slots} slots, {format_bytes(slots * ctl.slot_bytes)} unused): {why}; "
            f"{fix}"]
