"""pp-preparer end to end: the real command, a real embedded store, real artifacts."""

from __future__ import annotations

import base64
import json
import os
import signal
import subprocess
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey
from preparer_support import (
    VENV_BIN,
    ArtifactServer,
    Behaviour,
    artifact_server,
    member,
    put_app,
    tree_tarball,
    wait_for,
    write_tar,
)
from runit_support import require_root

from agents.preparer.agent import Preparer
from agents.preparer.apply import Settings
from agents.runtime import Runtime, RuntimeOptions
from agents.system.archive import Limits
from agents.system.fetch import FetchOptions
from agents.system.layout import AppLayout
from intent import keys
from intent.cli.operator import unassign
from intent.model import Reality
from intent.signing import sign
from intent.store import open_store

NODE = "web1"
BAD_SHA = "0" * 64


class World:
    """A node's world: a store, an artifact repo served over loopback HTTP, basedirs."""

    def __init__(
        self, root: Path, server: ArtifactServer, store_url: str = "", prefix: str = ""
    ) -> None:
        self.root = root
        self.store_url = store_url or f"sqlite://{root / 'intent.db'}"
        self.prefix = prefix or keys.DEFAULT_PREFIX
        self.store = open_store(self.store_url, self.prefix)
        self.repo = server.root
        self.server = server
        self.srv = root / "srv"
        self.state_dir = root / "preparer-state"

    def publish(self, app: str, version: str, files: dict[str, bytes] | None = None) -> str:
        (self.repo / app).mkdir(parents=True, exist_ok=True)
        files = files or {"VERSION": version.encode(), "bin/run": b"#!/bin/sh\nexit 0\n"}
        return tree_tarball(self.repo / app / f"{app}_{version}.tar.gz", files)

    def assign(self, app: str, versions: dict[str, dict[str, Any]], **deploy: Any) -> None:
        put_app(self.store, NODE, app, self.srv / app, versions, **deploy)

    def layout(self, app: str) -> AppLayout:
        return AppLayout(self.srv / app, app)

    def run(self, *extra: str, check: int | None = 0, timeout: float = 60) -> str:
        result = subprocess.run(
            [str(VENV_BIN / "pp-preparer"), *self.args(), *extra],
            capture_output=True,
            text=True,
            timeout=timeout,
        )
        if check is not None:
            assert result.returncode == check, result.stderr
        return result.stderr

    def args(self) -> list[str]:
        return [
            "--store", self.store_url, "--prefix", self.prefix, "--node", NODE, "--once",
            "--log-format", "json",
            "--repo", self.server.url, "--fetch-timeout", "1", "--fetch-attempts", "2",
            "--state-dir", str(self.state_dir),
        ]  # fmt: skip

    def report(self, app: str) -> Reality:
        (report,) = [r for r in self.store.reality(node=NODE, app=app) if r.agent == "preparer"]
        return report


@pytest.fixture
def world(tmp_path: Path) -> Iterator[World]:
    repo = tmp_path / "repo"
    repo.mkdir()
    with artifact_server(repo) as server:
        yield World(tmp_path, server)


def active(sha: str) -> dict[str, str]:
    return {"state": "active", "sha256": sha}


def prep(sha: str) -> dict[str, str]:
    return {"state": "prep", "sha256": sha}


def tree_state(root: Path) -> dict[str, tuple[int, int, int, int]]:
    """Identity and times of every entry: any write, create or delete changes it."""
    state = {}
    for dirpath, dirnames, filenames in os.walk(root):
        for name in [".", *dirnames, *filenames]:
            path = Path(dirpath) / name
            st = path.lstat()
            state[str(path)] = (st.st_ino, st.st_mtime_ns, st.st_ctime_ns, st.st_size)
    return state


# -- installing ---------------------------------------------------------------------------


def test_once_installs_every_version_of_every_assigned_app(world: World) -> None:
    hello = {v: world.publish("hello", v) for v in ("1.0", "1.1")}
    world.assign("hello", {"1.0": active(hello["1.0"]), "1.1": prep(hello["1.1"])})
    other = world.publish("other", "7")
    world.assign("other", {"7": active(other)})

    world.run()

    for app, shas in (("hello", hello), ("other", {"7": other})):
        layout = world.layout(app)
        for version, sha in shas.items():
            assert layout.is_installed(version, sha)
            assert (layout.install_dir(version) / "VERSION").read_text() == version
        report = world.report(app)
        assert report.status == "converged"
        assert report.details["versions"] == dict.fromkeys(shas, "installed")
        assert report.details["last_success"] == pytest.approx(time.time(), abs=30)
    assert report.version == "7"


@pytest.mark.consul
def test_once_installs_from_intent_in_a_real_consul(
    tmp_path: Path, consul_addr: str, ns: str
) -> None:
    repo = tmp_path / "repo"
    repo.mkdir()
    with artifact_server(repo) as server:
        world = World(tmp_path, server, f"consul://{consul_addr}", ns)
        shas = {v: world.publish("hello", v) for v in ("1.0", "1.1")}
        world.assign("hello", {"1.0": active(shas["1.0"]), "1.1": prep(shas["1.1"])})
        world.run()
        for version, sha in shas.items():
            assert world.layout("hello").is_installed(version, sha)
        assert world.report("hello").details["versions"] == {"1.0": "installed", "1.1": "installed"}
        requests = len(server.requests)
        world.run()
        assert len(server.requests) == requests
        world.store.close()


def test_files_belong_to_run_as_when_running_as_root(world: World) -> None:
    import pwd

    require_root()  # chown to run_as needs root; CI (root) fails rather than skips

    nobody = pwd.getpwnam("nobody")
    world.assign("hello", {"1.0": active(world.publish("hello", "1.0"))}, run_as="nobody")
    world.run()
    install = world.layout("hello").install_dir("1.0")
    for path in [install, *install.rglob("*")]:
        if path.name == ".pp-installed.json":
            assert path.lstat().st_uid == 0  # the marker stays ours
            continue
        assert (path.lstat().st_uid, path.lstat().st_gid) == (nobody.pw_uid, nobody.pw_gid)


def test_a_second_pass_with_nothing_changed_downloads_and_writes_nothing(world: World) -> None:
    world.assign("hello", {"1.0": active(world.publish("hello", "1.0"))})
    world.assign("other", {"2": active(world.publish("other", "2"))})
    world.run()
    requests = len(world.server.requests)
    before = tree_state(world.srv)

    world.run()

    assert len(world.server.requests) == requests
    assert tree_state(world.srv) == before


def test_a_version_whose_install_lost_its_marker_is_installed_again(world: World) -> None:
    sha = world.publish("hello", "1.0")
    world.assign("hello", {"1.0": active(sha)})
    world.run()
    layout = world.layout("hello")
    layout.marker("1.0").unlink()
    (layout.install_dir("1.0") / "VERSION").write_text("tampered")
    world.run()
    assert layout.is_installed("1.0", sha)
    assert (layout.install_dir("1.0") / "VERSION").read_text() == "1.0"
    assert not [n for n in os.listdir(layout.installs) if n.startswith(".")]


# -- failures stay with their version and their app ------------------------------------------


def test_sha_mismatch_fails_that_version_only_and_other_apps_install(world: World) -> None:
    good = world.publish("hello", "1.0")
    world.publish("hello", "2.0")
    world.assign("hello", {"1.0": active(good), "2.0": prep(BAD_SHA)})
    other = world.publish("other", "1")
    world.assign("other", {"1": active(other)})

    world.run(check=1)

    layout = world.layout("hello")
    assert layout.is_installed("1.0", good)
    assert layout.installed_versions() == ["1.0"]
    assert os.listdir(layout.installs) == ["hello_1.0"]  # the bad bytes were discarded
    report = world.report("hello")
    assert report.status == "error"
    assert report.version == "1.0"  # the active version is installed: made real here
    assert report.details["versions"]["1.0"] == "installed"
    assert report.details["versions"]["2.0"].startswith("error: sha256 mismatch")
    assert BAD_SHA in report.details["versions"]["2.0"]
    assert report.error is not None and report.error.startswith("2.0: sha256 mismatch")
    assert world.layout("other").is_installed("1", other)
    assert world.report("other").status == "converged"


def test_a_corrupt_download_is_reported_as_a_digest_mismatch_not_as_a_bad_archive(
    world: World,
) -> None:
    """Extraction starts before the digest is known; a download that is not the artifact
    is still named for what it is, and leaves nothing behind."""
    world.publish("hello", "1.0")
    (world.repo / "hello" / "hello_1.0.tar.gz").write_bytes(b"\x1f\x8b" + os.urandom(50_000))
    world.assign("hello", {"1.0": active(BAD_SHA)})
    world.run(check=1)
    report = world.report("hello")
    assert report.error is not None and report.error.startswith("1.0: sha256 mismatch")
    assert os.listdir(world.layout("hello").installs) == []


def test_extraction_runs_while_the_download_is_still_arriving(world: World) -> None:
    """The server stops halfway through the body: files from the first half are already
    extracted (in the private work directory) before it sends the rest."""
    big = os.urandom(4 << 20)
    sha = world.publish("hello", "1.0", {"a/first": b"first", "z/big": big})
    size = (world.repo / "hello" / "hello_1.0.tar.gz").stat().st_size
    world.server.behaviours["/hello/hello_1.0.tar.gz"] = Behaviour(pause_after=size // 2)
    world.assign("hello", {"1.0": active(sha)})
    installs = world.layout("hello").installs
    preparer = subprocess.Popen(
        [str(VENV_BIN / "pp-preparer"), *world.args(), "--fetch-timeout", "30"],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
        text=True,
    )
    try:
        wait_for(lambda: any(installs.glob(".pp-tmp-hello_1.0.*/a/first")), 30)
        assert not world.layout("hello").is_installed("1.0", sha)  # nothing visible yet
    finally:
        world.server.release.set()
        _, errors = preparer.communicate(timeout=60)
    assert preparer.returncode == 0, errors
    assert world.layout("hello").is_installed("1.0", sha)
    assert (world.layout("hello").install_dir("1.0") / "z" / "big").read_bytes() == big
    assert world.server.count("/hello/hello_1.0.tar.gz") == 1


def test_a_download_that_starts_again_is_extracted_from_the_finished_file(
    world: World,
) -> None:
    """A server that cannot resume sends the whole body again: what was extracted from
    the first attempt is discarded, and the install comes from the complete download."""
    sha = world.publish("hello", "1.0", {"a/first": b"first", "z/big": os.urandom(1 << 20)})
    size = (world.repo / "hello" / "hello_1.0.tar.gz").stat().st_size
    world.server.behaviours["/hello/hello_1.0.tar.gz"] = Behaviour(
        drop_after=size // 2, drop_times=1, ranges=False
    )
    world.assign("hello", {"1.0": active(sha)})
    world.run()
    assert world.server.count("/hello/hello_1.0.tar.gz") == 2
    layout = world.layout("hello")
    assert layout.is_installed("1.0", sha)
    assert (layout.install_dir("1.0") / "a" / "first").read_bytes() == b"first"
    assert os.listdir(layout.installs) == ["hello_1.0"]


def test_a_missing_artifact_is_reported_with_its_url(world: World) -> None:
    world.assign("hello", {"1.0": active(BAD_SHA)})
    world.run(check=1)
    report = world.report("hello")
    state = report.details["versions"]["1.0"]
    assert f"{world.server.url}/hello/hello_1.0.tar.gz: HTTP 404" in state
    assert report.version is None  # nothing installed: the intent's wish is not reported as done


def test_bad_intent_for_one_app_removes_nothing_and_blocks_nothing(world: World) -> None:
    sha = world.publish("hello", "1.0")
    world.assign("hello", {"1.0": active(sha)})
    world.run()
    world.store.put_json(keys.config("hello", "prod"), {"versions": {"1.0": {"state": "live"}}})
    other = world.publish("other", "1")
    world.assign("other", {"1": active(other)})

    world.run(check=1)

    assert world.layout("hello").is_installed("1.0", sha)
    assert world.report("hello").status == "error"
    assert "clusters/hello/prod/config" in (world.report("hello").error or "")
    assert world.layout("other").is_installed("1", other)


def test_bad_intent_holds_the_last_good_intent_in_a_running_agent(world: World) -> None:
    sha = world.publish("hello", "1.0")
    world.assign("hello", {"1.0": active(sha)})
    preparer = in_process(world)
    runtime = Runtime(preparer, world.store, RuntimeOptions(node=NODE))
    assert runtime.run_pass(force=True)
    world.store.put_json(keys.config("hello", "prod"), "not an object")
    assert not runtime.run_pass(force=True)
    report = world.report("hello")
    assert report.status == "error" and report.details.get("held_last_good") is True
    assert world.layout("hello").is_installed("1.0", sha)


def test_two_apps_sharing_a_basedir_are_both_refused(world: World) -> None:
    world.assign("a", {"1": active(world.publish("a", "1"))})
    world.store.put_json(keys.node_app(NODE, "b"), {"cluster": "prod"})
    world.store.put_json(
        keys.config("b", "prod"), {"versions": {"1": active(world.publish("b", "1"))}}
    )
    world.store.put_json(keys.deploy_config("b", "prod"), {"basedir": str(world.srv / "a")})
    world.run(check=1)
    for app in ("a", "b"):
        assert "give each app its own basedir" in (world.report(app).error or "")
    assert not (world.srv / "a").exists()


def slow_state(world: World) -> object:
    reports = [r for r in world.store.reality(node=NODE, app="slow") if r.agent == "preparer"]
    return reports[0].details.get("versions") if reports else None


def test_a_stalled_server_does_not_block_the_other_apps(world: World) -> None:
    slow = world.publish("slow", "1")
    fast = world.publish("fast", "1")
    world.assign("slow", {"1": active(slow)})
    world.assign("fast", {"1": active(fast)})
    world.server.behaviours["/slow/slow_1.tar.gz"] = Behaviour(stall_s=30, stall_times=99)
    # The slow download hangs until its 5 s read timeout: the fast app must be
    # installed long before (a wide margin, for busy machines).
    preparer = in_process(world, FetchOptions(timeout_s=5, attempts=1))
    runtime = Runtime(preparer, world.store, RuntimeOptions(node=NODE, max_parallel=2))
    passing = threading.Thread(target=runtime.run_pass, kwargs={"force": True})
    passing.start()
    try:
        wait_for(lambda: world.layout("fast").is_installed("1", fast), timeout_s=4)
        # While the slow download hangs, its report already says so.
        # (The two downloads start together; the fast one may finish before the slow
        # one's first report is written, so wait for that report rather than race it.)
        wait_for(lambda: slow_state(world) == {"1": "fetching"}, timeout_s=5)
        assert passing.is_alive()
    finally:
        passing.join(10)
    assert "timed out" in world.report("slow").details["versions"]["1"]


# -- crash safety ---------------------------------------------------------------------------


def test_sigkill_mid_extraction_never_shows_a_half_install_and_restart_completes(
    world: World,
) -> None:
    (world.repo / "big").mkdir()
    members = [member(f"d{i % 50}/f{i}", b"x" * 200) for i in range(20_000)]
    sha = write_tar(world.repo / "big" / "big_1.0.tar.gz", members)
    world.assign("big", {"1.0": active(sha)})
    layout = world.layout("big")
    final = layout.install_dir("1.0")

    proc = subprocess.Popen(
        [str(VENV_BIN / "pp-preparer"), *world.args()],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    try:
        extracting = None
        deadline = time.monotonic() + 30
        while extracting is None and time.monotonic() < deadline:
            assert not final.exists() or layout.read_marker("1.0") is not None
            if layout.installs.is_dir():
                for name in os.listdir(layout.installs):
                    work = layout.installs / name
                    if work.is_dir() and name.startswith(".pp-tmp-") and len(os.listdir(work)) > 5:
                        extracting = work
            assert proc.poll() is None, "finished before it could be killed: use more files"
        assert extracting is not None
        proc.send_signal(signal.SIGKILL)
    finally:
        proc.kill()
        proc.wait()

    assert not final.exists(), "a half install is visible under its final name"
    assert extracting.exists()

    world.run()

    assert layout.is_installed("1.0", sha)
    assert sum(1 for _ in final.rglob("f*")) == 20_000
    assert os.listdir(layout.installs) == ["big_1.0"]


def test_stray_temporary_entries_are_cleaned_on_start(world: World) -> None:
    sha = world.publish("hello", "1.0")
    world.assign("hello", {"1.0": active(sha)})
    installs = world.layout("hello").installs
    (installs / ".pp-tmp-hello_1.0.dead/sub").mkdir(parents=True)
    (installs / ".pp-tmp-hello_0.9.beef.download").write_bytes(b"partial")
    world.run()
    assert sorted(os.listdir(installs)) == ["hello_1.0"]


# -- garbage collection ----------------------------------------------------------------------


@pytest.mark.parametrize(("keep_old", "kept"), [(1, ["2.0", "3.0"]), (0, ["3.0"]),
                                               (2, ["1.0", "2.0", "3.0"])])  # fmt: skip
def test_old_installs_are_collected_keeping_current_and_previous(
    world: World, keep_old: int, kept: list[str]
) -> None:
    shas = {v: world.publish("hello", v) for v in ("1.0", "2.0", "3.0")}
    world.assign("hello", {v: prep(s) for v, s in shas.items()})
    world.run()
    layout = world.layout("hello")
    # What setlive would have done: 3.0 runs, 2.0 ran before it.
    os.symlink("installs/hello_3.0", layout.current)
    os.symlink("installs/hello_2.0", layout.previous)
    world.assign("hello", {"4.0": prep(world.publish("hello", "4.0"))})

    world.run("--keep-old", str(keep_old))

    assert layout.installed_versions() == [*kept, "4.0"]


def test_an_unassigned_app_keeps_its_installs_and_loses_its_report(world: World) -> None:
    sha = world.publish("hello", "1.0")
    world.assign("hello", {"1.0": active(sha)})
    world.run()
    unassign(world.store, NODE, ["hello"], "tester")  # the node's last app: emptied on purpose
    world.run()
    assert world.layout("hello").is_installed("1.0", sha)
    assert world.store.reality(node=NODE, app="hello") == []


def test_a_running_agent_clears_the_report_of_an_app_unassigned_since_its_last_pass(
    world: World,
) -> None:
    for app in ("a", "b"):
        world.assign(app, {"1": active(world.publish(app, "1"))})
    runtime = Runtime(in_process(world), world.store, RuntimeOptions(node=NODE))
    assert runtime.run_pass(force=True)
    assert runtime.run_pass()  # nothing left: the node's reports are not listed again
    unassign(world.store, NODE, ["a"], "tester")
    assert runtime.run_pass()  # not a resync: the agent saw "a" leave and looks
    assert world.store.reality(node=NODE, app="a") == []
    assert world.report("b").status == "converged"
    assert world.layout("a").installs.is_dir()  # its files stay


# -- signatures ------------------------------------------------------------------------------


def test_trusted_keys_require_a_valid_detached_signature(world: World, tmp_path: Path) -> None:
    trusted, stranger = Ed25519PrivateKey.generate(), Ed25519PrivateKey.generate()
    keydir = tmp_path / "keys"
    keydir.mkdir()
    (keydir / "release.pub").write_bytes(
        trusted.public_key().public_bytes(
            serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo
        )
    )
    signed, forged, unsigned = (world.publish(app, "1") for app in ("signed", "forged", "unsigned"))
    (world.repo / "signed" / "signed_1.tar.gz.sig").write_bytes(
        sign(trusted, "signed", "1", signed)
    )
    (world.repo / "forged" / "forged_1.tar.gz.sig").write_bytes(
        sign(stranger, "forged", "1", forged)
    )
    for app, sha in (("signed", signed), ("forged", forged), ("unsigned", unsigned)):
        world.assign(app, {"1": active(sha)})

    world.run("--trusted-keys", str(keydir), check=1)

    assert world.layout("signed").is_installed("1", signed)
    assert "does not verify" in world.report("forged").details["versions"]["1"]
    assert "no usable signature" in world.report("unsigned").details["versions"]["1"]
    assert world.layout("forged").installed_versions() == []
    assert world.layout("unsigned").installed_versions() == []
    assert world.server.count("/unsigned/unsigned_1.tar.gz") == 0  # no signature, no download


def test_a_signature_is_good_only_for_the_app_and_version_it_names(
    world: World, tmp_path: Path
) -> None:
    key = Ed25519PrivateKey.generate()
    keydir = _trust(tmp_path, key)
    files = {"bin/launch": b"#!/bin/sh\nexec sleep 1000\n"}
    sha = world.publish("a", "1", files)
    signature = sign(key, "a", "1", sha)
    (world.repo / "a" / "a_1.tar.gz.sig").write_bytes(signature)
    # The same signed bytes, published as another app and as another version.
    artifact = (world.repo / "a" / "a_1.tar.gz").read_bytes()
    old = base64.b64encode(key.sign(f"platypus-artifact sha256:{sha}\n".encode()))
    for app, version, sig in (("b", "1", signature), ("a", "2", signature), ("legacy", "1", old)):
        (world.repo / app).mkdir(exist_ok=True)
        (world.repo / app / f"{app}_{version}.tar.gz").write_bytes(artifact)
        (world.repo / app / f"{app}_{version}.tar.gz.sig").write_bytes(sig)
    world.assign("a", {"1": prep(sha), "2": prep(sha)})
    world.assign("b", {"1": active(sha)})
    world.assign("legacy", {"1": active(sha)})

    world.run("--trusted-keys", str(keydir), check=1)

    assert world.layout("a").installed_versions() == ["1"]
    assert "for app a version 2" in world.report("a").details["versions"]["2"]
    assert "for app b version 1" in world.report("b").details["versions"]["1"]
    assert world.layout("b").installed_versions() == []
    refused = world.report("legacy").details["versions"]["1"]
    assert "old format" in refused and "pp pack" in refused and "\n" not in refused
    assert world.layout("legacy").installed_versions() == []


def _trust(tmp_path: Path, key: Ed25519PrivateKey) -> Path:
    keydir = tmp_path / "keys"
    keydir.mkdir()
    (keydir / "release.pub").write_bytes(
        key.public_key().public_bytes(
            serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo
        )
    )
    return keydir


def test_an_unusable_trust_store_stops_the_agent_with_one_line(
    world: World, tmp_path: Path
) -> None:
    keydir = tmp_path / "keys"
    keydir.mkdir()
    (keydir / "typo.pub").write_text("not a key")
    stderr = world.run("--trusted-keys", str(keydir), check=2)
    assert stderr.strip().count("\n") == 0
    assert "typo.pub" in stderr and "Traceback" not in stderr


def test_structured_logs_name_the_install(world: World) -> None:
    world.assign("hello", {"1.0": active(world.publish("hello", "1.0"))})
    events = [json.loads(line) for line in world.run().splitlines() if line.startswith("{")]
    done = [e for e in events if e["event"] == "install.done"]
    assert done and done[0]["app"] == "hello" and done[0]["version"] == "1.0"


# -- helpers -----------------------------------------------------------------------------------


def in_process(world: World, fetch: FetchOptions | None = None) -> Preparer:
    settings = Settings(fetch or FetchOptions(timeout_s=1, attempts=1), Limits(1 << 30, 100_000))
    return Preparer(
        settings, repo=world.server.url, store=world.store, node=NODE, state_dir=world.state_dir
    )


def test_allowed_sources_confine_urls_but_always_admit_the_repo(world: World) -> None:
    sha = world.publish("web", "1")
    elsewhere = f"http://localhost:{world.server.port}/web/web_1.tar.gz"  # same bytes, other host
    world.assign(
        "web", {"1": {**active(sha), "url": elsewhere}, "2": prep(world.publish("web", "2"))}
    )
    stderr = world.run("--allowed-sources", "https://releases.example/apps/", check=1)
    assert "Traceback" not in stderr
    versions = world.report("web").details["versions"]
    assert versions["1"].startswith("error: http://localhost:")
    assert "is not under --allowed-sources" in versions["1"]
    assert versions["2"] == "installed"  # no url: from --repo, which is always allowed
    assert world.layout("web").installed_versions() == ["2"]
