"""Shared fixtures: a real Consul agent, and the intent-store backends side by side."""

from __future__ import annotations

import os
import time
import uuid
from collections.abc import Callable, Iterator
from pathlib import Path

import consul
import hypothesis
import pytest
from consul_agent import ConsulAgent, find_consul

from intent.store import KVStore
from intent.store.consul import ConsulStore
from intent.store.sqlite import SqliteStore

# Property tests check logic, not speed: a per-example deadline is a timing assertion
# that a busy machine fails (speed is measured under bench/).
hypothesis.settings.register_profile("platypus", deadline=None)
hypothesis.settings.load_profile("platypus")

BACKENDS = ["sqlite", pytest.param("consul", marks=pytest.mark.consul)]
SHORT_TTL_S = 0.3


def _missing(reason: str, require_var: str) -> None:
    """Skip locally; fail where the environment promises the dependency (CI)."""
    if os.environ.get(require_var) == "1":
        pytest.fail(f"{reason}, but {require_var}=1", pytrace=False)
    pytest.skip(reason)


@pytest.fixture(autouse=True)
def preparer_state_dir(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Path]:
    """pp-preparer keeps its locks in a system directory unless told otherwise: every
    preparer a test starts, in process or not, keeps them in a temp dir instead."""
    path = tmp_path_factory.mktemp("preparer-state")
    os.environ["PP_PREPARER_STATE_DIR"] = str(path)
    try:
        yield path
    finally:
        os.environ.pop("PP_PREPARER_STATE_DIR", None)


@pytest.fixture(autouse=True)
def agent_state_root(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Path]:
    """Each test's agents remember the store they trust in a directory of the test's
    own: one test's store is never another's."""
    root = tmp_path_factory.mktemp("agent-state")
    os.environ["PP_STATE_ROOT"] = str(root)
    try:
        yield root
    finally:
        os.environ.pop("PP_STATE_ROOT", None)


@pytest.fixture(scope="session")
def consul_bin() -> str:
    binary = find_consul()
    if binary is None:
        _missing(
            "no consul binary (set CONSUL_BIN, put consul on PATH or run scripts/install-consul)",
            "PP_REQUIRE_CONSUL",
        )
    assert binary is not None
    return binary


@pytest.fixture(scope="session")
def consul_addr(consul_bin: str, tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    """``127.0.0.1:<port>`` of a dev agent shared by the whole session; tests keep
    apart by writing under their own ``ns`` prefix."""
    agent = ConsulAgent(consul_bin, tmp_path_factory.mktemp("consul")).start()
    try:
        yield agent.http_addr
    finally:
        agent.stop()


@pytest.fixture
def ns() -> str:
    """A key prefix no other test uses."""
    return f"test-{uuid.uuid4().hex[:12]}/"


@pytest.fixture(params=BACKENDS)
def backend(request: pytest.FixtureRequest) -> str:
    return str(request.param)


@pytest.fixture
def store_factory(
    backend: str, request: pytest.FixtureRequest, tmp_path: Path
) -> Iterator[Callable[[], KVStore]]:
    """Opens another client of the same store: another connection for Consul,
    another handle on the same file for SQLite (as a second process would)."""
    opened: list[KVStore] = []
    if backend == "consul":
        host, port = request.getfixturevalue("consul_addr").split(":")

        def make() -> KVStore:
            return ConsulStore(host, int(port))
    else:
        path = tmp_path / "intent.db"

        def make() -> KVStore:
            return SqliteStore(path)

    def factory() -> KVStore:
        store = make()
        opened.append(store)
        return store

    yield factory
    for store in opened:
        store.close()


@pytest.fixture
def kv(store_factory: Callable[[], KVStore]) -> KVStore:
    return store_factory()


@pytest.fixture
def short_ttl_s() -> float:
    """A lease TTL short enough to wait out on SQLite (Consul raises it to 10 s)."""
    return SHORT_TTL_S


@pytest.fixture
def kill_lease_holder(backend: str, request: pytest.FixtureRequest) -> Callable[[str, str], None]:
    """Make a lease holder vanish as a crashed one would, without waiting out its TTL.

    SQLite: the test takes its lease with ``short_ttl_s`` and this waits it out.
    Consul: TTLs are 10 s at least and lapse after up to twice that, so this ends the
    holder's session the way Consul does when the TTL lapses; a separate Consul test
    lets a real TTL lapse."""
    if backend == "sqlite":

        def wait_out(resource: str, holder: str) -> None:
            time.sleep(SHORT_TTL_S * 2)

        return wait_out
    host, port = request.getfixturevalue("consul_addr").split(":")
    client = consul.Consul(host=host, port=int(port))

    def end_session(resource: str, holder: str) -> None:
        _, item = client.kv.get(resource + holder)
        assert item and item.get("Session"), f"{holder} holds no lease on {resource}"
        client.session.destroy(item["Session"])

    return end_session


def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    """Under xdist's ``--dist loadgroup`` (scripts/test), a module's tests stay on one
    worker, so its module fixtures (a runsvdir, a moto server) start once; the Docker
    modules share a worker, so one engine per run builds their images."""
    for item in items:
        module = item.nodeid.split("::", 1)[0]
        group = "docker" if Path(module).name.startswith("test_docker") else module
        item.add_marker(pytest.mark.xdist_group(group))
