"""Streaming readers for ``gearshift run`` inputs: JSON Lines, CSV and plain text.

Files come as people have them: UTF-8 with or without a byte-order mark (what
spreadsheet programs write), LF or CRLF line ends, CSV in any common dialect (sniffed:
comma, semicolon, tab or bar), and gzip'd (``.jsonl.gz``, ``.csv.gz``, ``.txt.gz``, or any
input, stdin included, that starts with gzip's magic bytes).

Inputs are read one line at a time (never loaded whole), so a file of any size, or an
endless stdin, runs in bounded memory. Each item keeps its input index (its position
among the data lines, the key ``--resume`` matches on) and its line number (for
messages). A line that cannot be parsed becomes an item that carries the error, so
it is recorded as a failure of that line and the run goes on.
"""

from __future__ import annotations

import csv
import gzip
import io
import itertools
import json
import os
import sys
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass
from typing import Any, BinaryIO, Literal, cast

Format = Literal["jsonl", "csv", "text"]
FORMATS: tuple[Format, ...] = ("jsonl", "csv", "text")
_EXTENSIONS: dict[str, Format] = {
    ".jsonl": "jsonl",
    ".ndjson": "jsonl",
    ".json": "jsonl",
    ".csv": "csv",
    ".txt": "text",
    ".text": "text",
    ".lst": "text",
}


@dataclass(frozen=True, slots=True)
class Item:
    """One input: its index, its line number, and its value (or why it is malformed)."""

    index: int
    line: int
    value: Any
    error: str | None = None

    def __repr__(self) -> str:  # what error messages show for the item
        return f"<input #{self.index}, line {self.line}>"


def guess_format(path: str) -> Format:
    """The format from the file's extension; stdin defaults to JSON Lines."""
    if path == "-":
        return "jsonl"
    base = path[:-3] if path.lower().endswith(".gz") else path
    ext = os.path.splitext(base)[1].lower()
    try:
        return _EXTENSIONS[ext]
    except KeyError:
        known = ", ".join(sorted(_EXTENSIONS)) + " (each also .gz)"
        raise ValueError(f"cannot tell the format of {path!r} from its extension ({known}); give --format") from None


def display_name(path: str) -> str:
    return "<stdin>" if path == "-" else path


GZIP_MAGIC = b"\x1f\x8b"
BOM = b"\xef\xbb\xbf"


def _open_binary(path: str) -> BinaryIO:
    """The input's bytes, decompressed when they start with gzip's magic (the name does not matter)."""
    if path == "-":
        stdin = sys.stdin.buffer
        head = stdin.peek(2)[:2] if isinstance(stdin, io.BufferedReader) else b""
        return cast(BinaryIO, _Gzip(stdin)) if head == GZIP_MAGIC else stdin
    stream = open(path, "rb")  # noqa: SIM115
    try:
        head = stream.read(2)
        stream.seek(0)
    except BaseException:
        stream.close()
        raise
    return cast(BinaryIO, _Gzip(stream, owns=True)) if head == GZIP_MAGIC else stream


class _Gzip(gzip.GzipFile):
    """A gzip reader that closes the file under it only when it opened it (never stdin)."""

    def __init__(self, stream: BinaryIO, owns: bool = False) -> None:
        super().__init__(fileobj=stream, mode="rb")
        self._owned = stream if owns else None

    def close(self) -> None:
        try:
            super().close()
        finally:
            if self._owned is not None:
                self._owned.close()


def _close(stream: BinaryIO) -> None:
    if stream is not sys.stdin.buffer:
        stream.close()


def check_readable(path: str) -> None:
    """Raise OSError or EOFError (with a clear message) when the input cannot be read at all.

    Called before a run starts, so an unreadable file or a broken gzip is one line, not
    a failed run.
    """
    if path == "-":
        return
    stream = _open_binary(path)
    try:
        stream.read(1)
    except (OSError, EOFError) as exc:
        raise OSError(f"cannot read {path}: {exc}") from None
    finally:
        stream.close()


def read_items(
    path: str, fmt: Format, *, kwargs: bool, on_malformed: Callable[[str], None] | None = None
) -> Iterator[Item]:
    """Yield the items of ``path`` lazily; ``on_malformed`` hears each bad line's message."""
    reader = {"jsonl": _jsonl, "csv": _csv, "text": _text}[fmt]
    name = display_name(path)
    for item in reader(path, name, kwargs):
        if item.error is not None and on_malformed is not None:
            on_malformed(item.error)
        yield item


COUNT_LIMIT = 256 * 1024 * 1024  # bytes: larger files are not read twice just for a count


def count_inputs(path: str, fmt: Format) -> int | None:
    """How many inputs a file holds (its non-blank lines, less a CSV header).

    None for stdin and for files too large to read twice (the count is only for the
    progress bar's total and the auto gear's sizing).
    """
    if path == "-" or not os.path.isfile(path):
        return None
    try:
        with open(path, "rb") as head:
            gzipped = head.read(2) == GZIP_MAGIC
    except OSError:
        return None
    if os.path.getsize(path) > (COUNT_LIMIT // 16 if gzipped else COUNT_LIMIT):  # too costly to read twice
        return None
    count = 0
    stream = _open_binary(path)
    try:
        for raw in stream:
            if raw.strip():
                count += 1
    except (OSError, EOFError):
        return None  # the run itself reports what is wrong with the file
    finally:
        stream.close()
    return max(0, count - 1) if fmt == "csv" else count


def _lines(path: str) -> Iterator[tuple[int, bytes]]:
    """Numbered lines, read one at a time (from a pipe, as they arrive), without a byte-order mark."""
    stream = _open_binary(path)
    try:
        numbered = enumerate(stream, 1)
        for number, raw in numbered:
            yield number, raw.removeprefix(BOM)
            break
        yield from numbered
    finally:
        _close(stream)


def _jsonl(path: str, name: str, kwargs: bool) -> Iterator[Item]:
    index = 0
    for number, raw in _lines(path):
        if not raw.strip():
            continue  # blank lines are not inputs and take no index
        try:
            value = json.loads(raw.rstrip(b"\r\n"))
        except (ValueError, UnicodeDecodeError) as exc:
            text = raw.decode("utf-8", "replace").rstrip("\r\n")
            yield Item(index, number, text, f"{name}:{number}: malformed JSON ({exc})")
        else:
            if kwargs and not isinstance(value, dict):
                error = f"{name}:{number}: --kwargs needs a JSON object per line, got {type(value).__name__}"
                yield Item(index, number, value, error)
            else:
                yield Item(index, number, value)
        index += 1


def _text(path: str, name: str, kwargs: bool) -> Iterator[Item]:
    index = 0
    for number, raw in _lines(path):
        try:
            text = raw.decode("utf-8").rstrip("\r\n")
        except UnicodeDecodeError as exc:
            text = raw.decode("utf-8", "replace").rstrip("\r\n")
            yield Item(index, number, text, f"{name}:{number}: not UTF-8 ({exc})")
            index += 1
            continue
        if not text.strip():
            continue
        yield Item(index, number, text)
        index += 1


SNIFF_BYTES = 64 * 1024
SNIFF_DELIMITERS = ",;\t|"


def _dialect(lines: list[str]) -> type[csv.Dialect] | csv.Dialect:
    """The CSV dialect of a sample of whole lines; the standard one when the sniffer cannot tell."""
    try:
        return csv.Sniffer().sniff("".join(lines), delimiters=SNIFF_DELIMITERS)
    except csv.Error:
        return csv.excel


def _sample(stream: io.TextIOWrapper, stdin: bool) -> list[str]:
    """Whole lines to sniff: up to 64 KiB of a file; from a pipe only the header (records as they come)."""
    lines: list[str] = []
    size = 0
    while size < SNIFF_BYTES:
        line = stream.readline()
        if not line:
            break
        lines.append(line)
        size += len(line)
        if stdin and line.strip():
            break
    return lines


def _csv(path: str, name: str, kwargs: bool) -> Iterator[Item]:
    """A CSV with a header row; each row is a dict of strings (keyword arguments by default)."""
    raw = _open_binary(path)
    stream = io.TextIOWrapper(raw, encoding="utf-8-sig", errors="replace", newline="")
    try:
        sample = _sample(stream, path == "-")
        lines: Iterable[str] = itertools.chain(sample, stream)
        yield from _csv_rows(csv.reader(lines, _dialect(sample)), name)
    finally:
        stream.detach()
        _close(raw)


def _csv_rows(reader: Any, name: str) -> Iterator[Item]:
    header: list[str] | None = None
    index = 0
    last_line = 0
    while True:
        start = last_line + 1
        try:
            row = next(reader)
        except StopIteration:
            return
        except csv.Error as exc:
            last_line = reader.line_num
            if header is None:
                raise ValueError(f"{name}:{start}: cannot read the CSV header ({exc})") from None
            yield Item(index, start, None, f"{name}:{start}: malformed CSV ({exc})")
            index += 1
            continue
        last_line = reader.line_num
        if not row or not any(cell.strip() for cell in row):
            continue
        if header is None:
            header = [cell.strip() for cell in row]
            continue
        if len(row) != len(header):
            error = f"{name}:{start}: expected {len(header)} fields (as the header), got {len(row)}"
            yield Item(index, start, row, error)
        else:
            yield Item(index, start, dict(zip(header, row, strict=True)))
        index += 1
