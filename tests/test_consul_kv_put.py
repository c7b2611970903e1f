"""Intent written with the stock ``consul kv put`` reads back as the model says.

Operators may skip ``pp`` and write keys with Consul's own CLI, as docs/intent.md
shows; these tests run exactly those commands against a real agent.
"""

from __future__ import annotations

import os
import re
import subprocess
from collections.abc import Iterator
from pathlib import Path

import pytest
import urllib3

from intent.store import IntentStore, StoreError, StoreUnavailable, open_store
from intent.store.consul import ConsulStore

SHA = "0123456789abcdef" * 4


class ConsulCli:
    """Runs ``consul <args>`` as an operator would, with ``CONSUL_HTTP_ADDR`` set."""

    def __init__(self, binary: str, addr: str, cwd: Path) -> None:
        self.binary, self.cwd = binary, cwd
        self.env = {**os.environ, "CONSUL_HTTP_ADDR": addr}
        self.env.pop("CONSUL_HTTP_TOKEN", None)

    def run(self, *args: str) -> subprocess.CompletedProcess[str]:
        return subprocess.run(
            [self.binary, *args],
            capture_output=True,
            text=True,
            timeout=30,
            env=self.env,
            cwd=self.cwd,
        )

    def __call__(self, *args: str) -> str:
        done = self.run(*args)
        assert done.returncode == 0, done.stderr
        return done.stdout


@pytest.fixture
def cli(consul_bin: str, consul_addr: str, tmp_path: Path) -> Iterator[ConsulCli]:
    run = ConsulCli(consul_bin, consul_addr, tmp_path)
    run("kv", "delete", "-recurse", "platypus/")
    yield run
    run("kv", "delete", "-recurse", "platypus/")


@pytest.fixture
def store(consul_addr: str) -> Iterator[IntentStore]:
    opened = open_store(f"consul://{consul_addr}")
    yield opened
    opened.close()


DEPLOY_CONFIG = (
    '{"basedir":"/srv/hello","run_as":"hello",'
    '"ports":[{"name":"http","port":8080,"public_port":80}],'
    '"health_check":{"type":"http","port":8080,"path":"/health"}}'
)
CONFIG = (
    '{"versions":{"1.0.0":{"state":"active","sha256":"' + SHA + '",'
    '"url":"https://artifacts.example/hello-1.0.0.tar.gz"}},'
    '"min_nodes":1,"user_config":{"greeting":"hi"}}'
)


def _write_hello(cli: ConsulCli) -> None:
    """The commands of docs/intent.md, "Writing intent with the stock Consul CLI"."""
    cli("kv", "put", "platypus/clusters/hello/production/deploy_config", DEPLOY_CONFIG)
    cli("kv", "put", "platypus/clusters/hello/production/config", CONFIG)
    cli("kv", "put", "platypus/nodes/web1/hello", '{"cluster":"production"}')
    cli("kv", "put", "platypus/nodes/web2/hello", '{"cluster":"production"}')


@pytest.mark.consul
def test_intent_written_with_consul_kv_put_parses_into_the_model(
    cli: ConsulCli, store: IntentStore
) -> None:
    _write_hello(cli)

    [hello] = store.apps_for_node("web1")

    assert hello.error is None and hello.valid
    assert (hello.app, hello.cluster) == ("hello", "production")
    assert hello.config is not None and hello.deploy is not None
    assert hello.config.active_version == "1.0.0"
    assert hello.config.versions["1.0.0"].sha256 == SHA
    assert hello.config.versions["1.0.0"].url == "https://artifacts.example/hello-1.0.0.tar.gz"
    assert hello.config.min_nodes == 1
    assert hello.config.user_config == {"greeting": "hi"}
    assert hello.deploy.basedir == "/srv/hello"
    assert hello.deploy.run_as == "hello"
    assert [(p.name, p.port, p.protocol, p.public_port) for p in hello.deploy.ports] == [
        ("http", 8080, "tcp", 80)
    ]
    assert hello.deploy.health_check is not None
    assert hello.deploy.health_check.path == "/health"
    assert store.nodes_of("hello") == {"web1": "production", "web2": "production"}


@pytest.mark.consul
def test_a_value_put_from_a_file_and_a_kv_delete_are_seen(
    cli: ConsulCli, store: IntentStore
) -> None:
    _write_hello(cli)
    (cli.cwd / "config.json").write_text(CONFIG.replace('"min_nodes":1', '"min_nodes":2'))

    cli("kv", "put", "platypus/clusters/hello/production/config", "@config.json")
    cli("kv", "delete", "platypus/nodes/web2/hello")

    [hello] = store.apps_for_node("web1")
    assert hello.config is not None and hello.config.min_nodes == 2
    assert store.apps_for_node("web2") == []


@pytest.mark.consul
def test_consul_cas_put_uses_the_same_version_the_store_reports(
    cli: ConsulCli, store: IntentStore
) -> None:
    _write_hello(cli)
    key = "platypus/clusters/hello/production/config"
    detailed = cli("kv", "get", "-detailed", key)
    found = re.search(r"^ModifyIndex\s+(\d+)$", detailed, re.MULTILINE)
    assert found, detailed
    modify_index = int(found.group(1))
    raw = store.get_raw("clusters/hello/production/config")
    assert raw is not None and raw.version == modify_index

    # Someone else changes the value in between: the -cas write must fail.
    store.put_json("clusters/hello/production/config", {"min_nodes": 3})
    stale = cli.run("kv", "put", "-cas", f"-modify-index={modify_index}", key, CONFIG)
    assert stale.returncode != 0

    current = store.get_raw("clusters/hello/production/config")
    assert current is not None
    cli("kv", "put", "-cas", f"-modify-index={current.version}", key, CONFIG)
    [hello] = store.apps_for_node("web1")
    assert hello.config is not None and hello.config.min_nodes == 1


@pytest.mark.consul
def test_a_bad_value_written_with_kv_put_is_an_error_naming_its_key(
    cli: ConsulCli, store: IntentStore
) -> None:
    _write_hello(cli)
    cli("kv", "put", "platypus/nodes/web1/broken", '{"cluster":"production"}')
    # The original platypus's format: a bare state string per version.
    cli("kv", "put", "platypus/clusters/broken/production/config", '{"versions":{"1.0":"active"}}')
    cli("kv", "put", "platypus/clusters/broken/production/deploy_config", '{"basedir":"/srv/b"}')
    cli("kv", "put", "platypus/nodes/web1/typo", '{"clustr":"production"}')

    intents = {i.app: i for i in store.apps_for_node("web1")}

    assert intents["hello"].valid
    assert intents["broken"].error is not None
    assert intents["broken"].error.startswith("clusters/broken/production/config: versions.1.0")
    assert intents["typo"].error is not None
    assert intents["typo"].error.startswith("nodes/web1/typo: ")
    assert "\n" not in intents["broken"].error + intents["typo"].error


@pytest.mark.consul
def test_a_bare_consul_url_takes_the_address_from_consul_http_addr(
    cli: ConsulCli, consul_addr: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    _write_hello(cli)
    monkeypatch.setenv("CONSUL_HTTP_ADDR", f"http://{consul_addr}")

    store = open_store("consul://")
    try:
        assert [i.app for i in store.apps_for_node("web1")] == ["hello"]
    finally:
        store.close()


@pytest.mark.consul
def test_an_unreachable_consul_is_one_line_store_unavailable(consul_addr: str) -> None:
    from consul_agent import free_port

    store = ConsulStore("127.0.0.1", free_port(), timeout=2)
    with pytest.raises(StoreUnavailable) as caught:
        store.get("platypus/nodes/web1/hello")
    message = str(caught.value)
    assert "unreachable" in message and "\n" not in message
    # The one line for users; the cause kept for whoever debugs with the traceback.
    assert isinstance(caught.value.__cause__, urllib3.exceptions.NewConnectionError)
    with pytest.raises(StoreUnavailable):
        store.wait(["platypus/nodes/web1/"], (5,), 1)


@pytest.mark.consul
def test_tls_against_a_plain_http_agent_is_one_line_store_unavailable(consul_addr: str) -> None:
    store = open_store(f"consul+https://{consul_addr}")
    with pytest.raises(StoreUnavailable) as caught:
        store.apps_for_node("web1")
    message = str(caught.value)
    assert "TLS" in message and "CONSUL_CACERT" in message and "\n" not in message
    store.close()


@pytest.mark.consul
def test_an_acl_denial_is_a_store_error_naming_the_token(
    consul_bin: str, tmp_path_factory: pytest.TempPathFactory, monkeypatch: pytest.MonkeyPatch
) -> None:
    from consul_agent import ConsulAgent

    acl = (
        'acl { enabled = true, default_policy = "deny", tokens { master = "root-secret-1234" } }\n'
    )
    agent = ConsulAgent(consul_bin, tmp_path_factory.mktemp("consul-acl"), acl).start()
    try:
        monkeypatch.setenv("CONSUL_HTTP_TOKEN", "not-a-real-token-abcd")
        store = open_store(f"consul://{agent.http_addr}")
        with pytest.raises(StoreError) as caught:
            store.apps_for_node("web1")
        message = str(caught.value)
        assert not isinstance(caught.value, StoreUnavailable)
        assert "CONSUL_HTTP_TOKEN" in message and "abcd" in message
        assert "not-a-real-token" not in message
        assert "\n" not in message
        store.close()

        monkeypatch.setenv("CONSUL_HTTP_TOKEN", "root-secret-1234")
        store = open_store(f"consul://{agent.http_addr}")
        assert store.apps_for_node("web1") == []
        store.close()
    finally:
        agent.stop()


@pytest.mark.parametrize(
    ("url", "env", "address"),
    [
        ("consul://127.0.0.5:8600", {}, "http://127.0.0.5:8600"),
        ("consul+https://localhost", {}, "https://localhost:8501"),
        ("consul://", {"CONSUL_HTTP_ADDR": "127.0.0.2:9500"}, "http://127.0.0.2:9500"),
        ("consul://", {"CONSUL_HTTP_ADDR": "https://127.0.0.2:9501"}, "https://127.0.0.2:9501"),
        ("consul://", {}, "http://127.0.0.1:8500"),
    ],
)
def test_store_urls_choose_the_address_and_scheme(
    url: str, env: dict[str, str], address: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    # Only parses the URL: nothing is contacted until the first request.
    monkeypatch.delenv("CONSUL_HTTP_ADDR", raising=False)
    monkeypatch.delenv("CONSUL_HTTP_SSL", raising=False)
    for name, value in env.items():
        monkeypatch.setenv(name, value)
    store = ConsulStore.from_url(url)
    assert store.address == address
    store.close()
