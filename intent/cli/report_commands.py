"""The commands that show what happened: what the agents report (status) and every
change pp made (history)."""

from __future__ import annotations

import time

import click

from intent.cli import fleet, render, rollout_view
from intent.cli import operator as op
from intent.cli.group import Env, echo, json_option, pass_env, print_json


@click.command()
@click.argument("app", required=False)
@click.option("-n", "--node", default=None, help="Only this node.")
@json_option
@pass_env
def status(env: Env, app: str | None, node: str | None, as_json: bool) -> None:
    """What the agents report: a summary per app and cluster, then one row per node,
    agent and app.

    The summary counts the nodes converged on the desired version by every agent
    that applies (as pp deploy --wait does), the nodes in error, the silent ones
    and the held agents.

    AGE is how long the agent has been in its status; a report not refreshed
    for a while is called out in MESSAGE, as its agent is probably not running.
    """
    if app is not None:
        op.check_name("app", app)
    if node is not None:
        op.check_name("node", node)
    store = env.store()
    reports = store.reality(node, app)
    if as_json:
        print_json([r.model_dump(mode="json") for r in reports])
        return
    expected: set[tuple[str, str]] = set()
    if app is not None:
        expected = {(n, app) for n in store.nodes_of(app) if node is None or n == node}
    elif node is not None:
        expected = {(node, a) for a in store.assignments(node)}
    unreported = sorted(expected - {(r.node, r.app) for r in reports})
    now = time.time()
    if summary := rollout_view.summary_rows(fleet.overview(store, app, node)):
        echo(render.table(rollout_view.SUMMARY_COLUMNS, summary) + "\n")
    for held in store.agent_statuses(node):
        if held.state == "held":
            echo(f"HELD {held.node} {held.agent} for {render.age(now - held.since)}: {held.reason}")
    rows = render.status_rows(reports, unreported, now)
    echo(render.table(render.STATUS_COLUMNS, rows))


@click.command()
@click.argument("app")
@json_option
@pass_env
def history(env: Env, app: str, as_json: bool) -> None:
    """Every change pp made to APP, oldest first: who, when, which key, what changed."""
    op.check_name("app", app)
    records = env.store().history(app)
    if as_json:
        print_json([r.model_dump(mode="json") for r in records])
        return
    echo(render.table(render.HISTORY_COLUMNS, render.history_rows(records)))
