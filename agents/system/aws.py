"""The load balancer calls pp-elb-registrar makes, through boto3, and nothing clever.

Classic ELBs (``elb``) and ELBv2 target groups (``elbv2``): describe this
instance's health, register, deregister, read and add tags. Clients are made
per region and role and kept; credentials come from boto3's usual chain
(environment, profile, instance role) and ``AWS_ENDPOINT_URL`` is honoured. A
load balancer with a ``role_arn`` is reached with that role assumed through STS,
by botocore's own assume-role fetcher wrapped in deferred refreshable
credentials, so they are renewed before they expire.

botocore's own retries are off: throttling, 5xx answers and dropped connections
are retried here with tenacity (exponential backoff, full jitter), cut short by
the agent's stop event, so every call is retried the same way and a stopping
agent does not sleep through a backoff.

Errors, one small tree (each raised from the botocore exception)::

    AwsError            a call failed; ``action`` is the IAM action, ``code`` AWS's code
     ├── NotFound       the load balancer or target group does not exist
     ├── AccessDenied   the credentials may not make the call or assume the role
     └── Unavailable    throttled, 5xx or unreachable, still, after the retries
"""

from __future__ import annotations

import functools
import threading
from collections.abc import Callable, Collection, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, TypeVar

import boto3
import botocore.session
import tenacity
from botocore.config import Config
from botocore.credentials import (
    AssumeRoleCredentialFetcher,
    CredentialProvider,
    CredentialResolver,
    DeferredRefreshableCredentials,
)
from botocore.exceptions import (
    BotoCoreError,
    ClientError,
    HTTPClientError,
    NoCredentialsError,
    SSLError,
)
from botocore.exceptions import ConnectionError as BotoConnectionError

from intent.errors import PlatypusError
from intent.model import ClassicElb, TargetGroup

if TYPE_CHECKING:
    from mypy_boto3_elb import ElasticLoadBalancingClient
    from mypy_boto3_elb.type_defs import InstanceTypeDef
    from mypy_boto3_elbv2 import ElasticLoadBalancingv2Client
    from mypy_boto3_elbv2.type_defs import TargetDescriptionTypeDef

T = TypeVar("T")
LoadBalancer = ClassicElb | TargetGroup
Hook = tuple[str, Callable[..., Any]]

THROTTLING_CODES = frozenset(
    {
        "Throttling",
        "ThrottlingException",
        "ThrottledException",
        "RequestThrottled",
        "RequestThrottledException",
        "RequestLimitExceeded",
        "TooManyRequestsException",
        "SlowDown",
    }
)
ACCESS_DENIED_CODES = frozenset(
    {
        "AccessDenied",
        "AccessDeniedException",
        "UnauthorizedOperation",
        "InvalidClientTokenId",
        "SignatureDoesNotMatch",
        "ExpiredToken",
        "UnrecognizedClientException",
    }
)
NOT_FOUND_CODES = frozenset({"LoadBalancerNotFound", "TargetGroupNotFound"})
_IAM_PREFIX = {"elb": "elasticloadbalancing", "elbv2": "elasticloadbalancing", "sts": "sts"}


class AwsError(PlatypusError):
    def __init__(self, message: str, action: str, code: str | None = None) -> None:
        super().__init__(message)
        self.action = action
        self.code = code


class NotFound(AwsError):
    pass


class AccessDenied(AwsError):
    pass


class Unavailable(AwsError):
    pass


@dataclass(frozen=True)
class TargetHealth:
    """What AWS says of this instance in one load balancer, in AWS's words."""

    state: str
    """Classic: ``InService``, ``OutOfService``, ``Unknown``. Target groups: ``initial``,
    ``healthy``, ``unhealthy``, ``unused``, ``draining``, ``unavailable``."""
    reason: str | None = None
    description: str | None = None


class _AssumedRole(CredentialProvider):
    """Credentials of one assumed role, fetched on first use and renewed by botocore
    before they expire."""

    METHOD = "assume-role"

    def __init__(self, fetcher: AssumeRoleCredentialFetcher) -> None:
        super().__init__()
        self._fetcher = fetcher

    def load(self) -> DeferredRefreshableCredentials:
        return DeferredRefreshableCredentials(self._fetcher.fetch_credentials, self.METHOD)


class Aws:
    def __init__(
        self,
        *,
        session: boto3.Session | None = None,
        endpoint_url: str | None = None,
        session_name: str = "platypus-elb-registrar",
        hooks: Sequence[Hook] = (),
        stop: threading.Event | None = None,
        attempts: int = 5,
        max_backoff_s: float = 8.0,
        timeout_s: float = 10.0,
    ) -> None:
        """``session``: the source of credentials (boto3's default chain when None).
        ``hooks``: botocore event handlers registered on every client made (e.g.
        ``("before-call", count)`` to count calls)."""
        self._base = session if session is not None else boto3.Session()
        self._endpoint_url = endpoint_url
        self._session_name = session_name[:64]
        self._hooks = tuple(hooks)
        self._stop = stop if stop is not None else threading.Event()
        self._attempts = attempts
        self._max_backoff_s = max_backoff_s
        self._config = Config(
            retries={"total_max_attempts": 1, "mode": "standard"},
            connect_timeout=timeout_s,
            read_timeout=timeout_s,
            user_agent_extra="platypus-elb-registrar",
        )
        self._lock = threading.RLock()
        """boto3 sessions are not thread-safe: clients are made one at a time."""
        self._sessions: dict[tuple[str, str], boto3.Session] = {}
        self._clients: dict[tuple[str, str, str | None], Any] = {}

    # -- classic ELB ----------------------------------------------------------------------

    def instance_health(self, lb: ClassicElb, instance_id: str) -> TargetHealth | None:
        """None when AWS does not know the instance in this load balancer at all."""
        client = self._elb(lb)
        try:
            answer = self._call(
                "elb",
                "DescribeInstanceHealth",
                lambda: client.describe_instance_health(
                    LoadBalancerName=lb.name, Instances=[{"InstanceId": instance_id}]
                ),
            )
        except AwsError as exc:
            if exc.code == "InvalidInstance":
                return None
            raise
        for state in answer.get("InstanceStates", []):
            if state.get("InstanceId") == instance_id:
                return TargetHealth(
                    state.get("State", "Unknown"),
                    state.get("ReasonCode"),
                    state.get("Description"),
                )
        return None

    # -- target groups --------------------------------------------------------------------

    def target_health(
        self, tg: TargetGroup, instance_id: str, ports: Collection[int]
    ) -> dict[int, TargetHealth]:
        """The instance's health on each of ``ports``; a port AWS does not answer for
        is left out (not registered on that port)."""
        client = self._elbv2(tg)
        answer = self._call(
            "elbv2",
            "DescribeTargetHealth",
            lambda: client.describe_target_health(
                TargetGroupArn=tg.arn,
                Targets=[{"Id": instance_id, "Port": port} for port in sorted(set(ports))],
            ),
        )
        found: dict[int, TargetHealth] = {}
        for entry in answer.get("TargetHealthDescriptions", []):
            target, health = entry.get("Target", {}), entry.get("TargetHealth", {})
            port = target.get("Port")
            if target.get("Id") == instance_id and port is not None and port in ports:
                found.setdefault(
                    port,
                    TargetHealth(
                        health.get("State", "unavailable"),
                        health.get("Reason"),
                        health.get("Description"),
                    ),
                )
        return found

    # -- both -----------------------------------------------------------------------------

    def register(self, lb: LoadBalancer, instance_id: str) -> None:
        self._membership(lb, instance_id, join=True)

    def deregister(self, lb: LoadBalancer, instance_id: str) -> None:
        """Deregister; an instance that is not registered is not an error."""
        try:
            self._membership(lb, instance_id, join=False)
        except AwsError as exc:
            if exc.code not in ("InvalidInstance", "InvalidTarget"):
                raise

    def _membership(self, lb: LoadBalancer, instance_id: str, join: bool) -> None:
        if isinstance(lb, ClassicElb):
            elb = self._elb(lb)
            instances: list[InstanceTypeDef] = [{"InstanceId": instance_id}]
            if join:
                operation, change = (
                    "RegisterInstancesWithLoadBalancer",
                    elb.register_instances_with_load_balancer,
                )
            else:
                operation, change = (
                    "DeregisterInstancesFromLoadBalancer",
                    elb.deregister_instances_from_load_balancer,
                )
            self._call(
                "elb", operation, lambda: change(LoadBalancerName=lb.name, Instances=instances)
            )
        else:
            elbv2 = self._elbv2(lb)
            targets: list[TargetDescriptionTypeDef] = [{"Id": instance_id, "Port": lb.port}]
            call = elbv2.register_targets if join else elbv2.deregister_targets
            operation = "RegisterTargets" if join else "DeregisterTargets"
            self._call("elbv2", operation, lambda: call(TargetGroupArn=lb.arn, Targets=targets))

    def tags(self, lb: LoadBalancer) -> dict[str, str]:
        descriptions: list[Any]
        if isinstance(lb, ClassicElb):
            elb = self._elb(lb)
            descriptions = self._call(
                "elb", "DescribeTags", lambda: elb.describe_tags(LoadBalancerNames=[lb.name])
            ).get("TagDescriptions", [])
        else:
            elbv2 = self._elbv2(lb)
            descriptions = self._call(
                "elbv2", "DescribeTags", lambda: elbv2.describe_tags(ResourceArns=[lb.arn])
            ).get("TagDescriptions", [])
        return {
            tag["Key"]: tag.get("Value", "")
            for description in descriptions
            for tag in description.get("Tags", [])
        }

    def add_tags(self, lb: LoadBalancer, tags: dict[str, str]) -> None:
        pairs = [{"Key": key, "Value": value} for key, value in sorted(tags.items())]
        if isinstance(lb, ClassicElb):
            elb = self._elb(lb)
            self._call(
                "elb",
                "AddTags",
                lambda: elb.add_tags(LoadBalancerNames=[lb.name], Tags=pairs),  # type: ignore[arg-type]
            )
        else:
            elbv2 = self._elbv2(lb)
            self._call(
                "elbv2",
                "AddTags",
                lambda: elbv2.add_tags(ResourceArns=[lb.arn], Tags=pairs),  # type: ignore[arg-type]
            )

    # -- calls, retries and errors --------------------------------------------------------

    def _call(self, service: str, operation: str, call: Callable[[], T]) -> T:
        retrying = tenacity.Retrying(
            retry=tenacity.retry_if_exception(_transient),
            wait=tenacity.wait_random_exponential(multiplier=0.5, max=self._max_backoff_s),
            stop=tenacity.stop_after_attempt(self._attempts)
            | tenacity.stop_when_event_set(self._stop),
            sleep=self._sleep,
            reraise=True,
        )
        action = f"{_IAM_PREFIX[service]}:{operation}"
        try:
            return retrying(call)
        except ClientError as exc:
            raise _client_error(exc, action) from exc
        except NoCredentialsError as exc:
            raise AccessDenied(
                "no AWS credentials found (environment, profile or instance role)", action
            ) from exc
        except BotoCoreError as exc:
            error = Unavailable if _transient(exc) else AwsError
            raise error(f"{exc} ({action})", action) from exc

    def _sleep(self, seconds: float) -> None:
        self._stop.wait(seconds)

    # -- clients --------------------------------------------------------------------------

    def _elb(self, lb: ClassicElb) -> ElasticLoadBalancingClient:
        client: ElasticLoadBalancingClient = self._client("elb", lb.region, lb.role_arn)
        return client

    def _elbv2(self, lb: TargetGroup) -> ElasticLoadBalancingv2Client:
        client: ElasticLoadBalancingv2Client = self._client("elbv2", lb.region, lb.role_arn)
        return client

    def _client(self, service: str, region: str, role_arn: str | None) -> Any:
        key = (service, region, role_arn)
        with self._lock:
            client = self._clients.get(key)
            if client is None:
                session = self._base if role_arn is None else self._role_session(role_arn, region)
                client = session.client(
                    service,  # type: ignore[call-overload]
                    region_name=region,
                    endpoint_url=self._endpoint_url,
                    config=self._config,
                )
                for event, handler in self._hooks:
                    client.meta.events.register(event, handler)
                self._clients[key] = client
            return client

    def _role_session(self, role_arn: str, region: str) -> boto3.Session:
        key = (role_arn, region)
        session = self._sessions.get(key)
        if session is None:
            source = self._base.get_credentials()
            if source is None:
                raise AccessDenied(
                    f"no AWS credentials found to assume {role_arn} with "
                    "(environment, profile or instance role)",
                    "sts:AssumeRole",
                )
            fetcher = AssumeRoleCredentialFetcher(
                client_creator=functools.partial(self._sts_client, region),
                source_credentials=source,
                role_arn=role_arn,
                extra_args={"RoleSessionName": self._session_name},
            )
            core = botocore.session.Session()
            core.register_component(
                "credential_provider", CredentialResolver([_AssumedRole(fetcher)])
            )
            session = boto3.Session(botocore_session=core, region_name=region)
            self._sessions[key] = session
        return session

    def _sts_client(self, region: str, service: str, **credentials: Any) -> Any:
        """The STS client botocore's fetcher asks for, with the source credentials."""
        with self._lock:
            return self._base.client(
                "sts",
                region_name=region,
                endpoint_url=self._endpoint_url,
                config=self._config,
                **credentials,
            )


def _transient(exc: BaseException) -> bool:
    if isinstance(exc, ClientError):
        code = exc.response.get("Error", {}).get("Code", "")
        status = exc.response.get("ResponseMetadata", {}).get("HTTPStatusCode", 0)
        return code in THROTTLING_CODES or status >= 500
    if isinstance(exc, SSLError):
        return False
    return isinstance(exc, HTTPClientError | BotoConnectionError)


def _client_error(exc: ClientError, action: str) -> AwsError:
    """One line: what AWS said, and the IAM action (of the call that failed: an
    assumed role's ``sts:AssumeRole`` surfaces inside the call it was made for)."""
    error = exc.response.get("Error", {})
    code = error.get("Code") or "Unknown"
    message = " ".join(str(error.get("Message") or code).split())[:300]
    if exc.operation_name == "AssumeRole":
        action = "sts:AssumeRole"
    if code in ACCESS_DENIED_CODES:
        return AccessDenied(f"access denied for {action}: {message}", action, code)
    if code in NOT_FOUND_CODES:
        return NotFound(f"not found ({action}: {code})", action, code)
    if _transient(exc):
        return Unavailable(f"{code} after retries ({action}): {message}", action, code)
    return AwsError(f"{code} ({action}): {message}", action, code)
