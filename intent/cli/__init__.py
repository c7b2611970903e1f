"""``pp``: the operator's tool. Operators write intent here; the agents read it.

- ``commands``: the click group and its commands
- ``render``: tables, diffs and terminal-safe text
- ``operator``: the read-modify-write of one key, and the pure transforms it applies
- ``appfile``: app files (YAML), one app's clusters as ``pp apply`` and ``pp get`` see them
- ``schema``: the JSON Schema of app files and of stored values
- ``pack``: deterministic artifacts published to a repository (``pack_command``: ``pp pack``)
"""

from __future__ import annotations

from intent.cli.commands import cli, main

__all__ = ["cli", "main"]
