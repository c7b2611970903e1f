"""``bin/kickstart``: make this host run the agents of the bundle it is run from.

    bin/kickstart --store URL --node NAME [--init runit|systemd] [--agents LIST] ...

1. re-packs the bundle's tree (the same bytes as the tarball it came from, which
   ``--sha256`` checks) and publishes it as app ``platypus`` in ``--repo``;
2. writes the intent: cluster ``agents`` (its ``deploy_config`` on the first host),
   this node assigned, this version active with its sha256;
3. writes ``<basedir>/agents.json``, what this host's agents run with (hostconfig),
   and under ``--init systemd`` their units, enabled;
4. the first time, installs and starts the release with the agents' own code, run
   once: pp-preparer fetches, verifies and extracts it, pp-setlive starts its services
   under runit, health-gated. From then on the running agents deploy themselves: a
   later run, or ``pp deploy platypus``, only changes intent.

Idempotent: a second run with the same bundle and flags changes nothing.
"""

from __future__ import annotations

import contextlib
import fcntl
import json
import os
import shlex
import shutil
import socket
import subprocess
import sys
import tempfile
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any, TypeVar
from urllib.parse import unquote, urlsplit

import click
import yaml

from agents.kickstart import units
from agents.kickstart.hostconfig import CLUSTER, INITS, PYTHON_LINK, HostConfig
from agents.system import fs, runit
from intent import keys
from intent.artifacts import artifact_url
from intent.cli import pack
from intent.cli.bundle import AGENTS, sha256_of
from intent.cli.bundle import NAME as APP
from intent.store import StoreError, default_store_url, open_store

# bin/check imports every agent and dependency: seconds on an idle host, far more on a
# busy one; a slow gate only delays a deploy, a gate too short fails good releases.
HEALTH_CHECK = {
    "type": "exec",
    "interval_s": 0.5,
    "timeout_s": 60,
    "healthy_threshold": 2,
    "min_uptime_s": 2,
    "deadline_s": 120,
}
REQUIRED_AGENTS = ("preparer", "setlive")


F = TypeVar("F", bound=Callable[..., Any])


class KickstartError(click.ClickException):
    def show(self, file: object = None) -> None:
        click.echo(f"kickstart: error: {self.message}", err=True)


@dataclass(frozen=True)
class Bundle:
    root: Path

    @property
    def version(self) -> str:
        return self._read("VERSION")

    @property
    def python(self) -> str:
        return self._read("PYTHON")

    def _read(self, name: str) -> str:
        try:
            return (self.root / name).read_text().strip()
        except OSError as exc:
            raise KickstartError(
                f"{self.root / name}: {exc.strerror}; run bin/kickstart from an unpacked bundle"
            ) from exc


def say(message: str) -> None:
    click.echo(f"kickstart: {message}")


def check_python(bundle: Bundle) -> None:
    running = f"{sys.version_info.major}.{sys.version_info.minor}"
    if bundle.python != running:
        raise KickstartError(
            f"this bundle was built for Python {bundle.python} and python3 here is {running}: "
            f"build one with python{running} (pp bundle), or install python{bundle.python}"
        )


def publish(
    bundle: Bundle, tarball: Path | None, repo: str, expected: str | None, dry_run: bool
) -> str:
    """Publish the bundle as app ``platypus`` in ``repo``; returns its sha256.

    ``tarball``: the verified download itself is published, byte for byte. Without
    it, the unpacked tree is packed again, which gives the tarball's bytes when the
    tree is as unpacked (``pp bundle`` and ``pp pack`` build alike); ``expected``
    catches a tree changed since.
    """
    if tarball is not None:
        if tarball.name != f"{APP}-{bundle.version}.tar.gz":
            raise KickstartError(
                f"{tarball}: not {APP}-{bundle.version}.tar.gz, the tarball of this tree"
            )
        sha256 = sha256_of(tarball)
        what = str(tarball)
    else:
        with open(os.devnull, "wb") as sink:
            sha256 = pack.build(bundle.root, sink, mtime=0)
        what = f"{bundle.root} packs to"
    if expected is not None and sha256 != expected.lower():
        raise KickstartError(
            f"{what} sha256 {sha256}, not {expected}: it changed since it was verified "
            "(or --sha256 is another bundle's); download and unpack the tarball again"
        )
    if dry_run:
        say(f"would publish {APP} {bundle.version} (sha256 {sha256}) into {repo}")
        return sha256
    try:
        if tarball is not None:
            published = publish_file(tarball, sha256, repo, bundle.version)
        else:
            os.environ["SOURCE_DATE_EPOCH"] = "0"  # bundles are built with mtime 0
            published = pack.pack(bundle.root, APP, bundle.version, repo)
    except pack.PackError as exc:
        raise KickstartError(str(exc)) from exc
    if published.sha256 != sha256:  # the tree changed while it was published
        raise KickstartError(f"{bundle.root} changed while it was published; run again")
    state = "already published" if published.unchanged else "published"
    say(f"{state} {APP} {bundle.version} (sha256 {sha256}) at {published.url}")
    return sha256


def publish_file(tarball: Path, sha256: str, repo: str, version: str) -> pack.Published:
    """Copy ``tarball`` into a ``file://`` repo (temp name, then rename); a version
    already there with other bytes is refused: hosts may have installed it."""
    url = artifact_url(repo, APP, version)
    if urlsplit(url).scheme != "file":
        raise pack.PackError(
            f"--repo {repo}: --tarball publishes to a file:// repo; for another, publish "
            "the tarball there yourself and leave --tarball out"
        )
    dest = Path(unquote(urlsplit(url).path))
    size = tarball.stat().st_size
    if dest.exists():
        if sha256_of(dest) != sha256:
            raise pack.PackError(
                f"{dest} already exists with different contents; publish a new version"
            )
        return pack.Published(url, sha256, size, unchanged=True)
    dest.parent.mkdir(parents=True, exist_ok=True)
    temp = dest.with_name(f"{pack.TEMP_MARK}{dest.name}.{os.getpid()}")
    try:
        shutil.copyfile(tarball, temp)
        with temp.open("rb") as f:
            os.fsync(f.fileno())
        os.replace(temp, dest)
    finally:
        temp.unlink(missing_ok=True)
    return pack.Published(url, sha256, size, unchanged=False)


def pp(args: list[str], store: str, prefix: str, dry_run: bool) -> None:
    """Run ``pp`` from this bundle: intent is written as an operator writes it, with
    pp's own validation and audit trail."""
    if dry_run:
        say("would run: pp " + shlex.join(args))
        return
    env = os.environ | {"PP_STORE": store, "PP_PREFIX": prefix}
    done = subprocess.run(
        [sys.executable, "-c", "from intent.cli import main; main()", *args],
        env=env,
        capture_output=True,
        text=True,
        check=False,
    )
    output = (done.stdout + done.stderr).strip()
    if done.returncode != 0:
        raise KickstartError(output.splitlines()[-1] if output else f"pp {args[0]} failed")
    for line in output.splitlines():
        say(line)


def write_intent(
    config: HostConfig, basedir: Path, version: str, sha256: str, dry_run: bool
) -> None:
    try:
        with open_store(config.store, config.prefix, create=not dry_run) as store:
            deploy_config = store.get_raw(keys.deploy_config(APP, CLUSTER))
    except StoreError as exc:
        if not dry_run:
            raise KickstartError(f"store {config.store}: {exc}") from exc
        deploy_config = None  # a dry run creates no store: as on the first host
    if deploy_config is None:
        app_file = {
            "app": APP,
            "clusters": {
                CLUSTER: {
                    "deploy_config": {
                        "basedir": str(basedir),
                        "run_as": "root",
                        "health_check": HEALTH_CHECK,
                    },
                    "nodes": [config.node],
                }
            },
        }
        if dry_run:
            say("would create the app with pp apply -f:")
            click.echo(yaml.safe_dump(app_file, sort_keys=False), nl=False)
            return _assign_and_deploy(config, version, sha256, dry_run)
        with tempfile.NamedTemporaryFile("w", suffix=".yaml", prefix="pp-kickstart-") as f:
            yaml.safe_dump(app_file, f)
            f.flush()
            pp(["apply", "-f", f.name], config.store, config.prefix, dry_run)
    else:
        their = _basedir_of(deploy_config.value)
        if their != str(basedir):
            raise KickstartError(
                f"{keys.deploy_config(APP, CLUSTER)} installs the agents in {their}: "
                f"pass --basedir {their}"
            )
    _assign_and_deploy(config, version, sha256, dry_run)


def _assign_and_deploy(config: HostConfig, version: str, sha256: str, dry_run: bool) -> None:
    pp(["assign", APP, config.node, "--cluster", CLUSTER], config.store, config.prefix, dry_run)
    pp(
        ["deploy", APP, version, "--cluster", CLUSTER, "--sha256", sha256],
        config.store,
        config.prefix,
        dry_run,
    )


def _basedir_of(raw: bytes) -> str | None:
    try:
        value = json.loads(raw)
    except ValueError:
        return None
    basedir = value.get("basedir") if isinstance(value, dict) else None
    return str(basedir) if basedir is not None else None


def runsvdir_watches(runit_dir: Path) -> bool:
    for proc in Path("/proc").iterdir():
        if not proc.name.isdigit():
            continue
        try:
            argv = (proc / "cmdline").read_bytes().split(b"\0")
        except OSError:
            continue
        named = argv and Path(argv[0].decode(errors="replace")).name == "runsvdir"
        if named and str(runit_dir).encode() in argv[1:]:
            return True
    return False


def systemctl(*args: str, check: bool = True) -> subprocess.CompletedProcess[str]:
    done = subprocess.run(["systemctl", *args], capture_output=True, text=True, check=False)
    if check and done.returncode != 0:
        detail = (done.stderr or done.stdout).strip().splitlines()
        raise KickstartError(
            f"systemctl {' '.join(args)} failed: {detail[-1] if detail else done.returncode}"
        )
    return done


def install_units(config: HostConfig, basedir: Path, dry_run: bool) -> None:
    """Write and enable the agents' units; they start when their runit service (the
    release's follower) restarts them, so a unit never runs before its release is
    installed."""
    unit_dir = Path(config.unit_dir)
    names = [units.unit_name(agent) for agent in config.agents]
    if dry_run:
        for agent in config.agents:
            say(f"would write {unit_dir / units.unit_name(agent)}:")
            click.echo(units.unit_text(agent, basedir))
        return
    unit_dir.mkdir(parents=True, exist_ok=True)
    changed = False
    for agent in config.agents:
        text = units.unit_text(agent, basedir).encode()
        changed |= fs.write_atomic(unit_dir / units.unit_name(agent), text, 0o644)
    if changed:
        systemctl("daemon-reload")
    systemctl("enable", "--quiet", *names)
    say(f"units {', '.join(names)} in {unit_dir}, enabled")


def ensure_runsvdir(config: HostConfig, dry_run: bool) -> None:
    """Apps (and the agents' followers) run under runit: a runsvdir must watch
    ``--runit``. Under ``--init systemd`` one is started as ``platypus-runsvdir.service``
    when none watches yet (units.py says why not Debian's own unit)."""
    runit_dir = Path(config.runit_dir)
    if runsvdir_watches(runit_dir):
        return
    if config.init == "systemd":
        binary = shutil.which("runsvdir")
        if binary is None:
            raise KickstartError("runsvdir not found: install runit (apt-get install runit)")
        unit = Path(config.unit_dir) / units.RUNSVDIR_UNIT
        text = units.runsvdir_unit_text(binary, runit_dir)
        if dry_run:
            say(f"would write {unit} and run: systemctl enable --now {units.RUNSVDIR_UNIT}:")
            click.echo(text, nl=False)
            return
        runit_dir.mkdir(parents=True, exist_ok=True)
        unit.parent.mkdir(parents=True, exist_ok=True)
        if fs.write_atomic(unit, text.encode(), 0o644):
            systemctl("daemon-reload")
        systemctl("enable", "--now", "--quiet", units.RUNSVDIR_UNIT)
        say(f"started {units.RUNSVDIR_UNIT} (runsvdir on {runit_dir})")
        return
    if dry_run:
        say(f"no runsvdir watches {runit_dir} yet; one must before the agents can start")
        return
    raise KickstartError(
        f"no runsvdir watches {runit_dir}: start one (setsid runsvdir -P {runit_dir} &, or "
        "kickstart with --init systemd, which runs it as a unit)"
    )


def setlive_runs(config: HostConfig) -> bool:
    """A pp-setlive already runs here: it deploys new versions itself (and a second
    setlive on the same state dir would refuse to start)."""
    if config.init == "systemd":
        active = systemctl("is-active", units.unit_name("setlive"), check=False)
        if active.stdout.strip() == "active":
            return True
    elif runit.status(Path(config.stage) / f"{APP}-setlive").up:
        return True
    lock = config.state_of("setlive") / ".lock"
    with contextlib.suppress(FileNotFoundError):
        fd = os.open(lock, os.O_RDONLY | os.O_CLOEXEC)
        try:
            fcntl.flock(fd, fcntl.LOCK_SH | fcntl.LOCK_NB)
        except BlockingIOError:
            return True
        finally:
            os.close(fd)
    return False


def run_once(config: HostConfig, agent: str) -> None:
    """One pass of ``agent`` from this bundle's code, with the host's flags."""
    module = "agents." + agent.replace("-", "_")
    done = subprocess.run(
        [sys.executable, "-m", module, "--once", *config.flags(agent)], check=False
    )
    if done.returncode != 0:
        raise KickstartError(
            f"pp-{agent} --once could not converge {APP} (see above, or: pp status {APP})"
        )


def _absolute(ctx: click.Context, param: click.Parameter, value: Path) -> Path:
    if not value.is_absolute():
        raise click.BadParameter(f"{value}: give an absolute path (the agents run from elsewhere)")
    return value


def _agents(ctx: click.Context, param: click.Parameter, value: str) -> tuple[str, ...]:
    chosen = tuple(dict.fromkeys(a.strip() for a in value.split(",") if a.strip()))
    unknown = [a for a in chosen if a not in AGENTS]
    if unknown:
        raise click.BadParameter(f"{', '.join(unknown)}: not an agent (one of {', '.join(AGENTS)})")
    missing = [a for a in REQUIRED_AGENTS if a not in chosen]
    if missing:
        raise click.BadParameter(f"{', '.join(missing)} must be among them: they deploy the rest")
    return tuple(a for a in AGENTS if a in chosen)


def _path_option(name: str, default: str, help: str) -> Callable[[F], F]:
    return click.option(
        name, default=default, show_default=True, type=Path, callback=_absolute, help=help
    )


@click.command("kickstart")
@click.option("--bundle", "bundle_root", required=True, type=Path, hidden=True)
@click.option("--store", envvar="PP_STORE", default=None, help="Intent store URL (env PP_STORE).")
@click.option("--prefix", envvar="PP_PREFIX", default=keys.DEFAULT_PREFIX, show_default=True)
@click.option("--node", default=socket.gethostname, help="This host's node name (the hostname).")
@click.option("--init", type=click.Choice(INITS), default="runit", show_default=True)
@click.option(
    "--agents",
    default="preparer,setlive",
    show_default=True,
    callback=_agents,
    help=f"Agents to run here, of {','.join(AGENTS)} (pp-iptables changes the firewall).",
)
@_path_option("--runit", "/etc/service", "Directory runsvdir watches (apps run under runit).")
@_path_option("--stage", "/etc/platypus/service-stage", "pp-setlive's service stage.")
@_path_option("--basedir", "/opt/platypus", "Where the agents' releases are installed.")
@_path_option("--state-dir", "/var/lib/platypus", "The agents' state, one directory each.")
@_path_option("--log-root", "/var/log/platypus", "Logs of the services under runit.")
@_path_option("--unit-dir", "/etc/systemd/system", "Where --init systemd writes units.")
@click.option(
    "--repo",
    default="file:///var/lib/platypus/repo",
    show_default=True,
    help="Artifact repository the bundle is published to and fetched from.",
)
@click.option(
    "--guard-deadline",
    type=click.FloatRange(min=1),
    default=None,
    help="Seconds a self-deploy's guard waits for the new pp-setlive (its default: from "
    "the health check).",
)
@click.option(
    "--tarball",
    type=click.Path(exists=True, dir_okay=False, path_type=Path),
    default=None,
    help="The tarball this tree was unpacked from: published as it is (file:// repos).",
)
@click.option("--sha256", "expected", default=None, help="The sha256 the tarball was verified to.")
@click.option("--dry-run", is_flag=True, help="Say what would be done; change nothing.")
def main(
    bundle_root: Path,
    store: str | None,
    prefix: str,
    node: str,
    init: str,
    agents: tuple[str, ...],
    runit: Path,
    stage: Path,
    basedir: Path,
    state_dir: Path,
    log_root: Path,
    unit_dir: Path,
    repo: str,
    guard_deadline: float | None,
    tarball: Path | None,
    expected: str | None,
    dry_run: bool,
) -> None:
    """Install this bundle's agents on this host and start them (as root)."""
    bundle = Bundle(bundle_root.resolve())
    check_python(bundle)
    if not dry_run and os.geteuid() != 0:
        raise KickstartError("run as root: the agents run as root")
    if repo.startswith("/"):
        repo = f"file://{repo}"
    config = HostConfig(
        store=store or default_store_url(),
        prefix=prefix,
        node=node,
        repo=repo,
        init=init,
        agents=agents,
        runit_dir=str(runit),
        stage=str(stage),
        state_dir=str(state_dir),
        log_root=str(log_root),
        unit_dir=str(unit_dir),
        guard_deadline=guard_deadline,
    )
    version = bundle.version
    sha256 = publish(bundle, tarball, repo, expected, dry_run)
    ensure_runsvdir(config, dry_run)
    write_intent(config, basedir, version, sha256, dry_run)
    if dry_run:
        say(f"would write {basedir / 'agents.json'}:")
        click.echo(config.to_bytes().decode(), nl=False)
    else:
        basedir.mkdir(mode=0o755, parents=True, exist_ok=True)
        if config.save(basedir):
            say(f"wrote {basedir / 'agents.json'}")
        if fs.symlink_atomic(sys.executable, basedir / PYTHON_LINK):
            say(f"the agents run with {sys.executable} ({basedir / PYTHON_LINK})")
    if init == "systemd":
        install_units(config, basedir, dry_run)
    if dry_run:
        return
    if setlive_runs(config):
        say(f"pp-setlive already runs here: the agents install and switch to {version} themselves")
        return
    run_once(config, "preparer")
    run_once(config, "setlive")
    say(
        f"{APP} {version} runs here ({', '.join('pp-' + a for a in agents)}, under {init}), "
        f"from {basedir}/current"
    )


if __name__ == "__main__":
    main()
