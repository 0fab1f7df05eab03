"""Recording a model larger than memory: the model realrun runs, its routed experts offloaded.

`fatesim trace record --memory-budget B` comes here (`traces.recorder.record_trace`). The skeleton and
the non-expert weights come from `realrun.streaming.load_streaming`; the routed experts are served by
realrun's `OffloadEngine` under `lod`: every routed expert is loaded on demand into the budget's slots,
nothing is predicted or quantised, and bf16 experts are read straight from the checkpoint's files (the
disk tier writes no store). Routing does not depend on a lossless policy, and the engine computes each
expert with transformers' own operations in transformers' order, so the recorder's router hooks see what
the in-memory model computes (tests/realrun/test_record.py: identical trace content).

Peak host memory is that of `fatesim realrun --store disk`: non-expert weights in the compute dtype, the
slots, one expert being read.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import nn

from realrun.ckptstore import build_checkpoint_store
from realrun.engine import OffloadEngine
from realrun.session import budgets, check_slots
from realrun.streaming import load_streaming
from sim.modelspec import ModelSpec
from sim.policies.controller import OffloadController
from sim.policies.presets import build_policy
from sim.units import format_bytes

RECORDING_POLICY = "lod"
"""All-demand: the experts a forward routes to are loaded when it routes to them, and nothing else."""


@dataclass
class OffloadedModel:
    """A model ready to record, its experts offloaded; valid inside `offloaded_model`'s block only."""

    model: nn.Module
    on_forward: Callable[[int, str, int], None]
    """Call before every forward: (step, "prefill" | "decode", tokens), as realrun's decode loop does."""
    loader: str
    """How the model runs, for the trace's provenance."""


@contextmanager
def offloaded_model(folder: Path, *, device: str, dtype: str, memory_budget: str,
                    kv_tokens: int) -> Iterator[OffloadedModel]:
    """The checkpoint in `folder` streamed onto `device` with its routed experts served from the checkpoint
    within `memory_budget` (total fast memory, as `fatesim realrun --memory-budget`); `kv_tokens`: the
    longest context the recording holds. The budget is checked before any weight is read."""
    dev = torch.device(device)
    policy = build_policy(RECORDING_POLICY)
    spec = ModelSpec.from_config_file(folder)
    total, experts = budgets(memory_budget, spec, kv_tokens, dev)
    check_slots(policy, spec, experts)
    streamed = load_streaming(folder, dev, dtype)
    try:
        slow, layouts = build_checkpoint_store(streamed.checkpoint, streamed.spec, ["bf16"], "disk", dev)
        try:
            ctl = OffloadController(streamed.spec, policy, experts, decode_prefetch_count=0)
            with OffloadEngine(streamed.model, streamed.spec, ctl, slow, layouts, dev) as engine:
                loader = (f"realrun streaming loader: routed experts read from the checkpoint on demand ({policy.name}) "
                          f"into {format_bytes(experts)} of expert slots (budget {format_bytes(total)}), "
                          f"computed in {str(streamed.compute_dtype).removeprefix('torch.')}")
                yield OffloadedModel(streamed.model, engine.start_forward, loader)
        finally:
            slow.close()
    finally:
        streamed.checkpoint.close()
