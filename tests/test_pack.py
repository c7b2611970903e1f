"""``pp pack``: deterministic artifacts, published to file:// and s3:// repos, signed."""

from __future__ import annotations

import base64
import io
import os
import time
from collections.abc import Iterator
from pathlib import Path

import boto3
import pytest
from click.testing import CliRunner
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey
from preparer_support import moto_server, sha256_of

from agents.system.archive import Limits, extract
from agents.system.fetch import FetchOptions, fetch
from intent.cli.pack import PackError, artifact_url, build, pack
from intent.cli.pack_command import pack as pack_command
from intent.signing import SignatureError, load_public_key, sign, verify


@pytest.fixture
def tree(tmp_path: Path) -> Path:
    root = tmp_path / "tree"
    (root / "bin").mkdir(parents=True)
    (root / "empty").mkdir()
    (root / "bin" / "run").write_text("#!/bin/sh\necho hi\n")
    (root / "bin" / "run").chmod(0o775)
    (root / "conf.ini").write_text("a=1\n")
    (root / "lib").symlink_to("bin")
    (root / "z" / "deep").mkdir(parents=True)
    (root / "z" / "deep" / "data").write_bytes(os.urandom(50_000))
    return root


def built(tree: Path) -> tuple[str, bytes]:
    out = io.BytesIO()
    sha = build(tree, out)
    return sha, out.getvalue()


def test_the_same_tree_gives_the_same_sha256_whatever_its_times_and_owners(tree: Path) -> None:
    first, _ = built(tree)
    now = time.time()
    for path in tree.rglob("*"):
        os.utime(path, (now + 1000, now + 1000), follow_symlinks=False)
    (tree / "conf.ini").chmod(0o664)  # group write is not part of the artifact
    if os.geteuid() == 0:
        os.lchown(tree / "conf.ini", 12345, 12345)
    assert built(tree)[0] == first


def test_a_changed_tree_gives_another_sha256(tree: Path) -> None:
    first, _ = built(tree)
    (tree / "conf.ini").write_text("a=2\n")
    assert built(tree)[0] != first
    (tree / "conf.ini").write_text("a=1\n")
    assert built(tree)[0] == first
    (tree / "bin" / "run").chmod(0o644)  # the executable bit is part of it
    assert built(tree)[0] != first


def test_an_artifact_extracts_back_to_the_tree(tree: Path, tmp_path: Path) -> None:
    artifact = tmp_path / "a.tar.gz"
    with artifact.open("wb") as out:
        build(tree, out)
    dest = tmp_path / "dest"
    dest.mkdir()
    extract(artifact, dest, Limits(1 << 30, 1000))
    assert (dest / "bin" / "run").read_text() == "#!/bin/sh\necho hi\n"
    assert os.access(dest / "bin" / "run", os.X_OK)
    assert os.readlink(dest / "lib") == "bin"
    assert (dest / "empty").is_dir()
    assert (dest / "z" / "deep" / "data").read_bytes() == (
        tree / "z" / "deep" / "data"
    ).read_bytes()


@pytest.mark.parametrize(
    ("make", "message"),
    [
        (lambda root: (root / "out").symlink_to("../../etc"), "leaves the directory"),
        (lambda root: (root / "abs").symlink_to("/etc/passwd"), "leaves the directory"),
        (lambda root: os.mkfifo(root / "pipe"), "not a regular file"),
    ],
    ids=["relative-symlink-out", "absolute-symlink", "fifo"],
)
def test_what_the_preparer_would_refuse_cannot_be_packed(tree: Path, make, message: str) -> None:  # type: ignore[no-untyped-def]
    make(tree)
    with pytest.raises(PackError, match=message):
        built(tree)


# -- publishing to a file:// repo ---------------------------------------------------------


def test_pack_publishes_to_a_file_repo_and_is_idempotent(tree: Path, tmp_path: Path) -> None:
    repo = tmp_path / "repo"
    published = pack(tree, "hello", "1.0", f"file://{repo}")
    artifact = repo / "hello" / "hello_1.0.tar.gz"
    assert published.url == f"file://{artifact}" == artifact_url(str(repo), "hello", "1.0")
    assert sha256_of(artifact) == published.sha256 and not published.unchanged
    mtime = artifact.stat().st_mtime_ns

    again = pack(tree, "hello", "1.0", str(repo))

    assert again.unchanged and again.sha256 == published.sha256
    assert artifact.stat().st_mtime_ns == mtime
    assert [p.name for p in (repo / "hello").iterdir()] == ["hello_1.0.tar.gz"]


def test_republishing_a_version_with_other_bytes_needs_force(tree: Path, tmp_path: Path) -> None:
    repo = str(tmp_path / "repo")
    first = pack(tree, "hello", "1.0", repo)
    (tree / "conf.ini").write_text("changed\n")
    with pytest.raises(PackError, match="already exists with different contents"):
        pack(tree, "hello", "1.0", repo)
    assert sha256_of(tmp_path / "repo" / "hello" / "hello_1.0.tar.gz") == first.sha256
    forced = pack(tree, "hello", "1.0", repo, force=True)
    assert sha256_of(tmp_path / "repo" / "hello" / "hello_1.0.tar.gz") == forced.sha256


def test_the_cli_prints_only_the_sha256_and_writes_a_verifiable_signature(
    tree: Path, tmp_path: Path
) -> None:
    key = Ed25519PrivateKey.generate()
    key_file = tmp_path / "release.pem"
    key_file.write_bytes(
        key.private_bytes(
            serialization.Encoding.PEM,
            serialization.PrivateFormat.PKCS8,
            serialization.NoEncryption(),
        )
    )
    pub_file = tmp_path / "release.pub"
    pub_file.write_bytes(
        key.public_key().public_bytes(
            serialization.Encoding.OpenSSH, serialization.PublicFormat.OpenSSH
        )
    )
    repo = tmp_path / "repo"
    result = CliRunner().invoke(
        pack_command,
        [
            str(tree),
            "--app",
            "hello",
            "--version",
            "1.0",
            "--repo",
            str(repo),
            "--sign",
            str(key_file),
        ],
    )
    assert result.exit_code == 0, result.output
    sha = result.stdout.strip()
    artifact = repo / "hello" / "hello_1.0.tar.gz"
    assert sha == sha256_of(artifact)
    signature = (repo / "hello" / "hello_1.0.tar.gz.sig").read_bytes()
    release = {"release": load_public_key(pub_file)}
    assert verify(signature, "hello", "1.0", sha, release) == "release"
    with pytest.raises(SignatureError):
        verify(signature, "hello", "1.0", "f" * 64, release)
    other = Ed25519PrivateKey.generate().public_key()
    with pytest.raises(SignatureError, match="does not verify"):
        verify(signature, "hello", "1.0", sha, {"other": other})


def test_a_signature_binds_the_app_and_the_version() -> None:
    key = Ed25519PrivateKey.generate()
    keys = {"release": key.public_key()}
    sha = "a" * 64
    signature = sign(key, "app-a", "1", sha)
    assert verify(signature, "app-a", "1", sha, keys) == "release"
    for app, version in (("app-b", "1"), ("app-a", "2"), ("app-a1", ""), ("app-a", "1\napp x")):
        with pytest.raises(SignatureError, match=f"for app {app} version"):
            verify(signature, app, version, sha, keys)


def test_an_old_format_signature_is_refused_with_a_way_out() -> None:
    key = Ed25519PrivateKey.generate()
    sha = "b" * 64
    old = base64.b64encode(key.sign(f"platypus-artifact sha256:{sha}\n".encode()))
    with pytest.raises(SignatureError) as refused:
        verify(old, "hello", "1.0", sha, {"release": key.public_key()})
    message = str(refused.value)
    assert "old format" in message and "pp pack" in message and "--sign" in message
    assert "\n" not in message
    # from a key that is not trusted, it is simply not a valid signature
    stranger = {"other": Ed25519PrivateKey.generate().public_key()}
    with pytest.raises(SignatureError, match="does not verify"):
        verify(old, "hello", "1.0", sha, stranger)


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["--app", "../etc", "--version", "1"], "app '../etc'"),
        (["--app", "ok", "--version", "1/2"], "version '1/2'"),
        (["--app", "ok", "--version", "1", "--repo", "http://h.invalid/r"], "file:// or s3://"),
    ],
)
def test_the_cli_explains_bad_arguments_in_one_line(
    tree: Path, tmp_path: Path, args: list[str], message: str
) -> None:
    if "--repo" not in args:
        args = [*args, "--repo", str(tmp_path / "repo")]
    result = CliRunner().invoke(pack_command, [str(tree), *args])
    assert result.exit_code != 0
    assert message in result.output
    assert "Traceback" not in result.output


# -- publishing to s3:// (moto in server mode) ----------------------------------------------


@pytest.fixture(scope="module")
def s3_endpoint() -> Iterator[str]:
    with moto_server() as endpoint:
        yield endpoint


def test_pack_publishes_to_s3_and_the_preparer_fetches_it(
    tree: Path, s3_endpoint: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("AWS_ENDPOINT_URL", s3_endpoint)
    monkeypatch.setenv("AWS_ACCESS_KEY_ID", "testing")
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", "testing")
    monkeypatch.setenv("AWS_DEFAULT_REGION", "us-east-1")
    boto3.client("s3").create_bucket(Bucket="releases")
    signer = Ed25519PrivateKey.generate()

    published = pack(tree, "hello", "1.0", "s3://releases/apps", lambda *what: sign(signer, *what))
    assert published.url == "s3://releases/apps/hello/hello_1.0.tar.gz"
    sink = io.BytesIO()
    assert fetch(published.url, sink, FetchOptions(attempts=1)).sha256 == published.sha256
    again = pack(tree, "hello", "1.0", "s3://releases/apps")
    assert again.unchanged
    (tree / "conf.ini").write_text("changed\n")
    with pytest.raises(PackError, match="already exists with different contents"):
        pack(tree, "hello", "1.0", "s3://releases/apps")
    sig = boto3.client("s3").get_object(Bucket="releases", Key="apps/hello/hello_1.0.tar.gz.sig")
    body = sig["Body"].read()
    assert verify(body, "hello", "1.0", published.sha256, {"k": signer.public_key()}) == "k"
