"""What runs on the far side of a gear that hands whole batches elsewhere: a sub-interpreter
(the interpreter gear) or a cluster worker (dask, ray).

Imported there by reference, so it stays small and imports nothing of the engine. A batch
comes back as one pickled list of ``(ok, value, seconds, traceback)``: one value that cannot
be pickled fails only its own item. ``absorb`` turns that list into the engine's results.
"""

from __future__ import annotations

import asyncio
import threading
import time
import traceback
from collections.abc import Callable
from typing import Any

from gearshift import _pickling
from gearshift._portable import portable_exception

#: Marks an item that ran past its timeout (its call could not be stopped).
TIMED_OUT = "gearshift:timed-out"
#: Runs whose initializer already ran in this process (a cluster worker serves many batches).
_initialized: set[str] = set()
_init_lock = threading.Lock()

Entry = tuple[bool, Any, float, str]


#: Stands for an exception that could not be pickled: ``(UNPICKLABLE, type name, message, reason)``.
UNPICKLABLE = "gearshift:unpicklable"


# -- for sub-interpreters: functions without globals, so that a sub-interpreter gets them by their
# code (cross-interpreter data) and never imports gearshift, which would cost ~0.1 s per interpreter.
def set_path(path: list[str]) -> None:
    """Give the sub-interpreter the caller's ``sys.path``, as spawn gives a child process."""
    import sys

    sys.path[:] = path


def interp_run_batch(fn: Callable[[Any], Any], items: list[Any], init: Any = None) -> bytes:
    """``run_batch`` for a sub-interpreter, self-contained; ``init``: (initializer, initargs) to run first."""
    import pickle
    import time
    import traceback

    def failure(exc: BaseException, seconds: float) -> tuple[bool, Any, float, str]:
        tb = "".join(traceback.format_exception(exc))
        try:
            pickle.loads(pickle.dumps(exc, protocol=5))
        except Exception as why:
            kind = type(exc)
            return (False, ("gearshift:unpicklable", f"{kind.__module__}.{kind.__qualname__}", str(exc), repr(why)),
                    seconds, tb)
        return (False, exc, seconds, tb)

    if init is not None:
        try:
            init[0](*init[1])
        except BaseException as exc:
            return pickle.dumps([(False, "gearshift:init", 0.0, pickle.dumps(failure(exc, 0.0)[1::2]))], protocol=5)
    out: list[tuple[bool, Any, float, str]] = []
    perf = time.perf_counter
    for item in items:
        start = perf()
        try:
            value = fn(item)
            if type(value).__name__ == "coroutine":
                import asyncio

                value = asyncio.run(value)
        except Exception as exc:
            out.append(failure(exc, perf() - start))
        else:
            out.append((True, value, perf() - start, ""))
    try:
        return pickle.dumps(out, protocol=5)
    except Exception:
        pass
    for pos, entry in enumerate(out):  # find the value at fault: it fails alone
        try:
            pickle.dumps(entry, protocol=5)
        except Exception as exc:
            exc.add_note(f"the result of item {pos} of its batch could not be pickled to be sent back")
            out[pos] = failure(exc, entry[2])
    return pickle.dumps(out, protocol=5)


def _failure(exc: BaseException) -> tuple[BaseException, str]:
    tb = "".join(traceback.format_exception(exc))
    return portable_exception(exc, tb), tb


def initialize(initializer: Callable[..., Any], initargs: tuple[Any, ...]) -> bytes | None:
    """Run the initializer here; the pickled (exception, traceback) if it raised, else None."""
    try:
        initializer(*initargs)
    except BaseException as exc:
        return _pickling.dumps(_failure(exc), protocol=5)
    return None


def _call(fn: Callable[[Any], Any], item: Any) -> Any:
    value = fn(item)
    if asyncio.iscoroutine(value):
        value = asyncio.run(value)
    return value


def _call_within(fn: Callable[[Any], Any], item: Any, timeout: float) -> Entry:
    """Run one call in a thread of its own and wait for it up to ``timeout``: a call still
    running then cannot be stopped; it is reported as timed out and left to finish there."""
    box: list[Entry] = []

    def run() -> None:
        start = time.perf_counter()
        try:
            box.append((True, _call(fn, item), time.perf_counter() - start, ""))
        except Exception as exc:
            error, tb = _failure(exc)
            box.append((False, error, time.perf_counter() - start, tb))

    thread = threading.Thread(target=run, name="gearshift-timed-call", daemon=True)
    thread.start()
    thread.join(timeout)
    if box:
        return box[0]
    return (False, TIMED_OUT, timeout, "")


def run_batch(
    fn: Callable[[Any], Any], items: list[Any], timeout: float | None = None,
    init: tuple[str, Callable[..., Any], tuple[Any, ...]] | None = None,
) -> bytes:
    """Run ``fn`` on each item; the pickled list of ``(ok, value, seconds, traceback)``.

    ``init``: (run key, initializer, initargs), run once per process and run key before the
    first call; if it raises, the list is ``[(False, "gearshift:init", (exception, tb))]``.
    """
    if init is not None:
        key, initializer, initargs = init
        with _init_lock:
            if key not in _initialized:
                failed = initialize(initializer, initargs)
                if failed is not None:
                    return _pickling.dumps([(False, "gearshift:init", 0.0, failed)], protocol=5)
                _initialized.add(key)
    out: list[Entry] = []
    perf = time.perf_counter
    for item in items:
        if timeout is not None:
            out.append(_call_within(fn, item, timeout))
            continue
        start = perf()
        try:
            value = _call(fn, item)
        except Exception as exc:
            error, tb = _failure(exc)
            out.append((False, error, perf() - start, tb))
        else:
            out.append((True, value, perf() - start, ""))
    try:
        return _pickling.dumps(out, protocol=5)
    except Exception:
        pass
    for pos, entry in enumerate(out):  # find the value at fault: it fails alone
        try:
            _pickling.dumps(entry, protocol=5)
        except Exception as exc:
            exc.add_note(f"the result of item {pos} of its batch could not be pickled to be sent back")
            error, tb = _failure(exc)
            out[pos] = (False, error, entry[2], tb)
    return _pickling.dumps(out, protocol=5)
