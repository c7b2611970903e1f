"""A loopback HTTP server that stalls, for the preparer's deadline and stop tests.

On ``/drip/...`` it sends its headers (a body of a megabyte), then one byte every
``interval_s``: never silent long enough for a read timeout, never done. On any
other path it reads the request and says nothing at all.
"""

from __future__ import annotations

import contextlib
import socketserver
import threading
from collections.abc import Iterator
from dataclasses import dataclass, field


@dataclass
class StallingServer:
    interval_s: float
    port: int = 0
    paths: list[str] = field(default_factory=list)
    """The path of every request, in order of arrival."""
    release: threading.Event = field(default_factory=threading.Event)

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"


def _handler(server: StallingServer) -> type[socketserver.BaseRequestHandler]:
    class Handler(socketserver.BaseRequestHandler):
        def handle(self) -> None:
            request = b""
            while b"\r\n\r\n" not in request:
                chunk = self.request.recv(4096)
                if not chunk:
                    return
                request += chunk
            path = request.split(b" ", 2)[1].decode()
            server.paths.append(path)
            if not path.startswith("/drip/"):
                server.release.wait()
                return
            self.request.sendall(b"HTTP/1.1 200 OK\r\nContent-Length: 1048576\r\n\r\n")
            while not server.release.wait(server.interval_s):
                try:
                    self.request.sendall(b"x")
                except OSError:  # the client hung up
                    return

    return Handler


@contextlib.contextmanager
def stalling_server(interval_s: float = 2.0) -> Iterator[StallingServer]:
    state = StallingServer(interval_s)
    tcp = socketserver.ThreadingTCPServer(("127.0.0.1", 0), _handler(state))
    tcp.daemon_threads = True
    state.port = tcp.server_address[1]
    thread = threading.Thread(target=tcp.serve_forever, args=(0.05,), daemon=True)
    thread.start()
    try:
        yield state
    finally:
        state.release.set()
        tcp.shutdown()
        tcp.server_close()
        thread.join()
