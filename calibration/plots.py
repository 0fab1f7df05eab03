"""Plots of each fitted model against the measurements it was fitted to (`fatesim calibrate --plots DIR`).

Four PNG files: `link.png` (transfer time against size, log-log, with the fitted latency + bytes /
bandwidth line), `compute.png` (time against FLOPs for experts, shared MLP and attention, with the
roofline's prediction for each measured point), `token_scale.png` (the profile's per-token corrections:
measured / roofline time against tokens, per operation) and `dequant.png` (measured vs fitted rate per
precision).
"""

from __future__ import annotations

from pathlib import Path

import matplotlib

matplotlib.use("Agg")  # files only, never a window
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402

from calibration.fit import Calibration  # noqa: E402
from traces.atomic import atomic_output  # noqa: E402


def _save(fig: plt.Figure, path: Path) -> None:
    with atomic_output(path) as tmp:
        fig.savefig(tmp, format="png", dpi=110, bbox_inches="tight")
    plt.close(fig)


def plot_calibration(cal: Calibration, folder: Path) -> list[Path]:
    """Write the fit-against-measurement PNGs of `cal` into `folder`; return their paths."""
    written = [folder / "link.png", folder / "compute.png", folder / "token_scale.png", folder / "dequant.png"]
    _plot_link(cal, written[0])
    _plot_compute(cal, written[1])
    _plot_token_scale(cal, written[2])
    _plot_dequant(cal, written[3])
    return written


def _plot_link(cal: Calibration, path: Path) -> None:
    pts = [p for p in cal.points if p.kind == "link"]
    size = np.array([p.nbytes for p in pts])
    fig, (ax, rel) = plt.subplots(2, 1, figsize=(7, 6.5), sharex=True, gridspec_kw={"height_ratios": [3, 1]})
    for p in pts:
        ax.scatter([p.nbytes] * len(p.samples), p.samples, s=5, color="0.75", zorder=1)
    ax.scatter(size, [p.seconds for p in pts], s=18, color="C0", label="median", zorder=2)
    grid = np.geomspace(size.min(), size.max(), 200)
    ax.plot(grid, cal.link.predict_s(grid), color="C3",
            label=f"fit: {cal.link.latency_s * 1e6:.1f} µs + bytes / {cal.link.bandwidth_bytes_per_s / 1e9:.2f} GB/s")
    ax.set(xscale="log", yscale="log", ylabel="seconds per transfer", title=f"link: {cal.profile.name}")
    ax.legend()
    err = (cal.link.predict_s(size) - np.array([p.seconds for p in pts])) / np.array([p.seconds for p in pts])
    rel.axhline(0, color="0.5", lw=0.8)
    rel.plot(size, err * 100, "o-", ms=3)
    rel.set(xscale="log", xlabel="bytes per transfer", ylabel="fit error %")
    _save(fig, path)


def _plot_compute(cal: Calibration, path: Path) -> None:
    fig, (ax, rel) = plt.subplots(2, 1, figsize=(7, 6.5), sharex=True, gridspec_kw={"height_ratios": [3, 1]})
    kinds = [("expert", cal.compute, "C0"), ("mlp", cal.compute, "C1"), ("attention", cal.compute, "C2"),
             ("cpu_expert", cal.cpu, "C4"), ("expert_int8", cal.compute, "C5"), ("expert_int4", cal.compute, "C6"),
             ("expert_int2", cal.compute, "C7")]
    for kind, model, color in kinds:
        pts = sorted((p for p in cal.points if p.kind == kind), key=lambda p: p.flops)
        if not pts:
            continue
        flops = np.array([p.flops for p in pts])
        nbytes = np.array([p.nbytes for p in pts])
        seconds = np.array([p.seconds for p in pts])
        predicted = model.predict_s(flops, nbytes)
        ax.scatter(flops, seconds, s=18, color=color, label=f"{kind} measured")
        ax.plot(flops, predicted, color=color, lw=1, ls="--")
        rel.plot(flops, (predicted - seconds) / seconds * 100, "o", ms=3, color=color)
    c = cal.compute
    ax.set(xscale="log", yscale="log", ylabel="seconds per operation",
           title=(f"roofline fit to experts, shared MLP, attention (dashed): launch {c.kernel_launch_s * 1e6:.1f} µs,\n"
                  f"{c.matmul_flops_per_s / 1e9:.1f} GFLOP/s, {c.memory_bytes_per_s / 1e9:.2f} GB/s; "
                  "the profile corrects it per token count (token_scale.png)"))
    ax.legend(fontsize=8)
    rel.axhline(0, color="0.5", lw=0.8)
    rel.set(xscale="log", xlabel="FLOPs per operation", ylabel="fit error %")
    _save(fig, path)


def _plot_token_scale(cal: Calibration, path: Path) -> None:
    fig, ax = plt.subplots(figsize=(7, 4))
    for device, scales, style in (("gpu", cal.profile.gpu_token_scale, "-"), ("cpu", cal.profile.cpu_token_scale, ":")):
        for i, (name, ratios) in enumerate(scales.columns):
            ax.plot(scales.tokens, ratios, style, marker="o", ms=3, color=f"C{i}", label=f"[{device}] {name}")
    ax.axhline(1, color="0.5", lw=0.8)
    ax.set(xscale="log", xlabel="tokens per operation", ylabel="measured / roofline time",
           title="per-token corrections to the roofline (the profile's token_scale tables)")
    ax.legend(fontsize=8)
    _save(fig, path)


def _plot_dequant(cal: Calibration, path: Path) -> None:
    fig, ax = plt.subplots(figsize=(6, 3.5))
    names = list(cal.dequant_bytes_per_s)
    for i, precision in enumerate(names):
        pts = [p for p in cal.points if p.kind == f"dequant_{precision}"]
        rates = [p.nbytes / s / 1e9 for p in pts for s in p.samples]
        ax.scatter([i] * len(rates), rates, s=8, color="0.6")
        ax.scatter([i], [cal.dequant_bytes_per_s[precision] / 1e9], marker="_", s=600, color="C3")
    ax.set_xticks(range(len(names)), names)
    ax.set(ylabel="GB/s of bf16 output", title="dequantisation: samples (grey), fitted rate (red)")
    _save(fig, path)
