"""What every importer shares: the built-in model configs, `--model-spec` and `--prompt-tokens`, assembling
sequences into a Trace, and reading JSON-lines files with errors that name the file and line.

The models an import can be attributed to are built-ins of `traces.model_configs`, the configs sim's
`get_model_spec(name)` reads too.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from traces.errors import UserError
from traces.format import Trace, TraceModelConfig, utc_now_iso, validate_trace
from traces.model_configs import BUILTIN_CONFIGS, HF_IDS, routing_config


@dataclass(frozen=True)
class KnownModel:
    """A built-in model an imported trace can be attributed to."""

    hf_id: str
    """Hugging Face id of the model."""
    config: TraceModelConfig


IMPORT_MODELS = ("deepseek-v2-lite", "deepseek-moe-16b", "qwen1.5-moe-a2.7b", "mixtral-8x7b")
"""Built-in models whose routing the importers' sources log (or share: DeepSeekMoE-16B routes as V2-Lite)."""

KNOWN_MODELS: dict[str, KnownModel] = {
    name: KnownModel(HF_IDS[name], routing_config(BUILTIN_CONFIGS[name])) for name in IMPORT_MODELS
}
"""name (as sim.modelspec.get_model_spec knows it) -> model."""


def resolve_model(spec_name: str | None, default_name: str, *, logged_layers: Sequence[int],
                  num_experts: int | None, top_k: int, what: str) -> tuple[str, TraceModelConfig]:
    """Pick the model config for an import: `spec_name` if given, else the source's own model.

    `logged_layers` are the decoder indices of the MoE layers present in the data; the returned config's
    moe_layer_indices are exactly those. Raises UserError when the spec's experts, top-k or MoE layers do
    not fit the data. Returns (spec name, config).
    """
    name = default_name if spec_name is None else spec_name
    if name not in KNOWN_MODELS:
        raise UserError(f"unknown --model-spec {name!r}; choose one of {', '.join(sorted(KNOWN_MODELS))}")
    cfg = KNOWN_MODELS[name].config
    if cfg.top_k != top_k or num_experts not in (None, cfg.num_experts):
        data = f"top-{top_k}" if num_experts is None else f"{num_experts} experts top-{top_k}"
        raise UserError(f"--model-spec {name} routes {cfg.num_experts} experts top-{cfg.top_k}, but {what} has "
                        f"{data} routing; choose a spec with the same routing")
    outside = sorted(set(logged_layers) - set(cfg.moe_layer_indices))
    if outside:
        raise UserError(f"--model-spec {name} has no MoE layer {outside[0]}, which {what} logs; "
                        "choose a spec with these MoE layers")
    return name, dataclasses.replace(cfg, moe_layer_indices=tuple(sorted(logged_layers)))


def trace_model_name(name: str, cfg: TraceModelConfig, routed_by: str) -> str:
    """The trace's `model`: the spec name (sim's `ModelSpec.from_trace` then uses that built-in spec) when
    every MoE layer of the spec was logged, else the source model's id (sim then approximates the model
    from model_config, whose moe_layer_indices list only the logged layers)."""
    full = KNOWN_MODELS[name].config.moe_layer_indices
    return name if tuple(cfg.moe_layer_indices) == tuple(full) else routed_by


def layer_coverage_note(name: str, cfg: TraceModelConfig) -> list[str]:
    """An assumption line when only some of the model's MoE layers were logged."""
    full = KNOWN_MODELS[name].config.moe_layer_indices
    if tuple(cfg.moe_layer_indices) == tuple(full):
        return []
    return [f"only MoE layers {list(cfg.moe_layer_indices)} of the model's {len(full)} were logged; "
            "model_config.moe_layer_indices lists just these, so a replay sees no routed experts elsewhere"]


@dataclass
class ImportedSequence:
    """One imported sequence before assembly: its routing and which of its positions are prefill."""

    topk_ids: np.ndarray  # [n, L, k] integer
    topk_weights: np.ndarray  # [n, L, k] float
    is_prefill: np.ndarray  # [n] bool
    first_position: int = 0


def check_prompt_tokens(prompt_tokens: int | None) -> None:
    """`--prompt-tokens` must be a non-negative count."""
    if prompt_tokens is not None and prompt_tokens < 0:
        raise UserError(f"--prompt-tokens must be >= 0, got {prompt_tokens}")


def prompt_tokens_note(prompt_tokens: int) -> str:
    return (f"--prompt-tokens {prompt_tokens}: the first {prompt_tokens} positions of each sequence are taken as "
            "prefill, the rest as decode (overrides the source's own split)")


def assemble(seqs: list[ImportedSequence], *, model: str, model_config: TraceModelConfig, source: dict[str, Any],
             prompt_tokens: int | None = None) -> Trace:
    """Concatenate sequences (in the given order) into a validated Trace with unknown token ids (-1)."""
    seqs = [s for s in seqs if len(s.is_prefill)]
    if not seqs:
        raise UserError(f"no tokens left to import from {', '.join(source.get('files', [])) or 'the sources'}")
    lengths = [len(s.is_prefill) for s in seqs]
    T = sum(lengths)
    positions = np.concatenate([s.first_position + np.arange(n) for s, n in zip(seqs, lengths, strict=True)])
    if prompt_tokens is None:
        is_prefill = np.concatenate([s.is_prefill for s in seqs])
    else:
        is_prefill = np.concatenate([np.arange(n) < prompt_tokens for n in lengths])
    trace = Trace(
        model=model, model_config=model_config, source=source, prompts={}, created=utc_now_iso(),
        token_ids=np.full(T, -1, np.int32),
        seq_ids=np.repeat(np.arange(len(seqs), dtype=np.int32), lengths),
        positions=positions.astype(np.int32),
        is_prefill=is_prefill.astype(np.uint8),
        topk_ids=np.concatenate([s.topk_ids for s in seqs]).astype(np.int16),
        topk_weights=np.concatenate([s.topk_weights for s in seqs]).astype(np.float16),
    )
    validate_trace(trace)
    return trace


def file_sha256(path: Path) -> str:
    """sha256 (hex) of a file's bytes."""
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def read_jsonl(path: Path) -> Iterator[tuple[int, dict[str, Any]]]:
    """Yield (line number, object) for each non-empty line; UserError naming file and line on bad JSON."""
    try:
        f = open(path, encoding="utf-8")
    except OSError as error:
        raise UserError(f"cannot read {path}: {error.strerror}") from None
    with f:
        try:
            for number, line in enumerate(f, start=1):
                if not line.strip():
                    continue
                try:
                    obj = json.loads(line)
                except json.JSONDecodeError:
                    raise UserError(f"{path}:{number}: not a JSON line; expected a JSON-lines routing log") from None
                if not isinstance(obj, dict):
                    raise UserError(f"{path}:{number}: expected a JSON object per line")
                yield number, obj
        except UnicodeDecodeError:
            raise UserError(f"{path}: not a UTF-8 text file; expected a JSON-lines routing log") from None


def field(path: Path, number: int, obj: dict[str, Any], key: str) -> Any:
    """obj[key], or a UserError naming the file, line and missing key."""
    if key not in obj:
        raise UserError(f"{path}:{number}: row lacks {key!r}; is this the right FORMAT (the first argument of "
                        "`fatesim trace import`: esft, vllm-jsonl or mixtral-jsonl)?")
    return obj[key]


def check_ids(path: Path, ids: np.ndarray, num_experts: int, top_k: int) -> None:
    """Expert ids in [0, E), k per row: UserError naming the file otherwise."""
    if ids.ndim != 2 or ids.shape[1] != top_k:
        raise UserError(f"{path}: rows carry {ids.shape[-1] if ids.ndim == 2 else '?'} experts, expected top-{top_k}")
    if ids.size and (ids.min() < 0 or ids.max() >= num_experts):
        raise UserError(f"{path}: expert ids span [{ids.min()}, {ids.max()}], outside [0, {num_experts}); "
                        "wrong --model-spec or not this model's log")
