"""Where an app lives under its ``basedir``: the one layout preparer and setlive share.

    <basedir>/                            root's, not writable by the app
    <basedir>/installs/                   root's, not writable by the app
    <basedir>/installs/<app>_<version>/   one complete, verified install per version
                                          (handed to the app's run_as user)
    <basedir>/installs/<app>_<version>/.pp-installed.json   the completion marker (root's)
    <basedir>/current  -> installs/<app>_<version>   what runs (set by setlive)
    <basedir>/previous -> installs/<app>_<version>   what ran before (for rollback)

The preparer extracts into a private temp directory, writes the marker and only
then hands the tree to the app's user and renames it into place, so an install
under its final name is always whole; setlive acts only on installs whose marker
matches the intent's sha256.

An install belongs to the app's user, so the app can delete or move its marker
but not forge one: a marker counts only when it belongs to the agents' own user,
nobody else may write it, and it names this app and version. It also records the
services the verified artifact declares (``bin/launch``), so what the app adds to
its install later never becomes a service supervised by root.

An image version's install holds no files of the app: the image lives in the Docker
engine, and the install, root's and never handed over, holds the marker (naming the
image) and ``.pp-image``, the pinned reference the service's ``run`` reads.
"""

from __future__ import annotations

import json
import os
import re
from dataclasses import dataclass
from pathlib import Path

from agents.system.fs import read_small
from intent.image_ref import parse_image

MARKER_NAME = ".pp-installed.json"
IMAGE_FILE = ".pp-image"
"""In an image install: the pinned reference alone, one line, for the service's run script."""

LaunchEntries = tuple[str | None, ...]
"""The services of an install: ``(None,)`` for a single ``bin/launch`` executable, the
names of the executables in it for a ``bin/launch`` directory."""

_ENTRY_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]{0,63}$")


def launch_entries(install_dir: Path) -> tuple[LaunchEntries, str | None]:
    """``bin/launch`` as services, or an error naming what is wrong.

    Read by the preparer from the artifact as extracted, while the tree is still
    private (inside root's 0700 work directory); never from a live install, which the
    app can change.
    """
    launch = install_dir / "bin" / "launch"
    if launch.is_dir():
        entries: list[str | None] = []
        for child in sorted(launch.iterdir()):
            if child.name.startswith(".") or not child.is_file() or not os.access(child, os.X_OK):
                continue
            if not is_entry_name(child.name):
                return (), f"bin/launch/{child.name}: not a usable service name"
            entries.append(child.name)
        if not entries:
            return (), "bin/launch is a directory with no executables"
        return tuple(entries), None
    if launch.is_file() and os.access(launch, os.X_OK):
        return (None,), None
    return (), "bin/launch is missing or not executable"


def is_entry_name(name: str) -> bool:
    return bool(_ENTRY_NAME.match(name)) and ".." not in name


@dataclass(frozen=True)
class InstallMarker:
    sha256: str
    installed_at: float
    app: str | None = None
    version: str | None = None
    launch: LaunchEntries | None = None
    """The services the verified artifact declares; None in a marker written before the
    preparer recorded them (see ``legacy``)."""
    launch_error: str | None = None
    """Why the artifact declares no usable service, when it does not."""
    image: str | None = None
    """The Docker image (``host/name@sha256:...``) the install stands for: the engine
    holds the image, the install only these notes (root's, never handed to the app)."""

    @classmethod
    def of_image(cls, app: str, version: str, image: str, installed_at: float) -> InstallMarker:
        return cls(parse_image(image).sha256, installed_at, app, version, (None,), None, image)

    @classmethod
    def of_artifact(
        cls, app: str, version: str, sha256: str, tree: Path, installed_at: float
    ) -> InstallMarker:
        """The marker for ``tree``, an artifact extracted and not yet handed over."""
        entries, error = launch_entries(tree)
        return cls(sha256, installed_at, app, version, entries, error)

    @property
    def legacy(self) -> bool:
        """Written before markers recorded the artifact's services: the install's
        service list cannot be known without verifying the artifact again."""
        return self.launch is None

    def to_bytes(self) -> bytes:
        data: dict[str, object] = {"sha256": self.sha256, "installed_at": self.installed_at}
        if not self.legacy:
            data |= {"app": self.app, "version": self.version, "launch": list(self.launch or ())}
            if self.launch_error is not None:
                data["launch_error"] = self.launch_error
            if self.image is not None:
                data["image"] = self.image
        return json.dumps(data).encode()

    @classmethod
    def parse(cls, raw: bytes) -> InstallMarker:
        """ValueError unless ``raw`` is a marker (of either generation)."""
        try:
            data = json.loads(raw)
            marker = cls(str(data["sha256"]), float(data["installed_at"]))
            if "launch" not in data:
                return marker
            if not isinstance(data["launch"], list):
                raise TypeError("launch must be a list")
            launch = tuple(data["launch"])
            error = data.get("launch_error")
            app, version = data["app"], data["version"]
            image = data.get("image")
            if image is not None and parse_image(image).sha256 != data["sha256"]:
                raise ValueError("not an install marker: image and sha256 differ")
        except (KeyError, TypeError) as exc:
            raise ValueError(f"not an install marker: {exc}") from exc
        if not all(e is None or (isinstance(e, str) and is_entry_name(e)) for e in launch):
            raise ValueError("not an install marker: bad launch entries")
        if not (isinstance(app, str) and isinstance(version, str)):
            raise ValueError("not an install marker: app and version must be strings")
        if error is not None and not isinstance(error, str):
            raise ValueError("not an install marker: launch_error must be a string")
        return cls(marker.sha256, marker.installed_at, app, version, launch, error, image)


@dataclass(frozen=True)
class AppLayout:
    basedir: Path
    app: str

    @property
    def installs(self) -> Path:
        return self.basedir / "installs"

    def install_dir(self, version: str) -> Path:
        return self.installs / f"{self.app}_{version}"

    def marker(self, version: str) -> Path:
        return self.install_dir(version) / MARKER_NAME

    @property
    def current(self) -> Path:
        return self.basedir / "current"

    @property
    def previous(self) -> Path:
        return self.basedir / "previous"

    def read_marker(self, version: str) -> InstallMarker | None:
        """The completion marker, or None when the install is absent, incomplete, or
        its marker is not one the agents wrote for this app and version."""
        try:
            marker = InstallMarker.parse(read_small(self.marker(version), owner=os.geteuid()))
        except (OSError, ValueError):
            return None
        if not marker.legacy and (marker.app, marker.version) != (self.app, version):
            return None  # moved here from another install
        return marker

    def is_installed(self, version: str, sha256: str) -> bool:
        marker = self.read_marker(version)
        return marker is not None and marker.sha256 == sha256

    def version_of(self, link: Path) -> str | None:
        """The version a ``current``/``previous`` link points at, if it is one of ours."""
        try:
            target = os.readlink(link)
        except OSError:
            return None
        name = Path(target).name
        prefix = f"{self.app}_"
        return name[len(prefix) :] if name.startswith(prefix) else None

    def has_image_installs(self) -> bool:
        """Whether any install of the app stands for an image (so the engine is needed)."""
        return any(
            (marker := self.read_marker(version)) is not None and marker.image is not None
            for version in self.installed_versions()
        )

    def installed_versions(self) -> list[str]:
        """Versions with a directory (not a symlink) under their install name."""
        prefix = f"{self.app}_"
        try:
            with os.scandir(self.installs) as entries:
                names = sorted(e.name for e in entries if e.is_dir(follow_symlinks=False))
        except FileNotFoundError:
            return []
        return [n[len(prefix) :] for n in names if n.startswith(prefix)]
