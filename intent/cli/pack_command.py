"""``pp pack``: build an app's artifact from a directory and publish it."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

import click

from intent.cli.operator import OperatorError, check_name
from intent.cli.pack import PackError
from intent.cli.pack import pack as build_and_publish
from intent.cli.pack_image import push_image
from intent.docker_engine import DockerError
from intent.signing import SignatureError, load_private_key, sign


def _name(what: str) -> Callable[[click.Context, click.Parameter, str], str]:
    def check(ctx: click.Context, param: click.Parameter, value: str) -> str:
        try:
            return check_name(what, value)
        except OperatorError as exc:
            raise click.BadParameter(str(exc)) from exc

    return check


@click.command("pack")
@click.argument(
    "directory", required=False, type=click.Path(exists=True, file_okay=False, path_type=Path)
)
@click.option("--app", required=True, callback=_name("app"), help="The app's name.")
@click.option(
    "--version", "version", required=True, callback=_name("version"), help="The version to publish."
)
@click.option(
    "--repo",
    envvar="PP_REPO",
    help="Artifact repository: file:///path, /path or s3://bucket/prefix (env PP_REPO).",
)
@click.option(
    "--sign",
    "key",
    type=click.Path(exists=True, dir_okay=False, path_type=Path),
    help="Ed25519 private key (PEM or OpenSSH): also publish a detached .sig.",
)
@click.option("--force", is_flag=True, help="Replace a published version whose contents differ.")
@click.option(
    "--docker",
    "image",
    metavar="IMAGE",
    help="Publish this local Docker image instead of a directory (needs --registry).",
)
@click.option(
    "--registry",
    metavar="HOST[:PORT]",
    help="With --docker: the registry the image is pushed to, as <registry>/<app>:<version>.",
)
@click.option(
    "--docker-host",
    metavar="URL",
    help="With --docker: the engine holding IMAGE [default: DOCKER_HOST, else the local one].",
)
def pack(
    directory: Path | None,
    app: str,
    version: str,
    repo: str | None,
    key: Path | None,
    force: bool,
    image: str | None,
    registry: str | None,
    docker_host: str | None,
) -> None:
    """Build APP_VERSION.tar.gz from DIRECTORY (deterministically: the same tree gives
    the same sha256), upload it to the repository and print its sha256. With --docker,
    push IMAGE to --registry instead and print its reference pinned by digest.

    \b
    Then deploy it:  pp deploy APP VERSION --cluster C --sha256 <printed sha256>
              or:    pp deploy APP VERSION --cluster C --image <printed reference>
    """
    if image is not None:
        _push(image, app, version, registry, docker_host, directory, key)
        return
    if directory is None or repo is None:
        raise click.UsageError("give DIRECTORY and --repo (or --docker IMAGE and --registry)")
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


def _push(
    image: str,
    app: str,
    version: str,
    registry: str | None,
    docker_host: str | None,
    directory: Path | None,
    key: Path | None,
) -> None:
    if registry is None:
        raise click.UsageError("--docker needs --registry HOST[:PORT]")
    if directory is not None or key is not None:
        # An image carries no detached signature; pp-preparer with --trusted-keys refuses images.
        raise click.UsageError("--docker takes no DIRECTORY and no --sign")
    try:
        pinned = push_image(image, app, version, registry, docker_host)
    except DockerError as exc:
        raise click.ClickException(str(exc)) from exc
    click.echo(f"pushed {image} as {pinned.repository}:{version}", err=True)
    click.echo(str(pinned))
