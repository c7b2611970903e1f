"""Make the plan so, action by action, through the AWS adapter and the state file.

Each load balancer stands alone: an error there (access denied, still throttled
after the retries) skips that load balancer's later actions and is reported,
while the others carry on.

The waits poll with tenacity: every pending load balancer once per round, a
fixed ``--poll-interval`` plus up to a fifth of it at random (so a fleet that
registered together does not poll in step), until each is done or the time
given is up, and at once when the agent's stop event is set. boto3's waiters
(``instance_in_service``, ``target_in_service``, ``target_deregistered``) were
not used: they poll one load balancer at a fixed delay with no jitter, cannot be
interrupted by the stop event, and on a timeout raise without the state AWS
last reported, which the report needs.
"""

from __future__ import annotations

import functools
import threading
import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field

import structlog
import tenacity

from agents.elb_registrar import observe
from agents.elb_registrar.plan import (
    NOT_IN_USE,
    AwaitDrained,
    AwaitInService,
    Deregister,
    Forget,
    LoadBalancer,
    Plan,
    Record,
    Register,
    Seen,
    Tag,
    lb_key,
    lb_label,
)
from agents.elb_registrar.state import StateDir, StateError
from agents.system.aws import Aws, AwsError

log = structlog.get_logger()


@dataclass(frozen=True)
class Settings:
    inservice_timeout_s: float = 300.0
    drain_timeout_s: float = 330.0
    poll_interval_s: float = 10.0
    health_recheck_s: float = 5.0
    """A registered app's health check runs again this often (at least its
    ``interval_s``), so an app that turns unhealthy is taken out between resyncs."""
    describe_every_s: float = 30.0
    """A re-check that finds the app still healthy asks AWS again only this long after
    the last look: health re-checks of a fleet must not throttle the account."""


@dataclass
class Context:
    app: str
    aws: Aws
    instance_id: str
    state: StateDir
    stop: threading.Event
    settings: Settings
    clock: Callable[[], float] = time.time


@dataclass
class Applied:
    seen: dict[str, Seen] = field(default_factory=dict)
    """The latest state of each load balancer a wait looked at."""
    errors: dict[str, str] = field(default_factory=dict)
    transitions: dict[str, tuple[str, float]] = field(default_factory=dict)
    """``registered`` or ``deregistered``, and when."""
    draining: set[str] = field(default_factory=set)
    """Still draining when the wait ended."""
    tagged: set[str] = field(default_factory=set)
    stopped: bool = False


def apply(plan: Plan, ctx: Context, drain_timeout_s: float | None = None) -> Applied:
    """Carry out ``plan``; ``drain_timeout_s`` shortens the drain wait (removal runs on
    the runtime's own thread, which must not be held for minutes)."""
    done = Applied()
    for action in plan.actions:
        if ctx.stop.is_set():
            done.stopped = True
            break
        if isinstance(action, AwaitInService):
            _await_in_service(ctx, _live(action.lbs, done), done)
            continue
        if isinstance(action, AwaitDrained):
            _await_drained(ctx, _live(action.lbs, done), done, drain_timeout_s)
            continue
        key = lb_key(action.lb)
        if key in done.errors:
            continue
        try:
            _step(action, ctx, done)
        except AwsError as exc:
            done.errors[key] = f"{lb_label(action.lb)}: {exc}"
        except OSError as exc:
            done.errors[key] = f"state file {ctx.state.file(ctx.app)}: {exc.strerror or exc}"
        except StateError as exc:
            done.errors[key] = str(exc)
    return done


def _step(
    action: Record | Tag | Register | Deregister | Forget, ctx: Context, done: Applied
) -> None:
    key = lb_key(action.lb)
    bound = log.bind(app=ctx.app, lb=lb_label(action.lb))
    if isinstance(action, Record):
        ctx.state.record(ctx.app, action.lb, ctx.clock())
    elif isinstance(action, Tag):
        ctx.aws.add_tags(action.lb, dict(action.tags))
        done.tagged.add(key)
        bound.info("elb.tagged", tags=dict(action.tags))
    elif isinstance(action, Register):
        ctx.aws.register(action.lb, ctx.instance_id)
        done.transitions[key] = ("registered", ctx.clock())
        bound.info("elb.registered", instance=ctx.instance_id)
    elif isinstance(action, Deregister):
        ctx.aws.deregister(action.lb, ctx.instance_id)
        done.transitions[key] = ("deregistered", ctx.clock())
        bound.info("elb.deregistered", instance=ctx.instance_id)
    elif key not in done.draining:  # Forget: only once nothing is left to undo there
        ctx.state.forget(ctx.app, key)


def _live(lbs: Iterable[LoadBalancer], done: Applied) -> list[LoadBalancer]:
    return [lb for lb in lbs if lb_key(lb) not in done.errors]


def _await_in_service(ctx: Context, lbs: list[LoadBalancer], done: Applied) -> None:
    timeout = ctx.settings.inservice_timeout_s
    latest, pending = _poll(ctx, lbs, lambda s: s.phase in ("in_service", "not_in_use"), timeout)
    done.seen.update(latest)
    for lb in lbs:
        key, seen = lb_key(lb), latest.get(lb_key(lb))
        if seen is None:
            continue
        if seen.error is not None:
            done.errors[key] = seen.error
        elif seen.phase == "not_in_use":
            done.errors[key] = f"{lb_label(lb)}: {NOT_IN_USE}"
        elif key in pending and ctx.stop.is_set():
            done.stopped = True
        elif key in pending:
            # Left registered: the load balancer's own health check has the last word.
            done.errors[key] = (
                f"{lb_label(lb)}: not in service after {timeout:g}s: AWS says {seen.state}"
                f"{f' ({seen.reason})' if seen.reason else ''}"
                f"{f': {seen.description}' if seen.description else ''}"
            )


def _await_drained(
    ctx: Context, lbs: list[LoadBalancer], done: Applied, timeout_s: float | None
) -> None:
    timeout = timeout_s if timeout_s is not None else ctx.settings.drain_timeout_s
    latest, pending = _poll(ctx, lbs, lambda s: s.phase == "not_registered", timeout)
    done.seen.update(latest)
    for lb in lbs:
        key, seen = lb_key(lb), latest.get(lb_key(lb))
        if seen is not None and seen.error is not None:
            done.errors[key] = seen.error
        elif key in pending:
            done.draining.add(key)
            done.stopped |= ctx.stop.is_set()


def _poll(
    ctx: Context, lbs: list[LoadBalancer], finished: Callable[[Seen], bool], timeout_s: float
) -> tuple[dict[str, Seen], set[str]]:
    """Describe the pending load balancers (one call each) until each is finished, fails,
    or the time is up; returns the last state seen of each and those still pending."""
    pending = {lb_key(lb): lb for lb in lbs}
    latest: dict[str, Seen] = {}
    if not pending:
        return latest, set()

    def look() -> bool:
        for key, seen in observe.describe(ctx.aws, pending, ctx.instance_id).items():
            latest[key] = seen
            if seen.phase is None or finished(seen):
                del pending[key]
        return not pending

    interval = ctx.settings.poll_interval_s
    tenacity.Retrying(
        retry=tenacity.retry_if_result(lambda all_done: not all_done),
        wait=tenacity.wait_fixed(interval) + tenacity.wait_random(0, interval / 5),
        stop=tenacity.stop_before_delay(timeout_s) | tenacity.stop_when_event_set(ctx.stop),
        sleep=functools.partial(_sleep, ctx.stop),
        retry_error_callback=lambda state: False,
    )(look)
    return latest, set(pending)


def _sleep(stop: threading.Event, seconds: float) -> None:
    """tenacity's sleep, cut short by the stop event."""
    stop.wait(seconds)
