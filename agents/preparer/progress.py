"""One converge's version states, and its "fetching" report written only when late.

Most installs take milliseconds. A report written before each one would put a store
write (on Consul a read and a raft PUT) on the path from new intent to the install
being in place, to say something that stops being true a moment later. So the
report is written only when the installs are still running after ``delay_s``: a
slow download still shows as "fetching" while it runs; a quick install shows only
its outcome.

The report is written by a timer thread, and ``InstallProgress`` as a context
manager cancels the timer and joins it on the way out: a report already being
written finishes before the converge returns, and the runtime writes the outcome
after that, so a late "fetching" can never land over the final report.
"""

from __future__ import annotations

import contextvars
import threading
from collections.abc import Callable, Mapping
from types import TracebackType

FETCHING = "fetching"

PROGRESS_AFTER_S = 0.5
"""How long installs run before the report says what they are fetching: longer than
an install of a small artifact takes on a busy host, short enough that a watcher of a
slow download (``pp status``, a rollout) learns of it at once."""


class InstallProgress:
    """The state of each version one converge handles (thread-safe), starting with
    "fetching" for those it installs, and the report of them if they take long."""

    def __init__(
        self,
        states: Mapping[str, str],
        report: Callable[[dict[str, str]], None],
        delay_s: float = PROGRESS_AFTER_S,
    ) -> None:
        self._states = dict(states)
        self._lock = threading.Lock()
        self._report = report
        # The timer runs in this converge's context, so its log lines name the app too.
        self._timer = threading.Timer(
            delay_s, contextvars.copy_context().run, args=(self._report_now,)
        )
        self._timer.daemon = True
        self._started = False

    def __enter__(self) -> InstallProgress:
        if FETCHING in self.snapshot().values():
            self._timer.start()
            self._started = True
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self._timer.cancel()
        if self._started:
            self._timer.join()  # a report being written ends before the outcome's

    def set(self, version: str, state: str) -> None:
        with self._lock:
            self._states[version] = state

    def snapshot(self) -> dict[str, str]:
        with self._lock:
            return dict(self._states)

    def _report_now(self) -> None:
        self._report(self.snapshot())
