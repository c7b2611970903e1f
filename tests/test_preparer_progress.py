"""pp-preparer's "fetching" report: written only for an install still running after a
moment, and never after (or over) the install's outcome.

The real runtime, a real embedded store and a loopback HTTP server whose downloads
the tests hold and release; the store records each report as it is written."""

from __future__ import annotations

import threading
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
from preparer_support import (
    ArtifactServer,
    Behaviour,
    artifact_server,
    put_app,
    tree_tarball,
    wait_for,
)

from agents.preparer.agent import Preparer
from agents.preparer.apply import Settings
from agents.runtime import Outcome, Runtime, RuntimeOptions
from agents.system.archive import Limits
from agents.system.fetch import FetchOptions
from agents.system.layout import AppLayout
from intent.model import Reality
from intent.store import IntentStore, open_kv

NODE = "web1"
APP = "hello"


class RecordingStore(IntentStore):
    """The embedded store, noting every report as it is written."""

    def __init__(self, path: Path) -> None:
        super().__init__(open_kv(f"sqlite://{path}"))
        self.written: list[Reality] = []

    def write_reality(self, report: Reality) -> None:
        super().write_reality(report)
        self.written.append(report)

    def statuses(self) -> list[tuple[str, str | None]]:
        return [(r.status, r.error) for r in self.written if r.agent == "preparer"]


class SlowReporter(Preparer):
    """A preparer whose progress reports wait for ``let_go`` before going to the runtime:
    a report the moment an install ends, still on its way to the store."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.reporting = threading.Event()
        self.let_go = threading.Event()

    def report_progress(self, app: str, outcome: Outcome) -> None:
        self.reporting.set()
        assert self.let_go.wait(30), "the test never let the report through"
        super().report_progress(app, outcome)


@dataclass
class Node:
    store: RecordingStore
    server: ArtifactServer
    layout: AppLayout
    sha: str
    artifact: str

    def runtime(self, progress_after_s: float, agent: type[Preparer] = Preparer) -> Runtime:
        settings = Settings(
            FetchOptions(timeout_s=30, attempts=2, backoff_initial_s=0.01),
            Limits(1 << 30, 100_000),
        )
        preparer = agent(
            settings,
            repo=self.server.url,
            store=self.store,
            node=NODE,
            state_dir=self.layout.basedir.parent / "state",
            progress_after_s=progress_after_s,
        )
        return Runtime(preparer, self.store, RuntimeOptions(node=NODE))

    def stall_download(self) -> None:
        self.server.behaviours[self.artifact] = Behaviour(stall_s=30, stall_times=1)

    def installed(self) -> bool:
        return self.layout.is_installed("1", self.sha)

    def report(self) -> Reality:
        (report,) = [r for r in self.store.reality(node=NODE, app=APP) if r.agent == "preparer"]
        return report


@pytest.fixture
def node(tmp_path: Path) -> Iterator[Node]:
    repo = tmp_path / "repo"
    (repo / APP).mkdir(parents=True)
    sha = tree_tarball(repo / APP / f"{APP}_1.tar.gz", {"VERSION": b"1"})
    store = RecordingStore(tmp_path / "intent.db")
    store.ensure_identity("tester")
    put_app(store, NODE, APP, tmp_path / "srv" / APP, {"1": {"state": "active", "sha256": sha}})
    with artifact_server(repo) as server:
        yield Node(
            store, server, AppLayout(tmp_path / "srv" / APP, APP), sha, f"/{APP}/{APP}_1.tar.gz"
        )
    store.close()


def test_a_quick_install_reports_only_its_outcome(node: Node) -> None:
    # A delay far longer than a tiny install takes, even on a busy machine.
    assert node.runtime(progress_after_s=10).run_pass(force=True)
    assert node.installed()
    assert node.store.statuses() == [("converged", None)]


def test_a_slow_download_says_fetching_while_it_runs(node: Node) -> None:
    node.stall_download()
    passing = threading.Thread(target=node.runtime(progress_after_s=0.2).run_pass, args=(True,))
    passing.start()
    try:
        wait_for(lambda: node.store.statuses() == [("converging", "fetching 1")], timeout_s=10)
        assert node.report().details["versions"] == {"1": "fetching"}
        assert node.report().version is None  # not installed yet
    finally:
        node.server.release.set()
        passing.join(30)
    assert node.installed()
    assert node.store.statuses() == [("converging", "fetching 1"), ("converged", None)]
    assert node.report().details["versions"] == {"1": "installed"}


def test_a_fetching_report_on_its_way_when_the_install_ends_lands_before_the_outcome(
    node: Node,
) -> None:
    node.stall_download()
    runtime = node.runtime(progress_after_s=0.2, agent=SlowReporter)
    preparer = runtime.agent
    assert isinstance(preparer, SlowReporter)
    passing = threading.Thread(target=runtime.run_pass, args=(True,))
    passing.start()
    try:
        assert preparer.reporting.wait(10), "no fetching report was started"
        node.server.release.set()
        wait_for(node.installed, timeout_s=10)
        # The install is in place and its "fetching" report not yet written: the
        # converge waits for that report, so the outcome cannot be written first.
        passing.join(1)
        assert passing.is_alive()
    finally:
        preparer.let_go.set()
        passing.join(30)
    assert node.store.statuses() == [("converging", "fetching 1"), ("converged", None)]
    assert node.report().status == "converged"
