"""What one agent's wake-up costs on Consul, in CPU and time, and what the HTTP client
takes of it.

Against a ``consul agent -dev`` on loopback:

- per request: the CPU this process spends on one GET and one PUT of a small value,
  through the store's client (py-consul on urllib3, intent/store/consul_http.py) and,
  as the baseline in the same run, through py-consul's stock client (requests);
- per wake-up: one real ``Runtime`` with a trivial agent (as in bench/fleet_bench.py)
  watching its node; a new version of its app is written and the process's CPU is
  measured from the write to the agent's report (the blocking query's answer, the
  identity and previous-report reads, the converge, the report), with either client.

Medians over ``--rounds``. Usage:

    .venv/bin/python bench/wakeup_bench.py --rounds 300
"""

from __future__ import annotations

import argparse
import logging
import queue
import statistics
import sys
import tempfile
import threading
import time
from collections.abc import Callable
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
sys.path[:0] = [str(REPO), str(REPO / "tests"), str(REPO / "bench")]

import consul  # noqa: E402
import structlog  # noqa: E402
from consul_agent import ConsulAgent, find_consul  # noqa: E402
from fleet_bench import CLUSTER, EVERYWHERE, SimAgent, config, node_name, seed  # noqa: E402

from agents.runtime import Runtime, RuntimeOptions  # noqa: E402
from intent import keys  # noqa: E402
from intent.store import IntentStore  # noqa: E402
from intent.store.consul import ConsulStore  # noqa: E402

CLIENTS = ("urllib3", "requests")


def store(address: str, client: str) -> ConsulStore:
    host, port = address.split(":")
    kv = ConsulStore(host, int(port))
    if client == "requests":
        kv._client = consul.Consul(host=host, port=int(port))
    return kv


def cpu_us(operation: Callable[[], object], count: int) -> float:
    started = time.process_time()
    for _ in range(count):
        operation()
    return (time.process_time() - started) / count * 1e6


def per_request(address: str, rounds: int) -> dict[tuple[str, str], float]:
    results = {}
    for client in CLIENTS:
        kv = store(address, client)
        kv.put("bench/identity", b'{"id": "bench"}')
        for name, operation in (
            ("GET", lambda kv=kv: kv.get("bench/identity")),
            ("PUT", lambda kv=kv: kv.put("bench/report", b'{"status": "converged"}')),
        ):
            cpu_us(operation, 50)  # connections open, caches warm
            runs = [cpu_us(operation, max(1, rounds // 5)) for _ in range(5)]
            results[(client, name)] = statistics.median(runs)
        kv.close()
    return results


def per_wakeup(address: str, client: str, rounds: int) -> tuple[float, float]:
    """Median CPU (ms) per wake-up, and median write -> converge (ms)."""
    admin = IntentStore(store(address, "urllib3"))
    node = node_name(0)
    seed(admin, 1, 1, 1, 0)
    events: queue.Queue[tuple[str, str, str, str, float]] = queue.Queue()
    runtime = Runtime(
        SimAgent("bench", node, events),
        IntentStore(store(address, client)),
        RuntimeOptions(node=node, resync_interval_s=3600.0),
    )
    threading.Thread(target=runtime.run, daemon=True).start()
    events.get(timeout=30)
    time.sleep(0.5)
    writer = store(address, client)  # the writer's own PUT is taken out below
    put_cpu = statistics.median(
        cpu_us(lambda: writer.put("bench/writer", b"{}"), 20) for _ in range(3)
    )
    cpu, latency = [], []
    version = 100 + int(time.time()) % 1000 * 1000
    for _ in range(rounds):
        version += 1
        started_cpu, started = time.process_time(), time.time()
        admin.put_json(keys.config(EVERYWHERE, CLUSTER), config(version))
        while (seen := events.get(timeout=30))[3] != str(version):
            pass
        time.sleep(0.03)  # the report, written after the converge
        cpu.append((time.process_time() - started_cpu) * 1000 - put_cpu / 1000)
        latency.append((seen[4] - started) * 1000)
    runtime.stop()
    return statistics.median(cpu), statistics.median(latency)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--rounds", type=int, default=300)
    args = parser.parse_args()
    binary = find_consul()
    if binary is None:
        sys.exit("no consul binary: run scripts/install-consul")
    structlog.configure(wrapper_class=structlog.make_filtering_bound_logger(logging.ERROR))
    with tempfile.TemporaryDirectory() as tmp:
        agent = ConsulAgent(binary, Path(tmp)).start()
        try:
            requests_cost = per_request(agent.http_addr, args.rounds)
            wakeups = {c: per_wakeup(agent.http_addr, c, args.rounds) for c in CLIENTS}
        finally:
            agent.stop()
    print("CPU per request, median (us)")
    for name in ("GET", "PUT"):
        new, old = requests_cost[("urllib3", name)], requests_cost[("requests", name)]
        print(f"  {name}: urllib3 {new:.0f}, requests {old:.0f} ({old / new:.2f}x)")
    print("one agent's wake-up, median: CPU ms / write -> converge ms")
    for client, (cpu, latency) in wakeups.items():
        print(f"  {client}: {cpu:.2f} / {latency:.1f}")


if __name__ == "__main__":
    main()
