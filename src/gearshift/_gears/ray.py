"""The ray gear: batches as Ray tasks, on a cluster joined by ``address=`` or a local Ray.

If Ray is already initialised in this process, the gear uses it and leaves it so. Otherwise it
calls ``ray.init`` (``address=`` joins a cluster; none starts a local Ray, ~2.4 s measured here,
more on a loaded machine) and ``ray.shutdown`` after the run: what gearshift starts it stops.

Each batch is one Ray task (``_cluster`` has what the cluster gears share). A worker that dies
has its task retried by Ray (``max_retries``, Ray's default 3); once those are spent, the item
fails alone as ``gs.WorkerCrashed`` naming Ray's ``WorkerCrashedError``. A retried task's side
effects may repeat. Cancelling (Ctrl-C, ``errors="raise"``) cancels the run's tasks that have
not started; a running one cannot be stopped without killing its worker, so it runs on.
"""

from __future__ import annotations

import importlib.util
import os
import sys
import time
from collections.abc import Callable
from typing import Any

from gearshift._gears import _remote
from gearshift._gears._base import GearCosts, cpu_count
from gearshift._gears._cluster import ClusterGear
from gearshift._task import Batch

INSTALL = "pip install 'gearshift[ray]'"


def _ray() -> Any:
    """The ``ray`` module, or an ImportError that names the extra to install."""
    try:
        import ray  # type: ignore[import-untyped,import-not-found,unused-ignore]  # optional extra: imported at use
    except ImportError as exc:
        raise ImportError(f"the ray gear needs ray: {INSTALL}") from exc
    return ray


class RayGear(ClusterGear):
    """Runs batches as Ray tasks: on the Ray this process is connected to, a cluster, or a local Ray."""

    name = "ray"
    #: ~0.5 ms a task measured here (plus pickling): 20 ms of work a batch keeps it near 3%.
    chunk_target = 0.02
    #: The tail of a run is cut into batches of at least this much work: each task costs ~ms.
    min_batch_work = 0.005
    crash_errors = ("WorkerCrashedError", "NodeDiedError", "OwnerDiedError")
    costs = GearCosts(
        handoff_per_batch=0.5e-3, batch_work=0.02, startup=2.4, startup_per_worker=0.05, pickles=True,
        cpu_parallel="always", on_request=True, tie_rank=60, label="a Ray cluster",
    )

    def __init__(self, workers: int | None = None, *, address: str | None = None, max_retries: int = 3) -> None:
        """``address``: a Ray cluster to join (``"ray://host:10001"`` or ``"auto"``); none: the Ray
        this process is connected to, else a local Ray of ``workers`` CPUs (one per core by
        default) for the run. ``max_retries``: Ray's retries of a task whose worker died."""
        _ray()
        super().__init__(workers)
        self.address = address
        self.max_retries = max_retries
        self._ours = False
        self._fn: Any = None

    @classmethod
    def unavailable(cls) -> str:
        # find_spec, not an import: the advisor asks every gear, and importing ray takes a while.
        return "" if importlib.util.find_spec("ray") else f"the ray gear needs ray: {INSTALL}"

    def _connect(self) -> int:
        ray = _ray()
        self._started = ""
        if not ray.is_initialized():
            start = time.perf_counter()
            if self.address is not None:
                ray.init(address=self.address, log_to_driver=False)
                what = f"joined the Ray cluster at {self.address}"
            else:
                n = self.workers if self._fixed else cpu_count()
                # The caller's sys.path for the workers, as spawn gives a child process: they import
                # the function's module by name.
                path = {"PYTHONPATH": os.pathsep.join(p for p in sys.path if p)}
                ray.init(num_cpus=n, include_dashboard=False, log_to_driver=False, runtime_env={"env_vars": path})
                what = f"started a local Ray of {n} CPUs"
            self._ours = True
            self._started = f"{what} for the run ({time.perf_counter() - start:.1f} s), shut down after it"
        self._fn = ray.remote(num_cpus=1, max_retries=self.max_retries)(_remote.run_batch)
        return int(ray.cluster_resources().get("CPU", 1))

    def _submit(self, batch: Batch, args: tuple[Any, ...]) -> Any:
        return self._fn.remote(*args)

    def _watch(self, handle: Any, done: Callable[[Any], None]) -> None:
        handle.future().add_done_callback(lambda _: done(handle))

    def _read(self, handle: Any) -> tuple[bytes | None, BaseException | None]:
        try:
            return _ray().get(handle), None
        except Exception as exc:
            return None, exc

    def _cancel(self, handles: list[Any]) -> None:
        ray = _ray()
        for handle in handles:
            try:
                ray.cancel(handle, force=False)
            except Exception:  # already finished, or its worker is gone
                pass

    def _disconnect(self) -> None:
        self._fn = None
        if self._ours:
            self._ours = False
            _ray().shutdown()

    def __repr__(self) -> str:
        return f"<RayGear workers={self.workers} address={self.address!r}>"
