"""The ``pp-preparer`` command."""

from __future__ import annotations

import re
import threading
from pathlib import Path
from typing import Any

import click

from agents import entrypoint
from agents.preparer.agent import (
    DEFAULT_STATE_DIR,
    STATE_DIR_VAR,
    Preparer,
    default_state_dir,
)
from agents.preparer.apply import Settings
from agents.system import file_url
from agents.system.archive import Limits
from agents.system.fetch import FetchError, FetchOptions, check_url
from intent.artifacts import artifact_url
from intent.signing import SignatureError, load_trusted_keys
from intent.store import IntentStore

_SIZE = re.compile(r"^\s*(\d+)\s*([kmgt]?)(i?b)?\s*$", re.IGNORECASE)


class ByteSize(click.ParamType[int, Any]):
    """A size in bytes: ``1073741824``, ``512M``, ``4G`` or ``4GiB`` (powers of 1024)."""

    name = "size"

    def convert(self, value: Any, param: click.Parameter | None, ctx: click.Context | None) -> int:
        if isinstance(value, int):
            return int(value)
        match = _SIZE.match(str(value))
        if match is None:
            self.fail(f"{value!r} is not a size (examples: 1048576, 512M, 4G)", param, ctx)
        number, unit = int(match.group(1)), match.group(2).lower()
        return int(number * 1024 ** " kmgt".index(unit or " "))


@click.command("pp-preparer", cls=entrypoint.AgentCommand)
@entrypoint.common_options
@click.option(
    "--repo",
    envvar="PP_REPO",
    default=None,
    help="Artifact repository for versions without a url: file:///path, /path, "
    "http(s)://host/path or s3://bucket/prefix; artifacts are "
    "<repo>/<app>/<app>_<version>.tar.gz.",
)
@click.option(
    "--allowed-sources",
    envvar="PP_ALLOWED_SOURCES",
    default=None,
    help="Comma-separated URLs (e.g. https://releases.example/apps/,s3://releases/) "
    "under which every http(s)/s3 artifact must lie; --repo is always allowed. "
    "Default: any source (the sha256 in the intent decides what installs).",
)
@click.option(
    "--trusted-keys",
    envvar="PP_TRUSTED_KEYS",
    default=None,
    type=click.Path(exists=True, file_okay=False, path_type=Path),
    help="Directory of Ed25519 public keys: every artifact then needs a detached "
    "<artifact>.sig made by one of them.",
)
@click.option(
    "--state-dir",
    envvar=STATE_DIR_VAR,
    default=None,
    type=click.Path(file_okay=False, path_type=Path),
    show_default=f"{DEFAULT_STATE_DIR} for root, else ~/.local/state/platypus/preparer",
    help="The preparer's own directory (root's; its per-app locks live there).",
)
@click.option(
    "--max-install-bytes",
    type=ByteSize(),
    default="4G",
    show_default=True,
    help="Largest total size an artifact may extract to (decompression bombs).",
)
@click.option(
    "--max-install-files",
    type=click.IntRange(min=1),
    default=100_000,
    show_default=True,
    help="Most entries an artifact may hold.",
)
@click.option(
    "--min-free-bytes",
    type=ByteSize(),
    default="0",
    show_default=True,
    help="Free space to leave on the install file system after a download.",
)
@entrypoint.max_parallel_option(2, "Apps fetched and installed at the same time.")
@click.option(
    "--keep-old",
    type=click.IntRange(min=0),
    default=1,
    show_default=True,
    help="Old installs kept for rollback besides the wanted ones and current "
    "(previous first, then the most recent).",
)
@click.option(
    "--fetch-timeout",
    type=click.FloatRange(min=0.1),
    default=30.0,
    show_default=True,
    help="Seconds to connect, and to wait for each read.",
)
@click.option(
    "--fetch-attempts",
    type=click.IntRange(min=1),
    default=5,
    show_default=True,
    help="Tries per download before the version is reported as failed.",
)
@click.option(
    "--fetch-deadline",
    type=click.FloatRange(min=1),
    default=1800.0,
    show_default=True,
    help="Seconds a download may take in all, across its attempts and the waits between "
    "them: a source too slow to finish by then (or one that stalls) is cut off and the "
    "version reported as failed, to be tried again later.",
)
@click.option(
    "--docker-host",
    default=None,
    metavar="URL",
    help="The Docker engine image versions are pulled into (default: DOCKER_HOST, else "
    "the local socket). Registry credentials come from the Docker config "
    "($DOCKER_CONFIG/config.json, ~/.docker/config.json).",
)
@click.option(
    "--allowed-registries",
    default=None,
    metavar="HOST[:PORT],...",
    help="Pull images only from these registries (default: any the intent names).",
)
def main(**params: Any) -> None:
    """Fetch, verify and install every version the intent names for this node."""
    common = entrypoint.pop_common(params)
    repo: str | None = params["repo"]
    if repo:
        try:
            check_url(artifact_url(repo, "app", "1"))
        except FetchError as exc:
            entrypoint.fail(f"--repo {repo}: {exc}")
    allowed = _allowed_sources(params["allowed_sources"], repo)
    trusted = None
    if params["trusted_keys"] is not None:
        try:
            trusted = load_trusted_keys(params["trusted_keys"])
        except SignatureError as exc:
            entrypoint.fail(str(exc))
    settings = Settings(
        fetch=FetchOptions(
            timeout_s=params["fetch_timeout"],
            attempts=params["fetch_attempts"],
            deadline_s=params["fetch_deadline"],
            min_free_bytes=params["min_free_bytes"],
        ),
        limits=Limits(params["max_install_bytes"], params["max_install_files"]),
        trusted_keys=trusted,
        allowed_sources=allowed,
        allowed_registries=tuple(
            r.strip() for r in (params["allowed_registries"] or "").split(",") if r.strip()
        ),
    )

    state_dir = (params["state_dir"] or default_state_dir()).absolute()

    def build(store: IntentStore, stop: threading.Event) -> Preparer:
        return Preparer(
            settings,
            repo,
            params["keep_old"],
            store,
            common.node,
            state_dir=state_dir,
            stop=stop,
            docker_host=params["docker_host"],
        )

    max_parallel = entrypoint.pop_max_parallel(params)
    entrypoint.run(common, build, max_parallel=max_parallel, state_dir=state_dir)


def _allowed_sources(value: str | None, repo: str | None) -> tuple[str, ...]:
    if not value:
        return ()
    allowed = [v.strip() for v in value.split(",") if v.strip()]
    for url in allowed:
        scheme = url.split("://", 1)[0].lower() if "://" in url else ""
        if scheme not in ("http", "https", "s3") or not url.split("://", 1)[1].split("/")[0]:
            entrypoint.fail(f"--allowed-sources {url}: use http(s)://host/path or s3://bucket/")
    if repo and not file_url.is_file_url(artifact_url(repo, "app", "1")):
        allowed.append(repo)
    return tuple(allowed)


if __name__ == "__main__":
    main()
