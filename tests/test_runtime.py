"""The shared agent loop, driven with a recording agent over a real embedded store."""

from __future__ import annotations

import contextlib
import threading
import time
from collections.abc import Callable, Collection, Iterator, Sequence
from pathlib import Path

import pytest
from structlog.testing import capture_logs

from agents.runtime import Agent, Outcome, Runtime, RuntimeOptions
from intent import keys
from intent.cli.operator import unassign
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


class Gated(RecordingAgent):
    """Converges in the background; ``hold[app]`` keeps that app's converge in flight
    until set (``looping`` sets every one on its way out)."""

    converges_in_background = True

    def __init__(self, *held: str) -> None:
        super().__init__()
        self.hold = {app: threading.Event() for app in held}
        self.started: set[str] = set()

    def converge(self, intent: AppIntent) -> Outcome:
        self.started.add(intent.app)
        if gate := self.hold.get(intent.app):
            gate.wait(20)
        return super().converge(intent)


class Clock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


@contextlib.contextmanager
def looping(rt: Runtime) -> Iterator[threading.Thread]:
    """``rt.run`` on a thread; on the way out held converges are released, the loop is
    stopped, and it must have ended."""
    loop = threading.Thread(target=rt.run)
    loop.start()
    try:
        yield loop
    finally:
        for gate in getattr(rt.agent, "hold", {}).values():
            gate.set()
        rt.stop()
        loop.join(10)
    assert not loop.is_alive()


def eventually(predicate: Callable[[], object], timeout_s: float = 30) -> bool:
    """Whether ``predicate`` comes true: the timeout is an upper bound for a loaded
    machine (a thread may wait seconds for a CPU there), not a timing."""
    deadline = time.monotonic() + timeout_s
    while not predicate():
        if time.monotonic() > deadline:
            return False
        time.sleep(0.01)
    return True


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


def reported(store: IntentStore, app: str) -> tuple[str, str | None, str | None] | None:
    """The app's report, or None while there is none (for waiting on it)."""
    reports = store.reality(node=NODE, app=app)
    return status_of(store, app) if reports else None


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
    unassign(store, NODE, ["hello"], "tester")  # its last app: the node is emptied on purpose
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
    with looping(rt):
        assert eventually(lambda: ("hello", "1.0") in agent.converged)
        put_app(store, "hello", "2.0")
        assert eventually(lambda: ("hello", "2.0") in agent.converged)


def test_a_resync_request_converges_again_without_an_intent_change(store: IntentStore) -> None:
    put_app(store, "hello")
    agent = RecordingAgent()
    rt = Runtime(agent, store, RuntimeOptions(node=NODE, resync_interval_s=3600))
    with looping(rt):
        assert eventually(lambda: agent.converged)
        agent.on_host.clear()  # drift made by hand
        rt.request_resync()
        assert eventually(lambda: "hello" in agent.on_host)


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
    store, agent, rt = converged_on(kv)
    kv.hide = True
    with capture_logs() as logs:
        assert rt.run_pass(force=True) is False
    assert agent.removed == []
    assert "store.untrusted" in [e["event"] for e in logs]  # every assignment vanished

    # Even where the node is recorded as emptied, the exact key must be gone too.
    store.put_json(keys.emptied(NODE), {"at": 0, "actor": "tester"})
    assert rt.run_pass(force=True) is False  # held while a restore could be under way
    settled(rt)
    with capture_logs() as logs:
        assert rt.run_pass(force=True) is False
    assert agent.removed == []
    assert "remove.held" in [e["event"] for e in logs]


# -- trust: absence is not intent ---------------------------------------------------------


def trusting(store: IntentStore, agent: Agent, trust_file: Path) -> Runtime:
    options = RuntimeOptions(node=NODE, trust_file=trust_file)
    return Runtime(agent, store, options, clock=Clock())


def held(store: IntentStore) -> str | None:
    (status,) = store.agent_statuses(NODE)
    return status.reason if status.state == "held" else None


def settled(rt: Runtime) -> None:
    """Let the time a restore is given to finish pass on the runtime's clock."""
    assert isinstance(rt.clock, Clock)
    rt.clock.now += rt.options.restore_settle_s


def wipe(store: IntentStore) -> None:
    for entry in store.kv.list(store.prefix):
        store.kv.delete(entry.key)


def test_a_wiped_store_holds_everything_and_the_restored_one_resumes_without_a_converge(
    tmp_path: Path,
) -> None:
    store = open_store(f"sqlite://{tmp_path / 'intent.db'}")
    put_app(store, "hello")
    put_app(store, "other")
    store.ensure_identity("tester")
    backup = [(e.key, e.value) for e in store.kv.list(store.prefix)]
    agent = RecordingAgent()
    rt = trusting(store, agent, tmp_path / "state" / "trust-web1.json")
    assert rt.run_pass() is True
    converges = len(agent.converged)

    wipe(store)
    with capture_logs() as logs:
        assert rt.run_pass(force=True) is False
        assert rt.run_pass(force=True) is False
    assert agent.removed == [] and agent.on_host == {"hello", "other"}
    untrusted = [e for e in logs if e["event"] == "store.untrusted"]
    assert len(untrusted) == 1  # once per change, not once per pass
    assert "has no identity record" in untrusted[0]["reason"]
    assert "has no identity record" in (held(store) or "")

    for key, value in backup:  # what `consul kv import` of a backup does
        store.kv.put(key, value)
    with capture_logs() as logs:
        assert rt.run_pass(force=True) is True
    assert "store.trusted" in [e["event"] for e in logs]
    assert held(store) is None
    assert agent.removed == []
    # A resync converges every app again, but nothing was redone for the outage itself.
    assert len(agent.converged) == converges + 2


def test_a_hold_survives_a_restart_against_another_empty_store(tmp_path: Path) -> None:
    first = open_store(f"sqlite://{tmp_path / 'first.db'}")
    put_app(first, "hello")
    first.ensure_identity("tester")
    agent = RecordingAgent()
    memory = tmp_path / "state" / "trust-web1.json"
    assert trusting(first, agent, memory).run_pass() is True

    other = open_store(f"sqlite://{tmp_path / 'other.db'}")  # a fresh store, as after a mistake
    other.ensure_identity("someone")
    restarted = trusting(other, agent, memory)
    assert restarted.run_pass(force=True) is False
    assert agent.removed == []
    reason = held(other) or ""
    assert "this host converged from store" in reason and "pp init --adopt" in reason

    # The operator declares the new store the successor: the agent goes on.
    identity = first.identity()
    assert identity is not None
    other.adopt(identity.id, "operator")
    unassign(other, NODE, [], "operator")  # and that the node is meant to be empty
    assert restarted.run_pass(force=True) is False  # held while a restore could be under way
    assert agent.removed == []
    settled(restarted)
    assert restarted.run_pass(force=True) is True
    assert agent.removed == ["hello"]


def test_a_node_whose_assignments_all_vanish_holds_while_other_nodes_keep_theirs(
    tmp_path: Path,
) -> None:
    store = open_store(f"sqlite://{tmp_path / 'intent.db'}")
    put_app(store, "hello")
    put_app(store, "other")
    put_app(store, "hello", node="web2")
    agent = RecordingAgent()
    rt = trusting(store, agent, tmp_path / "trust.json")
    assert rt.run_pass() is True
    store.delete(keys.node_app(NODE, "hello"))
    store.delete(keys.node_app(NODE, "other"))
    assert rt.run_pass(force=True) is False
    assert agent.removed == []
    assert "every assignment of web1 vanished at once" in (held(store) or "")
    unassign(store, NODE, [], "operator")  # `pp unassign --all web1`
    assert rt.run_pass(force=True) is False  # held while a restore could be under way
    settled(rt)
    assert rt.run_pass(force=True) is True
    assert sorted(agent.removed) == ["hello", "other"]


def test_a_restore_written_a_key_at_a_time_removes_nothing_it_has_not_written_yet(
    tmp_path: Path,
) -> None:
    store = open_store(f"sqlite://{tmp_path / 'intent.db'}")
    for app in ("a", "b", "c"):
        put_app(store, app)
    store.ensure_identity("tester")
    backup = [(e.key, e.value) for e in store.kv.list(store.prefix)]
    agent = RecordingAgent()
    rt = trusting(store, agent, tmp_path / "trust.json")
    assert rt.run_pass() is True
    wipe(store)
    assert rt.run_pass(force=True) is False

    for key, value in backup:  # `consul kv import`, with a pass between any two keys
        store.kv.put(key, value)
        rt.run_pass(force=True)
    assert agent.removed == []
    assert rt.run_pass(force=True) is True
    assert agent.on_host == {"a", "b", "c"}


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
    put_app(store, "slow")
    put_app(store, "fast")
    agent = Gated("slow")  # a long download or health gate
    options = RuntimeOptions(node=NODE, resync_interval_s=3600, max_parallel=2)
    rt = Runtime(agent, store, options)
    with looping(rt):
        assert eventually(lambda: ("fast", "1.0") in agent.converged)
        put_app(store, "fast", "2.0")  # new intent while "slow" is still converging
        assert eventually(lambda: ("fast", "2.0") in agent.converged)
        assert eventually(lambda: reported(store, "fast") == ("converged", "2.0", None))
        assert not any(app == "slow" for app, _ in agent.converged)
        agent.hold["slow"].set()
        assert eventually(lambda: store.reality(node=NODE, app="slow"))
        assert status_of(store, "slow") == ("converged", "1.0", None)


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


def hello_in_flight(store: IntentStore) -> tuple[Gated, Runtime]:
    """App hello assigned, and a looping runtime whose converge of it is held."""
    put_app(store, "hello")
    agent = Gated("hello")
    return agent, Runtime(agent, store, RuntimeOptions(node=NODE, resync_interval_s=3600))


def test_a_resync_asked_for_during_an_apps_converge_converges_it_again(
    store: IntentStore,
) -> None:
    agent, rt = hello_in_flight(store)
    with looping(rt):
        assert eventually(lambda: "hello" in agent.started)
        rt.request_resync()  # while the first converge is still in flight
        time.sleep(0.2)  # the loop has taken it: nothing may start beside the first
        assert agent.converged == []
        agent.hold["hello"].set()
        assert eventually(lambda: len(agent.converged) == 2), agent.converged


def test_new_intent_during_an_apps_converge_is_converged_right_after(
    store: IntentStore,
) -> None:
    agent, rt = hello_in_flight(store)
    with looping(rt):
        assert eventually(lambda: "hello" in agent.started)
        put_app(store, "hello", "2.0")
        put_app(store, "hello", "3.0")
        assert eventually(lambda: taken(rt, "hello") == "3.0")  # the loop read them both
        agent.hold["hello"].set()
        assert eventually(lambda: reported(store, "hello") == ("converged", "3.0", None))
    # The versions written meanwhile collapse into one converge of the latest.
    assert agent.converged == [("hello", "1.0"), ("hello", "3.0")]


def taken(rt: Runtime, app: str) -> str | None:
    """The active version of the latest intent the loop has read for ``app`` (a peek
    inside the runtime: nothing outside shows it before the converge)."""
    state = rt._state(app)
    intent = state.last_good if state is not None else None
    return intent.config.active_version if intent is not None and intent.config else None


class RaisingKV(SqliteStore):
    """A store whose listing raises what no store should (a hostile nested value)."""

    error: BaseException | None = None

    def list(self, prefix: str) -> list[Entry]:
        if self.error is not None:
            raise self.error
        return super().list(prefix)


def test_any_exception_reading_intent_fails_the_pass_and_holds_everything(
    tmp_path: Path,
) -> None:
    kv = RaisingKV(tmp_path / "intent.db")
    _, agent, rt = converged_on(kv)
    kv.error = RecursionError("maximum recursion depth exceeded")
    with capture_logs() as logs:
        for _ in range(3):
            assert rt.run_pass(force=True) is False
    failures = [e for e in logs if e["event"] == "intent.read_failed"]
    assert len(failures) == 1  # once per distinct error, not once per pass
    assert failures[0]["error"].startswith("RecursionError") and failures[0]["exc_info"]
    assert agent.removed == [] and agent.on_host == {"hello"}
    assert len(agent.converged) == 1
    kv.error = None
    assert rt.run_pass(force=True) is True


def test_the_loop_survives_a_failing_read_and_converges_once_it_reads_again(
    tmp_path: Path,
) -> None:
    kv = RaisingKV(tmp_path / "intent.db")
    store = IntentStore(kv)
    put_app(store, "hello")
    kv.error = ValueError("unexpected")
    agent = RecordingAgent()
    options = RuntimeOptions(node=NODE, resync_interval_s=3600, store_retry_max_s=0.5)
    rt = Runtime(agent, store, options)
    with looping(rt) as loop:
        time.sleep(0.3)
        assert loop.is_alive() and agent.converged == []
        kv.error = None
        assert eventually(lambda: agent.converged == [("hello", "1.0")]), agent.converged


def test_after_a_store_outage_the_agent_converges_what_changed_meanwhile(
    tmp_path: Path,
) -> None:
    kv = UnreachableKV(tmp_path / "intent.db")
    writer = IntentStore(SqliteStore(tmp_path / "intent.db"))  # the operator's own link
    put_app(writer, "hello")
    agent = RecordingAgent()
    options = RuntimeOptions(node=NODE, resync_interval_s=3600, store_retry_max_s=1)
    rt = Runtime(agent, IntentStore(kv), options)
    with looping(rt), capture_logs() as logs:
        assert eventually(lambda: agent.converged == [("hello", "1.0")])
        kv.down = True
        put_app(writer, "hello", "2.0")  # wakes the agent, which finds its store down
        assert eventually(lambda: "store.unreachable" in [e["event"] for e in logs])
        time.sleep(0.5)  # a few more probes fail
        kv.down = False
        assert eventually(lambda: reported(writer, "hello") == ("converged", "2.0", None))
    events = [e["event"] for e in logs]
    assert events.count("store.unreachable") == 1
    assert events[events.index("store.unreachable") :].count("store.reachable") == 1
    assert agent.removed == []


def test_a_report_lost_to_an_outage_is_written_when_the_store_returns(tmp_path: Path) -> None:
    class Outage(RecordingAgent):
        kv: UnreachableKV

        def converge(self, intent: AppIntent) -> Outcome:
            self.kv.down = True  # the store goes away while the app converges
            return super().converge(intent)

    kv = UnreachableKV(tmp_path / "intent.db")
    store = IntentStore(kv)
    put_app(store, "hello")
    agent = Outage()
    agent.kv = kv
    rt = runtime(store, agent)
    rt.run_pass()
    kv.down = False
    assert store.reality(node=NODE) == []
    rt.run_pass()  # nothing to converge, but the report is owed
    assert status_of(store, "hello") == ("converged", "1.0", None)
    assert len(agent.converged) == 1


def test_invalid_intent_is_reported_even_when_a_background_converge_ends_after(
    store: IntentStore,
) -> None:
    agent, rt = hello_in_flight(store)
    written: list[Reality] = []
    write = store.write_reality
    store.write_reality = lambda report: (written.append(report), write(report))[1]  # type: ignore[method-assign]
    with looping(rt):
        assert eventually(lambda: "hello" in agent.started)
        store.put_json(keys.config("hello", "prod"), {"versions": "broken"})
        assert eventually(lambda: written)
        before = len(written)
        agent.hold["hello"].set()  # the held converge ends after the error was seen
        assert eventually(lambda: len(written) > before)  # and its worker reported
        status, version, error = status_of(store, "hello")
    assert (status, version) == ("error", "1.0")
    assert error is not None and "clusters/hello/prod/config" in error


def test_a_stop_never_waits_long_for_a_converge_that_ignores_it(store: IntentStore) -> None:
    put_app(store, "stuck")
    agent = Gated("stuck")  # waits for its gate, not for the stop event
    options = RuntimeOptions(node=NODE, resync_interval_s=3600, stop_grace_s=0.2)
    rt = Runtime(agent, store, options)
    with looping(rt) as loop:
        assert eventually(lambda: "stuck" in agent.started)
        with capture_logs() as logs:
            rt.stop()
            loop.join(10)
        assert not loop.is_alive()
    (abandoned,) = [e for e in logs if e["event"] == "agent.stop_abandoned"]
    assert abandoned["apps"] == ["stuck"]


def test_the_stop_event_is_shared_with_the_agent(store: IntentStore) -> None:
    class Patient(RecordingAgent):
        converges_in_background = True
        stop = threading.Event()
        started = threading.Event()

        def converge(self, intent: AppIntent) -> Outcome:
            self.started.set()
            self.stop.wait(30)  # a long step that watches the stop event
            return super().converge(intent)

    put_app(store, "hello")
    agent = Patient()
    rt = Runtime(agent, store, RuntimeOptions(node=NODE, stop_grace_s=30), stop=agent.stop)
    with looping(rt) as loop, capture_logs() as logs:
        assert agent.started.wait(30)  # stopped in the middle of the step, not before it
        rt.stop()
        loop.join(10)
        assert not loop.is_alive()
    assert "agent.stop_abandoned" not in [e["event"] for e in logs]
    assert agent.converged == [("hello", "1.0")]  # its step ended, and it reported


def test_an_app_waiting_on_something_else_is_checked_soon_then_less_often(
    store: IntentStore,
) -> None:
    class Waiting(RecordingAgent):
        def converge(self, intent: AppIntent) -> Outcome:
            super().converge(intent)
            return Outcome.converging("waiting for the preparer to install hello 1.0")

    put_app(store, "hello")
    agent = Waiting()
    clock = Clock()
    rt = runtime(store, agent, clock)
    rt.run_pass()
    waits = []
    for _ in range(5):
        waited = 0.0
        while len(agent.converged) == len(waits) + 1:
            clock.now += 0.125  # exact in binary, so the sums are too
            waited += 0.125
            rt.run_pass()
        waits.append(waited)
    assert waits == [0.25, 0.5, 1.0, 2.0, 2.0]
    assert status_of(store, "hello")[0] == "converging"


@pytest.mark.parametrize("error", [StoreUnavailable("closed"), OSError("watch closed")])
def test_a_watch_cut_short_by_the_stop_is_no_outage_and_no_crash(
    tmp_path: Path, error: Exception
) -> None:
    """A stopping agent closes its store while the watch still waits on it: whatever that
    wait raises then is no news (it used to log an outage or a crash after the stop)."""
    stop = threading.Event()
    waiting = threading.Event()

    class Closing(SqliteStore):
        def wait_entries(self, prefixes, token, timeout):  # type: ignore[no-untyped-def]
            waiting.set()
            stop.wait(30)  # the store's close ends the wait
            raise error

    store = IntentStore(Closing(tmp_path / "intent.db"))
    put_app(store, "hello")
    agent = RecordingAgent()
    rt = Runtime(agent, store, RuntimeOptions(node=NODE, resync_interval_s=3600), stop=stop)
    earlier = set(threading.enumerate())  # earlier tests' watches end on their own time
    with capture_logs() as logs:
        with looping(rt):
            assert eventually(lambda: waiting.is_set() and agent.converged)
            (watch,) = [t for t in set(threading.enumerate()) - earlier if t.name == "intent-watch"]
        watch.join(10)
        assert not watch.is_alive()
    events = [e["event"] for e in logs]
    assert "agent.stopped" in events
    assert "store.unreachable" not in events and "watch.crashed" not in events, events
