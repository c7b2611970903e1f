"""pp-iptables as an agent of the shared runtime.

Port conflicts span apps and the restore is one transaction for the whole
node, so the work happens once per pass in ``begin_pass``: observe, plan,
apply. ``converge`` and ``remove`` then report what that pass did for each app,
which keeps every report true when it is written.
"""

from __future__ import annotations

import time
from collections.abc import Collection, Hashable, Mapping, Sequence
from typing import ClassVar

import structlog

from agents import metrics
from agents.iptables.apply import apply
from agents.iptables.observe import observe
from agents.iptables.plan import AppResult, plan
from agents.runtime import Agent, Outcome
from agents.system.iptables import Iptables, IptablesError
from intent.model import PortSpec
from intent.store import AppIntent, IntentStore, StoreError


class IptablesAgent(Agent):
    name: ClassVar[str] = "iptables"

    def __init__(self, store: IntentStore, node: str, tables: Iptables) -> None:
        self.store = store
        self.node = node
        self.tables = tables
        self.log = structlog.get_logger().bind(agent=self.name, node=node)
        self._outcomes: dict[str, Outcome] = {}
        self._removals: dict[str, Outcome] = {}
        self._pass_error: str | None = None
        self._logged_error: str | None = None
        self._warned: set[str] = set()
        self._removing: frozenset[str] = frozenset()
        self._steady: tuple[tuple[str, Hashable], Mapping[str, AppResult]] | None = None

    def start(self) -> None:
        try:
            self.log.info("iptables.backend", version=self.tables.version())
        except IptablesError as exc:
            self._log_error(str(exc))  # the first pass reports it too

    def begin_pass(self, intents: Mapping[str, AppIntent]) -> None:
        self._outcomes, self._removals, self._pass_error = {}, {}, None
        self._removing = frozenset()
        try:
            self._pass(intents)
        except IptablesError as exc:
            self._fail(intents, str(exc))
        except Exception as exc:  # a bug: every app reports it, not only the runtime's log
            self.log.exception("iptables.crashed")
            self._fail(intents, f"internal error: {type(exc).__name__}: {exc}")
        else:
            if self._logged_error is not None:
                self.log.info("iptables.recovered")
                self._logged_error = None

    def _pass(self, intents: Mapping[str, AppIntent]) -> None:
        started = time.monotonic()
        wanted = {app: _ports(intent) for app, intent in intents.items()}
        assigned, priority = self._assignments()
        snapshot = observe(self.tables)
        for warning in snapshot.warnings:
            if warning not in self._warned:
                self._warned.add(warning)
                self.log.warning("iptables.warning", warning=warning)
        inputs = (snapshot.fingerprint, _inputs(wanted, assigned, priority))
        if self._steady is not None and self._steady[0] == inputs:
            # plan() is pure: the same rules and intent as the last pass that found
            # nothing to do give the same answer, without parsing thousands of rules.
            results = self._steady[1]
        else:
            decided = plan(wanted, snapshot.observed, assigned, priority)
            self._removing = decided.removed
            self._steady = None
            if decided.restore is not None:
                apply(self.tables, decided.restore)
                metrics.firewall_restored(self.name, decided.rules)
                self.log.info(
                    "iptables.applied",
                    chains=list(decided.changed),
                    rules=decided.rules,
                    removed=sorted(decided.removed),
                    seconds=round(time.monotonic() - started, 3),
                )
            else:
                self._steady = (inputs, decided.results)
            results = decided.results
            for app in decided.removed:
                self._removals[app] = Outcome.converged()
        for app, result in results.items():
            self._outcomes[app] = _outcome(result, _version(intents[app]))
        metrics.firewall_pass(self.name, time.monotonic() - started)

    def _assignments(self) -> tuple[Collection[str] | None, dict[str, int]]:
        """Every app assigned here, valid or not, and the order of assignment.

        Without it an app whose intent is broken since the agent started would look
        unassigned and lose its ports; when the store cannot say, nothing is removed."""
        try:
            raw = self.store.assignments(self.node)
        except StoreError as exc:
            self.log.warning("iptables.assignments_unknown", error=str(exc), holding="all rules")
            return None, {}
        return set(raw), {app: entry.version for app, entry in raw.items()}

    def _fail(self, intents: Mapping[str, AppIntent], error: str) -> None:
        self._log_error(error)
        self._pass_error = error
        self._outcomes = {app: Outcome.failed(error, _version(i)) for app, i in intents.items()}
        self._removals = {app: Outcome.failed(error) for app in self._removing}

    def _log_error(self, error: str) -> None:
        """Once per distinct error, not once per pass: a host without the right
        privileges should say so clearly, not flood the log."""
        if error != self._logged_error:
            self._logged_error = error
            self.log.error("iptables.failed", error=error)

    def converge(self, intent: AppIntent) -> Outcome:
        outcome = self._outcomes.get(intent.app)
        if outcome is not None:
            return outcome
        return Outcome.failed(self._pass_error or "not planned in this pass (retrying)")

    def unmanaged(self, assigned: Collection[str]) -> list[str]:
        return sorted(app for app in self._removals if app not in assigned)

    def remove(self, app: str) -> Outcome:
        return self._removals.get(app, Outcome.converged())


class Ip6tablesAgent(IptablesAgent):
    """The same rules for IPv6, reported apart so both agents can run on a host."""

    name: ClassVar[str] = "ip6tables"


def _ports(intent: AppIntent) -> list[PortSpec]:
    if intent.deploy is None or intent.config is None or intent.config.active_version is None:
        return []
    return list(intent.deploy.ports)


def _inputs(
    wanted: Mapping[str, Sequence[PortSpec]],
    assigned: Collection[str] | None,
    priority: Mapping[str, int],
) -> Hashable:
    """Everything besides the rules that plan() decides from, as plain data."""
    return (
        tuple(
            (app, tuple((p.name, p.protocol, p.port, p.public_port) for p in ports))
            for app, ports in sorted(wanted.items())
        ),
        None if assigned is None else frozenset(assigned),
        tuple(sorted(priority.items())),
    )


def _version(intent: AppIntent) -> str | None:
    return intent.config.active_version if intent.config is not None else None


def _outcome(result: AppResult, version: str | None) -> Outcome:
    ports = [p.as_dict() for p in result.ports]
    if result.status == "error":
        return Outcome.failed(result.error or "error", version, ports=ports)
    return Outcome.converged(version, ports=ports)
