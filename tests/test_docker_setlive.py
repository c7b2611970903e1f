"""Image versions end to end: pp-preparer pulls, pp-setlive runs them under a real runit.

A private engine and registry (docker_support), a private runsvdir (runit_support),
the real pp-preparer command and setlive's real runtime: deploy, upgrade, a broken
image rolled back, a container removed by hand or its client killed coming back, and
the app's removal stopping and removing its container.
"""

from __future__ import annotations

import http.client
import json
import os
import signal
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
from docker_support import Engine, Images, docker_engine, images, registry
from runit_support import Runsvdir, free_port, require_root, runsvdir, wait_for

from agents.preparer.agent import Preparer
from agents.preparer.apply import Settings
from agents.runtime import Runtime, RuntimeOptions
from agents.setlive.agent import SetliveAgent
from agents.setlive.container import ContainerSettings
from agents.setlive.observe import Paths
from agents.system import runit
from agents.system.archive import Limits
from agents.system.fetch import FetchOptions
from intent import keys
from intent.cli.operator import unassign
from intent.model import Reality
from intent.store import IntentStore, open_store

__all__ = ["docker_engine", "images", "registry", "runsvdir"]  # fixtures

# The first test starts the engine and builds and pushes the images (once per run).
pytestmark = pytest.mark.timeout(900)

NODE = "n1"
HEALTH = {
    "type": "http",
    "path": "/health",
    "interval_s": 0.2,
    "healthy_threshold": 2,
    "unhealthy_threshold": 3,
    "deadline_s": 30.0,
    "min_uptime_s": 0.5,
    "timeout_s": 1.0,
}


@dataclass
class Node:
    root: Path
    engine: Engine
    store: IntentStore
    paths: Paths
    runtime: Runtime
    preparer: Runtime

    def deploy(
        self, app: str, port: int, versions: dict[str, str], active: str | None, **deploy: Any
    ) -> None:
        """Intent for ``app``: ``versions`` maps version -> image reference."""
        self.store.put_json(keys.node_app(NODE, app), {"cluster": "c"})
        config = {
            "versions": {
                v: {"state": "active" if v == active else "prep", "image": image}
                for v, image in versions.items()
            },
            "user_config": deploy.pop("user_config", {}),
        }
        self.store.put_json(keys.config(app, "c"), config)
        self.store.put_json(
            keys.deploy_config(app, "c"),
            {
                "basedir": str(self.root / "apps" / app),
                "run_as": "nobody",
                "ports": [{"name": "http", "port": port}],
                "health_check": {**HEALTH, "port": port},
                **deploy,
            },
        )

    def prepare(self) -> None:
        assert self.preparer.run_pass(force=True)

    def converge(self) -> bool:
        return self.runtime.run_pass(force=True)

    def report(self, app: str) -> Reality:
        (report,) = [r for r in self.store.reality(NODE, app) if r.agent == "setlive"]
        return report

    def status(self, service: str) -> runit.ServiceStatus:
        return runit.status(self.paths.stage / service)

    def container_id(self, name: str) -> str | None:
        try:
            return str(self.inspect(name)["Id"])
        except AssertionError:  # no such container
            return None

    def inspect(self, name: str) -> dict[str, Any]:
        return dict(json.loads(self.engine.run_cli("inspect", name))[0])


@pytest.fixture
def node(
    runsvdir: Runsvdir,
    docker_engine: Engine,
    request: pytest.FixtureRequest,
    monkeypatch: pytest.MonkeyPatch,
) -> Iterator[Node]:
    require_root()
    root = runsvdir.root / request.node.name[:40]
    root.mkdir(mode=0o755)
    store = open_store(f"sqlite://{root / 'store.db'}", keys.DEFAULT_PREFIX)
    paths = Paths(
        runsvdir.service_dir,
        root / "stage",
        root / "log",
        root / "state",
        ContainerSettings(docker_bin=docker_engine.cli, docker_host=docker_engine.url),
    )
    agent = SetliveAgent(store, NODE, paths, supervise_timeout_s=8.0, lease_ttl_s=10.0)
    runtime = Runtime(agent, store, RuntimeOptions(node=NODE, once=True))
    monkeypatch.setenv("DOCKER_CONFIG", str(docker_engine.config_dir))
    settings = Settings(FetchOptions(timeout_s=1, attempts=1), Limits(1 << 30, 100_000))
    preparer = Preparer(
        settings, store=store, node=NODE, state_dir=root / "preparer", docker_host=docker_engine.url
    )
    preparer_runtime = Runtime(preparer, store, RuntimeOptions(node=NODE, once=True))
    yield Node(root, docker_engine, store, paths, runtime, preparer_runtime)
    for service in list(runsvdir.service_dir.iterdir()):
        target = runit.linked_target(runsvdir.service_dir, service.name)
        if target is not None and root in target.parents:
            runit.down(target)
    store.close()


def get(port: int, path: str = "/health") -> tuple[int, str] | None:
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=1)
    try:
        conn.request("GET", path)
        response = conn.getresponse()
        return response.status, response.read().decode()
    except (OSError, http.client.HTTPException):
        return None
    finally:
        conn.close()


def test_an_image_is_deployed_under_runit_confined_and_removed(node: Node, images: Images) -> None:
    port = free_port()
    node.deploy(
        "web", port, {"1": images.v1, "2": images.v2}, "1", user_config={"TOKEN": "s3cret-value"}
    )
    node.prepare()
    assert node.converge()
    report = node.report("web")
    assert (report.status, report.version) == ("converged", "1"), report.error
    assert report.details["health"] == "healthy"
    assert get(port) == (200, "web 1\n")

    assert node.engine.containers("pp-web-") == ["pp-web-1"]
    container = node.inspect("pp-web-1")
    host_config = container["HostConfig"]
    assert host_config["NetworkMode"] == "host" and host_config["ReadonlyRootfs"] is True
    assert host_config["SecurityOpt"] == ["no-new-privileges"]
    assert host_config["PidsLimit"] == 512 and host_config["CapDrop"] == ["ALL"]
    assert host_config["AutoRemove"] is True and host_config["Init"] is True
    assert container["Config"]["User"] == "65534:65534"
    env = dict(item.split("=", 1) for item in container["Config"]["Env"])
    assert env["PP_VERSION"] == "1" and env["PP_APP"] == "web" and env["TOKEN"] == "s3cret-value"
    assert env["PP_PORT_HTTP"] == str(port)
    config_path = env["PP_CONFIG_PATH"]
    mount = {m["Destination"]: m for m in container["Mounts"]}[config_path]
    assert mount["RW"] is False and json.loads(Path(config_path).read_text())["TOKEN"]
    client = node.status("web").pid
    assert client is not None
    cmdline = Path(f"/proc/{client}/cmdline").read_bytes()
    assert b"s3cret-value" not in cmdline, "the app's env must not show in ps"

    # removal stops the service and removes its container
    unassign(node.store, NODE, ["web"], "test")
    node.converge()
    assert wait_for(lambda: node.engine.containers("pp-web-") == [], 20)
    assert get(port) is None


def test_an_image_is_upgraded_and_a_broken_one_rolled_back(node: Node, images: Images) -> None:
    port = free_port()
    node.deploy("web", port, {"1": images.v1, "2": images.v2, "3": images.broken}, "1")
    node.prepare()
    assert node.converge()
    assert get(port) == (200, "web 1\n")

    node.deploy("web", port, {"1": images.v1, "2": images.v2, "3": images.broken}, "2")
    assert node.converge()
    assert (node.report("web").status, node.report("web").version) == ("converged", "2")
    assert get(port) == (200, "web 2\n")
    assert wait_for(lambda: node.engine.containers("pp-web-") == ["pp-web-2"], 10)

    # a broken image fails its gate and rolls back
    node.deploy("web", port, {"1": images.v1, "2": images.v2, "3": images.broken}, "3")
    assert not node.converge()
    report = node.report("web")
    assert report.status == "error" and report.version == "2"
    assert report.error is not None and "rolled back to 2" in report.error
    assert get(port) == (200, "web 2\n")
    assert wait_for(lambda: node.engine.containers("pp-web-") == ["pp-web-2"], 10)


def test_a_container_removed_by_hand_or_left_by_a_killed_client_comes_back_alone(
    node: Node, images: Images
) -> None:
    port = free_port()
    node.deploy("drift", port, {"1": images.v1}, "1")
    node.prepare()
    assert node.converge()
    assert get(port) == (200, "web 1\n")
    first = node.inspect("pp-drift-1")["Id"]

    node.engine.run_cli("rm", "--force", "pp-drift-1")
    assert wait_for(lambda: get(port) == (200, "web 1\n"), 30)
    second = node.inspect("pp-drift-1")["Id"]
    assert second != first

    client = node.status("drift").pid
    assert client is not None
    os.kill(client, signal.SIGKILL)  # the container outlives its client: finish removes it
    assert wait_for(lambda: node.container_id("pp-drift-1") not in (None, second), 30)
    assert wait_for(lambda: get(port) == (200, "web 1\n"), 30)
    assert node.engine.containers("pp-drift-") == ["pp-drift-1"]
    assert node.converge()
    assert node.report("drift").details["health"] == "healthy"


def test_an_env_value_with_a_line_break_is_refused_by_name(node: Node, images: Images) -> None:
    port = free_port()
    short = {**HEALTH, "port": port, "deadline_s": 5.0}  # it never starts: no need to wait long
    node.deploy("lines", port, {"1": images.v1}, "1", env={"MOTD": "one\ntwo"}, health_check=short)
    node.prepare()
    assert not node.converge()
    log_dir = node.paths.log_root / "lines"
    assert wait_for(
        lambda: (
            "MOTD: a line break cannot be passed to a container"
            in "".join(p.read_text(errors="replace") for p in log_dir.glob("*") if p.is_file())
        ),
        15,
    )
    assert node.engine.containers("pp-lines-") == []
