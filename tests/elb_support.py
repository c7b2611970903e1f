"""Helpers for the pp-elb-registrar tests: moto in server mode, loopback health and
instance-metadata servers, a node of the registrar with its store and host."""

from __future__ import annotations

import contextlib
import http.server
import json
import secrets
import threading
import urllib.request
from collections import Counter
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import boto3
import pytest
from preparer_support import free_port, moto_server

from agents.elb_registrar.agent import ElbRegistrar
from agents.elb_registrar.apply import Settings
from agents.runtime import Runtime, RuntimeOptions
from agents.system.aws import Aws
from intent import keys
from intent.cli.operator import unassign
from intent.model import Reality
from intent.store import IntentStore

REGION = "us-east-1"
CLUSTER = "prod"
FAST = Settings(
    inservice_timeout_s=3.0, drain_timeout_s=3.0, poll_interval_s=0.05, describe_every_s=0.0
)
FAST_HTTP = {
    "type": "http",
    "interval_s": 0.05,
    "timeout_s": 0.5,
    "healthy_threshold": 2,
    "unhealthy_threshold": 2,
    "deadline_s": 2.0,
}
WRITES = frozenset(
    {
        "RegisterInstancesWithLoadBalancer",
        "DeregisterInstancesFromLoadBalancer",
        "RegisterTargets",
        "DeregisterTargets",
        "AddTags",
    }
)


# -- moto -------------------------------------------------------------------------------------


def credentials(access_key: str = "testing", secret: str = "testing") -> boto3.Session:
    return boto3.Session(
        aws_access_key_id=access_key, aws_secret_access_key=secret, region_name=REGION
    )


@dataclass
class Cloud:
    """One moto server: EC2 instances, a VPC, classic load balancers, target groups."""

    endpoint: str
    session: boto3.Session = field(default_factory=credentials)
    clients: dict[str, Any] = field(default_factory=dict)

    def client(self, service: str) -> Any:
        if service not in self.clients:
            self.clients[service] = self.session.client(service, endpoint_url=self.endpoint)  # type: ignore[call-overload]
        return self.clients[service]

    def post(self, path: str, body: bytes = b"") -> None:
        request = urllib.request.Request(
            self.endpoint + path, data=body, method="POST", headers={"Content-Type": "text/plain"}
        )
        with urllib.request.urlopen(request, timeout=10) as answer:
            answer.read()

    def reset(self) -> None:
        self.relax_iam()
        self.post("/moto-api/reset")

    def relax_iam(self) -> None:
        self.post("/moto-api/reset-auth", b"inf")

    def enforce_iam(self) -> None:
        """From now on every call needs credentials IAM allows it (moto's auth mode)."""
        self.post("/moto-api/reset-auth", b"0")

    def instance(self) -> str:
        answer = self.client("ec2").run_instances(ImageId="ami-12c6146b", MinCount=1, MaxCount=1)
        return str(answer["Instances"][0]["InstanceId"])

    def stop(self, instance: str) -> None:
        self.client("ec2").stop_instances(InstanceIds=[instance])

    def classic(self, name: str, tags: dict[str, str] | None = None) -> dict[str, Any]:
        extra = {"Tags": [{"Key": k, "Value": v} for k, v in tags.items()]} if tags else {}
        self.client("elb").create_load_balancer(
            LoadBalancerName=name,
            Listeners=[{"Protocol": "HTTP", "LoadBalancerPort": 80, "InstancePort": 8080}],
            AvailabilityZones=[f"{REGION}a"],
            **extra,
        )
        return {"type": "classic", "name": name, "region": REGION}

    def target_group(self, name: str, port: int = 8080) -> dict[str, Any]:
        ec2 = self.client("ec2")
        vpc = ec2.create_vpc(CidrBlock="10.0.0.0/16")["Vpc"]["VpcId"]
        arn = self.client("elbv2").create_target_group(
            Name=name, Protocol="HTTP", Port=port, VpcId=vpc, TargetType="instance"
        )["TargetGroups"][0]["TargetGroupArn"]
        return {"type": "target_group", "arn": arn, "port": port, "region": REGION}

    def registered(self, lb: dict[str, Any], instance: str) -> str:
        """AWS's state for ``instance`` in ``lb``, as moto answers it."""
        if lb["type"] == "classic":
            (state,) = self.client("elb").describe_instance_health(
                LoadBalancerName=lb["name"], Instances=[{"InstanceId": instance}]
            )["InstanceStates"]
            return str(state["State"])
        descriptions = self.client("elbv2").describe_target_health(
            TargetGroupArn=lb["arn"], Targets=[{"Id": instance, "Port": lb["port"]}]
        )["TargetHealthDescriptions"]
        return str(descriptions[0]["TargetHealth"]["State"])

    def tags(self, lb: dict[str, Any]) -> dict[str, str]:
        if lb["type"] == "classic":
            found = self.client("elb").describe_tags(LoadBalancerNames=[lb["name"]])
        else:
            found = self.client("elbv2").describe_tags(ResourceArns=[lb["arn"]])
        return {t["Key"]: t["Value"] for d in found["TagDescriptions"] for t in d["Tags"]}


@pytest.fixture(scope="module", name="moto")
def moto_fixture() -> Iterator[str]:
    """One moto server per test module (import it with ``cloud_fixture``)."""
    with moto_server() as endpoint:
        yield endpoint


@pytest.fixture(name="cloud")
def cloud_fixture(moto: str) -> Iterator[Cloud]:
    """moto emptied for the test, and after it."""
    cloud = Cloud(moto)
    cloud.reset()
    yield cloud
    cloud.reset()  # never leave IAM enforced for the next test


class CallCounter:
    """A botocore ``before-call`` hook: every AWS call the agent makes, by operation."""

    def __init__(self) -> None:
        self.calls: Counter[str] = Counter()
        self._lock = threading.Lock()

    def __call__(self, model: Any = None, **kwargs: Any) -> None:
        with self._lock:
            self.calls[model.name] += 1

    def take(self) -> Counter[str]:
        with self._lock:
            taken, self.calls = self.calls, Counter()
        return taken


# -- loopback servers -------------------------------------------------------------------------


class _Quiet(http.server.BaseHTTPRequestHandler):
    def log_message(self, format: str, *args: Any) -> None:
        pass

    def _answer(self, status: int, body: bytes) -> None:
        self.send_response(status)
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)


@contextlib.contextmanager
def serving(handler: type[http.server.BaseHTTPRequestHandler]) -> Iterator[int]:
    server = http.server.ThreadingHTTPServer(("127.0.0.1", free_port()), handler)
    server.daemon_threads = True
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        yield server.server_address[1]
    finally:
        server.shutdown()
        server.server_close()
        thread.join()


class HealthApp:
    """An app's health endpoint on a loopback port: /health answers 200 or 503."""

    def __init__(self) -> None:
        self.healthy = True
        self.port = 0

    def handler(self) -> type[http.server.BaseHTTPRequestHandler]:
        app = self

        class Handler(_Quiet):
            def do_GET(self) -> None:
                if app.healthy:
                    self._answer(200, b"ok")
                else:
                    self._answer(503, b"sick")

        return Handler


@contextlib.contextmanager
def health_app() -> Iterator[HealthApp]:
    app = HealthApp()
    with serving(app.handler()) as port:
        app.port = port
        yield app


@dataclass
class Imds:
    """An instance metadata service speaking IMDSv2: PUT a token first, then GET with it."""

    instance: str
    port: int = 0
    tokens: set[str] = field(default_factory=set)
    refused: int = 0
    """GETs without a valid token (answered 401, as EC2 does with IMDSv2 required)."""

    def handler(self) -> type[http.server.BaseHTTPRequestHandler]:
        imds = self

        class Handler(_Quiet):
            def do_PUT(self) -> None:
                ttl = self.headers.get("X-aws-ec2-metadata-token-ttl-seconds", "")
                if self.path != "/latest/api/token" or not ttl.isdigit():
                    self._answer(400, b"")
                    return
                token = secrets.token_hex(16)
                imds.tokens.add(token)
                self._answer(200, token.encode())

            def do_GET(self) -> None:
                if self.headers.get("X-aws-ec2-metadata-token") not in imds.tokens:
                    imds.refused += 1
                    self._answer(401, b"")
                elif self.path == "/latest/meta-data/instance-id":
                    self._answer(200, imds.instance.encode())
                else:
                    self._answer(404, b"")

        return Handler


@contextlib.contextmanager
def imds_server(instance: str) -> Iterator[Imds]:
    imds = Imds(instance)
    with serving(imds.handler()) as port:
        imds.port = port
        yield imds


# -- a node -----------------------------------------------------------------------------------


@dataclass
class Node:
    """One node's registrar, its store and the apps' basedirs on its host."""

    name: str
    root: Path
    store: IntentStore
    cloud: Cloud
    instance: str
    counter: CallCounter = field(default_factory=CallCounter)
    settings: Settings = FAST
    session: boto3.Session = field(default_factory=credentials)
    stop: threading.Event = field(default_factory=threading.Event)
    apps: Path | None = None
    """Where the apps' basedirs are (nodes of one test may share it: one host's paths)."""

    def __post_init__(self) -> None:
        self.agent = self.make_agent()
        self.runtime = Runtime(self.agent, self.store, RuntimeOptions(node=self.name, once=True))

    def make_agent(self) -> ElbRegistrar:
        aws = Aws(
            session=self.session,
            endpoint_url=self.cloud.endpoint,
            hooks=[("before-call", self.counter)],
            stop=self.stop,
            attempts=3,
            max_backoff_s=0.2,
        )
        return ElbRegistrar(
            self.store,
            self.name,
            aws,
            lambda: self.instance,
            state_dir=self.root / "state",
            settings=self.settings,
            stop=self.stop,
        )

    def restart(self) -> None:
        """A new agent process: nothing in memory, only the state dir survives."""
        self.agent = self.make_agent()
        self.runtime = Runtime(self.agent, self.store, RuntimeOptions(node=self.name, once=True))

    def basedir(self, app: str) -> Path:
        return (self.apps or self.root / "apps") / app

    def run(self, app: str, version: str | None) -> None:
        """Make ``current`` point at ``version`` (what setlive does), or remove it."""
        basedir = self.basedir(app)
        (basedir / "installs").mkdir(parents=True, exist_ok=True)
        current = basedir / "current"
        with contextlib.suppress(FileNotFoundError):
            current.unlink()
        if version is not None:
            (basedir / "installs" / f"{app}_{version}").mkdir(exist_ok=True)
            current.symlink_to(f"installs/{app}_{version}")

    def assign(self, app: str, cluster: str = CLUSTER) -> None:
        self.store.put_json(keys.node_app(self.name, app), {"cluster": cluster})

    def unassign(self, app: str) -> None:
        unassign(self.store, self.name, [app], "tester")  # as `pp unassign` does

    def converge(self) -> bool:
        return self.runtime.run_pass(force=True)

    def report(self, app: str) -> Reality:
        (found,) = [r for r in self.store.reality(self.name, app) if r.agent == "elb-registrar"]
        return found

    def lbs(self, app: str) -> dict[str, dict[str, Any]]:
        return {lb["id"]: lb for lb in self.report(app).details["load_balancers"]}

    def state_file(self, app: str) -> Path:
        return self.root / "state" / f"{app}.json"

    def recorded(self, app: str) -> list[dict[str, Any]]:
        path = self.state_file(app)
        if not path.exists():
            return []
        return [entry["lb"] for entry in json.loads(path.read_text())["load_balancers"]]


def app_intent(
    store: IntentStore,
    app: str,
    lbs: list[dict[str, Any]],
    *,
    basedir: Path,
    active: str | None = "1",
    health_port: int | None = None,
    check: dict[str, Any] | None = None,
    min_nodes: int = 0,
    cluster: str = CLUSTER,
) -> None:
    versions = {"1": "a" * 64, "2": "b" * 64}
    config = {
        "versions": {
            v: {"state": "active" if v == active else "prep", "sha256": digest}
            for v, digest in versions.items()
        },
        "min_nodes": min_nodes,
    }
    deploy: dict[str, Any] = {"basedir": str(basedir), "elb": lbs}
    if health_port is not None:
        deploy["health_check"] = {**(check or FAST_HTTP), "port": health_port}
    store.put_json(keys.config(app, cluster), config)
    store.put_json(keys.deploy_config(app, cluster), deploy)
