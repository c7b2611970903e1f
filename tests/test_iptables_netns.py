"""pp-iptables against real iptables, inside network namespaces made by each test.

Two namespaces joined by a veth pair stand for two hosts: ``node`` runs the app
and the agent's rules, ``client`` connects from outside. Every iptables command
runs through ``ip netns exec <namespace>``; the machine's own rules, routes and
interfaces are never touched. Addresses come from a private test range and
exist only inside the namespaces.
"""

from __future__ import annotations

import json
import os
import random
import secrets
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest
from netns_support import Namespace, missing, ours, require_netns, theirs

from agents.iptables.agent import IptablesAgent
from agents.runtime import Runtime, RuntimeOptions
from agents.system.iptables import Iptables, IptablesError
from intent import keys
from intent.store import IntentStore
from intent.store.sqlite import SqliteStore

pytestmark = pytest.mark.root

NODE = "node1"
SHA = "d" * 64
NODE_V4, CLIENT_V4 = "10.213.0.1", "10.213.0.2"
NODE_V6, CLIENT_V6 = "fd00:213::1", "fd00:213::2"
PP_IPTABLES = Path(sys.executable).with_name("pp-iptables")

SERVER = """
import socket, sys
port, proto, reply = int(sys.argv[1]), sys.argv[2], sys.argv[3].encode()
kind = socket.SOCK_STREAM if proto == "tcp" else socket.SOCK_DGRAM
s = socket.socket(socket.AF_INET6, kind)
s.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY, 0)
s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
s.bind(("::", port))
if proto == "tcp":
    s.listen(16)
print("ready", flush=True)
while True:
    if proto == "tcp":
        conn, _ = s.accept()
        conn.sendall(reply)
        conn.close()
    else:
        _, peer = s.recvfrom(64)
        s.sendto(reply, peer)
"""

CLIENT = """
import socket, sys
host, port, proto = sys.argv[1], int(sys.argv[2]), sys.argv[3]
try:
    if proto == "tcp":
        print(socket.create_connection((host, port), timeout=1).recv(64).decode())
    else:
        family = socket.AF_INET6 if ":" in host else socket.AF_INET
        s = socket.socket(family, socket.SOCK_DGRAM)
        s.settimeout(1)
        s.sendto(b"hello", (host, port))
        print(s.recv(64).decode())
except OSError as exc:
    print(f"FAILED {exc}")
"""


@pytest.fixture(scope="session")
def netns_ready() -> None:
    require_netns()


@dataclass
class Host(Namespace):
    """One network namespace standing for a host, with the servers it runs."""

    servers: list[subprocess.Popen[str]] = field(default_factory=list)

    def tables(self, family: str = "iptables") -> Iptables:
        return Iptables(
            self.argv(family), self.argv(f"{family}-restore"), self.argv(f"{family}-save")
        )

    def serve(self, port: int, reply: str, proto: str = "tcp") -> None:
        server = subprocess.Popen(
            self.argv(sys.executable, "-c", SERVER, str(port), proto, reply),
            stdout=subprocess.PIPE,
            text=True,
        )
        self.servers.append(server)
        assert server.stdout is not None and server.stdout.readline().strip() == "ready"

    def connect(self, host: str, port: int, proto: str = "tcp") -> str:
        return self.run(sys.executable, "-c", CLIENT, host, str(port), proto).strip()


def _ip(host: Host, *args: str) -> None:
    host.run("ip", *args)


@pytest.fixture
def hosts(netns_ready: None) -> Iterator[tuple[Host, Host]]:
    """``node`` and ``client``, joined by a veth pair made inside the namespaces.

    The node's INPUT policy is DROP, as on a locked-down host (replies to its own
    connections allowed), so new connections get in only through the agent's rules."""
    made: list[Host] = []
    try:
        for _ in range(2):
            host = Host(f"pp-{secrets.token_hex(4)}")
            subprocess.run(["ip", "netns", "add", host.ns], check=True)
            made.append(host)
        node, client = made
        _ip(node, "link", "add", "pp0", "type", "veth", "peer", "name", "pp1", "netns", client.ns)
        ends = ((node, "pp0", NODE_V4, NODE_V6), (client, "pp1", CLIENT_V4, CLIENT_V6))
        for host, dev, v4, v6 in ends:
            _ip(host, "addr", "add", f"{v4}/30", "dev", dev)
            _ip(host, "-6", "addr", "add", f"{v6}/64", "dev", dev, "nodad")
            _ip(host, "link", "set", dev, "up")
            _ip(host, "link", "set", "lo", "up")
        for family in ("iptables", "ip6tables"):
            node.run(family, "-A", "INPUT", "-m", "conntrack", "--ctstate", "ESTABLISHED,RELATED",
                     "-j", "ACCEPT")  # fmt: skip
            node.run(family, "-A", "INPUT", "-p", "tcp", "--dport", "22", "-j", "ACCEPT")
            node.run(family, "-P", "INPUT", "DROP")
        node.run("ip6tables", "-A", "INPUT", "-p", "ipv6-icmp", "-j", "ACCEPT")  # neighbours
        yield node, client
    finally:
        for host in made:
            for server in host.servers:
                server.kill()
                server.wait()
            subprocess.run(["ip", "netns", "del", host.ns], check=False)


@pytest.fixture
def store(tmp_path: Path) -> IntentStore:
    return IntentStore(SqliteStore(tmp_path / "intent.db"))


def put_app(
    store: IntentStore, app: str, ports: list[dict[str, Any]], cluster: str = "prod"
) -> None:
    store.put_json(keys.node_app(NODE, app), {"cluster": cluster})
    store.put_json(
        keys.config(app, cluster), {"versions": {"1.0": {"state": "active", "sha256": SHA}}}
    )
    store.put_json(keys.deploy_config(app, cluster), {"basedir": f"/srv/{app}", "ports": ports})


def one_pass(store: IntentStore, node: Host, family: str = "iptables") -> bool:
    agent = IptablesAgent(store, NODE, node.tables(family))
    return Runtime(agent, store, RuntimeOptions(node=NODE)).run_pass(force=True)


def pp_iptables(
    store: IntentStore, node: Host, *extra: str, family: str = "iptables"
) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [str(PP_IPTABLES), *cli_args(store, node, family), *extra],
        capture_output=True,
        text=True,
        timeout=60,
    )


def cli_args(store: IntentStore, node: Host, family: str = "iptables") -> list[str]:
    db = store.kv.path  # type: ignore[attr-defined]
    args = ["--once", "--node", NODE, "--store", f"sqlite://{db}", "--log-format", "json"]
    return [*args, *node.flags(family), *(["--ipv6"] if family == "ip6tables" else [])]


def reality(store: IntentStore, app: str) -> tuple[str, str | None]:
    (report,) = store.reality(node=NODE, app=app)
    return report.status, report.error


# -- traffic ----------------------------------------------------------------------------


def test_a_client_reaches_the_app_through_its_public_port(
    hosts: tuple[Host, Host], store: IntentStore
) -> None:
    node, client = hosts
    node.serve(8080, "web")
    node.serve(5353, "dns", proto="udp")
    assert client.connect(NODE_V4, 8080).startswith("FAILED")  # the DROP policy holds

    put_app(
        store,
        "web",
        [
            {"name": "http", "port": 8080, "public_port": 80},
            {"name": "dns", "port": 5353, "protocol": "udp", "public_port": 53},
        ],
    )
    done = pp_iptables(store, node)
    assert done.returncode == 0, done.stderr

    assert client.connect(NODE_V4, 80) == "web"
    assert client.connect(NODE_V4, 8080) == "web"
    assert client.connect(NODE_V4, 53, "udp") == "dns"
    assert node.connect("127.0.0.1", 80) == "web"  # the host's own connections are mapped too
    assert node.connect(NODE_V4, 80) == "web"
    assert reality(store, "web") == ("converged", None)
    saved = node.save()
    assert '--comment "platypus app=web port=http"' in saved
    assert "-A INPUT -m comment --comment platypus -j PLATYPUS-INPUT" in saved


def test_ipv6_rules_are_applied_with_ip6tables(
    hosts: tuple[Host, Host], store: IntentStore
) -> None:
    node, client = hosts
    node.serve(8080, "web6")
    put_app(store, "web", [{"name": "http", "port": 8080, "public_port": 80}])
    done = pp_iptables(store, node, family="ip6tables")
    assert done.returncode == 0, done.stderr
    assert client.connect(NODE_V6, 80) == "web6"
    assert client.connect(NODE_V4, 80).startswith("FAILED")  # IPv4 is another agent's job
    assert ours(node.save("iptables")) == []
    (report,) = store.reality(node=NODE, app="web")
    assert report.agent == "ip6tables"


def test_the_legacy_backend_works_the_same(hosts: tuple[Host, Host], store: IntentStore) -> None:
    node, client = hosts
    if subprocess.run(node.argv("iptables-legacy-save"), capture_output=True).returncode != 0:
        missing("the kernel offers no legacy xtables in a namespace (nft is covered)")
    node.run("iptables-legacy", "-P", "INPUT", "DROP")
    node.run("iptables", "-P", "INPUT", "ACCEPT")
    node.serve(8080, "legacy")
    put_app(store, "web", [{"name": "http", "port": 8080, "public_port": 80}])
    assert one_pass(store, node, "iptables-legacy")
    assert client.connect(NODE_V4, 80) == "legacy"
    assert ours(node.save("iptables")) == []
    assert one_pass(store, node, "iptables-legacy")


def test_unassigning_an_app_closes_its_ports(hosts: tuple[Host, Host], store: IntentStore) -> None:
    node, client = hosts
    node.serve(8080, "web")
    put_app(store, "web", [{"name": "http", "port": 8080, "public_port": 80}])
    put_app(store, "api", [{"name": "grpc", "port": 9000}])
    assert one_pass(store, node)
    assert client.connect(NODE_V4, 80) == "web"

    store.delete(keys.node_app(NODE, "web"))
    assert one_pass(store, node)
    assert client.connect(NODE_V4, 80).startswith("FAILED")
    assert client.connect(NODE_V4, 8080).startswith("FAILED")
    assert not [line for line in ours(node.save()) if "app=web" in line]
    assert [line for line in ours(node.save()) if "app=api" in line]
    assert store.reality(node=NODE, app="web") == []


# -- ownership and idempotence ------------------------------------------------------------


def test_foreign_rules_added_before_and_after_stay_in_place(
    hosts: tuple[Host, Host], store: IntentStore
) -> None:
    node, _ = hosts
    node.run("iptables", "-N", "ADMIN-BLOCK")
    node.run("iptables", "-A", "ADMIN-BLOCK", "-s", "10.213.9.9/32", "-j", "DROP")
    node.run("iptables", "-I", "INPUT", "1", "-j", "ADMIN-BLOCK")
    node.run("iptables", "-t", "nat", "-A", "PREROUTING", "-p", "tcp", "--dport", "2222",
             "-j", "REDIRECT", "--to-ports", "22")  # fmt: skip
    put_app(store, "web", [{"name": "http", "port": 8080, "public_port": 80}])
    assert one_pass(store, node)

    node.run("iptables", "-A", "INPUT", "-p", "udp", "--dport", "123", "-j", "ACCEPT")
    node.run("iptables", "-t", "nat", "-I", "OUTPUT", "1", "-p", "tcp", "--dport", "25",
             "-j", "REDIRECT", "--to-ports", "2525")  # fmt: skip
    before = node.save()
    put_app(store, "web", [{"name": "http", "port": 8081, "public_port": 81}])
    put_app(store, "api", [{"name": "grpc", "port": 9000, "public_port": 90}])
    assert one_pass(store, node)  # a few rules change: edited in place with -D/-I
    after = node.save()
    assert one_pass(store, node)
    assert node.save() == after  # the edits left the order a whole rewrite would

    assert ours(after) != ours(before)
    assert theirs(after) == theirs(before)  # same rules, same order, same policies
    assert ":INPUT DROP" in after
    filter_input = [line for line in after.splitlines() if " -A INPUT " in line]
    assert "-j PLATYPUS-INPUT" in filter_input[0]
    assert "-j ADMIN-BLOCK" in filter_input[1]


def test_a_second_pass_changes_nothing_not_even_counters(
    hosts: tuple[Host, Host], store: IntentStore
) -> None:
    node, client = hosts
    node.serve(8080, "web")
    put_app(store, "web", [{"name": "http", "port": 8080, "public_port": 80}])
    put_app(store, "dns", [{"name": "dns", "port": 5353, "protocol": "udp"}])
    assert one_pass(store, node)
    assert client.connect(NODE_V4, 80) == "web"
    first = node.save()
    assert "[0:0] -A PLATYPUS-PREROUTING" not in first  # traffic was counted

    done = pp_iptables(store, node)
    assert done.returncode == 0, done.stderr
    assert "iptables.applied" not in done.stderr
    assert node.save() == first


def test_counters_of_untouched_rules_survive_another_apps_change(
    hosts: tuple[Host, Host], store: IntentStore
) -> None:
    node, client = hosts
    node.serve(8080, "web")
    put_app(store, "web", [{"name": "http", "port": 8080, "public_port": 80}])
    assert one_pass(store, node)
    assert client.connect(NODE_V4, 80) == "web"
    counted = [line for line in ours(node.save()) if "app=web" in line]

    put_app(store, "api", [{"name": "grpc", "port": 9000, "public_port": 90}])
    assert one_pass(store, node)
    assert [line for line in ours(node.save()) if "app=web" in line] == counted


def test_a_rule_deleted_by_hand_is_put_back(hosts: tuple[Host, Host], store: IntentStore) -> None:
    node, client = hosts
    node.serve(8080, "web")
    put_app(store, "web", [{"name": "http", "port": 8080, "public_port": 80}])
    assert one_pass(store, node)
    node.run("iptables", "-t", "nat", "-F", "PLATYPUS-PREROUTING")
    node.run("iptables", "-D", "INPUT", "-m", "comment", "--comment", "platypus",
             "-j", "PLATYPUS-INPUT")  # fmt: skip
    assert client.connect(NODE_V4, 80).startswith("FAILED")
    assert one_pass(store, node)
    assert client.connect(NODE_V4, 80) == "web"


# -- conflicts and bad intent -------------------------------------------------------------


def test_a_port_conflict_leaves_the_holder_serving_and_reports_both_names(
    hosts: tuple[Host, Host], store: IntentStore
) -> None:
    node, client = hosts
    node.serve(8080, "web")
    node.serve(9000, "intruder")
    put_app(store, "web", [{"name": "http", "port": 8080, "public_port": 80}])
    assert one_pass(store, node)
    before = node.save()

    put_app(store, "api", [{"name": "http", "port": 9000, "public_port": 80}])
    done = pp_iptables(store, node)
    assert done.returncode == 1
    assert node.save() == before  # nothing else changes
    assert client.connect(NODE_V4, 80) == "web"
    status, error = reality(store, "api")
    assert status == "error"
    assert error is not None and "app api" in error and "app web" in error
    assert reality(store, "web") == ("converged", None)


def test_an_invalid_port_in_intent_holds_the_rules_in_force(
    hosts: tuple[Host, Host], store: IntentStore
) -> None:
    node, client = hosts
    node.serve(8080, "web")
    put_app(store, "web", [{"name": "http", "port": 8080, "public_port": 80}])
    assert one_pass(store, node)
    before = node.save()

    put_app(store, "web", [{"name": "http", "port": 8080, "public_port": 99999}])
    done = pp_iptables(store, node)  # a fresh process: no last good intent in memory
    assert done.returncode == 1
    assert node.save() == before
    assert client.connect(NODE_V4, 80) == "web"
    status, error = reality(store, "web")
    assert status == "error"
    assert error is not None and "deploy_config" in error and "public_port" in error


# -- failures -----------------------------------------------------------------------------


def test_without_privileges_one_clear_error_and_no_traceback(
    hosts: tuple[Host, Host], store: IntentStore
) -> None:
    node, _ = hosts
    unprivileged = " ".join(
        node.argv("setpriv", "--reuid=65534", "--regid=65534", "--clear-groups", "iptables")
    )
    put_app(store, "web", [{"name": "http", "port": 8080}])
    put_app(store, "api", [{"name": "grpc", "port": 9000}])
    done = subprocess.run(
        [str(PP_IPTABLES), *cli_args(store, node)[:-2], "--iptables", unprivileged],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert done.returncode == 1
    assert "Traceback" not in done.stderr
    events = [json.loads(line) for line in done.stderr.splitlines()]
    failures = [e for e in events if e["event"] == "iptables.failed"]
    assert len(failures) == 1
    assert "permission denied" in failures[0]["error"]
    assert "\n" not in failures[0]["error"]
    for app in ("web", "api"):
        status, error = reality(store, app)
        assert status == "error" and error is not None and "run pp-iptables as root" in error
    assert ours(node.save()) == []


def test_a_refused_restore_commits_nothing_and_says_why_in_one_line(
    hosts: tuple[Host, Host],
) -> None:
    node, _ = hosts
    tables = node.tables()
    before = node.save()
    bad = (
        "*filter\n:PLATYPUS-INPUT - [0:0]\n"
        "-A PLATYPUS-INPUT -p tcp --dport 99999 -j ACCEPT\nCOMMIT\n"
    )
    with pytest.raises(IptablesError) as caught:
        tables.check(bad)
    assert "99999" in str(caught.value) and "\n" not in str(caught.value)
    with pytest.raises(IptablesError):
        tables.restore(bad)
    assert node.save() == before


def _restoring(pgid: int) -> bool:
    """Whether a committing (not --test) iptables-restore runs in our agent's group."""
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            stat = Path(f"/proc/{entry}/stat").read_text()
            cmdline = Path(f"/proc/{entry}/cmdline").read_bytes().split(b"\0")
        except OSError:
            continue
        if int(stat.rsplit(")", 1)[1].split()[2]) != pgid:
            continue
        if any(w.endswith(b"iptables-restore") for w in cmdline) and b"--test" not in cmdline:
            return True
    return False


def test_kill_9_during_apply_leaves_either_the_old_or_the_new_rules(
    hosts: tuple[Host, Host], store: IntentStore
) -> None:
    node, _ = hosts
    apps = 300

    def intent(base: int) -> None:
        for i in range(apps):
            ports = [{"name": "http", "port": base + i, "public_port": base + 10000 + i}]
            store.put_json(
                keys.deploy_config(f"app{i:03d}", "prod"),
                {"basedir": f"/srv/app{i:03d}", "ports": ports},
            )

    for i in range(apps):
        put_app(store, f"app{i:03d}", [])
    states = {}
    for base in (20000, 30000):
        intent(base)
        assert one_pass(store, node)
        states[base] = {t: _table_rules(node, t) for t in ("filter", "nat")}
    assert states[20000] != states[30000]

    current, killed_while_restoring, outcomes = 30000, 0, []
    rng = random.Random(5)
    for attempt in range(8):
        target = 20000 if current == 30000 else 30000
        intent(target)
        agent = subprocess.Popen(
            [str(PP_IPTABLES), *cli_args(store, node)],
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
            start_new_session=True,
        )
        deadline = time.monotonic() + 30
        while agent.poll() is None and not _restoring(agent.pid) and time.monotonic() < deadline:
            time.sleep(0.0005)
        time.sleep(rng.uniform(0, 0.03) if attempt % 2 else 0)
        if agent.poll() is None:
            killed_while_restoring += _restoring(agent.pid)
            os.killpg(agent.pid, signal.SIGKILL)  # the agent and its iptables-restore
        agent.wait()
        tables = {t: _table_rules(node, t) for t in ("filter", "nat")}
        for table, rules in tables.items():
            assert rules in (states[20000][table], states[30000][table]), (attempt, table)
        outcomes.append(tables)
        current = target if tables["filter"] == states[target]["filter"] else current
    assert killed_while_restoring > 0, "no kill landed during iptables-restore"


def _table_rules(node: Host, table: str) -> list[str]:
    text = node.run("iptables-save", "-t", table)
    return [line for line in text.splitlines() if line.startswith("-A PLATYPUS-")]
