"""The setlive agent: observe, plan, apply for one app, with rollback and reports."""

from __future__ import annotations

import pwd
import threading
import time
from collections.abc import Collection
from pathlib import Path
from typing import Any

import structlog

from agents import health, metrics
from agents.runtime import Agent, Outcome
from agents.setlive.apply import DEFAULT_HEALTH_CHECK, ApplyContext, ApplyResult, apply, retire
from agents.setlive.observe import (
    Paths,
    health_of,
    observe,
    services_of,
    staged_entries,
    staged_services,
)
from agents.setlive.plan import AwaitHealth, Desired, DrainBounds, Observed, Plan, plan
from agents.setlive.state import AppState, Failure, StateDir
from agents.system import fs, runit
from agents.system.layout import AppLayout
from intent import keys
from intent.model import DeployConfig, Reality
from intent.store import AppIntent, IntentStore, StoreError

log = structlog.get_logger()

MAX_ROUNDS = 3
"""observe-plan-apply rounds per converge: the deploy, then at most a rollback."""
DRAIN_WAIT_S = 360.0
"""How long setlive waits for pp-elb-registrar to drain a load-balanced app before a
restart: the registrar's own --drain-timeout (330 s, above AWS's default
deregistration delay of 300 s) and a margin for its pass."""
DRAIN_HOLD_MARGIN_S = 60.0
REGISTRAR = "elb-registrar"
STALE_NOTE_S = 60.0
"""A temp note in the state directory this old is a crash's, not a write in progress."""


class SetliveAgent(Agent):
    name = "setlive"
    converges_in_background = True  # a long health gate must not hold up other apps

    def __init__(
        self,
        store: IntentStore,
        node: str,
        paths: Paths,
        *,
        supervise_timeout_s: float = 7.0,
        lease_ttl_s: float = 30.0,
        health_freshness_s: float = 180.0,
        stop: threading.Event | None = None,
        guard_deadline_s: float | None = None,
        drain_wait_s: float = DRAIN_WAIT_S,
    ) -> None:
        self.store = store
        self.node = node
        self.paths = paths
        self.state = StateDir(paths.state_dir)
        self.supervise_timeout_s = supervise_timeout_s
        self.lease_ttl_s = lease_ttl_s
        self.health_freshness_s = health_freshness_s
        self.stop = stop
        self.guard_deadline_s = guard_deadline_s
        self.drain_wait_s = drain_wait_s
        self._trackers: dict[str, health.HealthTracker] = {}
        self._swept: set[str] = set()
        """Apps whose basedir this process has cleared of a crash's temp links."""

    # -- runtime hooks ----------------------------------------------------------------------

    def start(self) -> None:
        """Remove what a crash left half-made (temp links, temp service directories, temp
        files in the service directories and the state directory). Nothing else in this
        process runs yet, and the setlive before it is gone; the self-deploy guard, which
        may outlive it, writes only notes in the state directory, so temps there go only
        once they are older than any write takes."""
        staged = [d for d in _subdirs(self.paths.stage) if not fs.is_temp(d)]
        inside = [sub for d in staged for sub in (d, *_subdirs(d)) if sub.name != "supervise"]
        for directory in (self.paths.runit_dir, self.paths.stage, *inside):
            fs.remove_temps(directory)
        fs.remove_temps(self.paths.state_dir, older_than_s=STALE_NOTE_S)

    def unmanaged(self, assigned: Collection[str]) -> list[str]:
        apps = set(staged_services(self.paths.stage).values()) | set(self.state.apps())
        return sorted(apps - set(assigned))

    def remove(self, app: str) -> Outcome:
        for name in services_of(self.paths.stage, app):
            try:
                retire(self.paths, name, self.supervise_timeout_s)
            except runit.RunitError as exc:
                return Outcome.converging(f"removing {name}: {exc}")
        self.state.remove(app)
        self._trackers.pop(app, None)
        return Outcome.converged()

    def converge(self, intent: AppIntent) -> Outcome:
        assert intent.config is not None and intent.deploy is not None and intent.cluster
        problem = self._intent_problem(intent.deploy)
        if problem:
            return Outcome.failed(problem)
        ctx = self._context(intent)
        if intent.app not in self._swept:
            # ``current`` and ``previous`` are renamed over from temp links: a setlive killed
            # between the two steps leaves one (this app's converges never overlap).
            fs.remove_temps(ctx.layout.basedir, ("current", "previous"))
            self._swept.add(intent.app)
        bounds = self._drain_bounds(intent.deploy)
        for _ in range(MAX_ROUNDS):
            notes = self.state.load(intent.app)
            drained_for = self._drained_for(intent.app) if notes.drain is not None else None
            desired, observed = observe(
                intent, ctx.layout, self.paths, notes, ctx.check, bounds, drained_for
            )
            the_plan = plan(desired, observed)
            result = apply(the_plan, ctx)
            gate, verdict = result.gate, result.verdict
            if gate is not None and verdict is not None and not verdict.healthy and gate.deploy:
                self._record_failure(intent, desired, gate, verdict)
                continue
            return self._outcome(intent, ctx, the_plan, result, observed)
        return Outcome.failed("internal error: no stable plan after a rollback")

    # -- the app's settings -----------------------------------------------------------------

    def _intent_problem(self, deploy: DeployConfig) -> str | None:
        try:
            pwd.getpwnam(deploy.run_as)
        except KeyError:
            return f"deploy_config.run_as: user {deploy.run_as} does not exist on {self.node}"
        hc = deploy.health_check
        if hc is not None and hc.type != "exec" and hc.port is None and not deploy.ports:
            return "deploy_config.health_check.port: not set and deploy_config.ports is empty"
        return None

    def _context(self, intent: AppIntent) -> ApplyContext:
        deploy = intent.deploy
        assert deploy is not None and intent.cluster is not None
        layout = AppLayout(Path(deploy.basedir), intent.app)

        def check(version: str) -> health.Check | None:
            return self._check(intent, layout, version)

        def progress(reason: str, version: str | None) -> None:
            drain = self._drain_details(self.state.load(intent.app))
            self.report_progress(
                intent.app, Outcome.converging(reason, version, health="unknown", **drain)
            )

        return ApplyContext(
            app=intent.app,
            cluster=intent.cluster,
            node=self.node,
            layout=layout,
            paths=self.paths,
            store=self.store,
            state=self.state,
            check=check,
            health_check=deploy.health_check or DEFAULT_HEALTH_CHECK,
            supervise_timeout_s=self.supervise_timeout_s,
            lease_ttl_s=self.lease_ttl_s,
            health_freshness_s=self.health_freshness_s,
            progress=progress,
            stop=self.stop,
            guard_deadline_s=self.guard_deadline_s,
            retry_token=intent.retry_token,
        )

    def _check(self, intent: AppIntent, layout: AppLayout, version: str) -> health.Check | None:
        assert intent.deploy is not None
        staged = staged_entries(self.paths.stage, intent.app)
        return health.app_check(intent.deploy, layout, version, self.paths.stage, staged)

    # -- the drain before a restart ---------------------------------------------------------

    def _drain_bounds(self, deploy: DeployConfig) -> DrainBounds:
        """The wait for the registrar, and how long the request then holds the node out:
        the switch, its gate and a rollback's gate."""
        gate_s = (deploy.health_check or DEFAULT_HEALTH_CHECK).deadline_s
        hold_s = 2 * (gate_s + self.supervise_timeout_s) + DRAIN_HOLD_MARGIN_S
        return DrainBounds(self.drain_wait_s, hold_s)

    def _drained_for(self, app: str) -> str | None:
        """The drain request pp-elb-registrar last acknowledged for ``app`` on this node."""
        try:
            raw = self.store.get_raw(keys.reality(self.node, REGISTRAR, app))
            report = Reality.model_validate_json(raw.value) if raw is not None else None
        except (StoreError, ValueError):
            return None  # no answer read is no answer: the deadline still bounds the wait
        token = report.details.get("drained_for") if report is not None else None
        return token if isinstance(token, str) else None

    @staticmethod
    def _drain_details(state: AppState) -> dict[str, Any]:
        return {"drain_request": state.drain.request()} if state.drain is not None else {}

    # -- failure and reports ----------------------------------------------------------------

    def _record_failure(
        self, intent: AppIntent, desired: Desired, gate: AwaitHealth, verdict: health.Verdict
    ) -> None:
        failure = Failure(
            version=gate.version,
            fingerprint=desired.fingerprint,
            rolled_back_to=gate.rollback_to,
            output=verdict.output,
            failed_at=time.time(),
            retry_token=intent.retry_token,
        )
        self.state.update(intent.app, failure=failure, pending=None)
        log.warning(
            "setlive.rollback",
            app=intent.app,
            failed=gate.version,
            to=failure.rolled_back_to,
            output=failure.output,
        )
        metrics.rolled_back(intent.app)

    def _outcome(
        self,
        intent: AppIntent,
        ctx: ApplyContext,
        the_plan: Plan,
        result: ApplyResult,
        observed: Observed,
    ) -> Outcome:
        app = intent.app
        state: AppState = self.state.load(app)
        spec = ctx.health_check
        tracker = self._trackers.setdefault(
            app, health.HealthTracker(spec.healthy_threshold, spec.unhealthy_threshold)
        )
        stage = self.paths.stage
        statuses = {n: runit.status(stage / n) for n in services_of(stage, app)}
        version = the_plan.target
        details: dict[str, Any] = {
            "runit": {n: _runit_detail(s) for n, s in statuses.items()},
            "previous": ctx.layout.version_of(ctx.layout.previous),
            "last_switch_at": state.last_switch_at,
        }
        if the_plan.rolled_back_from:
            details["rolled_back_from"] = the_plan.rolled_back_from
        details |= self._drain_details(state)
        if the_plan.undrained:
            details["undrained"] = the_plan.undrained
            log.warning("setlive.undrained", app=app, reason=the_plan.undrained)

        if result.error or result.wait:
            # Stopped part-way: what current points at now is what runs (or will).
            details["health"] = "unknown"
            now_current = ctx.layout.version_of(ctx.layout.current)
            if result.error:
                return Outcome.failed(result.error, now_current, **details)
            return Outcome.converging(result.wait or "", now_current, **details)
        if version is None:
            details["health"] = "stopped"
            if the_plan.error:
                return Outcome.failed(the_plan.error, None, **details)
            if the_plan.wait:
                return Outcome.converging(the_plan.wait, None, **details)
            return Outcome.converged(None, **details)

        verdict = result.verdict
        if verdict is not None:
            tracker.set("healthy" if verdict.healthy else "unhealthy")
            output = verdict.output
        else:
            unchanged = not the_plan.actions and observed.current == version
            if unchanged and observed.healthy is not None:
                # Nothing changed since observe checked the app: its answer stands.
                output, ok = observed.health_output or "", observed.healthy
            else:
                probe = health_of(ctx.check, version, statuses)
                output, ok = probe.output, probe.ok
            tracker.record(ok)
        details["health"] = tracker.state
        details["health_output"] = output
        if the_plan.error:
            return Outcome.failed(the_plan.error, version, **details)
        if tracker.state != "healthy":
            return Outcome.failed(f"{app} {version} is unhealthy: {output}", version, **details)
        if the_plan.wait:
            return Outcome.converging(the_plan.wait, version, **details)
        return Outcome.converged(version, **details)


def _runit_detail(status: runit.ServiceStatus) -> dict[str, Any]:
    if not status.supervised:
        return {"state": "unsupervised"}
    return {
        "state": status.state,
        "pid": status.pid,
        "up_since": round(status.started_at, 1) if status.started_at else None,
        "want": None if status.want_up is None else ("up" if status.want_up else "down"),
    }


def _subdirs(directory: Path) -> list[Path]:
    try:
        return [e for e in directory.iterdir() if e.is_dir() and not e.is_symlink()]
    except FileNotFoundError:
        return []
