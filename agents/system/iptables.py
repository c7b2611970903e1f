"""The packet filter, through ``iptables-save`` and ``iptables-restore``.

Thin on purpose: run the configured commands, read ``iptables-save -c`` back into
rules of the chains asked for, and turn failures into one line an operator can
act on. Which rules to write is the caller's business.

Each command is a list of words, so it may be a wrapper (``ip netns exec NS
iptables-restore``, ``ip6tables-legacy-restore``): the host decides which
backend (nft or legacy) is in use, not this module.
"""

from __future__ import annotations

import re
import subprocess
from collections.abc import Collection, Sequence
from dataclasses import dataclass, field

from intent.errors import PlatypusError

LOCK_WAIT_S = 10
"""How long a restore waits for the xtables lock another tool may hold."""

TIMEOUT_S = 60.0

_TOKEN = re.compile(r'"((?:[^"\\]|\\.)*)"|(\S+)')
_UNESCAPE = re.compile(r"\\(.)")
_COUNTERS = re.compile(r"\[(\d+):(\d+)\]")
_PERMISSION = (
    "permission denied",
    "you must be root",
    "operation not permitted",
    "can't initialize",
)
MIXED_BACKENDS = "iptables-legacy tables present"
"""What the nft-backed ``iptables-save`` says when legacy rules also exist."""


class IptablesError(PlatypusError):
    """A command failed; the message is one line naming what to fix."""


@dataclass(frozen=True)
class SavedRule:
    text: str
    """The rule after ``-A <chain>``, as printed."""
    packets: int = 0
    bytes: int = 0

    @property
    def args(self) -> tuple[str, ...]:
        """The rule's words, unquoted (split on demand: a busy node has thousands)."""
        return tokens(self.text)


@dataclass
class SavedTable:
    chains: dict[str, str] = field(default_factory=dict)
    """Every chain declared in the table, with its policy (``-`` for user chains)."""
    rules: dict[str, list[SavedRule]] = field(default_factory=dict)
    """Rules, in order, of the chains that were asked for and have any."""


def tokens(text: str) -> tuple[str, ...]:
    """Split a rule as ``iptables-save`` prints it: words, or double-quoted strings."""
    if "\\" not in text and text.count('"') % 2 == 0:
        fast: list[str] = []
        for i, part in enumerate(text.split('"')):
            if i % 2:
                fast.append(part)
            else:
                fast.extend(part.split())
        return tuple(fast)
    words = []
    for match in _TOKEN.finditer(text):
        quoted, bare = match.groups()
        words.append(bare if quoted is None else _UNESCAPE.sub(r"\1", quoted))
    return tuple(words)


def quote(word: str) -> str:
    """One word as ``iptables-restore`` reads it back."""
    if word and not any(c.isspace() or c in "\"'\\" for c in word):
        return word
    return '"' + word.replace("\\", "\\\\").replace('"', '\\"') + '"'


def parse_save(text: str, chains: Collection[str]) -> dict[str, SavedTable]:
    """Tables of an ``iptables-save -c`` dump; rules are kept only for ``chains``
    (parsing every rule of a busy host would cost more than the dump itself)."""
    tables: dict[str, SavedTable] = {}
    table = SavedTable()
    for line in text.splitlines():
        if not line or line[0] == "#":
            continue
        if line[0] == "*":
            table = tables.setdefault(line[1:].strip(), SavedTable())
        elif line[0] == ":":
            name, _, rest = line[1:].partition(" ")
            table.chains[name] = rest.split(" ", 1)[0] or "-"
        elif line == "COMMIT":
            continue
        else:
            packets = byte_count = 0
            if line[0] == "[":
                counters, _, line = line.partition(" ")
                match = _COUNTERS.fullmatch(counters)
                if match:
                    packets, byte_count = int(match[1]), int(match[2])
            words = line.split(None, 2)
            if len(words) < 2 or words[0] != "-A" or words[1] not in chains:
                continue
            text = words[2] if len(words) > 2 else ""
            table.rules.setdefault(words[1], []).append(SavedRule(text, packets, byte_count))
    return tables


class Iptables:
    """One address family's packet filter, reached through three commands."""

    def __init__(
        self, iptables: Sequence[str], restore: Sequence[str], save: Sequence[str]
    ) -> None:
        self.iptables = list(iptables)
        self.restore_cmd = list(restore)
        self.save_cmd = list(save)

    def version(self) -> str:
        """``iptables v1.8.9 (nf_tables)``: names the backend in the start-up log."""
        return self._run(self.iptables, ["--version"]).strip()

    def save(self) -> str:
        """Every table with counters, as ``iptables-save -c`` prints it."""
        return self._run(self.save_cmd, ["-c"])

    def check(self, rules: str) -> None:
        """Parse and validate a restore input without committing it."""
        self._run(self.restore_cmd, [*self._restore_args(), "--test"], rules)

    def restore(self, rules: str) -> None:
        """Commit a restore input that touches only the chains it declares or names.

        ``--noflush`` keeps every other chain; each table in the input is
        committed whole or not at all, even if this process is killed."""
        self._run(self.restore_cmd, self._restore_args(), rules)

    @staticmethod
    def _restore_args() -> list[str]:
        return ["--noflush", "--counters", f"--wait={LOCK_WAIT_S}"]

    def _run(self, command: list[str], args: list[str], stdin: str | None = None) -> str:
        argv = command + args
        shown = " ".join(command)
        try:
            done = subprocess.run(
                argv,
                input=stdin,
                capture_output=True,
                text=True,
                timeout=TIMEOUT_S,
                check=False,
            )
        except FileNotFoundError as exc:
            raise IptablesError(
                f"{command[0]}: command not found; install Debian's iptables package "
                "or choose the commands with --iptables/--iptables-restore/--iptables-save"
            ) from exc
        except PermissionError as exc:
            raise IptablesError(f"{command[0]}: not executable (permission denied)") from exc
        except subprocess.TimeoutExpired as exc:
            raise IptablesError(f"{shown}: no answer after {TIMEOUT_S:.0f} s") from exc
        if done.returncode != 0:
            raise IptablesError(_describe_failure(shown, done.returncode, done.stderr))
        return done.stdout


def _describe_failure(shown: str, returncode: int, stderr: str) -> str:
    lines = [line.strip() for line in stderr.splitlines() if line.strip()]
    lines = [line for line in lines if not line.startswith("Try `")]
    detail = "; ".join(lines[:3]) or "no message"
    if any(p in detail.lower() for p in _PERMISSION):
        return (
            f"{shown}: permission denied: run pp-iptables as root "
            f"(or with CAP_NET_ADMIN) ({detail})"
        )
    if returncode < 0:
        return f"{shown}: killed by signal {-returncode}"
    return f"{shown}: exit {returncode}: {detail}"
