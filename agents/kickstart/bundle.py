"""Lay out the agent bundle: the agents' own artifact, deployed through intent like any app.

    src/intent/, src/agents/     the code, copied from a checkout
    bin/launch/<agent>           one runit service per agent (preparer, setlive, iptables)
    bin/check                    the health gate of a release
    VERSION                      the version this tree was built as

Only the code travels in the bundle; its dependencies stay in the virtualenv of the
checkout that built it (``python``), so a release that needs new dependencies needs
``scripts/setup`` on each host first. Every flag an agent runs with is baked into its
launch script: the bundle describes one host's agents completely, and ``current``
moving to a new install is the whole upgrade.

``python -m agents.kickstart.bundle OUT ...`` builds the tree and prints its version.
"""

from __future__ import annotations

import importlib.metadata
import os
import shlex
import shutil
from dataclasses import dataclass
from pathlib import Path

import click

from intent.cli.pack import build as build_artifact

PACKAGES = ("intent", "agents")
AGENTS = ("preparer", "setlive")
OPTIONAL_AGENTS = ("iptables",)
LOCK_WAIT_S = 300


@dataclass(frozen=True)
class BundleSpec:
    """How this host's agents run: the interpreter and every flag they are given."""

    python: Path
    store: str
    prefix: str
    node: str
    repo: str
    runit_dir: Path
    stage: Path
    state_dir: Path
    log_root: Path
    with_iptables: bool = False

    @property
    def agents(self) -> tuple[str, ...]:
        return AGENTS + (OPTIONAL_AGENTS if self.with_iptables else ())


def agent_flags(spec: BundleSpec, agent: str) -> list[str]:
    flags = ["--store", spec.store, "--prefix", spec.prefix, "--node", spec.node]
    if agent == "preparer":
        # Its locks live beside setlive's state (/var/lib/platypus/{setlive,preparer}).
        flags += ["--repo", spec.repo, "--state-dir", str(spec.state_dir.parent / "preparer")]
    if agent == "setlive":
        flags += [
            "--runit", str(spec.runit_dir),
            "--runit-stage", str(spec.stage),
            "--state-dir", str(spec.state_dir),
            "--log-root", str(spec.log_root),
        ]  # fmt: skip
    return flags


def launch_script(spec: BundleSpec, agent: str) -> str:
    """``bin/launch/<agent>``: exec the agent from the install the script lies in.

    The install is found from the script's own path, resolved, so a process keeps
    running its own release's code after ``current`` moves on.
    """
    command = shlex.join([str(spec.python), "-m", f"agents.{agent}", *agent_flags(spec, agent)])
    wait = ""
    if agent == "setlive":
        lock = shlex.quote(str(spec.state_dir / ".lock"))
        # A setlive run by hand on the same state dir (the kickstart's --once, gating
        # this very service) holds its lock: wait for it instead of crash-looping
        # through that gate.
        wait = f"[ -e {lock} ] && flock -w {LOCK_WAIT_S} {lock} true\n"
    return (
        "#!/bin/sh\n"
        f"# pp-{agent} from this install's code, with the virtualenv's dependencies.\n"
        "exec 2>&1\n"
        'here=$(cd "$(dirname "$0")/../.." && pwd -P) || exit 1\n'
        f"{wait}"
        'export PYTHONPATH="$here/src" PYTHONDONTWRITEBYTECODE=1\n'
        f"exec {command}\n"
    )


_CHECK_CODE = """\
import sys
import agents
{imports}
src = sys.argv[1]
if not agents.__file__.startswith(src + "/"):
    sys.exit(f"agents load from {{agents.__file__}}, not from {{src}}")
print(f"ok: {names} load from {{src}}")
"""


def check_script(spec: BundleSpec) -> str:
    """``bin/check``: the release's agents import from this install with the
    virtualenv's dependencies. Cheap, and it fails a release whose code or
    dependencies are broken before runit restarts the agents into it."""
    code = _CHECK_CODE.format(
        imports="\n".join(f"import agents.{a}.__main__" for a in spec.agents),
        names=", ".join(spec.agents),
    )
    command = shlex.join([str(spec.python), "-c", code, "$SRC"]).replace("'$SRC'", '"$SRC"')
    return (
        "#!/bin/sh\n"
        "# Healthy when this install's agents load from it with the virtualenv's dependencies.\n"
        'here=$(cd "$(dirname "$0")/.." && pwd -P) || exit 1\n'
        'SRC="$here/src"\n'
        "cd / || exit 1\n"
        'export PYTHONPATH="$SRC" PYTHONDONTWRITEBYTECODE=1\n'
        f"exec {command}\n"
    )


def _write(path: Path, text: str, mode: int) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(text)
    path.chmod(mode)


def tree_digest(directory: Path) -> str:
    """The sha256 the tree would pack to, whatever ``SOURCE_DATE_EPOCH`` says."""
    with open(os.devnull, "wb") as sink:
        return build_artifact(directory, sink, mtime=0)


def default_version(digest: str) -> str:
    try:
        release = importlib.metadata.version("platypus-deploy")
    except importlib.metadata.PackageNotFoundError:
        release = "0"
    return f"{release}-{digest[:12]}"


def build_bundle(source: Path, out: Path, spec: BundleSpec, version: str | None = None) -> str:
    """Lay the bundle out in ``out`` (which must not exist) from the checkout at
    ``source``; returns its version, by default derived from the tree itself, so
    unchanged code and flags give the same version again."""
    for package in PACKAGES:
        if not (source / package / "__init__.py").is_file():
            raise click.ClickException(f"{source}: no {package}/ package here; pass a checkout")
    out.mkdir(parents=True)
    for package in PACKAGES:
        shutil.copytree(
            source / package,
            out / "src" / package,
            ignore=shutil.ignore_patterns("__pycache__", "*.pyc", ".*"),
        )
    for agent in spec.agents:
        _write(out / "bin" / "launch" / agent, launch_script(spec, agent), 0o755)
    _write(out / "bin" / "check", check_script(spec), 0o755)
    if version is None:
        version = default_version(tree_digest(out))
    _write(out / "VERSION", version + "\n", 0o644)
    return version


@click.command("agents.kickstart.bundle")
@click.argument("out", type=click.Path(exists=False, path_type=Path))
@click.option(
    "--source",
    type=click.Path(file_okay=False, path_type=Path),
    default=".",
    show_default=True,
    help="The checkout whose code goes in.",
)
@click.option(
    "--python",
    "python",
    required=True,
    type=click.Path(path_type=Path),
    help="Interpreter of the virtualenv with the dependencies.",
)
@click.option("--store", required=True, help="Intent store URL the agents use.")
@click.option("--prefix", default="platypus/", show_default=True)
@click.option("--node", required=True, help="This host's node name.")
@click.option("--repo", required=True, help="Artifact repository for pp-preparer.")
@click.option("--runit", "runit_dir", required=True, type=click.Path(path_type=Path))
@click.option("--stage", required=True, type=click.Path(path_type=Path))
@click.option("--state-dir", required=True, type=click.Path(path_type=Path))
@click.option("--log-root", required=True, type=click.Path(path_type=Path))
@click.option(
    "--with-iptables", is_flag=True, help="Also run pp-iptables (it changes the firewall)."
)
@click.option("--version", "version", default=None, help="Default: derived from the tree.")
def main(out: Path, source: Path, version: str | None, **flags: object) -> None:
    """Lay the agent bundle out in OUT and print its version."""
    if out.exists():
        raise click.ClickException(f"{out}: already exists; pass a new directory")
    spec = BundleSpec(
        python=Path(str(flags["python"])).absolute(),
        store=str(flags["store"]),
        prefix=str(flags["prefix"]),
        node=str(flags["node"]),
        repo=str(flags["repo"]),
        runit_dir=Path(str(flags["runit_dir"])).absolute(),
        stage=Path(str(flags["stage"])).absolute(),
        state_dir=Path(str(flags["state_dir"])).absolute(),
        log_root=Path(str(flags["log_root"])).absolute(),
        with_iptables=bool(flags["with_iptables"]),
    )
    click.echo(build_bundle(source.absolute(), out, spec, version))


if __name__ == "__main__":
    main()
