"""The embedded store: one SQLite file in WAL mode, no server.

Several processes on one host (the CLI and every agent) share the file; SQLite's
own locking makes each write a transaction. Every write takes the next value of
one global counter as its version, so versions never repeat, even across a
delete and re-create, which is what compare-and-set and ``wait`` rely on.
SQLite has no cross-process notification, so ``wait`` asks the kernel: it
sleeps on inotify until the database or its WAL is written (intent/store/file_watch.py),
then compares its marks again, and costs nothing while nothing is written. The
last write of a commit lands a moment before readers can see it, so a write that
did not move the marks is looked at again a few milliseconds later; and a look
every ``SAFETY_LOOK_S`` covers file systems that send no events. Without inotify it
polls every ``POLL_INTERVAL_S``.
"""

from __future__ import annotations

import builtins
import contextlib
import os
import sqlite3
import threading
import time
from collections.abc import Iterator, Sequence
from pathlib import Path

from intent.errors import StoreUnavailable
from intent.store.file_watch import FileChanges, watch_file
from intent.store.kv import Entry, KVStore, WatchToken

POLL_INTERVAL_S = 0.05
SAFETY_LOOK_S = 1.0
SETTLE_LOOK_S = 0.005
SETTLE_LOOKS = 3
_PREFIX_END = "\U0010ffff"

_SCHEMA = """
CREATE TABLE IF NOT EXISTS kv (key TEXT PRIMARY KEY, value BLOB NOT NULL, version INTEGER NOT NULL);
CREATE TABLE IF NOT EXISTS tombstones (key TEXT PRIMARY KEY, version INTEGER NOT NULL);
CREATE TABLE IF NOT EXISTS counter (id INTEGER PRIMARY KEY CHECK (id = 1), value INTEGER NOT NULL);
INSERT OR IGNORE INTO counter (id, value) VALUES (1, 0);
CREATE TABLE IF NOT EXISTS slots (  -- the leases, by the table's name in existing stores
    resource TEXT NOT NULL, holder TEXT NOT NULL, expires_at REAL NOT NULL,
    PRIMARY KEY (resource, holder)
);
"""


def _create_private(path: Path) -> None:
    """Create the database file 0600 in a directory created 0700, unless they exist.

    The store holds every app's ``user_config`` and the audit trail's copies of it, so
    no other local user (the apps' own users included) may read it. SQLite creates its
    ``-wal`` and ``-shm`` files with the database file's mode, so they follow. Existing
    files keep the mode an operator gave them (see docs/operations.md on sharing the
    store with a group)."""
    if path.exists():
        return
    for parent in reversed([path.parent, *path.parent.parents]):
        if not parent.exists():
            with contextlib.suppress(FileExistsError):
                parent.mkdir(mode=0o700)
    with contextlib.suppress(FileExistsError):
        os.close(os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC, 0o600))


class SqliteStore(KVStore):
    def __init__(self, path: str | Path, create: bool = True) -> None:
        """Open the store at ``path``; with ``create=False`` a missing file is an error.

        Agents open with ``create=False``: a mistyped path or a wiped database would
        otherwise look like a node with nothing assigned, and they would remove every
        app. Only ``pp`` creates the store, with the first intent it writes."""
        self.path = Path(path)
        if not create and not self.path.exists():
            raise StoreUnavailable(
                f"embedded store {self.path} does not exist: write intent with pp first,"
                " or fix --store/PP_STORE"
            )
        try:
            _create_private(self.path)
            self._db = sqlite3.connect(
                self.path, timeout=10.0, isolation_level=None, check_same_thread=False
            )
            self._db.execute("PRAGMA journal_mode=WAL")
            self._db.execute("PRAGMA synchronous=NORMAL")
            self._db.executescript(_SCHEMA)
        except (OSError, sqlite3.Error) as exc:
            raise StoreUnavailable(f"cannot open embedded store {self.path}: {exc}") from exc
        self._lock = threading.Lock()
        self._watches = threading.local()
        self._opened_watches: list[FileChanges] = []

    @contextlib.contextmanager
    def _read(self) -> Iterator[sqlite3.Connection]:
        with self._lock, self._errors():
            yield self._db

    @contextlib.contextmanager
    def _write(self) -> Iterator[sqlite3.Connection]:
        with self._lock, self._errors():
            self._db.execute("BEGIN IMMEDIATE")
            try:
                yield self._db
            except BaseException:
                self._db.execute("ROLLBACK")
                raise
            self._db.execute("COMMIT")

    @contextlib.contextmanager
    def _errors(self) -> Iterator[None]:
        try:
            yield
        except sqlite3.Error as exc:
            raise StoreUnavailable(f"embedded store {self.path}: {exc}") from exc

    @staticmethod
    def _next_version(db: sqlite3.Connection) -> int:
        db.execute("UPDATE counter SET value = value + 1 WHERE id = 1")
        (value,) = db.execute("SELECT value FROM counter WHERE id = 1").fetchone()
        return int(value)

    def get(self, key: str) -> Entry | None:
        with self._read() as db:
            row = db.execute("SELECT value, version FROM kv WHERE key = ?", (key,)).fetchone()
        return Entry(key, bytes(row[0]), int(row[1])) if row else None

    def list(self, prefix: str) -> list[Entry]:
        with self._read() as db:
            rows = db.execute(
                "SELECT key, value, version FROM kv WHERE key >= ? AND key < ? ORDER BY key",
                (prefix, prefix + _PREFIX_END),
            ).fetchall()
        return [Entry(k, bytes(v), int(ver)) for k, v, ver in rows]

    def _current_version(self, db: sqlite3.Connection, key: str) -> int:
        row = db.execute("SELECT version FROM kv WHERE key = ?", (key,)).fetchone()
        return int(row[0]) if row else 0

    def put(self, key: str, value: bytes, expect: int | None = None) -> bool:
        with self._write() as db:
            if expect is not None and self._current_version(db, key) != expect:
                return False
            version = self._next_version(db)
            db.execute(
                "INSERT INTO kv (key, value, version) VALUES (?, ?, ?) "
                "ON CONFLICT(key) DO UPDATE SET value = excluded.value, version = excluded.version",
                (key, value, version),
            )
            db.execute("DELETE FROM tombstones WHERE key = ?", (key,))
        return True

    def delete(self, key: str, expect: int | None = None) -> bool:
        with self._write() as db:
            current = self._current_version(db, key)
            if expect is not None and current != expect:
                return False
            if current:
                db.execute("DELETE FROM kv WHERE key = ?", (key,))
                db.execute(
                    "INSERT OR REPLACE INTO tombstones (key, version) VALUES (?, ?)",
                    (key, self._next_version(db)),
                )
        return True

    def _token(self, prefixes: Sequence[str]) -> WatchToken:
        marks = []
        with self._read() as db:
            for prefix in prefixes:
                bounds = (prefix, prefix + _PREFIX_END)
                (live,) = db.execute(
                    "SELECT max(version) FROM kv WHERE key >= ? AND key < ?", bounds
                ).fetchone()
                (gone,) = db.execute(
                    "SELECT max(version) FROM tombstones WHERE key >= ? AND key < ?", bounds
                ).fetchone()
                marks.append(max(live or 0, gone or 0))
        return tuple(marks)

    def wait(self, prefixes: Sequence[str], token: WatchToken | None, timeout: float) -> WatchToken:
        deadline = time.monotonic() + timeout
        changes = self._changes() if token is not None and timeout > 0 else None
        if changes is not None:
            changes.forget()  # what was written before the first look, the look sees
        settling = 0
        while True:
            current = self._token(prefixes)
            remaining = deadline - time.monotonic()
            if token is None or current != token or remaining <= 0:
                return current
            if changes is None:
                time.sleep(min(POLL_INTERVAL_S, remaining))
            elif changes.wait(min(remaining, SETTLE_LOOK_S if settling else SAFETY_LOOK_S)):
                settling = SETTLE_LOOKS
            else:
                settling = max(0, settling - 1)

    def _changes(self) -> FileChanges | None:
        """This thread's watch on the database files, kept for its next ``wait``: one per
        thread, since a wait consumes the events it sees."""
        changes: FileChanges | None = getattr(self._watches, "changes", None)
        if changes is None and not getattr(self._watches, "unavailable", False):
            changes = watch_file(self.path)
            self._watches.changes, self._watches.unavailable = changes, changes is None
            if changes is not None:
                with self._lock:
                    self._opened_watches.append(changes)
        return changes

    def acquire_lease(self, resource: str, holder: str, limit: int, ttl_s: float) -> bool:
        now = time.time()
        with self._write() as db:
            db.execute("DELETE FROM slots WHERE resource = ? AND expires_at <= ?", (resource, now))
            held = db.execute(
                "SELECT 1 FROM slots WHERE resource = ? AND holder = ?", (resource, holder)
            ).fetchone()
            if not held:
                (count,) = db.execute(
                    "SELECT count(*) FROM slots WHERE resource = ?", (resource,)
                ).fetchone()
                if count >= limit:
                    return False
            db.execute(
                "INSERT OR REPLACE INTO slots (resource, holder, expires_at) VALUES (?, ?, ?)",
                (resource, holder, now + ttl_s),
            )
        return True

    def release_lease(self, resource: str, holder: str) -> None:
        with self._write() as db:
            db.execute("DELETE FROM slots WHERE resource = ? AND holder = ?", (resource, holder))

    def lease_holders(self, resource: str) -> builtins.list[str]:
        with self._read() as db:
            rows = db.execute(
                "SELECT holder FROM slots WHERE resource = ? AND expires_at > ? ORDER BY holder",
                (resource, time.time()),
            ).fetchall()
        return [r[0] for r in rows]

    def close(self) -> None:
        with self._lock:
            self._db.close()
            for changes in self._opened_watches:
                changes.close()
            self._opened_watches = []
