"""`Background`: one computation on a thread of its own, for work that releases the GIL (hashlib's hashing,
numpy's array operations) and so overlaps with what the caller does meanwhile."""

from __future__ import annotations

import threading
from collections.abc import Callable
from typing import Generic, TypeVar

T = TypeVar("T")


class Background(Generic[T]):
    """`compute()` started at once on a daemon thread; `result()` waits for it (and raises its error). In a
    process forked while it ran (a worker pool), the thread is gone: `result()` computes it there and then."""

    def __init__(self, compute: Callable[[], T], name: str) -> None:
        self._value: T | None = None
        self._error: BaseException | None = None
        self._done = False
        self._compute = compute
        self._thread = threading.Thread(target=self._run, name=name, daemon=True)
        self._thread.start()

    def _run(self) -> None:
        try:
            self._value = self._compute()
        except BaseException as error:  # handed to the thread that asks for the result
            self._error = error
        self._done = True

    def result(self) -> T:
        self._thread.join()
        if not self._done:  # forked away from its thread
            self._run()
        if self._error is not None:
            raise self._error
        return self._value  # type: ignore[return-value]
