"""Read the rules in force: our chains, and whether the built-ins jump to them."""

from __future__ import annotations

from agents.iptables.plan import Observed, Seen
from agents.iptables.rules import CHAINS, WATCHED, is_jump, parse_rule
from agents.system.iptables import MIXED_BACKENDS, Iptables, SavedTable, parse_save


def observe(tables: Iptables) -> tuple[Observed, list[str]]:
    """The rules in force, and warnings worth an operator's attention."""
    dump = tables.save()
    warnings = []
    if MIXED_BACKENDS in dump:
        warnings.append(
            "rules also exist in the other iptables backend (legacy vs nft); both apply, "
            "so choose the backend the host uses with --iptables"
        )
    return read(parse_save(dump, WATCHED)), warnings


def read(saved: dict[str, SavedTable]) -> Observed:
    chains: dict[str, list[Seen]] = {}
    jumps = set()
    for chain in CHAINS:
        table = saved.get(chain.table)
        if table is None:
            continue
        if chain.name in table.chains:
            chains[chain.name] = [
                Seen(parse_rule(chain.name, r.args), r.packets, r.bytes)
                for r in table.rules.get(chain.name, ())
            ]
        if any(is_jump(r.args, chain) for r in table.rules.get(chain.parent, ())):
            jumps.add(chain.name)
    return Observed(chains, frozenset(jumps))
