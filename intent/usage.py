"""How a malformed command line is told: one line, the fix and where to read more.
Shared by ``pp`` and the agents' commands, so both say it the same way."""

from __future__ import annotations

import click


def usage_line(exc: click.UsageError) -> str:
    """``<what is wrong> (see '<command> --help')``."""
    hint = f" (see '{exc.ctx.command_path} --help')" if exc.ctx is not None else ""
    return exc.format_message() + hint
