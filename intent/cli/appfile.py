"""The app file read by ``pp apply``: one YAML document describing one app.

It is the model's values laid out by cluster, so ``pp get APP`` prints the same
shape and an operator can round-trip it: ``pp get hello > hello.yaml``, edit,
``pp apply -f hello.yaml``. A part left out (``config``, ``deploy_config`` or
``nodes``) means "leave what is stored alone", which lets the platform team and
an app team each keep a file for their own half.
"""

from __future__ import annotations

from typing import Any

import yaml
from pydantic import BaseModel, ConfigDict, Field, model_validator

from intent import keys
from intent.model import AppConfig, DeployConfig, IntentError, Name, parse


class ClusterSpec(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)

    config: AppConfig | None = None
    deploy_config: DeployConfig | None = None
    nodes: list[Name] | None = None
    """Nodes that run this cluster of the app; None leaves assignments alone."""


class AppFile(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)

    app: Name
    clusters: dict[Name, ClusterSpec] = Field(min_length=1)

    @model_validator(mode="after")
    def _node_in_one_cluster(self) -> AppFile:
        # nodes/<node>/<app> holds one cluster, so a node cannot run two of them.
        seen: dict[str, str] = {}
        for cluster, spec in self.clusters.items():
            for node in spec.nodes or []:
                if node in seen and seen[node] != cluster:
                    raise ValueError(
                        f"node {node} is listed in clusters {seen[node]} and {cluster};"
                        " a node runs one cluster of an app"
                    )
                if node in seen:
                    raise ValueError(f"node {node} is listed twice in cluster {cluster}")
                seen[node] = cluster
        return self

    def desired(self) -> dict[str, Any]:
        """``{key: JSON value}`` for every value this file sets.

        Values are dumped with only the fields the file wrote, so the stored
        JSON is what the operator wrote (normalised), not the model's defaults.
        """
        values: dict[str, Any] = {}
        for cluster, spec in self.clusters.items():
            if spec.deploy_config is not None:
                values[keys.deploy_config(self.app, cluster)] = _dump(spec.deploy_config)
            if spec.config is not None:
                values[keys.config(self.app, cluster)] = _dump(spec.config)
            for node in spec.nodes or []:
                values[keys.node_app(node, self.app)] = {"cluster": cluster}
        return values


def _dump(model: BaseModel) -> Any:
    return model.model_dump(mode="json", exclude_unset=True)


def parse_app_file(text: str, source: str) -> AppFile:
    """Validate one app file; IntentError names the file, the cluster and the field."""
    try:
        data = yaml.safe_load(text)
    except yaml.YAMLError as exc:
        mark = getattr(exc, "problem_mark", None)
        where = f" at line {mark.line + 1}, column {mark.column + 1}" if mark else ""
        problem = getattr(exc, "problem", None) or "cannot parse"
        raise IntentError(f"{source}: not valid YAML{where}: {problem}") from exc
    if not isinstance(data, dict):
        raise IntentError(f"{source}: expected a mapping with 'app' and 'clusters'")
    return parse(AppFile, data, source)


def read_app_file(path: str) -> AppFile:
    """Read and validate ``path`` (``-`` reads standard input)."""
    if path == "-":
        import sys

        return parse_app_file(sys.stdin.read(), "<stdin>")
    try:
        with open(path, encoding="utf-8") as handle:
            text = handle.read()
    except (OSError, UnicodeDecodeError) as exc:
        reason = exc.strerror if isinstance(exc, OSError) and exc.strerror else str(exc)
        raise IntentError(f"{path}: cannot read: {reason}") from exc
    return parse_app_file(text, path)
