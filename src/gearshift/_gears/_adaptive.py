"""Concurrency found by measurement: how many calls may be in flight, adjusted as the run goes.

When the user fixes no concurrency, the async gear starts low and measures each call's
latency (its time inside a slot). Each round (as many completions as the limit, 64 at most) gives a
mean; the lowest so far stands for the unloaded latency (before the first, the fastest call):

* slow start: each call that ends within 1.5x of the unloaded latency, while the limit is in
  use, adds 3 to it (4x a round trip), so pure waits reach thousands in flight in a few round
  trips, yet in-flight grows smoothly, and a service that starts refusing sees little overshoot;
* queueing: when a round's mean latency (a round: the limit's worth of completions, 64 at
  most) passes 1.7x the unloaded one (the service queues), the limit goes to where latency
  would be 1.3x unloaded given how many the round's calls saw in flight (Little's law), once
  a round trip (calls started before a cut still report the old crowd); while latency stays
  within 1.3x it grows by about its square root a round trip (a gradient limiter, as Vegas or
  Netflix's concurrency-limits);
* refusals: a timeout, a refused or reset connection, HTTP 429/503 (any exception with such a
  ``status`` or ``response.status_code``) cuts the limit to 0.7x at once, once a round; the limit
  it was cut from becomes a ceiling, approached one by one.

A cap bounds it: at most ``MAX_LIMIT`` tasks, and half the open-file limit (sockets are files).
"""

from __future__ import annotations

import math
import time
from collections import deque

from gearshift.errors import TaskTimeout

#: The limit a run starts at: low enough to see the unloaded latency of a service that queues early.
START = 16
#: Completions per round at most (a round is the limit's worth, up to this): decisions come quickly.
ROUND = 64
MAX_LIMIT = 10_000
#: The async gear's slack (network calls): 10 ms x 0.3 = 3 ms on top of the unloaded latency
#: still "holds", however fast the service answers. The thread gear keeps none: there more
#: threads on CPU work behind the GIL raise sub-millisecond latencies, and that must count.
NETWORK_SLACK = 0.010
#: Statuses that mean "too many at once" (Too Many Requests, Service Unavailable).
REFUSAL_STATUS = frozenset({429, 503})


def open_files_cap() -> int:
    """Half the soft limit on open files (each connection is one), or ``MAX_LIMIT``."""
    try:
        import resource

        soft, _ = resource.getrlimit(resource.RLIMIT_NOFILE)
    except (ImportError, OSError, ValueError):
        return MAX_LIMIT
    if soft == resource.RLIM_INFINITY or soft <= 0:
        return MAX_LIMIT
    return max(1, min(MAX_LIMIT, soft // 2))


def is_refusal(exc: BaseException) -> bool:
    """A failure that says "fewer at once, please": a timeout, a refused or reset connection, 429/503."""
    if isinstance(exc, (TimeoutError, TaskTimeout, ConnectionRefusedError, ConnectionResetError)):
        return True
    status = getattr(exc, "status", None)
    if status is None:
        status = getattr(getattr(exc, "response", None), "status_code", None)
    return isinstance(status, int) and status in REFUSAL_STATUS


class AdaptiveLimit:
    """The limit and its history; fed each call's latency and whether it was refused."""

    def __init__(self, start: int = START, cap: int | None = None, floor: int = 1, slack: float = 0.0) -> None:
        """``slack``: seconds per unit of the latency factors that never count as queueing (see ``_within``)."""
        self.slack = slack
        self.cap = cap if cap is not None else open_files_cap()
        self.floor = max(1, floor)
        self.limit = max(self.floor, min(start, self.cap))
        self.slow_start = True
        self.min_latency: float | None = None
        self.last_mean: float | None = None
        self.ceiling: int | None = None  # the limit at the last refusal
        self.refused = 0
        self.peak_limit = self.limit
        self.why = "starting low and measuring"
        #: (seconds since start, limit, why) at each change; bounded.
        self.history: deque[tuple[float, int, str]] = deque(maxlen=256)
        self._started = time.monotonic()
        self._n = 0
        self._sum = 0.0
        self._refusals = 0
        self._cut = False  # cut for a refusal this round already
        self._fastest = math.inf
        self._seen = 0
        self._round_len = max(4, min(self.limit, ROUND))
        self._credit = 0.0
        self._hold_until = 0.0
        self._peak_busy = 0

    def busy(self, in_flight: int) -> None:
        """Called as a call starts: how many are in flight now (was the limit in use?)."""
        if in_flight > self._peak_busy:
            self._peak_busy = in_flight

    def completed(self, latency: float, refused: bool, demand: int = 0, seen: int = 0) -> bool:
        """One call ended after ``latency`` seconds; returns True when the limit changed.

        ``demand``: calls running or waiting for a slot now (is the limit what holds them back?);
        ``seen``: calls in flight when this one started (what its latency was measured under).
        """
        old = self.limit
        if demand > self._peak_busy:
            self._peak_busy = demand
        now = time.monotonic()
        if refused:
            self.refused += 1
            self._refusals += 1
            if not self._cut and now >= self._hold_until:
                self._cut = True
                self.slow_start = False
                self.ceiling = old
                self._set(int(old * 0.7), f"calls refused or timed out at {old} in flight: cut to 0.7x")
                self._hold_until = now + (self.last_mean or latency)
        else:
            self._n += 1
            self._sum += latency
            self._seen += seen or old
            if latency < self._fastest:
                self._fastest = latency
            # Before a round has ended, the fastest call so far stands for the unloaded latency.
            base = self.min_latency if self.min_latency is not None else self._fastest
            if (self.slow_start and latency <= self._within(base, 1.5)
                    and self._peak_busy >= 0.9 * self.limit and self.limit < self.cap):
                self.limit = min(self.cap, self.limit + 3)  # (the reason is written at the round's end)
                self.peak_limit = max(self.peak_limit, self.limit)
        if self._n + self._refusals >= self._round_len:
            self._end_round(now)
        return self.limit != old

    def _end_round(self, now: float) -> None:
        n = self._n
        mean = self._sum / n if n else None
        seen = self._seen / n if n else 0.0
        saturated = self._peak_busy >= 0.9 * self.limit
        refusals = self._refusals
        self._n, self._sum, self._seen, self._refusals, self._peak_busy, self._cut = 0, 0.0, 0, 0, 0, False
        # Fixed as the round starts: the first round is the first calls, made with the starting
        # limit in flight (the unloaded latency), however much the limit grows meanwhile.
        self._round_len = max(4, min(self.limit, ROUND))
        if mean is None:
            return
        self.last_mean = mean
        first = self.min_latency is None
        if self.min_latency is None or mean < self.min_latency:
            self.min_latency = mean
        else:
            self.min_latency *= 1.001  # drifts up slowly: a service that got slower for good is re-learned
        base = self.min_latency
        old = self.limit
        if first or refusals or now < self._hold_until:
            return  # (after a cut: calls started before it still report the old crowd)
        if mean > self._within(base, 1.7):
            # Queueing. What the round's calls saw in flight, scaled to where latency would be 1.3x
            # unloaded (Little's law: throughput is in-flight over latency), never above the limit.
            self.slow_start = False
            target = min(old, int(seen * self._within(base, 1.3) / mean))
            why = (f"latency climbed to {_ms(mean)} from {_ms(base)} unloaded at {seen:.0f} in flight: "
                   "the service queues")
            self._set(target, why)
            self._hold_until = now + mean
        elif self.slow_start:
            self.why = f"latency held at {_ms(mean)} ({_ms(base)} unloaded) up to {old} in flight"
            if old == self.cap:
                self.why += f"; capped at {self.cap}"
        elif saturated and mean <= self._within(base, 1.3):
            # About sqrt(limit) a round trip: a round is min(limit, ROUND) completions.
            self._credit += math.sqrt(old) * min(old, ROUND) / old
            if self.ceiling is not None and old + self._credit > 0.9 * self.ceiling:
                self._credit = min(self._credit, 1.0)  # near where calls were refused: one by one
            step, self._credit = int(self._credit), self._credit - int(self._credit)
            if step:
                self._set(old + step, f"latency held at {_ms(mean)} ({_ms(base)} unloaded)")

    def _within(self, base: float, factor: float) -> float:
        """The latency that still counts as ``factor`` times ``base``: never less than ``base`` plus
        ``slack`` times (factor - 1). Below a few milliseconds, latency moves with the caller's own
        load (a local service on the same cores), not with the service's queue: cuts by ratios alone
        drove the async gear's limit to one or two in flight there, at half the throughput."""
        return max(factor * base, base + (factor - 1) * self.slack)

    def _set(self, limit: int, why: str) -> None:
        limit = max(self.floor, min(self.cap, limit))
        if limit == self.cap and limit > self.limit:
            why += f"; capped at {self.cap}"
        if limit != self.limit:
            self.limit = limit
            self.peak_limit = max(self.peak_limit, limit)
            self.why = why
            self.history.append((time.monotonic() - self._started, limit, why))

    def describe(self) -> str:
        """The level it settled at and why, for the run's report."""
        latency = "" if self.last_mean is None else f", latency {_ms(self.last_mean)}"
        refused = f", {self.refused} refused or timed out" if self.refused else ""
        return (f"concurrency adapted: {self.limit} in flight at the end (peak {self.peak_limit}, "
                f"cap {self.cap}{latency}{refused}): {self.why}")


def _ms(seconds: float) -> str:
    return f"{seconds * 1e3:.1f} ms" if seconds < 1 else f"{seconds:.2f} s"
