"""The compute device as the engine and its I/O thread see it: two streams, events, waits and copies.

The engine's scheduling code (which copy goes to which slot, who waits on what, when a slot may be
overwritten, how stalls are timed) is written once against this small interface and runs unchanged on:

- `HostDevice` (CPU runs): the host computes; everything a "stream" does runs synchronously on the calling
  thread, an event is the `time.perf_counter` instant it was recorded at and waits are no-ops (the I/O
  thread's own synchronisation orders copies and compute).
- `CudaDevice`: a compute stream (the model's current stream) and a dedicated copy stream; events are CUDA
  timing events; `wait` is a device-side `wait_event` (the host does not block).
- `realrun.fake_device.FakeDevice` (tests): CPU tensors, two logical streams, every operation logged with
  its happens-before relation, so the stream rules are checked in CI without a GPU.

Timing: every interval the engine reports (a copy, a stall, a layer's experts) is a pair of events on the
stream it concerns; `time_of(event)` puts an event on the host's `perf_counter` clock. On CUDA that is an
anchor (an event whose host instant is known: recorded, synchronised, then the clock read) plus the GPU's
own elapsed time from it; on the host it is the recorded instant. `PendingTimes` holds pairs until both
events have completed and only then reads them (after each forward step's sync, and at the end).

Buffers are named by keys (e.g. ("slot", layer, index)); `issue(..., writes=)` and `access` name what an
operation reads or writes. Real devices ignore the keys; the fake checks them.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Hashable, Mapping
from typing import Any, Protocol, TypeVar

import torch

from realrun.store import aligned_buffer

R = TypeVar("R")

HOST = None
"""The stream argument meaning "the calling host thread itself" (worker threads hand results over)."""


class Event(Protocol):
    def query(self) -> bool:
        """True once everything recorded before the event has completed."""
        ...

    def synchronize(self) -> None:
        """Block the calling host thread until the event has completed."""
        ...


class HostEvent:
    """An instant on the host (`perf_counter` seconds): complete when recorded."""

    __slots__ = ("at",)

    def __init__(self, at: float) -> None:
        self.at = at

    def query(self) -> bool:
        return True

    def synchronize(self) -> None:
        pass


class Device:
    """The interface (see the module docstring). Streams are opaque handles: `compute`, `copy`, or HOST."""

    name = "device"
    torch_device: torch.device
    separate_memory: bool
    """Fast memory is not host memory: records go through a host staging buffer where a store can only read
    into host memory (disk), and the CPU computes missed experts on a worker thread in parallel (cpu-exec)."""
    clock: str
    """What interval times come from: "perf_counter" (host) or "cuda-events"."""
    compute: Any
    copy: Any

    def fast_buffer(self, nbytes: int) -> torch.Tensor:
        """`nbytes` of fast memory (uint8), allocated and touched now."""
        raise NotImplementedError

    def host_buffer(self, nbytes: int) -> torch.Tensor:
        """`nbytes` of host memory the device copies to and from asynchronously (pinned on CUDA)."""
        raise NotImplementedError

    def pinned(self, tensor: torch.Tensor) -> torch.Tensor:
        """`tensor` (host) in memory the device can copy from asynchronously (itself where no pinning is needed)."""
        return tensor

    def record(self, stream: Any, *, timed: bool = True) -> Event:
        """An event marking everything issued to `stream` so far (HOST: the calling thread's work so far)."""
        raise NotImplementedError

    def wait(self, stream: Any, event: Event) -> None:
        """Work issued to `stream` from now on starts after `event` (device-side; HOST: block)."""
        raise NotImplementedError

    def issue(self, stream: Any, op: Callable[[], R], *, writes: Mapping[Hashable, torch.Tensor] | None = None) -> R:
        """Run `op`, whose device work goes to `stream`; `writes`: key -> buffer of what it writes."""
        raise NotImplementedError

    def access(self, stream: Any, key: Hashable, *, write: bool = False) -> None:
        """Work about to be issued to `stream` (HOST: done by this thread) reads (writes) buffer `key`."""

    def synchronize(self) -> None:
        """Block until all work on every stream has completed."""

    def time_of(self, event: Event) -> float:
        """The completed `event`'s instant in `perf_counter` seconds."""
        raise NotImplementedError


class HostDevice(Device):
    """The CPU as the compute device: synchronous; events are perf_counter instants."""

    name = "cpu"
    separate_memory = False
    clock = "perf_counter"
    compute = "compute"
    copy = "copy"

    def __init__(self) -> None:
        self.torch_device = torch.device("cpu")

    def fast_buffer(self, nbytes: int) -> torch.Tensor:
        arena = aligned_buffer(nbytes)  # page-aligned: O_DIRECT reads land in slots directly
        # Touch every page now, at start-up: an anonymous mapping is materialised (and zeroed by the kernel)
        # on first touch, which would otherwise land inside the first O_DIRECT read into each slot (the first
        # prefill of a run measured 1.9x slower here).
        arena.fill_(0)
        return arena

    def host_buffer(self, nbytes: int) -> torch.Tensor:
        return torch.empty(nbytes, dtype=torch.uint8)

    def record(self, stream: Any, *, timed: bool = True) -> HostEvent:
        return HostEvent(time.perf_counter())

    def wait(self, stream: Any, event: Event) -> None:
        pass

    def issue(self, stream: Any, op: Callable[[], R], *, writes: Mapping[Hashable, torch.Tensor] | None = None) -> R:
        return op()

    def time_of(self, event: Event) -> float:
        return event.at  # type: ignore[attr-defined]


class CudaDevice(Device):
    """A CUDA GPU: the compute stream is the current stream at construction, copies get their own stream."""

    name = "cuda"
    separate_memory = True
    clock = "cuda-events"

    def __init__(self, device: torch.device) -> None:
        self.torch_device = device
        self.compute = torch.cuda.current_stream(device)
        self.copy = torch.cuda.Stream(device)
        self._anchor: torch.cuda.Event | None = None
        self._anchor_at = 0.0
        self.anchor()

    def anchor(self) -> None:
        """Tie the GPU's event clock to perf_counter now: record an event on an idle-after-sync stream, wait for
        it, read the host clock (the host instant lags the GPU's by the synchronise call, a few µs)."""
        torch.cuda.synchronize(self.torch_device)
        event = torch.cuda.Event(enable_timing=True)
        event.record(self.compute)
        event.synchronize()
        self._anchor, self._anchor_at = event, time.perf_counter()

    def fast_buffer(self, nbytes: int) -> torch.Tensor:
        return torch.empty(nbytes, dtype=torch.uint8, device=self.torch_device)

    def host_buffer(self, nbytes: int) -> torch.Tensor:
        return torch.empty(nbytes, dtype=torch.uint8, pin_memory=True)

    def pinned(self, tensor: torch.Tensor) -> torch.Tensor:
        return tensor if tensor.is_pinned() else tensor.pin_memory()

    def record(self, stream: Any, *, timed: bool = True) -> Event:
        if stream is HOST:
            return HostEvent(time.perf_counter())
        event = torch.cuda.Event(enable_timing=timed)
        event.record(stream)
        return event

    def wait(self, stream: Any, event: Event) -> None:
        if isinstance(event, HostEvent):
            return  # a host instant: the host's own program order already holds
        if stream is HOST:
            event.synchronize()
        else:
            stream.wait_event(event)

    def issue(self, stream: Any, op: Callable[[], R], *, writes: Mapping[Hashable, torch.Tensor] | None = None) -> R:
        if stream is HOST or stream is self.compute:
            return op()  # the compute stream is the current stream
        with torch.cuda.stream(stream):
            return op()

    def synchronize(self) -> None:
        torch.cuda.synchronize(self.torch_device)

    def time_of(self, event: Event) -> float:
        if isinstance(event, HostEvent):
            return event.at
        return self._anchor_at + self._anchor.elapsed_time(event) / 1e3  # type: ignore[union-attr]


def device_for(device: torch.device) -> Device:
    """The `Device` of a torch device ("cpu" or "cuda")."""
    if device.type == "cuda":
        return CudaDevice(device)
    if device.type == "cpu":
        return HostDevice()
    raise ValueError(f"unsupported device {device}")


class PendingTimes:
    """Event pairs whose interval is read once both events completed, then handed to a callback.

    Reading a CUDA event's time before it completes is an error, and synchronising for it would stall the
    pipeline; so intervals are settled after each forward step's sync (`settle()`: those complete by now)
    and at the end (`settle(block=True)`)."""

    def __init__(self, device: Device) -> None:
        self.device = device
        self._pending: list[tuple[Event, Event, Callable[[float, float], None]]] = []

    def __len__(self) -> int:
        return len(self._pending)

    def add(self, start: Event, end: Event, done: Callable[[float, float], None]) -> None:
        """Call `done(start_at, end_at)` (perf_counter seconds) once both events have completed."""
        self._pending.append((start, end, done))

    def settle(self, block: bool = False) -> None:
        """Hand over every interval whose events completed (all of them with `block`), in the order added."""
        still = []
        time_of = self.device.time_of
        for start, end, done in self._pending:
            if block:
                end.synchronize()
            elif not (end.query() and start.query()):
                still.append((start, end, done))
                continue
            done(time_of(start), time_of(end))
        self._pending = still
