"""Progress bars that suit where they are read.

``progress_bar(...)`` takes tqdm's arguments. On a terminal it is an ordinary tqdm bar. When stderr is
not a terminal (CI, ``nohup``, a cluster job's log) carriage-return redraws would pile up into one
enormous line (a 400-step run wrote 44 kB of them), so the bar instead writes a plain line at most once
a minute and when it closes — e.g. ``train:  45%|████▌     | 180/400 [00:59<01:12, ...]``.
"""

from __future__ import annotations

import sys
from typing import Any, TextIO

from tqdm.auto import tqdm

__all__ = ["progress_bar", "LOG_INTERVAL_S"]

LOG_INTERVAL_S = 60.0


class _Lines:
    """A file that turns tqdm's redraws into whole lines: drops carriage returns and cursor moves."""

    def __init__(self, stream: TextIO) -> None:
        self.stream = stream

    def write(self, text: str) -> int:
        line = text.replace("\r", "").replace("\x1b[A", "").strip()
        if line:
            self.stream.write(line + "\n")
        return len(text)

    def flush(self) -> None:
        self.stream.flush()


class _LogBar(tqdm):
    """tqdm that draws at most once per LOG_INTERVAL_S (forced refreshes such as ``set_postfix``
    included), and always when it closes."""

    def display(self, msg: str | None = None, pos: int | None = None) -> bool:
        now = self._time()
        closing = pos == 0 and msg is None and self.n == (self.total or self.n)
        last = getattr(self, "_last_line", None)
        if msg is None and not closing and last is not None and now - last < LOG_INTERVAL_S:
            return True
        self._last_line = now
        return super().display(msg=msg, pos=pos)


def progress_bar(*args: Any, **kwargs: Any) -> tqdm:
    """``tqdm(*args, **kwargs)``, in plain occasional lines when stderr is not a terminal."""
    stream = kwargs.pop("file", None) or sys.stderr
    if kwargs.get("disable") or (hasattr(stream, "isatty") and stream.isatty()):
        return tqdm(*args, file=stream, **kwargs)
    kwargs.update(file=_Lines(stream), mininterval=LOG_INTERVAL_S, maxinterval=LOG_INTERVAL_S,
                  dynamic_ncols=False, ncols=100, position=None, leave=True)
    return _LogBar(*args, **kwargs)
