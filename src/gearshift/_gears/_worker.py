"""The loop a worker process runs (kept small: it is what a forkserver preloads).

Protocol over the worker's own pipe, each message pickled by ``_wire`` (big buffers
travel through shared memory beside the pipe):
  parent -> worker  (batch_id, fn_key, fn_bytes | None, items)   or None to stop
  worker -> parent  ("ready",)                 started (initializer done)
                    ("done", batch_id, values, {pos: traceback} | None, seconds)
                                               a failed item's value is its exception
                    ("bye", tasks_done)        leaving after max_tasks_per_worker
                    ("init_error", exc, tb)    the initializer raised
                    ("load_error", exc, tb)    the batch could not be unpickled (an item)
                    ("fn_error", exc, tb)      the function could not be unpickled
Before each item the worker writes its start time, then ``batch_id << 20 | pos``, into
its slots of two shared arrays, so the parent can tell which item a dead or
overdue worker was running without a message per item.
"""

from __future__ import annotations

import os
import signal
import sys
import threading
import time
import traceback
from collections.abc import Callable
from types import CoroutineType
from typing import Any

from gearshift._gears import _wire
from gearshift._portable import portable_exception, portable_value

POS_BITS = 20


def _watch_parent(parent: int, adopted: bool = False) -> None:
    """Leave when the parent is gone, even in the middle of a long task: no orphans.

    ``parent`` is the process that owns the pool; under forkserver it is not our ppid.
    ``adopted``: forked by the process gear's zygote, whose death (someone killed it) must not
    end us: the owner still drives us, and we leave when the owner is gone.
    """
    ppid = os.getppid()
    while True:
        time.sleep(0.5)
        if (not adopted and os.getppid() != ppid) or not _alive(parent):
            _wire.sweep(parent)  # what the dead parent sent or would have read
            os._exit(1)


def _alive(pid: int) -> bool:
    """True unless ``pid`` is gone or a zombie (dead, its exit not yet collected by its parent)."""
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    try:
        with open(f"/proc/{pid}/stat", "rb") as f:  # Linux: a killed parent is a zombie until reaped
            state = f.read().rsplit(b")", 1)[1].split()[0]
    except (OSError, IndexError):
        return True
    return state not in (b"Z", b"X")


def _pack_results(
    bid: int, values: list[Any], failures: dict[int, str] | None, elapsed: float, owner: int
) -> bytes:
    """The batch's reply; a value that cannot be pickled back fails its own item, named."""
    msg = ("done", bid, values, failures, elapsed)
    try:
        return _wire.dumps(msg, owner, values)[0]
    except Exception:
        pass
    failures = dict(failures or {})
    for pos, value in enumerate(values):
        if pos in failures:
            continue  # exceptions were made portable already
        ok, values[pos] = portable_value(value)
        if not ok:
            failures[pos] = "".join(traceback.format_exception(values[pos]))
    return _wire.dumps(("done", bid, values, failures, elapsed), owner, values)[0]


def _limit_blas(threads: int | None) -> None:
    """Cap BLAS/OpenMP threads, so N workers running NumPy do not oversubscribe the cores.

    Environment variables cover libraries loaded later (spawn, forkserver: NumPy is
    imported when the function is unpickled); threadpoolctl covers those already loaded
    (fork). ``None``: leave them alone.
    """
    if threads is None:
        return
    for var in ("OMP_NUM_THREADS", "OPENBLAS_NUM_THREADS", "MKL_NUM_THREADS", "BLIS_NUM_THREADS",
                "VECLIB_MAXIMUM_THREADS", "NUMEXPR_NUM_THREADS"):
        os.environ[var] = str(threads)
    if any(name in sys.modules for name in ("numpy", "scipy", "sklearn", "torch")):
        from threadpoolctl import threadpool_limits

        threadpool_limits(threads)


def main(
    conn: Any,
    tags: Any,
    starts: Any,
    wid: int,
    parent: int,
    init: bytes | None,
    max_tasks: int | None,
    timed: bool = False,
    blas_threads: int | None = None,
    adopted: bool = False,
) -> None:
    signal.signal(signal.SIGINT, signal.SIG_IGN)  # Ctrl-C is the parent's to handle
    # SIGTERM is how the parent stops us: a handler inherited through fork (the engine's, which
    # raises SystemExit, or the program's own) would turn it into a failed item and cost a 1 s grace.
    signal.signal(signal.SIGTERM, signal.SIG_DFL)
    threading.Thread(target=_watch_parent, args=(parent, adopted), daemon=True, name="gearshift-watch").start()
    from gearshift._task import run_coroutine  # after fork, so a forkserver preload stays light

    _limit_blas(blas_threads)
    if init is not None:
        initializer, initargs = _wire.loads(init)
        try:
            initializer(*initargs)
        except BaseException as exc:
            conn.send_bytes(_pack_error("init_error", exc, parent))
            return
    conn.send_bytes(_wire.dumps(("ready",), parent)[0])
    fns: dict[int, Callable[[Any], Any]] = {}
    done = 0
    perf = time.perf_counter
    monotonic = time.monotonic
    while True:
        try:
            data = conn.recv_bytes()
        except (EOFError, OSError):
            return
        try:
            msg = _wire.loads(data)
        except Exception as exc:  # an item that cannot be rebuilt here: the parent splits the batch
            conn.send_bytes(_pack_error("load_error", exc, parent))
            continue
        finally:
            del data
        if msg is None:
            return
        bid, key, fn_bytes, items = msg
        msg = None
        if fn_bytes is not None:
            try:
                fns[key] = _wire.loads(fn_bytes)
            except Exception as exc:  # not importable here: the parent sends it by value
                conn.send_bytes(_pack_error("fn_error", exc, parent))
                continue
        fn = fns[key]
        values: list[Any] = []
        append = values.append
        failures: dict[int, str] | None = None
        tag = bid << POS_BITS
        start = perf()
        for pos, item in enumerate(items):
            if timed:  # the parent reads start times only to enforce a timeout
                starts[wid] = monotonic()
            tags[wid] = tag | pos
            try:
                value = fn(item)
                if type(value) is CoroutineType:
                    value = run_coroutine(value)
                append(value)
            except BaseException as exc:  # SystemExit and friends fail the item, not the worker
                failures = failures or {}
                failures[pos] = tb = "".join(traceback.format_exception(exc))
                append(portable_exception(exc, tb))  # its own class when it can be rebuilt, else RemoteError
        tags[wid] = -1
        n = len(items)
        items = item = value = None  # let the inputs go before the results are packed
        conn.send_bytes(_pack_results(bid, values, failures, perf() - start, parent))
        values = []
        done += n
        if max_tasks is not None and done >= max_tasks:
            conn.send_bytes(_wire.dumps(("bye", done), parent)[0])
            return


def _pack_error(kind: str, exc: BaseException, owner: int) -> bytes:
    """``(kind, exception, traceback)``: an initializer that raised, a message that would not load."""
    tb = "".join(traceback.format_exception(exc))
    return _wire.dumps((kind, portable_exception(exc, tb), tb), owner)[0]


if __name__ == "__main__":  # pragma: no cover
    sys.exit("gearshift._gears._worker is started by the process gear")
