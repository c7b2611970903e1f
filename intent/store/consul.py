"""The Consul backend: the store contract mapped onto Consul's KV, blocking
queries and sessions. Consul's vocabulary stays inside this module.

- An entry's version is its ModifyIndex: raft-wide and monotonic, so it never
  repeats, even across a delete and re-create.
- ``put``/``delete`` with ``expect`` are check-and-set writes; Consul's ``cas=0``
  already means "only if absent", which is ``MUST_NOT_EXIST``.
- ``wait`` is one blocking query per prefix, run side by side on daemon
  threads. A query still in flight when ``wait`` returns is kept and reused by the
  next call that asks for the same prefix and index, so a watch loop never piles
  up abandoned requests. A watch token holds one index per prefix. Each query asks
  for the values too (``recurse``), so ``wait_entries`` hands a woken watcher what
  changed without a second request.
- Each blocking query holds an HTTP connection for as long as it waits, so one store
  runs at most ``watch_connections`` at a time. Past that many prefixes they take
  turns: each waits at most ``shared_wait_s`` and then gives its connection to the
  next, so a change is seen within about ``ceil(prefixes / watch_connections) *
  shared_wait_s`` instead of at once, and no read is spent on prefixes that did not
  change. The connection pool is sized for the watches plus plain requests.
- Leases follow Consul's semaphore recipe: each holder owns a TTL session with
  ``behavior=delete`` and a key ``<resource><holder>`` acquired with it, and
  ``<resource>.lock`` lists the sessions holding a lease, updated with
  check-and-set so the limit holds under races. A holder that dies stops
  renewing, Consul invalidates its session and deletes its key, and the next
  acquirer prunes it from the list.

Consul refuses session TTLs below 10 s, so shorter lease TTLs are raised to 10 s;
Consul may also take up to twice the TTL to invalidate a session it has not
heard from, so a dead holder's lease frees after between ``ttl`` and ``2 * ttl``.
"""

from __future__ import annotations

import builtins
import contextlib
import json
import math
import os
import re
import threading
import time
from collections.abc import Iterator, Sequence
from concurrent.futures import FIRST_COMPLETED, Future
from concurrent.futures import wait as wait_futures
from typing import Any
from urllib.parse import urlsplit

import consul
import structlog
import urllib3

from intent.errors import StoreError, StoreUnavailable
from intent.store import consul_http
from intent.store.kv import MUST_NOT_EXIST, Entry, KVStore, WatchToken, WokenEntries

log = structlog.get_logger(__name__)

MIN_LEASE_TTL_S = 10
"""Consul's floor for a session TTL."""
MAX_LEASE_TTL_S = 86400
"""Consul's ceiling for a session TTL."""

REQUEST_TIMEOUT_S = 10.0
CAS_RETRIES = 32
LOCK_SUFFIX = ".lock"

WATCH_CONNECTIONS = 16
"""Blocking queries one store keeps open at once: a node's watch is its own prefix, the
store's identity and one prefix per assigned app, so 14 apps fit without sharing."""
SHARED_WAIT_S = 5.0
"""How long each blocking query waits when more prefixes than connections take turns."""
PLAIN_CONNECTIONS = 4
"""Connections kept for plain requests beside the watches."""

DEFAULT_HTTP_PORT = 8500
DEFAULT_HTTPS_PORT = 8501


def _clamp_ttl(ttl_s: float) -> int:
    return min(MAX_LEASE_TTL_S, max(MIN_LEASE_TTL_S, math.ceil(ttl_s)))


class ConsulStore(KVStore):
    def __init__(
        self,
        host: str = "127.0.0.1",
        port: int = DEFAULT_HTTP_PORT,
        *,
        scheme: str = "http",
        token: str | None = None,
        token_source: str = "no token",
        verify: bool | str = True,
        cert: tuple[str, str] | str | None = None,
        timeout: float = REQUEST_TIMEOUT_S,
        watch_connections: int = WATCH_CONNECTIONS,
        shared_wait_s: float = SHARED_WAIT_S,
    ) -> None:
        self.address = f"{scheme}://{host}:{port}"
        self._token_source = token_source
        self._client: Any = consul_http.Consul(
            host=host,
            port=port,
            scheme=scheme,
            token=token,
            verify=verify,
            cert=cert,
            timeout_s=timeout,
            # Watches never wait for a connection, nor churn them.
            pool_size=watch_connections + PLAIN_CONNECTIONS,
        )
        # py-consul lets CONSUL_HTTP_TOKEN override an explicit token; ours decides.
        self._client.token = token
        self._sessions: dict[tuple[str, str], str] = {}
        self._sessions_lock = threading.Lock()
        self._inflight: dict[tuple[str, int], Future[_Answer]] = {}
        self._inflight_lock = threading.Lock()
        self.watch_connections = watch_connections
        self._watch_slots = threading.BoundedSemaphore(watch_connections)
        self.shared_wait_s = shared_wait_s

    # -- construction -----------------------------------------------------------------------

    @classmethod
    def from_url(cls, url: str) -> ConsulStore:
        """``consul://host:port`` (HTTP), ``consul+https://host:port`` (TLS), or a bare
        ``consul://`` that takes ``CONSUL_HTTP_ADDR``. Credentials and TLS files come
        from the environment, as for the consul CLI: ``CONSUL_HTTP_TOKEN`` (or
        ``CONSUL_HTTP_TOKEN_FILE``), ``CONSUL_CACERT``, ``CONSUL_CLIENT_CERT`` and
        ``CONSUL_CLIENT_KEY``."""
        parts = urlsplit(url)
        scheme = "https" if parts.scheme == "consul+https" else "http"
        if parts.path not in ("", "/") or parts.query:
            raise StoreError(f"store URL {url!r}: use consul://host:port with no path")
        env = os.environ
        if parts.netloc:
            try:
                url_port = parts.port
            except ValueError as exc:
                raise StoreError(f"store URL {url!r}: the port is not a number") from exc
            host, port = _host_port(parts.hostname, url_port, scheme, url)
        else:
            addr = env.get("CONSUL_HTTP_ADDR", "127.0.0.1:8500")
            if env.get("CONSUL_HTTP_SSL", "").lower() in ("1", "true"):
                scheme = "https"
            if "://" in addr:
                addr_parts = urlsplit(addr)
                if addr_parts.scheme not in ("http", "https"):
                    raise StoreError(
                        f"CONSUL_HTTP_ADDR={addr!r}: use host:port, http://host:port "
                        "or https://host:port"
                    )
                scheme = addr_parts.scheme
            else:
                addr_parts = urlsplit(f"//{addr}")
            try:
                addr_port = addr_parts.port
            except ValueError as exc:
                raise StoreError(f"CONSUL_HTTP_ADDR={addr!r}: the port is not a number") from exc
            host, port = _host_port(addr_parts.hostname, addr_port, scheme, addr)

        token, token_source = _token_from_env()
        verify: bool | str = True
        if cacert := env.get("CONSUL_CACERT"):
            verify = cacert
        elif env.get("CONSUL_HTTP_SSL_VERIFY", "").lower() in ("0", "false"):
            verify = False
        cert: tuple[str, str] | str | None = None
        client_cert, client_key = env.get("CONSUL_CLIENT_CERT"), env.get("CONSUL_CLIENT_KEY")
        if client_cert and client_key:
            cert = (client_cert, client_key)
        elif client_cert:
            cert = client_cert
        elif client_key:
            raise StoreError("CONSUL_CLIENT_KEY is set without CONSUL_CLIENT_CERT; set both")
        return cls(
            host,
            port,
            scheme=scheme,
            token=token,
            token_source=token_source,
            verify=verify,
            cert=cert,
        )

    # -- errors -----------------------------------------------------------------------------

    @contextlib.contextmanager
    def _errors(self, action: str, key: str) -> Iterator[None]:
        where = f"consul at {self.address}"
        try:
            yield
        except consul.ACLPermissionDenied as exc:
            raise StoreError(
                f"{where}: permission denied to {action} {key!r} with {self._token_source}; "
                "grant its ACL policy access to that key or use another token"
            ) from exc
        except consul.ACLDisabled as exc:
            raise StoreError(
                f"{where}: unauthorized to {action} {key!r} with {self._token_source} "
                f"({_first_line(exc)}); check CONSUL_HTTP_TOKEN"
            ) from exc
        except urllib3.exceptions.SSLError as exc:
            raise StoreUnavailable(
                f"{where}: TLS failed to {action} {key!r} ({_reason(exc)}); "
                "check CONSUL_CACERT and the URL scheme"
            ) from exc
        except _UNREACHABLE as exc:
            raise StoreUnavailable(
                f"{where} unreachable ({_reason(exc)}) to {action} {key!r}; "
                "check that the agent runs and the store URL"
            ) from exc
        except urllib3.exceptions.TimeoutError as exc:
            raise StoreUnavailable(
                f"{where} did not answer in time to {action} {key!r}; check the agent"
            ) from exc
        except consul.Timeout as exc:
            raise StoreUnavailable(f"{where}: request to {action} {key!r} timed out") from exc
        except consul.ConsulException as exc:
            text = _first_line(exc)
            if text[:1] == "5":
                raise StoreUnavailable(
                    f"{where}: server error on {action} {key!r}: {text}"
                ) from exc
            raise StoreError(f"{where}: cannot {action} {key!r}: {text}") from exc
        except urllib3.exceptions.HTTPError as exc:
            raise StoreError(f"{where}: cannot {action} {key!r}: {_first_line(exc)}") from exc

    @staticmethod
    def _check_key(key: str) -> None:
        if key.startswith("/"):
            raise StoreError(f"key {key!r}: must not start with '/'")

    # -- key/value --------------------------------------------------------------------------

    def get(self, key: str) -> Entry | None:
        self._check_key(key)
        with self._errors("read", key):
            _, item = self._client.kv.get(key)
        return _entry(item) if item else None

    def list(self, prefix: str) -> list[Entry]:
        self._check_key(prefix)
        with self._errors("list", prefix):
            _, items = self._client.kv.get(prefix, recurse=True)
        return sorted((_entry(i) for i in items or ()), key=lambda e: e.key)

    def put(self, key: str, value: bytes, expect: int | None = None) -> bool:
        self._check_key(key)
        with self._errors("write", key):
            return bool(self._client.kv.put(key, bytes(value), cas=expect))

    def delete(self, key: str, expect: int | None = None) -> bool:
        self._check_key(key)
        if expect is not None:
            # Consul reports success for a check-and-set delete of an absent key and
            # ignores cas=0; the contract says the check fails unless the key is at
            # ``expect`` (absent counting as MUST_NOT_EXIST).
            current = self.get(key)
            if current is None:
                return expect == MUST_NOT_EXIST
            if expect == MUST_NOT_EXIST:
                return False
        with self._errors("delete", key):
            return bool(self._client.kv.delete(key, cas=expect))

    # -- watch ------------------------------------------------------------------------------

    def _index(self, prefix: str, since: int | None = None, wait_s: float = 0.0) -> _Answer:
        """The prefix's index and entries now or, with ``since``, once its index moves
        past ``since`` (or ``wait_s`` passes). Consul may answer early with the same
        index."""
        with self._errors("watch", prefix):
            if since is None:
                index, items = self._client.kv.get(prefix, recurse=True)
            else:
                wait = f"{max(1, math.ceil(wait_s * 1000))}ms"
                index, items = self._client.kv.get(prefix, recurse=True, index=since, wait=wait)
        entries = sorted((_entry(i) for i in items or ()), key=lambda e: e.key)
        # An index of 0 would turn the next blocking query into a plain read.
        return max(1, int(index)), entries

    def _blocking(self, prefix: str, since: int, wait_s: float) -> Future[_Answer]:
        """The blocking query for ``prefix`` past ``since``: the one in flight, or a new
        one on its own daemon thread (so a process can exit while queries wait), which
        waits for one of the store's watch connections first."""
        query = (prefix, since)
        with self._inflight_lock:
            future = self._inflight.get(query)
            if future is not None and not future.done():
                return future
            future = Future()
            future.set_running_or_notify_cancel()
            self._inflight[query] = future

        def run() -> None:
            try:
                with self._watch_slots:
                    future.set_result(self._index(prefix, since, wait_s))
            except BaseException as exc:
                future.set_exception(exc)
            finally:
                with self._inflight_lock:
                    if self._inflight.get(query) is future:
                        del self._inflight[query]

        threading.Thread(target=run, name=f"store-watch {prefix}", daemon=True).start()
        return future

    def wait(self, prefixes: Sequence[str], token: WatchToken | None, timeout: float) -> WatchToken:
        return self.wait_entries(prefixes, token, timeout)[0]

    def wait_entries(
        self, prefixes: Sequence[str], token: WatchToken | None, timeout: float
    ) -> tuple[WatchToken, WokenEntries]:
        for prefix in prefixes:
            self._check_key(prefix)
        if token is None or len(token) != len(prefixes) or timeout <= 0:
            answers = [self._index(p) for p in prefixes]
            return tuple(i for i, _ in answers), {
                p: e for p, (_, e) in zip(prefixes, answers, strict=True)
            }
        if not prefixes:
            time.sleep(timeout)
            return (), {}
        deadline = time.monotonic() + timeout
        current = list(token)
        woken: WokenEntries = {}
        shared = len(prefixes) > self.watch_connections
        while (remaining := deadline - time.monotonic()) > 0:
            wait_s = min(remaining, self.shared_wait_s) if shared else remaining
            futures = {
                self._blocking(p, i, wait_s): n
                for n, (p, i) in enumerate(zip(prefixes, token, strict=True))
            }
            done, _ = wait_futures(futures, timeout=remaining, return_when=FIRST_COMPLETED)
            for future in done:
                n = futures[future]
                index, entries = future.result()
                # An index going backwards (a snapshot restore, tombstones reaped)
                # counts as a change: the caller re-reads and carries the new index.
                if index != token[n]:
                    current[n] = index
                    woken[prefixes[n]] = entries
            if current != list(token):
                break
        return tuple(current), woken

    # -- leases -----------------------------------------------------------------------------

    def _holding_session(self, key: str) -> str | None:
        """The session holding ``key``, if any."""
        with self._errors("read", key):
            _, item = self._client.kv.get(key)
        session = (item or {}).get("Session")
        return str(session) if session else None

    def _renew(self, session: str, key: str) -> bool:
        with self._errors("renew lease", key):
            try:
                self._client.session.renew(session)
            except consul.NotFound:
                return False
        return True

    def _create_session(self, key: str, ttl_s: float) -> str:
        with self._errors("create session for", key):
            return str(
                self._client.session.create(
                    name=f"platypus lease {key}",
                    behavior="delete",
                    ttl=_clamp_ttl(ttl_s),
                    lock_delay=0,
                )
            )

    def _claim(self, resource: str, holder: str, ttl_s: float) -> str:
        """A live session that holds ``<resource><holder>``: ours renewed, or the one
        another process holds it with under the same holder name (an agent that
        restarted: the lease belongs to the holder, not to the process), or a new one."""
        key = resource + holder
        session = self._sessions.get((resource, holder))
        if session is not None and not self._renew(session, key):
            log.info("store.lease_lapsed", resource=resource, holder=holder)
            session = None
        for _ in range(CAS_RETRIES):
            created = False
            if session is None:
                other = self._holding_session(key)
                if other is not None and self._renew(other, key):
                    session = other
                else:
                    session, created = self._create_session(key, ttl_s), True
            # Acquiring again with the holding session is a no-op, and it puts the key
            # back if someone deleted it by hand while the session lived on.
            with self._errors("acquire lease", key):
                if self._client.kv.put(key, holder.encode(), acquire=session):
                    return session
            if created:
                self._destroy(session, key)
            session = None
        raise StoreUnavailable(
            f"consul at {self.address}: lease key {key!r} kept changing hands; retry later"
        )

    def _read_leases(self, resource: str) -> tuple[int, dict[str, str], set[str]]:
        """(lock key's index or 0, holders recorded in it by session, live sessions)."""
        with self._errors("list", resource):
            _, items = self._client.kv.get(resource, recurse=True)
        lock_key = resource + LOCK_SUFFIX
        index, recorded, live = 0, {}, set()
        for item in items or ():
            if item["Key"] == lock_key:
                index = int(item["ModifyIndex"])
                recorded = _decode_holders(item.get("Value"))
            elif item.get("Session"):
                live.add(item["Session"])
        return index, recorded, live

    def _write_leases(self, resource: str, holders: dict[str, str], index: int) -> bool:
        key = resource + LOCK_SUFFIX
        value = json.dumps({"holders": holders}, sort_keys=True).encode()
        with self._errors("write", key):
            return bool(self._client.kv.put(key, value, cas=index))

    def _destroy(self, session: str, key: str) -> None:
        with self._errors("release lease", key):
            self._client.session.destroy(session)

    def acquire_lease(self, resource: str, holder: str, limit: int, ttl_s: float) -> bool:
        self._check_key(resource)
        if holder == LOCK_SUFFIX or not holder:
            raise StoreError(f"lease holder {holder!r}: not a usable holder name")
        key = resource + holder
        with self._sessions_lock:
            session = self._claim(resource, holder, ttl_s)
            self._sessions[(resource, holder)] = session
        for _ in range(CAS_RETRIES):
            index, recorded, live = self._read_leases(resource)
            holders = {s: h for s, h in recorded.items() if s in live}
            if session in holders:
                return True
            if len(holders) >= limit:
                with self._sessions_lock:
                    self._sessions.pop((resource, holder), None)
                self._destroy(session, key)
                return False
            holders[session] = holder
            if self._write_leases(resource, holders, index):
                log.debug("store.lease_acquired", resource=resource, holder=holder)
                return True
        raise StoreUnavailable(
            f"consul at {self.address}: lease {resource!r} kept changing under {CAS_RETRIES} "
            "attempts to take it; retry later"
        )

    def release_lease(self, resource: str, holder: str) -> None:
        self._check_key(resource)
        key = resource + holder
        with self._sessions_lock:
            sessions = {self._sessions.pop((resource, holder), None), self._holding_session(key)}
        for _ in range(CAS_RETRIES):
            index, recorded, live = self._read_leases(resource)
            holders = {s: h for s, h in recorded.items() if s in live and h != holder}
            if holders == recorded or self._write_leases(resource, holders, index):
                break
        for session in filter(None, sessions):
            self._destroy(session, key)

    def lease_holders(self, resource: str) -> builtins.list[str]:
        self._check_key(resource)
        _, recorded, live = self._read_leases(resource)
        return sorted(h for s, h in recorded.items() if s in live)

    def close(self) -> None:
        # Leases outlive the connection, as in every backend: they end on release or TTL.
        self._client.http.close()


_UNREACHABLE = (
    # Before the timeouts: urllib3 counts a refused connection as a connect timeout.
    urllib3.exceptions.NewConnectionError,
    urllib3.exceptions.ProxyError,
    urllib3.exceptions.ProtocolError,
    OSError,
)

_Answer = tuple[int, list[Entry]]
"""A prefix's index and its entries as of that index."""


def _entry(item: dict[str, Any]) -> Entry:
    return Entry(str(item["Key"]), bytes(item.get("Value") or b""), int(item["ModifyIndex"]))


def _decode_holders(raw: bytes | None) -> dict[str, str]:
    """The lock key's holder map; anything unreadable counts as empty, since live
    holders are re-checked against their sessions anyway."""
    try:
        holders = json.loads(raw or b"{}").get("holders", {})
    except (ValueError, AttributeError):
        return {}
    if not isinstance(holders, dict):
        return {}
    return {str(s): str(h) for s, h in holders.items()}


def _host_port(host: str | None, port: int | None, scheme: str, where: str) -> tuple[str, int]:
    if not host:
        raise StoreError(f"{where!r}: no host; use consul://host:port")
    default = DEFAULT_HTTPS_PORT if scheme == "https" else DEFAULT_HTTP_PORT
    return host, port or default


def _token_from_env() -> tuple[str | None, str]:
    """The ACL token and how to name it in errors without printing the secret."""
    if token := os.environ.get("CONSUL_HTTP_TOKEN"):
        return token, f"the token in CONSUL_HTTP_TOKEN (ending {token[-4:]!r})"
    if path := os.environ.get("CONSUL_HTTP_TOKEN_FILE"):
        try:
            with open(path) as f:
                token = f.read().strip()
        except OSError as exc:
            raise StoreError(f"CONSUL_HTTP_TOKEN_FILE={path}: {exc.strerror}") from exc
        return token or None, f"the token in {path} (ending {token[-4:]!r})"
    return None, "no token (anonymous)"


def _reason(exc: BaseException) -> str:
    """The root cause inside urllib3's wrappers: 'Connection refused', not a
    paragraph of pool and URL details."""
    text = str(exc)
    if match := re.search(r"\[(?:Errno|SSL: )[^\]]*\] ?([^\"'()]+)", text):
        return match.group(1).strip().rstrip(".:") or "connection failed"
    if match := re.search(
        r"(Name or service not known|Temporary failure in name resolution)", text
    ):
        return match.group(1)
    return "connection failed"


def _first_line(exc: BaseException) -> str:
    text = str(exc).strip() or type(exc).__name__
    return text.splitlines()[0][:300]
