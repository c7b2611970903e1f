"""setlive's decisions, as a pure function of what should be and what is.

``plan(desired, observed)`` picks the version that must run (the active one
once installed; the one rolled back to after a failed gate; the current one
while the preparer works; none when the app is stopped) and lists the steps
that make the host run it. The steps are ordered so that killing setlive after
any of them leaves a state the next ``plan`` finishes from:

    lease -> stage -> link and wait for runsv (new services) -> pending note
    -> (guard) -> previous -> current -> link -> wait for runsv -> retire old
    services -> sv up / sv restart -> autostart -> restart of setlive itself
    -> health gate

``current`` moves before any restart (runit restarting setlive itself finds
the switch already made), and a service linked for the first time carries a
``down`` file until it is started on purpose. That file lets a switch link the
new version's services and wait for runsvdir's scan while the old version still
serves, so a change of the service set costs a restart gap, not a scan.
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
class Desired:
    app: str
    version: str | None
    """The active version, or None when the app should be stopped."""
    fingerprint: str
    min_nodes: int = 0


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


# -- actions ---------------------------------------------------------------------------------


@dataclass(frozen=True)
class ClearFailure:
    """The intent changed or a retry was asked for: the failed version may be tried again."""


@dataclass(frozen=True)
class AcquireLease:
    min_nodes: int


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
    switch (its pending note cleared) in time."""

    target: str
    from_version: str
    services: tuple[str, ...]
    fingerprint: str


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

    def kinds(self) -> list[str]:
        return [type(a).__name__ for a in self.actions]


# -- the decision ----------------------------------------------------------------------------


def plan(d: Desired, o: Observed) -> Plan:
    actions: list[Action] = []
    failure = o.failure
    if failure is not None and (
        failure.fingerprint != d.fingerprint or failure.retry_token != o.retry_token
    ):
        actions.append(ClearFailure())
        failure = None

    wait = error = rolled_back_from = None
    if failure is not None:
        rolled_back_from = failure.version
        target = failure.rolled_back_to if _installed(o, failure.rolled_back_to) else None
        error = failure_message(failure, target)
    elif d.version is None:
        target = None
    elif _installed(o, d.version):
        target = d.version
    else:
        wait = f"waiting for the preparer to install {d.app} {d.version}"
        target = o.current if _installed(o, o.current) else None
        if target is None:
            return Plan(tuple(actions), None, wait=wait)

    if target is None:
        actions += _stop_all(d.app, o)
        return Plan(tuple(actions), None, wait, error, rolled_back_from)

    info = o.versions[target]
    if info.error is not None:
        return Plan(tuple(actions), o.current, wait, f"{d.app} {target}: {info.error}")
    specs = {spec.name: spec for spec in info.services}
    conflict = _conflict(d.app, specs, o)
    if conflict:
        return Plan(tuple(actions), o.current, wait, conflict)

    switching = o.current != target
    # Going back to the version whose gate last passed here (``current`` moved by hand,
    # or a switch abandoned halfway) repairs drift and deploys nothing: ``previous``
    # keeps what setlive recorded, no guard is left, and the gate decides nothing, so a
    # failing check is reported as unhealthy but neither marks that version failed nor
    # rolls back to whatever ``current`` was pointed at.
    repair = failure is None and target == d.version and target == o.last_good
    pending = o.pending if o.pending is not None and o.pending.target == target else None
    from_version = o.current if switching else (pending.from_version if pending else None)

    stage: list[Action] = []
    # Services a ``down`` file holds are linked and supervised before the switch.
    early_link: list[Action] = []
    early_supervise: list[Action] = []
    link: list[Action] = []
    supervise: list[Action] = []
    start: list[Action] = []
    restart: list[RestartService] = []
    autostart: list[Action] = []
    for name, spec in specs.items():
        obs = o.services.get(name) or ServiceObs(name)
        new = obs.staged is None
        if new or not files_match(spec.files, obs.staged or {}):
            stage.append(StageService(spec, new))
        held = switching and (new or obs.down_file)
        if obs.link != "ours":
            (early_link if held else link).append(LinkService(name))
        status = obs.status
        stale = (
            switching
            or obs.running_version not in (None, target)
            or obs.running_digest not in (None, spec.digest)
        )
        if not status.supervised:
            (early_supervise if held else supervise).append(AwaitSupervised(name))
            start.append(StartService(name))
        elif status.up and stale:
            restart.append(RestartService(name))
        elif status.want_up is False or (not status.up and stale):
            # Stopped by hand (or by us), or between two crashes of the old version
            # (runsv starts it again within a second, from the new ``current``).
            start.append(StartService(name))
        if new or obs.down_file:
            autostart.append(SetAutostart(name, True))
    retire = [
        RetireService(name)
        for name, obs in sorted(o.services.items())
        if obs.owner == d.app and name not in specs
    ]

    disruptive = bool(restart) or any(o.services[r.name].status.up for r in retire)
    if d.min_nodes > 0 and o.healthy is True and disruptive:
        actions.append(AcquireLease(d.min_nodes))
    if o.pending is not None and pending is None and not switching:
        actions.append(ClearPending())
    actions += stage
    actions += early_link
    actions += early_supervise
    if switching:
        actions.append(SavePending(target, o.current))
        own = o.self_service
        deploying = failure is None and target == d.version and not repair
        if own in specs and deploying and o.current is not None:
            services = tuple(sorted(set(specs) | {r.name for r in retire}))
            actions.append(StartGuard(target, o.current, services, d.fingerprint))
        if o.current is not None and failure is None and not repair and _installed(o, o.current):
            actions.append(SetPrevious(o.current))
        actions.append(SetCurrent(target))
    # setlive restarts (or retires) itself last: runit stops it there, and the new one
    # finishes.
    restart_self = [r for r in restart if r.name == o.self_service]
    restart_others = [r for r in restart if r not in restart_self]
    retire_self = [r for r in retire if r.name == o.self_service]
    retire_others = [r for r in retire if r not in retire_self]
    # Old services go once the new ones are supervised and ``current`` has moved, right
    # before the new ones start, not after: an app's entries get the same ports
    # (PP_PORT_*), so a new service started next to an old one would fail to bind.
    groups = (link, supervise, retire_others, start, restart_others, autostart)
    for group in (*groups, restart_self, retire_self):
        actions.extend(group)
    if start or restart or pending is not None or switching:
        deploy = (
            failure is None
            and not repair
            and target == d.version
            and (switching or pending is not None)
        )
        rollback_to = (
            from_version if from_version != target and _installed(o, from_version) else None
        )
        actions.append(AwaitHealth(target, tuple(specs), deploy, rollback_to))
        actions.append(ClearPending())
    return Plan(tuple(actions), target, wait, error, rolled_back_from)


def _installed(o: Observed, version: str | None) -> bool:
    if version is None:
        return False
    info = o.versions.get(version)
    return info is not None and info.installed


def _stop_all(app: str, o: Observed) -> list[Action]:
    actions: list[Action] = []
    for name, obs in sorted(o.services.items()):
        if obs.owner != app:
            continue
        if obs.status.supervised and (obs.status.up or obs.status.want_up):
            actions.append(StopService(name))
        if not obs.down_file:
            actions.append(SetAutostart(name, False))
    if o.pending is not None:
        actions.append(ClearPending())
    return actions


def _conflict(app: str, specs: Mapping[str, ServiceSpec], o: Observed) -> str | None:
    for name in specs:
        obs = o.services.get(name)
        if obs is None:
            continue
        if obs.staged is not None and obs.owner != app:
            owner = f"app {obs.owner}" if obs.owner else "something other than pp-setlive"
            return f"service name {name} is already taken by {owner}; rename the app or entry"
        if obs.link == "foreign":
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
