"""Counting the HTTP requests a ConsulStore makes, from Consul's answers, for tests and
benches that measure what a watch costs. A blocking query counts once it answers."""

from __future__ import annotations

import threading
from collections import Counter
from collections.abc import Hashable
from typing import Any
from urllib.parse import parse_qs, urlsplit

from intent.store.consul import ConsulStore


def kind_of(method: str, url: str, response: Any) -> str:
    """read, write, wake (a blocking query whose index moved) or idle (one that did not)."""
    query = parse_qs(urlsplit(url).query)
    if method != "GET":
        return "write"
    if "index" in query:
        moved = response.headers.get("X-Consul-Index") != query["index"][0]
        return "wake" if moved else "idle"
    return "read"


class RequestCounts:
    """Answered requests by (label, kind), from every store attached (thread-safe)."""

    def __init__(self) -> None:
        self.counts: Counter[tuple[Hashable, str]] = Counter()
        self._lock = threading.Lock()

    def attach(self, kv: ConsulStore, label: Hashable = None) -> None:
        pool = kv._client.http.pool
        send = pool.request

        def counted(method: str, url: str, *args: Any, **kwargs: Any) -> Any:
            response = send(method, url, *args, **kwargs)
            kind = kind_of(method, url, response)
            with self._lock:
                self.counts[(label, kind)] += 1
            return response

        pool.request = counted

    def snapshot(self) -> dict[tuple[Hashable, str], int]:
        with self._lock:
            return dict(self.counts)

    def __getitem__(self, kind: str) -> int:
        """Requests of ``kind`` over every label."""
        with self._lock:
            return sum(n for (_, k), n in self.counts.items() if k == kind)
