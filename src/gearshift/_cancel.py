"""Cooperative cancellation for code running in threads.

Threads cannot be killed safely, so a long task checks ``gs.cancelled()`` (or waits on
``gs.cancel_token()``) and returns early; the engine sets the token on a timeout, on
``errors="raise"``, on Ctrl-C and on shutdown with ``cancel_futures``.
"""

from __future__ import annotations

import threading
from collections.abc import Iterator
from contextlib import contextmanager

__all__ = ["CancelToken", "cancel_token", "cancelled"]


class CancelToken:
    """A flag a running task can poll or wait on; a child token is also set by its parent."""

    __slots__ = ("_event", "_parent")

    def __init__(self, parent: CancelToken | None = None) -> None:
        self._event = threading.Event()
        self._parent = parent

    def cancel(self) -> None:
        self._event.set()

    @property
    def cancelled(self) -> bool:
        if self._event.is_set():
            return True
        return self._parent is not None and self._parent.cancelled

    def wait(self, timeout: float | None = None) -> bool:
        """Sleep up to ``timeout`` seconds, waking early (True) when cancelled."""
        if self._parent is None:
            return self._event.wait(timeout)
        # Poll the parent in short slices: waiting on two events at once needs a thread.
        import time

        deadline = None if timeout is None else time.monotonic() + timeout
        while not self.cancelled:
            left = 0.05 if deadline is None else min(0.05, deadline - time.monotonic())
            if left <= 0:
                return False
            self._event.wait(left)
        return True


_local = threading.local()


def cancel_token() -> CancelToken | None:
    """The token of the task running on this thread, or None outside a gearshift task."""
    token: CancelToken | None = getattr(_local, "token", None)
    return token


def cancelled() -> bool:
    """True when the gearshift task running on this thread has been cancelled.

    Long-running functions in the thread (and serial) gears should check it and return.
    """
    token = getattr(_local, "token", None)
    return token is not None and token.cancelled


@contextmanager
def bind_token(token: CancelToken | None) -> Iterator[None]:
    if token is None:
        yield
        return
    previous = getattr(_local, "token", None)
    _local.token = token
    try:
        yield
    finally:
        _local.token = previous
