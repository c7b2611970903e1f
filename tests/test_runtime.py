"""The shared agent loop, driven with a recording agent over a real embedded store."""

from __future__ import annotations

import threading
import time
from collections.abc import Collection, Sequence
from pathlib import Path

import pytest
from structlog.testing import capture_logs

from agents.runtime import Agent, Outcome, Runtime, RuntimeOptions
from intent import keys
from intent.model import Reality
from intent.store import AppIntent, IntentStore, StoreError, StoreUnavailable, open_store
from intent.store.kv import Entry
from intent.store.sqlite import SqliteStore

NODE = "web1"
SHA = "b" * 64


class RecordingAgent(Agent):
    name = "recorder"

    def __init__(self) -> None:
        self.converged: list[tuple[str, str | None]] = []
        self.removed: list[str] = []
        self.failing: set[str] = set()
        self.on_host: set[str] = set()

    def converge(self, intent: AppIntent) -> Outcome:
        assert intent.valid and intent.config is not None
        version = intent.config.active_version
        self.converged.append((intent.app, version))
        if intent.app in self.failing:
            raise RuntimeError("disk on fire")
        self.on_host.add(intent.app)
        return Outcome.converged(version)

    def unmanaged(self, assigned: Collection[str]) -> list[str]:
        return sorted(self.on_host - set(assigned))

    def remove(self, app: str) -> Outcome:
        self.removed.append(app)
        self.on_host.discard(app)
        return Outcome.converged()


class Clock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


@pytest.fixture
def store(tmp_path: Path) -> IntentStore:
    return IntentStore(SqliteStore(tmp_path / "intent.db"))


def put_app(store: IntentStore, app: str, version: str = "1.0", node: str = NODE) -> None:
    store.put_json(keys.node_app(node, app), {"cluster": "prod"})
    store.put_json(
        keys.config(app, "prod"), {"versions": {version: {"state": "active", "sha256": SHA}}}
    )
    store.put_json(keys.deploy_config(app, "prod"), {"basedir": f"/srv/{app}"})


def runtime(store: IntentStore, agent: Agent, clock: Clock | None = None) -> Runtime:
    options = RuntimeOptions(node=NODE, backoff_initial_s=1, backoff_max_s=60)
    return Runtime(agent, store, options, clock=clock or Clock())


def converged_on(kv: SqliteStore) -> tuple[IntentStore, RecordingAgent, Runtime]:
    """A store over ``kv`` with app ``hello``, and an agent that has converged it once."""
    store = IntentStore(kv)
    put_app(store, "hello")
    agent = RecordingAgent()
    rt = runtime(store, agent)
    rt.run_pass()
    return store, agent, rt


def status_of(store: IntentStore, app: str) -> tuple[str, str | None, str | None]:
    (report,) = store.reality(node=NODE, app=app)
    return report.status, report.version, report.error


def test_a_pass_converges_every_assigned_app_and_reports_it(store: IntentStore) -> None:
    put_app(store, "hello")
    put_app(store, "echo", "2.0")
    put_app(store, "other-node-app", node="web10")
    agent = RecordingAgent()
    assert runtime(store, agent).run_pass() is True
    assert sorted(agent.converged) == [("echo", "2.0"), ("hello", "1.0")]
    assert status_of(store, "hello") == ("converged", "1.0", None)


def test_invalid_intent_holds_the_last_good_intent_and_reports_the_error(
    store: IntentStore,
) -> None:
    put_app(store, "hello")
    put_app(store, "echo")
    agent = RecordingAgent()
    rt = runtime(store, agent)
    rt.run_pass()
    store.put_json(keys.config("hello", "prod"), {"versions": {"../evil": {"state": "active"}}})

    assert rt.run_pass(force=True) is False

    assert agent.removed == []
    assert ("hello", "1.0") in agent.converged[2:]  # still converged to the held version
    status, version, error = status_of(store, "hello")
    assert (status, version) == ("error", "1.0")
    assert error is not None and error.startswith("clusters/hello/prod/config: versions")
    assert status_of(store, "echo")[0] == "converged"


def test_a_deleted_config_is_held_not_treated_as_removal(store: IntentStore) -> None:
    put_app(store, "hello")
    agent = RecordingAgent()
    rt = runtime(store, agent)
    rt.run_pass()
    store.delete(keys.config("hello", "prod"))
    rt.run_pass(force=True)
    assert agent.removed == []
    assert status_of(store, "hello")[2] == "clusters/hello/prod/config: missing"


def test_invalid_intent_with_nothing_held_does_nothing_but_report(store: IntentStore) -> None:
    store.put_json(keys.node_app(NODE, "hello"), {"cluster": "no such/cluster"})
    agent = RecordingAgent()
    assert runtime(store, agent).run_pass() is False
    assert agent.converged == []
    assert status_of(store, "hello")[0] == "error"


def test_one_app_crashing_does_not_block_the_others(store: IntentStore) -> None:
    put_app(store, "bad")
    put_app(store, "good")
    agent = RecordingAgent()
    agent.failing.add("bad")
    assert runtime(store, agent).run_pass() is False
    assert status_of(store, "good") == ("converged", "1.0", None)
    status, _, error = status_of(store, "bad")
    assert status == "error" and error is not None and "disk on fire" in error


def test_a_failing_app_backs_off_exponentially_up_to_the_cap(store: IntentStore) -> None:
    put_app(store, "bad")
    agent = RecordingAgent()
    agent.failing.add("bad")
    clock = Clock()
    rt = runtime(store, agent, clock)
    rt.run_pass()
    assert len(agent.converged) == 1
    rt.run_pass()  # immediately again: still backing off
    assert len(agent.converged) == 1
    clock.now += 4  # past the first wait (1 s + up to 1 s jitter)
    rt.run_pass()
    assert len(agent.converged) == 2
    waits = [rt.backoff(n) for n in range(1, 12)]
    assert waits[0] <= 2 and waits[3] >= 8
    assert max(waits) <= 60


def test_an_intent_change_ends_the_backoff_at_once(store: IntentStore) -> None:
    put_app(store, "bad")
    agent = RecordingAgent()
    agent.failing.add("bad")
    rt = runtime(store, agent)
    rt.run_pass()
    put_app(store, "bad", "1.1")
    rt.run_pass()
    assert agent.converged[-1] == ("bad", "1.1")


def test_a_retry_request_makes_the_app_due_without_a_resync(store: IntentStore) -> None:
    put_app(store, "hello")
    agent = RecordingAgent()
    rt = runtime(store, agent)
    rt.run_pass()
    rt.run_pass()
    assert len(agent.converged) == 1  # converged and unchanged: not due
    store.put_json(keys.retry(NODE, "hello"), {"token": "t1", "at": 0, "actor": "op"})
    rt.run_pass()
    assert len(agent.converged) == 2
    (intent,) = store.apps_for_node(NODE)
    assert intent.retry_token == "t1" and intent.valid


def test_unassigned_apps_are_removed_and_their_reality_cleared(store: IntentStore) -> None:
    put_app(store, "hello")
    agent = RecordingAgent()
    rt = runtime(store, agent)
    rt.run_pass()
    store.delete(keys.node_app(NODE, "hello"))
    assert rt.run_pass() is True
    assert agent.removed == ["hello"]
    assert store.reality(node=NODE) == []


class UnreachableKV(SqliteStore):
    """The embedded store with a switch that makes every call fail as if the
    network to the store were cut."""

    down = False

    def _check(self) -> None:
        if self.down:
            raise StoreUnavailable("connection refused")

    def list(self, prefix: str) -> list[Entry]:
        self._check()
        return super().list(prefix)

    def get(self, key: str) -> Entry | None:
        self._check()
        return super().get(key)

    def put(self, key: str, value: bytes, expect: int | None = None) -> bool:
        self._check()
        return super().put(key, value, expect)

    def wait(self, prefixes: Sequence[str], token: tuple[int, ...] | None, timeout: float):  # type: ignore[no-untyped-def]
        self._check()
        return super().wait(prefixes, token, timeout)


def test_a_store_outage_tears_nothing_down_and_is_logged_once(tmp_path: Path) -> None:
    kv = UnreachableKV(tmp_path / "intent.db")
    _, agent, rt = converged_on(kv)
    kv.down = True
    with capture_logs() as logs:
        for _ in range(5):
            assert rt.run_pass(force=True) is False
    assert agent.removed == []
    assert agent.on_host == {"hello"}
    assert [e["event"] for e in logs].count("store.unreachable") == 1
    kv.down = False
    with capture_logs() as logs:
        assert rt.run_pass(force=True) is True
    assert [e["event"] for e in logs].count("store.reachable") == 1


def test_once_exits_zero_when_converged_and_non_zero_otherwise(store: IntentStore) -> None:
    put_app(store, "hello")
    ok = Runtime(RecordingAgent(), store, RuntimeOptions(node=NODE, once=True))
    assert ok.run() == 0
    failing = RecordingAgent()
    failing.failing.add("hello")
    assert Runtime(failing, store, RuntimeOptions(node=NODE, once=True)).run() == 1


def test_the_loop_wakes_on_an_intent_change_and_stops_on_request(store: IntentStore) -> None:
    put_app(store, "hello")
    agent = RecordingAgent()
    rt = Runtime(agent, store, RuntimeOptions(node=NODE, resync_interval_s=3600))
    loop = threading.Thread(target=rt.run)
    loop.start()
    try:
        deadline = time.monotonic() + 10
        while ("hello", "1.0") not in agent.converged and time.monotonic() < deadline:
            time.sleep(0.02)
        put_app(store, "hello", "2.0")
        while ("hello", "2.0") not in agent.converged and time.monotonic() < deadline:
            time.sleep(0.02)
        assert ("hello", "2.0") in agent.converged
    finally:
        rt.stop()
        loop.join(10)
    assert not loop.is_alive()


def test_a_resync_request_converges_again_without_an_intent_change(store: IntentStore) -> None:
    put_app(store, "hello")
    agent = RecordingAgent()
    rt = Runtime(agent, store, RuntimeOptions(node=NODE, resync_interval_s=3600))
    loop = threading.Thread(target=rt.run)
    loop.start()
    try:
        deadline = time.monotonic() + 10
        while not agent.converged and time.monotonic() < deadline:
            time.sleep(0.02)
        agent.on_host.clear()  # drift made by hand
        rt.request_resync()
        while "hello" not in agent.on_host and time.monotonic() < deadline:
            time.sleep(0.02)
        assert "hello" in agent.on_host
    finally:
        rt.stop()
        loop.join(10)


class HidingKV(SqliteStore):
    """A store whose listings of one node come back empty while its keys can still be
    read one by one: what Consul does for a token its ACLs filter."""

    hide = False

    def list(self, prefix: str) -> list[Entry]:
        if self.hide and prefix.endswith(keys.node_apps(NODE)):
            return []
        return super().list(prefix)


def test_an_empty_listing_alone_never_removes_an_app(tmp_path: Path) -> None:
    kv = HidingKV(tmp_path / "intent.db")
    _, agent, rt = converged_on(kv)
    kv.hide = True
    with capture_logs() as logs:
        assert rt.run_pass(force=True) is False
    assert agent.removed == []
    assert "remove.held" in [e["event"] for e in logs]


class DenyingReality(SqliteStore):
    """Reality writes refused, as by an ACL that does not cover this node's reports."""

    def put(self, key: str, value: bytes, expect: int | None = None) -> bool:
        if "/reality/" in key:
            raise StoreError("permission denied")
        return super().put(key, value, expect)


def test_a_refused_report_is_logged_once_and_is_no_store_outage(tmp_path: Path) -> None:
    store = IntentStore(DenyingReality(tmp_path / "intent.db"))
    put_app(store, "hello")
    rt = runtime(store, RecordingAgent())
    with capture_logs() as logs:
        for _ in range(4):
            rt.run_pass(force=True)
    events = [e["event"] for e in logs]
    assert events.count("reality.write_failed") == 1
    assert "store.unreachable" not in events


def test_a_fixed_intent_is_reported_at_once(store: IntentStore) -> None:
    put_app(store, "hello")
    rt = runtime(store, RecordingAgent())
    rt.run_pass()
    good = store.get_raw(keys.deploy_config("hello", "prod"))
    assert good is not None
    store.put_json(keys.deploy_config("hello", "prod"), {"basedir": "oops"})
    rt.run_pass()
    assert status_of(store, "hello")[0] == "error"
    store.kv.put(store.prefix + keys.deploy_config("hello", "prod"), good.value)
    assert rt.run_pass() is True
    assert status_of(store, "hello") == ("converged", "1.0", None)


def test_an_unsafe_app_name_is_never_converged_nor_used_as_a_key(store: IntentStore) -> None:
    for name in ("..", "x y", "$(id)"):
        store.put_json(keys.node_app(NODE, name), {"cluster": "prod"})
        store.put_json(
            keys.config(name, "prod"), {"versions": {"1": {"state": "active", "sha256": SHA}}}
        )
        store.put_json(keys.deploy_config(name, "prod"), {"basedir": "/srv/x"})
    put_app(store, "hello")
    agent = RecordingAgent()
    with capture_logs() as logs:
        assert runtime(store, agent).run_pass() is False
    assert agent.converged == [("hello", "1.0")]
    assert [r.app for r in store.reality(node=NODE)] == ["hello"]
    assert [e["event"] for e in logs].count("intent.invalid_app_name") == 3


def test_a_crash_while_looking_for_unassigned_apps_removes_nothing(store: IntentStore) -> None:
    class Crashing(RecordingAgent):
        def unmanaged(self, assigned: Collection[str]) -> list[str]:
            raise PermissionError("state dir")

    put_app(store, "hello")
    agent = Crashing()
    assert runtime(store, agent).run_pass() is False
    assert agent.removed == [] and agent.converged == [("hello", "1.0")]


def test_a_stop_request_is_honoured_between_apps(store: IntentStore) -> None:
    class Stopping(RecordingAgent):
        rt: Runtime

        def converge(self, intent: AppIntent) -> Outcome:
            self.rt.stop()
            return super().converge(intent)

    put_app(store, "a")
    put_app(store, "b")
    agent = Stopping()
    agent.rt = runtime(store, agent)
    agent.rt.run_pass()
    assert agent.converged == [("a", "1.0")]
    assert [r.app for r in store.reality(node=NODE)] == ["a"]


def test_agents_refuse_to_start_an_empty_embedded_store(tmp_path: Path) -> None:
    with pytest.raises(StoreUnavailable, match="does not exist: write intent with pp first"):
        open_store(f"sqlite://{tmp_path}/missing.db", create=False)
    assert not (tmp_path / "missing.db").exists()


def test_a_slow_converge_does_not_hold_up_new_intent_for_other_apps(store: IntentStore) -> None:
    class Slow(RecordingAgent):
        converges_in_background = True

        def __init__(self) -> None:
            super().__init__()
            self.release = threading.Event()

        def converge(self, intent: AppIntent) -> Outcome:
            if intent.app == "slow":
                self.release.wait(20)  # a long download or health gate
            return super().converge(intent)

    put_app(store, "slow")
    put_app(store, "fast")
    agent = Slow()
    options = RuntimeOptions(node=NODE, resync_interval_s=3600, max_parallel=2)
    rt = Runtime(agent, store, options)
    loop = threading.Thread(target=rt.run)
    loop.start()
    try:
        deadline = time.monotonic() + 10
        while ("fast", "1.0") not in agent.converged and time.monotonic() < deadline:
            time.sleep(0.02)
        put_app(store, "fast", "2.0")  # new intent while "slow" is still converging
        while ("fast", "2.0") not in agent.converged and time.monotonic() < deadline:
            time.sleep(0.02)
        assert ("fast", "2.0") in agent.converged
        assert status_of(store, "fast") == ("converged", "2.0", None)
        assert not any(app == "slow" for app, _ in agent.converged)
        agent.release.set()
        while not store.reality(node=NODE, app="slow") and time.monotonic() < deadline:
            time.sleep(0.02)
        assert status_of(store, "slow") == ("converged", "1.0", None)
    finally:
        agent.release.set()
        rt.stop()
        loop.join(10)
    assert not loop.is_alive()


def test_a_resync_clears_a_report_left_by_an_agent_that_died_mid_removal(
    store: IntentStore,
) -> None:
    put_app(store, "hello")
    put_app(store, "echo")
    rt = runtime(store, RecordingAgent())
    rt.run_pass()
    store.delete(keys.node_app(NODE, "hello"))
    # A fresh agent: the host has nothing of hello any more, but its report is still there.
    fresh = runtime(store, RecordingAgent())
    fresh.run_pass()
    assert {r.app for r in store.reality(node=NODE)} == {"hello", "echo"}
    fresh.run_pass(force=True)
    assert {r.app for r in store.reality(node=NODE)} == {"echo"}
    other = Reality(node=NODE, agent="someone-else", app="hello", status="converged")
    store.write_reality(other)
    fresh.run_pass(force=True)
    assert [(r.agent, r.app) for r in store.reality(node=NODE, app="hello")] == [
        ("someone-else", "hello")
    ]
