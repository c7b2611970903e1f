"""What ``pp`` changes, kept out of click so it can be tested with plain data.

Every change is a read-modify-write of one key: read the value and its version,
compute the new value with a pure function, write it only if the version is
unchanged. When someone else wrote in between, the cycle starts again from a
fresh read, so two operators deploying at once both get their change in, one
after the other, instead of the second silently undoing the first.
"""

from __future__ import annotations

import getpass
import os
import random
import re
import time
import uuid
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

from pydantic import TypeAdapter, ValidationError

from intent import keys
from intent.cli.appfile import AppFile
from intent.model import (
    AppConfig,
    AuditRecord,
    DeployConfig,
    IntentError,
    Name,
    NodeAssignment,
    VersionSpec,
    decode_json,
    describe,
    parse,
)
from intent.store import MUST_NOT_EXIST, IntentStore

ATTEMPTS = 5
"""Read-modify-write cycles tried before giving up on a key others keep changing."""

Json = Any
Transform = Callable[[Json], Json]
"""Current JSON value (None when absent) -> new value (None deletes the key)."""

_NAME = TypeAdapter(Name)


class OperatorError(Exception):
    """A change ``pp`` refuses to make; the message is one line saying why."""


class Conflict(OperatorError):
    """Others kept changing a key while we tried to change it."""


def actor() -> str:
    """Who is making the change, for the audit trail: ``$PP_ACTOR`` or the login user."""
    if name := os.environ.get("PP_ACTOR"):
        return name
    try:
        return getpass.getuser()
    except (KeyError, OSError):
        # A container may run under a uid with no passwd entry.
        return f"uid:{os.getuid()}"


def check_name(what: str, value: str) -> str:
    try:
        return _NAME.validate_python(value)
    except ValidationError as exc:
        raise OperatorError(
            f"{what} {value!r}: use 1-64 letters, digits, '.', '_' or '-',"
            " starting with a letter or digit, without '..'"
        ) from exc


def decode(raw: bytes) -> Json:
    """A stored value as JSON, or its text when it is not JSON (so a diff can show it)."""
    try:
        return decode_json(raw, "value")
    except IntentError:
        return raw.decode("utf-8", "replace")


def dump(model: AppConfig | DeployConfig | NodeAssignment) -> Json:
    return model.model_dump(mode="json", exclude_unset=True)


# -- the read-modify-write cycle ----------------------------------------------------------


@dataclass(frozen=True)
class Change:
    key: str
    old: Json
    new: Json

    @property
    def changed(self) -> bool:
        return bool(self.old != self.new)


def update(
    store: IntentStore,
    key: str,
    transform: Transform,
    *,
    app: str,
    action: str,
    who: str,
    attempts: int = ATTEMPTS,
) -> Change:
    """Apply ``transform`` to ``key`` with compare-and-set, retrying on conflict.

    An unchanged value is not written and leaves no audit record, so re-running
    a command is harmless. Raises Conflict after ``attempts`` lost races.
    """
    for attempt in range(attempts):
        current = store.get_raw(key)
        old = decode(current.value) if current else None
        new = transform(old)
        if new == old:
            return Change(key, old, new)
        store.ensure_identity(who)
        expect = current.version if current else MUST_NOT_EXIST
        if new is None:
            written = store.delete(key, expect=expect)
        else:
            written = store.put_json(key, new, expect=expect)
        if written:
            store.record_audit(
                AuditRecord(app=app, key=key, action=action, actor=who, old=old, new=new)
            )
            return Change(key, old, new)
        # Jitter so two writers that collided do not collide again in lock-step.
        time.sleep(random.uniform(0.005, 0.02) * (attempt + 1))
    raise Conflict(
        f"{key}: changed by someone else on each of {attempts} attempts; nothing written,"
        " re-run the command"
    )


# -- pure transforms ----------------------------------------------------------------------


def parse_config(value: Json, key: str) -> AppConfig | None:
    """The stored config, refusing to build on one that is invalid."""
    if value is None:
        return None
    if not isinstance(value, dict):
        raise IntentError(f"{key}: expected a JSON object; fix it with pp apply")
    return parse(AppConfig, value, key)


def _validated(config: AppConfig, key: str) -> AppConfig:
    # model_copy skips validation; re-validate so a transform can never store
    # something the agents would reject.
    return parse(AppConfig, dump(config), key)


def deployed(
    config: AppConfig | None,
    version: str,
    sha256: str | None,
    url: str | None,
    key: str,
    image: str | None = None,
) -> AppConfig:
    """``version`` becomes active; the version active until now is kept as prep.

    The version is a tarball (``sha256``, ``url``) or a Docker image (``image``).
    Other prep versions are left alone: they may be staged for a later deploy,
    and dropping a version is a decision for ``pp apply``. Versions are
    immutable: reusing a version name with another artifact is refused.
    """
    if (sha256 is None) == (image is None):
        raise OperatorError("give either --sha256 (a tarball) or --image (a Docker image)")
    if sha256 is not None and not re.fullmatch(r"[0-9a-f]{64}", sha256):
        raise OperatorError(f"sha256 {sha256!r}: expected 64 lowercase hex digits")
    if image is not None and url is not None:
        raise OperatorError("--url is for tarballs; an image is pulled from its registry")
    config = config or AppConfig()
    existing = config.versions.get(version)
    if existing is not None and (existing.sha256, existing.image) != (sha256, image):
        was = f"image {existing.image}" if existing.image else f"sha256 {existing.sha256}"
        raise OperatorError(
            f"{key}: version {version} already exists with {was};"
            " a version's artifact never changes, deploy it under a new version"
        )
    fields: dict[str, Any] = {"state": "active"}
    if image is not None:
        fields["image"] = image
    else:
        fields["sha256"] = sha256
        if url is not None:
            fields["url"] = url
        elif existing is not None and existing.url is not None:
            fields["url"] = existing.url
    try:
        spec = VersionSpec.model_validate(fields)
    except ValidationError as exc:
        raise IntentError(f"{key}: versions.{version}.{describe(exc)}") from exc
    versions = {
        name: (s.model_copy(update={"state": "prep"}) if s.state == "active" else s)
        for name, s in config.versions.items()
    }
    versions[version] = spec
    return _validated(config.model_copy(update={"versions": versions}), key)


def version_of_image(config: AppConfig, image: str, key: str) -> str:
    """The version whose ``image`` is ``image`` (``pp rollback --to`` takes either)."""
    named = sorted(v for v, spec in config.versions.items() if spec.image == image)
    if not named:
        raise OperatorError(f"{key}: no version has image {image}")
    if len(named) > 1:
        raise OperatorError(f"{key}: versions {', '.join(named)} all have image {image}; use one")
    return named[0]


def rolled_back(config: AppConfig, to: str, key: str) -> AppConfig:
    """``to`` becomes active again; the version active until now becomes prep."""
    if to not in config.versions:
        have = ", ".join(sorted(config.versions)) or "none"
        raise OperatorError(f"{key}: no version {to} to roll back to (versions: {have})")
    if config.versions[to].state == "active":
        raise OperatorError(f"{key}: {to} is already the active version")
    versions = {}
    for name, spec in config.versions.items():
        if name == to:
            spec = spec.model_copy(update={"state": "active"})
        elif spec.state == "active":
            spec = spec.model_copy(update={"state": "prep"})
        versions[name] = spec
    return _validated(config.model_copy(update={"versions": versions}), key)


def _active_in(value: Json) -> str | None:
    if not isinstance(value, dict) or not isinstance(value.get("versions"), dict):
        return None
    for name, spec in value["versions"].items():
        if isinstance(spec, dict) and spec.get("state") == "active":
            return str(name)
    return None


def rollback_target(config: AppConfig, history: Sequence[AuditRecord], key: str) -> str:
    """The version to make active again when the operator did not say which.

    One prep version: that one. Several: the most recently active of them
    according to the audit trail of this key (newest record first). When the
    trail cannot tell (the config was written outside ``pp``), ask for ``--to``.
    ``history`` is oldest first, as ``IntentStore.history`` returns it.
    """
    current = config.active_version
    preps = sorted(name for name, s in config.versions.items() if s.state == "prep")
    if not preps:
        raise OperatorError(f"{key}: no prep version to roll back to")
    if len(preps) == 1:
        return preps[0]
    for record in reversed([r for r in history if r.key == key]):
        for value in (record.new, record.old):
            active = _active_in(value)
            if active is not None and active != current and active in preps:
                return active
    raise OperatorError(
        f"{key}: several prep versions ({', '.join(preps)}) and the audit trail does not"
        " say which was active last; choose one with --to VERSION"
    )


# -- apply --------------------------------------------------------------------------------


@dataclass(frozen=True)
class PlannedWrite:
    key: str
    old: Json
    new: Json
    version: int
    """Version read (MUST_NOT_EXIST when absent): the write happens only if still current."""


def plan_apply(store: IntentStore, app_file: AppFile, prune_nodes: bool) -> list[PlannedWrite]:
    """Every key ``app_file`` changes: deploy configs, then configs, then nodes.

    That order means a node is only pointed at a cluster once its intent is in
    place. With ``prune_nodes``, nodes assigned to a cluster that lists its
    nodes, but absent from every list in the file, are unassigned last.
    """
    desired = app_file.desired()
    ordered = sorted(
        desired, key=lambda k: (not k.endswith("/deploy_config"), k.startswith(keys.NODES), k)
    )
    plan = []
    for key in ordered:
        current = store.get_raw(key)
        old = decode(current.value) if current else None
        if old != desired[key]:
            version = current.version if current else MUST_NOT_EXIST
            plan.append(PlannedWrite(key, old, desired[key], version))
    if prune_nodes:
        listed = {node for spec in app_file.clusters.values() for node in spec.nodes or []}
        pruned_clusters = {c for c, spec in app_file.clusters.items() if spec.nodes is not None}
        for node, cluster in sorted(store.nodes_of(app_file.app).items()):
            if node in listed or cluster not in pruned_clusters:
                continue
            key = keys.node_app(node, app_file.app)
            current = store.get_raw(key)
            if current is not None:
                plan.append(PlannedWrite(key, decode(current.value), None, current.version))
    return plan


def changed_artifacts(old: Json, new: Json) -> list[str]:
    """Versions present in both values whose artifact (sha256 or image) differs.

    ``pp deploy`` refuses this; ``pp apply`` allows it (replacing placeholder
    digests with real ones is legitimate) but says so, since nodes that
    installed the version must now fetch a different artifact under its name."""
    if not isinstance(old, dict) or not isinstance(new, dict):
        return []
    before, after = old.get("versions"), new.get("versions")
    if not isinstance(before, dict) or not isinstance(after, dict):
        return []
    return sorted(
        name
        for name, spec in after.items()
        if isinstance(spec, dict)
        and isinstance(before.get(name), dict)
        and any(before[name].get(f) != spec.get(f) for f in ("sha256", "image"))
    )


def execute_apply(store: IntentStore, app: str, plan: Sequence[PlannedWrite], who: str) -> None:
    """Write ``plan`` key by key, each only if unchanged since it was read.

    The store has no multi-key transaction, so a conflict half-way leaves the
    earlier keys written; the message says how many, and re-running ``pp apply``
    (which diffs against the store again) finishes the job.
    """
    if plan:
        store.ensure_identity(who)
    for done, item in enumerate(plan):
        if item.new is None:
            written = store.delete(item.key, expect=item.version)
        else:
            written = store.put_json(item.key, item.new, expect=item.version)
        if not written:
            raise Conflict(
                f"{item.key} changed since it was read; {done} of {len(plan)} changes written,"
                " re-run pp apply to see the new diff"
            )
        store.record_audit(
            AuditRecord(
                app=app, key=item.key, action="apply", actor=who, old=item.old, new=item.new
            )
        )


# -- reading an app back ------------------------------------------------------------------


@dataclass(frozen=True)
class AppView:
    """An app as stored, in the app-file layout, with what is wrong with it."""

    document: dict[str, Any]
    problems: list[str]


def read_app(store: IntentStore, app: str) -> AppView:
    assigned = store.nodes_of(app)
    clusters = sorted(
        set(store.clusters_of(app)) | {c for c in assigned.values() if c != "<invalid>"}
    )
    problems: list[str] = []
    document: dict[str, Any] = {"app": app, "clusters": {}}
    for cluster in clusters:
        nodes = sorted(n for n, c in assigned.items() if c == cluster)
        entry: dict[str, Any] = {}
        for name, key, model in (
            ("config", keys.config(app, cluster), AppConfig),
            ("deploy_config", keys.deploy_config(app, cluster), DeployConfig),
        ):
            raw = store.get_raw(key)
            if raw is None:
                if nodes:
                    problems.append(f"{key}: missing, yet {', '.join(nodes)} run this cluster")
                continue
            entry[name] = decode(raw.value)
            try:
                parse(model, raw.value, key)
            except IntentError as exc:
                problems.append(str(exc))
        entry["nodes"] = nodes
        document["clusters"][cluster] = entry
    for node in sorted(n for n, c in assigned.items() if c == "<invalid>"):
        key = keys.node_app(node, app)
        raw = store.get_raw(key)
        if raw is None:
            continue
        try:
            parse(NodeAssignment, raw.value, key)
        except IntentError as exc:
            problems.append(str(exc))
    return AppView(document, problems)


def request_retry(
    store: IntentStore, app: str, node: str | None = None, actor: str = "unknown"
) -> list[str]:
    """``pp retry``: ask setlive to try a version that failed its health gate once more.

    After a rolled-back deploy setlive leaves the failed version alone until the intent
    changes. A retry is a fresh random token at ``nodes/<node>/<app>/retry`` for ``node``
    (or every node the app is assigned to), audited; it is part of the app's intent, so
    the node's watch wakes setlive at once. Returns the nodes written; raises IntentError
    naming what to fix."""
    assigned = store.nodes_of(app)
    if node is not None:
        if node not in assigned:
            raise IntentError(f"{keys.node_app(node, app)}: app {app} is not assigned to {node}")
        nodes = [node]
    else:
        nodes = sorted(assigned)
        if not nodes:
            raise IntentError(f"{keys.NODES}*/{app}: app {app} is not assigned to any node")
    store.ensure_identity(actor)
    for target in nodes:
        value = {"token": uuid.uuid4().hex, "at": time.time(), "actor": actor}
        key = keys.retry(target, app)
        store.put_json(key, value)
        store.record_audit(AuditRecord(app=app, key=key, action="retry", actor=actor, new=value))
    return nodes


# -- emptying a node on purpose -----------------------------------------------------------


def unassign(store: IntentStore, node: str, apps: Sequence[str], who: str) -> list[str]:
    """Delete ``node``'s assignments of ``apps``; returns the apps it ran.

    When that leaves the node running nothing, the node is first recorded as emptied
    on purpose (``emptied/<node>``): agents hold a node whose every assignment vanishes
    at once without that record, since a wiped store looks the same (agents/trust.py)."""
    remaining = set(store.assignments(node)) - set(apps)
    if not remaining:
        store.ensure_identity(who)
        store.put_json(keys.emptied(node), {"at": time.time(), "actor": who})
    removed = []
    for app in apps:
        change = update(
            store, keys.node_app(node, app), lambda _old: None, app=app, action="unassign", who=who
        )
        if change.changed:
            removed.append(app)
    return removed


def clear_emptied(store: IntentStore, node: str) -> None:
    """``node`` runs something again: it is no longer meant to be empty."""
    if store.is_emptied(node):
        store.delete(keys.emptied(node))


def drain(store: IntentStore, node: str, apps: Sequence[str], who: str, on: bool) -> list[str]:
    """``pp drain``/``undrain``: ask the node's load-balancer registrar to take ``apps``
    out of (or put them back into) their load balancers. Returns the apps changed."""
    assigned = store.assignments(node)
    for app in apps:
        if app not in assigned:
            raise IntentError(f"{keys.node_app(node, app)}: {app} is not assigned to {node}")
    request = {"at": time.time(), "actor": who}

    def transform(old: Json) -> Json:
        # An existing request is kept as it is: it says since when the node drains.
        return (old if old is not None else request) if on else None

    action = "drain" if on else "undrain"
    changed = []
    for app in apps:
        if update(store, keys.drain(node, app), transform, app=app, action=action, who=who).changed:
            changed.append(app)
    return changed
