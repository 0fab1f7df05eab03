"""The I/O thread: runs slow-tier -> fast-memory copies off the compute thread, in the simulator's order.

The compute thread `submit`s a `Copy` (a record and the slot it goes to) and later `wait`s for it only if
it needs the expert now. Queued copies start one at a time in the order of
`sim.policies.transfer_queue.TransferQueue`, the same rule the simulated link follows: on-demand copies
before prefetches, then submission order; a queued prefetch the running layer needs is promoted (it keeps
its place in submission order); only a copy that has not started can be cancelled. A copy into a slot
whose previous copy is still queued (`Copy.after`) waits outside the queue until that copy has run (or
was cancelled): a slot is never overwritten by an older copy that started late.

Each copy is one operation on the device's copy stream (`realrun.device`): wait until the slot's last
reader is done (`slot_free`) and the previous copy into the slot has ended (`after`), record the start
event, copy, record the end event. On the host device that is a synchronous read timed by perf_counter;
on CUDA an asynchronous host->device copy timed by CUDA events, and the compute stream waits on the end
event before it uses the slot. A disk store on CUDA reads into a pinned staging buffer first, and the
I/O thread waits for the end event before it reuses the buffer. The thread's busy time and the copy spans
are read from those events once they completed (`settle`).

Errors: an exception in the thread is kept and re-raised in the compute thread by the next `wait`,
`submit` or `close`; `close` (also on KeyboardInterrupt, via the context manager) stops and joins it.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Hashable
from dataclasses import dataclass, field

import torch

from realrun.device import Device, Event, PendingTimes
from realrun.store import SlowStore
from sim.policies.transfer_queue import TransferQueue, priority_of


@dataclass(eq=False)
class Copy:
    """One transfer of an expert record into a fast-memory slot, and what happened to it."""

    layer: int
    expert: int
    precision: str
    dst: torch.Tensor
    """The slot's bytes (uint8)."""
    kind: str
    """"demand" or "prefetch" (queue priority)."""
    key: Hashable = None
    """The slot's buffer key for the device (e.g. ("slot", layer, index))."""
    tag: object = None
    """The controller's Transfer this copy carries out (None once the controller dropped it)."""
    slot_free: Event | None = None
    """Recorded on the compute stream after the slot's previous contents were last read."""
    after: Copy | None = None
    """The previous copy into the same slot, not landed when this one was submitted: runs first."""
    submitted_at: float = 0.0
    started_at: float | None = None
    """perf_counter seconds when the I/O thread took the copy from the queue (None while queued)."""
    issued_at: float | None = None
    """perf_counter seconds when the I/O thread had issued it (host device: finished; CUDA: enqueued)."""
    nbytes: int = 0
    """Bytes moved from the slow tier."""
    cancelled: bool = False
    start: Event | None = None
    """Copy stream event before the bytes move."""
    end: Event | None = None
    """Copy stream event after the bytes landed; the compute stream waits on it before reading the slot."""
    _issued: threading.Event = field(default_factory=threading.Event)

    @property
    def done(self) -> bool:
        """True once the I/O thread has issued (or dropped) the copy; the bytes have landed when `end` has
        completed as well (`landed`)."""
        return self._issued.is_set()

    def landed(self) -> bool:
        """The bytes are in the slot (the I/O thread issued the copy and its end event completed)."""
        return self._issued.is_set() and not self.cancelled and self.end is not None and self.end.query()


class Loader:
    """One I/O thread executing `Copy`s from `store` onto `device`'s copy stream (see the module docstring)."""

    def __init__(self, store: SlowStore, device: Device, staging_bytes: int = 0) -> None:
        self.store = store
        self.device = device
        # A store that reads into host memory only (disk) feeding separate fast memory: one pinned,
        # 4 KiB-aligned staging buffer (O_DIRECT wants aligned addresses).
        self._staging = None
        if staging_bytes:
            raw = device.host_buffer(staging_bytes + 4096)
            skip = -raw.data_ptr() % 4096
            self._staging = raw[skip : skip + staging_bytes]
        self.queue: TransferQueue[Copy] = TransferQueue()
        """Copies submitted and not started (the shared start-order rule)."""
        self._parked: dict[Copy, list[Copy]] = {}
        """Queued copy -> copies into the same slot submitted after it, held back until it has run."""
        self._cv = threading.Condition()
        self._stop = False
        self._error: BaseException | None = None
        self._timing = PendingTimes(device)
        self.busy_s = 0.0
        """Seconds the copy stream spent on copies (event times; settled copies only)."""
        self.spans: list[tuple[float, float, Copy]] = []
        """(start_at, end_at, copy) of every settled copy, perf_counter seconds, for the timeline and io.*."""
        self.fail_hook = None
        """Tests: a callable(copy) run before each copy; raising there simulates a failed read."""
        self._thread = threading.Thread(target=self._run, name="realrun-io", daemon=True)
        self._thread.start()

    # --- compute-thread side ---------------------------------------------------------------------
    def submit(self, copy: Copy) -> Copy:
        """Queue `copy` (or hold it back behind `copy.after`, see the module docstring); returns it."""
        self._raise_if_failed()
        copy.submitted_at = time.perf_counter()
        with self._cv:
            after = copy.after
            if after is not None and (after in self.queue or self._is_parked(after)):
                self._parked.setdefault(after, []).append(copy)
            else:
                self.queue.submit(copy, priority_of(copy.kind))
                self._cv.notify()
        return copy

    def promote(self, copy: Copy) -> None:
        """A queued prefetch is now needed: on-demand priority from now on (no-op once started)."""
        with self._cv:
            if copy in self.queue or self._is_parked(copy):
                self.queue.promote(copy)  # a held-back copy gets it when it is queued

    def cancel(self, copy: Copy) -> bool:
        """Drop a copy that has not started; False if it already started (its bytes will land)."""
        with self._cv:
            if self.queue.cancel(copy):
                self._release(copy)
            elif self._is_parked(copy):
                for held in self._parked.values():
                    if copy in held:
                        held.remove(copy)
                self._release(copy)
            else:
                return False
            copy.cancelled = True
            copy._issued.set()
            return True

    def wait(self, copy: Copy) -> None:
        """Block the compute thread until the I/O thread has issued `copy` (host device: finished it).
        The caller then orders its stream after `copy.end`. Re-raises an I/O thread error."""
        while not copy._issued.wait(0.05):
            self._raise_if_failed()
        self._raise_if_failed()

    def settle(self, block: bool = False) -> None:
        """Read the times of the copies whose end events completed (all issued ones with `block`)."""
        with self._cv:
            self._timing.settle(block)

    def close(self) -> None:
        """Stop the thread after its current copy and join it, wait for issued copies to land, settle their
        times; re-raise a pending thread error."""
        with self._cv:
            self._stop = True
            for copy in [*self.queue, *(c for held in self._parked.values() for c in held)]:
                copy.cancelled = True
                copy._issued.set()
            self.queue = TransferQueue()
            self._parked.clear()
            self._cv.notify_all()
        self._thread.join()
        self.device.synchronize()
        if self._error is None:
            self.settle(block=True)
        self._raise_if_failed()

    @property
    def alive(self) -> bool:
        """True while the I/O thread runs."""
        return self._thread.is_alive()

    def __enter__(self) -> Loader:
        return self

    def __exit__(self, *exc: object) -> None:
        if exc[0] is None:
            self.close()
            return
        try:  # already unwinding (an error or Ctrl-C): stop the thread, keep the original exception
            self.close()
        except Exception:
            pass

    def _raise_if_failed(self) -> None:
        if self._error is not None:
            raise RuntimeError(f"expert I/O thread failed: {self._error!r}") from self._error

    def _is_parked(self, copy: Copy) -> bool:
        return any(copy in held for held in self._parked.values())

    def _release(self, copy: Copy) -> None:
        """`copy` has run or was dropped: queue the copies held back behind it (lock held)."""
        for held in self._parked.pop(copy, []):
            self.queue.submit(held, priority_of(held.kind))
        self._cv.notify()

    # --- I/O-thread side -------------------------------------------------------------------------
    def _run(self) -> None:
        while True:
            with self._cv:
                while not (self._stop or self.queue):
                    self._cv.wait()
                if self._stop:
                    return
                _, copy = self.queue.next_start(0.0)  # realrun's copies are ready when submitted
                self.queue.take(copy)
                copy.started_at = time.perf_counter()
            try:
                if self.fail_hook is not None:
                    self.fail_hook(copy)
                self._execute(copy)
            except BaseException as error:  # noqa: B036 - handed to the compute thread, which re-raises it
                with self._cv:
                    self._error = error
                    self._stop = True
                    for pending in [*self.queue, *(c for held in self._parked.values() for c in held)]:
                        pending._issued.set()
                    self.queue = TransferQueue()
                    self._parked.clear()
                copy._issued.set()
                return
            copy.issued_at = time.perf_counter()
            with self._cv:
                self._timing.add(copy.start, copy.end, lambda start, end, c=copy: self._settled(c, start, end))
                self._release(copy)
            copy._issued.set()

    def _settled(self, copy: Copy, start_at: float, end_at: float) -> None:
        self.busy_s += end_at - start_at
        self.spans.append((start_at, end_at, copy))

    def _execute(self, copy: Copy) -> None:
        dev, stream = self.device, self.device.copy
        if copy.slot_free is not None:  # never overwrite a slot the compute stream still reads
            dev.wait(stream, copy.slot_free)
        if copy.after is not None and copy.after.end is not None:  # nor land before the previous copy into it
            dev.wait(stream, copy.after.end)
        store = self.store
        copy.start = dev.record(stream)
        if self._staging is not None:
            staging = self._staging

            def op() -> int:
                n = store.read_into(copy.layer, copy.expert, copy.precision, staging)
                copy.dst[:n].copy_(staging[:n], non_blocking=True)
                return n
        else:
            def op() -> int:
                return store.read_into(copy.layer, copy.expert, copy.precision, copy.dst)
        copy.nbytes = dev.issue(stream, op, writes={copy.key: copy.dst})
        copy.end = dev.record(stream)
        if self._staging is not None:
            copy.end.synchronize()  # the staging buffer is reused by the next copy
