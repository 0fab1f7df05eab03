"""The learned estimator: training beats popularity on held-out data; save/load round trip; errors."""

from __future__ import annotations

import dataclasses

import numpy as np
import pytest
from conftest import make_structured_trace

from sim.analysis.estimator import load_estimator, save_estimator, train_estimator
from sim.analysis.predictors import match_counts, multi_hot
from traces.errors import UserError


def _precision_at_k(scores: np.ndarray, actual: np.ndarray, k: int) -> float:
    return match_counts(scores, actual, k, 0.5)["topk_tp"].sum() / (k * len(actual))


def test_trained_on_one_trace_beats_popularity_on_another(tmp_path) -> None:
    """Same router matrices, different gate inputs: the estimator trained on trace A predicts layer j+1 of
    trace B from layer j's gate input far better than B's own popularity ranking (which is ~k/E ≈ 12%)."""
    train = make_structured_trace(seed=0, token_seed=1, num_sequences=16)
    test = make_structured_trace(seed=0, token_seed=2)
    est = train_estimator(train, depth=1, steps=150)
    k, e = test.top_k, test.num_experts
    hot = multi_hot(test.topk_ids, e)
    for j in range(1, test.num_moe_layers):
        learned = est(j - 1, np.asarray(test.gate_inputs[:, j - 1]))[:, 0]
        popularity = np.broadcast_to(hot[:, j].mean(axis=0), hot[:, j].shape)
        p_learned = _precision_at_k(learned, hot[:, j], k)
        p_pop = _precision_at_k(popularity, hot[:, j], k)
        assert p_learned > p_pop + 0.3, (j, p_learned, p_pop)


def test_save_load_round_trip(tmp_path) -> None:
    """Weights, bias, metadata and scores survive safetensors exactly; rows past the last layer are 0."""
    trace = make_structured_trace(num_sequences=4)
    est = train_estimator(trace, depth=2, steps=5)
    path = tmp_path / "est.safetensors"
    save_estimator(est, path)
    back = load_estimator(path)
    assert np.array_equal(back.weights, est.weights) and np.array_equal(back.bias, est.bias)
    assert back.metadata == est.metadata and back.metadata["trace_hash"] == trace.content_hash()
    x = np.asarray(trace.gate_inputs[:3, 1])
    assert np.array_equal(back(1, x), est(1, x))
    last = back(trace.num_moe_layers - 2, x)  # layer L-2: d=1 valid, d=2 past the end
    assert (last[:, 1] == 0).all() and (last[:, 0] > 0).all()


def test_errors(tmp_path) -> None:
    """No gate inputs, a missing file and a foreign safetensors file are one-line UserErrors."""
    trace = make_structured_trace(num_sequences=2)
    with pytest.raises(UserError, match="gate_inputs"):
        train_estimator(dataclasses.replace(trace, gate_inputs=None))
    with pytest.raises(UserError, match="does not exist"):
        load_estimator(tmp_path / "none.safetensors")
    from safetensors.numpy import save_file

    save_file({"x": np.zeros(2, np.float32)}, str(tmp_path / "other.safetensors"))
    with pytest.raises(UserError, match="not a fatesim estimator"):
        load_estimator(tmp_path / "other.safetensors")


def test_the_closed_form_gradient_is_autograd_s() -> None:
    """sim.analysis.estimator._gradient (closed form, heads side by side) equals torch's autograd of the loss
    the training states, written here in the [T, L, D, E] layout: mean BCE-with-logits over the heads whose
    layer exists + weight decay * |W|^2, at random weights and biases."""
    import torch

    from sim.analysis.estimator import _gradient, _loss

    rng = np.random.default_rng(3)
    tokens, layers, depth, hidden, experts, decay = 7, 4, 2, 5, 6, 1e-2
    x = torch.tensor(rng.standard_normal((tokens, layers, hidden)), dtype=torch.float32)
    y = torch.tensor(rng.random((tokens, layers, depth, experts)) < 0.3, dtype=torch.float32)
    mask = torch.ones((layers, depth))
    mask[layers - 1, :], mask[layers - 2, 1] = 0.0, 0.0  # layer l + d + 1 does not exist
    w = torch.tensor(rng.standard_normal((layers, depth, hidden, experts)), dtype=torch.float32, requires_grad=True)
    b = torch.tensor(rng.standard_normal((layers, depth, experts)), dtype=torch.float32, requires_grad=True)
    logits = torch.einsum("tlh,ldhe->tlde", x, w) + b
    bce = torch.nn.functional.binary_cross_entropy_with_logits(logits, y, reduction="none")
    n = float(mask.sum()) * tokens * experts
    loss = (bce * mask[None, :, :, None]).sum() / n + decay * (w * w).sum()
    loss.backward()

    side_by_side = (layers, -1, depth * experts)
    x_l = x.permute(1, 0, 2).contiguous()
    y_l = y.permute(1, 0, 2, 3).reshape(side_by_side).contiguous()
    scale = (mask / n)[:, None, :, None].expand(layers, 1, depth, experts).reshape(side_by_side).contiguous()
    w_l = w.detach().permute(0, 2, 1, 3).reshape(layers, hidden, depth * experts).contiguous()
    b_l = b.detach().reshape(layers, 1, depth * experts).clone()
    w_l.grad, b_l.grad = torch.zeros_like(w_l), torch.zeros_like(b_l)
    z = torch.empty((layers, tokens, depth * experts))
    assert _loss(torch, x_l, y_l, scale, w_l, b_l, decay, z) == pytest.approx(float(loss), rel=1e-6)
    _gradient(torch, x_l, y_l, scale, w_l, b_l, decay, z)
    grad_w = w_l.grad.reshape(layers, hidden, depth, experts).permute(0, 2, 1, 3)
    np.testing.assert_allclose(grad_w.numpy(), w.grad.numpy(), rtol=1e-5, atol=1e-7)
    np.testing.assert_allclose(b_l.grad.reshape(layers, depth, experts).numpy(), b.grad.numpy(), rtol=1e-5, atol=1e-7)


def test_the_same_training_writes_the_same_file(tmp_path) -> None:
    trace = make_structured_trace(num_sequences=2)
    paths = [tmp_path / "a.safetensors", tmp_path / "b.safetensors"]
    for path in paths:
        save_estimator(train_estimator(trace, depth=2, steps=3), path)
    assert paths[0].read_bytes() == paths[1].read_bytes()
