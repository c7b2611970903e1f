"""pp-preparer: every version the intent names for this node, installed and verified.

It fetches, verifies and extracts; it never starts or stops anything. Per app:
observe what is under ``<basedir>/installs``, plan, apply, and report each
version's state to ``reality/<node>/preparer/<app>``. The report's ``version`` is
what the preparer has made real, as every agent's is: the active version once it
is installed here (None before), never the intent's wish alone.

Apps no longer assigned to the node keep their installs: pp-setlive stops
them, and deleting files of an app that may come back (or that an operator is
inspecting) is not the preparer's call. Garbage collection therefore works only
inside the basedirs of assigned apps; an unassigned app's report is cleared.
"""

from __future__ import annotations

import contextlib
import dataclasses
import os
import pwd
import threading
import time
from collections.abc import Callable, Collection, Mapping
from pathlib import Path
from typing import TYPE_CHECKING, Any

import structlog

from agents import metrics, statedir
from agents.preparer import apply
from agents.preparer.observe import observe
from agents.preparer.plan import (
    Action,
    CleanStray,
    ImageRules,
    Install,
    Refuse,
    Remove,
    Wanted,
    plan,
)
from agents.preparer.progress import FETCHING, PROGRESS_AFTER_S, InstallProgress
from agents.runtime import Agent, Outcome
from agents.system import file_url
from agents.system.layout import AppLayout
from intent.artifacts import artifact_url
from intent.errors import DockerError
from intent.store import AppIntent, IntentStore, StoreError

if TYPE_CHECKING:
    from agents.preparer.image import Images

log = structlog.get_logger()

DEFAULT_STATE_DIR = str(statedir.SYSTEM_ROOT / "preparer")
STATE_DIR_VAR = "PP_PREPARER_STATE_DIR"


class Preparer(Agent):
    name = "preparer"
    converges_in_background = True  # a slow download must not hold up other apps

    def __init__(
        self,
        settings: apply.Settings,
        repo: str | None = None,
        keep_old: int = 1,
        store: IntentStore | None = None,
        node: str | None = None,
        clock: Callable[[], float] = time.time,
        state_dir: Path | None = None,
        stop: threading.Event | None = None,
        docker_host: str | None = None,
        progress_after_s: float = PROGRESS_AFTER_S,
    ) -> None:
        self.local_root = file_url.repo_root(repo)
        """Where ``file://`` artifacts may be read: beneath a local --repo, nowhere else."""
        self.settings = dataclasses.replace(
            settings,
            fetch=dataclasses.replace(settings.fetch, local_root=self.local_root, stop=stop),
        )
        self.stop = stop
        self.docker_host = docker_host
        """The Docker engine image versions are pulled into (None: the SDK's default)."""
        self._wanted_images: set[str] = set()
        """Set when the agent stops: downloads in flight end within a second or so."""
        self.state_dir = state_dir if state_dir is not None else default_state_dir()
        """Root's own directory for the per-app locks (never one the apps can open)."""
        self.repo = repo
        self.keep_old = keep_old
        self.store = store
        self.node = node
        self.clock = clock
        self.progress_after_s = progress_after_s
        """How long an app's installs run before its report says "fetching"."""
        self._may_have_report: set[str] | None = None
        """Apps this agent may have a report of (see ``unmanaged``); None: not listed yet."""
        self._conflicts: dict[str, str] = {}
        self._last_success: dict[str, float] = {}

    # -- the runtime's hooks ----------------------------------------------------------------

    def begin_pass(self, intents: Mapping[str, AppIntent]) -> None:
        """Two apps in one basedir would share ``current`` and garbage-collect each
        other's installs: refuse both rather than guess."""
        by_basedir: dict[str, list[str]] = {}
        for app, intent in intents.items():
            if intent.deploy is not None:
                by_basedir.setdefault(intent.deploy.basedir, []).append(app)
        self._conflicts = {
            app: (
                f"basedir {basedir} is also the basedir of "
                f"{', '.join(a for a in apps if a != app)}; give each app its own basedir "
                "in deploy_config"
            )
            for basedir, apps in by_basedir.items()
            if len(apps) > 1
            for app in apps
        }
        # An image another app on this node wants is never garbage-collected with ours.
        self._wanted_images = {
            spec.image
            for intent in intents.values()
            if intent.config is not None
            for spec in intent.config.versions.values()
            if spec.image is not None
        }

    def converge(self, intent: AppIntent) -> Outcome:
        assert intent.config is not None and intent.deploy is not None
        app, config, deploy = intent.app, intent.config, intent.deploy
        active = config.active_version
        if app in self._conflicts:
            return Outcome.failed(self._conflicts[app])
        try:
            owner = _owner(deploy.run_as)
        except KeyError:
            return Outcome.failed(
                f"run_as user {deploy.run_as!r} does not exist on this host: create it or "
                "change run_as in deploy_config"
            )
        layout = AppLayout(Path(deploy.basedir), app)
        try:
            apply.ensure_dirs(layout)
        except apply.ApplyError as exc:
            return Outcome.failed(str(exc))
        except OSError as exc:
            return Outcome.failed(f"cannot create {layout.installs}: {exc.strerror}")
        wanted = [
            Wanted(
                version,
                spec.digest,
                spec.url or (artifact_url(self.repo, app, version) if self.repo else None),
                spec.state == "active",
                spec.image,
            )
            for version, spec in config.versions.items()
        ]
        with contextlib.ExitStack() as held:
            lock = self.state_dir / f"{app}.lock"
            try:
                self.state_dir.mkdir(parents=True, exist_ok=True, mode=0o700)
                ours = held.enter_context(apply.exclusive(lock))
            except OSError as exc:
                return Outcome.failed(f"--state-dir {self.state_dir}: {exc.strerror}")
            if not ours:
                return Outcome.converging(f"another pp-preparer is working on {app} (lock {lock})")
            images = None
            try:
                if any(w.image for w in wanted) or layout.has_image_installs():
                    from agents.preparer.image import Images  # the SDK only when needed

                    images = held.enter_context(Images.open(self.docker_host))
                return self._converge_locked(app, active, layout, wanted, owner, images)
            except DockerError as exc:
                return Outcome.failed(str(exc))

    def unmanaged(self, assigned: Collection[str]) -> list[str]:
        """Apps whose report is still in ``reality/`` though no longer assigned, so the
        runtime clears it; their files stay (see the module's docstring).

        The node's reports are listed only when an app that may have one is not in
        ``assigned``: at the first pass, and after an app left. Between those, every
        report this agent writes is of an app assigned at the time, so none can be of
        an app outside ``assigned``. (A report written by anything else, e.g. another
        run under the same node name, is cleared by the runtime's resync.)"""
        if self.store is None or self.node is None:
            return []
        assigned = set(assigned)
        if self._may_have_report is not None and self._may_have_report <= assigned:
            self._may_have_report = assigned
            return []
        try:
            reports = self.store.reality(node=self.node)
        except StoreError:
            return []
        reported = {r.app for r in reports if r.agent == self.name}
        self._may_have_report = reported | assigned
        return sorted(reported - assigned)

    def remove(self, app: str) -> Outcome:
        return Outcome.converged()

    # -- one app ----------------------------------------------------------------------------

    def _converge_locked(
        self,
        app: str,
        active: str | None,
        layout: AppLayout,
        wanted: list[Wanted],
        owner: tuple[int, int] | None,
        images: Images | None = None,
    ) -> Outcome:
        actions = plan(
            wanted,
            observe(layout, images.present if images is not None else None),
            self.keep_old,
            self.local_root,
            self.settings.allowed_sources,
            ImageRules(self.settings.allowed_registries, bool(self.settings.trusted_keys)),
        )
        progress = InstallProgress(
            {
                **{w.version: "installed" for w in wanted},
                **{a.version: FETCHING for a in actions if isinstance(a, Install)},
            },
            lambda states: self._report_fetching(app, active, states),
            self.progress_after_s,
        )
        with progress:
            problems, stopped = self._carry_out(app, actions, layout, owner, images, progress)
        states = progress.snapshot()
        if not problems and not stopped:
            self._last_success[app] = self.clock()
        details: dict[str, Any] = {
            "versions": states,
            "last_success": self._last_success.get(app),
        }
        installed = _installed(active, states)
        if problems:
            return Outcome.failed("; ".join(problems), installed, **details)
        if stopped:  # not a failure: no backoff
            return Outcome.converging(
                f"stopped before {', '.join(stopped)} was installed", installed, **details
            )
        return Outcome.converged(installed, **details)

    def _carry_out(
        self,
        app: str,
        actions: list[Action],
        layout: AppLayout,
        owner: tuple[int, int] | None,
        images: Images | None,
        progress: InstallProgress,
    ) -> tuple[list[str], list[str]]:
        """Carry out the plan, noting each version's state in ``progress``; returns the
        problems met and the versions the stop event interrupted."""
        bound = log.bind(app=app)
        problems: list[str] = []
        stopped: list[str] = []
        for action in actions:
            if isinstance(action, CleanStray):
                try:
                    apply.remove_tree(layout.installs / action.name)
                except OSError as exc:
                    bound.warning("install.stray_kept", name=action.name, error=str(exc))
                    continue
                bound.info("install.stray_removed", name=action.name)
            elif isinstance(action, Remove):
                try:
                    apply.remove(layout, action.version)
                except OSError as exc:
                    problems.append(f"cannot remove old install {action.version}: {exc}")
                    continue
                if action.image is not None and images is not None:
                    try:
                        images.remove_unused(action.image, self._wanted_images, app)
                    except DockerError as exc:  # the install is gone; the image waits
                        bound.warning("image.kept", image=action.image, error=str(exc))
                bound.info("install.removed", version=action.version, reason=action.reason)
            elif isinstance(action, Refuse):
                progress.set(action.version, f"error: {action.reason}")
                problems.append(f"{action.version}: {action.reason}")
            else:
                started = time.monotonic()
                try:
                    if action.image is not None and images is not None:
                        done = images.install(layout, action)
                    else:
                        done = apply.install(layout, action, self.settings, owner)
                except apply.ApplyError as exc:
                    if self.stop is not None and self.stop.is_set():
                        # No verdict on the artifact: the next start fetches it again.
                        progress.set(action.version, "stopped")
                        stopped.append(action.version)
                        bound.info("install.stopped", version=action.version)
                        continue
                    progress.set(action.version, f"error: {exc}")
                    problems.append(f"{action.version}: {exc}")
                    bound.error("install.failed", version=action.version, error=str(exc))
                    metrics.installed(app, "failed")
                    continue
                progress.set(action.version, "installed")
                metrics.installed(app, "done", done.bytes_downloaded)
                bound.info(
                    "install.done",
                    version=action.version,
                    seconds=round(time.monotonic() - started, 3),
                    downloaded=done.bytes_downloaded,
                    files=done.files,
                    extracted=done.bytes_extracted,
                    signed_by=done.signed_by,
                )
        return problems, stopped

    def _report_fetching(self, app: str, active: str | None, states: dict[str, str]) -> None:
        """Say what a long install is fetching (the runtime reports only after)."""
        fetching = sorted(v for v, state in states.items() if state == FETCHING)
        if not fetching:
            return  # done the moment the timer fired: the outcome follows
        self.report_progress(
            app,
            Outcome.converging(
                f"fetching {', '.join(fetching)}",
                _installed(active, states),
                versions=states,
                last_success=self._last_success.get(app),
            ),
        )


def _installed(active: str | None, states: Mapping[str, str]) -> str | None:
    """The active version when it is installed here: what the report's ``version`` says."""
    return active if active is not None and states.get(active) == "installed" else None


def default_state_dir() -> Path:
    """``$PP_PREPARER_STATE_DIR``, else ``/var/lib/platypus/preparer`` for root (the
    agent as a service), else a directory of the user's own, so a developer's preparer
    needs no setup."""
    if configured := os.environ.get(STATE_DIR_VAR):
        return Path(configured)
    return statedir.default("preparer")


def _owner(run_as: str) -> tuple[int, int] | None:
    """Whom installed files belong to: ``run_as`` when we are root, else ourselves."""
    if os.geteuid() != 0:
        return None
    entry = pwd.getpwnam(run_as)
    return entry.pw_uid, entry.pw_gid
