"""Wake up when a file is written: Linux's inotify, on the file's directory.

The embedded store's watchers (other processes' agents and ``pp``) learn of a
write from the kernel instead of polling the database. The directory is watched,
not the files, because SQLite creates and removes its ``-wal`` and ``-journal``
files as it goes, and a restore may replace the database file by a rename.

Written by hand over ctypes: the three calls needed (``inotify_init1``,
``inotify_add_watch``, ``read``) are libc's, and the PyPI wrappers (inotify_simple
and the like) would add a dependency for them. Where inotify is missing or its
per-user instance limit is reached, ``watch_file`` returns None and the caller polls.
"""

from __future__ import annotations

import ctypes
import os
import select
import struct
import time
from pathlib import Path

IN_MODIFY = 0x002
IN_MOVED_TO = 0x080
IN_CREATE = 0x100
IN_DELETE = 0x200
IN_Q_OVERFLOW = 0x4000
_MASK = IN_MODIFY | IN_MOVED_TO | IN_CREATE | IN_DELETE
_EVENT = struct.Struct("iIII")  # wd, mask, cookie, len; then len bytes of name


class FileChanges:
    """One inotify instance watching writes to a few files of one directory."""

    def __init__(self, fd: int, names: frozenset[bytes]) -> None:
        self._fd = fd
        self._names = names
        self._poll = select.poll()
        self._poll.register(fd, select.POLLIN)

    def forget(self) -> None:
        """Drop the writes seen so far: the caller is about to look for itself."""
        try:
            while os.read(self._fd, 65536):
                pass
        except BlockingIOError:
            pass

    def wait(self, timeout: float) -> bool:
        """True once one of the files was written, created, replaced or removed;
        False when ``timeout`` seconds passed without."""
        deadline = time.monotonic() + timeout
        while (remaining := deadline - time.monotonic()) > 0:
            if not self._poll.poll(max(1, round(remaining * 1000))):
                continue
            try:
                data = os.read(self._fd, 65536)
            except BlockingIOError:
                continue
            if self._concerns_us(data):
                return True
        return False

    def _concerns_us(self, data: bytes) -> bool:
        offset = 0
        while offset + _EVENT.size <= len(data):
            _, mask, _, length = _EVENT.unpack_from(data, offset)
            name = data[offset + _EVENT.size : offset + _EVENT.size + length].rstrip(b"\0")
            offset += _EVENT.size + length
            if mask & IN_Q_OVERFLOW or name in self._names:
                return True
        return False

    def close(self) -> None:
        """Slow (the kernel waits out a grace period), so keep an instance for reuse."""
        os.close(self._fd)


def watch_file(
    path: Path, suffixes: tuple[str, ...] = ("", "-wal", "-journal")
) -> FileChanges | None:
    """Watch writes to ``path`` (and its siblings named with ``suffixes``); None where
    inotify cannot be had."""
    try:
        libc = ctypes.CDLL(None, use_errno=True)
        init, add_watch = libc.inotify_init1, libc.inotify_add_watch
    except (OSError, AttributeError):
        return None
    add_watch.argtypes = (ctypes.c_int, ctypes.c_char_p, ctypes.c_uint32)
    fd = init(os.O_NONBLOCK | os.O_CLOEXEC)
    if fd < 0:
        return None
    if add_watch(fd, os.fsencode(path.parent), _MASK) < 0:
        os.close(fd)
        return None
    names = frozenset(os.fsencode(path.name + suffix) for suffix in suffixes)
    return FileChanges(fd, names)
