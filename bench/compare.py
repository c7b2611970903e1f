"""Two versions of one module timed in turn in one process (bench/seal_bench.py,
bench/stream_bench.py): each first every other round, so a change in the machine's
load weighs on both alike."""

from __future__ import annotations

import importlib.util
import statistics
import sys
from collections.abc import Iterator, Mapping
from pathlib import Path
from types import ModuleType


def versions(current: ModuleType, other: Path | None, name: str) -> dict[str, ModuleType]:
    """This checkout's module, and the one in the file ``other`` (loaded as ``name``)."""
    found = {"this checkout": current}
    if other is not None:
        spec = importlib.util.spec_from_file_location(name, other)
        assert spec is not None and spec.loader is not None
        module = importlib.util.module_from_spec(spec)
        sys.modules[name] = module  # its dataclasses look their module up there
        spec.loader.exec_module(module)
        found[str(other)] = module
    return found


def turns(modules: Mapping[str, ModuleType], rounds: int) -> Iterator[tuple[str, ModuleType]]:
    for round_ in range(rounds):
        order = list(modules.items())
        yield from reversed(order) if round_ % 2 else order


def report(times: Mapping[str, list[float]]) -> None:
    for name, found in times.items():
        found = sorted(found)
        print(
            f"{name:40s} median {statistics.median(found) * 1000:5.2f} ms   "
            f"p90 {found[int(len(found) * 0.9)] * 1000:5.2f} ms"
        )
