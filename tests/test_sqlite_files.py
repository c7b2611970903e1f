"""The embedded store's file on disk: private to its owner from the first write."""

from __future__ import annotations

import os
import stat
from pathlib import Path

from intent.store.sqlite import SqliteStore


def _mode(path: Path) -> int:
    return stat.S_IMODE(path.stat().st_mode)


def test_a_new_store_is_readable_by_its_owner_only(tmp_path: Path) -> None:
    path = tmp_path / "var" / "lib" / "platypus" / "intent.db"
    old_umask = os.umask(0o022)  # the usual umask would otherwise give 0755 and 0644
    try:
        store = SqliteStore(path)
        store.put("platypus/clusters/a/prod/config", b'{"user_config":{"password":"s3cret"}}')
    finally:
        os.umask(old_umask)
    try:
        assert _mode(path) == 0o600
        for created in (path.parent, path.parent.parent, path.parent.parent.parent):
            assert _mode(created) == 0o700
        for companion in (Path(f"{path}-wal"), Path(f"{path}-shm")):
            assert _mode(companion) & 0o077 == 0  # SQLite copies the database's mode
    finally:
        store.close()


def test_an_existing_store_keeps_the_mode_its_operator_gave_it(tmp_path: Path) -> None:
    shared = tmp_path / "shared"
    shared.mkdir()
    shared.chmod(0o750)
    path = shared / "intent.db"
    SqliteStore(path).close()
    assert _mode(shared) == 0o750  # an existing directory is left as it is
    path.chmod(0o640)  # shared with an operators' group on purpose
    SqliteStore(path).close()
    assert _mode(path) == 0o640
