"""Carry out the preparer's actions on disk.

An install is fetched and verified into a temporary file, extracted into a
temporary directory beside its final place (same file system), flushed to
disk, marked complete, and only then renamed into place: under its final name
an install is whole or absent, whatever moment the process dies at. Every
temporary name starts with ``.pp-tmp-<app>_`` so the next run finds and removes
the leftovers of a crash.
"""

from __future__ import annotations

import contextlib
import ctypes
import errno
import fcntl
import os
import shutil
import stat
import time
from collections.abc import Iterator, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import BinaryIO

import structlog
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PublicKey

from agents.preparer import stream
from agents.preparer.plan import Install
from agents.system import archive, fs
from agents.system.fetch import (
    FetchError,
    FetchOptions,
    display_url,
    fetch,
    fetch_bytes,
    signature_url,
)
from agents.system.fs import temp_name
from agents.system.layout import MARKER_NAME, AppLayout, InstallMarker
from intent.errors import PlatypusError
from intent.signing import SignatureError, verify

log = structlog.get_logger()


class ApplyError(PlatypusError):
    """One action failed; the message is the one line reported for its version."""


@dataclass(frozen=True)
class Settings:
    fetch: FetchOptions
    limits: archive.Limits
    trusted_keys: Mapping[str, Ed25519PublicKey] | None = None
    """When set, every artifact needs a detached signature by one of these keys."""
    allowed_sources: tuple[str, ...] = ()
    """When set, remote artifacts come only from under these URLs (plan.source_refusal)."""
    allowed_registries: tuple[str, ...] = ()
    """When set, images come only from these registries (plan.image_refusal)."""


@dataclass(frozen=True)
class Installed:
    version: str
    bytes_downloaded: int
    files: int
    bytes_extracted: int
    signed_by: str | None


@contextlib.contextmanager
def exclusive(lock_file: Path) -> Iterator[bool]:
    """Hold an advisory lock on ``lock_file`` (True), or report it is taken (False).

    Two preparers on one host (a service and a hand-run ``--once``) would
    otherwise clean up each other's work in progress as crash leftovers. The lock
    file lives in the preparer's own state directory: a lock on anything the app
    can open (its ``installs/``) is one the app could hold forever, so that no fix
    of its own install would ever be applied.
    """
    fd = os.open(lock_file, os.O_RDWR | os.O_CREAT | os.O_NOFOLLOW | os.O_CLOEXEC, 0o600)
    try:
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            yield False
            return
        yield True
    finally:
        os.close(fd)  # closing releases the lock


def ensure_dirs(layout: AppLayout) -> None:
    """Make ``<basedir>`` and ``<basedir>/installs`` exist, ours and writable by no one else.

    The app's user must never write either: in ``installs/`` it could plant an
    install with a marker of its own, and in a basedir it could swap ``installs``
    for a link while the preparer works inside. The installs themselves are handed
    to the app's user; their parents stay ours, 0755. ``installs/`` is the
    preparer's own directory and is put right; a basedir someone else can write is
    the platform team's to fix, so it is refused.
    """
    me = os.geteuid()
    basedir = layout.basedir
    if not basedir.exists():
        basedir.parent.mkdir(parents=True, exist_ok=True)
        with contextlib.suppress(FileExistsError):
            basedir.mkdir(mode=0o755)
            os.chmod(basedir, 0o755)  # the umask may have widened or narrowed it
    st = basedir.stat()
    if st.st_uid != me or st.st_mode & 0o022:
        raise ApplyError(
            f"basedir {basedir} can be written by others (owner uid {st.st_uid}, mode "
            f"{st.st_mode & 0o7777:04o}), so its app could plant installs: make it "
            f"uid {me}'s and not group- or world-writable (chown {me} {basedir}; "
            f"chmod 755 {basedir})"
        )
    with fs.open_dir(basedir) as base:
        with contextlib.suppress(FileExistsError):
            os.mkdir("installs", 0o755, dir_fd=base)
        try:
            with fs.open_dir("installs", dir_fd=base) as installs:
                st = os.fstat(installs)
                if st.st_uid != me or st.st_mode & 0o7022 != 0:
                    log.warning(
                        "installs.ownership_fixed",
                        path=str(layout.installs),
                        uid=st.st_uid,
                        mode=f"{st.st_mode & 0o7777:04o}",
                    )
                    os.fchown(installs, me, os.getegid())
                    os.fchmod(installs, 0o755)
        except OSError as exc:
            if exc.errno in (errno.ELOOP, errno.ENOTDIR):
                raise ApplyError(
                    f"{layout.installs} is not a directory (a link?): remove it"
                ) from exc
            raise


def install(
    layout: AppLayout,
    action: Install,
    settings: Settings,
    owner: tuple[int, int] | None = None,
) -> Installed:
    """Fetch, verify and extract ``action``'s artifact, then put it in place.

    The tree stays root's and private (0700) until it is complete: extracted (its
    entries already ``owner``'s, unreachable to them), its services read, its marker
    written, all flushed; only then is it opened to ``owner`` and renamed into place.
    Nothing is written by path in a directory the app's user can write: once it owns
    the tree, its processes may rename anything in it.

    ``action.in_place``: the install under the final name is complete but its marker
    predates the record of its services; the artifact is verified again and only
    the marker of the live install is rewritten (it may be running).
    """
    final = layout.install_dir(action.version)
    workdir = temp_name(final)
    download = workdir.with_name(workdir.name + ".download")
    trash: Path | None = None
    shown = display_url(action.url)

    def extract(source: Path | BinaryIO) -> archive.Extracted:
        # The workdir is private (0700, root's): entries change hands as they are made,
        # and nobody can reach them until _seal opens the workdir itself.
        return archive.extract(
            source, workdir, settings.limits, reserved={MARKER_NAME}, owner=owner
        )

    try:
        signature = _signature(action.url, settings)
        workdir.mkdir(mode=0o700)
        fetched, extracted = stream.fetch_extracting(
            download,
            lambda sink: fetch(
                action.url,
                sink,
                settings.fetch,
                max_bytes=settings.limits.max_stream_bytes,
                space_dir=layout.installs,
            ),
            extract,
        )
        # Nothing extracted counts before the digest, and the signature over it, check out.
        if fetched.sha256 != action.sha256:
            raise ApplyError(
                f"sha256 mismatch: {shown} has {fetched.sha256}, the intent says "
                f"{action.sha256}; the download was discarded"
            )
        signed_by = None
        if signature is not None and settings.trusted_keys:
            signed_by = verify(
                signature, layout.app, action.version, fetched.sha256, settings.trusted_keys
            )
        if isinstance(extracted, stream.Restarted):  # what the first attempt wrote is void
            remove_tree(workdir)
            workdir.mkdir(mode=0o700)
            extracted = extract(download)
        elif isinstance(extracted, Exception):
            raise extracted
        assert isinstance(extracted, archive.Extracted)
        marker = InstallMarker.of_artifact(
            layout.app, action.version, action.sha256, workdir, time.time()
        )
        if action.in_place:
            _remark(layout, action.version, marker)
        else:
            _seal(workdir, marker, owner)
            trash = put_in_place(workdir, final, action.replace)
        fsync_directory(layout.installs)
        return Installed(action.version, fetched.size, extracted.files, extracted.bytes, signed_by)
    except FetchError as exc:
        raise ApplyError(str(exc)) from exc
    except archive.ArchiveError as exc:
        raise ApplyError(str(exc)) from exc
    except SignatureError as exc:
        raise ApplyError(f"{shown}: {exc}; refused") from exc
    except OSError as exc:
        raise ApplyError(f"{exc.filename or final}: {exc.strerror or exc}") from exc
    finally:
        with contextlib.suppress(FileNotFoundError):
            download.unlink()
        for leftover in (workdir, trash):
            if leftover is not None:
                remove_tree(leftover)


def put_in_place(workdir: Path, final: Path, replace: bool) -> Path | None:
    """Rename the complete ``workdir`` to ``final``. With ``replace``, what holds that
    name is renamed aside first and returned, for the caller to delete at leisure."""
    trash = None
    if replace and final.exists():
        trash = temp_name(final)
        os.rename(final, trash)
    os.rename(workdir, final)
    return trash


def _seal(workdir: Path, marker: InstallMarker, owner: tuple[int, int] | None) -> None:
    """Complete the private tree, whose contents are ``owner``'s already (extracted so),
    and hand it over: the marker written as ours, everything flushed, and last the
    directory itself opened to ``owner``."""
    with fs.open_dir(workdir) as fd:
        # Written straight in: the workdir is the temp name, renamed whole once flushed
        # (archives cannot hold the marker's name: it is reserved at extraction).
        fs.create_in(fd, MARKER_NAME, marker.to_bytes())
        # The marker claims completeness: the data must be on disk before the tree can
        # appear under its final name (delayed allocation could leave empty files).
        make_durable(fd)
        os.fchmod(fd, 0o755)
        if owner is not None:
            os.fchown(fd, *owner)
        os.fsync(fd)


def _remark(layout: AppLayout, version: str, marker: InstallMarker) -> None:
    """Rewrite the marker of a live install, which its app's user owns (``write_in``
    never follows or trusts a name in there)."""
    with (
        fs.open_dir(layout.installs) as installs,
        fs.open_dir(layout.install_dir(version).name, dir_fd=installs) as fd,
    ):
        fs.write_in(fd, MARKER_NAME, marker.to_bytes())
        os.fsync(fd)


def _signature(url: str, settings: Settings) -> bytes | None:
    """The detached signature, fetched before the artifact so a missing one fails fast."""
    if not settings.trusted_keys:
        return None
    try:
        return fetch_bytes(signature_url(url), settings.fetch)
    except FetchError as exc:
        raise ApplyError(
            f"no usable signature ({exc}); --trusted-keys requires a signed artifact"
        ) from exc


def remove(layout: AppLayout, version: str) -> None:
    """Make an install vanish in one step (a rename), then delete it at leisure."""
    final = layout.install_dir(version)
    trash = temp_name(final)
    try:
        os.rename(final, trash)
    except FileNotFoundError:
        return
    remove_tree(trash)


def remove_tree(path: Path) -> None:
    """Delete a file or directory tree; gone already is fine."""
    try:
        if path.is_dir() and not path.is_symlink():
            shutil.rmtree(path)
        else:
            path.unlink()
    except FileNotFoundError:
        pass


FSYNC_EACH_UP_TO = 8
"""Trees with at most this many entries are flushed entry by entry, larger ones with
one ``syncfs``."""


def make_durable(dir_fd: int) -> None:
    """Flush the tree open as ``dir_fd`` before the marker claims completeness; the
    directory's own entries are the caller's to flush, with its last change to it.

    Without it a power cut after the rename could leave a marked install whose files
    are empty (delayed allocation). ``syncfs`` flushes the whole file system in one
    journal commit, but it also waits for every other process's unwritten data: on a
    host whose apps write a lot, any install pays for all of it (one took 35 s here
    while test suites wrote). An fsync per entry costs only the tree's own data, but
    a commit each, about 0.4 ms on this host's disk (2 files: 1.7 ms against 1.3 ms for
    ``syncfs`` on a quiet disk; 8: 4.9 against 0.8 ms; 60: 25 against 2.2 ms). So only
    the smallest trees are flushed entry by entry, where the cost is bounded and small.
    """
    entries = _small_tree(dir_fd)
    if entries is None:
        if _syncfs is None or _syncfs(dir_fd) != 0:
            os.sync()
        return
    for name in entries:
        # The tree is still private (root's, 0700): no name in it can change under us;
        # O_NOFOLLOW all the same, a symlink is flushed with its directory.
        flags = os.O_RDONLY | os.O_NOFOLLOW | os.O_NONBLOCK | os.O_CLOEXEC
        fd = os.open(name, flags, dir_fd=dir_fd)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)


def _small_tree(dir_fd: int) -> list[str] | None:
    """The relative paths of the regular files, then of the directories, under
    ``dir_fd``, or None once there are more than ``FSYNC_EACH_UP_TO`` entries.

    Files first: each file's fsync commits the journal with its blocks, and the new
    directory entries made so far go in that commit, so the directories' fsyncs that
    follow mostly find nothing left to commit."""
    files: list[str] = []
    dirs: list[str] = []
    for top, subdirs, names, _ in os.fwalk(".", dir_fd=dir_fd):
        for name in [*subdirs, *names]:
            path = os.path.join(top, name)
            if len(files) + len(dirs) >= FSYNC_EACH_UP_TO:
                return None
            mode = os.lstat(path, dir_fd=dir_fd).st_mode
            if stat.S_ISREG(mode):
                files.append(path)
            elif stat.S_ISDIR(mode):
                dirs.append(path)
    return files + dirs


def fsync_directory(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY | os.O_DIRECTORY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _load_syncfs() -> ctypes._NamedFuncPointer | None:
    try:
        return ctypes.CDLL(None, use_errno=True).syncfs
    except (OSError, AttributeError):
        return None


_syncfs = _load_syncfs()
