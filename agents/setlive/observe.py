"""The host as it is: installs, links, staged service directories, runit and processes.

Nothing is taken from what setlive last reported or last did: the version that
really runs is read from the process's own environment (``PP_VERSION``,
``PP_CONFIG_DIGEST`` set by ``run``), so a hand-made ``sv down`` or a changed
``current`` shows up as drift and is repaired. Only setlive's own notes (its
state directory) say what the host cannot show: a switch in progress, a failure.
"""

from __future__ import annotations

import os
import pwd
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from pathlib import Path

from agents import health
from agents.setlive import container
from agents.setlive.plan import (
    Desired,
    DrainBounds,
    DrainSeen,
    Observed,
    ServiceObs,
    VersionInfo,
    fingerprint,
)
from agents.setlive.services import (
    CONFIG_FILE,
    DIGEST_VAR,
    ENV_DIR,
    OWNER_FILE,
    FileSpec,
    render,
)
from agents.setlive.services import parse_owner as _parse_owner
from agents.setlive.state import AppState
from agents.system import fs, runit
from agents.system.layout import AppLayout, InstallMarker, LaunchEntries
from intent.store import AppIntent

MANAGED_FILES = ("run", "log/run", CONFIG_FILE, OWNER_FILE, *container.FILES)


@dataclass(frozen=True)
class Paths:
    runit_dir: Path
    stage: Path
    log_root: Path
    state_dir: Path
    containers: container.ContainerSettings = field(default_factory=container.ContainerSettings)
    """How image versions' services reach the Docker engine."""


def staged_entries(stage: Path, app: str) -> LaunchEntries:
    """The entries of the services staged for ``app``: what root already supervises,
    from setlive's own ``pp-service.json`` files (never from the app's install)."""
    entries: list[str | None] = []
    for name in services_of(stage, app):
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


FOLLOWED_BY_VAR = "PP_FOLLOWED_BY"
"""Set by the systemd unit a setlive runs as: the runit service that follows that unit
(restarts it when started; agents/kickstart/launch.py) and so stands for this setlive."""


def self_service(app: str, services: dict[str, ServiceObs]) -> str | None:
    mine = ancestry()
    follower = os.environ.get(FOLLOWED_BY_VAR)
    for name, service in sorted(services.items()):
        if service.owner != app:
            continue
        if name == follower or (service.status.pid is not None and service.status.pid in mine):
            return name
    return None


# -- one app ---------------------------------------------------------------------------------


def observe(
    intent: AppIntent,
    layout: AppLayout,
    paths: Paths,
    notes: AppState,
    check: Callable[[str], health.Check | None],
    drain: DrainBounds | None = None,
    drained_for: str | None = None,
) -> tuple[Desired, Observed]:
    """What should run for ``intent`` and what the host runs now, for ``plan``.

    ``drain``: how long a drain may take, for an app behind load balancers;
    ``drained_for``: the drain request pp-elb-registrar last acknowledged.

    The app's health is checked here when all its services are up, so the planner
    knows whether a restart would take a healthy node away (``min_nodes``), and the
    report of a pass that changes nothing can reuse the check's answer."""
    config, deploy = intent.config, intent.deploy
    assert config is not None and deploy is not None and intent.cluster is not None
    active = config.active_version
    sha = config.versions[active].digest if active else None
    desired = Desired(
        app=intent.app,
        version=active,
        fingerprint=fingerprint(active, sha, deploy, config.user_config),
        min_nodes=config.min_nodes,
        drain=drain if deploy.elb else None,
    )
    current = layout.version_of(layout.current)
    previous = layout.version_of(layout.previous)
    candidates = {active, current, previous}
    if notes.failure:
        candidates.add(notes.failure.rolled_back_to)
    if notes.pending:
        candidates.add(notes.pending.from_version)
    user = pwd.getpwnam(deploy.run_as)
    gid = user.pw_gid
    versions: dict[str, VersionInfo] = {}
    for version in sorted(v for v in candidates if v is not None):
        marker = layout.read_marker(version)
        launch = None
        if marker is not None and (version != active or marker.sha256 == sha):
            launch = launch_entries(paths.stage, intent.app, version, marker, current)
        if launch is None:
            versions[version] = VersionInfo(False)
            continue
        entries, error = launch
        specs = render(
            app=intent.app,
            cluster=intent.cluster,
            entries=entries,
            deploy=deploy,
            user_config=config.user_config,
            stage=paths.stage,
            log_root=paths.log_root,
            gid=gid,
            container=(
                container.ContainerRun(paths.containers, user.pw_uid, gid)
                if marker is not None and marker.image is not None
                else None
            ),
        )
        versions[version] = VersionInfo(True, tuple(specs), error)
    names = set(services_of(paths.stage, intent.app))
    names |= {s.name for info in versions.values() for s in info.services}
    services = {name: observe_service(paths, name) for name in sorted(names)}
    own = {name: s.status for name, s in services.items() if s.owner == intent.app}
    probe = None
    if own and all(status.up for status in own.values()) and current is not None:
        probe = health_of(check, current, own)
    observed = Observed(
        current=current,
        previous=previous,
        versions=versions,
        services=services,
        pending=notes.pending,
        failure=notes.failure,
        retry_token=intent.retry_token if notes.failure is not None else None,
        healthy=probe.ok if probe is not None else None,
        health_output=probe.output if probe is not None else None,
        self_service=self_service(intent.app, services),
        last_good=notes.last_good,
        drain=drain_seen(notes, drained_for, time.time()),
    )
    return desired, observed


def drain_seen(notes: AppState, drained_for: str | None, now: float) -> DrainSeen | None:
    """setlive's drain request, if it made one, and whether it was answered in time."""
    if notes.drain is None:
        return None
    token = notes.drain.token
    return DrainSeen(
        token, acknowledged=drained_for == token, expired=now >= notes.drain.wait_until
    )


def launch_entries(
    stage: Path, app: str, version: str, marker: InstallMarker, current: str | None
) -> tuple[LaunchEntries, str | None] | None:
    """The services of an install: what its verified artifact declared, as the
    preparer recorded in the marker; never what the install holds now (its app
    can add to it, and each entry becomes a service runit supervises as root).

    A marker written before that record (the agents were just upgraded) gives no
    list. For the version that runs, the services already staged for the app stand
    in (root's own record of what it supervises), so upgrading the agents neither
    stops nor changes a running app; the preparer verifies its artifact again and
    rewrites the marker. Any other version waits for that (None: not installed).
    """
    if marker.launch is not None:
        return marker.launch, marker.launch_error
    if version == current:
        staged = staged_entries(stage, app)
        if staged:
            return staged, None
    return None


def services_of(stage: Path, app: str) -> list[str]:
    """The services staged for ``app``, sorted."""
    return sorted(name for name, owner in staged_services(stage).items() if owner == app)


def health_of(
    check: Callable[[str], health.Check | None],
    version: str,
    statuses: Mapping[str, runit.ServiceStatus],
) -> health.CheckResult:
    """The health of ``version`` now: its services must all be up, then its check
    decides (none declared: being up is all there is)."""
    not_up = [name for name, status in statuses.items() if not status.up]
    if not_up or not statuses:
        return health.CheckResult(False, f"runit: {', '.join(not_up) or 'no service'} not up")
    version_check = check(version)
    if version_check is None:
        return health.CheckResult(True, "runit: up (no health check)")
    return version_check()
