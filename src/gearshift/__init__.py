"""gearshift: run Python work concurrently in the right gear.

    import gearshift as gs
    results = gs.map(fn, items, gear="process")

Gears: "serial" (the caller), "async" (an event loop), "thread" (a thread pool),
"process" (worker processes). Everything public is re-exported here; modules whose
names start with an underscore are private.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from gearshift._advisor import Advice, advise
from gearshift._api import ResultIterator, Results, amap, imap, map
from gearshift._cancel import CancelToken, cancel_token, cancelled
from gearshift._engine import Report
from gearshift._gears import (
    AsyncGear,
    DaskGear,
    Gear,
    GearCosts,
    GearLoadError,
    InterpreterGear,
    ProcessGear,
    RayGear,
    SerialGear,
    ThreadGear,
    register_gear,
)
from gearshift._gears.auto import AutoGear  # importing it registers gear="auto"
from gearshift._pipeline_report import PipelineReport, StageReport
from gearshift._retry import Retry
from gearshift._task import Batch, Done, Outcome, RunSpec
from gearshift.dropins import BrokenProcessPool, BrokenThreadPool, ProcessPoolExecutor, ThreadPoolExecutor
from gearshift.errors import (
    Failure,
    GearshiftError,
    InitializerError,
    RemoteError,
    RemoteTraceback,
    TaskCancelled,
    TaskTimeout,
    UnpicklableError,
    WorkerCrashed,
)
from gearshift.executor import BrokenExecutor, Executor
from gearshift.fetch import FetchRefused, FetchReport, afetch, fetch
from gearshift.pipeline import Pipeline, PipelineIterator
from gearshift.pool import AsyncResult, Pool, ThreadPool

if TYPE_CHECKING:
    from gearshift._lab import Finding, LabReport, lab

__version__ = "0.1.0"
_LAB_NAMES = {"Finding", "LabReport", "lab"}


def __getattr__(name: str) -> Any:
    """``gs.lab``, ``gs.LabReport``, ``gs.Finding`` load the lab on first use: its ~20 ms of imports
    (experiments, sockets, subprocesses) are not for every ``import gearshift``."""
    if name in _LAB_NAMES:
        from gearshift import _lab  # lazy, see the docstring

        value = getattr(_lab, name)
        globals()[name] = value
        return value
    raise AttributeError(f"module 'gearshift' has no attribute {name!r}")

__all__ = [
    "Advice",
    "AsyncGear",
    "AsyncResult",
    "AutoGear",
    "Batch",
    "BrokenExecutor",
    "BrokenProcessPool",
    "BrokenThreadPool",
    "CancelToken",
    "Done",
    "Executor",
    "Failure",
    "FetchRefused",
    "FetchReport",
    "Finding",
    "Gear",
    "GearCosts",
    "GearLoadError",
    "GearshiftError",
    "InitializerError",
    "LabReport",
    "Outcome",
    "Pipeline",
    "PipelineIterator",
    "PipelineReport",
    "Pool",
    "DaskGear",
    "InterpreterGear",
    "ProcessGear",
    "RayGear",
    "ProcessPoolExecutor",
    "RemoteError",
    "RemoteTraceback",
    "Report",
    "ResultIterator",
    "Results",
    "Retry",
    "RunSpec",
    "SerialGear",
    "StageReport",
    "TaskCancelled",
    "TaskTimeout",
    "ThreadGear",
    "ThreadPool",
    "ThreadPoolExecutor",
    "UnpicklableError",
    "WorkerCrashed",
    "advise",
    "afetch",
    "amap",
    "cancel_token",
    "cancelled",
    "fetch",
    "imap",
    "lab",
    "map",
    "register_gear",
]
