"""What the registrar sees: the app on this host, and this instance in each load balancer.

One describe call per load balancer and pass (a target group asked about every
port of interest at once); ownership tags only when plan.needs_tags says so.
"""

from __future__ import annotations

import json
import threading
from collections.abc import Mapping
from dataclasses import dataclass, replace

from agents import health
from agents.elb_registrar.plan import Health, LoadBalancer, Phase, Seen, lb_key, lb_label
from agents.system.aws import Aws, AwsError, NotFound, TargetHealth
from intent.model import ClassicElb, HealthCheck, TargetGroup

_DRAINING = "deregistration currently in progress"
_NOT_REGISTERED = "not currently registered"


# -- AWS --------------------------------------------------------------------------------------


def classify(lb: LoadBalancer, found: TargetHealth | None) -> Phase:
    """AWS's words as a phase.

    A classic ELB reports a deregistered instance still serving its last requests
    as ``InService`` "Instance deregistration currently in progress", and one it
    does not know as ``OutOfService`` "Instance is not currently registered" (or
    ``Unknown``, or an ``InvalidInstance`` error); the description is the only
    place AWS says so. A target group says it in its reason codes.
    """
    if found is None:
        return "not_registered"
    description = (found.description or "").lower()
    if isinstance(lb, ClassicElb):
        if found.state == "InService":
            return "draining" if _DRAINING in description else "in_service"
        if found.state == "OutOfService" and _NOT_REGISTERED not in description:
            return "pending"
        return "not_registered"
    if found.state == "healthy":
        return "in_service"
    if found.state == "draining":
        return "draining"
    if found.state == "unused":
        if found.reason == "Target.NotRegistered":
            return "not_registered"
        if found.reason == "Target.NotInUse":
            return "not_in_use"
    return "pending"  # initial, unhealthy, unavailable, unused for another reason


def describe(aws: Aws, lbs: Mapping[str, LoadBalancer], instance_id: str) -> dict[str, Seen]:
    """This instance in each of ``lbs`` (by ``lb_key``)."""
    seen: dict[str, Seen] = {}
    groups: dict[tuple[str, str, str | None], list[TargetGroup]] = {}
    for key, lb in lbs.items():
        if isinstance(lb, ClassicElb):
            try:
                seen[key] = _seen(lb, aws.instance_health(lb, instance_id))
            except AwsError as exc:
                seen[key] = failed(lb, exc)
        else:
            groups.setdefault((lb.arn, lb.region, lb.role_arn), []).append(lb)
    for members in groups.values():
        ports = {tg.port for tg in members}
        try:
            found = aws.target_health(members[0], instance_id, ports)
        except AwsError as exc:
            for tg in members:
                seen[lb_key(tg)] = failed(tg, exc)
            continue
        for tg in members:
            seen[lb_key(tg)] = _seen(tg, found.get(tg.port))
    return seen


def describe_one(aws: Aws, lb: LoadBalancer, instance_id: str) -> Seen:
    return describe(aws, {lb_key(lb): lb}, instance_id)[lb_key(lb)]


def with_tags(aws: Aws, lb: LoadBalancer, seen: Seen) -> Seen:
    try:
        return replace(seen, tags=aws.tags(lb))
    except AwsError as exc:
        return failed(lb, exc)


def failed(lb: LoadBalancer, exc: AwsError) -> Seen:
    if isinstance(exc, NotFound):
        return Seen(None, error=f"{lb_label(lb)} does not exist ({exc.action})", missing=True)
    return Seen(None, error=f"{lb_label(lb)}: {exc}")


def _seen(lb: LoadBalancer, found: TargetHealth | None) -> Seen:
    if found is None:
        return Seen("not_registered", "not registered")
    return Seen(classify(lb, found), found.state, found.reason, found.description)


# -- the host ---------------------------------------------------------------------------------


@dataclass(frozen=True)
class DrainRequest:
    token: str
    until: float


@dataclass(frozen=True)
class SetliveSays:
    """What this agent reads in setlive's report on the app."""

    drain: DrainRequest | None = None
    """A live drain request (``details.drain_request``: ``{"token", "at", "until"}``); one
    past its ``until`` is ignored, so a setlive that died mid-switch cannot keep the node
    out for ever."""
    rolled_back_to: str | None = None
    """The version setlive runs after rolling back from the active one
    (``details.rolled_back_from`` set)."""


def setlive_says(raw: bytes | None, now: float) -> SetliveSays:
    """Setlive's report read leniently: anything malformed says nothing."""
    try:
        report = json.loads(raw) if raw is not None else None
    except ValueError:
        return SetliveSays()
    details = report.get("details") if isinstance(report, dict) else None
    if not isinstance(report, dict) or not isinstance(details, dict):
        return SetliveSays()
    version = report.get("version")
    rolled_back = isinstance(details.get("rolled_back_from"), str) and isinstance(version, str)
    return SetliveSays(_drain_request(details.get("drain_request"), now),
                       version if rolled_back else None)  # fmt: skip


def _drain_request(request: object, now: float) -> DrainRequest | None:
    if not isinstance(request, dict):
        return None
    try:
        token, until = request["token"], float(request["until"])
    except (ValueError, TypeError, KeyError):
        return None
    if not isinstance(token, str) or not token or now >= until:
        return None
    return DrainRequest(token, until)


def drain_token(raw: bytes | None, now: float) -> str | None:
    """The token of a live drain request in setlive's report (see ``SetliveSays``)."""
    request = setlive_says(raw, now).drain
    return request.token if request is not None else None


def local_health(
    check: health.Check,
    spec: HealthCheck,
    tracker: health.HealthTracker,
    *,
    trusted: bool,
    stop: threading.Event,
) -> tuple[Health, str]:
    """The app's health, by the rules setlive's gate and steady state use.

    Trusted (the app passed here before, or this agent registered it before a
    restart): checks until one passes, and only ``unhealthy_threshold`` failures
    in a row, ``interval_s`` apart, make it unhealthy. Otherwise a gate: it must
    pass ``healthy_threshold`` checks in a row within ``deadline_s``. A stop
    request ends either at once, with the health unknown.
    """
    if trusted:
        if tracker.state == "unknown":
            tracker.set("healthy")
        output = ""
        for _ in range(spec.unhealthy_threshold):
            result = check()
            state, output = tracker.record(result.ok), result.output
            if result.ok or state == "unhealthy":
                return state, output
            if stop.wait(spec.interval_s):
                return "unknown", f"stopped while checking health: {output}"
        return tracker.state, output
    gate = health.wait_healthy(
        check,
        lambda: health.Liveness(True),
        healthy_threshold=spec.healthy_threshold,
        interval_s=spec.interval_s,
        deadline_s=spec.deadline_s,
        min_uptime_s=0.0,  # setlive's gate already held the process to its uptime
        stop=stop,
    )
    if stop.is_set():
        return "unknown", gate.output
    tracker.set("healthy" if gate.healthy else "unhealthy")
    return tracker.state, gate.output
