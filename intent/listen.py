"""Where a server of ours listens: ``[ADDR:]PORT``, loopback unless told otherwise.

Shared by ``pp web`` and the agents' ``--metrics-listen``: both show the fleet to
whoever can connect, so a bare port binds 127.0.0.1 and a wider address must be
written out.
"""

from __future__ import annotations

LOOPBACK = "127.0.0.1"


def parse_listen(listen: str) -> tuple[str, int]:
    """``(host, port)`` of ``PORT``, ``ADDR:PORT`` or ``[V6]:PORT``; ValueError naming
    what is wrong."""
    host, sep, port = listen.rpartition(":")
    if not sep:
        host, port = LOOPBACK, listen
    host = host.removeprefix("[").removesuffix("]")
    if not port.isdigit() or not 0 < int(port) < 65536:
        raise ValueError(f"{listen!r}: give PORT or ADDR:PORT with a port from 1 to 65535")
    if not host:
        raise ValueError(f"{listen!r}: give an address before ':' (e.g. {LOOPBACK}:{port})")
    return host, int(port)
