"""Importer for ESFT expert logs (deepseek-ai/ESFT, `results/expert_scores/<task>/expert_weights_<layer>.txt`).

One file per MoE layer (decoder layer index in the name; DeepSeek-V2-Lite: layers 1..26, layer 0 dense);
one line per sequence: the flattened [n, k] routed expert ids, a double tab, then the matching flattened
gate weights, all tab-separated. Line i of every layer file is the same sequence. The logs come from one
teacher-forced forward pass over each whole sequence, so by default every position is prefill.
"""

from __future__ import annotations

import re
from pathlib import Path

import numpy as np

from traces.errors import UserError
from traces.format import Trace
from traces.importers.common import (
    KNOWN_MODELS,
    ImportedSequence,
    assemble,
    check_ids,
    check_prompt_tokens,
    file_sha256,
    layer_coverage_note,
    prompt_tokens_note,
    resolve_model,
    trace_model_name,
)

SOURCE_MODEL = "deepseek-ai/ESFT-vanilla-lite"
DEFAULT_SPEC = "deepseek-v2-lite"
_NAME = re.compile(r"expert_weights_(\d+)\.txt")


def _layer_files(folder: Path) -> dict[int, Path]:
    """MoE layer index -> its log file in `folder`."""
    if not folder.is_dir():
        raise UserError(f"{folder}: esft expects a folder of expert_weights_<layer>.txt files")
    files = {int(m.group(1)): p for p in folder.iterdir() if (m := _NAME.fullmatch(p.name))}
    if not files:
        raise UserError(f"{folder}: no expert_weights_<layer>.txt files; pass the folder of one ESFT task")
    return dict(sorted(files.items()))


def _parse_layer(path: Path, top_k: int) -> list[tuple[np.ndarray, np.ndarray]]:
    """Per line: (ids [n, k] int64, weights [n, k] float64)."""
    try:
        text = path.read_text(encoding="ascii")
    except (OSError, UnicodeDecodeError) as error:
        raise UserError(f"cannot read {path} as an ESFT log: {error}") from None
    out = []
    for number, line in enumerate(text.splitlines(), start=1):
        parts = line.split("\t\t")
        if len(parts) != 2:
            raise UserError(f"{path}:{number}: expected '<ids>\\t\\t<weights>' (one double tab)")
        try:
            ids = np.array(parts[0].split("\t"), dtype=np.int64)
            weights = np.array(parts[1].split("\t"), dtype=np.float64)
        except ValueError:
            raise UserError(f"{path}:{number}: ids or weights are not numbers") from None
        if ids.size != weights.size or ids.size % top_k:
            raise UserError(f"{path}:{number}: {ids.size} ids and {weights.size} weights, expected the same "
                            f"multiple of top-{top_k}")
        out.append((ids.reshape(-1, top_k), weights.reshape(-1, top_k)))
    return out


def import_esft(sources: list[Path], *, model_spec: str | None = None, prompt_tokens: int | None = None) -> Trace:
    """Import one or more ESFT task folders (sequences concatenated in argument order) into a Trace.

    Every position is prefill unless `prompt_tokens` is given (then the first N positions of each sequence).
    """
    check_prompt_tokens(prompt_tokens)
    default = KNOWN_MODELS[DEFAULT_SPEC].config
    folders = [_layer_files(Path(s)) for s in sources]
    layers = list(folders[0])
    for src, files in zip(sources[1:], folders[1:], strict=True):
        if list(files) != layers:
            raise UserError(f"{src}: has layers {list(files)}, but {sources[0]} has {layers}; "
                            "import folders of the same model together")
    name, cfg = resolve_model(model_spec, DEFAULT_SPEC, logged_layers=layers, num_experts=default.num_experts,
                              top_k=default.top_k, what="an ESFT log (DeepSeek-V2-Lite routing)")
    seqs: list[ImportedSequence] = []
    inputs = []
    for files in folders:
        paths = list(files.values())
        per_layer = [_parse_layer(path, cfg.top_k) for path in paths]  # [L][line] -> (ids, weights)
        inputs += [{"path": str(path), "sha256": file_sha256(path)} for path in paths]
        for path, rows in zip(paths, per_layer, strict=True):
            if len(rows) != len(per_layer[0]):
                raise UserError(f"{path}: {len(rows)} lines, but {paths[0]} has {len(per_layer[0])}; "
                                "every layer file must hold the same sequences")
        for line in range(len(per_layer[0])):
            n = per_layer[0][line][0].shape[0]
            for path, rows in zip(paths, per_layer, strict=True):
                if rows[line][0].shape[0] != n:
                    raise UserError(f"{path}:{line + 1}: {rows[line][0].shape[0]} tokens, but {paths[0]} "
                                    f"has {n} on that line; every layer file must hold the same sequences")
            ids = np.stack([rows[line][0] for rows in per_layer], axis=1)  # [n, L, k]
            weights = np.stack([rows[line][1] for rows in per_layer], axis=1)  # [n, L, k]
            check_ids(paths[0], ids.reshape(-1, cfg.top_k), cfg.num_experts, cfg.top_k)
            seqs.append(ImportedSequence(ids, weights, np.ones(n, bool)))
    assumptions = ["token ids are not logged (-1)",
                   "one line = one sequence, teacher-forced over its whole text; shared experts are not logged"]
    assumptions.append(prompt_tokens_note(prompt_tokens) if prompt_tokens is not None else
                       "every position is taken as prefill (the log is one forward over the whole sequence; "
                       "the prompt/answer split is not logged; use --prompt-tokens N to mark only the first N)")
    assumptions += layer_coverage_note(name, cfg)
    source = {"kind": "imported", "format": "esft", "files": [str(s) for s in sources], "inputs": inputs,
              "routed_by": SOURCE_MODEL, "model_spec": name, "assumptions": assumptions}
    model = trace_model_name(name, cfg, SOURCE_MODEL)
    return assemble(seqs, model=model, model_config=cfg, source=source,
                    prompt_tokens=prompt_tokens)
