"""The pp CLI end to end against a real embedded store: outputs, exit codes, races."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
import yaml
from click.testing import CliRunner, Result

from intent import cli, keys
from intent.cli.appfile import read_app_file
from intent.model import AgentStatus, AppConfig, Reality
from intent.store import IntentStore
from intent.store.sqlite import SqliteStore

REPO = Path(__file__).resolve().parent.parent
PP_BIN = REPO / ".venv" / "bin" / "pp"
A, B, C = "a" * 64, "b" * 64, "c" * 64

HELLO = f"""\
app: hello
clusters:
  production:
    config:
      versions: {{"1.0.0": {{state: active, sha256: {A}}}}}
      min_nodes: 1
      user_config: {{greeting: hi}}
    deploy_config:
      basedir: /srv/hello
      run_as: hello
      ports: [{{name: http, port: 8080, public_port: 80}}]
      health_check: {{type: http, port: 8080, path: /health}}
    nodes: [web1, web2]
"""

Pp = Callable[..., Result]


@pytest.fixture
def url(tmp_path: Path) -> str:
    return f"sqlite://{tmp_path}/intent.db"


@pytest.fixture
def store(url: str) -> Iterator[IntentStore]:
    s = IntentStore(SqliteStore(url.removeprefix("sqlite://")))
    yield s
    s.close()


@pytest.fixture
def pp(url: str, monkeypatch: pytest.MonkeyPatch) -> Pp:
    monkeypatch.setenv("PP_ACTOR", "tester")
    monkeypatch.delenv("PP_STORE", raising=False)
    monkeypatch.delenv("PP_PREFIX", raising=False)

    def run(*args: str, stdin: str | None = None) -> Result:
        return CliRunner().invoke(cli.cli, ["--store", url, *args], input=stdin)

    return run


def write(tmp_path: Path, name: str, text: str) -> str:
    path = tmp_path / name
    path.write_text(text)
    return str(path)


def stored(store: IntentStore, key: str) -> Any:
    raw = store.get_raw(key)
    return json.loads(raw.value) if raw else None


def one_error_line(result: Result) -> str:
    """The single ``pp: error:`` line a failure must produce, and nothing else."""
    assert result.exit_code != 0, result.output
    assert result.stderr.count("\n") == 1, result.stderr
    assert result.stderr.startswith("pp: error: "), result.stderr
    assert "Traceback" not in result.output
    return result.stderr.strip()


@pytest.fixture
def hello(pp: Pp, tmp_path: Path) -> str:
    path = write(tmp_path, "hello.yaml", HELLO)
    assert pp("apply", "-f", path).exit_code == 0
    return path


# -- apply -------------------------------------------------------------------------------


def test_apply_dry_run_shows_the_diff_and_writes_nothing(
    pp: Pp, tmp_path: Path, store: IntentStore
) -> None:
    result = pp("apply", "--dry-run", "-f", write(tmp_path, "hello.yaml", HELLO))
    assert result.exit_code == 0, result.output
    assert "+++ b/clusters/hello/production/deploy_config" in result.stdout
    assert '+  "basedir": "/srv/hello",' in result.stdout
    assert "+++ b/nodes/web2/hello" in result.stdout
    assert "hello: 4 key(s) would change (dry run, nothing written)" in result.stdout
    assert store.clusters_of("hello") == []
    assert store.nodes_of("hello") == {}


def test_apply_writes_every_key_then_reports_up_to_date(
    pp: Pp, hello: str, store: IntentStore
) -> None:
    assert stored(store, keys.config("hello", "production")) == {
        "versions": {"1.0.0": {"state": "active", "sha256": A}},
        "min_nodes": 1,
        "user_config": {"greeting": "hi"},
    }
    assert store.nodes_of("hello") == {"web1": "production", "web2": "production"}
    assert [r.action for r in store.history("hello")] == ["apply"] * 4
    again = pp("apply", "-f", hello)
    assert again.stdout == "hello: up to date\n"


def test_apply_diff_shows_only_the_changed_lines_of_the_changed_key(
    pp: Pp, hello: str, tmp_path: Path
) -> None:
    changed = write(tmp_path, "v2.yaml", HELLO.replace("greeting: hi", "greeting: hello"))
    result = pp("apply", "-f", changed)
    assert result.exit_code == 0
    assert result.stdout.count("+++ ") == 1
    assert '-    "greeting": "hi"\n+    "greeting": "hello"\n' in result.stdout
    assert "hello: 1 key(s) written" in result.stdout


def test_invalid_app_file_is_one_line_naming_file_cluster_field_and_nothing_is_written(
    pp: Pp, tmp_path: Path, store: IntentStore
) -> None:
    good = write(tmp_path, "echo.yaml", HELLO.replace("app: hello", "app: echo"))
    bad = write(tmp_path, "bad.yaml", HELLO.replace("basedir: /srv/hello", "basedir: srv"))
    line = one_error_line(pp("apply", "-f", good, "-f", bad))
    assert line == (
        f"pp: error: {bad}: clusters.production.deploy_config.basedir: must be an absolute path"
    )
    assert store.clusters_of("echo") == []


def test_apply_leaves_nodes_missing_from_the_file_unless_pruning(
    pp: Pp, hello: str, tmp_path: Path, store: IntentStore
) -> None:
    fewer = write(tmp_path, "fewer.yaml", HELLO.replace("[web1, web2]", "[web1]"))
    assert pp("apply", "-f", fewer).stdout == "hello: up to date\n"
    assert set(store.nodes_of("hello")) == {"web1", "web2"}
    result = pp("apply", "--prune-nodes", "-f", fewer)
    assert "--- a/nodes/web2/hello\n+++ /dev/null" in result.stdout
    assert set(store.nodes_of("hello")) == {"web1"}


def test_apply_warns_when_a_version_changes_its_artifact(
    pp: Pp, hello: str, tmp_path: Path, store: IntentStore
) -> None:
    result = pp("apply", "-f", write(tmp_path, "new-sha.yaml", HELLO.replace(A, B)))
    assert result.exit_code == 0
    assert result.stderr == (
        "pp: warning: clusters/hello/production/config: version 1.0.0 gets a different sha256;"
        " a version's artifact is meant never to change, so prefer a new version\n"
    )
    assert stored(store, keys.config("hello", "production"))["versions"]["1.0.0"]["sha256"] == B


def test_apply_reads_stdin(pp: Pp, store: IntentStore) -> None:
    assert pp("apply", "-f", "-", stdin=HELLO).exit_code == 0
    assert store.clusters_of("hello") == ["production"]


def test_validate_checks_a_file_without_a_store(pp: Pp, tmp_path: Path) -> None:
    result = CliRunner().invoke(
        cli.cli, ["--store", "nope://", "validate", write(tmp_path, "h.yaml", HELLO)]
    )
    assert result.exit_code == 0, result.output
    assert "ok (app hello; clusters production; 2 node(s))" in result.stdout
    bad = write(tmp_path, "bad.yaml", HELLO.replace("port: 8080,", "port: 0,"))
    assert "ports.0.port" in one_error_line(pp("validate", bad))


# -- get ---------------------------------------------------------------------------------


def test_get_prints_an_app_file_that_applies_back_unchanged(
    pp: Pp, hello: str, tmp_path: Path
) -> None:
    result = pp("get", "hello")
    assert result.exit_code == 0, result.output
    document = yaml.safe_load(result.stdout)
    assert document["clusters"]["production"]["nodes"] == ["web1", "web2"]
    assert document["clusters"]["production"]["deploy_config"]["basedir"] == "/srv/hello"
    round_trip = write(tmp_path, "got.yaml", result.stdout)
    assert pp("apply", "--prune-nodes", "-f", round_trip).stdout == "hello: up to date\n"


def test_get_json_holds_every_cluster(pp: Pp, hello: str) -> None:
    assert pp("deploy", "hello", "2.0", "-c", "staging", "--sha256", B).exit_code == 0
    document = json.loads(pp("get", "hello", "--json").stdout)
    assert sorted(document["clusters"]) == ["production", "staging"]
    assert document["clusters"]["staging"] == {
        "config": {"versions": {"2.0": {"sha256": B, "state": "active"}}},
        "nodes": [],
    }


def test_get_of_invalid_stored_intent_exits_non_zero_naming_the_key(
    pp: Pp, hello: str, store: IntentStore
) -> None:
    # As an operator could with `consul kv put`: a typo and a value that is not JSON.
    store.put_json(keys.config("hello", "production"), {"versions": {}, "min_node": 1})
    store.kv.put(store.prefix + keys.node_app("web2", "hello"), b"production")
    result = pp("get", "hello")
    line = one_error_line(result)
    assert "clusters/hello/production/config: min_node: Extra inputs are not permitted" in line
    assert "nodes/web2/hello: not valid JSON" in line
    assert "min_node" in result.stdout  # the stored value is still shown, to be fixed


def test_get_reports_a_cluster_that_nodes_run_but_has_no_intent(
    pp: Pp, hello: str, store: IntentStore
) -> None:
    store.put_json(keys.node_app("web3", "hello"), {"cluster": "canary"})
    line = one_error_line(pp("get", "hello"))
    assert "clusters/hello/canary/config: missing, yet web3 run this cluster" in line


def test_get_reports_an_invalid_assignment_even_when_it_is_all_there_is(
    pp: Pp, store: IntentStore
) -> None:
    store.put_json(keys.node_app("web1", "lonely"), {"cluser": "production"})
    line = one_error_line(pp("get", "lonely"))
    assert line.startswith("pp: error: nodes/web1/lonely: cluster: Field required; cluser: Extra")


def test_get_of_an_unknown_app_is_an_error(pp: Pp) -> None:
    assert (
        one_error_line(pp("get", "nope"))
        == "pp: error: no intent for app nope under prefix 'platypus/'"
    )


# -- deploy, rollback --------------------------------------------------------------------


def active_and_states(store: IntentStore, cluster: str = "production") -> dict[str, str]:
    config = AppConfig.model_validate(stored(store, keys.config("hello", cluster)))
    return {name: spec.state for name, spec in config.versions.items()}


def test_deploy_activates_the_new_version_and_keeps_the_old_as_prep(
    pp: Pp, hello: str, store: IntentStore
) -> None:
    result = pp("deploy", "hello", "1.1.0", "-c", "production", "--sha256", B, "--url", "file:///x")
    assert result.exit_code == 0, result.output
    assert result.stdout == "hello/production: 1.1.0 is active (1.0.0 kept as prep)\n"
    assert result.stderr == ""
    assert active_and_states(store) == {"1.0.0": "prep", "1.1.0": "active"}
    record = store.history("hello")[-1]
    assert (record.action, record.actor) == ("deploy", "tester")
    assert record.old["versions"]["1.0.0"]["state"] == "active"
    assert record.new["versions"]["1.1.0"] == {"state": "active", "sha256": B, "url": "file:///x"}
    again = pp("deploy", "hello", "1.1.0", "-c", "production", "--sha256", B)
    assert "already active, nothing changed" in again.stdout
    assert len(store.history("hello")) == 5


def test_deploy_creates_the_config_and_warns_that_deploy_config_is_missing(
    pp: Pp, store: IntentStore
) -> None:
    result = pp("deploy", "hello", "1.0.0", "--cluster", "staging", "--sha256", A)
    assert result.exit_code == 0
    assert result.stdout == "hello/staging: 1.0.0 is active (config created)\n"
    assert result.stderr.startswith("pp: warning: clusters/hello/staging/deploy_config is missing")
    assert active_and_states(store, "staging") == {"1.0.0": "active"}


def test_deploy_of_an_existing_version_with_another_sha256_is_refused(
    pp: Pp, hello: str, store: IntentStore
) -> None:
    line = one_error_line(pp("deploy", "hello", "1.0.0", "-c", "production", "--sha256", B))
    assert "version 1.0.0 already exists with sha256" in line
    assert len(store.history("hello")) == 4


def test_rollback_makes_the_previous_version_active_again(
    pp: Pp, hello: str, store: IntentStore
) -> None:
    pp("deploy", "hello", "1.1.0", "-c", "production", "--sha256", B)
    pp("deploy", "hello", "1.2.0", "-c", "production", "--sha256", C)
    result = pp("rollback", "hello", "-c", "production")
    assert result.exit_code == 0, result.output
    assert result.stdout == "hello/production: rolled back to 1.1.0 (1.2.0 kept as prep)\n"
    assert active_and_states(store) == {"1.0.0": "prep", "1.1.0": "active", "1.2.0": "prep"}
    assert store.history("hello")[-1].action == "rollback"
    assert pp("rollback", "hello", "-c", "production", "--to", "1.0.0").exit_code == 0
    assert active_and_states(store)["1.0.0"] == "active"


def test_rollback_asks_for_to_when_the_audit_trail_cannot_tell(
    pp: Pp, hello: str, store: IntentStore
) -> None:
    # Written with the stock tools, so the audit trail knows nothing of it.
    store.put_json(
        keys.config("hello", "production"),
        {
            "versions": {
                "1": {"state": "prep", "sha256": A},
                "2": {"state": "prep", "sha256": B},
                "3": {"state": "active", "sha256": C},
            }
        },
    )
    line = one_error_line(pp("rollback", "hello", "-c", "production"))
    assert "several prep versions (1, 2)" in line
    assert "--to VERSION" in line


def test_rollback_of_a_cluster_without_config_is_an_error(pp: Pp) -> None:
    line = one_error_line(pp("rollback", "hello", "-c", "production"))
    assert line == "pp: error: clusters/hello/production/config: missing; nothing to roll back"


# -- assign, unassign --------------------------------------------------------------------


def test_assign_and_unassign_nodes(pp: Pp, hello: str, store: IntentStore) -> None:
    result = pp("assign", "hello", "-c", "production", "web3", "web1")
    assert result.stdout == "web3: runs hello/production\nweb1: already runs hello/production\n"
    assert pp("assign", "hello", "-c", "staging", "web3").stdout == (
        "web3: runs hello/staging (was production)\n"
    )
    assert "has no cluster staging yet" in pp("assign", "hello", "-c", "staging", "web4").stderr
    assert store.nodes_of("hello") == {
        "web1": "production",
        "web2": "production",
        "web3": "staging",
        "web4": "staging",
    }
    assert pp("unassign", "hello", "web3", "web4").stdout == (
        "web3: no longer runs hello\nweb4: no longer runs hello\n"
    )
    assert set(store.nodes_of("hello")) == {"web1", "web2"}
    actions = [r.action for r in store.history("hello")[4:]]
    assert actions == ["assign", "assign", "assign", "unassign", "unassign"]


def test_unassign_of_a_node_not_running_the_app_changes_nothing(
    pp: Pp, hello: str, store: IntentStore
) -> None:
    line = one_error_line(pp("unassign", "hello", "web1", "web10"))
    assert line == "pp: error: hello is not assigned to web10 (assigned: web1, web2)"
    assert set(store.nodes_of("hello")) == {"web1", "web2"}


def test_a_bad_node_name_is_refused_before_anything_is_written(
    pp: Pp, hello: str, store: IntentStore
) -> None:
    line = one_error_line(pp("assign", "hello", "-c", "production", "web3", "../etc"))
    assert line.startswith("pp: error: node '../etc': use 1-64 letters")
    assert "web3" not in store.nodes_of("hello")


# -- status, history ---------------------------------------------------------------------


def report(store: IntentStore, **fields: Any) -> None:
    now = time.time()
    values: dict[str, Any] = {"agent": "preparer", "app": "hello", "updated_at": now, "since": now}
    values.update(fields)
    store.write_reality(Reality(**values))


def detail_rows(output: str) -> list[str]:
    """pp status's rows below its per-cluster summary (tests/test_rollout.py covers that)."""
    lines = output.splitlines()
    return lines[next(n for n, line in enumerate(lines) if line.startswith("NODE")) :]


def test_status_shows_a_row_per_node_agent_and_app_with_age_and_message(
    pp: Pp, hello: str, store: IntentStore
) -> None:
    now = time.time()
    report(store, node="web1", status="converged", version="1.0.0", since=now - 7200)
    report(store, node="web2", status="error", error="fetch failed:\n404", since=now - 300)
    report(store, node="web2", agent="setlive", status="converging", since=now - 3)
    report(store, node="web9", app="echo", status="converged", since=now - 5)
    result = pp("status", "hello")
    assert result.exit_code == 0, result.output
    lines = detail_rows(result.stdout)
    assert lines[0].split() == ["NODE", "AGENT", "APP", "STATUS", "VERSION", "AGE", "MESSAGE"]
    assert lines[1].split() == [
        "web1",
        "preparer",
        "hello",
        "converged",
        "installed",
        "1.0.0",
        "2h",
    ]
    assert lines[2].split() == [
        "web2",
        "preparer",
        "hello",
        "error",
        "-",
        "5m",
        "fetch",
        "failed:",
        "404",
    ]
    assert lines[3].split() == ["web2", "setlive", "hello", "converging", "-", "3s"]
    assert len(lines) == 4
    assert "web9" in pp("status").stdout
    assert "web1" not in pp("status", "--node", "web9").stdout


def test_status_after_a_rollback_says_how_each_agent_made_its_version_real(
    pp: Pp, hello: str, store: IntentStore
) -> None:
    rolled_back = "2.0 failed its health gate (http: 503); rolled back to 1.0"
    report(store, node="web1", status="converged", version="2.0")
    report(store, node="web1", agent="setlive", status="error", version="1.0", error=rolled_back)
    report(store, node="web1", agent="elb-registrar", status="converged", version="1.0")
    report(store, node="web1", agent="iptables", status="converged", version="2.0")
    report(store, node="web1", agent="newcomer", status="converged", version="1.0")
    rows = {
        line.split()[1]: line.split()[3:6] for line in detail_rows(pp("status", "hello").stdout)
    }
    assert rows["preparer"] == ["converged", "installed", "2.0"]
    assert rows["setlive"] == ["error", "running", "1.0"]
    assert rows["elb-registrar"] == ["converged", "running", "1.0"]
    assert rows["iptables"] == ["converged", "mapped", "2.0"]
    assert rows["newcomer"][:2] == ["converged", "1.0"]  # an agent pp does not know: as stored


def test_status_calls_out_stale_reports_and_nodes_nobody_reported_on(
    pp: Pp, hello: str, store: IntentStore
) -> None:
    long_ago = time.time() - 600
    report(store, node="web1", status="converged", updated_at=long_ago, since=long_ago)
    lines = detail_rows(pp("status", "hello").stdout)
    assert lines[1].endswith("10m  no report for 10m")
    assert lines[2].split() == [
        "web2",
        "-",
        "hello",
        "unknown",
        "-",
        "-",
        "no",
        "agent",
        "has",
        "reported",
        "yet",
    ]


def test_status_json_dumps_the_reality_reports(pp: Pp, hello: str, store: IntentStore) -> None:
    report(store, node="web1", status="error", error="boom")
    (only,) = json.loads(pp("status", "--json", "--node", "web1").stdout)
    assert Reality.model_validate(only).error == "boom"
    assert json.loads(pp("status", "--json", "--node", "web2").stdout) == []


def test_history_lists_every_change_with_actor_and_summary(pp: Pp, hello: str) -> None:
    pp("deploy", "hello", "1.1.0", "-c", "production", "--sha256", B)
    lines = pp("history", "hello").stdout.splitlines()
    assert lines[0].split() == ["TIME", "ACTOR", "ACTION", "KEY", "CHANGE"]
    assert len(lines) == 6
    assert "tester  deploy  clusters/hello/production/config" in lines[-1]
    assert 'versions.1.0.0.state: "active" -> "prep"' in lines[-1]
    records = json.loads(pp("history", "hello", "--json").stdout)
    assert [r["action"] for r in records] == ["apply"] * 4 + ["deploy"]
    assert records[-1]["new"]["versions"]["1.1.0"]["state"] == "active"


# -- schema ------------------------------------------------------------------------------


def test_schema_is_json_schema_with_every_model_and_accepts_the_app_file(pp: Pp) -> None:
    import jsonschema  # type: ignore[import-untyped]  # with moto[server], a test dependency

    result = CliRunner().invoke(cli.cli, ["schema"])
    schema = json.loads(result.stdout)
    for model in (
        "AppFile",
        "AppConfig",
        "DeployConfig",
        "NodeAssignment",
        "Reality",
        "AuditRecord",
    ):
        assert model in schema["$defs"]
    jsonschema.Draft202012Validator.check_schema(schema)
    validator = jsonschema.Draft202012Validator(schema)
    validator.validate(yaml.safe_load(HELLO))
    assert not validator.is_valid(yaml.safe_load(HELLO.replace("min_nodes", "min_node")))


def test_the_published_schema_is_what_pp_schema_prints() -> None:
    result = CliRunner().invoke(cli.cli, ["schema"])
    assert (REPO / "docs" / "intent.schema.json").read_text() == result.stdout, (
        "regenerate with: pp schema > docs/intent.schema.json"
    )


# -- errors ------------------------------------------------------------------------------


def test_usage_errors_are_one_line_with_exit_code_2(pp: Pp) -> None:
    result = pp("deploy", "hello", "1.0.0", "--sha256", A)
    assert one_error_line(result) == (
        "pp: error: Missing option '-c' / '--cluster'. (see 'pp deploy --help')"
    )
    assert result.exit_code == 2


def test_an_unusable_store_is_one_line(pp: Pp) -> None:
    result = CliRunner().invoke(cli.cli, ["--store", "ftp://x", "get", "hello"])
    assert one_error_line(result) == (
        "pp: error: store URL 'ftp://x': scheme must be sqlite:// or consul://"
    )


# -- racing operators --------------------------------------------------------------------


def race_two_deploys(
    store_args: list[str], store: IntentStore, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Two operators deploy at once; both read the config before either writes, so one
    compare-and-set must fail and that operator must retry from a fresh read."""
    both_read = threading.Barrier(2)
    waited = threading.local()
    config_reads = []
    real_get_raw = IntentStore.get_raw

    def get_raw(self: IntentStore, key: str) -> Any:
        value = real_get_raw(self, key)
        if key.endswith("/config"):
            config_reads.append(key)
            if not getattr(waited, "done", False):
                waited.done = True
                both_read.wait(timeout=10)
        return value

    monkeypatch.setattr(IntentStore, "get_raw", get_raw)
    codes: dict[str, int] = {}

    def deploy(version: str, sha: str) -> None:
        argv = [*store_args, "deploy", "hello", version, "-c", "production", "--sha256", sha]
        codes[version] = cli.main(argv)

    threads = [threading.Thread(target=deploy, args=v) for v in (("2.0.0", B), ("3.0.0", C))]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(timeout=30)
    monkeypatch.undo()
    assert codes == {"2.0.0": 0, "3.0.0": 0}
    assert len(config_reads) >= 3, "the race did not happen: no write was retried"
    deploys = [r for r in store.history("hello") if r.action == "deploy"]
    assert len(deploys) == 2
    first = next(v for v, s in deploys[0].new["versions"].items() if s["state"] == "active")
    last = next(v for v, s in deploys[1].new["versions"].items() if s["state"] == "active")
    assert {first, last} == {"2.0.0", "3.0.0"}
    assert active_and_states(store) == {"1.0.0": "prep", first: "prep", last: "active"}


def test_two_operators_deploying_at_once_lose_no_write(
    hello: str, url: str, store: IntentStore, monkeypatch: pytest.MonkeyPatch
) -> None:
    race_two_deploys(["--store", url], store, monkeypatch)


@pytest.mark.consul
def test_pp_on_consul_applies_reads_and_races_like_on_the_embedded_store(
    consul_addr: str, ns: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    from intent.store import open_store

    monkeypatch.setenv("PP_ACTOR", "tester")
    store_args = ["--store", f"consul://{consul_addr}", "--prefix", ns]
    assert cli.main([*store_args, "apply", "-f", write(tmp_path, "h.yaml", HELLO)]) == 0
    store = open_store(f"consul://{consul_addr}", ns)
    try:
        assert store.nodes_of("hello") == {"web1": "production", "web2": "production"}
        race_two_deploys(store_args, store, monkeypatch)
        store.kv.put(store.prefix + keys.deploy_config("hello", "production"), b'{"basedir": "x"}')
        assert cli.main([*store_args, "get", "hello"]) == 1
    finally:
        store.close()


# -- the installed entry point -----------------------------------------------------------


def run_pp(*args: str, env: dict[str, str] | None = None) -> subprocess.CompletedProcess[str]:
    assert PP_BIN.exists(), f"{PP_BIN} is not installed: run scripts/setup"
    full_env = {**os.environ, "PP_ACTOR": "tester", **(env or {})}
    return subprocess.run(
        [str(PP_BIN), *args], capture_output=True, text=True, env=full_env, timeout=60
    )


def test_installed_pp_exit_codes_and_no_tracebacks(tmp_path: Path, url: str) -> None:
    bad = write(tmp_path, "bad.yaml", HELLO.replace("run_as: hello", "run_as: Hello World"))
    cases = [
        (["validate", bad], 1, f"pp: error: {bad}: clusters.production.deploy_config.run_as"),
        (["--store", url, "get", "hello"], 1, "pp: error: no intent for app hello"),
        (["--store", url], 2, "pp: error: Missing command."),
        (["--store", "sqlite:///proc/0/nope/intent.db", "get", "x"], 1, "pp: error: cannot open"),
        (["deploy"], 2, "pp: error: Missing argument 'APP'."),
        (["frobnicate"], 2, "pp: error: No such command 'frobnicate'."),
    ]
    for args, code, start in cases:
        result = run_pp(*args)
        assert (result.returncode, result.stderr.startswith(start)) == (code, True), (
            args,
            result.stderr,
        )
        assert result.stderr.count("\n") == 1, result.stderr
        assert "Traceback" not in result.stderr
    ok = run_pp("--store", url, "apply", "-f", write(tmp_path, "h.yaml", HELLO))
    assert (ok.returncode, ok.stderr) == (0, "")


def test_installed_pp_racing_processes_both_land(
    tmp_path: Path, url: str, store: IntentStore
) -> None:
    assert run_pp("--store", url, "apply", "-f", write(tmp_path, "h.yaml", HELLO)).returncode == 0
    procs = [
        subprocess.Popen(
            [str(PP_BIN), "--store", url, "deploy", "hello", v, "-c", "production", "--sha256", h],
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
            env={**os.environ, "PP_ACTOR": f"op-{v}"},
        )
        for v, h in (("2.0.0", B), ("3.0.0", C))
    ]
    for proc in procs:
        _, err = proc.communicate(timeout=60)
        assert proc.returncode == 0, err
    states = active_and_states(store)
    assert sorted(states) == ["1.0.0", "2.0.0", "3.0.0"]
    assert sorted(states.values()) == ["active", "prep", "prep"]
    assert {r.actor for r in store.history("hello") if r.action == "deploy"} == {
        "op-2.0.0",
        "op-3.0.0",
    }


def test_main_returns_the_exit_code_instead_of_raising(url: str) -> None:
    assert cli.main(["--store", url, "schema"]) == 0
    assert cli.main(["--store", url, "get", "nope"]) == 1
    assert cli.main(["--store", url, "nope"]) == 2
    assert sys.exc_info() == (None, None, None)


# -- the sample intent -------------------------------------------------------------------

LOAD_INTENT = REPO / "test_data" / "load-intent"


def test_sample_intent_loads_into_a_store_for_the_chosen_node_and_root(
    tmp_path: Path, url: str, store: IntentStore
) -> None:
    assert PP_BIN.exists(), f"{PP_BIN} is not installed: run scripts/setup"
    artifacts = tmp_path / "artifacts"
    artifacts.mkdir()
    (artifacts / "SHA256SUMS").write_text(f"{C}  hello/hello_1.1.0.tar.gz\n")
    args = ["--store", url, "--node", "demo-node", "--root", "/srv/demo", "--run-as", "demo"]
    result = subprocess.run(
        [sys.executable, str(LOAD_INTENT), *args, "--artifacts", str(artifacts)],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert result.returncode == 0, result.stderr
    assert "echo: 6 key(s) written" in result.stdout
    assert "hello: 6 key(s) written" in result.stdout
    assert "using placeholder digests" in result.stderr
    for app in ("hello", "echo"):
        assert store.clusters_of(app) == ["production", "staging"]
        assert store.nodes_of(app) == {"demo-node": "production", "staging1": "staging"}
    intents = {i.app: i for i in store.apps_for_node("demo-node")}
    assert set(intents) == {"echo", "hello"}
    assert all(i.valid for i in intents.values()), [i.error for i in intents.values()]
    hello = intents["hello"]
    assert hello.deploy is not None and hello.config is not None
    assert hello.deploy.basedir == "/srv/demo/production/hello"
    assert hello.deploy.run_as == "demo"
    assert hello.config.active_version == "1.1.0"
    assert hello.config.versions["1.1.0"].sha256 == C
    assert hello.config.versions["1.1.0"].url == f"file://{artifacts}/hello/hello_1.1.0.tar.gz"


def test_sample_intent_keeps_every_port_and_basedir_apart_so_all_can_share_a_host(
    tmp_path: Path,
) -> None:
    out = tmp_path / "rendered"
    subprocess.run(
        [sys.executable, str(LOAD_INTENT), "--render", str(out), "--node", "n1"],
        check=True,
        capture_output=True,
        timeout=60,
    )
    ports, public, basedirs = [], [], []
    for path in sorted(out.glob("*.yaml")):
        app_file = read_app_file(str(path))
        for spec in app_file.clusters.values():
            assert spec.deploy_config is not None
            basedirs.append(spec.deploy_config.basedir)
            ports += [p.port for p in spec.deploy_config.ports]
            public += [p.public_port for p in spec.deploy_config.ports]
    assert len(basedirs) == 4
    assert len(set(ports + public)) == len(ports + public) == 8
    assert len(set(basedirs)) == 4
    assert all(b.startswith("/tmp/platypus-demo/") for b in basedirs)


def test_retry_writes_a_fresh_token_for_every_node_of_the_app(
    pp: Pp, hello: str, store: IntentStore
) -> None:
    result = pp("retry", "hello")
    assert result.exit_code == 0, result.output
    assert "web1: retry of hello requested" in result.output
    first = store.get_raw(keys.retry("web1", "hello"))
    assert first is not None and store.get_raw(keys.retry("web2", "hello")) is not None
    assert pp("retry", "hello", "--node", "web1").exit_code == 0
    second = store.get_raw(keys.retry("web1", "hello"))
    assert second is not None and second.value != first.value
    assert {i.app for i in store.apps_for_node("web1")} == {"hello"}  # not taken for an app


def test_retry_of_an_app_not_on_the_node_is_one_clear_error(pp: Pp, hello: str) -> None:
    line = one_error_line(pp("retry", "hello", "--node", "web9"))
    assert line == "pp: error: nodes/web9/hello: app hello is not assigned to web9"


def test_history_skips_an_audit_record_it_cannot_read(
    pp: Pp, hello: str, store: IntentStore
) -> None:
    store.kv.put(store.prefix + keys.audit("hello", "zzz-corrupt"), b"not json")
    result = pp("history", "hello")
    assert result.exit_code == 0, result.output
    assert "Traceback" not in result.output


# -- trust: the store's identity and nodes emptied on purpose ----------------------------


def test_the_first_write_gives_the_store_an_identity_and_init_shows_it(
    pp: Pp, hello: str, store: IntentStore
) -> None:
    identity = store.identity()
    assert identity is not None and identity.created_by == "tester"
    shown = pp("init")
    assert shown.exit_code == 0
    assert shown.output == f"store identity: {identity.id} (already set)\n"


def test_init_adopt_declares_the_store_the_successor_of_another(pp: Pp, store: IntentStore) -> None:
    created = pp("init", "--adopt", "0123abcd")
    assert created.exit_code == 0, created.output
    identity = store.identity()
    assert identity is not None and identity.succeeds("0123abcd")
    assert pp("init", "--adopt", "0123abcd").exit_code == 0  # idempotent
    assert store.identity() == identity
    assert "an identity is letters and digits" in one_error_line(pp("init", "--adopt", "../x"))


def test_unassigning_a_nodes_last_app_records_the_node_as_emptied(
    pp: Pp, hello: str, store: IntentStore
) -> None:
    assert not store.is_emptied("web1")
    assert pp("unassign", "hello", "web1").exit_code == 0
    assert store.is_emptied("web1")
    assert pp("assign", "hello", "web1", "-c", "production").exit_code == 0
    assert not store.is_emptied("web1")  # it runs something again


def test_unassign_all_empties_every_node_named(pp: Pp, hello: str, store: IntentStore) -> None:
    store.put_json(keys.node_app("web1", "other"), {"cluster": "production"})
    done = pp("unassign", "--all", "web1", "web2")
    assert done.exit_code == 0, done.output
    assert done.output == "web1: runs nothing (was hello, other)\nweb2: runs nothing (was hello)\n"
    assert store.assignments("web1") == {} and store.assignments("web2") == {}
    assert store.is_emptied("web1") and store.is_emptied("web2")
    assert "give APP and at least one NODE" in one_error_line(pp("unassign", "hello"))


def test_status_puts_held_agents_first_with_their_reason(pp: Pp, store: IntentStore) -> None:
    store.write_agent_status(
        AgentStatus(node="web1", agent="setlive", state="held", reason="the store is new")
    )
    store.write_agent_status(AgentStatus(node="web2", agent="setlive", state="trusting"))
    shown = pp("status")
    assert shown.exit_code == 0
    assert shown.output.splitlines()[0].startswith("HELD web1 setlive for ")
    assert shown.output.splitlines()[0].endswith(": the store is new")
    assert "web2" not in shown.output


def test_drain_and_undrain_write_and_remove_the_request(
    pp: Pp, hello: str, store: IntentStore
) -> None:
    assert pp("drain", "web1").output == "web1: hello drained\n"
    (intent,) = store.apps_for_node("web1")
    assert intent.drained
    assert pp("drain", "web1", "--app", "hello").output == "web1: hello drained (already)\n"
    assert pp("undrain", "web1").output == "web1: hello not drained\n"
    (intent,) = store.apps_for_node("web1")
    assert not intent.drained
    assert "other is not assigned to web1" in one_error_line(pp("drain", "web1", "-a", "other"))
