"""pp-elb-registrar end to end: real boto3 over HTTP against moto in server mode, the
embedded store, a loopback health endpoint, ``current`` links as setlive leaves them.

What moto models, and so what these tests can show: a classic ELB reports a
registered, running instance ``InService`` at once and a stopped one
``OutOfService``; an instance it does not have registered is ``Unknown``. A target
group reports a registered running instance ``healthy`` at once, and one that is
not registered ``unused``/``Target.NotRegistered``, also right after a
deregistration: moto has no connection draining, no ``initial`` state and no
``Target.NotInUse`` (those are covered by the planner's tests), and it keeps one
registration per instance per target group whatever the port.
"""

from __future__ import annotations

import http.server
import json
import os
import subprocess
import threading
import time
import urllib.error
import urllib.request
from collections.abc import Iterator
from dataclasses import replace
from pathlib import Path
from typing import Any

import pytest
from elb_support import (
    CLUSTER,
    FAST_HTTP,
    WRITES,
    Cloud,
    HealthApp,
    Node,
    app_intent,
    cloud_fixture,  # noqa: F401 - the fixture
    credentials,
    health_app,
    imds_server,
    moto_fixture,  # noqa: F401 - the fixture
    serving,
)
from preparer_support import wait_for
from pydantic import TypeAdapter

from agents.elb_registrar.agent import Identity
from agents.elb_registrar.plan import APP_TAG, CLUSTER_TAG
from agents.system.imds import ImdsError
from intent.cli.operator import drain
from intent.model import ClassicElb, Reality, TargetGroup
from intent.store import IntentStore
from intent.store.sqlite import SqliteStore

REPO = Path(__file__).resolve().parent.parent
Elb: Any = TypeAdapter(ClassicElb | TargetGroup)


@pytest.fixture
def store(tmp_path: Path) -> Iterator[IntentStore]:
    store = IntentStore(SqliteStore(tmp_path / "store.db"))
    yield store
    store.close()


@pytest.fixture
def health() -> Iterator[HealthApp]:
    with health_app() as app:
        yield app


@pytest.fixture
def node(tmp_path: Path, store: IntentStore, cloud: Cloud) -> Node:
    return Node("n1", tmp_path / "n1", store, cloud, cloud.instance(), apps=tmp_path / "apps")


def deploy(
    node: Node, app: str, lbs: list[dict[str, Any]], health: HealthApp, **options: Any
) -> None:
    """The app's intent, assigned to ``node``, with version 1 running there."""
    app_intent(node.store, app, lbs, basedir=node.basedir(app), health_port=health.port, **options)
    node.assign(app)
    node.run(app, "1")


# -- registering ------------------------------------------------------------------------------


def test_registers_in_a_classic_elb_and_a_target_group_and_waits_until_in_service(
    node: Node, cloud: Cloud, health: HealthApp
) -> None:
    classic, tg = cloud.classic("web-lb"), cloud.target_group("web-tg")
    deploy(node, "web", [classic, tg], health)

    assert node.converge()

    report = node.report("web")
    assert report.status == "converged", report.error
    assert report.version == "1"
    assert report.details["in_service"] is True
    assert report.details["health"] == "healthy"
    lbs = node.lbs("web")
    assert [(lb["type"], lb["registered"], lb["state"]) for lb in lbs.values()] == [
        ("classic", True, "InService"),
        ("target_group", True, "healthy"),
    ]
    assert all(lb["last_transition"] == "registered" for lb in lbs.values())
    assert all(time.time() - lb["last_transition_at"] < 60 for lb in lbs.values())
    assert cloud.registered(classic, node.instance) == "InService"
    assert cloud.registered(tg, node.instance) == "healthy"
    for lb in (classic, tg):
        assert cloud.tags(lb) == {APP_TAG: "web", CLUSTER_TAG: CLUSTER}
    assert node.recorded("web") == [{**classic, "role_arn": None}, {**tg, "role_arn": None}]
    assert node.state_file("web").stat().st_mode & 0o777 == 0o600


def test_a_second_pass_writes_nothing_and_describes_each_load_balancer_once(
    node: Node, cloud: Cloud, health: HealthApp
) -> None:
    deploy(node, "web", [cloud.classic("web-lb"), cloud.target_group("web-tg")], health)
    assert node.converge()
    first = node.counter.take()
    assert first["RegisterInstancesWithLoadBalancer"] == first["RegisterTargets"] == 1

    assert node.converge()
    assert node.counter.take() == {"DescribeInstanceHealth": 1, "DescribeTargetHealth": 1}

    # A restarted agent reads each load balancer's tags once more, and writes nothing.
    node.restart()
    assert node.converge()
    calls = node.counter.take()
    assert not set(calls) & WRITES, calls
    assert calls == {
        "DescribeInstanceHealth": 1,
        "DescribeTargetHealth": 1,
        "DescribeTags": 2,
    }
    assert node.report("web").status == "converged"


def test_nothing_is_asked_of_aws_until_setlive_runs_the_active_version(
    node: Node, cloud: Cloud, health: HealthApp
) -> None:
    classic = cloud.classic("web-lb")
    deploy(node, "web", [classic], health)
    node.run("web", None)

    assert not node.converge()
    report = node.report("web")
    assert report.status == "converging"
    assert "waiting for version 1 to run here (runs nothing)" in (report.error or "")
    assert node.counter.take() == {}
    assert cloud.registered(classic, node.instance) == "Unknown"

    node.run("web", "2")  # a rollback left the previous version running
    assert not node.converge()
    assert "runs 2" in (node.report("web").error or "")

    node.run("web", "1")
    assert node.converge()
    assert cloud.registered(classic, node.instance) == "InService"


def test_a_version_switch_keeps_the_registration_while_setlive_works(
    node: Node, cloud: Cloud, health: HealthApp
) -> None:
    classic = cloud.classic("web-lb")
    deploy(node, "web", [classic], health)
    assert node.converge()

    app_intent(node.store, "web", [classic], basedir=node.basedir("web"), active="2",
               health_port=health.port)  # fmt: skip
    assert not node.converge()
    assert node.report("web").status == "converging"
    assert cloud.registered(classic, node.instance) == "InService"

    node.run("web", "2")
    node.counter.take()
    assert node.converge()
    assert node.report("web").version == "2"
    assert not set(node.counter.take()) & WRITES


def test_a_health_check_that_never_passes_keeps_the_instance_out(
    node: Node, cloud: Cloud, health: HealthApp
) -> None:
    classic = cloud.classic("web-lb")
    health.healthy = False
    deploy(node, "web", [classic], health, check={**FAST_HTTP, "deadline_s": 0.5})

    assert not node.converge()
    report = node.report("web")
    assert report.status == "error"
    assert report.error is not None and "unhealthy" in report.error
    assert "503" in report.error
    assert cloud.registered(classic, node.instance) == "Unknown"

    health.healthy = True
    assert node.converge()
    assert cloud.registered(classic, node.instance) == "InService"


def test_not_in_service_in_time_is_an_error_with_aws_reason_and_stays_registered(
    node: Node, cloud: Cloud, health: HealthApp
) -> None:
    classic = cloud.classic("web-lb")
    cloud.stop(node.instance)  # moto's way to make a classic ELB say OutOfService
    deploy(node, "web", [classic], health)

    assert not node.converge()
    report = node.report("web")
    assert report.status == "error"
    assert "not in service after 3s: AWS says OutOfService (N/A)" in (report.error or "")
    assert cloud.registered(classic, node.instance) == "OutOfService"
    assert node.recorded("web") == [{**classic, "role_arn": None}]

    node.counter.take()
    node.converge()
    assert "RegisterInstancesWithLoadBalancer" not in node.counter.take()  # only waited again


# -- deregistering ----------------------------------------------------------------------------


def test_unassigning_deregisters_and_clears_the_report_even_after_a_restart(
    node: Node, cloud: Cloud, health: HealthApp
) -> None:
    classic, tg = cloud.classic("web-lb"), cloud.target_group("web-tg")
    deploy(node, "web", [classic, tg], health)
    assert node.converge()

    node.restart()  # what it registered is known from its state file alone
    node.unassign("web")
    assert node.converge()

    assert cloud.registered(classic, node.instance) == "Unknown"
    assert cloud.registered(tg, node.instance) == "unused"
    assert not node.state_file("web").exists()
    assert [r for r in node.store.reality("n1") if r.agent == "elb-registrar"] == []


def test_pp_drain_takes_the_node_out_and_undrain_puts_it_back(
    node: Node, cloud: Cloud, health: HealthApp
) -> None:
    classic, tg = cloud.classic("web-lb"), cloud.target_group("web-tg")
    deploy(node, "web", [classic, tg], health)
    assert node.converge()

    assert drain(node.store, "n1", ["web"], "ops", on=True) == ["web"]
    assert node.converge()
    report = node.report("web")
    assert report.status == "converged"
    assert (report.details["want"], report.details["why"]) == ("out", "drained (pp drain)")
    assert report.details["in_service"] is False
    assert cloud.registered(classic, node.instance) == "Unknown"
    assert cloud.registered(tg, node.instance) == "unused"
    assert all(lb["last_transition"] == "deregistered" for lb in node.lbs("web").values())
    assert node.recorded("web") == []

    drain(node.store, "n1", ["web"], "ops", on=False)
    assert node.converge()
    assert cloud.registered(classic, node.instance) == "InService"
    assert cloud.registered(tg, node.instance) == "healthy"


def test_an_app_with_no_active_version_leaves_its_load_balancers(
    node: Node, cloud: Cloud, health: HealthApp
) -> None:
    tg = cloud.target_group("web-tg")
    deploy(node, "web", [tg], health)
    assert node.converge()
    app_intent(node.store, "web", [tg], basedir=node.basedir("web"), active=None,
               health_port=health.port)  # fmt: skip
    assert node.converge()
    assert cloud.registered(tg, node.instance) == "unused"
    assert node.report("web").details["why"] == "the app has no active version"


def test_a_crash_between_recording_and_registering_is_finished_or_undone(
    node: Node, cloud: Cloud, health: HealthApp
) -> None:
    """The state file is written before AWS is asked: what a kill -9 right after it
    leaves is a record of a registration that never happened."""
    classic, tg = cloud.classic("web-lb"), cloud.target_group("web-tg")
    deploy(node, "web", [classic, tg], health)
    node.agent.state.record("web", Elb.validate_python(classic), time.time())
    node.agent.state.record("web", Elb.validate_python(tg), time.time())

    assert node.converge()  # finished: registered and awaited
    assert cloud.registered(classic, node.instance) == "InService"

    node.agent.state.record("shop", Elb.validate_python(cloud.classic("shop-lb")), time.time())
    node.converge()  # shop is not assigned here: its record is undone, and nothing else
    assert not node.state_file("shop").exists()
    assert cloud.registered(tg, node.instance) == "healthy"


def test_a_crash_after_registering_is_picked_up_without_registering_again(
    node: Node, cloud: Cloud, health: HealthApp
) -> None:
    tg = cloud.target_group("web-tg")
    deploy(node, "web", [tg], health)
    assert node.converge()
    node.restart()
    node.counter.take()
    assert node.converge()
    assert not set(node.counter.take()) & WRITES
    assert node.lbs("web")[f"target_group:{tg['arn']}:8080"]["last_transition"] == "registered"


def test_a_load_balancer_dropped_from_the_intent_is_left(
    node: Node, cloud: Cloud, health: HealthApp
) -> None:
    classic, tg = cloud.classic("web-lb"), cloud.target_group("web-tg")
    deploy(node, "web", [classic, tg], health)
    assert node.converge()
    app_intent(node.store, "web", [tg], basedir=node.basedir("web"), health_port=health.port)
    assert node.converge()
    assert cloud.registered(classic, node.instance) == "Unknown"
    assert cloud.registered(tg, node.instance) == "healthy"
    assert node.recorded("web") == [{**tg, "role_arn": None}]


def test_a_failing_health_check_deregisters_after_unhealthy_threshold_failures(
    node: Node, cloud: Cloud, health: HealthApp
) -> None:
    classic = cloud.classic("web-lb")
    deploy(node, "web", [classic], health, check={**FAST_HTTP, "unhealthy_threshold": 3})
    assert node.converge()

    health.healthy = False
    started = time.monotonic()
    assert not node.converge()
    report = node.report("web")
    assert report.status == "error"
    assert "unhealthy" in (report.error or "") and "out of its load balancers" in (
        report.error or ""
    )
    assert cloud.registered(classic, node.instance) == "Unknown"
    # Three failures in a row, 50 ms apart, not one: a blip does not take a node out.
    assert time.monotonic() - started >= 2 * 0.05


def test_min_nodes_holds_a_health_based_deregistration(
    tmp_path: Path, store: IntentStore, cloud: Cloud, health: HealthApp
) -> None:
    apps = tmp_path / "apps"
    n1 = Node("n1", tmp_path / "n1", store, cloud, cloud.instance(), apps=apps)
    n2 = Node("n2", tmp_path / "n2", store, cloud, cloud.instance(), apps=apps)
    classic = cloud.classic("web-lb")
    deploy(n1, "web", [classic], health, min_nodes=2)
    n2.assign("web")
    assert n1.converge() and n2.converge()
    assert n2.report("web").details["in_service"] is True

    health.healthy = False  # the two nodes share one host here: n1 is the one looking
    assert not n1.converge()
    report = n1.report("web")
    assert report.status == "error"
    assert "kept in its load balancers: 2 node(s) of web/prod in service, min_nodes 2" in (
        report.error or ""
    )
    assert cloud.registered(classic, n1.instance) == "InService"
    assert report.details["in_service"] is True  # still counted by its peers

    app_intent(store, "web", [classic], basedir=n1.basedir("web"), health_port=health.port,
               min_nodes=1)  # fmt: skip
    assert not n1.converge()
    assert cloud.registered(classic, n1.instance) == "Unknown"
    assert n1.report("web").details["in_service"] is False

    # n1 is out: n2 is now the last node in service, and min_nodes 1 keeps it there.
    assert not n2.converge()
    assert "1 node(s) of web/prod in service, min_nodes 1" in (n2.report("web").error or "")
    assert cloud.registered(classic, n2.instance) == "InService"
    assert store.lease_holders("elb-registrar/web/prod") == []


def test_a_drain_request_from_setlive_is_acknowledged_once_the_node_is_out(
    node: Node, cloud: Cloud, health: HealthApp
) -> None:
    classic = cloud.classic("web-lb")
    deploy(node, "web", [classic], health)
    assert node.converge()

    request = {"token": "switch-7", "at": time.time(), "until": time.time() + 300}
    setlive = Reality(node="n1", agent="setlive", app="web", status="converging",
                      details={"drain_request": request})  # fmt: skip
    node.store.write_reality(setlive)
    assert node.converge()
    assert node.report("web").details["drained_for"] == "switch-7"
    assert cloud.registered(classic, node.instance) == "Unknown"

    node.store.write_reality(setlive.model_copy(update={"details": {}}))
    assert node.converge()
    assert "drained_for" not in node.report("web").details
    assert cloud.registered(classic, node.instance) == "InService"


# -- ownership and errors ---------------------------------------------------------------------


def test_a_load_balancer_owned_by_another_app_is_refused_for_that_app_alone(
    node: Node, cloud: Cloud, health: HealthApp
) -> None:
    theirs = cloud.classic("api-lb", tags={APP_TAG: "api", CLUSTER_TAG: CLUSTER})
    ours = cloud.classic("web-lb")
    deploy(node, "web", [theirs], health)
    deploy(node, "shop", [ours], health)

    assert not node.converge()
    report = node.report("web")
    assert report.status == "error"
    assert report.error is not None
    assert "tagged platypus:app=api platypus:cluster=prod" in report.error
    assert "refusing to register web/prod" in report.error
    assert cloud.registered(theirs, node.instance) == "Unknown"
    assert cloud.tags(theirs) == {APP_TAG: "api", CLUSTER_TAG: CLUSTER}
    assert node.report("shop").status == "converged"
    assert cloud.registered(ours, node.instance) == "InService"


def test_a_missing_load_balancer_is_an_error_naming_it_and_the_iam_action(
    node: Node, cloud: Cloud, health: HealthApp
) -> None:
    gone = {"type": "classic", "name": "no-such-lb", "region": "us-east-1"}
    tg = cloud.target_group("web-tg")
    deploy(node, "web", [gone, tg], health)
    deploy(node, "shop", [cloud.classic("shop-lb")], health)

    assert not node.converge()
    report = node.report("web")
    assert report.status == "error"
    assert report.error == (
        "classic load balancer no-such-lb (us-east-1) does not exist "
        "(elasticloadbalancing:DescribeInstanceHealth)"
    )
    assert cloud.registered(tg, node.instance) == "healthy"  # the other one is fine
    assert node.report("shop").status == "converged"


def test_an_unreadable_state_file_is_an_error_naming_it(
    node: Node, cloud: Cloud, health: HealthApp
) -> None:
    deploy(node, "web", [cloud.classic("web-lb")], health)
    node.state_file("web").parent.mkdir(parents=True)
    node.state_file("web").write_text('{"app": "web", "load_balancers": "?"}')
    assert not node.converge()
    error = node.report("web").error or ""
    assert str(node.state_file("web")) in error and "delete the file" in error


def test_a_restarted_registrar_removes_the_temp_files_a_kill_left(
    node: Node, cloud: Cloud, health: HealthApp
) -> None:
    deploy(node, "web", [cloud.classic("web-lb")], health)
    assert node.converge()
    record = node.state_file("web")
    assert record.exists()
    left = record.with_name(".pp-tmp-web.json.0badc0de")
    left.write_text('{"app": "web", "load_balancers": []}')
    node.restart()
    node.agent.start()
    assert not left.exists() and record.exists()
    assert node.converge()


# -- credentials ------------------------------------------------------------------------------


def iam_setup(cloud: Cloud, user_actions: list[str]) -> tuple[str, Any]:
    """A user allowed only ``user_actions``, and a role allowed every ELB action; returns
    the role's ARN and a session with the user's keys."""
    iam = cloud.client("iam")
    iam.create_user(UserName="agent")
    iam.put_user_policy(UserName="agent", PolicyName="agent", PolicyDocument=json.dumps(
        {"Version": "2012-10-17",
         "Statement": [{"Effect": "Allow", "Action": user_actions, "Resource": "*"}]}))  # fmt: skip
    key = iam.create_access_key(UserName="agent")["AccessKey"]
    trust = {"Version": "2012-10-17", "Statement": [
        {"Effect": "Allow", "Principal": {"AWS": "*"}, "Action": "sts:AssumeRole"}]}  # fmt: skip
    role = iam.create_role(RoleName="registrar", AssumeRolePolicyDocument=json.dumps(trust))
    everything = {"Effect": "Allow", "Action": "elasticloadbalancing:*", "Resource": "*"}
    iam.put_role_policy(RoleName="registrar", PolicyName="elb", PolicyDocument=json.dumps(
        {"Version": "2012-10-17", "Statement": [everything]}))  # fmt: skip
    return role["Role"]["Arn"], credentials(key["AccessKeyId"], key["SecretAccessKey"])


def test_registration_through_an_assumed_role(
    tmp_path: Path, store: IntentStore, cloud: Cloud, health: HealthApp
) -> None:
    role_arn, session = iam_setup(cloud, ["sts:AssumeRole", "elasticloadbalancing:Describe*"])
    ours = {APP_TAG: "web", CLUSTER_TAG: CLUSTER}
    direct, assumed = cloud.classic("direct-lb", tags=ours), cloud.classic("role-lb", tags=ours)
    node = Node("n1", tmp_path / "n1", store, cloud, cloud.instance(), session=session)
    deploy(node, "web", [direct, {**assumed, "role_arn": role_arn}], health)
    cloud.enforce_iam()

    assert not node.converge()
    report = node.report("web")
    lbs = {lb["name"]: lb for lb in node.lbs("web").values()}
    assert lbs["role-lb"]["registered"] is True and "error" not in lbs["role-lb"]
    assert lbs["direct-lb"]["error"].startswith(
        "classic load balancer direct-lb (us-east-1): access denied for "
        "elasticloadbalancing:RegisterInstancesWithLoadBalancer: User: "
    )
    assert report.error == lbs["direct-lb"]["error"]
    cloud.relax_iam()
    assert cloud.registered(assumed, node.instance) == "InService"
    assert cloud.registered(direct, node.instance) == "Unknown"


def test_a_role_that_cannot_be_assumed_names_sts_assume_role(
    tmp_path: Path, store: IntentStore, cloud: Cloud, health: HealthApp
) -> None:
    role_arn, session = iam_setup(cloud, ["elasticloadbalancing:Describe*"])
    node = Node("n1", tmp_path / "n1", store, cloud, cloud.instance(), session=session)
    deploy(node, "web", [{**cloud.classic("web-lb"), "role_arn": role_arn}], health)
    cloud.enforce_iam()
    assert not node.converge()
    assert "access denied for sts:AssumeRole" in (node.report("web").error or "")


# -- AWS answering slowly ---------------------------------------------------------------------


def test_throttling_and_5xx_are_retried(node: Node, cloud: Cloud, health: HealthApp) -> None:
    """A loopback proxy in front of moto refuses the first calls with ``Throttling``
    and a 503, as AWS does under load; the registration goes through."""
    answers = [(400, "Throttling", "Rate exceeded"), (503, "ServiceUnavailable", "busy")]
    seen: list[str] = []

    class Proxy(http.server.BaseHTTPRequestHandler):
        def log_message(self, format: str, *args: Any) -> None:
            pass

        def do_POST(self) -> None:
            body = self.rfile.read(int(self.headers["Content-Length"]))
            seen.append(body.decode().split("Action=")[1].split("&")[0])
            if answers:
                status, code, message = answers.pop(0)
                error = (f"<ErrorResponse><Error><Type>Sender</Type><Code>{code}</Code>"
                         f"<Message>{message}</Message></Error><RequestId>1</RequestId>"
                         "</ErrorResponse>").encode()  # fmt: skip
                self.send_response(status)
                self.send_header("Content-Length", str(len(error)))
                self.end_headers()
                self.wfile.write(error)
                return
            headers = {k: v for k, v in self.headers.items() if k.lower() != "host"}
            forward = urllib.request.Request(cloud.endpoint + self.path, body, headers)
            with urllib.request.urlopen(forward, timeout=10) as answer:
                data = answer.read()
                self.send_response(answer.status)
                for key, value in answer.headers.items():
                    if key.lower() not in ("content-length", "connection", "transfer-encoding"):
                        self.send_header(key, value)
            self.send_header("Content-Length", str(len(data)))
            self.end_headers()
            self.wfile.write(data)

    classic = cloud.classic("web-lb")
    with serving(Proxy) as port:
        node.cloud = Cloud(f"http://127.0.0.1:{port}")
        node.restart()
        deploy(node, "web", [classic], health)
        assert node.converge(), node.report("web").error
    assert seen[:3] == ["DescribeInstanceHealth"] * 3  # two refusals, then through
    assert cloud.registered(classic, node.instance) == "InService"


# -- instance identity ------------------------------------------------------------------------


def test_the_instance_id_comes_from_imdsv2_with_a_token() -> None:
    with imds_server("i-0123456789abcdef0") as imds:
        assert Identity(None, f"http://127.0.0.1:{imds.port}")() == "i-0123456789abcdef0"
        assert imds.refused == 0
        with pytest.raises(urllib.error.HTTPError) as refused:  # IMDSv1: no token, no answer
            urllib.request.urlopen(
                f"http://127.0.0.1:{imds.port}/latest/meta-data/instance-id", timeout=5
            )
        refused.value.close()
        assert refused.value.code == 401 and imds.refused == 1


def test_no_instance_id_is_one_clear_error() -> None:
    with serving(http.server.BaseHTTPRequestHandler) as port:
        pass  # the port is free again: nothing answers there
    identity = Identity(None, f"http://127.0.0.1:{port}")
    with pytest.raises(ImdsError) as failed:
        identity()
    message = str(failed.value)
    assert message.startswith(f"cannot learn this instance's id: instance metadata at "
                              f"http://127.0.0.1:{port}: ")  # fmt: skip
    assert message.endswith("or pass --instance-id") and "\n" not in message
    assert Identity("i-0123456789abcdef0", f"http://127.0.0.1:{port}")() == "i-0123456789abcdef0"


# -- as a process -----------------------------------------------------------------------------


def agent_env(cloud: Cloud) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("AWS_")}
    return env | {
        "AWS_ENDPOINT_URL": cloud.endpoint,
        "AWS_ACCESS_KEY_ID": "testing",
        "AWS_SECRET_ACCESS_KEY": "testing",
        "AWS_CONFIG_FILE": "/dev/null",
        "AWS_SHARED_CREDENTIALS_FILE": "/dev/null",
    }


def agent_command(tmp_path: Path) -> list[str]:
    return [
        str(REPO / ".venv" / "bin" / "pp-elb-registrar"),
        "--store",
        f"sqlite://{tmp_path / 'store.db'}",
        "--node",
        "n1",
        "--state-dir",
        str(tmp_path / "state"),
        "--poll-interval",
        "0.1",
        "--log-format",
        "json",
    ]


def test_pp_elb_registrar_once_as_a_process(
    tmp_path: Path, store: IntentStore, cloud: Cloud, health: HealthApp
) -> None:
    instance = cloud.instance()
    node = Node("n1", tmp_path / "n1", store, cloud, instance)
    tg = cloud.target_group("web-tg")
    deploy(node, "web", [tg], health)
    env, command = agent_env(cloud), [*agent_command(tmp_path), "--once"]
    with imds_server(instance) as imds:
        done = subprocess.run(
            [*command, "--imds-endpoint", f"http://127.0.0.1:{imds.port}"],
            env=env, capture_output=True, timeout=60, check=False,
        )  # fmt: skip
        assert len(imds.tokens) == 1 and imds.refused == 0
    assert done.returncode == 0, done.stderr.decode()
    assert cloud.registered(tg, instance) == "healthy"
    assert node.report("web").status == "converged"
    events = [json.loads(line)["event"] for line in done.stderr.decode().splitlines()]
    assert "elb.registered" in events and "elb.instance" in events

    node.unassign("web")
    done = subprocess.run([*command, "--instance-id", instance], env=env, capture_output=True,
                          timeout=60, check=False)  # fmt: skip
    assert done.returncode == 0, done.stderr.decode()
    assert cloud.registered(tg, instance) == "unused"

    bad = subprocess.run([*command, "--instance-id", "web1"], env=env, capture_output=True,
                         timeout=60, check=False)  # fmt: skip
    assert bad.returncode == 2
    assert bad.stderr.decode().splitlines() == [
        "pp-elb-registrar: error: Invalid value for '--instance-id': 'web1' is not an EC2 "
        "instance id (i-0123456789abcdef0) (see 'pp-elb-registrar --help')"
    ]


def test_sigterm_ends_a_long_wait_for_in_service_at_once(
    tmp_path: Path, store: IntentStore, cloud: Cloud, health: HealthApp
) -> None:
    instance = cloud.instance()
    node = Node("n1", tmp_path, store, cloud, instance)  # its state dir is the process's
    classic = cloud.classic("web-lb")
    cloud.stop(instance)  # OutOfService for ever
    deploy(node, "web", [classic], health)
    agent = subprocess.Popen(
        [*agent_command(tmp_path), "--instance-id", instance, "--inservice-timeout", "300"],
        env=agent_env(cloud), stdout=subprocess.DEVNULL, stderr=subprocess.PIPE,
    )  # fmt: skip
    try:
        wait_for(lambda: cloud.registered(classic, instance) == "OutOfService", timeout_s=30)
        time.sleep(0.3)  # well into the wait
        stopped = time.monotonic()
        agent.terminate()
        _, log = agent.communicate(timeout=15)
        assert agent.returncode == 0
        assert time.monotonic() - stopped < 3
    finally:
        if agent.poll() is None:
            agent.kill()
            agent.communicate()
    assert b"agent.stop_abandoned" not in log  # the wait ended on the stop, not the grace
    assert node.recorded("web") == [{**classic, "role_arn": None}]


def test_stop_ends_a_long_wait_at_once(node: Node, cloud: Cloud, health: HealthApp) -> None:
    classic = cloud.classic("web-lb")
    cloud.stop(node.instance)  # OutOfService for ever
    node.settings = replace(node.settings, inservice_timeout_s=300)
    node.restart()
    deploy(node, "web", [classic], health)
    converging = threading.Thread(target=node.converge)
    converging.start()
    wait_for(lambda: cloud.registered(classic, node.instance) == "OutOfService", timeout_s=30)
    time.sleep(0.2)  # well into the wait for InService
    stopped = time.monotonic()
    node.stop.set()
    converging.join(timeout=30)
    assert not converging.is_alive()
    assert time.monotonic() - stopped < 5
    report = node.report("web")
    assert report.status == "converging"
    assert "stopped" in (report.error or "")
    assert node.recorded("web") == [{**classic, "role_arn": None}]
