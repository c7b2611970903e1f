"""Image versions in the intent: pinned by digest, one artifact per version, one-line errors."""

from __future__ import annotations

import pytest

from intent.image_ref import parse_image
from intent.model import AppConfig, IntentError, parse

DIGEST = "a" * 64
IMAGE = f"registry.example:5000/team/web@sha256:{DIGEST}"


def version(**fields: object) -> AppConfig:
    return parse(AppConfig, {"versions": {"1.0": {"state": "active", **fields}}}, "config")


def test_an_image_pinned_by_digest_is_a_version_whose_digest_is_the_checksum() -> None:
    spec = version(image=IMAGE).versions["1.0"]
    assert spec.image == IMAGE
    assert spec.sha256 is None and spec.url is None
    assert spec.digest == DIGEST


def test_a_tarball_version_keeps_its_sha256_as_digest() -> None:
    assert version(sha256="b" * 64).versions["1.0"].digest == "b" * 64


@pytest.mark.parametrize(
    "image",
    [
        "registry.example:5000/web:1.0",
        "registry.example/web",
        "localhost:5000/team/web:latest",
    ],
)
def test_a_tag_only_reference_is_refused_in_one_line_naming_the_fix(image: str) -> None:
    with pytest.raises(IntentError) as caught:
        version(image=image)
    message = str(caught.value)
    assert "\n" not in message
    assert message.startswith("config: versions.1.0.image: ")
    assert "not pinned by digest" in message
    assert "host[:port]/name@sha256:<64 hex digits>" in message


@pytest.mark.parametrize(
    ("image", "says"),
    [
        (f"web@sha256:{DIGEST}", "names no registry host"),
        (f"team/web@sha256:{DIGEST}", "names no registry host"),
        ("registry.example/web@sha256:abc", "not sha256:<64 lowercase hex digits>"),
        (f"registry.example/web@sha256:{'A' * 64}", "not sha256:<64 lowercase hex digits>"),
        (f"registry.example/web:1.0@sha256:{DIGEST}", "drop the tag ':1.0'"),
        (f"registry.example/Web@sha256:{DIGEST}", "not a valid repository name"),
        (f"registry.example/-web@sha256:{DIGEST}", "not a valid repository name"),
        (f"registry.example/web;rm -rf /@sha256:{DIGEST}", "not a valid repository name"),
        (f"--privileged registry.example/web@sha256:{DIGEST}", "not a valid repository name"),
    ],
)
def test_malformed_references_are_refused_by_what_is_wrong(image: str, says: str) -> None:
    with pytest.raises(IntentError, match=r"versions\.1\.0\.image") as caught:
        version(image=image)
    assert says in str(caught.value)
    assert "\n" not in str(caught.value)


def test_image_with_url_is_refused() -> None:
    with pytest.raises(IntentError, match="url: not with image"):
        version(image=IMAGE, url="https://artifacts.example/web.tar.gz")


def test_image_with_its_own_digest_as_sha256_is_accepted_and_another_refused() -> None:
    assert version(image=IMAGE, sha256=DIGEST).versions["1.0"].digest == DIGEST
    with pytest.raises(IntentError, match="sha256: differs from the image's digest"):
        version(image=IMAGE, sha256="b" * 64)


def test_a_version_with_neither_sha256_nor_image_is_refused_naming_both() -> None:
    with pytest.raises(IntentError, match=r"sha256: required \(or give image"):
        version()


@pytest.mark.parametrize(
    ("text", "host", "path"),
    [
        (f"localhost/web@sha256:{DIGEST}", "localhost", "web"),
        (f"127.0.0.1:5000/a/b-c.d__e@sha256:{DIGEST}", "127.0.0.1:5000", "a/b-c.d__e"),
        (f"registry.example/web@sha256:{DIGEST}", "registry.example", "web"),
    ],
)
def test_references_split_into_repository_and_digest(text: str, host: str, path: str) -> None:
    ref = parse_image(text)
    assert (ref.host, ref.path, ref.sha256) == (host, path, DIGEST)
    assert ref.repository == f"{host}/{path}"
    assert str(ref) == text
