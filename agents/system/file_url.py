"""``file://`` URLs, confined to the preparer's repo: one reading for the planner
and the fetcher, so the two can never disagree about which file a URL names.

URLs come from ``config``, which app owners write, and the preparer reads them as
root. A ``file://`` URL naming any file on the host would let an app owner read it
(its sha256 is reported, and once matched it is extracted and handed to ``run_as``),
so local artifacts are read only from beneath the ``--repo`` directory. The URL is
read the way the fetcher opens it: the scheme in any case, percent-escapes decoded
before the path is normalised (``%2e%2e`` is ``..``). Opening then walks down from
the repo directory one name at a time without following a link, and accepts only a
regular file, opened without blocking: a link, a FIFO or a device planted in the
repo is refused at once instead of read or waited on.
"""

from __future__ import annotations

import errno
import os
import posixpath
import stat
from urllib.parse import SplitResult, unquote, urlsplit

_LOCAL_HOSTS = ("", "localhost")
_OPEN_DIR = os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW | os.O_CLOEXEC
_OPEN_FILE = os.O_RDONLY | os.O_NOFOLLOW | os.O_NONBLOCK | os.O_CLOEXEC


class Refused(ValueError):
    """A ``file://`` URL that is not read; the message says why and what to do."""


def is_file_url(url: str) -> bool:
    """Whether the fetcher would read ``url`` from the local disk (``FILE:`` too)."""
    parts = _split(url)
    return parts is None or parts.scheme == "file"


def repo_root(repo: str | None) -> str | None:
    """The directory of a local ``--repo`` (``/path`` or a file URL), normalised;
    None for a remote one."""
    if repo is None:
        return None
    if repo.startswith("/"):
        return posixpath.normpath(repo)
    if not is_file_url(repo):
        return None
    try:
        return local_path(repo)
    except Refused:
        return None


def beneath(url: str, root: str | None) -> list[str]:
    """The names leading from ``root`` down to the file ``url`` names.

    Raises Refused when ``url`` is no usable file URL or its file is not beneath
    ``root`` (None: no local repo, so no file URL is read at all).
    """
    path = local_path(url)
    if root is None:
        raise Refused(
            f"file:// URLs are fetched only when pp-preparer has a file:// --repo; "
            f"publish {path} there or use http(s)/s3"
        )
    root = posixpath.normpath(root)
    prefix = root.rstrip("/") + "/"
    if not path.startswith(prefix) or path == prefix:
        raise Refused(
            f"file:// URLs are fetched only under {root}; publish {path} there or use http(s)/s3"
        )
    return path.removeprefix(prefix).split("/")


def open_url(url: str, root: str | None) -> int:
    """A read-only descriptor on the regular file ``url`` names beneath ``root``."""
    names = beneath(url, root)
    assert root is not None  # beneath refuses every URL without a root
    return open_beneath(root, names)


def open_beneath(root: str, names: list[str]) -> int:
    """A read-only descriptor on the regular file ``root/names...``.

    ``root`` itself is trusted (the operator's ``--repo``; its own symlinks are
    resolved once, here); beneath it no link is followed, whatever it points at.
    A walk with ``O_NOFOLLOW`` on every name does what ``openat2(RESOLVE_BENEATH |
    RESOLVE_NO_SYMLINKS)`` does, on every kernel and with no foreign call.
    Raises Refused, or OSError for a file that is simply missing or unreadable.
    """
    fd = os.open(root, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
    try:
        for name in names[:-1]:
            child = _open_refusing_links(name, _OPEN_DIR, fd, names)
            os.close(fd)
            fd = child
        file = _open_refusing_links(names[-1], _OPEN_FILE, fd, names)
    finally:
        os.close(fd)
    mode = os.fstat(file).st_mode
    if not stat.S_ISREG(mode):
        os.close(file)
        kind = "a directory" if stat.S_ISDIR(mode) else "not a regular file"
        raise Refused(f"{'/'.join(names)} under {root} is {kind}")
    return file


def _open_refusing_links(name: str, flags: int, dir_fd: int, names: list[str]) -> int:
    try:
        return os.open(name, flags, dir_fd=dir_fd)
    except OSError as exc:
        if exc.errno == errno.ELOOP or (exc.errno == errno.ENOTDIR and flags & os.O_DIRECTORY):
            raise Refused(
                f"{'/'.join(names)} passes through {name!r}, a link or not a directory; "
                "links in the repo are not followed: publish the file itself"
            ) from exc
        if exc.errno == errno.ENXIO:  # a socket
            raise Refused(f"{'/'.join(names)} is not a regular file") from exc
        raise


def local_path(url: str) -> str:
    """The absolute, normalised path a file URL names, decoded as it is opened."""
    parts = _split(url)
    if parts is None:
        raise Refused("not a valid URL")
    if parts.netloc.lower() not in _LOCAL_HOSTS:
        raise Refused("use file:///absolute/path (three slashes)")
    path = unquote(parts.path)
    if not path.startswith("/"):
        raise Refused("use file:///absolute/path (three slashes)")
    if "\0" in path:
        raise Refused("the path holds a NUL byte (%00)")
    return posixpath.normpath(path)


def _split(url: str) -> SplitResult | None:
    try:
        return urlsplit(url)
    except ValueError:
        return None
