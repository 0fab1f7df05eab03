"""Fit the hardware-profile models to microbenchmark points (scipy), and write the profile.

The models are the ones `sim.hardware` evaluates:
- link: `t = latency_s + nbytes / bandwidth_bytes_per_s`, linear in (latency, 1/bandwidth);
- compute (roofline): `t = kernel_launch_s + max(flops / matmul_flops_per_s, nbytes / memory_bytes_per_s)`;
- dequantisation: `t = output_bytes / rate`;
- per-token corrections (`sim.hardware.TokenScales`): measured / roofline time at each token count of the
  routed expert (per precision, on realrun's own path), the shared MLP, attention (median over contexts)
  and the vocabulary head;
- copy contention: compute beside background transfers over compute alone;
- engine overheads (`[engine]`): a straight line through the eager dispatch times of one MoE layer against
  its routed experts, intercept = per MoE layer, slope = per expert (`fit_engine_overheads`); the
  per-dequantisation cost stays 0, because the measured `expert_<precision>` corrections already time the
  quantised path with its dequantisation calls (and `sim.costs` charges it only where they are missing).

All fits work on *relative* error: a 64 KiB read takes a thousandth of a 64 MiB one, and an absolute fit
would let the large sizes decide everything (the latency would come out as noise). Two steps:
1. a linear start: `sum(((model - t) / t) ** 2)` is linear least squares in (latency, 1/bandwidth), and
   for the roofline, piecewise linear in (launch, 1/flops rate, 1/byte rate): for each split of the points,
   sorted by arithmetic intensity, into memory-bound and compute-bound ones it is a bounded linear problem,
   so trying every split finds that optimum exactly;
2. a polish on log residuals, `log(model) - log(t)`, with a soft-L1 loss (`scipy.optimize.least_squares`):
   the ratio error `(model - t) / t` is bounded by -1 below but not above, so on noisy data it drags the
   model under the measurements; the log error is symmetric, and soft-L1 keeps one slow sample (another
   process took the core) from moving the fit. On noise-free data both steps give the exact parameters.
"""

from __future__ import annotations

import datetime as _dt
import platform
import socket
import statistics
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import numpy as np
from scipy.optimize import least_squares, lsq_linear

from calibration.microbench import Point
from sim.hardware import (
    CpuModel,
    DequantModel,
    EngineOverheads,
    HardwareProfile,
    LinkModel,
    RooflineModel,
    TokenScales,
)
from traces.errors import UserError


@dataclass(frozen=True)
class LinkFit:
    latency_s: float
    bandwidth_bytes_per_s: float
    rel_rms_error: float
    """Root-mean-square relative error of the fit over the points (0.05 = 5%)."""

    def predict_s(self, nbytes: np.ndarray) -> np.ndarray:
        return self.latency_s + np.asarray(nbytes, dtype=float) / self.bandwidth_bytes_per_s


@dataclass(frozen=True)
class RooflineFit:
    matmul_flops_per_s: float
    memory_bytes_per_s: float
    kernel_launch_s: float
    rel_rms_error: float

    def predict_s(self, flops: np.ndarray, nbytes: np.ndarray) -> np.ndarray:
        compute = np.asarray(flops, dtype=float) / self.matmul_flops_per_s
        memory = np.asarray(nbytes, dtype=float) / self.memory_bytes_per_s
        return self.kernel_launch_s + np.maximum(compute, memory)


def _rel_rms(model_s: np.ndarray, seconds: np.ndarray) -> float:
    return float(np.sqrt(np.mean(((model_s - seconds) / seconds) ** 2)))


def _check(name: str, *arrays: np.ndarray) -> None:
    n = len(arrays[0])
    if n == 0:
        raise UserError(f"no {name} measurements to fit")
    for a in arrays:
        if len(a) != n or not np.all(np.isfinite(a)):
            raise UserError(f"{name} measurements are ragged or not finite")
    if np.any(arrays[-1] <= 0):
        raise UserError(f"{name} measurements contain non-positive times")


def fit_link(nbytes: Sequence[float], seconds: Sequence[float]) -> LinkFit:
    """Latency and bandwidth of a link from transfer sizes (bytes) and median times (s)."""
    x = np.asarray(nbytes, dtype=float)
    t = np.asarray(seconds, dtype=float)
    _check("link", x, t)
    if len(np.unique(x)) < 2:
        raise UserError("the link fit needs transfers of at least two different sizes")
    design = np.stack([np.ones_like(x), x], axis=1) / t[:, None]
    solution = lsq_linear(design, np.ones_like(t), bounds=([0.0, 1e-30], [np.inf, np.inf]), method="bvls")
    latency, inv_bw = _log_polish(lambda p: p[0] + p[1] * x, solution.x, t)
    fit = LinkFit(latency_s=float(latency), bandwidth_bytes_per_s=float(1.0 / inv_bw), rel_rms_error=0.0)
    return LinkFit(fit.latency_s, fit.bandwidth_bytes_per_s, _rel_rms(fit.predict_s(x), t))


def fit_roofline(flops: Sequence[float], nbytes: Sequence[float], seconds: Sequence[float]) -> RooflineFit:
    """Launch time, FLOP rate and memory bandwidth that best explain `seconds` (relative least squares)."""
    f = np.asarray(flops, dtype=float)
    b = np.asarray(nbytes, dtype=float)
    t = np.asarray(seconds, dtype=float)
    _check("compute", f, b, t)
    if np.any(f <= 0) or np.any(b <= 0):
        raise UserError("compute measurements need positive FLOPs and bytes")
    # A launch is a fixed dispatch cost: at most half the fastest operation. Without the bound, noisy
    # small-batch points let one large "launch" absorb the memory roof (a flat, meaningless fit).
    launch_max = 0.5 * float(np.min(t))
    order = np.argsort(f / b)  # by arithmetic intensity: memory-bound first
    f, b, t = f[order], b[order], t[order]
    n = len(t)
    best: tuple[float, np.ndarray] | None = None
    for split in range(n + 1):
        # rows < split memory-bound: t = L + b * v ; rows >= split compute-bound: t = L + f * u
        design = np.zeros((n, 3))
        design[:, 0] = 1.0
        design[split:, 1] = f[split:]
        design[:split, 2] = b[:split]
        design /= t[:, None]
        sol = lsq_linear(design, np.ones(n), bounds=([0.0, 0.0, 0.0], [launch_max, np.inf, np.inf]), method="bvls")
        launch, u, v = sol.x
        u, v = _fill_unconstrained(u, v, launch, f, b, t)
        model = launch + np.maximum(f * u, b * v)
        cost = float(np.sum(((model - t) / t) ** 2))
        if best is None or cost < best[0] - 1e-15:
            best = (cost, np.array([launch, u, v]))
    assert best is not None
    launch, u, v = _log_polish(lambda p: p[0] + np.maximum(f * p[1], b * p[2]), best[1], t,
                               upper=np.array([launch_max, np.inf, np.inf]))
    fit = RooflineFit(matmul_flops_per_s=float(1.0 / u), memory_bytes_per_s=float(1.0 / v),
                      kernel_launch_s=float(launch), rel_rms_error=0.0)
    return RooflineFit(fit.matmul_flops_per_s, fit.memory_bytes_per_s, fit.kernel_launch_s,
                       _rel_rms(fit.predict_s(f, b), t))


def _log_polish(model: Callable[[np.ndarray], np.ndarray], start: np.ndarray, t: np.ndarray,
                upper: np.ndarray | None = None) -> np.ndarray:
    """Refine non-negative parameters `start` (at most `upper`) on soft-L1 log residuals; keep `start` if
    that is not better."""
    scale = np.where(start > 0, start, 1.0)  # optimise in units of the start values: well conditioned
    high = np.full(len(start), np.inf) if upper is None else np.maximum(upper / scale, 1e-6)

    def residual(q: np.ndarray) -> np.ndarray:
        return np.log(np.maximum(model(q * scale), 1e-300)) - np.log(t)

    def cost(q: np.ndarray) -> float:
        r = residual(q)
        return float(np.sum(2.0 * (np.sqrt(1.0 + (r / _LOG_SCALE) ** 2) - 1.0)))

    q0 = np.where(start > 0, 1.0, 0.0)
    lower = np.where(start > 0, 1e-6, 0.0)
    try:
        solved = least_squares(residual, np.clip(q0, lower, high), bounds=(lower, high), loss="soft_l1",
                               f_scale=_LOG_SCALE, x_scale=1.0, xtol=1e-12, ftol=1e-12, gtol=1e-12)
    except ValueError:
        return start
    if solved.success and cost(solved.x) < cost(q0):
        return solved.x * scale
    return start


_LOG_SCALE = 0.1
"""Soft-L1 knee of the log residual: beyond about 10% a sample counts linearly, not quadratically."""


def _fill_unconstrained(u: float, v: float, launch: float, f: np.ndarray, b: np.ndarray,
                        t: np.ndarray) -> tuple[float, float]:
    """When no point is bound by one roof its inverse rate comes out 0 (an infinite rate).

    Replace it by the largest value that still leaves every point bound by the other roof: the honest
    statement "at least this fast", instead of infinity.
    """
    if u <= 0 and v > 0:
        u = float(np.min(b * v / f))
    elif v <= 0 and u > 0:
        v = float(np.min(f * u / b))
    elif u <= 0 and v <= 0:
        spare = np.maximum(t - launch, 1e-12)
        u, v = float(np.max(spare / f)), float(np.max(spare / b))
    return u, v


def fit_rate(output_bytes: Sequence[float], seconds: Sequence[float]) -> float:
    """Throughput (bytes/s) of `t = bytes / rate`, relative least squares through the origin."""
    x = np.asarray(output_bytes, dtype=float)
    t = np.asarray(seconds, dtype=float)
    _check("dequantisation", x, t)
    ratio = x / t
    inv_rate = float(np.sum(ratio) / np.sum(ratio**2))
    return 1.0 / inv_rate


def token_scales(fit: RooflineFit, columns: dict[str, Sequence[Point]]) -> TokenScales:
    """Measured / roofline time per operation and token count, on the union of the measured token counts.

    Several points at one token count (attention at several context lengths) give their median ratio. A
    column measured at fewer token counts than the union is interpolated the way `TokenScales.factor`
    reads it (linear in log tokens, flat outside), so the table says exactly what the points say.
    """
    measured: dict[str, TokenScales] = {}
    for name, pts in columns.items():
        by_tokens: dict[int, list[float]] = {}
        for p in pts:
            roofline = float(fit.predict_s(np.array([p.flops]), np.array([p.nbytes]))[0])
            by_tokens.setdefault(int(p.x), []).append(p.seconds / roofline)
        if not by_tokens:
            continue
        tokens = tuple(sorted(by_tokens))
        ratios = tuple(statistics.median(by_tokens[t]) for t in tokens)
        measured[name] = TokenScales(tokens=tokens, columns=((name, ratios),))
    if not measured:
        return TokenScales()
    union = tuple(sorted({t for table in measured.values() for t in table.tokens}))
    return TokenScales(tokens=union, columns=tuple(
        (name, tuple(table.factor(name, t) for t in union)) for name, table in measured.items()))


@dataclass(frozen=True)
class Calibration:
    """A fitted profile together with the fits and points it came from (for plots and reports)."""

    profile: HardwareProfile
    link: LinkFit
    compute: RooflineFit
    cpu: RooflineFit
    dequant_bytes_per_s: dict[str, float]
    points: tuple[Point, ...]


def fit_copy_contention(points: Sequence[Point]) -> float:
    """Compute slowdown beside transfers: the geometric mean over token counts of (median time beside
    transfers) / (median time alone), at least 1 (1 when not measured)."""
    alone = {p.x: p.seconds for p in _select(points, "contention_alone")}
    busy = {p.x: p.seconds for p in _select(points, "contention")}
    ratios = [busy[x] / alone[x] for x in sorted(alone.keys() & busy.keys())]
    if not ratios:
        return 1.0
    return max(1.0, float(np.exp(np.mean(np.log(ratios)))))


def fit_engine_overheads(points: Sequence[Point]) -> EngineOverheads:
    """Per-MoE-layer and per-expert software costs from `dispatch` points (x = routed experts, one token
    each): least squares on relative error of `t = layer + n * expert`, both >= 0 (zeros when not measured)."""
    pts = _select(points, "dispatch")
    if not pts:
        return EngineOverheads()
    n = np.array([p.x for p in pts], dtype=float)
    t = np.array([p.seconds for p in pts], dtype=float)
    _check("dispatch", n, t)
    if len(np.unique(n)) < 2:
        raise UserError("the dispatch fit needs layers with at least two different expert counts")
    design = np.stack([np.ones_like(n), n], axis=1) / t[:, None]
    solution = lsq_linear(design, np.ones_like(t), bounds=([0.0, 0.0], [np.inf, np.inf]), method="bvls")
    layer, expert = (float(v) for v in solution.x)
    return EngineOverheads(per_expert_s=expert, per_moe_layer_s=layer)


def _select(points: Sequence[Point], *kinds: str) -> list[Point]:
    return [p for p in points if p.kind in kinds]


def build_profile(points: Sequence[Point], *, name: str, device_kind: str, memory_bytes: int,
                  copy_engines: int, description: str, provenance: str) -> Calibration:
    """Fit every model of the profile schema to `points` and assemble the profile."""
    link_pts = _select(points, "link")
    link = fit_link([p.nbytes for p in link_pts], [p.seconds for p in link_pts])
    # One roofline for every operation the simulator charges with it (routed experts, shared experts,
    # attention), then per operation and token count the measured / roofline ratio (`token_scales`): the
    # roofline carries the scaling to other models' shapes, the ratios what one roofline cannot follow.
    compute_pts = _select(points, "expert", "mlp", "attention")
    compute = fit_roofline([p.flops for p in compute_pts], [p.nbytes for p in compute_pts],
                           [p.seconds for p in compute_pts])
    # On a CPU device the CPU that executes misses is the compute device: its expert points serve both.
    cpu_pts = _select(points, "cpu_expert") or _select(points, "expert")
    cpu = fit_roofline([p.flops for p in cpu_pts], [p.nbytes for p in cpu_pts], [p.seconds for p in cpu_pts])
    dequant: dict[str, float] = {}
    for precision in ("int8", "int4", "int2"):
        pts = _select(points, f"dequant_{precision}")
        if not pts:
            raise UserError(f"no dequantisation measurement for {precision}")
        dequant[precision] = fit_rate([p.nbytes for p in pts], [p.seconds for p in pts])
    layer = _select(points, "layer")
    predictor = _select(points, "predictor")
    if not layer or not predictor:
        raise UserError("the layer-overhead and predictor measurements are missing")
    profile = HardwareProfile(
        name=name,
        description=description,
        provenance=provenance,
        device_kind=device_kind,
        memory_bytes=int(memory_bytes),
        link=LinkModel(bandwidth_bytes_per_s=link.bandwidth_bytes_per_s, latency_s=link.latency_s,
                       copy_engines=int(copy_engines)),
        gpu=RooflineModel(matmul_flops_per_s=compute.matmul_flops_per_s,
                          memory_bytes_per_s=compute.memory_bytes_per_s,
                          kernel_launch_s=compute.kernel_launch_s),
        layer_overhead_s=statistics.median(p.seconds for p in layer),
        dequant=DequantModel(int8_bytes_per_s=dequant["int8"], int4_bytes_per_s=dequant["int4"],
                             int2_bytes_per_s=dequant["int2"]),
        cpu=CpuModel(
            compute=RooflineModel(matmul_flops_per_s=cpu.matmul_flops_per_s,
                                  memory_bytes_per_s=cpu.memory_bytes_per_s,
                                  kernel_launch_s=cpu.kernel_launch_s),
            predictor_latency_s=statistics.median(p.seconds for p in predictor),
        ),
        copy_contention=fit_copy_contention(points),
        gpu_token_scale=token_scales(compute, {
            "expert_bf16": _select(points, "expert"), "shared": _select(points, "mlp"),
            "attention": _select(points, "attention"), "lm_head": _select(points, "lm_head"),
            **{f"expert_{p}": _select(points, f"expert_{p}") for p in ("int8", "int4", "int2")}}),
        cpu_token_scale=token_scales(cpu, {"expert_bf16": cpu_pts}),
        engine=fit_engine_overheads(points),
    )
    return Calibration(profile=profile, link=link, compute=compute, cpu=cpu, dequant_bytes_per_s=dequant,
                       points=tuple(points))


def provenance_line(command: str, versions: dict[str, str], when: _dt.datetime | None = None) -> str:
    """`calibrated on HOST at DATE by COMMAND` plus the software versions that were measured."""
    when = when or _dt.datetime.now(_dt.UTC)
    stamp = when.strftime("%Y-%m-%dT%H:%M:%SZ")
    host = socket.gethostname() or platform.node() or "unknown-host"
    soft = ", ".join(f"{k} {v}" for k, v in versions.items())
    return f"calibrated on {host} at {stamp} by {command} ({soft})"
