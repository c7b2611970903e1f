"""The drain handshake between a real pp-setlive and a real pp-elb-registrar.

Both agents run their own runtime loop on threads, each with its own handle on one
embedded store, on one node: setlive under a private runsvdir with the sample HTTP
app, the registrar against moto in server mode over HTTP. They never call each
other; setlive asks in its report (``drain_request``), the registrar answers in its
own (``drained_for``), and each wakes on the other's reports.

What is asserted comes from moto's state and the agents' own reports and
timestamps, never from how long anything took.
"""

from __future__ import annotations

import contextlib
import itertools
import shutil
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest
from elb_support import FAST, Cloud, cloud_fixture, moto_fixture  # noqa: F401
from runit_support import Runsvdir, free_port, require_root, runsvdir, wait_for  # noqa: F401
from test_setlive_agent import APPS, FAST_HTTP, sha

from agents.elb_registrar.agent import ElbRegistrar
from agents.runtime import Runtime, RuntimeOptions
from agents.setlive.agent import SetliveAgent
from agents.setlive.observe import Paths
from agents.system import runit
from agents.system.aws import Aws
from agents.system.layout import AppLayout, InstallMarker
from intent import keys
from intent.model import Reality
from intent.store import IntentStore
from intent.store.sqlite import SqliteStore

NODE = "n1"
LOOP = RuntimeOptions(node=NODE, resync_interval_s=30.0, watch_timeout_s=1.0)
PATIENT = FAST_HTTP | {"deadline_s": 60.0}
"""A loaded host can take many seconds to start the app: a gate ends as soon as it passes."""
SICK_SOON = FAST_HTTP | {"deadline_s": 8.0}
"""For a version that never passes: its gate fails at the deadline."""


@dataclass
class Node:
    root: Path
    paths: Paths
    cloud: Cloud
    instance: str
    app: str
    """Its own name per test: the tests share one runsvdir, where a name is one service."""
    port: int = field(default_factory=free_port)
    health: dict[str, Any] = field(default_factory=lambda: PATIENT)
    stores: list[IntentStore] = field(default_factory=list)

    def store(self) -> IntentStore:
        """A handle of its own, as each agent process has."""
        self.stores.append(IntentStore(SqliteStore(self.root / "store.db")))
        return self.stores[-1]

    @property
    def layout(self) -> AppLayout:
        return AppLayout(self.root / "apps" / self.app, self.app)

    def install(self, version: str, unhealthy: bool = False) -> None:
        """What pp-preparer leaves: the install and its marker."""
        target = self.layout.install_dir(version)
        shutil.copytree(APPS / "httpapp", target, symlinks=False)
        if unhealthy:
            (target / "unhealthy").write_text("")  # its /health answers 503
        marker = InstallMarker.of_artifact(self.app, version, sha(version), target, time.time())
        (target / ".pp-installed.json").write_bytes(marker.to_bytes())

    def running_1(self, elb: list[dict[str, Any]], sick_2: bool = False) -> IntentStore:
        """Versions 1 and 2 installed, 1 active: the store the test writes intent with."""
        store = self.store()
        self.install("1")
        self.install("2", unhealthy=sick_2)
        self.health = SICK_SOON if sick_2 else PATIENT
        self.intent(store, "1", elb)
        return store

    def intent(self, store: IntentStore, active: str, elb: list[dict[str, Any]]) -> None:
        store.put_json(keys.node_app(NODE, self.app), {"cluster": "c"})
        versions = {v: {"state": "active" if v == active else "prep", "sha256": sha(v)}
                    for v in ("1", "2")}  # fmt: skip
        store.put_json(keys.config(self.app, "c"), {"versions": versions})
        deploy = {
            "basedir": str(self.layout.basedir),
            "run_as": "nobody",
            "ports": [{"name": "http", "port": self.port}],
            "health_check": self.health,
            "elb": elb,
        }
        store.put_json(keys.deploy_config(self.app, "c"), deploy)

    def setlive(self, drain_wait_s: float) -> SetliveAgent:
        return SetliveAgent(
            self.store(), NODE, self.paths, supervise_timeout_s=8.0, drain_wait_s=drain_wait_s
        )

    def registrar(self, stop: threading.Event) -> ElbRegistrar:
        aws = Aws(session=self.cloud.session, endpoint_url=self.cloud.endpoint, stop=stop,
                  attempts=3, max_backoff_s=0.2)  # fmt: skip
        return ElbRegistrar(self.store(), NODE, aws, lambda: self.instance,
                            state_dir=self.root / "elb-state", settings=FAST,
                            stage=self.paths.stage, stop=stop)  # fmt: skip


_APP_NUMBERS = itertools.count(1)


@pytest.fixture
def node(runsvdir: Runsvdir, cloud: Cloud, request: pytest.FixtureRequest) -> Iterator[Node]:  # noqa: F811
    require_root()
    root = runsvdir.root / request.node.name[:40]
    root.mkdir(mode=0o755)
    paths = Paths(runsvdir.service_dir, root / "stage", root / "log", root / "state")
    app = f"shop{next(_APP_NUMBERS)}"
    node = Node(root, paths, cloud, cloud.instance(), app)
    yield node
    for store in node.stores:
        store.close()


@contextlib.contextmanager
def running(*agents: Any, stop: threading.Event | None = None) -> Iterator[None]:
    """Each agent in its own runtime loop (background workers, store watch) on a thread."""
    runtimes = []
    for agent in agents:
        shared = stop if isinstance(agent, ElbRegistrar) else None
        runtimes.append(Runtime(agent, agent.store, LOOP, stop=shared))
    threads = [threading.Thread(target=rt.run, name=rt.agent.name) for rt in runtimes]
    for thread in threads:
        thread.start()
    try:
        yield
    finally:
        for rt in runtimes:
            rt.stop()
        for thread in threads:
            thread.join(30)
        assert not any(t.is_alive() for t in threads)


class Watcher:
    """Reads both agents' reports every few milliseconds and keeps each distinct one:
    the handshake's reports last seconds (a drain, a switch and a gate), so none is
    missed, and each carries the time it was written."""

    def __init__(self, store: IntentStore, app: str) -> None:
        self.store = store
        self.app = app
        self.seen: dict[str, list[Reality]] = {"setlive": [], "elb-registrar": []}
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def _run(self) -> None:
        while not self._stop.wait(0.01):
            for report in self.store.reality(NODE, self.app):
                if report.agent in self.seen:
                    history = self.seen[report.agent]
                    if not history or history[-1] != report:
                        history.append(report)

    def first(self, agent: str, test: Callable[[Reality], bool]) -> Reality:
        return next(r for r in self.seen[agent] if test(r))

    def __enter__(self) -> Watcher:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join(5)


def report(store: IntentStore, agent: str, app: str) -> Reality | None:
    found = [r for r in store.reality(NODE, app) if r.agent == agent]
    return found[0] if found else None


def converged_on(store: IntentStore, agent: str, app: str, version: str, **details: object) -> bool:
    r = report(store, agent, app)
    return (
        r is not None
        and r.status == "converged"
        and r.version == version
        and all(r.details.get(k) == v for k, v in details.items())
    )


def test_a_switch_drains_the_node_first_and_registers_the_new_version_once_it_passed_its_gate(
    node: Node, cloud: Cloud
) -> None:
    lb = cloud.classic("shop-lb")
    store = node.running_1([lb])
    stop = threading.Event()
    with running(node.setlive(drain_wait_s=120.0), node.registrar(stop), stop=stop):
        # The first registration needs only the registrar's own health check, so setlive's
        # report of the same version may land a moment after it.
        assert wait_for(
            lambda: (
                converged_on(store, "elb-registrar", node.app, "1", in_service=True)
                and converged_on(store, "setlive", node.app, "1")
            ),
            120,
        )
        assert cloud.registered(lb, node.instance) == "InService"
        v1 = runit.status(node.paths.stage / node.app).pid

        with Watcher(store, node.app) as watcher:
            node.intent(store, "2", [lb])
            assert wait_for(
                lambda: converged_on(store, "elb-registrar", node.app, "2", in_service=True), 120
            ), report(store, "elb-registrar", node.app)
        assert converged_on(store, "setlive", node.app, "2")

    # setlive asked, and the registrar answered only once the node was out of the ELB.
    asked = watcher.first("setlive", lambda r: "drain_request" in r.details)
    token = asked.details["drain_request"]["token"]
    answered = watcher.first("elb-registrar", lambda r: r.details.get("drained_for") == token)
    (out,) = answered.details["load_balancers"]
    assert out["registered"] is False and out["last_transition"] == "deregistered"

    # v1 was stopped by the switch, which came after the answer.
    final = report(store, "setlive", node.app)
    assert final is not None and "drain_request" not in final.details
    assert "undrained" not in final.details
    switched_at = final.details["last_switch_at"]
    assert answered.updated_at <= switched_at
    assert out["last_transition_at"] <= switched_at
    assert v1 is not None and runit.status(node.paths.stage / node.app).pid != v1

    # While setlive switched and gated, every report still asked for the drain...
    during = [r for r in watcher.seen["setlive"] if r.status != "converged"]
    assert during and all(r.details["drain_request"]["token"] == token for r in during)
    # ...and the registrar put the node back only after setlive's gate had passed.
    registrar = report(store, "elb-registrar", node.app)
    assert registrar is not None
    (back,) = registrar.details["load_balancers"]
    assert back["last_transition"] == "registered"
    assert back["last_transition_at"] >= final.since
    assert cloud.registered(lb, node.instance) == "InService"


def test_a_switch_that_fails_its_gate_rolls_back_and_the_old_version_goes_back_in(
    node: Node, cloud: Cloud
) -> None:
    lb = cloud.classic("shop-lb")
    store = node.running_1([lb], sick_2=True)
    stop = threading.Event()
    with running(node.setlive(drain_wait_s=120.0), node.registrar(stop), stop=stop):
        assert wait_for(
            lambda: converged_on(store, "elb-registrar", node.app, "1", in_service=True), 120
        )
        with Watcher(store, node.app) as watcher:
            node.intent(store, "2", [lb])

            def rolled_back() -> bool:
                found = report(store, "setlive", node.app)
                return found is not None and found.details.get("rolled_back_from") == "2"

            assert wait_for(rolled_back, 120), report(store, "setlive", node.app)
            # Version 1 serves again: the registrar puts it back, though 2 is active.
            assert wait_for(
                lambda: converged_on(store, "elb-registrar", node.app, "1", in_service=True), 120
            ), report(store, "elb-registrar", node.app)

    asked = watcher.first("setlive", lambda r: "drain_request" in r.details)
    token = asked.details["drain_request"]["token"]
    assert watcher.first("elb-registrar", lambda r: r.details.get("drained_for") == token)
    final = report(store, "setlive", node.app)
    assert final is not None and final.version == "1" and "drain_request" not in final.details
    assert cloud.registered(lb, node.instance) == "InService"


def test_with_no_registrar_to_answer_setlive_switches_after_the_deadline_and_says_so(
    node: Node, cloud: Cloud
) -> None:
    lb = cloud.classic("shop-lb")
    store = node.running_1([lb])
    with running(node.setlive(drain_wait_s=1.5)):
        assert wait_for(lambda: converged_on(store, "setlive", node.app, "1"), 120)
        with Watcher(store, node.app) as watcher:
            node.intent(store, "2", [lb])
            assert wait_for(lambda: converged_on(store, "setlive", node.app, "2"), 120)

    asked = watcher.first("setlive", lambda r: "drain_request" in r.details)
    assert "pp-elb-registrar" in (asked.error or "")
    final = report(store, "setlive", node.app)
    assert final is not None
    assert final.details["last_switch_at"] >= asked.details["drain_request"]["at"] + 1.5
    assert "did not acknowledge the drain request within 1.5s" in final.details["undrained"]
    assert "drain_request" not in final.details


def test_an_app_without_load_balancers_switches_without_asking(node: Node) -> None:
    store = node.running_1([])
    with running(node.setlive(drain_wait_s=600.0)):
        assert wait_for(lambda: converged_on(store, "setlive", node.app, "1"), 120)
        with Watcher(store, node.app) as watcher:
            node.intent(store, "2", [])
            assert wait_for(lambda: converged_on(store, "setlive", node.app, "2"), 120)
    assert not any("drain_request" in r.details for r in watcher.seen["setlive"])
