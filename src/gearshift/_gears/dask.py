"""The dask gear: batches as tasks on a ``dask.distributed`` cluster.

The client is the one given (``client=``), else one connected to ``address=``, else the
current default client, else a ``LocalCluster`` (processes, one per core) started for the
run and closed after it. What gearshift starts it stops; a cluster it was given it leaves
running and usable, with only this run's futures cancelled.

Each batch is one Dask task, so the scheduler's ~1.5 ms per task is shared by the items of a
chunk (``_cluster`` has what the cluster gears share). A worker that dies has its tasks
retried elsewhere by Dask (``distributed.scheduler.allowed-failures``, 3 by default); once
those are spent, the item fails alone as ``gs.WorkerCrashed`` naming Dask's ``KilledWorker``.
A retried task's side effects may repeat. Workers must be able to import gearshift (and the
function's module, unless cloudpickle can send it by value).
"""

from __future__ import annotations

import importlib.util
from collections.abc import Callable
from typing import Any

from gearshift._gears import _remote
from gearshift._gears._base import GearCosts, cpu_count
from gearshift._gears._cluster import ClusterGear
from gearshift._task import Batch

INSTALL = "pip install 'gearshift[dask]'"


def _distributed() -> Any:
    """The ``distributed`` module, or an ImportError that names the extra to install."""
    try:
        import distributed  # type: ignore[import-untyped,unused-ignore]  # optional extra: imported at use
    except ImportError as exc:
        raise ImportError(f"the dask gear needs dask.distributed: {INSTALL}") from exc
    return distributed


class DaskGear(ClusterGear):
    """Runs batches as tasks of a Dask cluster: the one given, the default one, or a local one."""

    name = "dask"
    #: ~1.5 ms of scheduler time per task: 50 ms of work a batch keeps it near 3%.
    chunk_target = 0.05
    #: The tail of a run is cut into batches of at least this much work: each task costs ~ms.
    min_batch_work = 0.01
    crash_errors = ("KilledWorker",)
    costs = GearCosts(
        handoff_per_batch=1.5e-3, batch_work=0.05, startup=1.5, startup_per_worker=0.3, pickles=True,
        cpu_parallel="always", on_request=True, tie_rank=60, label="a Dask cluster",
    )

    def __init__(self, workers: int | None = None, *, client: Any = None, address: str | None = None) -> None:
        """``client``: a ``distributed.Client`` to run on; ``address``: a scheduler to connect to
        (``"tcp://host:8786"``). Neither: the default client, else a LocalCluster for the run of
        ``workers`` processes (one per core by default). ``workers`` also sets the tasks kept in
        flight (twice that); by default the cluster's threads."""
        _distributed()
        if client is not None and address is not None:
            raise ValueError("give client= or address=, not both")
        super().__init__(workers)
        self.client = client
        self.address = address
        self._use: Any = None
        self._own_client: Any = None
        self._own_cluster: Any = None

    @classmethod
    def unavailable(cls) -> str:
        # find_spec, not an import: the advisor asks every gear, and importing distributed takes ~1 s.
        return "" if importlib.util.find_spec("distributed") else f"the dask gear needs dask.distributed: {INSTALL}"

    def _connect(self) -> int:
        distributed = _distributed()
        self._started = ""
        if self.client is not None:
            self._use = self.client
        elif self.address is not None:
            self._use = self._own_client = distributed.Client(self.address, set_as_default=False)
        else:
            try:
                self._use = distributed.default_client()
            except ValueError:  # no default client: a local cluster for this run
                n = self.workers if self._fixed else cpu_count()
                self._own_cluster = distributed.LocalCluster(
                    n_workers=n, threads_per_worker=1, processes=True, dashboard_address=":0", host="127.0.0.1",
                )
                self._use = self._own_client = distributed.Client(self._own_cluster, set_as_default=False)
                self._started = f"started a LocalCluster of {n} worker processes for the run, closed after it"
        return int(sum(self._use.nthreads().values()))

    def _submit(self, batch: Batch, args: tuple[Any, ...]) -> Any:
        return self._use.submit(_remote.run_batch, *args, pure=False)

    def _watch(self, handle: Any, done: Callable[[Any], None]) -> None:
        handle.add_done_callback(done)

    def _read(self, handle: Any) -> tuple[bytes | None, BaseException | None]:
        if handle.status == "finished":
            return handle.result(), None
        if handle.status == "cancelled":  # from elsewhere (the cluster's owner)
            return None, RuntimeError("its Dask task was cancelled on the cluster")
        return None, handle.exception()

    def _cancel(self, handles: list[Any]) -> None:
        if self._use is not None:
            self._use.cancel(handles)

    def _disconnect(self) -> None:
        self._use = None
        client, cluster = self._own_client, self._own_cluster
        self._own_client = self._own_cluster = None
        try:
            if client is not None:
                client.close()
        finally:
            if cluster is not None:
                cluster.close()

    def __repr__(self) -> str:
        return f"<DaskGear workers={self.workers} client={self.client!r} address={self.address!r}>"
