"""A throwaway ``consul agent -dev`` for tests: loopback only, free ports, killed by pid."""

from __future__ import annotations

import os
import random
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

    def __init__(
        self, binary: str, log_dir: Path, extra_hcl: str = "", tls_hcl: str | None = None
    ) -> None:
        self.binary = binary
        self.log_path = log_dir / "consul-agent.log"
        self.extra_hcl = extra_hcl
        self.tls_hcl = tls_hcl
        """With it (the certificate settings), the agent also serves HTTPS."""
        self.proc: subprocess.Popen[bytes] | None = None
        self.http_port = 0
        self.https_port = -1

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
        self.https_port = -1 if self.tls_hcl is None else free_port()
        serf_lan, server = free_port(), free_port()
        hcl = (
            f"ports {{ http = {self.http_port}, https = {self.https_port}, dns = -1, grpc = -1, "
            f"serf_lan = {serf_lan}, serf_wan = -1, server = {server} }}\n"
            "disable_update_check = true\n"
            "disable_anonymous_signature = true\n" + self.extra_hcl + (self.tls_hcl or "")
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


def stable_port() -> int:
    """A loopback port free for TCP and UDP, below the kernel's ephemeral range: a node
    restarted on it later must not find it taken by some outgoing connection."""
    low = int(Path("/proc/sys/net/ipv4/ip_local_port_range").read_text().split()[0])
    while True:
        port = random.randrange(10000, max(10001, low))
        with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as tcp:
            try:
                tcp.bind(("127.0.0.1", port))
            except OSError:
                continue
            with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as udp:
                try:
                    udp.bind(("127.0.0.1", port))
                except OSError:
                    continue
        return port


class ConsulNode:
    """One persistent agent, server or client, on loopback. Its ports, name and data
    directory survive ``stop`` and ``start``, as a real node's do across a restart, so a
    server comes back with its raft log and KV intact."""

    def __init__(
        self,
        binary: str,
        root: Path,
        name: str,
        *,
        server: bool,
        bootstrap_expect: int = 1,
        join: tuple[str, ...] = (),
    ) -> None:
        self.binary = binary
        self.name = name
        self.server = server
        self.bootstrap_expect = bootstrap_expect
        self.join = join
        self.data_dir = root / name
        self.log_path = root / f"{name}.log"
        ports: set[int] = set()
        while len(ports) < 3:
            ports.add(stable_port())
        self.http_port, self.serf_port, self.server_port = sorted(ports)
        self.proc: subprocess.Popen[bytes] | None = None

    @property
    def http_addr(self) -> str:
        return f"127.0.0.1:{self.http_port}"

    @property
    def serf_addr(self) -> str:
        return f"127.0.0.1:{self.serf_port}"

    @property
    def server_addr(self) -> str:
        return f"127.0.0.1:{self.server_port}"

    @property
    def running(self) -> bool:
        return self.proc is not None and self.proc.poll() is None

    def start(self) -> ConsulNode:
        self.data_dir.mkdir(parents=True, exist_ok=True)
        hcl = (
            f"ports {{ http = {self.http_port}, https = -1, dns = -1, grpc = -1, "
            f"serf_lan = {self.serf_port}, serf_wan = -1, server = {self.server_port} }}\n"
            # Production's recommended timing (the default 5 is for slow disks): an
            # election takes a couple of seconds, not ten.
            "performance { raft_multiplier = 1 }\n"
            "disable_update_check = true\n"
            "disable_anonymous_signature = true\n"
        )
        args = [
            self.binary, "agent", f"-node={self.name}", f"-data-dir={self.data_dir}",
            "-bind=127.0.0.1", "-client=127.0.0.1", "-log-level=warn", f"-hcl={hcl}",
        ]  # fmt: skip
        if self.server:
            args += ["-server", f"-bootstrap-expect={self.bootstrap_expect}"]
        args += [f"-retry-join={addr}" for addr in self.join]
        with open(self.log_path, "ab") as log:
            self.proc = subprocess.Popen(
                args,
                stdin=subprocess.DEVNULL,
                stdout=log,
                stderr=subprocess.STDOUT,
                start_new_session=True,
            )
        return self

    def leader(self) -> str:
        """The leader's server address as this agent sees it ('' while there is none)."""
        try:
            with urllib.request.urlopen(
                f"http://{self.http_addr}/v1/status/leader", timeout=2
            ) as resp:
                return str(resp.read().decode().strip().strip('"'))
        except (OSError, urllib.error.URLError):
            return ""

    def wait_for_leader(self, timeout_s: float = START_TIMEOUT_S) -> str:
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            if self.proc is not None and self.proc.poll() is not None:
                raise RuntimeError(f"consul {self.name} exited; see {self.log_path}")
            if leader := self.leader():
                return leader
            time.sleep(0.1)
        raise RuntimeError(f"consul {self.name} saw no leader in {timeout_s:g}s")

    def stop(self, kill: bool = False) -> None:
        """TERM (a server then stops without leaving the cluster, as on a crash or a
        reboot), or KILL."""
        proc, self.proc = self.proc, None
        if proc is None or proc.poll() is not None:
            return
        if kill:
            proc.kill()
        else:
            proc.terminate()
        try:
            proc.wait(timeout=10)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait(timeout=10)


class ConsulCluster:
    """Three servers and one client agent on loopback. Agents talk to the client
    agent, as on a production host: it forwards to whichever server leads, so losing
    one server costs an election, not the connection."""

    def __init__(self, binary: str, root: Path, servers: int = 3) -> None:
        self.binary = binary
        self.root = root
        self.count = servers
        self.servers: list[ConsulNode] = []
        self.client = self._make()

    def _make(self) -> ConsulNode:
        self.servers = [
            ConsulNode(
                self.binary, self.root, f"server{n}", server=True, bootstrap_expect=self.count
            )
            for n in range(1, self.count + 1)
        ]
        serf = tuple(s.serf_addr for s in self.servers)
        for server in self.servers:
            server.join = tuple(a for a in serf if a != server.serf_addr)
        return ConsulNode(self.binary, self.root, "client", server=False, join=serf)

    def start(self, attempts: int = 3) -> ConsulCluster:
        # A free port can be taken before consul binds it, and a server that could not
        # bind leaves the others short of their quorum: start afresh on new ports.
        for attempt in range(attempts):
            if attempt:
                self.stop()
                shutil.rmtree(self.root, ignore_errors=True)
                self.client = self._make()
            for node in [*self.servers, self.client]:
                node.start()
            deadline = time.monotonic() + START_TIMEOUT_S
            while time.monotonic() < deadline and all(n.running for n in self.servers):
                if self.client.leader():
                    return self
                time.sleep(0.1)
        self.stop()
        raise RuntimeError(f"no consul cluster with a leader; see the logs in {self.root}")

    def leader(self) -> ConsulNode:
        address = self.client.wait_for_leader()
        (found,) = [s for s in self.servers if s.server_addr == address]
        return found

    def stop(self) -> None:
        for node in [self.client, *self.servers]:
            node.stop()
