"""A change wakes only the nodes it concerns, against a real ``consul agent -dev``.

Each node runs the real runtime with its own ConsulStore, whose HTTP requests are
counted from Consul's answers: plain reads, and blocking queries that answered because
their index moved (a wake-up). A node that does not run an app must spend neither
on a change to it.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Callable, Iterator, Mapping
from typing import Any

import pytest
from consul_requests import RequestCounts

from agents.runtime import Agent, Outcome, Runtime, RuntimeOptions
from intent import keys
from intent.store import AppIntent, IntentStore
from intent.store.consul import ConsulStore

pytestmark = pytest.mark.consul

SHA = "ab" * 32
GRACE_S = 1.0
"""After the node that runs the app has converged and reported, how long an unrelated
node is given to show a reaction it should not have."""


def eventually(predicate: Callable[[], object], timeout_s: float = 20.0) -> bool:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if predicate():
            return True
        time.sleep(0.02)
    return bool(predicate())


class Recorder(Agent):
    name = "recorder"

    def __init__(self) -> None:
        self.seen: list[tuple[str, str | None]] = []
        self.assigned: set[str] = set()

    def begin_pass(self, intents: Mapping[str, AppIntent]) -> None:
        self.assigned = set(intents)

    def converge(self, intent: AppIntent) -> Outcome:
        assert intent.config is not None
        self.seen.append((intent.app, intent.config.active_version))
        return Outcome.converged(intent.config.active_version)


class Node:
    def __init__(self, name: str, address: str, ns: str) -> None:
        host, port = address.split(":")
        self.name = name
        self.kv = ConsulStore(host, int(port))
        self.requests = RequestCounts()
        self.requests.attach(self.kv)
        self.agent = Recorder()
        self.runtime = Runtime(
            self.agent,
            IntentStore(self.kv, prefix=ns),
            RuntimeOptions(node=name, resync_interval_s=3600.0),
        )
        self.thread = threading.Thread(target=self.runtime.run, daemon=True)

    def saw(self, app: str, version: str) -> bool:
        return (app, version) in self.agent.seen

    def reads_and_wakes(self) -> int:
        return self.requests["read"] + self.requests["wake"]


def config(version: str) -> dict[str, Any]:
    return {"versions": {version: {"state": "active", "sha256": SHA}}}


@pytest.fixture
def writer(consul_addr: str, ns: str) -> Iterator[IntentStore]:
    host, port = consul_addr.split(":")
    with IntentStore(ConsulStore(host, int(port)), prefix=ns) as store:
        store.ensure_identity("test")
        for app in ("alpha", "beta"):
            store.put_json(keys.config(app, "c"), config("1"))
            store.put_json(keys.deploy_config(app, "c"), {"basedir": f"/srv/{app}"})
        store.put_json(keys.node_app("n1", "alpha"), {"cluster": "c"})
        store.put_json(keys.node_app("n2", "beta"), {"cluster": "c"})
        yield store


@pytest.fixture
def nodes(consul_addr: str, ns: str, writer: IntentStore) -> Iterator[dict[str, Node]]:
    started = {name: Node(name, consul_addr, ns) for name in ("n1", "n2")}
    for node in started.values():
        node.thread.start()
    try:
        yield started
    finally:
        for node in started.values():
            node.runtime.stop()
        for node in started.values():
            node.thread.join(10)
            node.kv.close()


def reported(store: IntentStore, node: str, app: str, version: str) -> bool:
    return any(r.version == version for r in store.reality(node=node, app=app))


def quiet(node: Node, for_s: float = 0.5) -> None:
    """Wait until the node made no request for ``for_s`` (its start-up is over)."""
    last = -1
    while (now := sum(node.requests.snapshot().values())) != last:
        last = now
        time.sleep(for_s)


def test_a_change_to_an_app_costs_nothing_on_a_node_that_does_not_run_it(
    writer: IntentStore, nodes: dict[str, Node]
) -> None:
    n1, n2 = nodes["n1"], nodes["n2"]
    assert eventually(lambda: n1.saw("alpha", "1") and n2.saw("beta", "1"))
    quiet(n2)
    before = n2.reads_and_wakes()

    writer.put_json(keys.config("alpha", "c"), config("2"))

    assert eventually(lambda: reported(writer, "n1", "alpha", "2"))
    time.sleep(GRACE_S)
    assert n2.reads_and_wakes() == before, n2.requests
    assert not n2.saw("alpha", "2")


def test_a_woken_node_reads_only_the_identity(writer: IntentStore, nodes: dict[str, Node]) -> None:
    """The watch brings the changed values with the wake-up, and the pass is served
    from them: what is left is the store's identity (read afresh on every pass). The
    new report differs from the one the agent wrote last, so it is written without
    reading the key first."""
    n1 = nodes["n1"]
    assert eventually(lambda: n1.saw("alpha", "1"))
    quiet(n1)
    reads_before = n1.requests["read"]

    writer.put_json(keys.config("alpha", "c"), config("2"))

    assert eventually(lambda: reported(writer, "n1", "alpha", "2"))
    quiet(n1)
    assert n1.requests["read"] - reads_before == 1, n1.requests


def test_the_watch_follows_assignments_as_they_come_and_go(
    writer: IntentStore, nodes: dict[str, Node]
) -> None:
    n2 = nodes["n2"]
    assert eventually(lambda: n2.saw("beta", "1"))

    writer.put_json(keys.node_app("n2", "alpha"), {"cluster": "c"})
    assert eventually(lambda: n2.saw("alpha", "1"))
    writer.put_json(keys.config("alpha", "c"), config("2"))
    assert eventually(lambda: n2.saw("alpha", "2")), "a newly assigned app's cluster is watched"

    writer.delete(keys.node_app("n2", "alpha"))
    assert eventually(lambda: "alpha" not in n2.agent.assigned)
    quiet(n2)
    before = {kind: n2.requests[kind] for kind in ("read", "wake")}
    writer.put_json(keys.config("alpha", "c"), config("3"))
    assert eventually(lambda: reported(writer, "n1", "alpha", "3"))
    time.sleep(GRACE_S)
    # The blocking query in flight when alpha went answers this once and is not asked
    # again; nothing is read.
    assert n2.requests["read"] == before["read"], n2.requests
    assert n2.requests["wake"] <= before["wake"] + 1, n2.requests
    assert not n2.saw("alpha", "3")
    writer.put_json(keys.config("alpha", "c"), config("4"))
    assert eventually(lambda: reported(writer, "n1", "alpha", "4"))
    time.sleep(GRACE_S)
    assert n2.reads_and_wakes() <= before["read"] + before["wake"] + 1, n2.requests
