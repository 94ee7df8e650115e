"""``gs.fetch`` / ``gs.afetch`` / ``gearshift fetch`` against a local aiohttp server.

The server runs on 127.0.0.1 (a random port) in a thread with its own event loop, so the code
under test, which runs its own loop, is independent of it. Nothing leaves the machine. The
server keeps, per raw request path, the ``time.monotonic()`` of every request it received, so
retry counts and ``Retry-After`` spacing are measured on the server's side.

Everything any of these tests could write is inside ``tmp_path`` (the tests run as root: the
traversal URLs are built so that even a naive join would land inside ``tmp_path``, never in
``/etc``).
"""

from __future__ import annotations

import asyncio
import collections
import hashlib
import itertools
import json
import os
import random
import signal
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from aiohttp import web
from cli_funcs import cli_env, wait_for_lines

import gearshift as gs

GS = [sys.executable, "-m", "gearshift"]
HEADER = {"gearshift": "fetch-manifest", "version": 1}
RECORD_KEYS = {"line", "url", "status", "bytes", "file", "sha256", "elapsed", "attempts", "error"}
BIG = 5 << 20


# -- the server ---------------------------------------------------------------------------------


def item_body(i: int) -> bytes:
    """The body of ``/item/{i}``: different for every i, of varying length."""
    return (f"item {i}:" * (i % 37 + 1)).encode() + hashlib.sha256(str(i).encode()).digest()


_BIG_BODY: bytes | None = None


def big_body() -> bytes:
    global _BIG_BODY
    if _BIG_BODY is None:
        _BIG_BODY = random.Random(5).randbytes(BIG)
    return _BIG_BODY


class Server:
    """A local HTTP server on a thread of its own; ``hits[raw_path]`` are the receipt times."""

    def __init__(self) -> None:
        self.hits: dict[str, list[float]] = collections.defaultdict(list)
        self._lock = threading.Lock()
        self.port = 0
        self._loop: asyncio.AbstractEventLoop | None = None
        self._stop: asyncio.Event | None = None
        self._ready = threading.Event()
        self._error: BaseException | None = None
        self._thread = threading.Thread(target=self._main, name="fetch-test-server")

    # The test side.
    @property
    def base(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def url(self, path: str) -> str:
        return self.base + path

    def count(self, raw_path: str) -> int:
        with self._lock:
            return len(self.hits.get(raw_path, []))

    def times(self, raw_path: str) -> list[float]:
        with self._lock:
            return list(self.hits.get(raw_path, []))

    def total(self) -> int:
        with self._lock:
            return sum(len(v) for v in self.hits.values())

    def start(self) -> None:
        self._thread.start()
        if not self._ready.wait(30):
            raise RuntimeError("the test server did not start")
        if self._error is not None:
            raise RuntimeError("the test server failed to start") from self._error

    def stop(self) -> None:
        if self._loop is not None and self._stop is not None:
            self._loop.call_soon_threadsafe(self._stop.set)
        self._thread.join(30)
        assert not self._thread.is_alive(), "the test server thread did not stop"

    # The server side.
    def _main(self) -> None:
        try:
            asyncio.run(self._serve())
        except BaseException as exc:  # reported to the starting thread
            self._error = exc
            self._ready.set()

    async def _serve(self) -> None:
        self._loop = asyncio.get_running_loop()
        self._stop = asyncio.Event()
        app = web.Application(middlewares=[self._record])
        app.router.add_get("/item/{i}", self._item)
        app.router.add_get("/flaky/{key}", self._flaky)
        app.router.add_get("/status/{code}/{key}", self._status)
        app.router.add_get("/slow/{key}", self._slow)
        app.router.add_get("/big", self._big)
        app.router.add_get("/{tail:.*}", self._echo)
        runner = web.AppRunner(app, handler_cancellation=True, shutdown_timeout=1.0, access_log=None)
        await runner.setup()
        try:
            site = web.TCPSite(runner, "127.0.0.1", 0, backlog=1024)
            await site.start()
            self.port = runner.addresses[0][1]
            self._ready.set()
            await self._stop.wait()
        finally:
            await runner.cleanup()

    @web.middleware
    async def _record(self, request: web.Request, handler: Any) -> web.StreamResponse:
        with self._lock:
            self.hits[request.raw_path].append(time.monotonic())
        return await handler(request)

    @staticmethod
    async def _delay(request: web.Request) -> None:
        ms = float(request.query.get("delay", "0"))
        if ms:
            await asyncio.sleep(ms / 1000)

    async def _item(self, request: web.Request) -> web.Response:
        await self._delay(request)
        return web.Response(body=item_body(int(request.match_info["i"])), content_type="application/octet-stream")

    async def _flaky(self, request: web.Request) -> web.Response:
        """Answers ``status`` (with ``Retry-After`` if given) ``fail`` times, then 200."""
        fail = int(request.query.get("fail", "2"))
        status = int(request.query.get("status", "503"))
        headers = {}
        if "retry_after" in request.query:
            headers["Retry-After"] = request.query["retry_after"]
        if self.count(request.raw_path) <= fail:
            return web.Response(status=status, text="try again later", headers=headers)
        return web.Response(body=b"finally " + request.match_info["key"].encode())

    async def _status(self, request: web.Request) -> web.Response:
        return web.Response(status=int(request.match_info["code"]), text="no such thing")

    async def _slow(self, request: web.Request) -> web.Response:
        await asyncio.sleep(10)
        return web.Response(body=b"too late")

    async def _big(self, request: web.Request) -> web.StreamResponse:
        body = big_body()
        response = web.StreamResponse(headers={"Content-Type": "application/octet-stream"})
        response.content_length = len(body)
        await response.prepare(request)
        for start in range(0, len(body), 64 << 10):
            await response.write(body[start : start + (64 << 10)])
        await response.write_eof()
        return response

    async def _echo(self, request: web.Request) -> web.Response:
        return web.Response(body=b"path:" + request.raw_path.encode())


@pytest.fixture
def server() -> Iterator[Server]:
    srv = Server()
    srv.start()
    try:
        yield srv
    finally:
        srv.stop()


# -- helpers ------------------------------------------------------------------------------------


def manifest_lines(out: Path) -> list[dict[str, Any]]:
    """Every line of the manifest, parsed strictly (a torn or non-JSON line fails the test)."""
    text = (out / "manifest.jsonl").read_text(encoding="utf-8")
    return [json.loads(line) for line in text.splitlines()]


def records(out: Path) -> list[dict[str, Any]]:
    """The manifest's records, after checking its header and each record's shape."""
    lines = manifest_lines(out)
    assert lines, "empty manifest"
    header = lines[0]
    for key, value in HEADER.items():
        assert header.get(key) == value, f"bad manifest header: {header}"
    for rec in lines[1:]:
        missing = RECORD_KEYS - set(rec)
        assert not missing, f"record without {missing}: {rec}"
        assert isinstance(rec["line"], int) and isinstance(rec["url"], str), rec
        assert rec["status"] is None or isinstance(rec["status"], int), rec
        assert isinstance(rec["bytes"], int) and isinstance(rec["attempts"], int), rec
        # (that "elapsed" is a number in every record is test_every_record_has_the_documented_types)
        assert rec["error"] is None or isinstance(rec["error"], str), rec
    return lines[1:]


def is_success(rec: dict[str, Any]) -> bool:
    return rec["status"] is not None and 200 <= rec["status"] < 300 and rec["error"] is None


def by_url(recs: list[dict[str, Any]]) -> dict[str, dict[str, Any]]:
    out: dict[str, dict[str, Any]] = {}
    for rec in recs:
        assert rec["url"] not in out, f"two records for {rec['url']}"
        out[rec["url"]] = rec
    return out


def inside(out: Path, rec: dict[str, Any]) -> Path:
    """The record's file, checked to be inside ``out``; its bytes and sha256 match the record."""
    assert isinstance(rec["file"], str) and rec["file"], rec
    assert not os.path.isabs(rec["file"]), rec
    path = (out / rec["file"]).resolve()
    assert path.is_relative_to(out.resolve()) and path != out.resolve(), f"{path} is not inside {out}"
    assert path.is_file(), f"{path} is missing"
    data = path.read_bytes()
    assert len(data) == rec["bytes"], rec
    assert rec["sha256"] is None or hashlib.sha256(data).hexdigest() == rec["sha256"], rec
    return path


def snapshot(root: Path, skip: Path) -> dict[str, tuple[int, int]]:
    """Every path under ``root`` (but not under ``skip``) with its size and mtime."""
    seen: dict[str, tuple[int, int]] = {}
    for dirpath, dirnames, filenames in os.walk(root):
        if Path(dirpath).resolve() == skip.resolve():
            dirnames[:] = []
            continue
        for name in dirnames + filenames:
            p = Path(dirpath) / name
            if p.resolve() == skip.resolve():
                continue
            st = p.lstat()
            seen[str(p)] = (st.st_size, st.st_mtime_ns)
    return seen


def gs_cli(*args: str, timeout: float = 120) -> subprocess.CompletedProcess[str]:
    return subprocess.run([*GS, *args], capture_output=True, text=True, timeout=timeout, env=cli_env())


def closed_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


# -- the manifest's records ---------------------------------------------------------------------


@pytest.mark.timeout(60)
def test_every_record_has_the_documented_types(server: Server, tmp_path: Path) -> None:
    """Success, 4xx, retried 5xx, timeout, connection error, malformed line: all the same shape."""
    out = tmp_path / "out"
    urls = [
        server.url("/item/1"),
        server.url("/status/404/shape"),
        server.url("/flaky/shape?fail=100&status=503&retry_after=0"),
        server.url("/slow/shape"),
        f"http://127.0.0.1:{closed_port()}/x",
        "not a url",
    ]
    gs.fetch(urls, out, timeout=0.2, retries=1)
    recs = records(out)
    assert sorted(r["line"] for r in recs) == [1, 2, 3, 4, 5, 6]
    for rec in recs:
        assert isinstance(rec["elapsed"], (int, float)) and rec["elapsed"] >= 0, rec
        if is_success(rec):
            assert isinstance(rec["file"], str) and isinstance(rec["sha256"], str), rec
        else:
            assert isinstance(rec["error"], str) and rec["error"], rec


# -- 1. many small bodies -----------------------------------------------------------------------


@pytest.mark.timeout(60)
def test_200_small_bodies_fetched_with_matching_files_and_manifest(server: Server, tmp_path: Path) -> None:
    out = tmp_path / "out"  # created by fetch
    urls = [server.url(f"/item/{i}") for i in range(200)]
    report = gs.fetch(urls, out)
    recs = records(out)
    assert len(recs) == 200
    assert len(manifest_lines(out)) == 201
    table = by_url(recs)
    assert set(table) == set(urls)
    files = set()
    for i, url in enumerate(urls):
        rec = table[url]
        assert is_success(rec) and rec["status"] == 200, rec
        assert rec["line"] == i + 1, rec
        assert rec["attempts"] == 1, rec
        path = inside(out, rec)
        assert path.read_bytes() == item_body(i)
        assert rec["sha256"] == hashlib.sha256(item_body(i)).hexdigest()
        files.add(path)
    assert len(files) == 200
    assert server.total() == 200
    assert (report.ok, report.failed, report.skipped) == (200, 0, 0)
    assert report.bytes == sum(len(item_body(i)) for i in range(200))
    assert isinstance(report.wall, float) and report.wall > 0
    text = str(report)
    assert isinstance(text, str) and "200" in text


@pytest.mark.timeout(60)
def test_without_checksums_bodies_are_whole_and_records_say_null(server: Server, tmp_path: Path) -> None:
    urls = [server.url(f"/item/{i}") for i in range(20)] + [server.url("/big")]
    report = gs.fetch(urls, tmp_path / "out", checksum=False)
    assert report.ok == 21
    table = by_url(records(tmp_path / "out"))
    for i in range(20):
        rec = table[urls[i]]
        assert rec["sha256"] is None and inside(tmp_path / "out", rec).read_bytes() == item_body(i)
    big = table[urls[-1]]
    assert big["sha256"] is None and inside(tmp_path / "out", big).read_bytes() == big_body()
    listing = tmp_path / "urls.txt"
    listing.write_text("\n".join(urls[:3]) + "\n")
    done = gs_cli("fetch", str(listing), "--out", str(tmp_path / "cli"), "--no-checksum", "--no-progress")
    assert done.returncode == 0, done.stderr
    assert [r["sha256"] for r in records(tmp_path / "cli")] == [None, None, None]


# -- 2. retries ---------------------------------------------------------------------------------


@pytest.mark.timeout(60)
def test_503_twice_then_200_honours_retry_after(server: Server, tmp_path: Path) -> None:
    path = "/flaky/ra?fail=2&status=503&retry_after=1"
    report = gs.fetch([server.url(path)], tmp_path / "out")
    (rec,) = records(tmp_path / "out")
    assert is_success(rec) and rec["status"] == 200, rec
    assert rec["attempts"] == 3, rec
    assert inside(tmp_path / "out", rec).read_bytes() == b"finally ra"
    times = server.times(path)
    assert len(times) == 3, times
    gaps = [b - a for a, b in itertools.pairwise(times)]
    assert all(gap >= 0.9 for gap in gaps), f"Retry-After: 1 not honoured, gaps between attempts {gaps}"
    assert report.ok == 1 and report.failed == 0


@pytest.mark.timeout(60)
@pytest.mark.parametrize("status", [429, 500, 502])
def test_429_and_5xx_are_retried(server: Server, tmp_path: Path, status: int) -> None:
    path = f"/flaky/s{status}?fail=1&status={status}&retry_after=0"
    gs.fetch([server.url(path)], tmp_path / "out")
    (rec,) = records(tmp_path / "out")
    assert is_success(rec), rec
    assert rec["attempts"] == 2, rec
    assert server.count(path) == 2


@pytest.mark.timeout(60)
def test_retries_give_up_after_retries_more_attempts(server: Server, tmp_path: Path) -> None:
    path = "/flaky/never?fail=100&status=503&retry_after=0"
    report = gs.fetch([server.url(path)], tmp_path / "out", retries=2)
    (rec,) = records(tmp_path / "out")
    assert not is_success(rec) and rec["status"] == 503, rec
    assert rec["error"] and "503" in rec["error"], rec
    assert rec["attempts"] == 3, rec
    assert server.count(path) == 3
    assert report.failed == 1 and report.ok == 0


@pytest.mark.timeout(60)
def test_connection_error_is_retried_and_recorded(tmp_path: Path) -> None:
    url = f"http://127.0.0.1:{closed_port()}/x"
    report = gs.fetch([url], tmp_path / "out", retries=1)
    (rec,) = records(tmp_path / "out")
    assert rec["status"] is None and rec["error"], rec
    assert rec["attempts"] == 2, rec
    assert report.failed == 1


# -- 3. other 4xx are not retried ---------------------------------------------------------------


@pytest.mark.timeout(60)
@pytest.mark.parametrize("code", [404, 403, 410])
def test_other_4xx_recorded_once_not_retried(server: Server, tmp_path: Path, code: int) -> None:
    path = f"/status/{code}/k"
    report = gs.fetch([server.url(path)], tmp_path / "out")
    (rec,) = records(tmp_path / "out")
    assert rec["status"] == code, rec
    assert rec["attempts"] == 1, rec
    assert rec["error"] and str(code) in rec["error"], rec
    assert not is_success(rec)
    assert server.count(path) == 1
    assert report.failed == 1 and report.ok == 0


# -- 4. timeouts --------------------------------------------------------------------------------


@pytest.mark.timeout(60)
def test_slow_server_times_out_per_attempt(server: Server, tmp_path: Path) -> None:
    path = "/slow/t"
    start = time.monotonic()
    report = gs.fetch([server.url(path)], tmp_path / "out", timeout=0.2, retries=1)
    took = time.monotonic() - start
    (rec,) = records(tmp_path / "out")
    assert rec["status"] is None, rec
    assert rec["error"] and ("timeout" in rec["error"].lower() or "timed out" in rec["error"].lower()), rec
    assert rec["attempts"] == 2, rec
    assert server.count(path) == 2
    assert took < 5, f"timeout=0.2 with one retry took {took:.1f}s"
    assert report.failed == 1
    assert not any(
        p.is_file() and p.name not in ("manifest.jsonl", ".manifest.jsonl.claims") and not p.name.endswith(".part")
        for p in (tmp_path / "out").rglob("*")
    ), "a failed URL left a file under a final name"


# -- 5. names never leave the directory and never collide ---------------------------------------


@pytest.mark.timeout(60)
def test_odd_paths_stay_inside_out_dir_and_never_collide(server: Server, tmp_path: Path) -> None:
    # Three levels below tmp_path: even a naive join of up to three '..' lands inside tmp_path.
    out = tmp_path / "p1" / "p2" / "out"
    abs_target = tmp_path / "abs-victim"
    paths = [
        "/../../etc/passwd",
        "/../../../victim-dotdot",
        "/%2e%2e%2f%2e%2e%2f%2e%2e%2fvictim-enc",
        "/%2E%2E/%2E%2E/victim-enc-upper",
        "/..%2f..%2f..%2fvictim-mixed",
        "/" + str(abs_target),  # //tmp/...: an absolute path
        "/%2F" + str(abs_target)[1:] + "-enc",
        "/a%00b",
        "/nul%00../../x",
        "/" + "L" * 1200,
        "/" + "é" * 600,
        "/dir/" + "n" * 300 + "/" + "m" * 300,
        "/a?x=1",
        "/a?x=2",
        "/A",
        "/a",
        "/x/y",
        "/x_y",
        "/x%2Fy",
        "/",
        "/dir/",
        "/.",
        "/..",
        "/.hidden",
        "/manifest.jsonl",
        "/manifest.jsonl.part",
        "/con",
        "/a%20b",
    ]
    urls = [server.url(p) for p in paths]
    assert len(set(urls)) == len(urls)
    out.mkdir(parents=True)  # (its creation by fetch is test 1's business; here it would touch p2's mtime)
    before = snapshot(tmp_path, out)
    report = gs.fetch(urls, out)
    after = snapshot(tmp_path, out)
    assert after == before, f"files appeared or changed outside out_dir: {set(after) ^ set(before)}"
    assert not abs_target.exists()
    recs = records(out)
    table = by_url(recs)
    assert set(table) == set(urls)
    files: dict[Path, str] = {}
    for url in urls:
        rec = table[url]
        assert is_success(rec), rec
        path = inside(out, rec)
        assert path.name != "manifest.jsonl", rec
        assert path not in files, f"{url} and {files.get(path)} share the file {path}"
        files[path] = url
        assert path.read_bytes().startswith(b"path:"), rec
    assert report.ok == len(urls)
    # The manifest is still the manifest.
    assert manifest_lines(out)[0]["gearshift"] == "fetch-manifest"


# -- 6. malformed, blank and comment lines ------------------------------------------------------


@pytest.mark.timeout(60)
def test_malformed_lines_recorded_with_their_line_numbers(server: Server, tmp_path: Path) -> None:
    good = [server.url(f"/item/{i}") for i in range(3)]
    lines = [
        "",  # 1 blank
        "# a comment",  # 2
        good[0],  # 3
        "not a url",  # 4
        "ftp://x/y",  # 5
        "   ",  # 6 blank
        "http://",  # 7
        good[1] + "\n",  # 8
        "   # indented comment",  # 9
        "  " + good[2] + "  ",  # 10
    ]
    report = gs.fetch(lines, tmp_path / "out")
    recs = records(tmp_path / "out")
    assert sorted(r["line"] for r in recs) == [3, 4, 5, 7, 8, 10]
    line = {r["line"]: r for r in recs}
    for n, i in ((3, 0), (8, 1), (10, 2)):
        assert is_success(line[n]), line[n]
        assert line[n]["url"] == good[i], line[n]
        assert inside(tmp_path / "out", line[n]).read_bytes() == item_body(i)
    for n in (4, 5, 7):
        rec = line[n]
        assert rec["status"] is None and rec["error"], rec
        assert rec["file"] is None and rec["sha256"] is None, rec
    assert report.ok == 3 and report.failed == 3 and report.skipped == 0
    assert server.total() == 3


# -- 7. refusals and foreign files --------------------------------------------------------------


FOREIGN = b'{"hello": 1}\nmy own notes, not a manifest\n'


@pytest.mark.timeout(60)
def test_foreign_manifest_refused_and_untouched(server: Server, tmp_path: Path) -> None:
    out = tmp_path / "out"
    out.mkdir()
    manifest = out / "manifest.jsonl"
    manifest.write_bytes(FOREIGN)
    stat = manifest.stat()
    for resume in (False, True):
        with pytest.raises(ValueError) as info:
            gs.fetch([server.url("/item/1")], out, resume=resume)
        assert "manifest.jsonl" in str(info.value), str(info.value)
    assert manifest.read_bytes() == FOREIGN
    assert manifest.stat().st_mtime_ns == stat.st_mtime_ns
    assert sorted(p.name for p in out.iterdir()) == ["manifest.jsonl"]
    assert server.total() == 0


@pytest.mark.timeout(60)
def test_existing_manifest_without_resume_refused(server: Server, tmp_path: Path) -> None:
    out = tmp_path / "out"
    gs.fetch([server.url("/item/1")], out)
    manifest = out / "manifest.jsonl"
    content = manifest.read_bytes()
    with pytest.raises(ValueError) as info:
        gs.fetch([server.url("/item/2")], out)
    message = str(info.value)
    assert "manifest.jsonl" in message and "resume" in message, message
    assert manifest.read_bytes() == content
    assert server.total() == 1


@pytest.mark.timeout(60)
def test_file_the_manifest_does_not_list_is_never_overwritten(server: Server, tmp_path: Path) -> None:
    url = server.url("/item/7")
    first = tmp_path / "first"
    gs.fetch([url], first)
    (rec,) = records(first)
    name = rec["file"]
    second = tmp_path / "second"
    foreign = second / name
    foreign.parent.mkdir(parents=True)
    foreign.write_bytes(b"my precious file")
    report = gs.fetch([url, server.url("/item/8")], second)
    assert foreign.read_bytes() == b"my precious file"
    table = by_url(records(second))
    assert not is_success(table[url]) and table[url]["error"], table[url]
    assert is_success(table[server.url("/item/8")])
    assert report.failed == 1 and report.ok == 1


# -- resume (API) -------------------------------------------------------------------------------


@pytest.mark.timeout(60)
def test_resume_skips_successes_and_retries_the_rest(server: Server, tmp_path: Path) -> None:
    out = tmp_path / "out"
    urls = [server.url("/item/1"), server.url("/status/404/r"), server.url("/item/2")]
    first = gs.fetch(urls, out)
    assert (first.ok, first.failed) == (2, 1)
    more = [*urls, server.url("/item/3")]
    second = gs.fetch(more, out, resume=True)
    assert second.skipped == 2 and second.ok == 1 and second.failed == 1, str(second)
    assert server.count("/item/1") == 1 and server.count("/item/2") == 1
    assert server.count("/status/404/r") == 2 and server.count("/item/3") == 1
    recs = records(out)
    assert len(recs) == 3 + 2
    successes = collections.Counter(r["url"] for r in recs if is_success(r))
    assert successes == {urls[0]: 1, urls[2]: 1, more[3]: 1}
    for rec in recs:
        if is_success(rec):
            inside(out, rec)


# -- 8. resume after SIGKILL through the command line -------------------------------------------


@pytest.mark.timeout(120)
def test_cli_resume_after_sigkill_each_url_succeeds_exactly_once(server: Server, tmp_path: Path) -> None:
    n = 2000
    urls = [server.url(f"/item/{i}?delay=10") for i in range(n)]
    urls_file = tmp_path / "urls.txt"
    urls_file.write_text("".join(u + "\n" for u in urls))
    out = tmp_path / "out"
    manifest = out / "manifest.jsonl"
    args = [*GS, "fetch", str(urls_file), "--out", str(out), "--concurrency", "50", "--no-progress"]
    proc = subprocess.Popen(args, stdout=subprocess.PIPE, stderr=subprocess.PIPE, env=cli_env())
    try:
        wait_for_lines(str(manifest), 201, proc, timeout=60)
        assert proc.poll() is None, "the run ended before it could be killed"
        proc.send_signal(signal.SIGKILL)
        proc.wait(30)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait(30)
        proc.stdout.close()  # type: ignore[union-attr]
        proc.stderr.close()  # type: ignore[union-attr]
    assert proc.returncode == -signal.SIGKILL
    killed_at = sum(1 for r in manifest.read_bytes().splitlines() if r.strip()) - 1
    assert killed_at < n, "the run finished before the kill"
    done = gs_cli("fetch", str(urls_file), "--out", str(out), "--concurrency", "50", "--resume", "--no-progress")
    assert done.returncode == 0, done.stderr
    recs = records(out)
    successes = collections.Counter(r["url"] for r in recs if is_success(r))
    assert set(successes) == set(urls), f"{len(set(urls) - set(successes))} URLs without a success record"
    dupes = {u: c for u, c in successes.items() if c != 1}
    assert not dupes, f"{len(dupes)} URLs with more than one success record, e.g. {next(iter(dupes.items()))}"
    listed: set[Path] = set()
    index = {u: i for i, u in enumerate(urls)}
    for rec in recs:
        if is_success(rec):
            path = inside(out, rec)
            assert path.read_bytes() == item_body(index[rec["url"]]), rec
            listed.add(path)
    assert len(listed) == n
    for path in out.rglob("*"):
        if not path.is_file() or path.name in ("manifest.jsonl", ".manifest.jsonl.claims"):
            continue
        resolved = path.resolve()
        if path.name.endswith(".part"):
            assert resolved not in listed, f"the manifest lists a .part file: {path}"
        else:
            assert resolved in listed, f"a file under a final name that the manifest does not list: {path}"


# -- 9. command-line exit codes -----------------------------------------------------------------


@pytest.mark.timeout(60)
def test_cli_exit_0_when_all_succeed(server: Server, tmp_path: Path) -> None:
    urls_file = tmp_path / "urls.txt"
    urls_file.write_text("# three\n" + "".join(server.url(f"/item/{i}") + "\n" for i in range(3)))
    done = gs_cli("fetch", str(urls_file), "--out", str(tmp_path / "out"), "--no-progress")
    assert done.returncode == 0, done.stderr
    assert sum(is_success(r) for r in records(tmp_path / "out")) == 3


@pytest.mark.timeout(60)
def test_cli_exit_1_when_some_fail(server: Server, tmp_path: Path) -> None:
    urls_file = tmp_path / "urls.txt"
    urls_file.write_text(f"{server.url('/item/1')}\n{server.url('/status/404/c')}\n{server.url('/item/2')}\n")
    done = gs_cli("fetch", str(urls_file), "--out", str(tmp_path / "out"), "--no-progress", "--retries", "1")
    assert done.returncode == 1, done.stderr
    recs = records(tmp_path / "out")
    assert sorted(r["status"] for r in recs) == [200, 200, 404]
    assert server.count("/status/404/c") == 1


@pytest.mark.timeout(60)
def test_cli_exit_2_for_a_foreign_manifest(server: Server, tmp_path: Path) -> None:
    out = tmp_path / "out"
    out.mkdir()
    (out / "manifest.jsonl").write_bytes(FOREIGN)
    urls_file = tmp_path / "urls.txt"
    urls_file.write_text(server.url("/item/1") + "\n")
    for extra in ([], ["--resume"]):
        done = gs_cli("fetch", str(urls_file), "--out", str(out), "--no-progress", *extra)
        assert done.returncode == 2, done.stderr
        assert len(done.stderr.strip().splitlines()) == 1, done.stderr
        assert "Traceback" not in done.stderr and "manifest.jsonl" in done.stderr, done.stderr
    assert (out / "manifest.jsonl").read_bytes() == FOREIGN
    assert server.total() == 0


@pytest.mark.timeout(60)
def test_cli_exit_2_for_an_existing_manifest_without_resume(server: Server, tmp_path: Path) -> None:
    out = tmp_path / "out"
    urls_file = tmp_path / "urls.txt"
    urls_file.write_text(server.url("/item/1") + "\n")
    assert gs_cli("fetch", str(urls_file), "--out", str(out), "--no-progress").returncode == 0
    content = (out / "manifest.jsonl").read_bytes()
    done = gs_cli("fetch", str(urls_file), "--out", str(out), "--no-progress")
    assert done.returncode == 2, done.stderr
    assert len(done.stderr.strip().splitlines()) == 1 and "resume" in done.stderr, done.stderr
    assert (out / "manifest.jsonl").read_bytes() == content


@pytest.mark.timeout(60)
@pytest.mark.parametrize(
    "args",
    [
        ["fetch", "URLS"],  # no --out
        ["fetch", "URLS", "--out", "OUT", "--retries", "-1"],
        ["fetch", "URLS", "--out", "OUT", "--timeout", "0"],
        ["fetch", "URLS", "--out", "OUT", "--concurrency", "0"],
        ["fetch", "URLS", "--out", "OUT", "--rate", "fast"],
        ["fetch", "missing-file.txt", "--out", "OUT"],
    ],
)
def test_cli_exit_2_on_usage_errors(tmp_path: Path, args: list[str]) -> None:
    urls_file = tmp_path / "urls.txt"
    urls_file.write_text("http://127.0.0.1:9/x\n")
    subst = {"URLS": str(urls_file), "OUT": str(tmp_path / "out"), "missing-file.txt": str(tmp_path / "nope.txt")}
    done = gs_cli(*[subst.get(a, a) for a in args])
    assert done.returncode == 2, (done.returncode, done.stderr)
    assert "Traceback" not in done.stderr
    assert not (tmp_path / "out" / "manifest.jsonl").exists()


@pytest.mark.timeout(60)
@pytest.mark.parametrize(("sig", "code"), [(signal.SIGINT, 130), (signal.SIGTERM, 143)])
def test_cli_signals_exit_codes_and_a_usable_manifest(
    server: Server, tmp_path: Path, sig: signal.Signals, code: int
) -> None:
    urls = [server.url(f"/item/{i}?delay=50") for i in range(200)]
    urls_file = tmp_path / "urls.txt"
    urls_file.write_text("".join(u + "\n" for u in urls))
    out = tmp_path / "out"
    args = [*GS, "fetch", str(urls_file), "--out", str(out), "--concurrency", "4", "--no-progress"]
    proc = subprocess.Popen(args, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=cli_env())
    try:
        wait_for_lines(str(out / "manifest.jsonl"), 9, proc, timeout=60)
        assert proc.poll() is None, "the run ended before the signal"
        started = time.monotonic()
        proc.send_signal(sig)
        _, err = proc.communicate(timeout=30)
        took = time.monotonic() - started
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.communicate(timeout=30)
    assert proc.returncode == code, err
    assert "Traceback" not in err, err
    assert took < 10, f"took {took:.1f}s to stop after {sig.name}"
    recs = records(out)
    assert 8 <= len(recs) < len(urls)
    for rec in recs:
        if is_success(rec):
            inside(out, rec)
    done = gs_cli("fetch", str(urls_file), "--out", str(out), "--concurrency", "20", "--resume", "--no-progress")
    assert done.returncode == 0, done.stderr
    successes = collections.Counter(r["url"] for r in records(out) if is_success(r))
    assert successes == {u: 1 for u in urls}


# -- 10. from async code ------------------------------------------------------------------------


@pytest.mark.timeout(60)
def test_afetch_from_asyncio_run(server: Server, tmp_path: Path) -> None:
    urls = [server.url(f"/item/{i}") for i in range(20)]

    async def main() -> Any:
        # The caller's loop keeps running while afetch works.
        ticks = 0

        async def tick() -> None:
            nonlocal ticks
            while True:
                ticks += 1
                await asyncio.sleep(0.001)

        ticker = asyncio.create_task(tick())
        try:
            report = await gs.afetch(urls, tmp_path / "out", concurrency=5)
        finally:
            ticker.cancel()
        return report, ticks

    report, ticks = asyncio.run(main())
    assert report.ok == 20 and report.failed == 0
    assert ticks > 0
    table = by_url(records(tmp_path / "out"))
    for i, url in enumerate(urls):
        assert inside(tmp_path / "out", table[url]).read_bytes() == item_body(i)


# -- 11. a big body, streamed -------------------------------------------------------------------


@pytest.mark.timeout(60)
def test_5_mib_body_written_correctly(server: Server, tmp_path: Path) -> None:
    report = gs.fetch([server.url("/big")], tmp_path / "out")
    (rec,) = records(tmp_path / "out")
    assert is_success(rec), rec
    assert rec["bytes"] == BIG and report.bytes == BIG
    assert rec["sha256"] == hashlib.sha256(big_body()).hexdigest()
    assert inside(tmp_path / "out", rec).read_bytes() == big_body()


# -- rate limits --------------------------------------------------------------------------------


@pytest.mark.timeout(60)
@pytest.mark.parametrize("option", ["rate", "per_host_rate"])
def test_rate_limits_spread_the_requests(server: Server, tmp_path: Path, option: str) -> None:
    paths = [f"/item/{i}" for i in range(11)]
    gs.fetch([server.url(p) for p in paths], tmp_path / "out", concurrency=10, **{option: "20/s"})
    times = sorted(t for p in paths for t in server.times(p))
    assert len(times) == 11
    span = times[-1] - times[0]
    # 11 requests at 20/s (a burst of at most a few): at least ~0.4 s from first to last.
    assert span >= 0.35, f"11 requests at 20/s arrived within {span:.3f}s"


# -- memory -------------------------------------------------------------------------------------

PEAK_SCRIPT = """
import importlib, sys, tracemalloc
import gearshift as gs
fetch_module = importlib.import_module("gearshift.fetch")
base, n, out = sys.argv[1], int(sys.argv[2]), sys.argv[3]
held = []
close = fetch_module.RecordWriter.close
def close_and_measure(self):  # the end of the run, with everything the run holds still alive
    held.append(tracemalloc.get_traced_memory()[0])
    close(self)
fetch_module.RecordWriter.close = close_and_measure
tracemalloc.start()
report = gs.fetch((f"{base}/item/{i}" for i in range(n)), out, concurrency=50)
assert report.ok == n, str(report)
print(tracemalloc.get_traced_memory()[1], held[0])
"""


@pytest.mark.timeout(180)
def test_memory_stays_flat_in_the_number_of_urls(server: Server, tmp_path: Path) -> None:
    # The client in a process of its own (the test server's own bookkeeping grows per request).
    peaks, held = {}, {}
    for n in (1000, 5000):
        proc = subprocess.run([sys.executable, "-c", PEAK_SCRIPT, server.base, str(n), str(tmp_path / f"out{n}")],
                              capture_output=True, text=True, timeout=150, env=cli_env())
        assert proc.returncode == 0, proc.stderr[-2000:]
        peaks[n], held[n] = map(int, proc.stdout.split()[-2:])
        assert len(list((tmp_path / f"out{n}").iterdir())) == n + 2  # bodies, manifest, claims
    # Five times the URLs: what the run holds at its end is the same (measured: within 10 KiB), and
    # so is the peak. Earlier versions grew ~1.9 MiB: a set of this run's file names, and 3.11's
    # pathlib interning every name it joins (its table only grows).
    assert held[5000] - held[1000] < 150 << 10, held
    assert peaks[5000] < peaks[1000] * 1.1 + (256 << 10), peaks
