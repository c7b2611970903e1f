"""File-system writes and reads that stay safe in directories other users can write.

Every file an agent writes goes through ``write_atomic``/``write_in``: a reader
(another agent, runit, an operator) sees the old content or the new, never a
half-written file, and a crash leaves at worst a temp file behind. (Inside a
directory that is itself a temp name, renamed into place whole, ``create_in`` writes
straight in.)

Root also writes and reads inside directories a less trusted user can change: an
install is handed to the app's ``run_as`` user, and svlogd writes the app's log as
that user. There, a path resolved twice can resolve to two different things (the
app swaps a name for a symlink to ``/etc/shadow`` between the two steps). So the
directory is opened once and every step is relative to that descriptor
(``dir_fd``): names are created exclusively and never through a link
(``O_CREAT|O_EXCL|O_NOFOLLOW``), modes and owners are set on the open descriptor
(``fchmod``/``fchown``), the rename stays inside the directory, and reads open
only regular files, without following a link or blocking on a FIFO.
"""

from __future__ import annotations

import contextlib
import errno
import os
import secrets
import shutil
import stat
import time
from collections.abc import Collection, Iterator
from pathlib import Path

TEMP_MARK = ".pp-tmp-"
"""Infix of every temp name we create, so crash leftovers can be found and removed."""

_READ_FLAGS = os.O_RDONLY | os.O_NOFOLLOW | os.O_NONBLOCK | os.O_CLOEXEC
_CREATE_FLAGS = os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW | os.O_CLOEXEC


def temp_name(path: Path) -> Path:
    return path.with_name(_temp(path.name))


def _temp(name: str) -> str:
    return f"{TEMP_MARK}{name}.{secrets.token_hex(4)}"


def is_temp(path: Path) -> bool:
    return path.name.startswith(TEMP_MARK)


def remove_temps(
    directory: Path, names: Collection[str] | None = None, older_than_s: float = 0.0
) -> None:
    """Remove what a crash left under temp names in ``directory`` (not below it): every
    temp entry, or those made for one of ``names`` (``temp_name`` of ``directory / name``),
    last changed more than ``older_than_s`` ago. A directory goes with its contents; a
    link is removed, never followed."""
    marks = (TEMP_MARK,) if names is None else tuple(f"{TEMP_MARK}{n}." for n in names)
    try:
        entries = [e for e in directory.iterdir() if e.name.startswith(marks)]
    except (FileNotFoundError, NotADirectoryError):
        return
    now = time.time()
    for entry in entries:
        with contextlib.suppress(FileNotFoundError):
            if older_than_s and now - entry.lstat().st_mtime <= older_than_s:
                continue
            if entry.is_dir() and not entry.is_symlink():
                shutil.rmtree(entry)
            else:
                entry.unlink()


@contextlib.contextmanager
def open_dir(path: Path | str, dir_fd: int | None = None) -> Iterator[int]:
    """A descriptor on the directory ``path``; what is done relative to it is done in
    that directory, whatever its name points at afterwards.

    With ``dir_fd``, ``path`` is one name inside that directory and a symlink there
    is refused (ELOOP/ENOTDIR) rather than followed."""
    flags = os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC
    if dir_fd is not None:
        flags |= os.O_NOFOLLOW
    fd = os.open(path, flags, dir_fd=dir_fd)
    try:
        yield fd
    finally:
        os.close(fd)


# -- reading --------------------------------------------------------------------------------


@contextlib.contextmanager
def open_regular(
    name: Path | str, dir_fd: int | None = None, owner: int | None = None
) -> Iterator[tuple[int, os.stat_result]]:
    """An open descriptor (and its stat) on a regular file, for reading.

    For files in directories another user can write: a symlink planted at ``name``
    is not followed, a FIFO or a device is refused without blocking, and with
    ``owner`` only a file that belongs to that uid and that no one else may write
    is accepted (the other user can delete or replace such a file, not forge one).
    Anything else raises OSError.
    """
    fd = os.open(name, _READ_FLAGS, dir_fd=dir_fd)
    try:
        st = os.fstat(fd)
        if not stat.S_ISREG(st.st_mode):
            raise OSError(errno.EINVAL, "not a regular file", str(name))
        if owner is not None and (st.st_uid != owner or st.st_mode & 0o022):
            raise OSError(errno.EPERM, f"not written by uid {owner} alone", str(name))
        yield fd, st
    finally:
        os.close(fd)


def read_small(
    path: Path | str,
    limit: int = 65536,
    tail: bool = False,
    *,
    dir_fd: int | None = None,
    owner: int | None = None,
) -> bytes:
    """At most ``limit`` bytes (the last ones with ``tail``) of a regular file,
    opened as ``open_regular`` does: safe for files the app's own user can reach
    (its install, its log), whatever it planted there."""
    with open_regular(path, dir_fd, owner) as (fd, st):
        if tail:
            os.lseek(fd, max(0, st.st_size - limit), os.SEEK_SET)
        chunks = []
        remaining = limit
        while remaining > 0:
            chunk = os.read(fd, remaining)
            if not chunk:
                break
            chunks.append(chunk)
            remaining -= len(chunk)
        return b"".join(chunks)


# -- writing --------------------------------------------------------------------------------


def write_atomic(path: Path, data: bytes, mode: int = 0o644, gid: int | None = None) -> bool:
    """Write ``data`` to ``path`` via a temp file and rename; only when it differs.

    ``gid`` gives the file that group (e.g. a config the app's user must read).
    Returns True when the file changed, so callers can restart a service only when
    its definition really changed (and a second pass writes nothing). The parent
    directory is resolved once; everything after is ``write_in``.
    """
    with open_dir(path.parent) as dir_fd:
        return write_in(dir_fd, path.name, data, mode, gid)


def write_in(
    dir_fd: int, name: str, data: bytes, mode: int = 0o644, gid: int | None = None
) -> bool:
    """``write_atomic`` for the file ``name`` in the directory open as ``dir_fd``.

    Safe in a directory another user can write: the temp file is created
    exclusively and never through a link, its mode and group are set on the open
    descriptor (never by name: the name may be a symlink by then), and the rename
    replaces whatever entry holds ``name`` without following it.
    """
    if _holds(dir_fd, name, data, mode, gid):
        return False
    tmp = _temp(name)
    try:
        create_in(dir_fd, tmp, data, mode, gid, flush=True)
        os.rename(tmp, name, src_dir_fd=dir_fd, dst_dir_fd=dir_fd)
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(tmp, dir_fd=dir_fd)
        raise
    return True


def create_in(
    dir_fd: int,
    name: str,
    data: bytes,
    mode: int = 0o644,
    gid: int | None = None,
    flush: bool = False,
) -> None:
    """Create the new file ``name`` holding ``data`` in the directory open as ``dir_fd``:
    exclusively and never through a link, its mode and group set on the descriptor.

    On its own (without the rename ``write_in`` adds) only for a directory no reader can
    see yet, which is itself renamed into place whole once the caller has flushed it.
    """
    fd = os.open(name, _CREATE_FLAGS, 0o600, dir_fd=dir_fd)
    with os.fdopen(fd, "wb") as f:
        f.write(data)
        f.flush()
        os.fchmod(fd, mode)  # the umask may have narrowed it
        if gid is not None:  # before the rename: the file is never seen with another group
            os.fchown(fd, -1, gid)
        if flush:
            os.fsync(fd)


def _holds(dir_fd: int, name: str, data: bytes, mode: int, gid: int | None) -> bool:
    """Whether ``name`` is already a regular file with exactly this content and mode."""
    try:
        with open_regular(name, dir_fd) as (fd, st):
            if st.st_size != len(data) or (st.st_mode & 0o7777) != mode:
                return False
            if gid is not None and st.st_gid != gid:
                return False
            with os.fdopen(os.dup(fd), "rb") as f:
                return f.read(len(data) + 1) == data
    except OSError:  # absent, a link, a FIFO...: rewrite it
        return False


def symlink_atomic(target: str | Path, link: Path) -> bool:
    """Point ``link`` at ``target`` by renaming a new symlink over it.

    Remove-then-create (what the original platypus did) leaves a moment with no
    link at all; rename(2) replaces it in one step. Returns True when it changed.
    """
    target = str(target)
    with open_dir(link.parent) as dir_fd:
        with contextlib.suppress(OSError):
            if os.readlink(link.name, dir_fd=dir_fd) == target:
                return False
        tmp = _temp(link.name)
        os.symlink(target, tmp, dir_fd=dir_fd)
        try:
            os.rename(tmp, link.name, src_dir_fd=dir_fd, dst_dir_fd=dir_fd)
        except BaseException:
            with contextlib.suppress(FileNotFoundError):
                os.unlink(tmp, dir_fd=dir_fd)
            raise
    return True
