"""Model specs: the shapes, byte sizes and FLOPs of an MoE model, derived from its config.json.

A `ModelSpec` is built from a Hugging Face config (`ModelSpec.from_hf_config`), from a trace
(`ModelSpec.from_trace`), or by name from the built-in configs (`get_model_spec`). Every size the
simulator and realrun use comes from here: bytes of a routed expert in each precision (with the
quantisation metadata), shared-expert and non-expert bytes, KV-cache bytes per token, and FLOPs.

`PRECISIONS` is the one table of expert precisions; realrun packs experts to exactly these sizes.
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from traces.errors import UserError
from traces.model_configs import BUILTIN_CONFIGS, MOE_MODEL_TYPES, routing_config


@dataclass(frozen=True)
class Precision:
    """How one routed expert's weights are stored for transfer."""

    name: str
    bits: int
    """Bits per weight."""
    group_size: int
    """Weights sharing one scale and zero; 0 means unquantised."""
    meta_bytes_per_group: int
    """Bytes of metadata per group (float32 scale + float32 zero = 8)."""

    def matrix_bytes(self, num_weights: int) -> int:
        """Bytes of one packed weight matrix of `num_weights` elements, metadata included."""
        packed = math.ceil(num_weights * self.bits / 8)
        if self.group_size == 0:
            return packed
        return packed + math.ceil(num_weights / self.group_size) * self.meta_bytes_per_group


PRECISIONS: dict[str, Precision] = {
    "bf16": Precision("bf16", bits=16, group_size=0, meta_bytes_per_group=0),
    "int8": Precision("int8", bits=8, group_size=64, meta_bytes_per_group=8),
    "int4": Precision("int4", bits=4, group_size=64, meta_bytes_per_group=8),
    "int2": Precision("int2", bits=2, group_size=32, meta_bytes_per_group=8),
}
"""Expert precisions: int formats are HQQ-style affine quantisation along groups, float32 scale and zero."""

DTYPE_BYTES = {"bfloat16": 2, "float16": 2, "float32": 4}


def get_precision(name: str) -> Precision:
    """The precision called `name`, or a UserError listing the valid ones."""
    if name not in PRECISIONS:
        raise UserError(f"unknown precision {name!r}; choose one of {', '.join(PRECISIONS)}")
    return PRECISIONS[name]


@dataclass(frozen=True)
class ModelSpec:
    """Shapes of an MoE transformer, enough to size its weights, KV cache and FLOPs."""

    name: str
    model_type: str
    num_layers: int
    """Decoder layers in total (dense and MoE)."""
    moe_layer_indices: tuple[int, ...]
    """Decoder indices of the MoE layers; the trace's layer axis L follows this order."""
    num_experts: int
    top_k: int
    hidden_size: int
    expert_intermediate_size: int
    num_shared_experts: int
    shared_expert_intermediate_size: int
    """Intermediate size of all shared experts of one layer together (0 if none)."""
    dense_intermediate_size: int
    """Intermediate size of the MLP of a dense (non-MoE) layer."""
    num_attention_heads: int
    num_key_value_heads: int
    head_dim: int
    vocab_size: int
    tie_word_embeddings: bool
    dtype: str = "bfloat16"
    kv_lora_rank: int = 0
    """Multi-head latent attention (DeepSeek-V2/V3): compressed KV width; 0 for ordinary attention."""
    q_lora_rank: int = 0
    qk_rope_head_dim: int = 0
    qk_nope_head_dim: int = 0
    v_head_dim: int = 0
    has_shared_expert_gate: bool = False
    approximate: bool = False
    """True when attention shapes were guessed (trace without a full config)."""

    # --- structure -------------------------------------------------------------------------------
    @property
    def num_moe_layers(self) -> int:
        return len(self.moe_layer_indices)

    @property
    def num_dense_layers(self) -> int:
        return self.num_layers - self.num_moe_layers

    @property
    def weight_bytes(self) -> int:
        """Bytes per weight of the unquantised model."""
        return DTYPE_BYTES[self.dtype]

    @property
    def is_mla(self) -> bool:
        return self.kv_lora_rank > 0

    # --- parameters --------------------------------------------------------------------------------
    @property
    def expert_params(self) -> int:
        """Weights of one routed expert (gate, up and down projections)."""
        return 3 * self.hidden_size * self.expert_intermediate_size

    @property
    def shared_expert_params(self) -> int:
        """Weights of all shared experts of one MoE layer (and their gate, if any)."""
        gate = self.hidden_size if self.has_shared_expert_gate else 0
        return 3 * self.hidden_size * self.shared_expert_intermediate_size + gate

    @property
    def attention_params(self) -> int:
        """Weights of one layer's attention projections."""
        h = self.hidden_size
        if self.is_mla:
            qk_head = self.qk_nope_head_dim + self.qk_rope_head_dim
            if self.q_lora_rank:
                q = h * self.q_lora_rank + self.q_lora_rank + self.q_lora_rank * self.num_attention_heads * qk_head
            else:
                q = h * self.num_attention_heads * qk_head
            kv_down = h * (self.kv_lora_rank + self.qk_rope_head_dim) + self.kv_lora_rank
            kv_up = self.kv_lora_rank * self.num_attention_heads * (self.qk_nope_head_dim + self.v_head_dim)
            out = self.num_attention_heads * self.v_head_dim * h
            return q + kv_down + kv_up + out
        q = h * self.num_attention_heads * self.head_dim
        kv = 2 * h * self.num_key_value_heads * self.head_dim
        out = self.num_attention_heads * self.head_dim * h
        return q + kv + out

    @property
    def router_params(self) -> int:
        return self.hidden_size * self.num_experts

    @property
    def dense_mlp_params(self) -> int:
        return 3 * self.hidden_size * self.dense_intermediate_size

    @property
    def non_expert_params(self) -> int:
        """Everything but routed and shared experts: embeddings, head, attention, norms, routers, dense MLPs."""
        embed = self.vocab_size * self.hidden_size
        head = 0 if self.tie_word_embeddings else embed
        norms = (2 * self.num_layers + 1) * self.hidden_size
        return (
            embed
            + head
            + norms
            + self.num_layers * self.attention_params
            + self.num_moe_layers * self.router_params
            + self.num_dense_layers * self.dense_mlp_params
        )

    # --- bytes -------------------------------------------------------------------------------------
    def expert_bytes(self, precision: str = "bf16") -> int:
        """Bytes of one routed expert stored in `precision`, quantisation metadata included."""
        p = get_precision(precision)
        if p.name == "bf16":
            return self.expert_params * self.weight_bytes
        return 3 * p.matrix_bytes(self.hidden_size * self.expert_intermediate_size)

    def routed_expert_bytes_total(self, precision: str = "bf16") -> int:
        """Bytes of all routed experts of all MoE layers."""
        return self.num_moe_layers * self.num_experts * self.expert_bytes(precision)

    @property
    def shared_expert_bytes_total(self) -> int:
        return self.num_moe_layers * self.shared_expert_params * self.weight_bytes

    @property
    def non_expert_bytes(self) -> int:
        return self.non_expert_params * self.weight_bytes

    def kv_cache_bytes_per_token(self) -> int:
        """KV-cache bytes one token adds across all layers."""
        if self.is_mla:
            per_layer = self.kv_lora_rank + self.qk_rope_head_dim
        else:
            per_layer = 2 * self.num_key_value_heads * self.head_dim
        return self.num_layers * per_layer * self.weight_bytes

    def resident_bytes(self, kv_tokens: int) -> int:
        """Bytes that always sit in fast memory: non-expert weights, shared experts, KV cache for `kv_tokens`."""
        return self.non_expert_bytes + self.shared_expert_bytes_total + kv_tokens * self.kv_cache_bytes_per_token()

    # --- FLOPs -------------------------------------------------------------------------------------
    def expert_flops(self, tokens: int) -> float:
        """FLOPs of one routed expert on `tokens` tokens."""
        return 2.0 * self.expert_params * tokens

    def shared_expert_flops(self, tokens: int) -> float:
        return 2.0 * self.shared_expert_params * tokens

    def dense_mlp_flops(self, tokens: int) -> float:
        return 2.0 * self.dense_mlp_params * tokens

    def router_flops(self, tokens: int) -> float:
        return 2.0 * self.router_params * tokens

    def attention_flops(self, tokens: int, context: int) -> float:
        """FLOPs of one layer's attention for `tokens` new tokens attending to `context` positions each."""
        if self.is_mla:
            score_dim = self.qk_nope_head_dim + self.qk_rope_head_dim
            value_dim = self.v_head_dim
        else:
            score_dim = value_dim = self.head_dim
        projections = 2.0 * self.attention_params * tokens
        scores = 2.0 * self.num_attention_heads * (score_dim + value_dim) * tokens * context
        return projections + scores

    def lm_head_flops(self, tokens: int) -> float:
        """FLOPs of the vocabulary head (final hidden state -> logits) for `tokens` positions."""
        return 2.0 * self.vocab_size * self.hidden_size * tokens

    @property
    def lm_head_bytes(self) -> int:
        """Bytes of the vocabulary head's weights (the embedding matrix when they are tied)."""
        return self.vocab_size * self.hidden_size * self.weight_bytes

    def attention_bytes(self, context: int) -> int:
        """Bytes one layer's attention reads: its weights and the KV cache of `context` positions."""
        kv = context * self.kv_cache_bytes_per_token() // self.num_layers
        return self.attention_params * self.weight_bytes + kv

    # --- construction ------------------------------------------------------------------------------
    @classmethod
    def from_hf_config(cls, cfg: dict[str, Any], name: str | None = None) -> ModelSpec:
        """A spec from a Hugging Face config.json dict of a supported MoE model type."""
        model_type = cfg.get("model_type", "")
        if model_type not in MOE_MODEL_TYPES:
            raise UserError(
                f"model type {model_type!r} is not a supported MoE architecture; "
                f"supported: {', '.join(MOE_MODEL_TYPES)}"
            )
        try:
            return _spec_from_config(cfg, name or cfg.get("_name_or_path") or model_type)
        except KeyError as missing:
            raise UserError(f"config of {name or model_type} lacks the key {missing}; is it a complete config.json?") from None

    @classmethod
    def from_config_file(cls, path: str | Path) -> ModelSpec:
        """A spec from a config.json file, or a model directory holding one."""
        path = Path(path)
        if path.is_dir():
            path = path / "config.json"
        try:
            cfg = json.loads(path.read_text())
        except FileNotFoundError:
            raise UserError(f"no config.json at {path}") from None
        except json.JSONDecodeError as error:
            raise UserError(f"{path} is not valid JSON ({error.msg} at line {error.lineno})") from None
        return cls.from_hf_config(cfg, name=str(path.parent))

    @classmethod
    def from_trace(cls, trace: Any) -> ModelSpec:
        """The spec of the model a trace was recorded from.

        Uses the trace's full `hf_config` when present, then a built-in spec of the same name and
        structure, and otherwise approximates attention shapes from the trace's model_config.
        """
        if trace.hf_config:
            return cls.from_hf_config(trace.hf_config, name=trace.model)
        if trace.model in BUILTIN_CONFIGS:
            spec = get_model_spec(trace.model)
            check_same_structure(spec, trace)
            return spec
        mc = trace.model_config
        heads = max(1, mc.hidden_size // 128)
        return cls(
            name=trace.model,
            model_type=mc.architecture,
            num_layers=mc.num_layers,
            moe_layer_indices=tuple(mc.moe_layer_indices),
            num_experts=mc.num_experts,
            top_k=mc.top_k,
            hidden_size=mc.hidden_size,
            expert_intermediate_size=mc.expert_intermediate_size,
            num_shared_experts=mc.num_shared_experts,
            shared_expert_intermediate_size=mc.shared_expert_intermediate_size,
            dense_intermediate_size=4 * mc.hidden_size,
            num_attention_heads=heads,
            num_key_value_heads=heads,
            head_dim=mc.hidden_size // heads,
            vocab_size=32000,
            tie_word_embeddings=False,
            dtype=mc.dtype if mc.dtype in DTYPE_BYTES else "bfloat16",
            approximate=True,
        )


def _spec_from_config(cfg: dict[str, Any], name: str) -> ModelSpec:
    routing = routing_config(cfg)
    model_type = routing.architecture
    hidden = routing.hidden_size
    heads = int(cfg["num_attention_heads"])
    kv_heads = int(cfg.get("num_key_value_heads") or heads)
    head_dim = int(cfg.get("head_dim") or hidden // heads)
    mla: dict[str, int] = {}
    if model_type in ("deepseek_v2", "deepseek_v3") and cfg.get("kv_lora_rank"):
        mla = {
            "kv_lora_rank": int(cfg["kv_lora_rank"]),
            "q_lora_rank": int(cfg.get("q_lora_rank") or 0),
            "qk_rope_head_dim": int(cfg["qk_rope_head_dim"]),
            "qk_nope_head_dim": int(cfg["qk_nope_head_dim"]),
            "v_head_dim": int(cfg["v_head_dim"]),
        }
    return ModelSpec(
        name=name,
        model_type=model_type,
        num_layers=routing.num_layers,
        moe_layer_indices=routing.moe_layer_indices,
        num_experts=routing.num_experts,
        top_k=routing.top_k,
        hidden_size=hidden,
        expert_intermediate_size=routing.expert_intermediate_size,
        num_shared_experts=routing.num_shared_experts,
        shared_expert_intermediate_size=routing.shared_expert_intermediate_size,
        dense_intermediate_size=int(cfg["intermediate_size"]),
        num_attention_heads=heads,
        num_key_value_heads=kv_heads,
        head_dim=head_dim,
        vocab_size=int(cfg["vocab_size"]),
        tie_word_embeddings=bool(cfg.get("tie_word_embeddings", False)),
        dtype=routing.dtype,
        # Qwen's shared expert output is scaled by a sigmoid gate (hidden -> 1).
        has_shared_expert_gate=model_type in ("qwen2_moe", "qwen3_moe") and routing.num_shared_experts > 0,
        **mla,
    )


def list_model_specs() -> list[str]:
    """Names of the built-in model specs."""
    return sorted(BUILTIN_CONFIGS)


def get_model_spec(name: str) -> ModelSpec:
    """A built-in spec by name, or the spec of a config.json / model directory at path `name`."""
    if name in BUILTIN_CONFIGS:
        return ModelSpec.from_hf_config(BUILTIN_CONFIGS[name], name=name)
    if Path(name).exists():
        return ModelSpec.from_config_file(name)
    raise UserError(f"unknown model {name!r}; use a config.json path or one of {', '.join(list_model_specs())}")


def check_same_structure(spec: ModelSpec, trace: Any) -> None:
    """Refuse to replay `trace` with `spec` unless MoE layers, experts and top-k match."""
    mc = trace.model_config
    mine = (spec.num_moe_layers, spec.num_experts, spec.top_k)
    theirs = (len(mc.moe_layer_indices), mc.num_experts, mc.top_k)
    if mine != theirs:
        raise UserError(
            f"trace of {trace.model} has {theirs[0]} MoE layers, {theirs[1]} experts, top-{theirs[2]} but "
            f"{spec.name} has {mine[0]}, {mine[1]}, top-{mine[2]}; pick a model with the same routing structure"
        )
