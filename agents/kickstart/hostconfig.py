"""What this host's agents run with: ``<basedir>/agents.json``, written by the kickstart.

The bundle is the same bytes on every host (its sha256 is what the intent names), so
nothing host-specific is baked into it: the store, the node and the paths live in this
file beside the installs, where every release's ``bin/launch/<agent>`` reads them.
``<basedir>`` is root's and not writable by others (pp-preparer refuses it otherwise),
so neither is this file.
"""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass, fields
from pathlib import Path

from agents.system import fs

FILE_NAME = "agents.json"
PYTHON_LINK = "python3"
"""``<basedir>/python3``: a link to the interpreter the kickstart ran with, which every
release's scripts run with (whatever PATH their supervisor gives them)."""
INITS = ("runit", "systemd")
CLUSTER = "agents"


class HostConfigError(Exception):
    """The host's configuration is missing or unreadable; the message says which file."""


@dataclass(frozen=True)
class HostConfig:
    store: str
    prefix: str
    node: str
    repo: str
    init: str
    agents: tuple[str, ...]
    runit_dir: str
    stage: str
    state_dir: str
    """The agents' state root: each agent keeps its notes in ``<state_dir>/<agent>``."""
    log_root: str
    unit_dir: str
    guard_deadline: float | None = None
    """pp-setlive's ``--guard-deadline`` (None: its default, from the health check)."""

    def state_of(self, agent: str) -> Path:
        return Path(self.state_dir) / agent

    def flags(self, agent: str) -> list[str]:
        """The command-line flags ``agent`` runs with on this host."""
        flags = ["--store", self.store, "--prefix", self.prefix, "--node", self.node]
        flags += ["--state-dir", str(self.state_of(agent))]
        if agent == "preparer":
            flags += ["--repo", self.repo]
        if agent == "setlive":
            flags += [
                "--runit", self.runit_dir,
                "--runit-stage", self.stage,
                "--log-root", self.log_root,
            ]  # fmt: skip
            if self.guard_deadline is not None:
                flags += ["--guard-deadline", f"{self.guard_deadline:g}"]
        return flags

    def to_bytes(self) -> bytes:
        return (json.dumps(asdict(self), indent=2, sort_keys=True) + "\n").encode()

    def save(self, basedir: Path) -> bool:
        """Write it atomically; True when it changed."""
        return fs.write_atomic(basedir / FILE_NAME, self.to_bytes(), 0o644)

    @classmethod
    def load(cls, basedir: Path) -> HostConfig:
        path = basedir / FILE_NAME
        try:
            raw = json.loads(path.read_text())
            names = {f.name for f in fields(cls)}
            values = {k: v for k, v in raw.items() if k in names}
            values["agents"] = tuple(values.get("agents", ()))
            return cls(**values)
        except FileNotFoundError as exc:
            raise HostConfigError(f"{path}: missing; run the bundle's bin/kickstart") from exc
        except (OSError, ValueError, TypeError, AttributeError) as exc:
            raise HostConfigError(f"{path}: unreadable ({exc}); run bin/kickstart again") from exc
