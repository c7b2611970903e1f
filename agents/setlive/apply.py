"""Carry a plan out on the host, step by step, through the runit and file adapters.

Every step is idempotent and the steps are ordered by the planner so that a
setlive killed between any two of them (runit restarting setlive itself is the
common case) resumes from what it finds. Execution stops at the first step
that must wait (a lease, runsvdir picking a service up) or fails, and at a
failed health gate, which the agent turns into a rollback.

``PP_SETLIVE_FAILPOINT=<point>`` makes setlive kill itself with SIGKILL at that
point (``after-<step>`` for each step in kebab case, e.g. ``after-set-current``,
or ``during-await-health``); the crash tests use it to stop at each step.
"""

from __future__ import annotations

import contextlib
import logging
import os
import re
import secrets
import shutil
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import structlog

from agents import health, metrics
from agents.setlive import container
from agents.setlive.observe import Paths
from agents.setlive.plan import (
    AcquireLease,
    Action,
    AwaitDrain,
    AwaitHealth,
    AwaitSupervised,
    ClearDrain,
    ClearFailure,
    ClearPending,
    LinkService,
    Plan,
    RequestDrain,
    RestartService,
    RetireService,
    SavePending,
    SetAutostart,
    SetCurrent,
    SetPrevious,
    StageService,
    StartGuard,
    StartService,
    StopService,
    healthy_peers,
    lease_limit,
)
from agents.setlive.services import ENV_DIR, ServiceSpec
from agents.setlive.state import Drain, Pending, StateDir
from agents.system import fs, runit
from agents.system.layout import AppLayout
from intent.model import HealthCheck
from intent.store import IntentStore, StoreError

log = structlog.get_logger()

DEFAULT_HEALTH_CHECK = HealthCheck(type="tcp")
"""The gate's timings when the app declares no health check (only runit's uptime counts)."""


def lease_resource(app: str, cluster: str) -> str:
    return f"setlive/{app}/{cluster}"


@dataclass
class ApplyContext:
    app: str
    cluster: str
    node: str
    layout: AppLayout
    paths: Paths
    store: IntentStore
    state: StateDir
    check: Callable[[str], health.Check | None]
    """The health check for a version (None: the app declares none)."""
    health_check: HealthCheck
    """The app's ``deploy_config.health_check``: the gate's thresholds and deadline."""
    supervise_timeout_s: float = 7.0
    lease_ttl_s: float = 30.0
    health_freshness_s: float = 180.0
    progress: Callable[[str, str | None], None] = lambda reason, version: None
    stop: threading.Event | None = None
    guard_deadline_s: float | None = None
    """How long the self-deploy guard waits; None: twice the gate's deadline plus margin."""
    retry_token: str | None = None


@dataclass
class ApplyResult:
    done: list[str] = field(default_factory=list)
    gate: AwaitHealth | None = None
    """The health gate run, if one was (its verdict next)."""
    verdict: health.Verdict | None = None
    wait: str | None = None
    error: str | None = None


def failpoint(point: str) -> None:
    if os.environ.get("PP_SETLIVE_FAILPOINT") == point:
        log.warning("setlive.failpoint", point=point)
        os.kill(os.getpid(), signal.SIGKILL)


def _kebab(name: str) -> str:
    return re.sub(r"(?<!^)(?=[A-Z])", "-", name).lower()


class _Lease:
    def __init__(self, ctx: ApplyContext) -> None:
        self.ctx = ctx
        self.resource = lease_resource(ctx.app, ctx.cluster)
        self.limit: int | None = None
        self._renewed = 0.0

    def acquire(self, min_nodes: int) -> str | None:
        """Take a restart lease; returns why not when it cannot."""
        ctx = self.ctx
        try:
            cluster_nodes = [n for n, c in ctx.store.nodes_of(ctx.app).items() if c == ctx.cluster]
            reports = [r for r in ctx.store.reality(app=ctx.app) if r.agent == "setlive"]
            peers = healthy_peers(
                reports, cluster_nodes, ctx.node, time.time(), ctx.health_freshness_s
            )
            limit = lease_limit(peers + 1, min_nodes)
            where = f"{ctx.app}/{ctx.cluster}"
            if limit < 1:
                return (
                    f"waiting to restart: {peers + 1} healthy node(s) of {where}, "
                    f"min_nodes {min_nodes}"
                )
            if not ctx.store.acquire_lease(self.resource, ctx.node, limit, ctx.lease_ttl_s):
                holders = ", ".join(ctx.store.lease_holders(self.resource)) or "?"
                return (
                    f"waiting for a restart lease on {where} ({limit} at a time, held by {holders})"
                )
        except StoreError as exc:
            return f"waiting for the store to grant a restart lease: {exc}"
        self.limit, self._renewed = limit, time.monotonic()
        return None

    def keepalive(self) -> None:
        if self.limit is None or time.monotonic() - self._renewed < self.ctx.lease_ttl_s / 3:
            return
        with contextlib.suppress(StoreError):
            self.ctx.store.acquire_lease(
                self.resource, self.ctx.node, self.limit, self.ctx.lease_ttl_s
            )
            self._renewed = time.monotonic()

    def release(self) -> None:
        if self.limit is None:
            return
        with contextlib.suppress(StoreError):
            self.ctx.store.release_lease(self.resource, self.ctx.node)
        self.limit = None


def apply(plan: Plan, ctx: ApplyContext) -> ApplyResult:
    result = ApplyResult()
    lease = _Lease(ctx)
    fresh: dict[str, float] = {}
    """Services started in this run, with the time before: the gate counts only newer processes."""
    try:
        for action in plan.actions:
            stop_here = _step(action, ctx, lease, fresh, result)
            result.done.append(type(action).__name__)
            if stop_here:
                return result
            failpoint("after-" + _kebab(type(action).__name__))
    except runit.RunitError as exc:
        result.error = f"runit: {exc}"
    except OSError as exc:
        result.error = f"{exc.filename or ctx.app}: {exc.strerror or exc}"
    finally:
        lease.release()
    return result


def _step(
    action: Action,
    ctx: ApplyContext,
    lease: _Lease,
    fresh: dict[str, float],
    result: ApplyResult,
) -> bool:
    """Run one step; True when execution must stop here (waiting or a failed gate)."""
    stage = ctx.paths.stage
    match action:
        case ClearFailure():
            ctx.state.update(ctx.app, failure=None)
        case AcquireLease(min_nodes=min_nodes):
            result.wait = lease.acquire(min_nodes)
            return result.wait is not None
        case RequestDrain(bounds=bounds):
            now = time.time()
            token = secrets.token_hex(8)
            drain = Drain(token, now, now + bounds.wait_s, now + bounds.wait_s + bounds.hold_s)
            ctx.state.update(ctx.app, drain=drain)
            log.info("setlive.drain_requested", app=ctx.app, token=token, wait_s=bounds.wait_s)
            result.wait = (
                f"asked pp-elb-registrar to take {ctx.app} out of its load balancers "
                f"(waiting up to {bounds.wait_s:g}s)"
            )
            # Said now, while a min_nodes lease is still held: peers count this node out
            # (health unknown) before the lease is released, and the registrar is woken.
            ctx.progress(result.wait, ctx.layout.version_of(ctx.layout.current))
            return True
        case AwaitDrain(token=token):
            noted = ctx.state.load(ctx.app).drain
            left = max(0.0, noted.wait_until - time.time()) if noted is not None else 0.0
            result.wait = (
                f"waiting for pp-elb-registrar to drain {ctx.app} from its load balancers "
                f"(request {token}; going on without it in {left:.0f}s)"
            )
            return True
        case ClearDrain():
            ctx.state.update(ctx.app, drain=None)
        case RetireService(name=name):
            retire(ctx.paths, name, ctx.supervise_timeout_s)
        case StageService(spec=spec, new=new):
            stage_service(stage, spec, new)
        case StartGuard():
            try:
                start_guard(ctx, action)
            except (OSError, subprocess.CalledProcessError) as exc:
                # Never switch the bundle we run from without someone left to undo it.
                result.error = f"cannot start the self-deploy guard: {exc}"
                return True
        case SavePending(target=target, from_version=from_version):
            pending = Pending(target, from_version, time.time())
            ctx.state.update(ctx.app, pending=pending)
        case SetPrevious(version=version):
            fs.symlink_atomic(_relative_install(ctx.layout, version), ctx.layout.previous)
        case SetCurrent(version=version):
            now = time.time()
            fs.symlink_atomic(_relative_install(ctx.layout, version), ctx.layout.current)
            ctx.state.update(ctx.app, last_switch_at=now)
            log.info("setlive.switched", app=ctx.app, version=version)
            metrics.switched(ctx.app)
        case LinkService(name=name):
            runit.link(stage / name, ctx.paths.runit_dir, name)
        case AwaitSupervised(name=name):
            if not runit.wait_supervised(stage / name, ctx.supervise_timeout_s):
                result.wait = (
                    f"waiting for runsvdir to supervise {name} "
                    f"(is runsvdir running on {ctx.paths.runit_dir}?)"
                )
                return True
        case StartService(name=name):
            since = fresh.setdefault(name, time.time())
            runit.up(stage / name)
            status = runit.status(stage / name)
            if status.up and (status.started_at or 0.0) < since:
                # runsv started it on its own since the plan looked (it starts a crashed
                # service again within a second), maybe from the old ``current``: the
                # gate waits for a process newer than the switch, so start one.
                fresh[name] = time.time()
                runit.restart(stage / name)
        case RestartService(name=name):
            fresh[name] = time.time()
            runit.restart(stage / name)
        case StopService(name=name):
            runit.down(stage / name)
            if not runit.wait_down(stage / name, ctx.supervise_timeout_s):
                result.wait = f"waiting for {name} to stop"
                return True
        case SetAutostart(name=name, on=on):
            runit.set_down_file(stage / name, not on)
        case AwaitHealth():
            result.gate = action
            result.verdict = await_health(action, ctx, lease, fresh)
            if ctx.stop is not None and ctx.stop.is_set() and not result.verdict.healthy:
                # Not a verdict: the pending note makes the next setlive gate it again.
                result.gate, result.verdict = None, None
                result.wait = f"stopped during the health gate of {action.version}"
            if result.verdict is not None and result.verdict.healthy:
                ctx.state.update(ctx.app, last_good=action.version)
            return result.wait is not None or result.verdict is None or not result.verdict.healthy
        case ClearPending():
            ctx.state.update(ctx.app, pending=None)
    return False


def start_guard(ctx: ApplyContext, action: StartGuard) -> None:
    """Leave the guard (agents/setlive/guard.py) running in its own session, from the
    code this setlive runs (the version being replaced), detached by ``setsid -f`` so it
    outlives setlive's restart and is nobody's zombie."""
    deadline = ctx.guard_deadline_s
    if deadline is None:
        deadline = 2 * ctx.health_check.deadline_s + ctx.supervise_timeout_s + 30
    token = ctx.retry_token
    argv = [
        "setsid", "-f", sys.executable, "-m", "agents.setlive.guard",
        "--app", ctx.app, "--basedir", str(ctx.layout.basedir),
        "--version", action.target, "--from", action.from_version,
        "--services", ",".join(action.services), "--self", action.self_service,
        "--stage", str(ctx.paths.stage),
        "--state-dir", str(ctx.paths.state_dir), "--deadline", f"{deadline:g}",
        "--fingerprint", action.fingerprint,
    ] + (["--retry-token", token] if token else [])  # fmt: skip
    env = {
        "PATH": os.environ.get("PATH", "/usr/sbin:/usr/bin:/sbin:/bin"),
        "PYTHONPATH": os.pathsep.join(p for p in sys.path if p),
    }
    ctx.paths.state_dir.mkdir(parents=True, exist_ok=True, mode=0o700)
    with open(ctx.paths.state_dir / f"{ctx.app}.guard.log", "ab") as out:
        subprocess.run(
            argv, stdin=subprocess.DEVNULL, stdout=out, stderr=out, env=env, cwd="/", check=True
        )
    log.info("setlive.guard_started", app=ctx.app, version=action.target, deadline_s=deadline)


def _relative_install(layout: AppLayout, version: str) -> str:
    # Relative, so the links stay right if the basedir is moved or mounted elsewhere.
    return os.path.relpath(layout.install_dir(version), layout.basedir)


def await_health(
    action: AwaitHealth, ctx: ApplyContext, lease: _Lease, fresh: dict[str, float]
) -> health.Verdict:
    """The health gate: wait until the target's services are up and its check passes,
    by the app's thresholds, or its deadline passes."""
    spec = ctx.health_check
    ctx.progress(
        f"switched to {action.version}: waiting up to {spec.deadline_s:g}s for it to be healthy",
        action.version,
    )
    first = [True]

    def liveness() -> health.Liveness:
        if first[0]:
            first[0] = False
            failpoint("during-await-health")
        states = {n: runit.status(ctx.paths.stage / n) for n in action.services}
        not_up = [
            n
            for n, s in states.items()
            if not s.up or (n in fresh and (s.started_at or 0.0) < fresh[n])
        ]
        if not_up:
            return health.Liveness(False, detail=_not_up_detail(ctx, not_up, states))
        started = max(s.started_at or 0.0 for s in states.values())
        return health.Liveness(True, started, tuple(s.pid for s in states.values()), "runit: up")

    started = time.monotonic()
    verdict = health.wait_healthy(
        ctx.check(action.version),
        liveness,
        healthy_threshold=spec.healthy_threshold,
        interval_s=spec.interval_s,
        deadline_s=spec.deadline_s,
        min_uptime_s=spec.min_uptime_s,
        keepalive=lease.keepalive,
        stop=ctx.stop,
    )
    log.log(
        logging.INFO if verdict.healthy else logging.ERROR,
        "setlive.gate",
        app=ctx.app,
        version=action.version,
        healthy=verdict.healthy,
        seconds=round(time.monotonic() - started, 3),
        output=verdict.output,
    )
    metrics.gated(ctx.app, verdict.healthy, time.monotonic() - started)
    return verdict


def _not_up_detail(
    ctx: ApplyContext, names: list[str], states: dict[str, runit.ServiceStatus]
) -> str:
    parts = []
    for name in names:
        s = states[name]
        state = s.state or ("not supervised" if not s.supervised else "starting")
        want = "" if s.want_up is None else (", want up" if s.want_up else ", want down")
        tail = log_tail(ctx.paths.log_root / name / "current")
        parts.append(f"runit: {name} {state}{want}" + (f"; log: {tail}" if tail else ""))
    return "; ".join(parts)


def log_tail(path: Path, lines: int = 2, limit: int = 4096) -> str:
    """The last lines the app wrote (svlogd's ``current``), without timestamps."""
    try:
        text = fs.read_small(path, limit, tail=True).decode("utf-8", "replace")
    except OSError:
        return ""
    tail = [ln.split(" ", 1)[-1] if ln.startswith("@") else ln for ln in text.splitlines()[-lines:]]
    return " | ".join(t.strip() for t in tail if t.strip())


# -- service directories ---------------------------------------------------------------------


def stage_service(stage: Path, spec: ServiceSpec, new: bool) -> None:
    """Write a service directory. A new one is built under a temp name with a ``down``
    file and renamed into place whole, so runsv never sees half of it."""
    target = stage / spec.name
    if new and not target.exists():
        stage.mkdir(parents=True, exist_ok=True)
        tmp = fs.temp_name(target)
        try:
            tmp.mkdir()
            runit.set_down_file(tmp, True)
            _write_files(tmp, spec)
            os.rename(tmp, target)
        except BaseException:
            shutil.rmtree(tmp, ignore_errors=True)
            raise
        return
    changed = _write_files(target, spec)
    if "log/run" in changed and runit.is_supervised(target / "log"):
        # ``restart`` of the service leaves its logger alone: restart it for the new user.
        runit.restart(target / "log")


def _write_files(service_dir: Path, spec: ServiceSpec) -> set[str]:
    """Write what differs; returns the paths that changed."""
    (service_dir / "log").mkdir(parents=True, exist_ok=True)
    env_dir = service_dir / ENV_DIR
    env_dir.mkdir(mode=0o700, exist_ok=True)
    os.chmod(env_dir, 0o700)
    changed = set()
    for rel, file in spec.files.items():
        path = service_dir / rel
        if fs.write_atomic(path, file.data, file.mode, file.gid):
            changed.add(rel)
    wanted = spec.env_dir_names
    for entry in env_dir.iterdir():
        if entry.name not in wanted:
            entry.unlink()
            changed.add(f"{ENV_DIR}/{entry.name}")
    for rel in container.FILES:  # an image version's, when a tarball version follows
        if rel not in spec.files:
            with contextlib.suppress(FileNotFoundError):
                (service_dir / rel).unlink()
                changed.add(rel)
    return changed


def retire(paths: Paths, name: str, timeout_s: float) -> None:
    """Stop a service and take it away from runit: sv down, unlink, make runsv exit,
    then remove the staged directory."""
    service_dir = paths.stage / name
    supervised = runit.is_supervised(service_dir)
    if supervised:
        with contextlib.suppress(runit.RunitError):
            runit.down(service_dir)
    runit.unlink(paths.runit_dir, name, service_dir)
    if supervised:
        with contextlib.suppress(runit.RunitError):
            runit.exit_supervisor(service_dir)
        if not runit.wait_unsupervised(service_dir, timeout_s):
            raise runit.RunitError(f"runsv for {name} did not exit within {timeout_s:g}s")
    runit.remove_service_dir(service_dir)
    log.info("setlive.retired", service=name)
