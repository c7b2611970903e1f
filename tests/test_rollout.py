"""Following a rollout: the pure verdict (intent/cli/rollout.py) with plain data, then
``pp deploy/rollback/retry/apply --wait`` end to end against a real store, with a
"reality echoer" writing the reports agents would write (agents are tested on their own;
what --wait promises is how it reads ``reality/``)."""

from __future__ import annotations

import io
import json
import os
import pty
import select
import subprocess
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
from click.testing import CliRunner
from rich.console import Console

from intent import cli, keys
from intent.cli import rollout_view
from intent.cli.rollout import (
    EXIT_CONVERGED,
    EXIT_FAILED,
    EXIT_STALLED,
    EXIT_TIMEOUT,
    Rollout,
    Snapshot,
    Target,
    evaluate,
    events,
)
from intent.model import AgentStatus, AppConfig, Reality
from intent.store import IntentStore, open_store

REPO = Path(__file__).resolve().parent.parent
PP_BIN = REPO / ".venv" / "bin" / "pp"
A, B = "a" * 64, "b" * 64
NOW = 1_000_000.0


def rep(
    node: str, agent: str, status: str = "converged", version: str | None = "2", **kw: Any
) -> Reality:
    fields: dict[str, Any] = {"updated_at": NOW - 5, "since": NOW - 5, **kw}
    return Reality(node=node, agent=agent, app="web", status=status, version=version, **fields)  # type: ignore[arg-type]


def judge(
    reports: list[Reality],
    *,
    target: Target | None = None,
    stale: frozenset[tuple[str, str, str]] = frozenset(),
    held: list[AgentStatus] | None = None,
    elapsed: float = 10.0,
    timeout_s: float = 600.0,
    silent_after_s: float = 300.0,
) -> Rollout:
    target = target or Target("web", "prod", "2", ("n1", "n2"))
    snapshot = Snapshot(reports, NOW, stale, held or [])
    return evaluate([target], snapshot, elapsed, timeout_s=timeout_s, silent_after_s=silent_after_s)


def both(node: str, status: str = "converged", version: str | None = "2") -> list[Reality]:
    return [rep(node, "preparer", status, version), rep(node, "setlive", status, version)]


# -- the verdict, with plain data --------------------------------------------------------------


def test_converged_when_every_node_reports_the_version_from_preparer_and_setlive() -> None:
    rollout = judge(both("n1") + both("n2"))
    assert rollout.result == "converged" and rollout.exit_code == EXIT_CONVERGED
    assert rollout.count("converged") == 2


def test_a_node_still_on_the_old_version_keeps_the_rollout_going() -> None:
    rollout = judge(both("n1") + both("n2", version="1"))
    assert rollout.result is None
    assert [n.node for n in rollout.pending()] == ["n2"]
    assert rollout.slowest() is not None and rollout.slowest().node == "n2"  # type: ignore[union-attr]


def test_iptables_applies_only_with_ports_and_where_it_reports() -> None:
    with_ports = Target("web", "prod", "2", ("n1", "n2"), ports=True)
    reports = both("n1") + both("n2") + [rep("n1", "iptables", "converging", "1")]
    rollout = judge(reports, target=with_ports)
    # n1 runs pp-iptables and it has not converged; n2 has no pp-iptables at all.
    assert [n.node for n in rollout.pending()] == ["n1"]
    assert {a.agent for a in rollout.nodes[1].agents} == {"preparer", "setlive"}
    # Without ports, the same report does not hold anything up.
    assert judge(reports).result == "converged"


def test_an_iptables_report_for_another_app_shows_the_agent_runs_on_the_node() -> None:
    other = Reality(node="n1", agent="iptables", app="api", status="converged", updated_at=NOW)
    rollout = judge(
        [*both("n1"), *both("n2"), other],
        target=Target("web", "prod", "2", ("n1", "n2"), ports=True),
    )
    assert rollout.nodes[0].agents[-1].agent == "iptables"
    assert rollout.nodes[0].agents[-1].state == "waiting"


def test_elb_registrar_applies_when_the_cluster_has_load_balancers() -> None:
    target = Target("web", "prod", "2", ("n1",), elb=True)
    waiting = rep(
        "n1", "elb-registrar", "converging", "1", error="waiting for version 2 to run here"
    )
    rollout = judge([*both("n1"), waiting], target=target)
    assert rollout.result is None
    assert rollout.nodes[0].reason == "elb-registrar: waiting for version 2 to run here"
    done = rep("n1", "elb-registrar", "converged", "2")
    assert judge([*both("n1"), done], target=target).result == "converged"


def test_a_setlive_rollback_fails_the_rollout_naming_node_agent_and_reason() -> None:
    rolled = rep(
        "n2",
        "setlive",
        "error",
        "1",
        error="2 failed its health gate (HTTP 500);\nrolled back to 1",
        details={"rolled_back_from": "2"},
    )
    rollout = judge([*both("n1"), rep("n2", "preparer"), rolled])
    assert rollout.result == "failed" and rollout.exit_code == EXIT_FAILED
    failed = rollout.nodes[1]
    assert failed.state == "rolled_back"
    assert failed.reason == "setlive: 2 failed its health gate (HTTP 500); rolled back to 1"
    assert "rolled back" in rollout_view.summary(rollout) and "n2 setlive:" in rollout_view.summary(
        rollout
    )


def test_an_error_from_any_agent_that_applies_fails_the_rollout() -> None:
    broken = rep("n1", "preparer", "error", "2", error="2: sha256 mismatch")
    rollout = judge([broken, rep("n1", "setlive", "converging", "1"), *both("n2")])
    assert rollout.result == "failed"
    assert rollout.nodes[0].reason == "preparer: 2: sha256 mismatch"


def test_an_error_written_before_the_change_is_not_this_rollouts() -> None:
    old = rep("n1", "setlive", "error", "1", error="1 is unhealthy")
    stale = frozenset({("n1", "setlive", "web")})
    rollout = judge([rep("n1", "preparer"), old, *both("n2")], stale=stale)
    assert rollout.result is None
    assert rollout.nodes[0].agents[1].message == "before the change: 1 is unhealthy"
    # The same report written again after the change is the rollout's.
    assert judge([rep("n1", "preparer"), old, *both("n2")]).result == "failed"


def test_a_rollback_of_the_version_recorded_before_a_retry_waits_for_setlive_to_try_again() -> None:
    rolled = rep("n1", "setlive", "error", "1", error="2 failed", details={"rolled_back_from": "2"})
    rollout = judge(
        [rep("n1", "preparer"), rolled, *both("n2")], stale=frozenset({("n1", "setlive", "web")})
    )
    assert rollout.result is None


def test_preparer_counts_once_the_desired_version_is_installed_whatever_another_version_does() -> (
    None
):
    preparer = rep(
        "n1",
        "preparer",
        "error",
        "2",
        error="3: 404",
        details={"versions": {"2": "installed", "3": "error: 404"}},
    )
    assert judge([preparer, rep("n1", "setlive"), *both("n2")]).result == "converged"
    fetching = rep("n1", "preparer", "converging", "2", details={"versions": {"2": "fetching"}})
    assert judge([fetching, rep("n1", "setlive"), *both("n2")]).result is None


def test_a_change_that_keeps_the_version_needs_reports_written_after_it() -> None:
    target = Target("web", "prod", "2", ("n1",), confirm=True)
    reports = both("n1")
    stale = frozenset({("n1", "preparer", "web"), ("n1", "setlive", "web")})
    before = judge(reports, target=target, stale=stale)
    assert before.result is None
    assert "waiting for a report after it" in before.nodes[0].reason
    assert (
        judge(reports, target=target, stale=frozenset({("n1", "preparer", "web")})).result is None
    )
    assert judge(reports, target=target).result == "converged"


def test_an_agent_without_a_report_for_longer_than_silent_after_is_silent() -> None:
    quiet = [
        rep("n2", "preparer", updated_at=NOW - 400),
        rep("n2", "setlive", "converging", "1", updated_at=NOW - 400),
    ]
    rollout = judge([*both("n1"), *quiet])
    node = rollout.nodes[1]
    assert node.state == "silent"
    assert node.reason == "setlive: no report for 6m"
    # Nothing else can move: the rollout is over, with its own exit code.
    assert rollout.result == "stalled" and rollout.exit_code == EXIT_STALLED


def test_a_silent_node_does_not_end_the_rollout_while_others_progress() -> None:
    quiet = [
        rep("n2", "preparer", updated_at=NOW - 400),
        rep("n2", "setlive", "converging", "1", updated_at=NOW - 400),
    ]
    rollout = judge([rep("n1", "preparer"), rep("n1", "setlive", "converging", "1"), *quiet])
    assert rollout.result is None
    assert [n.state for n in rollout.nodes] == ["converging", "silent"]


def test_silence_is_per_agent_over_all_its_reports_on_the_node() -> None:
    # setlive's report on web is old, but it reported on another app a moment ago.
    other = Reality(node="n2", agent="setlive", app="api", status="converged", updated_at=NOW - 1)
    quiet = [
        rep("n2", "preparer"),
        rep("n2", "setlive", "converging", "1", updated_at=NOW - 400),
        other,
    ]
    assert judge([*both("n1"), *quiet]).nodes[1].state == "converging"


def test_a_node_no_agent_ever_reported_on_is_silent_once_the_rollout_ran_silent_after() -> None:
    assert judge(both("n1"), elapsed=10).nodes[1].state == "converging"
    rollout = judge(both("n1"), elapsed=301)
    assert rollout.nodes[1].state == "silent"
    assert rollout.nodes[1].reason == (
        "preparer: never reported on this node; setlive: never reported on this node"
    )


def test_a_held_agent_is_named_and_ends_the_wait_when_nothing_else_moves() -> None:
    held = AgentStatus(node="n2", agent="setlive", state="held", reason="store identity changed")
    rollout = judge(
        [*both("n1"), rep("n2", "preparer"), rep("n2", "setlive", "converged", "1")], held=[held]
    )
    assert rollout.nodes[1].state == "held"
    assert rollout.nodes[1].reason == "setlive: held: store identity changed"
    assert rollout.result == "stalled"
    # A held agent that already converged holds nothing up.
    assert judge([*both("n1"), *both("n2")], held=[held]).result == "converged"


def test_timeout_names_the_nodes_still_pending() -> None:
    rollout = judge(
        [
            *both("n1"),
            rep("n2", "preparer"),
            rep("n2", "setlive", "converging", "1", error="waiting for a restart lease"),
        ],
        elapsed=600,
    )
    assert rollout.result == "timeout" and rollout.exit_code == EXIT_TIMEOUT
    assert "n2 (converging: setlive: waiting for a restart lease)" in rollout_view.summary(rollout)


def test_a_cluster_without_nodes_has_nothing_to_wait_for() -> None:
    assert judge([], target=Target("web", "prod", "2", ())).result == "converged"


def test_a_stopped_app_converges_on_no_version() -> None:
    target = Target("web", "prod", None, ("n1",))
    assert judge(both("n1", version=None), target=target).result == "converged"
    assert judge(both("n1"), target=target).result is None


def test_events_say_what_changed_then_how_it_ended() -> None:
    first = judge([rep("n1", "preparer"), rep("n1", "setlive", "converging", "1"), *both("n2")])
    initial = events(None, first)
    assert [(e.kind, e.fields.get("node"), e.fields.get("agent")) for e in initial] == [
        ("agent", "n1", "preparer"),
        ("agent", "n1", "setlive"),
        ("node", "n1", None),
        ("agent", "n2", "preparer"),
        ("agent", "n2", "setlive"),
        ("node", "n2", None),
    ]
    assert events(first, first) == []
    second = judge([*both("n1"), *both("n2")])
    changed = events(first, second)
    assert [(e.kind, e.fields.get("node"), e.fields.get("state")) for e in changed] == [
        ("agent", "n1", "converged"),
        ("node", "n1", "converged"),
        ("end", None, None),
    ]
    end = changed[-1].as_json()
    assert end["result"] == "converged" and end["exit_code"] == 0 and end["converged"] == 2
    json.dumps(end)


def test_status_summary_counts_per_cluster() -> None:
    targets = [Target("web", "prod", "2", ("n1", "n2")), Target("web", "canary", None, ())]
    held = AgentStatus(node="n2", agent="preparer", state="held", reason="x")
    reports = [*both("n1"), rep("n2", "preparer", "error", "2", error="boom"), rep("n2", "setlive")]
    rollout = evaluate(targets, Snapshot(reports, NOW, held=[held]), 0.0)
    assert rollout_view.summary_rows(rollout) == [
        ["web", "prod", "2", "1/2", "1", "-", "n2/preparer"],
        ["web", "canary", "(stopped)", "0/0", "-", "-", "-"],
    ]


def test_the_live_view_shows_counts_and_never_passes_on_terminal_sequences() -> None:
    hostile = "\x1b]0;owned\x07\x1b[2J[bold red]fake[/]"
    rollout = judge(
        [*both("n1"), rep("n2", "preparer"), rep("n2", "setlive", "converging", "1", error=hostile)]
    )
    out = io.StringIO()
    Console(file=out, width=120, force_terminal=True, color_system="truecolor").print(
        rollout_view.live(rollout)
    )
    text = out.getvalue()
    assert "\x1b]0;" not in text and "\x1b[2J" not in text
    assert "\\x1b]0;owned" in text and "[bold red]fake[/]" in text  # shown, not obeyed
    plain = io.StringIO()
    Console(file=plain, width=120).print(rollout_view.live(rollout))
    lines = plain.getvalue()
    assert "web/prod 2   1/2 converged" in lines
    assert "slowest: n2  setlive:" in lines
    assert "setlive" in lines and "preparer" in lines


# -- end to end: pp ... --wait against a real store ------------------------------------------


@pytest.fixture(params=["sqlite", pytest.param("consul", marks=pytest.mark.consul)])
def store_url(request: pytest.FixtureRequest, tmp_path: Path, ns: str) -> Iterator[tuple[str, str]]:
    """``(url, prefix)`` of a real store, the embedded one or Consul."""
    if request.param == "consul":
        yield f"consul://{request.getfixturevalue('consul_addr')}", ns
    else:
        yield f"sqlite://{tmp_path}/intent.db", "platypus/"


@pytest.fixture
def store(store_url: tuple[str, str]) -> Iterator[IntentStore]:
    url, prefix = store_url
    s = open_store(url, prefix)
    yield s
    s.close()


@pytest.fixture
def env(store_url: tuple[str, str]) -> dict[str, str]:
    url, prefix = store_url
    return {**os.environ, "PP_STORE": url, "PP_PREFIX": prefix, "PP_ACTOR": "tester"}


APP_FILE = f"""\
app: web
clusters:
  prod:
    config:
      versions: {{"1": {{state: active, sha256: {A}}}}}
    deploy_config: {{basedir: /srv/web}}
    nodes: [n1, n2]
"""


def pp(env: dict[str, str], *args: str, timeout: float = 60) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [str(PP_BIN), *args], env=env, capture_output=True, text=True, timeout=timeout, check=False
    )


def active(store: IntentStore) -> str | None:
    raw = store.get_raw(keys.config("web", "prod"))
    return AppConfig.model_validate_json(raw.value).active_version if raw else None


def report(
    store: IntentStore, node: str, agent: str, status: str, version: str | None, **kw: Any
) -> None:
    store.write_reality(
        Reality(node=node, agent=agent, app="web", status=status, version=version, **kw)  # type: ignore[arg-type]
    )


class Echoer:
    """Writes what pp-preparer and pp-setlive would report on each node once they see
    the active version change: ``outcome(node, version)`` decides setlive's verdict."""

    def __init__(
        self,
        store: IntentStore,
        nodes: list[str],
        outcome: Callable[[str, str], str] = lambda n, v: "ok",
    ) -> None:
        self.store, self.nodes, self.outcome = store, nodes, outcome
        self.stop = threading.Event()
        self.thread = threading.Thread(target=self._run, daemon=True)
        self.seen: str | None = active(store)

    def __enter__(self) -> Echoer:
        self.thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop.set()
        self.thread.join(10)

    def _run(self) -> None:
        while not self.stop.is_set():
            version = active(self.store)
            if version is not None and version != self.seen:
                self.seen = version
                for node in self.nodes:
                    report(
                        self.store,
                        node,
                        "preparer",
                        "converging",
                        version,
                        details={"versions": {version: "fetching"}},
                    )
                    time.sleep(0.05)
                    report(
                        self.store,
                        node,
                        "preparer",
                        "converged",
                        version,
                        details={"versions": {version: "installed"}},
                    )
                    report(self.store, node, "setlive", "converging", version, error="gating")
                    time.sleep(0.05)
                    if self.outcome(node, version) == "ok":
                        report(self.store, node, "setlive", "converged", version)
                    else:
                        report(
                            self.store, node, "setlive", "error", "1",
                            error=f"{version} failed its health gate (HTTP 503); rolled back to 1",
                            details={"rolled_back_from": version},
                        )  # fmt: skip
            self.stop.wait(0.02)


def pp_reacting(
    env: dict[str, str], args: list[str], marker: str, react: Callable[[], None]
) -> tuple[int, list[str]]:
    """Run pp, call ``react`` once a line of its output holds ``marker`` (so what it
    writes comes after pp read the store), and return the exit code and every line."""
    proc = subprocess.Popen(
        [str(PP_BIN), *args], env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True
    )
    assert proc.stdout is not None and proc.stderr is not None
    seen = []
    for line in proc.stdout:
        seen.append(line)
        if marker in line:
            react()
            break
    seen.extend(proc.stdout)
    code = proc.wait(30)
    seen.extend(proc.stderr)
    proc.stdout.close()
    proc.stderr.close()
    return code, seen


@pytest.fixture
def web(env: dict[str, str], store: IntentStore, tmp_path: Path) -> IntentStore:
    app = tmp_path / "web.yaml"
    app.write_text(APP_FILE)
    assert pp(env, "apply", "-f", str(app)).returncode == 0
    for node in ("n1", "n2"):
        report(store, node, "preparer", "converged", "1")
        report(store, node, "setlive", "converged", "1")
    return store


def test_deploy_wait_follows_every_node_to_the_new_version_and_exits_0(
    env: dict[str, str], web: IntentStore
) -> None:
    with Echoer(web, ["n1", "n2"]):
        result = pp(
            env, "deploy", "web", "2", "-c", "prod", "--sha256", B, "--wait", "--timeout", "30"
        )
    assert result.returncode == 0, result.stdout + result.stderr
    lines = result.stdout.splitlines()
    assert lines[0] == "web/prod: 2 is active (1 kept as prep)"
    assert any(line.endswith("n1  setlive converged 2") for line in lines), lines
    assert any(line.endswith("n2  node converged") for line in lines), lines
    assert lines[-1].startswith("web/prod 2: converged on 2/2 node(s) in ")


def test_deploy_wait_exits_3_naming_the_node_that_rolled_back(
    env: dict[str, str], web: IntentStore
) -> None:
    with Echoer(web, ["n1", "n2"], outcome=lambda node, v: "ok" if node == "n1" else "bad"):
        result = pp(
            env, "deploy", "web", "2", "-c", "prod", "--sha256", B, "--wait", "--timeout", "30"
        )
    assert result.returncode == EXIT_FAILED, result.stdout + result.stderr
    error = result.stderr.strip().splitlines()[-1]
    assert error.startswith("pp: error: web/prod 2: rolled back after ")
    assert error.endswith(
        "on 1 node(s): n2 setlive: 2 failed its health gate (HTTP 503); rolled back to 1"
    )


def test_deploy_wait_times_out_with_exit_4_naming_pending_nodes(
    env: dict[str, str], web: IntentStore
) -> None:
    result = pp(env, "deploy", "web", "2", "-c", "prod", "--sha256", B, "--wait", "--timeout", "1")
    assert result.returncode == EXIT_TIMEOUT
    error = result.stderr.strip().splitlines()[-1]
    assert (
        "timed out after 1s, 0/2 converged; pending: n1 (converging: preparer: converged on 1"
        in error
    )
    assert "n2 (converging:" in error


def test_deploy_wait_ends_early_on_silent_and_held_nodes(
    env: dict[str, str], web: IntentStore
) -> None:
    old = time.time() - 1000
    for agent in ("preparer", "setlive"):
        # As a dead agent left it (write_reality would keep the newer heartbeat).
        stale = Reality(node="n1", agent=agent, app="web", status="converged", version="1",
                        updated_at=old, since=old)  # fmt: skip
        web.put_json(keys.reality("n1", agent, "web"), stale.model_dump(mode="json"))
    web.write_agent_status(
        AgentStatus(node="n2", agent="preparer", state="held", reason="store replaced")
    )
    web.write_agent_status(
        AgentStatus(node="n2", agent="setlive", state="held", reason="store replaced")
    )
    started = time.monotonic()
    result = pp(
        env, "deploy", "web", "2", "-c", "prod", "--sha256", B, "--wait", "--silent-after", "60"
    )
    assert result.returncode == EXIT_STALLED, result.stdout + result.stderr
    assert time.monotonic() - started < 60  # well before --timeout's 600 s
    error = result.stderr.strip().splitlines()[-1]
    assert "n1 (silent: preparer: no report for 16m; setlive: no report for 16m)" in error
    assert "n2 (held: preparer: held: store replaced; setlive: held: store replaced)" in error


def test_an_error_left_from_before_the_deploy_does_not_fail_it(
    env: dict[str, str], web: IntentStore
) -> None:
    report(web, "n1", "setlive", "error", "1", error="1 is unhealthy: connection refused")
    with Echoer(web, ["n1", "n2"]):
        result = pp(
            env, "deploy", "web", "2", "-c", "prod", "--sha256", B, "--wait", "--timeout", "30"
        )
    assert result.returncode == 0, result.stdout + result.stderr


def test_deploy_wait_json_prints_one_event_object_per_line(
    env: dict[str, str], web: IntentStore
) -> None:
    with Echoer(web, ["n1", "n2"]):
        result = pp(env, "deploy", "web", "2", "-c", "prod", "--sha256", B, "--wait", "--json")
    assert result.returncode == 0, result.stderr
    events_seen = [json.loads(line) for line in result.stdout.splitlines()]
    assert {e["event"] for e in events_seen} == {"agent", "node", "end"}
    assert events_seen[-1]["result"] == "converged" and events_seen[-1]["nodes"] == 2
    # pp's own lines went to stderr, so stdout is JSON only.
    assert "web/prod: 2 is active (1 kept as prep)" in result.stderr


def test_rollback_wait_follows_the_version_made_active_again(
    env: dict[str, str], web: IntentStore
) -> None:
    with Echoer(web, ["n1", "n2"]):
        assert pp(env, "deploy", "web", "2", "-c", "prod", "--sha256", B, "--wait").returncode == 0
        result = pp(env, "rollback", "web", "-c", "prod", "--wait", "--timeout", "30")
    assert result.returncode == 0, result.stdout + result.stderr
    assert result.stdout.splitlines()[-1].startswith("web/prod 1: converged on 2/2")


def test_retry_wait_ignores_the_rollback_recorded_before_it(
    env: dict[str, str], web: IntentStore
) -> None:
    with Echoer(web, ["n1", "n2"], outcome=lambda node, v: "ok" if node == "n1" else "bad"):
        failed = pp(env, "deploy", "web", "2", "-c", "prod", "--sha256", B, "--wait")
    assert failed.returncode == EXIT_FAILED
    # Until setlive tries again, its report still says rolled back: pp waits on it.
    code, seen = pp_reacting(
        env,
        ["retry", "web", "--node", "n2", "--wait", "--timeout", "30"],
        "n2  node converging  setlive: before the change: 2 failed its health gate",
        lambda: report(web, "n2", "setlive", "converged", "2"),  # the retry passed its gate
    )
    assert code == 0, "".join(seen)
    assert seen[-1].startswith("web/prod 2: converged on 1/1")


def test_apply_wait_of_a_config_change_waits_for_reports_written_after_it(
    env: dict[str, str], web: IntentStore, tmp_path: Path
) -> None:
    changed = tmp_path / "changed.yaml"
    changed.write_text(APP_FILE.replace("{basedir: /srv/web}", "{basedir: /srv/web, env: {A: b}}"))

    def restart() -> None:
        for node in ("n1", "n2"):
            report(web, node, "setlive", "converging", "1", error="restarting")
            report(web, node, "setlive", "converged", "1")
            report(web, node, "preparer", "converged", "1", details={"pass": 2})

    # Every node said converged before the change: pp waits for what comes after.
    code, seen = pp_reacting(
        env,
        ["apply", "-f", str(changed), "--wait", "--timeout", "30"],
        "n2  node converging  preparer: converged before the change",
        restart,
    )
    assert code == 0, "".join(seen)
    assert seen[-1].startswith("web/prod 1: converged on 2/2")


def test_wait_flags_without_wait_are_a_usage_error(env: dict[str, str], web: IntentStore) -> None:
    result = pp(env, "deploy", "web", "2", "-c", "prod", "--sha256", B, "--json")
    assert result.returncode == 2
    assert result.stderr.strip() == "pp: error: --json given without --wait"
    assert active(web) == "1"  # refused before anything was written


def test_deploy_wait_on_a_terminal_draws_a_live_view_and_ends_with_the_summary(
    env: dict[str, str], web: IntentStore
) -> None:
    leader, follower = pty.openpty()
    with Echoer(web, ["n1", "n2"]):
        proc = subprocess.Popen(
            [
                str(PP_BIN),
                "deploy",
                "web",
                "2",
                "-c",
                "prod",
                "--sha256",
                B,
                "--wait",
                "--timeout",
                "30",
            ],
            env={**env, "COLUMNS": "100", "TERM": "xterm"},
            stdin=subprocess.DEVNULL,
            stdout=follower,
            stderr=subprocess.PIPE,
        )
        os.close(follower)
        screen = b""
        while True:
            ready, _, _ = select.select([leader], [], [], 30)
            if not ready:
                break
            try:
                chunk = os.read(leader, 65536)
            except OSError:  # the terminal closed: pp exited
                break
            if not chunk:
                break
            screen += chunk
        code = proc.wait(30)
        assert proc.stderr is not None
        proc.stderr.close()
    os.close(leader)
    text = screen.decode(errors="replace")
    assert code == 0, text
    assert "CONVERGED" in text and "CONVERGING" in text  # the live table was drawn
    assert "2/2 converged" in text
    assert "web/prod 2: converged on 2/2 node(s)" in text


def test_status_prints_a_summary_per_app_and_cluster(
    web: IntentStore, store_url: tuple[str, str]
) -> None:
    report(web, "n2", "setlive", "error", "1", error="boom")
    url, prefix = store_url
    result = CliRunner().invoke(cli.cli, ["--store", url, "--prefix", prefix, "status"])
    assert result.exit_code == 0, result.output
    lines = result.output.splitlines()
    assert lines[0].split() == [
        "APP",
        "CLUSTER",
        "DESIRED",
        "CONVERGED",
        "ERRORS",
        "SILENT",
        "HELD",
    ]
    assert lines[1].split() == ["web", "prod", "1", "1/2", "1", "-", "-"]
    assert lines[2] == ""
    assert lines[3].startswith("NODE")


def test_status_summary_shows_clusters_whose_intent_is_missing_or_invalid(
    web: IntentStore, store_url: tuple[str, str]
) -> None:
    web.put_json(keys.node_app("n3", "web"), {"cluster": "canary"})  # no intent for canary
    web.put_json(keys.node_app("n4", "web"), {"custer": "prod"})  # misspelt: invalid
    web.put_json(keys.config("api", "prod"), {"versions": "nope"})
    url, prefix = store_url
    result = CliRunner().invoke(cli.cli, ["--store", url, "--prefix", prefix, "status"])
    assert result.exit_code == 0, result.output
    rows = [line.split()[:4] for line in result.output.split("\n\n")[0].splitlines()[1:]]
    assert rows == [
        ["api", "prod", "invalid", "0/0"],
        ["web", "<invalid>", "invalid", "0/1"],
        ["web", "canary", "missing", "0/1"],
        ["web", "prod", "1", "2/2"],
    ]
