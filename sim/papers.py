"""The papers' published figures that `fatesim reproduce` compares with, each with its source.

Source: P = the paper's abstract (arXiv), S = the paper's text as quoted by secondary sources (the figures
of issue 13 of this project, which quotes them; not checked here against the paper's PDF, which is not
reachable from this machine). Role: "fit-target" = one of the figures the `*-hf-eager` profiles' free
parameters were fitted to (`python -m sim.reproduce fit`; reproducing it checks the fit, it predicts
nothing), "prediction" = everything else.

The secondary sources do not state the memory budget of the single-value figures. fatesim compares them
at the budget Fate's official code uses when none is given (`--memory_budget 0`: the whole device, 24 GB
on the RTX 3090 and 11 GB on the GTX 1080 Ti) and prints the span over the paper's budgets beside it.
"""

from __future__ import annotations

from dataclasses import dataclass

FATE = "Fate (Fang et al., arXiv 2502.12224)"
SPECULATE = "Speculating Experts (arXiv 2603.19289)"
LRC = "Not All Models Suit Expert Offloading (Liang et al., arXiv 2505.16056)"


@dataclass(frozen=True)
class PaperFigure:
    key: str
    paper: str
    what: str
    value: float
    """The published value: tokens/s, a ratio, or a fraction (0..1)."""
    unit: str
    """"tok/s", "x" (a ratio, "up to"), "%" (value is a fraction)."""
    source: str
    """"P" (abstract) or "S" (text as quoted by secondary sources)."""
    role: str
    """"fit-target" or "prediction"."""
    high: float | None = None
    """Upper end when the paper gives a range (value is then the lower end)."""


FATE_FIGURES = (
    PaperFigure("fate_vs_lod_prefill", FATE, "Fate vs load-on-demand, prefill (up to)", 4.5, "x", "P", "prediction"),
    PaperFigure("fate_vs_eap_prefill", FATE, "Fate vs EAP, prefill (up to)", 1.9, "x", "P", "prediction"),
    PaperFigure("fate_vs_lod_decode", FATE, "Fate vs load-on-demand, decode (up to)", 4.1, "x", "P", "prediction"),
    PaperFigure("fate_vs_eap_decode", FATE, "Fate vs EAP, decode (up to)", 2.2, "x", "P", "prediction"),
    PaperFigure("rtx3090_qwen_fate_decode", FATE, "RTX 3090, Qwen1.5-MoE, Fate decode", 14.0, "tok/s", "S",
                "fit-target"),
    PaperFigure("rtx3090_deepseek_fate_decode", FATE, "RTX 3090, DeepSeekMoE, Fate decode", 8.9, "tok/s", "S",
                "prediction"),
    PaperFigure("rtx3090_deepseek_eap_decode", FATE, "RTX 3090, DeepSeekMoE, EAP decode", 4.1, "tok/s", "S",
                "prediction"),
    PaperFigure("rtx3090_deepseek_fate_prefill", FATE, "RTX 3090, DeepSeekMoE, prompt 512, Fate prefill", 804.0,
                "tok/s", "S", "fit-target"),
    PaperFigure("rtx3090_deepseek_lod_prefill", FATE, "RTX 3090, DeepSeekMoE, prompt 512, lod prefill", 180.0,
                "tok/s", "S", "prediction"),
    PaperFigure("gtx1080ti_qwen_fate_decode", FATE, "GTX 1080 Ti, Qwen1.5-MoE, Fate decode", 3.7, "tok/s", "S",
                "fit-target"),
    PaperFigure("gtx1080ti_deepseek_lod_prefill", FATE, "GTX 1080 Ti, DeepSeekMoE, prompt 512, lod prefill", 100.0,
                "tok/s", "S", "fit-target"),
    PaperFigure("fate_hit_rate", FATE, "hit rate, shallow-favoring cache + ARC", 0.9908, "%", "S", "prediction"),
    PaperFigure("prefetch_accuracy_prefill", FATE, "cross-layer prefetch accuracy, prefill", 0.9715, "%", "S",
                "prediction"),
    PaperFigure("prefetch_accuracy_decode", FATE, "cross-layer prefetch accuracy, decode", 0.84, "%", "S",
                "prediction"),
)
"""Issue 13's table of the Fate paper's figures."""

FIT_TARGETS = tuple(f.key for f in FATE_FIGURES if f.role == "fit-target")

SPECULATE_FIGURES = (
    PaperFigure("tpot_reduction", SPECULATE, "TPOT lower than load-on-demand", 0.05, "%", "S", "prediction",
                high=0.14),
    PaperFigure("tpot_reduction_a6000", SPECULATE, "TPOT lower than load-on-demand, A6000", 0.12, "%", "S",
                "prediction", high=0.14),
    PaperFigure("transfer_share", SPECULATE, "expert transfers' share of TPOT", 0.84, "%", "S", "prediction",
                high=0.88),
)
"""As quoted in issue 13 (the paper's models and budgets are not stated there)."""

LRC_FIGURES = {
    # model in the paper -> (SRP m=16, SCH rho=2 m=16), percent: Liang et al., "Local routing consistency"
    # (ICLR 2026), SRP from its table, SCH read from its figure (approximate)
    "Qwen1.5-MoE": (30.71, 46.0),
    "DeepSeekMoE": (36.94, 57.0),
    "Mixtral-8x7B": (49.36, 74.0),
    "OLMoE": (50.91, 74.0),
}
