"""Microbenchmarks of one machine: what the hardware-profile models are fitted to.

Each benchmark times one operation the simulator charges for, with the shapes of a real model
(`sim.modelspec.ModelSpec`), repeats it and keeps the median. Every result is a `Point`: the swept
quantity, the FLOPs and bytes *as the simulator counts them* (from the model spec, so a fitted rate is
the effective rate the simulator should use, whatever dtype the kernel really runs in) and the seconds.

Benchmarks, by `Point.kind`:
- `link`: one expert transfer of `nbytes`. Disk store: an O_DIRECT `preadv` from a file into a
  page-aligned buffer at a random aligned offset (the page cache never serves it). RAM store: a
  `torch` copy from a pool larger than the last-level cache. CUDA: a pinned host -> device copy.
- `expert`: one routed expert (SwiGLU: gate, up, down) on `x` tokens, on the compute device.
- `cpu_expert`: the same on the CPU (what CPU execution of a miss costs).
- `mlp`: the shared experts of one layer (a SwiGLU of the shared intermediate size) on `x` tokens.
- `attention`: one layer's attention (projections + SDPA over a KV cache) for `x` new tokens
  attending to `context` positions.
- `expert_<precision>`: one routed expert stored in `<precision>` on `x` tokens, on realrun's own path
  (HQQ unpacking then the matmuls, or CPU int4 matmuls from the packed record); FLOPs and bytes of the
  unquantised expert, as `sim.costs` counts them.
- `contention_alone`, `contention`: a routed expert on `x` tokens alone and while background transfers
  keep the link busy (CPU devices: transfers and compute share the memory bus and the cores).
- `dequant_<precision>`: the extra time of one 1-token expert stored in `<precision>` over the unquantised
  one; `nbytes` is the unquantised expert size `spec.expert_bytes("bf16")`, what `sim.costs` divides by
  the profile's rate.
- `lm_head`: the vocabulary head on one position (the logits of a step's last token).
- `layer`: the fixed per-layer work of one decode token: two RMSNorms, two residual adds, the router's
  softmax and top-k (the router matmul is a roofline op of its own in `sim.costs`).
- `dispatch`: the engine's software around the routed experts of one MoE layer, for `x` routed experts of
  one token each, as realrun's eager engine does it (one-hot mask, unique ids read back to the host, per
  expert: token selection, gather, weighting, scatter-add) with a negligible stand-in for the expert's
  matmuls; `fit` turns the line through these points into the profile's `[engine]` per-MoE-layer
  (intercept) and per-expert (slope) costs.
- `predictor`: the cross-layer predictor's decision for one token: the next layer's router applied to
  the current gate input, softmax, top-k (on the CPU, as realrun runs it).

Time is taken with `time.perf_counter` around the operation; on CUDA the device is synchronised before
each clock read (an honest wall time, as gpt-fast's `device_sync`).
"""

from __future__ import annotations

import contextlib
import itertools
import math
import os
import statistics
import tempfile
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

from sim.modelspec import ModelSpec
from traces.errors import UserError

ALIGN_BYTES = 4096
"""O_DIRECT needs offsets, sizes and buffers aligned to the logical block size; 4 KiB covers every disk."""


@dataclass(frozen=True)
class Point:
    """One measured configuration: the median of `samples` seconds."""

    kind: str
    x: float
    """The swept quantity: bytes for link and dequant, tokens for compute."""
    flops: float
    """FLOPs of the operation, as `ModelSpec` counts them (0 for transfers)."""
    nbytes: float
    """Bytes of the operation as the simulator counts them: transferred, or weights + KV cache read."""
    seconds: float
    """Median wall time of one operation, in seconds."""
    samples: tuple[float, ...]
    context: int = 0
    """Attention only: positions attended to."""


@dataclass(frozen=True)
class BenchPlan:
    """What to measure and how often."""

    device: str
    """"cpu" or "cuda"."""
    store: str
    """"disk" or "ram": where the offloaded experts live."""
    link_sizes_bytes: tuple[int, ...]
    expert_tokens: tuple[int, ...]
    mlp_tokens: tuple[int, ...]
    attention_points: tuple[tuple[int, int], ...]
    """(new tokens, context) pairs."""
    dequant_precisions: tuple[str, ...]
    repeats: int
    min_seconds: float
    """Keep repeating (beyond `repeats`) until this much time was spent on a point, in seconds."""
    compute_dtype: torch.dtype
    scratch_dir: Path = field(default_factory=lambda: Path(tempfile.gettempdir()))
    link_min_seconds: float = 0.0
    """Link sizes repeat until this much time was spent (s): large reads of a shared disk are bimodal,
    and a median of 7 flips between the modes."""
    contention_tokens: tuple[int, ...] = (1, 4)
    """Tokens per expert at which compute is timed beside background transfers (CPU devices only)."""
    contention_rounds: int = 3
    """Alternations of (alone, beside transfers): a drifting machine affects both halves alike."""
    cold_set_bytes: int = 256 << 20
    """Compute benchmarks rotate over copies of their weights totalling at least this many bytes (8x a
    32 MiB L3): realrun computes each expert from a slot its bytes just landed in, never from a warm cache."""


def default_plan(device: str, store: str, *, quick: bool, compute_dtype: torch.dtype,
                 scratch_dir: Path | None = None) -> BenchPlan:
    """The full (about five minutes on 2 cores) or quick (seconds) set of measurements."""
    if device not in ("cpu", "cuda"):
        raise UserError(f"--device must be cpu or cuda, not {device!r}")
    if store not in ("disk", "ram"):
        raise UserError(f"--store must be disk or ram, not {store!r}")
    if device == "cuda" and not torch.cuda.is_available():
        raise UserError("--device cuda but torch sees no CUDA GPU; use --device cpu")
    if device == "cuda" and store == "disk":
        raise UserError("--device cuda measures pinned host->GPU copies; use --store ram with it")
    if quick:
        sizes = tuple(1 << p for p in (16, 20, 22, 24))
        plan = dict(expert_tokens=(1, 8, 64), mlp_tokens=(1, 64), attention_points=((1, 128), (64, 64)),
                    repeats=2, min_seconds=0.0, dequant_precisions=("int8", "int4", "int2"),
                    cold_set_bytes=64 << 20, contention_tokens=(1,), contention_rounds=1)
    else:
        # 64 KiB .. 64 MiB, three points per octave so the fit sees the latency knee.
        sizes = geometric_sizes(64 << 10, 64 << 20, 3)
        plan = dict(
            expert_tokens=(1, 2, 3, 4, 6, 8, 12, 16, 32, 64, 128, 256, 512),
            mlp_tokens=(1, 2, 4, 8, 16, 32, 64, 256),
            attention_points=((1, 64), (1, 256), (1, 1024), (1, 4096), (16, 16), (64, 64), (256, 256), (512, 512)),
            repeats=7, min_seconds=0.15, link_min_seconds=0.8, dequant_precisions=("int8", "int4", "int2"),
        )
    return BenchPlan(device=device, store=store, link_sizes_bytes=sizes, compute_dtype=compute_dtype,
                     scratch_dir=scratch_dir or Path(tempfile.gettempdir()), **plan)


@contextlib.contextmanager
def torch_threads(threads: int) -> Iterator[None]:
    """Run the block with `threads` torch intra-op threads, then restore torch's setting.

    Calibration, validation and accuracy default to 1 thread, as realrun's benchmark does: on a small
    shared machine, OpenMP worker threads that get descheduled make small operations 20-70x slower, and
    the simulator's single "compute stream" is one thread.
    """
    if threads < 1:
        raise UserError(f"--threads must be >= 1, not {threads}")
    saved = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        yield
    finally:
        torch.set_num_threads(saved)


def _align(nbytes: int) -> int:
    return max(ALIGN_BYTES, (nbytes + ALIGN_BYTES - 1) // ALIGN_BYTES * ALIGN_BYTES)


def time_op(op: Callable[[], object], *, repeats: int, min_seconds: float, device: str,
            warmup: int = 1) -> tuple[float, tuple[float, ...]]:
    """Median seconds of `op()` over at least `repeats` runs (and `min_seconds` in total), after warm-up."""
    sync = torch.cuda.synchronize if device == "cuda" else (lambda: None)
    for _ in range(warmup):
        op()
    sync()
    samples: list[float] = []
    spent = 0.0
    while len(samples) < repeats or (spent < min_seconds and len(samples) < 200):
        start = time.perf_counter()
        op()
        sync()
        elapsed = time.perf_counter() - start
        samples.append(elapsed)
        spent += elapsed
    return statistics.median(samples), tuple(samples)


# --- link -----------------------------------------------------------------------------------------

class DiskReader:
    """O_DIRECT reads of aligned extents of a scratch file into realrun's own slot buffers: what realrun's
    disk tier does per expert.

    The buffers are `realrun.store.aligned_buffer`s (private anonymous mappings), written once beforehand
    and used in rotation, as realrun's slots are. (Interleaved reads of 34.6 MB into these and into a
    shared `mmap.mmap(-1, n)`: 2.61 vs 2.33 GB/s on this VM, whose disk itself drifts between 1.0 and
    3.1 GB/s within minutes.)
    """

    BUFFERS = 4

    def __init__(self, path: Path, file_bytes: int, max_read_bytes: int, rng: np.random.Generator):
        from realrun.store import aligned_buffer

        self.path = path
        self.file_bytes = _align(file_bytes)
        self.rng = rng
        self.buffers = [aligned_buffer(_align(max_read_bytes)) for _ in range(self.BUFFERS)]
        for buffer in self.buffers:
            buffer.fill_(0)  # first touch (page faults) is not part of a transfer
        self.turn = itertools.count()
        self.fd = -1

    def open(self) -> None:
        """Write the scratch file (random bytes, so no compression or zero-page tricks) and open it O_DIRECT."""
        chunk = np.random.default_rng(1).integers(0, 256, size=8 << 20, dtype=np.uint8).tobytes()
        with open(self.path, "wb") as out:
            written = 0
            while written < self.file_bytes:
                n = min(len(chunk), self.file_bytes - written)
                out.write(chunk[:n])
                written += n
            out.flush()
            os.fsync(out.fileno())
        if not hasattr(os, "O_DIRECT"):
            raise UserError("this platform has no O_DIRECT; use --store ram")
        try:
            self.fd = os.open(self.path, os.O_RDONLY | os.O_DIRECT)
        except OSError as error:
            raise UserError(f"cannot open {self.path} with O_DIRECT ({error.strerror}); "
                            "pass --scratch DIR on a disk file system (not tmpfs)") from None

    def read(self, nbytes: int) -> None:
        offset = int(self.rng.integers(0, (self.file_bytes - nbytes) // ALIGN_BYTES + 1)) * ALIGN_BYTES
        view = memoryview(self.buffers[next(self.turn) % self.BUFFERS][:nbytes].numpy()).cast("B")
        got = os.preadv(self.fd, [view], offset)
        if got != nbytes:
            raise OSError(f"short O_DIRECT read: {got} of {nbytes} bytes")

    def close(self) -> None:
        if self.fd >= 0:
            os.close(self.fd)
            self.fd = -1
        self.buffers.clear()
        self.path.unlink(missing_ok=True)


@contextlib.contextmanager
def transfers(plan: BenchPlan, rng: np.random.Generator, largest: int) -> Iterator[Callable[[int], None]]:
    """A function that moves one transfer of `size <= largest` bytes the way realrun's slow tier does:
    an O_DIRECT read of a scratch file (disk store), a copy out of a host pool (RAM store), or a pinned
    host -> GPU copy (CUDA)."""
    pool_bytes = max(4 * largest, 256 << 20)
    if plan.store == "disk":
        fd, name = tempfile.mkstemp(prefix="fatesim-calib-", suffix=".bin", dir=plan.scratch_dir)
        os.close(fd)
        reader = DiskReader(Path(name), pool_bytes, largest, rng)
        try:
            reader.open()
            yield reader.read
        finally:
            reader.close()
        return
    pin = plan.device == "cuda"
    pool = torch.empty(pool_bytes, dtype=torch.uint8, pin_memory=pin)
    pool.random_(0, 256, generator=torch.Generator().manual_seed(1))
    dst = torch.empty(largest, dtype=torch.uint8, device=plan.device)

    def copy(size: int) -> None:
        offset = int(rng.integers(0, (pool_bytes - size) // ALIGN_BYTES + 1)) * ALIGN_BYTES
        dst[:size].copy_(pool[offset:offset + size], non_blocking=pin)

    yield copy


def bench_link(plan: BenchPlan, rng: np.random.Generator) -> Iterator[Point]:
    """Time one transfer per size: disk O_DIRECT reads, RAM copies, or pinned H2D copies."""
    with transfers(plan, rng, max(plan.link_sizes_bytes)) as move:
        for size in plan.link_sizes_bytes:
            median, samples = time_op(lambda s=size: move(s), repeats=plan.repeats, device=plan.device,
                                      min_seconds=max(plan.min_seconds, plan.link_min_seconds))
            yield Point("link", size, 0.0, size, median, samples)


class BackgroundTransfers:
    """A thread that keeps the link busy (one transfer after another) while the block runs."""

    def __init__(self, move: Callable[[int], None], nbytes: int) -> None:
        self.move, self.nbytes = move, nbytes
        self.stop = threading.Event()
        self.thread = threading.Thread(target=self._run, name="calib-transfers", daemon=True)

    def _run(self) -> None:
        while not self.stop.is_set():
            self.move(self.nbytes)

    def __enter__(self) -> BackgroundTransfers:
        self.thread.start()
        time.sleep(0.005)  # let the first transfer get going
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop.set()
        self.thread.join()


def bench_contention(plan: BenchPlan, spec: ModelSpec, rng: np.random.Generator) -> Iterator[Point]:
    """Routed-expert compute alone and while the link moves expert records, interleaved in rounds.

    On a CPU device the slow tier's transfers share the memory bus and the cores with compute (on this
    2-vCPU VM a 1-token expert ran 1.1-1.7x slower beside O_DIRECT reads). Yields, per token count of
    `plan.contention_tokens`, a `contention_alone` and a `contention` point (medians over all rounds);
    `fit` turns their ratio into the profile's `copy_contention`. Not measured on CUDA, where timing an
    operation synchronises the device and would wait for the background copies too.
    """
    h, i = spec.hidden_size, spec.expert_intermediate_size
    gen = torch.Generator().manual_seed(8)
    weight_bytes = 3 * h * i * plan.compute_dtype.itemsize
    sets = [(_weights(2 * i, h, plan.compute_dtype, plan.device, gen), _weights(h, i, plan.compute_dtype, plan.device, gen))
            for _ in range(_copies(plan, weight_bytes))]
    turn = itertools.count()
    record = _align(spec.expert_bytes("bf16"))
    with transfers(plan, rng, record) as move:
        for tokens in plan.contention_tokens:
            x = torch.randn(tokens, h, generator=gen).to(plan.compute_dtype).to(plan.device)

            def op(x: torch.Tensor = x) -> torch.Tensor:
                return _swiglu(x, *sets[next(turn) % len(sets)])

            alone: list[float] = []
            busy: list[float] = []
            for _ in range(plan.contention_rounds):
                alone += time_op(op, repeats=plan.repeats, min_seconds=plan.min_seconds / 2, device=plan.device)[1]
                with BackgroundTransfers(move, record):
                    busy += time_op(op, repeats=plan.repeats, min_seconds=plan.min_seconds / 2,
                                    device=plan.device)[1]
            flops, nbytes = spec.expert_flops(tokens), spec.expert_bytes("bf16") * _byte_scale(plan, spec)
            yield Point("contention_alone", tokens, flops, nbytes, statistics.median(alone), tuple(alone))
            yield Point("contention", tokens, flops, nbytes, statistics.median(busy), tuple(busy))


# --- compute --------------------------------------------------------------------------------------

def _swiglu(x: torch.Tensor, gate_up: torch.Tensor, down: torch.Tensor) -> torch.Tensor:
    """SwiGLU with fused gate|up weights [2I, H] (transformers' and realrun's layout) and down [H, I]."""
    gate, up = F.linear(x, gate_up).chunk(2, dim=-1)
    return F.linear(F.silu(gate) * up, down)


def _byte_scale(plan: BenchPlan, spec: ModelSpec) -> float:
    """Bytes the kernel really reads per byte the spec counts (1 unless --dtype differs from the model's)."""
    return plan.compute_dtype.itemsize / spec.weight_bytes


def _copies(plan: BenchPlan, nbytes_each: int) -> int:
    """How many copies of an `nbytes_each` weight set make the rotation cache-cold."""
    return max(2, -(-plan.cold_set_bytes // max(1, nbytes_each)))


def _weights(rows: int, cols: int, dtype: torch.dtype, device: str, gen: torch.Generator) -> torch.Tensor:
    """Random weights (uniform: several times cheaper to draw than normal; timing does not care)."""
    return torch.empty(rows, cols).uniform_(-0.03, 0.03, generator=gen).to(dtype=dtype, device=device)


def bench_experts(plan: BenchPlan, spec: ModelSpec, device: str, kind: str) -> Iterator[Point]:
    """Routed-expert SwiGLU against tokens per expert, with the spec's hidden and intermediate sizes."""
    gen = torch.Generator().manual_seed(2)
    h, i = spec.hidden_size, spec.expert_intermediate_size
    sets = [(_weights(2 * i, h, plan.compute_dtype, device, gen), _weights(h, i, plan.compute_dtype, device, gen))
            for _ in range(_copies(plan, 3 * h * i * plan.compute_dtype.itemsize))]
    turn = itertools.count()
    for tokens in plan.expert_tokens:
        x = torch.randn(tokens, h, generator=gen).to(plan.compute_dtype).to(device)
        median, samples = time_op(lambda x=x: _swiglu(x, *sets[next(turn) % len(sets)]), repeats=plan.repeats,
                                  min_seconds=plan.min_seconds, device=device)
        yield Point(kind, tokens, spec.expert_flops(tokens), spec.expert_bytes("bf16") * _byte_scale(plan, spec),
                    median, samples)


def bench_shared_mlp(plan: BenchPlan, spec: ModelSpec) -> Iterator[Point]:
    """The shared experts (or, without any, a dense MLP) of one layer against tokens."""
    gen = torch.Generator().manual_seed(3)
    h = spec.hidden_size
    inter = spec.shared_expert_intermediate_size or spec.dense_intermediate_size
    sets = [(_weights(2 * inter, h, plan.compute_dtype, plan.device, gen),
             _weights(h, inter, plan.compute_dtype, plan.device, gen))
            for _ in range(_copies(plan, 3 * h * inter * plan.compute_dtype.itemsize))]
    turn = itertools.count()
    for tokens in plan.mlp_tokens:
        x = torch.randn(tokens, h, generator=gen).to(plan.compute_dtype).to(plan.device)
        median, samples = time_op(lambda x=x: _swiglu(x, *sets[next(turn) % len(sets)]), repeats=plan.repeats,
                                  min_seconds=plan.min_seconds, device=plan.device)
        if spec.shared_expert_intermediate_size:  # exactly what sim.costs.CostModel.shared_s charges
            flops, nbytes = spec.shared_expert_flops(tokens), spec.shared_expert_params * spec.weight_bytes
        else:
            flops, nbytes = spec.dense_mlp_flops(tokens), spec.dense_mlp_params * spec.weight_bytes
        yield Point("mlp", tokens, flops, nbytes * _byte_scale(plan, spec), median, samples)


def bench_attention(plan: BenchPlan, spec: ModelSpec) -> Iterator[Point]:
    """One layer's attention as transformers runs it: q/k/v projections (with bias, as Qwen2), SDPA over a
    KV cache of `context` positions (causal in prefill), o projection."""
    gen = torch.Generator().manual_seed(4)
    dt, dev = plan.compute_dtype, plan.device
    h, heads, kv_heads, hd = spec.hidden_size, spec.num_attention_heads, spec.num_key_value_heads, spec.head_dim
    bq, bk, bv = (torch.zeros(n * hd, dtype=dt, device=dev) for n in (heads, kv_heads, kv_heads))
    per_set = (2 * heads + 2 * kv_heads) * hd * h * dt.itemsize
    sets = [tuple(_weights(n * hd, h, dt, dev, gen) for n in (heads, kv_heads, kv_heads))
            + (_weights(h, heads * hd, dt, dev, gen),) for _ in range(_copies(plan, per_set))]
    turn = itertools.count()
    for tokens, context in plan.attention_points:
        past = max(0, context - tokens)
        k_cache = torch.randn(1, kv_heads, past, hd, generator=gen).to(dt).to(dev)
        v_cache = torch.randn(1, kv_heads, past, hd, generator=gen).to(dt).to(dev)
        x = torch.randn(1, tokens, h, generator=gen).to(dt).to(dev)

        def attend(x: torch.Tensor = x, k_cache: torch.Tensor = k_cache, v_cache: torch.Tensor = v_cache,
                   tokens: int = tokens) -> torch.Tensor:
            wq, wk, wv, wo = sets[next(turn) % len(sets)]
            q = F.linear(x, wq, bq).view(1, tokens, heads, hd).transpose(1, 2)      # [1, heads, n, hd]
            k = F.linear(x, wk, bk).view(1, tokens, kv_heads, hd).transpose(1, 2)
            v = F.linear(x, wv, bv).view(1, tokens, kv_heads, hd).transpose(1, 2)
            k = torch.cat([k_cache, k], dim=2)  # the KV cache grows by the new tokens, as DynamicCache does
            v = torch.cat([v_cache, v], dim=2)
            out = F.scaled_dot_product_attention(q, k, v, is_causal=tokens > 1, enable_gqa=kv_heads != heads)
            return F.linear(out.transpose(1, 2).reshape(1, tokens, heads * hd), wo)

        median, samples = time_op(attend, repeats=plan.repeats, min_seconds=plan.min_seconds, device=dev)
        yield Point("attention", tokens, spec.attention_flops(tokens, context),
                    spec.attention_bytes(context) * _byte_scale(plan, spec), median, samples, context=context)


def bench_lm_head(plan: BenchPlan, spec: ModelSpec) -> Point:
    """The vocabulary head on one position (the last token's logits, once per forward step)."""
    gen = torch.Generator().manual_seed(9)
    h = spec.hidden_size
    heads = [_weights(spec.vocab_size, h, plan.compute_dtype, plan.device, gen)
             for _ in range(_copies(plan, spec.vocab_size * h * plan.compute_dtype.itemsize))]
    x = torch.randn(1, h, generator=gen).to(plan.compute_dtype).to(plan.device)
    turn = itertools.count()
    median, samples = time_op(lambda: F.linear(x, heads[next(turn) % len(heads)]), repeats=plan.repeats,
                              min_seconds=plan.min_seconds, device=plan.device)
    return Point("lm_head", 1, spec.lm_head_flops(1), spec.lm_head_bytes * _byte_scale(plan, spec), median, samples)


def bench_layer_overhead(plan: BenchPlan, spec: ModelSpec) -> Point:
    """Fixed per-layer work of one decode token: 2 RMSNorms, 2 residual adds, router softmax and top-k.

    The router matmul itself is not included: `sim.costs.CostModel` charges it as its own roofline op.
    """
    gen = torch.Generator().manual_seed(5)
    dt, dev, h = plan.compute_dtype, plan.device, spec.hidden_size
    x = torch.randn(1, h, generator=gen).to(dt).to(dev)
    residual = torch.randn(1, h, generator=gen).to(dt).to(dev)
    logits = torch.randn(1, spec.num_experts, generator=gen).to(dt).to(dev)
    norm_w = torch.ones(h, dtype=dt, device=dev)

    def layer() -> torch.Tensor:
        a = F.rms_norm(x, (h,), norm_w) + residual
        b = F.rms_norm(a, (h,), norm_w)
        weights, ids = torch.topk(torch.softmax(logits.float(), dim=-1), spec.top_k, dim=-1)
        return a + b * weights.sum().to(dt) + ids.numel()

    median, samples = time_op(layer, repeats=max(plan.repeats, 20), min_seconds=plan.min_seconds, device=dev)
    return Point("layer", 1, 0.0, 0.0, median, samples)


DISPATCH_EXPERTS = (1, 2, 4, 8, 16)
"""Routed experts per measured MoE layer (one token each; capped at the model's expert count)."""


def bench_dispatch(plan: BenchPlan, spec: ModelSpec) -> Iterator[Point]:
    """Eager dispatch of `n` routed experts in one MoE layer, the experts' matmuls replaced by a scale.

    The same steps as `realrun.engine.OffloadEngine.run_experts` around `expert_forward` (one-hot expert
    mask, `torch.unique` read back to the host, per expert `torch.where`, gather, weight, `index_add_`),
    on `n` tokens routed to `n` distinct experts, so the work per expert is one token's: what is left is the
    software cost an eager engine pays per MoE layer and per routed expert.
    """
    gen = torch.Generator().manual_seed(8)
    dt, dev, h, e = plan.compute_dtype, plan.device, spec.hidden_size, spec.num_experts
    for n in (c for c in DISPATCH_EXPERTS if c <= e):
        hidden = torch.randn(n, h, generator=gen).to(dt).to(dev)
        top_k_index = torch.arange(n, device=dev).reshape(n, 1)  # token i -> expert i
        top_k_weights = torch.rand(n, 1, generator=gen).to(dt).to(dev)

        def layer(hidden: torch.Tensor = hidden, top_k_index: torch.Tensor = top_k_index,
                  top_k_weights: torch.Tensor = top_k_weights) -> torch.Tensor:
            mask = F.one_hot(top_k_index, num_classes=e + 1).permute(2, 1, 0)
            ids, _counts = torch.unique(top_k_index, return_counts=True)
            final = torch.zeros_like(hidden)
            for expert in ids.cpu().numpy().tolist():
                top_k_pos, token_idx = torch.where(mask[expert])
                y = hidden[token_idx] * 0.5  # stands in for the expert's matmuls (timed by `expert`)
                final.index_add_(0, token_idx, (y * top_k_weights[token_idx, top_k_pos, None]).to(final.dtype))
            return final

        median, samples = time_op(layer, repeats=max(plan.repeats, 20), min_seconds=plan.min_seconds, device=dev)
        yield Point("dispatch", n, 0.0, 0.0, median, samples)


def bench_predictor(plan: BenchPlan, spec: ModelSpec) -> Point:
    """The cross-layer predictor for one token on the CPU: next layer's router, softmax, top-k."""
    gen = torch.Generator().manual_seed(6)
    x = torch.randn(1, spec.hidden_size, generator=gen)
    router = _weights(spec.num_experts, spec.hidden_size, torch.float32, "cpu", gen)

    def predict() -> list[int]:
        probs = torch.softmax(F.linear(x, router), dim=-1)
        return torch.topk(probs, spec.top_k, dim=-1).indices[0].tolist()

    median, samples = time_op(predict, repeats=max(plan.repeats, 50), min_seconds=plan.min_seconds, device="cpu")
    return Point("predictor", 1, spec.router_flops(1), spec.router_params * 4, median, samples)


# --- dequantisation -------------------------------------------------------------------------------

def bench_quantised(plan: BenchPlan, spec: ModelSpec, precision: str) -> Iterator[Point]:
    """One routed expert stored in `precision`, on realrun's own path (no second quantiser), against tokens.

    HQQ records are unpacked by `Dequantizer.unpack_into` and then multiplied; int4 on a CPU is multiplied
    straight from the packed record (`Int4Matmuls`, packing "tinygemm"). Yields an `expert_<precision>`
    point per token count of `plan.expert_tokens` (FLOPs and bytes of the unquantised expert, as the
    `expert` points, so `fit` turns them into the profile's per-token correction for that precision), then
    a `dequant_<precision>` point: (quantised - unquantised) at 1 token, floored at 1 µs, which `fit` turns
    into the `[dequant]` rate that profiles without a per-token correction use.
    """
    from realrun.quant import Dequantizer, Int4Matmuls, expert_layout, pack_expert, raw_views
    from realrun.runner import packing_for

    gen = torch.Generator().manual_seed(7)
    packing = packing_for(spec, precision, torch.device(plan.device))
    layout = expert_layout(spec, precision, packing)
    dense = expert_layout(spec, "bf16")
    h, i = spec.hidden_size, spec.expert_intermediate_size
    copies = _copies(plan, dense.nbytes)
    records, dense_records = [], []
    for _ in range(copies):
        weights = {"gate": _weights(i, h, torch.float32, "cpu", gen), "up": _weights(i, h, torch.float32, "cpu", gen),
                   "down": _weights(h, i, torch.float32, "cpu", gen)}
        records.append(pack_expert(weights, layout, optimize=False).to(plan.device))  # quality is irrelevant
        dense_records.append(pack_expert(weights, dense).to(plan.device))
    turn = itertools.count()
    if packing == "tinygemm":
        matmuls = Int4Matmuls(layout)

        def quantised(x: torch.Tensor) -> torch.Tensor:
            return matmuls.forward(records[next(turn) % copies], x, F.silu)
    else:
        dequantizer = Dequantizer(layout, device=plan.device)

        def quantised(x: torch.Tensor) -> torch.Tensor:
            gate_up, down = dequantizer.unpack_into(records[next(turn) % copies])
            return _swiglu(x, gate_up, down)

    def unquantised(x: torch.Tensor) -> torch.Tensor:
        return _swiglu(x, *raw_views(dense_records[next(turn) % copies], dense))

    bf16_bytes = spec.expert_bytes("bf16")  # what sim.costs charges every expert (and divides by the rate)
    one_token_s = one_token_samples = None
    for tokens in plan.expert_tokens:
        x = torch.randn(tokens, h, generator=gen).to(layout.dtype).to(plan.device)
        q_s, q_samples = time_op(lambda x=x: quantised(x), repeats=plan.repeats, min_seconds=plan.min_seconds,
                                 device=plan.device)
        if tokens == 1:
            one_token_s, one_token_samples = q_s, q_samples
        yield Point(f"expert_{precision}", tokens, spec.expert_flops(tokens), bf16_bytes * _byte_scale(plan, spec),
                    q_s, q_samples)
    if one_token_s is None:
        raise UserError("the calibration plan must measure experts at 1 token")
    x = torch.randn(1, h, generator=gen).to(layout.dtype).to(plan.device)
    d_s, _ = time_op(lambda: unquantised(x), repeats=plan.repeats, min_seconds=plan.min_seconds, device=plan.device)
    extra = tuple(max(1e-6, s - d_s) for s in one_token_samples)
    yield Point(f"dequant_{precision}", bf16_bytes, 0.0, bf16_bytes, max(1e-6, one_token_s - d_s), extra)


def count_steps(plan: BenchPlan, num_experts: int = max(DISPATCH_EXPERTS)) -> int:
    """Number of progress-bar steps `run_all` reports (for a model of `num_experts` routed experts)."""
    compute = len(plan.expert_tokens) * (2 if plan.device == "cuda" else 1)
    quantised = len(plan.dequant_precisions) * (len(plan.expert_tokens) + 1)
    contention = 2 * len(plan.contention_tokens) if plan.device == "cpu" else 0
    dispatch = sum(1 for c in DISPATCH_EXPERTS if c <= num_experts)
    return (len(plan.link_sizes_bytes) + compute + len(plan.mlp_tokens) + len(plan.attention_points)
            + quantised + contention + dispatch + 3)


def run_all(plan: BenchPlan, spec: ModelSpec, progress: Callable[[str], None] = lambda _: None,
            seed: int = 0) -> list[Point]:
    """Every benchmark of `plan`, calling `progress(label)` after each point."""
    rng = np.random.default_rng(seed)
    points: list[Point] = []

    def add(point: Point) -> None:
        points.append(point)
        progress(f"{point.kind} {point.x:g}")

    with torch.inference_mode():
        for point in bench_link(plan, rng):
            add(point)
        if plan.device == "cpu":
            for point in bench_contention(plan, spec, rng):
                add(point)
        for point in bench_experts(plan, spec, plan.device, "expert"):
            add(point)
        if plan.device == "cuda":
            for point in bench_experts(plan, spec, "cpu", "cpu_expert"):
                add(point)
        for point in bench_shared_mlp(plan, spec):
            add(point)
        for point in bench_attention(plan, spec):
            add(point)
        add(bench_lm_head(plan, spec))
        add(bench_layer_overhead(plan, spec))
        for point in bench_dispatch(plan, spec):
            add(point)
        add(bench_predictor(plan, spec))
        for precision in plan.dequant_precisions:
            for point in bench_quantised(plan, spec, precision):
                add(point)
    return points


def geometric_sizes(low_bytes: int, high_bytes: int, per_octave: int) -> tuple[int, ...]:
    """Aligned sizes from `low_bytes` to `high_bytes`, `per_octave` per doubling."""
    steps = int(round(math.log2(high_bytes / low_bytes) * per_octave))
    return tuple(sorted({_align(int(low_bytes * 2 ** (s / per_octave))) for s in range(steps + 1)}))
