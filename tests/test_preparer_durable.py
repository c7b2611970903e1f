"""How pp-preparer flushes an install before its marker: a small tree entry by entry
(its own data only), a large one with one ``syncfs``; never through a link."""

from __future__ import annotations

import os
from collections.abc import Iterator
from pathlib import Path

import pytest

from agents.preparer import apply
from agents.system import fs


@pytest.fixture
def flushed(monkeypatch: pytest.MonkeyPatch) -> Iterator[tuple[list[str], list[int]]]:
    """The paths fsync'd (the real fsync still runs) and the descriptors syncfs would
    have flushed (not run: it waits for the whole file system)."""
    paths: list[str] = []
    syncfs_calls: list[int] = []
    real_fsync = os.fsync

    def fsync(fd: int) -> None:
        paths.append(os.readlink(f"/proc/self/fd/{fd}"))
        real_fsync(fd)

    def syncfs(fd: int) -> int:
        syncfs_calls.append(fd)
        return 0

    monkeypatch.setattr(apply.os, "fsync", fsync)
    monkeypatch.setattr(apply, "_syncfs", syncfs)
    yield paths, syncfs_calls


def _tree(root: Path, files: int) -> Path:
    tree = root / "tree"
    (tree / "bin").mkdir(parents=True)
    for n in range(files):
        (tree / "bin" / f"f{n}").write_bytes(b"x" * n)
    return tree


def test_a_small_tree_is_flushed_entry_by_entry_and_never_through_a_link(
    tmp_path: Path, flushed: tuple[list[str], list[int]]
) -> None:
    paths, syncfs_calls = flushed
    tree = _tree(tmp_path, 3)
    outside = tmp_path / "outside"
    outside.write_text("not the install's")
    (tree / "link").symlink_to(outside)
    (tree / "dirlink").symlink_to(tmp_path)
    os.mkfifo(tree / "fifo")

    with fs.open_dir(tree) as fd:
        apply.make_durable(fd)

    assert syncfs_calls == []
    expected = {str(tree / "bin"), *(str(tree / "bin" / f"f{n}") for n in range(3))}
    assert sorted(paths) == sorted(expected)


def test_a_large_tree_is_flushed_with_one_syncfs(
    tmp_path: Path, flushed: tuple[list[str], list[int]]
) -> None:
    paths, syncfs_calls = flushed
    tree = _tree(tmp_path, apply.FSYNC_EACH_UP_TO + 1)

    with fs.open_dir(tree) as fd:
        apply.make_durable(fd)

    assert len(syncfs_calls) == 1 and paths == []
