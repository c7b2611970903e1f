"""``pp-iptables``: the command line."""

from __future__ import annotations

import shlex
from pathlib import Path
from typing import Any

import click

from agents import statedir
from agents.entrypoint import AgentCommand, common_options, fail, pop_common, run
from agents.iptables.agent import Ip6tablesAgent, IptablesAgent
from agents.system.iptables import Iptables


def commands(
    ipv6: bool, iptables: str | None, restore: str | None, save: str | None
) -> tuple[list[str], list[str], list[str]]:
    """The three commands; restore and save default to ``--iptables`` plus a suffix,
    so ``--iptables iptables-legacy`` selects the whole legacy family."""
    base = _words("--iptables", iptables or ("ip6tables" if ipv6 else "iptables"))
    return (
        base,
        _words("--iptables-restore", restore) if restore else _suffixed(base, "-restore"),
        _words("--iptables-save", save) if save else _suffixed(base, "-save"),
    )


def _words(option: str, command: str) -> list[str]:
    try:
        words = shlex.split(command)
    except ValueError as exc:
        fail(f"{option} {command!r}: {exc}")
    if not words:
        fail(f"{option}: empty command")
    return words


def _suffixed(words: list[str], suffix: str) -> list[str]:
    return [*words[:-1], words[-1] + suffix]


@click.command("pp-iptables", cls=AgentCommand)
@common_options
@click.option(
    "--ipv6",
    is_flag=True,
    help="Apply the rules with ip6tables; reports as agent ip6tables.",
)
@click.option(
    "--iptables",
    "iptables_cmd",
    metavar="COMMAND",
    help="iptables command (default: iptables, or ip6tables with --ipv6); "
    "e.g. iptables-legacy or iptables-nft.",
)
@click.option(
    "--iptables-restore",
    "restore_cmd",
    metavar="COMMAND",
    help="iptables-restore command (default: the --iptables command + '-restore').",
)
@click.option(
    "--iptables-save",
    "save_cmd",
    metavar="COMMAND",
    help="iptables-save command (default: the --iptables command + '-save').",
)
@click.option(
    "--state-dir",
    type=click.Path(file_okay=False, path_type=Path),
    default=None,
    show_default="/var/lib/platypus/<agent> for root, else ~/.local/state/platypus/<agent>",
    help="The agent's own notes on the host (which store it trusts).",
)
def main(**params: Any) -> None:
    """Open and map the ports of the apps assigned to this node, in chains of its own."""
    common = pop_common(params)
    ipv6 = bool(params["ipv6"])
    tables = Iptables(
        *commands(ipv6, params["iptables_cmd"], params["restore_cmd"], params["save_cmd"])
    )
    agent_class = Ip6tablesAgent if ipv6 else IptablesAgent
    state_dir = (params["state_dir"] or statedir.default(agent_class.name)).absolute()
    run(
        common,
        lambda store, stop: agent_class(store, common.node, tables),
        state_dir=state_dir,
    )


if __name__ == "__main__":
    main()
