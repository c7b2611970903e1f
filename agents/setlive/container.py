"""The runit service of an image version: ``run`` execs ``docker run`` in the foreground.

runit supervises the ``docker run`` client, which stays attached to its container: the
container's output is the service's log, a TERM from ``sv down`` is passed on to the
container (``--init`` forwards it to the app), the container's exit is the service's
exit, and ``--rm`` removes the container when it stops. So supervision, logs, the
health gate, rollback, removal and drift repair are the tarball services' own.

What ``run`` does, in order:

- ``cd -P <basedir>/current`` and derive ``PP_VERSION`` from it, as a tarball's ``run``
  does; the image comes from that install's ``.pp-image`` (root's, written by the
  preparer once the pull was verified), so the version and the image always agree;
- remove any container left with this service's label (a crash, a ``kill -9`` of the
  client): a name is free before ``docker run`` takes it;
- exec ``docker run --rm --name pp-<app>-<version> --network host --read-only
  --security-opt no-new-privileges --cap-drop ALL --pids-limit N --user <uid>:<gid>
  --init --pull never --env-file ... --mount <config.json, read-only> <image>``.

The app's environment goes through ``--env-file`` (a root-only file in the service
directory), never the command line (``ps`` shows a command line to every user) and
never the client's own environment: an app owner's ``user_config`` must not be able to
steer the client itself (``DOCKER_HOST``, ``DOCKER_CONFIG``). Only ``PP_VERSION`` and
``PP_CONFIG_DIGEST`` are in the client's environment, where setlive reads them to see
what runs, and passed on by name. ``--pull never``: only what the preparer pulled and
verified ever runs. ``finish`` removes the service's container once ``run`` has ended.
"""

from __future__ import annotations

import shlex
import shutil
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path

from agents.system.layout import IMAGE_FILE

ENV_FILE = "container.env"
FINISH_FILE = "finish"
FILES = (FINISH_FILE, ENV_FILE)
"""What an image service has beyond a tarball service's files."""
LABEL = "io.platypus.service"
DEFAULT_PIDS_LIMIT = 512


def _default_docker() -> str:
    return shutil.which("docker") or "/usr/bin/docker"


@dataclass(frozen=True)
class ContainerSettings:
    """How setlive's services reach the engine: pp-setlive's own options."""

    docker_bin: str = field(default_factory=_default_docker)
    docker_host: str | None = None
    """None: the client's default (the local socket)."""
    pids_limit: int = DEFAULT_PIDS_LIMIT


@dataclass(frozen=True)
class ContainerRun:
    """One image service: the engine settings and whom the container runs as."""

    settings: ContainerSettings
    uid: int
    gid: int


def container_name(app: str, version: str) -> str:
    return f"pp-{app}-{version}"


def _docker(settings: ContainerSettings) -> str:
    command = shlex.quote(settings.docker_bin)
    if settings.docker_host is not None:
        command += f" --host {shlex.quote(settings.docker_host)}"
    return command


def env_file(env: Mapping[str, str]) -> tuple[bytes, str | None]:
    """``--env-file`` content, or why it cannot hold ``env``: the format is one
    ``NAME=value`` line per variable, so a value with a line break has no spelling."""
    broken = sorted(name for name, value in env.items() if "\n" in value or "\r" in value)
    if broken:
        return b"", (
            f"env {', '.join(broken)}: a line break cannot be passed to a container "
            "(docker's --env-file is one line per variable); encode the value"
        )
    return "".join(f"{name}={value}\n" for name, value in sorted(env.items())).encode(), None


@dataclass(frozen=True)
class ImageService:
    """One image version's service, as ``services.render`` places it."""

    app: str
    service: str
    basedir: str
    service_dir: Path
    config_path: Path
    run: ContainerRun


def run_script(svc: ImageService, env_error: str | None) -> bytes:
    app, service, run = svc.app, svc.service, svc.run
    service_dir, config_path = svc.service_dir, svc.config_path
    current = f"{svc.basedir}/current"
    q = shlex.quote
    if env_error is not None:
        return f"""#!/bin/sh
# Written by pp-setlive for app {app}; rewritten on every change: do not edit.
echo {q(f"pp-setlive: {env_error}; not starting")}
sleep 5
exit 111
""".encode()
    docker = _docker(run.settings)
    user = f"{run.uid}:{run.gid}"
    drop = "--cap-drop ALL " if run.uid != 0 else ""
    mount = f"type=bind,source={config_path},target={config_path},readonly"
    return f"""#!/bin/sh
# Written by pp-setlive for app {app}; rewritten on every change: do not edit.
exec 2>&1
if ! cd -P {q(current)} 2>/dev/null; then
    echo {q(f"pp-setlive: {current} does not exist; not starting")}
    sleep 5
    exit 111
fi
PP_VERSION="${{PWD##*/{app}_}}"
export PP_VERSION
image=
IFS= read -r image < {IMAGE_FILE}
case $image in
    ''|-*|*[!A-Za-z0-9._/:@-]*)
        echo "pp-setlive: $PWD/{IMAGE_FILE} names no image; not starting"
        sleep 5
        exit 111 ;;
esac
IFS= read -r PP_CONFIG_DIGEST < {q(str(service_dir / "env" / "PP_CONFIG_DIGEST"))}
export PP_CONFIG_DIGEST
stale=$({docker} ps --all --quiet --filter label={LABEL}={service}) || exit 111
if [ -n "$stale" ]; then
    {docker} rm --force $stale >/dev/null || exit 111
fi
exec {docker} run --rm --name "pp-{app}-$PP_VERSION" --label {LABEL}={service} \\
    --network host --read-only --security-opt no-new-privileges {drop}\\
    --pids-limit {run.settings.pids_limit} --user {user} --init --pull never \\
    --env-file {q(str(service_dir / ENV_FILE))} -e PP_VERSION -e PP_CONFIG_DIGEST \\
    --mount {q(mount)} \\
    "$image"
""".encode()


def finish_script(app: str, service: str, settings: ContainerSettings) -> bytes:
    """``finish``: runsv runs it after ``run`` ends; the container goes with it (a client
    killed hard leaves its container running)."""
    docker = _docker(settings)
    return f"""#!/bin/sh
# Written by pp-setlive for app {app}; rewritten on every change: do not edit.
stale=$({docker} ps --all --quiet --filter label={LABEL}={service} 2>/dev/null)
[ -z "$stale" ] || {docker} rm --force $stale >/dev/null 2>&1
exit 0
""".encode()


def service_files(svc: ImageService, env: Mapping[str, str]) -> dict[str, tuple[bytes, int]]:
    """``run``, ``finish`` and the env file of an image service: (content, mode) by path."""
    data, error = env_file(env)
    return {
        "run": (run_script(svc, error), 0o755),
        FINISH_FILE: (finish_script(svc.app, svc.service, svc.run.settings), 0o755),
        ENV_FILE: (data, 0o600),
    }
