"""SIGINT and SIGTERM during training: a request to stop at the next safe point with a
checkpoint, not a kill."""

from __future__ import annotations

import os
import signal
import sys
import threading
from typing import Any


class _StopSignals:
    """While active (main thread only), SIGINT and SIGTERM ask the training loop to stop at
    its next safe point, with a checkpoint, instead of killing it; a second SIGINT stops at
    once (KeyboardInterrupt, the last checkpoint kept). The previous handlers come back on
    exit."""

    SIGNALS = (signal.SIGINT, signal.SIGTERM)

    def __init__(self) -> None:
        self.signum: int | None = None
        self._previous: dict[int, Any] = {}
        self._pid = os.getpid()

    def __enter__(self) -> _StopSignals:
        self._pid = os.getpid()
        if threading.current_thread() is threading.main_thread():
            for signum in self.SIGNALS:
                self._previous[signum] = signal.signal(signum, self._handle)
        return self

    def __exit__(self, *exc_info) -> None:
        for signum, handler in self._previous.items():
            signal.signal(signum, handler)

    def _handle(self, signum: int, frame) -> None:
        if os.getpid() != self._pid:
            # A forked DataLoader worker that received the signal before its worker_init_fn
            # (_ignore_stop_signals) ran: the signal is the main process's to handle.
            return
        if self.signum is not None:
            if signum == signal.SIGINT:
                raise KeyboardInterrupt
            return
        self.signum = signum
        sys.stderr.write(
            f"\n{signal.Signals(signum).name} received: stopping after the current step with "
            "a checkpoint (Ctrl-C again to stop at once, without one)\n"
        )

    @property
    def requested(self) -> bool:
        return self.signum is not None


def _ignore_stop_signals(worker_id: int) -> None:
    """DataLoader workers leave SIGINT and SIGTERM to the main process (a Ctrl-C reaches the
    whole process group; a dead worker would end the epoch with an error, not a checkpoint).
    They exit with it."""
    for signum in _StopSignals.SIGNALS:
        signal.signal(signum, signal.SIG_IGN)
