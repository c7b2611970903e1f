"""What is on disk for one app: its installs, its links and any crash leftovers."""

from __future__ import annotations

import os
from collections.abc import Callable

from agents.preparer.plan import Observed, Present
from agents.system.fs import TEMP_MARK
from agents.system.layout import AppLayout


def stray_prefix(app: str) -> str:
    """Every temporary name the preparer makes for ``app`` in ``installs/`` starts so."""
    return f"{TEMP_MARK}{app}_"


def observe(layout: AppLayout, image_present: Callable[[str], bool] | None = None) -> Observed:
    """``image_present`` says whether the engine holds an image install's image; it is
    asked only about image installs (an app of tarballs never needs an engine)."""
    installs = {}
    for version in layout.installed_versions():
        marker = layout.read_marker(version)
        image = marker.image if marker else None
        installs[version] = Present(
            version,
            marker.sha256 if marker else None,
            marker.installed_at if marker else None,
            marker.legacy if marker else False,
            image,
            image is not None and image_present is not None and not image_present(image),
        )
    try:
        names = os.listdir(layout.installs)
    except FileNotFoundError:
        names = []
    prefix = stray_prefix(layout.app)
    return Observed(
        installs=installs,
        current=layout.version_of(layout.current),
        previous=layout.version_of(layout.previous),
        strays=tuple(sorted(n for n in names if n.startswith(prefix))),
    )
