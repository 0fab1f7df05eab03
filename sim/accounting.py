"""Fate's budget accounting: what the official Fate code does with "a memory budget of N GB".

fatesim's own budgets (`sim.budget.resolve_budget`) count fast memory as everything that is not a routed
expert (fatesim's `ModelSpec.resident_bytes`: non-expert weights, shared experts, the KV cache of the trace)
plus the expert cache. Fate's code (`memory_cost_qwen`, `memory_cost_deepseek`, `memory_cost_mixtral` in
FFFzy/Fate_open `utils/memory_cost.py`, commit 3bcfdb4; the official implementation of arXiv 2502.12224)
reads `--memory_budget N` as N x 1024 MiB and, before sizing the expert cache, subtracts:

- the embeddings and the vocabulary head (2 x V x H fp16), every layer's attention projections (and
  Qwen's attention biases), the rotary cos/sin caches (fp32, max_position_embeddings long, per layer),
  the norms, every router (and Qwen's shared-expert gates), every layer's shared experts (and
  DeepSeekMoE's dense first MLP);
- a KV cache and hidden states for 1024 tokens (2 x 1024 x layers x H fp16, 2 x 1024 x H fp16);
- "meta_data, prefetch": 0.3 MiB x (3E + 13) x layers (1389.6 MiB = 1.36 GiB for Qwen1.5-MoE), then
  +1400 MiB back for DeepSeekMoE and +500 MiB for Mixtral (constants of the code, no comment given).

What is left is counted in INT4 experts (group 64, fp32 scale and zero: fatesim's `int4` size, checked in
tests): with at least 4 layers' worth, the first 4 MoE layers are cached completely and the rest of the
slots are split evenly over the deeper layers (floor); with fewer, the first layers are cached completely
in order and the next one partly. (With room for every expert in INT4 or bf16 nothing is offloaded.)

`fate_accounting` reproduces those numbers exactly (in bytes; the code works in MiB floats). A layer the
code leaves with 0 cached experts still holds its prefetched and loaded experts while it runs (from the
reserve above); fatesim's controller models that working set as slots, so `sim_expert_budget` gives every
MoE layer at least top-k slots and says when that floor was applied.
"""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass

from sim.modelspec import ModelSpec
from sim.policies.precision import PrecisionPolicy, largest
from sim.policies.presets import PolicyConfig
from traces.errors import UserError

MIB = 1 << 20
GIB = 1 << 30
KV_RESERVE_TOKENS = 1024
"""Tokens of KV cache and hidden state the code reserves ("Reserve space for 1024")."""
FATE_SHALLOW_LAYERS = 4
"""MoE layers the code caches completely when the budget allows ("weather shallow can be all cached")."""
SOURCE = "FFFzy/Fate_open utils/memory_cost.py @ 3bcfdb4 (official code of Fate, arXiv 2502.12224)"

MAX_POSITION_EMBEDDINGS = {"qwen1.5-moe-a2.7b": 8192, "deepseek-moe-16b": 4096, "mixtral-8x7b": 32768}
"""The models' `max_position_embeddings` (their Hugging Face config.json), which sizes the rotary caches
the code subtracts; fatesim's built-in specs do not carry it."""

_ADJUST_MIB = {"qwen2_moe": 0.0, "deepseek": 1400.0, "mixtral": 500.0}
"""MiB the code adds back after subtracting the metadata reserve, per architecture."""


@dataclass(frozen=True)
class FateAccounting:
    """Fate's expert cache for one model and budget, as the official code sizes it."""

    budget_bytes: int
    """The budget the code was given: N GB is N x 1024 MiB."""
    reserved_bytes: dict[str, float]
    """What the code subtracts before the expert cache, by item (bytes; negative: added back)."""
    available_bytes: float
    """Left for routed experts."""
    int4_expert_bytes: float
    """One routed expert in INT4, as the code sizes it."""
    mode: str
    """"offload" (an expert cache, the rest streamed), "all-int4" or "all-bf16" (nothing offloaded)."""
    cache_slots: int
    """INT4 experts the cache holds ("cache_num"; every expert when nothing is offloaded)."""
    slots_per_layer: tuple[int, ...]
    """Cached experts of each MoE layer (the code's num_experts - offload_map)."""
    fully_cached_layers: int
    """Leading MoE layers cached completely."""

    @property
    def reserved_total_bytes(self) -> float:
        return float(sum(self.reserved_bytes.values()))


def _reserved(spec: ModelSpec, max_positions: int) -> tuple[dict[str, float], int]:
    """(items the code subtracts, in bytes; its layer count for the caches)."""
    arch = spec.model_type
    if arch not in _ADJUST_MIB:
        raise UserError(f"Fate's code has budget accounting for Qwen1.5-MoE, DeepSeekMoE and Mixtral only, not "
                        f"{spec.name} ({arch}); use the default accounting")
    h, v, e = spec.hidden_size, spec.vocab_size, spec.num_experts
    heads, kv_heads = spec.num_attention_heads, spec.num_key_value_heads
    head_dim = h // heads  # the code's head_dim, whatever the config says
    layers = spec.num_layers
    items = {
        "embeddings and head": 2.0 * v * h * 2,
        "attention": 2.0 * (h * heads * head_dim + h * kv_heads * head_dim) * layers * 2,
        "rotary caches": (head_dim // 2 + head_dim * max_positions * 2) * layers * 4.0,
        "norms": (2.0 * h * layers + h) * 2,
        "routers": -1.0 * h * e * layers * 2 if arch == "mixtral" else 1.0 * h * e * layers * 2,
        f"KV cache ({KV_RESERVE_TOKENS} tokens)": 2.0 * KV_RESERVE_TOKENS * layers * h * 2,
        f"hidden states ({KV_RESERVE_TOKENS} tokens)": 2.0 * KV_RESERVE_TOKENS * h * 2,
        "metadata and prefetch": 0.3 * (3 * e + 3 + 4 + 2 + 2 + 2) * layers * MIB,
        "added back": -_ADJUST_MIB[arch] * MIB,
    }
    if arch == "qwen2_moe":
        items["attention biases"] = (heads * head_dim + 2.0 * kv_heads * head_dim) * layers * 2
        items["shared-expert gates"] = 1.0 * h * layers * layers * 2
        items["shared experts"] = 3.0 * h * spec.shared_expert_intermediate_size * 2 * layers
    elif arch == "deepseek":
        items["shared experts"] = 3.0 * h * spec.shared_expert_intermediate_size * 2 * layers
        items["dense MLP"] = 3.0 * h * spec.dense_intermediate_size * 2
    cache_layers = layers - 1 if arch == "deepseek" else layers
    return items, cache_layers


def fate_accounting(spec: ModelSpec, budget_bytes: int, *, max_position_embeddings: int | None = None,
                    shallow_layers: int = FATE_SHALLOW_LAYERS) -> FateAccounting:
    """Fate's expert cache for `spec` at `budget_bytes` (the paper's "N GB" is N x 2**30 bytes).

    Raises UserError when the budget does not even hold what the code subtracts (the code asserts).
    Note for Mixtral: the code's `- - expert_gate` adds the routers back instead of subtracting them;
    this function does the same, to give the code's numbers.
    """
    max_positions = max_position_embeddings or MAX_POSITION_EMBEDDINGS.get(spec.name)
    if not max_positions:
        raise UserError(f"Fate's accounting needs max_position_embeddings for {spec.name}; it is known for "
                        f"{', '.join(MAX_POSITION_EMBEDDINGS)}")
    items, layers = _reserved(spec, max_positions)
    if layers != spec.num_moe_layers:
        raise UserError(f"{spec.name}: Fate's code caches {layers} layers but the model has {spec.num_moe_layers} "
                        "MoE layers; its accounting does not apply")
    available = budget_bytes - sum(items.values())
    if available < 0:
        raise UserError(f"a budget of {budget_bytes / GIB:.2f} GiB is below the {sum(items.values()) / GIB:.2f} GiB "
                        f"Fate's code reserves for {spec.name} before any expert; raise the budget")
    e = spec.num_experts
    bf16 = 3.0 * spec.hidden_size * spec.expert_intermediate_size * 2
    scale_zero = 2.0 * (spec.expert_intermediate_size // 64 * spec.hidden_size) * 4
    int4 = bf16 / 4 + 3 * scale_zero
    if available > layers * e * bf16 or available > layers * e * int4:
        mode = "all-bf16" if available > layers * e * bf16 else "all-int4"
        return FateAccounting(budget_bytes, items, available, int4, mode, layers * e, (e,) * layers, layers)
    cache = math.floor(available / int4)
    full = cache // e
    if full < shallow_layers:
        slots = [e] * full + [cache - e * full] + [0] * (layers - full - 1)
    else:
        full = shallow_layers
        deep = (cache - shallow_layers * e) // (layers - shallow_layers)
        slots = [e] * shallow_layers + [deep] * (layers - shallow_layers)
    return FateAccounting(budget_bytes, items, available, int4, "offload", cache, tuple(slots[:layers]), full)


def fate_budget_for_cache(spec: ModelSpec, cache_slots: int, *, max_position_embeddings: int | None = None) -> float:
    """The smallest budget (bytes) for which Fate's code caches `cache_slots` INT4 experts: its reserve plus
    the slots (what a fatesim budget corresponds to in the paper's "N GB")."""
    probe = fate_accounting(spec, 1 << 50, max_position_embeddings=max_position_embeddings)
    return probe.reserved_total_bytes + cache_slots * probe.int4_expert_bytes


def fatesim_share_in_fate_gib(spec: ModelSpec, share: float) -> float:
    """fatesim's "share of the routed experts (bf16 bytes)" budget, e.g. 0.25 for `25%`, as Fate's "N GB"
    (GiB): the same expert bytes filled with Fate's INT4 experts, plus the code's reserve."""
    slots = int(share * spec.routed_expert_bytes_total("bf16")) // spec.expert_bytes("int4")
    return fate_budget_for_cache(spec, slots) / GIB


def policy_slot_bytes(spec: ModelSpec, policy: PolicyConfig) -> int:
    """Bytes of one of the controller's slots under `policy` (the largest precision it loads)."""
    stored = PrecisionPolicy(policy.precision, policy.int2_rate).storage_precisions()
    if policy.miss == "lowbit":
        stored = stored + (policy.miss_precision,)
    return spec.expert_bytes(largest(stored))


@dataclass(frozen=True)
class SimBudget:
    """A Fate budget as fatesim's controller takes it."""

    expert_budget_bytes: int
    policy: PolicyConfig
    """The policy, with `shallow_layers` set to the code's fully cached layers under shallow allocation."""
    adjusted: bool
    """Whether fatesim's slots differ from the code's cache: a layer floored at top-k working slots (the
    code streams through transient buffers it does not count as cache), or the code's one partly cached
    layer spread evenly over the deeper layers (the controller's shallow allocation splits evenly)."""
    accounting: FateAccounting


def sim_expert_budget(spec: ModelSpec, budget_bytes: int, policy: PolicyConfig, *,
                      max_position_embeddings: int | None = None) -> SimBudget:
    """The expert budget and policy that replay Fate's accounting of `budget_bytes` in fatesim.

    Shallow allocation (fate): the code's per-layer INT4 cache, every layer floored at top-k slots, as
    slots of the policy's size, with `shallow_layers` = the code's fully cached layers (the controller then
    splits the rest evenly, as the code does). Other allocations: the bytes the code leaves for experts,
    at least top-k slots per layer (what load-on-demand needs to run a layer).
    """
    shallow = policy.shallow_layers if policy.shallow_layers >= 0 else FATE_SHALLOW_LAYERS
    acc = fate_accounting(spec, budget_bytes, max_position_embeddings=max_position_embeddings,
                          shallow_layers=shallow)
    slot = policy_slot_bytes(spec, policy)
    k = spec.top_k
    if policy.allocation == "shallow":
        slots = [max(s, k) for s in acc.slots_per_layer]
        adjusted = slots != list(acc.slots_per_layer)
        full = acc.fully_cached_layers
        if acc.mode == "offload" and full < shallow and acc.slots_per_layer[full] > 0:
            adjusted = True  # the code's partly cached layer becomes an evenly split deep layer here
        budget = sum(slots) * slot
        return SimBudget(budget, dataclasses.replace(policy, shallow_layers=min(full, shallow)), adjusted, acc)
    need = spec.num_moe_layers * k * slot
    available = int(acc.available_bytes)
    return SimBudget(max(available, need), policy, available < need, acc)
