"""``pp``: the operator's tool. Operators write intent with it; the agents read that intent.

- ``group``: the ``pp`` group, its options, one-line errors, terminal-safe output, ``main``
- ``commands``: app files and changes to intent (apply, validate, get, schema, deploy,
  rollback, assign, retry)
- ``trust_commands``: what an absence means, or standing back (unassign, drain, init)
- ``report_commands``: what the agents report and what pp changed (status, history)
- ``watch_commands``: ``--wait``, following a change's rollout over ``rollout`` (pure),
  ``fleet`` (reading targets and reports) and ``rollout_view`` (how it is shown)
- ``web``: ``pp web``, a read-only status page of the fleet
- ``pack_command``: ``pp pack``, over ``pack`` (deterministic artifacts, published)
- ``bundle_command``: ``pp bundle``, over ``bundle`` (the agents' own self-contained tarball)
- ``operator``: the read-modify-write of one key, and the pure transforms it applies
- ``render``: tables, diffs and terminal-safe text
- ``appfile``: app files (YAML), one app's clusters as ``pp apply`` and ``pp get`` see them
- ``schema``: the JSON Schema of app files and of stored values
"""

from __future__ import annotations

from intent.cli import bundle_command, commands, pack_command, report_commands, trust_commands, web
from intent.cli.group import cli, main

# Qualified names: ``schema`` and ``pack`` are modules of this package too, and
# binding the commands to those names here would hide the modules.
for _command in (
    *(commands.apply, commands.validate, commands.schema, commands.get),
    *(commands.deploy, commands.rollback, commands.assign, commands.retry),
    *(trust_commands.unassign, trust_commands.drain, trust_commands.undrain, trust_commands.init),
    *(report_commands.status, report_commands.history, web.web),
    pack_command.pack,
    bundle_command.bundle_command,
):
    cli.add_command(_command)

__all__ = ["cli", "main"]
