"""pp-elb-registrar as an agent of the shared runtime: one app per converge.

Per app and pass: read what the host shows (``current``, ``pp drain``, setlive's
drain request, the local health check), decide in/out/hold, describe this
instance in each load balancer once, plan, apply, report. Each app's record of
where it registered (state.py) lets ``remove`` undo it once the app is
unassigned, restarts included.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Callable, Collection, Mapping
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any, ClassVar

import structlog

from agents import health, statedir
from agents.elb_registrar import observe
from agents.elb_registrar.apply import Applied, Context, Settings, apply
from agents.elb_registrar.plan import (
    AGENT,
    Desired,
    Direction,
    Health,
    LoadBalancer,
    Local,
    Observed,
    Seen,
    Want,
    decide,
    desired_lbs,
    lb_key,
    lb_label,
    may_leave,
    needs_tags,
    peers_in_service,
    plan,
    target_of,
)
from agents.elb_registrar.state import Registration, StateDir, StateError
from agents.runtime import Agent, Outcome
from agents.system import fs
from agents.system.aws import Aws
from agents.system.imds import DEFAULT_ENDPOINT, ImdsError, instance_id
from agents.system.layout import AppLayout
from intent import keys
from intent.model import DeployConfig, Reality
from intent.store import AppIntent, IntentStore, StoreError

log = structlog.get_logger()

DEFAULT_STATE_DIR = statedir.SYSTEM_ROOT / AGENT
REMOVE_DRAIN_WAIT_S = 15.0
"""Removal runs on the runtime's loop thread: it waits this long for draining at
most, then reports ``converging`` and looks again on a later pass."""
IDENTITY_RETRY_S = 30.0
REGISTERED = ("in_service", "pending", "not_in_use")


class Identity:
    """This instance's id: ``--instance-id``, else asked of the instance metadata
    service once (a failure is remembered for a while, not asked per app)."""

    def __init__(self, fixed: str | None = None, imds_endpoint: str = DEFAULT_ENDPOINT) -> None:
        self._id = fixed
        self._endpoint = imds_endpoint
        self._error: tuple[str, float] | None = None
        self._lock = threading.Lock()

    def __call__(self) -> str:
        """The id; ImdsError with one line saying what to do when it cannot be known."""
        with self._lock:
            if self._id is not None:
                return self._id
            if self._error is not None and time.monotonic() - self._error[1] < IDENTITY_RETRY_S:
                raise ImdsError(self._error[0])
            try:
                self._id = instance_id(self._endpoint)
            except ImdsError as exc:
                message = (
                    f"cannot learn this instance's id: {exc}; run on EC2 with IMDSv2 reachable "
                    "or pass --instance-id"
                )
                self._error = (message, time.monotonic())
                raise ImdsError(message) from None
            log.info("elb.instance", instance=self._id)
            return self._id


@dataclass
class _Tracked:
    version: str
    thresholds: tuple[int, int]
    tracker: health.HealthTracker


class ElbRegistrar(Agent):
    name: ClassVar[str] = AGENT
    converges_in_background = True  # waiting for InService or a drain takes minutes
    watched_reports: ClassVar[tuple[str, ...]] = ("setlive",)
    """setlive asks for a drain in its report before it stops or restarts an app."""

    def __init__(
        self,
        store: IntentStore,
        node: str,
        aws: Aws,
        identity: Callable[[], str],
        *,
        state_dir: Path = DEFAULT_STATE_DIR,
        settings: Settings | None = None,
        stage: Path = Path("/etc/platypus/service-stage"),
        stop: threading.Event | None = None,
        peer_freshness_s: float = 180.0,
        lease_ttl_s: float = 60.0,
    ) -> None:
        self.store = store
        self.node = node
        self.aws = aws
        self.identity = identity
        self.state = StateDir(state_dir)
        self.settings = settings or Settings()
        self.stage = stage
        self.stop = stop if stop is not None else threading.Event()
        self.peer_freshness_s = peer_freshness_s
        self.lease_ttl_s = lease_ttl_s
        self._lock = threading.Lock()
        """Guards the dictionaries below: apps converge on several threads."""
        self._trackers: dict[str, _Tracked] = {}
        self._owned: set[str] = set()
        """Load balancers whose ownership tags this agent has read (and found fine)."""
        self._seen: dict[str, dict[str, Seen]] = {}
        self._described_at: dict[str, float] = {}
        """When AWS was last asked about each app (monotonic)."""
        self._transitions: dict[str, dict[str, tuple[str, float]]] = {}

    # -- the runtime's hooks ----------------------------------------------------------------

    def start(self) -> None:
        """Remove the temp files a kill left in the state directory (nothing in this
        process writes there yet, and the registrar before it is gone)."""
        fs.remove_temps(self.state.path)

    def report_input(self, report: Reality) -> object:
        """A drain request, and a rollback (the version rolled back to serves here)."""
        rolled_back = report.details.get("rolled_back_from")
        return report.details.get("drain_request"), rolled_back and report.version

    def converge(self, intent: AppIntent) -> Outcome:
        """One app's pass, and when to look again though nothing changes: a live drain
        request when it expires, a registered app's health every ``health_recheck_s``."""
        setlive = self._setlive_says(intent.app)
        outcome = self._converge(intent, setlive)
        if (request := setlive.drain) is not None:
            return outcome.recheck_after(max(0.0, request.until - time.time()))
        spec = intent.deploy.health_check if intent.deploy is not None else None
        if outcome.details.get("want") == "in" and spec is not None:
            return outcome.recheck_after(max(spec.interval_s, self.settings.health_recheck_s))
        return outcome

    def _converge(self, intent: AppIntent, setlive: observe.SetliveSays) -> Outcome:
        assert intent.config is not None and intent.deploy is not None and intent.cluster
        app, deploy, cluster = intent.app, intent.deploy, intent.cluster
        try:
            recorded = self.state.load(app)
        except StateError as exc:
            return Outcome.failed(str(exc))
        wanted = desired_lbs(deploy.elb)
        layout = AppLayout(Path(deploy.basedir), app)
        current = layout.version_of(layout.current)
        if not wanted and not recorded:
            return Outcome.converged(current, **self._details(app, cluster, []))
        local = Local(
            active=intent.config.active_version,
            current=current,
            drained=intent.drained,
            drain_token=setlive.drain.token if setlive.drain is not None else None,
            rolled_back_to=setlive.rolled_back_to,
        )
        if wanted and current is not None and current == local.serves and not _out(local):
            # The check decides only when nothing else does, and only on the version that
            # should serve (the active one, or the one setlive rolled back to).
            try:
                check = health.app_check(deploy, layout, current, self.stage)
            except ValueError as exc:
                return Outcome.failed(str(exc), current)
            registered_before = any(key in recorded for key in wanted)
            state, output = self._health(app, deploy, current, check, registered_before)
            local = replace(local, health=state, health_output=output)
        want = decide(local)
        desired = Desired(app, cluster, tuple(wanted.values()), want)
        stale = set(recorded) - set(wanted)
        if want.direction == "hold" and not stale:
            # Nothing to change in AWS: no call at all while setlive has yet to switch.
            last = {key: self._last_seen(app, key) for key in wanted}
            lbs = [self._lb_report(app, lb, "hold", last[k], recorded) for k, lb in wanted.items()]
            details = self._details(app, cluster, lbs, local, want, _in_service(wanted, last))
            return Outcome.converging(want.reason, current, **details)
        if want.direction == "in" and not stale and self._in_service_lately(app, wanted):
            # A re-check that changes nothing here: AWS said in service moments ago.
            last = {key: self._last_seen(app, key) for key in wanted}
            lbs = [self._lb_report(app, lb, "in", last[k], recorded) for k, lb in wanted.items()]
            return Outcome.converged(current, **self._details(app, cluster, lbs, local, want, True))
        try:
            instance = self.identity()
        except ImdsError as exc:
            return Outcome.failed(str(exc), current)
        return self._reconcile(desired, local, recorded, instance, intent)

    def unmanaged(self, assigned: Collection[str]) -> list[str]:
        return [app for app in self.state.apps() if app not in set(assigned)]

    def remove(self, app: str) -> Outcome:
        """Take the instance out of every load balancer the app's record lists."""
        try:
            recorded = self.state.load(app)
        except StateError as exc:
            return Outcome.failed(str(exc))
        if recorded:
            try:
                instance = self.identity()
            except ImdsError as exc:
                return Outcome.failed(str(exc))
            desired = Desired(app, "", (), Want("out", "unassigned from this node"))
            lbs = {key: r.lb for key, r in recorded.items()}
            seen = observe.describe(self.aws, lbs, instance)
            decided = plan(desired, Observed(seen, lbs))
            done = apply(decided, self._context(app, instance), REMOVE_DRAIN_WAIT_S)
            problems = {**decided.errors, **done.errors}
            if problems:
                return Outcome.failed("; ".join(problems[k] for k in sorted(problems)))
            if done.draining or done.stopped:
                return Outcome.converging(_draining(done, lbs))
        with self._lock:
            self._trackers.pop(app, None)
            self._seen.pop(app, None)
            self._described_at.pop(app, None)
            self._transitions.pop(app, None)
        return Outcome.converged()

    # -- one app ----------------------------------------------------------------------------

    def _reconcile(
        self,
        desired: Desired,
        local: Local,
        recorded: Mapping[str, Registration],
        instance: str,
        intent: AppIntent,
    ) -> Outcome:
        app, cluster = desired.app, desired.cluster
        everything = {**{k: r.lb for k, r in recorded.items()}, **desired_lbs(desired.lbs)}
        observable = {k: lb for k, lb in everything.items() if target_of(desired, k) != "hold"}
        seen = observe.describe(self.aws, observable, instance)
        with self._lock:
            self._described_at[app] = time.monotonic()
        for key, lb in observable.items():
            target, found = target_of(desired, key), seen[key]
            if needs_tags(target, found.phase, key in self._owned):
                seen[key] = observe.with_tags(self.aws, lb, found)

        blocked = None
        if desired.want.health_based:
            blocked = self._hold_for_min_nodes(intent, desired, seen, local)
            if blocked is not None:
                desired = replace(desired, want=Want("hold", blocked))

        observed = Observed(seen, {k: r.lb for k, r in recorded.items()})
        decided = plan(desired, observed)
        done = apply(decided, self._context(app, instance))
        final = {**seen, **done.seen}
        self._remember(app, final, done, recorded)
        with self._lock:
            for key in done.tagged | {k for k, s in seen.items() if s.tags is not None}:
                if key not in decided.errors:
                    self._owned.add(key)

        lbs = [
            self._lb_report(app, lb, decided.targets.get(key, "hold"), final.get(key), recorded,
                            decided.errors.get(key) or done.errors.get(key))
            for key, lb in sorted(everything.items())
        ]  # fmt: skip
        in_service = _in_service(desired_lbs(desired.lbs), final)
        details = self._details(app, cluster, lbs, local, desired.want, in_service)
        out = all(_gone(final.get(k)) for k in everything)
        if local.drain_token is not None and desired.want.direction == "out" and out:
            details["drained_for"] = local.drain_token
        problems = {**decided.errors, **done.errors}
        version = local.current
        if blocked is not None:
            return Outcome.failed(blocked, version, **details)
        if problems:
            return Outcome.failed(
                "; ".join(problems[k] for k in sorted(problems)), version, **details
            )
        if done.draining or done.stopped:
            return Outcome.converging(_draining(done, everything), version, **details)
        if desired.want.health_based:
            return Outcome.failed(
                f"{desired.want.reason}; out of its load balancers", version, **details
            )
        if desired.want.direction == "hold":
            return Outcome.converging(desired.want.reason, version, **details)
        return Outcome.converged(version, **details)

    def _health(
        self,
        app: str,
        deploy: DeployConfig,
        version: str,
        check: health.Check | None,
        registered_before: bool,
    ) -> tuple[Health, str]:
        spec = deploy.health_check
        if check is None or spec is None:
            return "unchecked", "no health check"
        thresholds = (spec.healthy_threshold, spec.unhealthy_threshold)
        with self._lock:
            tracked = self._trackers.get(app)
            if tracked is None or (tracked.version, tracked.thresholds) != (
                version,
                thresholds,
            ):
                tracked = _Tracked(version, thresholds, health.HealthTracker(*thresholds))
                self._trackers[app] = tracked
        tracker = tracked.tracker
        # Already in (by this agent, before a restart or a switch): only failures in a
        # row take it out. Not in yet: it must pass healthy_threshold checks first.
        trusted = tracker.state == "healthy" or (tracker.state == "unknown" and registered_before)
        return observe.local_health(check, spec, tracker, trusted=trusted, stop=self.stop)

    def _hold_for_min_nodes(
        self, intent: AppIntent, desired: Desired, seen: Mapping[str, Seen], local: Local
    ) -> str | None:
        """Why an unhealthy node stays in its load balancers (``min_nodes``), or None
        when it may leave. With ``min_nodes`` set, nodes decide one at a time under a
        lease, and a leaving node says so in its report before the next one counts."""
        assert intent.config is not None
        min_nodes = intent.config.min_nodes
        if min_nodes == 0:
            return None
        app, cluster = desired.app, desired.cluster
        here = _in_service(desired_lbs(desired.lbs), seen)
        if not here:
            return None
        resource = f"{AGENT}/{app}/{cluster}"
        kept = f"{desired.want.reason}; kept in its load balancers"
        try:
            nodes = [n for n, c in self.store.nodes_of(app).items() if c == cluster]
            reports = self.store.reality(app=app)
            peers = peers_in_service(reports, nodes, self.node, time.time(), self.peer_freshness_s)
            if not may_leave(here, peers, min_nodes):
                in_service = f"{peers + 1} node(s) of {app}/{cluster} in service"
                return f"{kept}: {in_service}, min_nodes {min_nodes}"
            limit = peers + 1 - min_nodes
            if not self.store.acquire_lease(resource, self.node, limit, self.lease_ttl_s):
                holders = ", ".join(self.store.lease_holders(resource)) or "?"
                return f"{kept}: another node is leaving ({holders})"
            try:
                self.store.write_reality(
                    Reality(
                        node=self.node,
                        agent=self.name,
                        app=app,
                        status="converging",
                        version=local.current,
                        error=f"leaving the load balancers: {desired.want.reason}",
                        details={"cluster": cluster, "in_service": False},
                    )
                )
            finally:
                self.store.release_lease(resource, self.node)
        except StoreError as exc:
            return f"{kept}: the store cannot say how many nodes are in service ({exc})"
        return None

    def _setlive_says(self, app: str) -> observe.SetliveSays:
        try:
            raw = self.store.get_raw(keys.reality(self.node, "setlive", app))
        except StoreError:
            return observe.SetliveSays()
        return observe.setlive_says(raw.value if raw is not None else None, time.time())

    def _in_service_lately(self, app: str, wanted: Mapping[str, LoadBalancer]) -> bool:
        """Whether AWS said, less than ``describe_every_s`` ago, that this instance is in
        service in every load balancer ``wanted`` names."""
        with self._lock:
            at = self._described_at.get(app)
            seen = dict(self._seen.get(app, {}))
        if at is None or time.monotonic() - at >= self.settings.describe_every_s:
            return False
        return _in_service(wanted, seen)

    def _context(self, app: str, instance: str) -> Context:
        return Context(app, self.aws, instance, self.state, self.stop, self.settings)

    # -- reports ----------------------------------------------------------------------------

    def _remember(
        self,
        app: str,
        final: Mapping[str, Seen],
        done: Applied,
        recorded: Mapping[str, Registration],
    ) -> None:
        with self._lock:
            self._seen.setdefault(app, {}).update(final)
            transitions = self._transitions.setdefault(app, {})
            for key, registration in recorded.items():
                transitions.setdefault(key, ("registered", registration.registered_at))
            transitions.update(done.transitions)

    def _last_seen(self, app: str, key: str) -> Seen | None:
        with self._lock:
            return self._seen.get(app, {}).get(key)

    def _lb_report(
        self,
        app: str,
        lb: LoadBalancer,
        target: Direction,
        seen: Seen | None,
        recorded: Mapping[str, Registration],
        error: str | None = None,
    ) -> dict[str, Any]:
        key = lb_key(lb)
        with self._lock:
            transition = self._transitions.get(app, {}).get(key)
        if transition is None and key in recorded:
            transition = ("registered", recorded[key].registered_at)
        phase = seen.phase if seen is not None else None
        report: dict[str, Any] = {
            "id": key,
            "type": lb.type,
            "region": lb.region,
            "target": target,
            "registered": None if phase is None else phase in REGISTERED,
            "state": seen.state if seen is not None else None,
            "reason": seen.reason if seen is not None else None,
            "description": seen.description if seen is not None else None,
            "last_transition": transition[0] if transition else None,
            "last_transition_at": round(transition[1], 3) if transition else None,
        }
        report |= {"name": lb.name} if lb.type == "classic" else {"arn": lb.arn, "port": lb.port}
        if error is not None:
            report["error"] = error
        return report

    def _details(
        self,
        app: str,
        cluster: str,
        lbs: list[dict[str, Any]],
        local: Local | None = None,
        want: Want | None = None,
        in_service: bool = False,
    ) -> dict[str, Any]:
        details: dict[str, Any] = {
            "cluster": cluster,
            "in_service": in_service,
            "load_balancers": lbs,
        }
        if want is not None:
            details |= {"want": want.direction, "why": want.reason}
        if local is not None:
            details |= {"health": local.health, "health_output": local.health_output}
        return details


def _in_service(lbs: Collection[str], seen: Mapping[str, Seen | None]) -> bool:
    """In service in every load balancer the app names: what peers count for min_nodes
    (after a restart, until AWS is asked again: no)."""
    return bool(lbs) and all(
        (s := seen.get(k)) is not None and s.phase == "in_service" for k in lbs
    )


def _gone(seen: Seen | None) -> bool:
    return seen is not None and (seen.phase == "not_registered" or seen.missing)


def _out(local: Local) -> bool:
    return decide(local).direction == "out"


def _draining(done: Applied, lbs: Mapping[str, LoadBalancer]) -> str:
    if done.stopped and not done.draining:
        return "stopped before finishing; the next pass carries on"
    names = ", ".join(lb_label(lbs[k]) for k in sorted(done.draining) if k in lbs)
    return f"still draining from {names}"
