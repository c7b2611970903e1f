"""How a rollout is shown: a line per event, a live view for a terminal, and the
per-cluster summary ``pp status`` prints above its rows. No I/O.

Everything from the store goes through ``render.terminal_safe``, and the live view builds
``rich.text.Text`` objects, never markup: a version or a message written by an app owner
cannot steer the terminal or restyle the view.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence

from rich.console import Group, RenderableType
from rich.table import Table
from rich.text import Text

from intent.cli import render
from intent.cli.rollout import Event, NodeProgress, NodeState, Rollout, Target, summary

STYLES = {
    "converged": "green",
    "converging": "yellow",
    "waiting": "yellow",
    "failed": "bold red",
    "rolled_back": "bold red",
    "silent": "magenta",
    "held": "magenta",
}

SUMMARY_COLUMNS = ("APP", "CLUSTER", "DESIRED", "CONVERGED", "ERRORS", "SILENT", "HELD")


def event_line(event: Event) -> str:
    """One line of ``--wait`` output when stdout is not a terminal."""
    f = event.fields
    if event.kind == "end":
        return str(f["summary"])
    where = f"{f['elapsed']:7.1f}s  {f['app']}/{f['cluster']}  {f['node']}"
    if event.kind == "node":
        reason = f"  {f['reason']}" if f["reason"] else ""
        return f"{where}  node {f['state']}{reason}"
    flags = "".join(f" ({flag})" for flag in ("silent", "held") if f[flag])
    version = f["version"] or "-"
    message = f"  {f['message']}" if f["message"] else ""
    return f"{where}  {f['agent']} {f['state']}{flags} {version}{message}"


def live(rollout: Rollout) -> RenderableType:
    """The view a terminal shows while the rollout runs, redrawn on every change."""
    parts: list[RenderableType] = [_headline(rollout), _agent_table(rollout)]
    slowest = rollout.slowest()
    if slowest is not None and rollout.result is None:
        parts.append(_line("slowest", slowest.node, slowest.reason, "yellow"))
    for node in rollout.nodes:
        if node.state in ("silent", "held", "failed", "rolled_back"):
            label = node.state.replace("_", " ")
            parts.append(_line(label, node.node, node.reason, STYLES[node.state]))
    return Group(*parts)


def _headline(rollout: Rollout) -> Text:
    text = Text()
    for n, target in enumerate(rollout.targets):
        text.append(", " if n else "")
        text.append(_safe(f"{target.app}/{target.cluster}"), style="bold")
        text.append(" ")
        text.append(_safe(target.version or "(stopped)"), style="bold cyan")
    total = len(rollout.nodes)
    text.append(f"   {rollout.count('converged')}/{total} converged", style="green")
    states: tuple[NodeState, ...] = ("failed", "rolled_back", "silent", "held")
    for state in states:
        if count := rollout.count(state):
            text.append(f"  {count} {state.replace('_', ' ')}", style=STYLES[state])
    text.append(f"   {render.age(rollout.elapsed)}")
    return text


def _agent_table(rollout: Rollout) -> Table:
    table = Table(box=None, pad_edge=False, header_style="bold")
    for column in ("AGENT", "CONVERGED", "CONVERGING", "WAITING", "FAILED"):
        table.add_column(column, justify="left" if column == "AGENT" else "right")
    for agent, counts in sorted(rollout.by_agent().items()):
        table.add_row(
            Text(_safe(agent)),
            Text(str(counts["converged"]), style="green"),
            Text(str(counts["converging"]), style="yellow"),
            Text(str(counts["waiting"])),
            Text(str(counts["failed"]), style="bold red" if counts["failed"] else ""),
        )
    return table


def _line(label: str, node: str, reason: str, style: str) -> Text:
    text = Text()
    text.append(f"{label}: ", style=style)
    text.append(_safe(node), style="bold")
    text.append(f"  {_safe(reason)}" if reason else "")
    return text


def _safe(text: str) -> str:
    return render.terminal_safe(render.one_line(text))


# -- pp status --------------------------------------------------------------------------------


def summary_rows(rollout: Rollout) -> list[list[str]]:
    """``pp status``'s summary: one row per app and cluster."""
    rows = []
    for target in rollout.targets:
        nodes = [n for n in rollout.nodes if (n.app, n.cluster) == (target.app, target.cluster)]
        rows.append(
            [
                target.app,
                target.cluster,
                _desired(target),
                f"{sum(1 for n in nodes if n.done)}/{len(nodes)}",
                _count(n for n in nodes if n.failed),
                _names(n for n in nodes if n.state == "silent"),
                _held(nodes),
            ]
        )
    return rows


def _desired(target: Target) -> str:
    if target.problem:
        missing = all(p.endswith(": missing") for p in target.problem.split("; "))
        return "missing" if missing else "invalid"
    return target.version or "(stopped)"


def _count(nodes: Iterable[NodeProgress]) -> str:
    found = len(list(nodes))
    return str(found) if found else "-"


def _names(nodes: Iterable[NodeProgress]) -> str:
    names = [n.node for n in nodes]
    return ",".join(names) if names else "-"


def _held(nodes: Sequence[NodeProgress]) -> str:
    held = sorted({f"{n.node}/{a.agent}" for n in nodes for a in n.agents if a.held})
    return ",".join(held) if held else "-"


def status_summary(rollout: Rollout) -> str:
    return render.table(SUMMARY_COLUMNS, summary_rows(rollout))


__all__ = ["event_line", "live", "status_summary", "summary", "summary_rows"]
