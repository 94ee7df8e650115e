"""The fetch benchmark (issue 15): many URLs from a local server into files.

    python bench/fetch.py [--repeat N] [--small N] [--big N]

The server (aiohttp, in a process of its own on 127.0.0.1) answers small bodies (~200 B) and
1 MiB ones. Contenders, interleaved (the order rotates each repeat), medians:
gs.fetch (concurrency found by measurement; uvloop when installed, and again on asyncio's own
loop), gs.fetch(concurrency=100), a raw aiohttp loop
behind a semaphore of 100 that also writes each body to a file (and the same hashing each
body, as gs.fetch does for its manifest), httpx.AsyncClient (when
installed) and requests in a ThreadPoolExecutor(32) (when installed), the last two writing
files too. Ratios are the raw aiohttp loop's time over each one's.
"""

from __future__ import annotations

import argparse
import asyncio
import concurrent.futures as cf
import multiprocessing
import os
import platform
import shutil
import statistics
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

from peers import have

import gearshift as gs

BIG = 1 << 20


def _serve(port_box: multiprocessing.Queue) -> None:  # type: ignore[type-arg]
    from aiohttp import web

    small = b"x" * 200
    big = b"y" * BIG

    async def handler(request: web.Request) -> web.Response:
        return web.Response(body=big if request.match_info["name"].startswith("big") else small)

    async def main() -> None:
        app = web.Application()
        app.router.add_get("/{name}", handler)
        runner = web.AppRunner(app, access_log=None)
        await runner.setup()
        site = web.TCPSite(runner, "127.0.0.1", 0, backlog=4096)
        await site.start()
        port_box.put(site._server.sockets[0].getsockname()[1])  # type: ignore[union-attr]
        await asyncio.Event().wait()

    asyncio.run(main())


def raw_aiohttp(urls: list[str], out: Path, checksum: bool = False) -> None:
    import hashlib

    import aiohttp

    async def main() -> None:
        sem = asyncio.Semaphore(100)
        async with aiohttp.ClientSession(connector=aiohttp.TCPConnector(limit=0)) as session:

            async def one(i: int, url: str) -> None:
                async with sem, session.get(url) as resp:
                    body = await resp.read()
                if checksum:
                    hashlib.sha256(body).hexdigest()
                (out / f"{i}.bin").write_bytes(body)

            await asyncio.gather(*(one(i, u) for i, u in enumerate(urls)))

    asyncio.run(main())


def httpx_client(urls: list[str], out: Path) -> None:
    import httpx

    async def main() -> None:
        sem = asyncio.Semaphore(100)
        limits = httpx.Limits(max_connections=100, max_keepalive_connections=100)
        async with httpx.AsyncClient(limits=limits) as client:

            async def one(i: int, url: str) -> None:
                async with sem:
                    resp = await client.get(url)
                (out / f"{i}.bin").write_bytes(resp.content)

            await asyncio.gather(*(one(i, u) for i, u in enumerate(urls)))

    asyncio.run(main())


def requests_threads(urls: list[str], out: Path) -> None:
    import requests

    session = requests.Session()
    adapter = requests.adapters.HTTPAdapter(pool_connections=32, pool_maxsize=32)
    session.mount("http://", adapter)

    def one(pair: tuple[int, str]) -> None:
        i, url = pair
        (out / f"{i}.bin").write_bytes(session.get(url).content)

    with cf.ThreadPoolExecutor(32) as ex:
        list(ex.map(one, enumerate(urls)))


def gs_fetch(concurrency: int | None, loop: str = "auto", checksum: bool = True) -> Callable[[list[str], Path], None]:
    def run(urls: list[str], out: Path) -> None:
        report = gs.fetch(urls, out, concurrency=concurrency, loop=loop, checksum=checksum)
        assert report.ok == len(urls), str(report)

    return run


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--repeat", type=int, default=3)
    p.add_argument("--small", type=int, default=10_000)
    p.add_argument("--big", type=int, default=200)
    args = p.parse_args()
    ctx = multiprocessing.get_context("spawn")
    box: multiprocessing.Queue[int] = ctx.Queue()
    server = ctx.Process(target=_serve, args=(box,), daemon=True)
    server.start()
    try:
        port = box.get(timeout=30)
        base = f"http://127.0.0.1:{port}"
        contenders: dict[str, Callable[[list[str], Path], None]] = {
            "raw aiohttp + semaphore(100)": raw_aiohttp,
            "raw aiohttp, + sha256 of bodies": lambda urls, out: raw_aiohttp(urls, out, checksum=True),
            "gs.fetch (adaptive)": gs_fetch(None),
            "gs.fetch(concurrency=100)": gs_fetch(100),
            "gs.fetch(checksum=False)": gs_fetch(None, checksum=False),
        }
        if have("uvloop"):
            contenders["gs.fetch, loop=asyncio"] = gs_fetch(None, loop="asyncio")
        if have("httpx"):
            contenders["httpx.AsyncClient (100)"] = httpx_client
        if have("requests"):
            contenders["requests, 32 threads"] = requests_threads
        print(f"machine: {platform.machine()}, {os.cpu_count()} cores, Python {platform.python_version()}; "
              f"server: aiohttp in its own process on 127.0.0.1; repeats {args.repeat}")
        for label, urls in (
            (f"{args.small} small responses", [f"{base}/s{i}" for i in range(args.small)]),
            (f"{args.big} responses of 1 MiB", [f"{base}/big{i}" for i in range(args.big)]),
        ):
            times: dict[str, list[float]] = {k: [] for k in contenders}
            names = list(contenders)
            for r in range(args.repeat):
                for name in names[r % len(names):] + names[: r % len(names)]:
                    out = Path(tempfile.mkdtemp(prefix="gsbench-"))
                    try:
                        start = time.perf_counter()
                        contenders[name](urls, out)
                        times[name].append(time.perf_counter() - start)
                    finally:
                        shutil.rmtree(out, ignore_errors=True)
            ref = statistics.median(times[names[0]])
            print(f"\n{label}")
            print(f"  {'contender':32} {'median s':>9} {'req/s':>9} {'vs raw aiohttp':>15}")
            for name in names:
                med = statistics.median(times[name])
                print(f"  {name:32} {med:9.3f} {len(urls) / med:9,.0f} {ref / med:14.2f}x")
    finally:
        server.kill()
        server.join()


if __name__ == "__main__":
    sys.exit(main())
