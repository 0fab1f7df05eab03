"""Fitting recovers known link, roofline and rate parameters from synthetic measurements."""

from __future__ import annotations

import numpy as np
import pytest

from calibration.fit import (
    RooflineFit,
    build_profile,
    fit_copy_contention,
    fit_link,
    fit_rate,
    fit_roofline,
    provenance_line,
    token_scales,
)
from calibration.microbench import Point
from traces.errors import UserError


def test_link_fit_recovers_latency_and_bandwidth_exactly() -> None:
    """Noise-free transfers give back the latency and bandwidth they were made with."""
    sizes = np.geomspace(64 << 10, 64 << 20, 31)
    seconds = 25e-6 + sizes / 3.2e9
    fit = fit_link(sizes, seconds)
    assert fit.latency_s == pytest.approx(25e-6, rel=1e-6)
    assert fit.bandwidth_bytes_per_s == pytest.approx(3.2e9, rel=1e-6)
    assert fit.rel_rms_error < 1e-8


def test_link_fit_with_noise_stays_close(rng: np.random.Generator) -> None:
    """5% multiplicative noise moves the fitted parameters by a few percent, not by orders of magnitude."""
    sizes = np.repeat(np.geomspace(64 << 10, 64 << 20, 16), 5)
    seconds = (40e-6 + sizes / 1.0e9) * rng.lognormal(0.0, 0.05, size=sizes.shape)
    fit = fit_link(sizes, seconds)
    assert fit.bandwidth_bytes_per_s == pytest.approx(1.0e9, rel=0.05)
    assert fit.latency_s == pytest.approx(40e-6, rel=0.15)


def test_link_fit_weights_small_transfers() -> None:
    """The relative fit determines the latency from small transfers, which an absolute fit would ignore."""
    sizes = np.array([4096.0, 65536.0, 64 << 20])
    seconds = 100e-6 + sizes / 2e9
    assert fit_link(sizes, seconds).latency_s == pytest.approx(100e-6, rel=1e-6)


def _roofline_points(launch_s: float, flops_per_s: float, bytes_per_s: float) -> tuple[np.ndarray, ...]:
    tokens = np.array([1, 2, 4, 8, 16, 32, 64, 128, 256, 512], dtype=float)
    flops = 2 * 3 * 2048 * 1408 * tokens
    nbytes = np.full_like(flops, 3 * 2048 * 1408 * 2)
    seconds = launch_s + np.maximum(flops / flops_per_s, nbytes / bytes_per_s)
    return flops, nbytes, seconds


def test_roofline_fit_recovers_parameters_exactly() -> None:
    """Points on both sides of the ridge give back launch time, FLOP rate and bandwidth."""
    flops, nbytes, seconds = _roofline_points(30e-6, 150e9, 20e9)
    fit = fit_roofline(flops, nbytes, seconds)
    assert fit.kernel_launch_s == pytest.approx(30e-6, rel=1e-5)
    assert fit.matmul_flops_per_s == pytest.approx(150e9, rel=1e-6)
    assert fit.memory_bytes_per_s == pytest.approx(20e9, rel=1e-6)
    assert fit.rel_rms_error < 1e-8


def test_roofline_fit_mixed_operations() -> None:
    """Experts, MLPs and attention of different intensities share one roofline and recover it."""
    f1, b1, _ = _roofline_points(0, 1, 1)
    flops = np.concatenate([f1, f1 * 4, [3.4e7, 2.2e9, 9e9]])
    nbytes = np.concatenate([b1, b1 * 4, [3.4e7, 3.4e7, 4e7]])
    seconds = 12e-6 + np.maximum(flops / 80e9, nbytes / 11e9)
    fit = fit_roofline(flops, nbytes, seconds)
    assert (fit.kernel_launch_s, fit.matmul_flops_per_s, fit.memory_bytes_per_s) == pytest.approx(
        (12e-6, 80e9, 11e9), rel=1e-5)


def test_roofline_all_memory_bound_gives_a_finite_lower_bound() -> None:
    """With no compute-bound point the FLOP rate is the least that keeps every point memory-bound."""
    flops = np.array([1e6, 2e6, 4e6])
    nbytes = np.array([1e8, 2e8, 4e8])
    seconds = nbytes / 10e9
    fit = fit_roofline(flops, nbytes, seconds)
    assert fit.memory_bytes_per_s == pytest.approx(10e9, rel=1e-6)
    assert np.isfinite(fit.matmul_flops_per_s)
    assert fit.predict_s(flops, nbytes) == pytest.approx(seconds, rel=1e-6)


def test_rate_fit() -> None:
    """A pure rate is recovered from one or several points."""
    assert fit_rate([17e6], [17e6 / 3e9]) == pytest.approx(3e9)
    assert fit_rate([1e6, 2e6, 4e6], np.array([1e6, 2e6, 4e6]) / 5e8) == pytest.approx(5e8)


@pytest.mark.parametrize("sizes,seconds", [([], []), ([1.0, 2.0], [1.0]), ([1.0, 2.0], [0.0, 1.0]),
                                           ([5.0, 5.0], [1.0, 1.0])])
def test_bad_measurements_raise_user_error(sizes: list[float], seconds: list[float]) -> None:
    """Empty, ragged, non-positive or single-size measurements are refused in one line."""
    with pytest.raises(UserError):
        fit_link(sizes, seconds)


def synthetic_points() -> list[Point]:
    """A full set of points from a known machine (the profile the fit must return)."""
    pts = [Point("link", s, 0.0, s, 20e-6 + s / 2e9, (20e-6 + s / 2e9,)) for s in np.geomspace(65536, 64 << 20, 10)]
    flops, nbytes, _ = _roofline_points(0, 1, 1)
    for f, b in zip(flops, nbytes, strict=True):
        t = 5e-6 + max(f / 100e9, b / 15e9)
        pts.append(Point("expert", f / (2 * 3 * 2048 * 1408), f, b, t, (t,)))
    for precision, rate in (("int8", 6e9), ("int4", 5e9), ("int2", 4e9)):
        pts.append(Point(f"dequant_{precision}", 17e6, 0.0, 17e6, 17e6 / rate, (17e6 / rate,)))
    pts.append(Point("layer", 1, 1.0, 1.0, 80e-6, (80e-6,)))
    pts.append(Point("predictor", 1, 1.0, 1.0, 25e-6, (25e-6,)))
    return pts


def test_build_profile_assembles_every_field() -> None:
    """The profile carries the fitted numbers in the schema's fields."""
    cal = build_profile(synthetic_points(), name="synthetic", device_kind="cpu", memory_bytes=1 << 34,
                        copy_engines=1, description="test", provenance=provenance_line("pytest", {"x": "1"}))
    p = cal.profile
    assert p.link.bandwidth_bytes_per_s == pytest.approx(2e9, rel=1e-6)
    assert p.link.latency_s == pytest.approx(20e-6, rel=1e-5)
    assert p.gpu.matmul_flops_per_s == pytest.approx(100e9, rel=1e-6)
    assert p.gpu.memory_bytes_per_s == pytest.approx(15e9, rel=1e-6)
    assert p.cpu.compute.matmul_flops_per_s == pytest.approx(100e9, rel=1e-6)  # no cpu_expert: same points
    assert p.dequant.int2_bytes_per_s == pytest.approx(4e9)
    assert p.layer_overhead_s == pytest.approx(80e-6)
    assert p.cpu.predictor_latency_s == pytest.approx(25e-6)
    assert p.provenance.startswith("calibrated on ") and " by pytest (x 1)" in p.provenance


def test_build_profile_without_dequant_is_refused() -> None:
    pts = [p for p in synthetic_points() if not p.kind.startswith("dequant")]
    with pytest.raises(UserError, match="dequantisation"):
        build_profile(pts, name="x", device_kind="cpu", memory_bytes=1, copy_engines=1, description="",
                      provenance="p")


def test_attention_column_is_the_median_ratio_per_token_count() -> None:
    """Decode attention at several contexts gives one ratio at 1 token: the median over the contexts."""
    pts = synthetic_points()
    roof = lambda f, b: 5e-6 + max(f / 100e9, b / 15e9)  # noqa: E731 - the synthetic machine
    for context, ratio in ((64, 0.5), (256, 0.6), (1024, 2.0)):
        f, b = 3.4e7 + 1e4 * context, 3.4e7 + 1e3 * context
        pts.append(Point("attention", 1, f, b, ratio * roof(f, b), (ratio * roof(f, b),), context=context))
    cal = build_profile(pts, name="s", device_kind="cpu", memory_bytes=1, copy_engines=1, description="",
                        provenance="p")
    assert cal.profile.layer_overhead_s == pytest.approx(80e-6)
    expected = float(np.median([p.seconds / cal.compute.predict_s(np.array([p.flops]), np.array([p.nbytes]))[0]
                                for p in pts if p.kind == "attention"]))
    assert cal.profile.gpu_token_scale.factor("attention", 1) == pytest.approx(expected, rel=1e-9)


def test_token_scales_are_measured_over_roofline_on_the_union_of_token_counts() -> None:
    """Each column is measured / roofline at its own token counts; a column measured at fewer counts is
    interpolated onto the union in log(tokens), as `TokenScales.factor` reads it."""
    fit = RooflineFit(matmul_flops_per_s=1e9, memory_bytes_per_s=1e9, kernel_launch_s=0.0, rel_rms_error=0.0)

    def point(kind: str, tokens: int, ratio: float) -> Point:
        flops = nbytes = 1e6 * tokens  # roofline: tokens milliseconds
        return Point(kind, tokens, flops, nbytes, ratio * tokens * 1e-3, (ratio * tokens * 1e-3,))

    scales = token_scales(fit, {"expert_bf16": [point("expert", t, r) for t, r in ((1, 1.0), (4, 3.0), (16, 2.0))],
                                "shared": [point("mlp", t, r) for t, r in ((1, 2.0), (16, 1.0))],
                                "expert_int4": []})
    assert scales.tokens == (1, 4, 16)
    assert dict(scales.columns)["expert_bf16"] == pytest.approx((1.0, 3.0, 2.0))
    assert dict(scales.columns)["shared"] == pytest.approx((2.0, 1.5, 1.0))
    assert "expert_int4" not in dict(scales.columns)


def test_build_profile_reproduces_every_expert_point() -> None:
    """With the corrections, the profile's expert time equals each measured expert point (any precision)."""
    pts = synthetic_points()
    experts = [p for p in pts if p.kind == "expert"]
    for p in experts:  # the same expert stored in int4, half as fast at every size
        pts.append(Point("expert_int4", p.x, p.flops, p.nbytes, 2 * p.seconds, (2 * p.seconds,)))
    cal = build_profile(pts, name="s", device_kind="cpu", memory_bytes=1, copy_engines=1, description="",
                        provenance="p")
    scales = cal.profile.gpu_token_scale
    for p in experts:
        roof = float(cal.compute.predict_s(np.array([p.flops]), np.array([p.nbytes]))[0])
        assert roof * scales.factor("expert_bf16", int(p.x)) == pytest.approx(p.seconds, rel=1e-9)
        assert roof * scales.factor("expert_int4", int(p.x)) == pytest.approx(2 * p.seconds, rel=1e-9)
    assert cal.profile.cpu_token_scale.tokens == scales.tokens


def test_copy_contention_is_the_geometric_mean_ratio_at_least_one() -> None:
    def pts(alone: float, busy: float, tokens: int) -> list[Point]:
        return [Point("contention_alone", tokens, 1.0, 1.0, alone, (alone,)),
                Point("contention", tokens, 1.0, 1.0, busy, (busy,))]
    assert fit_copy_contention(pts(1.0, 1.21, 1) + pts(2.0, 2.0, 4)) == pytest.approx(1.1)
    assert fit_copy_contention(pts(1.0, 0.9, 1)) == 1.0  # faster beside transfers is noise, not a speed-up
    assert fit_copy_contention(synthetic_points()) == 1.0  # not measured


def test_engine_overheads_are_the_line_through_the_dispatch_points() -> None:
    """Noise-free dispatch times t = 300 µs + n x 40 µs give back both costs; no points: zeros."""
    from calibration.fit import fit_engine_overheads

    pts = [Point("dispatch", n, 0.0, 0.0, 300e-6 + n * 40e-6, (0.0,)) for n in (1, 2, 4, 8, 16)]
    engine = fit_engine_overheads(pts)
    assert engine.per_moe_layer_s == pytest.approx(300e-6, rel=1e-6)
    assert engine.per_expert_s == pytest.approx(40e-6, rel=1e-6)
    assert engine.per_dequant_s == 0.0
    assert fit_engine_overheads(synthetic_points()).per_expert_s == 0.0


def test_engine_overheads_enter_the_built_profile_and_refuse_one_expert_count() -> None:
    pts = synthetic_points() + [Point("dispatch", n, 0.0, 0.0, 1e-4 + n * 2e-5, (0.0,)) for n in (1, 4)]
    cal = build_profile(pts, name="s", device_kind="cpu", memory_bytes=1, copy_engines=1, description="",
                        provenance="p")
    assert cal.profile.engine.per_expert_s == pytest.approx(2e-5, rel=1e-6)
    assert cal.profile.to_toml_dict()["engine"]["per_moe_layer_s"] == pytest.approx(1e-4, rel=1e-6)
    with pytest.raises(UserError, match="at least two different expert counts"):
        build_profile(synthetic_points() + [Point("dispatch", 4, 0.0, 0.0, 1e-4, (0.0,))], name="s",
                      device_kind="cpu", memory_bytes=1, copy_engines=1, description="", provenance="p")
