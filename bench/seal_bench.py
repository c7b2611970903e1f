"""What sealing a small install costs pp-preparer: the marker written, the tree flushed
(an fsync per entry for trees of up to ``FSYNC_EACH_UP_TO`` entries), the directory
opened to the app's user and flushed itself (``agents/preparer/apply.py``, ``_seal``).

Each round makes a tree like the reaction bench's artifact (``bin/``, ``bin/hello``) in
a private directory under the system's temp dir, then seals it. ``--compare FILE``
loads another version of ``apply.py`` (say an earlier commit's, from ``git show``) and
seals with both in turn, each first every other round, so a change in the machine's
load weighs on both alike. Medians of wall time.

    .venv/bin/python bench/seal_bench.py
    git show 42ecde5:agents/preparer/apply.py > /tmp/apply_before.py
    .venv/bin/python bench/seal_bench.py --compare /tmp/apply_before.py
"""

from __future__ import annotations

import argparse
import importlib.util
import os
import pwd
import shutil
import statistics
import sys
import tempfile
import time
from pathlib import Path
from types import ModuleType

REPO = Path(__file__).resolve().parent.parent
sys.path[:0] = [str(REPO)]

from agents.preparer import apply  # noqa: E402
from agents.system.layout import InstallMarker  # noqa: E402


def load(path: Path, name: str = "apply_compared") -> ModuleType:
    """The module in the file ``path``, under ``name`` (beside the one imported)."""
    spec = importlib.util.spec_from_file_location(name, path)
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # its dataclasses look their module up there
    spec.loader.exec_module(module)
    return module


def tree(root: Path, n: int, owner: tuple[int, int]) -> Path:
    work = root / f"w{n}"
    work.mkdir(mode=0o700)
    (work / "bin").mkdir()
    (work / "bin" / "hello").write_text("#!/bin/sh\necho 1\n")
    for path in (work / "bin", work / "bin" / "hello"):
        os.chown(path, *owner)
    return work


def seal(module: ModuleType, work: Path, owner: tuple[int, int]) -> float:
    marker = InstallMarker.of_artifact("tiny", "1", "0" * 64, work, time.time())
    started = time.perf_counter()
    module._seal(work, marker, owner)
    return time.perf_counter() - started


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--rounds", type=int, default=300)
    parser.add_argument("--compare", type=Path, help="another version of apply.py")
    args = parser.parse_args()
    nobody = pwd.getpwnam("nobody")
    owner = (nobody.pw_uid, nobody.pw_gid)
    versions = {"this checkout": apply}
    if args.compare:
        versions[str(args.compare)] = load(args.compare)
    times: dict[str, list[float]] = {name: [] for name in versions}
    root = Path(tempfile.mkdtemp(prefix="pp-seal-bench-"))
    try:
        n = 0
        for round_ in range(args.rounds):
            order = list(versions.items())
            if round_ % 2:
                order.reverse()
            for name, module in order:
                times[name].append(seal(module, tree(root, n, owner), owner))
                n += 1
    finally:
        shutil.rmtree(root)
    for name, found in times.items():
        found.sort()
        print(
            f"{name:40s} median {statistics.median(found) * 1000:5.2f} ms   "
            f"p90 {found[int(len(found) * 0.9)] * 1000:5.2f} ms"
        )


if __name__ == "__main__":
    main()
