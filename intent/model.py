"""The intent model: what operators write and what agents report.

Validation lives here and only here, so the CLI, every agent and the docs agree
on what a valid intent is. Models forbid unknown fields: a misspelt field name
(the original platypus silently ignored ``min_node``) is an error, not a no-op.
"""

from __future__ import annotations

import json
import posixpath
import re
import time
from typing import Annotated, Any, Literal, TypeVar
from urllib.parse import urlsplit

from pydantic import (
    AfterValidator,
    BaseModel,
    ConfigDict,
    Field,
    StringConstraints,
    ValidationError,
    WithJsonSchema,
    field_validator,
    model_validator,
)

from intent import image_ref
from intent.errors import IntentError as IntentError  # parse() raises it: callers import it here
from intent.image_ref import parse_image

M = TypeVar("M", bound=BaseModel)

NAME_PATTERN = r"^[A-Za-z0-9][A-Za-z0-9_.-]{0,63}$"
ENV_NAME_PATTERN = r"^[A-Za-z_][A-Za-z0-9_]{0,127}$"
_USER_PATTERN = r"^[a-z_][a-z0-9_-]{0,31}$"
_SHA256_PATTERN = r"^[0-9a-f]{64}$"
_BASEDIR_PATTERN = r"/[A-Za-z0-9._+/-]+"


def _no_dotdot(value: str) -> str:
    if ".." in value:
        raise ValueError("must not contain '..'")
    return value


def is_safe_name(value: str) -> bool:
    """Whether ``value`` may be used as an app, cluster, node or version name."""
    return re.fullmatch(NAME_PATTERN, value) is not None and ".." not in value


Name = Annotated[str, StringConstraints(pattern=NAME_PATTERN), AfterValidator(_no_dotdot)]
"""App, cluster, node, version and port names: safe in a key, a path and a shell."""

Port = Annotated[int, Field(ge=1, le=65535)]
Sha256 = Annotated[str, StringConstraints(pattern=_SHA256_PATTERN)]


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True, strict=True)


URL_SCHEMES = ("file", "http", "https", "s3")


def _pinned_image(value: str) -> str:
    parse_image(value)
    return value


ImageReference = Annotated[
    str,
    AfterValidator(_pinned_image),
    WithJsonSchema(
        {
            "type": "string",
            "pattern": image_ref.PATTERN,
            "description": "A Docker image pinned by digest: host[:port]/name@sha256:<64 hex>",
        }
    ),
]
"""``host[:port]/name@sha256:<64 hex>`` (``intent.image_ref``): an image pinned by digest."""


class VersionSpec(_Strict):
    """One version: a tarball (``sha256``, and ``url`` unless the preparer has a
    ``--repo``) or a Docker image (``image``, whose digest is the checksum)."""

    state: Literal["active", "prep"]
    sha256: Sha256 | None = None
    url: str | None = Field(default=None, min_length=1)
    image: ImageReference | None = None

    @model_validator(mode="after")
    def _one_artifact(self) -> VersionSpec:
        if self.image is None:
            if self.sha256 is None:
                raise ValueError("sha256: required (or give image for a Docker image)")
            return self
        if self.url is not None:
            raise ValueError("url: not with image (an image is pulled from its registry); drop one")
        if self.sha256 is not None and self.sha256 != parse_image(self.image).sha256:
            raise ValueError("sha256: differs from the image's digest; drop sha256")
        return self

    @property
    def digest(self) -> str:
        """The 64 hex digits the artifact is verified by: the tarball's sha256 or the
        image's manifest digest."""
        if self.image is not None:
            return parse_image(self.image).sha256
        assert self.sha256 is not None  # _one_artifact
        return self.sha256

    @field_validator("url")
    @classmethod
    def _fetchable(cls, value: str | None) -> str | None:
        if value is None:
            return value
        try:
            parts = urlsplit(value)
            parts.port  # noqa: B018 - parsing the port is what validates it
        except ValueError as exc:
            raise ValueError(f"not a valid URL ({exc})") from exc
        if parts.scheme not in URL_SCHEMES or not value.lower().startswith(parts.scheme + "://"):
            raise ValueError(f"must start with {', '.join(s + '://' for s in URL_SCHEMES)}")
        if parts.scheme == "file" and (parts.netloc not in ("", "localhost") or "%" in value):
            # The preparer refuses these too; saying so here names the key at once.
            raise ValueError("use file:///absolute/path, without a host or %-escapes")
        return value


class AppConfig(_Strict):
    """``clusters/<app>/<cluster>/config``: written by the app's owners."""

    versions: dict[Name, VersionSpec] = Field(default_factory=dict)
    min_nodes: int = Field(default=0, ge=0)
    user_config: dict[str, Any] = Field(default_factory=dict)

    @model_validator(mode="after")
    def _one_active(self) -> AppConfig:
        active = [v for v, spec in self.versions.items() if spec.state == "active"]
        if len(active) > 1:
            raise ValueError(f"versions: only one may be active, found {', '.join(sorted(active))}")
        return self

    @property
    def active_version(self) -> str | None:
        """The version that should run, or None when the app is stopped."""
        return next((v for v, s in self.versions.items() if s.state == "active"), None)


class PortSpec(_Strict):
    name: Name
    port: Port
    protocol: Literal["tcp", "udp"] = "tcp"
    public_port: Port | None = None


class HealthCheck(_Strict):
    type: Literal["http", "tcp", "exec"]
    port: Port | None = None
    path: str = "/health"
    timeout_s: float = Field(default=2.0, gt=0)
    interval_s: float = Field(default=1.0, gt=0)
    healthy_threshold: int = Field(default=3, ge=1)
    unhealthy_threshold: int = Field(default=3, ge=1)
    deadline_s: float = Field(default=60.0, gt=0)
    min_uptime_s: float = Field(default=2.0, ge=0)

    @field_validator("path")
    @classmethod
    def _path_is_absolute(cls, value: str) -> str:
        if not value.startswith("/"):
            raise ValueError("must start with '/'")
        return value


class ClassicElb(_Strict):
    type: Literal["classic"]
    name: Annotated[str, StringConstraints(pattern=r"^[A-Za-z0-9-]{1,32}$")]
    region: Annotated[str, StringConstraints(pattern=r"^[a-z0-9-]{1,32}$")]
    role_arn: str | None = None


class TargetGroup(_Strict):
    type: Literal["target_group"]
    arn: Annotated[str, StringConstraints(pattern=r"^arn:[^\s]+$")]
    port: Port
    region: Annotated[str, StringConstraints(pattern=r"^[a-z0-9-]{1,32}$")]
    role_arn: str | None = None


LoadBalancer = Annotated[ClassicElb | TargetGroup, Field(discriminator="type")]


class DeployConfig(_Strict):
    """``clusters/<app>/<cluster>/deploy_config``: the privileged half.

    It decides paths, users and ports, so the platform team owns it and app
    owners should not be granted write access to it (see docs/operations.md).
    """

    basedir: str
    run_as: Annotated[str, StringConstraints(pattern=_USER_PATTERN)] = "nobody"
    ports: list[PortSpec] = Field(default_factory=list)
    health_check: HealthCheck | None = None
    env: dict[Annotated[str, StringConstraints(pattern=ENV_NAME_PATTERN)], str] = Field(
        default_factory=dict
    )
    elb: list[LoadBalancer] = Field(default_factory=list)

    @field_validator("basedir")
    @classmethod
    def _basedir_is_absolute(cls, value: str) -> str:
        if not value.startswith("/"):
            raise ValueError("must be an absolute path")
        if value == "/" or posixpath.normpath(value) != value.rstrip("/") or ".." in value:
            raise ValueError("must be a normalised absolute path other than '/'")
        if not re.fullmatch(_BASEDIR_PATTERN, value):
            # It ends up in run scripts, unit files and log lines: no quoting to get wrong.
            raise ValueError("may hold only letters, digits, '/', '.', '_', '+' and '-'")
        return value.rstrip("/")

    @field_validator("elb", mode="before")
    @classmethod
    def _one_or_many(cls, value: Any) -> Any:
        return [value] if isinstance(value, dict) else value

    @model_validator(mode="after")
    def _unique_ports(self) -> DeployConfig:
        _reject_duplicates("ports: name", [p.name for p in self.ports])
        _reject_duplicates("ports: port", [f"{p.port}/{p.protocol}" for p in self.ports])
        _reject_duplicates(
            "ports: public_port",
            [f"{p.public_port}/{p.protocol}" for p in self.ports if p.public_port is not None],
        )
        return self


def _reject_duplicates(what: str, values: list[str]) -> None:
    seen: set[str] = set()
    for value in values:
        if value in seen:
            raise ValueError(f"{what} {value} appears more than once")
        seen.add(value)


class NodeAssignment(_Strict):
    """``nodes/<node>/<app>``: which cluster of the app this node runs."""

    cluster: Name


Status = Literal["converged", "converging", "error"]


class Reality(BaseModel):
    """``reality/<node>/<agent>/<app>``: what one agent saw and did."""

    model_config = ConfigDict(extra="allow")

    node: str
    agent: str
    app: str
    status: Status
    version: str | None = None
    error: str | None = None
    details: dict[str, Any] = Field(default_factory=dict)
    updated_at: float = Field(default_factory=time.time)
    since: float = Field(default_factory=time.time)
    """When the status last changed: 'error for 3 h' differs from 'error for 3 s'."""


class StoreIdentity(BaseModel):
    """``identity``: which store this is, so agents can tell it from a wiped or another one.

    Created with the first write ``pp`` makes (or ``pp init``). ``adopts`` lists earlier
    identities an operator has declared this store the successor of (``pp init --adopt``),
    so agents that knew one of them resume instead of holding."""

    id: str
    created_at: float = Field(default_factory=time.time)
    created_by: str = ""
    adopts: list[str] = Field(default_factory=list)

    def succeeds(self, known: str) -> bool:
        return known == self.id or known in self.adopts


AgentState = Literal["trusting", "held"]


class AgentStatus(BaseModel):
    """``agents/<node>/<agent>``: whether an agent acts on the intent it sees, and why not."""

    node: str
    agent: str
    state: AgentState
    reason: str | None = None
    since: float = Field(default_factory=time.time)
    updated_at: float = Field(default_factory=time.time)


class AuditRecord(BaseModel):
    """``audit/<app>/<id>``: one change made through the ``pp`` CLI."""

    app: str
    key: str
    action: str
    actor: str
    at: float = Field(default_factory=time.time)
    old: Any = None
    new: Any = None


def describe(error: ValidationError) -> str:
    """Turn pydantic's multi-line report into one line an operator can act on."""
    parts = []
    for item in error.errors():
        where = ".".join(str(p) for p in item["loc"]) or "value"
        message = item["msg"].removeprefix("Value error, ")
        parts.append(f"{where}: {message}")
    return "; ".join(parts)


MAX_VALUE_BYTES = 512 * 1024
"""The largest stored value read as intent: Consul's own default limit (``kv_max_value_size``),
so the embedded store holds to the same bound."""

MAX_DEPTH = 32
"""How deeply stored JSON may nest. Real intent nests a few levels; a value nested
thousands deep would exhaust the recursion limit of whatever reads it next."""


MAX_INT_DIGITS = 1000
"""Python refuses to convert integers of more than 4,300 digits; refuse sooner, by name."""


def _no_constant(name: str) -> Any:
    raise ValueError(f"{name} is not JSON")


def _bounded_int(text: str) -> int:
    digits = len(text.lstrip("-"))
    if digits > MAX_INT_DIGITS:
        raise ValueError(f"an integer has {digits} digits, the most is {MAX_INT_DIGITS}")
    return int(text)


def decode_json(raw: bytes | str, key: str) -> Any:
    """One stored value as JSON, within ``MAX_VALUE_BYTES`` and ``MAX_DEPTH``.

    Anyone who may write a key can write anything into it (``consul kv put`` does no
    checking), so every way the decoder can fail becomes an IntentError naming the key:
    bad syntax, bad UTF-8, ``NaN``, a 5,000-digit integer (ValueError), nesting deep
    enough for a RecursionError."""
    size = len(raw.encode() if isinstance(raw, str) else raw)
    if size > MAX_VALUE_BYTES:
        raise IntentError(f"{key}: value is {size} bytes, more than {MAX_VALUE_BYTES}; shorten it")
    try:
        data = json.loads(raw, parse_constant=_no_constant, parse_int=_bounded_int)
    except json.JSONDecodeError as exc:
        raise IntentError(f"{key}: not valid JSON ({exc.msg} at char {exc.pos})") from exc
    except UnicodeDecodeError as exc:
        raise IntentError(f"{key}: not valid UTF-8") from exc
    except RecursionError as exc:
        raise IntentError(f"{key}: nested more than {MAX_DEPTH} levels deep") from exc
    except ValueError as exc:  # NaN, an integer too long to convert
        raise IntentError(f"{key}: not usable JSON ({exc})") from exc
    if _depth_exceeds(data, MAX_DEPTH):
        raise IntentError(f"{key}: nested more than {MAX_DEPTH} levels deep")
    return data


def _depth_exceeds(value: Any, limit: int) -> bool:
    """Whether containers nest deeper than ``limit``; iterative, so it cannot recurse out."""
    if not isinstance(value, dict | list):
        return False
    stack: list[tuple[dict[str, Any] | list[Any], int]] = [(value, 1)]
    while stack:
        item, depth = stack.pop()
        for child in item.values() if isinstance(item, dict) else item:
            if isinstance(child, dict | list):
                if depth + 1 > limit:
                    return True
                stack.append((child, depth + 1))
    return False


def parse(model: type[M], raw: bytes | str | dict[str, Any], key: str) -> M:
    """Parse one stored value, raising IntentError naming the key on failure."""
    if isinstance(raw, bytes | str):
        data = decode_json(raw, key)
    elif _depth_exceeds(raw, MAX_DEPTH):
        raise IntentError(f"{key}: nested more than {MAX_DEPTH} levels deep")
    else:
        data = raw
    if not isinstance(data, dict):
        raise IntentError(f"{key}: expected a JSON object, got {type(data).__name__}")
    try:
        return model.model_validate(data)
    except ValidationError as exc:
        raise IntentError(f"{key}: {describe(exc)}") from exc
