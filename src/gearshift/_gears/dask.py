"""The dask gear: batches as tasks on a ``dask.distributed`` cluster.

The client is the one given (``client=``), else one connected to ``address=``, else the
current default client, else a ``LocalCluster`` (processes, one per core) started for the
run and closed after it. What gearshift starts it stops; a cluster it was given it leaves
running and usable, with only this run's futures cancelled.

Each batch is one Dask task (``_remote.run_batch``), so the scheduler's ~1.5 ms per task is
shared by the items of a chunk. Results come back through done-callbacks into a queue the
caller waits on, so the caller's thread keeps receiving Ctrl-C.

What a cluster cannot do, said plainly (the README's Faults table): a running task cannot be
stopped. An item past its timeout fails at its deadline (the worker waits for it in a thread
of its own and gives up), but its call runs on there until it returns. A worker that dies
has its tasks retried elsewhere by Dask (``distributed.scheduler.allowed-failures``); once
those are spent, a batch is split so that only the item at fault fails, as
``gs.WorkerCrashed`` naming Dask's ``KilledWorker``. A retried task's side effects may repeat.
"""

from __future__ import annotations

import importlib.util
import queue
import threading
import uuid
from collections.abc import Callable
from typing import Any

from gearshift._gears import _remote
from gearshift._gears._base import Gear, GearCosts, cpu_count, initializer_error
from gearshift._gears._unpack import RemoteInitError, unpack
from gearshift._task import Batch, Outcome, Result, RunSpec
from gearshift.errors import WorkerCrashed

INSTALL = "pip install 'gearshift[dask]'"


def _distributed() -> Any:
    """The ``distributed`` module, or an ImportError that names the extra to install."""
    try:
        import distributed  # type: ignore[import-untyped,unused-ignore]  # optional extra: imported at use
    except ImportError as exc:
        raise ImportError(f"the dask gear needs dask.distributed: {INSTALL}") from exc
    return distributed


class DaskGear(Gear):
    """Runs batches as tasks of a Dask cluster: the one given, the default one, or a local one."""

    name = "dask"
    #: ~1.5 ms of scheduler time per task: 50 ms of work a batch keeps it near 3%.
    chunk_target = 0.05
    pickles = True
    costs = GearCosts(
        handoff_per_batch=1.5e-3, batch_work=0.05, startup=1.5, startup_per_worker=0.3, pickles=True,
        cpu_parallel="always", on_request=True, tie_rank=60, label="a Dask cluster",
    )

    def __init__(self, workers: int | None = None, *, client: Any = None, address: str | None = None) -> None:
        """``client``: a ``distributed.Client`` to run on; ``address``: a scheduler to connect to
        (``"tcp://host:8786"``). Neither: the default client, else a LocalCluster for the run.
        ``workers``: the cluster's threads by default (tasks kept in flight: twice that)."""
        _distributed()
        if client is not None and address is not None:
            raise ValueError("give client= or address=, not both")
        self._fixed = workers is not None
        super().__init__(workers)
        self.client = client
        self.address = address
        self._own_client: Any = None
        self._own_cluster: Any = None
        self._done: queue.SimpleQueue[Any] = queue.SimpleQueue()
        self._futures: dict[Any, Batch] = {}
        self._lock = threading.Lock()
        self._spec = RunSpec()
        self._init: tuple[str, Callable[..., Any], tuple[Any, ...]] | None = None
        self._late = 0
        self._crashed = 0
        self._started = ""

    @classmethod
    def unavailable(cls) -> str:
        # find_spec, not an import: the advisor asks every gear, and importing distributed takes ~1 s.
        return "" if importlib.util.find_spec("distributed") else f"the dask gear needs dask.distributed: {INSTALL}"

    def _client(self) -> Any:
        distributed = _distributed()
        if self.client is not None:
            return self.client
        if self.address is not None:
            self._own_client = distributed.Client(self.address, set_as_default=False)
            return self._own_client
        try:
            return distributed.default_client()
        except ValueError:  # no default client: start a local cluster for this run
            pass
        n = self.workers if self._fixed else cpu_count()
        self._own_cluster = distributed.LocalCluster(
            n_workers=n, threads_per_worker=1, processes=True, dashboard_address=":0", host="127.0.0.1",
        )
        self._own_client = distributed.Client(self._own_cluster, set_as_default=False)
        self._started = f"started a LocalCluster of {n} worker processes for the run"
        return self._own_client

    def open(self, spec: RunSpec) -> None:
        self._spec = spec
        self._done = queue.SimpleQueue()
        self._futures = {}
        self._late = self._crashed = 0
        self._use = self._client()
        if not self._fixed:
            threads = sum(self._use.nthreads().values())
            self.workers = max(1, threads)
        self._init = None
        if spec.initializer is not None:
            self._init = (uuid.uuid4().hex, spec.initializer, tuple(spec.initargs))

    def submit(self, batch: Batch) -> None:
        future = self._use.submit(
            _remote.run_batch, batch.fn, batch.items, self._spec.timeout, self._init, pure=False,
        )
        with self._lock:
            self._futures[future] = batch
        future.add_done_callback(self._done.put)

    def collect(self, timeout: float | None) -> list[Result]:
        out: list[Result] = []
        try:
            got = self._done.get(timeout=timeout)
        except queue.Empty:
            return out
        while True:
            if got is not None:
                self._take(got, out)
            try:
                got = self._done.get_nowait()
            except queue.Empty:
                return out

    def _take(self, future: Any, out: list[Result]) -> None:
        with self._lock:
            batch = self._futures.pop(future, None)
        if batch is None:  # cancelled by close
            return
        if future.status == "finished":
            try:
                results, late = unpack(batch, future.result(), self._spec.timeout)
            except RemoteInitError as exc:
                raise initializer_error(self._spec.initializer, exc.exc) from exc.exc
            self._late += late
            out.extend(results)
            return
        if future.status == "cancelled":  # cancelled from elsewhere (the cluster's owner)
            error: BaseException = RuntimeError(f"the Dask task of {batch!r} was cancelled on the cluster")
        else:
            error = future.exception()
        if len(batch) > 1:  # split it: only the item at fault fails
            for task in batch.tasks:
                self.submit(Batch(batch.fn, [task]))
            return
        task = batch.tasks[0]
        killed = type(error).__name__ == "KilledWorker"
        if killed:
            self._crashed += 1
            crash = WorkerCrashed(None, task.item, task.index)
            crash.add_note(f"on the Dask cluster, {type(error).__name__}: {error} (Dask's allowed-failures are spent)")
            crash.__cause__ = error
            error = crash
        out.append(Outcome(task, False, error, 0.0, ""))

    def wake(self) -> None:
        self._done.put(None)

    def close(self, cancel: bool = False) -> None:
        with self._lock:
            futures, self._futures = list(self._futures), {}
        use = getattr(self, "_use", None)
        try:
            if futures and use is not None:
                if cancel:
                    use.cancel(futures)
                else:
                    _distributed().wait(futures)
        finally:
            self._use = None
            client, cluster = self._own_client, self._own_cluster
            self._own_client = self._own_cluster = None
            if client is not None:
                client.close()
            if cluster is not None:
                cluster.close()

    def notes(self) -> list[str]:
        out = [self._started] if self._started else []
        if self._late:
            out.append(
                f"{self._late} item(s) timed out on the cluster: their calls could not be stopped "
                "and run on in the workers until they return"
            )
        if self._crashed:
            out.append(f"{self._crashed} item(s) failed after Dask's retries when their workers died")
        return out

    def describe(self) -> str:
        return f"dask gear, {self.workers} worker thread{'s' if self.workers != 1 else ''}"

    def __repr__(self) -> str:
        return f"<DaskGear workers={self.workers} client={self.client!r} address={self.address!r}>"
