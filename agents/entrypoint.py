"""What every agent's command line shares: the common flags and the start-up.

Each agent's ``__main__`` adds its own options with click and calls ``run`` with a
``build(store, stop)`` that makes its agent: ``stop`` is the process's one stop
event, set on SIGTERM, which the agent's long steps (downloads, health gates)
watch and the runtime shares.
"""

from __future__ import annotations

import socket
import sys
import threading
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import IO, Any, NoReturn, TypeVar

import click
import structlog
import tenacity
from click.core import ParameterSource

from agents import backoff, logs, metrics
from agents.runtime import Agent, Runtime, RuntimeOptions
from intent import keys
from intent.model import is_safe_name
from intent.store import IntentStore, StoreError, StoreUnavailable, default_store_url, open_store
from intent.usage import usage_line

F = TypeVar("F", bound=Callable[..., Any])


@dataclass(frozen=True)
class CommonOptions:
    store: str
    prefix: str
    node: str
    once: bool
    resync_interval: float
    store_retry_max: float
    log_format: logs.LogFormat
    metrics_listen: str | None = None


class _OneLineUsageError(click.UsageError):
    def show(self, file: IO[Any] | None = None) -> None:
        name = self.ctx.command_path if self.ctx is not None else sys.argv[0].rsplit("/", 1)[-1]
        click.echo(f"{name}: error: {usage_line(self)}", err=True)


class AgentCommand(click.Command):
    """An agent's command line: a usage error is one line naming what to fix."""

    def make_context(
        self,
        info_name: str | None,
        args: list[str],
        parent: click.Context | None = None,
        **extra: Any,
    ) -> click.Context:
        try:
            return super().make_context(info_name, args, parent, **extra)
        except click.UsageError as exc:
            raise _OneLineUsageError(exc.format_message(), exc.ctx) from None


def _node_name(ctx: click.Context, param: click.Parameter, value: str) -> str:
    if not is_safe_name(value):
        raise click.BadParameter(
            f"{value!r}: use 1-64 letters, digits, '.', '_' or '-', starting with a letter"
            " or digit, without '..' (a hostname with other characters needs --node)"
        )
    return value


def _listen_address(ctx: click.Context, param: click.Parameter, value: str | None) -> str | None:
    if value is not None:
        try:
            metrics.parse_listen(value)
        except ValueError as exc:
            raise click.BadParameter(str(exc)) from None
    return value


def common_options(command: F) -> F:
    """Add the flags every agent takes; the values arrive as ``common``."""
    options = [
        click.option("--store", envvar="PP_STORE", default=default_store_url,
                     show_default="$PP_STORE, else the embedded store",
                     help="Intent store URL: sqlite:///path.db or consul://host:port."),
        click.option("--prefix", envvar="PP_PREFIX", default=keys.DEFAULT_PREFIX,
                     show_default=True, help="Key prefix of this deployment's intent."),
        click.option("--node", envvar="PP_NODE", default=socket.gethostname,
                     show_default="hostname", callback=_node_name,
                     help="This host's name in nodes/<node>/."),
        click.option("--once", is_flag=True,
                     help="Converge one pass and exit: 0 when converged, 1 otherwise."),
        click.option("--resync-interval", type=click.FloatRange(min=1), default=60.0,
                     show_default=True, help="Seconds between full resyncs (jittered)."),
        click.option("--store-retry-max", type=click.FloatRange(min=0.5),
                     default=backoff.DEFAULT_STORE_RETRY_MAX_S, show_default=True,
                     help="Longest wait, in seconds, before trying an unreachable store "
                     "again; each wait is random up to it, so a fleet reconnecting after "
                     "a store restart spreads its load over that many seconds."),
        click.option("--log-format", type=click.Choice(["auto", "json", "console"]),
                     default="auto", show_default=True),
        click.option("--metrics-listen", default=None, metavar="[ADDR:]PORT",
                     callback=_listen_address,
                     help="Serve Prometheus metrics at http://ADDR:PORT/metrics (a bare "
                     "PORT listens on 127.0.0.1). Off by default."),
    ]  # fmt: skip
    for option in reversed(options):
        command = option(command)
    return command


def max_parallel_option(default: int, help: str) -> Callable[[F], F]:
    """``--max-parallel``: how many apps an agent converges at once. ``--parallel``, its
    former spelling (pp-setlive, pp-elb-registrar), is still read, hidden, so service
    definitions written with it keep working; ``pop_max_parallel`` resolves the two."""

    def add(command: F) -> F:
        command = click.option(
            "--parallel",
            type=click.IntRange(min=1),
            default=None,
            hidden=True,
            deprecated="Use --max-parallel instead.",
        )(command)
        return click.option(
            "--max-parallel",
            type=click.IntRange(min=1),
            default=default,
            show_default=True,
            help=help,
        )(command)

    return add


def pop_max_parallel(params: dict[str, Any]) -> int:
    """``--max-parallel``, or the former ``--parallel`` when only that one was given."""
    former: int | None = params.pop("parallel")
    chosen: int = params.pop("max_parallel")
    given = click.get_current_context().get_parameter_source("max_parallel")
    if former is not None and given is ParameterSource.DEFAULT:
        return former
    return chosen


def pop_common(params: dict[str, Any]) -> CommonOptions:
    return CommonOptions(
        store=params.pop("store"),
        prefix=params.pop("prefix"),
        node=params.pop("node"),
        once=params.pop("once"),
        resync_interval=params.pop("resync_interval"),
        store_retry_max=params.pop("store_retry_max"),
        log_format=params.pop("log_format"),
        metrics_listen=params.pop("metrics_listen"),
    )


def fail(message: str) -> NoReturn:
    click.echo(f"{sys.argv[0].rsplit('/', 1)[-1]}: error: {message}", err=True)
    sys.exit(2)


def _open_store(common: CommonOptions) -> IntentStore:
    """Open the store, waiting for it (logged once, retried as the runtime retries an
    unreachable store) unless ``--once``: an agent that cannot converge keeps trying
    and says why."""

    def log_once(state: tenacity.RetryCallState) -> None:
        if state.attempt_number == 1 and state.outcome is not None:
            error = state.outcome.exception()
            structlog.get_logger().warning("store.unreachable", error=str(error))

    retrying = tenacity.Retrying(
        retry=tenacity.retry_if_exception_type(StoreUnavailable),
        wait=backoff.store_retry(common.store_retry_max),
        stop=tenacity.stop_after_attempt(1) if common.once else tenacity.stop_never,
        before_sleep=log_once,
        reraise=True,
    )
    try:
        return retrying(open_store, common.store, common.prefix, create=False)
    except StoreError as exc:
        fail(str(exc))


def _serve_metrics(listen: str) -> None:
    try:
        metrics.serve(listen)
    except OSError as exc:
        fail(f"--metrics-listen {listen}: {exc.strerror or exc}")


def run(
    common: CommonOptions,
    build: Callable[[IntentStore, threading.Event], Agent],
    max_parallel: int = 1,
    state_dir: Path | None = None,
) -> NoReturn:
    """Open the store, build the agent and run its loop; exit with its code.

    ``state_dir`` is the agent's own directory on the host, where it also remembers
    which store it trusts (agents/trust.py)."""
    # Before the agent is built: loggers it binds then keep the configuration.
    logs.configure(common.log_format)
    logs.always(node=common.node)
    if common.metrics_listen is not None:
        _serve_metrics(common.metrics_listen)
    store = _open_store(common)
    stop = threading.Event()
    agent = build(store, stop)
    logs.always(agent=agent.name)
    runtime = Runtime(
        agent,
        store,
        RuntimeOptions(
            node=common.node,
            once=common.once,
            resync_interval_s=common.resync_interval,
            max_parallel=max_parallel,
            store_retry_max_s=common.store_retry_max,
            trust_file=state_dir / f".trust-{common.node}.json" if state_dir else None,
        ),
        stop=stop,
    )
    runtime.install_signal_handlers()
    structlog.get_logger().info("agent.starting", store=common.store)
    try:
        code = runtime.run()
    finally:
        store.close()
    sys.exit(code)
