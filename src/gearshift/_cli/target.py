"""``MODULE:FUNC`` to a callable, and the picklable wrapper ``gearshift run`` maps.

The wrapper keeps each result with its input index (so results can be written as they
complete, in any order), times the call, and passes JSON objects or CSV rows as keyword
arguments. It pickles as its ``MODULE:FUNC`` text, so worker processes import the
function themselves, from the same directory, whatever their start method.
"""

from __future__ import annotations

import importlib
import inspect
import os
import sys
import time
from collections.abc import Callable
from typing import Any


class TargetError(Exception):
    """``MODULE:FUNC`` names nothing callable; the message says what was tried."""


class MalformedInput(ValueError):
    """The input line could not be parsed; the message names the file and line."""


class TaskExit(Exception):
    """The function called ``sys.exit`` (raised SystemExit) for one input.

    In a command that runs a function over many inputs, that ends this input, not the
    run: in every gear it is recorded as this failure, so no input is left without a record.
    """


def _exit_failure(exc: SystemExit) -> TaskExit:
    return TaskExit(f"the function called sys.exit({exc.code!r}) (SystemExit); this input failed, the run goes on")


def _importable(path: str) -> None:
    if path not in sys.path:
        sys.path.insert(0, path)


def resolve(spec: str, cwd: str | None = None) -> Callable[..., Any]:
    """Import ``MODULE:FUNC`` (``FUNC`` may be dotted), with ``cwd`` importable as ``python -m`` does."""
    module_name, sep, attr = spec.partition(":")
    if not sep or not module_name.strip() or not attr.strip():
        raise TargetError(f"expected MODULE:FUNC (for example mypackage.jobs:process), got {spec!r}")
    where = cwd if cwd is not None else os.getcwd()
    _importable(where)
    try:
        module = importlib.import_module(module_name)
    except BaseException as exc:  # SyntaxError, SystemExit in the module...: still a bad target
        if isinstance(exc, KeyboardInterrupt):
            raise
        raise TargetError(
            f"cannot import module {module_name!r} for {spec!r} (searched {where} and sys.path): "
            f"{type(exc).__name__}: {exc}"
        ) from None
    obj: Any = module
    for part in attr.split("."):
        try:
            obj = getattr(obj, part)
        except AttributeError:
            origin = getattr(module, "__file__", None) or module_name
            raise TargetError(f"module {module_name!r} ({origin}) has no attribute {attr!r}") from None
    if not callable(obj):
        raise TargetError(f"{spec!r} is a {type(obj).__name__}, not something callable")
    return obj  # type: ignore[no-any-return]


def make_call(spec: str, kwargs: bool, cwd: str | None = None) -> Call:
    """The wrapper for ``spec``: async when the function is, so the async gear awaits it."""
    fn = resolve(spec, cwd)
    from gearshift._gears.aio import is_async_callable

    cls = AsyncCall if is_async_callable(fn) else Call
    return cls(fn, spec, cwd if cwd is not None else os.getcwd(), kwargs)


def _load(cls: type[Call], spec: str, cwd: str, kwargs: bool) -> Call:
    return cls(resolve(spec, cwd), spec, cwd, kwargs)


def _note_elapsed(exc: BaseException, start: float) -> None:
    try:
        exc.gearshift_elapsed = time.perf_counter() - start  # type: ignore[attr-defined]
    except (AttributeError, TypeError):
        pass


class Call:
    """``fn(value)`` or ``fn(**value)`` for an ``Item``; returns ``(index, result, elapsed)``."""

    def __init__(self, fn: Callable[..., Any], spec: str, cwd: str, kwargs: bool) -> None:
        self.fn = fn
        self.spec = spec
        self.cwd = cwd
        self.kwargs = kwargs
        self.__qualname__ = spec  # what progress bars and error notes call it

    def __reduce__(self) -> tuple[Any, ...]:
        return (_load, (type(self), self.spec, self.cwd, self.kwargs))

    def _start(self, item: Any) -> Any:
        if item.error is not None:
            raise MalformedInput(item.error)
        return self.fn(**item.value) if self.kwargs else self.fn(item.value)

    def _key(self, item: Any) -> tuple[int, float]:
        """The input's index, and the seconds earlier stages spent on it (none here)."""
        return item.index, 0.0

    def __call__(self, item: Any) -> tuple[int, Any, float]:
        start = time.perf_counter()
        try:
            result = self._start(item)
        except SystemExit as exc:
            failure = _exit_failure(exc)
            _note_elapsed(failure, start)
            raise failure from exc
        except BaseException as exc:
            _note_elapsed(exc, start)
            raise
        index, before = self._key(item)
        return index, result, before + time.perf_counter() - start


class AsyncCall(Call):
    """The wrapper for an ``async def`` function."""

    async def __call__(self, item: Any) -> tuple[int, Any, float]:  # type: ignore[override]
        start = time.perf_counter()
        try:
            result = self._start(item)
            if inspect.isawaitable(result):
                result = await result
        except SystemExit as exc:
            failure = _exit_failure(exc)
            _note_elapsed(failure, start)
            raise failure from exc
        except BaseException as exc:
            _note_elapsed(exc, start)
            raise
        index, before = self._key(item)
        return index, result, before + time.perf_counter() - start


def make_then(spec: str, cwd: str | None = None) -> Call:
    """The wrapper for a ``--then`` stage: async when the function is."""
    fn = resolve(spec, cwd)
    from gearshift._gears.aio import is_async_callable

    cls = AsyncThenCall if is_async_callable(fn) else ThenCall
    return cls(fn, spec, cwd if cwd is not None else os.getcwd(), False)


class _Then:
    """A later stage: ``fn(result)`` for the previous stage's ``(index, result, elapsed)``, same shape out."""

    fn: Any

    def _start(self, previous: tuple[int, Any, float]) -> Any:
        return self.fn(previous[1])

    def _key(self, previous: tuple[int, Any, float]) -> tuple[int, float]:
        return previous[0], previous[2]


class ThenCall(_Then, Call):
    """A later stage whose function is plain."""


class AsyncThenCall(_Then, AsyncCall):
    """A later stage whose function is ``async def``."""
