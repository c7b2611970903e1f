"""setlive's own notes on the host, one JSON file per app in ``--state-dir``.

Only what the host itself cannot show is kept here:

- ``pending``: a switch whose health gate has not passed yet. Written before
  ``current`` moves, so a setlive killed halfway knows on start that the version
  it finds running still has to prove itself (and what to roll back to).
- ``failure``: a version that failed its gate and was rolled back, with the
  intent fingerprint and retry token it failed under. setlive does not try that
  version again until one of them changes.
- ``last_switch_at``: for reports.
- ``last_good``: the version whose health gate last passed here. A switch back to
  it is a repair of drift, not a deploy (see ``plan``).
- ``drain``: the drain request setlive made before stopping or restarting an app
  behind load balancers, reported as ``details.drain_request`` until the switch
  is over, so a restarted setlive goes on waiting for the same answer.

Everything else (what ``current`` points at, what runit runs) is observed anew
on every pass.
"""

from __future__ import annotations

import contextlib
import json
import os
from dataclasses import asdict, dataclass, replace
from pathlib import Path
from typing import Any

from agents.system import fs


@dataclass(frozen=True)
class Pending:
    target: str
    from_version: str | None
    started_at: float


@dataclass(frozen=True)
class Failure:
    version: str
    fingerprint: str
    rolled_back_to: str | None
    output: str
    failed_at: float
    retry_token: str | None = None


@dataclass(frozen=True)
class Drain:
    token: str
    at: float
    wait_until: float
    """Until when setlive waits for pp-elb-registrar's acknowledgement."""
    until: float
    """Until when the request keeps the node out (the registrar ignores it afterwards)."""

    def request(self) -> dict[str, object]:
        """As reported in ``details.drain_request``, for pp-elb-registrar."""
        return {"token": self.token, "at": round(self.at, 3), "until": round(self.until, 3)}


@dataclass(frozen=True)
class AppState:
    pending: Pending | None = None
    failure: Failure | None = None
    last_switch_at: float | None = None
    last_good: str | None = None
    drain: Drain | None = None


class StateDir:
    def __init__(self, path: Path) -> None:
        self.path = path

    def _file(self, app: str) -> Path:
        return self.path / f"{app}.json"

    def load(self, app: str) -> AppState:
        try:
            data = json.loads(self._file(app).read_bytes())
        except FileNotFoundError:
            return AppState()
        except (OSError, ValueError):
            # A damaged note must not stop the app: forget it, observe afresh.
            return AppState()
        try:
            pending = Pending(**data["pending"]) if data.get("pending") else None
            failure = Failure(**data["failure"]) if data.get("failure") else None
            drain = Drain(**data["drain"]) if data.get("drain") else None
            return AppState(
                pending, failure, data.get("last_switch_at"), data.get("last_good"), drain
            )
        except TypeError:
            return AppState()

    def update(self, app: str, **changes: Any) -> AppState:
        """Change some of ``app``'s notes and keep the rest; returns the notes saved."""
        state = replace(self.load(app), **changes)
        self._save(app, state)
        return state

    def _save(self, app: str, state: AppState) -> None:
        self.path.mkdir(parents=True, exist_ok=True, mode=0o700)
        data = {
            "pending": asdict(state.pending) if state.pending else None,
            "failure": asdict(state.failure) if state.failure else None,
            "last_switch_at": state.last_switch_at,
            "last_good": state.last_good,
            "drain": asdict(state.drain) if state.drain else None,
        }
        fs.write_atomic(self._file(app), json.dumps(data, sort_keys=True).encode(), 0o600)

    def remove(self, app: str) -> None:
        with contextlib.suppress(FileNotFoundError):
            self._file(app).unlink()

    def apps(self) -> list[str]:
        try:
            names = os.listdir(self.path)
        except FileNotFoundError:
            return []
        return sorted(n[: -len(".json")] for n in names if n.endswith(".json") and n[0] != ".")
