"""The agents under faults, measured on one host: Consul outages, a Consul leader lost
mid-deploy, kill -9 chaos, and how long SIGTERM takes to end an agent.

    .venv/bin/python bench/faults_bench.py outage [--outages 7,20,40] [--runs 3]
    .venv/bin/python bench/faults_bench.py leader [--runs 5]
    .venv/bin/python bench/faults_bench.py chaos [--deploys 100] [--kills 200]
    .venv/bin/python bench/faults_bench.py sigterm [--runs 5]

Every scenario runs the real pp-preparer and pp-setlive (tests/fault_support.py)
against a private runsvdir, with the sample HTTP app probed every 20 ms.

- outage: one persistent Consul server (data kept across restarts) is stopped for
  each outage length, then started again; a deploy is written as soon as it takes
  writes. Reported: requests the app failed during the outage, seconds from the
  store's return to each agent logging ``store.reachable``, and seconds from that
  deploy to the new version answering. An agent that exits ends the run.
- leader: a three-server cluster and a client agent (the agents talk to the client
  agent); deploys without a fault, then deploys during which the leader is killed at
  a random moment. Reported: deploy times, the election, the delay added.
- chaos: tests/test_faults_chaos.py at a larger scale (PP_CHAOS_SEED replays a run).
- sigterm: seconds from SIGTERM to exit, idle and busy (pp-preparer in a download
  that stalls, pp-setlive in a health gate that would take a minute).

Needs root (the app runs as nobody through chpst -u), runit and Consul.
"""

from __future__ import annotations

import argparse
import json
import os
import random
import shutil
import statistics
import sys
import tempfile
import time
import urllib.request
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from datetime import datetime
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
sys.path[:0] = [str(REPO), str(REPO / "tests")]

from consul_agent import ConsulCluster, ConsulNode, find_consul  # noqa: E402
from fault_support import (  # noqa: E402
    AGENTS,
    Node,
    Prober,
    answer,
    chaos,
    node,
    retrying,
    wait_until,
)
from preparer_support import Behaviour, artifact_server, tree_tarball  # noqa: E402
from runit_support import Runsvdir, start_runsvdir, stop_runsvdir  # noqa: E402

APP = "hello"


def consul_binary() -> str:
    binary = find_consul()
    if binary is None:
        raise SystemExit("no consul binary: run scripts/install-consul or set CONSUL_BIN")
    return binary


@contextmanager
def runsvdir() -> Iterator[Runsvdir]:
    handle = start_runsvdir()
    try:
        yield handle
    finally:
        stop_runsvdir(handle)


def first_deploy(n: Node) -> None:
    n.assign(APP)
    n.deploy(APP, "1")
    n.start()
    if not wait_until(lambda: n.converged(APP, "1"), 90):
        raise SystemExit(f"the first deploy did not converge:\n{n.describe()}")


def next_version(n: Node) -> str:
    return str(int(n.versions[APP][-1]) + 1)


def answers(n: Node, version: str) -> bool:
    return answer(n.ports[APP]) == version


def switched(n: Node, version: str) -> bool:
    layout = n.layout(APP)
    return layout.version_of(layout.current) == version


def logged(n: Node, agent: str, event: str, since: float) -> list[float]:
    """Wall-clock times at which ``agent`` logged ``event`` after ``since``."""
    times = []
    for line in n.log_path(agent).read_text(errors="replace").splitlines():
        if not line.startswith("{"):
            continue
        entry = json.loads(line)
        if entry.get("event") == event:
            at = datetime.fromisoformat(entry["timestamp"].replace("Z", "+00:00")).timestamp()
            if at >= since:
                times.append(at)
    return times


def each(values: list[float]) -> str:
    return ", ".join(f"{v:.1f}" for v in values)


def median(values: list[float]) -> str:
    return f"{statistics.median(values):.1f}" if values else "-"


# -- outage -------------------------------------------------------------------------------


@dataclass
class OutageRun:
    asked: int
    """Requests made to the app while the store was down."""
    failed: int
    """Of those, the ones the app failed."""
    noticed: list[float]
    """Per agent: seconds from the store electing itself leader again to the agent
    logging ``store.reachable``."""
    live: float
    """Seconds from a deploy written as the store returned to the new version answering."""


def one_outage(n: Node, server: ConsulNode, length: float) -> OutageRun:
    """Stop the server for ``length`` seconds, start it again with its data, and write
    a deploy as soon as it takes writes."""
    prober = Prober(n.ports)
    prober.start()
    down = time.time()
    server.stop()
    time.sleep(length)
    server.start().wait_for_leader()
    back = time.time()
    version = next_version(n)
    if not retrying(lambda: n.deploy(APP, version)):
        raise SystemExit(f"the store took no write within 30 s of its return:\n{n.describe()}")
    written = time.monotonic()
    if not wait_until(lambda: answers(n, version), 120, 0.01):
        raise SystemExit(f"{version} did not go live:\n{n.describe()}")
    live = time.monotonic() - written
    prober.finish()
    if exited := [agent for agent, p in n.processes.items() if p.poll() is not None]:
        raise SystemExit(f"an agent exited during the outage: {exited}\n{n.describe()}")
    if not wait_until(lambda: n.converged(APP, version), 60):
        raise SystemExit(f"{version} did not converge:\n{n.describe()}")
    noticed = []
    for agent in AGENTS:
        seen = logged(n, agent, "store.reachable", down)
        noticed.append(seen[0] - back if seen else float("nan"))
    during = [a for a in prober.answers[APP] if down <= a.at <= back]
    return OutageRun(len(during), len(prober.failed(APP, down, back)), noticed, live)


def outage(outages: list[float], runs: int) -> None:
    with runsvdir() as handle:
        server = ConsulNode(consul_binary(), handle.root / "consul", "server1", server=True)
        server.start().wait_for_leader()
        try:
            with node(handle, f"consul://{server.http_addr}") as n:
                first_deploy(n)
                print("| outage | runs | requests failed / made during the outage | store back -> "
                      "agent notices: median (each) | deploy written as the store returned -> "
                      "new version answers: median (each) |")  # fmt: skip
                print("|---:|---:|---:|---|---|")
                for length in outages:
                    results = [one_outage(n, server, length) for _ in range(runs)]
                    failed = sum(r.failed for r in results)
                    asked = sum(r.asked for r in results)
                    noticed = [t for r in results for t in r.noticed]
                    live = [r.live for r in results]
                    print(
                        f"| {length:g} s | {runs} | {failed} / {asked} | {median(noticed)} s "
                        f"({each(noticed)}) | {median(live)} s ({each(live)}) |"
                    )
        finally:
            server.stop()


# -- leader loss --------------------------------------------------------------------------


def deploy_time(n: Node, cluster: ConsulCluster | None, rng: random.Random) -> tuple[float, float]:
    """Seconds from writing a deploy to the new version answering; with ``cluster``,
    the leader is killed at a random moment in the first second. Also the election
    (kill -> a new leader seen), 0 without a fault."""
    version = next_version(n)
    n.deploy(APP, version)
    written = time.monotonic()
    election = 0.0
    if cluster is not None:
        time.sleep(rng.uniform(0, 1.0))
        leader = cluster.leader()
        killed = time.monotonic()
        leader.stop(kill=True)
        if not wait_until(
            lambda: cluster.client.leader() not in ("", leader.server_addr), 60, 0.01
        ):
            raise SystemExit("no new leader within 60 s of killing the old one")
        election = time.monotonic() - killed
    if not wait_until(lambda: answers(n, version), 120, 0.01):
        raise SystemExit(f"{version} did not go live:\n{n.describe()}")
    took = time.monotonic() - written
    if not wait_until(lambda: n.converged(APP, version), 120):
        raise SystemExit(f"{version} did not converge:\n{n.describe()}")
    if cluster is not None:
        # Back as a follower, for the next round: a round that killed the leader while
        # this one had not rejoined would leave two servers short of a quorum.
        leader.start()
        if not wait_until(lambda: voters(cluster.client) == cluster.count, 60, 0.1):
            raise SystemExit(f"{leader.name} did not rejoin the cluster within 60 s")
    return took, election


def voters(agent: ConsulNode) -> int:
    """The raft peers the cluster has, as ``agent`` sees them (0 when it cannot tell)."""
    try:
        with urllib.request.urlopen(f"http://{agent.http_addr}/v1/status/peers", timeout=2) as r:
            return len(json.loads(r.read()) or [])
    except (OSError, ValueError):
        return 0


def leader(runs: int) -> None:
    rng = random.Random(runs)
    with runsvdir() as handle:
        cluster = ConsulCluster(consul_binary(), handle.root / "consul").start()
        try:
            with node(handle, f"consul://{cluster.client.http_addr}") as n:
                first_deploy(n)
                calm = [deploy_time(n, None, rng)[0] for _ in range(runs)]
                faulty = [deploy_time(n, cluster, rng) for _ in range(runs)]
                problems = n.problems()
        finally:
            cluster.stop()
    took = [t for t, _ in faulty]
    elections = [e for _, e in faulty]
    print("| deploy -> new version answers | median | each |")
    print("|---|---:|---|")
    for name, values in (
        ("no fault", calm),
        ("leader killed mid-deploy", took),
        ("election (kill -> new leader seen)", elections),
    ):
        print(f"| {name} | {median(values)} s | {each(values)} |")
    added = statistics.median(took) - statistics.median(calm)
    print(f"\nadded delay (median): {added:.1f} s; left half done: {problems or 'nothing'}")


# -- chaos --------------------------------------------------------------------------------


def chaos_run(deploys: int, kills: int) -> None:
    seed = int(os.environ.get("PP_CHAOS_SEED") or random.randrange(1 << 32))
    with runsvdir() as handle, node(handle, f"sqlite://{handle.root / 'n1' / 'store.db'}") as n:
        run = chaos(n, seed, deploys, kills, ("alpha", "beta"))
        print(run.summary())
        print(f"left half done: {n.problems() or 'nothing'}")


# -- SIGTERM ------------------------------------------------------------------------------


def idle(n: Node, agent: str, since: float) -> bool:
    return bool(logged(n, agent, "converge.converged", since))


def sigterm(runs: int) -> None:
    results: dict[str, list[float | None]] = {}
    with runsvdir() as handle, node(handle, f"sqlite://{handle.root / 'n1' / 'store.db'}") as n:
        first_deploy(n)
        for _ in range(runs):
            for agent, took in n.stop().items():
                results.setdefault(f"{agent}, idle", []).append(took)
            started = time.time()
            n.start()
            # Idle: each agent has finished its first pass (every app converged).
            if not wait_until(lambda s=started: all(idle(n, a, s) for a in AGENTS), 60):
                raise SystemExit(f"the agents did not settle after a start:\n{n.describe()}")
            time.sleep(0.5)
        # setlive busy: a version whose health check fails, with a gate of a minute.
        n.stop("setlive")
        for _ in range(runs):
            version = next_version(n)
            n.publish(APP, version, unhealthy=True)
            n.deploy(APP, version)
            assert wait_until(lambda v=version: n.report("preparer", APP) == ("converged", v), 60)
            n.start("setlive")
            assert wait_until(lambda v=version: switched(n, v), 60)
            time.sleep(0.5)  # inside the gate
            results.setdefault("setlive, in a health gate", []).append(n.stop("setlive")["setlive"])
        # preparer busy: a download that stalls for a minute.
        repo = handle.root / "stall-repo"
        (repo / "slow").mkdir(parents=True)
        sha = tree_tarball(repo / "slow" / "slow_1.tar.gz", {"bin/launch": b"#!/bin/sh\n"})
        with artifact_server(repo) as server:
            server.behaviours["/slow/slow_1.tar.gz"] = Behaviour(stall_s=60, stall_times=10**6)
            for run in range(runs):
                n.store.put_json(f"nodes/n1/slow{run}", {"cluster": "c"})
                n.store.put_json(
                    f"clusters/slow{run}/c/config",
                    {"versions": {"1": {"state": "active", "sha256": sha,
                                        "url": f"{server.url}/slow/slow_1.tar.gz"}}},
                )  # fmt: skip
                n.store.put_json(
                    f"clusters/slow{run}/c/deploy_config",
                    {"basedir": str(n.root / "apps" / f"slow{run}"), "run_as": "nobody"},
                )
                requests = server.count("/slow/slow_1.tar.gz")
                n.stop("preparer")
                n.start("preparer")
                assert wait_until(lambda r=requests: server.count("/slow/slow_1.tar.gz") > r, 30)
                time.sleep(0.5)
                results.setdefault("preparer, in a stalled download", []).append(
                    n.stop("preparer")["preparer"]
                )
                n.start("preparer")
    print("| SIGTERM -> exit | runs | median | max |")
    print("|---|---:|---:|---:|")
    for case, values in results.items():
        done = [v for v in values if v is not None]
        worst = "did not exit" if len(done) < len(values) else f"{max(done):.2f} s"
        print(f"| {case} | {len(values)} | {statistics.median(done):.2f} s | {worst} |")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n", 1)[0])
    sub = parser.add_subparsers(dest="scenario", required=True)
    p = sub.add_parser("outage")
    p.add_argument("--outages", default="7,20,40", help="seconds, comma-separated")
    p.add_argument("--runs", type=int, default=3)
    p = sub.add_parser("leader")
    p.add_argument("--runs", type=int, default=5)
    p = sub.add_parser("chaos")
    p.add_argument("--deploys", type=int, default=100)
    p.add_argument("--kills", type=int, default=200)
    p = sub.add_parser("sigterm")
    p.add_argument("--runs", type=int, default=5)
    args = parser.parse_args()
    if os.geteuid() != 0 or shutil.which("runsvdir") is None:
        raise SystemExit("faults_bench: needs root and runit")
    tempfile.tempdir = "/tmp"
    if args.scenario == "outage":
        outage([float(s) for s in args.outages.split(",")], args.runs)
    elif args.scenario == "leader":
        leader(args.runs)
    elif args.scenario == "chaos":
        chaos_run(args.deploys, args.kills)
    else:
        sigterm(args.runs)


if __name__ == "__main__":
    main()
