"""Ctrl-C and SIGTERM during training: finish the step, save, stop; a second signal aborts at once.

Python's default SIGINT handler raises KeyboardInterrupt wherever the main thread happens to be,
often inside the jitted step whose input state was donated: nothing valid is left to save. So
while training runs, SIGINT and SIGTERM only *record* the request; the loop checks it after each
step, saves a checkpoint of the completed steps and raises `TrainingInterrupted`. The first signal
also restores the OS default action for both signals, so a second one ends the process at once,
even while it is blocked inside XLA (a Python handler would only run after the C call returns).
A run killed that way resumes from its last complete checkpoint.

Exit codes follow the shell convention 128 + signal: 130 for SIGINT, 143 for SIGTERM.
"""

from __future__ import annotations

import signal
import threading
from types import FrameType, TracebackType
from typing import Any

STOP_SIGNALS = (signal.SIGINT, signal.SIGTERM)


class TrainingInterrupted(Exception):  # noqa: N818 (a request, not an error)
    """Training stopped on a signal after saving; `exit_code` is 128 + the signal number."""

    def __init__(self, signum: int, message: str):
        super().__init__(message)
        self.signum = signum
        self.exit_code = 128 + signum


class StopSignals:
    """Context manager: while active, SIGINT/SIGTERM set `requested` (the signal number) instead of
    interrupting; previous handlers come back on exit. Outside the main thread (where Python
    cannot install handlers) it does nothing."""

    def __init__(self) -> None:
        self.requested: int | None = None
        self._previous: dict[int, Any] = {}

    def _handle(self, signum: int, _: FrameType | None) -> None:
        self.requested = signum
        for s in STOP_SIGNALS:  # a second signal: the OS default, i.e. terminate now
            signal.signal(s, signal.SIG_DFL)

    def __enter__(self) -> StopSignals:
        if threading.current_thread() is threading.main_thread():
            for s in STOP_SIGNALS:
                self._previous[s] = signal.signal(s, self._handle)
        return self

    def __exit__(self, exc_type: type[BaseException] | None, exc: BaseException | None,
                 tb: TracebackType | None) -> None:
        for s, handler in self._previous.items():
            signal.signal(s, handler)
        self._previous.clear()


def agreed_stop(signals: StopSignals, at_boundary: bool) -> int | None:
    """The signal to stop on, the same in every process. One process: as soon as it is requested.
    Several: only at `at_boundary` steps (which every process reaches together), where one
    all-gather tells whether any process was signalled, so all stop after the same step instead
    of one waiting forever in the next step's collectives."""
    import jax

    if jax.process_count() == 1:
        return signals.requested
    if not at_boundary:
        return None
    import numpy as np
    from jax.experimental import multihost_utils

    mine = np.int32(signals.requested or 0)
    everyone = np.asarray(multihost_utils.process_allgather(mine))
    return int(everyone.max()) or None


def ignore_sigint(*_: object) -> None:
    """In a data-loading worker process: a terminal's Ctrl-C reaches the whole process group, and a
    worker dying of it would end the stream under the trainer, which must finish its step and
    save. The trainer stops its workers when it stops."""
    signal.signal(signal.SIGINT, signal.SIG_IGN)
