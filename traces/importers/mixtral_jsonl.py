"""Importer for the Mixtral-8x7B routing logs of Mario928/speculative-moe (patched vLLM `select_experts`).

Two JSON-lines layouts, told apart by their keys:

* `*_routing.jsonl` (post-processed, decode tokens only): `{"dataset", "problem_id", "layer", "experts",
  "gating_probs", "token_idx"}`, with `token_idx` re-indexed 0..n-1 per (problem, layer). Each problem is
  one decode-only sequence. The collector dropped rows whose gate weights were exactly [0.5, 0.5], so
  layers of one problem have slightly different row counts and the re-indexing hides which token lost its
  row: we keep the first n tokens, n = the shortest layer's count, and say how many rows that dropped.
* `routing_raw.jsonl` (raw profiler output, prefill + decode): `{"dataset", "problem_id", "layer",
  "token_pos", "experts", "gating_probs"}` in execution order; `token_pos` is the row within the forward.
  A new forward starts when the layer index goes back (or a (layer, token_pos) cell repeats). A problem's
  first forward is its prefill, each later one decodes one token. Missing (token, layer) cells are explicit
  here: a token lacking a row in any layer is dropped, and positions are renumbered over the kept tokens.
"""

from __future__ import annotations

from collections import defaultdict
from pathlib import Path
from typing import Any

import numpy as np

from traces.errors import UserError
from traces.format import Trace
from traces.importers.common import (
    KNOWN_MODELS,
    ImportedSequence,
    assemble,
    check_ids,
    check_prompt_tokens,
    field,
    file_sha256,
    layer_coverage_note,
    prompt_tokens_note,
    read_jsonl,
    resolve_model,
    trace_model_name,
)

SOURCE_MODEL = "neuralmagic/Mixtral-8x7B-Instruct-v0.1-FP8"
DEFAULT_SPEC = "mixtral-8x7b"
Row = tuple[int, list[int], list[float]]  # (line number, experts, gating_probs)


def _rows(path: Path) -> tuple[str, list[tuple[int, dict[str, Any]]]]:
    """("decode" | "raw", rows) of one file."""
    if not path.is_file():
        raise UserError(f"{path}: no such file; mixtral-jsonl expects *_routing.jsonl or routing_raw.jsonl files")
    rows = list(read_jsonl(path))
    if not rows:
        raise UserError(f"{path}: empty routing log")
    number, first = rows[0]
    if "token_pos" in first:
        return "raw", rows
    if "token_idx" in first:
        return "decode", rows
    raise UserError(f"{path}:{number}: rows have neither token_idx (*_routing.jsonl) nor token_pos "
                    "(routing_raw.jsonl); not a Mario928 Mixtral routing log")


def _problem_key(path: Path, number: int, obj: dict[str, Any]) -> tuple[str, int]:
    return str(obj.get("dataset", "")), field(path, number, obj, "problem_id")


def _stack(path: Path, cells: list[dict[int, Row]], layers: list[int]) -> tuple[np.ndarray, np.ndarray]:
    """cells[t][layer] -> (ids [n, L, k], weights [n, L, k])."""
    try:
        ids = np.array([[cell[layer][1] for layer in layers] for cell in cells], dtype=np.int64)
        weights = np.array([[cell[layer][2] for layer in layers] for cell in cells], dtype=np.float64)
    except ValueError:
        raise UserError(f"{path}: rows carry differing numbers of experts; expected a fixed top-k") from None
    return ids.reshape(len(cells), len(layers), -1), weights.reshape(len(cells), len(layers), -1)


def _decode_file(path: Path, rows: list[tuple[int, dict[str, Any]]]) -> dict[tuple[str, int], dict[int, dict[int, Row]]]:
    """Per problem: (key, {layer: [rows by token_idx]}); checks that token_idx counts 0..n-1."""
    problems: dict[tuple[str, int], dict[int, dict[int, Row]]] = defaultdict(lambda: defaultdict(dict))
    for number, obj in rows:
        key = _problem_key(path, number, obj)
        layer = field(path, number, obj, "layer")
        token = field(path, number, obj, "token_idx")
        cell = problems[key][layer]
        if token in cell:
            raise UserError(f"{path}:{number}: second row for problem {key[1]}, layer {layer}, token_idx {token}")
        cell[token] = (number, field(path, number, obj, "experts"), field(path, number, obj, "gating_probs"))
    for key, layers in problems.items():
        for layer, cell in layers.items():
            if sorted(cell) != list(range(len(cell))):
                raise UserError(f"{path}: problem {key[1]}, layer {layer}: token_idx is not 0..{len(cell) - 1}")
    return problems


def _forwards(path: Path, rows: list[tuple[int, dict[str, Any]]]) -> dict[tuple[str, int], list[dict]]:
    """Per problem, its forwards in order: each a dict (token_pos, layer) -> Row."""
    problems: dict[tuple[str, int], list[dict[tuple[int, int], Row]]] = defaultdict(list)
    previous: dict[tuple[str, int], tuple[int, int]] = {}
    for number, obj in rows:
        key = _problem_key(path, number, obj)
        layer, pos = field(path, number, obj, "layer"), field(path, number, obj, "token_pos")
        last = previous.get(key)
        if last is None or layer < last[0] or (layer == last[0] and pos <= last[1]):
            problems[key].append({})
        problems[key][-1][(pos, layer)] = (number, field(path, number, obj, "experts"),
                                           field(path, number, obj, "gating_probs"))
        previous[key] = (layer, pos)
    return problems


def import_mixtral_jsonl(sources: list[Path], *, model_spec: str | None = None,
                         prompt_tokens: int | None = None) -> Trace:
    """Import Mario928 Mixtral logs: each (file, problem) becomes one sequence, in argument then file order."""
    check_prompt_tokens(prompt_tokens)
    parsed = []
    k = None
    for source in sources:
        path = Path(source)
        kind, rows = _rows(path)
        if k is None:
            k = len(field(path, rows[0][0], rows[0][1], "experts"))
        parsed.append((path, kind, _decode_file(path, rows) if kind == "decode" else _forwards(path, rows)))
    layers = sorted({layer for _, kind, problems in parsed for seq in problems.values()
                     for layer in (seq if kind == "decode" else {lay for fw in seq for (_, lay) in fw})})
    default = KNOWN_MODELS[DEFAULT_SPEC].config
    name, cfg = resolve_model(model_spec, DEFAULT_SPEC, logged_layers=layers, num_experts=default.num_experts,
                              top_k=k, what="a Mixtral log")

    seqs: list[ImportedSequence] = []
    origins: list[dict[str, Any]] = []
    assumptions = ["token ids are not logged (-1)",
                   f"routing of {SOURCE_MODEL} (FP8 experts, unquantised router); model_config.dtype is that "
                   "of the original bf16 model"]
    for path, kind, problems in parsed:
        if kind == "decode":
            kept_rows = total_rows = 0
            for key, per_layer in problems.items():
                missing = sorted(set(layers) - set(per_layer))
                if missing:
                    raise UserError(f"{path}: problem {key[1]} has no rows for layer {missing[0]}")
                n = min(len(cell) for cell in per_layer.values())
                total_rows += sum(len(cell) for cell in per_layer.values())
                kept_rows += n * len(layers)
                cells = [{layer: per_layer[layer][t] for layer in layers} for t in range(n)]
                ids, weights = _stack(path, cells, layers)
                check_ids(path, ids.reshape(-1, ids.shape[-1]), cfg.num_experts, cfg.top_k)
                seqs.append(ImportedSequence(ids, weights, np.zeros(n, bool)))
                origins.append({"file": str(path), "dataset": key[0], "problem_id": key[1], "tokens": n,
                                "layout": "decode-only"})
            assumptions.append(
                f"{path.name}: decode tokens only (prompt routing not logged; positions count generated "
                f"tokens); per-layer row counts differ and the re-indexed rows do not say which token lost its "
                f"row, so each problem keeps its first n tokens (n = shortest layer): dropped "
                f"{total_rows - kept_rows} of {total_rows} rows; cross-layer alignment is approximate after "
                "a missing row")
            continue
        dropped_prefill = dropped_decode = total = 0
        for key, forwards in problems.items():
            cells, flags = [], []
            for index, forward in enumerate(forwards):
                positions = sorted({pos for pos, _ in forward})
                if index > 0 and positions != [0]:
                    first = min(row[0] for row in forward.values())
                    raise UserError(f"{path}:{first}: forward {index} of problem {key[1]} has token_pos "
                                    f"{positions[:4]}...; expected one prefill forward, then one token per forward")
                for pos in range(positions[-1] + 1):
                    total += 1
                    if all((pos, layer) in forward for layer in layers):
                        cells.append({layer: forward[(pos, layer)] for layer in layers})
                        flags.append(index == 0)
                    elif index == 0:
                        dropped_prefill += 1
                    else:
                        dropped_decode += 1
            if not cells:
                continue
            ids, weights = _stack(path, cells, layers)
            check_ids(path, ids.reshape(-1, ids.shape[-1]), cfg.num_experts, cfg.top_k)
            seqs.append(ImportedSequence(ids, weights, np.array(flags, bool)))
            origins.append({"file": str(path), "dataset": key[0], "problem_id": key[1], "tokens": len(cells),
                            "layout": "prefill+decode"})
        assumptions.append(
            f"{path.name}: first forward of each problem = prefill, each later forward = one decode token; "
            f"dropped {dropped_prefill + dropped_decode} of {total} tokens ({dropped_prefill} prefill, "
            f"{dropped_decode} decode) that lack a row in some layer (the collector dropped rows with gate "
            "weights exactly [0.5, 0.5]); positions renumbered contiguously over the kept tokens")
    if prompt_tokens is not None:
        assumptions.append(prompt_tokens_note(prompt_tokens))
    assumptions += layer_coverage_note(name, cfg)
    source = {"kind": "imported", "format": "mixtral-jsonl", "files": [str(p) for p, _, _ in parsed],
              "inputs": [{"path": str(p), "sha256": file_sha256(p)} for p, _, _ in parsed],
              "routed_by": SOURCE_MODEL, "model_spec": name, "sequences": origins, "assumptions": assumptions}
    model = trace_model_name(name, cfg, SOURCE_MODEL)
    return assemble(seqs, model=model, model_config=cfg, source=source, prompt_tokens=prompt_tokens)
