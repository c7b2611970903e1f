"""``bin/launch/<agent>``: run one agent from the install the script lies in.

    python3 -m agents.kickstart.launch AGENT INSTALL_DIR

The install is ``<basedir>/installs/platypus_<version>``, resolved by the script, so a
process keeps running its own release's code after ``current`` moves on; the flags come
from ``<basedir>/agents.json`` (hostconfig). Every release declares every agent as a
service, and runit (through pp-setlive) supervises them all, so what each one does
depends on this host:

- an agent this host does not run idles, so that its service is up and the release's
  health gate passes;
- under ``--init runit`` the service is the agent itself;
- under ``--init systemd`` the agent runs as the unit ``platypus-<agent>.service``, and
  this service follows it: it restarts the unit when started (after pp-setlive moved
  ``current``, or its guard moved it back) and ends when the unit is no longer
  active or its agent's process ended (systemd restarting it on its own), so that
  runit sees what systemd sees: a release whose agent cannot stay up fails its
  health gate, and a pp-setlive that crash-loops is seen by its guard.
"""

from __future__ import annotations

import contextlib
import fcntl
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

from agents.kickstart import units
from agents.kickstart.hostconfig import HostConfig, HostConfigError

LOCK_WAIT_S = 300
FOLLOW_POLL_S = 1.0


def module_of(agent: str) -> str:
    return "agents." + agent.replace("-", "_")


def wait_for_setlive_lock(config: HostConfig) -> None:
    """A setlive run by hand on the same state dir (the kickstart's ``--once``, gating
    this very service) holds its lock: wait for it instead of crash-looping through
    that gate."""
    lock = config.state_of("setlive") / ".lock"
    with contextlib.suppress(FileNotFoundError):
        fd = os.open(lock, os.O_RDONLY | os.O_CLOEXEC)
        try:
            deadline = time.monotonic() + LOCK_WAIT_S
            while time.monotonic() < deadline:
                try:
                    fcntl.flock(fd, fcntl.LOCK_SH | fcntl.LOCK_NB)
                    return
                except BlockingIOError:
                    time.sleep(0.2)
        finally:
            os.close(fd)  # releases the shared lock, if taken


def idle(agent: str) -> None:
    print(f"pp-{agent} does not run on this host (see agents.json); idling", flush=True)
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(0))
    while True:
        signal.pause()


def unit_state(unit: str) -> dict[str, str]:
    shown = subprocess.run(
        ["systemctl", "show", unit, "-p", "ActiveState", "-p", "SubState", "-p", "NRestarts"],
        capture_output=True,
        text=True,
        check=False,
    ).stdout
    return dict(line.split("=", 1) for line in shown.splitlines() if "=" in line)


def follow(agent: str) -> None:
    unit = units.unit_name(agent)
    restarted = subprocess.run(["systemctl", "restart", unit], check=False)
    if restarted.returncode != 0:
        sys.exit(f"systemctl restart {unit} failed (exit {restarted.returncode})")
    # A restart asked for is not counted in NRestarts; the ones systemd makes are.
    restarts = unit_state(unit).get("NRestarts")
    print(f"restarted {unit}; following it", flush=True)
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(0))
    while True:
        time.sleep(FOLLOW_POLL_S)
        state = unit_state(unit)
        active = state.get("ActiveState", "")
        if active not in ("active", "activating", "reloading"):
            sys.exit(f"{unit} is {active or 'unknown'}")
        if state.get("SubState") == "auto-restart" or state.get("NRestarts") != restarts:
            sys.exit(f"pp-{agent} exited; systemd restarts {unit}")


def main(argv: list[str]) -> None:
    if len(argv) not in (2, 3) or argv[2:] not in ([], ["--unit"]):
        sys.exit("usage: python3 -m agents.kickstart.launch AGENT INSTALL_DIR [--unit]")
    agent, install, as_unit = argv[0], Path(argv[1]), argv[2:] == ["--unit"]
    basedir = install.parent.parent
    try:
        config = HostConfig.load(basedir)
    except HostConfigError as exc:
        sys.exit(f"pp-{agent}: {exc}")
    if agent not in config.agents:
        idle(agent)
    if config.init == "systemd" and not as_unit:
        follow(agent)
    if agent == "setlive":
        wait_for_setlive_lock(config)
    os.execv(sys.executable, [sys.executable, "-m", module_of(agent), *config.flags(agent)])


if __name__ == "__main__":
    main(sys.argv[1:])
