"""An agent as a real process: the loop, signals and logs every agent shares,
shown with pp-preparer against the embedded store."""

from __future__ import annotations

import json
import shutil
import signal
import subprocess
import sys
from pathlib import Path

from preparer_support import put_app, tree_tarball, wait_for

from intent.store import IntentStore
from intent.store.sqlite import SqliteStore

PREPARER = Path(sys.executable).parent / "pp-preparer"
NODE = "web1"


def test_agent_repairs_drift_on_sighup_and_stops_cleanly_on_sigterm(tmp_path: Path) -> None:
    db = tmp_path / "intent.db"
    store = IntentStore(SqliteStore(db))
    sha = tree_tarball(tmp_path / "hello.tar.gz", {"bin/launch": b"#!/bin/sh\n"})
    basedir = tmp_path / "srv" / "hello"
    url = f"file://{tmp_path}/hello.tar.gz"
    put_app(store, NODE, "hello", basedir, {"1.0": {"state": "active", "sha256": sha, "url": url}})
    install = basedir / "installs" / "hello_1.0"
    log = (tmp_path / "agent.log").open("w")
    agent = subprocess.Popen(
        [str(PREPARER), "--store", f"sqlite://{db}", "--node", NODE, "--log-format", "json",
         "--resync-interval", "3600", "--repo", f"file://{tmp_path}"],
        stdout=log, stderr=subprocess.STDOUT,
    )  # fmt: skip
    try:
        wait_for(lambda: (install / "bin" / "launch").exists(), timeout_s=20)
        shutil.rmtree(install)  # drift made by hand; the intent does not change
        agent.send_signal(signal.SIGHUP)
        wait_for(lambda: (install / "bin" / "launch").exists(), timeout_s=20)
        agent.send_signal(signal.SIGTERM)
        assert agent.wait(timeout=20) == 0
    finally:
        if agent.poll() is None:
            agent.kill()
            agent.wait()
        log.close()

    events = [json.loads(line) for line in (tmp_path / "agent.log").read_text().splitlines()]
    assert [e["event"] for e in events if e["event"] == "install.done"] == ["install.done"] * 2
    assert events[-1]["event"] == "agent.stopped"
    for event in events:
        assert event["agent"] == "preparer" and event["node"] == NODE, event
    assert all(e.get("app") == "hello" for e in events if e["event"].startswith("install."))
    (report,) = store.reality(node=NODE, app="hello")
    assert report.status == "converged"


def test_agent_usage_errors_are_one_line(tmp_path: Path) -> None:
    for agent in ("pp-preparer", "pp-setlive", "pp-iptables"):
        done = subprocess.run(
            [str(PREPARER.with_name(agent)), "--node", "a/b", "--once"],
            capture_output=True,
            text=True,
            timeout=60,
        )
        assert done.returncode == 2
        assert done.stderr.count("\n") == 1, done.stderr
        assert done.stderr.startswith(f"{agent}: error: Invalid value for '--node': 'a/b'")
