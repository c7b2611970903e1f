"""Helpers shared by the pp-preparer tests: tarballs, intent, loopback servers."""

from __future__ import annotations

import contextlib
import hashlib
import http.server
import io
import os
import socket
import subprocess
import tarfile
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from intent import keys
from intent.store import IntentStore

ROOT = Path(__file__).resolve().parent.parent
VENV_BIN = ROOT / ".venv" / "bin"


def sha256_of(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def member(name: str, data: bytes = b"", **attrs: Any) -> tuple[tarfile.TarInfo, bytes]:
    info = tarfile.TarInfo(name)
    info.size = len(data)
    info.mode = attrs.pop("mode", 0o644)
    for key, value in attrs.items():
        setattr(info, key, value)
    return info, data


def write_tar(path: Path, members: list[tuple[tarfile.TarInfo, bytes]], mode: str = "w:gz") -> str:
    with tarfile.open(path, mode) as tar:  # type: ignore[call-overload]
        for info, data in members:
            tar.addfile(info, io.BytesIO(data) if info.isreg() else None)
    return sha256_of(path)


def tree_tarball(path: Path, files: dict[str, bytes]) -> str:
    """A plain, well-formed artifact holding ``files``."""
    return write_tar(path, [member(name, data) for name, data in sorted(files.items())])


def put_app(
    store: IntentStore,
    node: str,
    app: str,
    basedir: Path,
    versions: dict[str, dict[str, Any]],
    cluster: str = "prod",
    **deploy: Any,
) -> None:
    store.put_json(keys.node_app(node, app), {"cluster": cluster})
    store.put_json(keys.config(app, cluster), {"versions": versions})
    store.put_json(
        keys.deploy_config(app, cluster),
        {"basedir": str(basedir), "run_as": deploy.pop("run_as", "nobody"), **deploy},
    )


def snapshot(root: Path, skip: Path | None = None) -> dict[str, tuple[int, int, str]]:
    """Every path under ``root`` with its type, size and link target (not following links)."""
    seen = {}
    for dirpath, dirnames, filenames in os.walk(root):
        for name in dirnames + filenames:
            path = Path(dirpath) / name
            if skip is not None and (path == skip or skip in path.parents):
                continue
            st = path.lstat()
            target = os.readlink(path) if path.is_symlink() else ""
            seen[str(path.relative_to(root))] = (st.st_mode, st.st_size, target)
    return seen


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


# -- a loopback HTTP server whose behaviour each test scripts ---------------------------


@dataclass
class Behaviour:
    """What the server does for one path: the default serves files from ``root``."""

    stall_s: float = 0.0
    stall_times: int = 0
    """Stall before the body on this many requests (0: never)."""
    status: int | None = None
    drop_after: int | None = None
    drop_times: int = 0
    ranges: bool = True
    pause_after: int | None = None
    """Send this many bytes of the body, then wait for ``release`` before the rest."""


@dataclass
class ArtifactServer:
    root: Path
    port: int = 0
    requests: list[tuple[str, str, str | None]] = field(default_factory=list)
    behaviours: dict[str, Behaviour] = field(default_factory=dict)
    release: threading.Event = field(default_factory=threading.Event)

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def count(self, path: str) -> int:
        return sum(1 for _, p, _ in self.requests if p == path)


def _handler(server: ArtifactServer) -> type[http.server.BaseHTTPRequestHandler]:
    class Handler(http.server.BaseHTTPRequestHandler):
        protocol_version = "HTTP/1.1"

        def log_message(self, format: str, *args: Any) -> None:
            pass

        def do_GET(self) -> None:
            path = self.path.split("?", 1)[0]
            server.requests.append(("GET", path, self.headers.get("Range")))
            behaviour = server.behaviours.get(path, Behaviour())
            if behaviour.status is not None:
                self.send_error(behaviour.status)
                return
            file = server.root / path.lstrip("/")
            if not file.is_file():
                self.send_error(404)
                return
            data = file.read_bytes()
            start = 0
            header = self.headers.get("Range")
            if header and behaviour.ranges and header.startswith("bytes="):
                start = int(header[len("bytes=") :].split("-")[0])
            if start:
                self.send_response(206)
                self.send_header("Content-Range", f"bytes {start}-{len(data) - 1}/{len(data)}")
            else:
                self.send_response(200)
            self.send_header("Content-Length", str(len(data) - start))
            self.send_header("ETag", f'"{hashlib.sha256(data).hexdigest()[:16]}"')
            if behaviour.ranges:
                self.send_header("Accept-Ranges", "bytes")
            self.end_headers()
            body = data[start:]
            if behaviour.stall_times > 0:
                behaviour.stall_times -= 1
                server.release.wait(behaviour.stall_s)
                self.close_connection = True
                return
            if behaviour.drop_after is not None and behaviour.drop_times > 0:
                behaviour.drop_times -= 1
                self.wfile.write(body[: behaviour.drop_after])
                self.wfile.flush()
                self.close_connection = True
                with contextlib.suppress(OSError):
                    self.connection.shutdown(socket.SHUT_RDWR)
                return
            if behaviour.pause_after is not None:
                self.wfile.write(body[: behaviour.pause_after])
                self.wfile.flush()
                server.release.wait(30)
                body = body[behaviour.pause_after :]
            self.wfile.write(body)

    return Handler


@contextlib.contextmanager
def artifact_server(root: Path) -> Iterator[ArtifactServer]:
    state = ArtifactServer(root)
    httpd = http.server.ThreadingHTTPServer(("127.0.0.1", 0), _handler(state))
    httpd.daemon_threads = True
    state.port = httpd.server_address[1]
    thread = threading.Thread(target=httpd.serve_forever, args=(0.05,), daemon=True)
    thread.start()
    try:
        yield state
    finally:
        state.release.set()
        httpd.shutdown()
        httpd.server_close()
        thread.join()


# -- moto in server mode ------------------------------------------------------------------


@contextlib.contextmanager
def moto_server() -> Iterator[str]:
    """``http://127.0.0.1:<port>`` of a moto server we start and stop ourselves."""
    port = free_port()
    proc = subprocess.Popen(
        [str(VENV_BIN / "moto_server"), "-H", "127.0.0.1", "-p", str(port)],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    try:
        _wait_for_port(port, proc)
        yield f"http://127.0.0.1:{port}"
    finally:
        proc.terminate()
        try:
            proc.wait(10)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()


def _wait_for_port(port: int, proc: subprocess.Popen[bytes], timeout_s: float = 30) -> None:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(f"moto_server exited with {proc.returncode}")
        with contextlib.suppress(OSError), socket.create_connection(("127.0.0.1", port), 0.2):
            return
        time.sleep(0.05)
    raise RuntimeError("moto_server did not start listening")


def wait_for(
    predicate: Callable[[], bool], timeout_s: float = 10, interval_s: float = 0.01
) -> None:
    deadline = time.monotonic() + timeout_s
    while not predicate():
        if time.monotonic() > deadline:
            raise AssertionError("condition not reached in time")
        time.sleep(interval_s)
