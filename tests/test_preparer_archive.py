"""Hostile tarballs: each refused, nothing written outside the install directory."""

from __future__ import annotations

import gzip
import io
import os
import pwd
import stat
import tarfile
from pathlib import Path

import pytest
from preparer_support import member, put_app, snapshot, tree_tarball, write_tar
from runit_support import require_root

from agents.preparer.agent import Preparer
from agents.preparer.apply import Settings
from agents.runtime import Runtime, RuntimeOptions
from agents.system import archive
from agents.system.archive import ArchiveError, Limits, extract
from agents.system.fetch import FetchOptions
from agents.system.layout import MARKER_NAME, AppLayout
from intent.store import IntentStore
from intent.store.sqlite import SqliteStore

LIMITS = Limits(max_bytes=10 << 20, max_files=1000)
NODE = "web1"


@pytest.fixture
def sandbox(tmp_path: Path) -> Path:
    """``outside/`` holds a file an attacker would like to overwrite; ``dest/`` is the
    (fresh, empty) directory an artifact is extracted into."""
    (tmp_path / "outside").mkdir()
    (tmp_path / "outside" / "target").write_text("precious")
    (tmp_path / "dest").mkdir()
    return tmp_path


def refuse(sandbox: Path, artifact: Path, limits: Limits = LIMITS) -> str:
    before = snapshot(sandbox, skip=sandbox / "dest")
    with pytest.raises(ArchiveError) as caught:
        extract(artifact, sandbox / "dest", limits, reserved={MARKER_NAME})
    assert snapshot(sandbox, skip=sandbox / "dest") == before, "something escaped"
    assert (sandbox / "outside" / "target").read_text() == "precious"
    return str(caught.value)


def hostile(sandbox: Path, members: list[tuple[tarfile.TarInfo, bytes]]) -> Path:
    path = sandbox / "artifact.tar.gz"
    write_tar(path, members)
    return path


def test_a_well_formed_artifact_is_extracted_with_safe_modes(sandbox: Path) -> None:
    artifact = hostile(
        sandbox,
        [
            member("bin", type=tarfile.DIRTYPE, mode=0o777, mtime=1_000_000),
            member("bin/run", b"#!/bin/sh\n", mode=0o777, mtime=2_000_000),
            member("etc/conf", b"x=1", mode=0o666),
            member("etc/private", b"k", mode=0o440),
            member("lib", type=tarfile.SYMTYPE, linkname="bin"),
            member("bin/hard", type=tarfile.LNKTYPE, linkname="bin/run", mode=0o777, mtime=2e6),
        ],
    )
    result = extract(artifact, sandbox / "dest", LIMITS)
    dest = sandbox / "dest"
    assert (dest / "bin" / "run").read_bytes() == b"#!/bin/sh\n"
    assert stat.S_IMODE((dest / "bin" / "run").stat().st_mode) == 0o755  # no world write
    assert stat.S_IMODE((dest / "etc" / "conf").stat().st_mode) == 0o644
    assert stat.S_IMODE((dest / "etc" / "private").stat().st_mode) == 0o640  # owner rw
    assert stat.S_IMODE((dest / "bin").stat().st_mode) == 0o755 & ~_umask()
    assert (dest / "bin" / "run").stat().st_mtime == 2_000_000
    assert (dest / "bin").stat().st_mtime == 1_000_000  # set after its files were written
    assert os.readlink(dest / "lib") == "bin"
    assert (dest / "bin" / "hard").stat().st_ino == (dest / "bin" / "run").stat().st_ino
    assert result.files == 6


def _umask() -> int:
    mask = os.umask(0o022)
    os.umask(mask)
    return mask


@pytest.mark.parametrize(
    ("members", "reason"),
    [
        ([member("../evil", b"x")], "'..'"),
        (
            [member("bin", type=tarfile.DIRTYPE),
             member("lib", type=tarfile.SYMTYPE, linkname="bin"),
             member("lib/through-link", b"x")],
            "passes through a symlink ('lib')",
        ),
        ([member("a/../../evil", b"x")], "'..'"),
        ([member("/tmp/evil-absolute", b"x")], "absolute path"),
        (
            [member("link", type=tarfile.SYMTYPE, linkname="../outside"),
             member("link/target", b"overwritten")],
            "outside the install",
        ),
        (
            [member("link", type=tarfile.SYMTYPE, linkname="/etc"),
             member("link/evil", b"x")],
            "absolute path",
        ),
        (
            [member("sub", type=tarfile.DIRTYPE),
             member("sub/up", type=tarfile.SYMTYPE, linkname="../.."),
             member("sub/up/outside/target", b"overwritten")],
            "outside the install",
        ),
        (
            [member("hard", type=tarfile.LNKTYPE, linkname="../outside/target")],
            "'../outside/target', outside the install",
        ),
        ([member("dev", type=tarfile.CHRTYPE, devmajor=1, devminor=3)], "device file"),
        ([member("blk", type=tarfile.BLKTYPE, devmajor=7, devminor=0)], "device file"),
        ([member("pipe", type=tarfile.FIFOTYPE)], "fifo"),
        ([member("suid", b"#!/bin/sh\n", mode=0o4755)], "setuid/setgid"),
        ([member("sgid", b"#!/bin/sh\n", mode=0o2755)], "setuid/setgid"),
        ([member(MARKER_NAME, b'{"sha256": "forged"}')], "reserved name"),
        ([member("./" + MARKER_NAME, b'{"sha256": "forged"}')], "reserved name"),
        ([member(MARKER_NAME + "/x", b"x")], "reserved name"),
    ],
    ids=[
        "dotdot", "symlink-inside-then-file-through-it", "dotdot-inside-path", "absolute",
        "symlink-out-then-file-through-it",
        "absolute-symlink-then-file", "symlink-chain-up", "hardlink-out", "char-device",
        "block-device", "fifo", "setuid", "setgid", "forged-marker", "forged-marker-dot",
        "under-the-marker",
    ],
)  # fmt: skip
def test_hostile_member_is_refused(
    sandbox: Path, members: list[tuple[tarfile.TarInfo, bytes]], reason: str
) -> None:
    message = refuse(sandbox, hostile(sandbox, members))
    assert message.startswith("artifact refused:")
    assert reason in message


def test_gzip_bomb_is_refused_by_declared_size(sandbox: Path) -> None:
    artifact = sandbox / "bomb.tar.gz"
    size = 200 << 20
    with (
        gzip.open(artifact, "wb", compresslevel=1) as gz,
        tarfile.open(fileobj=gz, mode="w|") as tar,
    ):
        info = tarfile.TarInfo("zeros")
        info.size = size
        tar.addfile(info, _Zeros(size))
    assert artifact.stat().st_size < 2 << 20  # it is a bomb: tiny outside, huge inside
    message = refuse(sandbox, artifact)
    assert "more than 10485760 bytes" in message
    assert sum(p.stat().st_size for p in (sandbox / "dest").rglob("*")) == 0


def test_too_many_files_is_refused(sandbox: Path) -> None:
    artifact = hostile(sandbox, [member(f"f{i}") for i in range(50)])
    assert "more than 20 files" in refuse(sandbox, artifact, Limits(10 << 20, 20))


def test_headers_beyond_the_allowance_are_stopped_by_the_stream_limit(sandbox: Path) -> None:
    """Each pax header is within its own cap, but together they carry far more bytes
    than the members' allowance: the decompressed-bytes counter stops the stream."""
    artifact = sandbox / "pax.tar.gz"
    with tarfile.open(artifact, "w:gz", format=tarfile.PAX_FORMAT) as tar:
        for i in range(30):
            info = tarfile.TarInfo(f"small{i}")
            info.pax_headers = {"comment": "z" * (60 << 10)}
            tar.addfile(info, io.BytesIO(b""))
    message = refuse(sandbox, artifact, Limits(max_bytes=1 << 20, max_files=100))
    assert "decompresses to more than" in message


def test_corrupt_and_truncated_archives_are_refused(sandbox: Path) -> None:
    good = sandbox / "good.tar.gz"
    tree_tarball(good, {f"f{i}": os.urandom(20_000) for i in range(5)})
    truncated = sandbox / "truncated.tar.gz"
    truncated.write_bytes(good.read_bytes()[: good.stat().st_size // 2])
    assert "not a valid tar archive" in refuse(sandbox, truncated)
    garbage = sandbox / "garbage.tar.gz"
    garbage.write_bytes(b"\x1f\x8b" + os.urandom(5000))
    assert "not a valid tar archive" in refuse(sandbox, garbage)


@pytest.mark.parametrize("mode", ["w:", "w:xz", "w:bz2"])
def test_uncompressed_xz_and_bzip2_artifacts_are_accepted(sandbox: Path, mode: str) -> None:
    artifact = sandbox / "artifact"
    write_tar(artifact, [member("hello", b"world")], mode=mode)
    extract(artifact, sandbox / "dest", LIMITS)
    assert (sandbox / "dest" / "hello").read_bytes() == b"world"


def test_concatenated_gzip_members_are_one_stream(sandbox: Path) -> None:
    raw = io.BytesIO()
    with tarfile.open(fileobj=raw, mode="w") as tar:
        for name in ("a", "b"):
            info = tarfile.TarInfo(name)
            info.size = 1
            tar.addfile(info, io.BytesIO(name.encode()))
    data = raw.getvalue()
    artifact = sandbox / "multi.tar.gz"
    artifact.write_bytes(gzip.compress(data[:1024]) + gzip.compress(data[1024:]))
    extract(artifact, sandbox / "dest", LIMITS)
    assert (sandbox / "dest" / "b").read_bytes() == b"b"


def test_every_entry_is_made_the_owners_and_the_directory_itself_stays_ours(
    sandbox: Path,
) -> None:
    """Files, directories (listed or implied), symlinks and hard links change hands as
    they are made; ``dest`` itself is the caller's to open last."""
    require_root()  # chown needs root; CI (root) fails rather than skips
    nobody = pwd.getpwnam("nobody")
    artifact = hostile(
        sandbox,
        [
            member("bin", type=tarfile.DIRTYPE, mode=0o755),
            member("bin/run", b"#!/bin/sh\n", mode=0o755),
            member("lib/deep/mod.py", b"x = 1"),
            member("lib/link", type=tarfile.SYMTYPE, linkname="deep/mod.py"),
            member("bin/again", type=tarfile.LNKTYPE, linkname="bin/run"),
        ],
    )
    dest = sandbox / "dest"
    dest.chmod(0o700)
    extract(artifact, dest, LIMITS, owner=(nobody.pw_uid, nobody.pw_gid))
    entries = list(dest.rglob("*"))
    assert len(entries) == 7
    for path in entries:
        st = path.lstat()
        assert (st.st_uid, st.st_gid) == (nobody.pw_uid, nobody.pw_gid), path
    assert dest.stat().st_uid == os.geteuid()
    assert (dest / "lib" / "link").is_symlink()
    assert (dest / "bin" / "again").stat().st_ino == (dest / "bin" / "run").stat().st_ino


@pytest.mark.parametrize("inline", [0, 1 << 20], ids=["threaded", "inline"])
@pytest.mark.parametrize("chunk", [1000, 4093])
def test_headers_and_data_split_across_decompressed_chunks_are_read_whole(
    sandbox: Path, monkeypatch: pytest.MonkeyPatch, chunk: int, inline: int
) -> None:
    """tarfile reads each header in one call; chunks not a multiple of 512 bytes split
    headers and data at every boundary, and the reader must join them, whether the
    chunks come from the reading thread or from the decompressing one."""
    monkeypatch.setattr(archive, "CHUNK", chunk)
    monkeypatch.setattr(archive, "INLINE_BYTES", inline)
    files = {
        f"d{i % 3}/f{i}": os.urandom(size) for i, size in enumerate([0, 1, 511, 512, 513, 9999])
    }
    artifact = sandbox / "artifact.tar.gz"
    tree_tarball(artifact, files)
    extracted = extract(artifact, sandbox / "dest", LIMITS)
    assert extracted.bytes == sum(len(data) for data in files.values())
    for name, data in files.items():
        assert (sandbox / "dest" / name).read_bytes() == data


def test_a_small_archive_is_decompressed_without_a_thread_and_a_large_one_with_one(
    sandbox: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    started: list[str] = []
    thread = archive.threading.Thread

    def recording(*args: object, **kwargs: object) -> object:
        started.append(str(kwargs.get("name")))
        return thread(*args, **kwargs)  # type: ignore[arg-type]

    monkeypatch.setattr(archive.threading, "Thread", recording)
    small = sandbox / "small.tar.gz"
    tree_tarball(small, {"bin/run": b"#!/bin/sh\n"})
    extract(small, sandbox / "dest", LIMITS)
    assert started == []

    monkeypatch.setattr(archive, "CHUNK", 4096)
    monkeypatch.setattr(archive, "INLINE_BYTES", 8192)
    large = sandbox / "large.tar.gz"
    tree_tarball(large, {f"f{n}": os.urandom(4096) for n in range(8)})
    (sandbox / "dest2").mkdir()
    extract(large, sandbox / "dest2", LIMITS)
    assert started == ["decompress"]
    for n in range(8):
        assert (sandbox / "dest2" / f"f{n}").stat().st_size == 4096


def test_directories_revisited_out_of_order_are_extracted_without_leaking_descriptors(
    sandbox: Path,
) -> None:
    """More directories than descriptors kept open, visited round-robin: each visit
    reopens a directory closed since, and nothing stays open afterwards."""
    count = archive.OPEN_DIRECTORIES + 16  # round-robin: every visit finds its fd closed
    members = [
        member(f"d{i % count}/sub/f{i}", str(i).encode(), mtime=1_000_000) for i in range(count * 2)
    ]
    members += [member(f"d{i}/sub", type=tarfile.DIRTYPE, mtime=2_000_000) for i in range(count)]
    artifact = hostile(sandbox, members)
    open_before = len(os.listdir("/proc/self/fd"))
    extract(artifact, sandbox / "dest", Limits(10 << 20, 10_000))
    assert len(os.listdir("/proc/self/fd")) == open_before
    for i in range(count * 2):
        assert (sandbox / "dest" / f"d{i % count}" / "sub" / f"f{i}").read_text() == str(i)
    assert {(sandbox / "dest" / f"d{i}" / "sub").stat().st_mtime for i in range(count)} == {2e6}
    (sandbox / "refused").mkdir()
    refused = hostile(sandbox, [*members, member("../x", b"")])
    with pytest.raises(ArchiveError, match=r"'\.\.' in the path"):
        extract(refused, sandbox / "refused", Limits(10 << 20, 10_000))
    assert len(os.listdir("/proc/self/fd")) == open_before


# -- modes are the stock data filter's ------------------------------------------------------


@pytest.mark.parametrize("kind", [tarfile.REGTYPE, tarfile.LNKTYPE])
def test_file_modes_are_the_stock_data_filters(tmp_path: Path, kind: bytes) -> None:
    tarfile = archive.tarfile  # the data filter of the tarfile the preparer parses with
    for mode in range(0o10000):
        info = tarfile.TarInfo("f")
        info.type, info.mode, info.linkname = kind, mode, "f"
        assert archive._file_mode(mode) == tarfile.data_filter(info, str(tmp_path)).mode, oct(mode)


class _Zeros(io.RawIOBase):
    def __init__(self, size: int) -> None:
        self.left = size

    def readable(self) -> bool:
        return True

    def readinto(self, buffer: bytearray) -> int:  # type: ignore[override]
        n = min(len(buffer), self.left)
        buffer[:n] = bytes(n)
        self.left -= n
        return n


# -- through the agent: one pass, a corpus of hostile apps and one good one --------------------


def test_hostile_artifacts_fail_their_own_app_only(tmp_path: Path) -> None:
    store = IntentStore(SqliteStore(tmp_path / "intent.db"))
    repo = tmp_path / "repo"
    corpus: dict[str, list[tuple[tarfile.TarInfo, bytes]]] = {
        "dotdot": [member("../../../../escaped", b"x")],
        "symlink": [member("l", type=tarfile.SYMTYPE, linkname="../../.."),
                    member("l/escaped", b"x")],
        "hardlink": [member("h", type=tarfile.LNKTYPE, linkname="../../../outside")],
        "device": [member("null", type=tarfile.CHRTYPE, devmajor=1, devminor=3)],
        "setuid": [member("suid", b"x", mode=0o4755)],
    }  # fmt: skip
    (tmp_path / "outside").write_text("precious")
    shas = {}
    for app, members in {**corpus, "good": [member("ok", b"ok")]}.items():
        (repo / app).mkdir(parents=True)
        shas[app] = sha = write_tar(repo / app / f"{app}_1.0.tar.gz", members)
        versions = {"1.0": {"state": "active", "sha256": sha}}
        put_app(store, NODE, app, tmp_path / "srv" / app, versions)
    before = snapshot(tmp_path, skip=tmp_path / "srv")
    preparer = Preparer(
        Settings(FetchOptions(attempts=1), LIMITS), repo=f"file://{repo}", store=store, node=NODE
    )
    runtime = Runtime(preparer, store, RuntimeOptions(node=NODE, once=True, max_parallel=2))
    assert runtime.run() == 1

    reports = {r.app: r for r in store.reality(node=NODE)}
    assert reports["good"].status == "converged"
    assert AppLayout(tmp_path / "srv" / "good", "good").is_installed("1.0", shas["good"])
    for app in corpus:
        assert reports[app].status == "error", app
        assert "artifact refused" in reports[app].details["versions"]["1.0"]
        layout = AppLayout(tmp_path / "srv" / app, app)
        assert layout.installed_versions() == []
        assert os.listdir(layout.installs) == []  # temp dirs and downloads removed
    after = snapshot(tmp_path, skip=tmp_path / "srv")
    store_files = {k for k in before.keys() | after.keys() if k.startswith("intent.db")}
    assert {k: after[k] for k in after.keys() - store_files} == {
        k: before[k] for k in before.keys() - store_files
    }
    assert (tmp_path / "outside").read_text() == "precious"
    assert not list(tmp_path.rglob("escaped"))


def test_extraction_does_not_inflate_a_bomb_in_memory(sandbox: Path) -> None:
    """Output is bounded per decompression call: a 64 MiB run of zeros compressed to a
    few hundred kilobytes comes out in chunks of at most CHUNK bytes."""
    data = gzip.compress(bytes(64 << 20), compresslevel=1)
    raw = io.BytesIO(data)
    sizes = [len(c) for c in archive._decompressed_chunks(raw, 1 << 40)]
    assert max(sizes) <= archive.CHUNK
    assert sum(sizes) == 64 << 20
