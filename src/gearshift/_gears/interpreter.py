"""The interpreter gear (Python 3.14+): CPU work in sub-interpreters, one process, a GIL each.

Each worker is a thread of the thread gear that owns one sub-interpreter
(``concurrent.interpreters``) and runs a whole batch there per hand-off, so the engine's
chunking keeps the cost of a crossing (~0.1 ms, plus pickling) off tiny items. Everything
else (timeouts, the initializer's error, cancellation, joining) is the thread gear's.

What a sub-interpreter cannot do, said plainly (the README's Faults table):

* the function is sent by reference, as plain pickle sends it (a module-level name): lambdas,
  closures and nested functions cannot be shared (cpython#125865) and are refused before
  anything starts; items and results are pickled;
* a running call cannot be stopped: an item past its timeout fails at its deadline, its
  interpreter runs on until the call returns (the thread gear reports it), and a fresh one
  takes its place;
* a crash (segfault, ``os._exit``) takes the whole process down: no crash isolation;
* extension modules without sub-interpreter support (NumPy today) cannot be imported there.
"""

from __future__ import annotations

import importlib
import pickle
import sys
import threading
from collections.abc import Callable
from typing import Any

from gearshift._calls import fn_name
from gearshift._cancel import CancelToken
from gearshift._gears import _remote
from gearshift._gears._base import GearCosts, cpu_count
from gearshift._gears._unpack import RemoteInitError, unpack
from gearshift._gears.thread import ThreadGear
from gearshift._task import Batch, Outcome, Result, RunSpec, Task
from gearshift.errors import UnpicklableError

#: The first Python with ``concurrent.interpreters``.
NEEDS = (3, 14)


def unavailable() -> str:
    """Why the gear cannot run on this Python, or "" when it can."""
    if sys.version_info < NEEDS:
        return (
            f"the interpreter gear needs Python 3.14 or later (concurrent.interpreters); this is "
            f"Python {sys.version_info.major}.{sys.version_info.minor}: use gear='process' here"
        )
    return ""


def share_error(fn: Callable[..., Any]) -> str:
    """Why ``fn`` cannot be sent into a sub-interpreter, or "" when it can.

    The gear sends functions as plain pickle does, by reference (module and name): what
    cloudpickle would send by value (a lambda, a closure, a nested function) cannot be shared.
    """
    try:
        pickle.dumps(fn, protocol=5)
    except Exception as exc:
        return f"{fn_name(fn)} is not importable by name ({type(exc).__name__}: {exc})"
    return ""


class InterpreterGear(ThreadGear):
    """Worker threads that each run their batches in a sub-interpreter of their own."""

    name = "interpreter"
    chunk_target = 0.02
    pickles = True
    # Measured on 3.14 (2 cores): a crossing ~0.1 ms plus pickling; an interpreter starts in ~6 ms
    # and imports the function's modules again (gearshift itself is not imported there). The advisor
    # predicts it and shows it, but it runs only when asked for (``on_request``): it gives up the
    # crash isolation processes give, which the caller must choose knowingly, and on 3.14 its
    # declared costs beat processes' measured ones (forkserver start-up) in the model, so auto
    # would pick it for CPU work without having measured it against processes in the run.
    costs = GearCosts(
        handoff_per_batch=400e-6, batch_work=0.02, startup=0.005, startup_per_worker=0.01, reimports=True, pickles=True,
        by_reference=True, on_request=True, cpu_parallel="always", max_workers_per_core=1, tie_rank=40, measure=True,
        label="sub-interpreters",
    )

    def __init__(self, workers: int | None = None) -> None:
        why = unavailable()
        if why:
            raise RuntimeError(why)
        super().__init__(workers, thread_name_prefix="gearshift-interpreter")
        self.adaptive = False  # CPU work: one interpreter a core unless told, not a limit found by latency
        self._local = threading.local()

    @classmethod
    def default_workers(cls) -> int:
        return cpu_count()

    @classmethod
    def unavailable(cls) -> str:
        return unavailable()

    def check(self, fn: Callable[..., Any]) -> None:
        why = share_error(fn)
        if why:
            raise UnpicklableError(
                f"the interpreter gear cannot share {why}: a sub-interpreter gets a function by reference, "
                "and lambdas, closures and nested functions cannot be shared (cpython#125865). Define it at "
                "module level, or use gear='process' (which sends it by value with cloudpickle)."
            )

    # -- the thread gear's hooks: each thread runs its calls in its own sub-interpreter ------------
    def _enter_worker(self, spec: RunSpec) -> None:
        # 3.14+ only (checked in __init__): imported here so that this module loads on 3.11.
        interpreters: Any = importlib.import_module("concurrent.interpreters")
        interp = interpreters.create()
        self._local.interp = interp
        interp.call(_remote.set_path, list(sys.path))
        if spec.initializer is not None:
            payload = interp.call(_remote.interp_run_batch, len, [], (spec.initializer, tuple(spec.initargs)))
            try:
                unpack(Batch(len, []), payload, None)
            except RemoteInitError as failed:
                raise failed.exc from failed.exc.__cause__

    def _leave_worker(self) -> None:
        interp = getattr(self._local, "interp", None)
        if interp is not None:
            self._local.interp = None
            interp.close()

    def _payload(self, fn: Callable[[Any], Any], items: list[Any]) -> bytes:
        try:
            payload: bytes = self._local.interp.call(_remote.interp_run_batch, fn, items)
        except Exception as exc:  # an item that cannot be shared in: the batch's items fail with the error
            payload = pickle.dumps([(False, exc, 0.0, "")] * len(items), protocol=5)
        return payload

    def _run_batch(self, batch: Batch, token: CancelToken) -> list[Result]:
        return unpack(batch, self._payload(batch.fn, batch.items), None)[0]

    def _run_task(self, fn: Callable[[Any], Any], task: Task, token: CancelToken) -> Outcome:
        results, _ = unpack(Batch(fn, [task]), self._payload(fn, [task.item]), None)
        outcome = results[0]
        return outcome if isinstance(outcome, Outcome) else outcome.outcomes()[0]

    def describe(self) -> str:
        return f"interpreter gear, {self.workers} sub-interpreter{'s' if self.workers != 1 else ''}"
