"""pp and image versions: pack --docker pushes and prints the pinned reference; deploy and
rollback take image references."""

from __future__ import annotations

import json
import subprocess
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from click.testing import CliRunner, Result
from docker_support import Engine, Registry, build_image, docker_engine, registry

from intent import cli, keys
from intent.model import AppConfig
from intent.store import IntentStore
from intent.store.sqlite import SqliteStore

__all__ = ["docker_engine", "registry"]  # fixtures

# The first test starts the engine and builds and pushes the images (once per run).
pytestmark = pytest.mark.timeout(900)

REPO = Path(__file__).resolve().parent.parent
PP_BIN = REPO / ".venv" / "bin" / "pp"
ONE = f"registry.example:5000/web@sha256:{'1' * 64}"
TWO = f"registry.example:5000/web@sha256:{'2' * 64}"


@pytest.fixture
def store(tmp_path: Path) -> Iterator[IntentStore]:
    s = IntentStore(SqliteStore(tmp_path / "intent.db"))
    yield s
    s.close()


def pp(tmp_path: Path, *args: str) -> Result:
    return CliRunner().invoke(cli.cli, ["--store", f"sqlite://{tmp_path}/intent.db", *args])


def stored(store: IntentStore) -> Any:
    raw = store.get_raw(keys.config("web", "prod"))
    return None if raw is None else json.loads(raw.value)


def config(store: IntentStore) -> AppConfig:
    return AppConfig.model_validate(stored(store))


def one_line_error(result: Result) -> str:
    assert result.exit_code != 0
    lines = result.output.strip().splitlines()
    assert len(lines) == 1 and "Traceback" not in result.output, result.output
    return lines[0]


def test_deploy_takes_an_image_in_place_of_sha256(tmp_path: Path, store: IntentStore) -> None:
    first = pp(tmp_path, "deploy", "web", "1", "-c", "prod", "--image", ONE)
    assert first.exit_code == 0, first.output
    second = pp(tmp_path, "deploy", "web", "2", "-c", "prod", "--image", TWO)
    assert second.exit_code == 0, second.output
    versions = config(store).versions
    assert (versions["1"].state, versions["1"].image, versions["1"].sha256) == ("prep", ONE, None)
    assert (versions["2"].state, versions["2"].image) == ("active", TWO)
    assert stored(store)["versions"]["2"] == {
        "state": "active",
        "image": TWO,
    }

    again = pp(tmp_path, "deploy", "web", "1", "-c", "prod", "--image", ONE)
    assert again.exit_code == 0, again.output
    assert config(store).active_version == "1"


def test_rollback_takes_an_image_reference_in_place_of_a_version(
    tmp_path: Path, store: IntentStore
) -> None:
    for version, image in (("1", ONE), ("2", TWO)):
        assert pp(tmp_path, "deploy", "web", version, "-c", "prod", "--image", image).exit_code == 0
    back = pp(tmp_path, "rollback", "web", "-c", "prod", "--to", ONE)
    assert back.exit_code == 0, back.output
    assert "rolled back to 1" in back.output
    assert config(store).active_version == "1"
    unknown = f"registry.example:5000/web@sha256:{'9' * 64}"
    line = one_line_error(pp(tmp_path, "rollback", "web", "-c", "prod", "--to", unknown))
    assert f"no version has image {unknown}" in line


@pytest.mark.parametrize(
    ("args", "says"),
    [
        (["--image", "registry.example:5000/web:1.0"], "not pinned by digest"),
        (["--image", f"web@sha256:{'1' * 64}"], "names no registry host"),
        (["--image", ONE, "--sha256", "1" * 64], "give either --sha256"),
        ([], "give either --sha256"),
        (
            ["--image", ONE, "--url", "https://artifacts.example/web.tar.gz"],
            "--url is for tarballs",
        ),
    ],
)
def test_deploy_refuses_bad_image_arguments_in_one_line(
    tmp_path: Path, store: IntentStore, args: list[str], says: str
) -> None:
    line = one_line_error(pp(tmp_path, "deploy", "web", "1", "-c", "prod", *args))
    assert says in line
    assert stored(store) is None


def test_a_version_keeps_its_artifact_whether_tarball_or_image(
    tmp_path: Path, store: IntentStore
) -> None:
    assert pp(tmp_path, "deploy", "web", "1", "-c", "prod", "--image", ONE).exit_code == 0
    line = one_line_error(pp(tmp_path, "deploy", "web", "1", "-c", "prod", "--image", TWO))
    assert f"version 1 already exists with image {ONE}" in line
    line = one_line_error(pp(tmp_path, "deploy", "web", "1", "-c", "prod", "--sha256", "1" * 64))
    assert "already exists with image" in line
    assert config(store).versions["1"].image == ONE


# -- pp pack --docker against a real engine and registry ---------------------------------------


def test_pack_docker_pushes_and_prints_the_pinned_reference(
    docker_engine: Engine, registry: Registry, tmp_path: Path
) -> None:
    build_image(docker_engine, "pp-test-local", "latest", label="packed")
    result = subprocess.run(
        [
            *(str(PP_BIN), "pack", "--app", "packed", "--version", "7"),
            *("--docker", "pp-test-local", "--registry", registry.address),
        ],
        capture_output=True,
        text=True,
        env=docker_engine.env(),
        timeout=300,
    )
    assert result.returncode == 0, result.stderr
    pinned = result.stdout.strip()
    assert pinned.startswith(f"{registry.address}/packed@sha256:")
    assert f"as {registry.address}/packed:7" in result.stderr

    # What was printed is what the registry serves under that digest, and pp deploys it.
    docker_engine.run_cli("rmi", "--force", "pp-test-local", f"{registry.address}/packed:7")
    docker_engine.run_cli("pull", pinned)
    deployed = pp(tmp_path, "deploy", "packed", "7", "-c", "prod", "--image", pinned)
    assert deployed.exit_code == 0, deployed.output
    docker_engine.run_cli("rmi", "--force", pinned)


@pytest.mark.parametrize(
    ("args", "says"),
    [
        (["--docker", "pp-test-no-such-image", "--registry", "127.0.0.1:1"], "no image"),
        (["--docker", "x", "--registry", "not a host"], "--registry 'not a host'"),
        (["--docker", "x"], "--docker needs --registry"),
    ],
)
def test_pack_docker_errors_are_one_line(docker_engine: Engine, args: list[str], says: str) -> None:
    result = subprocess.run(
        [str(PP_BIN), "pack", "--app", "packed", "--version", "7", *args],
        capture_output=True,
        text=True,
        env=docker_engine.env(),
        timeout=120,
    )
    assert result.returncode != 0
    lines = result.stderr.strip().splitlines()
    assert says in lines[-1] and "Traceback" not in result.stderr, result.stderr
