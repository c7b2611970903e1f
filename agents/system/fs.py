"""Atomic file-system writes: every file an agent writes goes through here.

A reader (another agent, runit, an operator) sees the old content or the new,
never a half-written file, and a crash leaves at worst a temp file behind.
"""

from __future__ import annotations

import contextlib
import os
import secrets
from pathlib import Path

TEMP_MARK = ".pp-tmp-"
"""Infix of every temp name we create, so crash leftovers can be found and removed."""


def temp_name(path: Path) -> Path:
    return path.with_name(f"{TEMP_MARK}{path.name}.{secrets.token_hex(4)}")


def write_atomic(path: Path, data: bytes, mode: int = 0o644) -> bool:
    """Write ``data`` to ``path`` via a temp file and rename; only when it differs.

    Returns True when the file changed, so callers can restart a service only when
    its definition really changed (and a second pass writes nothing).
    """
    try:
        if path.read_bytes() == data and (path.stat().st_mode & 0o7777) == mode:
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


def is_temp(path: Path) -> bool:
    return path.name.startswith(TEMP_MARK)
