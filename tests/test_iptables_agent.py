"""pp-iptables in the shared runtime, over a real embedded store and a fake packet filter.

The same behaviours run against real iptables in network namespaces in
test_iptables_netns.py; these keep the agent's glue tested where root is absent.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
from iptables_fake import FakeTables
from structlog.testing import capture_logs

from agents.iptables.__main__ import commands
from agents.iptables.agent import Ip6tablesAgent, IptablesAgent
from agents.iptables.rules import INPUT, PREROUTING
from agents.runtime import Runtime, RuntimeOptions
from agents.system.iptables import IptablesError
from intent import keys
from intent.cli.operator import unassign
from intent.store import IntentStore
from intent.store.sqlite import SqliteStore

NODE = "web1"
SHA = "c" * 64


@pytest.fixture
def store(tmp_path: Path) -> IntentStore:
    return IntentStore(SqliteStore(tmp_path / "intent.db"))


def put_app(store: IntentStore, app: str, ports: list[dict[str, Any]], active: bool = True) -> None:
    store.put_json(keys.node_app(NODE, app), {"cluster": "prod"})
    state = "active" if active else "prep"
    store.put_json(keys.config(app, "prod"), {"versions": {"1.0": {"state": state, "sha256": SHA}}})
    store.put_json(keys.deploy_config(app, "prod"), {"basedir": f"/srv/{app}", "ports": ports})


def runtime(
    store: IntentStore, tables: FakeTables, agent: type[IptablesAgent] = IptablesAgent
) -> Runtime:
    return Runtime(agent(store, NODE, tables), store, RuntimeOptions(node=NODE))


def reality(store: IntentStore, app: str, agent: str = "iptables") -> tuple[str, str | None, Any]:
    reports = [r for r in store.reality(node=NODE, app=app) if r.agent == agent]
    assert len(reports) == 1, reports
    return reports[0].status, reports[0].error, reports[0].details.get("ports")


def input_ports(tables: FakeTables) -> list[str]:
    return [str(r[2]).split("--dport ")[1].split()[0] for r in tables.chains["filter"][INPUT.name]]


def test_a_pass_opens_the_ports_and_reports_them(store: IntentStore) -> None:
    tables = FakeTables()
    put_app(store, "web", [{"name": "http", "port": 8080, "public_port": 80}])
    assert runtime(store, tables).run_pass(force=True)
    assert input_ports(tables) == ["8080"]
    status, error, ports = reality(store, "web")
    assert (status, error) == ("converged", None)
    assert ports == [{"name": "http", "protocol": "tcp", "port": 8080, "public_port": 80}]


def test_one_restore_per_pass_and_none_when_nothing_changed(store: IntentStore) -> None:
    tables = FakeTables()
    for i in range(5):
        put_app(store, f"app{i}", [{"name": "http", "port": 8000 + i}])
    rt = runtime(store, tables)
    assert rt.run_pass(force=True)
    assert len(tables.restores) == 1
    assert rt.run_pass(force=True)
    assert len(tables.restores) == 1


def test_an_app_with_no_active_version_is_closed(store: IntentStore) -> None:
    tables = FakeTables()
    put_app(store, "web", [{"name": "http", "port": 8080}])
    rt = runtime(store, tables)
    rt.run_pass(force=True)
    put_app(store, "web", [{"name": "http", "port": 8080}], active=False)
    assert rt.run_pass(force=True)
    assert input_ports(tables) == []
    assert reality(store, "web")[0] == "converged"


def test_invalid_intent_holds_the_rules_in_force(store: IntentStore) -> None:
    tables = FakeTables()
    put_app(store, "web", [{"name": "http", "port": 8080, "public_port": 80}])
    runtime(store, tables).run_pass(force=True)
    before = tables.save()
    put_app(store, "web", [{"name": "http", "port": 70000}])
    for rt in (runtime(store, tables), runtime(store, tables)):
        assert not rt.run_pass(force=True)  # a fresh agent has no last good intent: still held
        assert tables.save() == before
        status, error, _ = reality(store, "web")
        assert status == "error"
        assert error is not None and "deploy_config" in error and "ports.0.port" in error


def test_an_unassigned_app_is_closed_and_its_report_cleared(store: IntentStore) -> None:
    tables = FakeTables()
    put_app(store, "web", [{"name": "http", "port": 8080}])
    put_app(store, "api", [{"name": "grpc", "port": 9000}])
    rt = runtime(store, tables)
    rt.run_pass(force=True)
    store.delete(keys.node_app(NODE, "web"))
    assert rt.run_pass(force=True)
    assert input_ports(tables) == ["9000"]
    assert store.reality(node=NODE, app="web") == []
    assert reality(store, "api")[0] == "converged"


def test_a_port_conflict_is_reported_on_the_newcomer_naming_both(store: IntentStore) -> None:
    tables = FakeTables()
    put_app(store, "web", [{"name": "http", "port": 8080, "public_port": 80}])
    rt = runtime(store, tables)
    rt.run_pass(force=True)
    put_app(store, "api", [{"name": "http", "port": 9000, "public_port": 80}])
    assert not rt.run_pass(force=True)
    status, error, ports = reality(store, "api")
    assert status == "error" and ports == []
    assert error is not None and "web" in error and "api" in error and "80/tcp" in error
    assert reality(store, "web")[0] == "converged"
    assert [str(r[2]).split("--dport ")[1][:2] for r in tables.chains["nat"][PREROUTING.name]] == [
        "80"
    ]


def test_without_privileges_every_app_reports_one_clear_error_logged_once(
    store: IntentStore,
) -> None:
    tables = FakeTables()
    tables.error = (
        "iptables-save: permission denied: run pp-iptables as root (or with CAP_NET_ADMIN)"
    )
    put_app(store, "web", [{"name": "http", "port": 8080}])
    put_app(store, "api", [{"name": "grpc", "port": 9000}])
    rt = runtime(store, tables)
    with capture_logs() as logs:
        rt.agent.start()
        for _ in range(3):
            assert not rt.run_pass(force=True)
    assert [e["error"] for e in logs if e["event"] == "iptables.failed"] == [tables.error]
    for app in ("web", "api"):
        assert reality(store, app)[:2] == ("error", tables.error)
    tables.error = None
    with capture_logs() as logs:
        assert rt.run_pass(force=True)
    assert "iptables.recovered" in [e["event"] for e in logs]


def test_a_failed_removal_is_reported_and_retried(store: IntentStore) -> None:
    tables = FakeTables()
    put_app(store, "web", [{"name": "http", "port": 8080}])
    rt = runtime(store, tables)
    rt.run_pass(force=True)
    unassign(store, NODE, ["web"], "tester")  # its last app: emptied on purpose
    restore = tables.restore

    def refuse(rules: str) -> None:
        raise IptablesError("locked")

    tables.restore = refuse  # type: ignore[method-assign]
    assert not rt.run_pass(force=True)
    assert reality(store, "web")[:2] == ("error", "locked")
    tables.restore = restore  # type: ignore[method-assign]
    assert rt.run_pass(force=True)
    assert input_ports(tables) == []
    assert store.reality(node=NODE, app="web") == []


def test_ipv6_reports_as_its_own_agent(store: IntentStore) -> None:
    tables = FakeTables()
    put_app(store, "web", [{"name": "http", "port": 8080}])
    assert runtime(store, tables, Ip6tablesAgent).run_pass(force=True)
    assert reality(store, "web", agent="ip6tables")[0] == "converged"


@pytest.mark.parametrize(
    "ipv6, iptables, restore, save, expected",
    [
        (False, None, None, None, (["iptables"], ["iptables-restore"], ["iptables-save"])),
        (True, None, None, None, (["ip6tables"], ["ip6tables-restore"], ["ip6tables-save"])),
        (
            False,
            "iptables-legacy",
            None,
            None,
            (["iptables-legacy"], ["iptables-legacy-restore"], ["iptables-legacy-save"]),
        ),
        (
            False,
            "ip netns exec ns1 iptables",
            None,
            "/sbin/my-save --x",
            (
                ["ip", "netns", "exec", "ns1", "iptables"],
                ["ip", "netns", "exec", "ns1", "iptables-restore"],
                ["/sbin/my-save", "--x"],
            ),
        ),
    ],
)
def test_commands_default_to_the_iptables_family(
    ipv6: bool,
    iptables: str | None,
    restore: str | None,
    save: str | None,
    expected: tuple[list[str], list[str], list[str]],
) -> None:
    assert commands(ipv6, iptables, restore, save) == expected


def test_steady_passes_still_notice_drift_and_intent_changes(store: IntentStore) -> None:
    tables = FakeTables()
    put_app(store, "web", [{"name": "http", "port": 8080, "public_port": 80}])
    rt = runtime(store, tables)
    for _ in range(3):
        assert rt.run_pass(force=True)
    assert len(tables.restores) == 1
    tables.count("filter", INPUT.name, 5)  # traffic alone is no drift
    assert rt.run_pass(force=True)
    assert len(tables.restores) == 1

    tables.chains["nat"][PREROUTING.name].clear()  # drift made by hand
    assert rt.run_pass(force=True)
    assert len(tables.restores) == 2
    assert len(tables.chains["nat"][PREROUTING.name]) == 1

    put_app(store, "web", [{"name": "http", "port": 8081, "public_port": 80}])
    assert rt.run_pass(force=True)
    assert input_ports(tables) == ["8081"]
    assert rt.run_pass(force=True)
    assert len(tables.restores) == 3
