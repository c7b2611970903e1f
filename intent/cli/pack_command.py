"""``pp pack``: build an app's artifact from a directory and publish it."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

import click

from intent.cli.operator import OperatorError, check_name
from intent.cli.pack import PackError
from intent.cli.pack import pack as build_and_publish
from intent.signing import SignatureError, load_private_key, sign


def _name(what: str) -> Callable[[click.Context, click.Parameter, str], str]:
    def check(ctx: click.Context, param: click.Parameter, value: str) -> str:
        try:
            return check_name(what, value)
        except OperatorError as exc:
            raise click.BadParameter(str(exc)) from exc

    return check


@click.command("pack")
@click.argument("directory", type=click.Path(exists=True, file_okay=False, path_type=Path))
@click.option("--app", required=True, callback=_name("app"), help="The app's name.")
@click.option(
    "--version", "version", required=True, callback=_name("version"), help="The version to publish."
)
@click.option(
    "--repo",
    envvar="PP_REPO",
    required=True,
    help="Artifact repository: file:///path, /path or s3://bucket/prefix (env PP_REPO).",
)
@click.option(
    "--sign",
    "key",
    type=click.Path(exists=True, dir_okay=False, path_type=Path),
    help="Ed25519 private key (PEM or OpenSSH): also publish a detached .sig.",
)
@click.option("--force", is_flag=True, help="Replace a published version whose contents differ.")
def pack(directory: Path, app: str, version: str, repo: str, key: Path | None, force: bool) -> None:
    """Build APP_VERSION.tar.gz from DIRECTORY (deterministically: the same tree gives
    the same sha256), upload it to the repository and print its sha256.

    \b
    Then deploy it:  pp deploy APP VERSION --cluster C --sha256 <printed sha256>
    """
    signer = None
    if key is not None:
        try:
            private = load_private_key(key)
        except SignatureError as exc:
            raise click.ClickException(str(exc)) from exc

        def signer(app: str, version: str, sha256: str) -> bytes:
            return sign(private, app, version, sha256)

    try:
        published = build_and_publish(directory, app, version, repo, signer, force)
    except PackError as exc:
        raise click.ClickException(str(exc)) from exc
    state = "already published" if published.unchanged else "published"
    click.echo(f"{state} {published.url} ({published.size} bytes)", err=True)
    click.echo(published.sha256)
