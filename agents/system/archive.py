"""Extract an untrusted tarball into a directory, and nothing outside it.

tarfile parses the stream (a well-kept parser for a format with many dialects);
the writing is ours. Path checks cannot make writing safe: ``realpath`` gives up
on a chain of symlinks longer than PATH_MAX while the kernel goes on following
it (CVE-2025-4517 defeats tarfile's own ``data`` filter that way), so any rule
phrased as arithmetic on paths can be outrun by an archive that plants links.
Here no path is ever resolved by the kernel: every member is written relative to
a directory file descriptor opened from ``dest`` downward, one name at a time,
with ``O_NOFOLLOW``. A symlink the archive made is never followed while
extracting, so it cannot redirect a later member.

What a member may be, and what becomes of it:

- Its name is relative, without ``..``, not a reserved name, and reaches its
  directory through directories only: a member whose path passes through a
  symlink (or a file) is refused, even when the link points inside.
- Regular file: created with ``O_EXCL|O_NOFOLLOW``; mode as tarfile's ``data``
  filter makes it (no setuid/setgid, which are refused, no group/world write,
  executable bits only with the owner's, always owner read/write); mtime kept.
  A name repeated in the archive is tar's "the later one wins": the earlier
  file, link or symlink is unlinked (never written through) and replaced.
- Directory: created 0o755 (under the umask: the ``data`` filter's "system
  default" without group/world write); a repeated directory is fine, but a
  directory's name is never taken over by a file or link, nor the reverse.
- Symlink: its target must be relative and stay inside lexically (the ``data``
  filter's rule). What it points at is the owner's business once the tree is
  theirs; while we extract it is never followed.
- Hard link: to a regular file extracted earlier from this archive (never to a
  symlink or directory), reached the same way; linked with ``linkat`` without
  following. A file hard-linked to itself, as some archivers write, is that file.
- Devices, fifos, sparse files and other types are refused; ownership in the
  archive is ignored. Everything is ours, or ``owner``'s when one is given: each entry
  is handed over as it is made (on its descriptor, or by name without following),
  which is safe only because ``dest`` is private (0700, root's) until the caller
  opens it, so the new owner cannot reach any of it while we write (``_seal``).

Two kinds of bomb are stopped. A decompression bomb: by the sizes and count the
headers declare, and by counting the bytes actually decompressed (in a thread
of its own, so inflating overlaps with writing). A memory bomb: tarfile reads an
extended header (GNU long name, pax) whole into memory, so one declaring two
gigabytes is refused from its size before it is read (``MAX_EXTENDED_HEADER``).

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
from collections import OrderedDict
from collections.abc import Callable, Collection, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, BinaryIO, NoReturn, TypeVar

from intent.errors import PlatypusError

if TYPE_CHECKING or sys.version_info >= (3, 12):
    import tarfile
else:
    # The backport is a newer CPython's tarfile: every 3.11 parses with the same code,
    # which (unlike 3.11's own) does not keep each member of a stream in memory.
    from backports import tarfile

CHUNK = 1 << 20
HEADER_ALLOWANCE = 4096
"""Bytes of tar headers and padding allowed per member on top of its data."""
MAX_EXTENDED_HEADER = 64 << 10
"""The largest extended header (GNU long name or link, pax, Solaris) read into memory.
A path or link target is at most PATH_MAX (4 KiB) and GNU tar's pax records for one
file take a few hundred bytes: 64 KiB is generous, and negligible memory."""
MAX_CHAINED_HEADERS = 8
"""Extended headers before one member (pax, global pax, long name, long link make 4):
tarfile parses a chain recursively and holds every header until the member comes."""
MAX_GLOBAL_HEADER_BYTES = MAX_EXTENDED_HEADER
"""Global pax headers in a whole archive: tarfile keeps them for the archive's life."""
MAX_NAME = 4096
"""Longest member name or link target (PATH_MAX): nothing could open a longer path
whole, and walking a name costs a lookup per component."""
OPEN_DIRECTORIES = 64
"""Directory descriptors kept open while extracting (the most recently used). Archives
list a directory's entries together, so a few dozen suffice; several extractions may
run at once under one RLIMIT_NOFILE."""

_DIRECTORY = os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW | os.O_CLOEXEC
_NEW_FILE = os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW | os.O_CLOEXEC
_EXTENDED_HEADERS = {
    tarfile.GNUTYPE_LONGNAME: "GNU long name",
    tarfile.GNUTYPE_LONGLINK: "GNU long link name",
    tarfile.XHDTYPE: "pax",
    tarfile.XGLTYPE: "pax global",
    tarfile.SOLARIS_XHDTYPE: "Solaris extended",
}

_T = TypeVar("_T")
_Refuse = Callable[[str], NoReturn]


class ArchiveError(PlatypusError):
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
    archive: Path | BinaryIO,
    dest: Path,
    limits: Limits,
    reserved: Collection[str] = (),
    owner: tuple[int, int] | None = None,
) -> Extracted:
    """Extract ``archive`` (tar, optionally gzip/xz/bzip2; a file or a stream read
    once) into the existing ``dest``.

    ``reserved`` are top-level names (the install marker's) that the archive may
    neither create nor put anything under. ``owner`` (uid, gid) is given every entry
    made under ``dest`` (not ``dest`` itself), which must stay private meanwhile."""
    with (
        archive.open("rb") if isinstance(archive, Path) else contextlib.nullcontext(archive) as raw,
        _decompressed(raw, limits.max_stream_bytes) as stream,
    ):
        try:
            with (
                _Writer(dest, limits, frozenset(reserved), owner) as writer,
                # On our reader directly, not through tarfile's own ``_Stream`` ("r|"), which
                # copies its buffer on every read and reads 10 KiB at a time.
                _TarStream(fileobj=stream, mode="r") as tar,  # type: ignore[arg-type]
            ):
                while (member := tar.next()) is not None:
                    writer.add(member, stream)
                writer.finish()
        except lzma.LZMAError as exc:
            if "memory" in str(exc).lower():
                raise ArchiveError(
                    f"artifact refused: its xz stream needs more than {XZ_MEMORY_LIMIT >> 20} "
                    "MiB of memory to decompress (compress with xz -9 or less, or gzip)"
                ) from exc
            raise ArchiveError(f"not a valid tar archive: {exc}") from exc
        except (tarfile.TarError, EOFError, zlib.error) as exc:
            raise ArchiveError(f"not a valid tar archive: {exc}") from exc
        except OSError as exc:
            if exc.errno == errno.ENOSPC:
                raise ArchiveError(
                    f"no space left in {dest.parent} while extracting; free some space"
                ) from exc
            raise ArchiveError(f"cannot extract: {exc.strerror or exc}") from exc
    return Extracted(writer.files, writer.bytes)


# -- parsing: tarfile's, with extended headers bounded before they are read ---------------


class _BoundedTarInfo(tarfile.TarInfo):
    """tarfile's member parser, refusing headers it would otherwise hold in memory.

    tarfile reads an extended header's data whole (``fileobj.read(size)``) before
    parsing it, so a 2 MB gzip declaring a 2 GiB GNU long name costs gigabytes
    before any check on the member can run. ``_proc_member`` sees the declared size
    first. It is private, but tarfile's source names it as the hook for subclasses
    ("can be overridden in a subclass"), and tests bomb every header kind and
    measure the peak memory, so a tarfile that stopped calling it would be noticed.
    """

    def _proc_member(self, stream: Any) -> Any:
        if self.size < 0:
            raise ArchiveError(f"artifact refused: {self.name!r}: negative size")
        if self.type == tarfile.GNUTYPE_SPARSE:
            _refuse_sparse(self.name)
        kind = _EXTENDED_HEADERS.get(self.type)
        if kind is not None:
            stream.count_extended_header(kind, self.size)
        return super()._proc_member(stream)  # type: ignore[misc]

    # A pax header may announce a sparse file, whose map tarfile then reads unbounded.
    def _proc_gnusparse_00(self, *args: Any) -> NoReturn:
        _refuse_sparse(self.name)

    _proc_gnusparse_01 = _proc_gnusparse_10 = _proc_gnusparse_00


def _refuse_sparse(name: str) -> NoReturn:
    raise ArchiveError(f"artifact refused: {name!r}: sparse file (archive it without --sparse)")


class _TarStream(tarfile.TarFile):
    """A streaming ``TarFile`` that counts the extended headers it parses."""

    tarinfo = _BoundedTarInfo
    _chained = 0
    _global_bytes = 0

    def next(self) -> tarfile.TarInfo | None:
        self._chained = 0
        member = super().next()
        # A TarFile keeps every member it parsed (CPython before 3.13 even in "r|" mode):
        # 100,000 of them would hold a hundred megabytes. We need none once parsed.
        self.members.clear()  # type: ignore[attr-defined]
        return member

    def count_extended_header(self, kind: str, size: int) -> None:
        if size > MAX_EXTENDED_HEADER:
            raise ArchiveError(
                f"artifact refused: a {kind} header of {size} bytes "
                f"(at most {MAX_EXTENDED_HEADER} are accepted)"
            )
        self._chained += 1
        if self._chained > MAX_CHAINED_HEADERS:
            raise ArchiveError(
                f"artifact refused: more than {MAX_CHAINED_HEADERS} extended headers for one member"
            )
        if kind == "pax global":
            self._global_bytes += size
            if self._global_bytes > MAX_GLOBAL_HEADER_BYTES:
                raise ArchiveError(
                    f"artifact refused: more than {MAX_GLOBAL_HEADER_BYTES} bytes "
                    "of pax global headers"
                )


# -- writing: each operation relative to a directory descriptor, nothing followed ---------


class _Writer:
    """Writes members under ``dest`` by the rules in the module docstring."""

    def __init__(
        self,
        dest: Path,
        limits: Limits,
        reserved: frozenset[str],
        owner: tuple[int, int] | None,
    ) -> None:
        self.limits = limits
        self.reserved = reserved
        self.owner = owner
        self.files = 0
        self.bytes = 0
        self._regular: set[str] = set()
        """Paths holding a regular file this archive wrote: the only hard link sources."""
        self._directory_mtimes: dict[str, float] = {}
        self._tree = _Tree(dest, owner)

    def __enter__(self) -> _Writer:
        return self

    def __exit__(self, *exc: object) -> None:
        self._tree.close()

    def add(self, member: tarfile.TarInfo, source: _ChunkReader) -> None:
        """Write ``member``, whose data (if any) ``source`` reads."""
        path = self._check(member)
        refuse = _refuser(member.name)
        parent, _, leaf = path.rpartition("/")
        if not leaf:
            if not member.isdir():
                refuse("not a file name")
            return  # "." or "./": the install directory itself
        if member.islnk():
            self._hard_link(member, path, refuse)
            return
        directory = self._tree.directory(parent, refuse)
        if member.isreg():
            self._file(member, source, directory, leaf, refuse)
            self._regular.add(path)
        elif member.isdir():
            try:
                os.mkdir(leaf, 0o755, dir_fd=directory)
            except FileExistsError:
                if not stat.S_ISDIR(_lstat(directory, leaf)):
                    refuse("a directory where an earlier member put a file or link")
            else:
                _give(leaf, self.owner, directory)
            self._directory_mtimes[path] = member.mtime
        else:
            self._symlink(member.linkname, parent, directory, leaf, refuse)
            self._regular.discard(path)

    def finish(self) -> None:
        """Set directories' mtimes, last: writing into a directory changes its own."""
        for path, mtime in self._directory_mtimes.items():
            refuse = _refuser(path)
            _set_mtime(self._tree.directory(path, refuse), mtime, refuse)

    def _check(self, member: tarfile.TarInfo) -> str:
        """The member's path with ``.`` and empty parts dropped, once it is allowed."""
        name = member.name
        refuse = _refuser(name)
        if len(name) > MAX_NAME or len(member.linkname) > MAX_NAME:
            refuse(f"name or link target longer than {MAX_NAME} characters")
        if "\0" in name or "\0" in member.linkname:
            refuse("NUL character in the name or link target")
        if name.startswith("/"):
            refuse("absolute path")
        parts = [part for part in name.split("/") if part not in ("", ".")]
        if ".." in parts:
            refuse("'..' in the path")
        if parts and parts[0] in self.reserved:
            refuse("reserved name")
        if member.ischr() or member.isblk():
            refuse("device file")
        if member.isfifo():
            refuse("fifo")
        if member.issparse():
            _refuse_sparse(name)
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
        return "/".join(parts)

    def _file(
        self,
        member: tarfile.TarInfo,
        source: _ChunkReader,
        directory: int,
        leaf: str,
        refuse: _Refuse,
    ) -> None:
        fd = _replacing(
            directory, leaf, refuse, lambda: os.open(leaf, _NEW_FILE, 0o600, dir_fd=directory)
        )
        try:
            _copy(source, member.offset_data, member.size, fd)
            os.fchmod(fd, _file_mode(member.mode))
            _give(fd, self.owner)
            _set_mtime(fd, member.mtime, refuse)
        finally:
            os.close(fd)

    def _symlink(
        self, target: str, parent: str, directory: int, leaf: str, refuse: _Refuse
    ) -> None:
        if not target:
            refuse("symlink without a target")
        if target.startswith("/"):
            refuse(f"link to the absolute path {target!r}")
        if _escapes(posixpath.join(parent, target)):
            refuse(f"link to {target!r}, outside the install")
        _replacing(directory, leaf, refuse, lambda: os.symlink(target, leaf, dir_fd=directory))
        _give(leaf, self.owner, directory)

    def _hard_link(self, member: tarfile.TarInfo, path: str, refuse: _Refuse) -> None:
        target = member.linkname
        if target.startswith("/"):
            refuse(f"link to the absolute path {target!r}")
        if _escapes(target):
            refuse(f"link to {target!r}, outside the install")
        source = "/".join(p for p in posixpath.normpath(target).split("/") if p != ".")
        source_parent, _, source_leaf = source.rpartition("/")
        parent, _, leaf = path.rpartition("/")
        # Each lookup may close the least recently used descriptor: keep our own copy.
        directory = os.dup(self._tree.directory(parent, refuse))
        try:
            source_directory = self._tree.existing(
                source_parent, _refuser(member.name, f"link to {target!r}: ")
            )
            if source not in self._regular:
                refuse(f"hard link to {target!r}, {_describe(source_directory, source_leaf)}")
            assert source_directory is not None
            if source != path:  # a file hard-linked to itself (some archivers write one) is it
                _replacing(
                    directory,
                    leaf,
                    refuse,
                    lambda: os.link(
                        source_leaf,
                        leaf,
                        src_dir_fd=source_directory,
                        dst_dir_fd=directory,
                        follow_symlinks=False,
                    ),
                )
            # The header's mode and mtime apply to the shared file, as with tarfile. The
            # name is a regular file we just linked, in a directory only we write to.
            os.chmod(leaf, _file_mode(member.mode), dir_fd=directory)
            _set_mtime(leaf, member.mtime, refuse, directory)
        finally:
            os.close(directory)
        self._regular.add(path)


class _Tree:
    """Descriptors of the directories under the install, each opened from its parent.

    Every descriptor comes from its parent's and one name opened with
    ``O_NOFOLLOW|O_DIRECTORY``, so no lookup ever passes through a symlink. The
    install directory is fresh, private and root-owned while we extract, and we
    never remove or replace a directory, so a cached descriptor keeps meaning
    what its path meant: no re-checks per member.
    """

    def __init__(self, root: Path, owner: tuple[int, int] | None) -> None:
        self._root = os.open(root, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
        self._owner = owner
        self._open: OrderedDict[str, int] = OrderedDict()

    def close(self) -> None:
        for fd in self._open.values():
            os.close(fd)
        self._open.clear()
        os.close(self._root)

    def directory(self, path: str, refuse: _Refuse) -> int:
        """The directory ``path`` (relative, normalised), made as needed, as mkdir -p."""
        fd = self._walk(path, refuse, create=True)
        assert fd is not None
        return fd

    def existing(self, path: str, refuse: _Refuse) -> int | None:
        """The directory ``path`` if it exists."""
        return self._walk(path, refuse, create=False)

    def _walk(self, path: str, refuse: _Refuse, create: bool) -> int | None:
        if not path:
            return self._root
        fd = self._open.get(path)
        if fd is not None:
            self._open.move_to_end(path)
            return fd
        missing = [path]
        ancestor = path.rpartition("/")[0]
        while ancestor and ancestor not in self._open:
            missing.append(ancestor)
            ancestor = ancestor.rpartition("/")[0]
        parent: int | None = self._open[ancestor] if ancestor else self._root
        for step in reversed(missing):
            assert parent is not None
            parent = self._open_child(parent, step, refuse, create)
            if parent is None:
                return None
        return parent

    def _open_child(self, parent: int, path: str, refuse: _Refuse, create: bool) -> int | None:
        name = path.rpartition("/")[2]
        try:
            fd = os.open(name, _DIRECTORY, dir_fd=parent)
        except FileNotFoundError:
            if not create:
                return None
            os.mkdir(name, 0o755, dir_fd=parent)
            fd = os.open(name, _DIRECTORY, dir_fd=parent)
            _give(fd, self._owner)
        except OSError as exc:
            if exc.errno not in (errno.ENOTDIR, errno.ELOOP):
                raise
            if stat.S_ISLNK(_lstat(parent, name)):
                refuse(f"passes through a symlink ({path!r})")
            refuse(f"passes through {path!r}, which is not a directory")
        self._open[path] = fd
        while len(self._open) > OPEN_DIRECTORIES:
            os.close(self._open.popitem(last=False)[1])
        return fd


def _replacing(directory: int, leaf: str, refuse: _Refuse, make: Callable[[], _T]) -> _T:
    """``make()`` the entry ``leaf``; if the name is taken, by anything but a directory,
    unlink that first (tar's "the later member wins"; unlinking follows nothing)."""
    try:
        return make()
    except FileExistsError:
        if stat.S_ISDIR(_lstat(directory, leaf)):
            refuse("replaces a directory an earlier member made")
        os.unlink(leaf, dir_fd=directory)
        return make()


def _give(entry: int | str, owner: tuple[int, int] | None, directory: int | None = None) -> None:
    """Hand a new entry (a descriptor, or a name in ``directory``, never followed) over."""
    if owner is not None:
        os.chown(entry, *owner, dir_fd=directory, follow_symlinks=directory is None)


def _lstat(directory: int, name: str) -> int:
    return os.stat(name, dir_fd=directory, follow_symlinks=False).st_mode


def _describe(directory: int | None, name: str) -> str:
    """Why ``name`` is no hard link source."""
    try:
        mode = _lstat(directory, name) if directory is not None else 0
    except FileNotFoundError:
        mode = 0
    if stat.S_ISLNK(mode):
        return "a symlink"
    if stat.S_ISDIR(mode):
        return "a directory"
    return "not a file extracted before it"


def _escapes(path: str) -> bool:
    """Whether the relative ``path`` leaves its root, taking ``..`` lexically."""
    normal = posixpath.normpath(path)
    return normal == ".." or normal.startswith("../")


def _file_mode(mode: int) -> int:
    """A regular file's mode as tarfile's ``data`` filter makes it (tests hold the two
    together): no high bits, no group/other write, executable only if the owner's is,
    always readable and writable by the owner."""
    mode &= 0o755
    if not mode & 0o100:
        mode &= ~0o111
    return mode | 0o600


def _set_mtime(
    file: int | str, mtime: float, refuse: _Refuse, directory: int | None = None
) -> None:
    try:
        os.utime(file, (mtime, mtime), dir_fd=directory, follow_symlinks=directory is None)
    except (OverflowError, ValueError):
        refuse(f"modification time {mtime} out of range")


def _copy(source: _ChunkReader, offset: int, size: int, fd: int) -> None:
    """``size`` bytes of member data from the tar stream ``source`` into ``fd``."""
    source.seek(offset)  # where the data starts: a no-op unless tarfile skipped something
    source.copy_to(fd, size)


def _refuser(name: str, prefix: str = "") -> _Refuse:
    def refuse(reason: str) -> NoReturn:
        raise ArchiveError(f"artifact refused: {name!r}: {prefix}{reason}")

    return refuse


# -- decompression ------------------------------------------------------------------------

XZ_MEMORY_LIMIT = 256 << 20
"""What an xz stream may make its decoder allocate. Its header chooses the dictionary
size, up to 1.5 GiB, and the decoder allocates it up front: a few bytes of header could
otherwise take that much memory. ``xz -9`` needs 65 MiB to decompress."""

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
            lzma.LZMADecompressor(lzma.FORMAT_XZ, memlimit=XZ_MEMORY_LIMIT) if kind == "xz"
            else bz2.BZ2Decompressor() if kind == "bz2" else None
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


INLINE_BYTES = CHUNK
"""Decompressed by the reading thread itself before a background thread takes over: a
small archive is read by then, and a thread would cost it more than it saves."""


class _ChunkReader:
    """A file-like ``read`` over chunks produced in a background thread.

    Decompression (zlib releases the GIL) then overlaps with writing files, as
    ``tar -xz`` overlaps gzip and tar; the queue bounds memory to a few chunks. The
    first ``INLINE_BYTES`` are made in the reading thread: an artifact of a few
    hundred kilobytes (most of what a fleet deploys) is done before any thread starts.
    """

    def __init__(self, chunks: Iterator[bytes], depth: int = 4) -> None:
        self._chunks = chunks
        self._inline = INLINE_BYTES
        self._queue: queue.Queue[bytes | BaseException | None] = queue.Queue(depth)
        self._buffer = memoryview(b"")
        self._position = 0
        self._done = False
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    def _next(self) -> bytes | BaseException | None:
        """The next chunk, None at the end, or the producer's error."""
        if self._thread is None and self._inline > 0:
            try:
                chunk = next(self._chunks, None)
            except Exception as exc:
                return exc
            self._inline -= len(chunk or b"")
            return chunk
        if self._thread is None:
            self._thread = threading.Thread(
                target=self._produce, args=(self._chunks,), name="decompress", daemon=True
            )
            self._thread.start()
        return self._queue.get()

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

    def tell(self) -> int:
        return self._position

    def seek(self, position: int) -> None:
        """Skip forward to ``position`` (tarfile skips the padding after a member's data)."""
        while position > self._position:
            if not self.read(min(position - self._position, CHUNK)):
                raise tarfile.ReadError("unexpected end of data")
        if position < self._position:
            raise tarfile.ReadError("seeking backward in a stream")

    def read(self, size: int = -1) -> bytes:
        """``size`` bytes (all that is left with -1), fewer only at the end: tarfile
        reads a header in one call and takes a short read for a truncated archive."""
        parts = []
        wanted = size if size >= 0 else sys.maxsize
        while wanted > 0 and self._fill():
            part = self._take(wanted)
            parts.append(bytes(part))
            wanted -= len(part)
        return parts[0] if len(parts) == 1 else b"".join(parts)

    def copy_to(self, fd: int, size: int) -> None:
        """Write the next ``size`` bytes to ``fd`` straight from the chunks, uncopied."""
        while size > 0:
            if not self._fill():
                raise tarfile.ReadError("unexpected end of data")
            view = self._take(size)
            size -= len(view)
            while view:
                view = view[os.write(fd, view) :]

    def _take(self, size: int) -> memoryview:
        part, self._buffer = self._buffer[:size], self._buffer[size:]
        self._position += len(part)
        return part

    def _fill(self) -> bool:
        """Whether there are bytes to take (False at the end of the stream)."""
        while not self._buffer and not self._done:
            item = self._next()
            if item is None:
                self._done = True
            elif isinstance(item, BaseException):
                self._done = True
                raise item
            else:
                self._buffer = memoryview(item)
        return bool(self._buffer)

    def close(self) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join()


@contextlib.contextmanager
def _decompressed(raw: BinaryIO, limit: int) -> Iterator[_ChunkReader]:
    reader = _ChunkReader(_decompressed_chunks(raw, limit))
    try:
        yield reader
    finally:
        reader.close()
