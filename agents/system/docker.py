"""The Docker engine, through the ``docker`` SDK: pull by digest, inspect, remove.

A thin adapter: every call is one engine request, and every failure becomes one
``DockerError`` line (``intent.docker_engine``) saying what failed and where, never a
traceback. Registry credentials are the Docker client's own: the SDK reads
``$DOCKER_CONFIG/config.json`` (``~/.docker/config.json``), credential helpers
included, for every pull.
"""

from __future__ import annotations

import docker
import docker.errors

from intent.docker_engine import DockerError, engine, explain, stream_error
from intent.image_ref import ImageRef

__all__ = ["DockerError", "ImageInUse", "engine"]


class ImageInUse(DockerError):
    """The image is what a container (running or stopped) was created from."""


def pull(client: docker.DockerClient, ref: ImageRef) -> str:
    """Pull ``ref`` by its digest; returns the image id once the engine holds ``ref``.

    The engine checks the manifest it receives against the digest asked for; the
    reference is then looked up again, so an image is only ever reported as pulled
    when the engine lists it under exactly that digest."""
    try:
        events = client.api.pull(ref.repository, tag=ref.digest, stream=True, decode=True)
        error, _ = stream_error(events)
    except docker.errors.APIError as exc:
        raise DockerError(f"cannot pull {ref}: {explain(exc)}") from exc
    if error is not None:
        raise DockerError(f"cannot pull {ref}: {error}")
    image_id = image_id_of(client, ref)
    if image_id is None:
        raise DockerError(f"pulled {ref}, but the engine does not list it under that digest")
    return image_id


def image_id_of(client: docker.DockerClient, ref: ImageRef) -> str | None:
    """The id of the image the engine holds under exactly ``ref``, or None."""
    try:
        attrs = client.api.inspect_image(str(ref))
    except docker.errors.ImageNotFound:
        return None
    except docker.errors.APIError as exc:
        raise DockerError(f"cannot inspect {ref}: {explain(exc)}") from exc
    if str(ref) not in (attrs.get("RepoDigests") or []):
        return None
    return str(attrs["Id"])


def containers_using(client: docker.DockerClient, image_id: str) -> list[str]:
    """Names of the containers, running or stopped, created from ``image_id``."""
    try:
        found = client.api.containers(all=True, filters={"ancestor": image_id})
    except docker.errors.APIError as exc:
        raise DockerError(f"cannot list containers: {explain(exc)}") from exc
    return sorted(str(n).lstrip("/") for c in found for n in c.get("Names") or [])


def remove(client: docker.DockerClient, ref: ImageRef) -> bool:
    """Remove the engine's ``ref`` unless a container uses its image; True when it went.

    Without ``force`` the engine itself refuses to delete an image a container was
    made from; the containers are looked up first anyway, to say which ones."""
    image_id = image_id_of(client, ref)
    if image_id is None:
        return False
    users = containers_using(client, image_id)
    if users:
        raise ImageInUse(f"{ref} is used by container {', '.join(users)}; kept")
    try:
        client.api.remove_image(str(ref), force=False, noprune=False)
    except docker.errors.ImageNotFound:
        return False
    except docker.errors.APIError as exc:
        if exc.status_code == 409:
            raise ImageInUse(f"{ref}: {explain(exc)}; kept") from exc
        raise DockerError(f"cannot remove {ref}: {explain(exc)}") from exc
    return True
