"""A node's agents while Consul fails under them: real Consul servers, a private
runsvdir, the real pp-preparer and pp-setlive, the sample HTTP app.

- A single persistent server stopped and restarted with its data: the app keeps
  answering, the agents stay up and say so once, and a deploy written when the
  store is back goes live.
- A three-server cluster whose leader is killed in the middle of a deploy: the
  agents talk to a client agent (as on a production host), the deploy waits out
  the election and completes, and nothing is left half done.

The figures (outages of 7 to 40 s, the delay an election adds) come from
bench/faults_bench.py and are in docs/reliability.md.
"""

from __future__ import annotations

import json
import time
from collections.abc import Iterator

import pytest
from consul_agent import ConsulCluster, ConsulNode
from fault_support import Node, Prober, node, retrying, wait_until
from runit_support import Runsvdir, require_root, start_runsvdir, stop_runsvdir

pytestmark = pytest.mark.consul

OUTAGE_S = 4.0


@pytest.fixture
def runsv() -> Iterator[Runsvdir]:
    require_root()
    handle = start_runsvdir()
    try:
        yield handle
    finally:
        stop_runsvdir(handle)


def events(n: Node, agent: str) -> list[str]:
    lines = n.log_path(agent).read_text().splitlines()
    return [json.loads(line)["event"] for line in lines if line.startswith("{")]


def only_switches(prober: Prober, app: str) -> None:
    """The app failed requests only while it switched versions."""
    others = [g for g in prober.gaps(app) if not g.switch]
    assert others == [], others


def test_a_store_outage_keeps_the_app_serving_and_a_deploy_after_it_goes_live(
    consul_bin: str, runsv: Runsvdir
) -> None:
    server = ConsulNode(consul_bin, runsv.root / "consul", "server1", server=True).start()
    try:
        server.wait_for_leader()
        with node(runsv, f"consul://{server.http_addr}") as n:
            n.assign("hello")
            n.deploy("hello", "1")
            n.start()
            assert wait_until(lambda: n.converged("hello", "1"), 60), n.describe()
            prober = Prober(n.ports)
            prober.start()

            down = time.time()
            server.stop()
            time.sleep(OUTAGE_S)
            assert all(p.poll() is None for p in n.processes.values()), "an agent exited"
            server.start()
            server.wait_for_leader()
            back = time.time()
            assert retrying(lambda: n.deploy("hello", "2"))
            assert wait_until(lambda: n.converged("hello", "2"), 60), n.describe()
            prober.finish()

            assert prober.failed("hello", down, back) == [], "the app failed during the outage"
            only_switches(prober, "hello")
            assert n.problems() == []
            for agent in ("preparer", "setlive"):
                log = events(n, agent)
                assert log.count("store.unreachable") == 1, (agent, log)
                assert log.index("store.unreachable") < len(log) - log[::-1].index(
                    "store.reachable"
                )
    finally:
        server.stop()


def test_losing_the_consul_leader_mid_deploy_delays_the_deploy_which_completes(
    consul_bin: str, runsv: Runsvdir
) -> None:
    cluster = ConsulCluster(consul_bin, runsv.root / "consul").start()
    try:
        with node(runsv, f"consul://{cluster.client.http_addr}") as n:
            n.assign("hello")
            n.deploy("hello", "1")
            n.start()
            assert wait_until(lambda: n.converged("hello", "1"), 60), n.describe()
            prober = Prober(n.ports)
            prober.start()

            n.deploy("hello", "2")
            # Mid-deploy: the new version is being installed or switched to.
            installs = n.layout("hello").installs
            assert wait_until(lambda: any(p.name.endswith("_2") for p in installs.iterdir()), 30)
            cluster.leader().stop(kill=True)
            assert wait_until(lambda: n.converged("hello", "2"), 60), n.describe()
            prober.finish()

            assert all(p.poll() is None for p in n.processes.values()), "an agent exited"
            only_switches(prober, "hello")
            assert n.problems() == []
    finally:
        cluster.stop()
