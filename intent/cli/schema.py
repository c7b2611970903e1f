"""The JSON Schema of the intent model, as ``pp schema`` prints it.

The document's root is the app file, so an editor pointed at it validates
``pp apply`` files as they are typed; ``$defs`` also holds every stored value
(config, deploy_config, node assignment) and what agents report (reality,
audit records), for anyone writing to the store with other tools. It is
generated from the pydantic models, so it cannot drift from what the agents
accept; ``docs/intent.schema.json`` is a copy a test keeps current.
"""

from __future__ import annotations

from typing import Any

from pydantic import BaseModel
from pydantic.json_schema import JsonSchemaMode, models_json_schema

from intent.cli.appfile import AppFile
from intent.model import AppConfig, AuditRecord, DeployConfig, NodeAssignment, Reality

_MODELS: list[tuple[type[BaseModel], JsonSchemaMode]] = [
    (AppFile, "validation"),
    (AppConfig, "validation"),
    (DeployConfig, "validation"),
    (NodeAssignment, "validation"),
    (Reality, "serialization"),
    (AuditRecord, "serialization"),
]


def intent_schema() -> dict[str, Any]:
    _, definitions = models_json_schema(_MODELS, ref_template="#/$defs/{model}")
    return {
        "$schema": "https://json-schema.org/draft/2020-12/schema",
        "title": "Platypus intent",
        "description": (
            "The root validates a pp apply app file; $defs holds each stored value: "
            "AppConfig (clusters/<app>/<cluster>/config), DeployConfig "
            "(clusters/<app>/<cluster>/deploy_config), NodeAssignment (nodes/<node>/<app>), "
            "Reality (reality/<node>/<agent>/<app>) and AuditRecord (audit/<app>/<id>)."
        ),
        "$ref": "#/$defs/AppFile",
        "$defs": definitions["$defs"],
    }
