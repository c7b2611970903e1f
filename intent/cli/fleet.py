"""The fleet as pp's rollout views read it: each app's clusters as rollout targets, and the
agents' reports with the store version each was written at.

Reads only. A listing of ``clusters/`` and one of ``nodes/`` give every target at once
(the status page reads them every few seconds); reports are listed per node, or the
whole of ``reality/`` for the page. Values that do not parse are skipped here and shown
as the target's problem, never raised: one bad key must not hide the fleet.
"""

from __future__ import annotations

import math
import time
from collections.abc import Collection, Iterable
from dataclasses import dataclass, field, replace

from intent import keys
from intent.cli.rollout import ReportKey, Rollout, Snapshot, Target, evaluate
from intent.model import (
    AppConfig,
    DeployConfig,
    IntentError,
    M,
    NodeAssignment,
    Reality,
    parse,
)
from intent.store import IntentStore

Pair = tuple[str, str]
"""``(app, cluster)``."""


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
            cluster = "<invalid>"
        found.setdefault((app, cluster), []).append(node)
    return found


def targets(
    store: IntentStore,
    wanted: Iterable[Pair] | None = None,
    confirm: Collection[Pair] = (),
) -> list[Target]:
    """The targets of ``wanted`` clusters (None: every cluster with intent or nodes), as
    the store holds them now. ``confirm``: clusters whose change kept the version."""
    prefix = store.prefix + keys.CLUSTERS
    values: dict[Pair, dict[str, bytes]] = {}
    for entry in store.kv.list(prefix):
        parts = entry.key[len(prefix) :].split("/")
        if len(parts) == 3 and parts[2] in ("config", "deploy_config"):
            values.setdefault((parts[0], parts[1]), {})[parts[2]] = entry.value
    nodes = assignments(store)
    pairs = sorted(set(values) | set(nodes)) if wanted is None else sorted(set(wanted))
    return [
        _target(pair, values.get(pair, {}), nodes.get(pair, []), pair in confirm) for pair in pairs
    ]


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


def _target(pair: Pair, raw: dict[str, bytes], nodes: list[str], confirm: bool) -> Target:
    app, cluster = pair
    problems: list[str] = []
    config = _parsed(AppConfig, keys.config(app, cluster), raw.get("config"), problems)
    deploy = _parsed(
        DeployConfig, keys.deploy_config(app, cluster), raw.get("deploy_config"), problems
    )
    return Target(
        app=app,
        cluster=cluster,
        version=config.active_version if config is not None else None,
        nodes=tuple(sorted(nodes)),
        ports=bool(deploy and deploy.ports),
        elb=bool(deploy and deploy.elb),
        confirm=confirm,
        problem="; ".join(problems) or None,
    )


def _parsed(model: type[M], key: str, raw: bytes | None, problems: list[str]) -> M | None:
    if raw is None:
        problems.append(f"{key}: missing")
        return None
    try:
        return parse(model, raw, key)
    except IntentError as exc:
        problems.append(str(exc))
        return None
