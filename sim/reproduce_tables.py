"""`fatesim reproduce speculate` and `fatesim reproduce lrc`: two more papers' tables beside the simulator's.

speculate (Speculating Experts, arXiv 2603.19289): `speculate` against load-on-demand and against the
streaming variant (`speculate-stream`, when this build has that preset) on the A6000 and A100 efficient-engine
profiles, at KV contexts of 1k and 64k tokens. The paper's models and budget are not in the quoted figures:
fatesim uses the embedded Qwen1.5-MoE and DeepSeekMoE stand-ins (their 512-token traces' decode tokens, placed
at the context's positions: the routing of a short context, the attention and KV cache of a long one) at a
budget where a tenth of the routed experts fit (`SPECULATE_BUDGET`).

lrc (Not All Models Suit Expert Offloading, arXiv 2505.16056): SRP (m = 16) and SCH (rho = 2, m = 16) of
`sim.analysis.lrc` on the public routing logs (`--realtraces`, imported as `fatesim trace import` does) beside
the paper's values; SCH-static too (see the README's LRC section for why).
"""

from __future__ import annotations

import dataclasses
import os
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np

from sim.paper_traces import PAPER_MODELS, paper_trace
from sim.papers import LRC_FIGURES, SPECULATE_FIGURES
from sim.replay import load, replay
from traces.errors import UserError
from traces.format import Trace, read_trace, validate_trace

SPECULATE_HW = ("a6000-bound", "a100-bound")
CONTEXTS = (1024, 65536)
SPECULATE_BUDGET = "10%"
SPECULATE_POLICIES = ("lod", "lru", "speculate", "speculate-stream")
"""lru: the same cache as speculate without its prefetch and speculative execution (the second baseline)."""


def at_context(trace: Trace, context: int) -> Trace:
    """The decode tokens of `trace`, each sequence's first one at position `context - 1` (KV of `context`)."""
    decode = np.asarray(trace.is_prefill) == 0
    if not decode.any():
        raise UserError("the trace has no decode tokens to place at a long context")
    seq = np.asarray(trace.seq_ids)[decode]
    pos = np.asarray(trace.positions)[decode].astype(np.int64)
    first = {int(s): int(pos[seq == s].min()) for s in np.unique(seq)}
    shifted = np.array([context - 1 + p - first[int(s)] for s, p in zip(seq, pos, strict=True)], dtype=np.int32)

    def cut(a: np.ndarray | None, axis: int = 0) -> np.ndarray | None:
        return None if a is None else np.compress(decode, np.asarray(a), axis=axis)

    out = dataclasses.replace(
        trace, token_ids=cut(trace.token_ids), seq_ids=cut(trace.seq_ids), positions=shifted,
        is_prefill=cut(trace.is_prefill), topk_ids=cut(trace.topk_ids), topk_weights=cut(trace.topk_weights),
        router_logits=cut(trace.router_logits), lookahead_logits=cut(trace.lookahead_logits, axis=1),
        gate_inputs=cut(trace.gate_inputs),
        source={**trace.source, "assumptions": [*trace.source.get("assumptions", []),
                                                f"decode tokens only, placed at context {context}"]})
    validate_trace(out)
    return out


def reproduce_speculate(progress: Callable[[str], None] | None = None) -> dict[str, Any]:
    """Every (profile, model, context, policy) run and the figures' simulated ranges."""
    policies = list(SPECULATE_POLICIES)
    runs = []
    for model in PAPER_MODELS:
        base = read_trace(paper_trace(model, 512, progress=progress))
        for context in CONTEXTS:
            loaded = load(at_context(base, context))
            for hw in SPECULATE_HW:
                tpot = {}
                for policy in policies:
                    m = replay(loaded, policy, hw, SPECULATE_BUDGET, as_model=model)
                    tpot[policy] = m["tpot_s"]
                    runs.append({"model": model, "hw": hw, "context": context, "policy": policy,
                                 "budget": SPECULATE_BUDGET, "tpot_s": m["tpot_s"],
                                 "tpot_reduction_vs_lod": 1.0 - m["tpot_s"] / tpot["lod"],
                                 "tpot_reduction_vs_lru": 1.0 - m["tpot_s"] / tpot["lru"] if "lru" in tpot else 0.0,
                                 "transfer_share": m["link_busy_fraction"], "hit_rate": m["hit_rate"]})
    spec = [r for r in runs if r["policy"] == "speculate"]
    a6000 = [r for r in spec if r["hw"].startswith("a6000")]
    lod = [r for r in runs if r["policy"] == "lod"]
    def span(rows: list[dict], key: str) -> tuple[float, float]:
        return min(r[key] for r in rows), max(r[key] for r in rows)

    simulated = {"tpot_reduction": span(spec, "tpot_reduction_vs_lod"),
                 "tpot_reduction_a6000": span(a6000, "tpot_reduction_vs_lod"),
                 "transfer_share": span(lod, "transfer_share")}
    same_cache = {"tpot_reduction": span(spec, "tpot_reduction_vs_lru"),
                  "tpot_reduction_a6000": span(a6000, "tpot_reduction_vs_lru"),
                  "transfer_share": span([r for r in runs if r["policy"] == "lru"], "transfer_share")}
    figures = [{"key": f.key, "figure": f.what, "paper": (f.value, f.high), "source": f.source, "role": f.role,
                "simulated": simulated[f.key], "simulated_vs_same_cache": same_cache[f.key]}
               for f in SPECULATE_FIGURES]
    return {"figures": figures, "runs": runs, "budget": SPECULATE_BUDGET}


def format_speculate(result: dict[str, Any]) -> str:
    lines = [f"{'model':<18} {'hw':<12} {'context':>7} {'policy':<17} {'TPOT ms':>8} {'vs lod':>7} {'vs lru':>7} "
             f"{'link busy':>9} {'hit rate':>8}"]
    for r in result["runs"]:
        lines.append(f"{r['model']:<18} {r['hw']:<12} {r['context']:>7} {r['policy']:<17} {1e3 * r['tpot_s']:>8.2f} "
                     f"{-100 * r['tpot_reduction_vs_lod']:>+6.1f}% {-100 * r['tpot_reduction_vs_lru']:>+6.1f}% "
                     f"{100 * r['transfer_share']:>8.1f}% {r['hit_rate']:>8.3f}")
    lines.append("")
    lines.append(f"{'figure':<40} {'src':<3} {'paper':>8} {'simulated (vs lod)':>19} {'(vs lru, same cache)':>21}")
    for f in result["figures"]:
        lo, hi = f["paper"]
        (slo, shi), (clo, chi) = f["simulated"], f["simulated_vs_same_cache"]
        lines.append(f"{f['figure']:<40} {f['source']:<3} {100 * lo:>3.0f}–{100 * hi:.0f}% "
                     f"{100 * slo:>11.1f}–{100 * shi:.1f}% {100 * clo:>13.1f}–{100 * chi:.1f}%")
    lines.append(f"budget {result['budget']} of the routed experts (fatesim accounting); transfer share: the "
                 "baseline's link busy time over its decode time (lod, or lru in the last column)")
    return "\n".join(lines)


LRC_LOGS = {
    # trace name -> (paper's model, importer format, files relative to the realtraces folder)
    "qwen-vllm": ("Qwen1.5-MoE", "vllm-jsonl",
                  [f"weiran0129__vLLM-MoE-Logger/Logs/moe_layer{i}.jsonl" for i in (0, 8, 12, 18, 23)]),
    "esft-intent": ("DeepSeekMoE", "esft", ["deepseek-ai__ESFT/expert_scores/intent"]),
    "esft-law": ("DeepSeekMoE", "esft", ["deepseek-ai__ESFT/expert_scores/law"]),
    "mixtral-decode": ("Mixtral-8x7B", "mixtral-jsonl",
                       [f"Mario928__speculative-moe/routing_data_collected/{n}_2_routing.jsonl"
                        for n in ("gsm8k", "humaneval")]),
}


def realtraces_dir(given: str | None) -> Path:
    """The public routing logs: `given`, else $FATESIM_REALTRACES, else ../shared/realtraces of the repository."""
    folder = Path(given or os.environ.get("FATESIM_REALTRACES")
                  or Path(__file__).resolve().parents[1].parent / "shared" / "realtraces")
    if not folder.is_dir():
        raise UserError(f"no routing logs at {folder}; pass --realtraces DIR (the public logs, see the README)")
    return folder


def reproduce_lrc(realtraces: str | None = None, progress: Callable[[str], None] | None = None) -> dict[str, Any]:
    """SRP/SCH of every log in `LRC_LOGS` beside the paper's values (percent)."""
    from sim.analysis.lrc import trace_lrc
    from traces.importers import import_trace

    folder = realtraces_dir(realtraces)
    missing = [f for _, _, files in LRC_LOGS.values() for f in files if not (folder / f).exists()]
    if missing:
        raise UserError(f"routing log {folder / missing[0]} is missing; pass --realtraces DIR")
    rows = []
    for name, (paper_model, fmt, files) in LRC_LOGS.items():
        if progress:
            progress(f"importing {name} and measuring SRP/SCH")
        trace = import_trace(fmt, [folder / f for f in files])
        model = trace_lrc(trace, ms=(16,), rhos=(2,), baselines=False)["model"]
        srp_paper, sch_paper = LRC_FIGURES[paper_model]
        rows.append({"trace": name, "model": trace.model, "paper_model": paper_model,
                     "srp_paper": srp_paper, "srp": 100 * model["srp"]["16"],
                     "sch_paper": sch_paper, "sch": 100 * model["sch"]["2"]["16"],
                     "sch_static": 100 * model["sch_static"]["2"]["16"], "tokens": int(trace.num_tokens)})
    return {"rows": rows, "params": {"m": 16, "rho": 2}, "realtraces": str(folder)}


def format_lrc_table(result: dict[str, Any]) -> str:
    lines = [f"{'trace':<15} {'paper model':<13} {'SRP paper':>9} {'SRP':>6} {'error':>7} {'SCH paper':>9} {'SCH':>6} "
             f"{'error':>7} {'SCH-static':>10}"]
    for r in result["rows"]:
        lines.append(f"{r['trace']:<15} {r['paper_model']:<13} {r['srp_paper']:>9.2f} {r['srp']:>6.2f} "
                     f"{r['srp'] - r['srp_paper']:>+6.2f}p {r['sch_paper']:>9.1f} {r['sch']:>6.2f} "
                     f"{r['sch'] - r['sch_paper']:>+6.2f}p {r['sch_static']:>10.2f}")
    lines.append("SRP m=16, SCH rho=2 m=16 (percent; error in points). Paper values: the LRC paper "
                 "(Liang et al., ICLR 2026; SCH read from its figure, approximate); OLMoE has no public log here.")
    return "\n".join(lines)
