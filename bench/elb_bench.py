"""pp-elb-registrar on one node with many apps, each with its own load balancer, against
moto in server mode: the AWS calls a pass makes and how long it takes.

    .venv/bin/python bench/elb_bench.py [--apps 100] [--kind mixed|classic|target_group]
                                        [--passes 5] [--parallel 8]

Each app has an HTTP health check (one loopback server answers for all of them) and
``current`` pointing at its active version, as setlive leaves it. The first pass
registers every app (ownership tags read and added, the instance registered, then
awaited InService/healthy, which moto reports at once); the passes after it find
nothing to do: first as a resync (AWS asked again), then as the registrar's own health
re-checks (AWS said in service moments ago: ``--describe-every``). Calls are counted
with a botocore ``before-call`` hook on every client the agent makes. The target for a
no-op pass: at most one describe call per load balancer, and no write; for a health
re-check, no AWS call at all.

Times include moto's own (a Python server on the same host, answering over HTTP),
so they bound the agent's overhead from above; against AWS each call costs a
network round trip instead.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import tempfile
import threading
import time
from collections import Counter
from dataclasses import replace
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parent.parent
sys.path[:0] = [str(REPO), str(REPO / "tests")]

from elb_support import WRITES, CallCounter, Cloud, health_app  # noqa: E402
from preparer_support import moto_server  # noqa: E402

from agents.elb_registrar.agent import ElbRegistrar  # noqa: E402
from agents.elb_registrar.apply import Settings  # noqa: E402
from agents.runtime import Runtime, RuntimeOptions  # noqa: E402
from agents.system.aws import Aws  # noqa: E402
from intent import keys  # noqa: E402
from intent.store import IntentStore  # noqa: E402
from intent.store.sqlite import SqliteStore  # noqa: E402

NODE = "bench-node"
CLUSTER = "prod"
HEALTH = {"type": "http", "interval_s": 0.05, "healthy_threshold": 2, "timeout_s": 1.0}


def setup(
    cloud: Cloud, store: IntentStore, root: Path, apps: int, kind: str, port: int
) -> list[dict[str, Any]]:
    vpc = cloud.client("ec2").create_vpc(CidrBlock="10.0.0.0/16")["Vpc"]["VpcId"]
    lbs = []
    for n in range(apps):
        app = f"app{n:03d}"
        classic = kind == "classic" or (kind == "mixed" and n % 2 == 0)
        if classic:
            lb = cloud.classic(f"lb-{app}")
        else:
            arn = cloud.client("elbv2").create_target_group(
                Name=f"tg-{app}", Protocol="HTTP", Port=8080, VpcId=vpc, TargetType="instance"
            )["TargetGroups"][0]["TargetGroupArn"]
            lb = {"type": "target_group", "arn": arn, "port": 8080, "region": "us-east-1"}
        lbs.append(lb)
        basedir = root / "apps" / app
        (basedir / "installs" / f"{app}_1").mkdir(parents=True)
        (basedir / "current").symlink_to(f"installs/{app}_1")
        store.put_json(
            keys.config(app, CLUSTER),
            {"versions": {"1": {"state": "active", "sha256": "a" * 64}}},
        )
        store.put_json(
            keys.deploy_config(app, CLUSTER),
            {"basedir": str(basedir), "elb": [lb], "health_check": {**HEALTH, "port": port}},
        )
        store.put_json(keys.node_app(NODE, app), {"cluster": CLUSTER})
    return lbs


def timed_pass(runtime: Runtime, counter: CallCounter) -> tuple[bool, float, Counter[str]]:
    started = time.perf_counter()
    converged = runtime.run_pass(force=True)
    return converged, time.perf_counter() - started, counter.take()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--apps", type=int, default=100)
    parser.add_argument("--kind", choices=["mixed", "classic", "target_group"], default="mixed")
    parser.add_argument("--passes", type=int, default=5)
    parser.add_argument("--parallel", type=int, default=8)
    args = parser.parse_args()

    with (
        moto_server() as endpoint,
        tempfile.TemporaryDirectory() as tmp,
        health_app() as health,
    ):
        root = Path(tmp)
        cloud = Cloud(endpoint)
        instance = cloud.instance()
        store = IntentStore(SqliteStore(root / "store.db"))
        lbs = setup(cloud, store, root, args.apps, args.kind, health.port)
        counter = CallCounter()
        stop = threading.Event()
        aws = Aws(
            session=cloud.session,
            endpoint_url=endpoint,
            hooks=[("before-call", counter)],
            stop=stop,
        )
        agent = ElbRegistrar(
            store,
            NODE,
            aws,
            lambda: instance,
            state_dir=root / "state",
            # A resync asks AWS whenever it last did (--describe-every 0), and no health
            # re-check of the agent's own falls due among the passes measured.
            settings=Settings(poll_interval_s=0.05, health_recheck_s=3600, describe_every_s=0),
            stop=stop,
        )
        runtime = Runtime(agent, store, RuntimeOptions(node=NODE, max_parallel=args.parallel))

        converged, first_s, first_calls = timed_pass(runtime, counter)
        if not converged:
            errors = {r.app: r.error for r in store.reality(NODE) if r.status != "converged"}
            sys.exit(f"first pass did not converge: {errors}")
        noops = [timed_pass(runtime, counter) for _ in range(args.passes)]
        agent.settings = replace(agent.settings, describe_every_s=Settings().describe_every_s)
        rechecks = [timed_pass(runtime, counter) for _ in range(args.passes)]
        store.close()

    classic = sum(1 for lb in lbs if lb["type"] == "classic")
    print(f"{args.apps} apps ({classic} classic ELBs, {args.apps - classic} target groups), "
          f"--parallel {args.parallel}")  # fmt: skip
    print(f"first pass (register all): {first_s:.2f} s, {sum(first_calls.values())} calls")
    for name, count in sorted(first_calls.items()):
        print(f"    {name}: {count}")
    times = [seconds for _, seconds, _ in noops]
    calls = [sum(c.values()) for _, _, c in noops]
    writes = [sum(n for op, n in c.items() if op in WRITES) for _, _, c in noops]
    describes = Counter[str]()
    for _, _, c in noops:
        describes.update(c)
    low, mid, high = (round(f(times) * 1000) for f in (min, statistics.median, max))
    print(f"no-op pass: median {mid} ms (min {low}, max {high}) over {len(noops)} passes")
    print(f"    calls per pass: {calls} (writes {writes}); per load balancer: "
          f"{max(calls) / args.apps:.2f}")  # fmt: skip
    for name, count in sorted(describes.items()):
        print(f"    {name}: {count / len(noops):g} per pass")
    times = [seconds for _, seconds, _ in rechecks]
    low, mid, high = (round(f(times) * 1000) for f in (min, statistics.median, max))
    print(f"health re-check pass: median {mid} ms (min {low}, max {high}), "
          f"AWS calls {[sum(c.values()) for _, _, c in rechecks]}")  # fmt: skip
    if not all(converged for converged, _, _ in noops + rechecks):
        sys.exit("a no-op pass did not converge")


if __name__ == "__main__":
    main()
