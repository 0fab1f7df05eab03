"""What a policy needs from the engine that runs it: look-ahead probabilities, and the precisions it moves.

Both engines (the simulator and realrun) and the controller ask here, so this knowledge is written once:

- `needs_lookahead(policy)`: whether the engine must compute look-ahead logits (the gates of the layers
  ahead applied to the current gate input) for the controller's predictor.
- `lookahead_probabilities(logits)`: those logits -> the probabilities predictors read (softmax over
  experts, float32).
- `loaded_precisions(policy)`: the precisions the controller may move into fast memory (its slots are
  sized for the largest, `slot_precision`).
- `storage_precisions(policy)`: what the slow tier must hold (the loaded precisions, plus the bf16 copy the
  CPU computes from under miss policy `cpu`).
"""

from __future__ import annotations

import numpy as np

from sim.policies.precision import PrecisionPolicy, largest
from sim.policies.prediction import NEEDS_LOOKAHEAD
from sim.policies.presets import PolicyConfig


def needs_lookahead(policy: PolicyConfig) -> bool:
    """Whether the policy's predictor reads look-ahead probabilities (and prefetches with them)."""
    return policy.prediction in NEEDS_LOOKAHEAD and policy.prefetch != "none"


def lookahead_probabilities(logits: np.ndarray, chunk_rows: int = 4096) -> np.ndarray:
    """Softmax over the last axis (experts) in float32: [..., E] look-ahead logits -> probabilities.

    A router this sharp may give experts a probability of exactly 0 (exp underflows); predictors never
    rank those (`sim.policies.prediction`). Rows are independent, so the softmax runs `chunk_rows` rows at
    a time, which stay in cache through its five passes (the same operations per row, the same bits)."""
    logits = np.asarray(logits)
    out = np.empty(logits.shape, np.float32)
    if out.size == 0:
        return out
    rows, flat = out.reshape(-1, out.shape[-1]), logits.reshape(-1, logits.shape[-1])
    for start in range(0, rows.shape[0], chunk_rows):
        x = rows[start:start + chunk_rows]
        x[...] = flat[start:start + chunk_rows]
        x -= x.max(axis=-1, keepdims=True)
        np.exp(x, out=x)
        x /= x.sum(axis=-1, keepdims=True)
    return out


def loaded_precisions(policy: PolicyConfig) -> tuple[str, ...]:
    """Precisions the policy moves into fast memory, the precision policy's first (the one pinned experts
    are preloaded in)."""
    loaded = PrecisionPolicy(policy.precision, policy.int2_rate).storage_precisions()
    if policy.miss == "lowbit" and policy.miss_precision not in loaded:
        loaded = (*loaded, policy.miss_precision)
    return loaded


def slot_precision(policy: PolicyConfig) -> str:
    """The precision one fast-memory slot is sized for: the largest the policy loads."""
    return largest(loaded_precisions(policy))


def storage_precisions(policy: PolicyConfig) -> tuple[str, ...]:
    """Every precision the slow tier must hold for the policy (what it loads, and bf16 for CPU execution)."""
    stored = loaded_precisions(policy)
    if policy.miss == "cpu" and "bf16" not in stored:
        stored = (*stored, "bf16")
    return stored
