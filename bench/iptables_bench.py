"""pp-iptables with 500 apps of 2 ports each on one node, in a network namespace.

    sudo .venv/bin/python bench/iptables_bench.py [--apps 500] [--repeat 21]

Times, as medians: applying everything from empty, a pass that changes nothing,
and a pass after one app's ports changed. Each is timed two ways: the agent's
own work (iptables-save, plan, iptables-restore --test and commit) and the
whole runtime pass (which also reads intent and writes reality to the store).
Every port has a public port, so the node carries 1000 filter and 2000 nat rules.
Needs root; the namespace is made and deleted by the run and the machine's own
rules are never touched.
"""

from __future__ import annotations

import argparse
import logging
import os
import secrets
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path

from agents import logs
from agents.iptables.agent import IptablesAgent
from agents.runtime import Runtime, RuntimeOptions
from agents.system.iptables import Iptables
from intent import keys
from intent.store import IntentStore
from intent.store.sqlite import SqliteStore

NODE = "bench1"
SHA = "e" * 64


@contextmanager
def namespace() -> Iterator[list[str]]:
    name = f"pp-bench-{secrets.token_hex(3)}"
    subprocess.run(["ip", "netns", "add", name], check=True)
    try:
        yield ["ip", "netns", "exec", name]
    finally:
        subprocess.run(["ip", "netns", "del", name], check=True)


def ports(i: int) -> list[dict[str, object]]:
    base = 10000 + 2 * i
    return [
        {"name": "http", "port": base, "public_port": base + 30000},
        {"name": "admin", "port": base + 1, "public_port": base + 30001, "protocol": "udp"},
    ]


def write_intent(store: IntentStore, apps: int) -> None:
    for i in range(apps):
        app = f"app{i:04d}"
        store.put_json(keys.node_app(NODE, app), {"cluster": "prod"})
        store.put_json(
            keys.config(app, "prod"), {"versions": {"1.0": {"state": "active", "sha256": SHA}}}
        )
        store.put_json(
            keys.deploy_config(app, "prod"), {"basedir": f"/srv/{app}", "ports": ports(i)}
        )


class Timed(IptablesAgent):
    """Records how long the agent's own share of each pass took."""

    last = 0.0

    def begin_pass(self, intents):  # type: ignore[no-untyped-def]
        started = time.perf_counter()
        super().begin_pass(intents)
        self.last = time.perf_counter() - started


def measure(
    store: IntentStore, prefix: list[str], before: Callable[[int], None], repeat: int
) -> tuple[list[float], list[float]]:
    agent = Timed(store, NODE, Iptables([*prefix, "iptables"], [*prefix, "iptables-restore"],
                                        [*prefix, "iptables-save"]))  # fmt: skip
    runtime = Runtime(agent, store, RuntimeOptions(node=NODE))
    own, whole = [], []
    for n in range(repeat):
        before(n)
        started = time.perf_counter()
        if not runtime.run_pass(force=True):
            sys.exit("bench: a pass did not converge")
        whole.append(time.perf_counter() - started)
        own.append(agent.last)
    return own, whole


def ms(values: list[float]) -> str:
    return f"{statistics.median(values) * 1000:.1f} ms"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--apps", type=int, default=500)
    parser.add_argument("--repeat", type=int, default=21)
    args = parser.parse_args()
    if os.geteuid() != 0:
        sys.exit("bench: needs root to create a network namespace")
    logs.configure("json", level=logging.WARNING)

    with tempfile.TemporaryDirectory() as tmp:
        store = IntentStore(SqliteStore(Path(tmp) / "intent.db"))
        write_intent(store, args.apps)

        empty: tuple[list[float], list[float]] = ([], [])
        for _ in range(max(3, args.repeat // 4)):
            with namespace() as prefix:
                own, whole = measure(store, prefix, lambda n: None, 1)
                empty[0].extend(own)
                empty[1].extend(whole)

        with namespace() as prefix:
            measure(store, prefix, lambda n: None, 1)
            saved = subprocess.run([*prefix, "iptables-save"], capture_output=True, text=True)
            rules = sum(1 for line in saved.stdout.splitlines() if line.startswith("-A PLATYPUS"))
            noop = measure(store, prefix, lambda n: None, args.repeat)

            def change_one(n: int) -> None:
                """Move one app's ports (and back on its next turn): both tables change."""
                i = n % args.apps
                moved = ports(i)
                if not (n // args.apps) % 2:
                    for number, p in enumerate(moved):
                        p["port"] = 50000 + 2 * i + number
                store.put_json(
                    keys.deploy_config(f"app{i:04d}", "prod"),
                    {"basedir": f"/srv/app{i:04d}", "ports": moved},
                )

            one = measure(store, prefix, change_one, args.repeat)

    print(f"{args.apps} apps x 2 ports, {rules} rules in our chains, medians:\n")
    print("| pass | agent's work (save, plan, restore) | whole runtime pass |")
    print("| --- | --- | --- |")
    for label, (own, whole) in (
        ("apply from empty", empty),
        ("no-op pass", noop),
        ("one-app change", one),
    ):
        print(f"| {label} | {ms(own)} | {ms(whole)} |")


if __name__ == "__main__":
    main()
