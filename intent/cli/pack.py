"""Build an artifact from a directory, deterministically, and publish it to a repo.

The same directory always gives the same bytes, hence the same sha256: entries
are sorted, owners are root, times are fixed (``SOURCE_DATE_EPOCH`` or 0), modes
are reduced to 0644/0755, and the gzip header carries no name and no time. So
rebuilding an unchanged tree never invents a new version.

Only what ``pp-preparer`` would accept goes in: regular files, directories and
relative symlinks that stay inside the tree. Anything else is an error here,
where it is cheap to fix, rather than a refusal on every host.

The repository layout is ``<repo>/<app>/<app>_<version>.tar.gz`` (and ``.sig``);
the preparer derives the same URL from its ``--repo``.
"""

from __future__ import annotations

import contextlib
import functools
import gzip
import hashlib
import os
import posixpath
import secrets
import stat
import tarfile
import tempfile
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any, BinaryIO
from urllib.parse import unquote, urlsplit

from intent.artifacts import artifact_url
from intent.signing import SIGNATURE_SUFFIX

GZIP_LEVEL = 6
TEMP_MARK = ".pp-tmp-"
"""Infix of the temp names pack writes before renaming, as the agents' own temp names."""
S3_TIMEOUT_S = 30.0


class PackError(Exception):
    """The directory cannot be packed or the artifact cannot be published."""


# -- building ----------------------------------------------------------------------------


class _HashingWriter:
    def __init__(self, out: BinaryIO) -> None:
        self.out = out
        self.hasher = hashlib.sha256()
        self.size = 0

    def write(self, data: bytes) -> int:
        self.hasher.update(data)
        self.size += len(data)
        return self.out.write(data)

    def flush(self) -> None:
        self.out.flush()


def build(directory: Path, out: BinaryIO, mtime: int | None = None) -> str:
    """Write the tar.gz of ``directory`` to ``out``; returns its sha256."""
    if mtime is None:
        epoch = os.environ.get("SOURCE_DATE_EPOCH", "0") or "0"
        if not epoch.isdigit():
            raise PackError(f"SOURCE_DATE_EPOCH={epoch!r}: must be a whole number of seconds")
        mtime = int(epoch)
    writer = _HashingWriter(out)
    with (
        gzip.GzipFile(
            filename="", mode="wb", fileobj=writer, compresslevel=GZIP_LEVEL, mtime=0
        ) as compressed,
        tarfile.open(fileobj=compressed, mode="w|", format=tarfile.PAX_FORMAT) as tar,
    ):
        for path, name in _entries(directory):
            info = _tarinfo(path, name, mtime)
            if not info.isreg():
                tar.addfile(info)
                continue
            try:
                source = path.open("rb")
            except OSError as exc:  # the source's fault, not the destination's
                raise PackError(f"{path}: {exc.strerror or exc}") from exc
            with source:
                tar.addfile(info, source)
    return str(writer.hasher.hexdigest())


def _entries(root: Path, prefix: str = "") -> Iterator[tuple[Path, str]]:
    """Every entry under ``root`` with its archive name, depth first in name order
    (a directory's contents follow it, as tar(1) writes them)."""
    try:
        names = sorted(os.listdir(root))
    except OSError as exc:
        raise PackError(f"{root}: {exc.strerror or exc}") from exc
    for name in names:
        path = root / name
        yield path, prefix + name
        if path.is_dir() and not path.is_symlink():
            yield from _entries(path, f"{prefix}{name}/")


def _tarinfo(path: Path, name: str, mtime: int) -> tarfile.TarInfo:
    try:
        name.encode("utf-8")
    except UnicodeEncodeError as exc:
        raise PackError(f"{path}: file name is not valid UTF-8; rename it") from exc
    info = tarfile.TarInfo(name)
    info.mtime = mtime
    info.uid = info.gid = 0
    info.uname = info.gname = ""
    st = path.lstat()
    if stat.S_ISDIR(st.st_mode):
        info.type, info.mode = tarfile.DIRTYPE, 0o755
    elif stat.S_ISREG(st.st_mode):
        info.type, info.size = tarfile.REGTYPE, st.st_size
        info.mode = 0o755 if st.st_mode & 0o100 else 0o644
    elif stat.S_ISLNK(st.st_mode):
        target = os.readlink(path)
        resolved = posixpath.normpath(posixpath.join(posixpath.dirname(name), target))
        if target.startswith("/") or resolved == ".." or resolved.startswith("../"):
            raise PackError(
                f"{path}: symlink to {target!r} leaves the directory; the preparer would "
                "refuse it (make it relative, pointing inside)"
            )
        info.type, info.linkname, info.mode = tarfile.SYMTYPE, target, 0o777
    else:
        raise PackError(f"{path}: not a regular file, directory or symlink; remove it")
    return info


# -- publishing --------------------------------------------------------------------------


@dataclass(frozen=True)
class Published:
    url: str
    sha256: str
    size: int
    unchanged: bool
    """The repository already held these exact bytes."""


Signer = Callable[[str, str, str], bytes]
"""(app, version, sha256) -> the bytes of the ``.sig`` file."""


def pack(
    directory: Path,
    app: str,
    version: str,
    repo: str,
    signer: Signer | None = None,
    force: bool = False,
) -> Published:
    """Build ``directory`` and publish it as ``app`` ``version`` in ``repo``.

    ``signer``, when given, signs what is published (this app, this version, the
    built sha256) into a ``.sig`` beside it. A version already in the repo with
    different bytes is refused unless ``force``: nodes may already have installed
    the old bytes.
    """
    if not directory.is_dir():
        raise PackError(f"{directory}: not a directory")
    url = artifact_url(repo, app, version)
    scheme = urlsplit(url).scheme
    signature = None if signer is None else functools.partial(signer, app, version)
    if scheme == "file":
        return _publish_file(directory, url, signature, force)
    if scheme == "s3":
        return _publish_s3(directory, url, signature, force)
    raise PackError(f"--repo {repo}: pp pack publishes to file:// or s3:// repositories")


def _temp_beside(path: Path) -> Path:
    """A fresh name in ``path``'s own directory, so the rename onto ``path`` never
    crosses filesystems and a reader never sees a half-written file."""
    return path.with_name(f"{TEMP_MARK}{path.name}.{secrets.token_hex(4)}")


def _build_to(directory: Path, target: Path) -> tuple[str, int]:
    with target.open("wb") as out:
        sha256 = build(directory, out)
        out.flush()
        os.fsync(out.fileno())
        return sha256, out.tell()


def _publish_file(
    directory: Path, url: str, signature: Callable[[str], bytes] | None, force: bool
) -> Published:
    dest = Path(unquote(urlsplit(url).path))
    try:
        dest.parent.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise PackError(f"{dest.parent}: {exc.strerror or exc}") from exc
    tmp = _temp_beside(dest)
    try:
        sha256, size = _build_to(directory, tmp)
        unchanged = dest.exists() and _sha256_of(dest) == sha256
        if dest.exists() and not unchanged and not force:
            raise PackError(
                f"{dest} already exists with different contents; publish a new version "
                "(or pass --force if no node has installed it)"
            )
        if unchanged:
            tmp.unlink()
        else:
            os.replace(tmp, dest)
        if signature is not None:
            sig = dest.with_name(dest.name + SIGNATURE_SUFFIX)
            sig_tmp = _temp_beside(sig)
            sig_tmp.write_bytes(signature(sha256))
            os.replace(sig_tmp, sig)
    except OSError as exc:
        raise PackError(f"{dest}: {exc.strerror or exc}") from exc
    finally:
        with contextlib.suppress(FileNotFoundError):
            tmp.unlink()
    return Published(url, sha256, size, unchanged)


def _sha256_of(path: Path) -> str:
    hasher = hashlib.sha256()
    with path.open("rb") as f:
        while chunk := f.read(1 << 20):
            hasher.update(chunk)
    return hasher.hexdigest()


def _publish_s3(
    directory: Path, url: str, signature: Callable[[str], bytes] | None, force: bool
) -> Published:
    from botocore.exceptions import BotoCoreError, ClientError

    parts = urlsplit(url)
    bucket, key = parts.netloc, parts.path.lstrip("/")
    client = _s3_client()
    with tempfile.TemporaryDirectory(prefix=TEMP_MARK) as workdir:
        artifact = Path(workdir) / "artifact.tar.gz"
        sha256, size = _build_to(directory, artifact)
        try:
            existing = _s3_sha256(client, bucket, key)
            unchanged = existing == sha256
            if existing is not None and not unchanged and not force:
                raise PackError(
                    f"{url} already exists with different contents; publish a new version "
                    "(or pass --force if no node has installed it)"
                )
            if not unchanged:
                client.upload_file(
                    str(artifact),
                    bucket,
                    key,
                    ExtraArgs={"Metadata": {"sha256": sha256}, "ContentType": "application/gzip"},
                )
            if signature is not None:
                client.put_object(Bucket=bucket, Key=key + SIGNATURE_SUFFIX, Body=signature(sha256))
        except ClientError as exc:
            error = exc.response.get("Error", {})
            raise PackError(f"{url}: {error.get('Code')}: {error.get('Message', '')}") from exc
        except BotoCoreError as exc:
            raise PackError(f"{url}: {exc}") from exc
    return Published(url, sha256, size, unchanged)


def _s3_client() -> Any:
    """An S3 client configured by the environment (``AWS_ENDPOINT_URL``, profile,
    region, credentials), with bounded timeouts and retries: one upload, one client."""
    import boto3
    from botocore.config import Config

    config = Config(
        connect_timeout=S3_TIMEOUT_S,
        read_timeout=S3_TIMEOUT_S,
        retries={"mode": "standard", "max_attempts": 3},
        user_agent_extra="platypus-pack",
    )
    return boto3.session.Session().client("s3", config=config)


def _s3_sha256(client: Any, bucket: str, key: str) -> str | None:
    """The sha256 of an object already at ``key`` (from its metadata, else by reading
    it), or None when there is none."""
    from botocore.exceptions import ClientError

    try:
        head = client.head_object(Bucket=bucket, Key=key)
    except ClientError as exc:
        if exc.response.get("Error", {}).get("Code") in ("404", "NoSuchKey", "NotFound"):
            return None
        raise
    recorded = head.get("Metadata", {}).get("sha256")
    if recorded:
        return str(recorded)
    hasher = hashlib.sha256()
    body = client.get_object(Bucket=bucket, Key=key)["Body"]
    for chunk in body.iter_chunks(1 << 20):
        hasher.update(chunk)
    return hasher.hexdigest()
