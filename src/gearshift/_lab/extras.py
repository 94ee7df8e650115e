"""Claims that need optional tools: Cython and a C compiler, aiofiles, HTTP clients.

Each says "not measurable here" with the reason when its tool is missing, rather than guess.
"""

from __future__ import annotations

import asyncio
import importlib
import importlib.util
import os
import shutil
import subprocess
import sys
import tempfile
import time
from concurrent.futures import ThreadPoolExecutor
from types import ModuleType
from typing import Any

from gearshift._lab._core import Context, Effect, Finding, Verdict, combine, experiment, fmt, judge, q
from gearshift._lab._work import xorshift
from gearshift._lab.cpu import timed

KERNEL_PYX = """# cython: language_level=3
cdef unsigned long long _mix(unsigned long long n) noexcept nogil:
    cdef unsigned long long x = 88172645463325252ULL
    cdef unsigned long long i
    for i in range(n):
        x ^= x << 13
        x ^= x >> 7
        x ^= x << 17
    return x


def spin_gil(unsigned long long n):
    return _mix(n)


def spin_nogil(unsigned long long n):
    cdef unsigned long long out
    with nogil:
        out = _mix(n)
    return out
"""

_BUILD = """
import sys
from Cython.Build import cythonize
from setuptools import Distribution, Extension
folder, name = sys.argv[1], sys.argv[2]
ext = Extension(name, [folder + "/" + name + ".pyx"], extra_compile_args=["-O2"])
dist = Distribution({"ext_modules": cythonize([ext], quiet=True, build_dir=folder + "/c")})
cmd = dist.get_command_obj("build_ext")
cmd.build_lib = folder
cmd.build_temp = folder + "/tmp"
dist.run_command("build_ext")
"""


def missing_for_cython() -> str | None:
    """Why the kernel cannot be compiled here, or None."""
    if importlib.util.find_spec("Cython") is None:
        return "Cython is not installed (pip install cython)"
    if importlib.util.find_spec("setuptools") is None:
        return "setuptools is not installed (it drives the compiler)"
    compiler = os.environ.get("CC", "cc").split()[0]
    if shutil.which(compiler) is None and shutil.which("gcc") is None:
        return "no C compiler (cc or gcc) on PATH"
    return None


def compile_kernel(folder: str) -> ModuleType:
    """Cythonize and compile the kernel in a child interpreter (its compiler output stays there); import it."""
    name = f"gs_lab_kernel_{os.getpid()}"
    with open(os.path.join(folder, f"{name}.pyx"), "w", encoding="utf-8") as f:
        f.write(KERNEL_PYX)
    done = subprocess.run([sys.executable, "-c", _BUILD, folder, name], capture_output=True, text=True,
                          timeout=300, stdin=subprocess.DEVNULL)
    if done.returncode != 0:
        last = (done.stderr.strip().splitlines() or ["?"])[-1]
        raise RuntimeError(f"compiling the kernel failed: {last}")
    sys.path.insert(0, folder)
    try:
        importlib.invalidate_caches()
        return importlib.import_module(name)
    finally:
        sys.path.remove(folder)


@experiment("compiled-kernel", "Consider Cython to speed up Python without writing C; with nogil, threads scale")
def compiled_kernel(ctx: Context) -> Finding:
    missing = missing_for_cython()
    if missing:
        return ctx.finding("not measurable here", [], missing,
                           "install Cython and a C compiler to compare; NumPy, hashlib and zlib also release the GIL")
    with tempfile.TemporaryDirectory(prefix="gearshift-lab-", ignore_cleanup_errors=True) as folder:
        start = time.perf_counter()
        kernel = compile_kernel(folder)
        compile_s = time.perf_counter() - start
    n_py = ctx.size.n(40_000, 2000)
    assert kernel.spin_gil(n_py) == kernel.spin_nogil(n_py) == xorshift(n_py), "the kernel computes otherwise"
    w = ctx.workers
    py_t, cy_t, serial_t, gil_t, nogil_t = [], [], [], [], []
    n_c = n_py * 100
    while timed(lambda: kernel.spin_gil(n_c)) < 0.005 * ctx.size.factor and n_c < 10**10:  # noqa: B023
        n_c *= 4  # about 5 ms a call (quick), so threads have something to share
    tasks = [n_c] * (2 * w)
    with ThreadPoolExecutor(w) as pool:
        for _ in range(ctx.repeats):
            py_t.append(timed(lambda: xorshift(n_py)) / n_py * 1e9)
            cy_t.append(timed(lambda: kernel.spin_gil(n_py)) / n_py * 1e9)
            serial_t.append(timed(lambda: [kernel.spin_nogil(t) for t in tasks]))
            gil_t.append(timed(lambda: list(pool.map(kernel.spin_gil, tasks))))
            nogil_t.append(timed(lambda: list(pool.map(kernel.spin_nogil, tasks))))
    p, c = q("Python loop", "ns/round", py_t), q("Cython loop", "ns/round", cy_t)
    s, g, f = q("Cython, serial", "s", serial_t), q(f"{w} threads, GIL held", "s", gil_t), \
        q(f"{w} threads, nogil", "s", nogil_t)
    faster, scale, held = Effect.ratio(p, c), Effect.ratio(s, f), Effect.ratio(s, g)
    parts: list[Verdict] = [judge(faster, 1.0, "above")]
    parts.append(judge(scale, 1.0, "above") if ctx.machine.cores > 1 else "not measurable here")
    return ctx.finding(
        combine(parts),
        [p, c, faster.q("Cython / Python speed"), s, g, f,
         scale.q("nogil thread speedup"), held.q("GIL-holding thread speedup"),
         q("compile time", "s", compile_s)],
        f"the same xorshift loop: Cython {faster.value:.0f}x faster than Python per round; {w} threads gave "
        f"{scale.value:.2f}x with nogil, {held.value:.2f}x holding the GIL (compiled here in {compile_s:.1f}s)",
        "a hot pure-Python loop: compile it (Cython) and release the GIL (nogil); then threads, not processes, "
        "run it in parallel",
        faster, scale,
    )


async def _write_files(folder: str, count: int, size: int, use_aiofiles: bool) -> tuple[float, float]:
    """Total time and the worst loop lag (a 1 ms ticker) while ``count`` files are written."""
    worst = [0.0]
    done = False
    block = os.urandom(size)

    async def ticker() -> None:
        while not done:
            t0 = time.perf_counter()
            await asyncio.sleep(0.001)
            worst[0] = max(worst[0], time.perf_counter() - t0 - 0.001)

    probe = asyncio.create_task(ticker())
    await asyncio.sleep(0.005)
    worst[0] = 0.0
    start = time.perf_counter()
    try:
        for i in range(count):
            path = os.path.join(folder, f"f{i}")
            if use_aiofiles:
                import aiofiles

                async with aiofiles.open(path, "wb") as af:
                    await af.write(block)
            else:
                with open(path, "wb") as bf:
                    bf.write(block)
        took = time.perf_counter() - start
    finally:
        done = True
        await probe
    return took, worst[0]


@experiment("aiofiles", "Consider aiofiles to handle local files in async applications")
def aiofiles_claim(ctx: Context) -> Finding:
    if importlib.util.find_spec("aiofiles") is None:
        return ctx.finding("not measurable here", [], "aiofiles is not installed (pip install aiofiles)",
                           "without it, asyncio.to_thread around file calls keeps the loop free")
    count, size = ctx.size.n(100, 10), 256 * 1024
    block_t, aio_t, block_lag, aio_lag = [], [], [], []
    with tempfile.TemporaryDirectory(prefix="gearshift-lab-") as folder:
        for _ in range(ctx.repeats):
            took, lag = asyncio.run(_write_files(folder, count, size, False))
            block_t.append(took)
            block_lag.append(lag * 1000)
            took, lag = asyncio.run(_write_files(folder, count, size, True))
            aio_t.append(took)
            aio_lag.append(lag * 1000)
    bl, al = q("loop lag, blocking writes", "ms", block_lag), q("loop lag, aiofiles", "ms", aio_lag)
    bt, at = q("blocking writes", "s", block_t), q("aiofiles writes", "s", aio_t)
    freer, cost = Effect.ratio(bl, al), Effect.ratio(at, bt)
    return ctx.finding(
        judge(freer, 1.0, "above"), [bl, al, bt, at, cost.q("aiofiles time / blocking time")],
        f"{count} files of {size // 1024} KiB written inside async code: the loop stalled up to "
        f"{fmt(bl.median, 'ms')} with blocking writes, {fmt(al.median, 'ms')} with aiofiles, which took "
        f"{cost.value:.2f}x the time",
        "in async code keep file I/O off the loop (aiofiles, or asyncio.to_thread); it costs a thread hop per call",
        freer,
    )


_SERVER = r"""
import asyncio, sys
delay = float(sys.argv[1])
BODY = b"x" * 512
RESP = b"HTTP/1.1 200 OK\r\nContent-Length: 512\r\nContent-Type: text/plain\r\n\r\n" + BODY
async def handle(reader, writer):
    try:
        while True:
            head = await reader.readuntil(b"\r\n\r\n")
            await asyncio.sleep(delay)
            writer.write(RESP)
            await writer.drain()
    except (asyncio.IncompleteReadError, ConnectionError):
        pass
    finally:
        writer.close()
async def main():
    server = await asyncio.start_server(handle, "127.0.0.1", 0, backlog=1024)
    print(server.sockets[0].getsockname()[1], flush=True)
    async with server:
        await server.serve_forever()
asyncio.run(main())
"""


async def _aiohttp_run(url: str, count: int, limit: int) -> None:
    import aiohttp

    sem = asyncio.Semaphore(limit)
    async with aiohttp.ClientSession(connector=aiohttp.TCPConnector(limit=limit)) as session:
        async def one() -> None:
            async with sem, session.get(url) as resp:
                assert len(await resp.read()) == 512

        await asyncio.gather(*(one() for _ in range(count)))


async def _httpx_run(url: str, count: int, limit: int) -> None:
    import httpx

    sem = asyncio.Semaphore(limit)
    async with httpx.AsyncClient(limits=httpx.Limits(max_connections=limit)) as client:
        async def one() -> None:
            async with sem:
                resp = await client.get(url)
                assert len(resp.content) == 512

        await asyncio.gather(*(one() for _ in range(count)))


def _requests_run(url: str, count: int, workers: int) -> None:
    import requests

    with requests.Session() as session:
        def one(_: int) -> None:
            assert len(session.get(url).content) == 512

        if workers == 1:
            for i in range(count):
                one(i)
        else:
            with ThreadPoolExecutor(workers) as pool:
                list(pool.map(one, range(count)))


@experiment("http-clients", "Use async HTTP clients like aiohttp or httpx to make (many) requests")
def http_clients(ctx: Context) -> Finding:
    have = {name: importlib.util.find_spec(name) is not None for name in ("aiohttp", "httpx", "requests")}
    if not (have["aiohttp"] or have["httpx"]) or not have["requests"]:
        lacking = ", ".join(n for n, ok in have.items() if not ok)
        return ctx.finding("not measurable here", [], f"needs requests and aiohttp or httpx; missing: {lacking}",
                           "install them to compare on a local server")
    count, limit, delay = ctx.size.n(200, 20), 20, 0.002
    server = subprocess.Popen([sys.executable, "-c", _SERVER, str(delay)], stdout=subprocess.PIPE,
                              stdin=subprocess.DEVNULL, text=True)
    try:
        assert server.stdout is not None
        url = f"http://127.0.0.1:{int(server.stdout.readline())}/"
        runs: dict[str, Any] = {"requests, one at a time": lambda: _requests_run(url, count, 1),
                                f"requests, {limit} threads": lambda: _requests_run(url, count, limit)}
        if have["aiohttp"]:
            runs["aiohttp"] = lambda: asyncio.run(_aiohttp_run(url, count, limit))
        if have["httpx"]:
            runs["httpx"] = lambda: asyncio.run(_httpx_run(url, count, limit))
        times: dict[str, list[float]] = {k: [] for k in runs}
        for _ in range(ctx.repeats):
            for name, fn in runs.items():
                times[name].append(count / timed(fn))
    finally:
        server.terminate()
        server.wait()
    rates = [q(name, "requests/s", v) for name, v in times.items()]
    serial = rates[0]
    effects = {r.name: Effect.ratio(r, serial) for r in rates[2:]}  # rates: higher is better
    parts = [judge(e, 1.0, "above") for e in effects.values()]
    said = ", ".join(f"{name} {e.value:.1f}x" for name, e in effects.items())
    threaded = Effect.ratio(rates[1], serial)
    return ctx.finding(
        combine(parts), [*rates, *(e.q(f"{n} / requests") for n, e in effects.items())],
        f"{count} GETs from a local server answering in {delay * 1000:.0f} ms, {limit} at once: {said} the rate of "
        f"requests one at a time ({fmt(serial.median, 'requests/s')}); requests in {limit} threads "
        f"{threaded.value:.1f}x",
        "many requests from async code: an async client (aiohttp, httpx) with a concurrency limit",
        *effects.values(),
    )
