"""pp-setlive end to end: a private runsvdir, the sample apps, the embedded store.

Every test deploys its own app (own name, own port) into one runsvdir shared
by the module; the first deploy of each waits for runsvdir's scan (up to 5 s).
"""

from __future__ import annotations

import contextlib
import hashlib
import http.client
import json
import os
import shutil
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
from race_support import NOBODY, run_as_nobody
from runit_support import Runsvdir, free_port, require_root, runsvdir, wait_for  # noqa: F401

from agents.runtime import Runtime, RuntimeOptions
from agents.setlive.agent import SetliveAgent
from agents.setlive.apply import lease_resource
from agents.setlive.observe import Paths
from agents.system import fs, runit
from agents.system.layout import AppLayout, InstallMarker
from intent import keys
from intent.cli.operator import request_retry, unassign
from intent.model import Reality
from intent.store import IntentStore
from intent.store.sqlite import SqliteStore

APPS = Path(__file__).resolve().parent.parent / "test_data" / "apps"
REPO = Path(__file__).resolve().parent.parent
NODE = "n1"
FAST_HTTP = {
    "type": "http",
    "interval_s": 0.1,
    "healthy_threshold": 2,
    "deadline_s": 4.0,
    "min_uptime_s": 0.3,
    "timeout_s": 0.5,
}


def sha(version: str) -> str:
    return hashlib.sha256(version.encode()).hexdigest()


@dataclass
class Host:
    """One node's view: its store, its setlive, its app directories."""

    root: Path
    store: IntentStore
    paths: Paths
    agent: SetliveAgent
    runtime: Runtime

    # -- intent and installs ------------------------------------------------------------------

    def basedir(self, app: str) -> Path:
        return self.root / "apps" / app

    def layout(self, app: str) -> AppLayout:
        return AppLayout(self.basedir(app), app)

    def install(
        self, app: str, version: str, source: str = "httpapp", unhealthy: bool = False
    ) -> Path:
        target = self.layout(app).install_dir(version)
        shutil.copytree(APPS / source, target, symlinks=False)
        if unhealthy:
            (target / "unhealthy").write_text("")
        marker = InstallMarker.of_artifact(app, version, sha(version), target, time.time())
        (target / ".pp-installed.json").write_bytes(marker.to_bytes())
        return target

    def intent(
        self,
        app: str,
        port: int,
        active: str | None,
        versions: tuple[str, ...] = ("1", "2", "3"),
        *,
        health: dict[str, Any] | None = None,
        run_as: str = "nobody",
        env: dict[str, str] | None = None,
        user_config: dict[str, Any] | None = None,
        min_nodes: int = 0,
        nodes: tuple[str, ...] = (NODE,),
    ) -> None:
        for node in nodes:
            self.store.put_json(keys.node_app(node, app), {"cluster": "c"})
        config = {
            "versions": {
                v: {"state": "active" if v == active else "prep", "sha256": sha(v)}
                for v in versions
            },
            "min_nodes": min_nodes,
            "user_config": user_config or {},
        }
        deploy: dict[str, Any] = {
            "basedir": str(self.basedir(app)),
            "run_as": run_as,
            "ports": [{"name": "http", "port": port}],
            "env": env or {},
            "health_check": health if health is not None else FAST_HTTP,
        }
        self.store.put_json(keys.config(app, "c"), config)
        self.store.put_json(keys.deploy_config(app, "c"), deploy)

    # -- running setlive ------------------------------------------------------------------------

    def converge(self) -> bool:
        return self.runtime.run_pass(force=True)

    def report(self, app: str) -> Reality:
        (report,) = [r for r in self.store.reality(NODE, app) if r.agent == "setlive"]
        return report

    def setlive_process(self, **env: str) -> subprocess.CompletedProcess[bytes]:
        """pp-setlive --once in its own process (for the kill -9 tests)."""
        return subprocess.run(
            [
                sys.executable,
                "-m",
                "agents.setlive",
                "--once",
                "--store",
                f"sqlite://{self.root / 'store.db'}",
                "--node",
                NODE,
                "--runit",
                str(self.paths.runit_dir),
                "--runit-stage",
                str(self.paths.stage),
                "--log-root",
                str(self.paths.log_root),
                "--state-dir",
                str(self.paths.state_dir),
                "--log-format",
                "json",
            ],
            cwd=REPO,
            env=os.environ | env,
            capture_output=True,
            timeout=60,
            check=False,
        )

    # -- looking at the host --------------------------------------------------------------------

    def service(self, name: str) -> Path:
        return self.paths.stage / name

    def status(self, name: str) -> runit.ServiceStatus:
        return runit.status(self.service(name))

    def current(self, app: str) -> str | None:
        return self.layout(app).version_of(self.layout(app).current)

    def previous(self, app: str) -> str | None:
        return self.layout(app).version_of(self.layout(app).previous)


@pytest.fixture
def host(runsvdir: Runsvdir, request: pytest.FixtureRequest) -> Iterator[Host]:  # noqa: F811
    require_root()
    root = runsvdir.root / request.node.name[:40]
    root.mkdir(mode=0o755)
    root.chmod(0o755)
    store = IntentStore(SqliteStore(root / "store.db"))
    paths = Paths(runsvdir.service_dir, root / "stage", root / "log", root / "state")
    agent = SetliveAgent(store, NODE, paths, supervise_timeout_s=8.0, lease_ttl_s=10.0)
    runtime = Runtime(agent, store, RuntimeOptions(node=NODE, once=True))
    yield Host(root, store, paths, agent, runtime)
    store.close()


def get(port: int, path: str = "/", timeout: float = 1.0) -> tuple[int, str]:
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=timeout)
    try:
        conn.request("GET", path)
        response = conn.getresponse()
        return response.status, response.read().decode()
    finally:
        conn.close()


@contextlib.contextmanager
def asking(port: int) -> Iterator[list[tuple[float, str | None]]]:
    """Ask the app on ``port`` over and over while the block runs: yields the answers,
    ``(when, body)``, None for a request refused or cut off mid-answer."""
    results: list[tuple[float, str | None]] = []
    stop = threading.Event()

    def client() -> None:
        while not stop.is_set():
            at = time.monotonic()
            try:
                results.append((at, get(port, timeout=0.5)[1]))
            except (OSError, http.client.HTTPException):
                results.append((at, None))
            time.sleep(0.005)

    thread = threading.Thread(target=client)
    thread.start()
    try:
        yield results
    finally:
        stop.set()
        thread.join()


def uid_of(pid: int) -> int:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("Uid:"):
            return int(line.split()[1])
    raise AssertionError("no Uid line")


# -- deploys -------------------------------------------------------------------------------------


def test_first_deploy_runs_the_active_version_as_run_as_with_its_config(host: Host) -> None:
    port = free_port()
    host.install("first", "1")
    host.intent(
        "first",
        port,
        "1",
        env={"MODE": "test"},
        user_config={"GREETING": "hello", "limits": {"rps": 5}, "PP_APP": "ignored"},
    )
    assert host.converge()

    report = host.report("first")
    assert (report.status, report.version) == ("converged", "1")
    assert report.details["health"] == "healthy"
    assert report.details["runit"]["first"]["state"] == "run"
    assert get(port) == (200, "first 1")
    status = host.status("first")
    assert status.pid is not None and uid_of(status.pid) == 65534  # nobody, through chpst -u

    env = json.loads(get(port, "/env")[1])
    assert env["PP_APP"] == "first" and env["PP_VERSION"] == "1" and env["PP_CLUSTER"] == "c"
    assert env["PP_PORT_HTTP"] == str(port)
    assert env["MODE"] == "test" and env["GREETING"] == "hello"
    assert json.loads(env["limits"]) == {"rps": 5}
    config = json.loads(Path(env["PP_CONFIG_PATH"]).read_text())
    assert config["limits"] == {"rps": 5}

    assert host.current("first") == "1" and host.previous("first") is None
    assert (host.paths.runit_dir / "first").resolve() == host.service("first")
    assert not (host.service("first") / "down").exists()
    assert wait_for(lambda: "first 1 listening" in _log(host, "first"), 5)

    started = time.monotonic()
    assert host.converge()
    assert time.monotonic() - started < 1.0
    assert host.status("first").pid == status.pid  # a converged app is left alone


def test_a_changed_env_or_run_as_restarts_the_app_and_its_logger(host: Host) -> None:
    port = free_port()
    host.install("envchange", "1")
    host.intent("envchange", port, "1", env={"MODE": "one"})
    assert host.converge()
    pid = host.status("envchange").pid
    host.intent("envchange", port, "1", env={"MODE": "two"})
    assert host.converge()
    assert host.status("envchange").pid != pid
    assert json.loads(get(port, "/env")[1])["MODE"] == "two"
    assert host.report("envchange").status == "converged"

    logger = runit.status(host.service("envchange") / "log").pid
    assert logger is not None and uid_of(logger) == 65534
    host.intent("envchange", port, "1", env={"MODE": "two"}, run_as="root")
    assert host.converge()
    assert uid_of(host.status("envchange").pid or 0) == 0
    assert wait_for(
        lambda: runit.status(host.service("envchange") / "log").pid not in (None, logger), 5
    )
    assert uid_of(runit.status(host.service("envchange") / "log").pid or 0) == 0


def test_a_version_not_installed_yet_waits_for_the_preparer(host: Host) -> None:
    port = free_port()
    host.intent("waiting", port, "1")
    assert not host.converge()
    report = host.report("waiting")
    assert report.status == "converging"
    assert report.error and "waiting for the preparer" in report.error
    assert not host.service("waiting").exists()

    host.install("waiting", "1")
    assert host.converge()
    assert get(port) == (200, "waiting 1")


def test_upgrade_switches_current_and_restarts_with_a_short_gap(host: Host) -> None:
    port = free_port()
    host.install("upgrade", "1")
    host.install("upgrade", "2")
    host.intent("upgrade", port, "1")
    assert host.converge()
    time.sleep(1.1)  # runsv delays a restart within a second of the last start

    with asking(port) as results:
        time.sleep(0.2)
        host.intent("upgrade", port, "2")
        assert host.converge()
        time.sleep(0.2)

    answers = [body for _, body in results]
    failures = [at for at, body in results if body is None]
    window = failures[-1] - failures[0] if failures else 0.0
    first_new = answers.index("upgrade 2")
    assert set(answers[:first_new]) <= {"upgrade 1", None}
    assert set(answers[first_new:]) == {"upgrade 2"}, "an old answer after the new version"
    print(
        f"\nupgrade gap: {len(failures)} failed of {len(results)} requests, "
        f"failure window {window * 1000:.0f} ms"
    )
    assert window < 1.0
    assert host.current("upgrade") == "2" and host.previous("upgrade") == "1"
    assert host.report("upgrade").details["previous"] == "1"


def test_a_service_runsv_starts_on_its_own_during_the_switch_is_started_again(
    host: Host, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Between setlive's look (the service down) and its start, runsv may start the old
    version's process itself (it starts a crashed service again within a second): that
    process may run the old ``current``, so the gate must not wait for it to be new."""
    port = free_port()
    host.install("selfstart", "1")
    host.install("selfstart", "2")
    host.intent("selfstart", port, "1")
    assert host.converge()
    runit.down(host.service("selfstart"))
    assert wait_for(lambda: host.status("selfstart").state == "down", 5)

    def runsv_starts_it(point: str) -> None:
        if point == "after-set-current":
            runit.up(host.service("selfstart"))
            assert wait_for(lambda: host.status("selfstart").up, 5)
            time.sleep(0.01)  # a start strictly before the one setlive asks for

    monkeypatch.setattr("agents.setlive.apply.failpoint", runsv_starts_it)
    host.intent("selfstart", port, "2")
    assert host.converge(), host.report("selfstart").error
    assert host.report("selfstart").version == "2"
    assert wait_for(lambda: get(port) == (200, "selfstart 2"), 5)


# -- failures ------------------------------------------------------------------------------------


def test_failed_health_rolls_back_and_waits_for_intent_or_retry(host: Host) -> None:
    port = free_port()
    host.install("rollback", "1")
    host.install("rollback", "2", unhealthy=True)
    host.install("rollback", "3")
    quick = FAST_HTTP | {"deadline_s": 1.5}
    host.intent("rollback", port, "1", health=quick)
    assert host.converge()

    host.intent("rollback", port, "2", health=quick)
    assert not host.converge()
    report = host.report("rollback")
    assert (report.status, report.version) == ("error", "1")
    assert report.details["rolled_back_from"] == "2"
    assert report.error and "503 unhealthy" in report.error and "pp retry" in report.error
    assert host.current("rollback") == "1"
    assert get(port) == (200, "rollback 1")

    pid = host.status("rollback").pid
    started = time.monotonic()
    assert not host.converge()
    assert time.monotonic() - started < 1.0, "the failed version was tried again"
    assert host.status("rollback").pid == pid
    assert host.report("rollback").details["rolled_back_from"] == "2"

    assert request_retry(host.store, "rollback", NODE, actor="test") == [NODE]
    assert host.store.get_raw(keys.retry(NODE, "rollback")) is not None
    time.sleep(1.0)
    assert not host.converge()
    assert _log(host, "rollback").count("rollback 2 listening") == 2  # tried once more
    assert host.current("rollback") == "1"

    host.intent("rollback", port, "3", health=quick)  # the fix, as a new version
    assert host.converge()
    assert get(port) == (200, "rollback 3")
    assert "rolled_back_from" not in host.report("rollback").details


def test_a_first_deploy_that_crashes_is_stopped_not_restarted_forever(host: Host) -> None:
    port = free_port()
    host.install("crashy", "1", source="crashapp")
    host.intent("crashy", port, "1", health=FAST_HTTP | {"deadline_s": 1.5})
    assert not host.converge()
    report = host.report("crashy")
    assert report.status == "error" and report.version is None
    assert report.error and "nothing to roll back to" in report.error
    assert "missing DATABASE_URL" in report.error  # the app's own last words, from its log
    # runsv takes in the command once its restart delay (1 s after a crash) is over
    assert wait_for(lambda: host.status("crashy").want_up is False, 3)
    assert host.status("crashy").state == "down"
    assert (host.service("crashy") / "down").exists()

    assert not host.converge()
    assert host.status("crashy").state == "down"


def test_exec_health_check_runs_the_artifacts_bin_check(host: Host) -> None:
    port = free_port()
    host.install("execd", "1")
    host.install("execd", "2", unhealthy=True)
    check = FAST_HTTP | {"type": "exec", "deadline_s": 1.5}
    host.intent("execd", port, "1", health=check)
    assert host.converge()
    assert host.report("execd").details["health_output"].startswith("exec ")
    host.intent("execd", port, "2", health=check)
    assert not host.converge()
    report = host.report("execd")
    assert report.error and "unhealthy file present in 2" in report.error
    assert get(port) == (200, "execd 1")


# -- drift, stop, removal ------------------------------------------------------------------------


def test_drift_is_repaired_from_what_the_host_shows(host: Host) -> None:
    port = free_port()
    host.install("drift", "1")
    host.install("drift", "2")
    host.intent("drift", port, "1")
    assert host.converge()

    subprocess.run(["sv", "down", str(host.paths.runit_dir / "drift")], check=True)
    assert wait_for(lambda: host.status("drift").state == "down", 5)
    assert host.converge()
    assert host.status("drift").up and get(port) == (200, "drift 1")

    fs.symlink_atomic("installs/drift_2", host.layout("drift").current)
    assert host.converge()
    assert host.current("drift") == "1" and get(port) == (200, "drift 1")

    (host.service("drift") / "run").write_text("#!/bin/sh\nexec sleep 1000\n")
    assert host.converge()
    assert b"pp-setlive" in (host.service("drift") / "run").read_bytes()
    assert get(port) == (200, "drift 1")


def test_current_moved_by_hand_is_put_back_without_a_deploy_or_a_lockout(host: Host) -> None:
    port = free_port()
    for version in ("1", "2", "3"):
        host.install("handset", version)
    # A loaded host can take many seconds to start the app: the deploys' gates wait as
    # long as that takes (a gate ends as soon as it passes).
    patient = FAST_HTTP | {"deadline_s": 60.0}
    for version in ("1", "2", "3"):
        host.intent("handset", port, version, health=patient)
        assert host.converge(), version
    assert (host.current("handset"), host.previous("handset")) == ("3", "2")

    fs.symlink_atomic("installs/handset_1", host.layout("handset").current)
    subprocess.run(["sv", "restart", str(host.paths.runit_dir / "handset")], check=True)

    def answers(version: str) -> bool:
        try:
            return get(port)[1] == f"handset {version}"
        except (OSError, http.client.HTTPException):
            return False

    assert wait_for(lambda: answers("1"), 60)
    # The repair's gate fails (by its check, or by the deadline while 3 still starts):
    # a short one, and no other intent than the gate's deadline changes.
    host.intent("handset", port, "3", health=FAST_HTTP | {"deadline_s": 1.5})
    (host.layout("handset").install_dir("3") / "unhealthy").write_text("")
    assert not host.converge()  # 3 is back, and its checks fail
    report = host.report("handset")
    assert report.version == "3" and "rolled_back_from" not in report.details
    assert (host.current("handset"), host.previous("handset")) == ("3", "2")
    assert host.agent.state.load("handset").failure is None
    assert wait_for(lambda: answers("3"), 60)  # kept running, not rolled back to 1

    (host.layout("handset").install_dir("3") / "unhealthy").unlink()
    assert wait_for(host.converge, 60, interval=0.2)
    assert host.report("handset").version == "3"


def test_no_active_version_stops_the_app_and_removal_takes_it_away(host: Host) -> None:
    port = free_port()
    host.install("stopper", "1")
    host.intent("stopper", port, "1")
    assert host.converge()
    pid = host.status("stopper").pid
    assert pid is not None

    host.intent("stopper", port, None)
    assert host.converge()
    report = host.report("stopper")
    assert (report.status, report.version) == ("converged", None)
    assert report.details["health"] == "stopped"
    assert host.status("stopper").state == "down"
    assert (host.service("stopper") / "down").exists()

    host.intent("stopper", port, "1")
    assert host.converge()
    assert get(port) == (200, "stopper 1")
    pid = host.status("stopper").pid

    unassign(host.store, NODE, ["stopper"], "tester")
    assert host.converge()
    assert not (host.paths.runit_dir / "stopper").exists()
    assert not host.service("stopper").exists()
    assert wait_for(lambda: not os.path.exists(f"/proc/{pid}"), 5)
    assert host.store.reality(NODE, "stopper") == []
    assert host.layout("stopper").install_dir("1").exists()  # files stay for the preparer's GC


# -- crashes of setlive itself -------------------------------------------------------------------

SWITCH_POINTS = [
    "after-save-pending",
    "after-set-previous",
    "after-set-current",
    "after-restart-service",
    "during-await-health",
]


def test_kill_9_at_each_step_of_a_switch_then_a_clean_finish(host: Host) -> None:
    port = free_port()
    versions = tuple(str(v) for v in range(1, len(SWITCH_POINTS) + 2))
    for version in versions:
        host.install("crashsafe", version)
    host.intent("crashsafe", port, "1", versions, run_as="root")

    # First deploy, killed once the service is linked: runsvdir picks it up but the
    # down file keeps it from starting before setlive says so.
    killed = host.setlive_process(PP_SETLIVE_FAILPOINT="after-link-service")
    assert killed.returncode == -9, killed.stderr.decode()[-2000:]
    assert runit.wait_supervised(host.service("crashsafe"), 8)
    time.sleep(0.3)
    assert host.status("crashsafe").state == "down"
    assert host.converge()
    assert get(port) == (200, "crashsafe 1")

    for before, (point, version) in zip(
        versions, zip(SWITCH_POINTS, versions[1:], strict=True), strict=False
    ):
        host.intent("crashsafe", port, version, versions, run_as="root")
        killed = host.setlive_process(PP_SETLIVE_FAILPOINT=point)
        assert killed.returncode == -9, (point, killed.stderr.decode()[-2000:])
        assert host.converge(), (point, host.report("crashsafe"))
        report = host.report("crashsafe")
        assert (report.status, report.version) == ("converged", version), point
        assert get(port) == (200, f"crashsafe {version}"), point
        assert host.previous("crashsafe") == before, point
        assert host.agent.state.load("crashsafe").pending is None


def test_a_restarted_setlive_removes_the_temp_entries_a_kill_left(host: Host) -> None:
    """kill -9 between making a temp name and renaming it leaves the temp behind: in the
    basedir (``current``, ``previous``), in a service's directory, in the state dir."""
    port = free_port()
    host.install("tidy", "1")
    host.intent("tidy", port, "1")
    assert host.converge()
    basedir, service = host.basedir("tidy"), host.service("tidy")
    left = [
        basedir / ".pp-tmp-current.0badc0de",
        basedir / ".pp-tmp-previous.0badc0de",
        service / ".pp-tmp-run.0badc0de",
        service / "log" / ".pp-tmp-run.0badc0de",
        host.paths.state_dir / ".pp-tmp-tidy.json.0badc0de",
    ]
    for path in left[:2]:
        path.symlink_to("installs/tidy_1")
    for path in left[2:]:
        path.write_text("half")
    long_ago = time.time() - 3600
    os.utime(left[-1], (long_ago, long_ago))
    kept = [
        basedir / ".pp-tmp-other.0badc0de",
        basedir / "notes.txt",
        host.paths.state_dir / ".pp-tmp-tidy.json.1badc0de",  # a note being written now
    ]
    for path in kept:
        path.write_text("not setlive's")

    restarted = SetliveAgent(host.store, NODE, host.paths, supervise_timeout_s=8.0)
    restarted.start()
    assert Runtime(restarted, host.store, RuntimeOptions(node=NODE, once=True)).run_pass()
    assert [p for p in left if os.path.lexists(p)] == []
    assert all(p.exists() for p in kept)
    assert get(port) == (200, "tidy 1") and host.current("tidy") == "1"


def test_kill_9_during_a_failing_gate_still_rolls_back(host: Host) -> None:
    port = free_port()
    host.install("crashfail", "1")
    host.install("crashfail", "2", unhealthy=True)
    quick = FAST_HTTP | {"deadline_s": 1.5}
    host.intent("crashfail", port, "1", health=quick, run_as="root")
    assert host.converge()
    host.intent("crashfail", port, "2", health=quick, run_as="root")
    killed = host.setlive_process(PP_SETLIVE_FAILPOINT="during-await-health")
    assert killed.returncode == -9
    assert host.current("crashfail") == "2"  # killed mid-switch
    assert not host.converge()
    report = host.report("crashfail")
    assert report.version == "1" and report.details["rolled_back_from"] == "2"
    assert get(port) == (200, "crashfail 1")


# -- min_nodes ------------------------------------------------------------------------------------


def _peer(host: Host, app: str, node: str, health: str) -> None:
    host.store.write_reality(
        Reality(node=node, agent="setlive", app=app, status="converged", details={"health": health})
    )


def test_min_nodes_lease_limits_restarts_across_the_cluster(host: Host) -> None:
    port = free_port()
    nodes = (NODE, "n2", "n3")
    for version in ("1", "2", "3", "4"):
        host.install("leased", version)
    host.intent("leased", port, "1", ("1", "2", "3", "4"), min_nodes=2, nodes=nodes)
    assert host.converge()
    resource = lease_resource("leased", "c")
    for peer in ("n2", "n3"):
        _peer(host, "leased", peer, "healthy")

    # 3 healthy nodes, min_nodes 2: one restart at a time, and n2 holds the lease.
    assert host.store.acquire_lease(resource, "n2", 1, 30.0)
    host.intent("leased", port, "2", ("1", "2", "3", "4"), min_nodes=2, nodes=nodes)
    pid = host.status("leased").pid
    assert not host.converge()
    report = host.report("leased")
    assert report.status == "converging" and report.error and "held by n2" in report.error
    assert host.status("leased").pid == pid and get(port) == (200, "leased 1")

    host.store.release_lease(resource, "n2")
    seen: set[str] = set()
    done = threading.Event()

    def watch() -> None:
        while not done.is_set():
            seen.update(host.store.lease_holders(resource))
            time.sleep(0.02)

    watcher = threading.Thread(target=watch)
    watcher.start()
    try:
        assert host.converge()
    finally:
        done.set()
        watcher.join()
    assert seen == {NODE}, "the restart did not hold the lease"
    assert host.store.lease_holders(resource) == []
    assert get(port) == (200, "leased 2")

    # n3 unhealthy: 2 healthy nodes, min_nodes 2, nobody may restart.
    _peer(host, "leased", "n3", "unhealthy")
    host.intent("leased", port, "3", ("1", "2", "3", "4"), min_nodes=2, nodes=nodes)
    assert not host.converge()
    report = host.report("leased")
    assert report.error and "2 healthy node(s) of leased/c, min_nodes 2" in report.error
    assert get(port) == (200, "leased 2")

    # A holder that died: its lease expires with its TTL and the restart goes ahead.
    _peer(host, "leased", "n3", "healthy")
    assert host.store.acquire_lease(resource, "n3", 1, 1.0)
    assert not host.converge()
    time.sleep(1.1)
    assert host.converge()
    assert get(port) == (200, "leased 3")


# -- multi-service artifacts ----------------------------------------------------------------------


def test_a_launch_directory_runs_each_entry_as_a_service_switched_together(host: Host) -> None:
    port = free_port()
    host.install("multi", "1")
    host.install("multi", "2", source="multiapp")
    host.install("multi", "3", source="multiapp")
    host.intent("multi", port, "1")
    assert host.converge()

    host.intent("multi", port, "2")
    assert host.converge(), host.report("multi")
    assert not host.service("multi").exists()
    assert not (host.paths.runit_dir / "multi").exists()
    assert get(port) == (200, "multi 2")
    pids = {s: host.status(s).pid for s in ("multi-web", "multi-worker")}
    assert all(pids.values())
    assert set(host.report("multi").details["runit"]) == {"multi-web", "multi-worker"}

    time.sleep(1.0)
    host.intent("multi", port, "3")
    assert host.converge()
    assert get(port) == (200, "multi 3")
    for name, pid in pids.items():
        assert host.status(name).pid != pid, name
    assert wait_for(lambda: "worker 3 of multi started" in _log(host, "multi-worker"), 5)


def test_a_changed_service_set_keeps_the_old_version_serving_until_the_switch(host: Host) -> None:
    port = free_port()
    host.install("reshape", "1")
    host.install("reshape", "2", source="multiapp")
    host.install("reshape", "3")
    host.intent("reshape", port, "1", run_as="root")
    assert host.converge()
    time.sleep(1.1)  # runsv delays a restart within a second of the last start

    # one service -> two: the new ones wait for runsvdir's scan while 1 still answers.
    # Each failed request is followed by a look at the new services: supervision never
    # goes back, so one not yet supervised after a failure means 1 stopped too early
    # (a check of order, not of speed, which a loaded machine cannot fail).
    early: list[str] = []
    failed = 0
    stop = threading.Event()

    def client() -> None:
        nonlocal failed
        while not stop.is_set():
            try:
                get(port, timeout=0.5)
            except (OSError, http.client.HTTPException):
                failed += 1
                missing = [
                    n for n in ("reshape-web", "reshape-worker") if not host.status(n).supervised
                ]
                if missing:
                    early.append(", ".join(missing))
            time.sleep(0.005)

    thread = threading.Thread(target=client)
    thread.start()
    try:
        host.intent("reshape", port, "2", run_as="root")
        assert host.converge(), host.report("reshape")
        time.sleep(0.2)
    finally:
        stop.set()
        thread.join()
    print(f"\nservice set change gap: {failed} failed requests")
    assert not early, f"1 stopped before {early[0]} was supervised"
    assert get(port) == (200, "reshape 2") and not host.service("reshape").exists()

    # two -> one, killed once the new service is supervised: nothing moved yet
    time.sleep(1.1)
    host.intent("reshape", port, "3", run_as="root")
    killed = host.setlive_process(PP_SETLIVE_FAILPOINT="after-await-supervised")
    assert killed.returncode == -9, killed.stderr.decode()[-2000:]
    assert host.status("reshape").supervised and host.status("reshape").state == "down"
    assert host.current("reshape") == "2"
    assert get(port) == (200, "reshape 2")
    assert host.converge(), host.report("reshape")
    assert get(port) == (200, "reshape 3")
    assert not host.service("reshape-web").exists() and host.previous("reshape") == "2"


# -- what the app's own user can and cannot do -----------------------------------------------------


def _hand_over(install: Path) -> None:
    """What the preparer does: the install belongs to run_as, its marker stays root's."""
    for path in [install, *install.rglob("*")]:
        if path.name != ".pp-installed.json":
            os.lchown(path, NOBODY.pw_uid, NOBODY.pw_gid)


_ADD_ENTRY = """
import os, sys
path = sys.argv[1] + "/bin/launch/evil"
with open(path, "w") as f:
    f.write("#!/bin/sh\\nexec sleep 100000\\n")
os.chmod(path, 0o755)
"""


def test_entries_an_app_adds_to_its_install_never_become_services(host: Host) -> None:
    port = free_port()
    install = host.install("sneaky", "1", source="multiapp")
    _hand_over(install)
    host.intent("sneaky", port, "1")
    assert host.converge()
    pids = {s: host.status(s).pid for s in ("sneaky-web", "sneaky-worker")}

    added = run_as_nobody(_ADD_ENTRY, str(install))
    assert added.returncode == 0, added.stderr
    assert host.converge()
    assert not host.service("sneaky-evil").exists()
    assert not os.path.lexists(host.paths.runit_dir / "sneaky-evil")
    assert {s: host.status(s).pid for s in pids} == pids
    assert set(host.report("sneaky").details["runit"]) == set(pids)

    # It owns the directory, so it can replace root's marker with one listing evil:
    # a marker root did not write is no marker, and nothing is started from it.
    marker = host.layout("sneaky").marker("1")
    forged = json.loads(marker.read_bytes()) | {"launch": ["evil", "web", "worker"]}
    replaced = run_as_nobody(
        "import os, sys; os.unlink(sys.argv[1]); open(sys.argv[1], 'w').write(sys.argv[2])",
        str(marker),
        json.dumps(forged),
    )
    assert replaced.returncode == 0, replaced.stderr
    assert not host.converge()
    report = host.report("sneaky")
    assert report.status == "converging" and "waiting for the preparer" in (report.error or "")
    assert not host.service("sneaky-evil").exists()
    assert {s: host.status(s).pid for s in pids} == pids
    assert get(port) == (200, "sneaky 1")


def test_an_app_installed_by_older_agents_keeps_running_and_gains_no_service(host: Host) -> None:
    port = free_port()
    install = host.install("olden", "1", source="multiapp")
    host.install("olden", "2", source="multiapp")
    host.intent("olden", port, "1")
    assert host.converge()
    pids = {s: host.status(s).pid for s in ("olden-web", "olden-worker")}

    # Markers as the agents before launch records wrote them, and an entry the app added.
    layout = host.layout("olden")
    for version in ("1", "2"):
        layout.marker(version).write_bytes(InstallMarker(sha(version), 1.0).to_bytes())
    added = run_as_nobody(_ADD_ENTRY, str(install))
    assert added.returncode != 0  # root's install in this test: the app cannot even write
    _hand_over(install)
    assert run_as_nobody(_ADD_ENTRY, str(install)).returncode == 0

    assert host.converge()  # the running version keeps the services root already runs
    assert {s: host.status(s).pid for s in pids} == pids
    assert not host.service("olden-evil").exists()
    assert host.report("olden").status == "converged"

    host.intent("olden", port, "2")  # not running: it waits for the preparer to verify it
    assert not host.converge()
    report = host.report("olden")
    assert report.status == "converging"
    assert "waiting for the preparer to install olden 2" in (report.error or "")
    assert get(port) == (200, "olden 1") and host.current("olden") == "1"


def test_a_log_dir_left_by_a_previous_run_as_never_steers_the_new_logger(host: Host) -> None:
    """svlogd obeys a ``config`` in its directory, which can name a program to run at
    each rotation: one planted by the app's user must not run once the app (and so
    its logger) runs as someone else, here root."""
    port = free_port()
    host.install("relog", "1")
    host.intent("relog", port, "1")
    assert host.converge()
    log_dir = host.paths.log_root / "relog"
    assert wait_for(lambda: "relog 1 listening" in _log(host, "relog"), 5)
    assert log_dir.stat().st_uid == NOBODY.pw_uid
    proof = host.root / "processor-ran"
    planted = run_as_nobody(
        "import sys; open(sys.argv[1] + '/config', 'w').write('!touch ' + sys.argv[2] + '\\n')",
        str(log_dir),
        str(proof),
    )
    assert planted.returncode == 0, planted.stderr

    host.intent("relog", port, "1", run_as="root")
    assert host.converge()
    logger = host.service("relog") / "log"

    def logs_as_root() -> bool:
        pid = runit.status(logger).pid
        return pid is not None and uid_of(pid) == 0 and "as uid 0" in _log(host, "relog")

    assert wait_for(logs_as_root, 10)
    subprocess.run(["sv", "alarm", str(logger)], check=True)  # svlogd rotates now
    time.sleep(1.5)
    assert not proof.exists(), "a program named by the previous user ran as root"
    assert log_dir.stat().st_uid == 0 and not (log_dir / "config").exists()
    (aside,) = [p for p in host.paths.log_root.iterdir() if p.name.startswith("relog.old-")]
    assert (aside / "config").exists()  # set aside, not deleted


def _log(host: Host, service: str) -> str:
    try:
        return (host.paths.log_root / service / "current").read_text()
    except FileNotFoundError:
        return ""
