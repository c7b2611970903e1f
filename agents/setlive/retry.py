"""``pp retry APP [--node N]``: try a version that failed its health gate once more.

After a rolled-back deploy setlive leaves the failed version alone until the
intent changes. A retry is a new random token at

    nodes/<node>/<app>/retry   {"token": "...", "at": <unix time>, "actor": "..."}

one per node the app is assigned to (or only ``--node``). setlive remembers
the token it failed under and tries again when the stored one differs. The key
sits under the node's own prefix so the node's intent watch wakes setlive at
once; the node's assignment listing ignores keys below ``<app>/``.
"""

from __future__ import annotations

import time
import uuid

from intent import keys
from intent.model import AuditRecord, IntentError
from intent.store import IntentStore


def retry_key(node: str, app: str) -> str:
    """The retry token's key, relative to the store prefix."""
    return keys.retry(node, app)


def request_retry(
    store: IntentStore, app: str, node: str | None = None, actor: str = "unknown"
) -> list[str]:
    """Write a fresh retry token for ``app`` on ``node`` (or every node it is assigned to);
    returns the nodes written. Raises IntentError naming what to fix."""
    assigned = store.nodes_of(app)
    if node is not None:
        if node not in assigned:
            raise IntentError(f"{keys.node_app(node, app)}: app {app} is not assigned to {node}")
        nodes = [node]
    else:
        nodes = sorted(assigned)
        if not nodes:
            raise IntentError(f"{keys.NODES}*/{app}: app {app} is not assigned to any node")
    for target in nodes:
        value = {"token": uuid.uuid4().hex, "at": time.time(), "actor": actor}
        store.put_json(retry_key(target, app), value)
        store.record_audit(
            AuditRecord(app=app, key=retry_key(target, app), action="retry", actor=actor, new=value)
        )
    return nodes
