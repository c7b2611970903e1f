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
- the deadline passes: the guard marks the version failed (so the restored
  setlive does not try it again until the intent changes or ``pp retry``),
  points ``current`` back at the version it replaced and restarts the bundle's
  services through runit.

    python -m agents.setlive.guard --app A --basedir B --version V --from W
        --services s1,s2 --stage DIR --state-dir DIR --deadline SECONDS
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

POLL_S = 0.5


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
    deadline_s: float,
) -> None:
    failure = Failure(
        version=version,
        fingerprint=fingerprint,
        rolled_back_to=from_version,
        output=f"pp-setlive {version} did not finish its own deploy within {deadline_s:g}s; "
        "rolled back by its guard",
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
    deadline = time.monotonic() + args.deadline
    while time.monotonic() < deadline:
        reason = verdict(state, layout, args.version)
        if reason is not None:
            log.info("guard.done", app=args.app, version=args.version, reason=reason)
            return 0
        time.sleep(POLL_S)
    roll_back(
        state,
        layout,
        args.stage,
        version=args.version,
        from_version=args.from_version,
        services=[s for s in args.services.split(",") if s],
        fingerprint=args.fingerprint,
        retry_token=args.retry_token,
        deadline_s=args.deadline,
    )
    return 1


if __name__ == "__main__":
    sys.exit(main())
