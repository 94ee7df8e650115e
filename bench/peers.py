"""The contenders: the serial loop, the peers (stdlib, joblib, mpire, raw asyncio) and gearshift.

A contender is ``setup`` (untimed) -> ``run`` (timed) -> ``teardown`` (untimed). Every
timed ``run`` that uses a pool starts it and stops it inside the timed region (a
``with`` block), as one ``gs.map`` call does, so all pay start-up and shut-down alike.
The two "warm" contenders (joblib's reusable loky pool, a reused ``gs.Pool``) are
shown for information and never count as the best peer or the best manual gear.
"""

from __future__ import annotations

import asyncio
import concurrent.futures as cf
import multiprocessing
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from workloads import Workload

import gearshift as gs

#: Contender groups. Only "peer" counts for "best peer"; only "gearshift" for "best manual gear".
BASELINE, PEER, GEARSHIFT, AUTO, INFO = "baseline", "peer", "gearshift", "auto", "info"


@dataclass
class Contender:
    key: str
    label: str
    group: str
    run: Callable[[list[Any]], list[Any]]
    setup: Callable[[list[Any]], None] | None = None
    teardown: Callable[[], None] | None = None
    prepare: Callable[[list[Any]], list[Any]] | None = None
    """Reshapes the items once, untimed (mpire wants argument tuples)."""


def pool_chunksize(n: int, workers: int) -> int:
    """multiprocessing.Pool.map's own default, given to ProcessPoolExecutor too (its default is 1)."""
    chunksize, extra = divmod(n, workers * 4)
    return chunksize + 1 if extra else max(chunksize, 1)


# --- joblib ---------------------------------------------------------------------------


def loky_shutdown() -> None:
    """Stop joblib's reusable loky pool, if one is running (without starting one)."""
    try:
        from joblib.externals.loky import get_reusable_executor, reusable_executor
    except ImportError:
        return
    if getattr(reusable_executor, "_executor", None) is not None:
        get_reusable_executor().shutdown(wait=True)


def _joblib(fn: Callable[..., Any], items: list[Any], n_jobs: int, backend: str | None) -> list[Any]:
    from joblib import Parallel, delayed

    call = delayed(fn)
    return list(Parallel(n_jobs=n_jobs, backend=backend)(call(x) for x in items))


# --- asyncio ----------------------------------------------------------------------------


async def _gather(fn: Callable[[Any], Any], items: list[Any], limit: int) -> list[Any]:
    sem = asyncio.Semaphore(limit)

    async def one(x: Any) -> Any:
        async with sem:
            return await fn(x)

    return list(await asyncio.gather(*(one(x) for x in items)))


def _raw_asyncio(fn: Callable[[Any], Any], items: list[Any], limit: int, uvloop: bool) -> list[Any]:
    factory = None
    if uvloop:
        import uvloop as uv

        factory = uv.new_event_loop
    with asyncio.Runner(loop_factory=factory) as runner:
        return runner.run(_gather(fn, items, limit))


def have(module: str) -> bool:
    """Whether an optional peer is installed (``pip install -e ".[bench]"`` brings them all)."""
    try:
        __import__(module)
    except ImportError:
        return False
    return True


# --- the list -----------------------------------------------------------------------------


def contenders(w: Workload, procs: int, free_threaded: bool) -> list[Contender]:
    """Every contender that applies to ``w``: serial loop, peers, gearshift's gears, auto."""
    fn = w.fn
    threads = w.threads or procs
    families = set(w.families)
    if w.cpu_bound and free_threaded:
        families.add("thread")  # without a GIL, threads run CPU work in parallel too
    out: list[Contender] = []
    if w.serial:
        out.append(Contender("serial", "serial loop", BASELINE, lambda items: [fn(x) for x in items]))

    if "thread" in families:

        def tpe(items: list[Any]) -> list[Any]:
            with cf.ThreadPoolExecutor(threads) as ex:
                return list(ex.map(fn, items))

        out.append(Contender("tpe", f"ThreadPoolExecutor({threads})", PEER, tpe))
        if hasattr(gs, "ThreadPoolExecutor"):  # (absent from gearshift before issue 13: before/after runs)

            def gs_tpe(items: list[Any]) -> list[Any]:
                with gs.ThreadPoolExecutor(threads) as ex:
                    return list(ex.map(fn, items))

            out.append(Contender("gs-tpe", f"gs.ThreadPoolExecutor({threads})", GEARSHIFT, gs_tpe))
        if have("joblib"):
            out.append(Contender("joblib-threads", f"joblib threading({threads})", PEER,
                                 lambda items: _joblib(fn, items, threads, "threading")))
        if have("mpire"):
            out.append(Contender("mpire-threads", f"mpire threading({threads})", PEER,
                                 lambda items: _mpire(fn, items, threads, "threading"),
                                 prepare=_as_args))

    if "process" in families:

        def ppe(items: list[Any]) -> list[Any]:
            with cf.ProcessPoolExecutor(procs) as ex:
                return list(ex.map(fn, items, chunksize=pool_chunksize(len(items), procs)))

        def mp_pool(items: list[Any]) -> list[Any]:
            with multiprocessing.Pool(procs) as pool:
                return pool.map(fn, items)

        def loky_cold(items: list[Any]) -> list[Any]:
            results = _joblib(fn, items, procs, None)
            loky_shutdown()  # timed, like the other pools' shutdown at the end of their `with`
            return results

        def loky_warm_up(items: list[Any]) -> None:
            _joblib(fn, items[:procs], procs, None)

        out.append(Contender("ppe", f"ProcessPoolExecutor({procs})", PEER, ppe))
        out.append(Contender("mp-pool", f"multiprocessing.Pool({procs})", PEER, mp_pool))
        if hasattr(gs, "ProcessPoolExecutor"):  # the drop-ins, called exactly as the stdlib's above

            def gs_ppe(items: list[Any]) -> list[Any]:
                with gs.ProcessPoolExecutor(procs) as ex:
                    return list(ex.map(fn, items, chunksize=pool_chunksize(len(items), procs)))

            out.append(Contender("gs-ppe", f"gs.ProcessPoolExecutor({procs})", GEARSHIFT, gs_ppe))

        def gs_pool(items: list[Any]) -> list[Any]:
            with gs.Pool(procs) as pool:
                return pool.map(fn, items)

        out.append(Contender("gs-mp-pool", f"gs.Pool({procs})", GEARSHIFT, gs_pool))
        if have("joblib"):
            out.append(Contender("loky", f"joblib loky({procs})", PEER, loky_cold,
                                 setup=lambda _: loky_shutdown()))
            out.append(Contender("loky-warm", f"joblib loky({procs}) warm", INFO,
                                 lambda items: _joblib(fn, items, procs, None),
                                 setup=loky_warm_up, teardown=loky_shutdown))
        if have("mpire"):
            out.append(Contender("mpire", f"mpire({procs})", PEER,
                                 lambda items: _mpire(fn, items, procs, None), prepare=_as_args))

    if "async" in families:
        out.append(Contender("asyncio", f"asyncio.gather+Semaphore({threads})", PEER,
                             lambda items: _raw_asyncio(fn, items, threads, uvloop=False)))
        if have("uvloop"):
            out.append(Contender("asyncio-uvloop", f"asyncio.gather+Semaphore({threads}) uvloop", PEER,
                                 lambda items: _raw_asyncio(fn, items, threads, uvloop=True)))

    sizes = {"serial": None, "thread": threads, "process": procs, "async": threads}
    for gear in w.gears:
        workers = sizes[gear]
        label = f"gs {gear}" + (f"({workers})" if workers else "")
        out.append(Contender(f"gs-{gear}", label, GEARSHIFT, _gs_map(fn, gear, workers)))
    if free_threaded and w.cpu_bound and "thread" not in w.gears:
        out.append(Contender("gs-thread", f"gs thread({threads})", GEARSHIFT, _gs_map(fn, "thread", threads)))
    auto_label = "gs auto" + (f"({w.auto_workers})" if w.auto_workers else "")
    out.append(Contender("gs-auto", auto_label, AUTO, _gs_map(fn, "auto", w.auto_workers)))

    if "process" in families:
        holder: dict[str, Any] = {}

        def pool_open(items: list[Any]) -> None:
            holder["pool"] = gs.Pool(procs)
            holder["pool"].map(fn, items[:procs])

        def pool_close() -> None:
            pool = holder.pop("pool", None)
            if pool is not None:
                pool.close()
                pool.join()

        out.append(Contender("gs-pool-warm", f"gs.Pool({procs}) warm", INFO,
                             lambda items: holder["pool"].map(fn, items), setup=pool_open, teardown=pool_close))
    return out


def _gs_map(fn: Callable[..., Any], gear: str, workers: int | None) -> Callable[[list[Any]], list[Any]]:
    def run(items: list[Any]) -> list[Any]:
        return gs.map(fn, items, gear=gear, workers=workers)  # a list, with .report: what ran

    return run


def _as_args(items: list[Any]) -> list[Any]:
    # mpire unpacks any iterable item into arguments (bytes too): wrap each in a 1-tuple.
    return [(x,) for x in items]


def _mpire(fn: Callable[..., Any], items: list[Any], n_jobs: int, start_method: str | None) -> list[Any]:
    from mpire import WorkerPool

    kwargs: dict[str, Any] = {"n_jobs": n_jobs}
    if start_method:
        kwargs["start_method"] = start_method
    with WorkerPool(**kwargs) as pool:
        return list(pool.map(fn, items))
