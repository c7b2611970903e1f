"""One whole node for the fault tests and bench/faults_bench.py.

A private runsvdir, the sample HTTP app (test_data/apps/httpapp) published in a
file:// repository, and the real pp-preparer and pp-setlive, either as plain
processes or as runit services of that runsvdir (the chaos test kill -9s them
there, and runsv restarts them, as on a host). A ``Prober`` records what each app
answers, so a test can tell an app's own switches from any other outage.
"""

from __future__ import annotations

import contextlib
import http.client
import os
import random
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from preparer_support import member, write_tar
from runit_support import Runsvdir, free_port

from agents.system import fs, runit
from agents.system.layout import MARKER_NAME, AppLayout
from intent import keys
from intent.store import IntentStore, StoreError, open_store

REPO = Path(__file__).resolve().parent.parent
BIN = Path(sys.executable).parent
APP_SOURCE = REPO / "test_data" / "apps" / "httpapp"
CLUSTER = "c"
GATE = {
    "type": "http",
    "interval_s": 0.1,
    "healthy_threshold": 2,
    "timeout_s": 1.0,
    "deadline_s": 60.0,  # generous: a loaded machine must not fail a healthy version
    "min_uptime_s": 0.3,
}
AGENTS = ("preparer", "setlive")


def wait_until(predicate: Callable[[], object], timeout_s: float, interval_s: float = 0.05) -> bool:
    deadline = time.monotonic() + timeout_s
    while not predicate():
        if time.monotonic() > deadline:
            return False
        time.sleep(interval_s)
    return True


def answer(port: int, timeout_s: float = 0.5) -> str | None:
    """The version the app on ``port`` answers ``GET /`` with, or None."""
    return ask(port, timeout_s).version


@dataclass(frozen=True)
class Answer:
    at: float
    """Wall-clock time of the request (to read next to the agents' logs)."""
    version: str | None
    error: str | None = None


def ask(port: int, timeout_s: float) -> Answer:
    at = time.time()
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=timeout_s)
    try:
        conn.request("GET", "/")
        response = conn.getresponse()
        body = response.read().decode()
        if response.status == 200 and body:
            return Answer(at, body.split()[-1])
        return Answer(at, None, f"HTTP {response.status}")
    except (OSError, http.client.HTTPException) as exc:
        return Answer(at, None, f"{type(exc).__name__}: {exc}")
    finally:
        conn.close()


@dataclass
class Node:
    runsvdir: Runsvdir
    store_url: str
    name: str = "n1"
    retry_max_s: float | None = None
    """``--store-retry-max`` for the agents (None: their default)."""
    ports: dict[str, int] = field(default_factory=dict)
    versions: dict[str, list[str]] = field(default_factory=dict)
    shas: dict[tuple[str, str], str] = field(default_factory=dict)
    processes: dict[str, subprocess.Popen[bytes]] = field(default_factory=dict)
    _store: IntentStore | None = None

    @property
    def root(self) -> Path:
        return self.runsvdir.root / self.name

    @property
    def store(self) -> IntentStore:
        if self._store is None:
            self._store = open_store(self.store_url)
        return self._store

    def layout(self, app: str) -> AppLayout:
        return AppLayout(self.root / "apps" / app, app)

    # -- intent ------------------------------------------------------------------------------

    def publish(self, app: str, version: str, unhealthy: bool = False) -> None:
        """The sample app as ``app`` ``version``, in the node's repo where ``--repo``
        finds it (``unhealthy``: a version whose health check fails)."""
        files = [
            member(str(p.relative_to(APP_SOURCE)), p.read_bytes(), mode=p.stat().st_mode & 0o777)
            for p in sorted(APP_SOURCE.rglob("*"))
            if p.is_file()
        ]
        files.append(member("VERSION", f"{version}\n".encode()))
        if unhealthy:
            files.append(member("unhealthy"))
        artifact = self.root / "repo" / app / f"{app}_{version}.tar.gz"
        artifact.parent.mkdir(parents=True, exist_ok=True)
        self.shas[(app, version)] = write_tar(artifact, files)

    def assign(self, app: str) -> int:
        """Assign ``app`` to this node on a port of its own; returns the port."""
        port = self.ports[app] = free_port()
        self.store.put_json(keys.node_app(self.name, app), {"cluster": CLUSTER})
        deploy = {
            "basedir": str(self.layout(app).basedir),
            "run_as": "nobody",
            "ports": [{"name": "http", "port": port}],
            "health_check": GATE,
        }
        self.store.put_json(keys.deploy_config(app, CLUSTER), deploy)
        return port

    def deploy(self, app: str, version: str) -> None:
        """What ``pp deploy`` writes: ``version`` active, the one before kept prepared."""
        if (app, version) not in self.shas:
            self.publish(app, version)
        history = self.versions.setdefault(app, [])
        if history[-1:] != [version]:
            history.append(version)
        versions = {v: {"state": "prep", "sha256": self.shas[(app, v)]} for v in history[-2:-1]}
        versions[version] = {"state": "active", "sha256": self.shas[(app, version)]}
        self.store.put_json(keys.config(app, CLUSTER), {"versions": versions})

    # -- agents ------------------------------------------------------------------------------

    def command(self, agent: str) -> list[str]:
        common = [
            str(BIN / f"pp-{agent}"), "--store", self.store_url, "--node", self.name,
            "--log-format", "json",
        ]  # fmt: skip
        if self.retry_max_s is not None:
            common += ["--store-retry-max", str(self.retry_max_s)]
        if agent == "preparer":
            return [
                *common, "--repo", f"file://{self.root / 'repo'}",
                "--state-dir", str(self.root / "preparer-state"),
            ]  # fmt: skip
        return [
            *common, "--runit", str(self.runsvdir.service_dir),
            "--runit-stage", str(self.root / "stage"), "--log-root", str(self.root / "log"),
            "--state-dir", str(self.root / "setlive-state"),
        ]  # fmt: skip

    def log_path(self, agent: str) -> Path:
        return self.root / f"{agent}.log"

    def start(self, *agents: str) -> None:
        """Run the agents as plain processes of the test."""
        for agent in agents or AGENTS:
            with self.log_path(agent).open("ab") as log:
                self.processes[agent] = subprocess.Popen(
                    self.command(agent),
                    stdout=log,
                    stderr=subprocess.STDOUT,
                    start_new_session=True,
                )

    def stop(self, *agents: str, timeout_s: float = 20) -> dict[str, float | None]:
        """SIGTERM the agents; the seconds each took to exit (None: killed after
        ``timeout_s``)."""
        took: dict[str, float | None] = {}
        for agent in agents or tuple(self.processes):
            proc = self.processes.pop(agent)
            started = time.monotonic()
            proc.send_signal(signal.SIGTERM)
            try:
                proc.wait(timeout_s)
                took[agent] = time.monotonic() - started
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()
                took[agent] = None
        return took

    def supervise(self, *agents: str) -> None:
        """Run the agents as services of the runsvdir, which restarts them when they die."""
        for agent in agents or AGENTS:
            service = self.service(agent)
            service.mkdir(parents=True)
            words = " ".join(f"'{w}'" for w in self.command(agent))
            run = service / "run"
            run.write_text(f"#!/bin/sh\nexec >>'{self.log_path(agent)}' 2>&1\nexec {words}\n")
            run.chmod(0o755)
            runit.link(service, self.runsvdir.service_dir, f"{self.name}-pp-{agent}")

    def service(self, agent: str) -> Path:
        return self.root / "agents" / agent

    def kill9(self, agent: str) -> bool:
        """SIGKILL the supervised agent, if it runs; True when a process was killed."""
        pid = runit.status(self.service(agent)).pid
        if pid is None:
            return False
        with contextlib.suppress(ProcessLookupError):
            os.kill(pid, signal.SIGKILL)
            return True
        return False

    def close(self) -> None:
        for proc in self.processes.values():
            if proc.poll() is None:
                proc.kill()
                proc.wait()
        self.processes.clear()
        for agent in AGENTS:
            if runit.is_supervised(self.service(agent)):
                with contextlib.suppress(runit.RunitError):
                    runit.sv("force-stop", self.service(agent))
        if self._store is not None:
            self._store.close()

    # -- what the node shows ---------------------------------------------------------------

    def report(self, agent: str, app: str) -> tuple[str, str | None] | None:
        try:
            reports = self.store.reality(node=self.name, app=app)
        except StoreError:
            return None
        found = [(r.status, r.version) for r in reports if r.agent == agent]
        return found[0] if found else None

    def converged(self, app: str, version: str) -> bool:
        """Installed, switched, answering and reported, on ``version``."""
        layout = self.layout(app)
        return (
            layout.version_of(layout.current) == version
            and answer(self.ports[app]) == version
            and self.report("setlive", app) == ("converged", version)
            and self.report("preparer", app) == ("converged", version)
        )

    def problems(self) -> list[str]:
        """Anything half done: temporary files left, installs without their marker,
        links to missing installs, app services down."""
        found = []
        for directory in (self.root / "apps", self.root / "stage", self.runsvdir.service_dir):
            for path in directory.rglob("*") if directory.exists() else ():
                if fs.is_temp(path):
                    age = time.time() - path.lstat().st_mtime
                    found.append(f"temporary left: {path} (changed {age:.1f}s ago)")
        for app in self.ports:
            layout = self.layout(app)
            for install in layout.installs.iterdir() if layout.installs.exists() else ():
                marked = (install / MARKER_NAME).is_file()
                if install.is_dir() and not fs.is_temp(install) and not marked:
                    found.append(f"install without its marker: {install}")
            for link in (layout.current, layout.previous):
                if link.is_symlink() and not link.resolve().is_dir():
                    found.append(f"{link} points at a missing install")
            if not runit.status(self.root / "stage" / app).up:
                found.append(f"service {app} is not up")
        return found

    def describe(self) -> str:
        lines = [
            f"{app}: setlive {self.report('setlive', app)}, preparer {self.report('preparer', app)}"
            for app in self.ports
        ]
        for agent in AGENTS:
            with contextlib.suppress(OSError):
                tail = self.log_path(agent).read_text().splitlines()[-8:]
                lines += [f"{agent}> {line[:300]}" for line in tail]
        return "\n".join(lines)


SWITCH_SETTLE_S = 10.0
"""How long after a new version first answers its switch may still restart it: a
setlive killed mid-switch restarts the new version once more when it comes back
(runsv's restart, the agent's start and its observe take seconds on a busy host)."""


@dataclass
class Gap:
    """A run of failed requests: when, what answered just before and after, and how
    long the version before had been answering."""

    start: float
    end: float
    before: str | None
    after: str | None
    answering_s: float
    """Seconds since ``before`` first answered (after another version, or nothing)."""
    errors: list[str] = field(default_factory=list)

    @property
    def switch(self) -> bool:
        """Part of the app's own switch: another version answers after the gap, or the
        gap follows the switch to ``before`` closely (its tail)."""
        if self.after is None:
            return False
        return self.after != self.before or self.answering_s < SWITCH_SETTLE_S


class Prober(threading.Thread):
    """Asks each app ``GET /`` every ``interval_s`` and keeps every answer."""

    def __init__(self, ports: dict[str, int], interval_s: float = 0.02) -> None:
        super().__init__(name="prober", daemon=True)
        self.ports = ports
        self.interval_s = interval_s
        self.answers: dict[str, list[Answer]] = {app: [] for app in ports}
        self._finished = threading.Event()

    def run(self) -> None:
        while not self._finished.is_set():
            for app, port in self.ports.items():
                self.answers[app].append(ask(port, timeout_s=3.0))
            self._finished.wait(self.interval_s)

    def finish(self) -> None:
        self._finished.set()
        self.join(10)

    def failed(self, app: str, since: float = 0.0, until: float = float("inf")) -> list[Answer]:
        """The requests that failed between the wall-clock times ``since`` and ``until``."""
        return [a for a in self.answers[app] if since <= a.at <= until and a.version is None]

    def gaps(self, app: str) -> list[Gap]:
        """Every run of failures after the app first answered."""
        gaps: list[Gap] = []
        last: str | None = None
        since = 0.0
        gap: Gap | None = None
        for answer in self.answers[app]:
            if answer.version is None:
                if last is not None and gap is None:
                    gap = Gap(answer.at, float("inf"), last, None, answer.at - since)
                if gap is not None:
                    gap.errors.append(answer.error or "")
                continue
            if gap is not None:
                gap.end, gap.after = answer.at, answer.version
                gaps.append(gap)
                gap = None
            if answer.version != last:
                since = answer.at
            last = answer.version
        if gap is not None:
            gaps.append(gap)
        return gaps


def retrying(write: Callable[[], None], timeout_s: float = 30) -> bool:
    """Do ``write`` once the store takes it (a store just back may refuse for a moment)."""

    def attempt() -> bool:
        try:
            write()
        except StoreError:
            return False
        return True

    return wait_until(attempt, timeout_s, 0.1)


@contextlib.contextmanager
def node(runsvdir: Runsvdir, store_url: str, **options: Any) -> Iterator[Node]:
    made = Node(runsvdir, store_url, **options)
    made.root.mkdir(mode=0o755)
    try:
        yield made
    finally:
        made.close()


DEPLOY_INTERVAL_S = (0.3, 2.0)
LIFETIME_S = (0.3, 2.5)
"""How long a supervised agent lives in a chaos run, from its start to its SIGKILL:
agents take about a second to start, so most kills land in their work."""


@dataclass
class Chaos:
    """What a chaos run did and saw."""

    seed: int
    deploys: int = 0
    kills: dict[str, int] = field(default_factory=lambda: dict.fromkeys(AGENTS, 0))
    seconds: float = 0.0
    converge_s: float | None = None
    """From the last deploy and kill to every app converged on its last version."""
    prober: Prober | None = None

    def summary(self) -> str:
        switches = outages = answered = 0
        if self.prober is not None:
            gaps = [g for app in self.prober.ports for g in self.prober.gaps(app)]
            switches = sum(g.switch for g in gaps)
            outages = len(gaps) - switches
            answered = sum(
                len({a.version for a in answers if a.version is not None})
                for answers in self.prober.answers.values()
            )
        return (
            f"seed {self.seed}: {self.deploys} deploys, kills {self.kills} in "
            f"{self.seconds:.1f}s; converged {self.converge_s and round(self.converge_s, 1)}s "
            f"after; {answered} versions answered; {switches} switch gaps, {outages} other gaps"
        )


def chaos(n: Node, seed: int, deploys: int, kills: int, apps: tuple[str, ...]) -> Chaos:
    """Deploy ``deploys`` new versions across ``apps`` while each supervised agent is
    SIGKILLed at a random moment of its life (``LIFETIME_S`` after its start: while it
    starts, observes, installs, switches or gates), at least ``kills`` times in all;
    then wait for every app to converge on its last version. Each stream draws from its
    own generator seeded from ``seed``, so a seed replays the same schedule."""
    result = Chaos(seed)
    for app in apps:
        n.assign(app)
        n.deploy(app, "1")
        for version in range(2, deploys + 2):
            n.publish(app, str(version))
    n.supervise()
    if not wait_until(lambda: all(n.converged(app, "1") for app in apps), 90):
        raise AssertionError(f"the first deploy did not converge:\n{n.describe()}")
    prober = result.prober = Prober(n.ports)
    prober.start()
    deploying = threading.Event()
    deploying.set()

    def deployer() -> None:
        rng = random_from(seed, "deploys")
        latest = dict.fromkeys(apps, 1)
        for _ in range(deploys):
            app = rng.choice(apps)
            latest[app] += 1
            n.deploy(app, str(latest[app]))
            result.deploys += 1
            time.sleep(rng.uniform(*DEPLOY_INTERVAL_S))
        deploying.clear()

    started = time.monotonic()
    thread = threading.Thread(target=deployer, name="deployer")
    thread.start()
    lifetimes = {agent: random_from(seed, f"kills/{agent}") for agent in AGENTS}
    doomed: dict[str, tuple[int, float]] = {}
    """The process each agent runs now and when it dies."""
    while deploying.is_set() or sum(result.kills.values()) < kills:
        for agent in AGENTS:
            status = runit.status(n.service(agent))
            if status.pid is None or status.started_at is None:
                continue
            if doomed.get(agent, (None,))[0] != status.pid:
                doomed[agent] = (
                    status.pid,
                    status.started_at + lifetimes[agent].uniform(*LIFETIME_S),
                )
            elif time.time() >= doomed[agent][1] and n.kill9(agent):
                result.kills[agent] += 1
        time.sleep(0.01)
    thread.join()
    result.seconds = time.monotonic() - started
    last = time.monotonic()
    done = wait_until(lambda: all(n.converged(app, n.versions[app][-1]) for app in apps), 120, 0.1)
    result.converge_s = time.monotonic() - last if done else None
    prober.finish()
    return result


def random_from(seed: int, purpose: str) -> random.Random:
    return random.Random(f"{seed}/{purpose}")
