"""Where a run's items come from: the sources the scheduler takes batches from.

Each source has one small interface (``start``, ``take``, ``stop``, ``join``, ``capacity``,
``done``, ``error``, ``exhausted``), so the scheduler never cares which it reads:

* ``_Inline``       a sized input (list, range, dict), read on the driver's thread: never blocks;
* ``_Puller``       any other iterable, read by a thread of its own into a bounded buffer;
* ``_AsyncPuller``  an async iterable, read by a task on the caller's loop (``gs.amap``);
* ``Feed``          (in ``_feed``) an open-ended stream of submissions (Executor, Pool).
"""

from __future__ import annotations

import itertools
import threading
import time
import warnings
from collections import deque
from collections.abc import Callable, Iterable
from typing import Any

from gearshift._gears._base import CANCEL_GRACE
from gearshift.errors import short_repr

#: Longest a driver blocks at once, so the main thread keeps handling signals promptly.
POLL = 0.25


def input_length(items: object) -> int | None:
    """``len(items)``, or None when it has none (a generator) or cannot say (``range(10**20)``)."""
    try:
        return len(items)  # type: ignore[arg-type]
    except Exception:  # TypeError, OverflowError, or whatever a custom __len__ raises
        return None


def _bound_to_its_thread(items: object) -> bool:
    """Inputs known to refuse being read from another thread (sqlite3 cursors and connections)."""
    return type(items).__module__ in ("sqlite3", "_sqlite3")


def _nothing() -> None:
    pass


class _Inline:
    """Input read on the caller's thread: sized inputs, whose next items never block, or ``pull="caller"``."""

    threaded = False

    def __init__(self, items: Iterable[Any]) -> None:
        self._it = iter(items)
        self.done = False
        self.error: BaseException | None = None
        self.capacity = 1

    @property
    def exhausted(self) -> bool:
        return self.done

    def start(self, wake: Callable[[], None]) -> None:
        pass

    def take(self, n: int, partial_ok: bool) -> list[Any]:
        if self.done:
            return []
        items: list[Any] = []
        try:
            items.extend(itertools.islice(self._it, n))  # keeps what came before an exception
        except Exception as exc:
            self.error = exc
            self.done = True
        else:
            if len(items) < n:
                self.done = True
        return items

    def stop(self) -> None:
        pass

    def join(self) -> None:
        pass


class _Puller:
    """Input read by a thread of its own into a buffer of at most ``capacity`` items.

    The scheduler never blocks on it: ``take`` returns what is there. When the scheduler
    wants items that are not there yet, the thread wakes the gear (``wake``) once they
    are, so a ``collect`` blocked meanwhile returns and the items are dispatched at once.
    The buffer is a deque (thread-safe appends and pops) and the hand-shake two flags,
    each written by one side and read by the other, so the hot path takes no lock.
    """

    threaded = True

    def __init__(self, items: Iterable[Any], capacity: int) -> None:
        self._it = iter(items)
        self._buf: deque[Any] = deque()
        self.capacity = capacity
        self._want = 0  # written by the scheduler: wake the gear once the buffer holds this many
        self._room = threading.Event()
        self._stopping = False
        self._wake: Callable[[], None] = _nothing
        self.done = False  # the input ended or raised: nothing more will be buffered
        self.error: BaseException | None = None
        self._thread: threading.Thread | None = None

    @property
    def exhausted(self) -> bool:
        return self.done and not self._buf

    def start(self, wake: Callable[[], None]) -> None:
        self._wake = wake
        self._thread = threading.Thread(target=self._pull, name="gearshift-source", daemon=True)
        self._thread.start()

    def _pull(self) -> None:
        it, buf = self._it, self._buf
        try:
            while not self._stopping:
                if len(buf) >= self.capacity:
                    self._room.clear()
                    if len(buf) >= self.capacity and not self._stopping:
                        self._room.wait(POLL)
                    continue
                try:
                    item = next(it)
                except StopIteration:
                    return
                buf.append(item)
                want = self._want
                if want and len(buf) >= want:
                    self._want = 0
                    self._call_wake()
        except BaseException as exc:  # the input's own error: raised after its items are delivered
            self.error = exc
        finally:
            self.done = True
            self._call_wake()

    def _call_wake(self) -> None:
        try:
            self._wake()
        except Exception:  # the gear closed meanwhile: nobody is waiting
            pass

    def take(self, n: int, partial_ok: bool) -> list[Any]:
        """Up to ``n`` buffered items, now; fewer only if ``partial_ok`` or the input ended."""
        buf = self._buf
        for second_look in (False, True):
            done = self.done  # read before the buffer: whatever was appended before it is seen
            have = len(buf)
            if have >= n or (have and (partial_ok or done)):
                items = [buf.popleft() for _ in range(min(n, have))]
                self._room.set()
                return items
            if done or second_look:
                return []
            # Ask to be woken, then look once more: the thread may have appended meanwhile.
            self._want = 1 if partial_ok else n
        return []

    def stop(self) -> None:
        """Ask the thread to stop after the item it is reading (non-blocking)."""
        self._stopping = True
        self._wake = _nothing
        self._room.set()

    def join(self) -> None:
        """Wait for the thread, in slices (Ctrl-C stays prompt), for ``CANCEL_GRACE`` at most.

        A thread can only stop between items: one blocked inside the input (a socket that
        never answers) is left to finish on its own, named in a RuntimeWarning.
        """
        self.stop()
        thread = self._thread
        if thread is None:
            return
        deadline = time.monotonic() + CANCEL_GRACE
        while thread.is_alive() and time.monotonic() < deadline:
            thread.join(0.05)
        self._buf.clear()
        if thread.is_alive():
            warnings.warn(
                f"gearshift: the input iterator {short_repr(self._it, 60)} did not return its next item "
                f"within {CANCEL_GRACE}s of the run's end; its thread ({thread.name}) is left to finish on "
                "its own. Pass pull='caller' to read the input on the calling thread instead.",
                RuntimeWarning,
                stacklevel=3,
            )


class _AsyncPuller(_Puller):
    """An async iterable read by a task on the caller's loop (``gs.amap``), into the same bounded buffer."""

    threaded = False

    def __init__(self, items: Any, capacity: int) -> None:
        super().__init__((), capacity)
        self._ait = items
        self._task: Any = None
        self._aroom: Any = None

    def start(self, wake: Callable[[], None]) -> None:
        import asyncio

        self._wake = wake
        self._aroom = asyncio.Event()
        self._task = asyncio.get_running_loop().create_task(self._apull())

    async def _apull(self) -> None:
        buf = self._buf
        try:
            async for item in self._ait:
                buf.append(item)
                want = self._want
                if want and len(buf) >= want:
                    self._want = 0
                    self._call_wake()
                while len(buf) >= self.capacity and not self._stopping:
                    self._aroom.clear()
                    await self._aroom.wait()
                if self._stopping:
                    return
        except Exception as exc:  # the input's own error: raised after its items are delivered
            self.error = exc
        finally:
            self.done = True
            self._call_wake()

    def take(self, n: int, partial_ok: bool) -> list[Any]:
        items = super().take(n, partial_ok)
        if items and self._aroom is not None:
            self._aroom.set()
        return items

    def stop(self) -> None:
        super().stop()
        if self._task is not None:
            self._task.cancel()

    def join(self) -> None:
        self.stop()

    async def ajoin(self) -> None:
        """Wait for the cancelled pulling task (it stops at its next ``await``)."""
        import asyncio

        self.stop()
        if self._task is not None:
            await asyncio.gather(self._task, return_exceptions=True)
        self._buf.clear()


class Channel:
    """A bounded hand-off from one thread to another: a pipeline stage's results to the next stage.

    The producer blocks in ``put_many`` while the channel holds ``size`` items (backpressure:
    a fast stage never floods memory in front of a slow one). The consumer is either a
    scheduler, for which the channel is a source like the others (``take`` never blocks and
    asks to be woken, as ``_Puller`` does), or a caller of ``get_many``. ``close`` ends it after
    its items, with the producer's input error if there was one (raised after them, as
    ``imap`` does); ``abort`` ends it at once for both sides. The channel also keeps the
    time-averaged number of items waiting in it (``mean_length``), for the pipeline's report.
    """

    threaded = False
    #: Its error comes from an earlier stage, which already said where it happened.
    relays = True

    def __init__(self, size: int) -> None:
        if size < 1:
            raise ValueError(f"a channel holds at least one item, got size={size}")
        self.size = size
        self._buf: deque[Any] = deque()
        self._cond = threading.Condition(threading.Lock())
        self.capacity = size  # (the scheduler's read-ahead hint: the channel's own bound is ``size``)
        self.done = False
        self.error: BaseException | None = None
        self._aborted: BaseException | None = None
        self._reader_gone = False
        self._wake: Callable[[], None] = _nothing
        self._want = 0
        #: Called (from the producer's thread) after items arrive or the channel ends: an async reader's nudge.
        self.listener: Callable[[], None] = _nothing
        self.put_count = 0
        self.first_put: float | None = None  # (monotonic) when the first item arrived
        self.taken = 0
        self._opened = self._last = time.monotonic()
        self._area = 0.0
        self._closed_at: float | None = None

    # -- accounting (under the lock) ----------------------------------------------------
    def _tick(self) -> None:
        now = time.monotonic()
        self._area += len(self._buf) * (now - self._last)
        self._last = now

    def mean_length(self) -> float:
        """Items waiting in the channel, averaged over its life so far."""
        with self._cond:
            self._tick()
            end = self._closed_at if self._closed_at is not None else self._last
            span = end - self._opened
            return self._area / span if span > 0 else 0.0

    def waiting(self) -> int:
        """Items in it now. (Not ``__len__``: a channel has no length as an input, it is open-ended.)"""
        return len(self._buf)

    # -- the producer ---------------------------------------------------------------------
    def put_many(self, values: list[Any]) -> None:
        """Add ``values``, waiting for room as needed; raises what ``abort`` was given if aborted.

        The reader is woken as soon as what it asked for is there, before any wait for room:
        a producer with more items than the channel holds must not sleep on a reader asleep.
        """
        i, n = 0, len(values)
        if self.first_put is None and n:
            self.first_put = time.monotonic()
        while i < n:
            wake = False
            with self._cond:
                while len(self._buf) >= self.size and self._aborted is None and not self._reader_gone:
                    self._cond.wait()
                if self._aborted is not None:
                    raise self._aborted
                if self._reader_gone:
                    return  # nobody will read them (the reader ended): drop, never block
                room = self.size - len(self._buf)
                self._tick()
                self._buf.extend(values[i : i + room])
                self.put_count += min(room, n - i)
                i += room
                self._cond.notify_all()
                if self._want and len(self._buf) >= self._want:
                    self._want = 0
                    wake = True
            if wake:
                self._call_wake()
            self.listener()

    def close(self, error: BaseException | None = None) -> None:
        """No more items: the reader gets what is here, then ``error`` if given, then the end."""
        with self._cond:
            if self.done:
                return
            self.done = True
            self.error = error
            self._cond.notify_all()
        self._call_wake()
        self.listener()

    def abort(self, exc: BaseException) -> None:
        """End now for both sides: a waiting producer raises ``exc``, a scheduler reading it too."""
        with self._cond:
            if self._aborted is not None:
                return
            self._aborted = exc
            self.error = exc  # a BaseException, not an Exception: the scheduler raises it at once
            self.done = True
            self._buf.clear()
            self._closed_at = time.monotonic()
            self._cond.notify_all()
        self._call_wake()
        self.listener()

    # -- the reader -----------------------------------------------------------------------
    @property
    def exhausted(self) -> bool:
        return self.done and not self._buf

    def start(self, wake: Callable[[], None]) -> None:
        self._wake = wake
        if self.done:
            self._call_wake()

    def _call_wake(self) -> None:
        try:
            self._wake()
        except Exception:  # the reader's gear closed meanwhile: nobody is waiting
            pass

    def take(self, n: int, partial_ok: bool) -> list[Any]:
        """Up to ``n`` items now (never more than the channel can hold); fewer only if
        ``partial_ok`` or the channel ended. Otherwise asks to be woken when there are enough."""
        n = min(n, self.size)
        with self._cond:
            have = len(self._buf)
            if have >= n or (have and (partial_ok or self.done)):
                self._tick()
                buf = self._buf
                items = [buf.popleft() for _ in range(min(n, have))]
                self.taken += len(items)
                self._cond.notify_all()
                return items
            if not self.done:
                self._want = 1 if partial_ok else n
            return []

    def get_many(self, timeout: float) -> list[Any] | None:
        """Everything here now, waiting up to ``timeout`` for something; [] if nothing came,
        None once the channel ended and is empty (then read ``error``)."""
        with self._cond:
            if not self._buf and not self.done:
                self._cond.wait(timeout)
            if self._buf:
                self._tick()
                items = list(self._buf)
                self._buf.clear()
                self.taken += len(items)
                self._cond.notify_all()
                return items
            return None if self.done else []

    def stop(self) -> None:
        """The reader is done (its run ended): a producer still putting must not wait for it."""
        with self._cond:
            self._reader_gone = True
            self._closed_at = self._closed_at or time.monotonic()
            self._cond.notify_all()
        self._wake = _nothing

    def join(self) -> None:
        pass
