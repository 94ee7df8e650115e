"""Rate limits: ``rate="50/s"`` starts at most 50 items a second, counted per item.

A token bucket: one token per item (a batch of k items takes k tokens, retries
included), refilled at the rate, holding at most a small burst (a tenth of a second's
worth, at least one). So the items started in any stretch of ``T`` seconds never
exceed ``rate * T + burst``.

Per key (``rate={"api.example.com": "10/s", "*": "2/s"}`` with ``rate_key=``): one
bucket per key, so a job that touches several services is polite to each; the engine
parks an item whose key has no token and goes on with items of other keys.
"""

from __future__ import annotations

import math
import re
import time
from collections.abc import Callable, Hashable, Mapping
from typing import Any, TypeAlias

__all__ = ["ANY_KEY", "KeyedRate", "RateArg", "RateLimiter", "make_rate", "parse_rate"]

#: In a mapping of rates, the rate each key not listed gets (a bucket of its own per key).
ANY_KEY = "*"
#: Buckets of keys not listed are dropped when full and idle past this many (bounded memory).
MAX_IDLE_BUCKETS = 10_000

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


class KeyedRate:
    """A token bucket per key of the item (``key(item)``), and optionally one over all keys.

    ``rates`` maps keys to rates; ``"*"`` gives every key not listed a bucket of its own
    at that rate; keys neither listed nor covered by ``"*"`` are not limited (except by
    ``total``). Tokens are only taken when both the key's bucket and the total have one.
    """

    def __init__(
        self,
        rates: Mapping[Hashable, str | float],
        key: Callable[[Any], Hashable],
        total: str | float | None = None,
    ) -> None:
        if not isinstance(rates, Mapping) or not rates:
            raise ValueError(f"a rate per key needs a non-empty mapping of key to rate, got {rates!r}")
        if not callable(key):
            raise TypeError(f"rate_key must be a function of the item, got {key!r}")
        if _is_async(key):
            raise TypeError("rate_key must be a plain function: it runs as items are admitted, where nothing "
                            "awaits (an async one would give every item its own coroutine as its key)")
        self.key = key
        self._rates = {k: parse_rate(v) for k, v in rates.items()}
        self._default = self._rates.pop(ANY_KEY, None)
        self._buckets: dict[Hashable, RateLimiter] = {k: RateLimiter(r) for k, r in self._rates.items()}
        self.total = None if total is None else RateLimiter(parse_rate(total))
        #: Buckets of unlisted keys beyond which idle ones are dropped; it doubles when none is
        #: idle (slow rates), so the scans stay linear in the number of keys overall.
        self._keep = MAX_IDLE_BUCKETS

    def describe(self) -> str:
        parts = [f"{k}: {_per_second(r)}" for k, r in self._rates.items()]
        if self._default is not None:
            parts.append(f"each other key: {_per_second(self._default)}")
        if self.total is not None:
            parts.append(f"all keys: {_per_second(self.total.per_second)}")
        return ", ".join(parts)

    def _bucket(self, key: Hashable) -> RateLimiter | None:
        bucket = self._buckets.get(key)
        if bucket is None and self._default is not None:
            if len(self._buckets) > len(self._rates) + self._keep:
                self._forget_idle()
            bucket = self._buckets[key] = RateLimiter(self._default)
        return bucket

    def _forget_idle(self) -> None:
        now = time.monotonic()
        idle = [k for k, b in self._buckets.items() if k not in self._rates and b.available(now) >= b.burst]
        for k in idle:
            del self._buckets[k]
        if len(idle) < self._keep // 2:
            self._keep *= 2  # mostly busy buckets (a slow rate): look again only after as many more

    def take(self, key: Hashable, now: float) -> bool:
        """Spend a token of ``key`` (and of the total) if both have one; False otherwise."""
        bucket = self._bucket(key)
        if bucket is not None and not bucket.available(now):
            return False
        if self.total is not None:
            if not self.total.available(now):
                return False
            self.total.take(1)
        if bucket is not None:
            bucket.take(1)
        return True

    def wait_time(self, key: Hashable, now: float) -> float:
        """Seconds until ``key`` may start an item (0 when it may now)."""
        bucket = self._bucket(key)
        wait = 0.0 if bucket is None else bucket.wait_time(now)
        if self.total is not None:
            wait = max(wait, self.total.wait_time(now))
        return wait


RateArg: TypeAlias = "str | float | Mapping[Hashable, str | float] | KeyedRate | None"


def make_rate(rate: RateArg, rate_key: Callable[[Any], Hashable] | None = None) -> RateLimiter | KeyedRate | None:
    """The limiter for a run's ``rate=`` and ``rate_key=`` (bad values refused here, before any work)."""
    if isinstance(rate, KeyedRate):
        if rate_key is not None:
            raise ValueError("rate_key= is given twice: the KeyedRate has its own key")
        return rate
    if isinstance(rate, Mapping):
        if rate_key is None:
            raise ValueError("rate= a mapping of key to rate needs rate_key=, a function from an item to its key")
        return KeyedRate(rate, rate_key)
    if rate_key is not None:
        raise ValueError("rate_key= needs rate= a mapping of key to rate, e.g. {'api.example.com': '10/s', '*': '2/s'}")
    return None if rate is None else RateLimiter(parse_rate(rate))


def _is_async(fn: Callable[..., Any]) -> bool:
    import inspect

    call = getattr(type(fn), "__call__", None)  # noqa: B004
    return inspect.iscoroutinefunction(fn) or (call is not None and inspect.iscoroutinefunction(call))


def _per_second(rate: float) -> str:
    return f"{rate:g}/s"
