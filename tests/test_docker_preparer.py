"""pp-preparer and image versions: the real command, a real engine and registry.

Images are pulled by digest into a private engine (``--docker-host``), verified, noted
as installs setlive reads like any other, and garbage-collected with their versions,
never while a container uses them. Every failure is one line in ``reality/`` for its
version alone; other apps carry on.
"""

from __future__ import annotations

import http.server
import json
import os
import subprocess
import threading
import urllib.request
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from docker_support import (
    Engine,
    Images,
    Registry,
    build_image,
    docker_engine,
    images,
    registry,
    run_preparer,
    start_registry,
    stop_registry,
)
from preparer_support import VENV_BIN, put_app
from runit_support import free_port

from agents.preparer.plan import ImageRules, Install, Observed, Present, Refuse, Wanted, plan
from agents.system.layout import IMAGE_FILE, AppLayout
from intent import keys
from intent.image_ref import parse_image
from intent.model import Reality
from intent.store import open_store

__all__ = ["docker_engine", "images", "registry"]  # fixtures

# The first test starts the engine and builds and pushes the images (once per run).
pytestmark = pytest.mark.timeout(900)

NODE = "web1"


class World:
    def __init__(self, root: Path, engine: Engine) -> None:
        self.root = root
        self.engine = engine
        self.store_url = f"sqlite://{root / 'intent.db'}"
        self.store = open_store(self.store_url, keys.DEFAULT_PREFIX)
        self.srv = root / "srv"

    def assign(self, app: str, versions: dict[str, dict[str, Any]], **deploy: Any) -> None:
        put_app(self.store, NODE, app, self.srv / app, versions, **deploy)

    def layout(self, app: str) -> AppLayout:
        return AppLayout(self.srv / app, app)

    def run(self, *extra: str, check: int | None = 0, env: dict[str, str] | None = None) -> str:
        result = run_preparer(
            self.engine, self.store_url, NODE, self.root / "state", *extra, **(env or {})
        )
        if check is not None:
            assert result.returncode == check, result.stderr
        assert "Traceback" not in result.stderr
        return result.stderr

    def report(self, app: str) -> Reality:
        (report,) = [r for r in self.store.reality(node=NODE, app=app) if r.agent == "preparer"]
        return report

    def holds(self, ref: str) -> bool:
        out = self.engine.run_cli(
            "image", "ls", "--digests", "--format", "{{.Repository}}@{{.Digest}}"
        )
        return ref in out.splitlines()

    def forget(self, ref: str) -> None:
        if self.holds(ref):
            self.engine.run_cli("rmi", ref)


@pytest.fixture
def world(tmp_path: Path, docker_engine: Engine, images: Images) -> Iterator[World]:
    world = World(tmp_path, docker_engine)
    for ref in (images.v1, images.v2, images.broken):
        world.forget(ref)
    yield world
    for name in docker_engine.containers("pp-test-"):
        docker_engine.run_cli("rm", "-f", name)


def active(image: str) -> dict[str, str]:
    return {"state": "active", "image": image}


def prep(image: str) -> dict[str, str]:
    return {"state": "prep", "image": image}


# -- the plan, with plain data ----------------------------------------------------------------

DIGEST = "c" * 64
IMAGE = f"registry.example:5000/web@sha256:{DIGEST}"


def test_plan_pulls_a_missing_image_and_again_when_the_engine_lost_it() -> None:
    want = Wanted("1", DIGEST, None, True, IMAGE)
    assert plan([want], Observed({})) == [Install("1", DIGEST, "", False, image=IMAGE)]
    held = Present("1", DIGEST, 1.0, image=IMAGE)
    assert plan([want], Observed({"1": held}, current="1")) == []
    lost = Present("1", DIGEST, 1.0, image=IMAGE, image_missing=True)
    assert plan([want], Observed({"1": lost}, current="1")) == [
        Install("1", DIGEST, "", True, image=IMAGE)
    ]


def test_plan_never_replaces_a_running_tarball_install_with_an_image() -> None:
    want = Wanted("1", DIGEST, None, True, IMAGE)
    tarball = Present("1", "d" * 64, 1.0)
    (refused,) = plan([want], Observed({"1": tarball}, current="1"))
    assert (
        isinstance(refused, Refuse) and "publish the new bytes as a new version" in refused.reason
    )
    assert plan([want], Observed({"1": tarball})) == [Install("1", DIGEST, "", True, image=IMAGE)]


def test_plan_refuses_images_outside_allowed_registries_or_when_signatures_are_required() -> None:
    want = Wanted("1", DIGEST, None, True, IMAGE)
    (refused,) = plan([want], Observed({}), image_rules=ImageRules(("127.0.0.1:5000",)))
    assert isinstance(refused, Refuse)
    assert "registry registry.example:5000 is not in --allowed-registries" in refused.reason
    assert plan([want], Observed({}), image_rules=ImageRules(("Registry.example:5000",))) != []
    (unsigned,) = plan([want], Observed({}), image_rules=ImageRules(signatures_required=True))
    assert isinstance(unsigned, Refuse) and "--trusted-keys" in unsigned.reason


# -- installing ---------------------------------------------------------------------------


def test_an_image_version_is_pulled_by_digest_and_noted_as_installed(
    world: World, images: Images
) -> None:
    world.assign("web", {"1": active(images.v1), "2": prep(images.v2)})
    stderr = world.run()
    assert world.holds(images.v1) and world.holds(images.v2)
    layout = world.layout("web")
    assert layout.installed_versions() == ["1", "2"]
    marker = layout.read_marker("1")
    assert marker is not None and marker.image == images.v1
    assert marker.sha256 == parse_image(images.v1).sha256 and marker.launch == (None,)
    install = layout.install_dir("1")
    assert (install / IMAGE_FILE).read_text() == images.v1 + "\n"
    st = install.stat()
    assert (st.st_uid, st.st_mode & 0o7777) == (0, 0o755)  # root's: never handed to the app
    report = world.report("web")
    assert report.status == "converged" and report.version == "1"
    assert report.details["versions"] == {"1": "installed", "2": "installed"}
    done = [json.loads(x) for x in stderr.splitlines() if '"install.done"' in x]
    assert sorted(e["version"] for e in done) == ["1", "2"]

    before = {p: p.stat().st_mtime_ns for p in install.iterdir()}
    assert '"install.done"' not in world.run()  # nothing to do the second time
    assert {p: p.stat().st_mtime_ns for p in install.iterdir()} == before


def test_an_image_removed_from_the_engine_by_hand_is_pulled_again(
    world: World, images: Images
) -> None:
    world.assign("web", {"1": active(images.v1)})
    world.run()
    world.forget(images.v1)
    world.run()
    assert world.holds(images.v1)
    assert world.report("web").details["versions"] == {"1": "installed"}


# -- failures, one line each, other apps carry on -------------------------------------------


def _one_line_error(world: World, app: str, version: str) -> str:
    report = world.report(app)
    assert report.status == "error"
    line = str(report.details["versions"][version])
    assert line.startswith("error: ") and "\n" not in line
    assert report.error is not None and "\n" not in report.error
    return line


def test_a_missing_image_is_reported_and_other_apps_install(world: World, images: Images) -> None:
    missing = images.v1.rsplit("@", 1)[0] + "@sha256:" + "0" * 64
    world.assign("gone", {"1": active(missing)})
    world.assign("web", {"1": active(images.v1)})
    world.run(check=1)
    line = _one_line_error(world, "gone", "1")
    assert f"cannot pull {missing}" in line
    assert "not found" in line or "unknown" in line
    assert world.layout("gone").installed_versions() == []
    assert world.report("web").details["versions"] == {"1": "installed"}


def test_an_unreachable_registry_is_reported_and_other_apps_install(
    world: World, images: Images
) -> None:
    nowhere = f"127.0.0.1:{free_port()}/web@sha256:{'1' * 64}"
    world.assign("far", {"1": active(nowhere)})
    world.assign("web", {"1": active(images.v1)})
    world.run(check=1)
    line = _one_line_error(world, "far", "1")
    assert f"cannot pull {nowhere}" in line and "connection refused" in line
    assert world.report("web").details["versions"] == {"1": "installed"}


def test_a_tag_only_reference_is_refused_as_intent_and_other_apps_install(
    world: World, images: Images
) -> None:
    tagged = images.v1.rsplit("@", 1)[0] + ":1"
    world.assign("tagged", {"1": active(tagged)})
    world.assign("web", {"1": active(images.v1)})
    world.run(check=1)
    report = world.report("tagged")
    assert report.status == "error" and report.error is not None
    assert "versions.1.image" in report.error and "not pinned by digest" in report.error
    assert "\n" not in report.error
    assert not world.holds(images.v1.rsplit("@", 1)[0] + ":1")
    assert world.report("web").details["versions"] == {"1": "installed"}


class _Tampering(http.server.BaseHTTPRequestHandler):
    """A registry in front of the real one that answers for one digest with the
    manifest of another image, claiming it is the one asked for."""

    upstream = ""
    swap: tuple[str, str] = ("", "")

    def log_message(self, format: str, *args: Any) -> None:
        pass

    def _relay(self, method: str) -> None:
        asked, served = self.swap
        path = self.path.replace(asked, served) if self.path.endswith(asked) else self.path
        request = urllib.request.Request(f"http://{self.upstream}{path}", method=method)
        for header in ("Accept", "Authorization"):
            for value in self.headers.get_all(header) or []:
                request.add_header(header, value)
        try:
            with urllib.request.urlopen(request, timeout=10) as answer:
                status, headers, body = answer.status, answer.headers, answer.read()
        except urllib.error.HTTPError as exc:
            status, headers, body = exc.code, exc.headers, exc.read()
        self.send_response(status)
        for name, value in headers.items():
            if name.lower() in ("content-type", "docker-content-digest", "content-length"):
                self.send_header(name, asked if name.lower() == "docker-content-digest" and
                                 path != self.path else value)  # fmt: skip
        self.end_headers()
        if method != "HEAD":
            self.wfile.write(body)

    def do_GET(self) -> None:
        self._relay("GET")

    def do_HEAD(self) -> None:
        self._relay("HEAD")


def test_a_registry_serving_another_manifest_for_the_digest_is_refused(
    world: World, images: Images, registry: Registry
) -> None:
    asked, served = parse_image(images.v1).digest, parse_image(images.v2).digest
    handler = type(
        "Handler", (_Tampering,), {"upstream": registry.address, "swap": (asked, served)}
    )
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), handler)
    thread = threading.Thread(target=server.serve_forever, args=(0.05,), daemon=True)
    thread.start()
    try:
        liar = f"127.0.0.1:{server.server_address[1]}/web@{asked}"
        world.assign("web", {"1": active(liar)})
        world.assign("other", {"1": active(images.v2)})
        world.run(check=1)
    finally:
        server.shutdown()
        server.server_close()
        thread.join()
    line = _one_line_error(world, "web", "1")
    assert f"cannot pull {liar}" in line
    assert "verif" in line or "digest" in line, line
    assert not world.holds(liar)
    assert world.layout("web").installed_versions() == []
    assert world.report("other").details["versions"] == {"1": "installed"}


def test_registry_credentials_come_from_the_docker_config(
    world: World, docker_engine: Engine, tmp_path: Path
) -> None:
    private = start_registry(docker_engine.root, users={"deployer": "s3cret"})
    try:
        login = docker_engine.env()
        config = tmp_path / "docker-config"
        config.mkdir()
        token = "ZGVwbG95ZXI6czNjcmV0"  # base64 of deployer:s3cret
        (config / "config.json").write_text(
            json.dumps({"auths": {private.address: {"auth": token}}})
        )
        login["DOCKER_CONFIG"] = str(config)
        repository = f"{private.address}/secret-web"
        build_image(docker_engine, repository, "1", label="secret")
        pushed = subprocess.run(
            [docker_engine.cli, "push", f"{repository}:1"],
            env=login,
            capture_output=True,
            text=True,
        )
        assert pushed.returncode == 0, pushed.stderr
        ref = json.loads(
            docker_engine.run_cli(
                "image", "inspect", "--format", "{{json .RepoDigests}}", f"{repository}:1"
            )
        )[0]
        docker_engine.run_cli("rmi", "--force", ref.split("@")[0] + ":1")

        world.assign("secret", {"1": active(ref)})
        world.run(check=1)  # the fixture's empty Docker config: no credentials
        assert "no basic auth credentials" in _one_line_error(world, "secret", "1")
        world.run(env={"DOCKER_CONFIG": str(config)})
        assert world.holds(ref)
        assert world.report("secret").details["versions"] == {"1": "installed"}
    finally:
        stop_registry(private)


# -- garbage collection -----------------------------------------------------------------------


def test_images_of_versions_no_longer_wanted_are_removed_with_their_installs(
    world: World, images: Images
) -> None:
    world.assign("web", {"1": active(images.v1), "2": prep(images.v2)})
    world.run()
    world.assign("web", {"2": active(images.v2)})
    world.run("--keep-old", "0")
    assert world.layout("web").installed_versions() == ["2"]
    assert not world.holds(images.v1) and world.holds(images.v2)


def test_an_image_a_container_uses_or_another_app_wants_is_never_removed(
    world: World, images: Images, docker_engine: Engine
) -> None:
    world.assign("web", {"1": active(images.v1), "2": prep(images.v2)})
    world.assign("twin", {"2": active(images.v2)})
    world.run()
    docker_engine.run_cli("create", "--name", "pp-test-holds-v1", images.v1)
    world.assign("web", {"3": active(images.broken)})
    world.run("--keep-old", "0")
    assert world.layout("web").installed_versions() == ["3"]
    assert world.holds(images.v1), "a container was created from it"
    assert world.holds(images.v2), "app twin wants it"
    assert world.report("web").status == "converged"
    docker_engine.run_cli("rm", "pp-test-holds-v1")


def test_a_tarball_only_node_needs_no_engine(tmp_path: Path) -> None:
    """An app of tarballs never talks to the engine: no engine, no error."""
    store = open_store(f"sqlite://{tmp_path / 'intent.db'}", keys.DEFAULT_PREFIX)
    put_app(store, NODE, "plain", tmp_path / "srv" / "plain", {})
    env = {**os.environ, "DOCKER_HOST": f"unix://{tmp_path / 'no-engine.sock'}"}
    result = subprocess.run(
        [
            str(VENV_BIN / "pp-preparer"),
            "--store",
            f"sqlite://{tmp_path / 'intent.db'}",
            "--node",
            NODE,
            "--once",
            "--state-dir",
            str(tmp_path / "state"),
        ],
        capture_output=True,
        text=True,
        timeout=120,
        env=env,
    )
    assert result.returncode == 0, result.stderr
