"""Where an agent keeps its own notes on the host, when its ``--state-dir`` is not given.

``$PP_STATE_ROOT/<agent>`` when that is set (tests, several deployments on one host);
else root (the agents as services) uses ``/var/lib/platypus/<agent>`` and any other user
a directory of their own under ``$XDG_STATE_HOME``, so a developer's agent needs no setup.
"""

from __future__ import annotations

import os
from pathlib import Path

SYSTEM_ROOT = Path("/var/lib/platypus")


def default(agent: str) -> Path:
    if root := os.environ.get("PP_STATE_ROOT"):
        return Path(root) / agent
    if os.geteuid() == 0:
        return SYSTEM_ROOT / agent
    state_home = os.environ.get("XDG_STATE_HOME") or str(Path.home() / ".local" / "state")
    return Path(state_home) / "platypus" / agent
