"""This EC2 instance's id, from the instance metadata service with IMDSv2.

IMDSv2 is a session protocol: a PUT to ``/latest/api/token`` returns a token,
and every GET must carry it. The PUT is what defeats SSRF through the apps on
the host (a proxy that forwards GETs cannot obtain a token), so there is no
fall-back to IMDSv1 here. In a container the PUT's answer must cross one more
hop: the instance needs an IMDS hop limit of 2.

Written by hand on ``http.client``: botocore's fetchers speak this protocol but
only behind private methods, and urllib would send the request through any
``HTTP_PROXY`` set for the agent, which must never see the metadata service.
"""

from __future__ import annotations

import http.client
import re
from urllib.parse import urlsplit

import tenacity

from intent.errors import PlatypusError

DEFAULT_ENDPOINT = "http://169.254.169.254"
TOKEN_TTL_S = 21600
_INSTANCE_ID = re.compile(r"^i-[0-9a-f]{8,17}$")


class ImdsError(PlatypusError):
    """The instance id could not be learned; the message says why, in one line."""


def instance_id(endpoint: str = DEFAULT_ENDPOINT, timeout_s: float = 2.0, attempts: int = 2) -> str:
    """This instance's id, asked with a fresh IMDSv2 token; ImdsError when the
    service does not answer within ``attempts`` tries of ``timeout_s`` each."""
    parts = urlsplit(endpoint)
    if parts.scheme != "http" or not parts.hostname:
        raise ImdsError(f"--imds-endpoint {endpoint}: use http://host[:port]")
    host, port = parts.hostname, parts.port or 80
    retrying = tenacity.Retrying(
        retry=tenacity.retry_if_exception_type(OSError),
        stop=tenacity.stop_after_attempt(attempts),
        wait=tenacity.wait_fixed(0.2),
        reraise=True,
    )
    try:
        token = retrying(
            _request,
            host,
            port,
            "PUT",
            "/latest/api/token",
            {"X-aws-ec2-metadata-token-ttl-seconds": str(TOKEN_TTL_S)},
            timeout_s,
        )
        found = retrying(
            _request,
            host,
            port,
            "GET",
            "/latest/meta-data/instance-id",
            {"X-aws-ec2-metadata-token": token},
            timeout_s,
        )
    except TimeoutError as exc:
        raise ImdsError(f"instance metadata at {endpoint}: no answer in {timeout_s:g}s") from exc
    except OSError as exc:
        raise ImdsError(f"instance metadata at {endpoint}: {exc.strerror or exc}") from exc
    if not _INSTANCE_ID.match(found):
        raise ImdsError(f"instance metadata at {endpoint}: {found[:40]!r} is not an instance id")
    return found


def _request(
    host: str, port: int, method: str, path: str, headers: dict[str, str], timeout_s: float
) -> str:
    conn = http.client.HTTPConnection(host, port, timeout=timeout_s)
    try:
        conn.request(method, path, headers=headers)
        response = conn.getresponse()
        body = response.read(1024).decode("ascii", "replace").strip()
    except http.client.HTTPException as exc:
        raise ImdsError(f"instance metadata at http://{host}:{port}: {exc}") from exc
    finally:
        conn.close()
    if response.status != 200:
        raise ImdsError(
            f"instance metadata at http://{host}:{port}: {method} {path} answered "
            f"{response.status} (IMDSv2 disabled, or its hop limit too low for a container?)"
        )
    return body
