"""``--wait``: follow the rollout a change started, until it is over.

``pp deploy``, ``rollback``, ``retry`` and ``apply`` take ``wait_options``; their bodies
say which clusters they changed (``Wait.watch``) and, once the change is written, the
rollout is followed here: the store's blocking wait on the nodes' ``reality/`` and
``agents/`` prefixes wakes the loop on every report, the pure ``rollout.evaluate`` says
where it stands, and one of three displays shows it (a live view on a terminal, a line
per event otherwise, JSON events with ``--json``). The exit code says how it ended:

====  ===========================================================================
0     every node converged on the desired version with every agent that applies
1     pp's own error: nothing was written (bad input, a conflict, no store)
3     a node reported an error or a rollback
4     timed out, nodes still pending
5     every node still pending is silent or held: waiting longer changes nothing
====  ===========================================================================
"""

from __future__ import annotations

import contextlib
import functools
import json
import sys
import time
from collections.abc import Callable, Collection, Iterable, Sequence
from dataclasses import dataclass, field, replace
from typing import IO, Any, Protocol, TypeVar

import click
from rich.console import Console
from rich.live import Live
from rich.text import Text

from intent import keys
from intent.cli import fleet, render, rollout_view
from intent.cli.group import Env, PPUsageError, echo, warn
from intent.cli.operator import PlannedWrite
from intent.cli.rollout import (
    DEFAULT_SILENT_AFTER_S,
    DEFAULT_TIMEOUT_S,
    Rollout,
    Snapshot,
    Target,
    evaluate,
    events,
)
from intent.model import AgentStatus
from intent.store import IntentStore, StoreError

F = TypeVar("F", bound=Callable[..., Any])

TICK_S = 1.0
"""How often the rollout is looked at again without news (the clock, silence, the
timeout); the store is read again only when its wait reports a change."""

WATCH_EACH_NODE_UP_TO = 32
"""Up to this many nodes, the wait covers each node's own prefixes (one blocking query
each on Consul, woken only by those nodes); beyond it, the whole of ``reality/`` and
``agents/`` (two queries, woken by the fleet, read only when something changed)."""

_WAIT_FLAGS = ("timeout", "silent_after", "json_events")


@dataclass(frozen=True)
class Request:
    app: str
    cluster: str | None
    """None: every cluster the app's nodes run (``pp retry``)."""
    node: str | None = None
    confirm: bool = False


@dataclass
class Wait:
    """What ``--wait`` asked for, and which clusters the command changed."""

    enabled: bool = False
    timeout_s: float = DEFAULT_TIMEOUT_S
    silent_after_s: float = DEFAULT_SILENT_AFTER_S
    as_json: bool = False
    requests: list[Request] = field(default_factory=list)
    changed: bool = False
    before: fleet.Reports | None = None
    """The reports as they were before the change, when the command names its app."""

    def watch(
        self,
        app: str,
        cluster: str | None = None,
        *,
        changed: bool,
        node: str | None = None,
        confirm: bool = False,
    ) -> None:
        """The command changed (or left as it was) ``app``'s ``cluster``; ``confirm``
        when the change kept the active version (see ``rollout.Target.confirm``)."""
        self.requests.append(Request(app, cluster, node, confirm))
        self.changed |= changed

    def watch_apply(
        self, app: str, clusters: Iterable[str], writes: Sequence[PlannedWrite]
    ) -> None:
        """``pp apply``: every cluster of the file; those whose config or deploy_config
        changed while the active version stayed need reports written after the change."""
        by_key = {w.key: w for w in writes}
        for cluster in clusters:
            config = by_key.get(keys.config(app, cluster))
            deploy = by_key.get(keys.deploy_config(app, cluster))
            kept = config is None or _active(config.old) == _active(config.new)
            self.watch(
                app,
                cluster,
                changed=bool(writes),
                confirm=(config is not None or deploy is not None) and kept,
            )


def _active(value: Any) -> str | None:
    versions = value.get("versions") if isinstance(value, dict) else None
    if not isinstance(versions, dict):
        return None
    return next(
        (str(v) for v, s in versions.items() if isinstance(s, dict) and s.get("state") == "active"),
        None,
    )


def wait_options(command: F) -> F:
    """Add ``--wait``, ``--timeout``, ``--silent-after`` and ``--json``; the command gets
    a ``wait`` (Wait) to name what it changed, and the rollout is followed after it."""

    @functools.wraps(command)
    def wrapper(*args: Any, **kwargs: Any) -> None:
        options = {name: kwargs.pop(name) for name in ("wait", *_WAIT_FLAGS)}
        spec = _spec(options, dry_run=bool(kwargs.get("dry_run")))
        env = click.get_current_context().find_object(Env)
        assert env is not None
        if spec.enabled and isinstance(kwargs.get("app"), str):
            spec.before = _reports_before(env.store(), kwargs["app"])
        # With --json, stdout carries only JSON lines: the command's own lines go to stderr.
        with contextlib.redirect_stdout(sys.stderr) if spec.as_json else contextlib.nullcontext():
            command(*args, wait=spec, **kwargs)
        if spec.enabled:
            code = follow(env.store(), spec)
            if code:
                raise click.exceptions.Exit(code)

    decorators = [
        click.option("--wait", is_flag=True,
                     help="Follow the rollout until every node converged, one failed or "
                     "rolled back, or --timeout; the exit code says which (0, 3, 4, 5)."),
        click.option("--timeout", type=click.FloatRange(min=0), default=DEFAULT_TIMEOUT_S,
                     show_default=True, help="Seconds --wait follows the rollout."),
        click.option("--silent-after", type=click.FloatRange(min=1),
                     default=DEFAULT_SILENT_AFTER_S, show_default=True,
                     help="Seconds without a report after which --wait calls an agent "
                     "silent rather than waiting on it."),
        click.option("--json", "json_events", is_flag=True,
                     help="With --wait: the rollout as JSON events, one object per line."),
    ]  # fmt: skip
    for decorate in reversed(decorators):
        wrapper = decorate(wrapper)
    return wrapper  # type: ignore[return-value]


def _spec(options: dict[str, Any], dry_run: bool) -> Wait:
    ctx = click.get_current_context()
    if not options["wait"]:
        given = [
            name
            for name in _WAIT_FLAGS
            if ctx.get_parameter_source(name) is click.core.ParameterSource.COMMANDLINE
        ]
        if given:
            flags = ", ".join(_flag(name) for name in given)
            raise PPUsageError(f"{flags} given without --wait")
        return Wait()
    if dry_run:
        raise PPUsageError("--wait follows a change and --dry-run makes none")
    return Wait(True, options["timeout"], options["silent_after"], options["json_events"])


def _reports_before(store: IntentStore, app: str) -> fleet.Reports | None:
    """The app's nodes' reports before the change: an agent that answers the change
    before pp reads again (an error found at once) is then seen at once too. Without
    them (pp apply, whose apps are in its files), the first read after the change
    stands in, and such an answer counts at the agent's next report."""
    try:
        nodes = {
            n for (name, _), found in fleet.assignments(store).items() if name == app for n in found
        }
        return fleet.read_reports(store, nodes)
    except StoreError:
        return None  # the command itself will say what is wrong with the store


def _flag(name: str) -> str:
    return "--json" if name == "json_events" else "--" + name.replace("_", "-")


# -- following ------------------------------------------------------------------------------


class Display(Protocol):
    def show(self, before: Rollout | None, after: Rollout) -> None: ...

    def problem(self, message: str) -> None: ...

    def close(self) -> None: ...


def follow(store: IntentStore, wait: Wait, display: Display | None = None) -> int:
    """Follow the rollout ``wait`` names until it is over; returns the exit code."""
    targets = _targets(store, wait.requests)
    for target in targets:
        if not target.nodes:
            warn(f"no node runs {target.app}/{target.cluster}: nothing to wait for there")
    nodes = sorted({n for t in targets for n in t.nodes})
    display = display or _display(wait.as_json)
    try:
        final = _follow(store, wait, targets, nodes, display)
    finally:
        display.close()
    code = final.exit_code or 0
    if code:
        echo(f"pp: error: {rollout_view.summary(final)}", err=True)
    return code


def _follow(
    store: IntentStore, wait: Wait, targets: list[Target], nodes: list[str], display: Display
) -> Rollout:
    if len(nodes) <= WATCH_EACH_NODE_UP_TO:
        prefixes = [store.prefix + p + n + "/" for p in (keys.REALITY, keys.AGENTS) for n in nodes]
    else:
        prefixes = [store.prefix + keys.REALITY, store.prefix + keys.AGENTS]
    started = time.monotonic()
    baseline: fleet.Reports | None = None
    snapshot: Snapshot | None = None
    before: Rollout | None = None
    token = None
    failing: str | None = None
    while True:
        remaining = wait.timeout_s - (time.monotonic() - started)
        try:
            new = store.kv.wait(prefixes, token, max(0.0, min(TICK_S, remaining)) if token else 0)
            if new != token or snapshot is None:
                token = new
                reports = fleet.read_reports(store, nodes)
                held = _held(store.agent_statuses(), nodes)
                if baseline is None:
                    # Else the first read after the change: all in it counts as before.
                    baseline = wait.before or reports
                stale = reports.changed_since(baseline) if wait.changed else frozenset()
                snapshot = Snapshot(reports.reports, time.time(), stale, held)
            failing = None
        except StoreError as exc:
            if str(exc) != failing:
                display.problem(f"store: {exc}; retrying")
            failing, token = str(exc), None
            time.sleep(max(0.0, min(TICK_S, remaining)))
        now = time.time()
        current = replace(snapshot, now=now) if snapshot else Snapshot([], now)
        rollout = evaluate(
            targets,
            current,
            time.monotonic() - started,
            timeout_s=wait.timeout_s,
            silent_after_s=wait.silent_after_s,
        )
        display.show(before, rollout)
        before = rollout
        if rollout.result is not None:
            return rollout


def _targets(store: IntentStore, requests: Sequence[Request]) -> list[Target]:
    """The targets the requests name, as the store holds them after the change."""
    assigned = fleet.assignments(store)
    pairs: dict[tuple[str, str], Request] = {}
    for request in requests:
        if request.cluster is not None:
            pairs[(request.app, request.cluster)] = request
            continue
        for app, cluster in assigned:
            if app == request.app and cluster != fleet.INVALID:
                pairs[(app, cluster)] = request
    confirm = [pair for pair, request in pairs.items() if request.confirm]
    targets = []
    for target in fleet.targets(store, pairs, confirm):
        node = pairs[(target.app, target.cluster)].node
        if node is not None:
            target = replace(target, nodes=tuple(n for n in target.nodes if n == node))
        targets.append(target)
    return targets


def _held(statuses: Iterable[AgentStatus], nodes: Collection[str]) -> list[AgentStatus]:
    wanted = set(nodes)
    return [s for s in statuses if s.node in wanted]


def _display(as_json: bool) -> Display:
    if as_json:
        return JsonDisplay()
    if sys.stdout.isatty():
        return LiveDisplay(sys.stdout)
    return LineDisplay()


class LineDisplay:
    """A line per event: for logs and pipes."""

    def show(self, before: Rollout | None, after: Rollout) -> None:
        for event in events(before, after):
            echo(rollout_view.event_line(event))

    def problem(self, message: str) -> None:
        warn(message)

    def close(self) -> None:
        pass


class JsonDisplay(LineDisplay):
    """One JSON object per line, for scripts (``"event"``: agent, node, end)."""

    def show(self, before: Rollout | None, after: Rollout) -> None:
        for event in events(before, after):
            echo(json.dumps(event.as_json(), sort_keys=True))


class LiveDisplay:
    """A view redrawn in place while the rollout runs; its last state stays on screen."""

    def __init__(self, out: IO[str]) -> None:
        self._console = Console(file=out)
        self._live = Live(console=self._console, auto_refresh=False, transient=False)
        self._live.start()

    def show(self, before: Rollout | None, after: Rollout) -> None:
        self._live.update(rollout_view.live(after), refresh=True)
        if after.result is not None:
            self._live.stop()
            echo(rollout_view.summary(after))

    def problem(self, message: str) -> None:
        self._console.print(Text(render.terminal_safe(message), style="yellow"))

    def close(self) -> None:
        self._live.stop()
