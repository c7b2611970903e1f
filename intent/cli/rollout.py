"""Where a rollout stands, from what the agents report: pure, no I/O.

``pp deploy --wait`` (and rollback, retry, apply), ``pp status``'s summary and the status
page ask the same question of ``reality/``: on each node that runs the app's cluster,
has every agent that applies converged on the desired version, has one failed or rolled
back, or has it gone quiet? ``evaluate`` answers it for one moment; the caller reads the
store again when it changes and asks again.

Which agents apply to a node: pp-preparer and pp-setlive always; pp-iptables (and
pp-iptables --ipv6, reporting as ``ip6tables``) when the cluster's deploy_config has ports
and that agent has reported anything on the node (it is optional on a host);
pp-elb-registrar when deploy_config.elb is set, on the same condition.

When a report counts:

- **converged**: status ``converged`` on the desired version. pp-preparer also counts as
  converged once the desired version is ``installed`` (another version failing to
  install does not concern this rollout). A change that keeps the version (only
  user_config or deploy_config changed: ``Target.confirm``) needs the report to be
  written after the change, since before it every node already said ``converged``.
- **failed**: status ``error``, or pp-setlive's ``rolled_back_from`` naming the desired
  version (a rollback), in a report written after the change. An error left from before
  the change is not this rollout's: it counts once the agent writes it again (a failing
  app is re-reported at least every resync, so a lasting error is seen within a minute
  or so).
- **silent**: no report by that agent on that node (any app) for ``silent_after_s``,
  or none at all once the rollout has run that long.
- **held**: the agent's ``agents/<node>/<agent>`` record says ``held`` (agents/trust.py).

A rollout is over when a node failed (exit 3), when every node converged (exit 0), at
the timeout (exit 4), or when every node still pending is silent or held (exit 5):
waiting longer would change nothing without an operator.
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field, replace
from typing import Any, Literal

from intent.cli import render
from intent.model import AgentStatus, Reality

EXIT_CONVERGED = 0
EXIT_FAILED = 3
EXIT_TIMEOUT = 4
EXIT_STALLED = 5

DEFAULT_TIMEOUT_S = 600.0
DEFAULT_SILENT_AFTER_S = render.STALE_AFTER_S
"""Agents re-report every app at each resync (60 s by default, jittered by 20 %), and the
store keeps such a repeat once the last write is REALITY_HEARTBEAT_S old: a live agent's
newest report is at most about 75 s old. Five minutes without one is what ``pp status``
calls stale too."""

PREPARER = "preparer"
SETLIVE = "setlive"
FIREWALLS = ("iptables", "ip6tables")
REGISTRAR = "elb-registrar"

AgentState = Literal["converged", "converging", "waiting", "failed"]
"""``waiting``: the agent has not reported on this app yet."""
NodeState = Literal["converged", "converging", "failed", "rolled_back", "silent", "held"]
Result = Literal["converged", "failed", "timeout", "stalled"]
ReportKey = tuple[str, str, str]
"""``(node, agent, app)``: one report."""

_EXIT_CODES: dict[Result, int] = {
    "converged": EXIT_CONVERGED,
    "failed": EXIT_FAILED,
    "timeout": EXIT_TIMEOUT,
    "stalled": EXIT_STALLED,
}


@dataclass(frozen=True)
class Target:
    """One app's cluster as the change left it: what its nodes should converge on."""

    app: str
    cluster: str
    version: str | None
    """The active version (None: the app is meant to be stopped)."""
    nodes: tuple[str, ...]
    ports: bool = False
    elb: bool = False
    confirm: bool = False
    """The change kept the version: a converged report counts only if written after it."""
    problem: str | None = None
    """Why the cluster's intent cannot be read (pp status shows it)."""

    def agents_for(self, present: Iterable[str]) -> tuple[str, ...]:
        """The agents this rollout waits for on a node where ``present`` have reported."""
        seen = set(present)
        agents = [PREPARER, SETLIVE]
        if self.ports:
            agents += [a for a in FIREWALLS if a in seen]
        if self.elb and REGISTRAR in seen:
            agents.append(REGISTRAR)
        return tuple(agents)


@dataclass(frozen=True)
class Snapshot:
    """What the store held at one moment, for the nodes concerned."""

    reports: Sequence[Reality]
    now: float
    stale: frozenset[ReportKey] = frozenset()
    """Reports not written since the change (see the module's docstring)."""
    held: Sequence[AgentStatus] = ()


@dataclass(frozen=True)
class AgentProgress:
    agent: str
    state: AgentState
    version: str | None = None
    message: str = ""
    """One line: the report's error, or what the agent is at."""
    since: float | None = None
    silent: bool = False
    held: bool = False
    rolled_back: bool = False
    last_report_age: float | None = None


@dataclass(frozen=True)
class NodeProgress:
    app: str
    cluster: str
    node: str
    state: NodeState
    agents: tuple[AgentProgress, ...]
    reason: str = ""
    """One line: why it failed, or what it still waits for (``agent: message``)."""

    @property
    def done(self) -> bool:
        return self.state == "converged"

    @property
    def failed(self) -> bool:
        return self.state in ("failed", "rolled_back")

    @property
    def stuck(self) -> bool:
        return self.state in ("silent", "held")

    @property
    def key(self) -> tuple[str, str]:
        return (self.app, self.node)


@dataclass(frozen=True)
class Rollout:
    targets: tuple[Target, ...]
    nodes: tuple[NodeProgress, ...]
    elapsed: float
    timed_out: bool = False

    @property
    def result(self) -> Result | None:
        """How it ended, or None while it goes on."""
        if any(n.failed for n in self.nodes):
            return "failed"
        if all(n.done for n in self.nodes):
            return "converged"
        if self.timed_out:
            return "timeout"
        if all(n.done or n.stuck for n in self.nodes):
            return "stalled"
        return None

    @property
    def exit_code(self) -> int | None:
        result = self.result
        return None if result is None else _EXIT_CODES[result]

    def count(self, *states: NodeState) -> int:
        return sum(1 for n in self.nodes if n.state in states)

    def by_agent(self) -> dict[str, Counter[AgentState]]:
        """Per agent, how many nodes it is converged, converging, waiting or failed on."""
        counts: dict[str, Counter[AgentState]] = {}
        for node in self.nodes:
            for agent in node.agents:
                counts.setdefault(agent.agent, Counter())[agent.state] += 1
        return counts

    def pending(self) -> list[NodeProgress]:
        return [n for n in self.nodes if not n.done and not n.failed]

    def slowest(self) -> NodeProgress | None:
        """The pending node furthest behind: fewest agents converged, then the one
        longest in its current state."""
        pending = self.pending()
        if not pending:
            return None

        def behind(node: NodeProgress) -> tuple[int, float, str]:
            converged = sum(1 for a in node.agents if a.state == "converged")
            waiting = [a.since for a in node.agents if a.state != "converged" and a.since]
            return (converged, min(waiting, default=float("inf")), node.node)

        return min(pending, key=behind)


def evaluate(
    targets: Sequence[Target],
    snapshot: Snapshot,
    elapsed: float,
    *,
    timeout_s: float = DEFAULT_TIMEOUT_S,
    silent_after_s: float = DEFAULT_SILENT_AFTER_S,
) -> Rollout:
    """The rollout's state at ``snapshot``, ``elapsed`` seconds after it began."""
    by_node: dict[str, list[Reality]] = {}
    for report in snapshot.reports:
        by_node.setdefault(report.node, []).append(report)
    held = {(s.node, s.agent): s for s in snapshot.held if s.state == "held"}
    nodes = []
    for target in targets:
        for node in target.nodes:
            reports = by_node.get(node, [])
            nodes.append(_node(target, node, reports, snapshot, held, elapsed, silent_after_s))
    return Rollout(tuple(targets), tuple(nodes), elapsed, timed_out=elapsed >= timeout_s)


def _node(
    target: Target,
    node: str,
    reports: Sequence[Reality],
    snapshot: Snapshot,
    held: Mapping[tuple[str, str], AgentStatus],
    elapsed: float,
    silent_after_s: float,
) -> NodeProgress:
    last_heard: dict[str, float] = {}
    mine: dict[str, Reality] = {}
    for report in reports:
        last_heard[report.agent] = max(last_heard.get(report.agent, 0.0), report.updated_at)
        if report.app == target.app:
            mine[report.agent] = report
    agents = []
    for agent in target.agents_for(last_heard):
        stale = (node, agent, target.app) in snapshot.stale
        progress = _agent(target, agent, mine.get(agent), stale)
        heard = last_heard.get(agent)
        age = None if heard is None else snapshot.now - heard
        silent = age > silent_after_s if age is not None else elapsed > silent_after_s
        hold = held.get((node, agent))
        pending = progress.state != "converged"
        agents.append(
            replace(
                progress,
                silent=silent and pending,
                held=hold is not None and pending,
                last_report_age=age,
                message=_held_message(hold) if hold and pending else progress.message,
            )
        )
    return _node_state(target, node, tuple(agents), silent_after_s)


def _agent(target: Target, agent: str, report: Reality | None, stale: bool) -> AgentProgress:
    if report is None:
        return AgentProgress(agent, "waiting", message="no report yet")
    version = target.version
    details = report.details
    message = render.one_line(report.error or "")
    since = report.since
    if not stale:
        if agent == SETLIVE and version is not None and details.get("rolled_back_from") == version:
            reason = message or f"rolled back from {version}"
            return AgentProgress(agent, "failed", report.version, reason, since, rolled_back=True)
        if report.status == "error" and not _installed_here(agent, version, details):
            return AgentProgress(agent, "failed", report.version, message or "error", since)
    converged = report.status == "converged" and report.version == version
    if converged or _installed_here(agent, version, details):
        if stale and target.confirm:
            waiting = "converged before the change; waiting for a report after it"
            return AgentProgress(agent, "converging", report.version, waiting, since)
        return AgentProgress(agent, "converged", version, "", since)
    return AgentProgress(agent, "converging", report.version, _doing(report, stale), since)


def _installed_here(agent: str, version: str | None, details: Mapping[str, Any]) -> bool:
    """pp-preparer installed the desired version (its report is per app, and another
    version failing makes the whole report an error)."""
    versions = details.get("versions")
    return (
        agent == PREPARER
        and version is not None
        and isinstance(versions, dict)
        and versions.get(version) == "installed"
    )


def _doing(report: Reality, stale: bool) -> str:
    message = render.one_line(report.error or "")
    if stale and report.status == "error":
        return f"before the change: {message}"
    if message:
        return message
    return f"{report.status} on {report.version or 'no version'}"


def _held_message(status: AgentStatus) -> str:
    return f"held: {render.one_line(status.reason or 'no reason given')}"


def _node_state(
    target: Target, node: str, agents: tuple[AgentProgress, ...], silent_after_s: float
) -> NodeProgress:
    def make(state: NodeState, reason: str = "") -> NodeProgress:
        return NodeProgress(target.app, target.cluster, node, state, agents, reason)

    for agent in agents:
        if agent.state == "failed":
            return make("rolled_back" if agent.rolled_back else "failed", _reason(agent))
    pending = [a for a in agents if a.state != "converged"]
    if not pending:
        return make("converged")
    if all(a.held for a in pending):
        return make("held", "; ".join(_reason(a) for a in pending))
    if all(a.held or a.silent for a in pending):
        return make("silent", "; ".join(_silence(a, silent_after_s) for a in pending))
    return make("converging", _reason(pending[0]))


def _reason(agent: AgentProgress) -> str:
    return f"{agent.agent}: {agent.message}" if agent.message else agent.agent


def _silence(agent: AgentProgress, silent_after_s: float) -> str:
    if agent.held:
        return _reason(agent)
    if agent.last_report_age is None:
        return f"{agent.agent}: never reported on this node"
    return f"{agent.agent}: no report for {render.age(agent.last_report_age)}"


# -- events: what changed between two moments ------------------------------------------------


@dataclass(frozen=True)
class Event:
    """One change worth a line: an agent's state on a node, a node's, or the end."""

    kind: Literal["agent", "node", "end"]
    fields: dict[str, Any] = field(default_factory=dict)

    def as_json(self) -> dict[str, Any]:
        return {"event": self.kind, **self.fields}


def events(before: Rollout | None, after: Rollout) -> list[Event]:
    """Agent and node changes from ``before`` to ``after`` (everything, the first time),
    then the end when ``after`` is over."""
    old_nodes = {n.key: n for n in before.nodes} if before is not None else {}
    out: list[Event] = []
    elapsed = round(after.elapsed, 1)
    for node in after.nodes:
        old = old_nodes.get(node.key)
        old_agents = {a.agent: a for a in old.agents} if old is not None else {}
        where = {"app": node.app, "cluster": node.cluster, "node": node.node}
        for agent in node.agents:
            was = old_agents.get(agent.agent)
            if was is None or _agent_view(was) != _agent_view(agent):
                out.append(
                    Event(
                        "agent",
                        {
                            **where,
                            "agent": agent.agent,
                            "state": agent.state,
                            "version": agent.version,
                            "message": agent.message,
                            "silent": agent.silent,
                            "held": agent.held,
                            "elapsed": elapsed,
                        },
                    )
                )
        if old is None or (old.state, old.reason) != (node.state, node.reason):
            out.append(
                Event(
                    "node",
                    {**where, "state": node.state, "reason": node.reason, "elapsed": elapsed},
                )
            )
    if after.result is not None:
        out.append(end_event(after))
    return out


def _agent_view(agent: AgentProgress) -> tuple[Any, ...]:
    return (agent.state, agent.version, agent.message, agent.silent, agent.held)


def end_event(rollout: Rollout) -> Event:
    result = rollout.result
    return Event(
        "end",
        {
            "result": result,
            "exit_code": rollout.exit_code,
            "summary": summary(rollout),
            "converged": rollout.count("converged"),
            "nodes": len(rollout.nodes),
            "failed": [_brief(n) for n in rollout.nodes if n.failed],
            "pending": [_brief(n) for n in rollout.pending()],
            "elapsed": round(rollout.elapsed, 1),
        },
    )


def _brief(node: NodeProgress) -> dict[str, str]:
    return {"app": node.app, "node": node.node, "state": node.state, "reason": node.reason}


def summary(rollout: Rollout) -> str:
    """One line saying how the rollout ended (or stands), naming the nodes that matter."""
    what = (
        ", ".join(f"{t.app}/{t.cluster} {t.version or '(stopped)'}" for t in rollout.targets)
        or "nothing"
    )
    took = render.age(rollout.elapsed)
    total = len(rollout.nodes)
    done = rollout.count("converged")
    result = rollout.result
    if result == "converged":
        return f"{what}: converged on {done}/{total} node(s) in {took}"
    if result == "failed":
        failed = [n for n in rollout.nodes if n.failed]
        verb = "rolled back" if all(n.state == "rolled_back" for n in failed) else "failed"
        named = "; ".join(f"{n.node} {n.reason}" for n in failed)
        return f"{what}: {verb} after {took} on {len(failed)} node(s): {named}"
    pending = "; ".join(f"{n.node} ({n.state}: {n.reason})" for n in rollout.pending())
    if result == "timeout":
        return f"{what}: timed out after {took}, {done}/{total} converged; pending: {pending}"
    if result == "stalled":
        return f"{what}: stalled after {took}, {done}/{total} converged; no progress: {pending}"
    return f"{what}: {done}/{total} converged after {took}"
