"""The caller's side of ``_remote.run_batch``: its pickled list back into the engine's results.

Shared by the gears that run whole batches elsewhere (interpreter, dask, ray): runs of
successes become one ``Done`` each (tiny items stay cheap), a failure an ``Outcome`` whose
exception carries the remote traceback, an item past its timeout ``TaskTimeout``.
"""

from __future__ import annotations

import pickle
from typing import Any

from gearshift._gears import _remote
from gearshift._gears._base import timeout_outcome
from gearshift._task import Batch, Done, Outcome, Result
from gearshift.errors import RemoteError, RemoteTraceback


class RemoteInitError(Exception):
    """The initializer raised on the far side: ``exc`` (with the remote traceback as its cause)."""

    def __init__(self, exc: BaseException) -> None:
        super().__init__(exc)
        self.exc = exc


def unpack(batch: Batch, payload: bytes, timeout: float | None) -> tuple[list[Result], int]:
    """(results, items that timed out) of ``batch`` from ``payload``; raises ``RemoteInitError``."""
    out: list[tuple[bool, Any, float, Any]] = pickle.loads(payload)
    if len(out) == 1 and not out[0][0] and out[0][1] == "gearshift:init":
        exc, tb = pickle.loads(out[0][3])
        if isinstance(exc, tuple):  # (UNPICKLABLE, type name, message, reason)
            exc = RemoteError(exc[1], exc[2], tb, exc[3])
        exc.__cause__ = RemoteTraceback(tb)
        raise RemoteInitError(exc)
    results: list[Result] = []
    run: list[Any] = []
    first, elapsed, late = 0, 0.0, 0
    for pos, (ok, value, seconds, tb) in enumerate(out):
        if ok:
            if not run:
                first, elapsed = pos, 0.0
            run.append(value)
            elapsed += seconds
            continue
        if run:
            results.append(Done(batch, first, run, elapsed))
            run = []
        if isinstance(value, tuple) and len(value) == 4 and value[0] == _remote.UNPICKLABLE:
            value = RemoteError(value[1], value[2], tb, value[3])
        if isinstance(value, str) and value == _remote.TIMED_OUT:
            late += 1
            results.append(timeout_outcome(batch.task(pos), timeout))
            continue
        if tb and isinstance(value, BaseException):
            value.__cause__ = RemoteTraceback(tb)
        results.append(Outcome(batch.task(pos), False, value, seconds, tb))
    if run:
        results.append(Done(batch, first, run, elapsed))
    return results, late
