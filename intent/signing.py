"""Detached Ed25519 signatures over what an artifact is: its app, version and sha256.

The signature covers the text::

    platypus-artifact v2
    app <app>
    version <version>
    sha256 <hex>

rather than the artifact's bytes: Ed25519 needs its whole message in memory, and
the sha256 is computed while streaming anyway, so this keeps memory flat whatever
the artifact's size while binding the signature to exactly those bytes. Naming
the app and version binds it to one release too: a signed artifact cannot be
deployed as another app or another version.

The first format covered only ``platypus-artifact sha256:<hex>``; such signatures
are refused with a message saying to sign again with ``pp pack --sign``.

A signature file (``<artifact>.sig``) holds the 64 signature bytes, raw or in
base64. Keys are PEM (``openssl genpkey -algorithm ed25519``) or OpenSSH
(``ssh-keygen -t ed25519``) files.
"""

from __future__ import annotations

import base64
import binascii
from collections.abc import Mapping
from pathlib import Path

from cryptography.exceptions import InvalidSignature, UnsupportedAlgorithm
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey, Ed25519PublicKey

from intent.errors import SignatureError as SignatureError  # raised here: callers import it here

SIGNATURE_SUFFIX = ".sig"


def signed_message(app: str, version: str, sha256: str) -> bytes:
    return f"platypus-artifact v2\napp {app}\nversion {version}\nsha256 {sha256}\n".encode()


def _first_format_message(sha256: str) -> bytes:
    return f"platypus-artifact sha256:{sha256}\n".encode()


def load_private_key(path: Path) -> Ed25519PrivateKey:
    data = _read(path)
    key: object
    try:
        if data.lstrip().startswith(b"-----BEGIN OPENSSH PRIVATE KEY"):
            key = serialization.load_ssh_private_key(data, password=None)
        else:
            key = serialization.load_pem_private_key(data, password=None)
    except (ValueError, TypeError, UnsupportedAlgorithm) as exc:
        raise SignatureError(f"{path}: not an unencrypted Ed25519 private key ({exc})") from exc
    if not isinstance(key, Ed25519PrivateKey):
        raise SignatureError(f"{path}: not an Ed25519 private key")
    return key


def load_public_key(path: Path) -> Ed25519PublicKey:
    data = _read(path)
    key: object
    try:
        if data.lstrip().startswith(b"ssh-"):
            key = serialization.load_ssh_public_key(data.strip())
        else:
            key = serialization.load_pem_public_key(data)
    except (ValueError, TypeError, UnsupportedAlgorithm) as exc:
        raise SignatureError(f"{path}: not an Ed25519 public key ({exc})") from exc
    if not isinstance(key, Ed25519PublicKey):
        raise SignatureError(f"{path}: not an Ed25519 public key")
    return key


def load_trusted_keys(directory: Path) -> dict[str, Ed25519PublicKey]:
    """Every public key in ``directory`` (hidden files skipped), by file name.

    An unreadable or foreign file is an error rather than skipped: a typo in the
    trust store should stop the agent, not silently trust fewer keys."""
    try:
        paths = sorted(p for p in directory.iterdir() if not p.name.startswith("."))
    except OSError as exc:
        raise SignatureError(f"--trusted-keys {directory}: {exc.strerror or exc}") from exc
    keys = {p.name: load_public_key(p) for p in paths if p.is_file()}
    if not keys:
        raise SignatureError(f"--trusted-keys {directory}: no public keys in it")
    return keys


def sign(key: Ed25519PrivateKey, app: str, version: str, sha256: str) -> bytes:
    """The contents of a ``.sig`` file: the signature in base64 and a newline."""
    return base64.b64encode(key.sign(signed_message(app, version, sha256))) + b"\n"


def verify(
    signature: bytes,
    app: str,
    version: str,
    sha256: str,
    keys: Mapping[str, Ed25519PublicKey],
) -> str:
    """The name of the trusted key that signed ``app`` ``version`` with these bytes;
    SignatureError if none did."""
    raw = _decode(signature)
    name = _signer(raw, signed_message(app, version, sha256), keys)
    if name is not None:
        return name
    if _signer(raw, _first_format_message(sha256), keys) is not None:
        raise SignatureError(
            "signature is in the old format (sha256 only, any app or version); sign it "
            f"again: pp pack <dir> --app {app} --version {version} --repo <repo> --sign <key>"
        )
    raise SignatureError(
        f"signature does not verify for app {app} version {version} against any of the "
        f"{len(keys)} trusted key(s)"
    )


def _signer(raw: bytes, message: bytes, keys: Mapping[str, Ed25519PublicKey]) -> str | None:
    for name, key in keys.items():
        try:
            key.verify(raw, message)
        except InvalidSignature:
            continue
        return name
    return None


def _decode(signature: bytes) -> bytes:
    if len(signature) == 64:
        return signature
    try:
        raw = base64.b64decode(signature.strip(), validate=True)
    except (binascii.Error, ValueError):
        raw = b""
    if len(raw) != 64:
        raise SignatureError("signature file is neither 64 raw bytes nor their base64")
    return raw


def _read(path: Path) -> bytes:
    try:
        return path.read_bytes()
    except OSError as exc:
        raise SignatureError(f"{path}: {exc.strerror or exc}") from exc
