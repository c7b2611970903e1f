"""The intent store in domain terms: apps for a node, an app's config, reality, audit.

Agents and the CLI speak to this class only. It knows the key layout and the
model; the backend below it knows only bytes, versions and prefixes.
"""

from __future__ import annotations

import json
import time
import uuid
from collections.abc import Sequence
from dataclasses import dataclass, replace
from typing import Any, Generic, TypeVar

from intent import keys
from intent.errors import StoreError
from intent.model import (
    AgentStatus,
    AppConfig,
    AuditRecord,
    DeployConfig,
    IntentError,
    M,
    NodeAssignment,
    Reality,
    StoreIdentity,
    decode_json,
    is_safe_name,
    parse,
)
from intent.store.kv import MUST_NOT_EXIST, ClosedByWith, Entry, KVStore
from intent.store.node_watch import NodeWatch, Seen

T = TypeVar("T")

REALITY_HEARTBEAT_S = 30.0


@dataclass(frozen=True)
class Versioned(Generic[T]):
    value: T
    version: int


@dataclass(frozen=True)
class AppIntent:
    """Everything an agent needs to converge one app on one node.

    When ``error`` is set the intent for this app is unusable as stored; agents
    then hold the last valid intent they saw and report the error.
    """

    app: str
    cluster: str | None = None
    config: AppConfig | None = None
    deploy: DeployConfig | None = None
    error: str | None = None
    retry_token: str | None = None
    """Set by ``pp retry``: a new token asks for a failed version to be tried again."""
    drained: bool = False
    """Set by ``pp drain``: keep this node out of the app's load balancers."""

    @property
    def valid(self) -> bool:
        return self.error is None and self.config is not None and self.deploy is not None


def encode(value: Any) -> bytes:
    return json.dumps(value, sort_keys=True, separators=(",", ":")).encode()


class IntentStore(ClosedByWith):
    """The store in Platypus's terms; ``with`` closes it."""

    def __init__(self, kv: KVStore, prefix: str = keys.DEFAULT_PREFIX) -> None:
        self.kv = kv
        self.prefix = prefix if prefix.endswith("/") or not prefix else prefix + "/"
        self._seen = Seen()
        """What ``watch_node`` saw last: a node's passes read from it (see node_watch)."""
        self._clusters_run: dict[str, tuple[str, ...]] = {}
        """The cluster prefixes each watched node runs, as its watch last read them."""
        self._reported: dict[str, Reality] = {}
        """The last report written (or found) under each reality key this store wrote."""

    def _k(self, key: str) -> str:
        return self.prefix + key

    # -- raw JSON values, for the CLI's read-modify-write cycles -------------------------

    def get_raw(self, key: str) -> Versioned[bytes] | None:
        entry = self.kv.get(self._k(key))
        return Versioned(entry.value, entry.version) if entry else None

    def put_json(self, key: str, value: Any, expect: int | None = None) -> bool:
        return self.kv.put(self._k(key), encode(value), expect)

    def delete(self, key: str, expect: int | None = None) -> bool:
        return self.kv.delete(self._k(key), expect)

    # -- intent ---------------------------------------------------------------------------

    def _listing(self, prefix: str, fresh: bool) -> list[Entry]:
        """Entries under ``prefix``: as this store's running node watch last saw them
        when it covers the prefix (a change since has woken it already), unless ``fresh``."""
        if not fresh and (seen := self._seen.get(prefix)) is not None:
            return seen
        return self.kv.list(prefix)

    def _node_entries(self, node: str, fresh: bool = True) -> dict[str, Versioned[bytes]]:
        """Everything under ``nodes/<node>/``, keyed relative to it."""
        prefix = self._k(keys.node_apps(node))
        return {
            e.key[len(prefix) :]: Versioned(e.value, e.version)
            for e in self._listing(prefix, fresh)
        }

    def assignments(self, node: str) -> dict[str, Versioned[bytes]]:
        """The raw ``nodes/<node>/<app>`` values, keyed by app."""
        return {name: v for name, v in self._node_entries(node).items() if "/" not in name}

    def apps_for_node(self, node: str, fresh: bool = True) -> list[AppIntent]:
        """Every app assigned to ``node``, each parsed on its own so one bad app
        never hides the others. ``fresh=False`` takes what this store's watch of the
        node saw instead of reading it again (an agent's pass after a wake-up)."""
        entries = self._node_entries(node, fresh)
        intents = []
        for app, raw in sorted(entries.items()):
            if "/" in app or not app:  # a retry or drain request, or a folder marker
                continue
            key = keys.node_app(node, app)
            if not is_safe_name(app):
                error = f"{key}: app name {app!r} is not allowed: rename the key"
                intents.append(AppIntent(app=app, error=error))
                continue
            try:
                assignment = parse(NodeAssignment, raw.value, key)
            except IntentError as exc:
                intents.append(AppIntent(app=app, error=str(exc)))
                continue
            below = keys.node_apps(node)
            retry = entries.get(keys.retry(node, app).removeprefix(below))
            intents.append(
                replace(
                    self._app_intent_or_error(app, assignment.cluster, fresh),
                    retry_token=_retry_token(retry.value) if retry else None,
                    drained=keys.drain(node, app).removeprefix(below) in entries,
                )
            )
        return intents

    def _app_intent_or_error(self, app: str, cluster: str, fresh: bool) -> AppIntent:
        """``app_intent``, with any failure other than the store's own turned into that
        app's error: whatever one app's values hold, the other apps are still read."""
        try:
            return self._app_intent(app, cluster, fresh)
        except StoreError:
            raise
        except Exception as exc:
            where = keys.cluster(app, cluster)
            return AppIntent(app, cluster, error=f"{where}: cannot be read ({type(exc).__name__})")

    def app_intent(self, app: str, cluster: str) -> AppIntent:
        return self._app_intent(app, cluster, fresh=True)

    def _app_intent(self, app: str, cluster: str, fresh: bool) -> AppIntent:
        # One listing instead of two reads: a node's pass costs one request per app.
        listing = self._listing(self._k(keys.cluster(app, cluster)), fresh)
        values = {e.key: e.value for e in listing}
        errors: list[str] = []
        config = self._parse_value(AppConfig, keys.config(app, cluster), values, errors)
        deploy = self._parse_value(DeployConfig, keys.deploy_config(app, cluster), values, errors)
        return AppIntent(app, cluster, config, deploy, "; ".join(errors) or None)

    def _parse_value(
        self, model: type[M], key: str, values: dict[str, bytes], errors: list[str]
    ) -> M | None:
        """``values[key]`` parsed as ``model``; problems go to ``errors``."""
        raw = values.get(self._k(key))
        if raw is None:
            errors.append(f"{key}: missing")
            return None
        try:
            return parse(model, raw, key)
        except IntentError as exc:
            errors.append(str(exc))
            return None

    def is_assigned(self, node: str, app: str) -> bool:
        """An exact read of one assignment key (no listing, so no filtering by a
        store's access rules hides it)."""
        return self.get_raw(keys.node_app(node, app)) is not None

    def clusters_of(self, app: str) -> list[str]:
        prefix = self._k(keys.app_clusters(app))
        return sorted({e.key[len(prefix) :].split("/", 1)[0] for e in self.kv.list(prefix)})

    def nodes_of(self, app: str) -> dict[str, str]:
        """``{node: cluster}`` for every node the app is assigned to (raw cluster text
        when the assignment is invalid, so operators can still see and fix it)."""
        prefix = self._k(keys.NODES)
        nodes = {}
        for entry in self.kv.list(prefix):
            node, _, name = entry.key[len(prefix) :].partition("/")
            if name != app:
                continue
            try:
                nodes[node] = parse(NodeAssignment, entry.value, entry.key).cluster
            except IntentError:
                nodes[node] = "<invalid>"
        return nodes

    def watch_node(
        self,
        node: str,
        token: NodeWatch | None,
        timeout: float,
        reports_of: Sequence[str] = (),
    ) -> NodeWatch:
        """Block until something this node's agents act on changed: its assignments
        (retry and drain requests included), the intent of a cluster it runs, or the
        reports on this node of an agent in ``reports_of``.
        Nothing else wakes it, so a change to an app costs the nodes that do not run
        it nothing. Until the next call fails, the node's passes may read what this
        call saw (``apps_for_node(fresh=False)``)."""
        prefixes = self._watch_set(node, reports_of)
        marks = token.marks if token is not None and token.prefixes == prefixes else None
        try:
            new, woken = self.kv.wait_entries(prefixes, marks, timeout)
        except BaseException:
            self._seen.clear()
            raise
        self._seen.update(prefixes, woken)
        if marks is None or new[0] != marks[0]:
            # The assignments moved: the next call watches the clusters they name.
            self._clusters_run[node] = self._clusters_assigned(node, woken.get(prefixes[0]))
        return NodeWatch(prefixes, new)

    def _watch_set(self, node: str, reports_of: Sequence[str]) -> tuple[str, ...]:
        """The node's prefix first, then its clusters and the reports."""
        if node not in self._clusters_run:
            self._clusters_run[node] = self._clusters_assigned(node, None)
        return (
            self._k(keys.node_apps(node)),
            *self._clusters_run[node],
            *(self._k(keys.reality(node, agent, "")) for agent in reports_of),
        )

    def _clusters_assigned(self, node: str, listing: list[Entry] | None) -> tuple[str, ...]:
        """Prefixes of the clusters ``node``'s valid assignments name (read when the
        watch did not bring them). An invalid assignment names none: fixing it moves
        the node's prefix, which the watch covers."""
        prefix = self._k(keys.node_apps(node))
        clusters = set()
        for entry in self.kv.list(prefix) if listing is None else listing:
            app = entry.key[len(prefix) :]
            if "/" in app or not is_safe_name(app):
                continue
            try:
                cluster = parse(NodeAssignment, entry.value, entry.key).cluster
            except IntentError:
                continue
            clusters.add(self._k(keys.cluster(app, cluster)))
        return tuple(sorted(clusters))

    # -- reality --------------------------------------------------------------------------

    def write_reality(self, report: Reality) -> None:
        """Record what an agent saw; keeps ``since`` while the status is unchanged.

        A report that repeats the last one is written only as a heartbeat every
        ``REALITY_HEARTBEAT_S``, so idle agents do not churn the store, yet
        ``pp status`` can still tell a live agent from a dead one. A report that
        differs from the one this store last wrote there is written without reading
        the key first (one request per report, not two, when a fleet's agents all
        report a new version); a repeat is checked against what the store holds, so
        a report removed or replaced behind our back is written again."""
        key = self._k(keys.reality(report.node, report.agent, report.app))
        known = self._reported.get(key)
        if known is None or _same_apart_from_time(known, _carry_since(known, report)):
            known = self._stored_reality(key)
        if known is not None:
            report = _carry_since(known, report)
            fresh = report.updated_at - known.updated_at < REALITY_HEARTBEAT_S
            if fresh and _same_apart_from_time(known, report):
                self._reported[key] = known
                return
        self.kv.put(key, report.model_dump_json().encode())
        self._reported[key] = report

    def _stored_reality(self, key: str) -> Reality | None:
        previous = self.kv.get(key)
        if previous is None:
            return None
        try:
            return Reality.model_validate_json(previous.value)
        except ValueError:
            return None

    def clear_reality(self, node: str, agent: str, app: str) -> None:
        key = self._k(keys.reality(node, agent, app))
        self._reported.pop(key, None)
        self.kv.delete(key)

    def reality_of(self, node: str, agent: str) -> dict[str, Reality]:
        """One agent's reports on one node, by app; reports that do not parse are skipped."""
        prefix = self._k(keys.reality_of(node, agent))
        found = {}
        for entry in self.kv.list(prefix):
            try:
                found[entry.key[len(prefix) :]] = Reality.model_validate_json(entry.value)
            except ValueError:
                continue
        return found

    def reality(self, node: str | None = None, app: str | None = None) -> list[Reality]:
        prefix = self._k(keys.REALITY + (f"{node}/" if node else ""))
        reports = []
        for entry in self.kv.list(prefix):
            try:
                report = Reality.model_validate_json(entry.value)
            except ValueError:
                continue
            if app is None or report.app == app:
                reports.append(report)
        return reports

    # -- trust ----------------------------------------------------------------------------

    def identity(self) -> StoreIdentity | None:
        """This store's identity record, None when there is none; IntentError when it
        cannot be read (agents then hold, as for a missing one they knew). Always read
        afresh: it is what tells a wiped or replaced store from intent, and the watch's
        values of different prefixes may come from moments apart."""
        entry = self.kv.get(self._k(keys.IDENTITY))
        if entry is None:
            return None
        return parse(StoreIdentity, entry.value, keys.IDENTITY)

    def ensure_identity(self, actor: str) -> StoreIdentity:
        """The identity record, created first if the store has none (what ``pp init``
        and the first write ``pp`` makes do)."""
        while (found := self.identity()) is None:
            new = StoreIdentity(id=uuid.uuid4().hex, created_by=actor)
            if self.kv.put(self._k(keys.IDENTITY), encode(new.model_dump()), MUST_NOT_EXIST):
                return new
        return found

    def adopt(self, earlier: str, actor: str) -> StoreIdentity:
        """Declare this store the successor of the store whose identity was ``earlier``."""
        while True:
            self.ensure_identity(actor)
            entry = self.kv.get(self._k(keys.IDENTITY))
            if entry is None:
                continue
            current = parse(StoreIdentity, entry.value, keys.IDENTITY)
            if current.succeeds(earlier):
                return current
            adopted = current.model_copy(update={"adopts": [*current.adopts, earlier]})
            if self.kv.put(self._k(keys.IDENTITY), encode(adopted.model_dump()), entry.version):
                return adopted

    def is_emptied(self, node: str) -> bool:
        """Whether an operator recorded that ``node`` is meant to run nothing."""
        return self.get_raw(keys.emptied(node)) is not None

    def write_agent_status(self, status: AgentStatus) -> None:
        """Record whether an agent trusts what it sees; keeps ``since`` while unchanged."""
        key = self._k(keys.agent_status(status.node, status.agent))
        previous = self.kv.get(key)
        if previous is not None:
            try:
                old = AgentStatus.model_validate_json(previous.value)
            except ValueError:
                old = None
            if old is not None and (old.state, old.reason) == (status.state, status.reason):
                status = status.model_copy(update={"since": old.since})
        self.kv.put(key, status.model_dump_json().encode())

    def agent_statuses(self, node: str | None = None) -> list[AgentStatus]:
        prefix = self._k(keys.AGENTS + (f"{node}/" if node else ""))
        statuses = []
        for entry in self.kv.list(prefix):
            try:
                statuses.append(AgentStatus.model_validate_json(entry.value))
            except ValueError:
                continue
        return statuses

    # -- audit ----------------------------------------------------------------------------

    def record_audit(self, record: AuditRecord) -> None:
        # A time-ordered id keeps `pp history` sorted by a plain key listing.
        record_id = f"{time.time_ns():020d}-{uuid.uuid4().hex[:8]}"
        self.kv.put(self._k(keys.audit(record.app, record_id)), record.model_dump_json().encode())

    def history(self, app: str) -> list[AuditRecord]:
        """The app's audit trail, oldest first; records that do not parse are skipped."""
        records = []
        for entry in self.kv.list(self._k(keys.audit_prefix(app))):
            try:
                records.append(AuditRecord.model_validate_json(entry.value))
            except ValueError:
                continue
        return records

    # -- leases ---------------------------------------------------------------------------

    def acquire_lease(self, resource: str, holder: str, limit: int, ttl_s: float) -> bool:
        return self.kv.acquire_lease(self._k(keys.lease(resource)), holder, limit, ttl_s)

    def release_lease(self, resource: str, holder: str) -> None:
        self.kv.release_lease(self._k(keys.lease(resource)), holder)

    def lease_holders(self, resource: str) -> Sequence[str]:
        return self.kv.lease_holders(self._k(keys.lease(resource)))

    def close(self) -> None:
        self.kv.close()


def _retry_token(raw: bytes) -> str | None:
    """The token of a ``pp retry`` request; anything unreadable counts as none."""
    try:
        request = decode_json(raw, "retry")
    except IntentError:
        return None
    token = request.get("token") if isinstance(request, dict) else None
    return token if isinstance(token, str) else None


def _carry_since(old: Reality, new: Reality) -> Reality:
    """``new`` with ``old``'s ``since`` when the status has not changed."""
    return new.model_copy(update={"since": old.since}) if old.status == new.status else new


def _same_apart_from_time(old: Reality, new: Reality) -> bool:
    ignore = {"updated_at"}
    return old.model_dump(exclude=ignore) == new.model_dump(exclude=ignore)
