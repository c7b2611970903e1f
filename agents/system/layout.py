"""Where an app lives under its ``basedir``: the one layout preparer and setlive share.

    <basedir>/installs/<app>_<version>/   one complete, verified install per version
    <basedir>/installs/<app>_<version>/.pp-installed.json   the completion marker
    <basedir>/current  -> installs/<app>_<version>   what runs (set by setlive)
    <basedir>/previous -> installs/<app>_<version>   what ran before (for rollback)

The preparer extracts into a temp directory, writes the marker last and renames
the directory into place, so an install under its final name is always whole;
setlive acts only on installs whose marker matches the intent's sha256.
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass
from pathlib import Path

from agents.system.fs import read_small

MARKER_NAME = ".pp-installed.json"


@dataclass(frozen=True)
class InstallMarker:
    sha256: str
    installed_at: float

    def to_bytes(self) -> bytes:
        return json.dumps({"sha256": self.sha256, "installed_at": self.installed_at}).encode()


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
        """The completion marker, or None when the install is absent or incomplete."""
        try:
            data = json.loads(read_small(self.marker(version)))
            return InstallMarker(str(data["sha256"]), float(data["installed_at"]))
        except (OSError, ValueError, KeyError, TypeError):
            return None

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

    def installed_versions(self) -> list[str]:
        prefix = f"{self.app}_"
        try:
            names = sorted(p.name for p in self.installs.iterdir() if p.is_dir())
        except FileNotFoundError:
            return []
        return [n[len(prefix) :] for n in names if n.startswith(prefix)]
