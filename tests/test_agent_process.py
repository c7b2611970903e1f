"""An agent as a real process: the loop, signals and logs every agent shares,
shown with pp-preparer against the embedded store."""

from __future__ import annotations

import json
import os
import random
import shutil
import signal
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest
from preparer_support import Behaviour, artifact_server, put_app, tree_tarball, wait_for

from intent.store import IntentStore
from intent.store.sqlite import SqliteStore

PREPARER = Path(sys.executable).parent / "pp-preparer"
NODE = "web1"


def start_preparer(tmp_path: Path, *extra: str) -> subprocess.Popen[bytes]:
    log = (tmp_path / "agent.log").open("w")
    try:
        return subprocess.Popen(
            [str(PREPARER), "--store", f"sqlite://{tmp_path / 'intent.db'}", "--node", NODE,
             "--log-format", "json", "--resync-interval", "3600",
             "--state-dir", str(tmp_path / "state"), *extra],
            stdout=log, stderr=subprocess.STDOUT,
        )  # fmt: skip
    finally:
        log.close()


def events(tmp_path: Path) -> list[dict[str, object]]:
    return [json.loads(line) for line in (tmp_path / "agent.log").read_text().splitlines()]


@pytest.fixture
def hello(tmp_path: Path) -> Iterator[tuple[IntentStore, Path]]:
    """App hello 1.0 published in a file:// repo and assigned; yields the store and
    the install directory the preparer makes."""
    store = IntentStore(SqliteStore(tmp_path / "intent.db"))
    (tmp_path / "repo" / "hello").mkdir(parents=True)
    sha = tree_tarball(tmp_path / "repo" / "hello" / "hello_1.0.tar.gz", {"bin/launch": b"#!"})
    basedir = tmp_path / "srv" / "hello"
    put_app(store, NODE, "hello", basedir, {"1.0": {"state": "active", "sha256": sha}})
    yield store, basedir / "installs" / "hello_1.0"
    store.close()


# Upper bounds for a wedged agent, not timings (bench/faults_bench.py measures those): a
# loaded test machine can take many seconds to start an agent or to end one.
PATIENCE_S = 60.0


def until(tmp_path: Path, predicate: Callable[[], bool], what: str) -> None:
    try:
        wait_for(predicate, timeout_s=PATIENCE_S)
    except AssertionError:
        log = (tmp_path / "agent.log").read_text(errors="replace").splitlines()[-20:]
        raise AssertionError(
            f"{what}: not within {PATIENCE_S:g}s; the agent's log ends:\n" + "\n".join(log)
        ) from None


def stopped(agent: subprocess.Popen[bytes], timeout_s: float = PATIENCE_S) -> int | None:
    """The agent's exit code, or None when it did not exit in time (then killed)."""
    try:
        return agent.wait(timeout=timeout_s)
    except subprocess.TimeoutExpired:
        agent.kill()
        agent.wait()
        return None


def test_agent_repairs_drift_on_sighup_and_stops_cleanly_on_sigterm(
    tmp_path: Path, hello: tuple[IntentStore, Path]
) -> None:
    store, install = hello
    agent = start_preparer(tmp_path, "--repo", f"file://{tmp_path / 'repo'}")
    try:
        until(tmp_path, lambda: (install / "bin" / "launch").exists(), "the first install")
        shutil.rmtree(install)  # drift made by hand; the intent does not change
        agent.send_signal(signal.SIGHUP)
        until(tmp_path, lambda: (install / "bin" / "launch").exists(), "repair after SIGHUP")
        agent.send_signal(signal.SIGTERM)
    finally:
        code = stopped(agent)
    assert code == 0

    log = events(tmp_path)
    assert [e["event"] for e in log if e["event"] == "install.done"] == ["install.done"] * 2
    assert log[-1]["event"] == "agent.stopped"
    for event in log:
        assert event["agent"] == "preparer" and event["node"] == NODE, event
    assert all(e.get("app") == "hello" for e in log if str(e["event"]).startswith("install."))
    (report,) = store.reality(node=NODE, app="hello")
    assert report.status == "converged"


def test_a_storm_of_signals_never_wedges_the_agent(
    tmp_path: Path, hello: tuple[IntentStore, Path]
) -> None:
    """SIGHUPs and a SIGTERM landing at any moment, several while the main thread is
    inside a lock: the agent resyncs, then stops (a handler taking a lock used to
    deadlock it)."""
    _, install = hello
    seed = random.randrange(1 << 32)
    print(f"seed {seed}")
    rng = random.Random(seed)
    agent = start_preparer(tmp_path, "--repo", f"file://{tmp_path / 'repo'}")
    try:
        until(tmp_path, lambda: (install / "bin" / "launch").exists(), "the first install")
        for _ in range(rng.randint(100, 200)):
            agent.send_signal(signal.SIGHUP)
            time.sleep(rng.uniform(0, 0.004))
        agent.send_signal(signal.SIGTERM)
    finally:
        code = stopped(agent)
    assert code == 0, f"seed {seed}: the agent did not stop on SIGTERM"
    log = [e["event"] for e in events(tmp_path)]
    assert log[-1] == "agent.stopped"
    assert "agent.resync_requested" in log


def test_sigterm_ends_a_stalled_download_without_waiting_for_it(
    tmp_path: Path, hello: tuple[IntentStore, Path]
) -> None:
    """The download would hang for an hour; a stop ends it (or the runtime stops
    waiting for it) long before."""
    _, install = hello
    repo = tmp_path / "repo"
    with artifact_server(repo) as server:
        server.behaviours["/hello/hello_1.0.tar.gz"] = Behaviour(stall_s=3600, stall_times=99)
        agent = start_preparer(tmp_path, "--repo", server.url, "--fetch-timeout", "3600")
        try:
            until(tmp_path, lambda: server.count("/hello/hello_1.0.tar.gz") > 0, "the download")
            agent.send_signal(signal.SIGTERM)
        finally:
            code = stopped(agent)
    assert code == 0, "the agent waited for the stalled download"
    assert not install.exists()
    assert events(tmp_path)[-1]["event"] == "agent.stopped"


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


def test_every_agent_shows_max_parallel_and_still_reads_the_former_parallel(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    from click.testing import CliRunner

    import agents.setlive.__main__ as setlive_main
    from agents import entrypoint
    from agents.elb_registrar.__main__ import main as elb_registrar
    from agents.preparer.__main__ import main as preparer

    for agent in ("pp-preparer", "pp-setlive", "pp-elb-registrar"):
        shown = subprocess.run(
            [str(PREPARER.with_name(agent)), "--help"], capture_output=True, text=True, timeout=60
        )
        assert "--max-parallel" in shown.stdout and "--parallel" not in shown.stdout, agent

    chosen: list[int] = []

    def run(*args: object, max_parallel: int, **kwargs: object) -> None:
        chosen.append(max_parallel)

    monkeypatch.setattr(entrypoint, "run", run)
    locks: list[int] = []  # setlive's state-dir locks, held by this process until closed
    lock = setlive_main._lock

    def keep_lock(state_dir: Path) -> int:
        locks.append(lock(state_dir))
        return locks[-1]

    monkeypatch.setattr(setlive_main, "_lock", keep_lock)
    try:
        for main in (preparer, setlive_main.main, elb_registrar):
            for n, (flags, expected) in enumerate(
                (
                    (["--max-parallel", "3"], 3),
                    (["--parallel", "5"], 5),
                    (["--parallel", "5", "--max-parallel", "6"], 6),
                )
            ):
                state = ["--node", NODE, "--state-dir", str(tmp_path / f"{main.name}-{n}")]
                result = CliRunner().invoke(main, [*state, *flags], catch_exceptions=False)
                assert result.exit_code == 0, result.output
                assert chosen.pop() == expected, (main.name, flags)
    finally:
        for fd in locks:
            os.close(fd)
