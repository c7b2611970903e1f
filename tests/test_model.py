"""Validation of the intent model: every bad input named in the issue is refused."""

from __future__ import annotations

import json

import pytest

from intent.model import AppConfig, DeployConfig, IntentError, NodeAssignment, parse

SHA = "a" * 64


def config(**overrides: object) -> dict[str, object]:
    value: dict[str, object] = {"versions": {"1.0.0": {"state": "active", "sha256": SHA}}}
    value.update(overrides)
    return value


def deploy(**overrides: object) -> dict[str, object]:
    value: dict[str, object] = {"basedir": "/srv/hello", "run_as": "hello"}
    value.update(overrides)
    return value


def test_a_minimal_config_parses_with_defaults() -> None:
    parsed = parse(AppConfig, config(), "k")
    assert parsed.active_version == "1.0.0"
    assert parsed.min_nodes == 0
    assert parsed.user_config == {}


def test_no_active_version_means_stopped() -> None:
    parsed = parse(AppConfig, config(versions={"1": {"state": "prep", "sha256": SHA}}), "k")
    assert parsed.active_version is None


def test_two_active_versions_are_refused_naming_both() -> None:
    two = {"1": {"state": "active", "sha256": SHA}, "2": {"state": "active", "sha256": SHA}}
    with pytest.raises(IntentError, match=r"only one may be active, found 1, 2"):
        parse(AppConfig, config(versions=two), "clusters/a/b/config")


@pytest.mark.parametrize(
    "version", ["../x", "a/b", "a b", "$(rm)", "a;b", "", ".hidden", "1..2", "x" * 65]
)
def test_unsafe_version_names_are_refused(version: str) -> None:
    with pytest.raises(IntentError, match="versions"):
        parse(AppConfig, config(versions={version: {"state": "active", "sha256": SHA}}), "k")


@pytest.mark.parametrize("cluster", ["../prod", "a/b", "pro d", "`x`", ""])
def test_unsafe_cluster_names_are_refused(cluster: str) -> None:
    with pytest.raises(IntentError, match="cluster"):
        parse(NodeAssignment, {"cluster": cluster}, "nodes/web1/hello")


@pytest.mark.parametrize("sha", ["abc", "A" * 64, "g" * 64, ""])
def test_sha256_must_be_64_lowercase_hex(sha: str) -> None:
    with pytest.raises(IntentError, match="sha256"):
        parse(AppConfig, config(versions={"1": {"state": "active", "sha256": sha}}), "k")


def test_a_misspelt_field_is_an_error_not_ignored() -> None:
    with pytest.raises(IntentError, match="min_node"):
        parse(AppConfig, {**config(), "min_node": 2}, "k")


def test_negative_min_nodes_is_refused() -> None:
    with pytest.raises(IntentError, match="min_nodes"):
        parse(AppConfig, config(min_nodes=-1), "k")


@pytest.mark.parametrize("basedir", ["srv/hello", "relative", "/", "/srv/../etc", "/srv//x", ""])
def test_basedir_must_be_a_normalised_absolute_path(basedir: str) -> None:
    with pytest.raises(IntentError, match="basedir"):
        parse(DeployConfig, deploy(basedir=basedir), "k")


@pytest.mark.parametrize("port", [0, -1, 65536, "80"])
def test_ports_must_be_in_range(port: object) -> None:
    with pytest.raises(IntentError, match="port"):
        parse(DeployConfig, deploy(ports=[{"name": "http", "port": port}]), "k")


def test_duplicate_ports_inside_an_app_are_refused() -> None:
    ports = [{"name": "a", "port": 8080}, {"name": "b", "port": 8080}]
    with pytest.raises(IntentError, match="8080/tcp appears more than once"):
        parse(DeployConfig, deploy(ports=ports), "k")


def test_same_port_number_on_tcp_and_udp_is_allowed() -> None:
    ports = [{"name": "a", "port": 53}, {"name": "b", "port": 53, "protocol": "udp"}]
    assert len(parse(DeployConfig, deploy(ports=ports), "k").ports) == 2


def test_duplicate_public_ports_are_refused() -> None:
    ports = [
        {"name": "a", "port": 8080, "public_port": 80},
        {"name": "b", "port": 8081, "public_port": 80},
    ]
    with pytest.raises(IntentError, match="public_port 80/tcp"):
        parse(DeployConfig, deploy(ports=ports), "k")


def test_health_check_defaults_all_but_type() -> None:
    parsed = parse(DeployConfig, deploy(health_check={"type": "http", "port": 8080}), "k")
    assert parsed.health_check is not None
    assert parsed.health_check.path == "/health"
    assert parsed.health_check.healthy_threshold >= 1
    with pytest.raises(IntentError, match=r"health_check\.type"):
        parse(DeployConfig, deploy(health_check={"port": 8080}), "k")


def test_elb_accepts_one_or_a_list() -> None:
    one = {"type": "classic", "name": "web", "region": "us-east-1"}
    tg = {"type": "target_group", "arn": "arn:aws:x", "port": 80, "region": "eu-west-1"}
    assert len(parse(DeployConfig, deploy(elb=one), "k").elb) == 1
    assert len(parse(DeployConfig, deploy(elb=[one, tg]), "k").elb) == 2
    with pytest.raises(IntentError, match="elb"):
        parse(DeployConfig, deploy(elb={"type": "nlb"}), "k")


def test_env_names_must_be_shell_safe() -> None:
    with pytest.raises(IntentError, match="env"):
        parse(DeployConfig, deploy(env={"BAD-NAME": "x"}), "k")


def test_errors_are_one_line_naming_the_key() -> None:
    with pytest.raises(IntentError) as caught:
        parse(DeployConfig, {"basedir": "x", "ports": [{"port": 0}]}, "clusters/a/b/deploy_config")
    message = str(caught.value)
    assert "\n" not in message
    assert message.startswith("clusters/a/b/deploy_config: ")


@pytest.mark.parametrize("raw", [b"{not json", b"[1, 2]", b"\xff\xfe", b'"text"'])
def test_values_that_are_not_json_objects_are_refused(raw: bytes) -> None:
    with pytest.raises(IntentError, match=r"^k: "):
        parse(AppConfig, raw, "k")


def test_the_json_schema_is_published_for_every_stored_value() -> None:
    for model in (AppConfig, DeployConfig, NodeAssignment):
        schema = model.model_json_schema()
        assert schema["additionalProperties"] is False
        json.dumps(schema)


@pytest.mark.parametrize(
    "url", ["http://[::1/x", "ftp://x/y.tar.gz", "x.tar.gz", "http://h:99999/"]
)
def test_version_urls_must_be_fetchable(url: str) -> None:
    versions = {"1": {"state": "active", "sha256": SHA, "url": url}}
    with pytest.raises(IntentError, match=r"versions\.1\.url"):
        parse(AppConfig, config(versions=versions), "k")


@pytest.mark.parametrize(
    "basedir", ["/srv/$(reboot)", "/srv/a b", "/srv/`id`", "/srv/a;b", "/srv/a'b", "/srv/é"]
)
def test_a_basedir_with_shell_syntax_is_refused(basedir: str) -> None:
    with pytest.raises(IntentError, match=r"basedir: may hold only letters, digits"):
        parse(DeployConfig, deploy(basedir=basedir), "k")


def test_an_ordinary_basedir_is_accepted() -> None:
    assert parse(DeployConfig, deploy(basedir="/srv/web-1.2_x+y/"), "k").basedir == (
        "/srv/web-1.2_x+y"
    )


@pytest.mark.parametrize(
    "url", ["file:/etc/shadow", "file://evil/etc/shadow", "file:///repo/%2e%2e/etc/shadow"]
)
def test_a_file_url_that_is_not_plain_file_three_slashes_is_refused(url: str) -> None:
    spec = {"1": {"state": "active", "sha256": SHA, "url": url}}
    with pytest.raises(IntentError, match=r"versions\.1\.url: (use file:///|must start with)"):
        parse(AppConfig, config(versions=spec), "k")


def test_a_file_url_scheme_in_capitals_is_accepted_as_the_preparer_reads_it() -> None:
    spec = {"1": {"state": "active", "sha256": SHA, "url": "FILE:///repo/a.tar.gz"}}
    assert parse(AppConfig, config(versions=spec), "k").versions["1"].url
