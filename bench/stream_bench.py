"""What fetching and extracting a tiny artifact costs pp-preparer's install
(``agents/preparer/stream.py``: the download, and the extraction behind it or after it).

The reaction bench's 145-byte artifact, served by ``python -m http.server`` in its own
process, fetched and extracted ``--rounds`` times into private directories under the
system's temp dir. ``--compare FILE`` loads another version of ``stream.py`` (say an
earlier commit's, from ``git show``) and runs both in turn, each first every other
round, so a change in the machine's load weighs on both alike. Medians of wall time.

    .venv/bin/python bench/stream_bench.py
    git show 0919d5c:agents/preparer/stream.py > /tmp/stream_before.py
    .venv/bin/python bench/stream_bench.py --compare /tmp/stream_before.py
"""

from __future__ import annotations

import argparse
import pwd
import shutil
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
sys.path[:0] = [str(REPO), str(REPO / "tests"), str(REPO / "bench")]

from compare import report, turns, versions  # noqa: E402
from preparer_bench import serve  # noqa: E402
from reaction_bench import make_artifact  # noqa: E402

from agents.preparer import stream  # noqa: E402
from agents.system import archive  # noqa: E402
from agents.system.fetch import FetchOptions, fetch  # noqa: E402
from agents.system.layout import MARKER_NAME  # noqa: E402


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--rounds", type=int, default=400)
    parser.add_argument("--compare", type=Path, help="another version of stream.py")
    args = parser.parse_args()
    nobody = pwd.getpwnam("nobody")
    owner = (nobody.pw_uid, nobody.pw_gid)
    modules = versions(stream, args.compare, "stream_compared")
    times: dict[str, list[float]] = {name: [] for name in modules}
    options, limits = FetchOptions(), archive.Limits(1 << 30, 100_000)
    work = Path(tempfile.mkdtemp(prefix="pp-stream-bench-"))
    server, url = serve(work)
    try:
        make_artifact(work, work, "1")
        source = f"{url}/tiny/tiny_1.tar.gz"
        for n, (name, module) in enumerate(turns(modules, args.rounds)):
            into = work / f"x{n}"
            into.mkdir(mode=0o700)
            started = time.perf_counter()
            module.fetch_extracting(
                work / f"d{n}",
                lambda sink: fetch(source, sink, options, space_dir=work),
                lambda src, into=into: archive.extract(
                    src, into, limits, reserved={MARKER_NAME}, owner=owner
                ),
            )
            times[name].append(time.perf_counter() - started)
    finally:
        server.kill()
        server.wait()
        shutil.rmtree(work)
    report(times)


if __name__ == "__main__":
    main()
