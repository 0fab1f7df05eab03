"""Hardware profiles: how fast a machine moves expert bytes and computes a layer.

A profile is a TOML file (schema in ARCHITECTURE.md): the link that brings experts into fast memory
(latency + bytes / bandwidth, per copy engine), a roofline model of the device's compute, dequantisation
throughput, the CPU (predictor latency, CPU execution of missed experts), and the serving engine's own
software costs (`[engine]`: seconds per routed-expert invocation, per MoE layer, per dequantisation; 0 for
an efficient engine). A calibrated profile may add measured per-token-count corrections to the roofline
(`[gpu.token_scale]`, `[cpu.token_scale]`).

Two kinds of GPU profiles ship: `*-bound` (datasheet roofline, no software overheads: what the hardware
allows an efficient engine) and `*-hf-eager` (the same hardware plus the per-expert software cost of a
Hugging Face eager-mode engine, fitted to the Fate paper's measurements by `python -m sim.reproduce fit`).
Shipped profiles live in `sim/profiles/`; `load_profile` takes a shipped name or a path. Units: seconds,
bytes, FLOPs. Only this module reads the file, so only it knows the TOML layout.
"""

from __future__ import annotations

import bisect
import dataclasses
import functools
import math
import tomllib
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import tomli_w

from traces.atomic import atomic_output
from traces.errors import UserError

PROFILES_DIR = Path(__file__).resolve().parent / "profiles"


@dataclass(frozen=True)
class LinkModel:
    """The path experts take into fast memory (PCIe host->GPU, or SSD->RAM)."""

    bandwidth_bytes_per_s: float
    """Sustained bandwidth of one copy engine."""
    latency_s: float
    """Fixed cost of one transfer."""
    copy_engines: int
    """Transfers that may run at once, each at the full per-engine bandwidth."""

    def transfer_s(self, nbytes: int) -> float:
        """Seconds one transfer of `nbytes` occupies a copy engine."""
        return self.latency_s + nbytes / self.bandwidth_bytes_per_s


@dataclass(frozen=True)
class RooflineModel:
    """Compute time of a kernel: launch + max(flops / peak FLOP/s, bytes / memory bandwidth)."""

    matmul_flops_per_s: float
    memory_bytes_per_s: float
    kernel_launch_s: float

    def op_s(self, flops: float, nbytes: float) -> float:
        """Seconds for an operation of `flops` FLOPs that reads `nbytes` bytes."""
        return self.kernel_launch_s + max(flops / self.matmul_flops_per_s, nbytes / self.memory_bytes_per_s)


TOKEN_SCALE_COLUMNS = ("expert_bf16", "expert_int8", "expert_int4", "expert_int2", "shared", "attention",
                       "lm_head")
"""Operations a `TokenScales` table may correct: a routed expert stored in each precision, shared experts,
attention (projections and scores of one layer), the vocabulary head."""


@dataclass(frozen=True)
class TokenScales:
    """Measured time over the roofline's prediction, per operation and token count.

    One roofline cannot follow every device: a CPU multiplies 1 token with a matrix-vector kernel that
    streams the weights once and 2-16 tokens with a GEMM that repacks them (2-3x slower here), and a CPU
    multiplies INT4 experts straight from the packed weights (cheaper than the unquantised expert, which
    the dequantisation term cannot express). The table holds the ratio measured / roofline at the
    calibrated token counts; between them the ratio is linear in log(tokens), outside them it is the
    nearest end's. The ratio, not seconds, is stored so that the profile still scales to other models'
    shapes through the roofline. An `expert_<precision>` column was measured on the runtime's own path for
    that precision, dequantisation included.
    """

    tokens: tuple[int, ...] = ()
    """Calibrated token counts, strictly increasing."""
    columns: tuple[tuple[str, tuple[float, ...]], ...] = ()
    """(operation, ratio at each of `tokens`), operations from `TOKEN_SCALE_COLUMNS`."""

    @functools.cached_property
    def _by_name(self) -> dict[str, tuple[float, ...]]:
        return dict(self.columns)

    def factor(self, operation: str, tokens: int) -> float | None:
        """Measured / roofline time of `operation` on `tokens` tokens; None when not calibrated."""
        ratios = self._by_name.get(operation)
        if ratios is None:
            return None
        counts = self.tokens
        if tokens <= counts[0]:
            return ratios[0]
        if tokens >= counts[-1]:
            return ratios[-1]
        hi = bisect.bisect_right(counts, tokens)
        lo = hi - 1
        w = (math.log(tokens) - math.log(counts[lo])) / (math.log(counts[hi]) - math.log(counts[lo]))
        return ratios[lo] + w * (ratios[hi] - ratios[lo])

    def times(self, operation: str, tokens: int) -> float:
        """The factor to multiply `operation`'s roofline time by: `factor`, or 1 when not calibrated."""
        ratio = self.factor(operation, tokens)
        return 1.0 if ratio is None else ratio

    def to_toml_dict(self) -> dict[str, list]:
        return {"tokens": list(self.tokens), **{name: list(ratios) for name, ratios in self.columns}}


@dataclass(frozen=True)
class DequantModel:
    """Dequantisation throughput in fast memory, in bytes of bf16 output per second."""

    int8_bytes_per_s: float
    int4_bytes_per_s: float
    int2_bytes_per_s: float

    def dequant_s(self, precision: str, output_bytes: int) -> float:
        """Seconds to dequantise an expert of `output_bytes` bf16 bytes from `precision` (0 for bf16)."""
        if precision == "bf16":
            return 0.0
        return output_bytes / getattr(self, f"{precision}_bytes_per_s")


@dataclass(frozen=True)
class EngineOverheads:
    """The serving engine's software costs, in seconds, charged on top of the roofline (`sim.costs`).

    An eager-mode engine pays Python dispatch for every routed expert it runs (mask, gather, three
    kernel launches, scatter-add), for every MoE layer (router top-k read back to the host, bookkeeping)
    and for every dequantisation call; an engine with fused kernels pays almost none of it. These are
    per-operation costs, not per byte or FLOP, so they stay separate from the roofline and from the
    `TokenScales` corrections (which scale with the operation's size).
    """

    per_expert_s: float = 0.0
    """Each routed-expert invocation (GPU or CPU), whatever its token count."""
    per_moe_layer_s: float = 0.0
    """Each MoE layer of each forward step."""
    per_dequant_s: float = 0.0
    """Each run of a quantised expert whose precision has no measured `expert_<precision>` correction
    (a measured correction already contains its dequantisation)."""

    def to_toml_dict(self) -> dict[str, float]:
        return {"per_expert_s": self.per_expert_s, "per_moe_layer_s": self.per_moe_layer_s,
                "per_dequant_s": self.per_dequant_s}


@dataclass(frozen=True)
class CpuModel:
    """The host CPU: the predictor thread and CPU execution of routed experts."""

    compute: RooflineModel
    predictor_latency_s: float
    """Seconds for the CPU-side predictor to turn a gate input into prefetch decisions."""


@dataclass(frozen=True)
class HardwareProfile:
    """One machine, as the simulator sees it."""

    name: str
    description: str
    provenance: str
    device_kind: str
    """"cuda" (experts stream over PCIe into GPU memory) or "cpu" (from SSD into a RAM cache)."""
    memory_bytes: int
    """Fast memory of the device."""
    link: LinkModel
    gpu: RooflineModel
    layer_overhead_s: float
    """Fixed per-layer cost on the compute stream (norms, residual adds, router)."""
    dequant: DequantModel
    cpu: CpuModel
    source_path: str = ""
    copy_contention: float = 1.0
    """Factor on device compute time while the link moves bytes (>= 1). A CPU device's transfers share its
    memory bus and cores with compute; a GPU's copy engines hardly slow its kernels (1.0)."""
    gpu_token_scale: TokenScales = TokenScales()
    """Measured corrections to `gpu` per token count (empty: the roofline as is)."""
    cpu_token_scale: TokenScales = TokenScales()
    """Measured corrections to `cpu.compute` (only `expert_bf16` is used: CPU execution of misses)."""
    engine: EngineOverheads = EngineOverheads()
    """The serving engine's per-operation software costs (all 0: an efficient engine)."""

    def with_link_bandwidth(self, bandwidth_bytes_per_s: float) -> HardwareProfile:
        """The same machine with another link bandwidth (for what-if sweeps)."""
        link = dataclasses.replace(self.link, bandwidth_bytes_per_s=float(bandwidth_bytes_per_s))
        return dataclasses.replace(self, link=link, name=f"{self.name}@{bandwidth_bytes_per_s / 1e9:g}GB/s")

    def with_link_slowed(self, factor: float) -> HardwareProfile:
        """The same machine with every transfer taking `factor` times as long (latency and bytes alike)."""
        link = dataclasses.replace(self.link, latency_s=self.link.latency_s * factor,
                                   bandwidth_bytes_per_s=self.link.bandwidth_bytes_per_s / factor)
        return dataclasses.replace(self, link=link, name=f"{self.name}@link-x{factor:.3g}")

    def to_toml_dict(self) -> dict[str, Any]:
        """The profile in the TOML schema of ARCHITECTURE.md."""
        data = {
            "name": self.name,
            "description": self.description,
            "provenance": self.provenance,
            "device": {"kind": self.device_kind, "memory_bytes": self.memory_bytes},
            "link": {
                "bandwidth_bytes_per_s": self.link.bandwidth_bytes_per_s,
                "latency_s": self.link.latency_s,
                "copy_engines": self.link.copy_engines,
            },
            "gpu": {
                "matmul_flops_per_s": self.gpu.matmul_flops_per_s,
                "memory_bytes_per_s": self.gpu.memory_bytes_per_s,
                "kernel_launch_s": self.gpu.kernel_launch_s,
                "layer_overhead_s": self.layer_overhead_s,
            },
            "dequant": {
                "int8_bytes_per_s": self.dequant.int8_bytes_per_s,
                "int4_bytes_per_s": self.dequant.int4_bytes_per_s,
                "int2_bytes_per_s": self.dequant.int2_bytes_per_s,
            },
            "cpu": {
                "matmul_flops_per_s": self.cpu.compute.matmul_flops_per_s,
                "memory_bytes_per_s": self.cpu.compute.memory_bytes_per_s,
                "kernel_launch_s": self.cpu.compute.kernel_launch_s,
                "predictor_latency_s": self.cpu.predictor_latency_s,
            },
        }
        if self.copy_contention != 1.0:
            data["gpu"]["copy_contention"] = self.copy_contention
        if self.gpu_token_scale.columns:
            data["gpu"]["token_scale"] = self.gpu_token_scale.to_toml_dict()
        if self.cpu_token_scale.columns:
            data["cpu"]["token_scale"] = self.cpu_token_scale.to_toml_dict()
        if self.engine != EngineOverheads():
            data["engine"] = self.engine.to_toml_dict()
        return data


class _Reader:
    """Reads typed, positive values out of a parsed TOML table, naming the file and key on error."""

    def __init__(self, data: dict[str, Any], source: str) -> None:
        self.data = data
        self.source = source

    def get(self, section: str | None, key: str, kind: type, *, default: Any = None, positive: bool = True) -> Any:
        table = self.data if section is None else self.data.get(section)
        where = key if section is None else f"[{section}] {key}"
        if not isinstance(table, dict):
            raise UserError(f"profile {self.source} lacks the [{section}] table")
        if key not in table:
            if default is not None:
                return default
            raise UserError(f"profile {self.source} lacks {where}")
        value = table[key]
        if kind is float and isinstance(value, int) and not isinstance(value, bool):
            value = float(value)
        if not isinstance(value, kind) or isinstance(value, bool):
            raise UserError(f"profile {self.source}: {where} must be a {kind.__name__}, not {value!r}")
        if positive and kind in (int, float) and value <= 0:
            raise UserError(f"profile {self.source}: {where} must be > 0, not {value!r}")
        return value


def profile_from_dict(data: dict[str, Any], source: str = "<dict>") -> HardwareProfile:
    """Build and validate a profile from its TOML tables."""
    r = _Reader(data, source)
    kind = r.get("device", "kind", str)
    if kind not in ("cuda", "cpu"):
        raise UserError(f"profile {source}: [device] kind must be \"cuda\" or \"cpu\", not {kind!r}")
    return HardwareProfile(
        name=r.get(None, "name", str),
        description=r.get(None, "description", str, default=""),
        provenance=r.get(None, "provenance", str),
        device_kind=kind,
        memory_bytes=r.get("device", "memory_bytes", int),
        link=LinkModel(
            bandwidth_bytes_per_s=r.get("link", "bandwidth_bytes_per_s", float),
            latency_s=r.get("link", "latency_s", float, positive=False),
            copy_engines=r.get("link", "copy_engines", int),
        ),
        gpu=RooflineModel(
            matmul_flops_per_s=r.get("gpu", "matmul_flops_per_s", float),
            memory_bytes_per_s=r.get("gpu", "memory_bytes_per_s", float),
            kernel_launch_s=r.get("gpu", "kernel_launch_s", float, positive=False),
        ),
        layer_overhead_s=r.get("gpu", "layer_overhead_s", float, positive=False),
        dequant=DequantModel(
            int8_bytes_per_s=r.get("dequant", "int8_bytes_per_s", float),
            int4_bytes_per_s=r.get("dequant", "int4_bytes_per_s", float),
            int2_bytes_per_s=r.get("dequant", "int2_bytes_per_s", float),
        ),
        cpu=CpuModel(
            compute=RooflineModel(
                matmul_flops_per_s=r.get("cpu", "matmul_flops_per_s", float),
                memory_bytes_per_s=r.get("cpu", "memory_bytes_per_s", float),
                kernel_launch_s=r.get("cpu", "kernel_launch_s", float, default=0.0, positive=False),
            ),
            predictor_latency_s=r.get("cpu", "predictor_latency_s", float, positive=False),
        ),
        source_path=source,
        copy_contention=_copy_contention(r),
        gpu_token_scale=_token_scales(data, "gpu", source),
        cpu_token_scale=_token_scales(data, "cpu", source),
        engine=_engine_overheads(r),
    )


def _engine_overheads(r: _Reader) -> EngineOverheads:
    """The optional `[engine]` table: per-operation software costs in seconds (each >= 0, default 0)."""
    table = r.data.get("engine")
    if table is None:
        return EngineOverheads()
    if not isinstance(table, dict):
        raise UserError(f"profile {r.source}: [engine] must be a table")
    known = {f.name for f in dataclasses.fields(EngineOverheads)}
    unknown = sorted(set(table) - known)
    if unknown:
        raise UserError(f"profile {r.source}: [engine] has unknown key {unknown[0]!r}; known: {', '.join(sorted(known))}")
    values = {}
    for key in known:
        value = r.get("engine", key, float, default=0.0, positive=False)
        if not math.isfinite(value) or value < 0:
            raise UserError(f"profile {r.source}: [engine] {key} must be a finite number of seconds >= 0, not {value!r}")
        values[key] = value
    return EngineOverheads(**values)


def _copy_contention(r: _Reader) -> float:
    value = r.get("gpu", "copy_contention", float, default=1.0)
    if value < 1.0:
        raise UserError(f"profile {r.source}: [gpu] copy_contention must be >= 1 (a slowdown), not {value!r}")
    return value


def _token_scales(data: dict[str, Any], section: str, source: str) -> TokenScales:
    """The optional `[section.token_scale]` table, checked: increasing token counts, positive ratios."""
    table = data.get(section, {}).get("token_scale")
    where = f"profile {source}: [{section}.token_scale]"
    if table is None:
        return TokenScales()
    if not isinstance(table, dict):
        raise UserError(f"{where} must be a table")
    tokens = table.get("tokens")
    if (not isinstance(tokens, list) or not tokens
            or not all(isinstance(t, int) and not isinstance(t, bool) and t > 0 for t in tokens)
            or any(b <= a for a, b in zip(tokens, tokens[1:], strict=False))):
        raise UserError(f"{where} tokens must be a non-empty, strictly increasing list of positive integers")
    columns = []
    for name, ratios in table.items():
        if name == "tokens":
            continue
        if name not in TOKEN_SCALE_COLUMNS:
            raise UserError(f"{where} has unknown column {name!r}; known: {', '.join(TOKEN_SCALE_COLUMNS)}")
        if (not isinstance(ratios, list) or len(ratios) != len(tokens)
                or not all(isinstance(r, (int, float)) and not isinstance(r, bool) and r > 0 for r in ratios)):
            raise UserError(f"{where} {name} must list {len(tokens)} positive numbers, one per token count")
        columns.append((name, tuple(float(r) for r in ratios)))
    return TokenScales(tokens=tuple(tokens), columns=tuple(columns))


RENAMED_PROFILES = {
    "rtx3090-pcie3": "rtx3090", "gtx1080ti-pcie3": "gtx1080ti", "a100-pcie4": "a100", "h100-pcie5": "h100",
    "rtx4090-pcie4": "rtx4090",
}
"""Old shipped names -> the machine; the datasheet profiles are now `<machine>-bound` (and the Fate paper's
two PCs also have `<machine>-hf-eager`). Old names are refused with the new ones, not silently aliased:
the old name meant one engine, and the user should choose which of the two they mean."""


def _renamed_error(name: str) -> UserError:
    machine = RENAMED_PROFILES[name]
    eager = f"{machine}-hf-eager"
    also = (f", or {eager!r} for the Hugging Face eager engine the Fate paper measured"
            if (PROFILES_DIR / f"{eager}.toml").exists() else "")
    return UserError(f"profile {name!r} was renamed: use {machine + '-bound'!r} (the datasheet bound of an "
                     f"efficient engine, what {name!r} was){also}")


def list_profiles() -> list[str]:
    """Names of the shipped profiles."""
    return sorted(p.stem for p in PROFILES_DIR.glob("*.toml"))


def load_profile(name_or_path: str | Path) -> HardwareProfile:
    """A shipped profile by name, or a profile TOML file by path."""
    path = Path(name_or_path)
    if not path.suffix == ".toml" or not path.exists():
        shipped = PROFILES_DIR / f"{name_or_path}.toml"
        if not shipped.exists():
            if str(name_or_path) in RENAMED_PROFILES:
                raise _renamed_error(str(name_or_path))
            if path.suffix == ".toml":
                raise UserError(f"no profile file at {path}")
            raise UserError(f"unknown hardware profile {str(name_or_path)!r}; choose one of "
                            f"{', '.join(list_profiles())} or give a .toml file")
        path = shipped
    try:
        data = tomllib.loads(path.read_text())
    except (tomllib.TOMLDecodeError, UnicodeDecodeError) as error:
        raise UserError(f"profile {path} is not valid TOML: {error}") from None
    return profile_from_dict(data, source=str(path))


def write_profile(profile: HardwareProfile, path: str | Path) -> None:
    """Write `profile` as TOML, atomically."""
    with atomic_output(path) as tmp:
        tmp.write_text(tomli_w.dumps(profile.to_toml_dict()))
