"""The Consul store over TLS, against a real agent serving HTTPS with certificates made
by ``consul tls``: the CA from ``CONSUL_CACERT``, a client certificate from
``CONSUL_CLIENT_CERT``/``CONSUL_CLIENT_KEY`` when the agent asks for one, and one-line
errors when either is missing or wrong."""

from __future__ import annotations

import subprocess
import threading
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest
from consul_agent import ConsulAgent

from intent.store import StoreUnavailable, open_store


@dataclass
class TlsConsul:
    address: str
    certs: Path

    def pem(self, name: str) -> str:
        return str(self.certs / name)


@pytest.fixture(scope="module")
def tls_consul(consul_bin: str, tmp_path_factory: pytest.TempPathFactory) -> Iterator[TlsConsul]:
    certs = tmp_path_factory.mktemp("consul-tls")
    for args in (["ca", "create"], ["cert", "create", "-server"], ["cert", "create", "-client"]):
        subprocess.run([consul_bin, "tls", *args], cwd=certs, check=True, capture_output=True)
    # Another CA, which signed nothing the agent presents.
    other = certs / "other"
    other.mkdir()
    subprocess.run([consul_bin, "tls", "ca", "create"], cwd=other, check=True, capture_output=True)
    tls = (
        f'ca_file = "{certs}/consul-agent-ca.pem"\n'
        f'cert_file = "{certs}/dc1-server-consul-0.pem"\n'
        f'key_file = "{certs}/dc1-server-consul-0-key.pem"\n'
        "verify_incoming_https = true\n"
    )
    agent = ConsulAgent(consul_bin, certs, tls_hcl=tls).start()
    try:
        yield TlsConsul(f"127.0.0.1:{agent.https_port}", certs)
    finally:
        agent.stop()


def _client_env(monkeypatch: pytest.MonkeyPatch, tls: TlsConsul, ca: str) -> None:
    monkeypatch.setenv("CONSUL_CACERT", tls.pem(ca))
    monkeypatch.setenv("CONSUL_CLIENT_CERT", tls.pem("dc1-client-consul-0.pem"))
    monkeypatch.setenv("CONSUL_CLIENT_KEY", tls.pem("dc1-client-consul-0-key.pem"))
    monkeypatch.delenv("CONSUL_HTTP_TOKEN", raising=False)


@pytest.mark.consul
def test_the_store_reads_writes_and_watches_over_tls_with_a_client_certificate(
    tls_consul: TlsConsul, monkeypatch: pytest.MonkeyPatch
) -> None:
    _client_env(monkeypatch, tls_consul, "consul-agent-ca.pem")
    with open_store(f"consul+https://{tls_consul.address}") as store:
        store.kv.put("tls/nodes/a", b"1")
        entry = store.kv.get("tls/nodes/a")
        assert entry is not None and entry.value == b"1"
        token = store.kv.wait(["tls/nodes/"], None, 0)
        threading.Timer(0.3, lambda: store.kv.put("tls/nodes/b", b"2")).start()
        assert store.kv.wait(["tls/nodes/"], token, 20) != token


@pytest.mark.consul
@pytest.mark.parametrize(
    ("ca", "client_cert", "expected"),
    [
        ("other/consul-agent-ca.pem", True, "certificate verify failed"),
        ("consul-agent-ca.pem", False, "TLS"),
    ],
    ids=["unknown-ca", "no-client-cert"],
)
def test_a_wrong_ca_or_a_missing_client_certificate_is_one_line_store_unavailable(
    tls_consul: TlsConsul,
    monkeypatch: pytest.MonkeyPatch,
    ca: str,
    client_cert: bool,
    expected: str,
) -> None:
    _client_env(monkeypatch, tls_consul, ca)
    if not client_cert:
        monkeypatch.delenv("CONSUL_CLIENT_CERT")
        monkeypatch.delenv("CONSUL_CLIENT_KEY")
    with (
        open_store(f"consul+https://{tls_consul.address}") as store,
        pytest.raises(StoreUnavailable) as caught,
    ):
        store.kv.get("tls/nodes/a")
    message = str(caught.value)
    assert expected in message and "\n" not in message, message


@pytest.mark.consul
def test_verification_turned_off_still_presents_the_client_certificate(
    tls_consul: TlsConsul, monkeypatch: pytest.MonkeyPatch
) -> None:
    _client_env(monkeypatch, tls_consul, "other/consul-agent-ca.pem")
    monkeypatch.delenv("CONSUL_CACERT")
    monkeypatch.setenv("CONSUL_HTTP_SSL_VERIFY", "false")
    with open_store(f"consul+https://{tls_consul.address}") as store:
        store.kv.put("tls/unverified", b"3")
        entry = store.kv.get("tls/unverified")
        assert entry is not None and entry.value == b"3"
