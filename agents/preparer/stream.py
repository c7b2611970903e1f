"""Extract an artifact while it downloads, into a directory nobody sees until it is verified.

Downloading and extracting one after the other costs their sum; overlapped, about the
longer of the two. The download goes to its file exactly as before (hashed on the way),
and the extraction reads that file behind it, waiting when it catches up. The sha256,
and the signature over it, are known only once the last byte is in: whatever was
extracted stays in the private work directory, which the caller discards unless the
digest matches. Extracting bytes not verified yet exposes the parser to nothing new:
any app owner can name an artifact of their own making by its digest, so extraction is
built for hostile archives either way (``agents/system/archive.py``).

The download never waits for the extraction (a server would not wait for a slow disk),
and memory does not grow with the artifact: the bytes between the two are in the file.
When the download starts again from its first byte (a server that cannot resume), the
extraction begun on the first attempt is void: ``Restarted`` tells the caller to
extract from the finished file instead. When the extraction fails or ends first, the
download carries on alone, so the caller can still tell a refused artifact from a
corrupted download by its digest.

Written here because nothing in the standard library follows a file another thread is
writing, and may rewind.
"""

from __future__ import annotations

import os
import threading
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import BinaryIO, TypeVar

_T = TypeVar("_T")

READ_SIZE = 1 << 20


class Restarted(Exception):
    """The download started again from its first byte: what was extracted is void."""


class _Follower:
    """Reads ``path`` up to where its writer has got, waiting for more until it ends."""

    def __init__(self, path: Path) -> None:
        self._fd = os.open(path, os.O_RDONLY | os.O_CLOEXEC)
        self._changed = threading.Condition()
        self._written = 0
        self._position = 0
        self._ended = False
        self._restarted = False

    def close(self) -> None:
        os.close(self._fd)

    # -- the download's side ------------------------------------------------------------------

    def wrote(self, size: int) -> None:
        with self._changed:
            self._written += size
            self._changed.notify_all()

    def restart(self) -> None:
        with self._changed:
            self._restarted = True
            self._changed.notify_all()

    def end(self) -> None:
        with self._changed:
            self._ended = True
            self._changed.notify_all()

    # -- the extraction's side ----------------------------------------------------------------

    def read(self, size: int = -1) -> bytes:
        """``size`` bytes (all with -1), fewer only at the end, as a file's read gives:
        the extraction tells the compression from the first bytes it reads."""
        parts = []
        wanted = size if size >= 0 else float("inf")
        while wanted > 0:
            available = self._available()
            if not available:
                break
            data = os.pread(self._fd, int(min(wanted, available, READ_SIZE)), self._position)
            if not data:  # the writer's count says otherwise: the file was cut short
                raise Restarted("the download was truncated")
            self._position += len(data)
            wanted -= len(data)
            parts.append(data)
        return b"".join(parts)

    def _available(self) -> int:
        with self._changed:
            while self._written <= self._position and not self._ended and not self._restarted:
                self._changed.wait()
            if self._restarted:
                raise Restarted("the download started again")
            return self._written - self._position


class _Sink:
    """What the fetch writes: the download file, each write flushed and announced to the
    follower. A fetch that starts again rewinds its sink (``seek(0)``, ``truncate()``)."""

    def __init__(self, file: BinaryIO, follower: _Follower) -> None:
        self._file = file
        self._follower = follower

    def write(self, data: bytes) -> int:
        written = self._file.write(data)
        self._file.flush()
        self._follower.wrote(written)
        return written

    def seek(self, offset: int, whence: int = 0) -> int:
        return self._file.seek(offset, whence)

    def truncate(self, size: int | None = None) -> int:
        self._follower.restart()
        return self._file.truncate(size)


def fetch_extracting(
    download: Path,
    fetch: Callable[[BinaryIO], _T],
    extract: Callable[[BinaryIO], object],
) -> tuple[_T, object]:
    """Run ``fetch(sink)`` in a thread, writing the new file ``download``, while
    ``extract(stream)`` reads it here. Returns the fetch's result (its error is raised)
    and what the extraction returned or raised (an exception object, ``Restarted``
    included), for the caller to weigh once the digest is known."""
    with download.open("xb") as file:
        follower = _Follower(download)

        def downloading() -> _T:
            try:
                return fetch(_Sink(file, follower))  # type: ignore[arg-type]
            finally:
                follower.end()

        try:
            with ThreadPoolExecutor(max_workers=1, thread_name_prefix="download") as pool:
                fetched = pool.submit(downloading)
                try:
                    extracted: object = extract(follower)  # type: ignore[arg-type]
                except Exception as exc:  # weighed by the caller once the digest is known
                    extracted = exc
                return fetched.result(), extracted
        finally:
            follower.close()
