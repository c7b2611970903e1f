"""py-consul's HTTP client, on urllib3's connection pool directly.

py-consul sends through requests, whose session merges its settings, prepares the
request, runs hooks and fills a cookie jar on every call: 1.2-1.3 ms of CPU per request
on a small host, against 0.5 ms through urllib3, the library requests itself sends
with (``bench/wakeup_bench.py``; an agent's whole wake-up went from 10.6 to 4.9 ms of
CPU). An agent makes a few requests each time it wakes, and a fleet's agents all wake
together, so the store keeps py-consul's API and answer handling and swaps only the
transport. What requests did for us is done
here once: the proxy and CA-bundle variables are read when the client is made,
timeouts are those of py-consul's client (a blocking query's wait and jitter added).
"""

from __future__ import annotations

import os
from typing import Any

import certifi
import consul
import consul.base
import requests.utils
import urllib3
from consul.std import DEFAULT_WAIT, parse_duration


class Consul(consul.Consul):  # type: ignore[misc]
    """``consul.Consul`` whose requests go through ``Urllib3Client``."""

    def __init__(self, *, timeout_s: float, pool_size: int, **kwargs: Any) -> None:
        self._timeout_s = timeout_s
        self._pool_size = pool_size
        super().__init__(connections_timeout=timeout_s, **kwargs)

    def http_connect(
        self,
        host: str,
        port: int,
        scheme: str,
        verify: bool | str = True,
        cert: tuple[str, str] | str | None = None,
    ) -> Urllib3Client:
        return Urllib3Client(
            host, port, scheme, verify, cert, timeout_s=self._timeout_s, pool_size=self._pool_size
        )


class Urllib3Client(consul.base.HTTPClient):  # type: ignore[misc]
    def __init__(
        self,
        host: str,
        port: int,
        scheme: str,
        verify: bool | str,
        cert: tuple[str, str] | str | None,
        *,
        timeout_s: float,
        pool_size: int,
    ) -> None:
        super().__init__(host, port, scheme, verify, cert)
        self.timeout_s = timeout_s
        options: dict[str, Any] = {"num_pools": 1, "maxsize": pool_size}
        if scheme == "https":
            options.update(_tls_options(verify, cert))
        proxies = requests.utils.get_environ_proxies(self.base_uri)
        proxy = proxies.get(scheme) or proxies.get("all")
        self.pool: urllib3.PoolManager = (
            urllib3.ProxyManager(proxy, **options) if proxy else urllib3.PoolManager(**options)
        )

    def _timeout(self, params: Any) -> urllib3.Timeout:
        # Consul sends nothing to a blocking query until its wait, plus up to a sixteenth
        # of it in jitter, has passed.
        query = dict(params or ())
        read = self.timeout_s
        if "index" in query:
            wait = parse_duration(query["wait"]) if "wait" in query else DEFAULT_WAIT
            read += wait + wait / 16
        return urllib3.Timeout(connect=self.timeout_s, read=read)

    def _send(
        self,
        method: str,
        path: str,
        params: Any,
        data: str | bytes | None,
        headers: dict[str, str] | None,
        raw: bool = False,
    ) -> consul.base.Response:
        response = self.pool.request(
            method,
            self.uri(path, params),
            body=data.encode() if isinstance(data, str) else data,
            headers=headers,
            timeout=self._timeout(params),
            retries=False,
        )
        body = response.data
        return consul.base.Response(
            response.status, response.headers, body if raw else body.decode("utf-8", "replace")
        )

    def get(
        self, callback: Any, path: str, params: Any = None, headers: Any = None, raw: bool = False
    ) -> Any:
        return callback(self._send("GET", path, params, None, headers, raw))

    def put(
        self, callback: Any, path: str, params: Any = None, data: Any = "", headers: Any = None
    ) -> Any:
        return callback(self._send("PUT", path, params, data, headers))

    def delete(
        self, callback: Any, path: str, params: Any = None, data: Any = "", headers: Any = None
    ) -> Any:
        return callback(self._send("DELETE", path, params, data or None, headers))

    def post(
        self, callback: Any, path: str, params: Any = None, data: Any = "", headers: Any = None
    ) -> Any:
        return callback(self._send("POST", path, params, data, headers))

    def close(self) -> None:
        self.pool.clear()


def _tls_options(verify: bool | str, cert: tuple[str, str] | str | None) -> dict[str, Any]:
    """requests' meaning of ``verify`` and ``cert``: False trusts anything, a path is a CA
    file or directory, True the CA bundle requests would use (``REQUESTS_CA_BUNDLE`` or
    ``CURL_CA_BUNDLE`` when set, else certifi's)."""
    if verify is False:
        options: dict[str, Any] = {"cert_reqs": "CERT_NONE", "assert_hostname": False}
    else:
        if verify is True:
            verify = (
                os.environ.get("REQUESTS_CA_BUNDLE")
                or os.environ.get("CURL_CA_BUNDLE")
                or certifi.where()
            )
        where = "ca_cert_dir" if os.path.isdir(verify) else "ca_certs"
        options = {"cert_reqs": "CERT_REQUIRED", where: verify}
    if isinstance(cert, tuple):
        options["cert_file"], options["key_file"] = cert
    elif cert:
        options["cert_file"] = cert
    return options
