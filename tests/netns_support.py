"""Network namespaces made by a test, for pp-iptables against real iptables.

Every iptables command runs through ``ip netns exec <namespace>``; the machine's own
rules, routes and interfaces are never touched. Tests skip where root or namespaces
are missing, and fail instead when PP_REQUIRE_NETNS=1 (CI sets it).
"""

from __future__ import annotations

import os
import secrets
import shutil
import subprocess
from dataclasses import dataclass

import pytest

TOOLS = ("ip", "iptables", "iptables-save", "iptables-restore", "ip6tables")


def missing(reason: str) -> None:
    """Skip where root or namespaces are absent; fail where CI promises them."""
    if os.environ.get("PP_REQUIRE_NETNS") == "1":
        pytest.fail(f"{reason}, but PP_REQUIRE_NETNS=1", pytrace=False)
    pytest.skip(reason)


def require_netns() -> None:
    """Root, the tools, and iptables that work inside a namespace made for the check."""
    if os.geteuid() != 0:
        missing("needs root to create network namespaces")
    for tool in TOOLS:
        if shutil.which(tool) is None:
            missing(f"{tool} not found (apt-get install iptables iproute2)")
    probe = Namespace.create()
    try:
        done = subprocess.run(probe.argv("iptables-save"), capture_output=True, text=True)
        if done.returncode != 0:
            missing(f"iptables does not work in a namespace: {done.stderr.strip()}")
    finally:
        probe.delete()


@dataclass
class Namespace:
    """One network namespace; every command given to it runs inside it."""

    ns: str

    @classmethod
    def create(cls) -> Namespace:
        name = f"pp-{secrets.token_hex(4)}"
        made = subprocess.run(["ip", "netns", "add", name], capture_output=True, text=True)
        if made.returncode != 0:
            missing(f"cannot create a network namespace: {made.stderr.strip()}")
        return cls(name)

    def delete(self) -> None:
        subprocess.run(["ip", "netns", "del", self.ns], check=False)

    def argv(self, *args: str) -> list[str]:
        return ["ip", "netns", "exec", self.ns, *args]

    def run(self, *args: str, check: bool = True) -> str:
        done = subprocess.run(self.argv(*args), capture_output=True, text=True, timeout=30)
        if check and done.returncode != 0:
            raise AssertionError(f"{' '.join(args)}: {done.stderr.strip()}")
        return done.stdout

    def save(self, family: str = "iptables") -> str:
        """``iptables-save -c`` without its time-stamped comment lines."""
        text = self.run(f"{family}-save", "-c")
        return "".join(line for line in text.splitlines(True) if not line.startswith("#"))

    def flags(self, family: str = "iptables") -> list[str]:
        """pp-iptables' flag that runs its iptables commands inside this namespace."""
        return ["--iptables", " ".join(self.argv(family))]


def ours(text: str) -> list[str]:
    return [line for line in text.splitlines() if "PLATYPUS" in line]


def theirs(text: str) -> list[str]:
    return [line for line in text.splitlines() if "PLATYPUS" not in line]
