"""Missed experts computed on the CPU while the accelerator computes the others (Fiddler; miss policy `cpu`).

On a device with its own memory (CUDA, or the fake accelerator of the tests) a layer step with CPU work
runs like this, as the simulator models it (sim/engine.py: the CPU expert thread starts at the router
output, the GPU waits for its results before the shared experts):

    compute stream  router ─▶ gather CPU tokens ─▶ D2H (pinned) ─▶ GPU experts ... ─▶ [wait] ─▶ H2D results ─▶ sum
    worker thread                         wait for D2H ─▶ CPU experts, ascending id ─▶ pinned results ┘

1. `start`: on the compute thread, right after the plan: the token positions of each CPU expert are found
   on the host from the routing (already there: the controller needed it), the hidden states of those
   tokens and the routing weights go to pinned host buffers asynchronously on the compute stream, and the
   worker thread is handed the job;
2. the worker waits for that copy's event, computes each expert from its host-RAM record with the same
   operations as transformers' eager loop, and returns pinned outputs;
3. `finish`: the compute thread, after issuing its own experts, waits for the worker (the wait is timed
   on the compute stream as a stall) and copies the outputs up; the engine sums every expert's output in
   ascending expert order, so a lossless run stays bit-equal to transformers where the CPU and the device
   compute alike (the fake device).

On the host device there is no second processor to overlap with (the simulator puts CPU work on the
stream there): the engine computes these experts inline instead.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from concurrent.futures import Future, ThreadPoolExecutor

import torch

from realrun.device import HOST, Device, Event, PendingTimes
from realrun.experts import expert_forward

ExpertWeights = Callable[[int, int], tuple[torch.Tensor, torch.Tensor]]
"""(layer, expert) -> (gate_up [2I, H], down [H, I]) host tensors of that expert."""

HIDDEN_KEY, WEIGHTS_KEY = ("cpu-in", "hidden"), ("cpu-in", "weights")
"""Device buffer keys of the pinned inputs."""


class CpuExperts:
    """The worker thread and its pinned buffers (one job in flight at a time: a layer waits for its own)."""

    def __init__(self, device: Device, weights: ExpertWeights) -> None:
        self.device = device
        self.weights = weights
        self._pool = ThreadPoolExecutor(max_workers=1, thread_name_prefix="realrun-cpu")
        self._buffers: dict[tuple, torch.Tensor] = {}
        self.busy_s = 0.0
        """Seconds the worker spent computing experts."""
        self.spans: list[tuple[float, float, int, int]] = []
        """(start_at, end_at, layer, experts) of every job (perf_counter seconds)."""

    def close(self) -> None:
        self._pool.shutdown(wait=True)
        self._buffers.clear()

    def _buffer(self, key: tuple, shape: tuple[int, ...], dtype: torch.dtype) -> torch.Tensor:
        """A host buffer for `key`, grown when too small, viewed as `shape`/`dtype`."""
        nbytes = max(1, int(torch.Size(shape).numel()) * dtype.itemsize)
        buf = self._buffers.get(key)
        if buf is None or buf.numel() < nbytes:
            buf = self._buffers[key] = self.device.host_buffer(nbytes)
        return buf[:nbytes].view(dtype).view(shape)

    def start(self, layer: int, experts: list[int], hidden: torch.Tensor, index_host: torch.Tensor,
              top_k_weights: torch.Tensor, act_fn: Callable[[torch.Tensor], torch.Tensor]) -> Future:
        """Send the tokens of `experts` (hidden [N, H] and top_k_weights [N, k] on the device, index_host [N, k]
        on the host) to the worker; returns its future (see `finish`)."""
        dev = self.device
        picks = {}
        for expert in sorted(experts):
            top_k_pos, token_idx = torch.where(index_host.T == expert)  # [k, N] order, as transformers' mask
            picks[expert] = (top_k_pos, token_idx)
        rows = torch.unique(torch.cat([token_idx for _, token_idx in picks.values()]))  # sorted
        hid = self._buffer(HIDDEN_KEY, (len(rows), hidden.shape[-1]), hidden.dtype)
        wts = self._buffer(WEIGHTS_KEY, tuple(top_k_weights.shape), top_k_weights.dtype)
        rows_dev = dev.pinned(rows).to(hidden.device, non_blocking=True)

        def gather() -> None:
            hid.copy_(hidden.index_select(0, rows_dev), non_blocking=True)
            wts.copy_(top_k_weights, non_blocking=True)

        dev.issue(dev.compute, gather, writes={HIDDEN_KEY: hid, WEIGHTS_KEY: wts})
        ready = dev.record(dev.compute, timed=False)
        return self._pool.submit(self._run, layer, picks, rows, hid, wts, ready, act_fn)

    def _run(self, layer: int, picks: dict[int, tuple[torch.Tensor, torch.Tensor]], rows: torch.Tensor,
             hid: torch.Tensor, wts: torch.Tensor, ready: Event,
             act_fn: Callable[[torch.Tensor], torch.Tensor]) -> tuple[dict, Event]:
        dev = self.device
        dev.wait(HOST, ready)  # the hidden states have landed in host memory
        start = time.perf_counter()
        dev.access(HOST, HIDDEN_KEY)
        dev.access(HOST, WEIGHTS_KEY)
        out = {}
        with torch.inference_mode():
            for expert, (top_k_pos, token_idx) in picks.items():
                gate_up, down = self.weights(layer, expert)
                x = hid[torch.searchsorted(rows, token_idx)]  # the rows hidden[token_idx] would give
                if gate_up.dtype != x.dtype:  # records keep the checkpoint's dtype; compute runs in --dtype
                    gate_up, down = gate_up.to(x.dtype), down.to(x.dtype)
                y = expert_forward(x, gate_up, down, act_fn, wts[token_idx, top_k_pos, None])
                out[expert] = (dev.pinned(token_idx), dev.pinned(y))
        end = time.perf_counter()
        self.busy_s += end - start
        self.spans.append((start, end, layer, len(picks)))
        return out, dev.record(HOST)

    def finish(self, job: Future, device: torch.device, timing: PendingTimes,
               stalled: Callable[[float], None]) -> dict[int, tuple[torch.Tensor, torch.Tensor]]:
        """Wait for `job` (timed on the compute stream: `stalled(seconds)` once settled in `timing`); its
        outputs as expert -> (token_idx, [n, H]) on `device`, the H2D copies issued on the compute stream."""
        dev = self.device
        begin = dev.record(dev.compute)
        out, finished = job.result()
        dev.wait(HOST, finished)
        end = dev.record(dev.compute)
        timing.add(begin, end, lambda s, e: stalled(e - s))
        return {expert: (token_idx.to(device, non_blocking=True), y.to(device, non_blocking=True))
                for expert, (token_idx, y) in out.items()}
