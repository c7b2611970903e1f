"""The loop every agent shares: watch -> observe -> plan -> apply -> report.

An agent supplies ``converge`` for one app (its own observe/plan/apply) and,
optionally, how to find and remove apps that are no longer assigned. The
runtime owns everything else, identically for every agent:

- each app is converged on its own: one app's bad intent or failed fetch never
  blocks another, and its retries back off exponentially with jitter;
- invalid intent holds the last valid intent seen for that app: nothing is
  removed or stopped because of it, and the error is reported in ``reality/``;
- an unreachable store leaves the host as it is and is logged once per change;
- a jittered full resync repairs drift made by hand even when intent is idle;
- SIGTERM stops between steps, SIGHUP forces a resync.
"""

from __future__ import annotations

import abc
import random
import signal
import threading
import time
from collections.abc import Callable, Collection, Mapping
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass, field
from types import FrameType
from typing import Any, ClassVar

import structlog
import tenacity

from intent.model import Reality, Status, is_safe_name
from intent.store import AppIntent, IntentStore, StoreError, StoreUnavailable
from intent.store.kv import WatchToken


@dataclass(frozen=True)
class Outcome:
    """What one converge step achieved for one app."""

    status: Status
    version: str | None = None
    error: str | None = None
    details: dict[str, Any] = field(default_factory=dict)

    @classmethod
    def converged(cls, version: str | None = None, **details: Any) -> Outcome:
        return cls("converged", version, None, details)

    @classmethod
    def converging(cls, reason: str, version: str | None = None, **details: Any) -> Outcome:
        return cls("converging", version, reason, details)

    @classmethod
    def failed(cls, error: str, version: str | None = None, **details: Any) -> Outcome:
        return cls("error", version, error, details)


class Agent(abc.ABC):
    """One agent's view of its own slice of the host."""

    name: ClassVar[str]

    converges_in_background: ClassVar[bool] = False
    """Let one app's slow converge (a download, a health gate) run on across passes, so
    new intent for the other apps is not held up by it. Only for agents whose
    ``converge`` may overlap the next pass's ``begin_pass``, ``unmanaged`` and ``remove``
    (for other apps)."""

    def start(self) -> None:  # noqa: B027 - optional hook
        """Called once before the first pass (e.g. to clean up after a crash)."""

    def begin_pass(self, intents: Mapping[str, AppIntent]) -> None:  # noqa: B027
        """Called with every app's effective intent before a pass, for agents whose
        decisions span apps (port conflicts, download concurrency)."""

    @abc.abstractmethod
    def converge(self, intent: AppIntent) -> Outcome:
        """Make this host match one app's valid intent. Must be idempotent."""

    def unmanaged(self, assigned: Collection[str]) -> list[str]:
        """Apps this agent finds on the host that are not in ``assigned``."""
        return []

    def remove(self, app: str) -> Outcome:
        """Undo this agent's work for an app no longer assigned to the node."""
        return Outcome.converged()


@dataclass
class RuntimeOptions:
    node: str
    once: bool = False
    resync_interval_s: float = 60.0
    max_parallel: int = 1
    backoff_initial_s: float = 1.0
    backoff_max_s: float = 60.0
    converging_retry_s: float = 2.0
    watch_timeout_s: float = 30.0


@dataclass
class _AppState:
    last_good: AppIntent | None = None
    attempted: AppIntent | None = None
    intent_error: bool = False
    failures: int = 0
    next_attempt: float = 0.0


class Runtime:
    def __init__(
        self,
        agent: Agent,
        store: IntentStore,
        options: RuntimeOptions,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.agent = agent
        self.store = store
        self.options = options
        self.clock = clock
        self.log = structlog.get_logger().bind(agent=agent.name, node=options.node)
        self._apps: dict[str, _AppState] = {}
        self._pool: ThreadPoolExecutor | None = None
        """Set while ``run`` loops with an agent that converges in the background."""
        self._inflight: dict[str, Future[Outcome | None]] = {}
        self._store_reachable: bool | None = None
        self._last_report_error: str | None = None
        self._store_failures = 0
        self._wake = threading.Event()
        self._stopping = threading.Event()
        self._resync_requested = False
        self._backoff = tenacity.wait_exponential_jitter(
            initial=options.backoff_initial_s, max=options.backoff_max_s
        )

    # -- one pass -------------------------------------------------------------------------

    def run_pass(self, force: bool = False) -> bool:
        """Converge every app that is due; True when the whole node is converged."""
        try:
            intents = self.store.apps_for_node(self.options.node)
        except StoreError as exc:
            self._store_state(False, exc)
            return False
        self._store_state(True)

        effective = self._effective_intents(intents)
        try:
            self.agent.begin_pass(effective)
            pass_ok = True
        except Exception:  # the per-app steps still run and report what they can
            self.log.exception("pass.crashed")
            pass_ok = False
        now = self.clock()
        due = [
            app
            for app, intent in effective.items()
            if app not in self._inflight
            and (force or self._changed(app, intent) or self._retry_due(app, now))
        ]
        outcomes = self._converge_apps({app: effective[app] for app in due})

        all_converged = pass_ok and not self._inflight
        for intent in intents:
            state = self._apps[intent.app]
            outcome = outcomes.get(intent.app)
            if outcome is not None:
                self._schedule(intent.app, outcome)
            if not is_safe_name(intent.app):
                # Never a key or a path: say so in the log, where the operator can see it.
                all_converged = False
                self.log.error("intent.invalid_app_name", error=intent.error)
            elif intent.error is not None:
                all_converged = False
                held = (
                    state.last_good.config.active_version
                    if state.last_good and state.last_good.config
                    else None
                )
                self._report(
                    intent.app,
                    Outcome.failed(intent.error, held, held_last_good=state.last_good is not None),
                )
            elif outcome is not None:
                self._report(intent.app, outcome)
                all_converged &= outcome.status == "converged"
            else:
                all_converged = False  # in backoff: not converged yet

        # An app converging in the background is not removed under its converge.
        assigned = {i.app for i in intents} | set(self._inflight)
        return self._remove_unassigned(assigned, force) and all_converged

    def _effective_intents(self, intents: list[AppIntent]) -> dict[str, AppIntent]:
        effective = {}
        for intent in intents:
            state = self._apps.setdefault(intent.app, _AppState())
            if intent.valid and state.intent_error:
                state.attempted = None  # fixed intent: converge and report it at once
            state.intent_error = intent.error is not None
            if intent.valid:
                state.last_good = intent
            if state.last_good is not None:
                effective[intent.app] = state.last_good
        for gone in set(self._apps) - {i.app for i in intents} - set(self._inflight):
            del self._apps[gone]
        return effective

    def _retry_due(self, app: str, now: float) -> bool:
        """Converged apps wait for a change or a resync; the others retry on schedule."""
        next_attempt = self._apps[app].next_attempt
        return bool(next_attempt) and now >= next_attempt

    def _changed(self, app: str, intent: AppIntent) -> bool:
        return self._apps[app].attempted != intent

    def _converge_apps(self, intents: Mapping[str, AppIntent]) -> dict[str, Outcome]:
        """Converge each app; apps not started before a stop request are left for later."""
        for app, intent in intents.items():
            self._apps[app].attempted = intent
        if self._pool is not None:
            return self._converge_in_background(self._pool, intents)
        if len(intents) <= 1 or self.options.max_parallel <= 1:
            outcomes = {app: self._converge_one(intent) for app, intent in intents.items()}
        else:
            with ThreadPoolExecutor(self.options.max_parallel) as pool:
                futures = {app: pool.submit(self._converge_one, i) for app, i in intents.items()}
                outcomes = {app: future.result() for app, future in futures.items()}
        return {app: outcome for app, outcome in outcomes.items() if outcome is not None}

    def _converge_in_background(
        self, pool: ThreadPoolExecutor, intents: Mapping[str, AppIntent]
    ) -> dict[str, Outcome]:
        """Start ``intents`` and return the outcomes of every converge finished so far."""
        for app, intent in intents.items():
            future = pool.submit(self._converge_one, intent)
            future.add_done_callback(lambda _: self._wake.set())  # report it promptly
            self._inflight[app] = future
        finished = {app: f for app, f in self._inflight.items() if f.done()}
        outcomes = {}
        for app, future in finished.items():
            del self._inflight[app]
            outcome = future.result()
            if outcome is None:
                self._apps[app].attempted = None  # not started before a stop: due again
            else:
                outcomes[app] = outcome
        return outcomes

    def _converge_one(self, intent: AppIntent) -> Outcome | None:
        if self._stopping.is_set():
            return None  # not done: due again after a restart
        log = self.log.bind(app=intent.app)
        started = time.monotonic()
        try:
            # Every line the agent logs while converging this app names it.
            with structlog.contextvars.bound_contextvars(app=intent.app):
                outcome = self.agent.converge(intent)
        except Exception as exc:  # one app's bug must not take the others down
            log.exception("converge.crashed")
            outcome = Outcome.failed(f"internal error: {type(exc).__name__}: {exc}")
        log.log(
            40 if outcome.status == "error" else 20,
            f"converge.{outcome.status}",
            version=outcome.version,
            error=outcome.error,
            seconds=round(time.monotonic() - started, 3),
        )
        return outcome

    def _schedule(self, app: str, outcome: Outcome) -> None:
        state = self._apps[app]
        now = self.clock()
        if outcome.status == "converged":
            state.failures, state.next_attempt = 0, 0.0
        elif outcome.status == "converging":
            state.next_attempt = now + self.options.converging_retry_s
        else:
            state.failures += 1
            state.next_attempt = now + self.backoff(state.failures)

    def backoff(self, failures: int) -> float:
        """Seconds to wait after ``failures`` consecutive failures (tenacity's
        exponential backoff with jitter, used as a calculator)."""
        retry_state = tenacity.RetryCallState(retry_object=None, fn=None, args=(), kwargs={})  # type: ignore[arg-type]
        retry_state.attempt_number = failures
        return float(self._backoff(retry_state))

    def _remove_unassigned(self, assigned: set[str], resync: bool = False) -> bool:
        try:
            found = self.agent.unmanaged(assigned)
        except Exception:
            self.log.exception("unmanaged.crashed")
            return False
        if resync:
            self._clear_stale_reports(assigned | set(found))
        all_removed = True
        for app in found:
            if not self._confirmed_unassigned(app):
                all_removed = False
                continue
            outcome = self._converge_removal(app)
            if outcome.status == "converged":
                self._quietly(
                    lambda app=app: self.store.clear_reality(  # type: ignore[misc]
                        self.options.node, self.agent.name, app
                    )
                )
            else:
                all_removed = False
                self._report(app, outcome)
        return all_removed

    def _clear_stale_reports(self, known: set[str]) -> None:
        """Reports of apps neither assigned nor on the host: left by an agent that died
        between undoing an app and clearing its report."""
        try:
            reports = self.store.reality(node=self.options.node)
        except StoreError as exc:
            self._store_state(False, exc)
            return
        for report in reports:
            if report.agent != self.agent.name or report.app in known:
                continue
            if self._confirmed_unassigned(report.app):
                self._quietly(
                    lambda app=report.app: self.store.clear_reality(  # type: ignore[misc]
                        self.options.node, self.agent.name, app
                    )
                )

    def _confirmed_unassigned(self, app: str) -> bool:
        """Removal stops an app, so it needs more than an empty listing, which a store
        can also give for a token that may not read the node's keys: the exact key
        must be absent too. Any doubt holds."""
        try:
            absent = not self.store.is_assigned(self.options.node, app)
        except StoreError as exc:
            self.log.warning("remove.held", app=app, error=str(exc))
            return False
        if not absent:
            self.log.warning(
                "remove.held", app=app, error="listed as unassigned, yet its key exists"
            )
        return absent

    def _converge_removal(self, app: str) -> Outcome:
        try:
            with structlog.contextvars.bound_contextvars(app=app):
                outcome = self.agent.remove(app)
        except Exception as exc:
            self.log.exception("remove.crashed", app=app)
            return Outcome.failed(f"internal error removing: {type(exc).__name__}: {exc}")
        self.log.info(f"remove.{outcome.status}", app=app, error=outcome.error)
        return outcome

    def _report(self, app: str, outcome: Outcome) -> None:
        report = Reality(
            node=self.options.node,
            agent=self.agent.name,
            app=app,
            status=outcome.status,
            version=outcome.version,
            error=outcome.error,
            details=outcome.details,
        )
        self._quietly(lambda: self.store.write_reality(report))

    def _quietly(self, write: Callable[[], None]) -> None:
        """Reality is best effort: a store outage must not stop convergence."""
        try:
            write()
        except StoreUnavailable as exc:
            self._store_state(False, exc)
        except StoreError as exc:  # e.g. an ACL that denies this node's reality keys
            if str(exc) != self._last_report_error:
                self._last_report_error = str(exc)
                self.log.error("reality.write_failed", error=str(exc))

    def _store_state(self, reachable: bool, error: Exception | None = None) -> None:
        """Log store outages once per change, not once per attempt."""
        if reachable:
            self._store_failures = 0
        else:
            self._store_failures += 1
        if reachable == self._store_reachable:
            return
        self._store_reachable = reachable
        if reachable:
            self.log.info("store.reachable")
        else:
            self.log.warning("store.unreachable", error=str(error), holding="current state")

    # -- the loop -------------------------------------------------------------------------

    def stop(self) -> None:
        self._stopping.set()
        self._wake.set()

    def request_resync(self) -> None:
        self._resync_requested = True
        self._wake.set()

    def install_signal_handlers(self) -> None:
        def on_term(signum: int, frame: FrameType | None) -> None:
            self.log.info("agent.stopping", signal=signum)
            self.stop()

        def on_hup(signum: int, frame: FrameType | None) -> None:
            self.request_resync()

        signal.signal(signal.SIGTERM, on_term)
        signal.signal(signal.SIGINT, on_term)
        signal.signal(signal.SIGHUP, on_hup)

    def run(self) -> int:
        """Run until stopped (or one pass with ``once``); returns the exit code."""
        self.agent.start()
        if self.options.once:
            return 0 if self.run_pass(force=True) else 1
        watcher = threading.Thread(target=self._watch, name="intent-watch", daemon=True)
        watcher.start()
        if self.agent.converges_in_background:
            self._pool = ThreadPoolExecutor(self.options.max_parallel, thread_name_prefix="app")
        try:
            self._loop()
        finally:
            if self._pool is not None:
                self._pool.shutdown(wait=True)  # converges in flight finish their step
                self._pool = None
        self.log.info("agent.stopped")
        return 0

    def _loop(self) -> None:
        next_resync = self.clock()
        while not self._stopping.is_set():
            now = self.clock()
            force = self._resync_requested or now >= next_resync
            self._wake.clear()
            if force:
                self._resync_requested = False
                next_resync = now + self.options.resync_interval_s * random.uniform(0.8, 1.2)
            self.run_pass(force=force)
            if self._stopping.is_set():
                break
            self._wake.wait(self._sleep_until(next_resync) - self.clock())

    def _sleep_until(self, next_resync: float) -> float:
        """The next moment something is due: a resync, an app's retry, a store retry."""
        deadlines = [next_resync] + [s.next_attempt for s in self._apps.values() if s.next_attempt]
        if self._store_reachable is False:
            deadlines.append(self.clock() + self.backoff(self._store_failures))
        return min(deadlines)

    def _watch(self) -> None:
        """Wake the loop when this node's intent changes (blocking store waits)."""
        token: WatchToken | None = None
        failures = 0
        while not self._stopping.is_set():
            try:
                new = self.store.watch_node(self.options.node, token, self.options.watch_timeout_s)
            except StoreError:
                failures += 1
                self._stopping.wait(self.backoff(failures))
                continue
            failures = 0
            if token is not None and new != token:
                self._wake.set()
            token = new
