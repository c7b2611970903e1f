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
import fcntl
import os
import shutil
import time
from collections.abc import Iterator, Mapping
from dataclasses import dataclass
from pathlib import Path

from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PublicKey

from agents.preparer.plan import Install
from agents.system import archive
from agents.system.fetch import (
    FetchError,
    FetchOptions,
    display_url,
    fetch,
    fetch_bytes,
    signature_url,
)
from agents.system.fs import temp_name, write_atomic
from agents.system.layout import MARKER_NAME, AppLayout, InstallMarker
from agents.system.signing import SignatureError, verify


class ApplyError(Exception):
    """One action failed; the message is the one line reported for its version."""


@dataclass(frozen=True)
class Settings:
    fetch: FetchOptions
    limits: archive.Limits
    trusted_keys: Mapping[str, Ed25519PublicKey] | None = None
    """When set, every artifact needs a detached signature by one of these keys."""


@dataclass(frozen=True)
class Installed:
    version: str
    bytes_downloaded: int
    files: int
    bytes_extracted: int
    signed_by: str | None


@contextlib.contextmanager
def exclusive(directory: Path) -> Iterator[bool]:
    """Hold an advisory lock on ``directory`` (True), or report it is taken (False).

    Two preparers on one host (a service and a hand-run ``--once``) would
    otherwise clean up each other's work in progress as crash leftovers.
    """
    fd = os.open(directory, os.O_RDONLY | os.O_DIRECTORY)
    try:
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            yield False
            return
        yield True
    finally:
        os.close(fd)  # closing releases the lock


def install(
    layout: AppLayout,
    action: Install,
    settings: Settings,
    owner: tuple[int, int] | None = None,
) -> Installed:
    final = layout.install_dir(action.version)
    workdir = temp_name(final)
    download = workdir.with_name(workdir.name + ".download")
    trash: Path | None = None
    shown = display_url(action.url)
    try:
        signature = _signature(action.url, settings)
        with download.open("xb") as sink:
            fetched = fetch(
                action.url,
                sink,
                settings.fetch,
                max_bytes=settings.limits.max_stream_bytes,
                space_dir=layout.installs,
            )
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
        workdir.mkdir(mode=0o700)
        extracted = archive.extract(download, workdir, settings.limits, reserved={MARKER_NAME})
        download.unlink()
        os.chmod(workdir, 0o755)
        if owner is not None:
            archive.chown_tree(workdir, *owner)
        sync_filesystem(workdir)
        write_atomic(workdir / MARKER_NAME, InstallMarker(action.sha256, time.time()).to_bytes())
        if action.replace and final.exists():
            trash = temp_name(final)
            os.rename(final, trash)
        os.rename(workdir, final)
        fsync_directory(layout.installs)
        return Installed(action.version, fetched.size, extracted.files, extracted.bytes, signed_by)
    except FetchError as exc:
        raise ApplyError(str(exc)) from None
    except archive.ArchiveError as exc:
        raise ApplyError(str(exc)) from None
    except SignatureError as exc:
        raise ApplyError(f"{shown}: {exc}; refused") from None
    except OSError as exc:
        raise ApplyError(f"{exc.filename or final}: {exc.strerror or exc}") from None
    finally:
        with contextlib.suppress(FileNotFoundError):
            download.unlink()
        for leftover in (workdir, trash):
            if leftover is not None:
                remove_tree(leftover)


def _signature(url: str, settings: Settings) -> bytes | None:
    """The detached signature, fetched before the artifact so a missing one fails fast."""
    if not settings.trusted_keys:
        return None
    try:
        return fetch_bytes(signature_url(url), settings.fetch)
    except FetchError as exc:
        raise ApplyError(
            f"no usable signature ({exc}); --trusted-keys requires a signed artifact"
        ) from None


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


def sync_filesystem(path: Path) -> None:
    """Flush the file system holding ``path`` before the marker claims completeness.

    Without it a power cut after the rename could leave a marked install whose
    files are empty (delayed allocation). ``syncfs`` flushes one file system in
    one call, far cheaper than an fsync per file.
    """
    fd = os.open(path, os.O_RDONLY)
    try:
        if _syncfs is None or _syncfs(fd) != 0:
            os.sync()
    finally:
        os.close(fd)


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
