"""The ``pp`` group: its options, the store opened on first use, and how pp speaks.

Every failure an operator can cause ends as one ``pp: error: ...`` line on stderr
and a non-zero exit: 1 for a refused or failed operation, 2 for a malformed
command. Every line pp prints goes through ``echo``, which escapes text from the
store so it cannot steer the terminal.
"""

from __future__ import annotations

import contextlib
import json
import os
import sys
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from typing import IO, Any

import click

from intent import keys
from intent.cli import operator as op
from intent.cli import render
from intent.model import IntentError
from intent.store import IntentStore, StoreError, default_store_url, open_store
from intent.usage import usage_line


class PPError(click.ClickException):
    exit_code = 1

    def show(self, file: IO[Any] | None = None) -> None:
        echo(f"pp: error: {render.one_line(self.message)}", err=file is None, file=file)


class PPUsageError(PPError):
    exit_code = 2


@contextlib.contextmanager
def _one_line_errors() -> Iterator[None]:
    try:
        yield
    except (PPError, click.exceptions.NoArgsIsHelpError):
        raise
    except click.UsageError as exc:
        raise PPUsageError(usage_line(exc)) from None
    except click.ClickException as exc:
        raise PPError(exc.format_message()) from None
    except (IntentError, op.OperatorError, StoreError) as exc:
        raise PPError(str(exc)) from None


class _Group(click.Group):
    """Turns every error below it into one line, under CliRunner and the real entry point."""

    def make_context(
        self,
        info_name: str | None,
        args: list[str],
        parent: click.Context | None = None,
        **extra: Any,
    ) -> click.Context:
        with _one_line_errors():
            return super().make_context(info_name, args, parent, **extra)

    def invoke(self, ctx: click.Context) -> Any:
        with _one_line_errors():
            return super().invoke(ctx)


@dataclass
class Env:
    url: str
    prefix: str
    _store: IntentStore | None = field(default=None, repr=False)

    def store(self) -> IntentStore:
        # Opened on first use so `pp validate` and `pp schema` need no store.
        if self._store is None:
            self._store = open_store(self.url, self.prefix)
        return self._store

    def close(self) -> None:
        if self._store is not None:
            self._store.close()
            self._store = None


pass_env = click.make_pass_decorator(Env)
json_option = click.option(
    "--json", "as_json", is_flag=True, help="Print JSON for scripts instead of text."
)


def echo(message: str, err: bool = False, nl: bool = True, file: IO[Any] | None = None) -> None:
    """Every line pp prints goes through here: text from the store is escaped."""
    click.echo(render.terminal_safe(message), err=err, nl=nl, file=file)


def print_json(value: Any) -> None:
    echo(json.dumps(value, indent=2, sort_keys=True))


def warn(message: str) -> None:
    echo(f"pp: warning: {render.one_line(message)}", err=True)


@click.group(name="pp", cls=_Group, context_settings={"help_option_names": ["-h", "--help"]})
@click.option(
    "--store",
    envvar="PP_STORE",
    default=default_store_url,
    show_default="$PP_STORE, else the embedded store",
    help="Intent store URL: sqlite:///abs/path.db or consul://host:port.",
)
@click.option(
    "--prefix",
    envvar="PP_PREFIX",
    default=keys.DEFAULT_PREFIX,
    show_default=True,
    help="Key prefix of this platform's intent in the store.",
)
@click.pass_context
def cli(ctx: click.Context, store: str, prefix: str) -> None:
    """Operate Platypus: write intent, deploy, roll back, see what agents report.

    Changes are recorded in the audit trail as $PP_ACTOR, or the login user.
    """
    env = Env(store, prefix)
    ctx.obj = env
    ctx.call_on_close(env.close)


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point: the exit code, never a traceback for anything an operator can cause."""
    try:
        result = cli.main(args=argv, prog_name="pp", standalone_mode=False)
    except click.ClickException as exc:
        exc.show()
        return exc.exit_code
    except click.Abort:
        echo("pp: error: interrupted", err=True)
        return 130
    except BrokenPipeError:
        # `pp history | head`: the reader left. Point stdout at /dev/null so the
        # interpreter's final flush does not fail again on the way out.
        with contextlib.suppress(OSError):
            os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        return 1
    return result if isinstance(result, int) else 0
