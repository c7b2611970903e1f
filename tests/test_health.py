"""Health checks against real sockets and processes; the gate's rules with a fake clock."""

from __future__ import annotations

import socket
import threading
import time
from collections.abc import Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import pytest

from agents import health
from intent.model import HealthCheck


class _Server:
    def __init__(self) -> None:
        self.status = 200
        self.body = "ok"
        self.delay = 0.0
        outer = self

        class Handler(BaseHTTPRequestHandler):
            def do_GET(self) -> None:
                time.sleep(outer.delay)
                data = f"{self.path} {outer.body}".encode()
                try:
                    self.send_response(outer.status)
                    self.send_header("Content-Length", str(len(data)))
                    self.end_headers()
                    self.wfile.write(data)
                except OSError:
                    pass  # the check gave up first: that is what the test wants

            def log_message(self, format: str, *args: object) -> None:
                pass

        self.httpd = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.port = self.httpd.server_address[1]
        self.thread = threading.Thread(
            target=self.httpd.serve_forever, kwargs={"poll_interval": 0.02}, daemon=True
        )
        self.thread.start()

    def close(self) -> None:
        self.httpd.shutdown()
        self.httpd.server_close()


@pytest.fixture
def server() -> Iterator[_Server]:
    s = _Server()
    yield s
    s.close()


def _closed_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def test_http_check_passes_on_2xx_and_reports_the_answer(server: _Server) -> None:
    server.status = 204
    result = health.http_check("127.0.0.1", server.port, "/health", 1.0)
    assert result.ok
    assert f"127.0.0.1:{server.port}/health: 204" in result.output


def test_http_check_fails_on_5xx_with_the_body_in_the_output(server: _Server) -> None:
    server.status, server.body = 503, "database down"
    result = health.http_check("127.0.0.1", server.port, "/health", 1.0)
    assert not result.ok
    assert "503" in result.output and "database down" in result.output


def test_http_check_fails_on_redirects_and_client_errors(server: _Server) -> None:
    for status in (301, 404):
        server.status = status
        assert not health.http_check("127.0.0.1", server.port, "/", 1.0).ok


def test_http_check_names_a_refused_connection() -> None:
    result = health.http_check("127.0.0.1", _closed_port(), "/health", 1.0)
    assert not result.ok
    assert "refused" in result.output


def test_http_check_gives_up_after_its_timeout(server: _Server) -> None:
    server.delay = 1.0
    started = time.monotonic()
    result = health.http_check("127.0.0.1", server.port, "/slow", 0.2)
    assert not result.ok
    assert "timed out" in result.output
    assert time.monotonic() - started < 0.9


def test_tcp_check_passes_on_a_listening_port_and_fails_on_a_closed_one(server: _Server) -> None:
    assert health.tcp_check("127.0.0.1", server.port, 1.0).ok
    closed = health.tcp_check("127.0.0.1", _closed_port(), 1.0)
    assert not closed.ok and "refused" in closed.output


def test_exec_check_uses_the_exit_code_and_keeps_the_output() -> None:
    ok = health.exec_check(["sh", "-c", "echo fine"], 2.0)
    bad = health.exec_check(["sh", "-c", "echo broken >&2; exit 3"], 2.0)
    assert ok.ok and "fine" in ok.output
    assert not bad.ok and "exit 3" in bad.output and "broken" in bad.output


def test_exec_check_passes_only_the_given_environment() -> None:
    result = health.exec_check(
        ["sh", "-c", 'echo "[$PP_VERSION][$SECRET]"'],
        2.0,
        {"PATH": "/usr/bin:/bin", "PP_VERSION": "7"},
    )
    assert "[7][]" in result.output


def test_exec_check_times_out_and_names_a_missing_command() -> None:
    started = time.monotonic()
    slow = health.exec_check(["sleep", "5"], 0.2)
    assert not slow.ok and "no result" in slow.output
    assert time.monotonic() - started < 2
    missing = health.exec_check(["/nonexistent/bin/check"], 1.0)
    assert not missing.ok and "no such file" in missing.output


def test_check_env_drops_the_agents_own_secrets() -> None:
    env = health.check_env({"PATH": "/bin", "CONSUL_HTTP_TOKEN": "s3cret", "PP_STORE": "x"})
    assert env == {"PATH": "/bin"}


def test_output_is_clipped_to_one_line() -> None:
    result = health.exec_check(["sh", "-c", "yes line | head -200"], 2.0)
    assert "\n" not in result.output and len(result.output) <= health.OUTPUT_LIMIT


def test_build_check_follows_the_spec(server: _Server) -> None:
    http = health.build_check(
        HealthCheck(type="http", path="/x"), host="127.0.0.1", port=server.port
    )
    assert http().ok and "/x" in http().output
    tcp = health.build_check(HealthCheck(type="tcp"), host="127.0.0.1", port=server.port)
    assert tcp().ok
    ex = health.build_check(
        HealthCheck(type="exec"), host="127.0.0.1", port=None, exec_argv=["false"]
    )
    assert not ex().ok
    with pytest.raises(ValueError):
        health.build_check(HealthCheck(type="http"), host="127.0.0.1", port=None)


# -- the gate, on a fake clock -----------------------------------------------------------------


class _Clock:
    def __init__(self) -> None:
        self.t = 1000.0

    def mono(self) -> float:
        return self.t

    def sleep(self, seconds: float) -> None:
        self.t += seconds


def _gate(
    clock: _Clock,
    checks: list[bool] | None,
    started_at: list[float] | None = None,
    *,
    threshold: int = 3,
    min_uptime: float = 0.0,
    deadline: float = 10.0,
) -> health.Verdict:
    results = iter(checks or [])
    starts = iter(started_at or [])
    last_start = [clock.t]

    def check() -> health.CheckResult:
        ok = next(results, False)
        return health.CheckResult(ok, "pass" if ok else "fail")

    def liveness() -> health.Liveness:
        start = next(starts, last_start[0])
        last_start[0] = start
        return health.Liveness(True, start, incarnation=start)

    return health.wait_healthy(
        check if checks is not None else None,
        liveness,
        healthy_threshold=threshold,
        interval_s=1.0,
        deadline_s=deadline,
        min_uptime_s=min_uptime,
        clock=clock.mono,
        wall=clock.mono,
        sleep=clock.sleep,
    )


def test_gate_needs_consecutive_passes() -> None:
    clock = _Clock()
    result = _gate(clock, [True, False, True, True, True])
    assert result.healthy and result.passes == 3
    assert result.seconds == pytest.approx(4.0)


def test_gate_fails_at_the_deadline_with_the_last_output() -> None:
    clock = _Clock()
    result = _gate(clock, [True, False] * 20, deadline=5.0)
    assert not result.healthy
    assert result.output in ("pass", "fail")
    assert result.seconds == pytest.approx(5.0)


def test_gate_waits_for_min_uptime_even_when_checks_pass() -> None:
    clock = _Clock()
    result = _gate(clock, [True] * 50, threshold=1, min_uptime=4.5)
    assert result.healthy
    assert 4.5 <= result.seconds < 5.5


def test_gate_restarts_the_count_when_the_process_restarts() -> None:
    clock = _Clock()
    t = clock.t
    # a crash loop: a new incarnation every second never gets three passes in a row
    result = _gate(clock, [True] * 50, started_at=[t + i for i in range(50)], deadline=8.0)
    assert not result.healthy


def test_gate_without_a_check_counts_runit_uptime_only() -> None:
    clock = _Clock()
    result = _gate(clock, None, min_uptime=2.0)
    assert result.healthy and 2.0 <= result.seconds < 3.0


def test_gate_reports_a_process_that_is_not_up() -> None:
    clock = _Clock()
    result = health.wait_healthy(
        None,
        lambda: health.Liveness(False, detail="runit: web down"),
        healthy_threshold=1,
        interval_s=1.0,
        deadline_s=3.0,
        min_uptime_s=0.0,
        clock=clock.mono,
        wall=clock.mono,
        sleep=clock.sleep,
    )
    assert not result.healthy and result.output == "runit: web down"


def test_gate_calls_keepalive_while_it_waits() -> None:
    clock = _Clock()
    calls = []
    health.wait_healthy(
        lambda: health.CheckResult(False, "no"),
        lambda: health.Liveness(True, clock.t, 1),
        healthy_threshold=1,
        interval_s=1.0,
        deadline_s=3.0,
        min_uptime_s=0.0,
        keepalive=lambda: calls.append(clock.t),
        clock=clock.mono,
        wall=clock.mono,
        sleep=clock.sleep,
    )
    assert len(calls) >= 2


def test_gate_stops_early_when_asked() -> None:
    stop = threading.Event()
    stop.set()
    started = time.monotonic()
    result = health.wait_healthy(
        lambda: health.CheckResult(False, "no"),
        lambda: health.Liveness(True, time.time(), 1),
        healthy_threshold=1,
        interval_s=5.0,
        deadline_s=30.0,
        min_uptime_s=0.0,
        stop=stop,
    )
    assert not result.healthy and "stopped" in result.output
    assert time.monotonic() - started < 1


def test_tracker_uses_thresholds_after_the_first_result() -> None:
    tracker = health.HealthTracker(healthy_threshold=2, unhealthy_threshold=3)
    assert tracker.record(True) == "healthy"
    assert tracker.record(False) == "healthy"
    assert tracker.record(False) == "healthy"
    assert tracker.record(False) == "unhealthy"
    assert tracker.record(True) == "unhealthy"
    assert tracker.record(True) == "healthy"
    fresh = health.HealthTracker(2, 3)
    assert fresh.record(False) == "unhealthy"
