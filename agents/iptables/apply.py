"""Make the plan so: one checked ``iptables-restore --noflush`` transaction."""

from __future__ import annotations

from agents.system.iptables import Iptables


def apply(tables: Iptables, restore: str) -> None:
    """Validate the whole input with ``--test`` first, so a rule the kernel or the
    command would refuse fails the pass before anything is committed."""
    tables.check(restore)
    tables.restore(restore)
