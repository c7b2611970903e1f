"""How long from ``pp deploy`` to the new version answering its health check, on one host.

    .venv/bin/python bench/setlive_bench.py [--deploys 20] [--store sqlite|consul|both]

A real pp-setlive process (watching the store) and a private runsvdir on a temp
directory; the sample HTTP app (test_data/apps/httpapp) already installed in
two versions, so the preparer is not part of the measure. Each deploy writes
the app's config with the other version active (what ``pp deploy`` writes),
then polls the app's ``/health`` every 2 ms until the new version answers, and
the store until setlive reports the deploy converged (the health gate passed).

Printed next to the totals, the parts nobody can remove: runit restarting a
process (a trivial service restarted through supervise/control, measured here),
the app's own start (new process start -> first answer, measured on each
deploy) and the health threshold (the gate waits for ``min_uptime_s`` and
``healthy_threshold`` checks). What is left is setlive's own overhead: store
watch latency, observe/plan/apply, reports.

Needs root (chpst -u) and runit; Consul only for ``--store consul``.
"""

from __future__ import annotations

import argparse
import hashlib
import http.client
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parent.parent
sys.path[:0] = [str(REPO), str(REPO / "tests")]

from consul_agent import ConsulAgent, find_consul  # noqa: E402
from runit_support import free_port, start_runsvdir, stop_runsvdir  # noqa: E402

from agents.system import runit  # noqa: E402
from agents.system.layout import AppLayout, InstallMarker  # noqa: E402
from intent import keys  # noqa: E402
from intent.store import IntentStore, open_store  # noqa: E402

APP = "bench"
NODE = "bench-node"
INTERVAL_S = 0.05
HEALTHY_THRESHOLD = 2
MIN_UPTIME_S = 0.5
HEALTH = {
    "type": "http",
    "interval_s": INTERVAL_S,
    "healthy_threshold": HEALTHY_THRESHOLD,
    "timeout_s": 1.0,
    "deadline_s": 20.0,
    "min_uptime_s": MIN_UPTIME_S,
}


def sha(version: str) -> str:
    return hashlib.sha256(version.encode()).hexdigest()


@dataclass
class Sample:
    total_answer: float  # deploy written -> new version answers /health
    total_converged: float  # deploy written -> setlive reports converged
    to_process: float  # deploy written -> new process started (runit's record)
    app_start: float  # new process started -> first answer


def pct(values: list[float], p: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, round(p / 100 * (len(ordered) - 1)))]


def health_body(port: int) -> str | None:
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=0.5)
    try:
        conn.request("GET", "/health")
        response = conn.getresponse()
        return response.read().decode() if response.status == 200 else None
    except (OSError, http.client.HTTPException):  # the old process dying mid-answer
        return None
    finally:
        conn.close()


def set_active(store: IntentStore, active: str) -> None:
    store.put_json(
        keys.config(APP, "c"),
        {
            "versions": {
                v: {"state": "active" if v == active else "prep", "sha256": sha(v)}
                for v in ("1", "2")
            }
        },
    )


def converged(store: IntentStore, version: str) -> bool:
    return any(
        r.agent == "setlive" and r.status == "converged" and r.version == version
        for r in store.reality(NODE, APP)
    )


def wait(predicate: Any, timeout: float, interval: float) -> float:
    deadline = time.monotonic() + timeout
    while not predicate():
        if time.monotonic() > deadline:
            raise TimeoutError("timed out")
        time.sleep(interval)
    return time.time()


def restart_baseline(service: Path) -> float:
    before = runit.status(service).pid
    started = time.time()
    runit.restart(service)
    while runit.status(service).pid in (None, before):
        time.sleep(0.0005)
    return time.time() - started


def run(store_kind: str, deploys: int) -> dict[str, Any]:
    handle = start_runsvdir()
    consul: ConsulAgent | None = None
    setlive: subprocess.Popen[bytes] | None = None
    root = handle.root
    try:
        if store_kind == "consul":
            binary = find_consul()
            if binary is None:
                raise SystemExit("no consul binary: run scripts/install-consul or set CONSUL_BIN")
            consul = ConsulAgent(binary, root).start()
            url = f"consul://{consul.http_addr}"
        else:
            url = f"sqlite://{root / 'store.db'}"
        store = open_store(url, "bench/")

        basedir = root / "apps" / APP
        layout = AppLayout(basedir, APP)
        for version in ("1", "2"):
            shutil.copytree(REPO / "test_data/apps/httpapp", layout.install_dir(version))
            layout.marker(version).write_bytes(InstallMarker(sha(version), time.time()).to_bytes())
        port = free_port()
        store.put_json(keys.node_app(NODE, APP), {"cluster": "c"})
        store.put_json(
            keys.deploy_config(APP, "c"),
            {
                "basedir": str(basedir),
                "run_as": "nobody",
                "ports": [{"name": "http", "port": port}],
                "health_check": HEALTH,
            },
        )
        set_active(store, "1")

        # A trivial service for runit's own restart time, under the same runsvdir.
        dummy = root / "dummy"
        dummy.mkdir()
        (dummy / "run").write_text("#!/bin/sh\nexec sleep 100000\n")
        (dummy / "run").chmod(0o755)
        runit.link(dummy, handle.service_dir, "bench-dummy")

        log = open(root / "setlive.log", "wb")  # noqa: SIM115 - closed with the process
        setlive = subprocess.Popen(
            [sys.executable, "-m", "agents.setlive", "--store", url, "--prefix", "bench/",
             "--node", NODE, "--runit", str(handle.service_dir),
             "--runit-stage", str(root / "stage"), "--log-root", str(root / "log"),
             "--state-dir", str(root / "state"), "--log-format", "json"],
            cwd=REPO, stdout=log, stderr=log, start_new_session=True,
        )  # fmt: skip
        wait(lambda: converged(store, "1"), 30, 0.05)
        assert runit.wait_supervised(dummy, 10)

        samples: list[Sample] = []
        baseline: list[float] = []
        active = "1"
        for _ in range(deploys):
            time.sleep(1.1)  # runsv holds a restart within 1 s of the last start
            baseline.append(restart_baseline(dummy))
            active = "2" if active == "1" else "1"
            t0 = time.time()
            set_active(store, active)
            t_answer = wait(lambda a=active: health_body(port) == f"ok {a}", 30, 0.002)
            t_conv = wait(lambda a=active: converged(store, a), 30, 0.005)
            started = runit.status(root / "stage" / APP).started_at or t_answer
            samples.append(Sample(t_answer - t0, t_conv - t0, started - t0, t_answer - started))
        store.close()
        return {"store": store_kind, "samples": samples, "baseline": baseline}
    finally:
        if setlive is not None:
            setlive.terminate()
            try:
                setlive.wait(10)
            except subprocess.TimeoutExpired:
                setlive.kill()
        if consul is not None:
            consul.stop()
        stop_runsvdir(handle)


def report(result: dict[str, Any]) -> str:
    samples: list[Sample] = result["samples"]
    restart = statistics.median(result["baseline"])
    app_start = statistics.median(s.app_start for s in samples)
    # The gate passes once the process has been up min_uptime_s and, after its first
    # answer, healthy_threshold checks in a row have passed; both count from the start.
    checks = (HEALTHY_THRESHOLD - 1) * INTERVAL_S
    gate = max(MIN_UPTIME_S, app_start + checks)
    parts_answer = restart + app_start
    parts_converged = restart + gate

    def row(name: str, values: list[float], parts: float | None = None) -> str:
        med, p95 = statistics.median(values), pct(values, 95)
        extra = " | | "
        if parts is not None:
            extra = f" | {parts * 1000:.0f} | {(med - parts) * 1000:.0f}"
        return f"| {name} | {med * 1000:.0f} | {p95 * 1000:.0f}{extra} |"

    lines = [
        f"### {result['store']} store, {len(samples)} deploys",
        "",
        "| ms | median | p95 | sum of parts | overhead (median - parts) |",
        "|---|---:|---:|---:|---:|",
        row("deploy -> new version answers /health",
            [s.total_answer for s in samples], parts_answer),
        row("deploy -> setlive reports converged (gate passed)",
            [s.total_converged for s in samples], parts_converged),
        row("deploy -> new process started", [s.to_process for s in samples], restart),
        row("app start (process start -> first answer)", [s.app_start for s in samples]),
        row("runit restart of a trivial service", result["baseline"]),
        f"| health gate from process start: max(min_uptime_s, app start + "
        f"(healthy_threshold - 1) x interval_s) | {gate * 1000:.0f} | | | |",
    ]  # fmt: skip
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n", 1)[0])
    parser.add_argument("--deploys", type=int, default=20)
    parser.add_argument("--store", choices=["sqlite", "consul", "both"], default="both")
    args = parser.parse_args()
    if os.geteuid() != 0:
        raise SystemExit("setlive_bench: needs root (the app runs as nobody through chpst -u)")
    tempfile.tempdir = "/tmp"
    kinds = ["sqlite", "consul"] if args.store == "both" else [args.store]
    for kind in kinds:
        print(report(run(kind, args.deploys)), flush=True)
        print()


if __name__ == "__main__":
    main()
