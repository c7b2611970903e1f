"""Absence is not intent, proved with real parts on both stores.

Two hosts' agents run as daemons (pp-preparer, pp-setlive under private runsvdirs,
pp-iptables with its iptables in a network namespace of the test) against intent
written with ``pp``; the apps serve HTTP all along (tests/failsafe_support.py). Then
the store is wiped, replaced, emptied or moved under them, and each test checks that
nothing on the hosts changed (same process, install, service link and rules; no
request failed) and that the agents say why they hold (log, ``agents/`` records,
``pp status``, ``--once`` exit code) until the intent is back, when they go on with
no restart of any app. Only intent an operator wrote with ``pp`` removes anything.

The tests share one world per store while it stays as the next test needs it
(``Worlds.use``); a test that fails, or needs more than is left, gets a new one.
"""

from __future__ import annotations

import contextlib
import os
import time
from collections.abc import Callable, Iterator

import pytest
from consul_agent import ConsulAgent
from failsafe_support import (
    RESYNC_S,
    Backend,
    ConsulBackend,
    Host,
    SqliteBackend,
    StoreRef,
    World,
    build_world,
    copy_database,
    parse_events,
    path_of,
)
from fault_support import Prober, answer, wait_until
from netns_support import require_netns
from runit_support import require_root, require_runit

from intent import keys

pytestmark = pytest.mark.root

BACKENDS = ["sqlite", pytest.param("consul", marks=pytest.mark.consul)]


class Worlds:
    """One backend's world, handed from test to test while it is as they need it."""

    def __init__(self, kind: str, make: Callable[[], World]) -> None:
        self.kind = kind
        self._make = make
        self._current: World | None = None

    @contextlib.contextmanager
    def use(self, n1_apps: int = 2) -> Iterator[World]:
        """A converged world whose n1 runs at least ``n1_apps`` apps. If the test
        raises, the world is not handed on."""
        world = self._current
        if world is None or not self._usable(world, n1_apps):
            if world is not None:
                world.close()
            self._current = None
            world = self._current = self._make()
        world.reusable = False
        for host in world.hosts.values():
            host.mark()  # each test counts what the agents say during it
        yield world
        world.reusable = True

    @staticmethod
    def _usable(world: World, n1_apps: int) -> bool:
        return (
            world.reusable
            and len(world.running["n1"]) >= n1_apps
            and all(host.alive() for host in world.hosts.values())
            and world.all_converged()
        )

    def close(self) -> None:
        if self._current is not None:
            self._current.close()


@pytest.fixture(scope="module")
def real_parts() -> None:
    require_root()
    require_runit()
    require_netns()


@pytest.fixture(scope="module", params=BACKENDS)
def worlds(
    request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory, real_parts: None
) -> Iterator[Worlds]:
    root = tmp_path_factory.mktemp(f"failsafe-{request.param}")
    second: list[ConsulAgent] = []
    backend: Backend
    if request.param == "sqlite":
        backend = SqliteBackend(root)
    else:
        binary = request.getfixturevalue("consul_bin")

        def second_agent() -> str:
            if not second:
                second.append(ConsulAgent(binary, root).start())
            return second[0].http_addr

        backend = ConsulBackend(binary, request.getfixturevalue("consul_addr"), second_agent, root)
    built = 0

    def make() -> World:
        nonlocal built
        built += 1
        return build_world(backend, root / f"world-{built}")

    holder = Worlds(backend.kind, make)
    try:
        yield holder
    finally:
        holder.close()
        backend.close()
        for agent in second:
            agent.stop()


# -- checks every test makes ----------------------------------------------------------------


@contextlib.contextmanager
def probing(world: World, only: str | None = None) -> Iterator[Prober]:
    """Ask every running app (of host ``only``, if given) ``GET /`` all along; assert
    none ever failed."""
    running = {node: apps for node, apps in world.running.items() if only in (None, node)}
    ports = {app: world.ports[app] for apps in running.values() for app in apps}
    prober = Prober(ports, interval_s=0.1)
    prober.start()
    try:
        yield prober
    finally:
        prober.finish()
    failed = {
        app: f"{len(bad)} failed, the first: {bad[0].error}"
        for app in ports
        if (bad := prober.failed(app))
    }
    assert failed == {}, f"requests failed: {failed}"
    assert all(prober.answers[app] for app in ports)


def holds(world: World, hosts: list[Host], store: StoreRef, because: str) -> None:
    """Every agent of ``hosts`` logged once that it holds, recorded it in ``store`` and
    ``pp status`` shows it; ``because`` is in every reason."""
    agents = [(host, agent) for host in hosts for agent in host.agents]
    assert wait_until(lambda: all(h.events(a, "store.untrusted") for h, a in agents), 30, 0.1), (
        world.describe(store)
    )
    for host, agent in agents:
        (event,) = host.events(agent, "store.untrusted")
        assert because in event["reason"], event
    wanted = {(host.name, agent) for host, agent in agents}

    def recorded() -> bool:
        statuses = {(s.node, s.agent): s for s in store.statuses() if s.state == "held"}
        return set(statuses) >= wanted and all(
            because in (statuses[key].reason or "") for key in wanted
        )

    assert wait_until(recorded, 30, 0.1), store.statuses()
    held = world.held(store)
    assert set(held) >= wanted, held
    assert all(because in held[key] for key in wanted), held


def resumed(world: World, store: StoreRef) -> None:
    """Every agent logged ``store.trusted`` once and every app is converged again; no
    agent said the same reason to hold twice. (A restore written a key at a time can
    bring the identity back before the node's assignments: for that moment the node's
    assignments have all vanished, another reason, said once too.)"""
    assert wait_until(lambda: all(world.logged("store.trusted").values()), 30, 0.1), world.describe(
        store
    )
    assert wait_until(lambda: world.all_converged(store), 30, 0.2), world.describe(store)
    assert set(world.logged("store.trusted").values()) == {1}
    for host, agent in world.agents():
        reasons = [e["reason"] for e in host.events(agent, "store.untrusted")]
        assert reasons and len(set(reasons)) == len(reasons), (host.name, agent, reasons)
    assert world.held(store) == {}


def once_holds(host: Host, store: StoreRef, because: str) -> None:
    """``--once`` against ``store``: exit 1, one ``store.untrusted``, nothing done."""
    for agent, done in host.once(store).items():
        events = parse_events(done.stderr)
        names = [e["event"] for e in events]
        assert done.returncode == 1, (agent, done.returncode, done.stderr[-2000:])
        assert names.count("store.untrusted") == 1, (agent, names)
        assert because in next(e for e in events if e["event"] == "store.untrusted")["reason"]
        acted = [n for n in names if n.startswith(("converge.", "remove.", "iptables.applied"))]
        assert acted == [], (agent, acted)


def settle() -> None:
    """Let the held agents make another pass or two: they must neither act nor say it
    again."""
    time.sleep(1.5 * RESYNC_S)


# -- 1 and 3: wiped under running agents, then restored ------------------------------------


def test_a_wiped_store_changes_nothing_on_the_hosts_and_its_restore_resumes_them(
    worlds: Worlds,
) -> None:
    with worlds.use() as w:
        before = w.state()
        identity = w.store.identity()
        assert identity is not None
        backup = w.backend.backup(w.store)
        with probing(w):
            w.backend.wipe(w.store)
            holds(w, list(w.hosts.values()), w.store, f"no identity record, but this host "
                  f"converged from store {identity}")  # fmt: skip
            assert w.state() == before

            # A restarted agent remembers the store it trusted: it holds again, and
            # --once says so with its exit code.
            n1 = w.hosts["n1"]
            n1.stop()
            once_holds(n1, w.store, "no identity record")
            n1.start(w.store)
            holds(w, [n1], w.store, "no identity record")
            settle()
            assert w.state() == before

            # The restore is written a key at a time, as consul kv import writes it: while
            # one app's assignment is not back yet, that app is not unassigned.
            late = w.store.prefix + keys.node_app("n1", "beta")
            w.backend.restore(w.store, [(k, v) for k, v in backup if k != late])
            time.sleep(0.5)  # the agents read it (they wait 2 s for the rest)
            w.backend.restore(w.store, [(k, v) for k, v in backup if k == late])
            resumed(w, w.store)
        assert w.state() == before


# -- 2: restarted against an empty store ---------------------------------------------------


def second_consul(w: World) -> tuple[StoreRef, Callable[[], None]]:
    """Another Consul agent, empty (a dev agent restarted, the wrong datacenter);
    the intent is copied into it afterwards with consul kv export and import."""
    empty = w.backend.fresh(w.store)
    backup = w.backend.backup(w.store)
    return empty, lambda: w.backend.restore(empty, backup)


def fresh_file(w: World) -> tuple[StoreRef, Callable[[], None]]:
    """A new, empty database file (a mistyped --store); the intent is copied into
    it afterwards with SQLite's online backup, under the running agents."""
    empty = w.backend.fresh(w.store)
    original = path_of(w.store)
    return empty, lambda: copy_database(original, path_of(empty))


def replaced_file(w: World) -> tuple[StoreRef, Callable[[], None]]:
    """The database file replaced by an empty one (a reprovisioned disk); the saved
    copy is put back with SQLite's online backup, under the running agents."""
    path = path_of(w.store)
    saved = path.with_name(path.name + ".saved")
    copy_database(path, saved)
    blank = w.backend.fresh(w.store)
    for leftover in (path.with_name(path.name + "-wal"), path.with_name(path.name + "-shm")):
        leftover.unlink(missing_ok=True)
    os.replace(path_of(blank), path)
    return w.store, lambda: copy_database(saved, path)


EMPTY_STORES = {"consul": [second_consul], "sqlite": [fresh_file, replaced_file]}


def test_agents_restarted_against_an_empty_store_hold_until_the_intent_is_copied_in(
    worlds: Worlds,
) -> None:
    for empty_store in EMPTY_STORES[worlds.kind]:
        with worlds.use() as w:
            before = w.state()
            identity = w.store.identity()
            with probing(w):
                w.stop()
                empty, copy_intent = empty_store(w)
                because = f"no identity record, but this host converged from store {identity}"
                once_holds(w.hosts["n1"], empty, because)
                w.start(empty)
                holds(w, list(w.hosts.values()), empty, because)
                settle()
                assert w.state() == before, empty_store.__name__

                copy_intent()
                w.store = empty
                resumed(w, empty)
            assert w.state() == before, empty_store.__name__


# -- 6: a new store on purpose ------------------------------------------------------------


def test_a_new_store_written_afresh_holds_until_it_adopts_the_old_identity(
    worlds: Worlds,
) -> None:
    with worlds.use() as w:
        before = w.state()
        old = w.store.identity()
        new = w.backend.fresh(w.store)
        w.apply_all(store=new)  # the intent written afresh: a store of its own
        assert new.identity() not in (None, old)
        with probing(w):
            w.stop()
            w.start(new)
            holds(w, list(w.hosts.values()), new, f"pp init --adopt {old}")
            settle()
            assert w.state() == before

            # The operator takes the id from the HELD line, as the docs say.
            line = next(iter(w.held(new).values()))
            adopt = line[line.index("pp init --adopt ") :].split()[3]
            output = w.pp("init", "--adopt", adopt, store=new)
            assert f"adopts {old}" in output
            w.store = new
            resumed(w, new)
        assert w.state() == before


# -- 5 and 4: what pp unassign removes ------------------------------------------------------


def test_unassigning_one_app_of_two_removes_it_and_leaves_the_other_running(
    worlds: Worlds,
) -> None:
    with worlds.use(n1_apps=2) as w:
        n1 = w.hosts["n1"]
        keep, drop = sorted(w.running["n1"])[:2]
        before = w.state()
        w.pp("unassign", drop, "n1")
        w.running["n1"].discard(drop)
        assert wait_until(lambda: gone(w, n1, drop), 30, 0.1), w.describe()
        assert w.state() == {app: s for app, s in before.items() if app != drop}
        assert answer(w.ports[keep]) == w.active[keep]
        assert set(w.logged("store.untrusted").values()) == {0}
        with w.store.opened() as store:
            assert not store.is_emptied("n1")


def gone(w: World, host: Host, app: str) -> bool:
    """Nothing left of ``app`` on ``host`` but its installs (kept for a redeploy)."""
    reports = [r for r in w.store.reports(host.name) if r.app == app]
    return (
        not host.linked(app)
        and host.pid(app) is None
        and answer(w.ports[app]) is None
        and host.rules(app) == []
        and reports == []
    )


def test_a_node_whose_assignments_all_vanish_holds_until_it_is_emptied_on_purpose(
    worlds: Worlds,
) -> None:
    with worlds.use(n1_apps=1) as w:
        n1, n2 = w.hosts["n1"], w.hosts["n2"]
        apps = sorted(w.running["n1"])
        before = w.state()
        with probing(w, only="n1"):  # n2's app switches to its new version meanwhile
            # A script deletes the node's keys by hand: no record that it is meant to be empty.
            w.backend.delete_tree(w.store, keys.node_apps("n1"))
            holds(w, [n1], w.store, "every assignment of n1 vanished at once")
            # The other node is not held: a deploy there goes live.
            w.publish("gamma", "2")
            w.pp("deploy", "gamma", "2", "-c", "c", "--sha256", w.shas[("gamma", "2")])
            w.active["gamma"] = "2"
            assert wait_until(lambda: w.converged("gamma"), 60, 0.2), w.describe()
            assert all(not n2.events(agent, "store.untrusted") for agent in n2.agents)
            assert set(w.held()) == {("n1", agent) for agent in n1.agents}
            assert {app: w.state()[app] for app in apps} == {app: before[app] for app in apps}

        assert "n1: runs nothing" in w.pp("unassign", "--all", "n1")
        w.running["n1"] = set()
        assert wait_until(lambda: all(gone(w, n1, app) for app in apps), 30, 0.1), w.describe()
        assert all(n1.events(agent, "store.trusted") for agent in n1.agents)
        assert w.held() == {}
