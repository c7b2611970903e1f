"""Read the rules in force: our chains, and whether the built-ins jump to them."""

from __future__ import annotations

import re
from dataclasses import dataclass
from functools import cached_property

from agents.iptables.plan import Observed, Seen
from agents.iptables.rules import CHAINS, WATCHED, is_jump, parse_line
from agents.system.iptables import MIXED_BACKENDS, Iptables, SavedTable, parse_save

_VOLATILE = re.compile(r"^#[^\n]*|\[\d+:\d+\]", re.MULTILINE)
"""Time stamps and counters: what changes in a dump while the rules do not."""


@dataclass(frozen=True)
class Snapshot:
    """One ``iptables-save -c`` dump, read only as far as a pass needs."""

    dump: str

    @cached_property
    def fingerprint(self) -> str:
        """The dump without counters or time stamps: equal fingerprints, equal rules."""
        return _VOLATILE.sub("", self.dump)

    @cached_property
    def observed(self) -> Observed:
        return read(parse_save(self.dump, WATCHED))

    @property
    def warnings(self) -> list[str]:
        if MIXED_BACKENDS in self.dump:
            return [
                "rules also exist in the other iptables backend (legacy vs nft); both apply, "
                "so choose the backend the host uses with --iptables"
            ]
        return []


def observe(tables: Iptables) -> Snapshot:
    return Snapshot(tables.save())


def read(saved: dict[str, SavedTable]) -> Observed:
    chains: dict[str, list[Seen]] = {}
    jumps = set()
    for chain in CHAINS:
        table = saved.get(chain.table)
        if table is None:
            continue
        if chain.name in table.chains:
            chains[chain.name] = [
                Seen(parse_line(chain.name, r.text), r.packets, r.bytes)
                for r in table.rules.get(chain.name, ())
            ]
        parent = table.rules.get(chain.parent, ())
        if any(chain.name in r.text and is_jump(r.args, chain) for r in parent):
            jumps.add(chain.name)
    return Observed(chains, frozenset(jumps))
