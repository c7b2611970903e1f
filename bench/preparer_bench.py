"""Benchmark pp-preparer's fetch + verify + extract against curl, sha256sum and tar.

Builds an artifact of many files (with ``pp pack``'s builder), serves it over
loopback HTTP from a separate process, then alternately:

- the baseline: ``curl URL | tee artifact | sha256sum`` followed by
  ``tar -xzf artifact``, each timed;
- ``pp-preparer --once`` installing the same artifact from the same server into
  an empty basedir on the same file system, timed as a whole process, with its
  peak RSS.

Medians over ``--runs``. The preparer also flushes the file system (syncfs)
before marking an install complete, which tar does not; ``--tar-sync`` adds a
``sync`` to the baseline for a like-for-like comparison.

    .venv/bin/python bench/preparer_bench.py                      # 10,000 files, ~200 MB
    .venv/bin/python bench/preparer_bench.py --files 500 --size-mb 10 --runs 2   # quick
"""

from __future__ import annotations

import argparse
import json
import os
import random
import shutil
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from intent import keys  # noqa: E402
from intent.cli.pack import build  # noqa: E402
from intent.store import open_store  # noqa: E402

APP, VERSION, NODE = "bench", "1.0", "bench-node"


def make_tree(root: Path, files: int, size_mb: float, random_fraction: float) -> int:
    """``files`` files of varied sizes totalling about ``size_mb``; part random
    (incompressible, like binaries), part text, in 100 directories."""
    rnd = random.Random(42)
    per_file = int(size_mb * 2**20 / files)
    text = b"The quick brown fox jumps over the lazy dog; lorem ipsum dolor sit amet. " * 64
    total = 0
    for i in range(files):
        directory = root / f"pkg{i % 100:03d}" / f"sub{i % 7}"
        directory.mkdir(parents=True, exist_ok=True)
        size = max(1, int(per_file * rnd.uniform(0.2, 1.8)))
        random_part = int(size * random_fraction)
        body = rnd.randbytes(random_part)
        body += (text * (1 + (size - random_part) // len(text)))[: size - random_part]
        (directory / f"file{i}.dat").write_bytes(body)
        total += size
    return total


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def serve(directory: Path) -> tuple[subprocess.Popen[bytes], str]:
    port = free_port()
    proc = subprocess.Popen(
        [sys.executable, "-m", "http.server", "-b", "127.0.0.1", "-d", str(directory), str(port)],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    deadline = time.monotonic() + 10
    while time.monotonic() < deadline:
        try:
            socket.create_connection(("127.0.0.1", port), 0.2).close()
            return proc, f"http://127.0.0.1:{port}"
        except OSError:
            time.sleep(0.05)
    proc.kill()
    raise SystemExit("bench: the loopback HTTP server did not start")


def timed(command: str) -> float:
    """Wall seconds of one shell command."""
    started = time.perf_counter()
    result = subprocess.run(["bash", "-c", command], capture_output=True)
    elapsed = time.perf_counter() - started
    if result.returncode != 0:
        raise SystemExit(f"bench: {command!r} failed: {result.stderr.decode()[-2000:]}")
    return elapsed


# Forks the preparer from a small process and times it there. A child's ru_maxrss counts
# the RSS of the process it was forked from (the kernel carries the high-water mark
# across fork and exec), so forking it from this script would report this script's size.
_LAUNCH = """
import json, os, sys, time
started = time.perf_counter()
pid = os.fork()
if pid == 0:
    os.execv(sys.argv[2], sys.argv[2:])
_, status, usage = os.wait4(pid, 0)
elapsed = time.perf_counter() - started
with open(sys.argv[1], "w") as out:
    json.dump([os.waitstatus_to_exitcode(status), elapsed, usage.ru_maxrss], out)
"""


def run_preparer(work: Path, url: str) -> tuple[float, int, float]:
    """Whole-process seconds, peak RSS (KiB) and the install's own seconds."""
    srv = work / "srv"
    shutil.rmtree(srv, ignore_errors=True)
    os.sync()
    command = [
        str(ROOT / ".venv" / "bin" / "pp-preparer"),
        "--once", "--store", f"sqlite://{work / 'intent.db'}", "--node", NODE,
        "--repo", url, "--log-format", "json", "--max-parallel", "1",
    ]  # fmt: skip
    measured = work / "launch.json"
    result = subprocess.run(
        [sys.executable, "-c", _LAUNCH, str(measured), *command],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
    )
    logs = result.stderr.decode()
    status, elapsed, peak_kib = json.loads(measured.read_text())
    if status != 0:
        raise SystemExit(f"bench: pp-preparer failed:\n{logs[-3000:]}")
    install_s = next(
        json.loads(line)["seconds"]
        for line in logs.splitlines()
        if line.startswith("{") and json.loads(line).get("event") == "install.done"
    )
    return float(elapsed), int(peak_kib), float(install_s)


def run_baseline(work: Path, artifact_url: str, tar_sync: bool) -> tuple[float, float]:
    dest = work / "baseline"
    shutil.rmtree(dest, ignore_errors=True)
    dest.mkdir()
    download = work / "baseline.tar.gz"
    download.unlink(missing_ok=True)
    os.sync()
    fetch_s = timed(f"set -o pipefail; curl -sSf {artifact_url} | tee {download} | sha256sum")
    tar_s = timed(f"tar -xzf {download} -C {dest}" + (" && sync" if tar_sync else ""))
    return fetch_s, tar_s


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--files", type=int, default=10_000)
    parser.add_argument(
        "--size-mb",
        type=float,
        default=250.0,
        help="total size of the files (the artifact is smaller: see --random)",
    )
    parser.add_argument(
        "--random", type=float, default=0.8, help="fraction of each file that is incompressible"
    )
    parser.add_argument("--runs", type=int, default=5)
    parser.add_argument(
        "--dir",
        type=Path,
        default=None,
        help="work directory (its file system is the one measured)",
    )
    parser.add_argument(
        "--tar-sync",
        action="store_true",
        help="add a sync to the baseline's tar, as the preparer flushes too",
    )
    args = parser.parse_args()  # fmt: skip

    for tool in ("curl", "tar", "sha256sum"):
        if shutil.which(tool) is None:
            raise SystemExit(f"bench: {tool} is needed for the baseline")
    work = Path(tempfile.mkdtemp(prefix="pp-bench-", dir=args.dir))
    try:
        tree, repo = work / "tree", work / "repo"
        tree.mkdir()
        data_bytes = make_tree(tree, args.files, args.size_mb, args.random)
        artifact = repo / APP / f"{APP}_{VERSION}.tar.gz"
        artifact.parent.mkdir(parents=True)
        with artifact.open("wb") as out:
            sha = build(tree, out)
        shutil.rmtree(tree)
        store = open_store(f"sqlite://{work / 'intent.db'}")
        store.put_json(keys.node_app(NODE, APP), {"cluster": "bench"})
        store.put_json(
            keys.config(APP, "bench"), {"versions": {VERSION: {"state": "active", "sha256": sha}}}
        )
        store.put_json(keys.deploy_config(APP, "bench"), {"basedir": str(work / "srv")})
        store.close()

        server, url = serve(repo)
        try:
            artifact_url = f"{url}/{APP}/{artifact.name}"
            rows = []
            for run in range(args.runs):
                fetch_s, tar_s = run_baseline(work, artifact_url, args.tar_sync)
                total_s, rss_kib, install_s = run_preparer(work, url)
                rows.append((fetch_s, tar_s, total_s, install_s, rss_kib))
                print(
                    f"run {run + 1}: curl|tee|sha256sum {fetch_s:.2f}s  tar -xzf {tar_s:.2f}s  "
                    f"pp-preparer {total_s:.2f}s (install {install_s:.2f}s, "
                    f"peak RSS {rss_kib / 1024:.0f} MiB)",
                    file=sys.stderr,
                )
        finally:
            server.terminate()
            server.wait()

        def median(i: int) -> float:
            return statistics.median(r[i] for r in rows)

        fetch_s, tar_s, total_s, install_s = median(0), median(1), median(2), median(3)
        peak_rss = max(r[4] for r in rows) / 1024
        summary = {
            "files": args.files,
            "data_mb": round(data_bytes / 2**20, 1),
            "artifact_mb": round(artifact.stat().st_size / 2**20, 1),
            "filesystem_dir": str(work),
            "runs": args.runs,
            "baseline_fetch_sha_s": round(fetch_s, 3),
            "baseline_tar_s": round(tar_s, 3),
            "baseline_total_s": round(fetch_s + tar_s, 3),
            "preparer_process_s": round(total_s, 3),
            "preparer_install_s": round(install_s, 3),
            "ratio_process_vs_baseline": round(total_s / (fetch_s + tar_s), 2),
            "ratio_process_vs_tar": round(total_s / tar_s, 2),
            "ratio_install_vs_tar": round(install_s / tar_s, 2),
            "preparer_peak_rss_mib": round(peak_rss, 1),
            "tar_sync": args.tar_sync,
        }
        print(json.dumps(summary, indent=2))
    finally:
        shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()
