"""Decide the node's rules: pure, no I/O.

``plan`` takes the ports every app wants and the rules in force, resolves port
conflicts between apps, and returns the ``iptables-restore`` input that makes
our chains match (or None when they already do), plus what each app ends up
with. Conflicts are decided so that a running app is never displaced:

1. rules of apps that are assigned but have no usable intent stay as they are,
   and so keep the ports they occupy;
2. an app keeps the ports it already holds in force (read from the rules'
   comments), so a newcomer asking for them is the one refused;
3. ports nobody holds go to apps in assignment order (the store's version of
   ``nodes/<node>/<app>``, lower first), then by name, so every pass and every
   node after a reboot decides the same way.

A refused app is an intent error: it keeps whatever it had in force, and
nothing else changes.
"""

from __future__ import annotations

from collections.abc import Collection, Iterable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any, Literal, NamedTuple

from agents.iptables.rules import (
    CHAINS,
    INPUT,
    OUTPUT,
    PREROUTING,
    TABLES,
    Protocol,
    Rule,
    jump_args,
)
from agents.system.iptables import quote
from intent.model import PortSpec

Key = tuple[Protocol, int]
_LAST = 1 << 62


class Seen(NamedTuple):
    """A rule found in one of our chains; ``rule`` is None when it is not one of ours."""

    rule: Rule | None
    packets: int = 0
    bytes: int = 0


@dataclass(frozen=True)
class Observed:
    chains: Mapping[str, Sequence[Seen]]
    """Our chains that exist, each with its rules in order."""
    jumps: frozenset[str]
    """Our chains that their built-in parent already jumps to."""


@dataclass(frozen=True)
class OpenPort:
    name: str
    protocol: Protocol
    port: int | None
    public_port: int | None = None

    def as_dict(self) -> dict[str, Any]:
        return {
            "name": self.name,
            "protocol": self.protocol,
            "port": self.port,
            "public_port": self.public_port,
        }


@dataclass(frozen=True)
class AppResult:
    status: Literal["converged", "error"]
    ports: tuple[OpenPort, ...]
    """What is in force for the app once the plan is applied."""
    error: str | None = None


@dataclass(frozen=True)
class Plan:
    results: Mapping[str, AppResult]
    """One per wanted app."""
    removed: frozenset[str]
    """Apps whose rules go because they are no longer assigned."""
    restore: str | None
    """The ``iptables-restore --noflush`` input, or None when nothing differs."""
    changed: tuple[str, ...]
    """Chains rewritten or jumped to anew, for the log."""
    rules: int
    """How many rules our chains hold once applied."""


@dataclass(frozen=True)
class _Claim:
    app: str
    what: str
    held: bool = False


def plan(
    wanted: Mapping[str, Sequence[PortSpec]],
    observed: Observed,
    assigned: Collection[str] | None = None,
    priority: Mapping[str, int] | None = None,
) -> Plan:
    """``wanted``: the ports of every app with usable intent (empty when it has no
    active version). ``assigned``: every app assigned to the node, usable or not;
    None when unknown, which keeps every app found in force. ``priority``: the
    order of assignment."""
    order = priority or {}

    def rank(app: str) -> tuple[int, str]:
        return order.get(app, _LAST), app

    in_force = _rules_by_app(observed)
    held_apps = sorted(
        (a for a in in_force if a not in wanted and (assigned is None or a in assigned)),
        key=rank,
    )
    removed = frozenset(in_force) - set(wanted) - set(held_apps)

    reserved: dict[Key, _Claim] = {}
    for app in held_apps:
        for rule in in_force[app]:
            reserved.setdefault(rule.key, _Claim(app, _describe_rule(rule), held=True))

    errors: dict[str, str] = {}
    claims: dict[str, dict[Key, str]] = {}
    for app, ports in wanted.items():
        try:
            claims[app] = _claims(ports)
        except ValueError as exc:
            errors[app] = f"deploy_config ports: {exc}"

    candidates = sorted(claims, key=rank)
    for app in candidates:
        holding = {rule.key for rule in in_force.get(app, ())}
        for key, what in claims[app].items():
            if key in holding:
                reserved.setdefault(key, _Claim(app, what, held=True))

    accepted: list[str] = []
    for app in candidates:
        clash = next(
            (
                (key, reserved[key])
                for key in claims[app]
                if reserved.get(key, _Claim(app, "")).app != app
            ),
            None,
        )
        if clash is not None:
            key, other = clash
            verb = "holds it" if other.held else "was given it first"
            errors[app] = (
                f"port conflict: app {app} wants {claims[app][key]}, but app {other.app} "
                f"{verb} on this node ({other.what}); "
                "give one of them another port in its deploy_config"
            )
            continue
        accepted.append(app)
        for key, what in claims[app].items():
            reserved[key] = _Claim(app, what, reserved.get(key, _Claim(app, "")).held)

    accepted_set = set(accepted)
    owner = {key: claim.app for key, claim in reserved.items() if claim.app in accepted_set}
    final: dict[str, list[Rule]] = {}
    for app in accepted:
        for rule in _desired(app, wanted[app]):
            final.setdefault(rule.chain, []).append(rule)
    for app in [*held_apps, *errors]:
        kept = (r for r in in_force.get(app, ()) if owner.get(r.key, app) == app)
        for rule in dict.fromkeys(kept):
            final.setdefault(rule.chain, []).append(rule)
    for rules in final.values():
        rules.sort(key=lambda r: (r.app, r.port_name, r.dport))

    results = {
        app: AppResult("error", _open_ports(_in_force_after(final, app)), errors[app])
        if app in errors
        else AppResult("converged", tuple(_from_spec(p) for p in wanted[app]))
        for app in wanted
    }
    restore, changed = _render(final, observed)
    return Plan(
        results=results,
        removed=removed,
        restore=restore,
        changed=changed,
        rules=sum(len(r) for r in final.values()),
    )


def _rules_by_app(observed: Observed) -> dict[str, list[Rule]]:
    by_app: dict[str, list[Rule]] = {}
    for chain in CHAINS:
        for seen in observed.chains.get(chain.name, ()):
            if seen.rule is not None:
                by_app.setdefault(seen.rule.app, []).append(seen.rule)
    return by_app


def _claims(ports: Iterable[PortSpec]) -> dict[Key, str]:
    """Every (protocol, port) an app's traffic arrives on. A public port that is
    another of the app's ports would steal that port's traffic: refused."""
    claims: dict[Key, str] = {}
    for spec in ports:
        wants = [((spec.protocol, spec.port), f"{spec.port}/{spec.protocol} for port {spec.name}")]
        if spec.public_port is not None and spec.public_port != spec.port:
            what = f"{spec.public_port}/{spec.protocol} for public_port of {spec.name}"
            wants.append(((spec.protocol, spec.public_port), what))
        for key, what in wants:
            if key in claims:
                raise ValueError(f"{what} collides with {claims[key]}")
            claims[key] = what
    return claims


def _desired(app: str, ports: Iterable[PortSpec]) -> list[Rule]:
    rules = []
    for spec in ports:
        rules.append(Rule(INPUT.name, app, spec.name, spec.protocol, spec.port))
        if spec.public_port is not None and spec.public_port != spec.port:
            for chain in (PREROUTING, OUTPUT):
                rules.append(
                    Rule(chain.name, app, spec.name, spec.protocol, spec.public_port, spec.port)
                )
    return rules


def _describe_rule(rule: Rule) -> str:
    role = "port" if rule.chain == INPUT.name else "public_port of"
    return f"{rule.dport}/{rule.protocol} for {role} {rule.port_name}"


def _from_spec(spec: PortSpec) -> OpenPort:
    return OpenPort(spec.name, spec.protocol, spec.port, spec.public_port)


def _in_force_after(final: Mapping[str, Sequence[Rule]], app: str) -> list[Rule]:
    return [r for rules in final.values() for r in rules if r.app == app]


def _open_ports(rules: Iterable[Rule]) -> tuple[OpenPort, ...]:
    """What an app has in force, rebuilt from its rules (for apps we did not change)."""
    ports: dict[tuple[str, Protocol], dict[str, int]] = {}
    for rule in rules:
        entry = ports.setdefault((rule.port_name, rule.protocol), {})
        if rule.chain == INPUT.name:
            entry["port"] = rule.dport
        elif rule.chain == PREROUTING.name and rule.to_port is not None:
            entry["public_port"] = rule.dport
            entry.setdefault("port", rule.to_port)
    return tuple(
        OpenPort(name, protocol, entry.get("port"), entry.get("public_port"))
        for (name, protocol), entry in sorted(ports.items())
    )


def _render(
    final: Mapping[str, Sequence[Rule]], observed: Observed
) -> tuple[str | None, tuple[str, ...]]:
    """The restore input for the chains that differ and the jumps that are missing.

    A chain that differs by a few rules is edited in place (``-D`` the rules that
    go, ``-I`` the ones that come, at their final positions): the kernel keeps
    every other rule and its counters, and nft commits far faster than a rewrite.
    Otherwise the chain is declared, which empties it in ``--noflush`` mode, and
    written out whole with the counters of surviving rules carried over. Either
    way each table is one committed transaction."""
    lines: list[str] = []
    changed: list[str] = []
    for table in TABLES:
        declare: list[str] = []
        body: list[str] = []
        chains = [c for c in CHAINS if c.table == table]
        for chain in chains:
            want = list(final.get(chain.name, ()))
            seen = observed.chains.get(chain.name)
            if seen is not None and [s.rule for s in seen] == want:
                continue
            edits = None if seen is None else _edits(chain.name, seen, want)
            if edits is None:
                declare.append(f":{chain.name} - [0:0]")
                body.extend(_rewrite(chain.name, seen or (), want))
            else:
                body.extend(edits)
            changed.append(chain.name)
        jumps = [c for c in chains if c.name not in observed.jumps]
        changed.extend(c.name for c in jumps if c.name not in changed)
        if declare or body or jumps:
            lines.append(f"*{table}")
            lines.extend(declare)  # before the jumps: a new chain must exist to be jumped to
            lines.extend(f"-I {c.parent} 1 {_words(jump_args(c))}" for c in jumps)
            lines.extend(body)
            lines.append("COMMIT")
    order = [c.name for c in CHAINS]
    return ("\n".join(lines) + "\n" if lines else None), tuple(sorted(changed, key=order.index))


EDIT_LIMIT = 64
"""Beyond this many rule edits in a chain, rewriting it whole is as cheap."""


def _edits(chain: str, seen: Sequence[Seen], want: Sequence[Rule]) -> list[str] | None:
    """``-D``/``-I`` lines turning ``seen`` into ``want``, or None when the chain
    holds something we cannot address by its spec (a foreign or duplicate rule),
    its surviving rules are out of order, or the edits would outnumber a rewrite."""
    have = [s.rule for s in seen]
    have_set = set(have)
    if None in have_set or len(have_set) != len(have):
        return None
    want_set = set(want)
    if [r for r in have if r in want_set] != [r for r in want if r in have_set]:
        return None
    gone = [r for r in have if r not in want_set]
    new = [(i, r) for i, r in enumerate(want, 1) if r not in have_set]
    if len(gone) + len(new) > EDIT_LIMIT:
        return None
    # Deleting first and then inserting in ascending final position lands every
    # new rule exactly where a rewrite would have put it.
    return [f"-D {chain} {_words(r.args())}" for r in gone if r is not None] + [
        f"-I {chain} {i} {_words(r.args())}" for i, r in new
    ]


def _rewrite(chain: str, seen: Sequence[Seen], want: Sequence[Rule]) -> list[str]:
    counters: dict[Rule, tuple[int, int]] = {}
    for s in seen:
        if s.rule is not None:
            counters.setdefault(s.rule, (s.packets, s.bytes))
    lines = []
    for rule in want:
        packets, byte_count = counters.get(rule, (0, 0))
        lines.append(f"[{packets}:{byte_count}] -A {chain} {_words(rule.args())}")
    return lines


def _words(args: Iterable[str]) -> str:
    return " ".join(quote(a) for a in args)
