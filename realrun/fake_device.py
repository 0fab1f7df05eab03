"""A fake accelerator for tests: CPU tensors, two logical streams, and a log that proves the stream rules.

`FakeDevice` implements `realrun.device.Device` the way a GPU behaves, on the CPU: it has "separate" fast
memory (so the engine takes its accelerator paths: staging, CPU experts on a worker thread), a compute
stream and a copy stream, events, device-side waits. The engine runs on it unchanged; the fake only logs.

What it logs, with a vector clock per agent (each stream, and each host thread), is every operation that
orders work: an operation issued to a stream, an event recorded, a stream or host thread waiting on an
event (`wait`, `synchronize`, a `query` that answered True), and each read or write of a named buffer.
Issuing work to a stream orders it after everything the issuing host thread has done or seen; nothing else
does. `violations()` then checks, for every buffer, the two rules a GPU engine must keep:

1. a read happens after every write issued before it (the compute stream waits on a copy's event before it
   uses the slot the copy fills);
2. a write happens after every read and write issued before it (a slot is not overwritten before the event
   recorded after its last use, nor before the copy still filling it ends).

With `lazy=True` the copy stream also *behaves* as late as a GPU may: its writes stay invisible (the
buffer keeps its old bytes) until something waits for an event recorded after them, so reading a slot
without waiting gives wrong numbers, not just a log entry.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Callable, Hashable, Mapping
from dataclasses import dataclass
from typing import Any, TypeVar

import torch

from realrun.device import HOST, Device, aligned_buffer

R = TypeVar("R")
Clock = dict[str, int]


def _join(a: Clock, b: Clock) -> Clock:
    out = dict(a)
    for agent, tick in b.items():
        if tick > out.get(agent, 0):
            out[agent] = tick
    return out


@dataclass
class Op:
    """One logged operation: who did it, what, on which buffer or event, and its vector clock."""

    agent: str
    """"compute", "copy", or "host:<thread name>"."""
    kind: str
    """"write", "read", "record", "wait"."""
    target: Any
    clock: Clock

    def before(self, other: Op) -> bool:
        """Whether this operation happens before `other` (by the vector clocks)."""
        return self.clock[self.agent] <= other.clock.get(self.agent, 0)


class FakeEvent:
    """An event of the fake: its clock, and (lazy copy stream) the position of the writes it covers."""

    def __init__(self, device: FakeDevice, agent: str, clock: Clock, at: float) -> None:
        self._device = device
        self.agent = agent
        self.clock = clock
        self.at = at

    def query(self) -> bool:
        return self._device._observe(self, block=False)

    def synchronize(self) -> None:
        self._device._observe(self, block=True)


class FakeDevice(Device):
    """See the module docstring. `lazy`: copy-stream writes become visible only when waited for."""

    name = "fake"
    separate_memory = True
    clock = "perf_counter"
    compute = "compute"
    copy = "copy"

    def __init__(self, *, lazy: bool = False) -> None:
        self.torch_device = torch.device("cpu")
        self.lazy = lazy
        self.log: list[Op] = []
        self._clocks: dict[str, Clock] = {}
        self._lock = threading.RLock()
        self._deferred: list[tuple[int, torch.Tensor, torch.Tensor]] = []
        """Lazy mode: (copy-stream tick, buffer, bytes to land) of writes not yet visible, in issue order."""

    # --- clocks ------------------------------------------------------------------------------------
    def _agent(self, stream: Any) -> str:
        return f"host:{threading.current_thread().name}" if stream is HOST else str(stream)

    def _tick(self, stream: Any) -> tuple[str, Clock]:
        """Advance the agent that does an operation on `stream`; a device stream first takes in everything the
        issuing host thread has done or seen."""
        agent = self._agent(stream)
        clock = self._clocks.get(agent, {})
        if stream is not HOST:
            clock = _join(clock, self._clocks.get(self._agent(HOST), {}))
        clock = dict(clock)
        clock[agent] = clock.get(agent, 0) + 1
        self._clocks[agent] = clock
        return agent, clock

    def _log(self, stream: Any, kind: str, target: Any) -> Op:
        agent, clock = self._tick(stream)
        op = Op(agent, kind, target, clock)
        self.log.append(op)
        return op

    def _observe(self, event: FakeEvent, *, block: bool) -> bool:
        """A host thread learns `event` completed (a query answered True, or a synchronize)."""
        with self._lock:
            if not block and self._pending_before(event):
                return False
            self._land(event)
            host = self._agent(HOST)
            self._clocks[host] = _join(self._clocks.get(host, {}), event.clock)
            self.log.append(Op(host, "wait", event, dict(self._clocks[host])))
            return True

    # --- lazy copy stream --------------------------------------------------------------------------
    def _pending_before(self, event: FakeEvent) -> bool:
        tick = event.clock.get("copy", 0)
        return any(t <= tick for t, _, _ in self._deferred)

    def _land(self, event: FakeEvent) -> None:
        """Make the copy-stream writes that `event` covers visible, in issue order."""
        tick = event.clock.get("copy", 0)
        keep = []
        for t, buffer, data in self._deferred:
            if t <= tick:
                buffer.copy_(data)
            else:
                keep.append((t, buffer, data))
        self._deferred = keep

    # --- the Device interface ----------------------------------------------------------------------
    def fast_buffer(self, nbytes: int) -> torch.Tensor:
        arena = aligned_buffer(nbytes)  # aligned: a disk store's O_DIRECT reads may land in it
        arena.fill_(0)
        return arena

    def host_buffer(self, nbytes: int) -> torch.Tensor:
        return torch.empty(nbytes, dtype=torch.uint8)

    def record(self, stream: Any, *, timed: bool = True) -> FakeEvent:
        with self._lock:
            op = self._log(stream, "record", None)
            event = FakeEvent(self, op.agent, op.clock, time.perf_counter())
            op.target = event
            return event

    def wait(self, stream: Any, event: FakeEvent) -> None:
        with self._lock:
            if stream is HOST:
                self._observe(event, block=True)
                return
            self._land(event)  # a GPU runs the waiting stream's later work after the event: the bytes are there
            agent, clock = self._tick(stream)
            self._clocks[agent] = clock = _join(clock, event.clock)
            self.log.append(Op(agent, "wait", event, dict(clock)))

    def issue(self, stream: Any, op: Callable[[], R], *, writes: Mapping[Hashable, torch.Tensor] | None = None) -> R:
        with self._lock:
            logged = [self._log(stream, "write", key) for key in (writes or {})]
            if not (self.lazy and stream == self.copy and writes):
                return op()
            before = {key: buf.clone() for key, buf in writes.items()}
            result = op()
            tick = logged[-1].clock["copy"]
            for key, buf in writes.items():  # the bytes land later: keep them aside, restore the old ones
                self._deferred.append((tick, buf, buf.clone()))
                buf.copy_(before[key])
            return result

    def access(self, stream: Any, key: Hashable, *, write: bool = False) -> None:
        with self._lock:
            self._log(stream, "write" if write else "read", key)

    def synchronize(self) -> None:
        with self._lock:
            host = self._agent(HOST)
            clock = self._clocks.get(host, {})
            for agent in ("compute", "copy"):
                clock = _join(clock, self._clocks.get(agent, {}))
            self._clocks[host] = clock
            self.log.append(Op(host, "wait", "all", dict(clock)))
            for _, buffer, data in self._deferred:
                buffer.copy_(data)
            self._deferred = []

    def time_of(self, event: FakeEvent) -> float:
        return event.at

    # --- the rules -----------------------------------------------------------------------------------
    def accesses(self, key_prefix: str | None = None) -> list[Op]:
        """Logged reads and writes (of keys whose first element is `key_prefix`, if given), in issue order."""
        return [op for op in self.log if op.kind in ("read", "write")
                and (key_prefix is None or (isinstance(op.target, tuple) and op.target[0] == key_prefix))]

    def violations(self) -> list[str]:
        """Every access that breaks rule 1 or 2 of the module docstring (empty when the engine kept them)."""
        found: list[str] = []
        last_write: dict[Hashable, dict[str, Op]] = {}
        last_read: dict[Hashable, dict[str, Op]] = {}
        for op in self.log:
            if op.kind not in ("read", "write"):
                continue
            key = op.target
            earlier = list(last_write.get(key, {}).values())
            if op.kind == "write":
                earlier += list(last_read.get(key, {}).values())
            for prior in earlier:
                if prior.agent != op.agent and not prior.before(op):
                    found.append(f"{op.kind} of {key} on {op.agent} is not ordered after the {prior.kind} on "
                                 f"{prior.agent} issued before it")
            (last_write if op.kind == "write" else last_read).setdefault(key, {})[op.agent] = op
        return found
