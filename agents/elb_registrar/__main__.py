"""The ``pp-elb-registrar`` command."""

from __future__ import annotations

import re
import threading
from pathlib import Path
from typing import Any

import click

from agents import entrypoint, metrics, statedir
from agents.elb_registrar.agent import DEFAULT_STATE_DIR, ElbRegistrar, Identity
from agents.elb_registrar.apply import Settings
from agents.system.aws import Aws
from agents.system.imds import DEFAULT_ENDPOINT
from intent.store import IntentStore

_INSTANCE_ID = re.compile(r"^i-[0-9a-f]{8,17}$")


def _instance_id(ctx: click.Context, param: click.Parameter, value: str | None) -> str | None:
    if value is not None and not _INSTANCE_ID.match(value):
        raise click.BadParameter(f"{value!r} is not an EC2 instance id (i-0123456789abcdef0)")
    return value


@click.command("pp-elb-registrar", cls=entrypoint.AgentCommand)
@entrypoint.common_options
@click.option(
    "--instance-id",
    envvar="PP_INSTANCE_ID",
    callback=_instance_id,
    help="This instance's id [default: asked of the instance metadata service, IMDSv2].",
)
@click.option(
    "--imds-endpoint",
    default=DEFAULT_ENDPOINT,
    show_default=True,
    help="The instance metadata service (tests point it at a loopback server).",
)
@click.option(
    "--state-dir",
    type=click.Path(file_okay=False, path_type=Path),
    default=None,
    show_default=f"{DEFAULT_STATE_DIR} for root, else ~/.local/state/platypus/elb-registrar",
    help="Where the agent records which load balancers it registered each app in.",
)
@click.option(
    "--inservice-timeout",
    type=click.FloatRange(min=1),
    default=300.0,
    show_default=True,
    help="Seconds to wait for InService/healthy after registering.",
)
@click.option(
    "--drain-timeout",
    type=click.FloatRange(min=1),
    default=330.0,
    show_default=True,
    help="Seconds to wait for connection draining after deregistering, per pass.",
)
@click.option(
    "--poll-interval",
    type=click.FloatRange(min=0.05),
    default=10.0,
    show_default=True,
    help="Seconds between looks at a load balancer while waiting (plus up to 20% jitter).",
)
@click.option(
    "--health-recheck",
    type=click.FloatRange(min=0.1),
    default=5.0,
    show_default=True,
    help="Seconds between health checks of a registered app (at least its interval_s).",
)
@click.option(
    "--describe-every",
    type=click.FloatRange(min=0),
    default=30.0,
    show_default=True,
    help="A health re-check that changes nothing asks AWS again only after this long.",
)
@click.option(
    "--peer-freshness",
    type=click.FloatRange(min=1),
    default=180.0,
    show_default=True,
    help="Peers' reports older than this do not count towards min_nodes.",
)
@click.option(
    "--runit-stage",
    "stage",
    type=click.Path(file_okay=False, path_type=Path),
    default=Path("/etc/platypus/service-stage"),
    show_default=True,
    help="setlive's --runit-stage: exec health checks run with the app's env dir there.",
)
@entrypoint.max_parallel_option(
    8, "Apps converged at once (a wait for InService holds one for minutes)."
)
def main(**params: Any) -> None:
    """Keep this instance in each app's load balancers exactly while the app's active
    version runs here, passes its health check, and the node is not drained."""
    common = entrypoint.pop_common(params)
    state_dir = (params["state_dir"] or statedir.default(ElbRegistrar.name)).absolute()
    identity = Identity(params["instance_id"], params["imds_endpoint"])
    settings = Settings(
        inservice_timeout_s=params["inservice_timeout"],
        drain_timeout_s=params["drain_timeout"],
        poll_interval_s=params["poll_interval"],
        health_recheck_s=params["health_recheck"],
        describe_every_s=params["describe_every"],
    )

    def build(store: IntentStore, stop: threading.Event) -> ElbRegistrar:
        aws = Aws(
            session_name=f"platypus-elb-registrar-{common.node}",
            hooks=metrics.AWS_HOOKS,
            stop=stop,
        )
        return ElbRegistrar(
            store,
            common.node,
            aws,
            identity,
            state_dir=state_dir,
            settings=settings,
            stage=params["stage"].absolute(),
            stop=stop,
            peer_freshness_s=params["peer_freshness"],
        )

    max_parallel = entrypoint.pop_max_parallel(params)
    entrypoint.run(common, build, max_parallel=max_parallel, state_dir=state_dir)


if __name__ == "__main__":
    main()
