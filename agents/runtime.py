"""The loop every agent shares: watch -> queue -> converge -> report.

An agent supplies ``converge`` for one app (its own observe/plan/apply) and,
optionally, how to find and remove apps that are no longer assigned. The
runtime owns everything else, identically for every agent::

    wake ──► read the node's intent ──► queue the apps whose intent changed
     ▲        (every app on a resync)       │
     │                                      ▼
     └── report each outcome ◄── workers converge one app each (agents/workqueue.py)

- wake-ups: the store's watch sees a change (or sees the store come back), a
  resync is due (jittered) or asked for with SIGHUP, an app's retry comes due;
- each app is converged on its own, by one worker at a time; anything asked for
  while it converges (new intent, a resync, a retry) converges it again right
  after, and its failures back off exponentially with jitter (agents/backoff.py);
- invalid intent holds the last valid intent seen for that app: nothing is
  removed or stopped because of it, and the error is reported in ``reality/``;
- absence is not intent: a store that is not the one the agent converged from, or a
  node whose every assignment vanished at once, holds everything (agents/trust.py)
  until the trusted intent is back; the agent says so once per change;
- an unreachable store leaves the host as it is and is logged once per change;
  it is probed again after a short, capped, jittered delay, and reports that
  could not be written are written when it is back;
- a pass that fails in any way (even an unexpected exception while reading
  intent) holds everything and is retried; it never ends the agent;
- SIGTERM sets the agent's one stop event: agents end their current step, the
  runtime starts nothing new and exits, waiting at most ``stop_grace_s`` for a
  step that ignores it (a kill at any point is safe by every agent's contract).
"""

from __future__ import annotations

import abc
import random
import signal
import socket
import threading
import time
from collections.abc import Callable, Collection, Mapping
from dataclasses import dataclass, field, replace
from pathlib import Path
from types import FrameType
from typing import Any, ClassVar

import structlog

from agents import backoff, metrics, trust
from agents.workqueue import WorkQueue
from intent.model import AgentState, AgentStatus, Reality, Status, is_safe_name
from intent.store import AppIntent, IntentStore, StoreError, StoreUnavailable
from intent.store.node_watch import NodeWatch


@dataclass(frozen=True)
class Outcome:
    """What one converge step achieved for one app."""

    status: Status
    version: str | None = None
    error: str | None = None
    details: dict[str, Any] = field(default_factory=dict)
    recheck_after_s: float | None = None
    """Converge the app again after this long even though nothing it watches changed
    (a registered app's health, a request that expires); None: on the next change."""

    def recheck_after(self, seconds: float) -> Outcome:
        return replace(self, recheck_after_s=seconds)

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
    """One agent's view of its own slice of the host.

    The runtime calls ``begin_pass`` with every app's intent, then ``converge`` for
    each app that is due, then ``unmanaged``/``remove``. An agent may do its work
    per app in ``converge``, or for the whole node at once in ``begin_pass`` (when
    the work is one transaction, like a firewall restore) and let ``converge`` and
    ``remove`` only report what that pass did for each app.
    """

    name: ClassVar[str]

    _progress_sink: Callable[[str, Outcome], None] | None = None

    watched_reports: ClassVar[tuple[str, ...]] = ()
    """Other agents whose reports on this node are part of this agent's input (the
    load balancer registrar reads setlive's drain requests). The runtime watches
    them too, and converges an app again when ``report_input`` of its report changes."""

    converges_in_background: ClassVar[bool] = False
    """Converge apps on worker threads that run on across passes, so one app's slow
    converge (a download, a health gate) does not hold up new intent for the others.
    Only for agents whose ``converge`` may overlap the next pass's ``begin_pass``,
    ``unmanaged`` and ``remove`` (for other apps). Otherwise each pass converges the
    apps due and finishes before the next pass begins."""

    def report_progress(self, app: str, outcome: Outcome) -> None:
        """Say where a long converge stands (a download, a health gate) before it ends.
        The runtime writes it as the app's report, through the same path as a converge's
        outcome, so a store outage is tracked the same way; without a runtime (a unit
        test of one converge) it goes nowhere."""
        if self._progress_sink is not None:
            self._progress_sink(app, outcome)

    def attach_progress(self, sink: Callable[[str, Outcome], None]) -> None:
        self._progress_sink = sink

    def start(self) -> None:  # noqa: B027 - optional hook
        """Called once before the first pass (e.g. to clean up after a crash)."""

    def begin_pass(self, intents: Mapping[str, AppIntent]) -> None:  # noqa: B027
        """Called with every app's effective intent before each pass: for decisions
        that span apps (port conflicts, shared basedirs), or to converge the whole
        node at once. An exception fails the pass; the apps still converge."""

    @abc.abstractmethod
    def converge(self, intent: AppIntent) -> Outcome:
        """Make this host match one app's valid intent. Must be idempotent, and should
        end its current step soon after the stop event it was given is set."""

    def report_input(self, report: Reality) -> object:
        """The part of a watched agent's report this agent acts on (compared with ``==``):
        a report rewritten with the same input (a heartbeat) converges nothing."""
        return report.details

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
    converging_first_s: float = 0.25
    converging_retry_s: float = 2.0
    """An app waiting on something outside (the preparer's install, a lease, runsvdir) is
    checked again after ``converging_first_s``, then twice as long each time up to this:
    what it waits for is usually done within a second, and nothing else wakes it."""
    watch_timeout_s: float = 30.0
    store_retry_max_s: float = backoff.DEFAULT_STORE_RETRY_MAX_S
    """The cap of the jittered delay between attempts to reach an unreachable store."""
    stop_grace_s: float = 5.0
    """How long a stopping agent waits for a converge step that ignores the stop."""
    trust_file: Path | None = None
    """Where the agent remembers the store it trusts (agents/trust.py); None: in memory."""
    held_recheck_s: float = 10.0
    """How often a held agent reads the store again besides its watch (jittered): an
    operator's ``pp init --adopt`` changes no key the watch covers."""
    restore_settle_s: float = trust.RESTORE_SETTLE_S
    """After a hold, how long assignments without an app the host ran must stay the same
    before the agent acts on them: a restore may still be writing the rest back."""


@dataclass
class _AppState:
    """What the runtime knows of one assigned app (guarded by ``lock``)."""

    last_good: AppIntent | None = None
    intent_error: str | None = None
    outcome: Outcome | None = None
    """The last converge's outcome (None: not converged since the agent started)."""
    waits: int = 0
    """Consecutive converges that ended waiting ("converging")."""
    report_pending: bool = False
    """The last report could not be written (store unreachable): write it when back."""
    lock: threading.Lock = field(default_factory=threading.Lock)


class Runtime:
    def __init__(
        self,
        agent: Agent,
        store: IntentStore,
        options: RuntimeOptions,
        clock: Callable[[], float] = time.monotonic,
        stop: threading.Event | None = None,
    ) -> None:
        """``stop`` is the process's one stop event, shared with the agent so a
        SIGTERM ends its long steps too; a new one when not given."""
        self.agent = agent
        self.store = store
        self.options = options
        self.clock = clock
        self.stop_event = stop if stop is not None else threading.Event()
        self.log = structlog.get_logger().bind(agent=agent.name, node=options.node)
        self.backoff = backoff.calculator(
            backoff.app_retry(options.backoff_initial_s, options.backoff_max_s)
        )
        """Seconds an app waits after ``n`` consecutive failed converges."""
        self._store_retry = backoff.calculator(backoff.store_retry(options.store_retry_max_s))
        self._recheck = backoff.calculator(
            backoff.recheck(options.converging_first_s, options.converging_retry_s)
        )
        self._queue: WorkQueue[str] = WorkQueue(self.backoff, clock)
        agent.attach_progress(self._progress)
        self._apps: dict[str, _AppState] = {}
        self._apps_lock = threading.Lock()
        self._wake = threading.Event()
        self._resync_requested = False
        self._state_lock = threading.Lock()
        self._store_reachable: bool | None = None
        self._store_failures = 0
        self._last_report_error: str | None = None
        self._last_pass_error: str | None = None
        self._signals: socket.socket | None = None
        self._trust = trust.Guard(
            store,
            options.node,
            trust.MemoryFile(options.trust_file),
            clock,
            options.restore_settle_s,
        )
        self._held: str | None = None
        """Why the agent holds (agents/trust.py), or None while it acts on the store."""
        self._status_written: tuple[AgentState, str | None] | None = None
        self._report_inputs: dict[tuple[str, str], object] = {}
        """What ``report_input`` last gave for each watched agent's report of an app."""

    # -- one pass -------------------------------------------------------------------------

    def run_pass(self, force: bool = False) -> bool:
        """One pass in the caller's thread: queue what is due, converge it (up to
        ``max_parallel`` at a time), report, remove what is no longer assigned.
        True when the whole node is converged."""
        return self._pass(force, drain=True)

    def _pass(self, force: bool, drain: bool) -> bool:
        try:
            # A resync reads afresh; other passes take what the watch brought.
            intents = self.store.apps_for_node(self.options.node, fresh=force)
            verdict = self._trust.check(frozenset(i.app for i in intents))
        except StoreError as exc:
            self._store_state(False, exc)
            return False
        except Exception as exc:  # e.g. a RecursionError from a hostile value: hold all
            self._pass_failed("intent.read_failed", exc)
            return False
        self._store_state(True)
        self._last_pass_error = None
        self._set_held(verdict.reason if not verdict.trusted else None)
        if not verdict.trusted:
            return False  # nothing begins, converges or is removed on what we cannot trust

        effective, changed = self._take_intents(intents)
        try:
            self.agent.begin_pass(effective)
            pass_ok = True
        except Exception:  # the per-app steps still run and report what they can
            self.log.exception("pass.crashed")
            pass_ok = False
        changed += self._watched_reports_changed(effective)
        for app in effective if force else changed:
            self._queue.add(app)
        if drain:
            self._drain()

        all_converged = pass_ok
        for intent in intents:
            if not is_safe_name(intent.app):
                # Never a key or a path: say so in the log, where the operator can see it.
                all_converged = False
                self.log.error("intent.invalid_app_name", error=intent.error)
                continue
            state = self._state(intent.app)
            if state is None:
                continue
            if intent.error is not None or state.report_pending:
                self._publish(intent.app, state)
            all_converged &= (
                intent.error is None
                and state.outcome is not None
                and state.outcome.status == "converged"
                # A re-check it asked for is not work left to do: it is how it stays so.
                and (
                    state.outcome.recheck_after_s is not None or not self._queue.pending(intent.app)
                )
            )

        # An app converging in the background is not removed under its converge.
        assigned = {i.app for i in intents} | self._queue.processing()
        return self._remove_unassigned(assigned, force) and all_converged

    def _take_intents(self, intents: list[AppIntent]) -> tuple[dict[str, AppIntent], list[str]]:
        """Record the new intent; returns each app's effective intent (the last valid
        one) and the apps whose effective intent changed or was just fixed."""
        effective: dict[str, AppIntent] = {}
        changed: list[str] = []
        with self._apps_lock:
            for intent in intents:
                state = self._apps.setdefault(intent.app, _AppState())
                with state.lock:
                    if intent.valid and (state.last_good != intent or state.intent_error):
                        changed.append(intent.app)  # new intent, or fixed: converge and report it
                        metrics.intent_changed(self.agent.name, intent.app)
                        state.last_good = intent
                    state.intent_error = intent.error
                    if state.last_good is not None:
                        effective[intent.app] = state.last_good
            for gone in set(self._apps) - {i.app for i in intents}:
                del self._apps[gone]
                metrics.app_gone(self.agent.name, gone)
                self._queue.discard(gone)
        return effective, changed

    def _watched_reports_changed(self, effective: Mapping[str, AppIntent]) -> list[str]:
        """Assigned apps whose input from the agents in ``watched_reports`` changed since
        the last pass looked (a report not read for a store error is looked at next time)."""
        changed = []
        for agent in self.agent.watched_reports:
            try:
                reports = self.store.reality_of(self.options.node, agent)
            except StoreError as exc:
                self._store_state(False, exc)
                continue
            for app in effective:
                report = reports.get(app)
                now = None if report is None else self.agent.report_input(report)
                if self._report_inputs.get((agent, app)) != now:
                    self._report_inputs[(agent, app)] = now
                    changed.append(app)
        return changed

    def _state(self, app: str) -> _AppState | None:
        with self._apps_lock:
            return self._apps.get(app)

    # -- converging -------------------------------------------------------------------------

    def _drain(self) -> None:
        """Converge every app queued and ready, ``max_parallel`` at a time, before
        returning; apps not started before a stop request are left for later."""

        def work() -> None:
            while not self.stop_event.is_set() and (app := self._queue.get(timeout=0)):
                self._process(app)

        workers = min(self.options.max_parallel, len(self._queue))
        if workers <= 1:
            work()
            return
        threads = [threading.Thread(target=work, name=f"app-{n}") for n in range(workers)]
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join()

    def _work(self) -> None:
        """A background worker: converge apps as they come due, until stopped."""
        while (app := self._queue.get()) is not None:
            self._process(app)

    def _process(self, app: str) -> None:
        """Converge ``app`` with its latest effective intent, report the outcome and
        schedule its next turn."""
        try:
            state = self._state(app)
            intent = state.last_good if state is not None else None
            if state is None or intent is None or self.stop_event.is_set():
                return  # unassigned meanwhile, or stopping: not started, so due again later
            outcome = self._converge_one(intent)
            with state.lock:
                state.outcome = outcome
                state.waits = state.waits + 1 if outcome.status == "converging" else 0
                waits = state.waits
            if outcome.status == "converged":
                self._queue.forget(app)
                if outcome.recheck_after_s is not None:
                    self._queue.add_after(app, outcome.recheck_after_s)
            elif outcome.status == "converging":
                self._queue.add_after(app, self._recheck(waits))
            else:
                self._queue.add_rate_limited(app)
            if self._state(app) is state:
                self._publish(app, state)
        except Exception:  # a bug here must not end a worker
            self.log.exception("converge.report_crashed", app=app)
        finally:
            self._queue.done(app)
            if self._state(app) is None:
                self._wake.set()  # no longer assigned: the loop removes it now

    def _converge_one(self, intent: AppIntent) -> Outcome:
        log = self.log.bind(app=intent.app)
        started = time.monotonic()
        try:
            # Every line the agent logs while converging this app names it.
            with structlog.contextvars.bound_contextvars(app=intent.app):
                outcome = self.agent.converge(intent)
        except Exception as exc:  # one app's bug must not take the others down
            log.exception("converge.crashed")
            outcome = Outcome.failed(f"internal error: {type(exc).__name__}: {exc}")
        metrics.converge_done(
            self.agent.name, intent.app, outcome.status, time.monotonic() - started
        )
        log.log(
            40 if outcome.status == "error" else 20,
            f"converge.{outcome.status}",
            version=outcome.version,
            error=outcome.error,
            seconds=round(time.monotonic() - started, 3),
        )
        return outcome

    # -- removal ----------------------------------------------------------------------------

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

    # -- reports: the one path to reality/ ---------------------------------------------------

    def _publish(self, app: str, state: _AppState) -> None:
        """Report what the runtime knows of ``app``: the intent's error (with the version
        held) while its intent is invalid, else the last converge's outcome. Under the
        app's lock, so the last report written is always the latest state."""
        with state.lock:
            if state.intent_error is not None:
                held = state.last_good
                version = held.config.active_version if held and held.config else None
                outcome: Outcome | None = Outcome.failed(
                    state.intent_error, version, held_last_good=held is not None
                )
            else:
                outcome = state.outcome
            if outcome is not None:
                state.report_pending = not self._report(app, outcome)

    def _progress(self, app: str, outcome: Outcome) -> None:
        """An agent's word on a converge still running: written under the app's lock like
        any report, and not over an invalid intent's error, which is the news."""
        state = self._state(app)
        if state is None:
            return
        with state.lock:
            if state.intent_error is None:
                self._report(app, outcome)

    def _report(self, app: str, outcome: Outcome) -> bool:
        """Write one report; False when the store was unreachable (write it later)."""
        report = Reality(
            node=self.options.node,
            agent=self.agent.name,
            app=app,
            status=outcome.status,
            version=outcome.version,
            error=outcome.error,
            details=outcome.details,
        )
        metrics.reported(self.agent.name, app, outcome.status)
        return self._quietly(lambda: self.store.write_reality(report))

    def _quietly(self, write: Callable[[], None]) -> bool:
        """Reality is best effort: a store outage must not stop convergence. False when
        the store was unreachable."""
        try:
            write()
        except StoreUnavailable as exc:
            self._store_state(False, exc)
            return False
        except StoreError as exc:  # e.g. an ACL that denies this node's reality keys
            with self._state_lock:
                first = str(exc) != self._last_report_error
                self._last_report_error = str(exc)
            if first:
                self.log.error("reality.write_failed", error=str(exc))
        return True

    def _store_state(self, reachable: bool, error: Exception | None = None) -> None:
        """Log store outages once per change, not once per attempt."""
        metrics.store_state(self.agent.name, reachable)
        with self._state_lock:
            self._store_failures = 0 if reachable else self._store_failures + 1
            if reachable == self._store_reachable:
                return
            self._store_reachable = reachable
        if reachable:
            self.log.info("store.reachable")
        else:
            self.log.warning("store.unreachable", error=str(error), holding="current state")
            self._wake.set()  # the loop now probes the store on the short schedule

    def _set_held(self, reason: str | None) -> None:
        """Say once per change whether the agent holds, in the log and in the store."""
        if reason != self._held:
            if reason is not None:
                self.log.warning("store.untrusted", reason=reason, holding="everything")
            elif self._status_written is not None:
                self.log.info("store.trusted")
        self._held = reason
        state: AgentState = "trusting" if reason is None else "held"
        if self._status_written != (state, reason):
            status = AgentStatus(
                node=self.options.node, agent=self.agent.name, state=state, reason=reason
            )
            if self._quietly(lambda: self.store.write_agent_status(status)):
                self._status_written = (state, reason)

    def _pass_failed(self, event: str, exc: Exception) -> None:
        """A pass raised what it never should (reading intent, or a bug): log it once
        per distinct error, with its traceback, hold everything and try again on the
        store's short schedule."""
        with self._state_lock:
            self._store_failures += 1
            first = repr(exc) != self._last_pass_error
            self._last_pass_error = repr(exc)
        if first:
            self.log.error(
                event,
                error=f"{type(exc).__name__}: {exc}"[:300],
                holding="current state",
                exc_info=exc,
            )

    # -- the loop -------------------------------------------------------------------------

    def stop(self) -> None:
        """Stop the agent: no new converge starts; steps in progress see the event."""
        self.stop_event.set()
        self._queue.shut_down()
        self._wake.set()

    def request_resync(self) -> None:
        """Converge every app again (SIGHUP), including one converging right now."""
        self._resync_requested = True
        self._wake.set()

    def install_signal_handlers(self) -> None:
        """SIGTERM and SIGINT stop the agent, SIGHUP asks for a resync.

        Python runs a handler in the main thread between any two bytecodes, even while
        that thread holds a lock (an Event's, the log's), so a handler that takes one
        can deadlock the agent. The handlers here do nothing: the C-level handler
        writes each signal's number to a socket (``signal.set_wakeup_fd``) and a
        thread of ours acts on it. Call from the main thread."""
        reader, writer = socket.socketpair()
        writer.setblocking(False)
        self._signals = writer  # kept open for the life of the process
        for signum in (signal.SIGTERM, signal.SIGINT, signal.SIGHUP):
            signal.signal(signum, _ignore)
        signal.set_wakeup_fd(writer.fileno(), warn_on_full_buffer=False)
        threading.Thread(
            target=self._handle_signals, args=(reader,), name="signals", daemon=True
        ).start()

    def _handle_signals(self, reader: socket.socket) -> None:
        while received := reader.recv(64):
            for signum in received:
                if signum == signal.SIGHUP:
                    self.log.info("agent.resync_requested", signal=signum)
                    self.request_resync()
                elif signum in (signal.SIGTERM, signal.SIGINT):
                    self.log.info("agent.stopping", signal=signum)
                    self.stop()

    def run(self) -> int:
        """Run until stopped (or one pass with ``once``); returns the exit code."""
        self.agent.start()
        if self.options.once:
            return 0 if self.run_pass(force=True) else 1
        threading.Thread(target=self._watch, name="intent-watch", daemon=True).start()
        # Daemon threads: a step that ignores the stop must not keep the process alive.
        workers = [
            threading.Thread(target=self._work, name=f"app-{n}", daemon=True)
            for n in range(self.options.max_parallel if self.agent.converges_in_background else 0)
        ]
        for worker in workers:
            worker.start()
        try:
            self._loop(drain=not workers)
        finally:
            self.stop()
            self._join(workers)
        self.log.info("agent.stopped")
        return 0

    def _join(self, workers: list[threading.Thread]) -> None:
        """Let converges in progress end their step, within ``stop_grace_s``."""
        deadline = time.monotonic() + self.options.stop_grace_s
        for worker in workers:
            worker.join(max(0.0, deadline - time.monotonic()))
        if abandoned := sorted(self._queue.processing()):
            self.log.warning(
                "agent.stop_abandoned", apps=abandoned, grace_s=self.options.stop_grace_s
            )

    def _loop(self, drain: bool) -> None:
        next_resync = self.clock()
        while not self.stop_event.is_set():
            self._wake.clear()
            now = self.clock()
            force = self._resync_requested or now >= next_resync
            if force:
                self._resync_requested = False
                next_resync = now + self.options.resync_interval_s * random.uniform(0.8, 1.2)
            try:
                metrics.pass_done(self.agent.name, self._pass(force, drain))
            except Exception as exc:  # a bug in one pass must not end the agent
                self._pass_failed("pass.crashed", exc)
            if self.stop_event.is_set():
                break
            self._wake.wait(max(0.0, self._next_wake(next_resync, drain) - self.clock()))

    def _next_wake(self, next_resync: float, drain: bool) -> float:
        """The next moment something is due: a resync, a retry the loop converges
        itself, another try at a store that failed."""
        deadlines = [next_resync]
        if drain and (ready := self._queue.next_ready()) is not None:
            deadlines.append(ready)
        with self._state_lock:
            failures = self._store_failures
        if failures:
            deadlines.append(self.clock() + self._store_retry(failures))
        if self._held is not None:
            deadlines.append(self.clock() + self.options.held_recheck_s * random.uniform(0.8, 1.2))
        return min(deadlines)

    def _watch(self) -> None:
        """Wake the loop when this node's intent changes (blocking store waits), and
        as soon as the store answers again after failing."""
        token: NodeWatch | None = None
        failures = 0
        while not self.stop_event.is_set():
            try:
                # After a failure, an immediate read: the store's return is news itself.
                new = self.store.watch_node(
                    self.options.node,
                    None if failures else token,
                    self.options.watch_timeout_s,
                    reports_of=self.agent.watched_reports,
                )
            except Exception as exc:
                if self.stop_event.is_set():
                    return  # a stopping agent closes its store under this wait: no news
                if isinstance(exc, StoreUnavailable):
                    self._store_state(False, exc)  # news even while the loop is idle
                elif not isinstance(exc, StoreError):
                    self.log.exception("watch.crashed")
                failures += 1
                self.stop_event.wait(self._store_retry(failures))
                continue
            metrics.watch_answered(self.agent.name)
            # A first read (at start, or after a failure) may come after the loop read
            # intent, and what changed in between would go unseen: wake for it too.
            if token is None or failures or new != token or self._store_reachable is False:
                self._wake.set()
            failures = 0
            token = new


def _ignore(signum: int, frame: FrameType | None) -> None:
    """See ``Runtime.install_signal_handlers``: the work happens on another thread."""
