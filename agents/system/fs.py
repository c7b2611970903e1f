"""Atomic file-system writes: every file an agent writes goes through here.

A reader (another agent, runit, an operator) sees the old content or the new,
never a half-written file, and a crash leaves at worst a temp file behind.
"""

from __future__ import annotations

import contextlib
import os
import secrets
import stat
from pathlib import Path

TEMP_MARK = ".pp-tmp-"
"""Infix of every temp name we create, so crash leftovers can be found and removed."""


def temp_name(path: Path) -> Path:
    return path.with_name(f"{TEMP_MARK}{path.name}.{secrets.token_hex(4)}")


def write_atomic(path: Path, data: bytes, mode: int = 0o644, gid: int | None = None) -> bool:
    """Write ``data`` to ``path`` via a temp file and rename; only when it differs.

    ``gid`` gives the file that group (e.g. a config the app's user must read).
    Returns True when the file changed, so callers can restart a service only when
    its definition really changed (and a second pass writes nothing).
    """
    try:
        st = path.stat()
        same_group = gid is None or st.st_gid == gid
        if same_group and (st.st_mode & 0o7777) == mode and path.read_bytes() == data:
            return False
    except FileNotFoundError:
        pass
    tmp = temp_name(path)
    try:
        fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, mode)
        with os.fdopen(fd, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.chmod(tmp, mode)  # the umask may have narrowed it
        if gid is not None:  # before the rename: the file is never seen with another group
            os.chown(tmp, -1, gid)
        os.rename(tmp, path)
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            tmp.unlink()
        raise
    return True


def symlink_atomic(target: str | Path, link: Path) -> bool:
    """Point ``link`` at ``target`` by renaming a new symlink over it.

    Remove-then-create (what the original platypus did) leaves a moment with no
    link at all; rename(2) replaces it in one step. Returns True when it changed.
    """
    target = str(target)
    with contextlib.suppress(FileNotFoundError, OSError):
        if os.readlink(link) == target:
            return False
    tmp = temp_name(link)
    os.symlink(target, tmp)
    try:
        os.rename(tmp, link)
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            tmp.unlink()
        raise
    return True


def read_small(path: Path, limit: int = 65536, tail: bool = False) -> bytes:
    """Read at most ``limit`` bytes (the last ones with ``tail``) of a regular file.

    For files inside directories the app's own user can write (its install, its log):
    a symlink to ``/etc/shadow``, a FIFO or ``/dev/zero`` planted there must neither be
    read as root nor hang or exhaust the agent, so links are not followed, the open
    never blocks, and anything but a regular file raises OSError.
    """
    fd = os.open(path, os.O_RDONLY | os.O_NOFOLLOW | os.O_NONBLOCK | os.O_CLOEXEC)
    with os.fdopen(fd, "rb") as f:
        st = os.fstat(fd)
        if not stat.S_ISREG(st.st_mode):
            raise OSError(f"{path}: not a regular file")
        if tail:
            f.seek(max(0, st.st_size - limit))
        return f.read(limit)


def is_temp(path: Path) -> bool:
    return path.name.startswith(TEMP_MARK)
