"""The learned expert estimator: per-layer linear heads that read layer l's gate input and score the
experts of layers l+1 .. l+D (Speculating Experts' idea, arXiv 2603.19289, kept deliberately small).

Model, for MoE layer l and distance d (shapes: H hidden, E experts):
    x = g / rms(g)                       # g: the gate (router) input of layer l, [H]; RMS-normalised
    p = sigmoid(x @ W[l, d-1] + b[l, d-1])   # [E]: estimated probability that expert e is routed at l+d
trained with binary cross-entropy against the multi-hot routed set of layer l+d (full-batch Adam,
weight decay). W is initialised to zero, so an untrained head scores every expert by its bias alone, i.e. by
popularity; anything better than popularity is learned from the gate inputs.

Saved as safetensors (`W` [L, D, H, E] float32, `b` [L, D, E] float32) with string metadata:
`format=fatesim-estimator`, `version`, `model`, `trace_hash` (of the training trace), `num_layers`,
`depth`, `hidden_size`, `num_experts`, `top_k`, `train_tokens`, `steps`, `final_loss`.

`LearnedEstimator` is the callable that the simulator's and realrun's `learned` prediction policy inject:
``estimator(layer, gate_input) -> [D, E]`` scores (probabilities) for layers layer+1 .. layer+D; rows for
layers past the model's last MoE layer are zero.
"""

from __future__ import annotations

import json
import os
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import numpy as np

from traces.errors import UserError

FORMAT_NAME = "fatesim-estimator"
FORMAT_VERSION = 1


def rms_normalise(x: np.ndarray) -> np.ndarray:
    """x / sqrt(mean(x²)) along the last axis (float32); zero rows stay zero."""
    x = np.asarray(x, dtype=np.float32)
    rms = np.sqrt(np.mean(x * x, axis=-1, keepdims=True))
    return x / np.maximum(rms, 1e-6)


@dataclass(frozen=True, eq=False)
class LearnedEstimator:
    """A trained estimator: call it as ``estimator(layer, gate_input)`` for [D, E] (or [N, D, E]) scores."""

    weights: np.ndarray  # [L, D, H, E] float32
    bias: np.ndarray  # [L, D, E] float32
    metadata: dict
    """Training provenance (see the module docstring); values are JSON-ready."""

    @property
    def num_layers(self) -> int:
        """L, MoE layers of the model it was trained for."""
        return int(self.weights.shape[0])

    @property
    def depth(self) -> int:
        """D, how many layers ahead it predicts."""
        return int(self.weights.shape[1])

    @property
    def hidden_size(self) -> int:
        """H."""
        return int(self.weights.shape[2])

    @property
    def num_experts(self) -> int:
        """E."""
        return int(self.weights.shape[3])

    def scores(self, layer: int, gate_input: Any) -> np.ndarray:
        """Probabilities that each expert of layers layer+1 .. layer+D is routed, from layer's gate input.

        `gate_input` is [H] or [N, H] (numpy, or anything `np.asarray` takes, e.g. a CPU torch tensor);
        returns [D, E] or [N, D, E] float32. Rows with layer+d >= L are zero.
        """
        if not 0 <= layer < self.num_layers:
            raise UserError(f"estimator has MoE layers 0..{self.num_layers - 1}, asked for layer {layer}")
        x = rms_normalise(np.asarray(gate_input, dtype=np.float32))
        if x.shape[-1] != self.hidden_size:
            raise UserError(f"estimator expects gate inputs of width {self.hidden_size}, got {x.shape[-1]}")
        logits = np.einsum("...h,dhe->...de", x, self.weights[layer]) + self.bias[layer]  # [..., D, E]
        probs = 1.0 / (1.0 + np.exp(-logits))
        valid = (layer + 1 + np.arange(self.depth)) < self.num_layers  # [D]
        return (probs * valid[:, None]).astype(np.float32)

    __call__ = scores


def train_estimator_arrays(
    gate_inputs: np.ndarray,
    topk_ids: np.ndarray,
    num_experts: int,
    depth: int = 2,
    steps: int = 300,
    lr: float = 1e-2,
    weight_decay: float = 1e-4,
    seed: int = 0,
    progress: Callable[[int], None] | None = None,
) -> tuple[np.ndarray, np.ndarray, float]:
    """Fit W [L, D, H, E] and b [L, D, E] on gate inputs [T, L, H] and routed ids [T, L, k].

    Full-batch Adam for `steps` steps on the mean binary cross-entropy over valid (l, d) heads.
    Returns (W, b, final loss). Deterministic for a given seed (single-threaded CPU torch).
    """
    import torch

    torch.manual_seed(seed)
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # deterministic sums, and polite on a shared machine
    try:
        return _fit(torch, gate_inputs, topk_ids, num_experts, depth, steps, lr, weight_decay, progress)
    finally:
        torch.set_num_threads(threads)


def _fit(torch, gate_inputs: np.ndarray, topk_ids: np.ndarray, num_experts: int, depth: int, steps: int,
         lr: float, weight_decay: float,
         progress: Callable[[int], None] | None = None) -> tuple[np.ndarray, np.ndarray, float]:
    """The training loop of `train_estimator_arrays` (torch passed in, imported lazily)."""
    num_tokens, num_layers, hidden = gate_inputs.shape
    if num_tokens == 0:
        raise UserError("cannot train an estimator on a trace with no tokens")
    x = torch.from_numpy(rms_normalise(gate_inputs))  # [T, L, H]
    ids = np.asarray(topk_ids).astype(np.int64)
    multi_hot = np.zeros((num_tokens, num_layers, num_experts), dtype=np.float32)  # [T, L, E]
    t_idx, l_idx, j_idx = np.nonzero(ids >= 0)
    multi_hot[t_idx, l_idx, ids[t_idx, l_idx, j_idx]] = 1.0
    # targets[t, l, d] = multi-hot of layer l+d+1; mask[l, d] = that layer exists
    targets = np.zeros((num_tokens, num_layers, depth, num_experts), dtype=np.float32)
    mask = np.zeros((num_layers, depth), dtype=np.float32)
    for d in range(depth):
        if d + 1 < num_layers:
            targets[:, : num_layers - d - 1, d] = multi_hot[:, d + 1 :]
            mask[: num_layers - d - 1, d] = 1.0
    y = torch.from_numpy(targets)
    m = torch.from_numpy(mask)[None, :, :, None]  # [1, L, D, 1]
    base = multi_hot.mean(axis=0).clip(1e-4, 1 - 1e-4)  # [L, E] popularity, for the bias init
    bias_init = np.zeros((num_layers, depth, num_experts), dtype=np.float32)
    for d in range(depth):
        if d + 1 < num_layers:
            bias_init[: num_layers - d - 1, d] = np.log(base[d + 1 :] / (1 - base[d + 1 :]))
    denominator = float(mask.sum() * num_tokens * num_experts) or 1.0
    x_l = x.permute(1, 0, 2).contiguous()  # [L, T, H]
    y_l = y.permute(1, 0, 2, 3).reshape(num_layers, num_tokens, depth * num_experts).contiguous()  # [L, T, D*E]
    scale = (m.permute(1, 0, 2, 3) / denominator).expand(num_layers, 1, depth, num_experts)
    scale = scale.reshape(num_layers, 1, depth * num_experts).contiguous()  # [L, 1, D*E]: mask / N
    w_l = torch.zeros((num_layers, hidden, depth * num_experts))  # W as [L, H, D*E]
    b_l = torch.tensor(bias_init).reshape(num_layers, 1, depth * num_experts)  # [L, 1, D*E]
    w_l.grad, b_l.grad = torch.zeros_like(w_l), torch.zeros_like(b_l)
    optimiser = torch.optim.Adam([w_l, b_l], lr=lr, weight_decay=0.0)
    z = torch.empty((num_layers, num_tokens, depth * num_experts))
    loss_value = float("nan")
    with torch.no_grad():
        for step in range(steps):
            if step == steps - 1:  # the loss reported: the last step's, before its update
                loss_value = _loss(torch, x_l, y_l, scale, w_l, b_l, weight_decay, z)
            _gradient(torch, x_l, y_l, scale, w_l, b_l, weight_decay, z)
            optimiser.step()
            if progress is not None:
                progress(1)
    w_out = w_l.reshape(num_layers, hidden, depth, num_experts).permute(0, 2, 1, 3)  # [L, D, H, E]
    return w_out.numpy().copy(), b_l.reshape(num_layers, depth, num_experts).numpy().copy(), loss_value


# The training loss and its gradient, with each layer's heads side by side ([L, T, D*E]: per layer one matrix
# product, no layout copies): x_l [L, T, H] normalised gate inputs, y_l [L, T, D*E] targets, scale [L, 1, D*E]
# the head mask / N (N = valid heads x tokens x experts), w_l [L, H, D*E], b_l [L, 1, D*E], z [L, T, D*E]
# scratch. loss = sum(scale * BCE-with-logits(x_l @ w_l + b_l, y_l)) + weight_decay * |W|^2.


def _loss(torch, x_l, y_l, scale, w_l, b_l, weight_decay: float, z) -> float:
    """The loss (z is left holding the logits)."""
    torch.baddbmm(b_l, x_l, w_l, out=z)
    bce = torch.nn.functional.binary_cross_entropy_with_logits(z, y_l, reduction="none")
    return float((bce * scale).sum() + weight_decay * (w_l * w_l).sum())


def _gradient(torch, x_l, y_l, scale, w_l, b_l, weight_decay: float, z) -> None:
    """The loss's gradient into w_l.grad and b_l.grad, in closed form and in place: d(BCE-with-logits)/dz is
    sigmoid(z) - y, so dloss/dz = scale * (sigmoid(z) - y) (z is left holding it), dloss/dW = x^T dloss/dz +
    2 * weight_decay * W, dloss/db = the sum of dloss/dz over tokens. No autograd graph, and no BCE forward
    (more than half of an autograd step): the loop computes the loss only at the step it reports."""
    torch.baddbmm(b_l, x_l, w_l, out=z)
    z.sigmoid_().sub_(y_l).mul_(scale)
    torch.bmm(x_l.transpose(1, 2), z, out=w_l.grad)
    w_l.grad.add_(w_l, alpha=2 * weight_decay)
    torch.sum(z, dim=1, keepdim=True, out=b_l.grad)


def train_estimator(trace, depth: int = 2, steps: int = 300, token_mask: np.ndarray | None = None,
                    seed: int = 0, progress: Callable[[int], None] | None = None) -> LearnedEstimator:
    """Train on a `Trace` with gate inputs (optionally only the tokens where `token_mask` [T] is true);
    `progress(1)` after each step."""
    if trace.gate_inputs is None:
        raise UserError(
            f"trace of {trace.model} has no gate_inputs; record one with gate inputs to train an estimator"
        )
    if depth < 1:
        raise UserError(f"estimator depth must be >= 1 layer, got {depth}")
    gate_inputs = np.asarray(trace.gate_inputs)
    topk_ids = np.asarray(trace.topk_ids)
    if token_mask is not None:
        gate_inputs, topk_ids = gate_inputs[token_mask], topk_ids[token_mask]
    w, b, loss = train_estimator_arrays(gate_inputs, topk_ids, trace.num_experts, depth=depth, steps=steps,
                                        seed=seed, progress=progress)
    metadata = {
        "model": trace.model, "trace_hash": trace.content_hash(), "num_layers": trace.num_moe_layers,
        "depth": depth, "hidden_size": int(gate_inputs.shape[2]), "num_experts": trace.num_experts,
        "top_k": trace.top_k, "train_tokens": int(gate_inputs.shape[0]), "steps": steps,
        "final_loss": round(loss, 6),
    }
    return LearnedEstimator(w, b, metadata)


def save_estimator(estimator: LearnedEstimator, path: str | os.PathLike[str]) -> None:
    """Write the estimator as safetensors with string metadata, atomically."""
    from traces.format import write_safetensors

    meta = {"format": FORMAT_NAME, "version": str(FORMAT_VERSION)}
    meta.update({key: json.dumps(value) for key, value in estimator.metadata.items()})
    write_safetensors(path, {"W": np.asarray(estimator.weights, np.float32), "b": np.asarray(estimator.bias, np.float32)},
                      meta)


def load_estimator(path: str | os.PathLike[str]) -> LearnedEstimator:
    """Read an estimator written by `save_estimator`; UserError naming the problem otherwise."""
    from safetensors import safe_open

    if not os.path.isfile(path):
        raise UserError(f"estimator file {path} does not exist; train one with `fatesim train-estimator`")
    try:
        with safe_open(str(path), framework="numpy") as handle:
            meta = handle.metadata() or {}
            tensors = {name: handle.get_tensor(name) for name in handle.keys()}  # noqa: SIM118
    except Exception as error:  # the safetensors library raises several types for a corrupt file
        raise UserError(f"{path} is not a safetensors estimator file ({error})") from None
    if meta.get("format") != FORMAT_NAME:
        raise UserError(f"{path} is not a fatesim estimator (format={meta.get('format')!r})")
    if meta.get("version") != str(FORMAT_VERSION):
        raise UserError(f"{path} has estimator version {meta.get('version')}; this fatesim reads {FORMAT_VERSION}")
    if set(tensors) != {"W", "b"}:
        raise UserError(f"{path} must hold tensors W and b, holds {sorted(tensors)}")
    w, b = tensors["W"], tensors["b"]
    if w.ndim != 4 or b.shape != (w.shape[0], w.shape[1], w.shape[3]):
        raise UserError(f"{path}: W {w.shape} and b {b.shape} are not [L, D, H, E] and [L, D, E]")
    metadata = {key: json.loads(value) for key, value in meta.items() if key not in ("format", "version")}
    return LearnedEstimator(w, b, metadata)


def estimator_predictor(path: str | os.PathLike[str], num_layers: int | None = None,
                        num_experts: int | None = None):
    """The callable a `learned` prediction policy injects: loads `path` and checks it fits the model."""
    estimator = load_estimator(path)
    if num_layers is not None and estimator.num_layers != num_layers:
        raise UserError(f"estimator {path} is for {estimator.num_layers} MoE layers, the model has {num_layers}")
    if num_experts is not None and estimator.num_experts != num_experts:
        raise UserError(f"estimator {path} is for {estimator.num_experts} experts, the model has {num_experts}")
    return estimator


def step_token_slices(trace) -> list[slice]:
    """Token range of each forward step of a trace, in execution order: per sequence, one step for all
    its prefill tokens (if any), then one step per decode token (the step numbering of `Signals.step`)."""
    prefill = np.asarray(trace.is_prefill).astype(bool)
    steps: list[slice] = []
    for sl in trace.sequence_slices():
        n_prefill = int(prefill[sl].sum())
        if n_prefill:
            steps.append(slice(sl.start, sl.start + n_prefill))
        steps.extend(slice(t, t + 1) for t in range(sl.start + n_prefill, sl.stop))
    return steps


def make_score_fn(estimator: LearnedEstimator, trace=None):
    """The `score_fn(layer, signals) -> [E]` that `sim.policies.prediction.LearnedPredictor` injects.

    Scores layer+1's experts from layer's gate input: `signals.gate_inputs` ([n, H]) when the engine
    provides it (realrun: the live hidden state), else the trace's recorded gate inputs of the step's
    tokens (`step_token_slices`). Decode: probabilities; prefill: expected token counts (sum over tokens).
    """
    steps = step_token_slices(trace) if trace is not None else None

    def score_fn(layer: int, signals) -> np.ndarray:
        x = getattr(signals, "gate_inputs", None)
        if x is None:
            if steps is None or trace.gate_inputs is None:
                raise UserError("the learned predictor needs gate inputs: give a trace recorded with gate inputs")
            x = np.asarray(trace.gate_inputs[steps[signals.step], layer])  # [n, H]
        probs = estimator.scores(layer, np.atleast_2d(np.asarray(x, dtype=np.float32)))[:, 0]  # [n, E]
        return probs.sum(axis=0) if signals.phase == "prefill" else probs.mean(axis=0)

    return score_fn
