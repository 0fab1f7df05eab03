"""The offloaded experts module: a drop-in for transformers' fused `*Experts` of one MoE layer.

transformers 5.x MoE blocks call `self.experts(hidden_states [N, H], top_k_index [N, k], top_k_weights
[N, k]) -> [N, H]`. `OffloadedExperts` keeps that signature but holds no weights: it hands the call to the
engine (`realrun.engine.OffloadEngine.run_experts`), which asks the controller for a plan, waits only for
experts whose bytes have not landed, and computes each expert from its fast-memory slot.

`expert_forward` is the per-expert arithmetic of transformers' eager experts loop, op for op, so that a
lossless run reproduces the plain model's outputs bit for bit (tests/realrun/test_engine.py).
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Protocol

import torch
from torch import nn
from torch.nn import functional as F


class ExpertRunner(Protocol):
    def run_experts(self, layer: int, hidden_states: torch.Tensor, top_k_index: torch.Tensor,
                    top_k_weights: torch.Tensor, act_fn: Callable[[torch.Tensor], torch.Tensor]) -> torch.Tensor:
        ...


def expert_forward(x: torch.Tensor, gate_up: torch.Tensor, down: torch.Tensor,
                   act_fn: Callable[[torch.Tensor], torch.Tensor], weights: torch.Tensor) -> torch.Tensor:
    """One expert on its tokens: x [n, H], gate_up [2I, H], down [H, I], weights [n, 1] -> [n, H].

    Same operations in the same order as transformers' `*Experts.forward` (eager), so equal inputs give
    bit-equal outputs.
    """
    gate, up = F.linear(x, gate_up).chunk(2, dim=-1)  # [n, I] each
    h = act_fn(gate) * up
    return F.linear(h, down) * weights


class OffloadedExperts(nn.Module):
    """Routed experts of MoE layer `layer` whose weights live in the engine's slow tier and slots."""

    def __init__(self, layer: int, num_experts: int, act_fn: Callable[[torch.Tensor], torch.Tensor],
                 runner: ExpertRunner | None) -> None:
        super().__init__()
        self.layer = layer
        """Index of this layer among the MoE layers (the trace's L axis)."""
        self.num_experts = num_experts
        self.act_fn = act_fn
        self._runner = runner  # not a submodule: the engine owns the model, not the other way round

    def forward(self, hidden_states: torch.Tensor, top_k_index: torch.Tensor,
                top_k_weights: torch.Tensor) -> torch.Tensor:
        if self._runner is None:
            raise RuntimeError("this model's offloading engine was closed; load the model again to run it")
        return self._runner.run_experts(self.layer, hidden_states, top_k_index, top_k_weights, self.act_fn)

    def extra_repr(self) -> str:
        return f"layer={self.layer}, num_experts={self.num_experts}, offloaded"


class StoreExperts:
    """Every routed expert computed straight from the slow tier, no cache: a streamed model's untimed
    warm-up forward and popularity prefills (it has no in-memory experts to run them with).

    Reads the `bf16` records when the store has them (the plain model's arithmetic, op for op), else the
    first precision it holds; experts are summed in ascending id order as transformers does.
    """

    def __init__(self, store, layouts: dict, device: torch.device) -> None:
        from realrun.quant import Dequantizer, Int4Matmuls
        from realrun.store import aligned_buffer

        self.store = store
        self.precision = "bf16" if "bf16" in layouts else next(iter(layouts))
        self.layout = layouts[self.precision]
        self.device = device
        self._host = aligned_buffer(store.padded_bytes(self.precision))
        self._dequant = Dequantizer(self.layout, device) if self.layout.group_size and self.layout.packing == "hqq" \
            else None
        self._int4 = Int4Matmuls(self.layout) if self.layout.packing == "tinygemm" else None

    def install(self, model: nn.Module) -> None:
        """Replace every MoE block's experts module with one served by this runner."""
        from realrun.engine import moe_blocks

        for layer, (_, block) in enumerate(moe_blocks(model)):
            block.experts = OffloadedExperts(layer, self.store.num_experts, block.experts.act_fn, self)

    def run_experts(self, layer: int, hidden_states: torch.Tensor, top_k_index: torch.Tensor,
                    top_k_weights: torch.Tensor, act_fn: Callable[[torch.Tensor], torch.Tensor]) -> torch.Tensor:
        from realrun.quant import raw_views

        final = torch.zeros_like(hidden_states)
        mask = F.one_hot(top_k_index, num_classes=self.store.num_experts + 1).permute(2, 1, 0)
        for expert in torch.unique(top_k_index).tolist():
            self.store.read_into(layer, expert, self.precision, self._host)
            record = self._host.to(self.device)
            top_k_pos, token_idx = torch.where(mask[expert])
            weights = top_k_weights[token_idx, top_k_pos, None]
            if self._int4 is not None:
                y = self._int4.forward(record, hidden_states[token_idx], act_fn) * weights
            else:
                gate_up, down = raw_views(record, self.layout) if self._dequant is None \
                    else self._dequant.unpack_into(record)
                if gate_up.dtype != hidden_states.dtype:
                    gate_up, down = gate_up.to(hidden_states.dtype), down.to(hidden_states.dtype)
                y = expert_forward(hidden_states[token_idx], gate_up, down, act_fn, weights)
            final.index_add_(0, token_idx, y.to(final.dtype))
        return final
