"""The exceptions and the failure record gearshift hands back to callers.

Every failure names its culprit: the item (by input position and a short repr),
the worker's exit code or signal, or the object that could not be pickled.
"""

from __future__ import annotations

import reprlib
import signal
from dataclasses import dataclass
from typing import Any

__all__ = [
    "Failure",
    "GearshiftError",
    "InitializerError",
    "RemoteError",
    "RemoteTraceback",
    "TaskCancelled",
    "TaskTimeout",
    "UnpicklableError",
    "WorkerCrashed",
    "short_repr",
]


class _ShortRepr(reprlib.Repr):
    """``reprlib``'s bounded repr, which also cuts bytes before it reprs them (a 256 MiB item
    must not cost a gigabyte of text to be named in an error message)."""

    def __init__(self, limit: int) -> None:
        super().__init__()
        self.maxstring = self.maxother = self.maxlong = limit
        self.maxlevel = 3

    def repr_bytes(self, obj: bytes, level: int) -> str:
        if len(obj) <= self.maxstring:
            return repr(obj)
        return f"{obj[: self.maxstring]!r}... ({len(obj):,} bytes)"

    def repr_bytearray(self, obj: bytearray, level: int) -> str:
        if len(obj) <= self.maxstring:
            return repr(obj)
        return f"bytearray({bytes(obj[: self.maxstring])!r}... ({len(obj):,} bytes))"

    def repr_memoryview(self, obj: memoryview, level: int) -> str:
        return f"<memoryview of {obj.nbytes:,} bytes, format {obj.format!r}>"


def short_repr(obj: object, limit: int = 120) -> str:
    """A repr that never floods an error message (and never raises)."""
    try:
        text = _ShortRepr(limit).repr(obj)
    except Exception as exc:  # a broken __repr__ must not hide the real error
        text = f"<{type(obj).__name__} object (repr failed: {exc!r})>"
    return text if len(text) <= limit else text[: limit - 3] + "..."


def qualified_name(cls: type) -> str:
    """``module.QualName`` of a class; builtins by their bare name (``ValueError``)."""
    module = getattr(cls, "__module__", None)
    name = str(getattr(cls, "__qualname__", None) or getattr(cls, "__name__", None) or repr(cls))
    return name if module in (None, "builtins") else f"{module}.{name}"


def rebuild_exception(cls: type[BaseException], args: tuple[Any, ...], state: dict[str, Any] | None) -> Any:
    """Unpickle an exception without calling its ``__init__``, whose signature need not match ``args``.

    ``state`` is its ``__dict__``: its attributes and its PEP 678 ``__notes__``. The nearest
    builtin base's ``__init__`` runs with ``args``: it sets the fields pickle does not see
    (``SystemExit.code``, ``StopIteration.value``, ``OSError.errno``...).
    """
    exc = cls.__new__(cls, *args)
    base = next(c for c in cls.__mro__ if c.__module__ == "builtins")
    try:
        base.__init__(exc, *args)  # type: ignore[misc]  # the base's own, on purpose
    except Exception:  # a builtin base that wants other arguments: args alone, then
        pass
    exc.args = args
    if state:
        exc.__dict__.update(state)
    return exc


class GearshiftError(Exception):
    """Base class of the errors gearshift itself raises.

    Every one crosses a process boundary intact, attributes and notes included: pickling
    rebuilds it from its ``args`` and ``__dict__`` rather than calling ``__init__`` again
    (``Exception``'s own ``__reduce__`` would call it with ``args``, which fails as soon as a
    subclass's ``__init__`` takes other arguments).
    """

    def __reduce__(self) -> tuple[Any, ...]:
        return (rebuild_exception, (type(self), self.args, self.__dict__ or None))


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


class InitializerError(GearshiftError):
    """A worker's ``initializer`` raised: no worker could be made ready, so the run stops."""


class UnpicklableError(GearshiftError, TypeError):
    """The function or the initializer could not be sent to worker processes.

    Raised at the call, before any item runs; the pickling error is its ``__cause__``.
    An *item* or a *result* that cannot be pickled fails with the pickling error itself
    (its own type and message), with notes (PEP 678) naming the item and the remedy.
    """


class RemoteError(GearshiftError):
    """Stands in for an exception raised in a worker process that could not come back intact.

    Its class could not be pickled or rebuilt in the caller (defined where the caller cannot
    import it, or holding an attribute that cannot be pickled, such as a lock). It keeps what
    can travel: ``type_name`` (``module.QualName`` of the original class), ``message``
    (``str()`` of the original), ``traceback`` (formatted in the worker), ``reason`` (why it
    could not be sent) and the original's notes.
    """

    def __init__(self, type_name: str, message: str, traceback: str = "", reason: str = "") -> None:
        super().__init__(type_name, message)
        self.type_name = type_name
        self.message = message
        self.traceback = traceback
        self.reason = reason

    def __str__(self) -> str:
        text = f"{self.type_name}: {self.message}" if self.message else self.type_name
        return f"{text} (could not be sent back intact: {self.reason})" if self.reason else text


class RemoteTraceback(Exception):
    """Carries the formatted traceback of an exception raised in another process.

    Set as ``__cause__`` of the re-raised exception, so the caller's traceback shows
    where the error really happened (the same device concurrent.futures uses).
    """

    def __init__(self, tb: str) -> None:
        super().__init__(tb)
        self.tb = tb

    def __str__(self) -> str:
        return f'\n"""\n{self.tb}"""'

    def __reduce__(self) -> tuple[Any, ...]:
        return (rebuild_exception, (type(self), self.args, self.__dict__ or None))


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

    ``traceback`` is the formatted traceback from the worker that ran it; ``stage`` the
    pipeline stage that failed (None outside pipelines), whose input ``item`` and ``index`` are.
    """

    item: Any
    exception: BaseException
    traceback: str = ""
    index: int | None = None
    attempts: int = 1
    stage: str | None = None

    def __str__(self) -> str:
        where = "" if self.stage is None else f" in stage {self.stage!r}"
        return f"Failure(item #{self.index} {short_repr(self.item)}{where}: {self.exception!r})"
