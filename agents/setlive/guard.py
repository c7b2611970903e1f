"""The guard setlive leaves behind before it switches the bundle it runs from.

When setlive deploys a new version of itself (the agent bundle), runit stops
it halfway and the new setlive must finish the job. If the new one cannot (it
crashes on start, hangs, never passes its own gate), nobody would be left to
roll back. So before moving ``current``, setlive starts this guard in its own
session (``setsid``), from the code that is running now, and the guard waits:

- the pending note for the new version is cleared while ``current`` points at
  it: the new setlive gated itself; done.
- someone else rolled back (a failure mark for that version) or moved on (a
  pending note for another version, ``current`` elsewhere with no note): done.
- the service that runs setlive (``--self``) has exited again and again since
  the switch (``CRASH_LOOP_EXITS`` ends, the first being the old setlive's own
  restart): a setlive that cannot start will not finish, and waiting out the
  deadline would only leave the host without a working setlive for longer; or
- the deadline passes (a new setlive that hangs, or never passes its gate).

In the last two cases the guard marks the version failed (so the restored
setlive does not try it again until the intent changes or ``pp retry``),
points ``current`` back at the version it replaced and restarts the bundle's
services through runit.

    python -m agents.setlive.guard --app A --basedir B --version V --from W
        --services s1,s2 --self s1 --stage DIR --state-dir DIR --deadline SECONDS
        --fingerprint F [--retry-token T]
"""

from __future__ import annotations

import argparse
import contextlib
import os
import sys
import time
from pathlib import Path

import structlog

from agents import logs
from agents.setlive.state import Failure, StateDir
from agents.system import fs, runit
from agents.system.layout import AppLayout

log = structlog.get_logger()

POLL_S = 0.25
"""Often enough to see each end of a service that crashes on start: runsv holds such a
service down for a second before it starts it again."""
CRASH_LOOP_EXITS = 4
"""Ends of the setlive service seen before the guard gives up on the new setlive: the
old one's restart into it, then three of the new one's."""


class ExitCounter:
    """Counts the ends of one runit service's runs from what ``runsv`` records, polled.

    runsv gives each run and each pause its own start time. A run that ends shows as a
    change from ``run`` to ``down``/``finish``, or to a run with another pid (a run that
    lasted over a second is started again at once, and its pause may fall between two
    looks); two different pauses with no run seen between them also mean a run ended,
    except ``finish`` then ``down``, the two halves of one end.
    """

    def __init__(self) -> None:
        self.exits = 0
        self._last: tuple[str, int | None, float | None] | None = None

    def see(self, status: runit.ServiceStatus) -> int:
        if status.state is None:
            return self.exits
        seen = (status.state, status.pid, status.started_at)
        last, self._last = self._last, seen
        if last is None or seen == last:
            return self.exits
        started = last[0] != "run" and status.state == "run"
        finished = (last[0], status.state) == ("finish", "down")
        if not (started or finished):
            self.exits += 1
        return self.exits


def verdict(state: StateDir, layout: AppLayout, version: str) -> str | None:
    """Why the guard can leave, or None while the switch to ``version`` is unfinished."""
    note = state.load(layout.app)
    current = layout.version_of(layout.current)
    if note.failure is not None and note.failure.version == version:
        return "rolled back already"
    if note.pending is None:
        return "switch finished" if current == version else "switch abandoned"
    if note.pending.target != version:
        return "a newer switch is under way"
    return None


def roll_back(
    state: StateDir,
    layout: AppLayout,
    stage: Path,
    *,
    version: str,
    from_version: str,
    services: list[str],
    fingerprint: str,
    retry_token: str | None,
    why: str,
) -> None:
    failure = Failure(
        version=version,
        fingerprint=fingerprint,
        rolled_back_to=from_version,
        output=f"pp-setlive {version} {why}; rolled back by its guard",
        failed_at=time.time(),
        retry_token=retry_token,
    )
    state.update(layout.app, failure=failure, pending=None)
    target = os.path.relpath(layout.install_dir(from_version), layout.basedir)
    fs.symlink_atomic(target, layout.current)
    for name in services:
        with contextlib.suppress(runit.RunitError):
            runit.restart(stage / name)
    log.warning("guard.rolled_back", app=layout.app, failed=version, to=from_version)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m agents.setlive.guard")
    parser.add_argument("--app", required=True)
    parser.add_argument("--basedir", required=True, type=Path)
    parser.add_argument("--version", required=True)
    parser.add_argument("--from", dest="from_version", required=True)
    parser.add_argument("--services", required=True)
    parser.add_argument("--self", dest="self_service", required=True)
    parser.add_argument("--stage", required=True, type=Path)
    parser.add_argument("--state-dir", required=True, type=Path)
    parser.add_argument("--deadline", required=True, type=float)
    parser.add_argument("--fingerprint", required=True)
    parser.add_argument("--retry-token", default=None)
    args = parser.parse_args(argv)
    logs.configure("json")

    state = StateDir(args.state_dir)
    layout = AppLayout(args.basedir, args.app)
    log.info("guard.watching", app=args.app, version=args.version, deadline_s=args.deadline)
    why = watch(state, layout, args.version, args.stage / args.self_service, args.deadline)
    if why is None:
        return 0
    roll_back(
        state,
        layout,
        args.stage,
        version=args.version,
        from_version=args.from_version,
        services=[s for s in args.services.split(",") if s],
        fingerprint=args.fingerprint,
        retry_token=args.retry_token,
        why=why,
    )
    return 1


def watch(
    state: StateDir, layout: AppLayout, version: str, self_service: Path, deadline_s: float
) -> str | None:
    """Wait for the switch to ``version`` to be settled (None), or say why the guard
    must roll it back."""
    deadline = time.monotonic() + deadline_s
    ends = ExitCounter()
    while time.monotonic() < deadline:
        reason = verdict(state, layout, version)
        if reason is not None:
            log.info("guard.done", app=layout.app, version=version, reason=reason)
            return None
        crash_looping = ends.see(runit.status(self_service)) >= CRASH_LOOP_EXITS
        # The note may have been cleared since it was read: a setlive that finished is
        # not rolled back for restarts that came after.
        if crash_looping and verdict(state, layout, version) is None:
            return f"exited {ends.exits - 1} times without finishing its own deploy"
        time.sleep(POLL_S)
    return f"did not finish its own deploy within {deadline_s:g}s"


if __name__ == "__main__":
    sys.exit(main())
