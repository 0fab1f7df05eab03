"""The I/O thread: runs slow-tier -> fast-memory copies off the compute thread, demand reads first.

The compute thread `submit`s a `Copy` (a record and the slot it goes to) and later `wait`s for it only if
it needs the expert now: that wait is the only stall of the pipeline. Copies run one at a time in the
order: every queued demand copy before any prefetch, FIFO within each class (the simulator's link does the
same). A prefetch that has not started can be cancelled.

On a CUDA device the thread issues host->device copies on a dedicated copy stream and records a CUDA
event per copy; the compute stream waits on that event (a device-side wait: the host does not block), and
before a slot is overwritten the copy stream waits on the event recorded after the slot's last use.

Errors: an exception in the thread is kept and re-raised in the compute thread by the next `wait`,
`submit` or `close`; `close` (also on KeyboardInterrupt, via the context manager) stops and joins it.
"""

from __future__ import annotations

import collections
import threading
import time
from dataclasses import dataclass, field

import torch

from realrun.store import SlowStore


@dataclass(eq=False)
class Copy:
    """One transfer of an expert record into a fast-memory slot, and what happened to it."""

    layer: int
    expert: int
    precision: str
    dst: torch.Tensor
    """The slot's bytes (uint8)."""
    kind: str
    """"demand" or "prefetch"."""
    tag: object = None
    """The controller's Transfer this copy carries out."""
    slot_free: torch.cuda.Event | None = None
    """CUDA: recorded on the compute stream after the slot's previous contents were last read."""
    submitted_at: float = 0.0
    started_at: float | None = None
    """perf_counter seconds when the thread began the copy (None while queued)."""
    done_at: float | None = None
    nbytes: int = 0
    """Bytes moved from the slow tier."""
    cancelled: bool = False
    ready: torch.cuda.Event | None = None
    """CUDA: recorded on the copy stream after the copy; the compute stream waits on it."""
    _done: threading.Event = field(default_factory=threading.Event)

    @property
    def done(self) -> bool:
        """True once the thread has finished (or dropped) the copy; on CUDA the bytes may still be in flight
        on the copy stream, ordered by `ready`."""
        return self._done.is_set()


class Loader:
    """One I/O thread executing `Copy`s from `store` (see the module docstring for order and errors)."""

    def __init__(self, store: SlowStore, device: torch.device, staging_bytes: int = 0) -> None:
        self.store = store
        self.device = device
        self.copy_stream = torch.cuda.Stream(device) if device.type == "cuda" else None
        """CUDA: the dedicated stream all host->device expert copies run on."""
        # CUDA + disk: O_DIRECT reads land in one pinned, page-aligned staging buffer, then go up.
        self._staging = None
        if self.copy_stream is not None and staging_bytes:
            raw = torch.empty(staging_bytes + 4096, dtype=torch.uint8, pin_memory=True)
            skip = -raw.data_ptr() % 4096  # O_DIRECT wants a 4 KiB-aligned address
            self._staging = raw[skip : skip + staging_bytes]
        self._demand: collections.deque[Copy] = collections.deque()
        self._prefetch: collections.deque[Copy] = collections.deque()
        self._cv = threading.Condition()
        self._stop = False
        self._error: BaseException | None = None
        self._completed: list[Copy] = []
        self.busy_s = 0.0
        """Seconds the thread spent copying."""
        self.spans: list[tuple[float, float, Copy]] = []
        """(started_at, done_at, copy) of every finished copy, for the timeline."""
        self.fail_hook = None
        """Tests: a callable(copy) run before each copy; raising there simulates a failed read."""
        self._thread = threading.Thread(target=self._run, name="realrun-io", daemon=True)
        self._thread.start()

    # --- compute-thread side ---------------------------------------------------------------------
    def submit(self, copy: Copy) -> Copy:
        """Queue `copy` (demand copies go ahead of every prefetch); returns it."""
        self._raise_if_failed()
        copy.submitted_at = time.perf_counter()
        with self._cv:
            (self._demand if copy.kind == "demand" else self._prefetch).append(copy)
            self._cv.notify()
        return copy

    def promote(self, copy: Copy) -> None:
        """A queued prefetch is now needed: move it to the demand queue (no-op once started)."""
        with self._cv:
            if copy in self._prefetch:
                self._prefetch.remove(copy)
                self._demand.append(copy)

    def cancel(self, copy: Copy) -> bool:
        """Drop a copy that has not started; False if it already started (then `wait` for it)."""
        with self._cv:
            for queue in (self._prefetch, self._demand):
                if copy in queue:
                    queue.remove(copy)
                    copy.cancelled = True
                    copy._done.set()
                    return True
        return False

    def wait(self, copy: Copy) -> float:
        """Block until the thread finished `copy`; return the seconds waited. On CUDA the compute stream is
        then ordered after the copy's event (no host sync)."""
        waited = 0.0
        if not copy.done:
            start = time.perf_counter()
            with self._cv:  # a wanted copy goes to the head of its queue
                if copy in self._prefetch:
                    self._prefetch.remove(copy)
                    self._demand.appendleft(copy)
                elif copy in self._demand:
                    self._demand.remove(copy)
                    self._demand.appendleft(copy)
            while not copy._done.wait(0.05):
                self._raise_if_failed()
            waited = time.perf_counter() - start
        self._raise_if_failed()
        if copy.ready is not None:
            torch.cuda.current_stream(self.device).wait_event(copy.ready)
        return waited

    def drain_completed(self) -> list[Copy]:
        """Copies finished since the last call, in completion order (for the controller's callbacks)."""
        with self._cv:
            done, self._completed = self._completed, []
        return done

    def close(self) -> None:
        """Stop the thread after its current copy and join it; re-raise a pending thread error."""
        with self._cv:
            self._stop = True
            for queue in (self._demand, self._prefetch):
                for copy in queue:
                    copy.cancelled = True
                    copy._done.set()
                queue.clear()
            self._cv.notify_all()
        self._thread.join()
        if self.copy_stream is not None:
            self.copy_stream.synchronize()
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

    # --- I/O-thread side -------------------------------------------------------------------------
    def _run(self) -> None:
        while True:
            with self._cv:
                while not (self._stop or self._demand or self._prefetch):
                    self._cv.wait()
                if self._stop:
                    return
                copy = self._demand.popleft() if self._demand else self._prefetch.popleft()
                copy.started_at = time.perf_counter()
            try:
                if self.fail_hook is not None:
                    self.fail_hook(copy)
                copy.nbytes = self._execute(copy)
            except BaseException as error:  # noqa: B036 - handed to the compute thread, which re-raises it
                with self._cv:
                    self._error = error
                    self._stop = True
                    for queue in (self._demand, self._prefetch):
                        for pending in queue:
                            pending._done.set()
                        queue.clear()
                copy._done.set()
                return
            copy.done_at = time.perf_counter()
            with self._cv:
                self.busy_s += copy.done_at - copy.started_at
                self.spans.append((copy.started_at, copy.done_at, copy))
                self._completed.append(copy)
            copy._done.set()

    def _execute(self, copy: Copy) -> int:
        if self.copy_stream is None:
            return self.store.read_into(copy.layer, copy.expert, copy.precision, copy.dst)
        with torch.cuda.stream(self.copy_stream):
            if copy.slot_free is not None:  # device-side: never overwrite a slot the compute still reads
                self.copy_stream.wait_event(copy.slot_free)
            if self._staging is not None:
                nbytes = self.store.read_into(copy.layer, copy.expert, copy.precision, self._staging)
                copy.dst[:nbytes].copy_(self._staging[:nbytes], non_blocking=True)
            else:
                nbytes = self.store.read_into(copy.layer, copy.expert, copy.precision, copy.dst)
            copy.ready = torch.cuda.Event()
            copy.ready.record(self.copy_stream)
            if self._staging is not None:
                # The I/O thread (not the compute thread) waits, so the staging buffer can be reused.
                copy.ready.synchronize()
        return nbytes
