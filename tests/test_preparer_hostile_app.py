"""pp-preparer against the app it installs: the app's user races, plants and locks.

An install is handed to the app's ``run_as`` user while the app may already run as
that user, so everything here runs as ``nobody`` for real (the preparer as root)."""

from __future__ import annotations

import fcntl
import json
import os
import subprocess
from collections.abc import Iterator
from pathlib import Path

import pytest
from preparer_support import VENV_BIN, ArtifactServer, artifact_server, member, put_app, write_tar
from race_support import (
    NOBODY,
    Racer,
    as_nobody,
    fingerprint,
    make_secret,
    open_root,
    run_as_nobody,
)

from agents.system.layout import MARKER_NAME, AppLayout, InstallMarker
from intent.model import Reality
from intent.store import IntentStore, open_store

NODE = "web1"
LAUNCH = {"bin/launch/web": b"#!/bin/sh\nexec sleep 1000\n"}


class Node:
    """A node whose basedirs nobody can reach (as an app's user reaches its own)."""

    def __init__(self, root: Path, private: Path, server: ArtifactServer) -> None:
        self.root = root
        self.server = server
        self.store: IntentStore = open_store(f"sqlite://{private / 'intent.db'}")
        self.state_dir = private / "preparer-state"

    def publish(self, app: str, version: str, files: dict[str, bytes] | None = None) -> str:
        (self.server.root / app).mkdir(parents=True, exist_ok=True)
        files = {"VERSION": version.encode(), **LAUNCH, **(files or {})}
        return _executable_tarball(self.server.root / app / f"{app}_{version}.tar.gz", files)

    def assign(self, app: str, versions: dict[str, str], active: str | None = None) -> None:
        put_app(
            self.store,
            NODE,
            app,
            self.basedir(app),
            {
                v: {"state": "active" if v == active else "prep", "sha256": sha}
                for v, sha in versions.items()
            },
        )

    def basedir(self, app: str) -> Path:
        return self.root / "srv" / app

    def layout(self, app: str) -> AppLayout:
        return AppLayout(self.basedir(app), app)

    def run(self, *extra: str, check: int | None = 0) -> str:
        result = subprocess.run(
            [
                str(VENV_BIN / "pp-preparer"),
                "--store", f"sqlite://{self.state_dir.parent / 'intent.db'}",
                "--node", NODE, "--once", "--log-format", "json",
                "--repo", self.server.url, "--fetch-timeout", "2", "--fetch-attempts", "1",
                "--state-dir", str(self.state_dir), "--keep-old", "0",
                *extra,
            ],
            capture_output=True,
            text=True,
            timeout=60,
        )  # fmt: skip
        if check is not None:
            assert result.returncode == check, result.stderr
        return result.stderr

    def report(self, app: str) -> Reality:
        (report,) = [r for r in self.store.reality(node=NODE, app=app) if r.agent == "preparer"]
        return report


def _executable_tarball(path: Path, files: dict[str, bytes]) -> str:
    return write_tar(
        path,
        [
            member(name, data, mode=0o755 if name.startswith("bin/") else 0o644)
            for name, data in sorted(files.items())
        ],
    )


@pytest.fixture
def node(tmp_path: Path) -> Iterator[Node]:
    with open_root() as root:
        repo = tmp_path / "repo"
        repo.mkdir()
        with artifact_server(repo) as server:
            yield Node(root, tmp_path, server)


def _owned_by_nobody(path: Path) -> bool:
    st = path.lstat()
    return (st.st_uid, st.st_gid) == (NOBODY.pw_uid, NOBODY.pw_gid)


# -- races ------------------------------------------------------------------------------------


def test_an_app_racing_its_installs_never_gets_root_to_touch_another_file(
    node: Node, tmp_path: Path
) -> None:
    """While the preparer installs version after version (and re-marks the running
    one, as after an upgrade of the agents), the app swaps every temp name and every
    marker it can reach for a link to a root-only file."""
    private = tmp_path / "private"
    private.mkdir(mode=0o700)
    secret = make_secret(private)
    before = fingerprint(secret)
    layout = node.layout("hello")
    shas = {str(v): node.publish("hello", str(v)) for v in range(1, 6)}
    node.assign("hello", {"1": shas["1"]}, active="1")
    node.run()
    with Racer(layout.installs, secret, MARKER_NAME) as racer:
        for version in map(str, range(2, 6)):
            node.assign("hello", {version: shas[version]}, active=version)
            node.run(check=None)
            # What the agents before launch records left: a running install with an
            # old marker, which the preparer re-marks inside the app's own directory.
            os.symlink(f"installs/hello_{version}", layout.basedir / ".current")
            os.rename(layout.basedir / ".current", layout.current)
            marker = layout.install_dir(version) / ".old-marker"
            marker.write_bytes(InstallMarker(shas[version], 1.0).to_bytes())
            os.rename(marker, layout.marker(version))
            node.run(check=None)
    assert racer.swaps > 0, "the racer never swapped a name: the test proved nothing"
    assert fingerprint(secret) == before
    assert sorted(os.listdir(private)) == ["secret"]


# -- planting -----------------------------------------------------------------------------------


def test_an_app_user_cannot_plant_an_install(node: Node) -> None:
    sha = node.publish("hello", "1")
    node.assign("hello", {"1": sha}, active="1")
    node.run()
    layout = node.layout("hello")
    for directory in (layout.basedir, layout.installs):
        st = directory.stat()
        assert (st.st_uid, st.st_mode & 0o7777) == (0, 0o755), directory
    assert _owned_by_nobody(layout.install_dir("1"))
    assert layout.marker("1").stat().st_uid == 0

    planted = run_as_nobody(
        "import os, sys; os.makedirs(sys.argv[1] + '/hello_2/bin')", str(layout.installs)
    )
    assert planted.returncode != 0 and "PermissionError" in planted.stderr
    assert os.listdir(layout.installs) == ["hello_1"]


def test_an_install_planted_through_a_loose_installs_dir_is_not_trusted(node: Node) -> None:
    """installs/ left writable (an old setup, a hand-made chmod): the app plants a
    complete-looking install of the version about to be deployed, with a marker that
    lists an extra service. The preparer takes installs/ back and installs the real
    artifact over it."""
    shas = {v: node.publish("hello", v) for v in ("1", "2")}
    node.assign("hello", {"1": shas["1"]}, active="1")
    node.run()
    layout = node.layout("hello")
    os.chown(layout.installs, NOBODY.pw_uid, NOBODY.pw_gid)
    forged = InstallMarker(shas["2"], 1.0, "hello", "2", ("web", "evil"))
    planted = run_as_nobody(
        "import os, sys\n"
        "d = sys.argv[1] + '/hello_2'\n"
        "os.makedirs(d + '/bin/launch')\n"
        "open(d + '/bin/launch/evil', 'w').write('#!/bin/sh\\n')\n"
        "os.chmod(d + '/bin/launch/evil', 0o755)\n"
        "open(d + '/.pp-installed.json', 'w').write(sys.argv[2])\n",
        str(layout.installs),
        forged.to_bytes().decode(),
    )
    assert planted.returncode == 0, planted.stderr
    assert layout.read_marker("2") is None  # not ours: nobody wrote it

    node.assign("hello", {"1": shas["1"], "2": shas["2"]}, active="2")
    node.run()

    st = layout.installs.stat()
    assert (st.st_uid, st.st_mode & 0o7777) == (0, 0o755)
    marker = layout.read_marker("2")
    assert marker is not None and marker.launch == ("web",)
    assert not (layout.install_dir("2") / "bin" / "launch" / "evil").exists()


def test_a_basedir_the_app_can_write_is_refused_in_one_line(node: Node) -> None:
    layout = node.layout("hello")
    layout.basedir.mkdir(parents=True)
    os.chown(layout.basedir, NOBODY.pw_uid, NOBODY.pw_gid)
    node.assign("hello", {"1": node.publish("hello", "1")}, active="1")
    node.run(check=1)
    error = node.report("hello").error or ""
    assert f"basedir {layout.basedir} can be written by others" in error
    assert f"chown 0 {layout.basedir}" in error and "\n" not in error
    assert not layout.installs.exists()


# -- locks -----------------------------------------------------------------------------------------


def test_an_app_holding_a_lock_on_its_installs_does_not_block_the_preparer(node: Node) -> None:
    shas = {v: node.publish("hello", v) for v in ("1", "2")}
    node.assign("hello", {"1": shas["1"]}, active="1")
    node.run()
    layout = node.layout("hello")
    locker = as_nobody(
        [
            "/usr/bin/python3", "-I", "-c",
            "import fcntl, os, sys, time\n"
            "fds = [os.open(p, os.O_RDONLY) for p in sys.argv[1:]]\n"
            "for fd in fds: fcntl.flock(fd, fcntl.LOCK_EX)\n"
            "print('locked', flush=True); time.sleep(60)\n",
            str(layout.installs), str(layout.basedir), str(layout.install_dir("1")),
        ],
        stdout=subprocess.PIPE,
    )  # fmt: skip
    try:
        assert locker.stdout is not None and locker.stdout.readline().strip() == "locked"
        node.assign("hello", {"1": shas["1"], "2": shas["2"]}, active="2")
        node.run()
    finally:
        locker.kill()
        locker.wait()
    assert layout.is_installed("2", shas["2"])
    assert node.report("hello").status == "converged"


def test_a_second_preparer_on_the_same_app_waits_for_the_first(node: Node) -> None:
    node.assign("hello", {"1": node.publish("hello", "1")}, active="1")
    node.state_dir.mkdir(mode=0o700)
    fd = os.open(node.state_dir / "hello.lock", os.O_RDWR | os.O_CREAT, 0o600)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX)
        node.run(check=1)
    finally:
        os.close(fd)
    report = node.report("hello")
    assert report.status == "converging"
    assert "another pp-preparer is working on hello" in (report.error or "")
    assert node.layout("hello").installed_versions() == []
    st = node.state_dir.stat()
    assert (st.st_uid, st.st_mode & 0o777) == (0, 0o700)


# -- installs from before launch records ---------------------------------------------------------


def test_installs_marked_by_older_agents_are_verified_again_without_touching_the_running_one(
    node: Node,
) -> None:
    shas = {v: node.publish("hello", v) for v in ("1", "2")}
    node.assign("hello", shas, active="1")
    node.run()
    layout = node.layout("hello")
    os.symlink("installs/hello_1", layout.current)
    for version, sha in shas.items():
        layout.marker(version).write_bytes(InstallMarker(sha, 1.0).to_bytes())
        assert layout.read_marker(version) is not None
        assert layout.read_marker(version).legacy  # type: ignore[union-attr]
    running = {
        p: p.stat().st_ino for p in (layout.install_dir("1"), layout.install_dir("1") / "VERSION")
    }
    prepared = layout.install_dir("2").stat().st_ino
    requests = len(node.server.requests)

    node.run()

    for version in shas:
        marker = layout.read_marker(version)
        assert marker is not None and marker.launch == ("web",), version
        assert (marker.app, marker.version) == ("hello", version)
    # The running install was re-marked in place; the prepared one was installed again.
    assert {p: p.stat().st_ino for p in running} == running
    assert _owned_by_nobody(layout.install_dir("1"))
    assert layout.install_dir("2").stat().st_ino != prepared
    assert len(node.server.requests) == requests + 2
    assert node.report("hello").status == "converged"
    before = {v: layout.marker(v).read_bytes() for v in shas}
    node.run()
    assert {v: layout.marker(v).read_bytes() for v in shas} == before
    assert len(node.server.requests) == requests + 2


# -- markers ---------------------------------------------------------------------------------------


def test_a_marker_counts_only_when_it_is_ours_and_names_its_own_install(tmp_path: Path) -> None:
    layout = AppLayout(tmp_path, "hello")
    for version in ("1", "2"):
        layout.install_dir(version).mkdir(parents=True)
    good = InstallMarker("a" * 64, 1.0, "hello", "1", (None,))
    layout.marker("1").write_bytes(good.to_bytes())
    assert layout.read_marker("1") == good
    # Moved into another install of the same app: it names version 1, not 2.
    os.rename(layout.marker("1"), layout.marker("2"))
    assert layout.read_marker("2") is None
    os.rename(layout.marker("2"), layout.marker("1"))
    other = InstallMarker("a" * 64, 1.0, "other", "1", (None,))
    layout.marker("1").write_bytes(other.to_bytes())
    assert layout.read_marker("1") is None
    layout.marker("1").write_bytes(good.to_bytes())
    layout.marker("1").chmod(0o666)  # anyone could have rewritten it
    assert layout.read_marker("1") is None
    layout.marker("1").chmod(0o644)
    for bad in (
        {**json.loads(good.to_bytes()), "launch": ["../x"]},
        {**json.loads(good.to_bytes()), "launch": "web"},
        {**json.loads(good.to_bytes()), "app": None},
    ):
        layout.marker("1").write_text(json.dumps(bad))
        assert layout.read_marker("1") is None, bad
