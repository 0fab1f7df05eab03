"""Precision: in which format an expert crosses the link (and sits in its slot).

- `bf16`, `int8`, `int4`, `int2`: every transfer in that precision (sizes in `sim.modelspec.PRECISIONS`).
- `fate-hybrid`: Fate's popularity-aware hybrid quantisation (arXiv 2502.12224): in prefill, the least
  popular experts of a layer step go INT2 until they cover `int2_rate` of the step's routing mass
  (tokens routed; predicted counts for prefetches), the rest INT4; decode always INT4. Fate uses
  int2_rate 0.3 for Qwen1.5-MoE and 0.5 for DeepSeekMoE.

A slot is sized for the largest precision a policy can load (`storage_precisions`), so a layer's slot
count does not depend on which precision an expert happened to arrive in.
"""

from __future__ import annotations

from dataclasses import dataclass

from sim.modelspec import PRECISIONS

PRECISION_POLICIES = ("bf16", "int8", "int4", "int2", "fate-hybrid")
"""Valid precision policy names."""


@dataclass(frozen=True)
class PrecisionPolicy:
    """Chooses the transfer precision of each expert of one layer step."""

    name: str
    int2_rate: float
    """fate-hybrid: share of the prefill routing mass that may go INT2 (least popular experts first)."""

    def storage_precisions(self) -> tuple[str, ...]:
        """Precisions this policy can produce."""
        return ("int4", "int2") if self.name == "fate-hybrid" else (self.name,)

    def uniform(self, phase: str) -> str | None:
        """The one precision every expert of a `phase` step gets, or None when it depends on the experts."""
        if self.name != "fate-hybrid":
            return self.name
        if phase != "prefill" or self.int2_rate <= 0.0:
            return "int4"
        return None

    def assign(self, phase: str, experts: list[int], token_counts: list[float]) -> list[str]:
        """Precision of each expert, given how many tokens (or predicted tokens) each serves."""
        if self.name != "fate-hybrid":
            return [self.name] * len(experts)
        if phase != "prefill" or self.int2_rate <= 0.0:
            return ["int4"] * len(experts)
        total = float(sum(token_counts))
        out = ["int4"] * len(experts)
        mass = 0.0
        # least popular first; ties: higher expert id first, so the order is total
        for i in sorted(range(len(experts)), key=lambda i: (token_counts[i], -experts[i])):
            if mass + token_counts[i] > self.int2_rate * total:
                break
            mass += token_counts[i]
            out[i] = "int2"
        return out


def largest(precisions: tuple[str, ...]) -> str:
    """The precision with the most bits per weight among `precisions`."""
    return max(precisions, key=lambda p: PRECISIONS[p].bits)
