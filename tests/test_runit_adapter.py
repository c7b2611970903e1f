"""The runit adapter against a real, private runsvdir: real runsv, real sv."""

from __future__ import annotations

import os
import time
from pathlib import Path

import pytest
from runit_support import Runsvdir, runsvdir, wait_for  # noqa: F401 - the fixture

from agents.system import runit

RUN_SLEEP = b"#!/bin/sh\nexec sleep 1000\n"


def _service(stage: Path, name: str, run: bytes = RUN_SLEEP, down: bool = False) -> Path:
    service = stage / name
    service.mkdir(parents=True)
    (service / "run").write_bytes(run)
    (service / "run").chmod(0o755)
    if down:
        runit.set_down_file(service, True)
    return service


@pytest.fixture(scope="module")
def services(runsvdir: Runsvdir) -> dict[str, Path]:  # noqa: F811
    """Three services linked at once, so the tests pay for runsvdir's scan once."""
    stage = runsvdir.root / "stage"
    made = {
        "plain": _service(stage, "plain"),
        "held": _service(stage, "held", down=True),
        "gone": _service(stage, "gone"),
    }
    for name, path in made.items():
        assert runit.link(path, runsvdir.service_dir, name)
    for path in made.values():
        assert runit.wait_supervised(path, 10), f"runsvdir did not pick up {path}"
    assert wait_for(lambda: runit.status(made["plain"]).up, 5)
    return made


def test_status_reads_supervise_like_sv_does(services: dict[str, Path]) -> None:
    status = runit.status(services["plain"])
    assert status.supervised and status.up and status.want_up
    assert status.pid is not None and os.path.exists(f"/proc/{status.pid}")
    assert status.started_at is not None and abs(time.time() - status.started_at) < 30
    assert status.normally_up
    text = runit.sv_status(services["plain"])
    assert text is not None and text.state == "run" and text.pid == status.pid
    uptime = status.uptime()
    assert uptime is not None and abs(text.uptime_s - uptime) <= 1.5


def test_a_down_file_keeps_a_new_service_from_starting(services: dict[str, Path]) -> None:
    status = runit.status(services["held"])
    assert status.supervised and status.state == "down" and status.want_up is False
    assert status.normally_up is False
    runit.up(services["held"])
    assert wait_for(lambda: runit.status(services["held"]).up, 5)
    assert runit.set_down_file(services["held"], False)
    assert not runit.set_down_file(services["held"], False)
    assert runit.status(services["held"]).normally_up


def test_down_and_up_change_state_and_process(services: dict[str, Path]) -> None:
    before = runit.status(services["plain"])
    runit.down(services["plain"])
    assert wait_for(lambda: runit.status(services["plain"]).state == "down", 5)
    down = runit.status(services["plain"])
    assert down.want_up is False and down.pid is None
    assert runit.sv_status(services["plain"]) is not None
    runit.up(services["plain"])
    assert wait_for(lambda: runit.status(services["plain"]).up, 5)
    assert runit.status(services["plain"]).pid != before.pid


def test_restart_gives_a_new_process_started_after_the_command(services: dict[str, Path]) -> None:
    before = runit.status(services["plain"])
    asked = time.time()
    runit.restart(services["plain"])
    assert wait_for(lambda: runit.status(services["plain"]).pid not in (None, before.pid), 5)
    after = runit.status(services["plain"])
    assert after.up and after.started_at is not None and after.started_at >= asked - 0.01


def test_unlink_and_exit_take_a_service_away_from_runit(
    runsvdir: Runsvdir,  # noqa: F811
    services: dict[str, Path],
) -> None:
    gone = services["gone"]
    pid = runit.status(gone).pid
    assert runit.unlink(runsvdir.service_dir, "gone", gone)
    assert not (runsvdir.service_dir / "gone").exists()
    runit.exit_supervisor(gone)
    assert runit.wait_unsupervised(gone, 10)
    assert wait_for(lambda: not os.path.exists(f"/proc/{pid}"), 5)
    runit.remove_service_dir(gone)
    assert not gone.exists()
    time.sleep(1.2)  # runsvdir rescans after a runsv exits: it must not come back
    assert not runit.is_supervised(gone)


def test_unlink_leaves_a_link_it_does_not_own(runsvdir: Runsvdir, tmp_path: Path) -> None:  # noqa: F811
    (runsvdir.service_dir / ".foreign").symlink_to(tmp_path)
    assert not runit.unlink(runsvdir.service_dir, ".foreign", runsvdir.root / "elsewhere")
    assert (runsvdir.service_dir / ".foreign").is_symlink()
    (runsvdir.service_dir / ".foreign").unlink()


def test_sv_on_an_unsupervised_service_is_a_one_line_error(tmp_path: Path) -> None:
    service = _service(tmp_path, "lonely")
    assert runit.status(service) == runit.ServiceStatus(supervised=False, normally_up=True)
    with pytest.raises(runit.RunitError) as info:
        runit.up(service)
    assert "\n" not in str(info.value) and "runsv is not running" in str(info.value)
    assert runit.sv_status(service) is None


def test_link_is_atomic_and_idempotent(runsvdir: Runsvdir, tmp_path: Path) -> None:  # noqa: F811
    target = tmp_path / "x"
    target.mkdir()
    link_dir = tmp_path / "links"
    assert runit.link(target, link_dir, "x")
    assert not runit.link(target, link_dir, "x")
    assert runit.linked_target(link_dir, "x") == target


# -- parsing, without runit ----------------------------------------------------------------------


def _status_bytes(seconds: int, nanos: int, pid: int, want: bytes, state: int) -> bytes:
    tai = (2**62 + 10 + seconds).to_bytes(8, "big")
    return (
        tai
        + nanos.to_bytes(4, "big")
        + pid.to_bytes(4, "little")
        + b"\0"
        + want
        + b"\0"
        + bytes([state])
    )


def test_parse_status_bytes_decodes_runsv_layout() -> None:
    state, pid, started, want_up, paused, term = runit.parse_status_bytes(
        _status_bytes(1_700_000_000, 500_000_000, 8077, b"u", 1)
    )
    assert (state, pid, want_up, paused, term) == ("run", 8077, True, False, False)
    assert started == pytest.approx(1_700_000_000.5)
    assert runit.parse_status_bytes(_status_bytes(1, 0, 0, b"d", 0))[:2] == ("down", None)
    with pytest.raises(ValueError):
        runit.parse_status_bytes(b"short")


def test_parse_sv_status_lines() -> None:
    run = runit.parse_sv_status("run: /etc/service/web: (pid 123) 45s; run: log: (pid 124) 45s")
    assert run == runit.SvStatusLine("run", 123, 45, True, None)
    down = runit.parse_sv_status("down: /etc/service/web: 3s, normally up, want up")
    assert down == runit.SvStatusLine("down", None, 3, True, "up")
    held = runit.parse_sv_status("run: /s/x: (pid 9) 1s, normally down, want down")
    assert held is not None and not held.normally_up and held.want == "down"
    assert runit.parse_sv_status("fail: /s/x: runsv not running") is None
    assert runit.parse_sv_status("warning: /s/x: unable to open supervise/ok") is None
