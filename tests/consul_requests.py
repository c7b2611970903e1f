"""Counting the HTTP requests a ConsulStore makes, from Consul's answers, for tests and
benches that measure what a watch costs. A blocking query counts once it answers."""

from __future__ import annotations

import threading
from collections import Counter
from collections.abc import Hashable
from typing import Any
from urllib.parse import parse_qs, urlsplit

from intent.store.consul import ConsulStore


def kind_of(response: Any) -> str:
    """read, write, wake (a blocking query whose index moved) or idle (one that did not)."""
    request = response.request
    query = parse_qs(urlsplit(request.url).query)
    if request.method != "GET":
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
        def on_response(response: Any, *args: Any, **kwargs: Any) -> None:
            kind = kind_of(response)
            with self._lock:
                self.counts[(label, kind)] += 1

        kv._client.http.session.hooks["response"].append(on_response)

    def snapshot(self) -> dict[tuple[Hashable, str], int]:
        with self._lock:
            return dict(self.counts)

    def __getitem__(self, kind: str) -> int:
        """Requests of ``kind`` over every label."""
        with self._lock:
            return sum(n for (_, k), n in self.counts.items() if k == kind)
