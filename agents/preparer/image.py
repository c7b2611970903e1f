"""Image versions: pull by digest into the Docker engine, and note the install on disk.

The engine holds the image; ``installs/<app>_<version>/`` holds root's notes about it
(the marker naming the image, and ``.pp-image`` for the service's ``run``), so setlive
sees an image version installed exactly as it sees a tarball, by its marker. The
notes are written into a private temp directory and renamed into place, like an
extracted tarball: under its final name an install is whole or absent. They stay
root's (nothing in them is the app's to change), so an image install may be
replaced even while its version runs.

Garbage collection removes an image with its install, unless another app on the
node still wants the same image or a container (running or stopped) was made from
it: the engine keeps it then, and the log says which container.

The agent imports this module only for an app with image versions: the docker SDK
(and requests under it) is a fifth of a one-shot preparer's start-up.
"""

from __future__ import annotations

import contextlib
import os
import time
from collections.abc import Collection, Iterator
from dataclasses import dataclass

import docker as docker_sdk
import structlog

from agents.preparer.apply import (
    ApplyError,
    Installed,
    fsync_directory,
    put_in_place,
    remove_tree,
)
from agents.preparer.plan import Install
from agents.system import docker, fs
from agents.system.fs import temp_name
from agents.system.layout import IMAGE_FILE, MARKER_NAME, AppLayout, InstallMarker
from intent.image_ref import parse_image

log = structlog.get_logger()


@dataclass(frozen=True)
class Images:
    """The preparer's image operations on one engine, for one converge."""

    client: docker_sdk.DockerClient

    @classmethod
    @contextlib.contextmanager
    def open(cls, base_url: str | None) -> Iterator[Images]:
        """The engine at ``base_url`` (None: the SDK's default); DockerError if unreachable."""
        with docker.engine(base_url) as client:
            yield cls(client)

    def present(self, image: str) -> bool:
        """Whether the engine holds ``image``, for ``observe`` (one inspect per image)."""
        return docker.image_id_of(self.client, parse_image(image)) is not None

    def install(self, layout: AppLayout, action: Install) -> Installed:
        """Pull ``action.image`` and put its install in place."""
        assert action.image is not None
        ref = parse_image(action.image)
        try:
            docker.pull(self.client, ref)
        except docker.DockerError as exc:
            raise ApplyError(str(exc)) from exc
        final = layout.install_dir(action.version)
        workdir = temp_name(final)
        trash = None
        marker = InstallMarker.of_image(layout.app, action.version, str(ref), time.time())
        try:
            workdir.mkdir(mode=0o700)
            with fs.open_dir(workdir) as fd:
                fs.write_in(fd, IMAGE_FILE, f"{ref}\n".encode())
                fs.write_in(fd, MARKER_NAME, marker.to_bytes())
                os.fchmod(fd, 0o755)
                os.fsync(fd)
            trash = put_in_place(workdir, final, action.replace)
            fsync_directory(layout.installs)
        except OSError as exc:
            raise ApplyError(f"{exc.filename or final}: {exc.strerror or exc}") from exc
        finally:
            for leftover in (workdir, trash):
                if leftover is not None:
                    remove_tree(leftover)
        return Installed(action.version, 0, 0, 0, None)

    def remove_unused(self, image: str, wanted: Collection[str], app: str) -> None:
        """Remove ``image`` from the engine after its install went, unless ``wanted`` on
        this node (another app's version may name the same image) or a container uses it."""
        if image in wanted:
            log.info("image.kept", app=app, image=image, reason="another version wants it")
            return
        try:
            removed = docker.remove(self.client, parse_image(image))
        except docker.ImageInUse as exc:
            log.info("image.kept", app=app, image=image, reason=str(exc))
            return
        if removed:
            log.info("image.removed", app=app, image=image)
