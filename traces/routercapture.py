"""Capturing what a Hugging Face MoE model's routers see and decide, through forward hooks.

The transformers 5.x MoE blocks route through one router module per MoE layer (`mlp.gate`), whose forward
takes the gate input `x` [N, H] and returns `(router_logits [N, E], topk_weights [N, k], topk_ids [N, k])`,
with the architecture's own scoring (softmax, sigmoid, group-limited top-k, correction bias...). A forward
hook on that module therefore sees exactly what the model routed, without copying any model code. Both the
recorder (`traces.recorder`) and the training script (`traces.train_models`: load-balancing loss, routing
statistics) use this module.

Shape letters: N tokens in one forward, H hidden size, E routed experts, k experts per token.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn

from traces.errors import UserError

# model_type -> the class name of its router module in transformers 5.x
ROUTER_CLASSES: dict[str, str] = {
    "qwen2_moe": "Qwen2MoeTopKRouter",
    "deepseek_v2": "DeepseekV2TopkRouter",
    "deepseek_v3": "DeepseekV3TopkRouter",
    "mixtral": "MixtralTopKRouter",
    "olmoe": "OlmoeTopKRouter",
    "qwen3_moe": "Qwen3MoeTopKRouter",
}
SUPPORTED_ARCHITECTURES = tuple(ROUTER_CLASSES)


def check_architecture(config: Any) -> str:
    """Return the config's model_type if the recorder supports it, else raise UserError naming the supported ones."""
    model_type = getattr(config, "model_type", None)
    if model_type not in ROUTER_CLASSES:
        raise UserError(
            f"unsupported model architecture {model_type!r}; supported model_type values: "
            f"{', '.join(SUPPORTED_ARCHITECTURES)}"
        )
    return model_type


def find_routers(model: nn.Module) -> list[tuple[int, nn.Module]]:
    """The (decoder layer index, router module) of every MoE layer, in layer order.

    Works on `*ForCausalLM` models (layers at `model.model.layers`) and bare `*Model`s (`model.layers`).
    """
    model_type = check_architecture(model.config)
    expected = ROUTER_CLASSES[model_type]
    base = model.model if hasattr(model, "model") and hasattr(model.model, "layers") else model
    layers = getattr(base, "layers", None)
    if layers is None:
        raise UserError(f"cannot find the decoder layers of this {model_type} model; is it a transformers 5.x model?")
    routers: list[tuple[int, nn.Module]] = []
    for index, layer in enumerate(layers):
        gate = getattr(getattr(layer, "mlp", None), "gate", None)
        if gate is not None and type(gate).__name__ == expected:
            routers.append((index, gate))
    if not routers:
        raise UserError(f"found no {expected} router in this {model_type} model; transformers 5.x is required")
    return routers


@dataclass
class RouterCall:
    """One router forward: tensors for the N tokens of that forward (all [N, ...], first dim tokens)."""

    gate_input: torch.Tensor   # [N, H] what the router was given
    logits: torch.Tensor       # [N, E] router logits (pre-softmax / pre-sigmoid)
    weights: torch.Tensor      # [N, k] routing weights as the model applied them
    ids: torch.Tensor          # [N, k] routed expert ids, int64


@dataclass
class RouterCapture:
    """Forward hooks on every router of a model; `calls[l]` lists the captured calls of MoE layer l.

    With `keep_graph=True` the captured tensors keep their autograd history (training's auxiliary loss);
    otherwise they are detached. Use as a context manager; `clear()` drops what was captured so far.
    `paused` suppresses capturing (e.g. while the recorder calls a router itself for look-ahead logits).
    """

    model: nn.Module
    keep_graph: bool = False
    routers: list[tuple[int, nn.Module]] = field(init=False)
    calls: list[list[RouterCall]] = field(init=False)
    paused: bool = field(default=False, init=False)
    _handles: list[Any] = field(default_factory=list, init=False)

    def __post_init__(self) -> None:
        self.routers = find_routers(self.model)
        self.calls = [[] for _ in self.routers]

    def _hook(self, slot: int):
        def hook(module: nn.Module, args: tuple, output: tuple) -> None:
            if self.paused:
                return
            x = args[0]
            x = x.reshape(-1, x.shape[-1])
            logits, weights, ids = output[0], output[1], output[2]
            if not self.keep_graph:
                x, logits, weights = x.detach(), logits.detach(), weights.detach()
            self.calls[slot].append(RouterCall(x, logits, weights, ids.detach().long()))

        return hook

    def __enter__(self) -> RouterCapture:
        for slot, (_, router) in enumerate(self.routers):
            self._handles.append(router.register_forward_hook(self._hook(slot)))
        return self

    def __exit__(self, *exc: object) -> None:
        for handle in self._handles:
            handle.remove()
        self._handles.clear()

    def clear(self) -> None:
        self.calls = [[] for _ in self.routers]

    def take_last(self) -> list[RouterCall]:
        """The one call per MoE layer of the forward just run; raises if a layer did not route exactly once."""
        got = [len(c) for c in self.calls]
        if any(n != 1 for n in got):
            raise RuntimeError(f"expected one router call per MoE layer in a forward, got {got}")
        out = [c[0] for c in self.calls]
        self.clear()
        return out

    def router_logits_on(self, layer: int, gate_input: torch.Tensor) -> torch.Tensor:
        """Router logits [N, E] of MoE layer `layer` applied to `gate_input` [N, H], via the router itself."""
        router = self.routers[layer][1]
        self.paused = True
        try:
            with torch.no_grad():
                return router(gate_input)[0]
        finally:
            self.paused = False
