"""``pp bundle``: the agents' own tarball, reproducible and complete.

Built for real from a snapshot of this checkout, with every dependency installed from
the wheelhouse ``scripts/setup --test`` fills; then unpacked away from the checkout and
run with the host's python3 alone.
"""

from __future__ import annotations

import gzip
import subprocess
import tarfile
from pathlib import Path

import pytest
from click.testing import CliRunner
from kickstart_support import CLEAN_PATH, built, unpack

from intent.cli import bundle, main
from intent.cli.group import cli

AGENTS = ("elb-registrar", "iptables", "preparer", "setlive")
pytestmark = pytest.mark.timeout(900)  # the first test builds the bundles (once per run)


def test_the_same_source_builds_the_same_bytes_twice(tmp_path: Path) -> None:
    first = built("repro-a")
    second = built("repro-b")
    assert first.path != second.path
    assert bundle.sha256_of(first.path) == bundle.sha256_of(second.path) == first.sha256
    assert first.sha256 == second.sha256
    assert first.version == second.version
    assert first.path.name == f"platypus-{first.version}.tar.gz"

    raw = first.path.read_bytes()
    assert raw[:2] == b"\x1f\x8b" and raw[4:8] == b"\0\0\0\0"  # gzip header mtime 0
    with gzip.open(first.path) as stream, tarfile.open(fileobj=stream, mode="r|") as tar:
        members = list(tar)
    names = [m.name for m in members]
    assert all((m.mtime, m.uid, m.gid, m.uname, m.gname) == (0, 0, 0, "", "") for m in members)
    assert not [n for n in names if n.endswith(".pyc") or "__pycache__" in n]
    assert not [n for n in names if n.startswith("site/bin/")]  # console scripts, not portable
    for agent in AGENTS:
        assert f"bin/launch/{agent}" in names
    for script in ("bin/check", "bin/kickstart", "VERSION", "PYTHON", "REQUIREMENTS.txt"):
        assert script in names
    assert "site/pydantic_core" in names and "src/agents/kickstart/host.py" in names


def test_the_bundle_runs_with_the_hosts_python3_alone(tmp_path: Path) -> None:
    tree = unpack(built("repro-a").path, tmp_path / "anywhere")
    env = {"PATH": CLEAN_PATH, "HOME": str(tmp_path), "LANG": "C.UTF-8"}
    check = subprocess.run(
        [str(tree / "bin" / "check")], capture_output=True, text=True, env=env, cwd=tmp_path
    )
    assert check.returncode == 0, check.stdout + check.stderr
    assert f"load from {tree.resolve()}" in check.stdout
    pins = (tree / "REQUIREMENTS.txt").read_text().splitlines()
    assert any(p.startswith("pydantic==") for p in pins)
    assert not any(p.lower().startswith(("pytest", "mypy", "moto")) for p in pins)

    # bin/kickstart speaks before it needs root, a store or runit: a dry run as root
    # shows the plan; a wrong flag gets one line naming it.
    bad = subprocess.run(
        [str(tree / "bin" / "kickstart"), "--agents", "preparer,nosuch", "--dry-run"],
        capture_output=True,
        text=True,
        env=env,
        cwd=tmp_path,
    )
    assert bad.returncode == 2 and "nosuch: not an agent" in bad.stderr
    assert "Traceback" not in bad.stderr


def test_a_check_fails_when_a_dependency_is_missing(tmp_path: Path) -> None:
    tree = unpack(built("repro-a").path, tmp_path / "anywhere")
    subprocess.run(["rm", "-rf", str(tree / "site" / "structlog")], check=True)
    env = {"PATH": CLEAN_PATH, "HOME": str(tmp_path)}
    check = subprocess.run(
        [str(tree / "bin" / "check")], capture_output=True, text=True, env=env, cwd=tmp_path
    )
    assert check.returncode != 0
    assert "structlog" in check.stderr


def test_pp_bundle_refuses_a_bad_version_in_one_line(tmp_path: Path) -> None:
    result = CliRunner().invoke(cli, ["bundle", "--out", str(tmp_path), "--version", "../x"])
    assert result.exit_code == 2
    assert "version" in result.output and "Traceback" not in result.output
    assert callable(main)
