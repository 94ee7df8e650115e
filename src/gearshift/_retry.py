"""Retry policy: how many attempts, which errors, and how long to wait between them."""

from __future__ import annotations

import random
from dataclasses import dataclass

__all__ = ["Retry", "as_retry"]


@dataclass(frozen=True, slots=True)
class Retry:
    """Retry a failed item up to ``attempts`` times in all, with exponential backoff and jitter.

    The n-th retry waits ``backoff * 2**(n-1)`` seconds (capped at ``max_backoff``), times a
    random factor in [0.5, 1.5) so that many failing items do not retry in lockstep. Only
    exceptions that are instances of ``on`` are retried (timeouts and worker crashes included
    by default).
    """

    attempts: int = 3
    backoff: float = 0.1
    on: tuple[type[BaseException], ...] = (Exception,)
    max_backoff: float = 30.0
    jitter: bool = True

    def __post_init__(self) -> None:
        if self.attempts < 1:
            raise ValueError(f"Retry.attempts must be >= 1, got {self.attempts}")
        if self.backoff < 0:
            raise ValueError(f"Retry.backoff must be >= 0, got {self.backoff}")
        on: object = self.on
        if isinstance(on, type):  # a single exception class is fine too
            object.__setattr__(self, "on", (on,))

    def should_retry(self, exc: BaseException, attempt: int) -> bool:
        """``attempt`` is the number of the attempt that just failed (1 for the first)."""
        return attempt < self.attempts and isinstance(exc, self.on)

    def delay(self, attempt: int) -> float:
        base = min(self.max_backoff, self.backoff * 2.0 ** (attempt - 1))
        return base * random.uniform(0.5, 1.5) if self.jitter else base


def as_retry(retries: int | Retry | None) -> Retry | None:
    """``retries=2`` means two more attempts after the first failure."""
    if retries is None or retries == 0:
        return None
    if isinstance(retries, Retry):
        return retries
    if isinstance(retries, bool) or not isinstance(retries, int) or retries < 0:
        raise ValueError(f"retries must be a non-negative int or a gs.Retry, got {retries!r}")
    return Retry(attempts=retries + 1)
