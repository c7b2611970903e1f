"""scripts/kickstart, for real, under a private runsvdir with every path in a temp dir.

The first run lays the agent bundle down; from then on pp-preparer and pp-setlive run
from the bundle under runit, and a second run only publishes and deploys version 2,
which the setlive under runit installs and switches to on its own.
"""

from __future__ import annotations

import os
import subprocess
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest
from runit_support import (  # noqa: F401
    Runsvdir,
    kill_our_guards,
    require_root,
    runsvdir,
    wait_for,
)

from agents.setlive.observe import read_environ
from agents.setlive.state import StateDir
from agents.system import runit
from agents.system.layout import AppLayout
from intent.model import Reality
from intent.store import IntentStore
from intent.store.sqlite import SqliteStore

REPO = Path(__file__).resolve().parent.parent
APP = "platypus"
NODE = "n1"


@dataclass
class Host:
    root: Path
    runit_dir: Path
    store: IntentStore

    @property
    def layout(self) -> AppLayout:
        return AppLayout(self.root / "opt" / APP, APP)

    @property
    def state_dir(self) -> Path:
        return self.root / "state"

    def kickstart(self, version: str) -> subprocess.CompletedProcess[str]:
        command = [
            str(REPO / "scripts" / "kickstart"),
            "--skip-setup",
            "--store", f"sqlite://{self.root / 'store.db'}",
            "--node", NODE,
            "--version", version,
            "--runit", str(self.runit_dir),
            "--stage", str(self.root / "stage"),
            "--state-dir", str(self.state_dir),
            "--log-root", str(self.root / "log"),
            "--basedir", str(self.layout.basedir),
            "--repo", str(self.root / "repo"),
        ]  # fmt: skip
        env = {k: v for k, v in os.environ.items() if not k.startswith("PP_")}
        return subprocess.run(command, capture_output=True, text=True, env=env, timeout=120)

    def report(self, agent: str) -> Reality | None:
        found = [r for r in self.store.reality(NODE, APP) if r.agent == agent]
        return found[0] if found else None

    def service(self, agent: str) -> runit.ServiceStatus:
        return runit.status(self.root / "stage" / f"{APP}-{agent}")

    def running(self, agent: str) -> dict[str, str]:
        """The environment of the agent's process under runit ({} when it is not up)."""
        status = self.service(agent)
        if not status.up or status.pid is None:
            return {}
        return read_environ(status.pid) or {}

    def describe(self) -> str:
        logs = {
            agent: (self.root / "log" / f"{APP}-{agent}" / "current").read_text()[-1500:]
            for agent in ("preparer", "setlive")
            if (self.root / "log" / f"{APP}-{agent}" / "current").exists()
        }
        return (
            f"setlive={self.report('setlive')} preparer={self.report('preparer')} "
            f"current={self.layout.version_of(self.layout.current)} logs={logs}"
        )


@pytest.fixture
def host(runsvdir: Runsvdir) -> Iterator[Host]:  # noqa: F811
    require_root()
    root = runsvdir.root / "kick"
    root.mkdir(mode=0o755)
    made = Host(root, runsvdir.service_dir, IntentStore(SqliteStore(root / "store.db")))
    try:
        yield made
    finally:
        kill_our_guards(root)
        made.store.close()


def _runs(host: Host, agent: str, version: str) -> bool:
    env = host.running(agent)
    src = host.layout.install_dir(version) / "src"
    return env.get("PP_VERSION") == version and env.get("PYTHONPATH") == str(src)


def _reports_since(host: Host, agent: str, version: str, since: float) -> bool:
    report = host.report(agent)
    return (
        report is not None
        and report.updated_at > since
        and (report.status, report.version) == ("converged", version)
    )


def test_kickstart_runs_the_agents_under_runit_and_they_deploy_their_next_version(
    host: Host,
) -> None:
    first = host.kickstart("1")
    assert first.returncode == 0, first.stdout + first.stderr
    assert "kickstart: platypus 1 runs under runit" in first.stdout

    # The agents now run from the bundle's own install, not from the checkout, and
    # report their own app from there.
    # A SIGHUP makes each resync now: what they report after it, they report themselves
    # (the kickstart's own --once runs have ended).
    for agent in ("preparer", "setlive"):
        assert wait_for(lambda a=agent: _runs(host, a, "1"), 15), host.describe()  # type: ignore[misc]
    hup = time.time()
    for agent in ("preparer", "setlive"):
        subprocess.run(["sv", "hup", str(host.root / "stage" / f"{APP}-{agent}")], check=True)
    for agent in ("preparer", "setlive"):
        assert wait_for(lambda a=agent: _reports_since(host, a, "1", hup), 20), host.describe()  # type: ignore[misc]
        assert _runs(host, agent, "1")
    assert not (host.layout.install_dir("1") / "bin" / "launch" / "iptables").exists()
    assert (host.layout.install_dir("1") / "VERSION").read_text() == "1\n"
    setlive_pid = host.service("setlive").pid

    # Version 2: the second run sees the setlive under runit and only deploys; that
    # setlive installs (through the preparer), switches and restarts itself.
    second = host.kickstart("2")
    assert second.returncode == 0, second.stdout + second.stderr
    assert "pp-setlive already runs here" in second.stdout

    def deployed_2() -> bool:
        return (
            host.layout.version_of(host.layout.current) == "2"
            and _runs(host, "setlive", "2")
            and _runs(host, "preparer", "2")
            and _reports_since(host, "setlive", "2", hup)
            and StateDir(host.state_dir).load(APP).pending is None
        )

    assert wait_for(deployed_2, 45), host.describe()
    assert host.service("setlive").pid != setlive_pid
    assert host.layout.version_of(host.layout.previous) == "1"
