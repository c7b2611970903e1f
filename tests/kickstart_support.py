"""Bundles built from a snapshot of this checkout, and a host that cannot see the checkout.

``built(name, ...)`` builds a bundle once per test run (the build takes a while: every
dependency is installed from the wheelhouse and the tree packed). The code comes from
a snapshot of ``intent/`` and ``agents/`` taken once, so two builds compare equal even
while the checkout is being edited.

``BareHost`` runs a private runsvdir and every kickstart inside a mount namespace whose
view of the checkout is an empty tmpfs, with a clean environment (no PATH into a
virtualenv, no PYTHONPATH): what runs there runs from the bundle and the host's python3,
or not at all.
"""

from __future__ import annotations

import contextlib
import functools
import os
import shutil
import signal
import subprocess
import tarfile
import tempfile
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

import pytest
from runit_support import Runsvdir as _Runsvdir
from runit_support import kill_our_guards, require_root, require_runit, stop_runsvdir, wait_for

from agents.setlive.observe import read_environ
from agents.setlive.state import StateDir
from agents.system import runit
from agents.system.layout import AppLayout
from intent import keys
from intent.cli import bundle, pack
from intent.model import Reality
from intent.store import IntentStore
from intent.store.sqlite import SqliteStore

REPO = Path(__file__).resolve().parent.parent
APP = "platypus"
NODE = "n1"
CLEAN_PATH = "/usr/sbin:/usr/bin:/sbin:/bin"
_SCRATCH = Path(tempfile.mkdtemp(prefix="pp-bundles-"))


@functools.cache
def source_snapshot() -> Path:
    target = _SCRATCH / "source"
    for package in bundle.PACKAGES:
        shutil.copytree(
            REPO / package, target / package, ignore=shutil.ignore_patterns("__pycache__", "*.pyc")
        )
    return target


@functools.cache
def probe_wheels() -> Path:
    """Wheels of a tiny dependency, ``ppprobe`` 1.0 and 2.0, built here (no index needed):
    a release that changes a dependency's version carries the other one."""
    wheels = _SCRATCH / "probe-wheels"
    for version in ("1.0", "2.0"):
        project = _SCRATCH / f"ppprobe-{version}"
        (project / "ppprobe").mkdir(parents=True)
        (project / "ppprobe" / "__init__.py").write_text(f'VERSION = "{version}"\n')
        (project / "pyproject.toml").write_text(
            "[build-system]\nrequires = []\nbuild-backend = 'setuptools.build_meta'\n"
            f"[project]\nname = 'ppprobe'\nversion = '{version}'\n"
        )
        subprocess.run(
            [bundle.sys.executable, "-m", "pip", "wheel", "-q", "--no-deps", "--no-build-isolation",
             "--wheel-dir", str(wheels), str(project)],
            check=True, capture_output=True, env=os.environ | {"SOURCE_DATE_EPOCH": "0"},
        )  # fmt: skip
    return wheels


@functools.cache
def built(name: str, version: str | None = None, probe: str | None = None) -> bundle.Built:
    extra = [f"ppprobe=={probe}"] if probe else []
    links = [probe_wheels()] if probe else []
    return bundle.build(
        _SCRATCH / "out" / name, version, extra=extra, links=links, source=source_snapshot()
    )


def unpack(tarball: Path, into: Path) -> Path:
    into.mkdir(parents=True)
    with tarfile.open(tarball) as tar:
        tar.extractall(into, filter="tar")
    return into


def broken_bundle(good: Path, version: str, out: Path) -> tuple[Path, str]:
    """A release whose agents cannot start: pp-setlive's entry point fails to import."""
    tree = unpack(good, out / "tree")
    (tree / "VERSION").write_text(version + "\n")
    main = tree / "src" / "agents" / "setlive" / "__main__.py"
    main.write_text("raise SystemExit('this release of pp-setlive is broken')\n" + main.read_text())
    target = out / f"{APP}-{version}.tar.gz"
    with target.open("wb") as sink:
        sha = pack.build(tree, sink, mtime=0)
    return target, sha


def _hidden(command: list[str], env: dict[str, str]) -> list[str]:
    """``command`` in a new mount namespace where the checkout is an empty tmpfs."""
    prelude = f"mount -t tmpfs -o size=1m,mode=0755 pp-hidden-checkout {REPO}"
    exported = " ".join(f"{k}={v}" for k, v in env.items())
    return [
        "unshare", "--mount", "--propagation", "private", "sh", "-c",
        f'{prelude} && exec env -i {exported} "$@"', "sh", *command,
    ]  # fmt: skip


@dataclass
class BareHost:
    """A host with python3 and runit, Platypus's files under ``root``, no checkout."""

    root: Path
    runsvdir: _Runsvdir
    store: IntentStore = field(init=False)

    def __post_init__(self) -> None:
        self.store = IntentStore(SqliteStore(self.root / "store.db"))

    @property
    def store_url(self) -> str:
        return f"sqlite://{self.root / 'store.db'}"

    @property
    def env(self) -> dict[str, str]:
        return {"PATH": CLEAN_PATH, "HOME": str(self.root), "LANG": "C.UTF-8"}

    @property
    def layout(self) -> AppLayout:
        return AppLayout(self.root / "opt" / APP, APP)

    @property
    def stage(self) -> Path:
        return self.root / "stage"

    @property
    def state_dir(self) -> Path:
        return self.root / "state"

    def kickstart(self, bundle_dir: Path, *extra: str) -> subprocess.CompletedProcess[str]:
        command = [
            str(bundle_dir / "bin" / "kickstart"),
            "--store", self.store_url,
            "--node", NODE,
            "--runit", str(self.runsvdir.service_dir),
            "--stage", str(self.stage),
            "--basedir", str(self.layout.basedir),
            "--state-dir", str(self.state_dir),
            "--log-root", str(self.root / "log"),
            "--repo", f"file://{self.root / 'repo'}",
            *extra,
        ]  # fmt: skip
        return subprocess.run(
            _hidden(command, self.env),
            capture_output=True,
            text=True,
            timeout=240,
            cwd=self.root,
            check=False,
        )

    def report(self, agent: str, app: str = APP) -> Reality | None:
        found = [r for r in self.store.reality(NODE, app) if r.agent == agent]
        return found[0] if found else None

    def service(self, agent: str) -> runit.ServiceStatus:
        return runit.status(self.stage / f"{APP}-{agent}")

    def running(self, agent: str) -> dict[str, str]:
        status = self.service(agent)
        if not status.up or status.pid is None:
            return {}
        return read_environ(status.pid) or {}

    def runs(self, agent: str, version: str) -> bool:
        """``agent`` runs ``version``'s code, from its install, with the host's python3."""
        status = self.service(agent)
        if not status.up or status.pid is None:
            return False
        env = read_environ(status.pid) or {}
        install = self.layout.install_dir(version)
        try:
            argv = Path(f"/proc/{status.pid}/cmdline").read_bytes().split(b"\0")
        except OSError:
            return False
        return (
            env.get("PP_VERSION") == version
            and env.get("PYTHONPATH") == f"{install}/src:{install}/site"
            and b"-m" in argv
            and f"agents.{agent.replace('-', '_')}".encode() in argv
        )

    def reports_since(self, agent: str, version: str, since: float, app: str = APP) -> bool:
        report = self.report(agent, app)
        return (
            report is not None
            and report.updated_at > since
            and (report.status, report.version) == ("converged", version)
        )

    def pending(self) -> object:
        return StateDir(self.state_dir / "setlive").load(APP).pending

    def current(self) -> str | None:
        return self.layout.version_of(self.layout.current)

    def put_sample_app(self, version: str, basedir: Path) -> None:
        """Publish a one-service app and make ``version`` of it active on this node."""
        tree = self.root / "build" / f"sample-{version}"
        (tree / "bin").mkdir(parents=True)
        (tree / "bin" / "launch").write_text("#!/bin/sh\nexec sleep 100000\n")
        (tree / "bin" / "check").write_text("#!/bin/sh\necho ok\n")
        for script in ("launch", "check"):
            (tree / "bin" / script).chmod(0o755)
        published = pack.pack(tree, "sample", version, f"file://{self.root / 'repo'}")
        self.store.put_json(keys.node_app(NODE, "sample"), {"cluster": "c"})
        self.store.put_json(
            keys.config("sample", "c"),
            {"versions": {version: {"state": "active", "sha256": published.sha256}}},
        )
        health = {"type": "exec", "interval_s": 0.2, "healthy_threshold": 1, "min_uptime_s": 0.5}
        self.store.put_json(
            keys.deploy_config("sample", "c"),
            {"basedir": str(basedir), "run_as": "nobody", "health_check": health},
        )

    def logs(self) -> str:
        out = []
        for agent in ("preparer", "setlive"):
            current = self.root / "log" / f"{APP}-{agent}" / "current"
            with contextlib.suppress(OSError):
                out.append(f"--- {agent}\n{current.read_text()[-2000:]}")
        guard = self.state_dir / "setlive" / f"{APP}.guard.log"
        with contextlib.suppress(OSError):
            out.append(f"--- guard\n{guard.read_text()[-1500:]}")
        return "\n".join(out)

    def describe(self) -> str:
        return (
            f"setlive={self.report('setlive')} preparer={self.report('preparer')} "
            f"current={self.current()}\n{self.logs()}"
        )


def start_bare_runsvdir() -> _Runsvdir:
    require_runit()
    require_root()
    if shutil.which("unshare") is None:
        pytest.fail("unshare (util-linux) missing: it hides the checkout from the bare host")
    root = Path(tempfile.mkdtemp(prefix="pp-runit-", dir="/tmp"))
    root.chmod(0o755)
    service_dir = root / "service"
    service_dir.mkdir()
    env = {"PATH": CLEAN_PATH, "LANG": "C.UTF-8"}
    process = subprocess.Popen(
        _hidden(["runsvdir", "-P", str(service_dir)], env),
        stdin=subprocess.DEVNULL,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
        start_new_session=True,
    )
    return _Runsvdir(root, service_dir, process)


@contextlib.contextmanager
def bare_host() -> Iterator[BareHost]:
    handle = start_bare_runsvdir()
    (handle.root / "host").mkdir(mode=0o755)
    host = BareHost(handle.root / "host", handle)
    try:
        yield host
    finally:
        kill_our_guards(handle.root)
        host.store.close()
        stop_runsvdir(handle)
        kill_our_guards(handle.root)


def hup(host: BareHost, *agents: str) -> float:
    """Make the agents resync now; returns the time, to wait for reports made after it."""
    since = time.time()
    for agent in agents:
        subprocess.run(["sv", "hup", str(host.stage / f"{APP}-{agent}")], check=True)
    return since


__all__ = ["APP", "NODE", "BareHost", "bare_host", "broken_bundle", "built", "hup", "signal",
           "unpack", "wait_for"]  # fmt: skip
