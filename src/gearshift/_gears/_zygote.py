"""The zygote: a process forked from the owner in ``open``, which forks the replacement workers.

A replacement worker (after a crash, a timeout or ``max_tasks_per_worker``) must not be
forked from the busy parent, whose threads may hold locks the child would inherit taken.
A fork server avoids that, but each of its workers imports the function's module again
(NumPy and friends: ~150 ms a worker). The zygote is forked at the same clean moment as
the first workers and stays single-threaded, so its children start as the parent was at
``open`` (every module imported, ``__main__`` included), at the speed of a fork.

Protocol over the control connection (a socketpair of pickled messages; the owner reads
it from the gear's thread only):
  owner -> zygote  ("spawn", seq, wid), then one byte carrying by SCM_RIGHTS the child's
                   end of the worker's socket and the write end of its life pipe
                   ("stop",)                 the owner closes: no sweep of its shared memory
  zygote -> owner  ("spawned", seq, pid | None)
                   ("exit", pid, exitcode)   multiprocessing's convention: -N for signal N
The owner's sentinel for a child is the read end of its life pipe, at EOF once the child
is gone, whether or not the zygote still lives. The zygote leaves at EOF on the control
connection or when the owner is gone, killing its live children first: no orphans. Its
children outlive the zygote itself (killed by someone): their owner still drives them.
"""

from __future__ import annotations

import os
import signal
import socket
import sys
import time
import traceback
import weakref
from multiprocessing import process
from multiprocessing.connection import Connection, wait
from multiprocessing.context import BaseContext
from typing import Any, NoReturn

from gearshift._gears import _wire, _worker

#: Seconds between the zygote's checks that its owner lives (EOF on the control connection
#: is the fast path; this catches an owner whose socket some other process still holds).
OWNER_CHECK = 0.5
#: Seconds the zygote polls fast for a child whose life pipe closed but which is not reaped yet.
REAP_HURRY = 1.0
#: Seconds the owner waits for the answer to a spawn request before it gives up on the zygote.
SPAWN_PATIENCE = 10.0
#: Seconds the owner waits, once a child is gone, for the zygote's report of its exit code.
REPORT_PATIENCE = 2.0
#: Seconds a dead owner's zygote waits for it to be seen dead before sweeping its shared memory.
OWNER_DEATH_PATIENCE = 5.0


# -- the zygote's side ----------------------------------------------------------------------
def main(control: Connection, owner: int, drop: list[Connection], worker_args: dict[str, Any]) -> None:
    """Serve spawn requests until the owner stops us or dies; then kill and reap our children."""
    signal.signal(signal.SIGINT, signal.SIG_IGN)  # Ctrl-C is the owner's to handle
    signal.signal(signal.SIGTERM, signal.SIG_DFL)  # not the owner's handler (user code)
    signal.signal(signal.SIGCHLD, signal.SIG_DFL)
    try:
        signal.set_wakeup_fd(-1)  # the owner's wake-up pipe (asyncio's) is not ours to write
    except ValueError:
        pass
    for conn in drop:  # the owner's ends, copied by the fork: EOF must reach their peers
        conn.close()
    sock = socket.fromfd(control.fileno(), socket.AF_UNIX, socket.SOCK_STREAM)
    zygote = _Zygote(control, sock, owner, worker_args)
    stopped = False
    try:
        stopped = zygote.serve()
    finally:
        zygote.kill_all()
        sock.close()
    if not stopped:
        _sweep_for(owner)


class _Zygote:
    """The zygote's loop and its children (it is single-threaded: a fork of it is as safe as at ``open``)."""

    def __init__(self, control: Connection, sock: socket.socket, owner: int, worker_args: dict[str, Any]) -> None:
        self.control = control
        self.sock = sock
        self.owner = owner
        self.worker_args = worker_args
        self.pipes: dict[int, int] = {}  # live child's pid -> read end of its reap pipe
        self.children: set[int] = set()  # not reaped yet
        self.closed_at = 0.0  # when a reap pipe last closed (its child is about to be reapable)
        self.blas_limited = False

    def serve(self) -> bool:
        """True when the owner said stop; False when it is gone."""
        while True:
            hurry = len(self.children) > len(self.pipes) and time.monotonic() - self.closed_at < REAP_HURRY
            ready = wait([self.control, *self.pipes.values()], 0.005 if hurry else OWNER_CHECK)
            for pid, fd in list(self.pipes.items()):
                if fd in ready:
                    os.close(fd)
                    del self.pipes[pid]
                    self.closed_at = time.monotonic()
            try:
                self.reap()
                if os.getppid() != self.owner:
                    return False
                if self.control in ready:
                    request = self.control.recv()
                    if request[0] == "stop":
                        return True
                    self.spawn(request[1], request[2])
            except (EOFError, OSError):
                return False
            except Exception:  # a garbled request (the owner was interrupted mid-request): leave
                return True

    def spawn(self, seq: int, wid: int) -> None:
        msg, fds, _, _ = socket.recv_fds(self.sock, 1, 2)
        if not msg:
            raise EOFError
        pid: int | None = None
        if len(fds) == 2:
            for fd in fds:
                os.set_inheritable(fd, False)  # a program the worker runs gets neither
            pid = self.fork(fds[0], wid)
        for fd in fds:
            os.close(fd)  # the child has its copies
        self.control.send(("spawned", seq, pid))

    def fork(self, conn_fd: int, wid: int) -> int | None:
        """The new child's pid; None if the system refused (out of fds or processes)."""
        if not self.blas_limited:
            # Once, here, before the first fork (a run that never replaces a worker never pays):
            # every child inherits the limits (threadpoolctl costs ~12 ms a worker).
            self.blas_limited = True
            _worker._limit_blas(self.worker_args.get("blas_threads"))
            self.worker_args = {**self.worker_args, "blas_threads": None}
        try:
            reap_r, reap_w = os.pipe()  # at EOF when the child is gone: time to reap it
        except OSError:
            return None
        _flush()
        try:
            pid = os.fork()
        except OSError:
            os.close(reap_r)
            os.close(reap_w)
            return None
        if pid == 0:
            _child([self.control, self.sock], [reap_r, *self.pipes.values()], conn_fd, wid, self.worker_args)
        os.close(reap_w)
        self.pipes[pid] = reap_r
        self.children.add(pid)
        return pid

    def reap(self) -> None:
        for pid in list(self.children):
            code: int | None = None
            try:
                done, status = os.waitpid(pid, os.WNOHANG)
            except ChildProcessError:  # (cannot happen: nobody else reaps our children)
                done = pid
            else:
                if done:
                    code = os.waitstatus_to_exitcode(status)
            if done:
                self.children.discard(pid)
                fd = self.pipes.pop(pid, None)
                if fd is not None:
                    os.close(fd)
                self.control.send(("exit", pid, code))

    def kill_all(self) -> None:
        for pid in self.children:
            try:
                os.kill(pid, signal.SIGKILL)
            except OSError:
                pass
        for pid in self.children:
            try:
                os.waitpid(pid, 0)
            except OSError:
                pass
        for fd in self.pipes.values():
            os.close(fd)
        self.children.clear()
        self.pipes.clear()


def _child(close: list[Any], fds: list[int], conn_fd: int, wid: int, worker_args: dict[str, Any]) -> NoReturn:
    """In a freshly forked worker: drop the zygote's ends, run the worker loop, exit as multiprocessing does."""
    code = 1
    try:
        for obj in close:
            obj.close()
        for fd in fds:
            os.close(fd)
        process.current_process().name = f"gearshift-process-{wid}"
        _worker.main(Connection(conn_fd), wid=wid, adopted=True, **worker_args)
        code = 0
    except SystemExit as exc:
        if exc.code is None or isinstance(exc.code, int):
            code = exc.code or 0
        else:
            print(exc.code, file=sys.stderr)
    except BaseException:
        traceback.print_exc()
    finally:
        _flush()
        os._exit(code)


def _flush() -> None:
    """Nothing buffered is written twice (by a parent and its child) or lost at ``os._exit``."""
    for stream in (sys.stdout, sys.stderr):
        try:
            if stream is not None:
                stream.flush()
        except (AttributeError, ValueError, OSError):
            pass


def _sweep_for(owner: int) -> None:
    """The owner died (no "stop"): once it is seen dead, remove what it left in shared memory."""
    deadline = time.monotonic() + OWNER_DEATH_PATIENCE
    while _worker._alive(owner) and os.getppid() == owner:
        if time.monotonic() > deadline:
            return
        time.sleep(0.01)
    _wire.sweep(owner)


# -- the owner's side -----------------------------------------------------------------------
class Zygote:
    """The owner's handle on its zygote; used from the gear's thread only."""

    def __init__(self, ctx: BaseContext, drop: list[Connection], worker_args: dict[str, Any]) -> None:
        self._control, child_end = ctx.Pipe(duplex=True)
        self.process = ctx.Process(  # type: ignore[attr-defined]
            target=main,
            args=(child_end, os.getpid(), [self._control, *drop], worker_args),
            name="gearshift-zygote",
        )
        try:
            self.process.start()
        except BaseException:
            self._control.close()
            raise
        finally:
            child_end.close()
        self._sock = socket.fromfd(self._control.fileno(), socket.AF_UNIX, socket.SOCK_STREAM)
        self.alive = True  # False once it failed us: the fork server stands in
        self._seq = 0
        self._known: set[int] = set()  # pids of children with a handle
        self.exits: dict[int, int | None] = {}  # their exit codes, as reported

    @property
    def pid(self) -> int | None:
        pid: int | None = self.process.pid
        return pid

    def spawn(self, wid: int, conn_fd: int, life_w: int) -> int | None:
        """Ask for a worker: its pid, or None if the zygote cannot give one (it is given up)."""
        if not self.alive:
            return None
        self._seq += 1
        seq = self._seq
        try:
            self._control.send(("spawn", seq, wid))
            socket.send_fds(self._sock, [b"F"], [conn_fd, life_w])
            deadline = time.monotonic() + SPAWN_PATIENCE
            while (left := deadline - time.monotonic()) > 0:
                msg = self._read(left)
                if msg is not None and msg[0] == "spawned" and msg[1] == seq:
                    pid: int | None = msg[2]
                    if pid is not None:
                        self._known.add(pid)
                        return pid
                    break
        except (EOFError, OSError):
            pass
        self.alive = False
        return None

    def _read(self, timeout: float) -> tuple[Any, ...] | None:
        """The next message within ``timeout``, or None; exit reports are filed on the way."""
        if not self._control.poll(timeout):
            return None
        msg: tuple[Any, ...] = self._control.recv()
        if msg[0] == "exit" and msg[1] in self._known:
            self.exits[msg[1]] = msg[2]
        return msg

    def exitcode(self, pid: int, timeout: float) -> int | None:
        """``pid``'s exit code, waiting up to ``timeout`` for its report (None: unknown)."""
        deadline = time.monotonic() + timeout
        while pid not in self.exits and self.alive and (left := deadline - time.monotonic()) > 0:
            try:
                self._read(left)
            except (EOFError, OSError):
                self.alive = False
        return self.exits.get(pid)

    def forget(self, pid: int) -> None:
        self._known.discard(pid)
        self.exits.pop(pid, None)

    def stop(self, grace: float) -> None:
        """Make it leave (killing any child left), within ``grace`` seconds or by SIGKILL."""
        self.alive = False
        if not self._control.closed:
            try:
                self._control.send(("stop",))
            except OSError:
                pass
            self._control.close()
            self._sock.close()
        deadline = time.monotonic() + grace
        while self.process.is_alive() and time.monotonic() < deadline:
            self.process.join(0.05)  # in slices: the main thread keeps receiving signals
        if self.process.is_alive():
            self.process.kill()
            self.process.join()
        self.process.close()


class Child:
    """A worker the zygote forked, through the part of ``BaseProcess``'s API the gear uses."""

    def __init__(self, zygote: Zygote, pid: int, life_r: int) -> None:
        self.pid: int | None = pid
        self.sentinel = life_r  # at EOF once the child is gone: its life pipe's write end closed
        self._zygote = zygote
        self._gone = False
        self._code: int | None = None
        self._release = weakref.finalize(self, _release, zygote, pid, life_r)

    @property
    def exitcode(self) -> int | None:
        if self._code is None and self.pid is not None:
            self._code = self._zygote.exits.get(self.pid)
        return self._code

    def is_alive(self) -> bool:
        if not self._gone and self._release.alive:
            self._gone = bool(wait([self.sentinel], 0))
        return not self._gone

    def join(self, timeout: float | None = None) -> None:
        """Wait for the child's end (its life pipe), then for the zygote's report of its exit code."""
        if not self._gone and self._release.alive:
            self._gone = bool(wait([self.sentinel], timeout))
        if self._gone and self.exitcode is None and self.pid is not None:
            # It is gone: the report is a moment away, unless the zygote is gone too (no wait then).
            self._code = self._zygote.exitcode(self.pid, max(timeout or 0.0, REPORT_PATIENCE))

    def kill(self) -> None:
        self._signal(signal.SIGKILL)

    def terminate(self) -> None:
        self._signal(signal.SIGTERM)

    def _signal(self, sig: int) -> None:
        if self.pid is not None and self.is_alive():
            try:
                os.kill(self.pid, sig)
            except ProcessLookupError:
                pass

    def close(self) -> None:
        self._release()


def _release(zygote: Zygote, pid: int, life_r: int) -> None:
    os.close(life_r)
    zygote.forget(pid)
