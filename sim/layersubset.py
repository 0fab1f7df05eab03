"""Traces that log only some of a model's MoE layers, and the model a replay of them stands for.

Some public logs hold a few MoE layers (the vLLM logs of Qwen1.5-MoE: layers 0, 8, 12, 18, 23 of 24).
Replayed as they are, they would pass for the whole model. A replay refuses such a trace unless asked
(`--layers-subset`); it then replays **a model made of the logged layers only**: the full model's shapes,
its embedding and vocabulary head once, and just the logged decoder layers (their attention, KV cache,
shared and routed experts). Throughput, bytes moved and a percentage budget then cover those layers, not
the whole model, and every output says so ("5 of 24 MoE layers").
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Any

from sim.modelspec import ModelSpec, get_model_spec
from traces.errors import UserError
from traces.model_configs import BUILTIN_CONFIGS, HF_IDS, routing_config


@dataclass(frozen=True)
class LayerCoverage:
    """Which MoE layers of its model a trace logs."""

    logged: tuple[int, ...]
    """Decoder indices of the MoE layers in the trace."""
    model_layers: tuple[int, ...] | None
    """Decoder indices of every MoE layer of the model the trace comes from; None when unknown."""
    model: str | None
    """A built-in spec name for that model (None: only its recorded hf_config, or unknown)."""

    @property
    def partial(self) -> bool:
        return self.model_layers is not None and tuple(self.logged) != tuple(self.model_layers)

    def note(self) -> str:
        """"5 of 24 MoE layers" (or "24 of 24 MoE layers")."""
        total = len(self.model_layers) if self.model_layers is not None else len(self.logged)
        return f"{len(self.logged)} of {total} MoE layers"


def layer_coverage(trace: Any) -> LayerCoverage:
    """The model a trace's layers come from, from (in order) its recorded hf_config, the built-in spec an
    importer attributed it to (`source.model_spec`), or its `model` as a built-in name or Hugging Face id."""
    logged = tuple(int(i) for i in trace.model_config.moe_layer_indices)
    if trace.hf_config:
        try:
            return LayerCoverage(logged, tuple(routing_config(trace.hf_config).moe_layer_indices), None)
        except KeyError:
            pass
    by_hf_id = {hf: name for name, hf in HF_IDS.items()}
    for candidate in ((trace.source or {}).get("model_spec"), trace.model, by_hf_id.get(trace.model)):
        if isinstance(candidate, str) and candidate in BUILTIN_CONFIGS:
            layers = tuple(routing_config(BUILTIN_CONFIGS[candidate]).moe_layer_indices)
            # a name is only a label: a trace whose layers are not among that model's (a synthetic trace
            # named after Qwen with 27 layers) is not a part of it, and replays as the model it describes
            if set(logged) <= set(layers):
                return LayerCoverage(logged, layers, candidate)
    return LayerCoverage(logged, None, None)


def subset_spec(full: ModelSpec, logged: tuple[int, ...]) -> ModelSpec:
    """`full` reduced to the decoder layers `logged` (all MoE layers of `full`): a model of those layers only."""
    missing = sorted(set(logged) - set(full.moe_layer_indices))
    if missing:
        raise UserError(f"{full.name} has no MoE layer {missing[0]}, which the trace logs; "
                        "pick a model whose MoE layers include the logged ones")
    return dataclasses.replace(full, num_layers=len(logged), moe_layer_indices=tuple(logged))


def check_layers(trace: Any, layers_subset: bool, as_model: str | None) -> tuple[LayerCoverage, ModelSpec | None]:
    """(coverage, the spec to replay with when the trace is partial, else None); UserError when the trace
    is partial and `layers_subset` is False."""
    coverage = layer_coverage(trace)
    if not coverage.partial:
        return coverage, None
    name = as_model or coverage.model or trace.model
    if not layers_subset:
        raise UserError(f"trace of {trace.model} logs only {coverage.note()} of {name} "
                        f"(decoder layers {list(coverage.logged)}); replayed as it is it would pass for the whole "
                        "model. Add --layers-subset to replay a model made of these layers only (every output "
                        "then says so), or import every layer")
    if as_model is not None or coverage.model is not None:
        full = get_model_spec(as_model or coverage.model)
    else:
        full = ModelSpec.from_hf_config(trace.hf_config, name=trace.model)
    mine = (full.num_experts, full.top_k)
    theirs = (trace.model_config.num_experts, trace.model_config.top_k)
    if mine != theirs:
        raise UserError(f"trace of {trace.model} routes {theirs[0]} experts top-{theirs[1]} but {full.name} has "
                        f"{mine[0]}, top-{mine[1]}; pick a model with the same routing")
    return coverage, subset_spec(full, coverage.logged)
