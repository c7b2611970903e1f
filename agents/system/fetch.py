"""Fetch an artifact into a local file, hashing it on the way.

Sources: ``file://``, ``http(s)://`` (the standard library's client, so the usual
``HTTPS_PROXY``/``NO_PROXY`` variables apply) and ``s3://bucket/key`` (boto3 with
the standard credential chain, region and ``AWS_ENDPOINT_URL``).

The sha256 is computed over the bytes as they are written, so verifying costs no
second read. Transient failures (timeouts, dropped connections, 5xx) are retried
with exponential backoff; a retry resumes where the last attempt stopped when the
source allows it (HTTP ``Range`` with ``If-Range``, S3 ``Range`` with ``IfMatch``),
and starts again otherwise. Permanent failures (404, access denied, no space) fail
at once with one line that says what to fix.

Every download has an overall deadline, across its attempts and the waits between
them, and ends early when the caller's stop event is set: a server that sends one
byte now and then (or nothing at all) cannot hold a worker for ever, nor keep the
agent from stopping. ``file://`` URLs are read only beneath ``local_root`` (see
``file_url``).
"""

from __future__ import annotations

import contextlib
import contextvars
import hashlib
import http.client
import io
import math
import os
import re
import shutil
import socket
import threading
import time
import urllib.error
import urllib.request
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, BinaryIO, Protocol
from urllib.parse import urlsplit, urlunsplit

import structlog
import tenacity

from agents.system import file_url
from intent.errors import PlatypusError
from intent.signing import SIGNATURE_SUFFIX

CHUNK = 1 << 20
USER_AGENT = "platypus-preparer"
SCHEMES = ("file", "http", "https", "s3")
POLL_S = 0.5
"""How often the watcher looks at the running fetches' stop events: a stop is noticed
within this long, even while a read waits for bytes that never come."""

log = structlog.get_logger()


class FetchError(PlatypusError):
    """A fetch that failed; ``transient`` ones are worth retrying."""

    def __init__(
        self,
        message: str,
        *,
        transient: bool = False,
        restart: bool = False,
        stopped: bool = False,
    ) -> None:
        super().__init__(message)
        self.transient = transient or restart
        self.restart = restart
        """The source changed or cannot resume: the next attempt starts from byte 0."""
        self.stopped = stopped
        """Abandoned because the stop event was set: no verdict on the source."""


@dataclass(frozen=True)
class FetchOptions:
    timeout_s: float = 30.0
    """Connect timeout, and the longest a read may wait for the next byte."""
    attempts: int = 5
    backoff_initial_s: float = 1.0
    backoff_max_s: float = 30.0
    min_free_bytes: int = 0
    """Free space to leave on the target file system once the artifact is down."""
    deadline_s: float = 1800.0
    """The longest a whole download may take, across its attempts and retry waits."""
    local_root: str | None = None
    """The directory ``file://`` URLs must lie beneath; None refuses them all."""
    stop: threading.Event | None = None
    """Set it to abandon the fetches that use these options (the agent is stopping)."""


@dataclass(frozen=True)
class Fetched:
    sha256: str
    size: int
    attempts: int


def display_url(url: str) -> str:
    """The URL without credentials or query (pre-signed URLs carry secrets there)."""
    parts = urlsplit(url)
    netloc = parts.netloc.rsplit("@", 1)[-1]
    return urlunsplit((parts.scheme, netloc, parts.path, "", ""))


def signature_url(url: str) -> str:
    """Where the detached signature of ``url`` lives: the same path plus ``.sig``."""
    parts = urlsplit(url)
    return urlunsplit(parts._replace(path=parts.path + SIGNATURE_SUFFIX))


def check_url(url: str) -> None:
    """Raise FetchError unless ``url`` is one we can fetch."""
    parts = urlsplit(url)
    if parts.scheme not in SCHEMES:
        raise FetchError(
            f"{display_url(url)}: unsupported URL scheme {parts.scheme!r} "
            f"(use {', '.join(s + '://' for s in SCHEMES)})"
        )
    if parts.scheme == "file":
        try:
            file_url.local_path(url)
        except file_url.Refused as exc:
            raise FetchError(f"{url}: {exc}") from exc
    if parts.scheme == "s3" and (not parts.netloc or not parts.path.strip("/")):
        raise FetchError(f"{display_url(url)}: use s3://bucket/key")


def fetch(
    url: str,
    sink: BinaryIO,
    options: FetchOptions,
    *,
    max_bytes: int | None = None,
    space_dir: Path | None = None,
) -> Fetched:
    """Copy ``url`` into ``sink`` (a fresh, seekable file) and return its sha256.

    ``max_bytes`` bounds the download; ``space_dir`` is checked for free space
    against the artifact's announced size before its body is read. Raises
    FetchError, with ``stopped`` set when ``options.stop`` ended it.
    """
    check_url(url)
    progress = _Progress(sink, max_bytes, space_dir, options.min_free_bytes)
    attempts = 0
    with _Guard(options) as guard:
        source = _source_for(url, options, guard)
        retrying = tenacity.Retrying(
            stop=tenacity.stop_after_attempt(max(1, options.attempts)),
            wait=tenacity.wait_exponential_jitter(
                multiplier=options.backoff_initial_s,
                jitter=options.backoff_initial_s,
                max=options.backoff_max_s,
            ),
            retry=tenacity.retry_if_exception(
                lambda e: isinstance(e, FetchError) and e.transient and guard.ended() is None
            ),
            sleep=guard.sleep,
            before_sleep=lambda state: _log_retry(url, state),
            reraise=True,
        )
        try:
            for attempt in retrying:
                with attempt:
                    guard.check()
                    attempts += 1
                    progress.transfer(source, guard.check)
            guard.check()  # a read cut short by the guard can look like the body's end
        except Exception as exc:
            # Once the guard has ended the fetch, whatever the cut-short read raised
            # (a closed connection, a TLS error) is only a symptom of that.
            error = guard.ended() or exc
            if not isinstance(error, FetchError):
                raise
            raise FetchError(
                f"{display_url(url)}: {error}", transient=error.transient, stopped=error.stopped
            ) from exc
    return Fetched(progress.hasher.hexdigest(), progress.received, attempts)


def fetch_bytes(url: str, options: FetchOptions, max_bytes: int = 1 << 16) -> bytes:
    """A small object (a signature) in memory."""
    buffer = io.BytesIO()
    fetch(url, buffer, options, max_bytes=max_bytes)
    return buffer.getvalue()


def _log_retry(url: str, state: tenacity.RetryCallState) -> None:
    error = state.outcome.exception() if state.outcome else None
    log.warning(
        "fetch.retry",
        url=display_url(url),
        attempt=state.attempt_number,
        error=str(error),
        wait_s=round(state.upcoming_sleep, 2),
    )


# -- the deadline and the stop -----------------------------------------------------------


class _Guard:
    """Ends one fetch when the stop event is set or the deadline passes, even while a
    read waits for bytes that never come.

    The waiting side cannot poll for that with a short socket timeout: the standard
    library's HTTP client and urllib3 read through a socket file that, once it has
    timed out, refuses every later read, and botocore owns its sockets. So a thread
    watches instead and shuts the connection down, which wakes a blocked read at
    once, for every source, and leaves the per-read timeout what it is: the limit
    on silence. That thread is the process's one ``_Watcher``, shared by every
    running fetch: a thread of its own per fetch cost each download its start and
    its join.
    """

    def __init__(self, options: FetchOptions) -> None:
        self.stop = options.stop or threading.Event()
        self.deadline_s = options.deadline_s
        self.deadline = time.monotonic() + options.deadline_s
        self._lock = threading.Lock()
        self._wakers: list[Callable[[], None]] = []
        self._sockets: list[socket.socket] = []
        self._ended: FetchError | None = None

    def __enter__(self) -> _Guard:
        _watcher.add(self)
        return self

    def __exit__(self, *exc_info: object) -> None:
        _watcher.discard(self)
        for sock in self._sockets:
            sock.close()

    def watch(self, sock: socket.socket) -> None:
        """Shut ``sock``'s connection down if the fetch is ended early. Through a
        duplicate, kept until the fetch is over: TLS takes the socket over (and
        empties it) before its handshake, which a silent server can hold up too. The
        plain socket's shutdown, also for TLS: a TLS shutdown would tear the TLS
        state down under the reading thread."""
        duplicate = sock.dup()
        self._sockets.append(duplicate)
        self.on_end(lambda: duplicate.shutdown(socket.SHUT_RDWR))

    def on_end(self, waker: Callable[[], None]) -> None:
        """Call ``waker`` (it shuts a connection down) when the fetch is ended early;
        at once if it has been."""
        with self._lock:
            if self._ended is None:
                self._wakers.append(waker)
                return
        _quietly(waker)

    @property
    def running(self) -> bool:
        """Not ended yet (as far as anyone has looked)."""
        return self._ended is None

    def ended(self) -> FetchError | None:
        """Why the fetch must end now, or None while it may go on."""
        if self._ended is None:
            if self.stop.is_set():
                self._end(FetchError("stopped before the download completed", stopped=True))
            elif time.monotonic() >= self.deadline:
                self._end(
                    FetchError(
                        f"not complete after {self.deadline_s:g} s (--fetch-deadline): "
                        "the source sends too slowly, or not at all"
                    )
                )
        return self._ended

    def check(self) -> None:
        error = self.ended()
        if error is not None:
            raise FetchError(str(error), stopped=error.stopped)

    def sleep(self, seconds: float) -> None:
        """tenacity's wait between attempts, cut short by the stop or the deadline."""
        self.stop.wait(max(0.0, min(seconds, self.deadline - time.monotonic())))
        self.check()

    def _end(self, error: FetchError) -> None:
        with self._lock:
            if self._ended is not None:
                return
            self._ended = error
            wakers, self._wakers = self._wakers, []
        for waker in wakers:
            _quietly(waker)


class _Watcher:
    """The one thread that ends the running fetches' guards: it looks at each every
    ``POLL_S`` (a stop event cannot call anyone when it is set) and at the nearest
    deadline, and sleeps without a timeout while no fetch runs.

    Started by the first fetch (and by the next one should it ever have died). A
    guard that registers wakes it only when the guard's deadline comes before the
    thread's next look, so starting a fetch costs a lock and a set insertion, not a
    thread switch.
    """

    def __init__(self) -> None:
        self._changed = threading.Condition(threading.Lock())
        self._guards: set[_Guard] = set()
        self._thread: threading.Thread | None = None
        self._next_look = math.inf
        """When the thread looks next (monotonic); infinite while it waits for a guard."""

    def add(self, guard: _Guard) -> None:
        with self._changed:
            self._guards.add(guard)
            if self._thread is None or not self._thread.is_alive():
                self._thread = threading.Thread(target=self._run, name="fetch-guard", daemon=True)
                self._thread.start()
            elif guard.deadline < self._next_look:
                self._changed.notify()

    def discard(self, guard: _Guard) -> None:
        # No wake-up: the thread finds the registry empty at its next look, and from
        # then on waits without a timeout.
        with self._changed:
            self._guards.discard(guard)

    def _run(self) -> None:
        while True:
            with self._changed:
                while not self._guards:
                    self._next_look = math.inf
                    self._changed.wait()
                guards = list(self._guards)
            # Outside the lock: ending a guard shuts its connections down, and fetches
            # must not queue behind that to register or leave.
            for guard in guards:
                guard.ended()
            with self._changed:
                now = time.monotonic()
                # An ended guard needs no more looks: its deadline, passed, would spin.
                deadlines = (guard.deadline for guard in self._guards if guard.running)
                self._next_look = min(now + POLL_S, min(deadlines, default=math.inf))
                self._changed.wait(self._next_look - now)


_watcher = _Watcher()


def _new_watcher() -> None:
    # A forked child has neither the thread nor the parent's fetches, and its copy of
    # the lock may have been taken by a thread it does not have.
    global _watcher
    _watcher = _Watcher()


os.register_at_fork(after_in_child=_new_watcher)


def _quietly(waker: Callable[[], None]) -> None:
    # A connection already closed has nothing left to wake.
    with contextlib.suppress(Exception):
        waker()


# -- one download, across attempts ------------------------------------------------------


class _Body(Protocol):
    def read(self, size: int, /) -> bytes: ...


@dataclass
class _Opened:
    body: _Body
    start: int
    """Offset of the body's first byte: the requested offset, or 0 when the source
    could not resume and sends the whole artifact again."""
    total: int | None
    validator: str | None
    close: Callable[[], None] = lambda: None


class _Source(Protocol):
    def open(self, offset: int, validator: str | None) -> _Opened: ...


@dataclass
class _Progress:
    sink: BinaryIO
    max_bytes: int | None
    space_dir: Path | None
    min_free_bytes: int
    received: int = 0
    validator: str | None = None
    space_checked: bool = False
    hasher: Any = field(default_factory=hashlib.sha256)

    def restart(self) -> None:
        self.sink.seek(0)
        self.sink.truncate()
        self.received = 0
        self.hasher = hashlib.sha256()

    def transfer(self, source: _Source, check: Callable[[], None]) -> None:
        """One attempt, continuing from what earlier attempts received; ``check``
        raises between chunks when the fetch must end."""
        try:
            self._transfer(source, check)
        except FetchError as exc:
            if exc.restart:
                self.restart()
                self.validator = None
            raise

    def _transfer(self, source: _Source, check: Callable[[], None]) -> None:
        opened = source.open(self.received, self.validator)
        try:
            if opened.start not in (self.received, 0):
                raise FetchError(
                    f"asked for bytes from {self.received}, got them from {opened.start}",
                    restart=True,
                )
            if opened.start != self.received:
                self.restart()
            self.validator = opened.validator
            if opened.total is not None:
                self._check_size(opened.total)
            self._copy(opened.body, check)
            if opened.total is not None and self.received < opened.total:
                raise FetchError(
                    f"connection closed after {self.received} of {opened.total} bytes",
                    transient=True,
                )
        finally:
            with contextlib.suppress(Exception):
                opened.close()

    def _check_size(self, total: int) -> None:
        if self.max_bytes is not None and total > self.max_bytes:
            raise FetchError(f"artifact is {total} bytes, more than the limit of {self.max_bytes}")
        if self.space_dir is None or self.space_checked:
            return
        free = shutil.disk_usage(self.space_dir).free
        needed = total - self.received + self.min_free_bytes
        if free < needed:
            raise FetchError(
                f"not enough free space in {self.space_dir}: the artifact needs "
                f"{total - self.received} bytes"
                + (f" plus {self.min_free_bytes} kept free" if self.min_free_bytes else "")
                + f", {free} available; free some space"
            )
        self.space_checked = True

    def _copy(self, body: _Body, check: Callable[[], None]) -> None:
        while True:
            check()
            try:
                chunk = body.read(CHUNK)
            except FetchError:
                raise
            except Exception as exc:
                raise _transient(exc) from exc
            if not chunk:
                return
            self.received += len(chunk)
            if self.max_bytes is not None and self.received > self.max_bytes:
                raise FetchError(f"artifact is larger than the limit of {self.max_bytes} bytes")
            self.hasher.update(chunk)
            try:
                self.sink.write(chunk)
            except OSError as exc:
                raise FetchError(f"cannot write the download: {exc.strerror or exc}") from exc


def _transient(exc: BaseException) -> FetchError:
    if isinstance(exc, TimeoutError):
        return FetchError("timed out waiting for data", transient=True)
    if isinstance(exc, http.client.IncompleteRead):
        return FetchError(f"connection closed after {len(exc.partial)} more bytes", transient=True)
    reason = getattr(exc, "reason", None) or exc
    if isinstance(reason, TimeoutError):
        return FetchError("timed out waiting for data", transient=True)
    return FetchError(f"{type(exc).__name__}: {reason}", transient=True)


def _source_for(url: str, options: FetchOptions, guard: _Guard) -> _Source:
    scheme = urlsplit(url).scheme
    if scheme == "file":
        return _FileSource(url, options.local_root)
    if scheme in ("http", "https"):
        return _HttpSource(url, options.timeout_s, guard)
    return _S3Source(url, options.timeout_s, guard)


# -- file:// ------------------------------------------------------------------------------


@dataclass
class _FileSource:
    url: str
    local_root: str | None

    def open(self, offset: int, validator: str | None) -> _Opened:
        try:
            fd = file_url.open_url(self.url, self.local_root)
        except file_url.Refused as exc:
            raise FetchError(str(exc)) from exc
        except FileNotFoundError as exc:
            raise FetchError("no such file") from exc
        except OSError as exc:
            raise FetchError(exc.strerror or str(exc)) from exc
        f = os.fdopen(fd, "rb")
        f.seek(offset)
        return _Opened(f, offset, os.fstat(fd).st_size, None, f.close)


# -- http(s):// ---------------------------------------------------------------------------

_CONTENT_RANGE = re.compile(r"^bytes (\d+)-\d+/(\d+|\*)$")
_RETRY_STATUSES = {408, 425, 429, 500, 502, 503, 504}


_opening_for: contextvars.ContextVar[_Guard] = contextvars.ContextVar("fetch_opening_for")
"""The guard of the fetch whose request this thread's (shared) opener is sending."""


class _WatchedConnection(http.client.HTTPConnection):
    """A connection the guard watches from the moment its TCP connection exists: a
    server that never answers holds the client before any response."""

    def connect(self) -> None:
        super().connect()
        _opening_for.get().watch(self.sock)


class _WatchedTLSConnection(http.client.HTTPSConnection, _WatchedConnection):
    """HTTPSConnection's connect wraps the socket ``_WatchedConnection.connect`` made
    and watched, so the TLS handshake is watched too."""


class _WatchedHandler(urllib.request.HTTPHandler, urllib.request.HTTPSHandler):
    """Opens http and https connections as watched ones."""

    def http_open(self, req: urllib.request.Request) -> http.client.HTTPResponse:
        return self.do_open(_WatchedConnection, req)

    def https_open(self, req: urllib.request.Request) -> http.client.HTTPResponse:
        return self.do_open(_WatchedTLSConnection, req)


_openers: dict[frozenset[tuple[str, str]], urllib.request.OpenerDirector] = {}


def _opener() -> urllib.request.OpenerDirector:
    """urllib's opener (redirects, proxies, errors as exceptions) with the watched
    handler. Building one makes every default handler, so it is built once per proxy
    configuration and shared, as ``urlopen`` shares its own: its handlers keep no
    state between requests, and the guard reaches the connections through
    ``_opening_for``, which follows the request across its redirects. The proxies
    are still read from the environment at every request, as a fresh opener would."""
    proxies = urllib.request.getproxies()
    key = frozenset(proxies.items())
    opener = _openers.get(key)
    if opener is None:
        proxy_handler = urllib.request.ProxyHandler(proxies)
        # Racing threads may both build one: they are alike, and either will do.
        opener = _openers[key] = urllib.request.build_opener(proxy_handler, _WatchedHandler())
    return opener


@dataclass
class _HttpSource:
    url: str
    timeout_s: float
    guard: _Guard

    def open(self, offset: int, validator: str | None) -> _Opened:
        headers = {"User-Agent": USER_AGENT, "Accept-Encoding": "identity"}
        if offset:
            headers["Range"] = f"bytes={offset}-"
            if validator:
                headers["If-Range"] = validator
        request = urllib.request.Request(self.url, headers=headers)
        opener = _opener()
        opening = _opening_for.set(self.guard)
        try:
            response = opener.open(request, timeout=self.timeout_s)
        except urllib.error.HTTPError as exc:
            exc.close()
            if exc.code == 416:
                raise FetchError("HTTP 416, starting again", restart=True) from exc
            hint = {404: " (no artifact at this URL: check --repo or the version's url)"}
            raise FetchError(
                f"HTTP {exc.code} {exc.reason}{hint.get(exc.code, '')}",
                transient=exc.code in _RETRY_STATUSES,
            ) from exc
        except (urllib.error.URLError, OSError, http.client.HTTPException) as exc:
            raise _transient(exc) from exc
        finally:
            _opening_for.reset(opening)
        start, total = 0, _int(response.headers.get("Content-Length"))
        if response.status == 206:
            match = _CONTENT_RANGE.match(response.headers.get("Content-Range", ""))
            if match is None:
                response.close()
                raise FetchError("unusable Content-Range", restart=True)
            start = int(match.group(1))
            total = None if match.group(2) == "*" else int(match.group(2))
        etag = response.headers.get("ETag")
        validator = etag if etag and not etag.startswith("W/") else None
        validator = validator or response.headers.get("Last-Modified")
        return _Opened(response, start, total, validator, response.close)


def _int(value: str | None) -> int | None:
    try:
        return int(value) if value is not None else None
    except ValueError:
        return None


# -- s3:// --------------------------------------------------------------------------------

_S3_ENV = (
    "AWS_ENDPOINT_URL",
    "AWS_ENDPOINT_URL_S3",
    "AWS_PROFILE",
    "AWS_REGION",
    "AWS_DEFAULT_REGION",
    "AWS_ACCESS_KEY_ID",
    "AWS_CONFIG_FILE",
    "AWS_SHARED_CREDENTIALS_FILE",
)
_clients: dict[tuple[Any, ...], Any] = {}
_clients_lock = threading.Lock()


def s3_client(timeout_s: float = 30.0) -> Any:
    """One boto3 S3 client per configuration (clients are thread-safe, and costly
    to build); the environment is part of the key so a changed endpoint or
    profile takes effect."""
    key = (timeout_s, *(os.environ.get(name) for name in _S3_ENV))
    with _clients_lock:
        client = _clients.get(key)
        if client is None:
            import boto3
            from botocore.config import Config

            config = Config(
                connect_timeout=timeout_s,
                read_timeout=timeout_s,
                retries={"mode": "standard", "max_attempts": 3},
                user_agent_extra=USER_AGENT,
            )
            client = boto3.session.Session().client("s3", config=config)
            _clients[key] = client
        return client


def split_s3_url(url: str) -> tuple[str, str]:
    parts = urlsplit(url)
    return parts.netloc, parts.path.lstrip("/")


_S3_PERMANENT = {
    "NoSuchKey": "no such key",
    "NoSuchBucket": "no such bucket",
    "404": "no such key",
    "AccessDenied": "access denied (check the credentials and the bucket policy)",
    "403": "access denied (check the credentials and the bucket policy)",
    "InvalidAccessKeyId": "invalid access key id",
    "SignatureDoesNotMatch": "signature does not match (check the secret key)",
}


@dataclass
class _S3Source:
    url: str
    timeout_s: float
    guard: _Guard

    def open(self, offset: int, validator: str | None) -> _Opened:
        from botocore.exceptions import BotoCoreError, ClientError

        bucket, key = split_s3_url(self.url)
        args: dict[str, Any] = {"Bucket": bucket, "Key": key}
        if offset:
            args["Range"] = f"bytes={offset}-"
            if validator:
                args["IfMatch"] = validator
        try:
            response = s3_client(self.timeout_s).get_object(**args)
        except ClientError as exc:
            raise _s3_error(exc) from exc
        except BotoCoreError as exc:
            raise _s3_boto_error(exc) from exc
        body = response["Body"]
        # botocore's body keeps urllib3's response, whose shutdown() is there to wake a
        # read blocked in another thread. (Until the headers arrive, botocore's own
        # read timeout is the bound.)
        raw = getattr(body, "_raw_stream", None)
        if raw is not None:
            self.guard.on_end(raw.shutdown)
        start, total = 0, int(response.get("ContentLength", 0))
        match = _CONTENT_RANGE.match(response.get("ContentRange") or "")
        total_known: int | None = total
        if match is not None:
            start = int(match.group(1))
            total_known = None if match.group(2) == "*" else int(match.group(2))
        return _Opened(_S3Body(body), start, total_known, response.get("ETag"), body.close)


@dataclass
class _S3Body:
    body: Any

    def read(self, size: int, /) -> bytes:
        from botocore.exceptions import BotoCoreError

        try:
            return bytes(self.body.read(size))
        except BotoCoreError as exc:
            raise FetchError(f"{type(exc).__name__}: {exc}", transient=True) from exc


def _s3_error(exc: Any) -> FetchError:
    error = exc.response.get("Error", {})
    code = str(error.get("Code", ""))
    if code in _S3_PERMANENT:
        return FetchError(_S3_PERMANENT[code])
    if code in ("PreconditionFailed", "412", "InvalidRange", "416"):
        return FetchError("object changed, starting again", restart=True)
    status = exc.response.get("ResponseMetadata", {}).get("HTTPStatusCode", 0)
    transient = status >= 500 or code in ("SlowDown", "RequestTimeout", "Throttling")
    return FetchError(f"{code or status}: {error.get('Message', '')}", transient=transient)


def _s3_boto_error(exc: Exception) -> FetchError:
    from botocore.exceptions import (
        NoCredentialsError,
        ParamValidationError,
        PartialCredentialsError,
        ProfileNotFound,
    )

    if isinstance(exc, NoCredentialsError):
        return FetchError(
            "no AWS credentials found (set AWS_PROFILE, AWS_ACCESS_KEY_ID or "
            "give the host an instance role)"
        )
    if isinstance(exc, PartialCredentialsError | ProfileNotFound | ParamValidationError):
        return FetchError(str(exc))
    return FetchError(str(exc), transient=True)
