"""``pp pack --docker``: push a local image to a registry, and name it by its digest.

The image is tagged ``<registry>/<app>:<version>`` and pushed; what is printed is the
reference pinned by the digest the registry stored it under, which is what a
version's ``image`` must be (``pp deploy --image``).
"""

from __future__ import annotations

import re

import docker
import docker.errors

from intent.docker_engine import DockerError, engine, explain, stream_error
from intent.image_ref import ImageRef, parse_image

_REGISTRY = re.compile(r"^[A-Za-z0-9](?:[A-Za-z0-9.-]*[A-Za-z0-9])?(?::[0-9]{1,5})?$")


def push_image(
    image: str, app: str, version: str, registry: str, docker_host: str | None
) -> ImageRef:
    """Push the local ``image`` as ``<registry>/<app>:<version>``; its pinned reference."""
    if not _REGISTRY.match(registry):
        raise DockerError(f"--registry {registry!r}: expected HOST[:PORT]")
    repository = f"{registry}/{app}"
    try:
        parse_image(f"{repository}@sha256:{'0' * 64}")
    except ValueError as exc:
        raise DockerError(f"app {app}: not usable as an image name ({exc})") from exc
    with engine(docker_host) as client:
        name_as(client, image, repository, version)
        digest = push(client, repository, version)
    try:
        return parse_image(f"{repository}@{digest}")
    except ValueError as exc:
        raise DockerError(f"{repository}@{digest}: {exc}") from exc


def push(client: docker.DockerClient, repository: str, tag: str) -> str:
    """Push ``repository:tag``; returns the digest the registry stored it under."""
    try:
        events = client.api.push(repository, tag=tag, stream=True, decode=True)
        error, seen = stream_error(events)
    except docker.errors.APIError as exc:
        raise DockerError(f"cannot push {repository}:{tag}: {explain(exc)}") from exc
    if error is not None:
        raise DockerError(f"cannot push {repository}:{tag}: {error}")
    for event in reversed(seen):
        digest = (event.get("aux") or {}).get("Digest")
        if isinstance(digest, str):
            return digest
    raise DockerError(f"pushed {repository}:{tag}, but the registry reported no digest")


def name_as(client: docker.DockerClient, image: str, repository: str, tag: str) -> None:
    """Name the local ``image`` ``repository:tag`` (what a push sends)."""
    try:
        client.api.tag(image, repository, tag=tag)
    except docker.errors.ImageNotFound as exc:
        raise DockerError(f"no image {image} in the local engine: {explain(exc)}") from exc
    except docker.errors.APIError as exc:
        raise DockerError(f"cannot tag {image} as {repository}:{tag}: {explain(exc)}") from exc
