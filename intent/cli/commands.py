"""``pp``: the operator's view of the intent store.

Reads show what is stored and what the agents report; writes go through
``intent.cli.operator`` (compare-and-set, retried, audited). Every failure an
operator can cause ends as one ``pp: error: ...`` line on stderr and a
non-zero exit: 1 for a refused or failed operation, 2 for a malformed command.
"""

from __future__ import annotations

import contextlib
import json
import os
import sys
import time
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from typing import IO, Any

import click
import yaml

from intent import keys
from intent.cli import operator as op
from intent.cli import render
from intent.cli.appfile import AppFile, read_app_file
from intent.cli.pack_command import pack
from intent.cli.schema import intent_schema
from intent.model import IntentError
from intent.store import IntentStore, StoreError, default_store_url, open_store


class PPError(click.ClickException):
    exit_code = 1

    def show(self, file: IO[Any] | None = None) -> None:
        echo(f"pp: error: {render.one_line(self.message)}", err=file is None, file=file)


class PPUsageError(PPError):
    exit_code = 2


@contextlib.contextmanager
def _one_line_errors() -> Iterator[None]:
    try:
        yield
    except (PPError, click.exceptions.NoArgsIsHelpError):
        raise
    except click.UsageError as exc:
        hint = f" (see '{exc.ctx.command_path} --help')" if exc.ctx is not None else ""
        raise PPUsageError(exc.format_message() + hint) from None
    except click.ClickException as exc:
        raise PPError(exc.format_message()) from None
    except (IntentError, op.OperatorError, StoreError) as exc:
        raise PPError(str(exc)) from None


class _Group(click.Group):
    """Turns every error below it into one line, under CliRunner and the real entry point."""

    def make_context(
        self,
        info_name: str | None,
        args: list[str],
        parent: click.Context | None = None,
        **extra: Any,
    ) -> click.Context:
        with _one_line_errors():
            return super().make_context(info_name, args, parent, **extra)

    def invoke(self, ctx: click.Context) -> Any:
        with _one_line_errors():
            return super().invoke(ctx)


@dataclass
class Env:
    url: str
    prefix: str
    _store: IntentStore | None = field(default=None, repr=False)

    def store(self) -> IntentStore:
        # Opened on first use so `pp validate` and `pp schema` need no store.
        if self._store is None:
            self._store = open_store(self.url, self.prefix)
        return self._store

    def close(self) -> None:
        if self._store is not None:
            self._store.close()
            self._store = None


pass_env = click.make_pass_decorator(Env)
json_option = click.option(
    "--json", "as_json", is_flag=True, help="Print JSON for scripts instead of text."
)


def echo(message: str, err: bool = False, nl: bool = True, file: IO[Any] | None = None) -> None:
    """Every line pp prints goes through here: text from the store is escaped."""
    click.echo(render.terminal_safe(message), err=err, nl=nl, file=file)


def _print_json(value: Any) -> None:
    echo(json.dumps(value, indent=2, sort_keys=True))


def _warn(message: str) -> None:
    echo(f"pp: warning: {render.one_line(message)}", err=True)


@click.group(name="pp", cls=_Group, context_settings={"help_option_names": ["-h", "--help"]})
@click.option(
    "--store",
    envvar="PP_STORE",
    default=default_store_url,
    show_default="$PP_STORE, else the embedded store",
    help="Intent store URL: sqlite:///abs/path.db or consul://host:port.",
)
@click.option(
    "--prefix",
    envvar="PP_PREFIX",
    default=keys.DEFAULT_PREFIX,
    show_default=True,
    help="Key prefix of this platform's intent in the store.",
)
@click.pass_context
def cli(ctx: click.Context, store: str, prefix: str) -> None:
    """Operate Platypus: write intent, deploy, roll back, see what agents report.

    Changes are recorded in the audit trail as $PP_ACTOR, or the login user.
    """
    env = Env(store, prefix)
    ctx.obj = env
    ctx.call_on_close(env.close)


# -- intent as files ----------------------------------------------------------------------


@cli.command()
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
@pass_env
def apply(env: Env, files: Sequence[str], dry_run: bool, prune_nodes: bool) -> None:
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
                _warn(
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


@cli.command()
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


@cli.command()
def schema() -> None:
    """Print the JSON Schema of app files and of every stored value."""
    echo(json.dumps(intent_schema(), indent=2))


@cli.command()
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
        _print_json(view.document)
    else:
        echo(yaml.safe_dump(view.document, sort_keys=False, default_flow_style=False), nl=False)
    if view.problems:
        raise PPError("; ".join(view.problems))


# -- changes ------------------------------------------------------------------------------


@cli.command()
@click.argument("app")
@click.argument("version")
@click.option("-c", "--cluster", required=True, help="Cluster to deploy to.")
@click.option("--sha256", required=True, help="SHA-256 of the version's artifact (64 hex digits).")
@click.option("--url", default=None, help="Where agents fetch the artifact.")
@pass_env
def deploy(env: Env, app: str, version: str, cluster: str, sha256: str, url: str | None) -> None:
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
        lambda old: op.dump(op.deployed(op.parse_config(old, key), version, sha256, url, key)),
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
        _warn(
            f"{keys.deploy_config(app, cluster)} is missing; nodes of {where} hold until it"
            " is written (pp apply)"
        )


def _active(value: Any) -> str | None:
    try:
        config = op.parse_config(value, "")
    except (IntentError, op.OperatorError):
        return None
    return config.active_version if config is not None else None


@cli.command()
@click.argument("app")
@click.option("-c", "--cluster", required=True, help="Cluster to roll back.")
@click.option(
    "--to",
    "to",
    default=None,
    metavar="VERSION",
    help="Prep version to make active; needed when the audit trail cannot tell.",
)
@pass_env
def rollback(env: Env, app: str, cluster: str, to: str | None) -> None:
    """Make the previously active version active again; the current one becomes prep.

    Without --to: the only prep version, else the prep version that was active
    most recently according to the audit trail (pp history).
    """
    op.check_name("app", app)
    op.check_name("cluster", cluster)
    if to is not None:
        op.check_name("version", to)
    store = env.store()
    key = keys.config(app, cluster)
    history = store.history(app)

    def transform(old: Any) -> Any:
        config = op.parse_config(old, key)
        if config is None:
            raise op.OperatorError(f"{key}: missing; nothing to roll back")
        target = to or op.rollback_target(config, history, key)
        return op.dump(op.rolled_back(config, target, key))

    change = op.update(store, key, transform, app=app, action="rollback", who=op.actor())
    before, after = _active(change.old), _active(change.new)
    kept = f" ({before} kept as prep)" if before else ""
    echo(f"{app}/{cluster}: rolled back to {after}{kept}")


@cli.command()
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
        _warn(
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


@cli.command()
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


@cli.command()
@click.argument("node")
@click.option("-a", "--app", "apps", multiple=True, help="Only this app (repeatable).")
@pass_env
def drain(env: Env, node: str, apps: Sequence[str]) -> None:
    """Take NODE's apps (or --app) out of their load balancers, leaving them running."""
    _drain(env, node, apps, on=True)


@cli.command()
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


@cli.command()
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


@cli.command()
@click.argument("app")
@click.option("-n", "--node", default=None, help="Only this node (default: every node of APP).")
@pass_env
def retry(env: Env, app: str, node: str | None) -> None:
    """Try again a version that failed its health gate and was rolled back.

    pp-setlive leaves a failed version alone until the intent changes; this asks it
    to try the same intent once more.
    """
    op.check_name("app", app)
    if node is not None:
        op.check_name("node", node)
    for done in op.request_retry(env.store(), app, node, actor=op.actor()):
        echo(f"{done}: retry of {app} requested")


# -- what happened ------------------------------------------------------------------------


@cli.command()
@click.argument("app", required=False)
@click.option("-n", "--node", default=None, help="Only this node.")
@json_option
@pass_env
def status(env: Env, app: str | None, node: str | None, as_json: bool) -> None:
    """What the agents report: one row per node, agent and app.

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
        _print_json([r.model_dump(mode="json") for r in reports])
        return
    expected: set[tuple[str, str]] = set()
    if app is not None:
        expected = {(n, app) for n in store.nodes_of(app) if node is None or n == node}
    elif node is not None:
        expected = {(node, a) for a in store.assignments(node)}
    unreported = sorted(expected - {(r.node, r.app) for r in reports})
    now = time.time()
    for held in store.agent_statuses(node):
        if held.state == "held":
            echo(f"HELD {held.node} {held.agent} for {render.age(now - held.since)}: {held.reason}")
    rows = render.status_rows(reports, unreported, now)
    echo(render.table(render.STATUS_COLUMNS, rows))


@cli.command()
@click.argument("app")
@json_option
@pass_env
def history(env: Env, app: str, as_json: bool) -> None:
    """Every change pp made to APP, oldest first: who, when, which key, what changed."""
    op.check_name("app", app)
    records = env.store().history(app)
    if as_json:
        _print_json([r.model_dump(mode="json") for r in records])
        return
    echo(render.table(render.HISTORY_COLUMNS, render.history_rows(records)))


cli.add_command(pack)


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point: the exit code, never a traceback for anything an operator can cause."""
    try:
        result = cli.main(args=argv, prog_name="pp", standalone_mode=False)
    except click.ClickException as exc:
        exc.show()
        return exc.exit_code
    except click.Abort:
        echo("pp: error: interrupted", err=True)
        return 130
    except BrokenPipeError:
        # `pp history | head`: the reader left. Point stdout at /dev/null so the
        # interpreter's final flush does not fail again on the way out.
        with contextlib.suppress(OSError):
            os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        return 1
    return result if isinstance(result, int) else 0
