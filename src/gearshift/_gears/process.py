"""The process gear: worker processes, each with its own pipe, for CPU work that holds the GIL.

Why not ``ProcessPoolExecutor``: one dead worker breaks its whole pool, and a runaway
task cannot be stopped. Here every worker has its own pipe and two shared slots
(which item it runs, since when), so the parent knows exactly which item a dead or
overdue worker held: that item fails (``WorkerCrashed`` / ``TaskTimeout``), the rest
of its batch is re-run, the worker is replaced and the run goes on.

The function is sent once per worker: by reference when the worker can import it,
by value with cloudpickle otherwise (lambdas, closures, an interactive ``__main__``).
Items and results use pickle protocol 5; big buffers travel through shared memory
(``_wire``). ``collect`` waits on the pipes and process sentinels from the caller's
thread, which keeps receiving signals; each worker has a sender thread that writes its
batches, so the parent can always read results while a big batch goes out (a blocking
write from the caller would deadlock against a worker blocked writing its results).

Fork safety: with the fork start method, the first workers are forked in ``open``,
before any thread of gearshift's runs user code; every later worker (a replacement
after a crash, a timeout or ``max_tasks_per_worker``) is forked by the zygote (``_zygote``),
a single-threaded process forked at that same moment, never by the busy parent, whose
threads may hold locks the child would inherit taken. Its children start as the parent
was at ``open``, modules imported, at the speed of a fork; should it die, a fork server
stands in (each of its workers imports the function's module again).
"""

from __future__ import annotations

import atexit
import itertools
import multiprocessing as mp
import os
import pickle
import queue
import sys
import threading
import time
import weakref
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass, field
from multiprocessing.connection import Connection, wait
from multiprocessing.context import BaseContext
from multiprocessing.process import BaseProcess
from typing import Any

import cloudpickle

from gearshift._gears import _wire, _worker, _zygote
from gearshift._gears._base import Gear, GearCosts, cpu_count, initializer_error, timeout_outcome
from gearshift._portable import unpicklable_item
from gearshift._task import Batch, Done, Outcome, Result, RunSpec, Task
from gearshift.errors import (
    InitializerError,
    RemoteTraceback,
    UnpicklableError,
    WorkerCrashed,
    describe_exit,
    short_repr,
)

#: Seconds a worker gets to leave after SIGTERM before it is SIGKILLed.
TERMINATE_GRACE = 1.0
#: Batches sent ahead to each worker, so it never waits for the parent between batches.
PREFETCH = 2
#: Batches that take longer than this are not sent ahead: the hand-off is cheap next to
#: them, and a batch queued behind a long one would wait while another worker idles.
LONG_BATCH = 0.05
#: Start-up deaths per worker slot, with no worker ready in between, before the pool gives up.
DEATHS_BEFORE_GIVING_UP = 3
_POS_MASK = (1 << _worker.POS_BITS) - 1

_open_gears: weakref.WeakSet[ProcessGear] = weakref.WeakSet()


@atexit.register
def _kill_leftovers() -> None:
    """A gear nobody closed (an abandoned generator) must not keep workers past exit."""
    for gear in list(_open_gears):
        gear.close(cancel=True)
    _wire.sweep(os.getpid())


class _Sender:
    """A thread that writes one worker's batches to its pipe, so the caller never blocks writing.

    Payloads are pickled by the caller; the thread only moves bytes (it runs no user code).
    """

    def __init__(self, conn: Connection, name: str) -> None:
        self.conn = conn
        self.queue: queue.SimpleQueue[bytes | None] = queue.SimpleQueue()
        self.thread = threading.Thread(target=self._run, name=name, daemon=True)

    def start(self) -> None:
        self.thread.start()

    def _run(self) -> None:
        broken = False
        while (payload := self.queue.get()) is not None:
            if broken:
                continue
            try:
                self.conn.send_bytes(payload)
            except (OSError, ValueError):
                broken = True  # the worker is gone: its sentinel fires and its batches are re-run
            payload = None

    def send(self, payload: bytes) -> None:
        self.queue.put(payload)

    def stop(self) -> None:
        """Finish what is queued, then end (the worker's pipe stays open: the caller closes it)."""
        self.queue.put(None)

    def join(self) -> None:
        while self.thread.is_alive():  # (never started: not alive)
            self.thread.join(0.05)  # in slices: the main thread keeps receiving signals


def default_start_method() -> str:
    """``fork`` where it is the platform's old default (fastest start); else the default.

    Python 3.14 moved Linux to forkserver; there we follow it. ``GEARSHIFT_START_METHOD``
    overrides both.
    """
    chosen = os.environ.get("GEARSHIFT_START_METHOD")
    if chosen:
        return chosen
    if sys.version_info < (3, 14) and "fork" in mp.get_all_start_methods():
        return "fork"
    return mp.get_context().get_start_method()


def _blas_threads(workers: int) -> int:
    """BLAS/OpenMP threads per worker: the cores shared out (as loky does), at least one."""
    return max(1, cpu_count() // workers)


@dataclass(eq=False)
class _Proc:
    wid: int  # its slot in the shared arrays; a leaving worker's successor takes another
    process: BaseProcess | _zygote.Child
    conn: Connection
    sender: _Sender
    outstanding: deque[tuple[int, Batch, str | None]] = field(default_factory=deque)
    fn_keys: set[int] = field(default_factory=set)
    fn_by_value: dict[int, bool] = field(default_factory=dict)  # how each function was last sent to it
    killed_for: tuple[int, int] | None = None  # (batch id, pos) of the item that timed out
    leaving: bool = False
    ready: bool = False  # started up (initializer done); a death before that blames no item
    sent: int = 0  # items sent to it (max_tasks_per_worker counts them)
    replaced: bool = False  # its successor started already (it said "bye")


class ProcessGear(Gear):
    name = "process"
    chunk_target = 0.02
    costs = GearCosts(
        handoff_per_batch=300e-6, batch_work=0.02, startup=0.01, startup_per_worker=0.01, reimports=True, pickles=True,
        cpu_parallel="always", max_workers_per_core=4, tie_rank=20, measure=True, label="processes",
    )
    pickles = True

    def __init__(
        self,
        workers: int | None = None,
        *,
        start_method: str | None = None,
        blas_threads: int | str | None = "auto",
        mp_context: BaseContext | None = None,
    ) -> None:
        """``blas_threads``: BLAS/OpenMP threads each worker may use ("auto": cores / workers;
        None: leave the libraries' own defaults). ``mp_context``: a multiprocessing context whose
        start method (and objects) the workers use, instead of ``start_method``."""
        super().__init__(workers)
        if mp_context is not None and start_method is not None:
            raise ValueError("give start_method or mp_context, not both")
        self.mp_context = mp_context
        if blas_threads != "auto" and blas_threads is not None and (
            not isinstance(blas_threads, int) or isinstance(blas_threads, bool) or blas_threads < 1
        ):
            raise ValueError(f"blas_threads must be 'auto', None or a positive int, got {blas_threads!r}")
        self.start_method = start_method
        self.blas_threads = blas_threads
        self._ctx: BaseContext | None = None
        self._respawn_ctx: BaseContext | None = None
        self._zygote: _zygote.Zygote | None = None
        self._procs: dict[int, _Proc] = {}
        self._pending: deque[tuple[int, Batch]] = deque()
        self._ready: list[Result] = []
        self._fns: dict[int, _Fn] = {}
        self._fn_keys = itertools.count()
        #: Told when a worker dies that was not told to leave (a crash, a kill from outside, idle
        #: or busy), with its exit code; the drop-in ProcessPoolExecutor breaks the pool on it.
        self.on_death: Callable[[int | None], None] | None = None
        self._owner = os.getpid()
        self._next_bid = 0
        self._spec = RunSpec()
        self._init_bytes: bytes | None = None
        self._init_error: InitializerError | None = None
        self._wake_r: Connection | None = None
        self._wake_w: Connection | None = None
        self._woken = False
        self._tags: Any = None
        self._starts: Any = None
        self._started = False
        self._unblamed: dict[int, int] = {}
        self._deaths_in_row = 0
        self._batch_time = 0.0  # recent seconds per batch (moving average)

    @classmethod
    def default_workers(cls) -> int:
        return cpu_count()

    # -- checks ---------------------------------------------------------------------------
    def check(self, fn: Callable[..., Any]) -> None:
        self._fn_entry(fn)

    def _fn_entry(self, fn: Callable[..., Any]) -> _Fn:
        entry = self._fns.get(id(fn))
        if entry is None or entry.ref() is not fn:
            try:
                payload, by_value = _fn_bytes(fn)
            except Exception as exc:
                raise UnpicklableError(
                    f"cannot send function {short_repr(fn)} to worker processes: {exc}. "
                    "Everything it uses (globals, closure variables, bound objects) must be picklable; "
                    "use gear='thread' to run it without pickling."
                ) from exc
            entry = _Fn(next(self._fn_keys), _weak_or_strong(fn, self._fns), payload, by_value)
            self._fns[id(fn)] = entry
        return entry

    # -- lifecycle ------------------------------------------------------------------------
    def open(self, spec: RunSpec) -> None:
        self._spec = spec
        self._init_error = None
        self._fns = {}  # nothing stale from an earlier run: functions are pickled afresh
        self._owner = os.getpid()
        if self.mp_context is not None:
            self._ctx = self.mp_context
            method = self._ctx.get_start_method()
        else:
            method = self.start_method or default_start_method()
            self._ctx = mp.get_context(method)
        # Replacements never fork the parent, which may be running user code in threads by then.
        self._respawn_ctx = mp.get_context("forkserver") if method == "fork" else self._ctx
        if self._respawn_ctx.get_start_method() == "forkserver":
            # "__main__": the server imports the main module once, and its workers inherit it
            # (else each new worker would import it again: the whole program's imports, each time).
            self._respawn_ctx.set_forkserver_preload(["__main__", "gearshift._gears._worker"])
        self._init_bytes = None
        if spec.initializer is not None:
            try:
                self._init_bytes = cloudpickle.dumps((spec.initializer, spec.initargs))
            except Exception as exc:
                raise UnpicklableError(
                    f"cannot send initializer {short_repr(spec.initializer)} to worker processes: {exc}"
                ) from exc
        # Twice the workers: a leaving worker and its successor run side by side for a moment.
        self._tags = self._ctx.RawArray("q", [-1] * (2 * self.workers))
        self._starts = self._ctx.RawArray("d", 2 * self.workers)
        self._wake_r, self._wake_w = self._ctx.Pipe(duplex=False)
        self._woken = False
        self._started = False
        self._unblamed = {}
        self._deaths_in_row = 0
        self._batch_time = 0.0
        _open_gears.add(self)
        self._start_all()

    def _start_all(self) -> None:
        """Start every worker at once, in ``open``: before any thread of ours runs user code."""
        self._started = True
        for wid in range(self.workers):
            self._start(wid, first=True)
        self._start_zygote()
        for proc in self._procs.values():  # threads only once every fork is done
            proc.sender.start()

    def _start_zygote(self) -> None:
        """Fork the zygote beside the first workers; if that fails, the fork server stands in."""
        assert self._ctx is not None
        if self._ctx.get_start_method() != "fork":
            return
        drop = [proc.conn for proc in self._procs.values()]  # (the zygote closes its copies)
        drop += [end for end in (self._wake_r, self._wake_w) if end is not None]
        try:
            self._zygote = _zygote.Zygote(self._ctx, drop, self._worker_args())
        except OSError:
            self._zygote = None

    def _worker_args(self) -> dict[str, Any]:
        """What ``_worker.main`` takes besides its connection and slot."""
        return {
            "tags": self._tags,
            "starts": self._starts,
            "parent": os.getpid(),
            "init": self._init_bytes,
            "max_tasks": self._spec.max_tasks_per_worker,
            "timed": self._spec.timeout is not None,
            "blas_threads": _blas_threads(self.workers) if self.blas_threads == "auto" else self.blas_threads,
        }

    def _start(self, wid: int, first: bool = False) -> None:
        """Start a worker in slot ``wid``: forked now (``first``, in ``open`` only), else a replacement."""
        self._tags[wid] = -1
        launched = None if first else self._from_zygote(wid)
        if launched is None:
            launched = self._launch(wid, self._ctx if first else self._respawn_ctx)
        parent_end, process = launched
        self._procs[wid] = _Proc(wid, process, parent_end, _Sender(parent_end, f"gearshift-sender-{wid}"))
        if not first:
            self._procs[wid].sender.start()

    def _launch(self, wid: int, ctx: BaseContext | None) -> tuple[Connection, BaseProcess | _zygote.Child]:
        assert ctx is not None
        parent_end, child_end = ctx.Pipe(duplex=True)
        process = ctx.Process(  # type: ignore[attr-defined]
            target=_worker.main,
            args=(child_end,),
            kwargs={"wid": wid, **self._worker_args()},
            name=f"gearshift-process-{wid}",
        )
        try:
            process.start()
        finally:
            child_end.close()
        return parent_end, process

    def _from_zygote(self, wid: int) -> tuple[Connection, BaseProcess | _zygote.Child] | None:
        """A replacement forked by the zygote; None if there is none (or it failed: it is given up)."""
        zygote = self._zygote
        if zygote is None or not zygote.alive:
            return None
        parent_end, child_end = mp.Pipe(duplex=True)
        life_r, life_w = os.pipe()  # the child holds the write end: EOF is its death
        pid: int | None = None
        try:
            pid = zygote.spawn(wid, child_end.fileno(), life_w)
        finally:
            child_end.close()
            os.close(life_w)
            if pid is None:  # (Ctrl-C included)
                parent_end.close()
                os.close(life_r)
        if pid is None:
            return None
        return parent_end, _zygote.Child(zygote, pid, life_r)

    def submit(self, batch: Batch) -> None:
        if self._init_error is not None:
            raise self._init_error
        self._pending.append((self._new_bid(), batch))
        self._dispatch()

    def _dispatch(self) -> None:
        """Give every idle worker a batch before any busy one gets a prefetched second.

        Filling one worker's prefetch first would queue a batch behind a long task while
        another worker sits idle.
        """
        prefetch = PREFETCH if self._batch_time < LONG_BATCH else 1
        cap = self._spec.max_tasks_per_worker
        for depth in range(1, prefetch + 1):
            for proc in self._procs.values():
                if not self._pending:
                    return
                if len(proc.outstanding) < depth and not proc.leaving:
                    bid, batch = self._pending.popleft()
                    if cap is not None:
                        # A worker runs at most ``cap`` items: it gets no more than it has left.
                        room = cap - proc.sent
                        if room <= 0:
                            self._pending.appendleft((bid, batch))
                            continue
                        if len(batch) > room:
                            tasks = batch.tasks
                            self._pending.appendleft((self._new_bid(), Batch(batch.fn, tasks[room:])))
                            batch = Batch(batch.fn, tasks[:room])
                    self._send(proc, bid, batch)

    def _send(self, proc: _Proc, bid: int, batch: Batch) -> None:
        entry = self._fn_entry(batch.fn)
        key, fn_bytes = entry.key, entry.payload
        msg = (bid, key, None if key in proc.fn_keys else fn_bytes, batch.items)
        try:
            payload, path = _wire.dumps(msg, self._owner, batch.items, reusable=True)
        except Exception:
            batch = self._drop_unpicklable(batch)
            if not batch.items:
                return
            msg = (bid, key, None if key in proc.fn_keys else fn_bytes, batch.items)
            payload, path = _wire.dumps(msg, self._owner, batch.items, reusable=True)
        proc.sender.send(payload)
        if key not in proc.fn_keys:
            proc.fn_keys.add(key)
            proc.fn_by_value[key] = entry.by_value
        proc.outstanding.append((bid, batch, path))
        proc.sent += len(batch)

    def _drop_unpicklable(self, batch: Batch) -> Batch:
        """Fail the items that cannot be pickled, each with pickle's own error naming it; keep the others."""
        keep: list[Task] = []
        for task in batch.tasks:
            try:
                _wire.unlink(_wire.dumps(task.item, self._owner)[1])
            except Exception as exc:
                self._ready.append(Outcome(task, False, unpicklable_item(exc, task.item, task.index)))
            else:
                keep.append(task)
        return Batch(batch.fn, keep)

    # -- results, deaths and deadlines ------------------------------------------------------
    def collect(self, timeout: float | None) -> list[Result]:
        if self._init_error is not None:
            raise self._init_error
        if self._ready:
            timeout = 0
        nearest = self._check_deadlines()
        if nearest is not None:
            timeout = nearest if timeout is None else min(timeout, nearest)
        assert self._wake_r is not None
        watch: list[Any] = [self._wake_r]
        for proc in self._procs.values():
            watch.append(proc.conn)
            watch.append(proc.process.sentinel)
        ready = set(wait(watch, timeout))
        if self._wake_r in ready:
            self._woken = False
            while self._wake_r.poll():
                self._wake_r.recv_bytes()
        for proc in list(self._procs.values()):
            if proc.conn in ready:
                self._drain(proc)
            if proc.process.sentinel in ready:
                self._buried(proc)
        if self._init_error is not None:
            raise self._init_error
        self._dispatch()
        outcomes, self._ready = self._ready, []
        return outcomes

    def _drain(self, proc: _Proc) -> None:
        try:
            while proc.conn.poll():
                data = proc.conn.recv_bytes()
                try:
                    msg = _wire.loads(data)
                except Exception as exc:  # a result that pickled in the worker but cannot load here
                    self._unloadable(proc, exc)
                    continue
                self._handle(proc, msg)
        except (EOFError, OSError):
            pass

    def _unloadable(self, proc: _Proc, exc: Exception) -> None:
        """A batch's reply could not be unpickled: each of its items fails with that error."""
        if not proc.outstanding:
            raise exc
        _, batch, path = proc.outstanding.popleft()
        _wire.unlink(path)
        exc.add_note("gearshift: a result of this batch was pickled by the worker but could not be unpickled here")
        for pos in range(len(batch)):
            self._ready.append(Outcome(batch.task(pos), False, exc))

    def _handle(self, proc: _Proc, msg: tuple[Any, ...]) -> None:
        kind = msg[0]
        if kind == "ready":
            proc.ready = True
            self._deaths_in_row = 0
        elif kind == "done":
            _, bid, values, failures, elapsed = msg
            self._batch_time = elapsed if not self._batch_time else 0.7 * self._batch_time + 0.3 * elapsed
            head_bid, batch, path = proc.outstanding.popleft()
            assert head_bid == bid, (head_bid, bid)
            _wire.release(path)  # the worker has read it: the file may carry another batch
            if not failures:
                self._ready.append(Done(batch, 0, values, elapsed))
                return
            share = elapsed / len(values)
            for pos, value in enumerate(values):
                tb = failures.get(pos)
                if tb is None:
                    self._ready.append(Done(batch, pos, [value], share))
                    continue
                if tb and isinstance(value, BaseException):
                    value.__cause__ = RemoteTraceback(tb)
                self._ready.append(Outcome(batch.task(pos), False, value, share, tb))
        elif kind == "bye":
            # Leaving after max_tasks_per_worker: start its successor now, in a free slot,
            # rather than after its exit (the fork server's start overlaps its way out).
            proc.leaving = True
            free = set(range(len(self._tags))) - set(self._procs)
            # (No free slot: earlier leavers are not buried yet. It is replaced at its exit.)
            if self._init_error is None and self._ctx is not None and free:
                proc.replaced = True
                self._start(min(free))
        elif kind in ("load_error", "fn_error"):
            self._unloaded(proc, kind, msg[1], msg[2])
        elif kind == "init_error":
            _, exc, tb = msg
            exc.__cause__ = RemoteTraceback(tb)
            self._init_error = initializer_error(self._spec.initializer, exc)

    def _unloaded(self, proc: _Proc, kind: str, exc: BaseException, tb: str) -> None:
        """The worker could not unpickle its head batch (an item) or the function.

        A function sent by reference that the worker cannot import (defined under
        ``if __name__ == "__main__":``, which a fork server's worker never runs) is sent
        again by value. A batch whose items cannot be rebuilt is split, so that only the
        item at fault fails, with the worker's own error.
        """
        _, batch, path = proc.outstanding.popleft()
        _wire.unlink(path)
        proc.sent -= len(batch)  # it ran none of them (max_tasks_per_worker counts what it ran)
        entry = self._fn_entry(batch.fn)
        proc.fn_keys.discard(entry.key)  # whatever the message held was lost with it
        if tb:
            exc.__cause__ = RemoteTraceback(tb)
        if kind == "fn_error" and not proc.fn_by_value.get(entry.key, True):
            if not entry.by_value:
                entry.payload, entry.by_value = cloudpickle.dumps(batch.fn, protocol=5), True
            self._pending.appendleft((self._new_bid(), batch))
        elif kind == "load_error" and len(batch) > 1:
            singles = [(self._new_bid(), Batch(batch.fn, [task])) for task in batch.tasks]
            self._pending.extendleft(reversed(singles))
        else:
            what = "the function" if kind == "fn_error" else f"item #{batch.task(0).index}"
            exc.add_note(f"gearshift: {what} could not be unpickled in the worker process")
            for pos in range(len(batch)):
                self._ready.append(Outcome(batch.task(pos), False, exc, 0.0, tb))

    def _new_bid(self) -> int:
        self._next_bid += 1
        return self._next_bid - 1

    def _buried(self, proc: _Proc) -> None:
        """A worker exited: blame the item it held (if it crashed), re-run the rest, replace it."""
        self._drain(proc)
        proc.process.join(0.5)
        exitcode = proc.process.exitcode
        proc.sender.stop()
        proc.sender.join()  # before the pipe closes: its fd number must not be reused under the sender
        proc.conn.close()
        del self._procs[proc.wid]  # (keyed by slot)
        for _, _, path in proc.outstanding:
            _wire.unlink(path)
        if proc.process.pid is not None:
            _wire.sweep(self._owner, proc.process.pid)  # results it wrote but never sent
        requeue: list[tuple[int, Batch]] = []
        if self.on_death is not None and not proc.leaving and proc.killed_for is None:
            self.on_death(exitcode)
        if not proc.ready:
            # It died starting up (in the initializer, say): no item is to blame.
            self._deaths_in_row += 1
            if self._deaths_in_row >= DEATHS_BEFORE_GIVING_UP * self.workers and self._init_error is None:
                what = "its initializer" if self._spec.initializer is not None else "start-up"
                self._init_error = InitializerError(
                    f"worker processes keep dying in {what} ({describe_exit(exitcode)}), before running any item"
                )
        outstanding = deque((bid, batch) for bid, batch, _ in proc.outstanding)
        if outstanding and proc.ready:
            bid, batch = outstanding.popleft()
            pos: int | None = None
            if proc.killed_for is not None and proc.killed_for[0] == bid:
                pos = proc.killed_for[1]
            elif not proc.leaving and proc.killed_for is None:
                # (Killed for a timeout, but that item's batch came back first: this batch is a
                # bystander, re-run whole, not blamed.)
                tag = self._tags[proc.wid]
                if tag >= 0 and tag >> _worker.POS_BITS == bid:
                    pos = tag & _POS_MASK
                else:
                    # It died running none of this batch's items (idle, or unpickling them).
                    # Re-run the batch; if that keeps happening, its first item is the culprit.
                    self._unblamed[bid] = self._unblamed.get(bid, 0) + 1
                    if self._unblamed[bid] > 1:
                        pos = 0
            if pos is not None:
                task = batch.tasks[pos]
                if proc.killed_for is not None:
                    self._ready.append(timeout_outcome(task, self._spec.timeout, 0.0))
                else:
                    self._ready.append(Outcome(task, False, WorkerCrashed(exitcode, task.item, task.index)))
                self._unblamed.pop(bid, None)
                rest = batch.tasks[:pos] + batch.tasks[pos + 1 :]
            else:
                rest = batch.tasks
            if rest:
                requeue.append((bid, Batch(batch.fn, rest)))
        requeue.extend(outstanding)
        self._pending.extendleft(reversed(requeue))
        if self._init_error is None and self._ctx is not None and not proc.replaced:
            self._start(proc.wid)

    def _check_deadlines(self) -> float | None:
        """Kill workers whose current item is overdue; return seconds to the next deadline."""
        limit = self._spec.timeout
        if limit is None:
            return None
        now = time.monotonic()
        nearest: float | None = None
        for proc in self._procs.values():
            if not proc.outstanding or proc.killed_for is not None:
                continue
            tag = self._tags[proc.wid]
            if tag < 0:
                continue
            left = self._starts[proc.wid] + limit - now
            if left <= 0:
                proc.killed_for = (tag >> _worker.POS_BITS, tag & _POS_MASK)
                proc.process.kill()
            else:
                nearest = left if nearest is None else min(nearest, left)
        return nearest

    def wake(self) -> None:
        # Coalesced: one byte in the pipe at a time, so a thread waking a busy caller again
        # and again can never fill the pipe and block.
        if self._wake_w is not None and not self._woken:
            self._woken = True
            try:
                self._wake_w.send_bytes(b"")
            except OSError:
                pass

    def close(self, cancel: bool = False) -> None:
        _open_gears.discard(self)
        procs, self._procs = list(self._procs.values()), {}
        for proc in procs:
            if cancel:
                proc.process.terminate()
            else:
                proc.sender.send(_wire.dumps(None, self._owner)[0])
            proc.sender.stop()
        deadline = time.monotonic() + (TERMINATE_GRACE if cancel else 5.0)
        for proc in procs:
            # Join in slices so the main thread keeps receiving signals.
            while proc.process.is_alive() and time.monotonic() < deadline:
                proc.process.join(0.05)
            if proc.process.is_alive():
                proc.process.kill()
                proc.process.join()
            proc.sender.join()  # the worker is gone: a blocked write has failed by now
            proc.conn.close()
            for _, _, path in proc.outstanding:
                _wire.unlink(path)
            if proc.process.pid is not None:
                _wire.sweep(self._owner, proc.process.pid)
            proc.process.close()
        if self._zygote is not None:  # after the workers: it kills any child still alive
            self._zygote.stop(TERMINATE_GRACE)
            self._zygote = None
        _wire.drop_spares(self._owner)
        for end in (self._wake_r, self._wake_w):
            if end is not None:
                end.close()
        self._wake_r = self._wake_w = None
        self._pending.clear()
        self._ready = []
        self._started = False
        self._ctx = None
        self._respawn_ctx = None

    def describe(self) -> str:
        ctx = self.mp_context
        method = ctx.get_start_method() if ctx is not None else self.start_method or default_start_method()
        return f"{super().describe()} ({method})"


@dataclass(eq=False)
class _Fn:
    """A function as the workers get it: its key in their tables and its pickled form.

    The parent holds the function weakly where it can (batches in flight hold it strongly):
    a finished call's function, a bound method's object with it, is not kept for the run's
    life (CPython's test_no_stale_references). Its entry leaves the table when it dies.
    """

    key: int
    ref: Callable[[], Callable[..., Any] | None]
    payload: bytes
    by_value: bool


def _weak_or_strong(fn: Callable[..., Any], table: dict[int, _Fn]) -> Callable[[], Callable[..., Any] | None]:
    """A weak reference to ``fn`` that drops its entry from ``table`` when ``fn`` dies; a strong
    one for what cannot be referenced weakly (builtins like ``len``, which live forever anyway)."""
    key = id(fn)

    def gone(_: object) -> None:
        table.pop(key, None)

    try:
        return weakref.ref(fn, gone)
    except TypeError:
        return lambda: fn


def _fn_bytes(fn: Callable[..., Any]) -> tuple[bytes, bool]:
    """(payload, by value?): by reference when a worker can import it (a module, or ``__main__``
    run from a file, which spawn and forkserver re-import); by value with cloudpickle otherwise
    (and later, should a worker fail to import it after all)."""
    main = sys.modules.get("__main__")
    if getattr(fn, "__module__", None) != "__main__" or getattr(main, "__file__", None):
        try:
            return pickle.dumps(fn, protocol=5), False  # lambdas and closures fail here
        except Exception:
            pass
    payload: bytes = cloudpickle.dumps(fn, protocol=5)
    return payload, True

