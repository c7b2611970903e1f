"""Whether an agent may act on the intent it sees: absence is not intent.

A wiped prefix, a ``consul agent -dev`` that restarted empty, agents pointed at the
wrong datacenter and a replaced database file all read exactly like intent that says
"run nothing here", and acting on that would tear the host down. Two checks tell them
apart, and while either fails the agent is *held*: it changes nothing on the host.

- **Identity.** The store carries an identity record (``identity``, made by ``pp``'s
  first write or ``pp init``). Each agent remembers the identity it last converged
  from, on the host. A store without that identity, or with another one, is not the
  intent the host was built from, until it is restored or an operator declares it the
  successor (``pp init --adopt <old id>``).
- **Vanishing.** A node whose every assignment disappears in one step is held unless an
  operator recorded that the node is meant to be empty (``emptied/<node>``, written by
  ``pp unassign``). Removing some of a node's apps needs no such record.
- **A restore under way.** A restore writes keys one at a time (``consul kv import``),
  so when the store is trusted again the node's assignments may still be arriving, and
  an app whose key is not back yet looks unassigned. After a hold, while an app the
  host ran is not assigned, the agent stays held until the assignments have stayed the
  same for ``settle_s``.

``assess`` is the whole decision, pure; ``MemoryFile`` keeps what it needs on disk so
a restarted agent holds exactly as the one before it did; ``Guard`` reads the store
for them and times the settling.
"""

from __future__ import annotations

import json
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import structlog

from agents.system import fs
from intent.model import IntentError, StoreIdentity
from intent.store import IntentStore

log = structlog.get_logger()

RESTORE_SETTLE_S = 2.0
"""How long, after a hold, a node's assignments must stay the same before the agent acts
on them without an app the host ran: far longer than ``consul kv import`` takes between
two keys, short enough that an app unassigned meanwhile goes soon after."""


@dataclass(frozen=True)
class Memory:
    """What an agent remembers of the store it converged from, across restarts."""

    identity: str | None = None
    assigned: frozenset[str] = frozenset()


@dataclass(frozen=True)
class Seen:
    """What the store shows now."""

    identity: StoreIdentity | None
    assigned: frozenset[str]
    emptied: bool = False
    identity_error: str | None = None
    """Set when the identity record exists but cannot be read."""


@dataclass(frozen=True)
class Verdict:
    trusted: bool
    reason: str | None = None
    remember: Memory = field(default_factory=Memory)
    """The memory to keep: updated when trusted, the old one when held."""


def assess(memory: Memory, seen: Seen, node: str) -> Verdict:
    """Whether the intent ``seen`` may be acted on by an agent that remembers ``memory``."""
    if (reason := _identity_problem(memory, seen)) is not None:
        return Verdict(False, reason, memory)
    if memory.assigned and not seen.assigned and not seen.emptied:
        apps = ", ".join(sorted(memory.assigned))
        return Verdict(
            False,
            f"every assignment of {node} vanished at once (it ran {apps}); if the node is "
            f"meant to run nothing, record it with: pp unassign --all {node}",
            memory,
        )
    identity = seen.identity.id if seen.identity is not None else memory.identity
    return Verdict(True, None, Memory(identity, seen.assigned))


def _identity_problem(memory: Memory, seen: Seen) -> str | None:
    if seen.identity_error is not None:
        return f"the store's identity record cannot be read ({seen.identity_error})"
    if memory.identity is None:
        return None
    adopt = (
        f"restore the intent (e.g. consul kv import of a backup) or, if this store is "
        f"meant to replace the old one, run: pp init --adopt {memory.identity}"
    )
    if seen.identity is None:
        return (
            f"the store has no identity record, but this host converged from store "
            f"{memory.identity}: it may be wiped, replaced or the wrong one; {adopt}"
        )
    if not seen.identity.succeeds(memory.identity):
        return (
            f"the store is {seen.identity.id}, but this host converged from store "
            f"{memory.identity}; {adopt}"
        )
    return None


class MemoryFile:
    """``Memory`` in a JSON file of the agent's own state directory (root's, 0600)."""

    def __init__(self, path: Path | None) -> None:
        self.path = path
        """None keeps the memory in this process only (tests, one-off runs)."""
        self._cached: Memory | None = None
        self._save_failed = False

    def load(self) -> Memory:
        if self._cached is not None:
            return self._cached
        memory = Memory()
        if self.path is not None:
            try:
                data = json.loads(self.path.read_bytes())
                memory = Memory(data.get("identity"), frozenset(data.get("assigned", [])))
            except FileNotFoundError:
                pass
            except (OSError, ValueError, TypeError, AttributeError):
                # Unreadable memory could hide a wipe: remember the worst case instead,
                # "this host ran something", until the store proves otherwise.
                memory = Memory(None, frozenset({"<unreadable memory>"}))
        self._cached = memory
        return memory

    def save(self, memory: Memory) -> None:
        """Remember ``memory``; an unwritable file is logged once and the memory kept
        in this process, so the agent still works (and holds within this run)."""
        if memory == self._cached:
            return
        self._cached = memory
        if self.path is None:
            return
        data = {"identity": memory.identity, "assigned": sorted(memory.assigned)}
        try:
            self.path.parent.mkdir(parents=True, exist_ok=True, mode=0o700)
            fs.write_atomic(self.path, json.dumps(data, sort_keys=True).encode(), 0o600)
        except OSError as exc:
            if not self._save_failed:
                log.warning("trust.memory_unwritable", path=str(self.path), error=str(exc))
            self._save_failed = True
        else:
            self._save_failed = False


class Guard:
    """Reads what ``assess`` needs from the store, and remembers what it trusted.

    Costs one read per pass (the identity), plus one when the node has no assignment
    (the emptied record). Store errors propagate: an unreachable store holds anyway."""

    def __init__(
        self,
        store: IntentStore,
        node: str,
        memory: MemoryFile,
        clock: Callable[[], float] = time.monotonic,
        settle_s: float = RESTORE_SETTLE_S,
    ) -> None:
        self.store = store
        self.node = node
        self.memory = memory
        self.clock = clock
        self.settle_s = settle_s
        self._held: str | None = None
        """Why the last check held; kept while a restore settles."""
        self._settling: tuple[float, frozenset[str]] | None = None
        """Until when, and on which assignments, a restore is waited for."""

    def check(self, assigned: frozenset[str]) -> Verdict:
        identity_error = None
        try:
            identity = self.store.identity()
        except IntentError as exc:
            identity, identity_error = None, str(exc)
        emptied = not assigned and self.store.is_emptied(self.node)
        seen = Seen(identity, assigned, emptied, identity_error)
        verdict = assess(self.memory.load(), seen, self.node)
        if not verdict.trusted:
            self._held, self._settling = verdict.reason, None
            return verdict
        if self._held is not None and self._restoring(assigned):
            return Verdict(False, self._held, self.memory.load())  # held as it was, unsaid
        self._held, self._settling = None, None
        self.memory.save(verdict.remember)
        return verdict

    def _restoring(self, assigned: frozenset[str]) -> bool:
        """Whether the node's assignments may still be arriving after a hold: an app the
        host ran is missing, and they changed within the last ``settle_s``."""
        if not self.memory.load().assigned - assigned:
            return False
        now = self.clock()
        if self._settling is None or self._settling[1] != assigned:
            self._settling = (now + self.settle_s, assigned)
        return now < self._settling[0]
