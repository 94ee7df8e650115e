"""The exceptions and the failure record gearshift hands back to callers.

Every failure names its culprit: the item (by input position and a short repr),
the worker's exit code or signal, or the object that could not be pickled.
"""

from __future__ import annotations

import signal
from dataclasses import dataclass
from typing import Any

__all__ = [
    "Failure",
    "GearshiftError",
    "InitializerError",
    "RemoteTraceback",
    "TaskCancelled",
    "TaskTimeout",
    "UnpicklableError",
    "WorkerCrashed",
    "short_repr",
]


def short_repr(obj: object, limit: int = 120) -> str:
    """A repr that never floods an error message (and never raises)."""
    try:
        text = repr(obj)
    except Exception as exc:  # a broken __repr__ must not hide the real error
        text = f"<{type(obj).__name__} object (repr failed: {exc!r})>"
    return text if len(text) <= limit else text[: limit - 3] + "..."


class GearshiftError(Exception):
    """Base class of the errors gearshift itself raises."""


class TaskTimeout(GearshiftError, TimeoutError):
    """An item ran longer than its ``timeout``; in the process gear its worker was killed."""

    def __init__(self, timeout: float, item: Any = None, index: int | None = None) -> None:
        self.timeout = timeout
        self.item = item
        self.index = index
        where = "" if index is None else f" #{index}"
        super().__init__(f"item{where} {short_repr(item)} timed out after {timeout:g}s")


class WorkerCrashed(GearshiftError):
    """The worker process running an item died (segfault, ``os._exit``, SIGKILL, OOM)."""

    def __init__(self, exitcode: int | None, item: Any = None, index: int | None = None) -> None:
        self.exitcode = exitcode
        self.item = item
        self.index = index
        super().__init__(
            f"worker process died ({describe_exit(exitcode)}) while running item"
            f"{'' if index is None else f' #{index}'} {short_repr(item)}"
        )


class TaskCancelled(GearshiftError):
    """A coroutine ended in ``asyncio.CancelledError`` that the run did not ask for.

    (It awaited a future someone else cancelled, say.) Wrapped so that asyncio never
    mistakes it for the cancellation of the caller's own task; the original is ``__cause__``.
    """

    def __init__(self, item: Any = None, index: int | None = None) -> None:
        self.item = item
        self.index = index
        where = "" if index is None else f" #{index}"
        super().__init__(f"item{where} {short_repr(item)} ended in asyncio.CancelledError")

    def __reduce__(self) -> tuple[Any, ...]:
        return (type(self), (self.item, self.index))


class InitializerError(GearshiftError):
    """A worker's ``initializer`` raised: no worker could be made ready, so the run stops."""


class UnpicklableError(GearshiftError, TypeError):
    """A function, item or result could not be sent to or from a worker process."""


class RemoteTraceback(Exception):
    """Carries the formatted traceback of an exception raised in another process.

    Set as ``__cause__`` of the re-raised exception, so the caller's traceback shows
    where the error really happened (the same device concurrent.futures uses).
    """

    def __init__(self, tb: str) -> None:
        self.tb = tb

    def __str__(self) -> str:
        return f'\n"""\n{self.tb}"""'


def describe_exit(exitcode: int | None) -> str:
    """Human words for a process exit code: negative codes are signals."""
    if exitcode is None:
        return "exit code unknown"
    if exitcode < 0:
        try:
            name = signal.Signals(-exitcode).name
        except ValueError:
            name = f"signal {-exitcode}"
        return f"killed by {name}"
    return f"exit code {exitcode}"


@dataclass(frozen=True, slots=True)
class Failure:
    """An item that failed, kept in place of its result under ``errors="collect"``.

    ``traceback`` is the formatted traceback from the worker that ran it.
    """

    item: Any
    exception: BaseException
    traceback: str = ""
    index: int | None = None
    attempts: int = 1

    def __str__(self) -> str:
        return f"Failure(item #{self.index} {short_repr(self.item)}: {self.exception!r})"
