"""``gs.fetch`` and ``gearshift fetch``: many URLs to files, concurrently and politely, resumable.

A front over the engine like the others: each URL is an item of ``gs.amap`` in the async gear
(concurrency found by measurement unless given, ``rate``, retries with backoff and jitter),
on one shared aiohttp session (connection pooling, keep-alive). A body is streamed to a
temporary ``.NAME.part`` file and renamed when complete, so a final name never holds half a
body; small bodies (up to 256 KiB) are written at once from the loop, bigger ones stream
in blocks of 1 MiB, each hashed and written by a thread in one hop (measured: 64 KiB writes
through aiofiles with the hash on the loop took 3.5x the time of a raw aiohttp loop on 1 MiB
bodies). Each finished URL appends a record to
``DIR/manifest.jsonl`` (flushed each, fsynced every 100 or 0.5 s, as ``gearshift run``'s
records), which ``resume`` reads to skip what is done: after a kill, each URL ends with
exactly one success record.

Safety, as the command line's other rules: file names are derived from the URL but can never
leave DIR (every character outside ``[A-Za-z0-9._-]`` is replaced, no leading dot, length
capped) and never collide (a hash of the whole URL is part of the name); a file in DIR that the
manifest does not list is never written over; a ``manifest.jsonl`` that gearshift did not write
is never used, nor an existing manifest without ``resume``.

Retries: connection errors, timeouts, 429 and 5xx, honouring ``Retry-After`` (seconds or an
HTTP date); never other 4xx.
"""

from __future__ import annotations

import asyncio
import contextlib
import email.utils
import hashlib
import itertools
import json
import os
import re
import time
from collections.abc import AsyncGenerator, Callable, Iterable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any
from urllib.parse import unquote, urlsplit

from gearshift._api import amap
from gearshift._cli.outputs import RecordWriter
from gearshift._gears.aio import AsyncGear, loop_factory
from gearshift._rate import ANY_KEY, KeyedRate, make_rate
from gearshift._retry import Retry
from gearshift.errors import Failure

__all__ = ["FetchRefused", "FetchReport", "afetch", "fetch"]

MANIFEST = "manifest.jsonl"
#: Beside the manifest: each file name this fetch is about to create, flushed before the file
#: exists, so a resume knows a file renamed into place just before a kill (no record yet) is ours.
CLAIMS = ".manifest.jsonl.claims"
HEADER = {"gearshift": "fetch-manifest", "version": 1}
#: Bodies up to this size are read whole and written in one hop to a thread; bigger ones stream.
SMALL_BODY = 256 << 10
CHUNK = 64 << 10
#: Big bodies are hashed and written a block of this size at a time, off the loop.
BLOCK = 1 << 20
MAX_STEM = 80


class FetchRefused(ValueError):
    """The run would harm a file or cannot start (the message says which file and why)."""


class _Retryable(Exception):
    """A failure worth another attempt: a connection error, a timeout, 429 or 5xx."""

    def __init__(self, message: str, status: int | None = None, retry_after: float | None = None) -> None:
        super().__init__(message)
        self.status = status
        self.retry_after = retry_after


class _Final(Exception):
    """A failure no retry can help: another 4xx, a malformed URL, a file that is not ours."""

    def __init__(self, message: str, status: int | None = None) -> None:
        super().__init__(message)
        self.status = status


class _HTTPRetry(Retry):
    """Backoff with jitter, but never sooner than the server's ``Retry-After``."""

    def delay_for(self, exc: BaseException, attempt: int) -> float:
        wait = self.delay(attempt)
        after = getattr(exc, "retry_after", None)
        return max(wait, after) if after is not None else wait


@dataclass(frozen=True, slots=True)
class _Job:
    line: int
    url: str
    error: str | None = None  # a malformed line: why


def _host_of(job: _Job) -> Any:
    """The key of a URL's per-host rate (a malformed line, which makes no request, a key of its own)."""
    if job.error is not None:
        return ("malformed", job.line)
    try:
        return (urlsplit(job.url).hostname or "").lower()
    except ValueError:
        return ""


@dataclass
class FetchReport:
    """What a fetch did: URLs fetched, failed, skipped (done before, on resume), bytes, time."""

    out: str
    ok: int = 0
    failed: int = 0
    skipped: int = 0
    bytes: int = 0
    wall: float = 0.0
    failures_by_status: dict[str, int] = field(default_factory=dict)
    reasons: list[str] = field(default_factory=list)

    def __str__(self) -> str:
        rate = (self.ok + self.failed) / self.wall if self.wall > 0 else 0.0
        lines = [
            f"fetched {self.ok} URLs ({_size(self.bytes)}) into {self.out} in {self.wall:.2f}s ({rate:,.0f}/s); "
            f"{self.failed} failed" + (f", {self.skipped} already done" if self.skipped else ""),
        ]
        if self.failures_by_status:
            lines.append("failures: " + ", ".join(f"{k} x{v}" for k, v in sorted(self.failures_by_status.items())))
        lines.extend(f"why: {r}" for r in self.reasons)
        return "\n".join(lines)


def _size(n: int) -> str:
    for unit in ("B", "KiB", "MiB", "GiB"):
        if n < 1024 or unit == "GiB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1024  # type: ignore[assignment]
    return f"{n} B"


# -- names ---------------------------------------------------------------------------------
_UNSAFE = re.compile(r"[^A-Za-z0-9._-]+")


def file_name(url: str) -> str:
    """A file name for ``url`` that stays in its directory and no other URL shares.

    The last path segment (decoded, every character outside ``[A-Za-z0-9._-]`` replaced by
    ``_``, no leading dot, at most 80 characters), then ``-`` and 16 hex digits of the URL's
    SHA-256, then its extension: ``report-1a2b3c4d5e6f7a8b.pdf``.
    """
    parts = urlsplit(url)
    segment = unquote(parts.path.rstrip("/").rpartition("/")[2]) or "index"
    stem, dot, ext = segment.rpartition(".")
    if not dot or not stem:
        stem, ext = segment, ""
    stem = _UNSAFE.sub("_", stem).lstrip(".")[:MAX_STEM] or "file"
    ext = _UNSAFE.sub("", ext)[:10]
    digest = hashlib.sha256(url.encode("utf-8", "surrogatepass")).hexdigest()[:16]
    return f"{stem}-{digest}" + (f".{ext}" if ext else "")


def _check_url(url: str) -> str | None:
    """Why ``url`` cannot be fetched, or None."""
    try:
        parts = urlsplit(url)
    except ValueError as exc:
        return f"malformed URL: {exc}"
    if parts.scheme not in ("http", "https"):
        return f"malformed URL: not http(s) ({url[:200]!r})"
    if not parts.hostname:
        return f"malformed URL: no host ({url[:200]!r})"
    if any(c.isspace() for c in url) or "\x00" in url:
        return f"malformed URL: spaces or NUL in it ({url[:200]!r})"
    return None


# -- the manifest --------------------------------------------------------------------------
@dataclass
class _Previous:
    done: set[tuple[int, str]] = field(default_factory=set)  # (line, url) with a success record
    files: set[str] = field(default_factory=set)  # every file a record names
    exists: bool = False


def _read_manifest(path: Path, resume: bool) -> _Previous:
    """What an existing manifest says; refuses a foreign one, or one found without ``resume``."""
    previous = _Previous()
    if not path.exists():
        return previous
    if not path.is_file():
        raise FetchRefused(f"{path} exists and is not a file: not a gearshift fetch manifest")
    with open(path, "rb") as f:
        data = f.read()
    lines = data.split(b"\n")
    try:
        header = json.loads(lines[0]) if lines and lines[0].strip() else None
    except ValueError:
        header = None
    if header != HEADER:
        raise FetchRefused(f"{path} exists and was not written by gearshift fetch: it is left as it is "
                           "(choose another --out directory)")
    previous.exists = True
    records = 0
    for raw in lines[1:]:
        if not raw.strip():
            continue
        try:
            record = json.loads(raw)
        except ValueError:
            continue  # a torn last line (a kill mid-write): cut below
        records += 1
        if isinstance(record.get("file"), str):
            previous.files.add(record["file"])
        if record.get("error") is None and isinstance(record.get("status"), int) and 200 <= record["status"] < 300:
            previous.done.add((record.get("line"), record.get("url")))
    if records and not resume:
        raise FetchRefused(f"{path} already holds {records} records of an earlier fetch: pass resume=True "
                           "(--resume) to go on with it, or choose another --out directory")
    if not data.endswith(b"\n"):
        keep = data.rfind(b"\n") + 1  # a torn last record: cut it, the URL runs again
        with open(path, "r+b") as f:
            f.truncate(keep)
    claims = path.with_name(CLAIMS)
    if claims.is_file():
        previous.files.update(n for n in claims.read_text("utf-8", "replace").splitlines() if n)
    return previous


# -- one URL -------------------------------------------------------------------------------
class _Fetcher:
    """The async callable the engine runs per URL: GET, stream to a file, return the record."""

    def __init__(self, session: Any, out: Path, previous: set[str], timeout: float, claims: Any,
                 checksum: bool = True) -> None:
        self.checksum = checksum
        import aiohttp

        self.claims = claims
        self._aiohttp = aiohttp
        self.session = session
        self.out = out
        self._out = str(out)
        # Files an earlier run's manifest or claims list. This run's own are in the claims file,
        # read back only when a name exists already (a URL given twice): memory stays flat
        # however many URLs a run fetches.
        self.previous = previous
        self._active: dict[str, int] = {}  # names being downloaded now, and by how many downloads
        self._placed: set[str] = set()  # names placed while a sibling download was under way
        self._seq = itertools.count()
        self.timeout = aiohttp.ClientTimeout(total=timeout)
        self.timeout_seconds = timeout
        self.attempts: dict[int, int] = {}
        self.spent: dict[int, float] = {}  # seconds of a URL's attempts so far (for a failure's record)
        self.__name__ = "fetch"

    async def __call__(self, job: _Job) -> dict[str, Any]:
        self.attempts[job.line] = self.attempts.get(job.line, 0) + 1
        start = time.perf_counter()
        try:
            return await self._get(job)
        except BaseException:
            self.spent[job.line] = self.spent.get(job.line, 0.0) + time.perf_counter() - start
            raise

    async def _get(self, job: _Job) -> dict[str, Any]:
        if job.error is not None:
            raise _Final(job.error)
        name = file_name(job.url)
        # Plain strings, not Path objects: 3.11's pathlib interns every part, and the interned
        # table would grow with every file name (memory flat in the number of URLs).
        final = os.path.join(self._out, name)
        # lexists: a dangling symlink is a file of the user's too.
        existed = os.path.lexists(final)
        if existed and name not in self.previous and not self._claimed(name):
            raise _Final(_refusal(final))
        self._active[name] = self._active.get(name, 0) + 1
        try:
            return await self._fetch(job, name, final, existed)
        finally:
            left = self._active.pop(name) - 1
            if left:
                self._active[name] = left
            else:
                self._placed.discard(name)

    async def _fetch(self, job: _Job, name: str, final: str, existed: bool) -> dict[str, Any]:
        start = time.perf_counter()
        aiohttp = self._aiohttp
        try:
            async with self.session.get(job.url, timeout=self.timeout, allow_redirects=True) as resp:
                status = resp.status
                if not 200 <= status < 300:
                    await resp.release()
                    if status == 429 or status >= 500:
                        raise _Retryable(f"HTTP {status}", status, _retry_after(resp.headers.get("Retry-After")))
                    raise _Final(f"HTTP {status} (not retried: a client error)", status)
                self.claims.write(name + "\n")
                self.claims.flush()  # before the file exists (a kill loses no flushed write)
                size, digest = await self._save(resp, final, name, existed)
        except (_Retryable, _Final):
            raise
        except TimeoutError as exc:
            raise _Retryable(f"timed out after {self.timeout_seconds}s") from exc
        except aiohttp.InvalidURL as exc:
            raise _Final(f"malformed URL: {exc}") from exc
        except (aiohttp.ClientError, OSError) as exc:
            if isinstance(exc, OSError) and not isinstance(exc, (ConnectionError, aiohttp.ClientError)):
                raise _Final(f"cannot write {final}: {exc}") from exc
            raise _Retryable(f"{type(exc).__name__}: {exc}") from exc
        return {"line": job.line, "url": job.url, "status": status, "bytes": size, "file": name, "sha256": digest,
                "elapsed": round(time.perf_counter() - start, 6), "attempts": self._attempts_of(job.line),
                "error": None}

    def _attempts_of(self, line: int) -> int:
        self.spent.pop(line, None)  # (what earlier failed attempts of a success took is not kept)
        return self.attempts.pop(line, 1)

    def _claimed(self, name: str) -> bool:
        """Whether this run claimed ``name`` (rare: only asked when the file exists already)."""
        self.claims.flush()
        with open(self.claims.name, encoding="utf-8", errors="replace") as f:
            return any(line.rstrip("\n") == name for line in f)

    def _may_replace(self, name: str, existed: bool) -> Callable[[], bool]:
        """Whether a file found at ``name`` when placing ours is ours to replace: it was ours when
        the request started, or a download of the same URL in this run put it there meanwhile."""
        return lambda: existed or name in self._placed

    def _placing(self, name: str) -> None:
        """Just before this download puts its file in place: siblings (the same URL, in flight) may replace it."""
        if self._active.get(name, 0) > 1:
            self._placed.add(name)

    async def _save(self, resp: Any, final: str, name: str, existed: bool) -> tuple[int, str | None]:
        # A part file of this download's own, created exclusively (never over a file that is there,
        # never through a symlink): two downloads of one URL never share it.
        part = os.path.join(self._out, f".{name}.{os.getpid():x}-{next(self._seq):x}.part")
        may_replace = self._may_replace(name, existed)
        digest = hashlib.sha256() if self.checksum else _NoDigest()
        block = bytearray()
        stream = resp.content
        while len(block) <= SMALL_BODY:
            chunk = await stream.read(CHUNK)
            if not chunk:
                # Small: hashed and written right here, as a raw loop would (a thread hop costs
                # more than a quarter MiB into the page cache).
                digest.update(block)
                self._placing(name)
                _write_whole(part, final, block, may_replace)
                return len(block), digest.hexdigest()
            block += chunk
        # Big: blocks of ~1 MiB, each hashed and written by a thread in one hop (hashlib and the
        # write release the GIL), so the loop goes on receiving meanwhile.
        size = 0
        f = await asyncio.to_thread(_open_part, part)
        try:
            while True:
                chunk = await stream.read(CHUNK)
                if chunk:
                    block += chunk
                if len(block) >= BLOCK or (not chunk and block):
                    data, block = bytes(block), bytearray()
                    await asyncio.to_thread(_hash_and_write, f, digest, data)
                    size += len(data)
                if not chunk:
                    break
            self._placing(name)
            await asyncio.to_thread(_close_and_place, f, part, final, may_replace)
        except BaseException:
            f.close()
            with contextlib.suppress(OSError):
                os.unlink(part)
            raise
        return size, digest.hexdigest()


class _NoDigest:
    """``checksum=False``: no hashing (the record's sha256 is null)."""

    def update(self, data: bytes | bytearray) -> None:
        pass

    def hexdigest(self) -> None:
        return None


def _hash_and_write(f: Any, digest: Any, data: bytes) -> None:
    digest.update(data)
    f.write(data)


def _refusal(final: str) -> str:
    return f"refused: {final} exists and is not in the manifest (gearshift never writes over a file it did not write)"


def _open_part(part: str) -> Any:
    flags = os.O_WRONLY | os.O_CREAT | os.O_EXCL | getattr(os, "O_NOFOLLOW", 0) | getattr(os, "O_CLOEXEC", 0)
    return os.fdopen(os.open(part, flags, 0o644), "wb")


def _place(part: str, final: str, may_replace: Callable[[], bool]) -> None:
    """Move a finished part file to its final name, never over a file that is not ours.

    A hard link fails if the name exists, whoever made it and whenever (even a moment ago,
    while the body arrived): only then, and only if it is ours, is it replaced.
    """
    try:
        os.link(part, final)
    except FileExistsError:
        if not may_replace():
            raise _Final(_refusal(final)) from None
        os.replace(part, final)
        return
    except OSError:  # no hard links on this file system: look, then rename
        if os.path.lexists(final) and not may_replace():
            raise _Final(_refusal(final)) from None
        os.replace(part, final)
        return
    os.unlink(part)


def _close_and_place(f: Any, part: str, final: str, may_replace: Callable[[], bool]) -> None:
    f.close()
    _place(part, final, may_replace)


def _write_whole(part: str, final: str, data: bytes | bytearray, may_replace: Callable[[], bool]) -> None:
    try:
        with _open_part(part) as f:
            f.write(data)
        _place(part, final, may_replace)
    except BaseException:
        with contextlib.suppress(OSError):
            os.unlink(part)
        raise


def _retry_after(value: str | None) -> float | None:
    """``Retry-After`` in seconds (delta-seconds or an HTTP date), capped at 10 minutes."""
    if not value:
        return None
    value = value.strip()
    if value.isdigit():
        return min(600.0, float(value))
    try:
        when = email.utils.parsedate_to_datetime(value)
    except (TypeError, ValueError):
        return None
    return max(0.0, min(600.0, when.timestamp() - time.time()))


def _jobs(urls: Iterable[str], done: set[tuple[int, str]], report: FetchReport) -> Iterator[_Job]:
    for line, raw in enumerate(urls, 1):
        url = raw.strip() if isinstance(raw, str) else str(raw).strip()
        if not url or url.startswith("#"):
            continue
        if (line, url) in done:
            report.skipped += 1
            continue
        yield _Job(line, url, _check_url(url))


def _record_of_failure(failure: Failure, fetcher: _Fetcher) -> dict[str, Any]:
    job: _Job = failure.item
    exc = failure.exception
    status = getattr(exc, "status", None)
    return {"line": job.line, "url": job.url, "status": status, "bytes": 0, "file": None, "sha256": None,
            "elapsed": round(fetcher.spent.pop(job.line, 0.0), 6),
            "attempts": max(failure.attempts, fetcher.attempts.pop(job.line, 1)),
            "error": str(exc) or type(exc).__name__}


# -- the fronts ----------------------------------------------------------------------------
async def afetch(
    urls: Iterable[str],
    out: str | os.PathLike[str],
    *,
    concurrency: int | None = None,
    rate: str | float | None = None,
    per_host_rate: str | float | None = None,
    retries: int = 3,
    timeout: float = 30.0,
    resume: bool = False,
    progress: bool = False,
    checksum: bool = True,
) -> FetchReport:
    """``gs.fetch`` for async code: the requests run on the caller's loop."""
    try:
        import aiohttp
    except ImportError:
        raise ImportError("gs.fetch needs aiohttp: pip install 'gearshift[fetch]'") from None
    if isinstance(retries, bool) or not isinstance(retries, int) or retries < 0:
        raise ValueError(f"retries must be an int >= 0, got {retries!r}")
    if not (isinstance(timeout, (int, float)) and timeout > 0):
        raise ValueError(f"timeout must be positive seconds, got {timeout!r}")
    make_rate(rate)  # a bad rate is refused before DIR is touched
    limits: str | float | KeyedRate | None = rate
    if per_host_rate is not None:
        # One bucket per host in the engine: a URL waiting for its host's turn holds no slot,
        # and URLs of other hosts go on meanwhile.
        limits = KeyedRate({ANY_KEY: per_host_rate}, _host_of, total=rate)
    directory = Path(out)
    if directory.exists() and not directory.is_dir():
        raise FetchRefused(f"--out {directory} exists and is not a directory")
    directory.mkdir(parents=True, exist_ok=True)
    manifest = directory / MANIFEST
    previous = _read_manifest(manifest, resume)
    report = FetchReport(out=str(directory))
    writer = RecordWriter(str(manifest))
    started = time.perf_counter()
    gear = AsyncGear(concurrency)
    stack = contextlib.ExitStack()
    try:
        if not previous.exists:
            writer.write(HEADER)
            writer.sync()
        connector = aiohttp.TCPConnector(limit=0, ttl_dns_cache=300)
        async with aiohttp.ClientSession(connector=connector) as session:
            claims = stack.enter_context(open(directory / CLAIMS, "a", encoding="utf-8"))  # noqa: SIM115
            fetcher = _Fetcher(session, directory, set(previous.files), float(timeout), claims, checksum)
            policy = _HTTPRetry(attempts=retries + 1, backoff=0.2, max_backoff=30.0, on=(_Retryable,))
            results: AsyncGenerator[Any, None] = amap(  # type: ignore[assignment]
                fetcher, _jobs(urls, previous.done, report), gear=gear, ordered=False, errors="collect",
                retries=policy if retries else 0, rate=limits, progress=progress, pull="caller",
            )
            async with contextlib.aclosing(results):
                async for value in results:
                    if isinstance(value, Failure):
                        record = _record_of_failure(value, fetcher)
                        report.failed += 1
                        status = record["status"]
                        what = record["error"].split(":")[0].split(" (")[0][:40]
                        key = f"HTTP {status}" if status is not None else what
                        report.failures_by_status[key] = report.failures_by_status.get(key, 0) + 1
                    else:
                        record = value
                        report.ok += 1
                        report.bytes += record["bytes"]
                    writer.write(record)
    finally:
        stack.close()
        writer.close()
        report.wall = time.perf_counter() - started
        report.reasons.extend(gear.notes())
    return report


def fetch(
    urls: Iterable[str],
    out: str | os.PathLike[str],
    *,
    concurrency: int | None = None,
    rate: str | float | None = None,
    per_host_rate: str | float | None = None,
    retries: int = 3,
    timeout: float = 30.0,
    resume: bool = False,
    progress: bool = False,
    loop: str = "auto",
    checksum: bool = True,
) -> FetchReport:
    """Fetch every URL of ``urls`` (one per item; blank and ``#`` lines skipped) into files in ``out``.

    concurrency:   requests at once; None finds it by measurement (rises while latency holds,
                   backs off when the service queues or refuses: 429/503, resets, timeouts).
    rate:          at most this many requests started, e.g. ``"50/s"``, over all hosts;
                   ``per_host_rate`` the same per host.
    retries:       more attempts on connection errors, timeouts, 429 and 5xx (backoff with
                   jitter, never before ``Retry-After``); never on other 4xx.
    timeout:       seconds per attempt.
    resume:        go on with ``out/manifest.jsonl``: URLs with a success record are skipped.
    loop:          the event loop: "auto" (uvloop when installed), "uvloop" or "asyncio".
    checksum:      each body's SHA-256 in its record; False saves its cost (about 0.5 ms a MiB
                   of CPU) and records null.

    Each URL's record (url, status, bytes, file, sha256, elapsed, attempts, error) is appended to
    ``out/manifest.jsonl`` as it finishes. Returns a ``FetchReport``. Refuses (``FetchRefused``)
    a manifest gearshift did not write, or an existing one without ``resume``.
    """
    with asyncio.Runner(loop_factory=loop_factory(loop)) as runner:
        return runner.run(afetch(urls, out, concurrency=concurrency, rate=rate, per_host_rate=per_host_rate,
                                 retries=retries, timeout=timeout, resume=resume, progress=progress,
                                 checksum=checksum))
