"""The commands that write intent: app files (apply, validate, get, schema) and
changes to it (deploy, rollback, assign, retry).

Reads show what is stored; writes go through ``intent.cli.operator``
(compare-and-set, retried, audited).
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from typing import Any

import click
import yaml

from intent import keys
from intent.cli import operator as op
from intent.cli import render
from intent.cli.appfile import AppFile, read_app_file
from intent.cli.group import (
    Env,
    PPError,
    PPUsageError,
    echo,
    json_option,
    pass_env,
    print_json,
    warn,
)
from intent.cli.schema import intent_schema
from intent.cli.watch_commands import Wait, wait_options
from intent.model import IntentError

# -- intent as files ----------------------------------------------------------------------


@click.command()
@click.option(
    "-f",
    "--file",
    "files",
    multiple=True,
    required=True,
    metavar="FILE",
    help="App file (YAML) to apply; repeat for several apps; '-' reads stdin.",
)
@click.option("--dry-run", is_flag=True, help="Show the diff, write nothing.")
@click.option(
    "--prune-nodes",
    is_flag=True,
    help="Also unassign nodes of a listed cluster that the file no longer lists"
    " (this stops the app on them).",
)
@wait_options
@pass_env
def apply(env: Env, files: Sequence[str], dry_run: bool, prune_nodes: bool, wait: Wait) -> None:
    """Validate app files, show the diff against the store, write it.

    Every file is validated before anything is written. Each key is written only
    if nobody changed it since it was read; otherwise apply stops and asks for a
    re-run, which shows the new diff.
    """
    app_files = [read_app_file(path) for path in files]
    seen: dict[str, str] = {}
    for path, app_file in zip(files, app_files, strict=True):
        if app_file.app in seen:
            raise PPUsageError(f"{path}: app {app_file.app} is also in {seen[app_file.app]}")
        seen[app_file.app] = path
    store = env.store()
    plans = [(app_file, op.plan_apply(store, app_file, prune_nodes)) for app_file in app_files]
    for _, plan in plans:
        for item in plan:
            echo(render.diff(item.key, item.old, item.new), nl=False)
            for version in op.changed_artifacts(item.old, item.new):
                warn(
                    f"{item.key}: version {version} gets a different sha256; a version's"
                    " artifact is meant never to change, so prefer a new version"
                )
    who = op.actor()
    for app_file, plan in plans:
        if not plan:
            echo(f"{app_file.app}: up to date")
        elif dry_run:
            echo(f"{app_file.app}: {len(plan)} key(s) would change (dry run, nothing written)")
        else:
            op.execute_apply(store, app_file.app, plan, who)
            echo(f"{app_file.app}: {len(plan)} key(s) written")
        wait.watch_apply(app_file.app, app_file.clusters, plan)


@click.command()
@click.argument("files", nargs=-1, required=True, metavar="FILE...")
def validate(files: Sequence[str]) -> None:
    """Check app files without touching the store."""
    for path in files:
        app_file = read_app_file(path)
        echo(f"{path}: ok ({_describe(app_file)})")


def _describe(app_file: AppFile) -> str:
    clusters = ", ".join(sorted(app_file.clusters))
    nodes = sum(len(spec.nodes or []) for spec in app_file.clusters.values())
    return f"app {app_file.app}; clusters {clusters}; {nodes} node(s)"


@click.command()
def schema() -> None:
    """Print the JSON Schema of app files and of every stored value."""
    echo(json.dumps(intent_schema(), indent=2))


@click.command()
@click.argument("app")
@json_option
@pass_env
def get(env: Env, app: str, as_json: bool) -> None:
    """Print an app's intent: every cluster's config, deploy_config and nodes.

    The output is an app file, so it can be edited and given back to pp apply.
    Exits non-zero, naming each key, when any of it is invalid or missing.
    """
    op.check_name("app", app)
    view = op.read_app(env.store(), app)
    if not view.document["clusters"] and not view.problems:
        raise PPError(f"no intent for app {app} under prefix {env.prefix!r}")
    if as_json:
        print_json(view.document)
    else:
        echo(yaml.safe_dump(view.document, sort_keys=False, default_flow_style=False), nl=False)
    if view.problems:
        raise PPError("; ".join(view.problems))


# -- changes ------------------------------------------------------------------------------


@click.command()
@click.argument("app")
@click.argument("version")
@click.option("-c", "--cluster", required=True, help="Cluster to deploy to.")
@click.option("--sha256", default=None, help="SHA-256 of the version's artifact (64 hex digits).")
@click.option("--url", default=None, help="Where agents fetch the artifact.")
@click.option(
    "--image",
    default=None,
    metavar="REF",
    help="Instead of --sha256: a Docker image pinned by digest, host[:port]/name@sha256:<hex> "
    "(pp pack --docker prints it).",
)
@wait_options
@pass_env
def deploy(
    env: Env,
    app: str,
    version: str,
    cluster: str,
    sha256: str | None,
    url: str | None,
    image: str | None,
    wait: Wait,
) -> None:
    """Make VERSION the active version; the version active until now stays as prep.

    Creates the cluster's config when it has none. Other prep versions are kept.
    """
    op.check_name("app", app)
    op.check_name("cluster", cluster)
    op.check_name("version", version)
    store = env.store()
    key = keys.config(app, cluster)
    change = op.update(
        store,
        key,
        lambda old: op.dump(
            op.deployed(op.parse_config(old, key), version, sha256, url, key, image)
        ),
        app=app,
        action="deploy",
        who=op.actor(),
    )
    before = _active(change.old)
    where = f"{app}/{cluster}"
    if not change.changed:
        echo(f"{where}: {version} is already active, nothing changed")
    elif change.old is None:
        echo(f"{where}: {version} is active (config created)")
    elif before is None or before == version:
        echo(f"{where}: {version} is active")
    else:
        echo(f"{where}: {version} is active ({before} kept as prep)")
    if store.get_raw(keys.deploy_config(app, cluster)) is None:
        warn(
            f"{keys.deploy_config(app, cluster)} is missing; nodes of {where} hold until it"
            " is written (pp apply)"
        )
    wait.watch(app, cluster, changed=change.changed)


def _active(value: Any) -> str | None:
    try:
        config = op.parse_config(value, "")
    except (IntentError, op.OperatorError):
        return None
    return config.active_version if config is not None else None


@click.command()
@click.argument("app")
@click.option("-c", "--cluster", required=True, help="Cluster to roll back.")
@click.option(
    "--to",
    "to",
    default=None,
    metavar="VERSION",
    help="Prep version to make active (or the image reference of one); needed when the "
    "audit trail cannot tell.",
)
@wait_options
@pass_env
def rollback(env: Env, app: str, cluster: str, to: str | None, wait: Wait) -> None:
    """Make the previously active version active again; the current one becomes prep.

    Without --to: the only prep version, else the prep version that was active
    most recently according to the audit trail (pp history).
    """
    op.check_name("app", app)
    op.check_name("cluster", cluster)
    if to is not None and "@" not in to:  # with an @: the image reference of a version
        op.check_name("version", to)
    store = env.store()
    key = keys.config(app, cluster)
    history = store.history(app)

    def transform(old: Any) -> Any:
        config = op.parse_config(old, key)
        if config is None:
            raise op.OperatorError(f"{key}: missing; nothing to roll back")
        target = to or op.rollback_target(config, history, key)
        if "@" in target:
            target = op.version_of_image(config, target, key)
        return op.dump(op.rolled_back(config, target, key))

    change = op.update(store, key, transform, app=app, action="rollback", who=op.actor())
    before, after = _active(change.old), _active(change.new)
    kept = f" ({before} kept as prep)" if before else ""
    echo(f"{app}/{cluster}: rolled back to {after}{kept}")
    wait.watch(app, cluster, changed=change.changed)


@click.command()
@click.argument("app")
@click.argument("nodes", nargs=-1, required=True, metavar="NODE...")
@click.option("-c", "--cluster", required=True, help="Cluster of the app the nodes run.")
@pass_env
def assign(env: Env, app: str, nodes: Sequence[str], cluster: str) -> None:
    """Make NODEs run CLUSTER of APP (a node runs one cluster of an app)."""
    op.check_name("app", app)
    op.check_name("cluster", cluster)
    for node in nodes:
        op.check_name("node", node)
    store = env.store()
    if cluster not in store.clusters_of(app):
        warn(
            f"{app} has no cluster {cluster} yet; its nodes report it missing until"
            f" {keys.config(app, cluster)} and {keys.deploy_config(app, cluster)} exist"
        )
    who = op.actor()
    for node in nodes:
        change = op.update(
            store,
            keys.node_app(node, app),
            lambda _old: {"cluster": cluster},
            app=app,
            action="assign",
            who=who,
        )
        op.clear_emptied(store, node)
        old_cluster = change.old.get("cluster") if isinstance(change.old, dict) else None
        if not change.changed:
            echo(f"{node}: already runs {app}/{cluster}")
        elif old_cluster:
            echo(f"{node}: runs {app}/{cluster} (was {old_cluster})")
        else:
            echo(f"{node}: runs {app}/{cluster}")


@click.command()
@click.argument("app")
@click.option("-n", "--node", default=None, help="Only this node (default: every node of APP).")
@wait_options
@pass_env
def retry(env: Env, app: str, node: str | None, wait: Wait) -> None:
    """Try again a version that failed its health gate and was rolled back.

    pp-setlive leaves a failed version alone until the intent changes; this asks it
    to try the same intent once more.
    """
    op.check_name("app", app)
    if node is not None:
        op.check_name("node", node)
    for done in op.request_retry(env.store(), app, node, actor=op.actor()):
        echo(f"{done}: retry of {app} requested")
    wait.watch(app, changed=True, node=node)
