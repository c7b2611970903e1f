"""The key layout, in one place. Keys here are relative to the store's prefix."""

from __future__ import annotations

DEFAULT_PREFIX = "platypus/"

NODES = "nodes/"
CLUSTERS = "clusters/"
REALITY = "reality/"
AUDIT = "audit/"
LEASES = "leases/"
AGENTS = "agents/"
EMPTIED = "emptied/"

IDENTITY = "identity"
"""This store's identity: which intent the agents have been converging (see trust)."""


def node_apps(node: str) -> str:
    """Prefix listing one node's assignments. The trailing slash keeps ``web1`` from ``web10``."""
    return f"{NODES}{node}/"


def node_app(node: str, app: str) -> str:
    return f"{NODES}{node}/{app}"


def retry(node: str, app: str) -> str:
    """An operator's request that setlive try a failed version again (``pp retry``).
    Below the assignment, so the node's own watch sees it."""
    return f"{NODES}{node}/{app}/retry"


def drain(node: str, app: str) -> str:
    """An operator's request that ``app`` on ``node`` be taken out of its load balancers
    (``pp drain``); below the assignment, so the node's own watch sees it."""
    return f"{NODES}{node}/{app}/drain"


def app_clusters(app: str) -> str:
    return f"{CLUSTERS}{app}/"


def cluster(app: str, cluster: str) -> str:
    """Prefix of one cluster's values: one listing reads config and deploy_config."""
    return f"{CLUSTERS}{app}/{cluster}/"


def config(app: str, cluster: str) -> str:
    return f"{CLUSTERS}{app}/{cluster}/config"


def deploy_config(app: str, cluster: str) -> str:
    return f"{CLUSTERS}{app}/{cluster}/deploy_config"


def reality(node: str, agent: str, app: str) -> str:
    return f"{REALITY}{node}/{agent}/{app}"


def reality_of(node: str, agent: str) -> str:
    """Prefix listing one agent's reports on one node."""
    return f"{REALITY}{node}/{agent}/"


def audit_prefix(app: str) -> str:
    return f"{AUDIT}{app}/"


def audit(app: str, record_id: str) -> str:
    return f"{AUDIT}{app}/{record_id}"


def lease(resource: str) -> str:
    return f"{LEASES}{resource}/"


def emptied(node: str) -> str:
    """An operator's record that ``node`` is meant to run nothing (``pp unassign --all``):
    without it, a node whose every assignment vanishes at once is held, not emptied."""
    return f"{EMPTIED}{node}"


def agent_status(node: str, agent: str) -> str:
    """One agent's own state on one node (held or trusting), apart from its apps."""
    return f"{AGENTS}{node}/{agent}"


def last_segment(key: str) -> str:
    return key.rstrip("/").rsplit("/", 1)[-1]
