"""``pp-setlive``: run the active version of every app assigned to this node, under runit."""

from __future__ import annotations

import fcntl
import os
import threading
from pathlib import Path
from typing import Any

import click

from agents import entrypoint
from agents.setlive.agent import DRAIN_WAIT_S, SetliveAgent
from agents.setlive.container import DEFAULT_PIDS_LIMIT, ContainerSettings
from agents.setlive.observe import Paths
from intent.store import IntentStore

DEFAULT_RUNIT = "/etc/service"
DEFAULT_STAGE = "/etc/platypus/service-stage"
DEFAULT_LOG_ROOT = "/var/log/platypus"
DEFAULT_STATE = "/var/lib/platypus/setlive"


def _lock(state_dir: Path) -> int:
    """One setlive per state directory: two would restart each other's services."""
    try:
        state_dir.mkdir(parents=True, exist_ok=True, mode=0o700)
        fd = os.open(state_dir / ".lock", os.O_RDWR | os.O_CREAT, 0o600)
    except OSError as exc:
        entrypoint.fail(f"--state-dir {state_dir}: {exc.strerror}")
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        entrypoint.fail(f"another pp-setlive is running with --state-dir {state_dir}")
    return fd


@click.command("pp-setlive", cls=entrypoint.AgentCommand)
@entrypoint.common_options
@click.option(
    "--runit",
    "runit_dir",
    default=DEFAULT_RUNIT,
    show_default=True,
    type=click.Path(file_okay=False, path_type=Path),
    help="The directory runsvdir watches; services are linked into it.",
)
@click.option(
    "--runit-stage",
    "stage",
    default=DEFAULT_STAGE,
    show_default=True,
    type=click.Path(file_okay=False, path_type=Path),
    help="Where service directories are written before they are linked.",
)
@click.option(
    "--log-root",
    default=DEFAULT_LOG_ROOT,
    show_default=True,
    type=click.Path(file_okay=False, path_type=Path),
    help="svlogd writes each service's log into <log-root>/<service>/.",
)
@click.option(
    "--state-dir",
    default=DEFAULT_STATE,
    show_default=True,
    type=click.Path(file_okay=False, path_type=Path),
    help="setlive's notes: switches in progress, failed versions.",
)
@entrypoint.max_parallel_option(
    4, "Apps converged at once (one app's health gate does not hold up others)."
)
@click.option(
    "--supervise-timeout",
    type=click.FloatRange(min=1),
    default=7.0,
    show_default=True,
    help="Seconds to wait for runsvdir to pick a new service up.",
)
@click.option(
    "--lease-ttl",
    type=click.FloatRange(min=2),
    default=30.0,
    show_default=True,
    help="Seconds a restart lease outlives a setlive that stopped renewing it.",
)
@click.option(
    "--health-freshness",
    type=click.FloatRange(min=1),
    default=180.0,
    show_default=True,
    help="Peer health reports older than this do not count towards min_nodes.",
)
@click.option(
    "--guard-deadline",
    type=click.FloatRange(min=1),
    default=None,
    help="When setlive deploys itself: seconds its guard waits for the new setlive "
    "before rolling back [default: 2 x the gate's deadline_s + 37].",
)
@click.option(
    "--drain-wait",
    type=click.FloatRange(min=0),
    default=DRAIN_WAIT_S,
    show_default=True,
    help="For an app behind load balancers (deploy_config.elb): seconds to wait for "
    "pp-elb-registrar to drain the node before stopping or restarting it; then it goes on.",
)
@click.option(
    "--docker",
    "docker_bin",
    default=None,
    metavar="PATH",
    help="The docker client image versions' services run [default: docker on PATH].",
)
@click.option(
    "--docker-host",
    default=None,
    metavar="URL",
    help="The Docker engine image versions run in [default: the client's own].",
)
@click.option(
    "--pids-limit",
    type=click.IntRange(min=1),
    default=DEFAULT_PIDS_LIMIT,
    show_default=True,
    help="Most processes a container of an image version may have.",
)
def main(**params: Any) -> None:
    """Swap runit services to each app's active version, health-gated, with rollback."""
    common = entrypoint.pop_common(params)
    paths = Paths(
        runit_dir=params["runit_dir"].absolute(),
        stage=params["stage"].absolute(),
        log_root=params["log_root"].absolute(),
        state_dir=params["state_dir"].absolute(),
        containers=ContainerSettings(
            docker_bin=params["docker_bin"] or ContainerSettings().docker_bin,
            docker_host=params["docker_host"],
            pids_limit=params["pids_limit"],
        ),
    )
    _lock(paths.state_dir)

    def build(store: IntentStore, stop: threading.Event) -> SetliveAgent:
        return SetliveAgent(
            store,
            common.node,
            paths,
            supervise_timeout_s=params["supervise_timeout"],
            lease_ttl_s=params["lease_ttl"],
            health_freshness_s=params["health_freshness"],
            stop=stop,
            guard_deadline_s=params["guard_deadline"],
            drain_wait_s=params["drain_wait"],
        )

    max_parallel = entrypoint.pop_max_parallel(params)
    entrypoint.run(common, build, max_parallel=max_parallel, state_dir=paths.state_dir)


if __name__ == "__main__":
    main()
