"""pp-preparer against stalled servers and hostile file URLs, as a real process (and
once in-process, where the outcome of a stopped converge can be seen)."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import threading
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from preparer_support import VENV_BIN, put_app, tree_tarball, wait_for
from stall_support import StallingServer, stalling_server

from agents.preparer.agent import Preparer
from agents.preparer.apply import Settings
from agents.system.archive import Limits
from agents.system.fetch import FetchOptions
from agents.system.layout import AppLayout
from intent.store import IntentStore, open_store

NODE = "web1"
PREPARER = str(VENV_BIN / "pp-preparer")
UNKNOWN_SHA = "0" * 64


@pytest.fixture
def stalling() -> Iterator[StallingServer]:
    with stalling_server(interval_s=2.0) as running:
        yield running


@pytest.fixture
def store(tmp_path: Path) -> IntentStore:
    return open_store(f"sqlite://{tmp_path / 'intent.db'}")


def command(tmp_path: Path, *extra: str) -> list[str]:
    return [
        PREPARER, "--store", f"sqlite://{tmp_path / 'intent.db'}", "--node", NODE,
        "--log-format", "json", "--state-dir", str(tmp_path / "preparer-state"), *extra,
    ]  # fmt: skip


def leftovers(basedir: Path) -> list[str]:
    installs = basedir / "installs"
    return [n for n in os.listdir(installs) if n.startswith(".")] if installs.is_dir() else []


def stalled(store: IntentStore, stalling: StallingServer, app: str, basedir: Path) -> None:
    """An app whose one version is fetched from the stalling server (``drip`` or not)."""
    url = f"{stalling.url}/{app}/{app}_1.tar.gz"
    put_app(
        store, NODE, app, basedir, {"1": {"state": "active", "sha256": UNKNOWN_SHA, "url": url}}
    )


def test_sigterm_ends_stalled_downloads_at_once_and_other_apps_install_meanwhile(
    tmp_path: Path, store: IntentStore, stalling: StallingServer
) -> None:
    srv = tmp_path / "srv"
    repo = tmp_path / "repo"
    (repo / "fast").mkdir(parents=True)
    fast = tree_tarball(repo / "fast" / "fast_1.tar.gz", {"VERSION": b"1"})
    stalled(store, stalling, "drip", srv / "drip")
    stalled(store, stalling, "silent", srv / "silent")
    put_app(store, NODE, "fast", srv / "fast", {"1": {"state": "active", "sha256": fast}})
    log = (tmp_path / "agent.log").open("w")
    # Three at a time: two stalled downloads still leave a worker for the third app.
    # Reads may wait 60 s and downloads last 30 min: only the stop can end them.
    agent = subprocess.Popen(
        command(tmp_path, "--repo", f"file://{repo}", "--max-parallel", "3",
                "--fetch-timeout", "60", "--resync-interval", "3600"),
        stdout=log, stderr=subprocess.STDOUT,
    )  # fmt: skip
    try:
        wait_for(lambda: AppLayout(srv / "fast", "fast").is_installed("1", fast), timeout_s=30)
        wait_for(
            lambda: sorted(stalling.paths) == ["/drip/drip_1.tar.gz", "/silent/silent_1.tar.gz"]
        )
        agent.send_signal(signal.SIGTERM)
        assert agent.wait(timeout=20) == 0
    finally:
        if agent.poll() is None:
            agent.kill()
            agent.wait()
        log.close()

    events = [json.loads(line) for line in (tmp_path / "agent.log").read_text().splitlines()]
    stopped = sorted(e["app"] for e in events if e["event"] == "install.stopped")
    assert stopped == ["drip", "silent"]
    assert not [e for e in events if e["event"] == "install.failed"]
    assert events[-1]["event"] == "agent.stopped"
    assert leftovers(srv / "drip") == [] and leftovers(srv / "silent") == []
    assert sorted(stalling.paths) == ["/drip/drip_1.tar.gz", "/silent/silent_1.tar.gz"]


def test_fetch_deadline_cuts_off_a_server_that_drips(
    tmp_path: Path, store: IntentStore, stalling: StallingServer
) -> None:
    basedir = tmp_path / "srv" / "drip"
    stalled(store, stalling, "drip", basedir)
    done = subprocess.run(
        command(tmp_path, "--once", "--fetch-timeout", "60", "--fetch-deadline", "2"),
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert done.returncode == 1, done.stderr
    (report,) = store.reality(node=NODE, app="drip")
    assert report.status == "error"
    assert "not complete after 2 s (--fetch-deadline)" in report.details["versions"]["1"]
    assert leftovers(basedir) == []


def test_a_stopped_converge_reports_stopped_and_leaves_nothing_behind(
    tmp_path: Path, store: IntentStore, stalling: StallingServer
) -> None:
    basedir = tmp_path / "srv" / "silent"
    stalled(store, stalling, "silent", basedir)
    stop = threading.Event()
    settings = Settings(FetchOptions(timeout_s=60, attempts=3), Limits(1 << 30, 100_000))
    preparer = Preparer(
        settings, store=store, node=NODE, stop=stop, state_dir=tmp_path / "preparer-state"
    )
    (intent,) = store.apps_for_node(NODE)
    outcome: list[Any] = []
    converging = threading.Thread(target=lambda: outcome.append(preparer.converge(intent)))
    converging.start()
    wait_for(lambda: stalling.paths == ["/silent/silent_1.tar.gz"])
    stop.set()
    converging.join(10)
    assert not converging.is_alive()
    (result,) = outcome
    assert result.status == "converging", result  # not a failure: no backoff
    assert result.error == "stopped before 1 was installed"
    assert result.details["versions"] == {"1": "stopped"}
    assert leftovers(basedir) == []


def test_file_urls_outside_the_repo_are_refused_however_spelled(
    tmp_path: Path, store: IntentStore
) -> None:
    """The secret is a well-formed artifact and the intent names its true sha256:
    fetched, it would be extracted and handed to run_as."""
    secret = tmp_path / "secret.tar.gz"
    sha = tree_tarball(secret, {"shadow": b"root:$6$hash:19000::::::\n"})
    secret.chmod(0o600)
    repo = tmp_path / "repo"
    repo.mkdir()
    urls = {
        "upper": f"FILE://{secret}",
        "oneslash": f"file:{secret}",
        "dotdot": f"file://{repo}/%2e%2e/secret.tar.gz",
    }
    for app, url in urls.items():
        spec = {"1": {"state": "active", "sha256": sha, "url": url}}
        put_app(store, NODE, app, tmp_path / "srv" / app, spec)
    # With a wrong sha256, a fetched secret's digest would be in the report.
    wrong = {"1": {"state": "active", "sha256": UNKNOWN_SHA, "url": urls["upper"]}}
    put_app(store, NODE, "digest", tmp_path / "srv" / "digest", wrong)
    urls["digest"] = urls["upper"]
    for repo_args in ([], ["--repo", f"file://{repo}"]):
        done = subprocess.run(
            command(tmp_path, "--once", *repo_args), capture_output=True, text=True, timeout=60
        )
        assert done.returncode == 1, done.stderr
        for app in urls:
            (report,) = store.reality(node=NODE, app=app)
            assert report.status == "error"
            if app in ("oneslash", "dotdot"):  # invalid intent: refused before any plan
                assert report.error is not None
                assert report.error.startswith(f"clusters/{app}/prod/config: versions.1.url: ")
            else:
                assert "file:// URLs are fetched only" in report.details["versions"]["1"], app
            assert AppLayout(tmp_path / "srv" / app, app).installed_versions() == []
            assert sha not in report.model_dump_json()
