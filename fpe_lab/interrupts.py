"""SIGINT and SIGTERM: one contract for the command line, wherever the signal lands.

:func:`fpe_lab.run.main` installs :func:`raise_on_signals` first thing (before torch is imported), so a
signal at any point — start-up, training, the evaluation after it, ``eval``, a study — unwinds the
stack as an :class:`Interrupted` exception: ``finally`` blocks run, locks are released, the temporary
file of an atomic write is removed (every file is written whole or not at all). ``main`` then prints
one line ``error: interrupted: …`` and exits 128 + the signal number (130 for SIGINT, 143 for SIGTERM).

The training loop defers the signal to the end of its step and writes a checkpoint first
(:class:`fpe_lab.train.TrainingInterrupted`, same exit codes). Study workers stop with their parent
(:func:`fpe_lab.study.run_study` terminates them when it is interrupted).

:class:`Interrupted` derives from BaseException, like KeyboardInterrupt, so that ``except Exception``
in library code never swallows it. This module imports nothing heavy.
"""

from __future__ import annotations

import contextlib
import signal
import threading
from collections.abc import Iterator

__all__ = ["Interrupted", "SIGNALS", "raise_on_signals"]

SIGNALS: tuple[signal.Signals, ...] = (signal.SIGINT, signal.SIGTERM)


class Interrupted(BaseException):
    """SIGINT or SIGTERM arrived; ``exit_code`` is 128 + the signal number."""

    def __init__(self, signum: int) -> None:
        self.signum = int(signum)
        self.exit_code = 128 + self.signum
        super().__init__(signal.Signals(self.signum).name)


def _raise(signum: int, frame: object) -> None:
    raise Interrupted(signum)


@contextlib.contextmanager
def raise_on_signals() -> Iterator[None]:
    """Within the block, SIGINT and SIGTERM raise :class:`Interrupted` in the main thread; the previous
    handlers come back after it. Outside the main thread: no-op."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    previous = {sig: signal.signal(sig, _raise) for sig in SIGNALS}
    try:
        yield
    finally:
        for sig, handler in previous.items():
            signal.signal(sig, handler)
