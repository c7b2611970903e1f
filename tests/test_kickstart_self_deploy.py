"""The agents deploy their own releases, installed from the bundle on a bare host.

Version 1 is kickstarted; version 2 carries one more dependency (``ppprobe``, a wheel
the test writes): the running agents install it, switch, and restart into it,
health-gated. Version 3's pp-setlive cannot start: the guard left by
version 2's setlive puts version 2 back. On the embedded store and on Consul.
"""

from __future__ import annotations

import shutil
import subprocess
import uuid
from collections.abc import Iterator
from pathlib import Path

import pytest
from kickstart_support import (
    APP,
    CRASH_LOOP_WAIT_S,
    GUARD_DEADLINE_S,
    BareHost,
    bare_host,
    built,
    hup,
    release,
    setlive_rolled_back,
    unpack,
    wait_for,
)

# Bundles built (once per run), three health gates and a guard's deadline.
pytestmark = pytest.mark.timeout(2400)


@pytest.fixture(params=["sqlite", pytest.param("consul", marks=pytest.mark.consul)])
def host(request: pytest.FixtureRequest) -> Iterator[BareHost]:
    if request.param == "consul":
        addr = request.getfixturevalue("consul_addr")
        with bare_host(f"consul://{addr}", f"t-{uuid.uuid4().hex[:8]}/") as made:
            yield made
    else:
        with bare_host() as made:
            yield made


def _unpacked(host: BareHost, tarball: Path) -> tuple[Path, Path]:
    """The tarball as downloaded onto the host, and the tree it unpacks to."""
    where = host.root / "downloads" / tarball.name.removesuffix(".tar.gz")
    copy = where / tarball.name
    where.mkdir(parents=True)
    shutil.copyfile(tarball, copy)
    return copy, unpack(tarball, where / "tree")


def _probe_of(host: BareHost, agent: str) -> str:
    """The ppprobe version the running agent's own Python path gives."""
    env = host.running(agent)
    done = subprocess.run(
        [str(host.layout.basedir / "python3"), "-c", "import ppprobe; print(ppprobe.VERSION)"],
        env={"PYTHONPATH": env.get("PYTHONPATH", ""), "PATH": "/usr/bin:/bin"},
        capture_output=True,
        text=True,
        cwd="/",
    )
    return done.stdout.strip() or done.stderr.strip()


def _kickstart(host: BareHost, tarball: Path, sha256: str) -> subprocess.CompletedProcess[str]:
    copy, tree = _unpacked(host, tarball)
    return host.kickstart(
        tree, "--tarball", str(copy), "--sha256", sha256, "--guard-deadline", str(GUARD_DEADLINE_S)
    )


def test_the_agents_deploy_a_release_with_new_dependencies_and_roll_back_a_broken_one(
    host: BareHost,
) -> None:
    v1, v2 = built("repro-a"), release("2", probe="2.0")
    broken = release("3", probe="2.0", broken=True)
    one = v1.version

    first = _kickstart(host, v1.path, v1.sha256)
    assert first.returncode == 0, first.stdout + first.stderr
    for agent in ("preparer", "setlive"):
        assert wait_for(lambda a=agent: host.runs(a, one), 180), host.describe()  # type: ignore[misc]
    since = hup(host, "preparer", "setlive")
    assert wait_for(lambda: host.reports_since("setlive", one, since), 180), host.describe()
    assert "No module named 'ppprobe'" in _probe_of(host, "setlive")
    setlive_pid = host.service("setlive").pid

    # Version 2, published and deployed by a kickstart run from it: the agents that run
    # install it (its new dependency with it), switch, and restart into it.
    second = _kickstart(host, v2.path, v2.sha256)
    assert second.returncode == 0, second.stdout + second.stderr
    assert "already runs here" in second.stdout

    def deployed_2() -> bool:
        return (
            host.current() == "2"
            and host.runs("setlive", "2")
            and host.runs("preparer", "2")
            and host.reports_since("setlive", "2", since)
            and host.pending() is None
        )

    assert wait_for(deployed_2, 400), host.describe()
    assert host.service("setlive").pid != setlive_pid
    assert _probe_of(host, "setlive") == _probe_of(host, "preparer") == "2.0"
    assert host.layout.version_of(host.layout.previous) == one

    # Version 3 cannot start its setlive: the guard version 2's setlive left behind
    # puts version 2 back, and the restored setlive reports the rollback.
    third = _kickstart(host, broken.path, broken.sha256)
    assert third.returncode == 0, third.stdout + third.stderr

    assert wait_for(setlive_rolled_back(host, "2", "3"), CRASH_LOOP_WAIT_S), host.describe()
    assert host.current() == "2"
    assert _probe_of(host, "setlive") == "2.0"
    guard_log = (host.state_dir / "setlive" / f"{APP}.guard.log").read_text()
    assert "guard.rolled_back" in guard_log
