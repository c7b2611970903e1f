"""Extract an untrusted tarball into a directory, and nothing outside it.

The standard library's ``data`` extraction filter does the path work (no
absolute paths, nothing resolving outside the destination, no links out, no
device files, no ownership from the archive). On top of it this module refuses
what the filter would quietly rewrite: member names with ``..`` or a leading
``/``, setuid/setgid files, and the install marker's reserved name. A
decompression bomb is stopped twice: by the sizes and count the headers declare,
and by counting the bytes actually decompressed (so a header that lies, or a
huge extended header, cannot get further than the limit either).

Any refusal aborts the whole extraction: the caller discards the directory.
"""

from __future__ import annotations

import bz2
import contextlib
import errno
import lzma
import os
import posixpath
import queue
import stat
import sys
import threading
import zlib
from collections.abc import Callable, Collection, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, BinaryIO

if TYPE_CHECKING or sys.version_info >= (3, 12):
    import tarfile
else:
    # Extraction filters (PEP 706) came in 3.11.4; Debian bookworm's Python is 3.11.2.
    # The backport is CPython 3.12's tarfile, so every 3.11 runs the same code.
    from backports import tarfile

CHUNK = 1 << 20
HEADER_ALLOWANCE = 4096
"""Bytes of tar headers and padding allowed per member on top of its data."""


class ArchiveError(Exception):
    """The artifact is refused; the message names the member and the reason."""


@dataclass(frozen=True)
class Limits:
    max_bytes: int
    max_files: int

    @property
    def max_stream_bytes(self) -> int:
        """The most tar bytes (data, headers, padding) an archive within the limits has."""
        return self.max_bytes + HEADER_ALLOWANCE * (self.max_files + 1)


@dataclass(frozen=True)
class Extracted:
    files: int
    bytes: int


def extract(
    archive: Path,
    dest: Path,
    limits: Limits,
    reserved: Collection[str] = (),
) -> Extracted:
    """Extract ``archive`` (tar, optionally gzip/xz/bzip2) into the existing ``dest``."""
    check = _Checker(str(dest), limits, frozenset(reserved))
    with archive.open("rb") as raw, _decompressed(raw, limits.max_stream_bytes) as stream:
        try:
            with tarfile.open(fileobj=stream, mode="r|") as tar:  # type: ignore[call-overload]
                tar.errorlevel = 2
                tar.extractall(dest, filter=check)
        except tarfile.FilterError as exc:
            raise ArchiveError(_describe_filter_error(exc)) from None
        except (tarfile.TarError, EOFError, zlib.error, lzma.LZMAError) as exc:
            raise ArchiveError(f"not a valid tar archive: {exc}") from None
        except OSError as exc:
            if exc.errno == errno.ENOSPC:
                raise ArchiveError(
                    f"no space left in {dest.parent} while extracting; free some space"
                ) from None
            raise ArchiveError(f"cannot extract: {exc.strerror or exc}") from None
    return Extracted(check.files, check.bytes)


# -- member checks ------------------------------------------------------------------------


class _Checker:
    def __init__(self, dest: str, limits: Limits, reserved: frozenset[str]) -> None:
        self.dest = os.path.realpath(dest)
        self.limits = limits
        self.reserved = reserved
        self.files = 0
        self.bytes = 0
        self.symlinks = False

    def __call__(self, member: tarfile.TarInfo, dest_path: str) -> tarfile.TarInfo | None:
        name = member.name
        refuse = _refuser(name)
        if name.startswith("/"):
            refuse("absolute path")
        if ".." in name.split("/"):
            refuse("'..' in the path")
        if posixpath.normpath(name) in self.reserved:
            refuse("reserved name")
        if member.ischr() or member.isblk():
            refuse("device file")
        if member.isfifo():
            refuse("fifo")
        if not (member.isreg() or member.isdir() or member.issym() or member.islnk()):
            refuse(f"unsupported member type {member.type!r}")
        if member.isreg() and member.mode & (stat.S_ISUID | stat.S_ISGID):
            refuse("setuid/setgid bit")
        self.files += 1
        if self.files > self.limits.max_files:
            raise ArchiveError(f"artifact has more than {self.limits.max_files} files")
        self.bytes += member.size
        if self.bytes > self.limits.max_bytes:
            raise ArchiveError(
                f"artifact would extract to more than {self.limits.max_bytes} bytes "
                "(raise --max-install-bytes if this is expected)"
            )
        if self.symlinks or member.issym():
            self.symlinks = True
            return tarfile.data_filter(member, dest_path)
        return self._data_filter_without_symlinks(member)

    def _data_filter_without_symlinks(self, member: tarfile.TarInfo) -> tarfile.TarInfo:
        """``tarfile.data_filter`` for the (common) case where no symlink exists yet.

        The stock filter resolves every path with ``realpath``, a dozen ``lstat``
        calls per member and a third of the extraction time for many small files.
        Until the archive has produced a symlink, the destination (a fresh private
        directory) contains none, so resolving is the same as normalising: the
        same checks, without the system calls. The first symlink switches every
        later member to the stock filter; tests hold the two to the same results.
        """
        name = member.name.lstrip("/")
        target = os.path.normpath(os.path.join(self.dest, name))
        if os.path.commonpath([target, self.dest]) != self.dest:
            raise tarfile.OutsideDestinationError(member, target)
        attrs: dict[str, object] = {}
        if name != member.name:
            attrs["name"] = name
        mode: int | None = member.mode & 0o755
        if member.isreg() or member.islnk():
            assert mode is not None
            if not mode & 0o100:
                mode &= ~0o111
            mode |= 0o600
        else:  # directories: every other type was refused above
            mode = None
        if mode != member.mode:
            attrs["mode"] = mode
        for owner in ("uid", "gid", "uname", "gname"):
            if getattr(member, owner) is not None:
                attrs[owner] = None
        if member.islnk():
            if os.path.isabs(member.linkname):
                raise tarfile.AbsoluteLinkError(member)
            linked = os.path.normpath(os.path.join(self.dest, member.linkname))
            if os.path.commonpath([linked, self.dest]) != self.dest:
                raise tarfile.LinkOutsideDestinationError(member, linked)
        return member.replace(**attrs, deep=False) if attrs else member  # type: ignore[arg-type]


def _refuser(name: str) -> Callable[[str], None]:
    def refuse(reason: str) -> None:
        raise ArchiveError(f"artifact refused: {name!r}: {reason}")

    return refuse


def _describe_filter_error(exc: tarfile.FilterError) -> str:
    name = exc.tarinfo.name
    if isinstance(exc, tarfile.AbsoluteLinkError):
        reason = f"link to the absolute path {exc.tarinfo.linkname!r}"
    elif isinstance(exc, tarfile.LinkOutsideDestinationError):
        reason = f"link to {exc.tarinfo.linkname!r}, outside the install"
    elif isinstance(exc, tarfile.OutsideDestinationError):
        reason = "resolves outside the install"
    elif isinstance(exc, tarfile.SpecialFileError):
        reason = "special file"
    else:
        reason = str(exc)
    return f"artifact refused: {name!r}: {reason}"


# -- decompression ------------------------------------------------------------------------

_GZIP = b"\x1f\x8b"
_XZ = b"\xfd7zXZ\x00"
_BZ2 = b"BZh"
_ZSTD = b"\x28\xb5\x2f\xfd"


class _Decompressor:
    """zlib, lzma and bz2 behind one ``decompress(data, max_length)``, so output is
    bounded per call: a megabyte of input that inflates to a gigabyte never sits
    in memory at once."""

    def __init__(self, kind: str) -> None:
        self.kind = kind
        self._zlib = zlib.decompressobj(31) if kind == "gzip" else None
        self._other = (
            lzma.LZMADecompressor() if kind == "xz" else bz2.BZ2Decompressor()
            if kind == "bz2" else None
        )  # fmt: skip
        self._tail = b""

    @property
    def needs_input(self) -> bool:
        if self._zlib is not None:
            return not self._tail
        assert self._other is not None
        return bool(self._other.needs_input)

    @property
    def eof(self) -> bool:
        return bool((self._zlib or self._other).eof)  # type: ignore[union-attr]

    @property
    def unused_data(self) -> bytes:
        return bytes((self._zlib or self._other).unused_data)  # type: ignore[union-attr]

    def decompress(self, data: bytes, max_length: int) -> bytes:
        if self._zlib is not None:
            out = self._zlib.decompress(self._tail + data, max_length)
            self._tail = self._zlib.unconsumed_tail
            return out
        assert self._other is not None
        return bytes(self._other.decompress(data, max_length))


def _decompressed_chunks(raw: BinaryIO, limit: int) -> Iterator[bytes]:
    """The archive's tar bytes, in chunks of at most CHUNK, up to ``limit`` bytes."""
    head = raw.read(CHUNK)
    kind = (
        "gzip" if head.startswith(_GZIP) else "xz" if head.startswith(_XZ)
        else "bz2" if head.startswith(_BZ2) else "zstd" if head.startswith(_ZSTD) else "tar"
    )  # fmt: skip
    if kind == "zstd":
        raise ArchiveError("zstd-compressed artifacts are not supported: use gzip (tar -czf)")
    produced = 0

    def count(chunk: bytes) -> bytes:
        nonlocal produced
        produced += len(chunk)
        if produced > limit:
            raise ArchiveError(
                f"artifact decompresses to more than {limit} bytes (a decompression bomb?)"
            )
        return chunk

    if kind == "tar":
        while head:
            yield count(head)
            head = raw.read(CHUNK)
        return
    magic = {"gzip": _GZIP, "xz": _XZ, "bz2": _BZ2}[kind]
    decompressor = _Decompressor(kind)
    pending = head
    while True:
        data = b""
        if decompressor.needs_input:
            data, pending = pending or raw.read(CHUNK), b""
            if not data:
                return  # truncated: tarfile reports the unexpected end
        out = decompressor.decompress(data, CHUNK)
        if out:
            yield count(out)
        if decompressor.eof:
            rest = decompressor.unused_data or raw.read(CHUNK)
            if not rest.startswith(magic):
                return  # trailing padding after the last stream, as gzip(1) ignores
            decompressor, pending = _Decompressor(kind), rest


class _ChunkReader:
    """A file-like ``read`` over chunks produced in a background thread.

    Decompression (zlib releases the GIL) then overlaps with writing files, as
    ``tar -xz`` overlaps gzip and tar; the queue bounds memory to a few chunks.
    """

    def __init__(self, chunks: Iterator[bytes], depth: int = 4) -> None:
        self._queue: queue.Queue[bytes | BaseException | None] = queue.Queue(depth)
        self._buffer = memoryview(b"")
        self._done = False
        self._stop = threading.Event()
        self._thread = threading.Thread(
            target=self._produce, args=(chunks,), name="decompress", daemon=True
        )
        self._thread.start()

    def _produce(self, chunks: Iterator[bytes]) -> None:
        try:
            for chunk in chunks:
                if not self._put(chunk):
                    return
            self._put(None)
        except BaseException as exc:
            self._put(exc)

    def _put(self, item: bytes | BaseException | None) -> bool:
        while not self._stop.is_set():
            try:
                self._queue.put(item, timeout=0.1)
                return True
            except queue.Full:
                continue
        return False

    def read(self, size: int = -1) -> bytes:
        while not self._buffer and not self._done:
            item = self._queue.get()
            if item is None:
                self._done = True
            elif isinstance(item, BaseException):
                self._done = True
                raise item
            else:
                self._buffer = memoryview(item)
        n = len(self._buffer) if size < 0 else min(size, len(self._buffer))
        out, self._buffer = bytes(self._buffer[:n]), self._buffer[n:]
        return out

    def close(self) -> None:
        self._stop.set()
        self._thread.join()


@contextlib.contextmanager
def _decompressed(raw: BinaryIO, limit: int) -> Iterator[_ChunkReader]:
    reader = _ChunkReader(_decompressed_chunks(raw, limit))
    try:
        yield reader
    finally:
        reader.close()


def chown_tree(root: Path, uid: int, gid: int) -> None:
    """Give every entry under ``root``, then ``root`` itself, to ``uid:gid``.

    Bottom-up on purpose: a directory changes hands only after everything in it
    has, so the new owner (whose processes may already be running) can never
    swap a directory we are about to descend into for a symlink elsewhere.
    Links are not followed.
    """
    for dirpath, dirnames, filenames in os.walk(root, topdown=False):
        for name in filenames + dirnames:
            os.lchown(os.path.join(dirpath, name), uid, gid)
    os.lchown(root, uid, gid)
