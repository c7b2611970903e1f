"""What the preparer should do for one app: a pure function of intent and observation.

No I/O here, so every rule (what to fetch, what to replace, what garbage to
collect and what to keep for rollback) is tested with plain data.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from urllib.parse import urlsplit

from agents.system import file_url
from agents.system.fetch import display_url


@dataclass(frozen=True)
class Wanted:
    """A version the intent names for this node."""

    version: str
    sha256: str
    url: str | None
    """None when the version has no url and the preparer has no ``--repo``."""
    active: bool = False
    image: str | None = None
    """A Docker image pinned by digest (``sha256`` is its digest); ``url`` is then unused."""


@dataclass(frozen=True)
class Present:
    """A directory found under an install's final name."""

    version: str
    sha256: str | None
    """From its completion marker; None when the marker is missing or unreadable."""
    installed_at: float | None = None
    legacy: bool = False
    """Its marker predates the record of the artifact's services (``InstallMarker.legacy``)."""
    image: str | None = None
    """The image its marker names, for an image install."""
    image_missing: bool = False
    """An image install whose image the engine no longer holds (removed by hand)."""


@dataclass(frozen=True)
class Observed:
    installs: Mapping[str, Present]
    current: str | None = None
    previous: str | None = None
    strays: tuple[str, ...] = ()
    """Temporary entries a crashed run left behind."""


@dataclass(frozen=True)
class CleanStray:
    name: str


@dataclass(frozen=True)
class Remove:
    version: str
    reason: str
    image: str | None = None
    """The install's image, removed from the engine too unless still wanted or in use."""


@dataclass(frozen=True)
class Install:
    version: str
    sha256: str
    url: str
    replace: bool
    """A directory (incomplete, or another sha256) already holds the final name."""
    in_place: bool = False
    """The install is complete and runs (``current``), but its marker predates the record
    of its services: verify the artifact again and rewrite only the marker."""
    image: str | None = None
    """Pull this image by digest instead of fetching ``url``."""


@dataclass(frozen=True)
class Refuse:
    """A wanted version that cannot be installed until someone changes something."""

    version: str
    reason: str


Action = CleanStray | Remove | Install | Refuse


def local_url_refusal(url: str, local_root: str | None) -> str | None:
    """Why a ``file://`` URL is refused, or None when it may be fetched.

    URLs come from ``config``, which app owners write, and the preparer reads as root:
    a ``file://`` URL anywhere on the host would let an app owner read any file (its
    sha256 is reported, and once matched it is extracted and handed to ``run_as``). So
    local files are fetched only from under the preparer's own ``--repo`` directory,
    by the same reading of the URL the fetcher opens it with (``file_url``).
    """
    if not file_url.is_file_url(url):
        return None
    try:
        file_url.beneath(url, local_root)
    except file_url.Refused as exc:
        return str(exc)
    return None


def source_refusal(url: str, allowed: Sequence[str]) -> str | None:
    """Why a remote URL is refused under ``--allowed-sources``, or None.

    With no list, any http(s)/s3 source is fetched (the sha256 in the intent, and with
    ``--trusted-keys`` a signature, decide what may be installed). A list confines app
    owners to the platform's own artifact stores: a URL is allowed when its scheme and
    host equal one entry's and its path lies under that entry's path, segment by
    segment, so ``https://releases.example`` never admits ``releases.example.evil``."""
    if not allowed or file_url.is_file_url(url):
        return None
    parts = urlsplit(url)
    for prefix in allowed:
        base = urlsplit(prefix)
        root = base.path.rstrip("/") + "/"
        same_place = (parts.scheme, parts.netloc.lower()) == (base.scheme, base.netloc.lower())
        if same_place and (parts.path + "/").startswith(root):
            return None
    return f"{display_url(url)} is not under --allowed-sources ({', '.join(allowed)})"


def plan(
    wanted: Iterable[Wanted],
    observed: Observed,
    keep_old: int = 1,
    local_root: str | None = None,
    allowed_sources: Sequence[str] = (),
    image_rules: ImageRules | None = None,
) -> list[Action]:
    """The actions that bring one app's installs in line with its intent.

    Order matters: leftovers first, then installs, the active version before the
    prepared ones, then garbage: a new version is not kept waiting while old ones are
    deleted. (A download refused for want of disk space fails this pass; the garbage
    still goes in it, and the retry finds the room.) Nothing at all when everything
    is in place.
    """
    by_version = {w.version: w for w in wanted}
    actions: list[Action] = [CleanStray(name) for name in sorted(observed.strays)]
    for want in sorted(by_version.values(), key=lambda w: (not w.active, w.version)):
        present = observed.installs.get(want.version)
        complete = present is not None and present.sha256 == want.sha256
        if want.image is not None:
            running = want.version == observed.current
            actions.extend(_image(want, present, complete, running, image_rules or ImageRules()))
            continue
        if complete and present is not None and not present.legacy:
            continue
        if want.url is None:
            actions.append(
                Refuse(want.version, "the version has no url and pp-preparer has no --repo")
            )
        elif refusal := local_url_refusal(want.url, local_root) or source_refusal(
            want.url, allowed_sources
        ):
            actions.append(Refuse(want.version, refusal))
        elif complete and want.version == observed.current:
            # Upgraded agents: the running install cannot be swapped under its app, and
            # its services must come from the verified artifact, so verify it again.
            actions.append(Install(want.version, want.sha256, want.url, False, in_place=True))
        elif present is not None and want.version == observed.current:
            actions.append(Refuse(want.version, _running_mismatch(present, want)))
        else:
            actions.append(Install(want.version, want.sha256, want.url, present is not None))
    actions.extend(_garbage(by_version, observed, keep_old))
    return actions


def _garbage(wanted: Mapping[str, Wanted], observed: Observed, keep_old: int) -> list[Remove]:
    """Installs no longer wanted, except what ``current`` runs and the ``keep_old``
    most recent complete ones (``previous`` first), so rollback stays instant."""
    protected = set(wanted)
    if observed.current is not None:
        protected.add(observed.current)
    old = [p for v, p in observed.installs.items() if v not in protected]
    candidates = sorted(
        (p for p in old if p.sha256 is not None),
        key=lambda p: (p.version != observed.previous, -(p.installed_at or 0.0), p.version),
    )
    kept = {p.version for p in candidates[: max(0, keep_old)]}
    return [
        Remove(p.version, "incomplete" if p.sha256 is None else "no longer in the intent", p.image)
        for p in sorted(old, key=lambda p: p.version)
        if p.version not in kept
    ]


@dataclass(frozen=True)
class ImageRules:
    """What the preparer's options say about image versions."""

    allowed_registries: tuple[str, ...] = ()
    """When set, images are pulled only from these ``host[:port]`` registries."""
    signatures_required: bool = False
    """``--trusted-keys``: every artifact must be signed, and images carry no signature."""


def image_refusal(image: str, rules: ImageRules) -> str | None:
    """Why an image version is refused under the preparer's options, or None.

    Images come from ``config``, which app owners write, and the engine connects to
    whatever registry a reference names: ``--allowed-registries`` confines that to the
    platform's own registries, as ``--allowed-sources`` confines tarball URLs."""
    if rules.signatures_required:
        return "pp-preparer requires signed artifacts (--trusted-keys) and images carry none"
    host = image.split("/", 1)[0].lower()
    allowed = rules.allowed_registries
    if allowed and host not in {r.lower() for r in allowed}:
        return f"registry {host} is not in --allowed-registries ({', '.join(allowed)})"
    return None


def _image(
    want: Wanted, present: Present | None, complete: bool, running: bool, rules: ImageRules
) -> list[Action]:
    """An image version: pulled again when its install is missing, names another digest,
    or the engine lost its image. An image install holds only root's notes, so unlike a
    tarball it may be replaced even while it runs (the engine holds what runs); a
    tarball's install under the same version name is the app's files, kept while they run."""
    assert want.image is not None
    if refusal := image_refusal(want.image, rules):
        return [Refuse(want.version, refusal)]
    if complete and present is not None and not present.image_missing:
        return []
    if present is not None and running and present.image is None:
        return [Refuse(want.version, _running_mismatch(present, want))]
    return [Install(want.version, want.sha256, "", present is not None, image=want.image)]


def _running_mismatch(present: Present, want: Wanted) -> str:
    found = "has no completion marker" if present.sha256 is None else f"has sha256 {present.sha256}"
    return (
        f"the installed copy {found} but the intent says {want.sha256}, and it is what "
        "runs now (current), so it is not replaced under the running app: publish the new "
        "bytes as a new version"
    )
