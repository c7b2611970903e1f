"""A simulated fleet against one real Consul: how far one intent change reaches, how
fast, and at what cost.

Each simulated node runs ``--agents`` agents, each the real ``Runtime`` with its own
real ``ConsulStore`` (its own connections), around a trivial agent whose converge
only records which version it saw and when. The nodes are spread over
``--processes`` worker processes; one ``consul agent -dev`` on free loopback ports,
started here with limits raised for the load, serves them all.

Every node runs the app ``everywhere`` plus ``--apps`` - 1 others from a pool; the
app ``few`` runs on ``--few`` nodes. Each round writes a new active version of one
app and times, for every agent that runs it, the write -> its converge. Reported per
app: the per-agent latency (median, p99) and the time to the last agent (median and
worst over the rounds), the HTTP requests the agents made per write (plain reads,
blocking-query answers (those whose index moved, and all), writes), the reads and
wake-ups on nodes that do not run the app, Consul's CPU seconds per write, and the
worker processes' RSS.

    .venv/bin/python bench/fleet_bench.py --nodes 100 --rounds 5
    .venv/bin/python bench/fleet_bench.py --nodes 1000 --processes 4 --rounds 3
"""

from __future__ import annotations

import argparse
import logging
import multiprocessing as mp
import os
import queue
import resource
import signal
import statistics
import sys
import tempfile
import threading
import time
from collections import Counter
from collections.abc import Iterable
from dataclasses import dataclass
from multiprocessing.connection import Connection
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parent.parent
sys.path[:0] = [str(REPO), str(REPO / "tests")]

import structlog  # noqa: E402
from consul_agent import ConsulAgent, find_consul  # noqa: E402
from consul_requests import RequestCounts  # noqa: E402

from agents.runtime import Agent, Outcome, Runtime, RuntimeOptions  # noqa: E402
from intent import keys  # noqa: E402
from intent.store import AppIntent, IntentStore  # noqa: E402
from intent.store.consul import ConsulStore  # noqa: E402

SHA = "c" * 64
CLUSTER = "c"
EVERYWHERE, FEW = "everywhere", "few"


def consul_limits(max_files: int) -> str:
    """Every simulated agent connects from 127.0.0.1, so one client address carries the
    whole fleet's connections (Consul's default allows 200); Consul refuses a limit
    its file descriptors cannot honour."""
    return f"limits {{ http_max_conns_per_client = {max_files - 100} }}\n"


def raise_file_limit() -> int:
    """As many open files as the system allows this process (root may raise the hard
    limit too); Consul, started from here, inherits it."""
    _, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    wanted = 1 << 20
    try:
        resource.setrlimit(resource.RLIMIT_NOFILE, (wanted, max(hard, wanted)))
    except (ValueError, OSError):
        resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))
    return resource.getrlimit(resource.RLIMIT_NOFILE)[0]


def node_name(n: int) -> str:
    return f"sim{n:05d}"


def apps_of(n: int, apps: int, pool: int, few: int) -> list[str]:
    """The apps node ``n`` runs: ``everywhere``, ``apps - 1`` from the pool, and ``few``
    on the first ``few`` nodes."""
    mine = [EVERYWHERE] + [f"pool{(n + k) % pool:03d}" for k in range(apps - 1)]
    return mine + ([FEW] if n < few else [])


def config(version: int) -> dict[str, Any]:
    return {"versions": {str(version): {"state": "active", "sha256": SHA}}}


# -- the worker processes ------------------------------------------------------------------


class SimAgent(Agent):
    name = "sim"

    def __init__(self, label: str, node: str, events: Any) -> None:
        self.label = label
        self.node = node
        self.events = events

    def converge(self, intent: AppIntent) -> Outcome:
        assert intent.config is not None
        version = intent.config.active_version
        self.events.put((self.node, self.label, intent.app, version, time.time()))
        return Outcome.converged(version)


def worker(
    address: str,
    nodes: list[str],
    agents: int,
    events: Any,
    commands: Connection,
    switch_interval_s: float,
) -> None:
    structlog.configure(wrapper_class=structlog.make_filtering_bound_logger(logging.ERROR))
    threading.stack_size(1 << 20)  # thousands of threads; none recurses deeply
    # Hundreds of agents share this interpreter's lock, where a real agent has its own
    # process; at the default 5 ms, woken threads take the lock from each other long
    # before any finishes its few milliseconds of work.
    sys.setswitchinterval(switch_interval_s)
    host, port = address.rsplit(":", 1)
    counter = RequestCounts()
    runtimes = []
    for node in nodes:
        for k in range(agents):
            kv = ConsulStore(host, int(port))
            counter.attach(kv, node)
            runtime = Runtime(
                SimAgent(f"agent{k}", node, events),
                IntentStore(kv),
                RuntimeOptions(node=node, resync_interval_s=3600.0),
            )
            runtimes.append(runtime)
            threading.Thread(target=runtime.run, daemon=True).start()
    while True:
        command = commands.recv()
        if command == "counts":
            commands.send(counter.snapshot())
        elif command == "stop":
            for runtime in runtimes:
                runtime.stop()
            commands.send("stopped")
            return


# -- measuring -----------------------------------------------------------------------------


def cpu_seconds(pid: int) -> float:
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def rss_mb(pid: int) -> float:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024
    return 0.0


def percentile(values: list[float], p: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, round(p * (len(ordered) - 1)))]


@dataclass
class Fleet:
    consul_pid: int
    store: IntentStore
    events: Any
    pipes: list[Connection]
    processes: list[Any]

    def counts(self) -> Counter[tuple[str, str]]:
        total: Counter[tuple[str, str]] = Counter()
        for pipe in self.pipes:
            pipe.send("counts")
        for pipe in self.pipes:
            total.update(pipe.recv())
        return total

    def collect(self, app: str, version: str, expected: int, timeout: float) -> list[float]:
        """Times of the first converge on ``version`` of each expected agent."""
        seen: dict[tuple[str, str], float] = {}
        deadline = time.monotonic() + timeout
        while len(seen) < expected and (left := deadline - time.monotonic()) > 0:
            try:
                node, label, got_app, got_version, at = self.events.get(timeout=left)
            except queue.Empty:
                break
            if (got_app, got_version) == (app, version):
                seen.setdefault((node, label), at)
        return list(seen.values())

    def drain(self, quiet_s: float) -> None:
        """Wait until no converge was reported for ``quiet_s`` (stragglers, reports)."""
        while True:
            try:
                self.events.get(timeout=quiet_s)
            except queue.Empty:
                return


def seed(store: IntentStore, nodes: int, apps: int, pool: int, few: int) -> None:
    store.ensure_identity("fleet-bench")
    for app in [EVERYWHERE, FEW] + [f"pool{p:03d}" for p in range(pool)]:
        store.put_json(keys.config(app, CLUSTER), config(1))
        store.put_json(keys.deploy_config(app, CLUSTER), {"basedir": f"/srv/{app}"})
    for n in range(nodes):
        for app in apps_of(n, apps, pool, few):
            store.put_json(keys.node_app(node_name(n), app), {"cluster": CLUSTER})


def kinds(counts: Counter[tuple[str, str]], nodes: Iterable[str] | None = None) -> Counter[str]:
    wanted = None if nodes is None else set(nodes)
    out: Counter[str] = Counter()
    for (node, kind), n in counts.items():
        if wanted is None or node in wanted:
            out[kind] += n
    return out


def run_rounds(
    fleet: Fleet, app: str, runs_on: list[str], agents: int, rounds: int, first_version: int
) -> dict[str, float]:
    latencies: list[float] = []
    lasts: list[float] = []
    missing = 0
    delta: Counter[tuple[str, str]] = Counter()
    cpu = agents_cpu = 0.0
    others = None
    for r in range(rounds):
        fleet.drain(0.5)
        before, cpu_before = fleet.counts(), cpu_seconds(fleet.consul_pid)
        agents_before = sum(cpu_seconds(p.pid) for p in fleet.processes)
        version = first_version + r
        started = time.time()
        fleet.store.put_json(keys.config(app, CLUSTER), config(version))
        times = fleet.collect(app, str(version), len(runs_on) * agents, timeout=120)
        missing += len(runs_on) * agents - len(times)
        fleet.drain(1.0)  # reports written after the converge are part of the write's cost
        after = fleet.counts()
        cpu += cpu_seconds(fleet.consul_pid) - cpu_before
        agents_cpu += sum(cpu_seconds(p.pid) for p in fleet.processes) - agents_before
        delta.update(after)
        delta.subtract(before)
        if times:
            latencies += [t - started for t in times]
            lasts.append(max(times) - started)
    running = set(runs_on)
    others = {node for (node, _) in delta} - running
    every, unrelated = kinds(delta), kinds(delta, others)
    return {
        "p50": statistics.median(latencies) if latencies else float("nan"),
        "p99": percentile(latencies, 0.99) if latencies else float("nan"),
        "last_p50": statistics.median(lasts) if lasts else float("nan"),
        "last_max": max(lasts) if lasts else float("nan"),
        "missing": missing / rounds,
        "reads": every["read"] / rounds,
        "wake": every["wake"] / rounds,
        "blocking": (every["wake"] + every["idle"]) / rounds,
        "writes": every["write"] / rounds,
        "unrelated_reads": unrelated["read"] / rounds,
        "unrelated_wakes": unrelated["wake"] / rounds,
        "consul_cpu": cpu / rounds,
        "agents_cpu": agents_cpu / rounds,
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--nodes", type=int, default=100)
    parser.add_argument("--agents", type=int, default=3, help="agents per node")
    parser.add_argument("--apps", type=int, default=3, help="apps per node (few aside)")
    parser.add_argument("--pool", type=int, default=20, help="apps to draw the others from")
    parser.add_argument("--few", type=int, default=10, help="nodes that run the app 'few'")
    parser.add_argument("--processes", type=int, default=2)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--idle-s", type=float, default=5.0, help="idle period measured")
    parser.add_argument(
        "--switch-interval",
        type=float,
        default=sys.getswitchinterval(),
        help="the workers' GIL switch interval (s)",
    )
    args = parser.parse_args()

    binary = find_consul()
    if binary is None:
        sys.exit("no consul binary: run scripts/install-consul")
    # A TERM must still stop Consul and the workers (the finally below).
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(1))
    max_files = raise_file_limit()
    structlog.configure(wrapper_class=structlog.make_filtering_bound_logger(logging.ERROR))

    with tempfile.TemporaryDirectory() as tmp:
        consul = ConsulAgent(binary, Path(tmp), extra_hcl=consul_limits(max_files)).start()
        assert consul.proc is not None
        host, port = consul.http_addr.split(":")
        store = IntentStore(ConsulStore(host, int(port)))
        seed(store, args.nodes, args.apps, args.pool, args.few)
        names = [node_name(n) for n in range(args.nodes)]
        ctx = mp.get_context("spawn")
        events = ctx.Queue()
        pipes, processes = [], []
        for p in range(args.processes):
            mine, theirs = ctx.Pipe()
            proc = ctx.Process(
                target=worker,
                args=(
                    consul.http_addr,
                    names[p :: args.processes],
                    args.agents,
                    events,
                    theirs,
                    args.switch_interval,
                ),
                daemon=True,
            )
            proc.start()
            pipes.append(mine)
            processes.append(proc)
        fleet = Fleet(consul.proc.pid, store, events, pipes, processes)
        try:
            started = time.monotonic()
            expected = sum(
                len(apps_of(n, args.apps, args.pool, args.few)) for n in range(args.nodes)
            )
            seen: set[tuple[str, str, str]] = set()
            deadline = time.monotonic() + 600
            while len(seen) < expected * args.agents and time.monotonic() < deadline:
                try:
                    node, label, app, _, _ = events.get(timeout=5)
                except queue.Empty:
                    continue
                seen.add((node, label, app))
            startup = time.monotonic() - started
            fleet.drain(2.0)

            before, cpu_before = fleet.counts(), cpu_seconds(consul.proc.pid)
            time.sleep(args.idle_s)
            idle = kinds(fleet.counts()) - kinds(before)
            idle_cpu = (cpu_seconds(consul.proc.pid) - cpu_before) / args.idle_s

            few_nodes = [node_name(n) for n in range(min(args.few, args.nodes))]
            results = {
                EVERYWHERE: run_rounds(fleet, EVERYWHERE, names, args.agents, args.rounds, 2),
                FEW: run_rounds(fleet, FEW, few_nodes, args.agents, args.rounds, 2),
            }
            rss = [rss_mb(p.pid) for p in processes]
        finally:
            try:
                for pipe in pipes:
                    pipe.send("stop")
                for pipe in pipes:
                    if pipe.poll(30):
                        pipe.recv()
                for proc in processes:
                    proc.join(10)
                    if proc.is_alive():
                        proc.kill()
                store.close()
            finally:
                consul.stop()

    agents_total = args.nodes * args.agents
    print(
        f"fleet: {args.nodes} nodes x {args.agents} agents x {args.apps} apps "
        f"({agents_total} runtimes, {args.processes} processes); "
        f"all converged at start in {startup:.1f} s"
    )
    print(
        f"idle: {idle['idle'] / args.idle_s:.0f} blocking answers/s, "
        f"{idle['read'] / args.idle_s:.1f} reads/s, consul {idle_cpu * 100:.0f}% CPU"
    )
    print(
        f"RSS: {sum(rss):.0f} MB in {len(rss)} processes "
        f"({sum(rss) * 1024 / agents_total:.0f} kB per agent)"
    )
    header = (
        "app         agents  p50 ms  p99 ms  last p50  last max  missed  reads/w  "
        "wakes/w  blocking/w  writes/w  unrel.reads/w  unrel.wakes/w  CPU s/w consul  agents"
    )
    print(header)
    for app, r in results.items():
        agents = (args.nodes if app == EVERYWHERE else min(args.few, args.nodes)) * args.agents
        print(
            f"{app:<10} {agents:>7} {r['p50'] * 1000:>7.0f} {r['p99'] * 1000:>7.0f} "
            f"{r['last_p50']:>8.2f}s {r['last_max']:>8.2f}s {r['missing']:>7.0f} "
            f"{r['reads']:>8.0f} {r['wake']:>8.0f} {r['blocking']:>11.0f} "
            f"{r['writes']:>9.0f} {r['unrelated_reads']:>14.0f} {r['unrelated_wakes']:>14.0f} "
            f"{r['consul_cpu']:>14.2f} {r['agents_cpu']:>7.2f}"
        )


if __name__ == "__main__":
    main()
