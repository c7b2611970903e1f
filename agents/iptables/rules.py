"""The rules pp-iptables owns, as data: how they are written and how they are read back.

Rules are compared as data, not as text: ``iptables-save`` normalises what it
prints (``-m tcp`` appears, quotes come and go, legacy and nft differ in
details), so a byte comparison would see a change on every pass on some hosts.
A rule in our chains that does not read back as one of ours is treated as
foreign to the desired state and rewritten away.
"""

from __future__ import annotations

import itertools
import re
from dataclasses import dataclass
from typing import Literal, NamedTuple

from agents.system.iptables import tokens

Protocol = Literal["tcp", "udp"]
Table = Literal["filter", "nat"]

COMMENT_PREFIX = "platypus"
JUMP_COMMENT = "platypus"
_COMMENT = re.compile(r"platypus app=(\S+) port=(\S+)")


@dataclass(frozen=True)
class Chain:
    table: Table
    name: str
    parent: str
    """The built-in chain that jumps here."""


INPUT = Chain("filter", "PLATYPUS-INPUT", "INPUT")
PREROUTING = Chain("nat", "PLATYPUS-PREROUTING", "PREROUTING")
OUTPUT = Chain("nat", "PLATYPUS-OUTPUT", "OUTPUT")
"""Connections made on the host itself skip PREROUTING; OUTPUT maps those."""

CHAINS = (INPUT, PREROUTING, OUTPUT)
BY_NAME = {c.name: c for c in CHAINS}
TABLES: tuple[Table, ...] = ("filter", "nat")
WATCHED = frozenset({c.name for c in CHAINS} | {c.parent for c in CHAINS})
"""The chains whose rules we read: ours, and the built-ins that must jump to them."""


class Rule(NamedTuple):
    """One rule of ours.

    In ``PLATYPUS-INPUT`` it accepts ``dport``; in the nat chains it redirects
    ``dport`` (the public port) to ``to_port`` (the app's port), and only for
    traffic addressed to this host, so the host's own outbound connections to
    that port elsewhere are left alone. A tuple, because a node holds thousands
    and a pass compares and hashes them all.
    """

    chain: str
    app: str
    port_name: str
    protocol: Protocol
    dport: int
    to_port: int | None = None

    @property
    def comment(self) -> str:
        return f"{COMMENT_PREFIX} app={self.app} port={self.port_name}"

    @property
    def key(self) -> tuple[Protocol, int]:
        """What the rule occupies on the host: the port the traffic arrives on."""
        return self.protocol, self.dport

    def args(self) -> tuple[str, ...]:
        match = ("-p", self.protocol, "-m", self.protocol, "--dport", str(self.dport))
        comment = ("-m", "comment", "--comment", self.comment)
        if self.to_port is None:
            return match + comment + ("-j", "ACCEPT")
        local = ("-m", "addrtype", "--dst-type", "LOCAL")
        return match + local + comment + ("-j", "REDIRECT", "--to-ports", str(self.to_port))


def jump_args(chain: Chain) -> tuple[str, ...]:
    return ("-m", "comment", "--comment", JUMP_COMMENT, "-j", chain.name)


def is_jump(args: tuple[str, ...], chain: Chain) -> bool:
    """Any rule of the parent that jumps to ``chain`` counts, wherever it sits: an
    administrator who moved it below a blocklist meant to."""
    return any(a == "-j" and b == chain.name for a, b in itertools.pairwise(args))


_MATCHES = {"tcp", "udp", "comment", "addrtype"}
_VALUED = {
    "-p": "protocol",
    "--protocol": "protocol",
    "--dport": "dport",
    "--destination-port": "dport",
    "--comment": "comment",
    "--dst-type": "dst_type",
    "-j": "target",
    "--jump": "target",
    "--to-ports": "to_ports",
}


_CANONICAL = re.compile(
    r"-p (?P<protocol>tcp|udp) -m (?:tcp|udp) --dport (?P<dport>\d+)"
    r"(?: -m addrtype --dst-type (?P<dst_type>LOCAL))?"
    r' -m comment --comment "(?P<comment>[^"\\]*)"'
    r" -j (?P<target>ACCEPT|REDIRECT)(?: --to-ports (?P<to_ports>\d+))?"
)
"""Our rules exactly as ``iptables-save`` prints them: the fast path for a busy node."""


def parse_line(chain: str, text: str) -> Rule | None:
    """Read back a rule from its saved text, splitting it into words only when it
    is not printed in the usual form."""
    match = _CANONICAL.fullmatch(text)
    if match is not None:
        return _build(chain, {k: v for k, v in match.groupdict().items() if v is not None})
    return parse_rule(chain, tokens(text))


def parse_rule(chain: str, args: tuple[str, ...]) -> Rule | None:
    """Read back a rule of ours, or None when the rule is not one we would write."""
    fields: dict[str, str] = {}
    i = 0
    while i < len(args):
        word = args[i]
        if i + 1 >= len(args):
            return None
        value = args[i + 1]
        if word in ("-m", "--match"):
            if value not in _MATCHES:
                return None
        elif word in _VALUED and _VALUED[word] not in fields:
            fields[_VALUED[word]] = value
        else:
            return None  # negations, addresses, interfaces: not a rule we write
        i += 2
    return _build(chain, fields)


def _build(chain: str, fields: dict[str, str]) -> Rule | None:
    if chain not in BY_NAME:
        return None
    comment = _COMMENT.fullmatch(fields.get("comment", ""))
    protocol: Protocol = "udp" if fields.get("protocol") == "udp" else "tcp"
    dport = _port(fields.get("dport"))
    if comment is None or fields.get("protocol") not in ("tcp", "udp") or dport is None:
        return None
    app, port_name = comment.groups()
    if BY_NAME[chain].table == "filter":
        if fields.get("target") != "ACCEPT" or "dst_type" in fields or "to_ports" in fields:
            return None
        return Rule(chain, app, port_name, protocol, dport)
    to_port = _port(fields.get("to_ports"))
    if fields.get("target") != "REDIRECT" or fields.get("dst_type") != "LOCAL" or to_port is None:
        return None
    return Rule(chain, app, port_name, protocol, dport, to_port)


def _port(text: str | None) -> int | None:
    if text is None or not text.isdigit():
        return None
    number = int(text)
    return number if 1 <= number <= 65535 else None
