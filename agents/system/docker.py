"""The Docker engine, through the ``docker`` SDK: pull by digest, push, inspect, remove.

A thin adapter: every call is one engine request, and every failure becomes one
``DockerError`` line saying what failed and where (the engine's own words, first line
only), never a traceback. Registry credentials are the Docker client's own: the SDK
reads ``$DOCKER_CONFIG/config.json`` (``~/.docker/config.json``), credential helpers
included, for every pull and push. Which engine is used is the SDK's choice too
(``DOCKER_HOST``, else the local socket) unless a URL is given.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterable, Iterator, Mapping
from typing import Any

import docker
import docker.errors
import requests

from intent.errors import PlatypusError
from intent.image_ref import ImageRef

PULL_TIMEOUT_S = 600.0
"""One engine request; a pull of a large image is one request that streams progress."""


class DockerError(PlatypusError):
    """An engine or registry operation failed; the message is one line."""


class ImageInUse(DockerError):
    """The image is what a container (running or stopped) was created from."""


def _first_line(text: object) -> str:
    lines = str(text).strip().splitlines()
    return lines[0].strip() if lines else "no detail"


def _explain(exc: Exception) -> str:
    if isinstance(exc, docker.errors.APIError):
        return _first_line(exc.explanation or exc)
    return _first_line(exc)


@contextlib.contextmanager
def engine(base_url: str | None = None) -> Iterator[docker.DockerClient]:
    """A client of the engine at ``base_url`` (or the SDK's default), closed afterwards."""
    where = base_url or "the default Docker engine (DOCKER_HOST or /var/run/docker.sock)"
    try:
        if base_url is None:
            client = docker.from_env(timeout=int(PULL_TIMEOUT_S))
        else:
            client = docker.DockerClient(base_url=base_url, timeout=int(PULL_TIMEOUT_S))
    except docker.errors.DockerException as exc:
        raise DockerError(f"cannot reach {where}: {_explain(exc)}") from exc
    try:
        yield client
    except requests.exceptions.RequestException as exc:
        raise DockerError(f"{where}: {_first_line(exc)}") from exc
    finally:
        client.close()


def _stream_errors(
    events: Iterable[Mapping[str, Any]],
) -> tuple[str | None, list[Mapping[str, Any]]]:
    """The first error a streamed pull or push reported, and every event."""
    seen = []
    for event in events:
        seen.append(event)
        if "error" in event or "errorDetail" in event:
            detail = event.get("errorDetail") or {}
            return _first_line(detail.get("message") or event.get("error")), seen
    return None, seen


def pull(client: docker.DockerClient, ref: ImageRef) -> str:
    """Pull ``ref`` by its digest; returns the image id once the engine holds ``ref``.

    The engine checks the manifest it receives against the digest asked for; the
    reference is then looked up again, so an image is only ever reported as pulled
    when the engine lists it under exactly that digest."""
    try:
        events = client.api.pull(ref.repository, tag=ref.digest, stream=True, decode=True)
        error, _ = _stream_errors(events)
    except docker.errors.APIError as exc:
        raise DockerError(f"cannot pull {ref}: {_explain(exc)}") from exc
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
        raise DockerError(f"cannot inspect {ref}: {_explain(exc)}") from exc
    if str(ref) not in (attrs.get("RepoDigests") or []):
        return None
    return str(attrs["Id"])


def containers_using(client: docker.DockerClient, image_id: str) -> list[str]:
    """Names of the containers, running or stopped, created from ``image_id``."""
    try:
        found = client.api.containers(all=True, filters={"ancestor": image_id})
    except docker.errors.APIError as exc:
        raise DockerError(f"cannot list containers: {_explain(exc)}") from exc
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
            raise ImageInUse(f"{ref}: {_explain(exc)}; kept") from exc
        raise DockerError(f"cannot remove {ref}: {_explain(exc)}") from exc
    return True


def push(client: docker.DockerClient, repository: str, tag: str) -> str:
    """Push ``repository:tag``; returns the digest the registry stored it under."""
    try:
        events = client.api.push(repository, tag=tag, stream=True, decode=True)
        error, seen = _stream_errors(events)
    except docker.errors.APIError as exc:
        raise DockerError(f"cannot push {repository}:{tag}: {_explain(exc)}") from exc
    if error is not None:
        raise DockerError(f"cannot push {repository}:{tag}: {error}")
    for event in reversed(seen):
        digest = (event.get("aux") or {}).get("Digest")
        if isinstance(digest, str):
            return digest
    raise DockerError(f"pushed {repository}:{tag}, but the registry reported no digest")


def tag(client: docker.DockerClient, image: str, repository: str, tag: str) -> None:
    """Name the local ``image`` ``repository:tag`` (what a push sends)."""
    try:
        client.api.tag(image, repository, tag=tag)
    except docker.errors.ImageNotFound as exc:
        raise DockerError(f"no image {image} in the local engine: {_explain(exc)}") from exc
    except docker.errors.APIError as exc:
        raise DockerError(f"cannot tag {image} as {repository}:{tag}: {_explain(exc)}") from exc
