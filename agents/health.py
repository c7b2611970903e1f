"""Health checks and the rules for trusting them: thresholds, minimum uptime, deadlines.

Shared by every agent that must tell a healthy app from a sick one (setlive's
switch gate, the load balancer registrar), so a check means the same thing
everywhere. Nothing here knows about runit or the store: liveness of the
process is passed in as a function.

A missing health check is never "healthy" by itself: the process must still
stay up for ``min_uptime_s``.
"""

from __future__ import annotations

import http.client
import os
import socket
import subprocess
import threading
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

from agents.system.layout import AppLayout, LaunchEntries
from intent.model import DeployConfig, HealthCheck

ENV_DIR = "env"
"""The env dir in a service directory setlive stages: exec checks run with the app's
environment, as its services do."""

OUTPUT_LIMIT = 300
"""Characters of check output kept for reports: enough to act on, small in the store."""


@dataclass(frozen=True)
class CheckResult:
    ok: bool
    output: str


Check = Callable[[], CheckResult]


def _clip(text: str) -> str:
    text = " ".join(text.split())
    return text if len(text) <= OUTPUT_LIMIT else text[: OUTPUT_LIMIT - 3] + "..."


def http_check(host: str, port: int, path: str, timeout_s: float) -> CheckResult:
    """GET ``path``; healthy on any 2xx answer."""
    conn = http.client.HTTPConnection(host, port, timeout=timeout_s)
    try:
        conn.request("GET", path, headers={"Connection": "close", "User-Agent": "platypus-health"})
        response = conn.getresponse()
        body = response.read(OUTPUT_LIMIT).decode("utf-8", "replace")
    except (OSError, http.client.HTTPException) as exc:
        return CheckResult(False, f"http {host}:{port}{path}: {_describe(exc)}")
    finally:
        conn.close()
    ok = 200 <= response.status < 300
    return CheckResult(ok, _clip(f"http {host}:{port}{path}: {response.status} {body}"))


def tcp_check(host: str, port: int, timeout_s: float) -> CheckResult:
    """Healthy when a TCP connection is accepted."""
    try:
        with socket.create_connection((host, port), timeout=timeout_s):
            return CheckResult(True, f"tcp {host}:{port}: connected")
    except OSError as exc:
        return CheckResult(False, f"tcp {host}:{port}: {_describe(exc)}")


def exec_check(
    argv: Sequence[str],
    timeout_s: float,
    env: Mapping[str, str] | None = None,
    cwd: str | None = None,
) -> CheckResult:
    """Healthy when the command exits 0 within the timeout; its output is the detail."""
    try:
        done = subprocess.run(
            list(argv),
            capture_output=True,
            timeout=timeout_s,
            env=dict(env) if env is not None else None,
            cwd=cwd,
            check=False,
            start_new_session=True,
        )
    except subprocess.TimeoutExpired:
        return CheckResult(False, f"exec {argv[-1]}: no result in {timeout_s:g}s")
    except OSError as exc:
        return CheckResult(False, f"exec {argv[-1]}: {_describe(exc)}")
    output = (done.stdout + done.stderr).decode("utf-8", "replace").strip()
    summary = f"exec {argv[-1]}: exit {done.returncode}" + (f": {output}" if output else "")
    return CheckResult(done.returncode == 0, _clip(summary))


def _describe(exc: BaseException) -> str:
    if isinstance(exc, TimeoutError | socket.timeout):
        return "timed out"
    if isinstance(exc, OSError) and exc.strerror:
        return exc.strerror.lower()
    return str(exc) or type(exc).__name__


def build_check(
    spec: HealthCheck,
    *,
    host: str,
    port: int | None,
    exec_argv: Sequence[str] | None = None,
    exec_env: Mapping[str, str] | None = None,
) -> Check:
    """The check a ``deploy_config.health_check`` describes, ready to call."""
    if spec.type == "exec":
        if exec_argv is None:
            raise ValueError("health_check.type exec needs the artifact's bin/check")
        argv = list(exec_argv)
        return lambda: exec_check(argv, spec.timeout_s, exec_env)
    if port is None:
        raise ValueError(f"health_check.type {spec.type} needs a port")
    if spec.type == "http":
        return lambda: http_check(host, port, spec.path, spec.timeout_s)
    return lambda: tcp_check(host, port, spec.timeout_s)


def app_check(
    deploy: DeployConfig,
    layout: AppLayout,
    version: str,
    stage: Path,
    staged: LaunchEntries = (),
) -> Check | None:
    """The app's ``deploy_config.health_check`` against one installed ``version``; None
    when it declares none. The one definition setlive's gate and the load balancer
    registrar both run, so "healthy" means the same to both.

    An exec check runs the install's ``bin/check`` as ``run_as`` with the env dir of
    the app's first service in setlive's ``stage`` (the services the install's
    marker declares; ``staged``, the entries already staged, for a marker that
    predates that record). ValueError names what an http or tcp check lacks."""
    spec = deploy.health_check
    if spec is None:
        return None
    port = spec.port if spec.port is not None else (deploy.ports[0].port if deploy.ports else None)
    if spec.type != "exec" and port is None:
        raise ValueError(
            "deploy_config.health_check.port: not set, and deploy_config.ports is empty"
        )
    marker = layout.read_marker(version)
    entries = marker.launch if marker is not None and marker.launch is not None else staged
    first = entries[0] if entries else None
    service = layout.app if first is None else f"{layout.app}-{first}"
    argv = [
        "chpst",
        "-u",
        deploy.run_as,
        "-e",
        str(stage / service / ENV_DIR),
        str(layout.install_dir(version) / "bin" / "check"),
    ]
    env = check_env() | {"PP_VERSION": version}
    return build_check(spec, host="127.0.0.1", port=port, exec_argv=argv, exec_env=env)


# -- the gate --------------------------------------------------------------------------------


@dataclass(frozen=True)
class Liveness:
    """Whether the process is up, since when (Unix time) and which incarnation it is."""

    up: bool
    started_at: float | None = None
    incarnation: object = None
    detail: str = ""


@dataclass(frozen=True)
class Verdict:
    """How a wait for health ended: healthy or not, after how many passes and seconds."""

    healthy: bool
    passes: int
    output: str
    seconds: float


def wait_healthy(
    check: Check | None,
    liveness: Callable[[], Liveness],
    *,
    healthy_threshold: int,
    interval_s: float,
    deadline_s: float,
    min_uptime_s: float,
    keepalive: Callable[[], None] | None = None,
    stop: threading.Event | None = None,
    clock: Callable[[], float] = time.monotonic,
    wall: Callable[[], float] = time.time,
    sleep: Callable[[float], None] = time.sleep,
) -> Verdict:
    """Wait until ``healthy_threshold`` consecutive checks pass on one incarnation of the
    process and it has been up ``min_uptime_s``, or until ``deadline_s`` passes.

    A restart of the process (a new incarnation) starts the count again: a crash
    loop that answers between crashes is not healthy.
    """
    started = clock()
    passes = 0
    incarnation: object = None
    output = "not checked yet"
    while True:
        alive = liveness()
        if not alive.up:
            passes, output = 0, alive.detail or "process not running"
        else:
            if alive.incarnation != incarnation:
                passes, incarnation = 0, alive.incarnation
            if check is None:
                passes, output = passes + 1, alive.detail or "process up (no health check)"
            else:
                result = check()
                passes = passes + 1 if result.ok else 0
                output = result.output
        uptime = wall() - alive.started_at if alive.up and alive.started_at is not None else 0.0
        threshold = 1 if check is None else healthy_threshold
        if passes >= threshold and uptime >= min_uptime_s:
            return Verdict(True, passes, output, clock() - started)
        remaining = deadline_s - (clock() - started)
        if remaining <= 0:
            if passes >= threshold:
                output = f"up only {uptime:.1f}s of min_uptime_s {min_uptime_s:g}; {output}"
            return Verdict(False, passes, output, clock() - started)
        pause = interval_s
        if passes >= threshold:  # only uptime is missing: look again right when it is due
            pause = min(pause, max(0.0, min_uptime_s - uptime) + 0.01)
        if keepalive is not None:
            keepalive()
        if stop is not None:
            if stop.wait(min(pause, remaining)):
                return Verdict(False, passes, "stopped while waiting for health", 0.0)
        else:
            sleep(min(pause, remaining))


# -- steady state ----------------------------------------------------------------------------

Health = Literal["healthy", "unhealthy", "unknown"]


class HealthTracker:
    """Flip to unhealthy after ``unhealthy_threshold`` consecutive failures and back after
    ``healthy_threshold`` consecutive passes; the first result decides from unknown."""

    def __init__(self, healthy_threshold: int, unhealthy_threshold: int) -> None:
        self.healthy_threshold = healthy_threshold
        self.unhealthy_threshold = unhealthy_threshold
        self.state: Health = "unknown"
        self._streak = 0
        self._streak_ok: bool | None = None

    def record(self, ok: bool) -> Health:
        self._streak = self._streak + 1 if ok == self._streak_ok else 1
        self._streak_ok = ok
        if self.state == "unknown":
            self.state = "healthy" if ok else "unhealthy"
        elif ok and self.state == "unhealthy" and self._streak >= self.healthy_threshold:
            self.state = "healthy"
        elif not ok and self.state == "healthy" and self._streak >= self.unhealthy_threshold:
            self.state = "unhealthy"
        return self.state

    def set(self, state: Health) -> None:
        self.state, self._streak, self._streak_ok = state, 0, None


def check_env(base: Mapping[str, str] | None = None) -> dict[str, str]:
    """A minimal environment for exec checks: PATH and locale, nothing of the agent's."""
    source = os.environ if base is None else base
    return {k: v for k, v in source.items() if k in ("PATH", "LANG", "LC_ALL", "TZ")}
