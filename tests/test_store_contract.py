"""The store contract, run unchanged against the embedded store and a real Consul.

Every test takes ``kv`` (parametrised over both backends) and writes under its own
``ns`` prefix, so the Consul runs share one agent without seeing each other.
"""

from __future__ import annotations

import multiprocessing
import threading
import time
from collections.abc import Callable
from pathlib import Path

import pytest

from intent.model import Reality, Status
from intent.store import MUST_NOT_EXIST, IntentStore, KVStore
from intent.store.sqlite import SqliteStore

PROMPT_S = 1.5
"""A woken watcher must return well within this; its timeout is far longer."""
WATCH_TIMEOUT_S = 10.0

SHA = "ab" * 32


def _later(delay: float, action: Callable[[], object]) -> threading.Thread:
    def run() -> None:
        time.sleep(delay)
        action()

    thread = threading.Thread(target=run, daemon=True)
    thread.start()
    return thread


def _timed_wait(
    kv: KVStore, prefixes: list[str], token: tuple[int, ...], timeout: float
) -> tuple[tuple[int, ...], float]:
    start = time.monotonic()
    result = kv.wait(prefixes, token, timeout)
    return result, time.monotonic() - start


# -- get / put / list ------------------------------------------------------------------------


def test_get_returns_what_put_wrote_and_none_for_absent_keys(kv: KVStore, ns: str) -> None:
    assert kv.get(ns + "missing") is None
    for name, value in [("text", b'{"a": 1}'), ("binary", b"\x00\xff\x10"), ("empty", b"")]:
        assert kv.put(ns + name, value)
        entry = kv.get(ns + name)
        assert entry is not None
        assert (entry.key, entry.value) == (ns + name, value)


def test_list_returns_entries_under_prefix_sorted_by_key(kv: KVStore, ns: str) -> None:
    for key in ["b/2", "a", "b/1/deep", "c", "b/10"]:
        kv.put(ns + key, key.encode())
    kv.put(ns[:-1] + "-sibling/x", b"outside")

    assert [e.key for e in kv.list(ns)] == [ns + k for k in ["a", "b/1/deep", "b/10", "b/2", "c"]]
    assert [e.value for e in kv.list(ns + "b/")] == [b"b/1/deep", b"b/10", b"b/2"]
    assert kv.list(ns + "nothing/") == []


def test_list_of_node_prefix_excludes_node_names_that_merely_start_alike(
    kv: KVStore, ns: str
) -> None:
    kv.put(ns + "nodes/web1/app", b"1")
    kv.put(ns + "nodes/web10/x", b"10")
    kv.put(ns + "nodes/web1", b"bare")

    assert [e.key for e in kv.list(ns + "nodes/web1/")] == [ns + "nodes/web1/app"]


# -- versions and compare-and-set -------------------------------------------------------------


def test_every_write_of_a_new_value_changes_the_version(kv: KVStore, ns: str) -> None:
    key = ns + "k"
    seen = []
    for n in range(3):
        kv.put(key, f"value {n}".encode())
        entry = kv.get(key)
        assert entry is not None
        seen.append(entry.version)
    kv.delete(key)
    # Versions never repeat, even for a key deleted and written again with old bytes.
    kv.put(key, b"value 0")
    recreated = kv.get(key)
    assert recreated is not None
    seen.append(recreated.version)

    assert len(set(seen)) == len(seen)
    assert seen == sorted(seen)
    assert MUST_NOT_EXIST not in seen


def test_rewriting_the_same_bytes_never_moves_the_version_backwards(kv: KVStore, ns: str) -> None:
    # Consul keeps the version of an identical rewrite; SQLite bumps it. Both are fine
    # for compare-and-set, which only needs "unchanged value => CAS may succeed".
    key = ns + "k"
    kv.put(key, b"same")
    before = kv.get(key)
    kv.put(key, b"same")
    after = kv.get(key)
    assert before is not None and after is not None
    assert after.version >= before.version
    assert kv.put(key, b"next", expect=after.version)


def test_create_only_put_succeeds_once(kv: KVStore, ns: str) -> None:
    key = ns + "lock"
    assert kv.put(key, b"first", expect=MUST_NOT_EXIST)
    assert not kv.put(key, b"second", expect=MUST_NOT_EXIST)
    entry = kv.get(key)
    assert entry is not None and entry.value == b"first"


def test_cas_put_succeeds_at_current_version_and_fails_at_any_other(kv: KVStore, ns: str) -> None:
    key = ns + "k"
    kv.put(key, b"v1")
    v1 = kv.get(key)
    assert v1 is not None

    assert kv.put(key, b"v2", expect=v1.version)
    assert not kv.put(key, b"v3", expect=v1.version)
    assert not kv.put(ns + "absent", b"x", expect=v1.version)

    entry = kv.get(key)
    assert entry is not None and entry.value == b"v2"
    assert kv.get(ns + "absent") is None


def test_cas_delete_removes_only_at_the_expected_version(kv: KVStore, ns: str) -> None:
    key = ns + "k"
    kv.put(key, b"v")
    entry = kv.get(key)
    assert entry is not None

    assert not kv.delete(key, expect=entry.version + 1000)
    assert not kv.delete(key, expect=MUST_NOT_EXIST)
    assert kv.get(key) is not None
    assert kv.delete(key, expect=entry.version)
    assert kv.get(key) is None

    assert not kv.delete(key, expect=entry.version)
    assert kv.delete(key, expect=MUST_NOT_EXIST)
    assert kv.delete(key)


def test_racing_cas_writers_exactly_one_wins(store_factory: Callable[[], KVStore], ns: str) -> None:
    key = ns + "contended"
    first = store_factory()
    first.put(key, b"0")
    start = first.get(key)
    assert start is not None
    writers = [store_factory() for _ in range(6)]
    barrier = threading.Barrier(len(writers))
    results: list[bool] = []
    lock = threading.Lock()

    def write(store: KVStore, n: int) -> None:
        barrier.wait()
        won = store.put(key, f"writer {n}".encode(), expect=start.version)
        with lock:
            results.append(won)

    threads = [threading.Thread(target=write, args=(s, n)) for n, s in enumerate(writers)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=30)

    assert sorted(results) == [False] * 5 + [True]
    final = first.get(key)
    assert final is not None and final.value != b"0"


# -- wait -------------------------------------------------------------------------------------


def test_wait_without_token_returns_at_once(kv: KVStore, ns: str) -> None:
    start = time.monotonic()
    token = kv.wait([ns + "a/", ns + "b/"], None, WATCH_TIMEOUT_S)
    assert len(token) == 2
    assert time.monotonic() - start < PROMPT_S


def test_wait_wakes_promptly_when_a_key_under_the_prefix_changes(kv: KVStore, ns: str) -> None:
    prefix = ns + "nodes/web1/"
    token = kv.wait([prefix], None, 0)
    writer = _later(0.2, lambda: kv.put(prefix + "app", b"new"))

    new_token, elapsed = _timed_wait(kv, [prefix], token, WATCH_TIMEOUT_S)
    writer.join()

    assert new_token != token
    assert elapsed < PROMPT_S


def test_wait_wakes_on_a_change_deep_under_the_prefix(kv: KVStore, ns: str) -> None:
    kv.put(ns + "clusters/app/prod/config", b"1")
    token = kv.wait([ns + "clusters/"], None, 0)
    writer = _later(0.2, lambda: kv.put(ns + "clusters/app/prod/config", b"2"))

    new_token, elapsed = _timed_wait(kv, [ns + "clusters/"], token, WATCH_TIMEOUT_S)
    writer.join()

    assert new_token != token
    assert elapsed < PROMPT_S


def test_wait_wakes_when_a_key_under_the_prefix_is_deleted(kv: KVStore, ns: str) -> None:
    prefix = ns + "nodes/web1/"
    kv.put(prefix + "app", b"x")
    token = kv.wait([prefix], None, 0)
    writer = _later(0.2, lambda: kv.delete(prefix + "app"))

    new_token, elapsed = _timed_wait(kv, [prefix], token, WATCH_TIMEOUT_S)
    writer.join()

    assert new_token != token
    assert elapsed < PROMPT_S


def test_wait_times_out_with_the_same_token_when_nothing_changes(kv: KVStore, ns: str) -> None:
    prefix = ns + "quiet/"
    kv.put(prefix + "k", b"x")
    token = kv.wait([prefix], None, 0)

    new_token, elapsed = _timed_wait(kv, [prefix], token, 0.5)

    assert new_token == token
    assert 0.45 <= elapsed < 3.0


def test_wait_ignores_changes_under_an_unwatched_prefix(kv: KVStore, ns: str) -> None:
    watched, other = ns + "nodes/web1/", ns + "nodes/web2/"
    kv.put(watched + "app", b"x")
    kv.put(other + "app", b"x")
    token = kv.wait([watched], None, 0)
    writer = _later(0.1, lambda: kv.put(other + "app", b"changed"))

    new_token, elapsed = _timed_wait(kv, [watched], token, 0.8)
    writer.join()

    assert new_token == token
    assert elapsed >= 0.75


def test_wait_does_not_miss_a_change_made_between_calls(kv: KVStore, ns: str) -> None:
    prefix = ns + "p/"
    kv.put(prefix + "k", b"1")
    token = kv.wait([prefix], None, 0)
    kv.put(prefix + "k", b"2")

    new_token, elapsed = _timed_wait(kv, [prefix], token, WATCH_TIMEOUT_S)

    assert new_token != token
    assert elapsed < PROMPT_S


def test_wait_on_several_prefixes_wakes_for_any_and_reports_which(kv: KVStore, ns: str) -> None:
    first, second = ns + "nodes/web1/", ns + "clusters/"
    kv.put(first + "app", b"x")
    kv.put(second + "app/prod/config", b"x")
    token = kv.wait([first, second], None, 0)
    writer = _later(0.2, lambda: kv.put(second + "app/prod/config", b"y"))

    new_token, elapsed = _timed_wait(kv, [first, second], token, WATCH_TIMEOUT_S)
    writer.join()

    assert elapsed < PROMPT_S
    assert new_token[0] == token[0]
    assert new_token[1] != token[1]

    # The unchanged prefix keeps being watched with the token carried forward.
    writer = _later(0.2, lambda: kv.put(first + "app", b"y"))
    newer_token, elapsed = _timed_wait(kv, [first, second], new_token, WATCH_TIMEOUT_S)
    writer.join()
    assert elapsed < PROMPT_S
    assert newer_token[0] != new_token[0]
    assert newer_token[1] == new_token[1]


# -- closing ----------------------------------------------------------------------------------


def test_a_store_used_in_a_with_block_is_closed_at_its_end(
    store_factory: Callable[[], KVStore], ns: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    closed: list[KVStore] = []

    def watched() -> KVStore:
        store = store_factory()
        close = store.close

        def close_and_note() -> None:
            closed.append(store)
            close()

        monkeypatch.setattr(store, "close", close_and_note)
        return store

    kv = watched()
    with kv as entered:
        assert entered is kv and kv.put(ns + "k", b"v")
    assert closed == [kv]

    behind = watched()
    with pytest.raises(RuntimeError), IntentStore(behind, ns) as intents:
        assert intents.get_raw("k") is not None
        raise RuntimeError("a failure inside the block")
    assert closed == [kv, behind]


# -- leases -----------------------------------------------------------------------------------


def test_lease_holders_never_exceed_the_limit(kv: KVStore, ns: str) -> None:
    resource = ns + "leases/restart/"
    assert kv.acquire_lease(resource, "web1", 2, 30)
    assert kv.acquire_lease(resource, "web2", 2, 30)
    assert not kv.acquire_lease(resource, "web3", 2, 30)
    assert kv.lease_holders(resource) == ["web1", "web2"]


def test_a_holder_renews_its_own_lease(kv: KVStore, ns: str) -> None:
    resource = ns + "leases/restart/"
    assert kv.acquire_lease(resource, "web1", 1, 30)
    assert kv.acquire_lease(resource, "web1", 1, 30)
    assert not kv.acquire_lease(resource, "web2", 1, 30)
    assert kv.lease_holders(resource) == ["web1"]


def test_a_holder_keeps_its_lease_across_store_instances(
    store_factory: Callable[[], KVStore], ns: str
) -> None:
    # An agent that restarts opens a new store but is still the same holder.
    resource = ns + "leases/restart/"
    assert store_factory().acquire_lease(resource, "web1", 1, 30)
    again = store_factory()
    assert again.acquire_lease(resource, "web1", 1, 30)
    assert again.lease_holders(resource) == ["web1"]


def test_releasing_a_lease_frees_it_for_another_holder(kv: KVStore, ns: str) -> None:
    resource = ns + "leases/restart/"
    assert kv.acquire_lease(resource, "web1", 1, 30)
    kv.release_lease(resource, "web1")
    assert kv.lease_holders(resource) == []
    assert kv.acquire_lease(resource, "web2", 1, 30)
    assert kv.lease_holders(resource) == ["web2"]
    kv.release_lease(resource, "never-held")
    assert kv.lease_holders(resource) == ["web2"]


def test_a_dead_holders_lease_frees_itself(
    store_factory: Callable[[], KVStore],
    ns: str,
    short_ttl_s: float,
    kill_lease_holder: Callable[[str, str], None],
) -> None:
    resource = ns + "leases/restart/"
    doomed, survivor = store_factory(), store_factory()
    assert doomed.acquire_lease(resource, "web1", 1, short_ttl_s)
    assert not survivor.acquire_lease(resource, "web2", 1, short_ttl_s)

    kill_lease_holder(resource, "web1")

    assert survivor.lease_holders(resource) == []
    assert survivor.acquire_lease(resource, "web2", 1, 30)
    assert survivor.lease_holders(resource) == ["web2"]


def test_racing_acquirers_get_no_more_leases_than_the_limit(
    store_factory: Callable[[], KVStore], ns: str
) -> None:
    resource = ns + "leases/restart/"
    stores = [store_factory() for _ in range(6)]
    barrier = threading.Barrier(len(stores))
    won: list[str] = []
    lock = threading.Lock()

    def acquire(store: KVStore, holder: str) -> None:
        barrier.wait()
        if store.acquire_lease(resource, holder, 2, 30):
            with lock:
                won.append(holder)

    threads = [threading.Thread(target=acquire, args=(s, f"web{n}")) for n, s in enumerate(stores)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=60)

    assert len(won) == 2
    assert stores[0].lease_holders(resource) == sorted(won)


# -- the domain facade on top -----------------------------------------------------------------


def _intent(kv: KVStore, ns: str) -> IntentStore:
    return IntentStore(kv, ns + "platypus/")


def test_one_invalid_app_does_not_hide_the_others_on_a_node(kv: KVStore, ns: str) -> None:
    store = _intent(kv, ns)
    store.put_json("nodes/web1/good", {"cluster": "prod"})
    store.put_json(
        "clusters/good/prod/config",
        {"versions": {"1.0.0": {"state": "active", "sha256": SHA}}, "min_nodes": 1},
    )
    store.put_json("clusters/good/prod/deploy_config", {"basedir": "/srv/good"})
    kv.put(ns + "platypus/nodes/web1/garbled", b"{not json")
    store.put_json("nodes/web1/unconfigured", {"cluster": "prod"})
    store.put_json("nodes/web10/other", {"cluster": "prod"})

    intents = {i.app: i for i in store.apps_for_node("web1")}

    assert sorted(intents) == ["garbled", "good", "unconfigured"]
    good = intents["good"]
    assert good.valid and good.config is not None and good.deploy is not None
    assert good.config.active_version == "1.0.0"
    assert good.config.min_nodes == 1
    assert good.deploy.basedir == "/srv/good"
    assert not intents["garbled"].valid
    assert "nodes/web1/garbled" in (intents["garbled"].error or "")
    assert "clusters/unconfigured/prod/config: missing" in (intents["unconfigured"].error or "")


def test_write_reality_keeps_since_while_the_status_holds(kv: KVStore, ns: str) -> None:
    store = _intent(kv, ns)

    def report(status: Status, at: float, error: str | None = None) -> Reality:
        return Reality(
            node="web1",
            agent="preparer",
            app="hello",
            status=status,
            error=error,
            updated_at=at,
            since=at,
        )

    store.write_reality(report("error", 1000.0, "fetch failed"))
    store.write_reality(report("error", 1010.0, "checksum mismatch"))
    [kept] = store.reality(node="web1")
    assert (kept.since, kept.updated_at, kept.error) == (1000.0, 1010.0, "checksum mismatch")

    store.write_reality(report("converged", 1020.0))
    [changed] = store.reality(node="web1")
    assert (changed.status, changed.since) == ("converged", 1020.0)


def test_write_reality_skips_an_unchanged_report_until_the_heartbeat(kv: KVStore, ns: str) -> None:
    store = _intent(kv, ns)
    key = "reality/web1/preparer/hello"
    base = Reality(node="web1", agent="preparer", app="hello", status="converged", updated_at=1000)
    store.write_reality(base)
    first = store.get_raw(key)

    store.write_reality(base.model_copy(update={"updated_at": 1005.0}))
    assert store.get_raw(key) == first

    store.write_reality(base.model_copy(update={"updated_at": 1100.0}))
    later = store.get_raw(key)
    assert first is not None and later is not None and later.version != first.version


def test_write_reality_rewrites_a_repeat_that_was_removed_or_replaced_behind_its_back(
    kv: KVStore, ns: str
) -> None:
    """The store remembers what it wrote, so a changed report is written without a read;
    a repeat is still checked against the store, where someone else may have acted."""
    store, other = _intent(kv, ns), _intent(kv, ns)
    key = "reality/web1/preparer/hello"
    base = Reality(node="web1", agent="preparer", app="hello", status="converged", updated_at=1000)
    store.write_reality(base)

    other.clear_reality("web1", "preparer", "hello")
    store.write_reality(base.model_copy(update={"updated_at": 1001.0}))
    assert store.get_raw(key) is not None

    other.write_reality(base.model_copy(update={"status": "error", "error": "restored"}))
    store.write_reality(base.model_copy(update={"updated_at": 1002.0}))
    [now] = store.reality(node="web1")
    assert (now.status, now.error, now.updated_at) == ("converged", None, 1002.0)


# -- the embedded store shared between processes ----------------------------------------------


def _cas_increment(path: str, key: str, times: int) -> None:
    store = SqliteStore(path)
    try:
        for _ in range(times):
            while True:
                entry = store.get(key)
                assert entry is not None
                if store.put(key, str(int(entry.value) + 1).encode(), expect=entry.version):
                    break
    finally:
        store.close()


def test_sqlite_cas_increments_from_two_processes_lose_nothing(tmp_path: Path) -> None:
    path, key, times = str(tmp_path / "shared.db"), "counter", 200
    store = SqliteStore(path)
    store.put(key, b"0")
    ctx = multiprocessing.get_context("spawn")
    workers = [ctx.Process(target=_cas_increment, args=(path, key, times)) for _ in range(2)]
    for w in workers:
        w.start()
    for w in workers:
        w.join(timeout=120)

    assert [w.exitcode for w in workers] == [0, 0]
    entry = store.get(key)
    assert entry is not None and int(entry.value) == 2 * times
    store.close()


def test_a_second_sqlite_handle_on_the_same_file_sees_writes(tmp_path: Path) -> None:
    writer, reader = SqliteStore(tmp_path / "s.db"), SqliteStore(tmp_path / "s.db")
    token = reader.wait(["k/"], None, 0)
    writer.put("k/1", b"hello")

    assert reader.wait(["k/"], token, WATCH_TIMEOUT_S) != token
    entry = reader.get("k/1")
    assert entry is not None and entry.value == b"hello"
    writer.close()
    reader.close()


# -- Consul only: a TTL that really lapses -----------------------------------------------------


@pytest.mark.consul
def test_consul_lease_expires_without_renewal_and_stays_while_renewed(
    consul_addr: str, ns: str
) -> None:
    from intent.store.consul import ConsulStore

    host, port = consul_addr.split(":")
    renewing, silent = ConsulStore(host, int(port)), ConsulStore(host, int(port))
    resource = ns + "leases/restart/"
    try:
        assert renewing.acquire_lease(resource, "alive", 2, 10)
        assert silent.acquire_lease(resource, "silent", 2, 10)
        start = time.monotonic()
        # Consul lapses a session between its TTL and twice that.
        while "silent" in renewing.lease_holders(resource) and time.monotonic() - start < 35:
            assert renewing.acquire_lease(resource, "alive", 2, 10)
            time.sleep(1)
        elapsed = time.monotonic() - start
        assert renewing.lease_holders(resource) == ["alive"]
        assert elapsed >= 9
    finally:
        renewing.close()
        silent.close()
