"""Fetching artifacts from a real loopback HTTP server, moto's S3 server and files."""

from __future__ import annotations

import contextlib
import hashlib
import http.server
import io
import os
import re
import socket
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import replace
from pathlib import Path

import boto3
import pytest
from preparer_support import ArtifactServer, Behaviour, artifact_server, moto_server, wait_for
from stall_support import StallingServer, stalling_server

from agents.system.fetch import (
    FetchError,
    FetchOptions,
    display_url,
    fetch,
    signature_url,
)

FAST = FetchOptions(timeout_s=30, attempts=3, backoff_initial_s=0.05, backoff_max_s=0.1)
"""Quick retries, and a read timeout that a loaded machine cannot reach by accident:
the tests of the timeout shorten it themselves."""
STALL_S = 120
"""A stall that only the read timeout (or the server's end) cuts short."""
DATA = os.urandom(300_000)
SHA = hashlib.sha256(DATA).hexdigest()


@pytest.fixture
def server(tmp_path: Path) -> Iterator[ArtifactServer]:
    root = tmp_path / "www"
    root.mkdir()
    (root / "app.tar.gz").write_bytes(DATA)
    with artifact_server(root) as running:
        yield running


def get(url: str, options: FetchOptions = FAST, **kwargs: object) -> tuple[bytes, str, int]:
    sink = io.BytesIO()
    fetched = fetch(url, sink, options, **kwargs)  # type: ignore[arg-type]
    assert fetched.size == len(sink.getvalue())
    return sink.getvalue(), fetched.sha256, fetched.attempts


class Background:
    """``call`` running on a thread, for calls that might never return."""

    def __init__(self, call: Callable[[], object]) -> None:
        self._result: list[object] = []
        self._thread = threading.Thread(target=self._run, args=(call,), daemon=True)
        self._thread.start()

    def _run(self, call: Callable[[], object]) -> None:
        try:
            self._result.append(call())
        except Exception as exc:
            self._result.append(exc)

    def running(self) -> bool:
        return self._thread.is_alive()

    def result(self, timeout_s: float) -> object:
        """What ``call`` returned or raised; it must have ended within ``timeout_s``
        (a liveness bound, not a measure of speed)."""
        self._thread.join(timeout_s)
        assert not self._thread.is_alive(), f"still running after {timeout_s} s"
        return self._result[0]


def bounded(call: Callable[[], object], timeout_s: float) -> object:
    return Background(call).result(timeout_s)


# -- http ---------------------------------------------------------------------------------


def test_http_fetch_streams_and_hashes_in_one_pass(server: ArtifactServer) -> None:
    data, sha, attempts = get(f"{server.url}/app.tar.gz")
    assert data == DATA and sha == SHA and attempts == 1
    assert server.count("/app.tar.gz") == 1


def test_a_stalled_server_times_out_and_the_retry_succeeds(server: ArtifactServer) -> None:
    server.behaviours["/app.tar.gz"] = Behaviour(stall_s=STALL_S, stall_times=1)
    options = replace(FAST, timeout_s=2)
    started = time.monotonic()
    data, sha, attempts = get(f"{server.url}/app.tar.gz", options)
    assert data == DATA and sha == SHA and attempts == 2
    assert options.timeout_s <= time.monotonic() - started < STALL_S / 2


def test_a_server_that_always_stalls_fails_after_the_attempts(server: ArtifactServer) -> None:
    server.behaviours["/app.tar.gz"] = Behaviour(stall_s=STALL_S, stall_times=99)
    options = replace(FAST, timeout_s=0.5)
    started = time.monotonic()
    with pytest.raises(FetchError, match="timed out") as caught:
        get(f"{server.url}/app.tar.gz", options)
    assert server.count("/app.tar.gz") == options.attempts
    assert time.monotonic() - started < STALL_S / 2
    assert str(caught.value).startswith(f"{server.url}/app.tar.gz: ")


# -- the deadline and the stop ---------------------------------------------------------


@pytest.fixture
def stalling() -> Iterator[StallingServer]:
    with stalling_server(interval_s=2.0) as running:
        yield running


def test_a_server_that_drips_bytes_is_cut_off_at_the_deadline(stalling: StallingServer) -> None:
    # Each byte comes well within the read timeout: only the deadline can end it.
    options = FetchOptions(timeout_s=10, attempts=3, backoff_initial_s=0.05, deadline_s=3)
    outcome = bounded(lambda: get(f"{stalling.url}/drip/app.tar.gz", options), timeout_s=30)
    assert isinstance(outcome, FetchError), outcome
    assert "not complete after 3 s (--fetch-deadline)" in str(outcome)
    assert not outcome.transient and not outcome.stopped
    assert stalling.paths == ["/drip/app.tar.gz"]  # cut off, not tried again


def test_the_deadline_also_bounds_the_waits_between_attempts(server: ArtifactServer) -> None:
    server.behaviours["/app.tar.gz"] = Behaviour(status=503)
    options = FetchOptions(
        timeout_s=5, attempts=5, backoff_initial_s=600, backoff_max_s=600, deadline_s=2
    )
    outcome = bounded(lambda: get(f"{server.url}/app.tar.gz", options), timeout_s=30)
    assert isinstance(outcome, FetchError) and "--fetch-deadline" in str(outcome)
    assert server.count("/app.tar.gz") == 1


@pytest.mark.parametrize("path", ["/silent/app.tar.gz", "/drip/app.tar.gz"])
def test_setting_stop_ends_a_fetch_blocked_on_a_stalled_server(
    stalling: StallingServer, path: str
) -> None:
    """Silent: blocked before any response; drip: blocked in the body. The read
    timeout (60 s) is far off: only the stop can end it."""
    stop = threading.Event()
    options = FetchOptions(timeout_s=60, attempts=3, backoff_initial_s=0.05, stop=stop)
    fetching = Background(lambda: get(f"{stalling.url}{path}", options))
    wait_for(lambda: stalling.paths == [path], timeout_s=10)
    stop.set()
    outcome = fetching.result(timeout_s=10)
    assert isinstance(outcome, FetchError), outcome
    assert outcome.stopped and not outcome.transient
    assert str(outcome) == f"{stalling.url}{path}: stopped before the download completed"
    assert stalling.paths == [path]


def test_setting_stop_ends_a_tls_handshake_with_a_silent_server() -> None:
    stop = threading.Event()
    with socket.create_server(("127.0.0.1", 0)) as listener:
        port = listener.getsockname()[1]
        options = FetchOptions(timeout_s=60, attempts=3, backoff_initial_s=0.05, stop=stop)
        fetching = Background(lambda: get(f"https://127.0.0.1:{port}/app.tar.gz", options))
        listener.settimeout(10)
        connection, _ = listener.accept()  # and never a byte back
        with connection:
            stop.set()
            outcome = fetching.result(timeout_s=10)
    assert isinstance(outcome, FetchError) and outcome.stopped, outcome


def test_setting_stop_cuts_the_wait_between_attempts_short(server: ArtifactServer) -> None:
    server.behaviours["/app.tar.gz"] = Behaviour(status=503)
    stop = threading.Event()
    options = FetchOptions(
        timeout_s=5, attempts=5, backoff_initial_s=600, backoff_max_s=600, stop=stop
    )
    fetching = Background(lambda: get(f"{server.url}/app.tar.gz", options))
    wait_for(lambda: server.count("/app.tar.gz") == 1, timeout_s=10)
    stop.set()
    outcome = fetching.result(timeout_s=10)
    assert isinstance(outcome, FetchError) and outcome.stopped
    assert server.count("/app.tar.gz") == 1


def test_a_fetch_asked_to_stop_before_it_starts_connects_nowhere(server: ArtifactServer) -> None:
    stop = threading.Event()
    stop.set()
    with pytest.raises(FetchError, match="stopped") as caught:
        get(f"{server.url}/app.tar.gz", replace(FAST, stop=stop))
    assert caught.value.stopped
    assert server.requests == []


def test_each_of_two_fetches_at_once_ends_by_its_own_deadline_or_stop(
    stalling: StallingServer,
) -> None:
    """The guards of all running fetches share one watcher: ending one fetch leaves
    the other alone, and each still ends when its own time comes."""
    stop = threading.Event()
    stoppable = FetchOptions(timeout_s=60, attempts=1, stop=stop)
    dripping = Background(lambda: get(f"{stalling.url}/drip/a.tar.gz", stoppable))
    wait_for(lambda: "/drip/a.tar.gz" in stalling.paths, timeout_s=10)
    short = FetchOptions(timeout_s=60, attempts=1, deadline_s=1)
    outcome = bounded(lambda: get(f"{stalling.url}/silent/b.tar.gz", short), timeout_s=30)
    assert isinstance(outcome, FetchError) and "not complete after 1 s" in str(outcome)
    assert dripping.running()
    stop.set()
    outcome = dripping.result(timeout_s=10)
    assert isinstance(outcome, FetchError) and outcome.stopped, outcome


def guard_threads() -> list[threading.Thread]:
    return [thread for thread in threading.enumerate() if thread.name == "fetch-guard"]


def voluntary_switches(thread: threading.Thread) -> int:
    """How often ``thread`` has gone to sleep and been woken (Linux counts it)."""
    status = Path(f"/proc/self/task/{thread.native_id}/status").read_text()
    counts = re.findall(r"^voluntary_ctxt_switches:\s+(\d+)$", status, re.MULTILINE)
    return int(counts[0])


def test_one_watcher_thread_serves_every_fetch_and_sleeps_while_none_runs(
    server: ArtifactServer,
) -> None:
    get(f"{server.url}/app.tar.gz")
    watchers = guard_threads()
    assert len(watchers) == 1  # it lives on, waiting for the next fetch
    for _ in range(30):
        get(f"{server.url}/app.tar.gz")
    assert guard_threads() == watchers

    def idle_for_a_second() -> bool:
        before = voluntary_switches(watchers[0])
        time.sleep(1)
        return voluntary_switches(watchers[0]) == before

    # Once the last fetch is over the watcher waits without a timeout: no wake-ups.
    wait_for(idle_for_a_second, timeout_s=20)


@contextlib.contextmanager
def redirecting(to: str) -> Iterator[str]:
    """A loopback server that answers every GET with a 302 to the same path at ``to``."""

    class Redirect(http.server.BaseHTTPRequestHandler):
        def log_message(self, format: str, *args: object) -> None:
            pass

        def do_GET(self) -> None:
            self.send_response(302)
            self.send_header("Location", to + self.path)
            self.send_header("Content-Length", "0")
            self.end_headers()

    with http.server.ThreadingHTTPServer(("127.0.0.1", 0), Redirect) as httpd:
        thread = threading.Thread(target=httpd.serve_forever, args=(0.05,), daemon=True)
        thread.start()
        try:
            yield f"http://127.0.0.1:{httpd.server_address[1]}"
        finally:
            httpd.shutdown()
            thread.join()


def test_a_redirect_is_followed(server: ArtifactServer) -> None:
    with redirecting(server.url) as url:
        data, sha, attempts = get(f"{url}/app.tar.gz")
    assert data == DATA and sha == SHA and attempts == 1


def test_setting_stop_ends_a_fetch_redirected_to_a_silent_server(
    stalling: StallingServer,
) -> None:
    """The connection a redirect opens is watched like the first one."""
    stop = threading.Event()
    options = FetchOptions(timeout_s=60, attempts=3, backoff_initial_s=0.05, stop=stop)
    with redirecting(stalling.url) as url:
        fetching = Background(lambda: get(f"{url}/silent/app.tar.gz", options))
        wait_for(lambda: stalling.paths == ["/silent/app.tar.gz"], timeout_s=10)
        stop.set()
        outcome = fetching.result(timeout_s=10)
    assert isinstance(outcome, FetchError) and outcome.stopped, outcome


def test_the_proxy_is_read_from_the_environment_at_each_fetch(
    server: ArtifactServer, monkeypatch: pytest.MonkeyPatch
) -> None:
    for name in ("no_proxy", "NO_PROXY", "http_proxy", "HTTP_PROXY"):
        monkeypatch.delenv(name, raising=False)
    assert get(f"{server.url}/app.tar.gz")[0] == DATA
    for name in ("http_proxy", "HTTP_PROXY"):
        monkeypatch.setenv(name, server.url)
    # The artifact server, taken for a proxy, is asked for the whole URL (and has no
    # file by that name).
    with pytest.raises(FetchError, match="HTTP 404"):
        get("http://repo.invalid/app.tar.gz")
    assert server.requests[-1][1] == "http://repo.invalid/app.tar.gz"
    for name in ("http_proxy", "HTTP_PROXY"):
        monkeypatch.delenv(name)
    assert get(f"{server.url}/app.tar.gz")[0] == DATA
    assert server.requests[-1][1] == "/app.tar.gz"


def test_404_fails_at_once_without_retrying(server: ArtifactServer) -> None:
    with pytest.raises(FetchError, match="HTTP 404") as caught:
        get(f"{server.url}/missing.tar.gz")
    assert not caught.value.transient
    assert server.count("/missing.tar.gz") == 1


def test_500_is_retried_then_reported(server: ArtifactServer) -> None:
    server.behaviours["/app.tar.gz"] = Behaviour(status=500)
    with pytest.raises(FetchError, match="HTTP 500"):
        get(f"{server.url}/app.tar.gz")
    assert server.count("/app.tar.gz") == FAST.attempts


def test_a_connection_dropped_mid_body_resumes_with_a_range_request(
    server: ArtifactServer,
) -> None:
    server.behaviours["/app.tar.gz"] = Behaviour(drop_after=100_000, drop_times=1)
    data, sha, attempts = get(f"{server.url}/app.tar.gz")
    assert data == DATA and sha == SHA and attempts == 2
    ranges = [r for _, p, r in server.requests if p == "/app.tar.gz"]
    assert ranges == [None, "bytes=100000-"]


def test_a_dropped_connection_restarts_when_the_server_cannot_resume(
    server: ArtifactServer,
) -> None:
    server.behaviours["/app.tar.gz"] = Behaviour(drop_after=100_000, drop_times=1, ranges=False)
    data, sha, attempts = get(f"{server.url}/app.tar.gz")
    assert data == DATA and sha == SHA and attempts == 2


def test_a_connection_refused_is_retried_then_reported() -> None:
    from preparer_support import free_port

    with pytest.raises(FetchError) as caught:
        get(f"http://127.0.0.1:{free_port()}/app.tar.gz")
    assert caught.value.transient


def test_downloads_larger_than_the_limit_are_refused_before_reading(
    server: ArtifactServer,
) -> None:
    with pytest.raises(FetchError, match="more than the limit"):
        get(f"{server.url}/app.tar.gz", max_bytes=1000)


def test_not_enough_free_space_is_reported_before_the_body(
    server: ArtifactServer, tmp_path: Path
) -> None:
    options = FetchOptions(timeout_s=30, attempts=1, min_free_bytes=1 << 60)
    with pytest.raises(FetchError, match="not enough free space") as caught:
        get(f"{server.url}/app.tar.gz", options, space_dir=tmp_path)
    assert "300000 bytes" in str(caught.value)
    assert not caught.value.transient


def test_urls_are_shown_without_credentials_or_query() -> None:
    assert (
        display_url("https://user:secret@repo.invalid/a/b.tar.gz?X-Amz-Signature=abc")
        == "https://repo.invalid/a/b.tar.gz"
    )
    assert (
        signature_url("https://h.invalid/a.tar.gz?sig=1") == "https://h.invalid/a.tar.gz.sig?sig=1"
    )


# -- file:// ------------------------------------------------------------------------------


def test_file_urls(tmp_path: Path) -> None:
    (tmp_path / "a b.tar.gz").write_bytes(DATA)
    data, sha, _ = get(f"file://{tmp_path}/a%20b.tar.gz", local(tmp_path))
    assert data == DATA and sha == SHA
    with pytest.raises(FetchError, match="no such file"):
        get(f"file://{tmp_path}/missing.tar.gz", local(tmp_path))


def local(root: Path | None) -> FetchOptions:
    return replace(FAST, local_root=None if root is None else str(root))


@pytest.fixture
def repo(tmp_path: Path) -> Path:
    """A repo holding one artifact and every kind of trap, beside a secret of root's."""
    secret = tmp_path / "secret"
    secret.write_bytes(DATA)
    secret.chmod(0o600)
    repo = tmp_path / "repo"
    (repo / "app").mkdir(parents=True)
    (repo / "app" / "app_1.tar.gz").write_bytes(DATA)
    (repo / "link").symlink_to(secret)
    (repo / "relative-link").symlink_to("../secret")
    (repo / "outside").symlink_to(tmp_path)
    (repo / "zero").symlink_to("/dev/zero")
    (repo / "inside").symlink_to("app")
    os.mkfifo(repo / "fifo")
    return repo


def hostile_urls(repo: Path) -> list[str]:
    secret = repo.parent / "secret"
    return [
        f"FILE://{secret}",
        f"file:{secret}",
        f"file://{repo}/%2e%2e/secret",
        f"file://{repo}/app/%2E%2E/..%2Fsecret",
        f"file://{repo}/link",
        f"file://{repo}/relative-link",
        f"file://{repo}/outside/secret",
        f"file://{repo}/inside/app_1.tar.gz",
        f"file://{repo}/zero",
        f"file://{repo}/fifo",
        f"file://{repo}/app",
        f"file://{repo}/app/app_1.tar.gz/x",
        f"file://other-host{secret}",
        f"file://{repo}/app/app_1.tar.gz%00",
    ]


@pytest.mark.parametrize("with_repo", [True, False])
def test_file_urls_that_leave_the_repo_or_are_no_plain_file_are_refused(
    repo: Path, with_repo: bool
) -> None:
    options = replace(local(repo if with_repo else None), attempts=1)
    for url in hostile_urls(repo):
        # A FIFO without a writer would block an open for ever: run each bounded.
        outcome = bounded(lambda url=url: get(url, options), timeout_s=10)  # type: ignore[misc]
        assert isinstance(outcome, FetchError), (url, outcome)
        assert SHA not in str(outcome)
        assert not outcome.transient, url


def test_file_urls_beneath_the_repo_are_read_however_spelled(repo: Path, tmp_path: Path) -> None:
    (tmp_path / "repo-link").symlink_to(repo)  # the repo's own path may be a link
    for root, url in [
        (repo, f"FILE://{repo}/app/app_1.tar.gz"),
        (repo, f"file:{repo}/app/app_1.tar.gz"),
        (repo, f"file://localhost{repo}/app/%61pp_1.tar.gz"),
        (repo, f"file://{repo}/app/../app/app_1.tar.gz"),
        (tmp_path / "repo-link", f"file://{tmp_path}/repo-link/app/app_1.tar.gz"),
    ]:
        data, sha, _ = get(url, local(root))
        assert data == DATA and sha == SHA, url


@pytest.mark.parametrize(
    ("url", "message"),
    [
        ("ftp://host/a.tar.gz", "unsupported URL scheme"),
        ("file://host/a.tar.gz", "three slashes"),
        ("s3://bucket-only", "s3://bucket/key"),
    ],
)
def test_unusable_urls_are_refused(url: str, message: str) -> None:
    with pytest.raises(FetchError, match=message):
        get(url)


# -- s3:// via moto in server mode ---------------------------------------------------------


@pytest.fixture(scope="module")
def s3_endpoint() -> Iterator[str]:
    with moto_server() as endpoint:
        yield endpoint


@pytest.fixture
def s3(s3_endpoint: str, monkeypatch: pytest.MonkeyPatch) -> str:
    monkeypatch.setenv("AWS_ENDPOINT_URL", s3_endpoint)
    monkeypatch.setenv("AWS_ACCESS_KEY_ID", "testing")
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", "testing")
    monkeypatch.setenv("AWS_DEFAULT_REGION", "us-east-1")
    monkeypatch.delenv("AWS_PROFILE", raising=False)
    client = boto3.client("s3")
    bucket = f"artifacts-{os.urandom(4).hex()}"
    client.create_bucket(Bucket=bucket)
    client.put_object(Bucket=bucket, Key="app/app_1.0.tar.gz", Body=DATA)
    return bucket


def test_s3_fetch_through_aws_endpoint_url(s3: str) -> None:
    data, sha, attempts = get(f"s3://{s3}/app/app_1.0.tar.gz")
    assert data == DATA and sha == SHA and attempts == 1


def test_s3_missing_key_fails_at_once(s3: str) -> None:
    with pytest.raises(FetchError, match="no such key") as caught:
        get(f"s3://{s3}/app/app_9.9.tar.gz")
    assert not caught.value.transient


def test_s3_missing_bucket_fails_at_once(s3: str) -> None:
    with pytest.raises(FetchError, match="no such bucket"):
        get("s3://no-such-bucket-here/app/app_1.0.tar.gz")


def test_s3_free_space_is_checked_against_the_object_size(s3: str, tmp_path: Path) -> None:
    options = FetchOptions(timeout_s=30, attempts=1, min_free_bytes=1 << 60)
    with pytest.raises(FetchError, match="not enough free space"):
        get(f"s3://{s3}/app/app_1.0.tar.gz", options, space_dir=tmp_path)


def test_s3_unreachable_endpoint_is_transient(s3: str, monkeypatch: pytest.MonkeyPatch) -> None:
    from preparer_support import free_port

    monkeypatch.setenv("AWS_ENDPOINT_URL", f"http://127.0.0.1:{free_port()}")
    options = FetchOptions(timeout_s=0.5, attempts=2, backoff_initial_s=0.01, backoff_max_s=0.01)
    with pytest.raises(FetchError) as caught:
        get(f"s3://{s3}/app/app_1.0.tar.gz", options)
    assert caught.value.transient
