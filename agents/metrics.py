"""The agents' Prometheus metrics: every definition in one place, one registry per
process, and the small functions the runtime and the agents record through (one call
where something happens, so the code that does the work stays about the work).

Served with ``--metrics-listen`` (agents/entrypoint.py) by prometheus_client's own
server. Names follow Prometheus conventions: ``platypus_`` prefix, ``_seconds`` and
``_total`` suffixes. Labels are bounded: the agent, the app, an outcome; never a node,
a version or an error text, which would grow without bound. docs/operations.md lists
each metric and what it means.
"""

from __future__ import annotations

import threading
import time
from typing import Any

from prometheus_client import (
    CollectorRegistry,
    Counter,
    Gauge,
    Histogram,
    ProcessCollector,
    start_http_server,
)

from intent.listen import parse_listen as parse_listen  # re-exported: the flag is checked with it

REGISTRY = CollectorRegistry(auto_describe=True)
ProcessCollector(registry=REGISTRY)

# Seconds from a blink to a long download or health gate.
_BUCKETS = (0.01, 0.05, 0.1, 0.5, 1, 2.5, 5, 10, 30, 60, 120, 300, 900, 1800)

PASSES = Counter(
    "platypus_passes_total",
    "Passes of the agent's loop; result is converged when every app was.",
    ["agent", "result"],
    registry=REGISTRY,
)
CONVERGE_SECONDS = Histogram(
    "platypus_converge_duration_seconds",
    "Time one converge of one app took, by the status it ended in.",
    ["agent", "app", "status"],
    buckets=_BUCKETS,
    registry=REGISTRY,
)
APPS = Gauge(
    "platypus_apps",
    "Apps by the status the agent last reported for them.",
    ["agent", "status"],
    registry=REGISTRY,
)
STORE_ERRORS = Counter(
    "platypus_store_errors_total",
    "Store operations that failed because the store could not be reached or answered.",
    ["agent"],
    registry=REGISTRY,
)
STORE_RECONNECTS = Counter(
    "platypus_store_reconnects_total",
    "Times the store answered again after failing.",
    ["agent"],
    registry=REGISTRY,
)
WATCH_AGE = Gauge(
    "platypus_watch_age_seconds",
    "Seconds since the intent watch last answered (a live watch answers at least every 30 s).",
    ["agent"],
    registry=REGISTRY,
)
INTENT_TO_CONVERGED = Histogram(
    "platypus_intent_to_converged_seconds",
    "From the moment the agent saw an app's intent change to the app's next convergence.",
    ["agent", "app"],
    buckets=_BUCKETS,
    registry=REGISTRY,
)

INSTALLS = Counter(
    "platypus_preparer_installs_total",
    "Versions pp-preparer fetched and installed, by result (done, failed).",
    ["app", "result"],
    registry=REGISTRY,
)
FETCHED_BYTES = Counter(
    "platypus_preparer_fetched_bytes_total",
    "Bytes pp-preparer downloaded for installs that completed.",
    ["app"],
    registry=REGISTRY,
)
SWITCHES = Counter(
    "platypus_setlive_switches_total",
    "Times pp-setlive pointed an app's current link at another version.",
    ["app"],
    registry=REGISTRY,
)
ROLLBACKS = Counter(
    "platypus_setlive_rollbacks_total",
    "Versions pp-setlive rolled back after a failed health gate.",
    ["app"],
    registry=REGISTRY,
)
GATE_SECONDS = Histogram(
    "platypus_setlive_gate_duration_seconds",
    "Time pp-setlive's health gates took, by result (healthy, unhealthy).",
    ["app", "result"],
    buckets=_BUCKETS,
    registry=REGISTRY,
)
RESTORES = Counter(
    "platypus_iptables_restores_total",
    "Times pp-iptables applied changed rules with iptables-restore.",
    ["agent"],
    registry=REGISTRY,
)
RULES = Gauge(
    "platypus_iptables_rules",
    "Rules in pp-iptables' chains after the last restore it applied.",
    ["agent"],
    registry=REGISTRY,
)
FIREWALL_PASS_SECONDS = Histogram(
    "platypus_iptables_pass_duration_seconds",
    "Time one pp-iptables pass took (read the rules, plan, restore when needed).",
    ["agent"],
    buckets=_BUCKETS,
    registry=REGISTRY,
)
AWS_CALLS = Counter(
    "platypus_aws_calls_total",
    "AWS API calls pp-elb-registrar made (each attempt), by operation.",
    ["operation"],
    registry=REGISTRY,
)
AWS_ERRORS = Counter(
    "platypus_aws_call_errors_total",
    "AWS API calls that failed, by operation and AWS error code (or exception name).",
    ["operation", "code"],
    registry=REGISTRY,
)

_lock = threading.Lock()
_statuses: dict[tuple[str, str], str] = {}
_changed_at: dict[tuple[str, str], float] = {}
_reachable: dict[str, bool] = {}
_watched_at: dict[str, float] = {}


def serve(listen: str) -> None:
    """Serve ``/metrics`` at ``listen`` (``host:port``, ``[v6]:port`` or a bare port on
    127.0.0.1) from a daemon thread; OSError when the address cannot be bound."""
    host, port = parse_listen(listen)
    start_http_server(port, host, registry=REGISTRY)


# -- the runtime ------------------------------------------------------------------------------


def pass_done(agent: str, converged: bool) -> None:
    PASSES.labels(agent, "converged" if converged else "pending").inc()


def intent_changed(agent: str, app: str) -> None:
    with _lock:
        _changed_at[(agent, app)] = time.monotonic()


def converge_done(agent: str, app: str, status: str, seconds: float) -> None:
    CONVERGE_SECONDS.labels(agent, app, status).observe(seconds)
    if status == "converged":
        with _lock:
            changed = _changed_at.pop((agent, app), None)
        if changed is not None:
            INTENT_TO_CONVERGED.labels(agent, app).observe(time.monotonic() - changed)


def reported(agent: str, app: str, status: str) -> None:
    with _lock:
        _statuses[(agent, app)] = status
        _count_apps(agent)


def app_gone(agent: str, app: str) -> None:
    with _lock:
        _statuses.pop((agent, app), None)
        _changed_at.pop((agent, app), None)
        _count_apps(agent)


def _count_apps(agent: str) -> None:
    mine = [s for (a, _), s in _statuses.items() if a == agent]
    for status in ("converged", "converging", "error"):
        APPS.labels(agent, status).set(mine.count(status))


def store_state(agent: str, reachable: bool) -> None:
    with _lock:
        before = _reachable.get(agent)
        _reachable[agent] = reachable
    errors, reconnects = STORE_ERRORS.labels(agent), STORE_RECONNECTS.labels(agent)
    if not reachable:
        errors.inc()
    elif before is False:
        reconnects.inc()


def watch_answered(agent: str) -> None:
    with _lock:
        first = agent not in _watched_at
        _watched_at[agent] = time.monotonic()
    if first:
        WATCH_AGE.labels(agent).set_function(lambda: time.monotonic() - _watched_at[agent])


# -- the agents -------------------------------------------------------------------------------


def installed(app: str, result: str, fetched_bytes: int = 0) -> None:
    INSTALLS.labels(app, result).inc()
    if fetched_bytes:
        FETCHED_BYTES.labels(app).inc(fetched_bytes)


def switched(app: str) -> None:
    SWITCHES.labels(app).inc()


def rolled_back(app: str) -> None:
    ROLLBACKS.labels(app).inc()


def gated(app: str, healthy: bool, seconds: float) -> None:
    GATE_SECONDS.labels(app, "healthy" if healthy else "unhealthy").observe(seconds)


def firewall_restored(agent: str, rules: int) -> None:
    RESTORES.labels(agent).inc()
    RULES.labels(agent).set(rules)


def firewall_pass(agent: str, seconds: float) -> None:
    FIREWALL_PASS_SECONDS.labels(agent).observe(seconds)


def _aws_call(event_name: str, http_response: Any = None, parsed: Any = None, **_: Any) -> None:
    operation = event_name.rsplit(".", 1)[-1]
    AWS_CALLS.labels(operation).inc()
    if http_response is not None and getattr(http_response, "status_code", 200) >= 400:
        error = parsed.get("Error", {}) if isinstance(parsed, dict) else {}
        AWS_ERRORS.labels(operation, str(error.get("Code") or http_response.status_code)).inc()


def _aws_call_failed(event_name: str, exception: BaseException, **_: Any) -> None:
    operation = event_name.rsplit(".", 1)[-1]
    AWS_CALLS.labels(operation).inc()
    AWS_ERRORS.labels(operation, type(exception).__name__).inc()


AWS_HOOKS = (("after-call", _aws_call), ("after-call-error", _aws_call_failed))
"""botocore event handlers (``agents.system.aws.Aws(hooks=...)``) counting every call."""
