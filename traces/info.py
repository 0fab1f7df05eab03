"""`fatesim trace info`: a summary of a trace as a dict (for --json) and as text for people."""

from __future__ import annotations

from typing import Any

import numpy as np

from traces.format import Trace


def summarize(trace: Trace) -> dict[str, Any]:
    """Counts, shapes and provenance of a trace; JSON-ready (ints, strings, lists, dicts)."""
    lengths = [s.stop - s.start for s in trace.sequence_slices()]
    cfg = trace.model_config
    counts = np.bincount(np.asarray(trace.topk_ids).reshape(-1).astype(np.int64), minlength=cfg.num_experts)
    return {
        "model": trace.model,
        "model_config": cfg.to_dict(),
        "source": trace.source,
        "assumptions": list(trace.source.get("assumptions", [])),
        "prompts": trace.prompts,
        "created": trace.created,
        "tokens": trace.num_tokens,
        "sequences": len(lengths),
        "sequence_length": {"min": min(lengths), "mean": round(float(np.mean(lengths)), 1), "max": max(lengths)},
        "prefill_tokens": trace.num_prefill_tokens,
        "decode_tokens": trace.num_decode_tokens,
        "moe_layers": trace.num_moe_layers,
        "moe_layer_indices": list(cfg.moe_layer_indices),
        "experts": trace.num_experts,
        "top_k": trace.top_k,
        "lookahead_depth": trace.lookahead_depth,
        "optional": trace.optional_tensors(),
        "known_token_ids": int(np.count_nonzero(np.asarray(trace.token_ids) >= 0)),
        "experts_never_routed": int(np.count_nonzero(counts == 0)),
        "content_hash": trace.content_hash(),
    }


def format_summary(d: dict[str, Any]) -> str:
    """The summary as aligned `key: value` lines, assumptions as a bulleted list."""
    cfg = d["model_config"]
    lengths = d["sequence_length"]
    src = d["source"]
    source = str(src.get("kind", "?")) + (f" ({src['format']})" if src.get("format") else "")
    if src.get("routed_by") and src["routed_by"] != d["model"]:
        source += f", routing of {src['routed_by']}"
    layers = d["moe_layer_indices"]
    layer_text = f"{d['moe_layers']} of {cfg['num_layers']} decoder layers"
    if layers == list(range(layers[0], layers[-1] + 1)):
        layer_text += f" ({layers[0]}..{layers[-1]})"
    else:
        layer_text += f" {layers}"
    prompts = "unknown"
    if d["prompts"]:
        prompts = str(d["prompts"].get("name", "?"))
        if d["prompts"].get("sha256"):
            prompts += f" (sha256 {str(d['prompts']['sha256'])[:12]})"
    rows = [
        ("model", f"{d['model']} ({cfg['architecture']}, {cfg['dtype']})"),
        ("source", source),
        ("created", d["created"]),
        ("prompts", prompts),
        ("tokens", f"{d['tokens']:,} ({d['prefill_tokens']:,} prefill, {d['decode_tokens']:,} decode)"),
        ("sequences", f"{d['sequences']:,} (length {lengths['min']}..{lengths['max']}, mean {lengths['mean']})"),
        ("moe layers", layer_text),
        ("experts", f"{d['experts']} routed, top-{d['top_k']}, {cfg['num_shared_experts']} shared"
                    + (f"; {d['experts_never_routed']} never routed" if d["experts_never_routed"] else "")),
        ("token ids", f"{d['known_token_ids']:,} known" if d["known_token_ids"] else "unknown (-1)"),
        ("optional", ", ".join(d["optional"]) or "none"),
        ("lookahead", str(d["lookahead_depth"]) if d["lookahead_depth"] else "none"),
        ("content", f"sha256 {d['content_hash']}"),
    ]
    width = max(len(key) for key, _ in rows)
    lines = [f"{key + ':':<{width + 1}} {value}" for key, value in rows]
    if d["assumptions"]:
        lines.append("assumptions:")
        lines += [f"  - {a}" for a in d["assumptions"]]
    return "\n".join(lines)
