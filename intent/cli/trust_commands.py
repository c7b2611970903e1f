"""The commands that tell the agents what an absence means, or to stand back.

Agents hold rather than act on intent that could be a wiped or foreign store (see
agents/trust.py): ``init`` gives the store the identity they remember, and
``unassign`` records a node emptied on purpose. ``drain`` takes apps out of their
load balancers while they keep running.
"""

from __future__ import annotations

from collections.abc import Sequence

import click

from intent.cli import operator as op
from intent.cli.group import Env, PPError, PPUsageError, echo, pass_env


@click.command()
@click.argument("args", nargs=-1, required=True, metavar="APP NODE... | --all NODE...")
@click.option("--all", "everything", is_flag=True, help="Every app of each NODE.")
@pass_env
def unassign(env: Env, args: Sequence[str], everything: bool) -> None:
    """Stop APP on NODEs, or with --all every app on NODEs.

    Nothing changes if any NODE does not run APP. A node left running nothing is
    recorded as emptied on purpose: agents hold a node whose every assignment
    vanishes without that record, as a wiped store would look the same.
    """
    store = env.store()
    who = op.actor()
    if everything:
        for node in args:
            op.check_name("node", node)
        for node in args:
            removed = op.unassign(store, node, sorted(store.assignments(node)), who)
            echo(f"{node}: runs nothing" + (f" (was {', '.join(removed)})" if removed else ""))
        return
    app, nodes = args[0], args[1:]
    if not nodes:
        raise PPUsageError("give APP and at least one NODE, or --all NODE...")
    op.check_name("app", app)
    for node in nodes:
        op.check_name("node", node)
    assigned = store.nodes_of(app)
    missing = [node for node in nodes if node not in assigned]
    if missing:
        running = ", ".join(sorted(assigned)) or "none"
        raise PPError(f"{app} is not assigned to {', '.join(missing)} (assigned: {running})")
    for node in nodes:
        op.unassign(store, node, [app], who)
        echo(f"{node}: no longer runs {app}")


@click.command()
@click.argument("node")
@click.option("-a", "--app", "apps", multiple=True, help="Only this app (repeatable).")
@pass_env
def drain(env: Env, node: str, apps: Sequence[str]) -> None:
    """Take NODE's apps (or --app) out of their load balancers, leaving them running."""
    _drain(env, node, apps, on=True)


@click.command()
@click.argument("node")
@click.option("-a", "--app", "apps", multiple=True, help="Only this app (repeatable).")
@pass_env
def undrain(env: Env, node: str, apps: Sequence[str]) -> None:
    """Put NODE's apps (or --app) back into their load balancers once healthy."""
    _drain(env, node, apps, on=False)


def _drain(env: Env, node: str, apps: Sequence[str], on: bool) -> None:
    op.check_name("node", node)
    for app in apps:
        op.check_name("app", app)
    store = env.store()
    targets = sorted(apps) or sorted(store.assignments(node))
    if not targets:
        raise PPError(f"{node} runs no app")
    changed = set(op.drain(store, node, targets, op.actor(), on))
    verb = "drained" if on else "not drained"
    for app in targets:
        echo(f"{node}: {app} {verb}" + ("" if app in changed else " (already)"))


@click.command()
@click.option(
    "--adopt",
    "earlier",
    default=None,
    metavar="IDENTITY",
    help="Declare this store the successor of the store with this identity.",
)
@pass_env
def init(env: Env, earlier: str | None) -> None:
    """Give the store its identity (the first write pp makes does it too).

    Agents remember the identity of the store they converged from and hold,
    changing nothing, when they see another store or none. After moving to a new
    store on purpose, --adopt the old identity (pp status shows it) to let them go on.
    """
    store = env.store()
    existed = store.identity()
    identity = store.ensure_identity(op.actor())
    echo(f"store identity: {identity.id}" + (" (already set)" if existed else " (created)"))
    if earlier is not None:
        if not earlier.isalnum():
            raise PPUsageError(f"--adopt {earlier!r}: an identity is letters and digits")
        store.adopt(earlier, op.actor())
        echo(f"store {identity.id} adopts {earlier}: agents that knew {earlier} go on")
