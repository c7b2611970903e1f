"""What a runit service directory for an app contains: rendered, not written (pure).

One service per executable under ``bin/launch`` (``<app>`` for a single file,
``<app>-<entry>`` for each file of a directory). Each service directory holds:

    run            cd into <basedir>/current, export PP_VERSION, exec chpst -u <run_as> -e env
    log/run        svlogd -tt into <log-root>/<service>, a directory run_as owns
    env/           the env dir: user_config, then deploy_config.env, then PP_* (later wins)
    config.json    user_config as JSON, readable by run_as's group (path in PP_CONFIG_PATH)
    pp-service.json   which app and entry owns the directory (how setlive finds its own)

``PP_VERSION`` is derived by ``run`` from the directory it really starts in, so
it can never disagree with the code that runs; ``PP_CONFIG_DIGEST`` fingerprints
the whole definition, so a running process shows whether it has the latest one.
"""

from __future__ import annotations

import hashlib
import json
import re
import shlex
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from agents.health import ENV_DIR as ENV_DIR
from agents.setlive.container import ContainerRun, ImageService, service_files
from intent.model import ENV_NAME_PATTERN, DeployConfig

OWNER_FILE = "pp-service.json"
CONFIG_FILE = "config.json"
DIGEST_VAR = "PP_CONFIG_DIGEST"

_ENV_NAME = re.compile(ENV_NAME_PATTERN)


@dataclass(frozen=True)
class FileSpec:
    data: bytes
    mode: int
    gid: int | None = None
    """Group owner to enforce, or None to leave it as created (root's)."""


@dataclass(frozen=True)
class ServiceSpec:
    name: str
    app: str
    entry: str | None
    files: Mapping[str, FileSpec]
    """Relative path in the service directory -> content; ``env/*`` is the whole env dir."""
    digest: str

    @property
    def env_dir_names(self) -> set[str]:
        return {p.split("/", 1)[1] for p in self.files if p.startswith(f"{ENV_DIR}/")}


def service_name(app: str, entry: str | None) -> str:
    return app if entry is None else f"{app}-{entry}"


def port_var(name: str) -> str:
    return "PP_PORT_" + re.sub(r"[^A-Za-z0-9]", "_", name).upper()


def env_for(
    app: str,
    cluster: str,
    service: str,
    deploy: DeployConfig,
    user_config: Mapping[str, Any],
    config_path: Path,
) -> dict[str, str]:
    """The app's environment, later sources winning: user_config (app owners), then
    deploy_config.env (platform team), then the platform's own ``PP_*`` variables."""
    env: dict[str, str] = {}
    for key, value in user_config.items():
        if _ENV_NAME.match(key) and not key.startswith("PP_"):
            env[key] = value if isinstance(value, str) else json.dumps(value, sort_keys=True)
    env.update(deploy.env)
    env.update(
        {
            "PP_APP": app,
            "PP_CLUSTER": cluster,
            "PP_SERVICE": service,
            "PP_CONFIG_PATH": str(config_path),
        }
    )
    for port in deploy.ports:
        env[port_var(port.name)] = str(port.port)
    env.pop("PP_VERSION", None)  # set by run from the directory it starts in
    return env


def _envdir_value(value: str) -> bytes:
    # chpst -e reads the first line and turns NULs into newlines, so multi-line
    # values survive; the trailing newline keeps an empty value set (an empty
    # file would unset the variable instead).
    return value.replace("\n", "\0").encode() + b"\n"


def run_script(app: str, basedir: str, entry: str | None, run_as: str, env_dir: Path) -> bytes:
    current = f"{basedir}/current"
    launch = "./bin/launch" if entry is None else f"./bin/launch/{entry}"
    prefix = f"*/{app}_"
    return f"""#!/bin/sh
# Written by pp-setlive for app {app}; rewritten on every change: do not edit.
exec 2>&1
if ! cd -P {shlex.quote(current)} 2>/dev/null; then
    echo {shlex.quote(f"pp-setlive: {current} does not exist; not starting")}
    sleep 5
    exit 111
fi
PP_VERSION="${{PWD##{prefix}}}"
export PP_VERSION
exec chpst -u {shlex.quote(run_as)} -e {shlex.quote(str(env_dir))} {shlex.quote(launch)}
""".encode()


def log_script(app: str, run_as: str, log_dir: Path) -> bytes:
    """``log/run``: svlogd as ``run_as`` in ``log_dir``, a directory ``run_as`` owns.

    svlogd obeys a ``config`` file in its directory, which can name a program it runs
    on every rotation, and writes through links it finds there. So a directory that
    belongs to anyone else (``run_as`` changed; a link only root could have put in the
    root-owned log root) is set aside, never handed over: the previous user's files
    never steer a logger that now runs as someone else, root included.
    """
    d = shlex.quote(str(log_dir))
    user = shlex.quote(run_as)
    return f"""#!/bin/sh
# Written by pp-setlive for app {app}; rewritten on every change: do not edit.
if [ -L {d} ] || {{ [ -e {d} ] && [ "$(stat -c %u {d})" != "$(id -u {user})" ]; }}; then
    mv -T {d} {d}.old-"$(date +%s)" || exit 111
fi
mkdir -p {d} && chown {user}: {d} || exit 111
exec chpst -u {user} svlogd -tt {d}
""".encode()


def render(
    *,
    app: str,
    cluster: str,
    entries: Sequence[str | None],
    deploy: DeployConfig,
    user_config: Mapping[str, Any],
    stage: Path,
    log_root: Path,
    gid: int | None,
    container: ContainerRun | None = None,
) -> list[ServiceSpec]:
    """The service definitions for one version of an app (its ``bin/launch`` entries;
    with ``container``, the one service of an image version, see ``container``)."""
    specs = []
    for entry in entries:
        name = service_name(app, entry)
        service_dir = stage / name
        config_path = service_dir / CONFIG_FILE
        files: dict[str, FileSpec] = {
            "run": FileSpec(
                run_script(app, deploy.basedir, entry, deploy.run_as, service_dir / ENV_DIR), 0o755
            ),
            "log/run": FileSpec(log_script(app, deploy.run_as, log_root / name), 0o755),
            CONFIG_FILE: FileSpec(
                json.dumps(dict(user_config), indent=2, sort_keys=True).encode() + b"\n",
                0o640,
                gid,
            ),
        }
        env = env_for(app, cluster, name, deploy, user_config, config_path)
        for key, value in env.items():
            files[f"{ENV_DIR}/{key}"] = FileSpec(_envdir_value(value), 0o600)
        if container is not None:
            image_service = ImageService(
                app, name, deploy.basedir, service_dir, config_path, container
            )
            image_files = service_files(image_service, env)
            files.update({rel: FileSpec(data, mode) for rel, (data, mode) in image_files.items()})
        digest = definition_digest(files)
        files[f"{ENV_DIR}/{DIGEST_VAR}"] = FileSpec(_envdir_value(digest), 0o600)
        files[OWNER_FILE] = FileSpec(
            json.dumps({"app": app, "entry": entry}, sort_keys=True).encode() + b"\n", 0o644
        )
        specs.append(ServiceSpec(name, app, entry, files, digest))
    return specs


def definition_digest(files: Mapping[str, FileSpec]) -> str:
    h = hashlib.sha256()
    for path in sorted(files):
        spec = files[path]
        h.update(f"{path}\0{spec.mode:o}\0{spec.gid}\0".encode())
        h.update(spec.data)
        h.update(b"\0")
    return h.hexdigest()[:16]


def parse_owner(data: bytes) -> tuple[str, str | None] | None:
    """(app, entry) from a ``pp-service.json``, or None when it is not ours."""
    try:
        owner = json.loads(data)
        app, entry = owner["app"], owner.get("entry")
    except (ValueError, KeyError, TypeError):
        return None
    if not isinstance(app, str) or not (entry is None or isinstance(entry, str)):
        return None
    return app, entry
