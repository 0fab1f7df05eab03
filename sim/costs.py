"""Durations of the work the engine schedules, from a model spec and a hardware profile.

The one place compute and transfer times are derived (the engine, the controller's Fate prefetch count
and the analyses all ask here). Compute follows the profile's roofline, per kernel:
`launch + max(flops / FLOP/s, bytes / memory bandwidth)`; a quantised expert also pays its dequantisation
(bf16 output bytes / dequant throughput) each time it runs. Where the profile carries a measured
correction for an operation (`TokenScales`: measured / roofline time per token count), the roofline time
is multiplied by it; a correction for a quantised precision was measured on that precision's own path and
replaces the dequantisation term. Results are memoised per (tokens, precision).

The profile's engine overheads (`HardwareProfile.engine`, seconds per operation, 0 for an efficient
engine) enter here and only here: `per_expert_s` on every routed-expert invocation (GPU or CPU),
`per_dequant_s` on every run of a quantised expert charged through the dequantisation term, and
`per_moe_layer_s` once per MoE layer of every forward step (in `attention_s`, the layer's fixed segment).
"""

from __future__ import annotations

from functools import lru_cache

from sim.hardware import HardwareProfile
from sim.modelspec import ModelSpec


class CostModel:
    """Seconds for each piece of one forward step of `spec` on `hw`."""

    def __init__(self, spec: ModelSpec, hw: HardwareProfile) -> None:
        self.spec = spec
        self.hw = hw
        self.expert_bf16_bytes = spec.expert_bytes("bf16")
        """Bytes one routed expert's bf16 weights occupy when it runs (after any dequantisation)."""
        self.expert_s = lru_cache(maxsize=None)(self._expert_s)
        self.cpu_expert_s = lru_cache(maxsize=None)(self._cpu_expert_s)
        self.transfer_s = lru_cache(maxsize=None)(self._transfer_s)
        self._head_share_s = self.head_s() / spec.num_moe_layers
        """Each MoE layer's share of the vocabulary head (s): the same every step, so computed once."""

    def _expert_s(self, tokens: int, precision: str) -> float:
        """GPU time of one routed expert on `tokens` tokens, stored in `precision`."""
        roofline = self.hw.gpu.op_s(self.spec.expert_flops(tokens), self.expert_bf16_bytes)
        scales = self.hw.gpu_token_scale
        engine = self.hw.engine
        own = scales.factor(f"expert_{precision}", tokens)
        if own is not None:  # measured on the precision's own path: dequantisation included
            return roofline * own + engine.per_expert_s
        dequant = self.hw.dequant.dequant_s(precision, self.expert_bf16_bytes)
        if precision != "bf16":
            dequant += engine.per_dequant_s
        return roofline * scales.times("expert_bf16", tokens) + dequant + engine.per_expert_s

    def _cpu_expert_s(self, tokens: int) -> float:
        """CPU time of one routed expert on `tokens` tokens, reading its bf16 weights from host memory."""
        roofline = self.hw.cpu.compute.op_s(self.spec.expert_flops(tokens), self.expert_bf16_bytes)
        return roofline * self.hw.cpu_token_scale.times("expert_bf16", tokens) + self.hw.engine.per_expert_s

    def _transfer_s(self, nbytes: int) -> float:
        """Copy-engine time of one transfer of `nbytes`."""
        return self.hw.link.transfer_s(nbytes)

    def attention_s(self, tokens: int, context: int) -> float:
        """Per MoE layer, before its experts: layer overhead, the engine's per-MoE-layer software cost,
        attention with KV of `context`, router, and the layer's share of the step's work outside the MoE
        layers.

        Dense (non-MoE) decoder layers and the vocabulary head (`head_s`) are spread evenly over the MoE
        layers' attention segments: the step's total is exact, their place within the step approximate.
        """
        spec, gpu = self.spec, self.hw.gpu
        attn = (gpu.op_s(spec.attention_flops(tokens, context), spec.attention_bytes(context))
                * self.hw.gpu_token_scale.times("attention", tokens))
        router = gpu.op_s(spec.router_flops(tokens), spec.router_params * spec.weight_bytes)
        dense = 0.0
        if spec.num_dense_layers:
            per_dense = (self.hw.layer_overhead_s + attn
                         + gpu.op_s(spec.dense_mlp_flops(tokens), spec.dense_mlp_params * spec.weight_bytes))
            dense = per_dense * spec.num_dense_layers / spec.num_moe_layers
        return (self.hw.layer_overhead_s + self.hw.engine.per_moe_layer_s + attn + router + dense
                + self._head_share_s)

    def head_s(self) -> float:
        """The vocabulary head once per forward step, on one position: the logits of the step's last token
        (what a serving engine, and realrun, compute; a prefill's other positions need none)."""
        spec = self.spec
        head = self.hw.gpu.op_s(spec.lm_head_flops(1), spec.lm_head_bytes)
        return head * self.hw.gpu_token_scale.times("lm_head", 1)

    def shared_s(self, tokens: int) -> float:
        """Shared experts of one MoE layer (0 if the model has none)."""
        spec = self.spec
        if not spec.shared_expert_intermediate_size:
            return 0.0
        roofline = self.hw.gpu.op_s(spec.shared_expert_flops(tokens), spec.shared_expert_params * spec.weight_bytes)
        return roofline * self.hw.gpu_token_scale.times("shared", tokens)

    def decode_layer_s(self, precision: str = "int4", context: int = 256) -> float:
        """Compute time of one decode MoE layer with all top-k experts resident (Fate's "layer time")."""
        return (self.attention_s(1, context) + self.spec.top_k * self.expert_s(1, precision)
                + self.shared_s(1))
