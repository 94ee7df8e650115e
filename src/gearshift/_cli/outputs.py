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
    dropped_failures: int = 0


def recover(path: str, drop_failures: bool = False) -> Recovered:
    """Read the records in ``path``; cut a torn (or unparsable) last line off the file.

    A line in the middle that does not parse cannot be ours to repair: it is reported in
    ``bad_lines`` and its input (unknown) will be run again. ``drop_failures`` rewrites
    the file without its error records (into a new file, then renamed over the old one),
    so that their inputs run again.
    """
    found = Recovered()
    if not os.path.exists(path):
        return found
    good_end = 0
    bad: list[tuple[int, int]] = []  # (line number, start offset) of unparsable lines
    failed: set[int] = set()
    with open(path, "rb") as stream:
        offset = 0
        for number, raw in enumerate(stream, 1):
            start, offset = offset, offset + len(raw)
            index, ok = _index_of(raw) if raw.endswith(b"\n") else (None, False)
            if index is None:
                if raw.strip():
                    bad.append((number, start))
                continue
            good_end = offset
            if index in found.done:
                found.duplicates += 1
            found.done.add(index)
            found.records += 1
            if not ok:
                failed.add(index)
    size = os.path.getsize(path)
    bad = [(number, start) for number, start in bad if start < good_end]  # the tail is cut off below
    found.bad_lines = [number for number, _ in bad]
    if good_end < size:
        found.torn_bytes = size - good_end
        with open(path, "r+b") as stream:
            stream.truncate(good_end)
            stream.flush()
            os.fsync(stream.fileno())
    if drop_failures and failed:
        _rewrite_without(path, failed)
        found.done -= failed
        found.records -= len(failed)
        found.dropped_failures = len(failed)
    return found


def _rewrite_without(path: str, failed: set[int]) -> None:
    """Copy ``path`` without the error records of ``failed``; a crash leaves the old file whole."""
    tmp = f"{path}.gearshift-tmp"
    with open(path, "rb") as src, open(tmp, "wb") as dst:
        for raw in src:
            index, ok = _index_of(raw)
            if index is None or ok or index not in failed:
                dst.write(raw)
        dst.flush()
        os.fsync(dst.fileno())
    os.replace(tmp, path)
    directory = os.open(os.path.dirname(os.path.abspath(path)), os.O_RDONLY)
    try:
        os.fsync(directory)
    finally:
        os.close(directory)


def _index_of(raw: bytes) -> tuple[int | None, bool]:
    """A record's input index (None when the line is not a record) and whether it succeeded."""
    try:
        record = json.loads(raw)
    except ValueError:
        return None, False
    if not isinstance(record, dict):
        return None, False
    index = record.get("index")
    if not isinstance(index, int) or isinstance(index, bool):
        return None, False
    return index, "error" not in record
