"""Progress bars on stderr (tqdm): shown on a terminal, or anywhere when forced."""

from __future__ import annotations

import os
import sys
from typing import Any, Literal, Protocol

ProgressArg = bool | Literal["force"]


class Progress(Protocol):
    def update(self, n: int = 1) -> None: ...
    def set_postfix_str(self, s: str) -> None: ...
    def close(self) -> None: ...


class _Null:
    def update(self, n: int = 1) -> None:
        pass

    def set_postfix_str(self, s: str) -> None:
        pass

    def close(self) -> None:
        pass


def make_progress(progress: ProgressArg, total: int | None, desc: str) -> Progress:
    """A tqdm bar with rate and ETA, or a no-op.

    ``progress=True`` shows it only when stderr is a terminal (logs stay clean);
    ``"force"`` or ``GEARSHIFT_PROGRESS=1`` shows it anyway.
    """
    forced = progress == "force" or os.environ.get("GEARSHIFT_PROGRESS") == "1"
    if not progress or not (forced or sys.stderr.isatty()):
        return _Null()
    from tqdm.auto import tqdm

    bar: Any = tqdm(total=total, desc=desc, unit="item", file=sys.stderr, dynamic_ncols=True, smoothing=0.1)
    return bar  # type: ignore[no-any-return]
