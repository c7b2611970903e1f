"""A private runsvdir on a temp directory, for tests that need real supervision.

Tests skip when runit is not installed, and fail instead when PP_REQUIRE_RUNIT=1
(CI sets it). Teardown stops only what this fixture started: HUP to our
runsvdir (it TERMs each runsv, which stops its service), then SIGKILL to any
service process still recorded in our own supervise/ directories.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import signal
import socket
import subprocess
import tempfile
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest

from agents.system import runit

RUNIT_BINARIES = ("runsvdir", "runsv", "sv", "chpst", "svlogd")


def require_runit() -> None:
    missing = [b for b in RUNIT_BINARIES if shutil.which(b) is None]
    if missing:
        reason = f"runit not installed (missing {', '.join(missing)}): apt-get install runit"
        if os.environ.get("PP_REQUIRE_RUNIT") == "1":
            pytest.fail(reason)
        pytest.skip(reason)


def require_root() -> None:
    if os.geteuid() != 0:
        reason = "needs root: services run as another user through chpst -u"
        if os.environ.get("PP_REQUIRE_RUNIT") == "1":
            pytest.fail(reason)
        pytest.skip(reason)


def kill_our_guards(root: Path) -> None:
    """Guards are detached: find the ones started for this test by their arguments."""
    for proc in Path("/proc").iterdir():
        if not proc.name.isdigit():
            continue
        try:
            cmdline = (proc / "cmdline").read_bytes().replace(b"\0", b" ").decode()
        except OSError:
            continue
        if "agents.setlive.guard" in cmdline and str(root) in cmdline:
            with contextlib.suppress(ProcessLookupError):
                os.kill(int(proc.name), signal.SIGKILL)


@dataclass
class Runsvdir:
    root: Path
    """World-traversable temp root, so services running as nobody can reach their files."""
    service_dir: Path
    process: subprocess.Popen[bytes]

    def stage_dirs(self) -> list[Path]:
        return [p.parent.parent for p in self.root.rglob("supervise/status")]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def start_runsvdir() -> Runsvdir:
    require_runit()
    root = Path(tempfile.mkdtemp(prefix="pp-runit-", dir="/tmp"))
    root.chmod(0o755)
    service_dir = root / "service"
    service_dir.mkdir()
    process = subprocess.Popen(
        ["runsvdir", "-P", str(service_dir)],
        stdin=subprocess.DEVNULL,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
        start_new_session=True,
    )
    return Runsvdir(root, service_dir, process)


def stop_runsvdir(handle: Runsvdir) -> None:
    if handle.process.poll() is None:
        handle.process.send_signal(signal.SIGHUP)
        try:
            handle.process.wait(10)
        except subprocess.TimeoutExpired:
            handle.process.kill()
            handle.process.wait(5)
    stages = handle.stage_dirs()
    deadline = time.monotonic() + 10
    while any(runit.is_supervised(s) for s in stages) and time.monotonic() < deadline:
        time.sleep(0.05)
    for stage in stages:
        for status_file in (stage / "supervise" / "status", stage / "log" / "supervise" / "status"):
            try:
                state, pid, *_ = runit.parse_status_bytes(status_file.read_bytes())
            except (OSError, ValueError):
                continue
            if pid and state != "down" and _runs_under(pid, handle.root):
                with contextlib.suppress(ProcessLookupError):
                    os.kill(pid, signal.SIGKILL)
    shutil.rmtree(handle.root, ignore_errors=True)


def _runs_under(pid: int, root: Path) -> bool:
    """Only a process working inside our temp root is one of ours (pids get reused)."""
    try:
        return os.readlink(f"/proc/{pid}/cwd").startswith(str(root))
    except OSError:
        return False


@pytest.fixture(scope="module")
def runsvdir() -> Iterator[Runsvdir]:
    handle = start_runsvdir()
    try:
        yield handle
    finally:
        stop_runsvdir(handle)


def wait_for(predicate: object, timeout: float = 10.0, interval: float = 0.05) -> bool:
    assert callable(predicate)
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if predicate():
            return True
        time.sleep(interval)
    return bool(predicate())
