"""The durable results file of ``gearshift run``: append, flush, fsync in small batches.

Each record is one JSON line, written and flushed as soon as its input finishes, so
a run killed at any moment (SIGKILL included) loses only what was in flight, and at
most a torn last line, which ``recover`` cuts away before a resumed run appends.
"""

from __future__ import annotations

import dataclasses
import json
import os
import sys
import time
from dataclasses import dataclass, field
from typing import Any, BinaryIO

SYNC_EVERY = 100  # records
SYNC_SECONDS = 0.5


def jsonable(obj: Any) -> Any:
    """``json.dumps`` fallback: dataclasses as dicts, sets as lists, anything else as its repr."""
    if dataclasses.is_dataclass(obj) and not isinstance(obj, type):
        return dataclasses.asdict(obj)
    if isinstance(obj, set | frozenset):
        return sorted(obj, key=repr)
    if isinstance(obj, bytes):
        return obj.decode("utf-8", "backslashreplace")
    return repr(obj)


def dumps(record: dict[str, Any]) -> bytes:
    return json.dumps(record, ensure_ascii=False, default=jsonable).encode("utf-8") + b"\n"


class RecordWriter:
    """Appends records to a file (or stdout), flushing each and fsyncing every few."""

    def __init__(self, path: str) -> None:
        self.path = path
        self._stdout = path == "-"
        self._file: BinaryIO = sys.stdout.buffer if self._stdout else open(path, "ab")  # noqa: SIM115
        self._can_sync = not self._stdout and os.path.isfile(path)
        self._pending = 0
        self._last_sync = time.monotonic()
        self.written = 0
        self._closed = False

    def write(self, record: dict[str, Any]) -> None:
        self._file.write(dumps(record))
        self._file.flush()
        self.written += 1
        self._pending += 1
        if self._pending >= SYNC_EVERY or time.monotonic() - self._last_sync >= SYNC_SECONDS:
            self.sync()

    def sync(self) -> None:
        self._file.flush()
        if self._can_sync and self._pending:
            os.fsync(self._file.fileno())
        self._pending = 0
        self._last_sync = time.monotonic()

    def close(self) -> None:
        """Flush and fsync what is written; safe to call twice, and on a closed pipe."""
        if self._closed:
            return
        self._closed = True
        try:
            self.sync()
        except BrokenPipeError:
            if not self._stdout:
                raise
        finally:
            if not self._stdout:
                self._file.close()


@dataclass
class Recovered:
    """What an existing results file holds: the indexes done, and what was repaired."""

    done: set[int] = field(default_factory=set)
    records: int = 0
    torn_bytes: int = 0
    bad_lines: list[int] = field(default_factory=list)
    duplicates: int = 0


def recover(path: str) -> Recovered:
    """Read the records in ``path``; cut a torn (or unparsable) last line off the file.

    A line in the middle that does not parse cannot be ours to repair: it is reported in
    ``bad_lines`` and its input (unknown) will be run again.
    """
    found = Recovered()
    if not os.path.exists(path):
        return found
    good_end = 0
    bad: list[tuple[int, int]] = []  # (line number, start offset) of unparsable lines
    with open(path, "rb") as stream:
        offset = 0
        for number, raw in enumerate(stream, 1):
            start, offset = offset, offset + len(raw)
            index = _index_of(raw) if raw.endswith(b"\n") else None
            if index is None:
                if raw.strip():
                    bad.append((number, start))
                continue
            good_end = offset
            if index in found.done:
                found.duplicates += 1
            found.done.add(index)
            found.records += 1
    size = os.path.getsize(path)
    bad = [(number, start) for number, start in bad if start < good_end]  # the tail is cut off below
    found.bad_lines = [number for number, _ in bad]
    if good_end < size:
        found.torn_bytes = size - good_end
        with open(path, "r+b") as stream:
            stream.truncate(good_end)
            stream.flush()
            os.fsync(stream.fileno())
    return found


def _index_of(raw: bytes) -> int | None:
    try:
        record = json.loads(raw)
    except ValueError:
        return None
    index = record.get("index") if isinstance(record, dict) else None
    return index if isinstance(index, int) and not isinstance(index, bool) else None
