"""A private systemd, as PID 1 of namespaces of its own, for tests of ``--init systemd``.

It boots ``tests/private-systemd.sh`` (private tmpfs over /tmp, /var/tmp, /run,
/etc/systemd/system, /var/lib/systemd and the journal; every unit that touches the
machine masked; a refusal to boot when /tmp is not private) under ``unshare --fork
--pid --mount --mount-proc --uts --net --propagation private``. It is driven with
``nsenter -t PID -m -p -n`` and stopped by SIGKILL to that PID: its whole PID namespace
goes with it. Never boot systemd any other way here: on the machine's own filesystem
its tmpfiles would empty the real /tmp.

Its /tmp is its own, so the test's files live under a directory in /var/lib, made and
removed by the test. Tests skip when systemd is missing, and fail instead under
PP_REQUIRE_SYSTEMD=1.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import signal
import subprocess
import tempfile
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest

SCRIPT = Path(__file__).resolve().parent / "private-systemd.sh"
SYSTEMD = Path("/lib/systemd/systemd")
BOOT_TIMEOUT_S = 60
BOOT = [
    "unshare", "--fork", "--pid", "--mount", "--mount-proc", "--uts", "--net",
    "--propagation", "private", str(SCRIPT),
]  # fmt: skip


def require_systemd() -> None:
    missing = [
        what
        for what, ok in (
            ("root", os.geteuid() == 0),
            (str(SYSTEMD), SYSTEMD.exists()),
            ("unshare", shutil.which("unshare") is not None),
            ("nsenter", shutil.which("nsenter") is not None),
            ("runsvdir", shutil.which("runsvdir") is not None),
        )
        if not ok
    ]
    if missing:
        reason = f"a private systemd needs {', '.join(missing)}"
        if os.environ.get("PP_REQUIRE_SYSTEMD") == "1":
            pytest.fail(f"{reason}, but PP_REQUIRE_SYSTEMD=1", pytrace=False)
        pytest.skip(reason)


@dataclass
class PrivateSystemd:
    process: subprocess.Popen[bytes]
    pid: int
    """systemd's PID as the machine sees it (PID 1 inside)."""
    log: Path

    def run(
        self, *command: str, env: dict[str, str] | None = None, timeout: float = 120
    ) -> subprocess.CompletedProcess[str]:
        prefix = ["nsenter", "-t", str(self.pid), "-m", "-p", "-n"]
        if env is not None:
            prefix += ["env", "-i", *(f"{k}={v}" for k, v in env.items())]
        return subprocess.run(
            [*prefix, *command], capture_output=True, text=True, timeout=timeout, check=False
        )

    def systemctl(self, *args: str) -> subprocess.CompletedProcess[str]:
        return self.run("systemctl", *args)

    def active(self, unit: str) -> bool:
        return self.systemctl("is-active", unit).stdout.strip() == "active"

    def main_pid(self, unit: str) -> int | None:
        shown = self.systemctl("show", "-p", "MainPID", "--value", unit).stdout.strip()
        return int(shown) if shown.isdigit() and shown != "0" else None

    def environ(self, pid: int) -> dict[str, str]:
        raw = self.run("cat", f"/proc/{pid}/environ").stdout
        return dict(item.split("=", 1) for item in raw.split("\0") if "=" in item)

    def journal(self, unit: str) -> str:
        return self.run("journalctl", "-u", unit, "--no-pager", "-n", "40").stdout


def _child_of(pid: int) -> int | None:
    try:
        children = Path(f"/proc/{pid}/task/{pid}/children").read_text().split()
    except OSError:
        return None
    return int(children[0]) if children else None


@contextlib.contextmanager
def private_systemd(log: Path) -> Iterator[PrivateSystemd]:
    require_systemd()
    with log.open("wb") as out:
        process = subprocess.Popen(
            BOOT,
            stdin=subprocess.DEVNULL,
            stdout=out,
            stderr=out,
            start_new_session=True,
        )
    pid = None
    try:
        deadline = time.monotonic() + BOOT_TIMEOUT_S
        while pid is None and time.monotonic() < deadline and process.poll() is None:
            pid = _child_of(process.pid)
            time.sleep(0.05)
        assert pid is not None, f"private systemd did not start: {log.read_text()[-2000:]}"
        handle = PrivateSystemd(process, pid, log)
        while time.monotonic() < deadline:
            state = handle.systemctl("is-system-running").stdout.strip()
            if state in ("running", "degraded"):
                break
            time.sleep(0.2)
        else:
            pytest.fail(f"private systemd did not finish booting: {log.read_text()[-2000:]}")
        handle.run("ip", "link", "set", "lo", "up")  # its own network namespace
        yield handle
    finally:
        if pid is not None:
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGKILL)
        with contextlib.suppress(subprocess.TimeoutExpired):
            process.wait(15)


@contextlib.contextmanager
def var_lib_root() -> Iterator[Path]:
    """A test directory the private systemd sees too (its /tmp is its own)."""
    root = Path(tempfile.mkdtemp(prefix="pp-systemd-test-", dir="/var/lib"))
    root.chmod(0o755)
    try:
        yield root
    finally:
        shutil.rmtree(root, ignore_errors=True)
