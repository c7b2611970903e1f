"""The registrar's own record: which load balancers it may have registered each app in.

``<state-dir>/<app>.json`` lists each load balancer (as ``deploy_config.elb``
names it, with its region, role and target-group port) and when this agent
registered the instance there. It is what lets the agent undo its work after an
app is unassigned, or after a load balancer leaves ``deploy_config.elb``, even
across a restart: by then the intent no longer says where the instance is.

An entry is written before the registration and removed only after the instance
is out and drained (see plan.py), with temp file and rename, so the record is
never short of what AWS holds. A file with no entry left is deleted.
"""

from __future__ import annotations

import contextlib
import os
import re
from pathlib import Path

from pydantic import BaseModel, ConfigDict, ValidationError

from agents.elb_registrar.plan import LoadBalancer, lb_key
from agents.system.fs import read_small, write_atomic
from intent.model import LoadBalancer as LoadBalancerSpec
from intent.model import is_safe_name

_FILE = re.compile(r"^(?P<app>.+)\.json$")


class StateError(Exception):
    """A state file that cannot be read; the message names it and what to do."""


class Registration(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)

    lb: LoadBalancerSpec
    registered_at: float


class AppRecord(BaseModel):
    model_config = ConfigDict(extra="forbid")

    app: str
    load_balancers: list[Registration]


class StateDir:
    def __init__(self, path: Path) -> None:
        self.path = path

    def file(self, app: str) -> Path:
        return self.path / f"{app}.json"

    def apps(self) -> list[str]:
        """Apps with a record: those this agent may have registered somewhere."""
        try:
            names = os.listdir(self.path)
        except FileNotFoundError:
            return []
        found = (_FILE.match(name) for name in names)
        return sorted(m["app"] for m in found if m is not None and is_safe_name(m["app"]))

    def load(self, app: str) -> dict[str, Registration]:
        """The app's registrations by ``lb_key``; empty when it has none."""
        path = self.file(app)
        try:
            raw = read_small(path, limit=1 << 20, owner=os.geteuid())
        except FileNotFoundError:
            return {}
        except OSError as exc:
            raise StateError(f"state file {path}: {exc.strerror or exc}") from None
        try:
            record = AppRecord.model_validate_json(raw)
        except ValidationError as exc:
            first = exc.errors()[0]
            where = ".".join(str(p) for p in first["loc"]) or "file"
            raise StateError(
                f"state file {path}: {where}: {first['msg']}; it lists the load balancers "
                f"this node may be registered in: deregister it by hand, then delete the file"
            ) from None
        return {lb_key(r.lb): r for r in record.load_balancers}

    def record(self, app: str, lb: LoadBalancer, at: float) -> None:
        """Note ``lb`` (as the intent now names it) before registering there; a load
        balancer already noted keeps the time it was first registered."""
        entries = self.load(app)
        known = entries.get(lb_key(lb))
        entries[lb_key(lb)] = Registration(
            lb=lb, registered_at=known.registered_at if known else at
        )
        self._save(app, entries)

    def forget(self, app: str, key: str) -> None:
        entries = self.load(app)
        if entries.pop(key, None) is not None:
            self._save(app, entries)

    def _save(self, app: str, entries: dict[str, Registration]) -> None:
        if not entries:
            with contextlib.suppress(FileNotFoundError):
                self.file(app).unlink()
            return
        self.path.mkdir(parents=True, exist_ok=True, mode=0o700)
        record = AppRecord(app=app, load_balancers=[entries[k] for k in sorted(entries)])
        write_atomic(self.file(app), record.model_dump_json(indent=1).encode() + b"\n", 0o600)
