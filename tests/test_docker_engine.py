"""The test engine itself: private, networkless, and able to build, push and run an image."""

from __future__ import annotations

import subprocess
import urllib.request

import pytest
from docker_support import Engine, Registry, build_image, docker_engine, push, registry
from runit_support import free_port, wait_for

__all__ = ["docker_engine", "registry"]  # fixtures

# The first test starts the engine and builds and pushes the images (once per run).
pytestmark = pytest.mark.timeout(900)


def _links() -> str:
    return subprocess.run(["ip", "-o", "link"], capture_output=True, text=True).stdout


def test_the_engine_builds_pushes_and_runs_an_image_on_the_host_network(
    docker_engine: Engine, registry: Registry
) -> None:
    repository = f"{registry.address}/fixture"
    build_image(docker_engine, repository, "1", label="fixture-1")
    pinned = push(docker_engine, repository, "1")
    assert pinned.startswith(f"{repository}@sha256:")

    port = free_port()
    name = f"fixture-{port}"
    docker_engine.run_cli(
        "run", "-d", "--rm", "--name", name, "--network", "host", "--read-only",
        "--user", "65534:65534", "-e", f"PP_PORT_HTTP={port}", pinned,
    )  # fmt: skip
    try:

        def answers() -> bool:
            try:
                with urllib.request.urlopen(f"http://127.0.0.1:{port}/health", timeout=1) as r:
                    return bool(r.read() == b"fixture-1\n")
            except OSError:
                return False

        assert wait_for(answers, timeout=30)
    finally:
        docker_engine.run_cli("rm", "-f", name)


def test_the_engine_makes_no_interface_on_the_host(docker_engine: Engine) -> None:
    assert "docker0" not in _links()
    info = docker_engine.client().info()
    assert info["Driver"] in ("overlay2", "vfs")
