"""Rate limits: ``rate="50/s"`` starts at most 50 items a second, counted per item.

A token bucket: one token per item (a batch of k items takes k tokens, retries
included), refilled at the rate, holding at most a small burst (a tenth of a second's
worth, at least one). So the items started in any stretch of ``T`` seconds never
exceed ``rate * T + burst``.
"""

from __future__ import annotations

import math
import re
import time

__all__ = ["RateLimiter", "parse_rate"]

_UNITS = {"s": 1.0, "sec": 1.0, "second": 1.0, "m": 60.0, "min": 60.0, "minute": 60.0, "h": 3600.0, "hour": 3600.0}
_RATE = re.compile(r"^\s*([0-9]*\.?[0-9]+)\s*(?:/\s*([a-z]+))?\s*$")
#: The bucket holds this many seconds' worth of tokens (but at least one).
BURST_SECONDS = 0.1


def parse_rate(rate: str | float | int) -> float:
    """Items per second from ``50``, ``"50/s"``, ``"300/min"`` or ``"1000/h"``."""
    if isinstance(rate, bool) or not isinstance(rate, (int, float, str)):
        raise ValueError(f"rate must be a number or 'N/unit', got {rate!r}")
    if isinstance(rate, (int, float)):
        per_second = float(rate)
    else:
        match = _RATE.match(rate.lower())
        if not match or (match.group(2) or "s") not in _UNITS:
            raise ValueError(f"rate must look like '50/s', '300/min' or '1000/h', got {rate!r}")
        per_second = float(match.group(1)) / _UNITS[match.group(2) or "s"]
    if not math.isfinite(per_second) or per_second <= 0:
        raise ValueError(f"rate must be a positive, finite number of items per second, got {rate!r}")
    return per_second


class RateLimiter:
    """A token bucket holding at most ``burst`` tokens (one per item), refilled at ``per_second``."""

    def __init__(self, per_second: float, burst: float | None = None) -> None:
        self.per_second = per_second
        self.burst = max(1.0, per_second * BURST_SECONDS if burst is None else burst)
        self._tokens = self.burst
        self._last = time.monotonic()

    def _refill(self, now: float) -> None:
        if now > self._last:
            self._tokens = min(self.burst, self._tokens + (now - self._last) * self.per_second)
            self._last = now

    def available(self, now: float) -> int:
        """Whole tokens free now: how many items may start."""
        self._refill(now)
        return int(self._tokens + 1e-9)

    def wait_time(self, now: float) -> float:
        """Seconds until a token is free (0 when one is free now)."""
        self._refill(now)
        return 0.0 if self._tokens >= 1.0 - 1e-9 else (1.0 - self._tokens) / self.per_second

    def take(self, n: int = 1) -> None:
        """Spend ``n`` tokens (the caller checked ``available``)."""
        self._tokens -= n
