"""What runs *inside* a sub-interpreter of the interpreter gear: a batch of calls, one hand-off.

Imported by each sub-interpreter (by reference, when the gear sends these functions), so it
stays small and imports nothing of the engine. Results come back as one pickled list, so one
unpicklable value fails only its own item.
"""

from __future__ import annotations

import asyncio
import pickle
import time
import traceback
from collections.abc import Callable
from typing import Any

from gearshift._portable import portable_exception


def set_path(path: list[str]) -> None:
    """Give the sub-interpreter the caller's ``sys.path``, as spawn gives a child process."""
    import sys

    sys.path[:] = path


def _failure(exc: BaseException) -> tuple[bool, Any, float, str]:
    tb = "".join(traceback.format_exception(exc))
    return (False, portable_exception(exc, tb), 0.0, tb)


def initialize(initializer: Callable[..., Any], initargs: tuple[Any, ...]) -> bytes | None:
    """Run the initializer here; the pickled (exception, traceback) if it raised, else None."""
    try:
        initializer(*initargs)
    except BaseException as exc:
        tb = "".join(traceback.format_exception(exc))
        return pickle.dumps((portable_exception(exc, tb), tb), protocol=5)
    return None


def run_batch(fn: Callable[[Any], Any], items: list[Any]) -> bytes:
    """Run ``fn`` on each item; the pickled list of ``(ok, value, seconds, traceback)``."""
    out: list[tuple[bool, Any, float, str]] = []
    perf = time.perf_counter
    for item in items:
        start = perf()
        try:
            value = fn(item)
            if asyncio.iscoroutine(value):
                value = asyncio.run(value)
        except Exception as exc:
            ok, value, _, tb = _failure(exc)
            out.append((ok, value, perf() - start, tb))
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
            exc.add_note(f"the result of item {pos} of its batch could not be sent back from the sub-interpreter")
            _, error, _, tb = _failure(exc)
            out[pos] = (False, error, entry[2], tb)
    return pickle.dumps(out, protocol=5)
