"""The agents' systemd units, on a host kickstarted with ``--init systemd``.

    platypus-<agent>.service   ExecStart=<basedir>/current/bin/launch/<agent> --unit

``current`` is resolved when the unit starts, so a restart runs the release pp-setlive
(or its guard) made current. The choices:

- ``Restart=always`` with no start limit: an agent that exits is always started again,
  as runit would.
- ``KillMode=process``: a stop or restart signals the agent's own process only. When
  pp-setlive deploys a new release of itself it first leaves a guard behind
  (``setsid -f``), which leaves setlive's session but not its unit's cgroup; the default
  ``control-group`` (and ``mixed``, which SIGKILLs the rest at the end) would kill that
  guard with the setlive it watches, the very moment it is needed: a release whose
  setlive cannot start would then stay in place with nobody to roll it back. The
  agents start no other long-lived children (health checks are waited for).
- Apps keep running under runit (pp-setlive's services); each release's runit service
  for an agent restarts its unit when started and follows it (agents/kickstart/launch.py),
  so pp-setlive and its guard switch the agents as they switch any app's services.
  ``PP_FOLLOWED_BY`` names that follower to pp-setlive as its own service (under runit
  it finds it among its ancestors), so it deploys itself the same way: guard first,
  its own follower restarted last.
- When no runsvdir watches ``--runit``, ``platypus-runsvdir.service`` runs one. Debian
  ships runit's own unit in a separate package (``runit-systemd``) that many hosts do
  not have, and installing it would also change what ``/etc/service`` means to the
  rest of the host; one unit of our own, for the one directory, changes nothing else.
  It keeps the default ``KillMode=control-group``: stopping it stops the apps with it,
  as stopping runit does.
"""

from __future__ import annotations

from pathlib import Path

PREFIX = "platypus-"


def unit_name(agent: str) -> str:
    return f"{PREFIX}{agent}.service"


def unit_text(agent: str, basedir: Path) -> str:
    return f"""\
[Unit]
Description=Platypus agent pp-{agent}
After=network-online.target
Wants=network-online.target
StartLimitIntervalSec=0

[Service]
Type=simple
ExecStart={basedir}/current/bin/launch/{agent} --unit
Restart=always
RestartSec=1
KillMode=process
Environment=PYTHONUNBUFFERED=1 PP_FOLLOWED_BY={PREFIX}{agent}

[Install]
WantedBy=multi-user.target
"""


RUNSVDIR_UNIT = f"{PREFIX}runsvdir.service"


def runsvdir_unit_text(runsvdir: str, runit_dir: Path) -> str:
    return f"""\
[Unit]
Description=Platypus: runit supervising the apps in {runit_dir}
StartLimitIntervalSec=0

[Service]
Type=simple
ExecStart={runsvdir} -P {runit_dir}
Restart=always
RestartSec=1

[Install]
WantedBy=multi-user.target
"""
