"""setlive's decisions, as a pure function of what should be and what is.

``plan(desired, observed)`` picks the version that must run (the active one
once installed; the one rolled back to after a failed gate; the current one
while the preparer works; none when the app is stopped) and lists the steps
that make the host run it. The steps are ordered so that killing setlive after
any of them leaves a state the next ``plan`` finishes from:

    lease -> drain (load-balanced apps) -> stage -> link and wait for runsv
    (new services) -> pending note
    -> (guard) -> previous -> current -> link -> wait for runsv -> retire old
    services -> sv up / sv restart -> autostart -> restart of setlive itself
    -> health gate

``current`` moves before any restart (runit restarting setlive itself finds
the switch already made), and a service linked for the first time carries a
``down`` file until it is started on purpose. That file lets a switch link the
new version's services and wait for runsvdir's scan while the old version still
serves, so a change of the service set costs a restart gap, not a scan.

An app behind load balancers (``deploy_config.elb``) is drained before anything
stops or restarts it: setlive asks in its own report (``drain_request``), and
goes on once pp-elb-registrar acknowledges it (``drained_for`` in the
registrar's report) or the wait's deadline passes with no answer. The request
stays in the report until the new version's gate has passed, so the registrar
puts the node back only then. The wait is a plan that stops at ``AwaitDrain``
and is looked at again, never a sleep.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from typing import Any

from agents.setlive.services import FileSpec, ServiceSpec
from agents.setlive.state import Failure, Pending
from agents.system.runit import ServiceStatus
from intent.model import DeployConfig, Reality

# -- inputs ----------------------------------------------------------------------------------


@dataclass(frozen=True)
class DrainBounds:
    """How long a drain before a restart may take, for an app behind load balancers."""

    wait_s: float
    """How long to wait for pp-elb-registrar's acknowledgement before going on anyway."""
    hold_s: float
    """How long past that the request keeps the node out: the switch and its gate (a
    setlive that dies meanwhile cannot keep the node out for ever)."""


@dataclass(frozen=True)
class Desired:
    app: str
    version: str | None
    """The active version, or None when the app should be stopped."""
    fingerprint: str
    min_nodes: int = 0
    drain: DrainBounds | None = None
    """Set when the app is behind load balancers: drain before stopping or restarting."""


@dataclass(frozen=True)
class VersionInfo:
    installed: bool
    services: tuple[ServiceSpec, ...] = ()
    error: str | None = None
    """Why this install cannot run (no ``bin/launch``), when it cannot."""


@dataclass(frozen=True)
class ServiceObs:
    name: str
    owner: str | None = None
    """The app named in the staged ``pp-service.json``; None when not staged or not ours."""
    staged: Mapping[str, FileSpec] | None = None
    """The managed files as found; None when there is no staged directory."""
    down_file: bool = False
    link: str | None = None
    """"ours" (points at our staged directory), "foreign" (something else) or None."""
    status: ServiceStatus = field(default_factory=lambda: ServiceStatus(supervised=False))
    running_version: str | None = None
    running_digest: str | None = None
    """From the running process's environment; None when unknown."""


@dataclass(frozen=True)
class DrainSeen:
    """setlive's own drain request for the app, and the registrar's answer to it."""

    token: str
    acknowledged: bool
    """pp-elb-registrar reports ``drained_for`` this token: the node is out and drained."""
    expired: bool
    """The wait's deadline has passed."""


@dataclass(frozen=True)
class Observed:
    current: str | None
    previous: str | None = None
    versions: Mapping[str, VersionInfo] = field(default_factory=dict)
    services: Mapping[str, ServiceObs] = field(default_factory=dict)
    pending: Pending | None = None
    failure: Failure | None = None
    retry_token: str | None = None
    healthy: bool | None = None
    """The running app's health right now (None: not running or not checked)."""
    health_output: str | None = None
    """What that check said (for the report of a pass that changes nothing)."""
    self_service: str | None = None
    """The service of this app that this very setlive runs as (the agent bundle)."""
    last_good: str | None = None
    """The version whose health gate last passed here (setlive's own note)."""
    drain: DrainSeen | None = None


# -- actions ---------------------------------------------------------------------------------


@dataclass(frozen=True)
class ClearFailure:
    """The intent changed or a retry was asked for: the failed version may be tried again."""


@dataclass(frozen=True)
class AcquireLease:
    min_nodes: int


@dataclass(frozen=True)
class RequestDrain:
    """Ask pp-elb-registrar, in setlive's report, to take the node out of the app's load
    balancers; then wait for its answer (a new pass looks), up to ``bounds.wait_s``."""

    bounds: DrainBounds


@dataclass(frozen=True)
class AwaitDrain:
    """The registrar has not answered yet and the deadline is ahead: stop here."""

    token: str


@dataclass(frozen=True)
class ClearDrain:
    """Withdraw the drain request: the switch is over (or moot), the node may go back."""


@dataclass(frozen=True)
class RetireService:
    """Stop, unlink and remove a service the running version no longer has."""

    name: str


@dataclass(frozen=True)
class StageService:
    spec: ServiceSpec
    new: bool
    """A new directory is created with a ``down`` file so runsv waits for us."""


@dataclass(frozen=True)
class SavePending:
    target: str
    from_version: str | None


@dataclass(frozen=True)
class StartGuard:
    """Before setlive switches the bundle it runs from: a detached process that rolls
    ``current`` back and restarts ``services`` unless the new setlive finishes the
    switch (its pending note cleared) in time, and at once if ``self_service`` (the
    service that runs setlive) keeps exiting."""

    target: str
    from_version: str
    services: tuple[str, ...]
    fingerprint: str
    self_service: str


@dataclass(frozen=True)
class SetPrevious:
    version: str


@dataclass(frozen=True)
class SetCurrent:
    version: str


@dataclass(frozen=True)
class LinkService:
    name: str


@dataclass(frozen=True)
class AwaitSupervised:
    name: str


@dataclass(frozen=True)
class StartService:
    name: str


@dataclass(frozen=True)
class RestartService:
    name: str


@dataclass(frozen=True)
class StopService:
    name: str


@dataclass(frozen=True)
class SetAutostart:
    name: str
    on: bool


@dataclass(frozen=True)
class AwaitHealth:
    version: str
    services: tuple[str, ...]
    deploy: bool
    """True when this gate decides a deploy: failing it marks the version failed."""
    rollback_to: str | None = None


@dataclass(frozen=True)
class ClearPending:
    pass


Action = (
    ClearFailure
    | AcquireLease
    | RequestDrain
    | AwaitDrain
    | ClearDrain
    | RetireService
    | StageService
    | SavePending
    | StartGuard
    | SetPrevious
    | SetCurrent
    | LinkService
    | AwaitSupervised
    | StartService
    | RestartService
    | StopService
    | SetAutostart
    | AwaitHealth
    | ClearPending
)


@dataclass(frozen=True)
class Plan:
    actions: tuple[Action, ...]
    target: str | None
    """The version that runs once the actions are done (None: the app is stopped)."""
    wait: str | None = None
    """Why the app cannot converge yet, though nothing is wrong (reported as converging)."""
    error: str | None = None
    rolled_back_from: str | None = None
    undrained: str | None = None
    """Why this switch goes on with the node still in its load balancers, when it does."""

    def kinds(self) -> list[str]:
        return [type(a).__name__ for a in self.actions]


# -- the decision ----------------------------------------------------------------------------


def plan(desired: Desired, observed: Observed) -> Plan:
    """The steps from what runs to what must run, in the crash-safe order above.

    Pick the version to run (``_target``); when there is none, stop the app
    (``_stop``). Otherwise stage its services (``_ServiceSteps``), switch
    ``current`` when it moves (``_switch``), start, restart and retire services
    (``_start``), and gate the result (``_gate``)."""
    actions: list[Action] = []
    failure = observed.failure
    if failure is not None and (
        failure.fingerprint != desired.fingerprint or failure.retry_token != observed.retry_token
    ):
        actions.append(ClearFailure())
        failure = None

    target = _target(desired, observed, failure)
    version = target.version
    if version is None:
        undrained = None
        if not target.hold:
            stops = _stop(desired.app, observed)
            drain, undrained = _drain(
                desired, observed, any(isinstance(a, StopService) for a in stops)
            )
            actions += drain + stops
            if observed.drain is not None and not drain:
                actions.append(ClearDrain())
        return Plan(
            tuple(actions), None, target.wait, target.error, target.rolled_back_from, undrained
        )

    info = observed.versions[version]
    if info.error is not None:
        error = f"{desired.app} {version}: {info.error}"
        return Plan(tuple(actions), observed.current, target.wait, error)
    specs = {spec.name: spec for spec in info.services}
    conflict = _conflict(desired.app, specs, observed)
    if conflict:
        return Plan(tuple(actions), observed.current, target.wait, conflict)

    move = _Move.toward(version, desired, observed, failure)
    services = _ServiceSteps.for_specs(specs, observed, move)
    retire = [
        RetireService(name)
        for name, service in sorted(observed.services.items())
        if service.owner == desired.app and name not in specs
    ]
    disruptive = bool(services.restart) or any(observed.services[r.name].status.up for r in retire)
    if desired.min_nodes > 0 and observed.healthy is True and disruptive:
        actions.append(AcquireLease(desired.min_nodes))
    if observed.pending is not None and move.pending is None and not move.switching:
        actions.append(ClearPending())  # a note of a switch to another version, now moot
    drain, undrained = _drain(desired, observed, disruptive)
    actions += drain
    actions += services.stage
    actions += services.link_before_switch
    actions += services.supervise_before_switch
    if move.switching:
        actions += _switch(move, desired, observed, specs, retire)
    actions += _start(services, retire, observed.self_service)
    gated = bool(services.start or services.restart or move.pending is not None or move.switching)
    if gated:
        actions += _gate(move, observed, specs)
    if observed.drain is not None and not drain and (gated or not disruptive):
        actions.append(ClearDrain())  # after the gate: only then may the node go back
    return Plan(
        tuple(actions), version, target.wait, target.error, target.rolled_back_from, undrained
    )


def _drain(
    desired: Desired, observed: Observed, disruptive: bool
) -> tuple[list[Action], str | None]:
    """The drain a stop or restart of a load-balanced app waits for, and why it goes on
    undrained when the registrar never answered."""
    if desired.drain is None or not disruptive:
        return [], None
    seen = observed.drain
    if seen is None:
        return [RequestDrain(desired.drain)], None
    if seen.acknowledged:
        return [], None
    if seen.expired:
        return [], (
            f"pp-elb-registrar did not acknowledge the drain request within "
            f"{desired.drain.wait_s:g}s (is it running on this node?): going on without it"
        )
    return [AwaitDrain(seen.token)], None


@dataclass(frozen=True)
class _Target:
    """The version that must run (None: none) and why it is that one."""

    version: str | None
    wait: str | None = None
    error: str | None = None
    rolled_back_from: str | None = None
    hold: bool = False
    """Nothing to run while the preparer installs the first version: touch nothing."""


def _target(desired: Desired, observed: Observed, failure: Failure | None) -> _Target:
    """The active version once installed; the one rolled back to after a failed gate;
    the current one while the preparer works; none when the app is stopped."""
    if failure is not None:
        rolled_back_to = failure.rolled_back_to
        version = rolled_back_to if _installed(observed, rolled_back_to) else None
        return _Target(version, None, failure_message(failure, version), failure.version)
    if desired.version is None:
        return _Target(None)
    if _installed(observed, desired.version):
        return _Target(desired.version)
    wait = f"waiting for the preparer to install {desired.app} {desired.version}"
    if _installed(observed, observed.current):
        return _Target(observed.current, wait)
    return _Target(None, wait, hold=True)


@dataclass(frozen=True)
class _Move:
    """What running ``target`` takes: a switch of ``current`` or not, and whether it
    deploys the intent's version (as opposed to a rollback or a repair of drift)."""

    target: str
    switching: bool
    deploying: bool
    pending: Pending | None
    """setlive's note of a switch to ``target`` whose gate has not passed yet."""
    from_version: str | None
    """What runs (or ran, before the noted switch) when this move began."""

    @classmethod
    def toward(
        cls, target: str, desired: Desired, observed: Observed, failure: Failure | None
    ) -> _Move:
        switching = observed.current != target
        # Going back to the version whose gate last passed here (``current`` moved by
        # hand, or a switch abandoned halfway) repairs drift and deploys nothing:
        # ``previous`` keeps what setlive recorded, no guard is left, and the gate
        # decides nothing, so a failing check is reported as unhealthy but neither
        # marks that version failed nor rolls back to whatever ``current`` was
        # pointed at.
        repair = failure is None and target == desired.version and target == observed.last_good
        noted = observed.pending
        pending = noted if noted is not None and noted.target == target else None
        resumed = pending.from_version if pending is not None else None
        from_version = observed.current if switching else resumed
        deploying = failure is None and target == desired.version and not repair
        return cls(target, switching, deploying, pending, from_version)


@dataclass
class _ServiceSteps:
    """The steps for each service of the target version, by the group they run in."""

    stage: list[Action] = field(default_factory=list)
    link_before_switch: list[Action] = field(default_factory=list)
    supervise_before_switch: list[Action] = field(default_factory=list)
    """Services a ``down`` file holds are linked and supervised before the switch."""
    link: list[Action] = field(default_factory=list)
    supervise: list[Action] = field(default_factory=list)
    start: list[Action] = field(default_factory=list)
    restart: list[RestartService] = field(default_factory=list)
    autostart: list[Action] = field(default_factory=list)

    @classmethod
    def for_specs(
        cls, specs: Mapping[str, ServiceSpec], observed: Observed, move: _Move
    ) -> _ServiceSteps:
        steps = cls()
        for name, spec in specs.items():
            service = observed.services.get(name) or ServiceObs(name)
            new = service.staged is None
            if new or not files_match(spec.files, service.staged or {}):
                steps.stage.append(StageService(spec, new))
            held = move.switching and (new or service.down_file)
            if service.link != "ours":
                (steps.link_before_switch if held else steps.link).append(LinkService(name))
            status = service.status
            stale = (
                move.switching
                or service.running_version not in (None, move.target)
                or service.running_digest not in (None, spec.digest)
            )
            if not status.supervised:
                supervise = steps.supervise_before_switch if held else steps.supervise
                supervise.append(AwaitSupervised(name))
                steps.start.append(StartService(name))
            elif status.up and stale:
                steps.restart.append(RestartService(name))
            elif status.want_up is False or (not status.up and stale):
                # Stopped by hand (or by us), or between two crashes of the old version
                # (runsv starts it again within a second, from the new ``current``).
                steps.start.append(StartService(name))
            if new or service.down_file:
                steps.autostart.append(SetAutostart(name, True))
        return steps


def _switch(
    move: _Move,
    desired: Desired,
    observed: Observed,
    specs: Mapping[str, ServiceSpec],
    retire: list[RetireService],
) -> list[Action]:
    """Note the switch, leave a guard when setlive switches its own bundle, then move
    ``previous`` and ``current``."""
    current = observed.current
    steps: list[Action] = [SavePending(move.target, current)]
    self_service = observed.self_service or ""
    if self_service in specs and move.deploying and current is not None:
        services = tuple(sorted(set(specs) | {r.name for r in retire}))
        steps.append(StartGuard(move.target, current, services, desired.fingerprint, self_service))
    if current is not None and move.deploying and _installed(observed, current):
        steps.append(SetPrevious(current))
    steps.append(SetCurrent(move.target))
    return steps


def _start(
    services: _ServiceSteps, retire: list[RetireService], self_service: str | None
) -> list[Action]:
    """Link, supervise, retire, start and restart, with setlive's own service last:
    runit stops setlive there, and the new one finishes."""
    restart_self = [r for r in services.restart if r.name == self_service]
    restart_others = [r for r in services.restart if r not in restart_self]
    retire_self = [r for r in retire if r.name == self_service]
    retire_others = [r for r in retire if r not in retire_self]
    # Old services go once the new ones are supervised and ``current`` has moved, right
    # before the new ones start, not after: an app's entries get the same ports
    # (PP_PORT_*), so a new service started next to an old one would fail to bind.
    return [
        *services.link,
        *services.supervise,
        *retire_others,
        *services.start,
        *restart_others,
        *services.autostart,
        *restart_self,
        *retire_self,
    ]


def _gate(move: _Move, observed: Observed, specs: Mapping[str, ServiceSpec]) -> list[Action]:
    """Wait for the target's health, then forget the switch. Only a deploy's gate can
    fail a version; it rolls back to what ran before, when that is still installed."""
    deploy = move.deploying and (move.switching or move.pending is not None)
    from_version = move.from_version
    rollback_to = (
        from_version if from_version != move.target and _installed(observed, from_version) else None
    )
    return [AwaitHealth(move.target, tuple(specs), deploy, rollback_to), ClearPending()]


def _installed(observed: Observed, version: str | None) -> bool:
    if version is None:
        return False
    info = observed.versions.get(version)
    return info is not None and info.installed


def _stop(app: str, observed: Observed) -> list[Action]:
    """Stop every service of the app and keep runsv from starting it on its own."""
    actions: list[Action] = []
    for name, service in sorted(observed.services.items()):
        if service.owner != app:
            continue
        if service.status.supervised and (service.status.up or service.status.want_up):
            actions.append(StopService(name))
        if not service.down_file:
            actions.append(SetAutostart(name, False))
    if observed.pending is not None:
        actions.append(ClearPending())
    return actions


def _conflict(app: str, specs: Mapping[str, ServiceSpec], observed: Observed) -> str | None:
    for name in specs:
        service = observed.services.get(name)
        if service is None:
            continue
        if service.staged is not None and service.owner != app:
            owner = f"app {service.owner}" if service.owner else "something other than pp-setlive"
            return f"service name {name} is already taken by {owner}; rename the app or entry"
        if service.link == "foreign":
            return f"runit service {name} exists and is not managed by pp-setlive; remove it"
    return None


def files_match(desired: Mapping[str, FileSpec], staged: Mapping[str, FileSpec]) -> bool:
    if desired.keys() != staged.keys():
        return False
    for path, want in desired.items():
        have = staged[path]
        if want.data != have.data or want.mode != have.mode:
            return False
        if want.gid is not None and want.gid != have.gid:
            return False
    return True


def failure_message(failure: Failure, running: str | None) -> str:
    after = f"rolled back to {running}" if running else "nothing to roll back to, stopped"
    return (
        f"{failure.version} failed its health gate ({failure.output}); {after}; "
        f"change the intent or run `pp retry` to try it again"
    )


# -- helpers the agent needs, kept pure for testing --------------------------------------------


def fingerprint(
    version: str | None, sha256: str | None, deploy: DeployConfig, user_config: Mapping[str, Any]
) -> str:
    """What a failed deploy depends on: a change here is worth another attempt; a change
    to anything else (``min_nodes``, other versions' states) is not."""
    data = {
        "version": version,
        "sha256": sha256,
        "deploy": deploy.model_dump(mode="json"),
        "user_config": user_config,
    }
    return hashlib.sha256(json.dumps(data, sort_keys=True).encode()).hexdigest()[:16]


def healthy_peers(
    reports: Iterable[Reality],
    cluster_nodes: Iterable[str],
    self_node: str,
    now: float,
    freshness_s: float,
) -> int:
    """Other nodes of the app/cluster whose setlive recently reported the app healthy.

    Health, not status, is what counts: a node that rolled back (status error) but
    serves the previous version is serving; one in the middle of a switch reports
    its health as unknown."""
    nodes = set(cluster_nodes) - {self_node}
    return sum(
        1
        for r in reports
        if r.node in nodes
        and r.details.get("health") == "healthy"
        and now - r.updated_at <= freshness_s
    )


def lease_limit(healthy_nodes: int, min_nodes: int) -> int:
    """How many nodes may restart at once and still leave ``min_nodes`` healthy."""
    return healthy_nodes - min_nodes
