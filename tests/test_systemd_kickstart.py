"""``bin/kickstart --init systemd`` under a real, private systemd (tests/systemd_support.py).

The agents run as units (``Restart=always``, ``KillMode=process``) that pass
``systemd-analyze verify``; apps, and each release's followers of the agents' units, run
under a runsvdir the kickstart starts as a unit. Then the agents deploy themselves: a
release with a new dependency version, and a release whose pp-setlive cannot start,
which the guard (alive after its setlive's unit restarted: KillMode=process) rolls back.
"""

from __future__ import annotations

import shutil
import tempfile
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest
from kickstart_support import (
    APP,
    CLEAN_PATH,
    CRASH_LOOP_WAIT_S,
    GUARD_DEADLINE_S,
    NODE,
    built,
    release,
    setlive_rolled_back,
    unpack,
    wait_for,
)
from systemd_support import PrivateSystemd, private_systemd, var_lib_root

from agents.setlive.state import StateDir
from agents.system.layout import AppLayout
from intent.model import Reality
from intent.store import IntentStore, open_store

# Bundles built (once per run), three health gates and a guard's deadline.
pytestmark = pytest.mark.timeout(2400)
AGENTS = ("preparer", "setlive")


@dataclass
class SystemdHost:
    root: Path
    systemd: PrivateSystemd
    store: IntentStore

    @property
    def layout(self) -> AppLayout:
        return AppLayout(self.root / "opt" / APP, APP)

    def kickstart(self, tarball: Path, sha256: str) -> str:
        (self.root / "downloads").mkdir(exist_ok=True)
        where = Path(tempfile.mkdtemp(dir=self.root / "downloads"))
        shutil.copyfile(tarball, where / tarball.name)
        tree = unpack(tarball, where / "tree")
        done = self.systemd.run(
            str(tree / "bin" / "kickstart"),
            "--init", "systemd",
            "--store", f"sqlite://{self.root / 'store.db'}",
            "--node", NODE,
            "--runit", str(self.root / "service"),
            "--stage", str(self.root / "stage"),
            "--basedir", str(self.layout.basedir),
            "--state-dir", str(self.root / "state"),
            "--log-root", str(self.root / "log"),
            "--repo", f"file://{self.root / 'repo'}",
            "--guard-deadline", str(GUARD_DEADLINE_S),
            "--tarball", str(where / tarball.name),
            "--sha256", sha256,
            env={"PATH": CLEAN_PATH, "HOME": str(self.root), "LANG": "C.UTF-8"},
            timeout=600,
        )  # fmt: skip
        assert done.returncode == 0, done.stdout + done.stderr + self.describe()
        return done.stdout

    def runs(self, agent: str, version: str) -> bool:
        """The agent's unit is active, its process running ``version``'s install."""
        unit = f"{APP}-{agent}.service"
        pid = self.systemd.main_pid(unit)
        if pid is None or not self.systemd.active(unit):
            return False
        install = self.layout.install_dir(version)
        return self.systemd.environ(pid).get("PYTHONPATH") == f"{install}/src:{install}/site"

    def report(self, agent: str) -> Reality | None:
        found = [r for r in self.store.reality(NODE, APP) if r.agent == agent]
        return found[0] if found else None

    def reports(self, agent: str, version: str, since: float) -> bool:
        report = self.report(agent)
        return (
            report is not None
            and report.updated_at > since
            and (report.status, report.version) == ("converged", version)
        )

    def current(self) -> str | None:
        return self.layout.version_of(self.layout.current)

    def describe(self) -> str:
        journals = "\n".join(
            f"--- {a}\n{self.systemd.journal(f'{APP}-{a}.service')[-1500:]}" for a in AGENTS
        )
        guard = self.root / "state" / "setlive" / f"{APP}.guard.log"
        guard_log = guard.read_text()[-1500:] if guard.exists() else ""
        return (
            f"\nsetlive={self.report('setlive')} current={self.current()}\n{journals}\n"
            f"--- guard\n{guard_log}"
        )


@pytest.fixture
def host(tmp_path: Path) -> Iterator[SystemdHost]:
    with var_lib_root() as root, private_systemd(tmp_path / "systemd.log") as systemd:
        store = open_store(f"sqlite://{root / 'store.db'}")
        try:
            yield SystemdHost(root, systemd, store)
        finally:
            store.close()


def test_agents_run_as_systemd_units_and_deploy_themselves_with_rollback(
    host: SystemdHost,
) -> None:
    v1, v2 = built("repro-a"), release("2", probe="2.0")
    broken = release("3", probe="2.0", broken=True)
    one = v1.version

    out = host.kickstart(v1.path, v1.sha256)
    assert "platypus-runsvdir.service" in out
    for agent in AGENTS:
        assert wait_for(lambda a=agent: host.runs(a, one), 180), host.describe()  # type: ignore[misc]
    units = [f"/etc/systemd/system/{APP}-{a}.service" for a in AGENTS]
    verified = host.systemd.run("systemd-analyze", "verify", *units)
    assert verified.returncode == 0, verified.stdout + verified.stderr
    shown = host.systemd.systemctl("show", "-p", "Restart,KillMode", f"{APP}-setlive.service")
    assert shown.stdout.split() == ["Restart=always", "KillMode=process"]
    since = time.time()
    host.systemd.systemctl("kill", "-s", "HUP", f"{APP}-setlive.service")
    assert wait_for(lambda: host.reports("setlive", one, since), 180), host.describe()

    again = host.kickstart(v1.path, v1.sha256)
    assert "already runs here" in again and "already active, nothing changed" in again

    # A release with another version of a dependency: the units restart into it.
    setlive_pid = host.systemd.main_pid(f"{APP}-setlive.service")
    host.kickstart(v2.path, v2.sha256)

    def deployed_2() -> bool:
        return (
            host.current() == "2"
            and all(host.runs(a, "2") for a in AGENTS)
            and host.reports("setlive", "2", since)
            and StateDir(host.root / "state" / "setlive").load(APP).pending is None
        )

    assert wait_for(deployed_2, 400), host.describe()
    assert host.systemd.main_pid(f"{APP}-setlive.service") != setlive_pid
    assert (host.layout.install_dir("2") / "site" / "ppprobe" / "__init__.py").read_text() == (
        'VERSION = "2.0"\n'
    )

    # A release whose pp-setlive cannot start: its guard survived the unit's restart
    # (KillMode=process) and rolls back to 2.
    host.kickstart(broken.path, broken.sha256)

    assert wait_for(setlive_rolled_back(host, "2", "3"), CRASH_LOOP_WAIT_S), host.describe()
    assert host.current() == "2"
