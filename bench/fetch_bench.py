"""What one download of a tiny artifact costs ``fetch`` over loopback HTTP, and its
set-up alone (the guard that ends a fetch on stop or deadline, and the urllib opener).

A 145-byte file served by ``python -m http.server`` in its own process, fetched
``--fetches`` times; medians of wall time, and this process's CPU time per fetch.
``--compare FILE`` loads another version of ``agents/system/fetch.py`` (say the one
of an earlier commit, from ``git show``) and fetches with both in turn, one fetch each
at a time and each first every other time, so that a change in the machine's load
weighs on both alike.

    .venv/bin/python bench/fetch_bench.py
    git show f79594f:agents/system/fetch.py > /tmp/fetch_before.py
    .venv/bin/python bench/fetch_bench.py --compare /tmp/fetch_before.py
"""

from __future__ import annotations

import argparse
import importlib.util
import io
import statistics
import sys
import tempfile
import threading
import time
from collections.abc import Callable
from pathlib import Path
from types import ModuleType

REPO = Path(__file__).resolve().parent.parent
sys.path[:0] = [str(REPO), str(REPO / "bench")]

from preparer_bench import serve  # noqa: E402

from agents.system import fetch as current  # noqa: E402

WARM_UP = 20


def load(path: Path) -> ModuleType:
    spec = importlib.util.spec_from_file_location(f"fetch_{path.stem}", path)
    assert spec is not None and spec.loader is not None, path
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module
    spec.loader.exec_module(module)
    return module


def median_ms(call: Callable[[], object], times: int) -> float:
    samples = []
    for _ in range(times):
        started = time.perf_counter()
        call()
        samples.append(time.perf_counter() - started)
    return statistics.median(samples) * 1000


def set_up_costs(name: str, module: ModuleType, times: int) -> None:
    options = module.FetchOptions(stop=threading.Event())

    def guard() -> None:
        with module._Guard(options):
            pass

    print(f"{name:<10} guard, entered and left      median {median_ms(guard, times):7.3f} ms")
    if hasattr(module, "_opener"):
        opener_ms = median_ms(module._opener, times)
        print(f"{name:<10} the shared opener, looked up median {opener_ms:7.3f} ms")
    else:
        guard_now = module._Guard(options)
        build_ms = median_ms(
            lambda: module.urllib.request.build_opener(module._WatchedHandler(guard_now)), times
        )
        print(f"{name:<10} an opener, built             median {build_ms:7.3f} ms")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--fetches", type=int, default=1000)
    parser.add_argument("--compare", type=Path, help="another fetch.py to run in turn")
    args = parser.parse_args()
    modules = {"this": current}
    if args.compare:
        modules["compared"] = load(args.compare)

    with tempfile.TemporaryDirectory() as tmp:
        (Path(tmp) / "tiny.tar.gz").write_bytes(b"x" * 145)
        server, base = serve(Path(tmp))
        try:
            url = f"{base}/tiny.tar.gz"
            wall: dict[str, list[float]] = {name: [] for name in modules}
            cpu: dict[str, list[float]] = {name: [] for name in modules}
            stop = threading.Event()
            for n in range(WARM_UP + args.fetches):
                turn = list(modules.items())
                for name, module in turn if n % 2 else reversed(turn):  # neither always first
                    options = module.FetchOptions(stop=stop)
                    cpu_started, started = time.process_time(), time.perf_counter()
                    module.fetch(url, io.BytesIO(), options)
                    ended, cpu_ended = time.perf_counter(), time.process_time()
                    if n >= WARM_UP:
                        wall[name].append(ended - started)
                        cpu[name].append(cpu_ended - cpu_started)
        finally:
            server.terminate()
            server.wait()
    for name in modules:
        ms = sorted(s * 1000 for s in wall[name])
        print(
            f"{name:<10} fetch of 145 bytes           median {statistics.median(ms):7.3f} ms"
            f"   p10 {ms[len(ms) // 10]:6.3f}   p90 {ms[9 * len(ms) // 10]:6.3f}"
            f"   CPU here {statistics.mean(cpu[name]) * 1000:6.3f} ms"
        )
    for name, module in modules.items():
        set_up_costs(name, module, 3 * args.fetches)


if __name__ == "__main__":
    main()
