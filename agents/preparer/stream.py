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
A download no larger than ``INLINE_BYTES`` is extracted once it ends, from the finished
file, in the caller's thread: for most artifacts a second thread (its start, and the
handing of each read back and forth) costs more than the overlap saves.
When the download starts again from its first byte (a server that cannot resume), the
extraction begun on the first attempt is void: ``Restarted`` tells the caller to
extract from the finished file instead. When the extraction fails or ends first, the
download carries on alone, so the caller can still tell a refused artifact from a
corrupted download by its digest.

Written here because nothing in the standard library follows a file another thread is
writing, and may rewind.
"""

from __future__ import annotations

import contextvars
import functools
import os
import threading
from collections.abc import Callable
from pathlib import Path
from typing import BinaryIO, TypeVar

_T = TypeVar("_T")

READ_SIZE = 1 << 20

INLINE_BYTES = 1 << 20
"""Downloads up to this size are extracted after they end, without a thread."""


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

    def rewound(self, size: int) -> None:
        """The file was cut to ``size`` before anything read it."""
        with self._changed:
            self._written = size

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


class _Behind:
    """The extraction in a thread of its own, reading behind the download; started only
    once the download is larger than ``INLINE_BYTES``."""

    def __init__(self, follower: _Follower, extract: Callable[[BinaryIO], object]) -> None:
        self._follower = follower
        self._extract = extract
        self._thread: threading.Thread | None = None
        self.outcome: object = None

    @property
    def started(self) -> bool:
        return self._thread is not None

    def start_past(self, written: int) -> None:
        if self._thread is None and written > INLINE_BYTES:
            # In this converge's context, so what the extraction logs names the app too.
            run = functools.partial(contextvars.copy_context().run, self._run)
            self._thread = threading.Thread(target=run, name="extract", daemon=True)
            self._thread.start()

    def _run(self) -> None:
        self.outcome = _outcome(self._extract, self._follower)

    def join(self) -> None:
        if self._thread is not None:
            self._thread.join()


def _outcome(extract: Callable[[BinaryIO], object], source: object) -> object:
    """What ``extract`` returned or raised, for the caller to weigh once the digest is known."""
    try:
        return extract(source)  # type: ignore[arg-type]
    except Exception as exc:
        return exc


class _Sink:
    """What the fetch writes: the download file, each write flushed and announced to the
    follower. A fetch that starts again rewinds its sink (``seek(0)``, ``truncate()``)."""

    def __init__(self, file: BinaryIO, follower: _Follower, behind: _Behind) -> None:
        self._file = file
        self._follower = follower
        self._behind = behind

    def write(self, data: bytes) -> int:
        written = self._file.write(data)
        self._file.flush()
        self._follower.wrote(written)
        self._behind.start_past(self._file.tell())
        return written

    def seek(self, offset: int, whence: int = 0) -> int:
        return self._file.seek(offset, whence)

    def truncate(self, size: int | None = None) -> int:
        if self._behind.started:
            self._follower.restart()
        else:  # nothing read yet: the follower just counts from the new end
            self._follower.rewound(self._file.tell() if size is None else size)
        return self._file.truncate(size)


def fetch_extracting(
    download: Path,
    fetch: Callable[[BinaryIO], _T],
    extract: Callable[[BinaryIO | Path], object],
) -> tuple[_T, object]:
    """Run ``fetch(sink)`` here, writing the new file ``download``, and ``extract`` on
    what it writes: in a thread reading behind it once it is larger than
    ``INLINE_BYTES``, else from the finished file. Returns the fetch's result (its error
    is raised, once a started extraction has ended) and what the extraction returned or
    raised (an exception object, ``Restarted`` included), for the caller to weigh once
    the digest is known."""
    with download.open("xb") as file:
        follower = _Follower(download)
        behind = _Behind(follower, extract)
        try:
            try:
                fetched = fetch(_Sink(file, follower, behind))  # type: ignore[arg-type]
            finally:
                follower.end()
                behind.join()
        finally:
            follower.close()
    if behind.started:
        return fetched, behind.outcome
    return fetched, _outcome(extract, download)
