"""Tiny hand-made traces and a round-number hardware profile for exact engine tests."""

from __future__ import annotations

import dataclasses

import numpy as np

from sim.hardware import HardwareProfile, profile_from_dict
from traces.format import Trace, TraceModelConfig


def tiny_profile(**link_and_cpu) -> HardwareProfile:
    """1 GB/s link with 1 µs latency, 1 TFLOP/s + 1 GB/s GPU (so an expert's compute is its bytes / 1e9)."""
    data = {
        "name": "tiny", "description": "round numbers for hand-computed tests", "provenance": "test",
        "device": {"kind": "cuda", "memory_bytes": 1 << 40},  # room for any budget the tests give
        "link": {"bandwidth_bytes_per_s": 1.0e9, "latency_s": 1.0e-6, "copy_engines": 1},
        "gpu": {"matmul_flops_per_s": 1.0e12, "memory_bytes_per_s": 1.0e9, "kernel_launch_s": 1.0e-6,
                "layer_overhead_s": 0.0},
        "dequant": {"int8_bytes_per_s": 1e12, "int4_bytes_per_s": 1e12, "int2_bytes_per_s": 1e12},
        "cpu": {"matmul_flops_per_s": 1.0e11, "memory_bytes_per_s": 1.0e9, "kernel_launch_s": 0.0,
                "predictor_latency_s": 2.0e-6},
    }
    for key, value in link_and_cpu.items():
        section, name = key.split("__")
        data[section][name] = value
    return profile_from_dict(data, source="tests")


def tiny_trace(topk: list, *, num_experts: int, prefill: int = 0, sequences: int = 1, lookahead=None,
               hidden_size: int = 64, expert_intermediate_size: int = 32) -> Trace:
    """A trace from topk[t][l] = list of k experts; `prefill` first positions of each sequence are prompt."""
    ids = np.asarray(topk, dtype=np.int16)  # [T, L, k]
    total, num_layers, k = ids.shape
    per_seq = total // sequences
    cfg = TraceModelConfig(architecture="olmoe", num_layers=num_layers, moe_layer_indices=tuple(range(num_layers)),
                           num_experts=num_experts, top_k=k, num_shared_experts=0, hidden_size=hidden_size,
                           expert_intermediate_size=expert_intermediate_size, shared_expert_intermediate_size=0,
                           dtype="bfloat16")
    return Trace(model="tiny-moe", model_config=cfg, source={"kind": "synthetic", "assumptions": []}, prompts={},
                 created="2026-01-01T00:00:00Z", token_ids=np.full(total, -1, np.int32),
                 seq_ids=np.repeat(np.arange(sequences, dtype=np.int32), per_seq),
                 positions=np.tile(np.arange(per_seq, dtype=np.int32), sequences),
                 is_prefill=np.tile((np.arange(per_seq) < prefill).astype(np.uint8), sequences),
                 topk_ids=ids, topk_weights=np.full(ids.shape, 1.0 / k, np.float16),
                 lookahead_logits=lookahead)


def head(trace: Trace, tokens: int) -> Trace:
    """The first `tokens` positions of a trace (whole sequences are not required)."""
    cut = {name: getattr(trace, name)[:tokens] for name in
           ("token_ids", "seq_ids", "positions", "is_prefill", "topk_ids", "topk_weights")}
    if trace.router_logits is not None:
        cut["router_logits"] = trace.router_logits[:tokens]
    if trace.lookahead_logits is not None:
        cut["lookahead_logits"] = trace.lookahead_logits[:, :tokens]
    return dataclasses.replace(trace, **cut)
