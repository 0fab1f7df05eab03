"""The one definition of a fast-memory budget, for every command (replay, compare, sweep, plan, realrun).

A budget is the **total fast memory** the run may use (GPU memory, or the RAM cache in front of an SSD):

    total = resident + routed-expert slots
    resident = non-expert weights + shared experts + KV cache of `kv_tokens` tokens

`kv_tokens` is the longest context the run holds: for a replay, the longest sequence of the trace
(its start position plus its length, `Workload.max_context`); for realrun, the longest prompt plus
`--max-new-tokens`. Sequences run one after another, so one sequence's KV cache is resident at a time.

A budget is written as bytes with a unit (`6GiB`, `512MB`, `1.5e9`) or as a percentage: `25%` is the
resident part plus a quarter of the routed-expert bytes in bf16 ("a quarter of the experts fit").
Whatever way it is written, a budget above the device's memory is refused, naming both figures.
"""

from __future__ import annotations

import math
import os
from dataclasses import dataclass

from sim.modelspec import ModelSpec
from sim.units import format_bytes, parse_budget
from traces.errors import UserError


@dataclass(frozen=True)
class Budget:
    """A budget resolved to bytes for one model and KV-cache length."""

    total_bytes: int
    """All fast memory the run may use."""
    resident_bytes: int
    """Non-expert weights, shared experts and the KV cache of `kv_tokens` tokens."""
    kv_tokens: int

    @property
    def expert_bytes(self) -> int:
        """What is left for routed-expert slots (negative when the resident part alone does not fit)."""
        return self.total_bytes - self.resident_bytes


def host_memory_bytes() -> int:
    """Physical RAM of this host, in bytes (the fast memory of a CPU device)."""
    return int(os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES"))


def largest_share(spec: ModelSpec, kv_tokens: int, device_memory_bytes: int) -> float:
    """The largest percentage budget (0..100, rounded down to 0.1) that fits in `device_memory_bytes`;
    negative when the resident part alone does not fit."""
    routed = spec.routed_expert_bytes_total("bf16")
    room = device_memory_bytes - spec.resident_bytes(kv_tokens)
    if room < 0 or routed <= 0:
        return -1.0
    return min(100.0, math.floor(1000.0 * room / routed) / 10.0)


def resolve_budget(text: str | int, spec: ModelSpec, *, kv_tokens: int, device_memory_bytes: int | None = None,
                   device: str = "the device", option: str = "--memory-budget") -> Budget:
    """`text` ("6GiB", "25%", or int bytes) as a `Budget` of `spec` with a KV cache of `kv_tokens` tokens.

    `device_memory_bytes` (the hardware profile's device memory, or the real device's): a budget above it
    is a UserError naming both figures and the largest percentage that fits; None skips that check.
    `device` names the device in that message; `option` names where the budget was given (a command-line
    option or a grid key) in every message.
    """
    if isinstance(text, bool):
        raise UserError(f"{option} {text!r} is not a size; write 6GiB, 512MB or 25%")
    if isinstance(text, int):
        if text <= 0:
            raise UserError(f"{option} {text} must be more than 0 bytes")
        total = int(text)
    else:
        try:
            total = parse_budget(str(text), spec, kv_tokens=kv_tokens)
        except UserError as error:
            raise UserError(f"{option}: {error}") from None
    if device_memory_bytes is not None and total > device_memory_bytes:
        share = largest_share(spec, kv_tokens, device_memory_bytes)
        fits = (f"at most {format_bytes(device_memory_bytes)}" +
                (f" ({share:g}% of the routed experts)" if share >= 0 else
                 f"; {spec.name}'s non-expert weights, shared experts and KV cache alone "
                 f"({format_bytes(spec.resident_bytes(kv_tokens))}) exceed it"))
        raise UserError(f"{option} {text} is {format_bytes(total)}, more than the {format_bytes(device_memory_bytes)} "
                        f"of memory of {device}; give {fits}")
    return Budget(total, spec.resident_bytes(kv_tokens), int(kv_tokens))
