"""What a worker process sends back must arrive: exceptions and results that survive pickling.

``pickle`` dumps an exception as ``(cls, self.args, self.__dict__)``, so it can dump one it
cannot load (an ``__init__`` whose signature differs from ``args``), and it cannot dump one
holding a lock or whose class it cannot import. In a worker either would sink the whole
batch's reply. So the worker checks, before sending, that each failure and each result
survives a round trip, and sends a stand-in that does when it does not:

- an exception goes back as itself, its original type, whenever that can be rebuilt in the
  caller (by pickle, by rebuilding it without ``__init__``, or by value with cloudpickle),
  else as a ``gs.RemoteError`` with its type name, message, notes and traceback;
- a result that cannot be pickled fails its own item with the pickling error, whose notes
  name the result.

``unpicklable_item`` is the caller's side: an item that cannot be sent fails with the
pickling error's own type, noted with the item and the remedy.
"""

from __future__ import annotations

import pickle
from collections.abc import Callable
from typing import Any

from gearshift import _pickling
from gearshift.errors import RemoteError, qualified_name, rebuild_exception, short_repr

__all__ = ["portable_exception", "portable_value", "unpicklable_item"]

#: Arguments of these types pickle by value, always: a builtin exception made of them round-trips.
_ATOMIC = frozenset({str, int, float, bool, type(None), bytes, complex})

_REMEDY = "gear='thread' runs it without pickling"


#: The wire tries plain pickle, then cloudpickle (lambdas, classes defined in a function or in
#: an interactive ``__main__``, which it sends by value): a round trip here tries the same, shielded
#: as the wire is (``_pickling``).
_DUMPERS: tuple[Callable[[Any, int], bytes], ...] = (_pickling.dumps, _pickling.cloud_dumps)


def portable_exception(exc: BaseException, tb: str) -> BaseException:
    """``exc`` itself when it survives pickling as its own type and message, else a ``RemoteError``.

    ``tb`` is the traceback formatted in the worker (``__cause__``/``__context__`` chains
    included: pickle drops the chain objects, the text keeps them). Notes (PEP 678) are kept
    either way. An exception that pickle would rebuild by calling an incompatible
    ``__init__`` is given a reduction that rebuilds it without calling it (see
    ``errors.rebuild_exception``); this sets ``__reduce_ex__`` on the instance.
    ``SystemExit``, ``KeyboardInterrupt`` and other ``BaseException`` s are treated alike.
    Call it last: attributes or notes added to ``exc`` afterwards may not travel.
    """
    if _plain_builtin(exc):
        return exc
    if isinstance(exc, BaseExceptionGroup):
        # Each member gets its own chance: one odd member must not turn the group into a RemoteError.
        members = [portable_exception(member, "") for member in exc.exceptions]
        if any(m is not e for m, e in zip(members, exc.exceptions, strict=True)):
            group = exc.derive(members)
            if hasattr(exc, "__notes__"):
                group.__notes__ = list(exc.__notes__)
            exc = group
    reason = ""
    for dumps in _DUMPERS:
        reason = _round_trip_error(exc, dumps)
        if not reason:
            return exc
        _rebuild_without_init(exc)
        if not _round_trip_error(exc, dumps):
            return exc
        del exc.__reduce_ex__
    return _remote_error(exc, tb, reason)


def portable_value(value: Any) -> tuple[bool, Any]:
    """``(True, value)`` when ``value`` survives pickling; else ``(False, error)``.

    ``error`` fails the value's item: the pickling error itself (its own type and message),
    with a note naming the result's type, made portable in turn. An exception returned as a
    value (not raised) is given the same chance as a raised one. A round trip costs a dump and
    a load: call this for values that already failed to pickle with the rest of a batch.
    """
    failure: Exception | None = None
    for dumps in _DUMPERS:
        try:
            pickle.loads(dumps(value, 5))
        except Exception as exc:
            failure = failure or exc
        else:
            return True, value
    assert failure is not None
    if isinstance(value, BaseException) and portable_exception(value, "") is value:
        return True, value
    _add_note(failure, f"the result, {_a(value)}, could not be pickled to be sent back from the worker process")
    _add_note(failure, f"remedy: return plain data (picklable), or use {_REMEDY}")
    return False, portable_exception(failure, "")


def unpicklable_item(exc: Exception, item: Any, index: int | None) -> Exception:
    """The failure of an item that could not be pickled: ``exc``, the pickling error itself.

    Its type and message stay pickle's own (``TypeError: cannot pickle '_thread.lock' object``,
    ``pickle.PicklingError``, ``AttributeError: Can't pickle local object ...``), so code that
    catches them keeps working; notes name the item and the remedy.
    """
    where = "an item" if index is None else f"item #{index}"
    _add_note(exc, f"{where} {short_repr(item)} could not be pickled to be sent to a worker process")
    _add_note(exc, f"remedy: {_REMEDY}; or make the item picklable (no locks, open files, sockets or generators)")
    return exc


# -- helpers --------------------------------------------------------------------------------


def _plain_builtin(exc: BaseException) -> bool:
    """True for the common case that needs no trial: a builtin exception made of plain values."""
    kind = type(exc)
    if kind.__module__ != "builtins" or isinstance(exc, OSError):  # OSError pickles filename too
        return False
    if not all(type(arg) in _ATOMIC for arg in exc.args):
        return False
    state = exc.__dict__
    if not state:
        return True
    notes = state.get("__notes__")
    return len(state) == 1 and type(notes) is list and all(type(note) is str for note in notes)


def _round_trip_error(exc: BaseException, dumps: Callable[[Any, int], bytes]) -> str:
    """Why ``exc`` does not come back as itself through ``dumps`` and ``pickle.loads`` ('' if it does)."""
    try:
        back = pickle.loads(dumps(exc, 5))
    except Exception as error:
        return f"{qualified_name(type(error))}: {_text(error)}"
    if type(back) is not type(exc):
        return f"it came back as {qualified_name(type(back))}"
    if _text(back) != _text(exc):
        return "its message changed on the way (its __init__ does not take its args back)"
    return ""


class _Rebuild:
    """An instance's ``__reduce_ex__``: rebuild from args and ``__dict__``, skipping ``__init__``.

    A snapshot taken when the exception is made portable, so that nothing refers back to the
    exception (no reference cycle keeping its traceback's frames alive in the worker).
    """

    __slots__ = ("args", "cls", "state")

    def __init__(self, exc: BaseException) -> None:
        self.cls = type(exc)
        self.args = exc.args
        self.state = {k: v for k, v in exc.__dict__.items() if k != "__reduce_ex__"} or None

    def __call__(self, protocol: int) -> tuple[Any, ...]:
        return (rebuild_exception, (self.cls, self.args, self.state))


def _rebuild_without_init(exc: BaseException) -> None:
    # Pickle looks ``__reduce_ex__`` up on the instance, so this reaches only this exception.
    exc.__reduce_ex__ = _Rebuild(exc)  # type: ignore[method-assign,assignment]


def _remote_error(exc: BaseException, tb: str, reason: str) -> RemoteError:
    error = RemoteError(qualified_name(type(exc)), _text(exc), tb, reason)
    notes = getattr(exc, "__notes__", None)
    if isinstance(notes, list):
        error.__notes__ = [note if type(note) is str else _text(note) for note in notes]
    return error


def _add_note(exc: BaseException, note: str) -> None:
    try:
        exc.add_note(note)
    except TypeError:  # __notes__ set to something that is not a list: start a list
        exc.__notes__ = [note]


def _text(obj: object) -> str:
    """``str(obj)`` that never raises (a broken ``__str__`` must not hide the real error)."""
    try:
        return str(obj)
    except Exception as exc:
        return f"<str() failed: {type(exc).__name__}: {exc}>"


def _a(value: object) -> str:
    return f"a {qualified_name(type(value))} object {short_repr(value, 80)}"
