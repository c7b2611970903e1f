"""setlive deploying the bundle it runs from, under a real runsvdir.

The bundle has two services: ``agent`` (pp-setlive itself, the repository's code)
and ``worker``. A test kickstart lays version 1 down; from then on the setlive
running under runit deploys itself: version 2 must finish the switch on its own
after runit restarts it, and version 3, whose setlive cannot start, must be
rolled back by the guard the old setlive left behind.
"""

from __future__ import annotations

import hashlib
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
from runit_support import (  # noqa: F401
    Runsvdir,
    kill_our_guards,
    require_root,
    runsvdir,
    wait_for,
)

from agents.runtime import Runtime, RuntimeOptions
from agents.setlive.agent import SetliveAgent
from agents.setlive.observe import Paths, read_environ
from agents.setlive.state import StateDir
from agents.system import runit
from agents.system.layout import AppLayout, InstallMarker
from intent import keys
from intent.model import Reality
from intent.store import IntentStore
from intent.store.sqlite import SqliteStore

REPO = Path(__file__).resolve().parent.parent
APP = "bundle"
NODE = "n1"
GUARD_DEADLINE_S = 60
HEALTH = {
    "type": "exec",
    "interval_s": 0.2,
    "healthy_threshold": 1,
    "deadline_s": 4.0,
    "min_uptime_s": 1.0,
    "timeout_s": 2.0,
}


def sha(version: str) -> str:
    return hashlib.sha256(f"bundle {version}".encode()).hexdigest()


def _launch_agent(root: Path, paths: Paths) -> str:
    return f"""#!/bin/sh
# pp-setlive as a service of the bundle (this install's version, the repository's code).
here=$(cd "$(dirname "$0")/../.." && pwd)
if [ -e "$here/broken" ]; then
    echo "setlive $PP_VERSION: broken build, exiting"
    exit 1
fi
exec env PYTHONPATH={REPO} {sys.executable} -m agents.setlive \\
    --store sqlite://{root / "store.db"} --node {NODE} \\
    --runit {paths.runit_dir} --runit-stage {paths.stage} --log-root {paths.log_root} \\
    --state-dir {paths.state_dir} --guard-deadline {GUARD_DEADLINE_S} \\
    --resync-interval 5 --log-format json
"""


def _write(path: Path, text: str) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(text)
    path.chmod(0o755)


class Bundle:
    def __init__(self, root: Path, paths: Paths) -> None:
        self.root = root
        self.paths = paths
        self.store = IntentStore(SqliteStore(root / "store.db"))
        self.layout = AppLayout(root / "opt", APP)

    def install(self, version: str, broken: bool = False) -> None:
        target = self.layout.install_dir(version)
        _write(target / "bin" / "launch" / "agent", _launch_agent(self.root, self.paths))
        _write(target / "bin" / "launch" / "worker", "#!/bin/sh\nexec sleep 100000\n")
        _write(target / "bin" / "check", "#!/bin/sh\necho ok\n")
        if broken:
            (target / "broken").write_text("")
        marker = InstallMarker.of_artifact(APP, version, sha(version), target, time.time())
        self.layout.marker(version).write_bytes(marker.to_bytes())

    def deploy(self, active: str) -> None:
        self.store.put_json(keys.node_app(NODE, APP), {"cluster": "c"})
        self.store.put_json(
            keys.config(APP, "c"),
            {
                "versions": {
                    v: {"state": "active" if v == active else "prep", "sha256": sha(v)}
                    for v in ("1", "2", "3")
                }
            },
        )
        self.store.put_json(
            keys.deploy_config(APP, "c"),
            {"basedir": str(self.layout.basedir), "run_as": "root", "health_check": HEALTH},
        )

    def report(self) -> Reality | None:
        reports = [r for r in self.store.reality(NODE, APP) if r.agent == "setlive"]
        return reports[0] if reports else None

    def running_version(self, service: str) -> str | None:
        status = runit.status(self.paths.stage / service)
        if not status.up or status.pid is None:
            return None
        env = read_environ(status.pid)
        return env.get("PP_VERSION") if env else None

    def guard_log(self) -> str:
        try:
            return (self.paths.state_dir / f"{APP}.guard.log").read_text()
        except FileNotFoundError:
            return ""

    def current(self) -> str | None:
        return self.layout.version_of(self.layout.current)


@pytest.fixture
def bundle(runsvdir: Runsvdir) -> Iterator[Bundle]:  # noqa: F811
    require_root()
    root = runsvdir.root / "self"
    root.mkdir(mode=0o755)
    paths = Paths(runsvdir.service_dir, root / "stage", root / "log", root / "state")
    made = Bundle(root, paths)
    try:
        yield made
    finally:
        kill_our_guards(root)
        made.store.close()


def _describe(bundle: Bundle) -> str:
    return f"report={bundle.report()} current={bundle.current()} guard={bundle.guard_log()[-600:]}"


def test_setlive_deploys_itself_and_its_guard_rolls_back_a_setlive_that_cannot_start(
    bundle: Bundle,
) -> None:
    for version in ("1", "2"):
        bundle.install(version)
    bundle.install("3", broken=True)

    # Kickstart: lay version 1 down once from outside; the setlive it starts takes over.
    bundle.deploy("1")
    kickstart = SetliveAgent(bundle.store, NODE, bundle.paths, supervise_timeout_s=8.0)
    assert Runtime(kickstart, bundle.store, RuntimeOptions(node=NODE, once=True)).run_pass(True)
    assert wait_for(lambda: bundle.running_version("bundle-agent") == "1", 10)
    first_pid = runit.status(bundle.paths.stage / "bundle-agent").pid

    # Version 2: the running setlive switches, restarts the worker, then itself; the new
    # setlive finds the pending switch, gates itself and clears it; the guard leaves.
    bundle.deploy("2")

    def deployed_2() -> bool:
        report = bundle.report()
        return (
            report is not None
            and (report.status, report.version) == ("converged", "2")
            and bundle.running_version("bundle-agent") == "2"
            and bundle.running_version("bundle-worker") == "2"
            and StateDir(bundle.paths.state_dir).load(APP).pending is None
        )

    assert wait_for(deployed_2, 30), _describe(bundle)
    assert runit.status(bundle.paths.stage / "bundle-agent").pid != first_pid
    assert bundle.layout.version_of(bundle.layout.previous) == "1"
    assert wait_for(lambda: "switch finished" in bundle.guard_log(), 5), bundle.guard_log()
    assert "guard.rolled_back" not in bundle.guard_log()

    # Version 3 cannot start its setlive: nobody would finish the switch. The guard left
    # by version 2 puts current back, restarts the services and marks 3 as failed, and
    # the restored setlive reports the rollback instead of trying 3 again.
    bundle.deploy("3")

    def rolled_back() -> bool:
        report = bundle.report()
        return (
            report is not None
            and report.status == "error"
            and report.version == "2"
            and report.details.get("rolled_back_from") == "3"
            and bundle.running_version("bundle-agent") == "2"
            and bundle.running_version("bundle-worker") == "2"
        )

    assert wait_for(rolled_back, GUARD_DEADLINE_S - 10), _describe(bundle)
    assert bundle.current() == "2"
    assert "guard.rolled_back" in bundle.guard_log()
    failure = StateDir(bundle.paths.state_dir).load(APP).failure
    assert failure is not None and failure.version == "3" and failure.rolled_back_to == "2"
    report = bundle.report()
    assert report is not None and report.error and "guard" in report.error
    assert "exited 3 times without finishing its own deploy" in report.error
