"""Intent stores: one interface, an embedded default and Consul, chosen by URL.

``sqlite:///abs/path.db`` is the embedded store (the default);
``consul://host:port`` (or ``consul+https://host:port``) is Consul, and a bare
``consul://`` takes the address from ``CONSUL_HTTP_ADDR``.
"""

from __future__ import annotations

import os
from pathlib import Path
from urllib.parse import urlsplit

from intent import keys
from intent.errors import StoreError, StoreUnavailable
from intent.store.intent_store import AppIntent, IntentStore, Versioned
from intent.store.kv import MUST_NOT_EXIST, Entry, KVStore, WatchToken

__all__ = [
    "MUST_NOT_EXIST",
    "AppIntent",
    "Entry",
    "IntentStore",
    "KVStore",
    "StoreError",
    "StoreUnavailable",
    "Versioned",
    "WatchToken",
    "default_store_url",
    "open_kv",
    "open_store",
]

SYSTEM_STORE_PATH = "/var/lib/platypus/intent.db"


def default_store_url() -> str:
    """``$PP_STORE``, else the system database for root, else one in the user's data dir.

    Root (the agents as services) and a developer on a laptop both get a working
    store with no configuration; set ``PP_STORE`` to make them share one.
    """
    if url := os.environ.get("PP_STORE"):
        return url
    if os.geteuid() == 0:
        return f"sqlite://{SYSTEM_STORE_PATH}"
    data_home = os.environ.get("XDG_DATA_HOME") or str(Path.home() / ".local" / "share")
    return f"sqlite://{data_home}/platypus/intent.db"


def open_kv(url: str, create: bool = True) -> KVStore:
    parts = urlsplit(url)
    if parts.scheme == "sqlite":
        if parts.netloc or not parts.path.startswith("/"):
            raise StoreError(f"store URL {url!r}: use sqlite:///absolute/path.db (three slashes)")
        from intent.store.sqlite import SqliteStore

        return SqliteStore(parts.path, create=create)
    if parts.scheme in ("consul", "consul+http", "consul+https"):
        from intent.store.consul import ConsulStore

        return ConsulStore.from_url(url)
    raise StoreError(f"store URL {url!r}: scheme must be sqlite:// or consul://")


def open_store(
    url: str | None = None, prefix: str = keys.DEFAULT_PREFIX, create: bool = True
) -> IntentStore:
    """The intent store at ``url``; ``create=False`` refuses to start an empty embedded
    store (what agents do: see ``SqliteStore``)."""
    return IntentStore(open_kv(url or default_store_url(), create), prefix)
