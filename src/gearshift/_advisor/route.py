"""Routing one call of a function to a gear, from what its first call showed (``Executor(gear="auto")``).

An executor serves calls of many functions for a whole scope, so there is no one workload
to measure ahead: each function's first call runs on a thread while it is watched, and
its route is decided from it (after ``JUDGE_AFTER`` seconds, or when it ends, whichever
comes first) and remembered for the scope. The rules are the course's, measured:

* a coroutine function goes to the event loop, at once (nothing to measure);
* a call that mostly waits (blocking I/O) stays on threads;
* a call that computes goes to processes if it holds the GIL (and can be pickled, and
  there is more than one core); to threads if it releases the GIL (hashlib, NumPy, a
  ``nogil`` kernel) or the interpreter has none (free-threaded);
* a call too short to judge (well under a millisecond) stays on threads: a hand-off to a
  process would cost more than the call.
"""

from __future__ import annotations

from dataclasses import dataclass

from gearshift._advisor.probes import wait_fraction

__all__ = ["JUDGE_AFTER", "Route", "Sample", "route_for"]

#: Seconds a first call is watched before its function's route is decided (sooner if it ends).
JUDGE_AFTER = 0.02
#: A call waiting this share of its time or more is I/O: threads.
WAITS = 0.5
#: ... unless pings saw it hold the GIL and it waits less than this share.
MOSTLY_WAITS = 0.75
#: Calls shorter than this stay on threads (a process hand-off and pickling cost ~0.3 ms).
TOO_SHORT = 0.0005
#: Share of GIL-held pings above which CPU work counts as holding the GIL.
HOLDS_GIL = 0.5


@dataclass(frozen=True, slots=True)
class Route:
    """Where a function's calls go, and why (for ``Executor.routes`` and the log)."""

    gear: str
    why: str


@dataclass(frozen=True, slots=True)
class Sample:
    """What watching a first call gave: seconds of wall clock, of its thread's CPU, of run-queue
    delay; the share of pings that found the GIL held (None: not measured); whether it ended."""

    wall: float
    cpu: float
    runq: float = 0.0
    gil_held: float | None = None
    ended: bool = True


def route_for(sample: Sample, *, cores: int, gil_enabled: bool, pickle_error: str = "") -> Route:
    """The gear for a function whose first call gave ``sample`` (see the module docstring)."""
    waited = wait_fraction(sample.wall, sample.cpu, sample.runq)
    took = f"{sample.wall * 1e3:.1f} ms" + ("" if sample.ended else " so far")
    if sample.ended and sample.wall < TOO_SHORT:
        return Route("thread", f"a call takes {sample.wall * 1e6:.0f} µs: too short to be worth a process")
    # A thread seen running Python while pinged (holding the GIL) computes, even when its clocks
    # say it was off the CPU a good part of the time (a loaded machine, GIL hand-overs).
    seen_computing = sample.gil_held is not None and sample.gil_held >= HOLDS_GIL and waited < MOSTLY_WAITS
    if waited >= WAITS and not seen_computing:
        return Route("thread", f"a call waits {waited:.0%} of its {took}: blocking I/O, threads")
    if not gil_enabled:
        return Route("thread", f"a call computes ({1 - waited:.0%} of {took}) and this interpreter has no GIL: threads")
    if sample.gil_held is not None and sample.gil_held < HOLDS_GIL:
        return Route("thread", f"a call computes ({1 - waited:.0%} of {took}) but releases the GIL: threads")
    if cores < 2:
        return Route("thread", "a call computes, but one core: processes cannot run two at once")
    if pickle_error:
        return Route("thread", f"a call computes, but the function cannot go to a process ({pickle_error})")
    held = "" if sample.gil_held is None else f", holding the GIL {sample.gil_held:.0%} of the time"
    return Route("process", f"a call computes ({1 - waited:.0%} of {took} on a CPU{held}): processes")
