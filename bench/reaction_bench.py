"""Reaction on one node: from writing a new version into Consul to its install being
in place, against Consul's own wake-up in the same run.

One ``consul agent -dev`` and one ``pp-preparer`` running as a daemon against it; a
tiny artifact per version, served over loopback HTTP. Each round writes the next
version as the app's active one (the HTTP PUT ``consul kv put`` makes) and times:

- Consul's own wake-up: a bare blocking query on the cluster's prefix, in this
  process, answering with the new index (the floor any watcher can reach);
- the install: the version's directory renamed into ``<basedir>/installs/`` by
  pp-preparer (after fetch, sha256 check, extraction and the flush that makes the
  marker's claim true), seen through inotify.

Then where the difference goes, per round, from pp-preparer's own log (its JSON
lines carry microsecond timestamps, and each converge and install its duration in
milliseconds): from Consul's answer to the converge starting (the preparer's watch
answering, its pass and trust check, the hand-over to a worker), from there to the
install starting (lock, look, plan), and the install itself.

    .venv/bin/python bench/reaction_bench.py --rounds 30
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import threading
import time
import urllib.request
from dataclasses import dataclass
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
sys.path[:0] = [str(REPO), str(REPO / "tests"), str(REPO / "bench")]

from consul_agent import ConsulAgent, find_consul  # noqa: E402
from preparer_bench import serve  # noqa: E402

from intent import keys  # noqa: E402
from intent.cli.pack import build  # noqa: E402
from intent.store import IntentStore  # noqa: E402
from intent.store.consul import ConsulStore  # noqa: E402
from intent.store.file_watch import watch_file  # noqa: E402

APP, CLUSTER, NODE = "tiny", "c", "bench-node"


def make_artifact(repo: Path, work: Path, version: str) -> str:
    tree = work / f"tree-{version}"
    (tree / "bin").mkdir(parents=True)
    (tree / "bin" / "hello").write_text(f"#!/bin/sh\necho {version}\n")
    artifact = repo / APP / f"{APP}_{version}.tar.gz"
    artifact.parent.mkdir(parents=True, exist_ok=True)
    with artifact.open("wb") as out:
        return build(tree, out)


def config(version: str, sha: str) -> bytes:
    value = {"versions": {version: {"state": "active", "sha256": sha}}}
    return json.dumps(value).encode()


class ConsulWakeups:
    """Consul's own wake-up: a bare blocking query loop on one prefix, noting when
    each new index arrives."""

    def __init__(self, address: str, prefix: str) -> None:
        self.url = f"http://{address}/v1/kv/{prefix}?recurse=true&keys=true"
        self.arrivals: list[tuple[int, float]] = []
        self._index = self._get(0, "0s")
        threading.Thread(target=self._run, daemon=True).start()

    def _get(self, index: int, wait: str) -> int:
        with urllib.request.urlopen(f"{self.url}&index={index}&wait={wait}", timeout=60) as r:
            return int(r.headers["X-Consul-Index"])

    def _run(self) -> None:
        while True:
            try:
                index = self._get(self._index, "30s")
            except OSError:  # Consul stopped: the bench is over
                return
            if index != self._index:
                self.arrivals.append((index, time.perf_counter()))
                self._index = index

    def first_after(self, started: float, timeout: float = 10) -> float:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            for _, at in self.arrivals:
                if at >= started:
                    return at
            time.sleep(0.001)
        raise SystemExit("bench: Consul's blocking query never answered")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--rounds", type=int, default=30)
    parser.add_argument("--profile", type=Path, help="record pp-preparer with py-spy (raw)")
    parser.add_argument("--keep-log", type=Path, help="copy pp-preparer's JSON log here")
    args = parser.parse_args()
    binary = find_consul()
    if binary is None:
        sys.exit("no consul binary: run scripts/install-consul")

    with tempfile.TemporaryDirectory() as tmp:
        work = Path(tmp)
        repo, basedir = work / "repo", work / "srv"
        consul = ConsulAgent(binary, work).start()
        server, url = serve(repo_dir(repo))
        preparer = spy = None
        try:
            host, port = consul.http_addr.split(":")
            store = IntentStore(ConsulStore(host, int(port)))
            store.ensure_identity("reaction-bench")
            store.put_json(keys.node_app(NODE, APP), {"cluster": CLUSTER})
            store.put_json(keys.deploy_config(APP, CLUSTER), {"basedir": str(basedir)})
            config_key = store.prefix + keys.config(APP, CLUSTER)
            store.kv.put(config_key, config("0", make_artifact(repo, work, "0")))
            preparer = subprocess.Popen(
                [
                    # This checkout's code, whichever checkout the venv was installed from.
                    sys.executable, "-m", "agents.preparer",
                    "--store", f"consul://{consul.http_addr}", "--node", NODE,
                    "--repo", url, "--state-dir", str(work / "state"),
                    "--log-format", "json", "--resync-interval", "3600",
                ],
                stdout=subprocess.DEVNULL,
                stderr=open(work / "preparer.log", "wb"),  # noqa: SIM115
                env={**os.environ, "PYTHONPATH": str(REPO)},
            )  # fmt: skip
            installs = basedir / "installs"
            deadline = time.monotonic() + 60
            while not (installs / f"{APP}_0").exists():
                if time.monotonic() > deadline or preparer.poll() is not None:
                    sys.exit("bench: the first install never appeared; see preparer.log")
                time.sleep(0.05)
            if args.profile:
                spy = subprocess.Popen(
                    [str(REPO / ".venv" / "bin" / "py-spy"), "record", "-p", str(preparer.pid),
                     "-f", "raw", "-r", "1000", "--idle", "-o", str(args.profile)],
                    stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                )  # fmt: skip
                time.sleep(1)
            wakeups = ConsulWakeups(consul.http_addr, store.prefix + keys.cluster(APP, CLUSTER))
            floor, reaction = [], []
            rounds: list[Round] = []
            for n in range(1, args.rounds + 1):
                version = str(n)
                sha = make_artifact(repo, work, version)
                changes = watch_file(installs / f"{APP}_{version}", suffixes=("",))
                assert changes is not None, "inotify is needed to time the install"
                time.sleep(0.2)  # idle between rounds, as a deploy finds a node
                started, wall = time.perf_counter(), time.time()
                store.kv.put(config_key, config(version, sha))
                while not (installs / f"{APP}_{version}").exists():
                    if not changes.wait(10):
                        sys.exit(f"bench: version {version} was not installed in 10 s")
                done = time.perf_counter()
                changes.close()
                floor.append(wakeups.first_after(started) - started)
                reaction.append(done - started)
                rounds.append(Round(version, wall, floor[-1]))
        finally:
            if spy is not None:
                subprocess.run(["kill", "-INT", str(spy.pid)], check=False)
                spy.wait(30)
            if preparer is not None:
                preparer.terminate()
                preparer.wait(10)
            server.terminate()
            server.wait()
            consul.stop()
            if args.keep_log:
                shutil.copyfile(work / "preparer.log", args.keep_log)
            stages = where_it_goes(rounds, (work / "preparer.log").read_text())

    def line(name: str, samples: list[float]) -> str:
        ms = sorted(s * 1000 for s in samples)
        p95 = ms[min(len(ms) - 1, round(0.95 * (len(ms) - 1)))]
        return f"{name:<34} median {statistics.median(ms):7.1f} ms   p95 {p95:7.1f} ms"

    print(line("Consul's own blocking-query wake-up", floor))
    print(line("write -> install in place", reaction))
    print(line("difference (per round)", [r - f for r, f in zip(reaction, floor, strict=True)]))
    print("where the difference goes (pp-preparer's log, per round):")
    for name, samples in stages.items():
        print(line(f"  {name}", samples))


@dataclass(frozen=True)
class Round:
    version: str
    written: float
    """Wall-clock time of the write (the log's clock)."""
    consul_s: float
    """Consul's own wake-up after the write."""


def where_it_goes(rounds: list[Round], log: str) -> dict[str, list[float]]:
    """Each round's stages after Consul's wake-up, from the preparer's JSON log: a
    converge's start and an install's start are its logged end less its duration."""
    installs: dict[str, float] = {}
    install_s: dict[str, float] = {}
    converges: dict[str, float] = {}
    for text in log.splitlines():
        try:
            event = json.loads(text)
        except ValueError:
            continue
        version = event.get("version")
        if event.get("event") == "install.done":
            installs[version] = _when(event["timestamp"])
            install_s[version] = event["seconds"]
        elif event.get("event") == "converge.converged" and version not in converges:
            converges[version] = _when(event["timestamp"]) - event["seconds"]
    stages: dict[str, list[float]] = {
        "Consul's answer -> converge starts": [],
        "converge starts -> install starts": [],
        "the install": [],
    }
    for r in rounds:
        if r.version not in installs or r.version not in converges:
            continue
        answered = r.written + r.consul_s
        install_starts = installs[r.version] - install_s[r.version]
        stages["Consul's answer -> converge starts"].append(converges[r.version] - answered)
        stages["converge starts -> install starts"].append(install_starts - converges[r.version])
        stages["the install"].append(install_s[r.version])
    return stages


def _when(timestamp: str) -> float:
    return datetime.datetime.fromisoformat(timestamp.replace("Z", "+00:00")).timestamp()


def repo_dir(repo: Path) -> Path:
    repo.mkdir(parents=True, exist_ok=True)
    return repo


if __name__ == "__main__":
    main()
