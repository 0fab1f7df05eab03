"""Importers of public routing logs into traces: FORMAT name -> function(sources, *, model_spec, prompt_tokens).

Each importer documents what it infers in its module docstring and records it in `source.assumptions`.
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

from traces.errors import UserError
from traces.format import Trace
from traces.importers.esft import import_esft
from traces.importers.mixtral_jsonl import import_mixtral_jsonl
from traces.importers.vllm_jsonl import import_vllm_jsonl

Importer = Callable[..., Trace]

IMPORTERS: dict[str, Importer] = {
    "esft": import_esft,  # deepseek-ai/ESFT expert_weights_<layer>.txt folders (DeepSeek-V2-Lite)
    "vllm-jsonl": import_vllm_jsonl,  # single-layer vLLM FusedMoE logs (Qwen1.5-MoE-A2.7B)
    "mixtral-jsonl": import_mixtral_jsonl,  # Mario928/speculative-moe Mixtral-8x7B logs
}


def import_trace(fmt: str, sources: list[Path], *, model_spec: str | None = None,
                 prompt_tokens: int | None = None) -> Trace:
    """Import `sources` with the importer named `fmt`; UserError for an unknown format or no sources."""
    if fmt not in IMPORTERS:
        raise UserError(f"unknown import format {fmt!r}; choose one of {', '.join(IMPORTERS)}")
    if not sources:
        raise UserError(f"{fmt}: give at least one source file or folder")
    return IMPORTERS[fmt]([Path(s) for s in sources], model_spec=model_spec, prompt_tokens=prompt_tokens)
