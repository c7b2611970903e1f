"""The host as it is: installs, links, staged service directories, runit and processes.

Nothing is taken from what setlive last reported or last did: the version that
really runs is read from the process's own environment (``PP_VERSION``,
``PP_CONFIG_DIGEST`` set by ``run``), so a hand-made ``sv down`` or a changed
``current`` shows up as drift and is repaired.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path

from agents.setlive.plan import ServiceObs
from agents.setlive.services import CONFIG_FILE, DIGEST_VAR, ENV_DIR, OWNER_FILE, FileSpec
from agents.setlive.services import parse_owner as _parse_owner
from agents.system import fs, runit
from agents.system.layout import LaunchEntries

MANAGED_FILES = ("run", "log/run", CONFIG_FILE, OWNER_FILE)


@dataclass(frozen=True)
class Paths:
    runit_dir: Path
    stage: Path
    log_root: Path
    state_dir: Path


def staged_entries(stage: Path, app: str) -> LaunchEntries:
    """The entries of the services staged for ``app``: what root already supervises,
    from setlive's own ``pp-service.json`` files (never from the app's install)."""
    entries: list[str | None] = []
    for name in sorted(n for n, owner in staged_services(stage).items() if owner == app):
        try:
            owner = _parse_owner((stage / name / OWNER_FILE).read_bytes())
        except OSError:
            continue
        if owner is not None:
            entries.append(owner[1])
    return tuple(entries)


def _file_spec(path: Path) -> FileSpec | None:
    try:
        st = path.stat()
        return FileSpec(path.read_bytes(), st.st_mode & 0o7777, st.st_gid)
    except OSError:
        return None


def read_staged(service_dir: Path) -> tuple[dict[str, FileSpec] | None, str | None, bool]:
    """(managed files, owning app, down file present) of a staged service directory."""
    if not service_dir.is_dir():
        return None, None, False
    files: dict[str, FileSpec] = {}
    for rel in MANAGED_FILES:
        spec = _file_spec(service_dir / rel)
        if spec is not None:
            files[rel] = spec
    try:
        for entry in sorted((service_dir / ENV_DIR).iterdir()):
            if fs.is_temp(entry):
                continue
            spec = _file_spec(entry)
            if spec is not None:
                files[f"{ENV_DIR}/{entry.name}"] = spec
    except OSError:
        pass
    owner = _parse_owner(files[OWNER_FILE].data) if OWNER_FILE in files else None
    return files, owner[0] if owner else None, (service_dir / "down").exists()


def read_environ(pid: int) -> dict[str, str] | None:
    try:
        raw = Path(f"/proc/{pid}/environ").read_bytes()
    except OSError:
        return None
    env = {}
    for item in raw.split(b"\0"):
        key, sep, value = item.partition(b"=")
        if sep:
            env[key.decode("utf-8", "replace")] = value.decode("utf-8", "replace")
    return env


def link_state(runit_dir: Path, stage: Path, name: str) -> str | None:
    path = runit_dir / name
    if not os.path.lexists(path):
        return None
    target = runit.linked_target(runit_dir, name)
    return "ours" if target == stage / name else "foreign"


def observe_service(paths: Paths, name: str) -> ServiceObs:
    service_dir = paths.stage / name
    staged, owner, down_file = read_staged(service_dir)
    status = runit.status(service_dir) if staged is not None else runit.ServiceStatus(False)
    running_version = running_digest = None
    if status.up and status.pid:
        env = read_environ(status.pid)
        if env is not None:
            running_version = env.get("PP_VERSION")
            running_digest = env.get(DIGEST_VAR)
    return ServiceObs(
        name=name,
        owner=owner,
        staged=staged,
        down_file=down_file,
        link=link_state(paths.runit_dir, paths.stage, name),
        status=status,
        running_version=running_version,
        running_digest=running_digest,
    )


def staged_services(stage: Path) -> dict[str, str]:
    """``{service: app}`` for every service directory setlive staged."""
    found = {}
    try:
        children = sorted(stage.iterdir())
    except FileNotFoundError:
        return {}
    for child in children:
        if child.name.startswith(".") or not child.is_dir():
            continue
        try:
            owner = _parse_owner((child / OWNER_FILE).read_bytes())
        except OSError:
            continue
        if owner is not None:
            found[child.name] = owner[0]
    return found


def ancestry(pid: int | None = None) -> set[int]:
    """This process and its ancestors: a service whose pid is among them is the one this
    setlive runs in (whether or not the launcher exec'ed it)."""
    pids = set()
    current = os.getpid() if pid is None else pid
    while current > 1 and current not in pids:
        pids.add(current)
        try:
            stat = Path(f"/proc/{current}/stat").read_text()
            current = int(stat.rsplit(")", 1)[1].split()[1])
        except (OSError, ValueError, IndexError):
            break
    return pids


def self_service(app: str, services: dict[str, ServiceObs]) -> str | None:
    mine = ancestry()
    for name, obs in sorted(services.items()):
        if obs.owner == app and obs.status.pid is not None and obs.status.pid in mine:
            return name
    return None
