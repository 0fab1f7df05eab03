"""Importer for single-layer vLLM routing logs of Qwen1.5-MoE (the weiran0129 / Roderick-Wu /
KennethWang1221 `FusedMoE` hook format).

Each file is one run of the whole workload with one MoE layer logged: an optional `{"type": "meta", ...}`
line, then `{"type": "route", "token_idx", "layer", "topk_ids", "topk_weights"}` rows, one per token row of
each forward call. `token_idx` restarts at 0 at every forward call (= one vLLM engine step over the whole
running batch); request identity is not logged. What we infer, and record in `source.assumptions`:

* Dummy rows: a step whose rows are all identical (>= `MIN_DUMMY_ROWS` of them) is vLLM's memory-profiling
  or warm-up batch (8,192 and 256 rows in these logs) and is dropped.
* Prefill vs decode: a decode step has one row per running request, and requests only leave, so decode
  steps never grow. The steps up to and including the largest one are prefill steps (they admit prompts);
  the steps after it are decode steps and must be non-increasing, each prefill step must be larger than
  the first decode step; otherwise the log is refused as not one batched generate() run.
* Sequences: each prefill step becomes one prefill-only sequence (a batched prefill of several prompts;
  it may also hold the decode rows of requests admitted earlier). Decode rows are assigned to sequences by
  their index within the step (batch slot j -> one decode-only sequence), exact while the batch is
  unchanged and approximate once requests finish and vLLM compacts the batch.
* Several files: separate runs, one layer each, combined into one trace with L = number of files only if
  their step structures (rows per engine step) are identical; rows are aligned by (step, row in step).
"""

from __future__ import annotations

from dataclasses import dataclass
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
    field,
    file_sha256,
    layer_coverage_note,
    prompt_tokens_note,
    read_jsonl,
    resolve_model,
    trace_model_name,
)

DEFAULT_SPEC = "qwen1.5-moe-a2.7b"
MIN_DUMMY_ROWS = 16
"""A step of at least this many identical rows is a dummy (profiling) batch, not real text."""


@dataclass
class LayerLog:
    """The real rows of one single-layer log, split into engine steps."""

    path: Path
    layer: int
    model_id: str | None
    ids: np.ndarray  # [R, k] int64, real rows in execution order
    weights: np.ndarray  # [R, k] float64
    step_rows: list[int]  # rows per real engine step
    dropped_dummy: list[int]  # sizes of the dropped dummy steps


def _read_log(path: Path) -> LayerLog:
    """Parse one file, split it at token_idx == 0 and drop the dummy steps."""
    if not path.is_file():
        raise UserError(f"{path}: no such file; vllm-jsonl expects single-layer JSON-lines logs")
    model_id = None
    steps: list[list[tuple[list, list]]] = []
    layers: set[int] = set()
    for number, obj in read_jsonl(path):
        if obj.get("type") == "meta":
            model_id = obj.get("model_id", model_id)
            continue
        token_idx = field(path, number, obj, "token_idx")
        layers.add(field(path, number, obj, "layer"))
        row = (field(path, number, obj, "topk_ids"), field(path, number, obj, "topk_weights"))
        if token_idx == 0 or not steps:
            steps.append([])
        if token_idx != len(steps[-1]):
            raise UserError(f"{path}:{number}: token_idx {token_idx} after {len(steps[-1]) - 1}; expected "
                            "token_idx to count 0, 1, 2, ... within each forward call")
        steps[-1].append(row)
    if not steps:
        raise UserError(f"{path}: no route rows")
    if len(layers) != 1:
        raise UserError(f"{path}: rows of layers {sorted(layers)}; vllm-jsonl expects one layer per file")
    real: list[list[tuple[list, list]]] = []
    dummy: list[int] = []
    for step in steps:
        first = step[0]
        if len(step) >= MIN_DUMMY_ROWS and all(row == first for row in step):
            dummy.append(len(step))
        else:
            real.append(step)
    rows = [row for step in real for row in step]
    if not rows:
        raise UserError(f"{path}: only dummy (profiling) rows, nothing real to import")
    try:
        ids = np.array([r[0] for r in rows], dtype=np.int64)
        weights = np.array([r[1] for r in rows], dtype=np.float64)
    except ValueError:
        raise UserError(f"{path}: rows carry differing numbers of experts; expected a fixed top-k") from None
    return LayerLog(path, layers.pop(), model_id, ids, weights, [len(s) for s in real], dummy)


def _split_phases(log: LayerLog) -> int:
    """Number of prefill steps (see the module docstring); UserError if the log is not one generate() run."""
    rows = log.step_rows
    last_prefill = int(np.argmax(rows))
    decode = rows[last_prefill + 1:]
    if decode:
        grows = next((i for i in range(1, len(decode)) if decode[i] > decode[i - 1]), None)
        if grows is not None:
            raise UserError(f"{log.path}: decode step {grows} has {decode[grows]} rows after "
                            f"{decode[grows - 1]}; not one batched generate() run (dummy rows mid-file?)")
        small = next((i for i in range(last_prefill) if rows[i] <= decode[0]), None)
        if small is not None:
            raise UserError(f"{log.path}: step {small} has {rows[small]} rows, no more than the {decode[0]}-row "
                            "decode batch, before the last prefill step; not one batched generate() run")
    return last_prefill + 1


def import_vllm_jsonl(sources: list[Path], *, model_spec: str | None = None,
                      prompt_tokens: int | None = None) -> Trace:
    """Import one or more single-layer vLLM logs of the same workload into one Trace (L = number of files)."""
    check_prompt_tokens(prompt_tokens)
    logs = sorted((_read_log(Path(s)) for s in sources), key=lambda log: log.layer)
    seen: dict[int, Path] = {}
    for log in logs:
        if log.layer in seen:
            raise UserError(f"{log.path} and {seen[log.layer]} both log layer {log.layer}; pass one file per layer")
        seen[log.layer] = log.path
        if log.step_rows != logs[0].step_rows:
            raise UserError(f"{log.path} has {len(log.step_rows)} engine steps of {log.step_rows[:4]}... rows, "
                            f"{logs[0].path} has {len(logs[0].step_rows)} of {logs[0].step_rows[:4]}...; the "
                            "runs differ, so their rows cannot be aligned: import them separately")
    model_ids = {log.model_id for log in logs if log.model_id}
    if len(model_ids) > 1:
        raise UserError(f"the files log different models ({', '.join(sorted(model_ids))}); import them separately")
    k = logs[0].ids.shape[1]
    name, cfg = resolve_model(model_spec, DEFAULT_SPEC, logged_layers=[log.layer for log in logs],
                              num_experts=None, top_k=k, what="this vLLM log")
    for log in logs:
        check_ids(log.path, log.ids, cfg.num_experts, cfg.top_k)
    ids = np.stack([log.ids for log in logs], axis=1)  # [R, L, k]
    weights = np.stack([log.weights for log in logs], axis=1)  # [R, L, k]

    step_rows = logs[0].step_rows
    n_prefill = _split_phases(logs[0])
    starts = np.concatenate([[0], np.cumsum(step_rows)])
    seqs = [ImportedSequence(ids[starts[s]:starts[s + 1]], weights[starts[s]:starts[s + 1]],
                             np.ones(step_rows[s], bool)) for s in range(n_prefill)]
    decode_steps = list(range(n_prefill, len(step_rows)))
    batch = step_rows[n_prefill] if decode_steps else 0
    for slot in range(batch):
        rows = [starts[s] + slot for s in decode_steps if step_rows[s] > slot]
        seqs.append(ImportedSequence(ids[rows], weights[rows], np.zeros(len(rows), bool)))

    dummy = logs[0].dropped_dummy
    assumptions = [
        "token ids are not logged (-1); shared experts are not logged",
        f"dropped {sum(dummy)} dummy rows per file (vLLM profiling/warm-up steps of identical rows: {dummy})",
        f"engine steps = runs of rows with token_idx restarting at 0; the {n_prefill} steps up to the largest one "
        f"({step_rows[:n_prefill]} rows) are prefill, the {len(decode_steps)} after it decode "
        f"({batch} -> {step_rows[-1] if decode_steps else 0} rows, one per running request)",
        "request identity is not logged: each prefill step is stored as one prefill-only sequence (a batched "
        "prefill of several prompts, which may also hold decode rows of requests admitted earlier)",
        "decode rows are assigned to sequences by their index within the step (batch slot j -> one sequence): "
        "exact while the batch is unchanged, approximate after requests finish and vLLM compacts the batch; "
        "decode positions count decode steps (prompt lengths unknown)",
    ]
    if len(logs) > 1:
        assumptions.append(f"{len(logs)} files = {len(logs)} separate runs, one MoE layer each "
                           f"({[log.layer for log in logs]}), aligned row by row (same engine step, same row "
                           "in it); their step structures are identical (checked), but routing of different "
                           "runs may diverge where their numerics differ")
    if prompt_tokens is not None:
        assumptions.append(prompt_tokens_note(prompt_tokens))
    assumptions += layer_coverage_note(name, cfg)
    source = {
        "kind": "imported", "format": "vllm-jsonl", "files": [str(log.path) for log in logs],
        "inputs": [{"path": str(log.path), "sha256": file_sha256(log.path), "layer": log.layer} for log in logs],
        "routed_by": model_ids.pop() if model_ids else KNOWN_MODELS[DEFAULT_SPEC].hf_id,
        "model_spec": name, "engine_steps": {"prefill_rows": step_rows[:n_prefill],
                                             "decode_rows": step_rows[n_prefill:]},
        "assumptions": assumptions,
    }
    model = trace_model_name(name, cfg, source["routed_by"])
    return assemble(seqs, model=model, model_config=cfg, source=source,
                    prompt_tokens=prompt_tokens)
