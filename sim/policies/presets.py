"""Named policy presets: one composition of the six families per name, each citing its source.

`build_policy(name, overrides, model_type=...)` returns a frozen `PolicyConfig`: the preset, then its
per-model defaults (`MODEL_DEFAULTS`, by the model's family, e.g. Fate's INT2 share for DeepSeek models),
then `--set key=value` overrides of any component (allocation, eviction, prediction, prefetch, precision,
miss) or parameter. Unknown keys and bad values are refused with the valid choices; nothing is
fuzzy-matched.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Any

from sim.modelspec import PRECISIONS
from sim.policies.allocation import ALLOCATIONS
from sim.policies.eviction import EVICTIONS
from sim.policies.miss import MISSES
from sim.policies.precision import PRECISION_POLICIES
from sim.policies.prediction import PREDICTIONS
from sim.policies.prefetch import PREFETCHES
from traces.errors import UserError


@dataclass(frozen=True)
class PolicyConfig:
    """A complete offloading policy: six components and their parameters."""

    name: str
    allocation: str
    eviction: str
    prediction: str
    prefetch: str
    precision: str
    miss: str
    int2_rate: float = 0.3
    """fate-hybrid precision: share of prefill routing mass sent as INT2 (Fate: 0.3 Qwen, 0.5 DeepSeek)."""
    confidence: float = 0.0
    """fate prefetch, decode: minimum predicted probability to prefetch."""
    lookahead: int = 1
    """Layers ahead the predictor predicts for."""
    prefetch_count: int = 2
    """topk prefetch: experts prefetched per layer ahead."""
    shallow_layers: int = -1
    """shallow allocation: fully cached shallow layers (-1: as many as fit)."""
    eap_history: int = 256
    """eap prediction: stored activation paths."""
    miss_precision: str = "int2"
    """lowbit miss handling: precision of on-demand loads."""
    cancel_stale: bool = True
    """Cancel prefetches still queued when their layer routes elsewhere."""
    serial_loads: bool = False
    """On-demand loads of a layer step do not overlap compute: each starts once the expert computed before it
    in the step has finished (a serial load-compute loop, as in simple offloading baselines)."""
    predictor_recall: float | str = 0.84
    """noisy-oracle prediction: share of routed experts predicted (sim/policies/noisy_oracle.py), or the path
    of an `analyze predictors --json` report giving it per layer."""
    predictor_seed: int = 0
    """noisy-oracle prediction: seed of its random draws."""
    description: str = ""
    source: str = ""

    def components(self) -> dict[str, Any]:
        """The components and parameters (everything but name, description and source)."""
        return {f.name: getattr(self, f.name) for f in dataclasses.fields(self)
                if f.name not in ("name", "description", "source")}


CHOICES: dict[str, tuple[str, ...]] = {
    "allocation": ALLOCATIONS, "eviction": EVICTIONS, "prediction": PREDICTIONS, "prefetch": PREFETCHES,
    "precision": PRECISION_POLICIES, "miss": MISSES, "miss_precision": tuple(p for p in PRECISIONS if p != "bf16"),
    "cancel_stale": ("true", "false"), "serial_loads": ("true", "false"),
}
"""Valid values of each string-valued key."""

BOOLEAN_KEYS = ("cancel_stale", "serial_loads")
"""Keys whose values are "true" or "false"."""

RANGES: dict[str, tuple[float, float]] = {
    "int2_rate": (0.0, 1.0), "confidence": (0.0, 1.0), "lookahead": (1, 8), "prefetch_count": (0, 1024),
    "shallow_layers": (-1, 1024), "eap_history": (1, 1 << 20), "predictor_recall": (0.0, 1.0),
    "predictor_seed": (0, 2**31 - 1),
}
"""Inclusive ranges of the numeric keys."""

PRESETS: dict[str, dict[str, Any]] = {
    "lod": dict(
        allocation="uniform", eviction="none", prediction="none", prefetch="none", precision="bf16", miss="wait",
        description="load on demand: every routed expert is copied in when its layer runs, nothing is reused",
        source="the load-on-demand baseline of Fate (arXiv 2502.12224, section 6)"),
    "lru": dict(
        allocation="uniform", eviction="lru", prediction="none", prefetch="none", precision="bf16", miss="wait",
        description="per-layer LRU expert cache, misses loaded on demand, no prefetch",
        source="the LRU cache of mixtral-offloading (Eliseev & Mazur, arXiv 2312.17238) without its prefetch"),
    "mixtral-offloading": dict(
        allocation="uniform", eviction="lru", prediction="crosslayer", prefetch="topk", precision="int4",
        miss="wait", prefetch_count=2,
        description="LRU cache + speculative prefetch of the next layer's top experts, quantised experts",
        source="Eliseev & Mazur, arXiv 2312.17238 (HQQ 2/3-bit experts there; int4 is our nearest format)"),
    "eap": dict(
        allocation="uniform", eviction="lru", prediction="eap", prefetch="topk", precision="bf16", miss="wait",
        prefetch_count=4,
        description="prefetch along the most similar earlier expert activation path, LRU cache",
        source="the EAP baseline of Fate (arXiv 2502.12224); path tracing as in MoE-Infinity (arXiv 2401.14361)"),
    "fate": dict(
        allocation="shallow", eviction="arc", prediction="crosslayer", prefetch="fate", precision="fate-hybrid",
        miss="lowbit", miss_precision="int4", int2_rate=0.3, shallow_layers=4,
        description="cross-layer gate prefetch, shallow-favoring ARC cache (4 full layers), popularity-aware "
                    "INT4/INT2 prefetch, INT4 on-demand loads",
        source="Fate, Fang et al., arXiv 2502.12224; official code FFFzy/Fate_open @ 3bcfdb4: 4 shallow layers "
               "(utils/memory_cost.py), misses loaded at the layer's INT4 (load_weights), int2_rate 0.3 for "
               "Qwen and Mixtral, 0.5 for DeepSeek (the paper; MODEL_DEFAULTS)"),
    "speculate": dict(
        allocation="uniform", eviction="lru", prediction="speculative", prefetch="topk", precision="bf16",
        miss="speculated", prefetch_count=4,
        description="prefetch the quasi-hidden-state guess of the next layer; run the guessed experts on a miss",
        source="Speculating Experts, arXiv 2603.19289"),
    "cpu-exec": dict(
        allocation="popularity", eviction="lru", prediction="none", prefetch="none", precision="bf16", miss="cpu",
        description="most popular experts pinned in GPU memory, every other expert computed on the CPU",
        source="Fiddler (Kamahori et al., arXiv 2402.07033); llama.cpp --n-cpu-moe"),
    "hobbit": dict(
        allocation="uniform", eviction="lfu", prediction="none", prefetch="none", precision="bf16", miss="lowbit",
        miss_precision="int2",
        description="LFU cache of bf16 experts; misses load a low-bit copy instead of waiting for bf16",
        source="HOBBIT, Tang et al., arXiv 2411.01433"),
    "speculate-stream": dict(
        allocation="uniform", eviction="none", prediction="speculative", prefetch="all", precision="bf16",
        miss="speculated",
        description="no cache: each layer's guessed experts stream in ahead of it and are dropped after it; "
                    "a miss runs a guessed expert instead",
        source="the streaming engine of Speculating Experts, arXiv 2603.19289"),
    "oracle": dict(
        allocation="uniform", eviction="belady", prediction="oracle", prefetch="all", precision="bf16", miss="wait",
        description="perfect knowledge: Belady eviction and prefetch of exactly the experts to come (a bound)",
        source="Belady, IBM Systems Journal 1966; the trace's own future"),
}
"""name -> composition, description and source. The single registry of presets."""

MODEL_DEFAULTS: dict[str, dict[str, dict[str, Any]]] = {
    "fate": {"deepseek": {"int2_rate": 0.5}},
}
"""preset -> model family -> parameters that differ from the preset's default for that family (applied
before `--set` overrides). Fate: the share of prefill routing mass sent as INT2 is 0.5 for DeepSeekMoE
(0.3 for Qwen1.5-MoE and Mixtral, the preset's default), arXiv 2502.12224 section 6."""

MODEL_FAMILIES = {"deepseek": "deepseek", "deepseek_v2": "deepseek", "deepseek_v3": "deepseek",
                  "qwen2_moe": "qwen", "qwen3_moe": "qwen", "mixtral": "mixtral", "olmoe": "olmoe"}
"""Hugging Face model_type -> the family `MODEL_DEFAULTS` is keyed by."""


def model_family(model_type: str | None) -> str | None:
    """The family of a Hugging Face `model_type` (None: unknown or not given)."""
    return MODEL_FAMILIES.get(model_type) if model_type else None


def _parse_value(key: str, text: Any, default: Any) -> Any:
    if key in CHOICES:
        value = str(text).strip().lower() if key in BOOLEAN_KEYS else str(text).strip()
        if value not in CHOICES[key]:
            raise UserError(f"--set {key}={text}: not a valid value; choose one of {', '.join(CHOICES[key])}")
        return value == "true" if key in BOOLEAN_KEYS else value
    if key == "predictor_recall" and isinstance(text, str) and text.strip().lower().endswith(".json"):
        return text.strip()  # per-layer recall from an `analyze predictors --json` report (read by the replay)
    low, high = RANGES[key]
    kind = type(default)
    try:
        value = kind(text) if not isinstance(text, bool) else None
        if kind is int and isinstance(text, float) and not text.is_integer():
            value = None
    except (TypeError, ValueError):
        value = None
    if value is None or not low <= value <= high:
        raise UserError(f"--set {key}={text}: must be a{'n integer' if kind is int else ' number'} in "
                        f"[{low:g}, {high:g}]")
    return value


def build_policy(name: str, overrides: dict[str, Any] | None = None, *,
                 model_type: str | None = None) -> PolicyConfig:
    """The preset `name`, with its defaults for `model_type`'s family (`MODEL_DEFAULTS`), then `overrides`;
    UserError naming valid presets, keys or values."""
    if name not in PRESETS:
        raise UserError(f"unknown policy {name!r}; choose one of {', '.join(PRESETS)}")
    fields = {f.name: f for f in dataclasses.fields(PolicyConfig)}
    settable = [k for k in fields if k not in ("name", "description", "source")]
    values = dict(PRESETS[name])
    values.update(MODEL_DEFAULTS.get(name, {}).get(model_family(model_type), {}))
    for key, text in (overrides or {}).items():
        if key not in settable:
            raise UserError(f"--set {key}: unknown key; valid keys are {', '.join(settable)}")
        default = values.get(key, fields[key].default)
        values[key] = _parse_value(key, text, default)
    return PolicyConfig(name=name, **values)


def parse_overrides(items: tuple[str, ...] | list[str]) -> dict[str, str]:
    """`["k=v", ...]` from the command line -> {k: v}; UserError on an item without '='."""
    out: dict[str, str] = {}
    for item in items:
        key, sep, value = item.partition("=")
        if not sep or not key.strip() or not value.strip():
            raise UserError(f"--set {item!r}: write key=value, e.g. --set eviction=lru")
        out[key.strip()] = value.strip()
    return out
