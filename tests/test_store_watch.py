"""The stores' watches beyond the shared contract: what Consul's blocking queries bring
with a wake-up, how many connections they hold, and that what a node's watch saw is
never used once the watch has failed."""

from __future__ import annotations

import subprocess
import sys
import threading
import time
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any

import pytest
from consul_agent import ConsulAgent

from intent import keys
from intent.errors import StoreUnavailable
from intent.store import IntentStore, sqlite
from intent.store.consul import ConsulStore
from intent.store.sqlite import SqliteStore

SHA = "ab" * 32


def consul_store(address: str, **options: Any) -> ConsulStore:
    host, port = address.split(":")
    return ConsulStore(host, int(port), **options)


class PeakBlockingQueries:
    """The most blocking queries a store had open at once (counted around each send)."""

    def __init__(self, kv: ConsulStore) -> None:
        self.open = self.peak = 0
        self._lock = threading.Lock()
        pool = kv._client.http.pool
        send = pool.request

        def counted(method: str, url: str, *args: Any, **kwargs: Any) -> Any:
            blocking = "index=" in url
            if blocking:
                with self._lock:
                    self.open += 1
                    self.peak = max(self.peak, self.open)
            try:
                return send(method, url, *args, **kwargs)
            finally:
                if blocking:
                    with self._lock:
                        self.open -= 1

        pool.request = counted


@pytest.mark.consul
def test_a_watch_on_more_prefixes_than_connections_takes_turns_and_sees_each_change(
    consul_addr: str, ns: str
) -> None:
    kv = consul_store(consul_addr, watch_connections=2, shared_wait_s=0.3)
    peak = PeakBlockingQueries(kv)
    prefixes = [f"{ns}p{n}/" for n in range(6)]
    for prefix in prefixes:  # Consul wakes the watch of an empty prefix on any write
        kv.put(prefix + "seed", b"")
    token = kv.wait(prefixes, None, 0)
    for changed in (5, 0, 3):
        threading.Timer(0.5, lambda n=changed: kv.put(f"{ns}p{n}/k", b"x")).start()
        started = time.monotonic()
        new = kv.wait(prefixes, token, 20)
        assert [a != b for a, b in zip(new, token, strict=True)] == [n == changed for n in range(6)]
        # Six prefixes on two connections, 0.3 s each: every one is asked within ~1 s.
        assert time.monotonic() - started < 10
        token = new
    assert peak.peak <= 2
    kv.close()


@pytest.mark.consul
def test_a_consul_wake_up_brings_the_changed_values(consul_addr: str, ns: str) -> None:
    with consul_store(consul_addr) as kv:
        kv.put(ns + "a/old", b"1")
        token, everything = kv.wait_entries([ns + "a/", ns + "b/"], None, 0)
        assert everything == {ns + "a/": kv.list(ns + "a/"), ns + "b/": []}

        threading.Timer(0.3, lambda: kv.put(ns + "b/new", b"2")).start()
        new, woken = kv.wait_entries([ns + "a/", ns + "b/"], token, 10)

        assert new[0] == token[0] and new[1] != token[1]
        assert woken == {ns + "b/": kv.list(ns + "b/")}
        assert [e.value for e in woken[ns + "b/"]] == [b"2"]


@pytest.fixture
def own_consul(consul_bin: str, tmp_path: Path) -> Iterator[ConsulAgent]:
    agent = ConsulAgent(consul_bin, tmp_path).start()
    try:
        yield agent
    finally:
        agent.stop()


@pytest.mark.consul
def test_passes_read_what_the_watch_saw_only_while_it_answers(own_consul: ConsulAgent) -> None:
    store = IntentStore(consul_store(own_consul.http_addr))
    store.ensure_identity("test")
    store.put_json(keys.node_app("web1", "hello"), {"cluster": "c"})
    store.put_json(
        keys.config("hello", "c"), {"versions": {"1": {"state": "active", "sha256": SHA}}}
    )
    store.put_json(keys.deploy_config("hello", "c"), {"basedir": "/srv/hello"})
    store.watch_node("web1", None, 0)
    (intent,) = store.apps_for_node("web1", fresh=False)
    assert intent.valid

    own_consul.stop()
    with pytest.raises(StoreUnavailable):
        store.watch_node("web1", None, 0)
    # Nothing seen before the failure stands in for the store now.
    with pytest.raises(StoreUnavailable):
        store.apps_for_node("web1", fresh=False)
    store.close()


# -- the embedded store -----------------------------------------------------------------------


def write_from_another_process(path: Path, key: str) -> None:
    subprocess.run(
        [sys.executable, "-c", WRITE_ONE, str(path), key], check=True, cwd=REPO, timeout=60
    )


WRITE_ONE = (
    "import sys; from intent.store.sqlite import SqliteStore; "
    "SqliteStore(sys.argv[1]).put(sys.argv[2], b'1')"
)
REPO = Path(__file__).resolve().parent.parent


def test_an_embedded_watch_is_woken_by_the_kernel_when_another_process_writes(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    # With its safety look pushed past the wait's timeout, only the write's own
    # notification can end the wait with a new token.
    monkeypatch.setattr(sqlite, "SAFETY_LOOK_S", 600.0)
    path = tmp_path / "intent.db"
    with SqliteStore(path) as kv:
        for round_ in range(3):
            token = kv.wait(["k/"], None, 0)
            writer = threading.Timer(0.3, write_from_another_process, (path, f"k/{round_}"))
            writer.start()
            assert kv.wait(["k/"], token, 30) != token
            writer.join()


def test_an_idle_embedded_watch_looks_at_the_database_about_once_a_second(
    tmp_path: Path,
) -> None:
    with SqliteStore(tmp_path / "intent.db") as kv:
        looks = 0
        token_of = kv._token

        def counted(prefixes: Sequence[str]) -> tuple[int, ...]:
            nonlocal looks
            looks += 1
            return token_of(prefixes)

        kv._token = counted  # type: ignore[method-assign]
        token = kv.wait(["k/"], None, 0)
        looks = 0
        assert kv.wait(["k/"], token, 3.0) == token
        # A 50 ms poll would have looked 60 times.
        assert looks <= 3 / sqlite.SAFETY_LOOK_S + 2
