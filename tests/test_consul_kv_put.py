"""Intent written with the stock ``consul kv put`` reads back as the model says.

Operators may skip ``pp`` and write keys with Consul's own CLI, as docs/intent.md
shows; these tests run exactly those commands against a real agent.
"""

from __future__ import annotations

import subprocess
from collections.abc import Iterator

import pytest

from intent.store import IntentStore, StoreError, StoreUnavailable, open_store
from intent.store.consul import ConsulStore

SHA = "0123456789abcdef" * 4


class ConsulCli:
    def __init__(self, binary: str, addr: str) -> None:
        self.binary, self.addr = binary, addr

    def __call__(self, *args: str) -> str:
        done = subprocess.run(
            [self.binary, args[0], args[1], f"-http-addr={self.addr}", *args[2:]],
            capture_output=True,
            text=True,
            timeout=30,
        )
        assert done.returncode == 0, done.stderr
        return done.stdout


@pytest.fixture
def cli(consul_bin: str, consul_addr: str) -> Iterator[ConsulCli]:
    run = ConsulCli(consul_bin, consul_addr)
    run("kv", "delete", "-recurse", "platypus/")
    yield run
    run("kv", "delete", "-recurse", "platypus/")


@pytest.fixture
def store(consul_addr: str) -> Iterator[IntentStore]:
    opened = open_store(f"consul://{consul_addr}")
    yield opened
    opened.close()


def _write_hello(cli: ConsulCli) -> None:
    cli("kv", "put", "platypus/nodes/web1/hello", '{"cluster":"production"}')
    cli(
        "kv",
        "put",
        "platypus/clusters/hello/production/config",
        '{"versions":{"1.0.0":{"state":"active","sha256":"' + SHA + '"}},'
        '"min_nodes":0,"user_config":{}}',
    )
    cli(
        "kv",
        "put",
        "platypus/clusters/hello/production/deploy_config",
        '{"basedir":"/srv/hello","run_as":"hello",'
        '"ports":[{"name":"http","port":8080}],'
        '"health_check":{"type":"http","port":8080,"path":"/health"}}',
    )


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
    assert hello.config.min_nodes == 0
    assert hello.deploy.basedir == "/srv/hello"
    assert hello.deploy.run_as == "hello"
    assert [(p.name, p.port, p.protocol) for p in hello.deploy.ports] == [("http", 8080, "tcp")]
    assert hello.deploy.health_check is not None
    assert hello.deploy.health_check.path == "/health"


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
