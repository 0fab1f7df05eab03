"""Sizes on the command line: `6GiB`, `512MB`, `1.5e9`, or a percentage of the routed experts (`25%`)."""

from __future__ import annotations

import re

from sim.modelspec import ModelSpec
from traces.errors import UserError

_UNITS = {
    "": 1, "b": 1,
    "kb": 10**3, "mb": 10**6, "gb": 10**9, "tb": 10**12,
    "kib": 2**10, "mib": 2**20, "gib": 2**30, "tib": 2**40,
}
_SIZE = re.compile(r"^\s*([0-9]*\.?[0-9]+(?:[eE][+-]?[0-9]+)?)\s*([a-zA-Z]*)\s*$")


def parse_size(text: str) -> int:
    """Bytes in a size such as `6GiB`, `512MB`, `4096` (bytes); decimal (KB, MB, GB) and binary (KiB...) units."""
    match = _SIZE.match(str(text))
    if not match or match.group(2).lower() not in _UNITS:
        raise UserError(f"cannot read size {text!r}; write a number with a unit such as 6GiB, 512MB or 1.5e9")
    return int(float(match.group(1)) * _UNITS[match.group(2).lower()])


def parse_budget(text: str, spec: ModelSpec, kv_tokens: int = 0) -> int:
    """Total fast-memory budget in bytes.

    A percentage means everything that is not a routed expert (non-expert weights, shared experts and the
    KV cache of `kv_tokens` tokens) plus that share of the routed-expert bytes in bf16.
    """
    text = str(text).strip()
    if text.endswith("%"):
        try:
            share = float(text[:-1]) / 100.0
        except ValueError:
            raise UserError(f"cannot read budget {text!r}; write a percentage such as 25%") from None
        if not 0.0 <= share <= 1.0:
            raise UserError(f"budget {text} is outside 0%..100% of the routed-expert bytes")
        return spec.resident_bytes(kv_tokens) + int(share * spec.routed_expert_bytes_total("bf16"))
    size = parse_size(text)
    if size <= 0:
        raise UserError(f"budget {text!r} must be more than 0 bytes")
    return size


def format_bytes(nbytes: float) -> str:
    """`nbytes` in binary units for people: 1536 -> '1.50 KiB'."""
    value = float(nbytes)
    for unit in ("B", "KiB", "MiB", "GiB"):
        if abs(value) < 1024.0:
            return f"{value:.0f} {unit}" if unit == "B" else f"{value:.2f} {unit}"
        value /= 1024.0
    return f"{value:.2f} TiB"
