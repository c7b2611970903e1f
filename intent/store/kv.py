"""The storage contract every backend honours, in the project's own terms.

A backend is a versioned key/value map with compare-and-set, a blocking watch
and counted leases. Nothing here is Consul's vocabulary: no sessions, no
ModifyIndex, no ``acquire``. Each backend translates these few operations into
its own mechanism, and one contract test suite holds them to the same meaning.
"""

from __future__ import annotations

import abc
import builtins
from collections.abc import Sequence
from dataclasses import dataclass
from types import TracebackType
from typing import Self

WatchToken = tuple[int, ...]
"""Opaque progress marker for ``wait``: pass back what the last call returned."""


@dataclass(frozen=True)
class Entry:
    key: str
    value: bytes
    version: int
    """Changes on every write that changes this key's value (a backend may keep it when
    the same bytes are written again); the value ``put(expect=...)`` compares against."""


WokenEntries = dict[str, "list[Entry]"]
"""Entries by watched prefix, as ``wait_entries`` saw them when the prefix's mark moved."""

MUST_NOT_EXIST = 0
"""Pass as ``expect`` to ``put`` to create a key only if it is absent."""


class ClosedByWith:
    """What a ``with`` block closes at its end: ``close`` releases connections."""

    def close(self) -> None:
        """Release connections; the store must not be used afterwards."""

    def __enter__(self) -> Self:
        return self

    def __exit__(
        self,
        kind: type[BaseException] | None,
        exc: BaseException | None,
        traceback: TracebackType | None,
    ) -> None:
        self.close()


class KVStore(ClosedByWith, abc.ABC):
    """A versioned key/value store. Keys are plain strings; prefixes end with '/'.

    Operations raise ``StoreUnavailable`` when the backend cannot be reached and
    ``StoreError`` when it refuses (see ``intent.errors``). ``with`` closes it."""

    @abc.abstractmethod
    def get(self, key: str) -> Entry | None: ...

    @abc.abstractmethod
    def list(self, prefix: str) -> list[Entry]:
        """Every entry whose key starts with ``prefix``, sorted by key."""

    @abc.abstractmethod
    def put(self, key: str, value: bytes, expect: int | None = None) -> bool:
        """Write ``value``. With ``expect``, only if the key's version still equals it
        (``MUST_NOT_EXIST``: only if absent). Returns False when that check failed."""

    @abc.abstractmethod
    def delete(self, key: str, expect: int | None = None) -> bool:
        """Remove ``key`` (absent is fine). With ``expect``, only at that version."""

    @abc.abstractmethod
    def wait(self, prefixes: Sequence[str], token: WatchToken | None, timeout: float) -> WatchToken:
        """Block until something under one of ``prefixes`` changed since ``token``, or
        ``timeout`` seconds passed. ``token=None`` returns the current state at once.
        Spurious wake-ups are allowed; missed changes are not."""

    def wait_entries(
        self, prefixes: Sequence[str], token: WatchToken | None, timeout: float
    ) -> tuple[WatchToken, WokenEntries]:
        """``wait``, and the entries under prefixes whose mark moved (all of them when
        ``token`` is None) as of their new mark, for a backend whose wait learns them
        at no extra cost. A prefix left out of the mapping must be read with ``list``."""
        return self.wait(prefixes, token, timeout), {}

    @abc.abstractmethod
    def acquire_lease(self, resource: str, holder: str, limit: int, ttl_s: float) -> bool:
        """Take (or renew) ``holder``'s lease on ``resource``, of which at most ``limit``
        holders hold one at a time.

        A lease lives ``ttl_s`` seconds unless renewed by calling this again, so a
        holder that dies releases its lease on its own. Returns False when ``limit``
        others hold one."""

    @abc.abstractmethod
    def release_lease(self, resource: str, holder: str) -> None: ...

    @abc.abstractmethod
    def lease_holders(self, resource: str) -> builtins.list[str]: ...
