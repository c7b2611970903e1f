"""How fast each intent store tells a watcher about a change, and how fast it writes.

For each store (the embedded SQLite store and a real ``consul agent -dev`` on loopback):

- watch wake-up: a thread blocks in ``wait`` on a prefix; the main thread writes a key
  under it and times until ``wait`` returns (target: within ~100 ms);
- idle watch: the CPU this process spends while a ``wait`` blocks with nothing written;
- CAS write: read-modify-write of one key with compare-and-set, one writer;
- apps_for_node: reading a node's whole intent with ``--apps`` apps assigned.

Medians and p95 over ``--rounds``. Usage:

    .venv/bin/python bench/store_bench.py --rounds 50 --apps 100
"""

from __future__ import annotations

import argparse
import json
import random
import statistics
import sys
import tempfile
import threading
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
sys.path[:0] = [str(REPO), str(REPO / "tests")]

from consul_agent import ConsulAgent, find_consul  # noqa: E402

from intent import keys  # noqa: E402
from intent.store import IntentStore, open_store  # noqa: E402

SHA = "c" * 64


def summary(samples: list[float]) -> str:
    ms = sorted(s * 1000 for s in samples)
    p95 = ms[min(len(ms) - 1, round(0.95 * (len(ms) - 1)))]
    return f"median {statistics.median(ms):7.2f} ms   p95 {p95:7.2f} ms"


def watch_wakeups(store: IntentStore, rounds: int) -> list[float]:
    prefix = store.prefix + "bench/watch/"
    samples = []
    for i in range(rounds):
        token = store.kv.wait([prefix], None, 0)
        woke = threading.Event()

        def watcher(token: tuple[int, ...] = token, woke: threading.Event = woke) -> None:
            store.kv.wait([prefix], token, 10)
            woke.set()

        thread = threading.Thread(target=watcher)
        thread.start()
        time.sleep(random.uniform(0.2, 0.3))  # let it block; land anywhere in a poll period
        started = time.perf_counter()
        store.kv.put(prefix + "key", str(i).encode())
        woke.wait(10)
        samples.append(time.perf_counter() - started)
        thread.join()
    return samples


def idle_cpu_ms_per_s(store: IntentStore, seconds: float = 5.0) -> float:
    """CPU milliseconds per second this process spends while one watch waits idle."""
    prefix = store.prefix + "bench/idle/"
    token = store.kv.wait([prefix], None, 0)
    started = time.process_time()
    store.kv.wait([prefix], token, seconds)
    return (time.process_time() - started) * 1000 / seconds


def cas_writes(store: IntentStore, rounds: int) -> list[float]:
    key = "bench/cas"
    store.put_json(key, {"n": 0})
    samples = []
    for _ in range(rounds):
        started = time.perf_counter()
        current = store.get_raw(key)
        assert current is not None
        value = json.loads(current.value)
        assert store.put_json(key, {"n": value["n"] + 1}, expect=current.version)
        samples.append(time.perf_counter() - started)
    return samples


def node_reads(store: IntentStore, rounds: int, apps: int) -> list[float]:
    for i in range(apps):
        app = f"app{i}"
        store.put_json(keys.node_app("bench-node", app), {"cluster": "c"})
        store.put_json(
            keys.config(app, "c"), {"versions": {"1": {"state": "active", "sha256": SHA}}}
        )
        store.put_json(keys.deploy_config(app, "c"), {"basedir": f"/srv/{app}"})
    samples = []
    for _ in range(rounds):
        started = time.perf_counter()
        assert len(store.apps_for_node("bench-node")) == apps
        samples.append(time.perf_counter() - started)
    return samples


@contextmanager
def stores(workdir: Path) -> Iterator[Iterator[tuple[str, Callable[[], IntentStore]]]]:
    binary = find_consul()
    agent = ConsulAgent(binary, workdir).start() if binary else None
    try:

        def each() -> Iterator[tuple[str, Callable[[], IntentStore]]]:
            yield "embedded (sqlite)", lambda: open_store(f"sqlite://{workdir}/intent.db")
            if agent is not None:
                yield "consul -dev", lambda: open_store(f"consul://{agent.http_addr}")
            else:
                print("(no consul binary: run scripts/install-consul)")

        yield each()
    finally:
        if agent is not None:
            agent.stop()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--rounds", type=int, default=50)
    parser.add_argument("--apps", type=int, default=100)
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as tmp, stores(Path(tmp)) as each:
        for name, make in each:
            store = make()
            print(f"== {name}")
            print(f"watch wake-up          {summary(watch_wakeups(store, args.rounds))}")
            print(f"idle watch CPU         {idle_cpu_ms_per_s(store):7.2f} ms per second")
            print(f"CAS read-modify-write  {summary(cas_writes(store, args.rounds))}")
            reads = node_reads(store, args.rounds, args.apps)
            print(f"apps_for_node ({args.apps:>3})  {summary(reads)}")
            store.close()


if __name__ == "__main__":
    main()
