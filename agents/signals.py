"""Signals that also set an agent's stop event, on top of the runtime's own handler.

The runtime's SIGTERM handler stops its loop between steps. A step that can run
long (a health gate, a download) watches a ``threading.Event`` instead, and this
sets it from the same signal, so runit stopping an agent does not wait for the
step to end by itself.
"""

from __future__ import annotations

import signal
import threading
from types import FrameType


def chain_stop(stop: threading.Event, *signums: signal.Signals) -> None:
    """Make each of ``signums`` (SIGTERM by default) set ``stop``, then run the
    handler installed before. Call it from the main thread, after the runtime has
    installed its handlers."""
    for signum in signums or (signal.SIGTERM,):
        _chain(stop, signum)


def _chain(stop: threading.Event, signum: signal.Signals) -> None:
    previous = signal.getsignal(signum)

    def on_signal(number: int, frame: FrameType | None) -> None:
        stop.set()
        if callable(previous):
            previous(number, frame)

    signal.signal(signum, on_signal)
