"""runit, by its own conventions: service directories, ``sv`` and ``supervise/``.

A service directory holds ``run`` (and optionally ``log/run`` and a ``down``
file); ``runsvdir`` starts one ``runsv`` per directory (or symlink to one) in
the directory it watches, at most five seconds after it appears. ``runsv``
keeps its state in ``<service>/supervise/``: ``status`` (20 bytes, daemontools
compatible), ``stat`` (text) and the ``ok``/``control`` FIFOs.

State is read from ``supervise/`` directly (exact start times, no process per
query) and commands are written to ``supervise/control``, as runsv(8)
documents; ``sv status`` is parsed too, for cross-checks and operators.
"""

from __future__ import annotations

import contextlib
import errno
import os
import re
import shutil
import subprocess
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

import tenacity

from agents.system import fs
from intent.errors import PlatypusError

State = Literal["run", "down", "finish"]

_TAI_OFFSET = 2**62 + 10
"""TAI64 label of the Unix epoch as runit writes it (``tai_unix``: 2^62 + 10 s)."""

SV_TIMEOUT_S = 10.0


class RunitError(PlatypusError):
    """``sv`` refused or failed; the message is one line with its own words."""


@dataclass(frozen=True)
class ServiceStatus:
    """What ``runsv`` says about one service; ``supervised`` False means no runsv."""

    supervised: bool
    state: State | None = None
    pid: int | None = None
    started_at: float | None = None
    """Unix time the current state began (process start when ``state == "run"``)."""
    want_up: bool | None = None
    paused: bool = False
    got_term: bool = False
    normally_up: bool | None = None

    @property
    def up(self) -> bool:
        return self.supervised and self.state == "run"

    def uptime(self, now: float | None = None) -> float | None:
        if self.started_at is None:
            return None
        return max(0.0, (time.time() if now is None else now) - self.started_at)


def parse_status_bytes(data: bytes) -> tuple[State, int | None, float, bool, bool, bool]:
    """Decode ``supervise/status``: (state, pid, started_at, want_up, paused, got_term)."""
    if len(data) < 20:
        raise ValueError(f"supervise/status is {len(data)} bytes, expected 20")
    seconds = int.from_bytes(data[0:8], "big") - _TAI_OFFSET
    nanos = int.from_bytes(data[8:12], "big")
    pid = int.from_bytes(data[12:16], "little")
    states: dict[int, State] = {0: "down", 1: "run", 2: "finish"}
    state = states.get(data[19])
    if state is None:
        raise ValueError(f"supervise/status has unknown state byte {data[19]}")
    return (
        state,
        pid or None,
        seconds + nanos / 1e9,
        data[17] == ord("u"),
        data[16] != 0,
        data[18] != 0,
    )


_SV_LINE = re.compile(
    r"^(?P<state>run|down|finish): (?P<path>[^:]+): (?:\(pid (?P<pid>\d+)\) )?(?P<secs>\d+)s"
    r"(?P<rest>.*)$"
)


@dataclass(frozen=True)
class SvStatusLine:
    state: State
    pid: int | None
    uptime_s: int
    normally_up: bool
    want: str | None


def parse_sv_status(text: str) -> SvStatusLine | None:
    """Parse the main service's part of one ``sv status`` line; None when ``sv`` reports
    no supervision (``fail:``/``warning:``)."""
    line = text.strip().split("; ", 1)[0]
    match = _SV_LINE.match(line)
    if not match:
        return None
    rest = match["rest"]
    want = None
    if "want up" in rest:
        want = "up"
    elif "want down" in rest:
        want = "down"
    state: State = match["state"]  # type: ignore[assignment]
    normally_up = ("normally down" not in rest) if state == "run" else ("normally up" in rest)
    return SvStatusLine(
        state=state,
        pid=int(match["pid"]) if match["pid"] else None,
        uptime_s=int(match["secs"]),
        normally_up=normally_up,
        want=want,
    )


def is_supervised(service: Path) -> bool:
    """True when a ``runsv`` is reading this service's ``supervise/ok`` (what ``sv`` checks)."""
    try:
        fd = os.open(service / "supervise" / "ok", os.O_WRONLY | os.O_NONBLOCK)
    except OSError as exc:
        if exc.errno in (errno.ENXIO, errno.ENOENT, errno.ENOTDIR):
            return False
        raise
    os.close(fd)
    return True


def status(service: Path) -> ServiceStatus:
    """The service's state as ``runsv`` last recorded it."""
    if not is_supervised(service):
        return ServiceStatus(supervised=False, normally_up=not (service / "down").exists())
    try:
        raw = (service / "supervise" / "status").read_bytes()
        state, pid, started_at, want_up, paused, got_term = parse_status_bytes(raw)
    except (OSError, ValueError):
        # runsv is starting and has not written its first status yet.
        return ServiceStatus(supervised=True, normally_up=not (service / "down").exists())
    return ServiceStatus(
        supervised=True,
        state=state,
        pid=pid if state != "down" else None,
        started_at=started_at,
        want_up=want_up,
        paused=paused,
        got_term=got_term,
        normally_up=not (service / "down").exists(),
    )


def wait_until(condition: Callable[[], bool], timeout_s: float, poll_s: float = 0.05) -> bool:
    """Poll ``condition`` until it holds (True) or ``timeout_s`` passes (False): runsv
    and runsvdir announce nothing, their state can only be looked at again."""
    polling = tenacity.Retrying(
        retry=tenacity.retry_if_result(lambda held: not held),
        stop=tenacity.stop_after_delay(timeout_s),
        wait=tenacity.wait_fixed(poll_s),
        retry_error_callback=lambda _: False,
    )
    return bool(polling(condition))


def wait_supervised(service: Path, timeout_s: float) -> bool:
    """Wait for ``runsvdir`` to pick a newly linked service up (it scans every 5 s)."""
    return wait_until(
        lambda: is_supervised(service) and (service / "supervise" / "status").exists(), timeout_s
    )


def wait_down(service: Path, timeout_s: float) -> bool:
    """Wait until runsv reports the service down and not wanted up (after ``down``)."""

    def down_for_good() -> bool:
        current = status(service)
        return not current.supervised or (current.state == "down" and current.want_up is False)

    return wait_until(down_for_good, timeout_s)


def wait_unsupervised(service: Path, timeout_s: float) -> bool:
    """Wait for the service's ``runsv`` to exit (after ``exit_supervisor``)."""
    return wait_until(lambda: not is_supervised(service), timeout_s)


def control(service: Path, commands: str) -> None:
    """Write command characters to ``supervise/control``, runsv's documented interface
    (runsv(8)). ``sv`` does the same but, for ``restart``, then waits about 0.4 s
    before returning, which every deploy would pay."""
    try:
        fd = os.open(service / "supervise" / "control", os.O_WRONLY | os.O_NONBLOCK)
    except OSError as exc:
        if exc.errno in (errno.ENXIO, errno.ENOENT, errno.ENOTDIR):
            raise RunitError(f"{service}: runsv is not running for this service") from exc
        raise RunitError(f"{service}: cannot open supervise/control: {exc.strerror}") from exc
    try:
        os.write(fd, commands.encode())
    except OSError as exc:
        raise RunitError(f"{service}: cannot write to supervise/control: {exc.strerror}") from exc
    finally:
        os.close(fd)


def up(service: Path) -> None:
    control(service, "u")


def down(service: Path) -> None:
    control(service, "d")


def restart(service: Path) -> None:
    """TERM, CONT, then up: what ``sv restart`` sends."""
    control(service, "tcu")


def exit_supervisor(service: Path) -> None:
    """Ask runsv to stop the service (and its log) and exit."""
    control(service, "x")


def sv(command: str, service: Path, timeout_s: float = SV_TIMEOUT_S) -> str:
    """Run ``sv <command> <service>``; a non-zero exit means runsv was not there."""
    try:
        done = subprocess.run(
            ["sv", command, str(service)],
            capture_output=True,
            text=True,
            timeout=timeout_s,
            check=False,
        )
    except FileNotFoundError as exc:
        raise RunitError("sv not found in PATH: install runit") from exc
    except subprocess.TimeoutExpired as exc:
        raise RunitError(f"sv {command} {service}: no answer in {timeout_s:.0f}s") from exc
    output = (done.stdout + done.stderr).strip()
    if done.returncode != 0:
        raise RunitError(output.splitlines()[0] if output else f"sv {command} {service} failed")
    return output


def sv_status(service: Path) -> SvStatusLine | None:
    try:
        return parse_sv_status(sv("status", service))
    except RunitError:
        return None


# -- service directories ---------------------------------------------------------------------


def link(service_dir: Path, runit_dir: Path, name: str) -> bool:
    """Put a staged service under runsvdir's eye; True when the link changed."""
    runit_dir.mkdir(parents=True, exist_ok=True)
    return fs.symlink_atomic(service_dir, runit_dir / name)


def unlink(runit_dir: Path, name: str, target: Path | None = None) -> bool:
    """Remove the service's link from runsvdir's directory (only if it points at
    ``target``, when given); True when it was there."""
    path = runit_dir / name
    if not path.is_symlink() or (target is not None and linked_target(runit_dir, name) != target):
        return False
    with contextlib.suppress(FileNotFoundError):
        path.unlink()
        return True
    return False


def linked_target(runit_dir: Path, name: str) -> Path | None:
    try:
        return Path(os.readlink(runit_dir / name))
    except OSError:
        return None


def set_down_file(service_dir: Path, present: bool) -> bool:
    """The ``down`` file keeps runsv from starting the service on its own (at pick-up or
    at boot); True when it changed."""
    path = service_dir / "down"
    if present:
        if path.exists():
            return False
        fs.write_atomic(path, b"")
        return True
    try:
        path.unlink()
        return True
    except FileNotFoundError:
        return False


def remove_service_dir(service_dir: Path) -> None:
    """Rename the directory to a temp name, then delete it: a crash mid-way leaves a
    leftover that start-up cleans, never a half directory under the service's name."""
    doomed = fs.temp_name(service_dir)
    try:
        os.rename(service_dir, doomed)
    except FileNotFoundError:
        return
    shutil.rmtree(doomed, ignore_errors=True)
