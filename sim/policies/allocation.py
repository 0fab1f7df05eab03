"""Allocation: how many expert slots each MoE layer's cache gets under the expert byte budget.

A slot holds one routed expert in the policy's storage precision (the largest precision it ever loads),
so `total_slots = expert_budget_bytes // slot_bytes`. Every layer needs at least top-k slots, or one
decode token could not run; fewer is a budget the user must raise.

- `uniform`: the same number of slots per layer; the remainder goes to the shallowest layers.
- `shallow`: Fate's shallow-favoring cache (arXiv 2502.12224): the shallowest MoE layers are cached fully
  (all E experts; their prefetch has the least look-ahead to hide behind) and the rest of the slots are
  split evenly over the deeper layers. `shallow_layers` = how many at most (fewer when that many full layers
  plus top-k slots for every other layer do not fit, as Fate's code falls back); -1 = as many as fit while
  every deeper layer keeps at least 2·k slots (the useful cache size of the LRC paper).
- `popularity`: static pinning (Fiddler; llama.cpp `--n-cpu-moe`-style placement): uniform slots, and in
  each layer the most popular experts (from a profiling pass over the prompts: the trace's prefill tokens,
  as realrun profiles them) are loaded before serving and never evicted; `reserve` slots per layer stay
  free for loaded misses.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from traces.errors import UserError

ALLOCATIONS = ("uniform", "shallow", "popularity")
"""Valid allocation policy names."""


@dataclass(frozen=True)
class Allocation:
    """Slots per layer and the experts pinned in each layer."""

    slots_per_layer: tuple[int, ...]
    pinned: tuple[tuple[int, ...], ...]
    """pinned[l]: experts of layer l resident from the start and never evicted (most popular first)."""


def _uniform(total_slots: int, num_layers: int, num_experts: int) -> list[int]:
    base, extra = divmod(total_slots, num_layers)
    slots = [base + (1 if layer < extra else 0) for layer in range(num_layers)]
    return [min(s, num_experts) for s in slots]


def allocate(
    name: str,
    *,
    total_slots: int,
    num_layers: int,
    num_experts: int,
    top_k: int,
    shallow_layers: int = -1,
    popularity: np.ndarray | None = None,
    reserve: int = 0,
) -> Allocation:
    """Slots per layer under policy `name`; UserError if some layer would get fewer than top-k slots.

    popularity: [L, E] routing counts (needed by `popularity`); reserve: slots per layer not pinned.
    """
    need = num_layers * top_k
    if total_slots < need:
        raise UserError(
            f"the expert budget holds {total_slots} expert slots but {num_layers} layers x top-{top_k} need "
            f"at least {need}; raise --memory-budget"
        )
    pinned: list[tuple[int, ...]] = [() for _ in range(num_layers)]
    if name == "uniform":
        slots = _uniform(total_slots, num_layers, num_experts)
    elif name == "shallow":
        keep = min(num_experts, 2 * top_k)
        if shallow_layers < 0:
            full = 0
            while full < num_layers and (full + 1) * num_experts + (num_layers - full - 1) * keep <= total_slots:
                full += 1
        else:  # at most shallow_layers: as many as fit with top-k slots for the others (Fate's code falls
            # back the same way when its cache cannot hold 4 full layers)
            full = min(shallow_layers, num_layers)
            while full > 0 and full * num_experts + (num_layers - full) * top_k > total_slots:
                full -= 1
        rest = num_layers - full
        slots = [num_experts] * full + (_uniform(total_slots - full * num_experts, rest, num_experts) if rest else [])
    elif name == "popularity":
        if popularity is None:
            raise UserError("allocation 'popularity' needs expert popularity counts from a profiling pass")
        slots = _uniform(total_slots, num_layers, num_experts)
        for layer in range(num_layers):
            count = max(0, slots[layer] - reserve)
            order = np.argsort(-np.asarray(popularity[layer], dtype=np.float64), kind="stable")
            pinned[layer] = tuple(int(e) for e in order[:count])
    else:
        raise UserError(f"unknown allocation {name!r}; choose one of {', '.join(ALLOCATIONS)}")
    return Allocation(slots_per_layer=tuple(slots), pinned=tuple(pinned))
