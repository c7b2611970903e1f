"""What a node's watch covers, and what it saw.

A node's agents act on a few prefixes only: the node's assignments (with the retry
and drain requests below them), the intent of each cluster it runs, and for some
agents another agent's reports on the node. (The store's identity is read afresh
on every pass: see ``IntentStore.identity``.) Watching those
and nothing else is what keeps a fleet quiet: a change to an app wakes only the
nodes that run it.

A watch whose backend hands over the values with the wake-up (Consul's blocking
queries do) also lets the woken agent read nothing more: ``Seen`` keeps those values
so the node's next pass is served from them. They are exactly as fresh as the watch,
which sees every later change, so they are kept only while the watch runs (cleared
when it fails) and only for the prefixes it covers now. Each prefix's values are of
the moment its own query answered, so a pass may combine prefixes seen moments apart,
as sequential reads did: a half-seen change reads as invalid or vanished intent,
which holds.
"""

from __future__ import annotations

import threading
from collections.abc import Sequence
from dataclasses import dataclass

from intent.store.kv import Entry, WatchToken, WokenEntries


@dataclass(frozen=True)
class NodeWatch:
    """How far a node's watch has seen: the prefixes it covers and a mark for each.
    Two differ when anything the node depends on changed, the set itself included."""

    prefixes: tuple[str, ...]
    marks: WatchToken


class Seen:
    """Entries under watched prefixes as the watch last saw them (thread-safe)."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._entries: dict[str, list[Entry]] = {}

    def update(self, covered: Sequence[str], woken: WokenEntries) -> None:
        """Record what a wait saw; prefixes the watch no longer covers are dropped."""
        with self._lock:
            kept = {p: e for p, e in self._entries.items() if p in covered}
            kept.update((p, e) for p, e in woken.items() if p in covered)
            self._entries = kept

    def get(self, prefix: str) -> list[Entry] | None:
        with self._lock:
            return self._entries.get(prefix)

    def clear(self) -> None:
        with self._lock:
            self._entries = {}
