"""What the registrar should do for one app: pure functions of plain data, no I/O.

Two decisions, made in order:

1. ``decide``: from what the host shows (the active version, what ``current``
   runs, ``pp drain``, a drain request from setlive, the local health check),
   whether this node belongs *in* the app's load balancers, *out* of them, or
   should *hold* what AWS has while it waits (the active version does not run
   here yet: setlive has not switched, or it rolled back).
2. ``plan``: from that, each load balancer's state as AWS reports it and the
   state file's record of what this agent registered, the typed actions that
   make AWS agree. A load balancer the record lists but ``deploy_config.elb`` no
   longer names is taken *out*.

Why a crash (or ``kill -9``) after any step is safe, in the order actions come:

- ``Record`` comes before ``Register``: whatever AWS may hold, the state file
  knows of it first, so an agent that dies right after registering (and is then
  unassigned before it restarts) still knows what to undo. A record without a
  registration is harmless: the next pass sees ``not_registered`` and registers
  again, or drops the record.
- ``Tag``, ``Register`` and ``Deregister`` are idempotent in AWS: done twice,
  they change nothing the second time.
- ``AwaitInService``/``AwaitDrained`` only read; a wait cut short is started
  again by the next pass, which finds the same state.
- ``Forget`` comes last, after the instance is out and drained, so a record is
  dropped only once there is nothing left to undo.

The planner never registers into a load balancer whose ownership tags name
another app or cluster, and never plans a write while a load balancer could
not be observed.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from typing import Literal

from intent.model import ClassicElb, Reality, TargetGroup

LoadBalancer = ClassicElb | TargetGroup
Direction = Literal["in", "out", "hold"]
Health = Literal["healthy", "unhealthy", "unknown", "unchecked"]
Phase = Literal["in_service", "pending", "not_registered", "draining", "not_in_use"]
"""This instance in one load balancer: in service; registered but not (yet) in
service; not registered; deregistered and draining; registered in a target group
that no load balancer sends traffic to (AWS's ``Target.NotInUse``)."""

APP_TAG = "platypus:app"
CLUSTER_TAG = "platypus:cluster"
AGENT = "elb-registrar"


def lb_key(lb: LoadBalancer) -> str:
    """What identifies a registration: a classic ELB by region and name, a target
    group by ARN and the port registered (one instance may be there on several)."""
    if isinstance(lb, ClassicElb):
        return f"classic:{lb.region}:{lb.name}"
    return f"target_group:{lb.arn}:{lb.port}"


def lb_label(lb: LoadBalancer) -> str:
    """How a load balancer is named in reports and errors."""
    if isinstance(lb, ClassicElb):
        return f"classic load balancer {lb.name} ({lb.region})"
    return f"target group {lb.arn} port {lb.port}"


# -- 1. in, out or hold ---------------------------------------------------------------------


@dataclass(frozen=True)
class Local:
    """What the host shows for one assigned app."""

    active: str | None
    """The intent's active version (None: the app is stopped)."""
    current: str | None
    """The version ``<basedir>/current`` points at: what runs here."""
    drained: bool = False
    """``pp drain NODE --app APP``."""
    drain_token: str | None = None
    """A live drain request from setlive, about to switch versions."""
    rolled_back_to: str | None = None
    """The version setlive rolled back to when the active one failed its gate: it serves
    here instead, and is put back in once healthy."""
    health: Health = "unknown"
    health_output: str = ""

    @property
    def serves(self) -> str | None:
        """The version that should serve here: the active one, or the one setlive rolled
        back to from it (never the one it is still switching away from)."""
        return self.rolled_back_to or self.active


@dataclass(frozen=True)
class Want:
    direction: Direction
    reason: str
    health_based: bool = False
    """Out only because the local check failed: bound by ``min_nodes``."""


def decide(local: Local) -> Want:
    if local.active is None:
        return Want("out", "the app has no active version")
    if local.drained:
        return Want("out", "drained (pp drain)")
    if local.drain_token is not None:
        return Want("out", f"setlive asked for a drain ({local.drain_token})")
    if local.current != local.serves:
        runs = local.current or "nothing"
        return Want("hold", f"waiting for version {local.active} to run here (runs {runs})")
    if local.health == "unhealthy":
        return Want("out", f"unhealthy: {local.health_output}", health_based=True)
    if local.health == "unknown":
        return Want("hold", f"health of {local.active} not known yet: {local.health_output}")
    if local.health == "unchecked":
        return Want("in", f"version {local.serves} runs here (no health check)")
    return Want("in", f"version {local.serves} runs here and passes its health check")


def peers_in_service(
    reports: Iterable[Reality],
    cluster_nodes: Iterable[str],
    node: str,
    now: float,
    freshness_s: float,
) -> int:
    """Other nodes of the app's cluster whose registrar recently reported them in
    service; a stale report (its agent stopped or stuck) does not count."""
    others = set(cluster_nodes) - {node}
    return sum(
        1
        for r in reports
        if r.agent == AGENT
        and r.node in others
        and r.details.get("in_service") is True
        and now - r.updated_at <= freshness_s
    )


def may_leave(in_service_here: bool, peers: int, min_nodes: int) -> bool:
    """Whether a health-based deregistration leaves at least ``min_nodes`` in service.
    A node not in service anyway takes nothing away."""
    return not in_service_here or peers >= min_nodes


# -- 2. the actions ---------------------------------------------------------------------------


@dataclass(frozen=True)
class Seen:
    """One load balancer as observed this pass."""

    phase: Phase | None
    """None when it could not be observed (``error`` says why)."""
    state: str | None = None
    reason: str | None = None
    description: str | None = None
    tags: Mapping[str, str] | None = None
    """Its tags, when they were read this pass."""
    error: str | None = None
    missing: bool = False
    """It does not exist."""


@dataclass(frozen=True)
class Desired:
    app: str
    cluster: str
    lbs: tuple[LoadBalancer, ...]
    """``deploy_config.elb``."""
    want: Want


@dataclass(frozen=True)
class Observed:
    seen: Mapping[str, Seen]
    """By ``lb_key``: every load balancer desired or recorded."""
    recorded: Mapping[str, LoadBalancer] = field(default_factory=dict)
    """What the state file says this agent may have registered."""


@dataclass(frozen=True)
class Record:
    lb: LoadBalancer


@dataclass(frozen=True)
class Tag:
    lb: LoadBalancer
    tags: tuple[tuple[str, str], ...]


@dataclass(frozen=True)
class Register:
    lb: LoadBalancer


@dataclass(frozen=True)
class AwaitInService:
    lbs: tuple[LoadBalancer, ...]


@dataclass(frozen=True)
class Deregister:
    lb: LoadBalancer


@dataclass(frozen=True)
class AwaitDrained:
    lbs: tuple[LoadBalancer, ...]


@dataclass(frozen=True)
class Forget:
    lb: LoadBalancer


Action = Record | Tag | Register | AwaitInService | Deregister | AwaitDrained | Forget


@dataclass(frozen=True)
class Plan:
    actions: tuple[Action, ...]
    errors: Mapping[str, str]
    """By ``lb_key``: load balancers refused or unobservable; nothing is done there."""
    targets: Mapping[str, Direction]
    """By ``lb_key``: where each load balancer should end up."""


def desired_lbs(lbs: Iterable[LoadBalancer]) -> dict[str, LoadBalancer]:
    """``deploy_config.elb`` by key; a load balancer listed twice counts once."""
    by_key: dict[str, LoadBalancer] = {}
    for lb in lbs:
        by_key.setdefault(lb_key(lb), lb)
    return by_key


def target_of(desired: Desired, key: str) -> Direction:
    """Where one load balancer should end up: a recorded one the intent no longer
    names is left."""
    return desired.want.direction if key in desired_lbs(desired.lbs) else "out"


def needs_tags(target: Direction, phase: Phase | None, known: bool) -> bool:
    """Whether observing must read the ownership tags: before any registration,
    and once for a load balancer this agent has not looked at yet. Never in a
    steady pass, so a pass costs one describe per load balancer."""
    if target != "in" or phase is None:
        return False
    return phase != "in_service" or not known


def ownership_problem(tags: Mapping[str, str], app: str, cluster: str) -> str | None:
    owner = tags.get(APP_TAG), tags.get(CLUSTER_TAG)
    if owner[0] not in (None, app) or owner[1] not in (None, cluster):
        return (
            f"tagged {APP_TAG}={owner[0] or '-'} {CLUSTER_TAG}={owner[1] or '-'}, "
            f"so it belongs to another app or cluster; refusing to register {app}/{cluster} "
            "(fix deploy_config.elb, or retag it if it really is this app's)"
        )
    return None


def missing_tags(tags: Mapping[str, str], app: str, cluster: str) -> tuple[tuple[str, str], ...]:
    wanted = ((APP_TAG, app), (CLUSTER_TAG, cluster))
    return tuple((key, value) for key, value in wanted if key not in tags)


NOT_IN_USE = (
    "registered, but AWS says Target.NotInUse: the target group is not attached to a "
    "load balancer, or this instance's availability zone is not enabled on it"
)


def plan(desired: Desired, observed: Observed) -> Plan:
    """The actions that put this instance where ``desired`` says, in every load
    balancer desired or recorded; nothing at all when AWS already agrees."""
    wanted = desired_lbs(desired.lbs)
    everything = {**observed.recorded, **wanted}
    owner = (desired.app, desired.cluster)
    records: list[Action] = []
    tags: list[Action] = []
    registers: list[Action] = []
    joining: list[LoadBalancer] = []
    deregisters: list[Action] = []
    leaving: list[LoadBalancer] = []
    forgets: list[Action] = []
    errors: dict[str, str] = {}
    targets: dict[str, Direction] = {}

    for key in sorted(everything):
        lb = everything[key]
        target = target_of(desired, key)
        targets[key] = target
        if target == "hold":
            continue  # whatever AWS has stays, and need not even be observed
        recorded = key in observed.recorded
        # A record made under an older deploy_config (another role_arn) is brought up
        # to date, so a removal after an unassign uses the role the intent last named.
        current_record = recorded and observed.recorded[key] == lb
        seen = observed.seen.get(key)
        if seen is None or (seen.phase is None and not seen.missing):
            errors[key] = (seen.error if seen else None) or "not observed"
            continue
        if seen.missing or seen.phase is None:
            if target == "in":
                errors[key] = seen.error or "does not exist"
            elif recorded:
                forgets.append(Forget(lb))  # nothing can be registered in what does not exist
            continue
        if target == "in":
            if seen.tags is not None:
                problem = ownership_problem(seen.tags, desired.app, desired.cluster)
                if problem is not None:
                    errors[key] = problem
                    continue
            elif seen.phase != "in_service":
                errors[key] = "ownership tags not read: not registering"
                continue
            if not current_record:
                records.append(Record(lb))  # before anything else: removal must know
            if seen.phase == "not_in_use":
                errors[key] = NOT_IN_USE
                continue
            if seen.tags is not None and (missing := missing_tags(seen.tags, *owner)):
                tags.append(Tag(lb, missing))
            if seen.phase == "pending" and recorded:
                joining.append(lb)  # registered by us: only AWS's health check is missing
            elif seen.phase != "in_service":
                registers.append(Register(lb))
                joining.append(lb)
        else:
            if seen.phase in ("in_service", "pending", "not_in_use"):
                deregisters.append(Deregister(lb))
                leaving.append(lb)
            elif seen.phase == "draining":
                leaving.append(lb)
            if recorded:
                forgets.append(Forget(lb))

    actions: list[Action] = [*records, *tags, *registers]
    if joining:
        actions.append(AwaitInService(tuple(joining)))
    actions.extend(deregisters)
    if leaving:
        actions.append(AwaitDrained(tuple(leaving)))
    actions.extend(forgets)
    return Plan(tuple(actions), errors, targets)
