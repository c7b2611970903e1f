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
import os
import pwd
import shutil
import sys
import tempfile
import time
from pathlib import Path
from types import ModuleType

REPO = Path(__file__).resolve().parent.parent
sys.path[:0] = [str(REPO), str(REPO / "bench")]

from compare import report, turns, versions  # noqa: E402

from agents.preparer import apply  # noqa: E402
from agents.system.layout import InstallMarker  # noqa: E402


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
    modules = versions(apply, args.compare, "apply_compared")
    times: dict[str, list[float]] = {name: [] for name in modules}
    root = Path(tempfile.mkdtemp(prefix="pp-seal-bench-"))
    try:
        for n, (name, module) in enumerate(turns(modules, args.rounds)):
            times[name].append(seal(module, tree(root, n, owner), owner))
    finally:
        shutil.rmtree(root)
    report(times)


if __name__ == "__main__":
    main()
