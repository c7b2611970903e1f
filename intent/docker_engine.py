"""The Docker engine as the ``docker`` SDK reaches it, for the operator's tool and the agents.

Which engine: the SDK's choice (``DOCKER_HOST``, else the local socket) unless a URL
is given. Registry credentials: the Docker client's own configuration
(``$DOCKER_CONFIG/config.json``, ``~/.docker/config.json``, credential helpers
included), which the SDK reads for every pull and push. Every failure becomes one
``DockerError`` line: the engine's own words, first line only.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterable, Iterator, Mapping
from typing import Any

import docker
import docker.errors
import requests

from intent.errors import DockerError as DockerError  # re-exported: raised by every call here

REQUEST_TIMEOUT_S = 600
"""One engine request: a pull or push of a large image is one request streaming progress."""


def first_line(text: object) -> str:
    lines = str(text).strip().splitlines()
    return lines[0].strip() if lines else "no detail"


def explain(exc: Exception) -> str:
    if isinstance(exc, docker.errors.APIError):
        return first_line(exc.explanation or exc)
    return first_line(exc)


@contextlib.contextmanager
def engine(base_url: str | None = None) -> Iterator[docker.DockerClient]:
    """A client of the engine at ``base_url`` (or the SDK's default), closed afterwards."""
    where = base_url or "the default Docker engine (DOCKER_HOST or /var/run/docker.sock)"
    try:
        if base_url is None:
            client = docker.from_env(timeout=REQUEST_TIMEOUT_S)
        else:
            client = docker.DockerClient(base_url=base_url, timeout=REQUEST_TIMEOUT_S)
    except docker.errors.DockerException as exc:
        raise DockerError(f"cannot reach {where}: {explain(exc)}") from exc
    try:
        yield client
    except requests.exceptions.RequestException as exc:
        raise DockerError(f"{where}: {first_line(exc)}") from exc
    finally:
        client.close()


def stream_error(
    events: Iterable[Mapping[str, Any]],
) -> tuple[str | None, list[Mapping[str, Any]]]:
    """The first error a streamed pull or push reported, and every event."""
    seen = []
    for event in events:
        seen.append(event)
        if "error" in event or "errorDetail" in event:
            detail = event.get("errorDetail") or {}
            return first_line(detail.get("message") or event.get("error")), seen
    return None, seen
