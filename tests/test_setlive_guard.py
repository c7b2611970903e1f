"""The guard pp-setlive leaves when it switches its own bundle: how it counts the new
setlive's ends (pure), and how it decides, against a real runsvdir."""

from __future__ import annotations

import threading
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
from runit_support import Runsvdir, require_root, runsvdir, wait_for  # noqa: F401

from agents.setlive import guard
from agents.setlive.state import Pending, StateDir
from agents.system import fs, runit
from agents.system.layout import AppLayout

APP = "bundle"


def status(state: runit.State, pid: int | None, started_at: float) -> runit.ServiceStatus:
    return runit.ServiceStatus(supervised=True, state=state, pid=pid, started_at=started_at)


def count(*seen: runit.ServiceStatus) -> int:
    counter = guard.ExitCounter()
    for one in seen:
        counter.see(one)
    return counter.exits


def test_each_run_that_ends_is_counted_once_however_it_is_seen() -> None:
    # A service that crashes on start: run, a second down, run again.
    assert count(status("run", 1, 0), status("down", None, 1), status("run", 2, 2)) == 1
    # The same status seen again and again is one state, not several.
    assert count(status("run", 1, 0), status("run", 1, 0), status("down", None, 1)) == 1
    assert count(status("down", None, 1), status("down", None, 1)) == 0
    # A run too short to be seen between two pauses.
    assert count(status("down", None, 1), status("down", None, 3), status("down", None, 5)) == 2
    # A run that lasted over a second is started again at once: its pause was missed.
    assert count(status("run", 1, 0), status("run", 2, 9), status("run", 3, 19)) == 2
    # finish then down are the two halves of one end.
    assert count(status("run", 1, 0), status("finish", 7, 1), status("down", None, 2)) == 1
    # A service first seen down, then started, has not ended.
    assert count(status("down", None, 0), status("run", 1, 1)) == 0


def test_no_status_yet_or_no_supervisor_counts_nothing() -> None:
    unsupervised = runit.ServiceStatus(supervised=False)
    starting = runit.ServiceStatus(supervised=True)
    assert count(status("run", 1, 0), unsupervised, starting, status("run", 1, 0)) == 0


@pytest.fixture
def host(runsvdir: Runsvdir, tmp_path: Path) -> Iterator[tuple[Runsvdir, AppLayout, StateDir]]:  # noqa: F811
    require_root()
    layout = AppLayout(tmp_path / "apps", APP)
    for version in ("1", "2"):
        layout.install_dir(version).mkdir(parents=True)
    fs.symlink_atomic(str(layout.install_dir("2")), layout.current)
    state = StateDir(tmp_path / "state")
    state.update(APP, pending=Pending(target="2", from_version="1", started_at=time.time()))
    yield runsvdir, layout, state


def _service(svdir: Runsvdir, name: str, run: str) -> Path:
    stage = svdir.root / "stage" / name
    stage.mkdir(parents=True)
    script = stage / "run"
    script.write_text(f"#!/bin/sh\ncd {svdir.root}\n{run}\n")
    script.chmod(0o755)
    runit.link(stage, svdir.service_dir, name)
    assert runit.wait_supervised(stage, 10)
    return stage


def test_a_new_setlive_that_keeps_exiting_is_given_up_on_long_before_the_deadline(
    host: tuple[Runsvdir, AppLayout, StateDir],
) -> None:
    svdir, layout, state = host
    service = _service(svdir, "crashing", "echo cannot start; exit 1")
    started = time.monotonic()
    why = guard.watch(state, layout, "2", service, deadline_s=120)
    assert why == f"exited {guard.CRASH_LOOP_EXITS - 1} times without finishing its own deploy"
    # runsv holds a service that died young down for a second between starts.
    assert time.monotonic() - started < 60
    runit.unlink(svdir.service_dir, "crashing")


def test_a_new_setlive_that_runs_but_never_finishes_is_given_up_on_at_the_deadline(
    host: tuple[Runsvdir, AppLayout, StateDir],
) -> None:
    svdir, layout, state = host
    service = _service(svdir, "hanging", "exec sleep 600")
    assert wait_for(lambda: runit.status(service).up, 10)
    assert guard.watch(state, layout, "2", service, deadline_s=2) == (
        "did not finish its own deploy within 2s"
    )
    runit.unlink(svdir.service_dir, "hanging")


def test_a_new_setlive_that_finishes_its_switch_dismisses_the_guard(
    host: tuple[Runsvdir, AppLayout, StateDir],
) -> None:
    svdir, layout, state = host
    service = _service(svdir, "healthy", "exec sleep 600")
    finisher = threading.Timer(1.0, lambda: state.update(APP, pending=None))
    finisher.start()
    try:
        assert guard.watch(state, layout, "2", service, deadline_s=60) is None
    finally:
        finisher.join()
    assert state.load(APP).failure is None
    runit.unlink(svdir.service_dir, "healthy")
