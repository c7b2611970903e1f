"""``bin/check``: the health gate of a release of the agents.

Healthy when every agent's entry point imports from this install's ``src/`` with its
dependencies from ``site/``, under the Python the bundle was built for. Cheap, and it
fails a release whose code or dependencies are broken before its services are trusted.

    python3 -m agents.kickstart.check INSTALL_DIR
"""

from __future__ import annotations

import importlib
import sys
from pathlib import Path

ENTRY_POINTS = (
    "agents.preparer.__main__",
    "agents.setlive.__main__",
    "agents.iptables.__main__",
    "agents.elb_registrar.__main__",
    "agents.setlive.guard",
    "intent.cli",
)
DEPENDENCIES = ("pydantic", "structlog", "click", "consul", "cryptography", "yaml", "boto3")


def problems(install: Path) -> list[str]:
    found = []
    wanted = (install / "PYTHON").read_text().strip()
    running = f"{sys.version_info.major}.{sys.version_info.minor}"
    if wanted != running:
        found.append(f"built for Python {wanted}, running {running}")
    for name in ENTRY_POINTS + DEPENDENCIES:
        try:
            module = importlib.import_module(name)
        except (Exception, SystemExit) as exc:  # any failure to import is the finding
            found.append(f"{name}: {type(exc).__name__}: {exc}")
            continue
        home = install / ("src" if name in ENTRY_POINTS else "site")
        where = Path(module.__file__ or "")
        if not where.is_relative_to(home):
            found.append(f"{name} loads from {where}, not from {home}")
    return found


def main(argv: list[str]) -> None:
    install = Path(argv[0]) if argv else Path.cwd()
    found = problems(install)
    if found:
        sys.exit("; ".join(found))
    print(f"ok: the agents and their dependencies load from {install}")


if __name__ == "__main__":
    main(sys.argv[1:])
