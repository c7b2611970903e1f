"""The fleet as pp's rollout views read it: each app's clusters as rollout targets, and the
agents' reports with the store version each was written at.

Reads only. One listing of ``nodes/`` gives every assignment, one per cluster its
intent (parsed by the store, as the agents parse it); reports are listed per node, or
the whole of ``reality/`` at once for the status page. A value that does not parse is
the target's problem, never raised: one bad key must not hide the fleet.
"""

from __future__ import annotations

import math
import time
from collections.abc import Collection, Iterable
from dataclasses import dataclass, field, replace

from intent import keys
from intent.cli.rollout import ReportKey, Rollout, Snapshot, Target, evaluate
from intent.model import IntentError, NodeAssignment, Reality, parse
from intent.store import IntentStore

Pair = tuple[str, str]
"""``(app, cluster)``."""
INVALID = "<invalid>"
"""The cluster of assignments that do not parse (as ``IntentStore.nodes_of`` says)."""


@dataclass(frozen=True)
class Reports:
    reports: list[Reality]
    versions: dict[ReportKey, int] = field(default_factory=dict)
    """The store version of each report's key: a report whose version moved was written
    again (the rollout's notion of "after the change" needs no clock)."""

    def changed_since(self, baseline: Reports | None) -> frozenset[ReportKey]:
        """The reports NOT written again since ``baseline`` (None: every report counts)."""
        if baseline is None:
            return frozenset()
        return frozenset(k for k, v in self.versions.items() if baseline.versions.get(k) == v)


def read_reports(store: IntentStore, nodes: Collection[str] | None = None) -> Reports:
    """The reports of ``nodes`` (None: of every node, in one listing)."""
    prefixes = (
        [store.prefix + keys.REALITY]
        if nodes is None
        else [store.prefix + keys.REALITY + node + "/" for node in sorted(set(nodes))]
    )
    reports: list[Reality] = []
    versions: dict[ReportKey, int] = {}
    for prefix in prefixes:
        for entry in store.kv.list(prefix):
            try:
                report = Reality.model_validate_json(entry.value)
            except ValueError:
                continue
            reports.append(report)
            versions[(report.node, report.agent, report.app)] = entry.version
    return Reports(reports, versions)


def assignments(store: IntentStore) -> dict[Pair, list[str]]:
    """``{(app, cluster): [node, ...]}`` from one listing of ``nodes/``; an assignment
    that does not parse is listed under cluster ``<invalid>``."""
    prefix = store.prefix + keys.NODES
    found: dict[Pair, list[str]] = {}
    for entry in store.kv.list(prefix):
        node, _, app = entry.key[len(prefix) :].partition("/")
        if not node or not app or "/" in app:  # a retry or drain request, a folder
            continue
        try:
            cluster = parse(NodeAssignment, entry.value, entry.key).cluster
        except IntentError:
            cluster = INVALID
        found.setdefault((app, cluster), []).append(node)
    return found


def targets(
    store: IntentStore,
    wanted: Iterable[Pair] | None = None,
    confirm: Collection[Pair] = (),
) -> list[Target]:
    """The targets of ``wanted`` clusters (None: every cluster with intent or nodes), as
    the store holds them now. ``confirm``: clusters whose change kept the version."""
    nodes = assignments(store)
    if wanted is None:
        prefix = store.prefix + keys.CLUSTERS
        found = {tuple(e.key[len(prefix) :].split("/")[:2]) for e in store.kv.list(prefix)}
        pairs = sorted({(p[0], p[1]) for p in found if len(p) == 2} | set(nodes))
    else:
        pairs = sorted(set(wanted))
    return [_target(store, pair, nodes.get(pair, []), pair in confirm) for pair in pairs]


def overview(store: IntentStore, app: str | None = None, node: str | None = None) -> Rollout:
    """Where every cluster (or ``app``'s, or those ``node`` runs) stands now: what
    ``pp status`` summarises and the status page shows."""
    found = []
    for target in targets(store):
        if app is not None and target.app != app:
            continue
        if node is not None:
            if node not in target.nodes:
                continue
            target = replace(target, nodes=(node,))
        found.append(target)
    whole = app is None and node is None
    reports = read_reports(store, None if whole else {n for t in found for n in t.nodes})
    snapshot = Snapshot(reports.reports, time.time(), held=store.agent_statuses(node))
    return evaluate(found, snapshot, 0.0, timeout_s=math.inf)


def _target(store: IntentStore, pair: Pair, nodes: list[str], confirm: bool) -> Target:
    if pair[1] == INVALID:
        where = ", ".join(keys.node_app(n, pair[0]) for n in sorted(nodes))
        return Target(*pair, None, tuple(sorted(nodes)), problem=f"{where}: invalid assignment")
    intent = store.app_intent(*pair)
    deploy = intent.deploy
    return Target(
        app=pair[0],
        cluster=pair[1],
        version=intent.config.active_version if intent.config is not None else None,
        nodes=tuple(sorted(nodes)),
        ports=bool(deploy and deploy.ports),
        elb=bool(deploy and deploy.elb),
        confirm=confirm,
        problem=intent.error,
    )
