"""Retry policy: how many attempts, which errors, and how long to wait between them."""

from __future__ import annotations

import math
import random
from dataclasses import dataclass

__all__ = ["Retry", "as_retry"]


@dataclass(frozen=True, slots=True)
class Retry:
    """Retry a failed item up to ``attempts`` times in all, with exponential backoff and jitter.

    The n-th retry waits ``backoff * 2**(n-1)`` seconds (capped at ``max_backoff``), times a
    random factor in [0.5, 1.5) so that many failing items do not retry in lockstep. Only
    exceptions that are instances of ``on`` (an exception class or a tuple of them, as an
    ``except`` clause takes) are retried (timeouts and worker crashes included by default).
    Every field is checked when the policy is made, not at the first failure.
    """

    attempts: int = 3
    backoff: float = 0.1
    on: tuple[type[BaseException], ...] = (Exception,)
    max_backoff: float = 30.0
    jitter: bool = True

    def __post_init__(self) -> None:
        # Checked here, not at the first failure: a bad policy would otherwise surface as an
        # internal error in the middle of a run (``isinstance(exc, [ValueError])``).
        if isinstance(self.attempts, bool) or not isinstance(self.attempts, int) or self.attempts < 1:
            raise ValueError(f"Retry.attempts must be an int >= 1, got {self.attempts!r}")
        _check_seconds("backoff", self.backoff)
        _check_seconds("max_backoff", self.max_backoff)
        if not isinstance(self.jitter, bool):
            raise TypeError(f"Retry.jitter must be True or False, got {self.jitter!r}")
        object.__setattr__(self, "on", _exception_types(self.on))

    def should_retry(self, exc: BaseException, attempt: int) -> bool:
        """``attempt`` is the number of the attempt that just failed (1 for the first)."""
        return attempt < self.attempts and isinstance(exc, self.on)

    def delay(self, attempt: int) -> float:
        base = min(self.max_backoff, self.backoff * 2.0 ** (attempt - 1))
        return base * random.uniform(0.5, 1.5) if self.jitter else base

    def delay_for(self, exc: BaseException, attempt: int) -> float:
        """The wait before retrying after ``exc``: ``delay(attempt)``; a subclass may read the
        exception (an HTTP ``Retry-After``, say)."""
        return self.delay(attempt)


def _check_seconds(name: str, value: object) -> None:
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value) or value < 0:
        raise ValueError(f"Retry.{name} must be a finite number of seconds >= 0, got {value!r}")


def _is_exception_type(obj: object) -> bool:
    return isinstance(obj, type) and issubclass(obj, BaseException)


def _exception_types(on: object) -> tuple[type[BaseException], ...]:
    """``on`` as a tuple of exception classes: one class, or a tuple of them (as ``except`` takes)."""
    if _is_exception_type(on):
        return (on,)  # type: ignore[return-value]
    if isinstance(on, tuple) and on and all(_is_exception_type(t) for t in on):
        return on
    raise TypeError(
        f"Retry.on must be an exception class or a tuple of them (as in an except clause), got {on!r}"
        + (f"; write on={tuple(on)!r}" if isinstance(on, (list, set, frozenset)) else "")
    )


def as_retry(retries: int | Retry | None) -> Retry | None:
    """``retries=2`` means two more attempts after the first failure."""
    if retries is None or retries == 0:
        return None
    if isinstance(retries, Retry):
        return retries
    if isinstance(retries, bool) or not isinstance(retries, int) or retries < 0:
        raise ValueError(f"retries must be a non-negative int or a gs.Retry, got {retries!r}")
    return Retry(attempts=retries + 1)
