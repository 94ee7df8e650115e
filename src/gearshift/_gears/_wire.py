"""How messages cross a process boundary: pickle protocol 5, big buffers out of band.

A message is pickled once. Buffers of ``OOB_MIN`` bytes or more (NumPy arrays and
anything else that pickles through ``PickleBuffer``; ``bytes``, ``bytearray`` and
``memoryview`` payloads; a memoryview arrives as its bytes) do not go through the pipe: they are written into one file
in shared memory (``/dev/shm``) and the pipe carries a small envelope naming it. The
receiver maps the file and unlinks it at once, so a buffer is copied once on each
side instead of three times through the pipe, and NumPy arrays come back as views of
the mapping (copy-on-write: writable, no copy unless written).

Nothing stays in ``/dev/shm``: each file's name starts with ``gearshift-<owner pid>-``,
the receiver unlinks it as soon as it is mapped, and ``sweep`` removes what a dead
sender or receiver left (the process gear calls it when a worker dies, when it closes,
and a worker whose parent died calls it before leaving).
"""

from __future__ import annotations

import io
import itertools
import mmap
import os
import pickle
import threading
from typing import Any

from gearshift._pickling import shield

#: Buffers at least this large travel through shared memory; smaller ones stay in the pipe.
OOB_MIN = 256 * 1024
#: A message this large (in the pipe) is pickled again, looking for big bytes to move out.
REDUMP_MIN = 1024 * 1024
#: ...unless it is many small objects: moving bytes out only pays above this many bytes per item.
REDUMP_PER_ITEM = 64 * 1024
SHM_DIR = "/dev/shm"
PREFIX = "gearshift-"
_ALIGN = 64

_counter = itertools.count()
_enabled = os.path.isdir(SHM_DIR) and os.access(SHM_DIR, os.W_OK)


class Envelope:
    """What crosses the pipe when some of a message's buffers went to shared memory."""

    __slots__ = ("data", "keep", "layout", "path", "protocol5")

    def __init__(self, data: bytes, path: str, layout: list[tuple[int, int]], protocol5: int, keep: bool) -> None:
        self.data = data
        self.path = path
        self.layout = layout  # (offset, length) of each out-of-band buffer in the file
        self.protocol5 = protocol5  # the first this many are pickle's own; the rest are bytes moved out
        self.keep = keep  # the sender reuses the file: the receiver reads it and leaves it

    def __reduce__(self) -> tuple[Any, ...]:
        return (Envelope, (self.data, self.path, self.layout, self.protocol5, self.keep))


#: Files a sender may write again once their reader is done (``release``), instead of making
#: new ones: a fresh tmpfs file costs its pages' allocation (about 4x the copy itself).
SPARE_FILES = 8
SPARE_BYTES = 256 * 1024 * 1024
_spares: dict[str, int] = {}  # free files and their sizes
_lent: set[str] = set()  # reusable files a reader has not finished with yet
_spare_lock = threading.Lock()


def _cloudpickler() -> type[pickle.Pickler]:
    import cloudpickle

    cls: type[pickle.Pickler] = cloudpickle.Pickler
    return cls


class _Pickled:
    """One pickling of a message: its in-band bytes and the buffers that go out of band."""

    def __init__(self, oob: bool, move_bytes: bool) -> None:
        self.oob = oob
        self.move_bytes = move_bytes
        self.buffers: list[pickle.PickleBuffer] = []  # pickle's own (NEXT_BUFFER, in order)
        self.moved: list[pickle.PickleBuffer] = []  # big bytes moved out (persistent ids)
        self.seen: dict[int, tuple[str, int]] = {}  # id of an object moved out -> its persistent id

    def buffer_callback(self, buf: pickle.PickleBuffer) -> bool:
        """False sends ``buf`` out of band: only when shared memory is on and it is big."""
        if self.oob and buf.raw().nbytes >= OOB_MIN:
            self.buffers.append(buf)
            return False
        return True

    def persistent_id(self, obj: Any) -> Any:
        kind = type(obj)
        if kind is bytes or kind is bytearray or kind is memoryview:
            size = obj.nbytes if kind is memoryview else len(obj)
            if size < OOB_MIN:
                return None
            # One copy however often it is referenced (pickle's memo never sees these objects).
            key = id(obj)
            known = self.seen.get(key)
            if known is not None:
                return known
            if kind is memoryview:  # as cloudpickle does below the threshold: it comes back as bytes
                kind, obj = bytes, obj if obj.c_contiguous else obj.tobytes()
            self.moved.append(pickle.PickleBuffer(obj))
            pid = ("b" if kind is bytes else "a", len(self.moved) - 1)
            self.seen[key] = pid
            return pid
        return None

    def dump(self, obj: Any, pickler_cls: type[pickle.Pickler]) -> bytes:
        out = io.BytesIO()
        pickler = pickler_cls(out, protocol=5, buffer_callback=self.buffer_callback)
        shield(pickler)  # pickle's own reductions for exceptions, whatever tblib installed
        if self.move_bytes:
            # An instance attribute, not a class made on the fly: buffers must never sit in a
            # reference cycle (the GC clearing an exported memoryview crashes CPython).
            pickler.persistent_id = self.persistent_id  # type: ignore[method-assign]
        pickler.dump(obj)
        return out.getvalue()

    def release(self) -> None:
        for buf in itertools.chain(self.buffers, self.moved):
            buf.release()
        self.buffers = []
        self.moved = []
        self.seen = {}


def _pickle(obj: Any, oob: bool, move_bytes: bool = False) -> tuple[bytes, _Pickled]:
    """Plain pickle first (fast); cloudpickle for lambdas, closures and ``__main__`` objects."""
    attempt = _Pickled(oob, move_bytes)
    try:
        return attempt.dump(obj, pickle.Pickler), attempt
    except Exception:
        attempt = _Pickled(oob, move_bytes)
        return attempt.dump(obj, _cloudpickler()), attempt


def _has_big_bytes(values: list[Any]) -> bool:
    """A quick look (items and the members of tuple items) for bytes worth moving out."""
    if len(values) > 256:
        return False
    for value in values:
        for part in value if type(value) is tuple else (value,):
            kind = type(part)
            if kind in _BYTES and (part.nbytes if kind is memoryview else len(part)) >= OOB_MIN:
                return True
    return False


_BYTES = (bytes, bytearray, memoryview)


def dumps(obj: Any, owner: int, big: list[Any] | None = None, reusable: bool = False) -> tuple[bytes, str | None]:
    """Pickle ``obj`` for the pipe; big buffers go to a shared-memory file named for ``owner``.

    Returns the bytes for the pipe and the shared-memory file's path (None when there is
    none), which the sender must ``unlink`` if the message is never read. ``big`` is the
    list of items or results in the message: a quick look at it finds big bytes without
    pickling twice; a large message is pickled again to move out bytes the look missed
    (unless it is many small items). Falls back to the pipe when shared memory is
    unavailable or full. ``reusable``: the sender will ``release`` the file once the
    reader is done with it, so it may be written again (only when the reader copies
    everything out of it: never under NumPy arrays, which stay mapped).
    """
    if _enabled and big is not None and _has_big_bytes(big):
        data, pickled = _pickle(obj, True, move_bytes=True)
    else:
        data, pickled = _pickle(obj, _enabled)
        per_item = len(data) / max(1, len(big) if big is not None else 1)
        if _enabled and len(data) >= REDUMP_MIN and per_item >= REDUMP_PER_ITEM:
            pickled.release()
            data, pickled = _pickle(obj, True, move_bytes=True)
    buffers = pickled.buffers + pickled.moved
    protocol5 = len(pickled.buffers)
    if not buffers:
        return data, None
    keep = reusable and not protocol5
    try:
        path, layout = _write(buffers, owner, keep)
    except OSError:  # /dev/shm full or gone: through the pipe
        return _pickle(obj, False)[0], None
    finally:
        del buffers
        pickled.release()
    return pickle.dumps(Envelope(data, path, layout, protocol5, keep), protocol=5), path


def _write(buffers: list[pickle.PickleBuffer], owner: int, keep: bool) -> tuple[str, list[tuple[int, int]]]:
    views = [buf.raw() for buf in buffers]
    layout: list[tuple[int, int]] = []
    offset = 0
    for view in views:
        layout.append((offset, view.nbytes))
        offset = (offset + view.nbytes + _ALIGN - 1) // _ALIGN * _ALIGN
    spare = _take_spare(offset, owner) if keep else None
    if spare is not None:
        path = spare
        fd = os.open(path, os.O_RDWR)
    else:
        path = os.path.join(SHM_DIR, f"{PREFIX}{owner}-{os.getpid()}-{next(_counter)}")
        fd = os.open(path, os.O_CREAT | os.O_EXCL | os.O_RDWR, 0o600)
    if keep:
        with _spare_lock:
            _lent.add(path)
    try:
        if os.fstat(fd).st_size < offset or spare is None:
            os.ftruncate(fd, max(offset, 1))
        for (at, _), view in zip(layout, views, strict=True):
            done = 0
            while done < view.nbytes:
                done += os.pwrite(fd, view[done:], at + done)
    except BaseException:
        os.close(fd)
        unlink(path)
        raise
    os.close(fd)
    return path, layout


def _persistent_load(fd: int, moved: list[tuple[int, int]]) -> Any:
    """Rebuilds what ``_Pickled.persistent_id`` moved out, read straight from the file (one copy).

    A plain closure, not an Unpickler subclass: nothing here may sit in a reference cycle."""

    loaded: dict[int, Any] = {}

    def load(pid: Any) -> Any:
        index = pid[1]
        if index in loaded:  # the same object, referenced again
            return loaded[index]
        at, n = moved[index]
        if pid[0] == "b":
            obj: Any = _pread(fd, n, at)
        elif pid[0] == "a":
            obj = bytearray(n)
            got = 0
            while got < n:
                got += os.preadv(fd, [memoryview(obj)[got:]], at + got)
        else:
            raise pickle.UnpicklingError(f"unknown persistent id {pid!r}")
        loaded[index] = obj
        return obj

    return load


def _pread(fd: int, n: int, at: int) -> bytes:
    data = os.pread(fd, n, at)
    if len(data) == n:
        return data
    parts = [data]  # a short read (signals, huge sizes): go on
    while (got := sum(map(len, parts))) < n:
        parts.append(os.pread(fd, n - got, at + got))
    return b"".join(parts)


def loads(data: bytes) -> Any:
    """The inverse of ``dumps``: reads, maps and unlinks the shared-memory file, if there is one.

    Moved ``bytes`` are read into new objects; pickle's own buffers (NumPy arrays) become
    views of a private (copy-on-write) mapping of the file, which lives as long as they do.
    """
    obj = pickle.loads(data)
    if type(obj) is not Envelope:
        return obj
    fd = os.open(obj.path, os.O_RDONLY)
    try:
        if not obj.keep:
            unlink(obj.path)
        views: list[memoryview] = []
        if obj.protocol5:
            end = max(at + n for at, n in obj.layout[: obj.protocol5])
            whole = memoryview(mmap.mmap(fd, end, access=mmap.ACCESS_COPY))
            views = [whole[at : at + n] for at, n in obj.layout[: obj.protocol5]]
            whole.release()
        unpickler = pickle.Unpickler(io.BytesIO(obj.data), buffers=views)
        unpickler.persistent_load = _persistent_load(fd, obj.layout[obj.protocol5 :])  # type: ignore[method-assign]
        return unpickler.load()
    finally:
        os.close(fd)


def _take_spare(size: int, owner: int) -> str | None:
    """A free file of this owner's to write again (the smallest that holds ``size``, else any)."""
    mine = f"{PREFIX}{owner}-"
    with _spare_lock:
        fits = [p for p, n in _spares.items() if os.path.basename(p).startswith(mine)]
        if not fits:
            return None
        best = min(fits, key=lambda p: (_spares[p] < size, _spares[p]))
        _spares.pop(best)
    return best


def release(path: str | None) -> None:
    """The reader is done with ``path``: keep it for reuse if it was lent (``reusable``), else unlink."""
    if path is None:
        return
    with _spare_lock:
        if path in _lent:
            _lent.discard(path)
            try:
                size = os.stat(path).st_size
            except OSError:
                return
            if len(_spares) < SPARE_FILES and sum(_spares.values()) + size <= SPARE_BYTES:
                _spares[path] = size
                return
    unlink(path)


def drop_spares(owner: int) -> None:
    """Unlink the free files of ``owner``'s (a gear closing)."""
    mine = f"{PREFIX}{owner}-"
    with _spare_lock:
        paths = [p for p in _spares if os.path.basename(p).startswith(mine)]
        for p in paths:
            _spares.pop(p)
    for p in paths:
        unlink(p)


def unlink(path: str | None) -> None:
    """Remove a shared-memory file (gone already is fine)."""
    if path is None:
        return
    with _spare_lock:
        _lent.discard(path)
        _spares.pop(path, None)
    try:
        os.unlink(path)
    except FileNotFoundError:
        pass


def sweep(owner: int, sender: int | None = None) -> int:
    """Unlink the shared-memory files of ``owner``'s run (only ``sender``'s, if given)."""
    if not _enabled:
        return 0
    prefix = f"{PREFIX}{owner}-" + ("" if sender is None else f"{sender}-")
    removed = 0
    try:
        names = os.listdir(SHM_DIR)
    except OSError:
        return 0
    for name in names:
        if name.startswith(prefix):
            unlink(os.path.join(SHM_DIR, name))
            removed += 1
    return removed
