"""A throwaway ``consul agent -dev`` for tests: loopback only, free ports, killed by pid."""

from __future__ import annotations

import os
import shutil
import socket
import subprocess
import time
import urllib.error
import urllib.request
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
START_TIMEOUT_S = 30.0


def find_consul() -> str | None:
    """``$CONSUL_BIN``, else ``consul`` on PATH, else what scripts/install-consul fetched."""
    if configured := os.environ.get("CONSUL_BIN"):
        return configured if os.access(configured, os.X_OK) else None
    if found := shutil.which("consul"):
        return found
    local = REPO / ".consul" / "bin" / "consul"
    return str(local) if os.access(local, os.X_OK) else None


def free_port() -> int:
    """A loopback port free for TCP and UDP alike (serf gossips over both)."""
    while True:
        with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as tcp:
            tcp.bind(("127.0.0.1", 0))
            port = int(tcp.getsockname()[1])
            with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as udp:
                try:
                    udp.bind(("127.0.0.1", port))
                except OSError:
                    continue
        return port


class ConsulAgent:
    """One dev-mode agent: in-memory state, a single server that elects itself."""

    def __init__(self, binary: str, log_dir: Path, extra_hcl: str = "") -> None:
        self.binary = binary
        self.log_path = log_dir / "consul-agent.log"
        self.extra_hcl = extra_hcl
        self.proc: subprocess.Popen[bytes] | None = None
        self.http_port = 0

    @property
    def http_addr(self) -> str:
        return f"127.0.0.1:{self.http_port}"

    def start(self, attempts: int = 3) -> ConsulAgent:
        # Free ports can be taken between probing and binding; try a fresh set.
        for _ in range(attempts):
            if self._start_once():
                return self
        raise RuntimeError(f"consul agent did not start; see {self.log_path}: {self._log_tail()}")

    def _start_once(self) -> bool:
        self.http_port = free_port()
        serf_lan, server = free_port(), free_port()
        hcl = (
            f"ports {{ http = {self.http_port}, https = -1, dns = -1, grpc = -1, "
            f"serf_lan = {serf_lan}, serf_wan = -1, server = {server} }}\n"
            "disable_update_check = true\n"
            "disable_anonymous_signature = true\n" + self.extra_hcl
        )
        with open(self.log_path, "ab") as log:
            self.proc = subprocess.Popen(
                [
                    self.binary,
                    "agent",
                    "-dev",
                    "-bind=127.0.0.1",
                    "-client=127.0.0.1",
                    "-log-level=warn",
                    f"-hcl={hcl}",
                ],
                stdin=subprocess.DEVNULL,
                stdout=log,
                stderr=subprocess.STDOUT,
                start_new_session=True,
            )
        deadline = time.monotonic() + START_TIMEOUT_S
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                return False
            if self._has_leader():
                return True
            time.sleep(0.1)
        self.stop()
        return False

    def _has_leader(self) -> bool:
        try:
            with urllib.request.urlopen(
                f"http://{self.http_addr}/v1/status/leader", timeout=1
            ) as resp:
                return resp.read().strip() not in (b"", b'""')
        except (OSError, urllib.error.URLError):
            return False

    def stop(self) -> None:
        proc, self.proc = self.proc, None
        if proc is None or proc.poll() is not None:
            return
        proc.terminate()
        try:
            proc.wait(timeout=10)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait(timeout=10)

    def _log_tail(self) -> str:
        try:
            lines = self.log_path.read_text(errors="replace").strip().splitlines()
        except OSError:
            return "no log"
        return " | ".join(lines[-3:]) or "empty log"
