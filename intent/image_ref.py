"""Docker image references as the intent accepts them: ``host[:port]/name@sha256:<hex>``.

Only a reference pinned by digest says which bytes run: a tag is a pointer its
registry may move at any time, so the preparer could never verify what it pulled
against the intent. The registry host is required too, spelt so that Docker reads
it as a host (a ``.`` or a ``:port`` in it, or ``localhost``): ``team/web`` would
silently mean a public index, which is not where a platform's images live.

The grammar is Docker's distribution reference grammar, narrowed to that one form.
"""

from __future__ import annotations

import re
from dataclasses import dataclass

_LABEL = r"[A-Za-z0-9](?:[A-Za-z0-9-]*[A-Za-z0-9])?"
_HOST = rf"{_LABEL}(?:\.{_LABEL})*(?::[0-9]{{1,5}})?"
_COMPONENT = r"[a-z0-9]+(?:(?:[._]|__|-+)[a-z0-9]+)*"
_REPOSITORY = rf"{_COMPONENT}(?:/{_COMPONENT})*"
_DIGEST = r"sha256:(?P<hex>[0-9a-f]{64})"

_PINNED = re.compile(rf"^(?P<host>{_HOST})/(?P<path>{_REPOSITORY})@{_DIGEST}$")

PATTERN = rf"^{_HOST}/{_REPOSITORY}@sha256:[0-9a-f]{{64}}$"
"""The same form for a JSON Schema (no named groups); the schema cannot say the host part
needs a '.', a ':port' or to be localhost, the model does."""
_TAGGED = re.compile(r"^(?P<name>[^@\s]+?)(?::(?P<tag>[A-Za-z0-9_][A-Za-z0-9_.-]{0,127}))?$")

MAX_LENGTH = 255
"""Docker's own limit on a repository name is 255 characters; the digest comes on top."""


@dataclass(frozen=True)
class ImageRef:
    host: str
    path: str
    sha256: str
    """The manifest digest's 64 hex digits."""

    @property
    def repository(self) -> str:
        """``host[:port]/name``: what is pulled, without the digest."""
        return f"{self.host}/{self.path}"

    @property
    def digest(self) -> str:
        return f"sha256:{self.sha256}"

    def __str__(self) -> str:
        return f"{self.repository}@{self.digest}"


def _is_host(part: str) -> bool:
    return "." in part or ":" in part or part == "localhost"


def parse_image(text: str) -> ImageRef:
    """The reference in ``text``; ValueError naming what to change otherwise."""
    if len(text) > MAX_LENGTH + len("@sha256:") + 64:
        raise ValueError(f"is longer than {MAX_LENGTH + 72} characters")
    match = _PINNED.match(text)
    if match is not None and _is_host(match["host"]):
        return ImageRef(match["host"], match["path"], match["hex"])
    example = "host[:port]/name@sha256:<64 hex digits>"
    name, at, digest = text.partition("@")
    if not at:
        raise ValueError(
            f"{text!r} is not pinned by digest, so what runs could not be verified; give "
            f"{example} (pp pack --docker prints it; so does docker inspect --format "
            "'{{index .RepoDigests 0}}')"
        )
    if not re.fullmatch(r"sha256:[0-9a-f]{64}", digest):
        raise ValueError(f"digest {digest!r} is not sha256:<64 lowercase hex digits>")
    host, slash, _ = name.partition("/")
    if not slash or not _is_host(host):
        raise ValueError(
            f"{name!r} names no registry host; give {example} (the host has a '.' or a "
            "':port', or is localhost)"
        )
    tagged = _TAGGED.match(name.rsplit("/", 1)[1])
    if tagged is not None and tagged["tag"] is not None:
        raise ValueError(f"drop the tag ':{tagged['tag']}': the digest alone names the image")
    raise ValueError(f"{name!r} is not a valid repository name; give {example}")
