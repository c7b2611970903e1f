"""A corpus of tarballs built to escape the install directory or exhaust memory.

Each escape is aimed at ``sentinel/``, beside the install directory (``dest/``):
every refusal is checked to leave everything outside ``dest/`` as it was. The link
chains are CVE-2025-4517's shape, which ``os.path.realpath`` cannot resolve (the
resolved path outgrows PATH_MAX) while the kernel follows it; they escaped with
tarfile's ``data`` filter.
"""

from __future__ import annotations

import functools
import io
import lzma
import os
import posixpath
import shutil
import struct
import subprocess
import sys
import tarfile
import threading
import zlib
from collections.abc import Callable
from pathlib import Path

import pytest
from preparer_support import ROOT, member, snapshot, write_tar

from agents.system.archive import MAX_EXTENDED_HEADER, ArchiveError, Limits, extract

LIMITS = Limits(max_bytes=10 << 20, max_files=1000)
Members = list[tuple[tarfile.TarInfo, bytes]]


@pytest.fixture
def sandbox(tmp_path: Path) -> Path:
    (tmp_path / "dest").mkdir()
    (tmp_path / "sentinel").mkdir()
    (tmp_path / "sentinel" / "target").write_text("precious")
    return tmp_path


def refused(sandbox: Path, members: Members) -> str:
    """The refusal's message, once it is certain that nothing outside ``dest/`` changed."""
    artifact = sandbox / "artifact.tar.gz"
    write_tar(artifact, members)
    before = snapshot(sandbox, skip=sandbox / "dest")
    try:
        extract(artifact, sandbox / "dest", LIMITS)
    except ArchiveError as exc:
        message: str | None = str(exc)
    else:
        message = None
    assert snapshot(sandbox, skip=sandbox / "dest") == before, "something escaped"
    assert (sandbox / "sentinel" / "target").read_text() == "precious"
    assert os.listdir(sandbox / "sentinel") == ["target"]
    assert message is not None, "the artifact was extracted"
    return message


def extracted(sandbox: Path, members: Members) -> Path:
    artifact = sandbox / "artifact.tar.gz"
    write_tar(artifact, members)
    extract(artifact, sandbox / "dest", LIMITS)
    assert (sandbox / "sentinel" / "target").read_text() == "precious"
    return sandbox / "dest"


# -- the PATH_MAX symlink chain ------------------------------------------------------------

LONG = "d" * 247
STEPS = "abcdefghijklmnop"


def path_max_chain(published: bool) -> tuple[Members, str]:
    """The chain, and a link target that the kernel resolves to the install directory.

    Directories ``LONG/LONG/...`` 16 deep, with a symlink ``a`` -> ``LONG`` beside the
    first, ``b`` -> ``LONG`` inside it, and so on: ``a/b/.../p`` names the deepest
    directory, but spelled out it is 16 * 248 bytes long. A symlink ``top`` there
    points 16 levels back up, so ``a/b/.../p/top`` is the install directory to the
    kernel, while ``realpath`` gives up past PATH_MAX and takes the rest lexically:
    ``a/b/.../p/top/..`` still looks inside.

    The ``published`` proof of concept names ``top`` through the links
    (``a/b/.../p/llll...``), the only way tarfile could create it; that member is
    where we refuse it. Otherwise ``top`` is named along the real directories, so
    the whole chain is extracted and only a later member that would use it can be
    refused.
    """
    members: Members = []
    parent = ""
    for step in STEPS:
        members.append(member(posixpath.join(parent, LONG), type=tarfile.DIRTYPE, mode=0o755))
        members.append(member(posixpath.join(parent, step), type=tarfile.SYMTYPE, linkname=LONG))
        parent = posixpath.join(parent, LONG)
    top = "l" * 254 if published else "t" * 120  # the member name stays within PATH_MAX
    name = posixpath.join(*STEPS, top) if published else posixpath.join(parent, top)
    members.append(member(name, type=tarfile.SYMTYPE, linkname="../" * len(STEPS)))
    return members, posixpath.join(*STEPS, top)


def link(name: str, target: str) -> tuple[tarfile.TarInfo, bytes]:
    return member(name, type=tarfile.SYMTYPE, linkname=target)


def hard(name: str, target: str) -> tuple[tarfile.TarInfo, bytes]:
    return member(name, type=tarfile.LNKTYPE, linkname=target)


def test_the_chain_is_followed_by_the_kernel_and_outruns_realpath(sandbox: Path) -> None:
    """The corpus is what it claims, and legal on its own: extracted, ``install``
    is the install directory to the kernel, and something else to realpath."""
    chain, install = path_max_chain(published=False)
    dest = extracted(sandbox, chain)
    fd = os.open(dest, os.O_RDONLY | os.O_DIRECTORY)
    try:
        assert os.stat(install, dir_fd=fd).st_ino == dest.stat().st_ino
    finally:
        os.close(fd)
    assert os.path.realpath(dest / install) != str(dest)


# Each: the members after the chain (given the chain's name for the install directory),
# and why they are refused when the chain itself was extracted.
ESCAPES: dict[str, tuple[Callable[[str], Members], str]] = {
    "file-through-an-escaping-link": (
        lambda install: [link("escape", f"{install}/../sentinel"),
                         member("escape/pwned", b"pwned")],
        "'escape/pwned': passes through a symlink ('escape')",
    ),
    "hard-link-through-an-escaping-link": (  # the published proof of concept's own payload
        lambda install: [link("escape", f"{install}/../sentinel"),
                         hard("flaglink", "escape/target"), member("flaglink", b"overwritten")],
        "'flaglink': link to 'escape/target': passes through a symlink ('escape')",
    ),
    "hard-link-through-the-chain": (
        lambda install: [hard("h", f"{install}/../sentinel/target"), member("h", b"overwritten")],
        "passes through a symlink ('a')",
    ),
    "hard-link-to-an-escaping-symlink": (
        lambda install: [link("s", f"{install}/../sentinel/target"), hard("h", "s"),
                         member("h", b"overwritten")],
        "'h': hard link to 's', a symlink",
    ),
    "directory-replaced-by-an-escaping-link": (
        lambda install: [member("d", type=tarfile.DIRTYPE), member("d/inside", b"x"),
                         link("d", f"{install}/../sentinel"), member("d/pwned", b"pwned")],
        "'d': replaces a directory an earlier member made",
    ),
}  # fmt: skip


@pytest.mark.parametrize("form", ["published", "spelled-out"])
@pytest.mark.parametrize("escape", list(ESCAPES))
def test_escapes_through_a_path_max_chain_are_refused(
    sandbox: Path, escape: str, form: str
) -> None:
    chain, install = path_max_chain(published=form == "published")
    payload, reason = ESCAPES[escape]
    message = refused(sandbox, [*chain, *payload(install)])
    if form == "published":
        top = install.rpartition("/")[2]
        reason = f"'{'/'.join(STEPS)}/{top}': passes through a symlink ('a')"
    assert reason in message


# -- links and repeated names, without the chain -----------------------------------------


@pytest.mark.parametrize(
    ("members", "reason"),
    [
        (
            [member("s", type=tarfile.SYMTYPE, linkname="sub"), member("sub/x", b"x"),
             member("s/f", b"x")],
            "'s/f': passes through a symlink ('s')",
        ),
        (
            [member("sub/x", b"x"), member("sub", type=tarfile.SYMTYPE, linkname="."),
             member("sub/f", b"x")],
            "'sub': replaces a directory an earlier member made",
        ),
        (
            [member("d", type=tarfile.DIRTYPE), member("d", b"file")],
            "'d': replaces a directory an earlier member made",
        ),
        (
            [member("d", type=tarfile.DIRTYPE), member("h0", b"x"),
             member("d", type=tarfile.LNKTYPE, linkname="h0")],
            "'d': replaces a directory an earlier member made",
        ),
        (
            [member("f", b"x"), member("f", type=tarfile.DIRTYPE)],
            "'f': a directory where an earlier member put a file or link",
        ),
        (
            [member("s", type=tarfile.SYMTYPE, linkname="."), member("s", type=tarfile.DIRTYPE)],
            "'s': a directory where an earlier member put a file or link",
        ),
        (
            [member("f", b"x"), member("f/g", b"x")],
            "'f/g': passes through 'f', which is not a directory",
        ),
        (
            [member("s", type=tarfile.SYMTYPE, linkname="../sentinel/target"),
             member("h", type=tarfile.LNKTYPE, linkname="s")],
            "'s': link to '../sentinel/target', outside the install",
        ),
        (
            [member("s", type=tarfile.SYMTYPE, linkname="f"), member("f", b"x"),
             member("h", type=tarfile.LNKTYPE, linkname="s")],
            "'h': hard link to 's', a symlink",
        ),
        (
            [member("d", type=tarfile.DIRTYPE), member("h", type=tarfile.LNKTYPE, linkname="d")],
            "'h': hard link to 'd', a directory",
        ),
        (
            [member("h", type=tarfile.LNKTYPE, linkname="later"), member("later", b"x")],
            "'h': hard link to 'later', not a file extracted before it",
        ),
        (
            [member("f", type=tarfile.LNKTYPE, linkname="f")],
            "'f': hard link to 'f', not a file extracted before it",
        ),
        (
            [member("s", type=tarfile.SYMTYPE, linkname="sub"), member("sub/f", b"x"),
             member("h", type=tarfile.LNKTYPE, linkname="s/f")],
            "'h': link to 's/f': passes through a symlink ('s')",
        ),
        (
            [member("f", b"x"), member("s", type=tarfile.SYMTYPE, linkname="a/../../sentinel")],
            "'s': link to 'a/../../sentinel', outside the install",
        ),
        ([member("s", type=tarfile.SYMTYPE, linkname="")], "'s': symlink without a target"),
        ([member("a/" * 2100 + "f", b"x")], "longer than 4096"),
    ],
    ids=[
        "file-under-a-symlink", "directory-replaced-by-a-symlink", "directory-replaced-by-a-file",
        "directory-replaced-by-a-hard-link", "file-replaced-by-a-directory",
        "symlink-replaced-by-a-directory", "file-under-a-file", "symlink-out-then-hard-link",
        "hard-link-to-a-symlink", "hard-link-to-a-directory", "hard-link-to-a-later-file",
        "hard-link-to-itself-first", "hard-link-source-under-a-symlink", "symlink-dotdot-out",
        "symlink-empty", "name-too-long",
    ],
)  # fmt: skip
def test_hostile_links_and_names_are_refused(sandbox: Path, members: Members, reason: str) -> None:
    assert reason in refused(sandbox, members)


def test_a_repeated_name_replaces_the_earlier_entry_without_writing_through_it(
    sandbox: Path,
) -> None:
    dest = extracted(
        sandbox,
        [
            member("f", b"first"),
            member("f", b"second", mode=0o755),
            member("kept", b"kept"),
            member("l", type=tarfile.SYMTYPE, linkname="kept"),
            member("l", b"replaces the link"),
            member("old", b"old"),
            member("h", type=tarfile.LNKTYPE, linkname="old"),
            member("old", b"new"),
            member("g", b"file"),
            member("g", type=tarfile.SYMTYPE, linkname="kept"),
        ],
    )
    assert (dest / "f").read_bytes() == b"second"
    assert (dest / "f").stat().st_mode & 0o777 == 0o755
    assert not (dest / "l").is_symlink() and (dest / "l").read_bytes() == b"replaces the link"
    assert (dest / "kept").read_bytes() == b"kept"  # the link was not written through
    assert (dest / "old").read_bytes() == b"new"
    assert (dest / "h").read_bytes() == b"old"  # nor was the earlier hard link
    assert os.readlink(dest / "g") == "kept"


def test_a_file_hard_linked_to_itself_is_that_file(sandbox: Path) -> None:
    """Some archivers store a file, then a hard link of the same name to itself."""
    dest = extracted(
        sandbox,
        [
            member("bin", type=tarfile.DIRTYPE),
            member("bin/run", b"#!/bin/sh\n", mode=0o755),
            member("bin/run", type=tarfile.LNKTYPE, linkname="bin/run", mode=0o755),
            member("./bin/run", type=tarfile.LNKTYPE, linkname="./bin//run", mode=0o755),
        ],
    )
    run = dest / "bin" / "run"
    assert run.read_bytes() == b"#!/bin/sh\n"
    assert run.stat().st_nlink == 1
    assert run.stat().st_mode & 0o777 == 0o755


def test_archives_made_by_gnu_tar_are_extracted(sandbox: Path) -> None:
    """Real tar output: a leading ``./``, long names, hard links, relative symlinks."""
    if shutil.which("tar") is None:
        pytest.fail("tar(1) is part of the base system the preparer runs on")
    tree = sandbox / "tree"
    long_dir = tree / ("x" * 120) / ("y" * 120)
    long_dir.mkdir(parents=True)
    (long_dir / ("z" * 200)).write_bytes(b"deep")
    (long_dir / ("z" * 200)).chmod(0o644)
    (tree / "bin").mkdir()
    (tree / "bin" / "run").write_bytes(b"#!/bin/sh\n")
    (tree / "bin" / "run").chmod(0o755)
    os.link(tree / "bin" / "run", tree / "bin" / "again")
    (tree / "lib").symlink_to("bin")
    umask = os.umask(0o022)
    os.umask(umask)
    for directory in (tree, tree / "bin", long_dir, long_dir.parent):
        directory.chmod(0o755 & ~umask)  # what extraction makes of any directory
    for fmt in ("gnu", "pax"):
        dest = sandbox / f"dest-{fmt}"
        dest.mkdir()
        artifact = sandbox / f"{fmt}.tar.gz"
        subprocess.run(
            ["tar", f"--format={fmt}", "-czf", str(artifact), "-C", str(tree), "."], check=True
        )
        extract(artifact, dest, LIMITS)
        assert _listing(dest) == _listing(tree), fmt
        assert (dest / "bin" / "again").stat().st_ino == (dest / "bin" / "run").stat().st_ino


def _listing(root: Path) -> dict[str, tuple[int, bytes]]:
    """Every path under ``root``: its mode, and its content or link target."""
    listing = {}
    for path in root.rglob("*"):
        mode = path.lstat().st_mode
        content = (
            os.readlink(path).encode() if path.is_symlink()
            else path.read_bytes() if path.is_file() else b""
        )  # fmt: skip
        listing[str(path.relative_to(root))] = (mode, content)
    return listing


# -- extended header bombs: refused from their declared size, in bounded memory -----------

BOMB = 512 << 20
"""Declared bytes of each bomb: gigabytes of memory for a tarfile that reads it."""
PEAK_RSS_LIMIT = 200 << 20

_GZIP_HEADER = b"\x1f\x8b\x08\x00\x00\x00\x00\x00\x00\xff"


def _gzip_member(data: bytes) -> bytes:
    compress = zlib.compressobj(9, zlib.DEFLATED, -zlib.MAX_WBITS)
    body = compress.compress(data) + compress.flush()
    return _GZIP_HEADER + body + struct.pack("<II", zlib.crc32(data), len(data) & 0xFFFFFFFF)


@functools.cache
def _gzip_repeated(first: bytes, segment: bytes, size: int) -> bytes:
    """A well-formed gzip member of ``first`` then ``segment`` repeated up to ``size``
    bytes, made without holding it: ``segment`` is compressed once with a full flush
    (which references nothing before it) and the compressed bytes are repeated."""
    compress = zlib.compressobj(9, zlib.DEFLATED, -zlib.MAX_WBITS)
    head = compress.compress(first) + compress.flush(zlib.Z_FULL_FLUSH)
    compress = zlib.compressobj(9, zlib.DEFLATED, -zlib.MAX_WBITS)
    repeated = compress.compress(segment) + compress.flush(zlib.Z_FULL_FLUSH)
    times, rest = divmod(size - len(first), len(segment))
    assert rest == 0
    crc = zlib.crc32(first)
    for _ in range(times):
        crc = zlib.crc32(segment, crc)
    final = zlib.compressobj(9, zlib.DEFLATED, -zlib.MAX_WBITS).flush()
    trailer = struct.pack("<II", crc, size & 0xFFFFFFFF)
    return _GZIP_HEADER + head + repeated * times + final + trailer


def _header(name: str, kind: bytes, size: int) -> bytes:
    info = tarfile.TarInfo(name)
    info.type, info.size = kind, size
    return info.tobuf(tarfile.GNU_FORMAT)


def _with_checksum(block: bytearray) -> bytes:
    block[148:156] = b" " * 8
    block[148:156] = b"%06o\0 " % sum(block)
    return bytes(block)


_END = _gzip_member(_header("after", tarfile.REGTYPE, 0) + bytes(1024))
_MEGABYTE_OF_ZEROS = bytes(1 << 20)


def _extended_header_bomb(kind: bytes) -> bytes:
    """An extended header declaring ``BOMB`` bytes, and holding them."""
    head = _gzip_member(_header("././@LongLink", kind, BOMB))
    return head + _gzip_repeated(b"", _MEGABYTE_OF_ZEROS, BOMB) + _END


def _old_gnu_sparse_bomb() -> bytes:
    """A GNU sparse member whose chain of extension blocks (each "one more follows")
    tarfile collects into a list until the chain ends."""
    header = bytearray(_header("sparse", tarfile.GNUTYPE_SPARSE, 0))
    header[482] = 1  # an extension block follows
    extension = bytearray(b"%011o\0%011o\0" % (1, 1) * 21 + bytes(8))
    extension[504] = 1
    last = bytes(512)
    return (
        _gzip_member(_with_checksum(header))
        + _gzip_repeated(b"", bytes(extension) * 2048, BOMB)
        + _gzip_member(last + bytes(1024))
    )


def _pax_sparse_bomb() -> bytes:
    """A pax (GNU 1.0) sparse file whose map at the start of its data announces a
    trillion entries: tarfile reads them into a list until it has them all."""
    info = tarfile.TarInfo("sparse")
    info.size = BOMB
    info.pax_headers = {
        "GNU.sparse.major": "1",
        "GNU.sparse.minor": "0",
        "GNU.sparse.name": "sparse",
        "GNU.sparse.realsize": "1",
    }
    head = _gzip_member(info.tobuf(tarfile.PAX_FORMAT))
    first = b"1000000000000\n" + b"0\n" * (((1 << 20) - 14) // 2)
    return head + _gzip_repeated(first, b"1\n" * (1 << 19), BOMB) + _END


BOMBS = {
    "gnu-long-name": lambda: _extended_header_bomb(tarfile.GNUTYPE_LONGNAME),
    "gnu-long-link": lambda: _extended_header_bomb(tarfile.GNUTYPE_LONGLINK),
    "pax": lambda: _extended_header_bomb(tarfile.XHDTYPE),
    "pax-global": lambda: _extended_header_bomb(tarfile.XGLTYPE),
    "solaris": lambda: _extended_header_bomb(tarfile.SOLARIS_XHDTYPE),
    "gnu-sparse": _old_gnu_sparse_bomb,
    "pax-sparse": _pax_sparse_bomb,
}

_EXTRACT_IN_A_CHILD = """
import sys
from pathlib import Path
from agents.system.archive import ArchiveError, Limits, extract
try:
    extract(Path(sys.argv[1]), Path(sys.argv[2]), Limits(max_bytes=4 << 30, max_files=100_000))
except ArchiveError as exc:
    print(exc)
else:
    print("extracted")
# VmHWM is this process's own peak: wait4's ru_maxrss also counts the parent's RSS that a
# fork copied before the exec, which made a large test process fail this check.
status = Path("/proc/self/status").read_text()
print(next(line.split()[1] for line in status.splitlines() if line.startswith("VmHWM:")))
"""


@pytest.mark.parametrize("kind", list(BOMBS))
def test_an_extended_header_bomb_is_refused_in_bounded_memory(sandbox: Path, kind: str) -> None:
    """Extracted in a child process under the preparer's default limits (4 GiB, 100,000
    files: the decompressed-bytes counter alone would let the bomb through), with the
    child's own peak RSS (VmHWM)."""
    artifact = sandbox / f"{kind}.tar.gz"
    artifact.write_bytes(BOMBS[kind]())
    assert artifact.stat().st_size < 2 << 20
    proc = subprocess.Popen(
        [sys.executable, "-c", _EXTRACT_IN_A_CHILD, str(artifact), str(sandbox / "dest")],
        cwd=ROOT,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
    )
    assert proc.stdout is not None and proc.stderr is not None
    hang_guard = threading.Timer(120, proc.kill)  # a tarfile that loops on a bomb
    hang_guard.start()
    out, err = proc.stdout.read().decode(), proc.stderr.read().decode()
    hang_guard.cancel()
    proc.wait()
    proc.stdout.close()
    proc.stderr.close()
    assert proc.returncode == 0, err
    verdict, peak_kib = out.splitlines()
    assert verdict.startswith("artifact refused:"), out + err
    assert ("sparse file" if "sparse" in kind else f"at most {MAX_EXTENDED_HEADER}") in verdict
    assert int(peak_kib) * 1024 < PEAK_RSS_LIMIT, f"peak RSS {peak_kib} KiB"
    assert os.listdir(sandbox / "dest") == []


def _pax_header(records: dict[str, str], kind: bytes = tarfile.XHDTYPE) -> bytes:
    data = b""
    for key, value in records.items():
        record = f" {key}={value}\n".encode()
        length = len(record) + 1
        while len(str(length)) + len(record) != length:  # the length counts itself
            length = len(str(length)) + len(record)
        data += str(length).encode() + record
    padding = bytes(-len(data) % 512)
    return _header("././@PaxHeader", kind, len(data)) + data + padding


def _raw(sandbox: Path, blocks: bytes) -> Path:
    artifact = sandbox / "raw.tar"
    artifact.write_bytes(blocks + bytes(1024))
    return artifact


def _refused_raw(sandbox: Path, blocks: bytes) -> str:
    with pytest.raises(ArchiveError) as caught:
        extract(_raw(sandbox, blocks), sandbox / "dest", LIMITS)
    return str(caught.value)


def test_a_chain_of_extended_headers_is_refused(sandbox: Path) -> None:
    headers = b"".join(_pax_header({f"comment{i}": "x" * 1000}) for i in range(9))
    message = _refused_raw(sandbox, headers + _header("f", tarfile.REGTYPE, 0))
    assert message == "artifact refused: more than 8 extended headers for one member"


def test_global_headers_are_bounded_over_the_whole_archive(sandbox: Path) -> None:
    one = _pax_header({"comment": "x" * (40 << 10)}, tarfile.XGLTYPE)
    message = _refused_raw(
        sandbox, one + _header("f1", tarfile.REGTYPE, 0) + one + _header("f2", tarfile.REGTYPE, 0)
    )
    assert (
        message == f"artifact refused: more than {MAX_EXTENDED_HEADER} bytes of pax global headers"
    )


@pytest.mark.parametrize(
    "records",
    [
        {"GNU.sparse.map": "0,1", "GNU.sparse.name": "s", "GNU.sparse.realsize": "1"},
        {"GNU.sparse.size": "1", "GNU.sparse.offset": "0", "GNU.sparse.numbytes": "1"},
    ],
    ids=["0.1", "0.0"],
)
def test_every_pax_sparse_format_is_refused(sandbox: Path, records: dict[str, str]) -> None:
    message = _refused_raw(sandbox, _pax_header(records) + _header("s", tarfile.REGTYPE, 0))
    assert "sparse file" in message


def test_extended_headers_of_ordinary_size_are_read(sandbox: Path) -> None:
    """Long names and links (GNU and pax), pax metadata: what real archives carry."""
    name = "n" * 100 + "/" + "m" * 200
    link = "l" * 150
    for fmt in (tarfile.GNU_FORMAT, tarfile.PAX_FORMAT):
        dest = sandbox / f"dest{fmt}"
        dest.mkdir()
        artifact = sandbox / f"long{fmt}.tar"
        buffer = io.BytesIO()
        with tarfile.open(fileobj=buffer, mode="w", format=fmt) as tar:
            info = tarfile.TarInfo(name)
            info.size = 4
            tar.addfile(info, io.BytesIO(b"data"))
            info = tarfile.TarInfo(link)
            info.type, info.linkname = tarfile.SYMTYPE, name
            tar.addfile(info)
        artifact.write_bytes(buffer.getvalue())
        extract(artifact, dest, LIMITS)
        assert (dest / name).read_bytes() == b"data"
        assert os.readlink(dest / link) == name


def test_an_xz_stream_asking_for_a_huge_dictionary_is_refused(sandbox: Path) -> None:
    """An xz block header names the decoder's dictionary size, up to 4 GiB, in one byte;
    patching it (and the header's CRC) makes a tiny artifact that would claim that much."""
    plain = io.BytesIO()
    with tarfile.open(fileobj=plain, mode="w") as tar:
        info, data = member("a", b"hi")
        tar.addfile(info, io.BytesIO(data))
    filters = [{"id": lzma.FILTER_LZMA2, "dict_size": 1 << 20}]
    xz = bytearray(lzma.compress(plain.getvalue(), format=lzma.FORMAT_XZ, filters=filters))
    assert xz[12:16] == b"\x02\x00\x21\x01"  # block header: 12 bytes, one LZMA2 filter
    xz[16] = 40  # the largest dictionary the format can name
    xz[20:24] = struct.pack("<I", zlib.crc32(bytes(xz[12:20])))
    archive = sandbox / "artifact.tar.xz"
    archive.write_bytes(bytes(xz))
    with pytest.raises(ArchiveError, match=r"xz stream needs more than 256 MiB"):
        extract(archive, sandbox / "dest", Limits(1 << 30, 100))
