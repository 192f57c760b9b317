"""SIGINT/SIGTERM/SIGHUP (Ctrl-C, a scheduler's pre-emption, a closed terminal) become a request to stop after the current step."""
from __future__ import annotations

import contextlib
import logging
import signal
import threading
from typing import Iterator

log = logging.getLogger(__name__)


STOP_SIGNALS = (signal.SIGINT, signal.SIGTERM, signal.SIGHUP)


class TrainingInterrupted(Exception):
    """Raised after the state and embedding were saved because a stop signal arrived."""

    def __init__(self, step: int, signal_name: str):
        super().__init__(f"stopped by {signal_name} after step {step}; the embedding and full state were saved, rerun to resume")
        self.step, self.signal_name = step, signal_name


class StopRequest:
    def __init__(self) -> None:
        self.signal_name: str | None = None

    @property
    def requested(self) -> bool:
        return self.signal_name is not None


@contextlib.contextmanager
def stop_on_signals() -> Iterator[StopRequest]:
    """Install SIGINT/SIGTERM/SIGHUP handlers for the block (main thread only) and restore the old ones after."""
    request = StopRequest()
    if threading.current_thread() is not threading.main_thread():
        yield request
        return

    def handle(signum, _frame):
        if request.requested:  # a second Ctrl-C: the user really wants out now
            raise KeyboardInterrupt
        request.signal_name = signal.Signals(signum).name
        log.warning("%s received: saving after this step", request.signal_name)

    previous = {sig: signal.signal(sig, handle) for sig in STOP_SIGNALS}
    try:
        yield request
    finally:
        for sig, handler in previous.items():
            signal.signal(sig, handler)
