"""kill -9 at random moments while deploys stream in, for real: pp-preparer and
pp-setlive run as services of a private runsvdir (which restarts them, as on a
host), two apps get a stream of new versions, and a loop SIGKILLs a random agent
at random moments.

At the end every app runs and reports its last version, nothing is half done (no
temporary files, no install without its marker, no link to a missing install),
and each app answered throughout, except while it switched versions.

Seeded and reproducible: the seed is printed; ``PP_CHAOS_SEED=<seed>`` replays its
schedule. Longer runs: bench/faults_bench.py chaos (figures in docs/reliability.md).
"""

from __future__ import annotations

import os
import random
import shutil
from collections.abc import Iterator
from pathlib import Path

import pytest
from fault_support import chaos, node
from runit_support import Runsvdir, require_root, start_runsvdir, stop_runsvdir

DEPLOYS = 30
KILLS = 50
APPS = ("alpha", "beta")


@pytest.fixture
def runsv() -> Iterator[Runsvdir]:
    require_root()
    handle = start_runsvdir()
    try:
        yield handle
    finally:
        stop_runsvdir(handle)


def test_kill_9_at_random_moments_during_a_stream_of_deploys(
    runsv: Runsvdir, tmp_path: Path
) -> None:
    seed = int(os.environ.get("PP_CHAOS_SEED") or random.randrange(1 << 32))
    print(f"PP_CHAOS_SEED={seed}")
    with node(runsv, f"sqlite://{runsv.root / 'n1' / 'store.db'}") as n:
        try:
            run = chaos(n, seed, DEPLOYS, KILLS, APPS)
        finally:
            for log in n.root.glob("*.log"):  # the runsvdir's root goes; pytest keeps these
                shutil.copy(log, tmp_path)
        print(run.summary())
        where = f"PP_CHAOS_SEED={seed}; agents' logs in {tmp_path}\n{n.describe()}"
        assert run.deploys >= DEPLOYS and sum(run.kills.values()) >= KILLS, run
        assert run.converge_s is not None, f"not converged on the last intent; {where}"
        assert n.problems() == [], where
        assert run.prober is not None
        for app in APPS:
            outages = [gap for gap in run.prober.gaps(app) if not gap.switch]
            assert outages == [], f"{app} failed outside its switches; {where}"
