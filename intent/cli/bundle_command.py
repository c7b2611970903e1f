"""``pp bundle``: build the agents' own bundle (``bundle``) and print its sha256."""

from __future__ import annotations

from pathlib import Path

import click

from intent.cli import bundle
from intent.cli.operator import OperatorError, check_name
from intent.cli.pack import PackError


def _version(ctx: click.Context, param: click.Parameter, value: str | None) -> str | None:
    if value is None:
        return None
    try:
        return check_name("version", value)
    except OperatorError as exc:
        raise click.BadParameter(str(exc)) from exc


@click.command("bundle")
@click.option(
    "--out",
    type=click.Path(file_okay=False, path_type=Path),
    help="Directory to write platypus-<version>.tar.gz into.",
)
@click.option(
    "--version",
    "version",
    callback=_version,
    help="Default: <release>-<12 hex digits of the tree's sha256>.",
)
@click.option(
    "--wheels",
    type=click.Path(file_okay=False, path_type=Path),
    default=None,
    help="Wheelhouse of the dependencies (env PP_WHEELHOUSE; default <venv>/wheelhouse); "
    "missing wheels are fetched into it with pip.",
)
@click.option(
    "--require",
    "extra",
    multiple=True,
    metavar="REQ",
    help="Carry one more dependency (pip requirement, e.g. name==1.2); repeatable.",
)
@click.option(
    "--find-links",
    "links",
    multiple=True,
    type=click.Path(exists=True, file_okay=False, path_type=Path),
    help="Another directory of wheels to install from; repeatable.",
)
@click.option(
    "--prepare-wheels",
    is_flag=True,
    hidden=True,
    help="Only fill the wheelhouse (scripts/setup --test), build nothing.",
)
def bundle_command(
    out: Path | None,
    version: str | None,
    wheels: Path | None,
    extra: tuple[str, ...],
    links: tuple[Path, ...],
    prepare_wheels: bool,
) -> None:
    """Build the agents' bundle, platypus-<version>.tar.gz, in OUT, and print its sha256.

    \b
    It carries every dependency, so a host needs only python3 (the same major.minor
    as this one) to run it: unpack it anywhere and run its bin/kickstart.
    The same code and dependencies give the same bytes.
    """
    try:
        if prepare_wheels:
            bundle.prepare_wheelhouse(wheels or bundle.default_wheelhouse())
            return
        if out is None:
            raise click.UsageError("Missing option '--out'.")
        built = bundle.build(out, version, wheels, list(extra), list(links))
    except (bundle.BundleError, PackError) as exc:
        raise click.ClickException(str(exc)) from exc
    click.echo(f"built {built.path} ({built.size} bytes, version {built.version})", err=True)
    click.echo(built.sha256)
