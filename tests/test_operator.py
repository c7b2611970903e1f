"""The pure side of pp: deploy, rollback, the app file, and the CAS read-modify-write."""

from __future__ import annotations

import json
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from intent import keys
from intent.cli import operator as op
from intent.cli.appfile import parse_app_file
from intent.model import AppConfig, AuditRecord, IntentError
from intent.store import IntentStore
from intent.store.sqlite import SqliteStore

A, B, C = "a" * 64, "b" * 64, "c" * 64
KEY = keys.config("hello", "production")


def config(**versions: tuple[str, str]) -> AppConfig:
    """``config(v1=("active", A))`` -> an AppConfig with those versions."""
    return AppConfig.model_validate(
        {
            "versions": {
                v.replace("_", "."): {"state": s, "sha256": h} for v, (s, h) in versions.items()
            }
        }
    )


def states(cfg: AppConfig) -> dict[str, str]:
    return {name: spec.state for name, spec in cfg.versions.items()}


@pytest.fixture
def store(tmp_path: Path) -> Iterator[IntentStore]:
    s = IntentStore(SqliteStore(tmp_path / "intent.db"))
    yield s
    s.close()


# -- deploy ------------------------------------------------------------------------------


def test_deploy_makes_the_new_version_active_and_keeps_the_previous_as_prep() -> None:
    new = op.deployed(config(v1=("active", A)), "v2", B, None, KEY)
    assert states(new) == {"v1": "prep", "v2": "active"}
    assert new.versions["v2"].sha256 == B


def test_deploy_leaves_other_prep_versions_alone() -> None:
    new = op.deployed(config(v1=("prep", A), v2=("active", B)), "v3", C, None, KEY)
    assert states(new) == {"v1": "prep", "v2": "prep", "v3": "active"}


def test_deploy_creates_the_config_when_there_is_none() -> None:
    new = op.deployed(None, "1.0.0", A, "file:///a.tgz", KEY)
    assert op.dump(new) == {
        "versions": {"1.0.0": {"state": "active", "sha256": A, "url": "file:///a.tgz"}}
    }


def test_deploy_keeps_the_rest_of_the_config_as_written() -> None:
    stored = AppConfig.model_validate(
        {"versions": {"1": {"state": "active", "sha256": A}}, "user_config": {"greeting": "hi"}}
    )
    dumped = op.dump(op.deployed(stored, "2", B, None, KEY))
    assert dumped["user_config"] == {"greeting": "hi"}
    assert "min_nodes" not in dumped  # defaults the operator never wrote stay unwritten


def test_deploy_of_a_prep_version_activates_it_and_keeps_its_url() -> None:
    stored = AppConfig.model_validate(
        {
            "versions": {
                "1": {"state": "active", "sha256": A},
                "2": {"state": "prep", "sha256": B, "url": "file:///2.tgz"},
            }
        }
    )
    new = op.deployed(stored, "2", B, None, KEY)
    assert states(new) == {"1": "prep", "2": "active"}
    assert new.versions["2"].url == "file:///2.tgz"


def test_deploy_refuses_to_change_the_artifact_of_an_existing_version() -> None:
    with pytest.raises(op.OperatorError, match=r"version v1 already exists with sha256 a{64}"):
        op.deployed(config(v1=("active", A)), "v1", B, None, KEY)


def test_deploy_refuses_a_malformed_sha256() -> None:
    with pytest.raises(op.OperatorError, match=r"sha256 'ABC': expected 64 lowercase hex"):
        op.deployed(None, "1", "ABC", None, KEY)


def test_an_invalid_stored_config_is_not_built_upon() -> None:
    with pytest.raises(IntentError, match=r"clusters/hello/production/config: versions"):
        op.parse_config({"versions": {"1": {"state": "running", "sha256": A}}}, KEY)


# -- rollback ----------------------------------------------------------------------------


def test_rollback_swaps_the_active_and_the_prep_version() -> None:
    new = op.rolled_back(config(v1=("prep", A), v2=("active", B)), "v1", KEY)
    assert states(new) == {"v1": "active", "v2": "prep"}


def test_rollback_to_an_unknown_version_names_the_versions_there_are() -> None:
    with pytest.raises(op.OperatorError, match=r"no version v9 .*versions: v1, v2"):
        op.rolled_back(config(v1=("prep", A), v2=("active", B)), "v9", KEY)


def test_rollback_to_the_active_version_is_refused() -> None:
    with pytest.raises(op.OperatorError, match="already the active version"):
        op.rolled_back(config(v1=("prep", A), v2=("active", B)), "v2", KEY)


def test_rollback_target_is_the_only_prep_version() -> None:
    assert op.rollback_target(config(v1=("prep", A), v2=("active", B)), [], KEY) == "v1"


def test_rollback_without_prep_version_is_refused() -> None:
    with pytest.raises(op.OperatorError, match="no prep version"):
        op.rollback_target(config(v1=("active", A)), [], KEY)


def _record(old: dict[str, Any] | None, new: dict[str, Any], key: str = KEY) -> AuditRecord:
    return AuditRecord(app="hello", key=key, action="deploy", actor="t", old=old, new=new)


def _json(cfg: AppConfig) -> dict[str, Any]:
    return op.dump(cfg)  # type: ignore[no-any-return]


def test_rollback_target_is_the_most_recently_active_prep_version_from_the_audit_trail() -> None:
    c1 = op.deployed(None, "v1", A, None, KEY)
    c2 = op.deployed(c1, "v2", B, None, KEY)
    c3 = op.deployed(c2, "v3", C, None, KEY)
    trail = [_record(None, _json(c1)), _record(_json(c1), _json(c2)), _record(_json(c2), _json(c3))]
    assert op.rollback_target(c3, trail, KEY) == "v2"
    # Records of another cluster's key say nothing about this one.
    other = [_record(_json(c2), _json(c3), key=keys.config("hello", "staging"))]
    with pytest.raises(op.OperatorError, match=r"several prep versions \(v1, v2\).*--to VERSION"):
        op.rollback_target(c3, other, KEY)


def test_rolling_back_twice_returns_to_where_it_started() -> None:
    c1 = op.deployed(None, "v1", A, None, KEY)
    c2 = op.deployed(c1, "v2", B, None, KEY)
    c3 = op.deployed(c2, "v3", C, None, KEY)
    trail = [_record(None, _json(c1)), _record(_json(c1), _json(c2)), _record(_json(c2), _json(c3))]
    back = op.rolled_back(c3, op.rollback_target(c3, trail, KEY), KEY)
    assert back.active_version == "v2"
    trail.append(_record(_json(c3), _json(back)))
    assert op.rollback_target(back, trail, KEY) == "v3"


# -- names -------------------------------------------------------------------------------


@pytest.mark.parametrize("bad", ["", "web 1", "../etc", "-x", "a" * 65, "a/b"])
def test_names_that_are_unsafe_in_keys_and_paths_are_refused(bad: str) -> None:
    with pytest.raises(op.OperatorError, match=r"node .*: use 1-64 letters"):
        op.check_name("node", bad)


def test_actor_is_pp_actor_when_set(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("PP_ACTOR", "alice")
    assert op.actor() == "alice"
    monkeypatch.delenv("PP_ACTOR")
    assert op.actor()  # the login user, whatever it is here


# -- the app file ------------------------------------------------------------------------

APP_FILE = f"""
app: hello
clusters:
  production:
    config: {{versions: {{"1.0.0": {{state: active, sha256: {A}}}}}, min_nodes: 1}}
    deploy_config: {{basedir: /srv/hello/, run_as: hello, ports: [{{name: http, port: 8080}}]}}
    nodes: [web1, web2]
  staging:
    nodes: [web3]
"""


def test_app_file_yields_one_value_per_key_as_written() -> None:
    desired = parse_app_file(APP_FILE, "hello.yaml").desired()
    assert desired == {
        "clusters/hello/production/config": {
            "versions": {"1.0.0": {"state": "active", "sha256": A}},
            "min_nodes": 1,
        },
        "clusters/hello/production/deploy_config": {
            "basedir": "/srv/hello",
            "run_as": "hello",
            "ports": [{"name": "http", "port": 8080}],
        },
        "nodes/web1/hello": {"cluster": "production"},
        "nodes/web2/hello": {"cluster": "production"},
        "nodes/web3/hello": {"cluster": "staging"},
    }


@pytest.mark.parametrize(
    ("change", "message"),
    [
        (("basedir: /srv/hello/", "basedir: srv"), r"clusters\.production\.deploy_config\.basedir"),
        (("port: 8080", "port: 70000"), r"clusters\.production\.deploy_config\.ports\.0\.port"),
        (("min_nodes: 1", "min_node: 1"), r"clusters\.production\.config\.min_node: Extra"),
        (("[web3]", "[web1]"), r"node web1 is listed in clusters production and staging"),
        (("app: hello", "app: he/llo"), r"^hello\.yaml: app: "),
        (("state: active", "state: on"), r"versions\.1\.0\.0\.state"),
    ],
)
def test_app_file_errors_name_the_file_the_cluster_and_the_field(
    change: tuple[str, str], message: str
) -> None:
    text = APP_FILE.replace(*change)
    assert text != APP_FILE
    with pytest.raises(IntentError, match=message) as caught:
        parse_app_file(text, "hello.yaml")
    assert str(caught.value).startswith("hello.yaml: ")
    assert "\n" not in str(caught.value)


def test_app_file_that_is_not_yaml_names_the_line() -> None:
    with pytest.raises(IntentError, match=r"hello\.yaml: not valid YAML at line 2"):
        parse_app_file("app: hello\nclusters: x: y\n", "hello.yaml")


# -- read-modify-write -------------------------------------------------------------------


def test_update_writes_and_records_old_and_new_in_the_audit_trail(store: IntentStore) -> None:
    change = op.update(store, KEY, lambda old: {"n": 1}, app="hello", action="t", who="alice")
    assert change.changed
    op.update(store, KEY, lambda old: {"n": old["n"] + 1}, app="hello", action="t", who="bob")
    (first, second) = store.history("hello")
    assert (first.actor, first.old, first.new) == ("alice", None, {"n": 1})
    assert (second.actor, second.old, second.new) == ("bob", {"n": 1}, {"n": 2})


def test_update_that_changes_nothing_writes_nothing(store: IntentStore) -> None:
    store.put_json(KEY, {"n": 1})
    version = store.get_raw(KEY).version  # type: ignore[union-attr]
    change = op.update(store, KEY, lambda old: old, app="hello", action="t", who="t")
    assert not change.changed
    assert store.get_raw(KEY).version == version  # type: ignore[union-attr]
    assert store.history("hello") == []


def test_update_to_none_deletes_the_key(store: IntentStore) -> None:
    store.put_json(KEY, {"n": 1})
    op.update(store, KEY, lambda old: None, app="hello", action="t", who="t")
    assert store.get_raw(KEY) is None
    assert store.history("hello")[0].new is None


class RacingStore(IntentStore):
    """Another writer changes the key right after each of our first ``races`` reads."""

    def __init__(self, inner: IntentStore, races: int) -> None:
        super().__init__(inner.kv, inner.prefix)
        self.races = races
        self.reads = 0

    def get_raw(self, key: str) -> Any:
        value = super().get_raw(key)
        self.reads += 1
        if self.reads <= self.races:
            current = json.loads(value.value) if value else {"seen": []}
            current["seen"] = [*current["seen"], f"other{self.reads}"]
            IntentStore.put_json(self, key, current)
        return value


def _append_me(old: Any) -> Any:
    value = old or {"seen": []}
    return {"seen": [*value["seen"], "me"]}


def test_update_retries_a_lost_race_from_a_fresh_read_and_loses_no_write(
    store: IntentStore,
) -> None:
    racing = RacingStore(store, races=2)
    change = op.update(racing, KEY, _append_me, app="hello", action="t", who="t")
    assert racing.reads == 3
    assert change.new == {"seen": ["other1", "other2", "me"]}
    assert json.loads(store.get_raw(KEY).value) == change.new  # type: ignore[union-attr]


def test_update_gives_up_after_the_attempts_with_nothing_written(store: IntentStore) -> None:
    racing = RacingStore(store, races=op.ATTEMPTS)
    with pytest.raises(op.Conflict, match=r"changed by someone else on each of 5 attempts"):
        op.update(racing, KEY, _append_me, app="hello", action="t", who="t")
    assert "me" not in json.loads(store.get_raw(KEY).value)["seen"]  # type: ignore[union-attr]
    assert store.history("hello") == []


# -- apply -------------------------------------------------------------------------------


def test_apply_plan_orders_deploy_config_then_config_then_nodes(store: IntentStore) -> None:
    plan = op.plan_apply(store, parse_app_file(APP_FILE, "f"), prune_nodes=False)
    assert [p.key for p in plan] == [
        "clusters/hello/production/deploy_config",
        "clusters/hello/production/config",
        "nodes/web1/hello",
        "nodes/web2/hello",
        "nodes/web3/hello",
    ]


def test_apply_plan_is_empty_once_applied(store: IntentStore) -> None:
    app_file = parse_app_file(APP_FILE, "f")
    op.execute_apply(store, "hello", op.plan_apply(store, app_file, False), "t")
    assert op.plan_apply(store, app_file, prune_nodes=True) == []


def test_apply_unassigns_unlisted_nodes_only_when_pruning(store: IntentStore) -> None:
    app_file = parse_app_file(APP_FILE, "f")
    op.execute_apply(store, "hello", op.plan_apply(store, app_file, False), "t")
    store.put_json(keys.node_app("web9", "hello"), {"cluster": "production"})
    store.put_json(keys.node_app("web8", "hello"), {"cluster": "canary"})  # cluster not in file
    assert op.plan_apply(store, app_file, prune_nodes=False) == []
    (prune,) = op.plan_apply(store, app_file, prune_nodes=True)
    assert (prune.key, prune.new) == ("nodes/web9/hello", None)


def test_apply_stops_when_a_key_changed_after_it_was_read(store: IntentStore) -> None:
    plan = op.plan_apply(store, parse_app_file(APP_FILE, "f"), prune_nodes=False)
    store.put_json("clusters/hello/production/config", {"versions": {}})
    with pytest.raises(op.Conflict, match=r"config changed since it was read; 1 of 5 changes"):
        op.execute_apply(store, "hello", plan, "t")
    assert store.get_raw("nodes/web1/hello") is None
