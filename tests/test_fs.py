"""Atomic writes and the guarded reads of files an app's own user can reach."""

from __future__ import annotations

import os
import threading
from pathlib import Path

import pytest
from race_support import NOBODY, Racer, fingerprint, make_secret, open_root

from agents.system import fs, runit
from intent.cli.pack import PackError, build


def test_write_atomic_writes_only_on_change_and_sets_the_group(tmp_path: Path) -> None:
    path = tmp_path / "config.json"
    assert fs.write_atomic(path, b"{}", 0o640, gid=os.getgid()) is True
    assert fs.write_atomic(path, b"{}", 0o640, gid=os.getgid()) is False
    assert path.stat().st_mode & 0o7777 == 0o640
    assert [p.name for p in tmp_path.iterdir()] == ["config.json"]


def test_read_small_does_not_follow_a_planted_symlink(tmp_path: Path) -> None:
    secret = tmp_path / "secret"
    secret.write_text("root only")
    (tmp_path / "current").symlink_to(secret)
    with pytest.raises(OSError):
        fs.read_small(tmp_path / "current")


def test_read_small_refuses_a_fifo_without_hanging(tmp_path: Path) -> None:
    os.mkfifo(tmp_path / "marker")
    outcome: list[object] = []
    reader = threading.Thread(
        target=lambda: outcome.append(_try(fs.read_small, tmp_path / "marker"))
    )
    reader.start()
    reader.join(5)
    assert not reader.is_alive(), "reading a FIFO blocked"
    assert isinstance(outcome[0], OSError)


def test_read_small_reads_at_most_the_limit_from_the_end(tmp_path: Path) -> None:
    path = tmp_path / "log"
    path.write_bytes(b"a" * 100 + b"tail")
    assert fs.read_small(path, limit=4, tail=True) == b"tail"
    assert fs.read_small(path, limit=4) == b"aaaa"


def test_read_small_with_an_owner_refuses_files_someone_else_could_have_written(
    tmp_path: Path,
) -> None:
    path = tmp_path / "marker"
    path.write_bytes(b"{}")
    path.chmod(0o644)
    assert fs.read_small(path, owner=os.geteuid()) == b"{}"
    path.chmod(0o664)  # group-writable: anyone in the group could have written it
    with pytest.raises(OSError, match="not written by"):
        fs.read_small(path, owner=os.geteuid())
    path.chmod(0o644)
    with pytest.raises(OSError, match="not written by"):
        fs.read_small(path, owner=os.geteuid() + 1)


def test_writes_in_a_directory_the_app_owns_never_follow_its_links(tmp_path: Path) -> None:
    """The app swaps every temp name (and the file itself) for a link to a root-only
    file while root writes, mode and group included, again and again."""
    with open_root() as root:
        _race_writes(root / "install", make_secret(tmp_path))


def _race_writes(app_dir: Path, secret: Path) -> None:
    app_dir.mkdir()
    os.chown(app_dir, NOBODY.pw_uid, NOBODY.pw_gid)
    before = fingerprint(secret)
    payload = os.urandom(1 << 20)  # slow enough (write, fsync) for the racer to get in
    with Racer(app_dir, secret, "marker") as racer:
        for i in range(40):
            fs.write_atomic(app_dir / "marker", payload + bytes([i]), 0o644, gid=NOBODY.pw_gid)
    assert racer.swaps > 0, "the racer never got to swap a name: the test proved nothing"
    assert fingerprint(secret) == before
    assert {p.name for p in app_dir.iterdir() if not p.is_symlink()} <= {"marker"}


def test_a_removed_service_dir_never_stays_half_deleted_under_its_name(tmp_path: Path) -> None:
    service = tmp_path / "hello"
    (service / "log").mkdir(parents=True)
    (service / "run").write_text("#!/bin/sh\n")
    runit.remove_service_dir(service)
    assert list(tmp_path.iterdir()) == []
    runit.remove_service_dir(service)  # already gone: fine


def test_pack_refuses_a_bad_source_date_epoch(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("SOURCE_DATE_EPOCH", "abc")
    with (
        pytest.raises(PackError, match="SOURCE_DATE_EPOCH='abc'"),
        (tmp_path / "out").open("wb") as out,
    ):
        build(tmp_path, out)


def _try(read: object, path: Path) -> object:
    try:
        return read(path)  # type: ignore[operator]
    except OSError as exc:
        return exc
