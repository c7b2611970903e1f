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

import atexit
import contextlib
import functools
import shutil
import signal
import subprocess
import tarfile
import tempfile
import time
import zipfile
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Protocol

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
from intent.store import IntentStore, open_store

REPO = Path(__file__).resolve().parent.parent
APP = "platypus"
NODE = "n1"
CLEAN_PATH = "/usr/sbin:/usr/bin:/sbin:/bin"
GUARD_DEADLINE_S = 150
"""The self-deploy tests' guard deadline: longer than a good release needs to gate itself
on a busy host."""
CRASH_LOOP_WAIT_S = 120
"""How long a release whose pp-setlive cannot start may take to be rolled back: its guard
gives up on a setlive that keeps exiting well before ``GUARD_DEADLINE_S``."""
_SCRATCH = Path(tempfile.mkdtemp(prefix="pp-bundles-"))
atexit.register(shutil.rmtree, _SCRATCH, True)


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
    """Wheels of a tiny dependency, ``ppprobe`` 1.0 and 2.0, written here (no index and
    no build backend needed: a wheel is a zip with its metadata and a RECORD)."""
    wheels = _SCRATCH / "probe-wheels"
    wheels.mkdir()
    for version in ("1.0", "2.0"):
        info = f"ppprobe-{version}.dist-info"
        files = {
            "ppprobe/__init__.py": f'VERSION = "{version}"\n',
            f"{info}/METADATA": f"Metadata-Version: 2.1\nName: ppprobe\nVersion: {version}\n",
            f"{info}/WHEEL": "Wheel-Version: 1.0\nGenerator: tests\nRoot-Is-Purelib: true\n"
            "Tag: py3-none-any\n",
        }
        record = "".join(f"{name},,\n" for name in files) + f"{info}/RECORD,,\n"
        with zipfile.ZipFile(wheels / f"ppprobe-{version}-py3-none-any.whl", "w") as wheel:
            for name, text in {**files, f"{info}/RECORD": record}.items():
                wheel.writestr(zipfile.ZipInfo(name, (1980, 1, 1, 0, 0, 0)), text)
    return wheels


@functools.cache
def base_tree() -> Path:
    """A bundle's tree, dependencies installed, without ``VERSION``: laid out once."""
    tree = _SCRATCH / "base"
    bundle.lay_out(tree, bundle.default_wheelhouse(), source=source_snapshot())
    return tree


@functools.cache
def built(name: str) -> bundle.Built:
    """``repro-a``: the base tree, packed; any other name: a whole new build from the
    same source (to compare with it)."""
    out = _SCRATCH / "out" / name
    if name == "repro-a":
        return bundle.finish(_copy_of_base(name), out, None)
    return bundle.build(out, source=source_snapshot())


def _copy_of_base(name: str) -> Path:
    tree = _SCRATCH / "trees" / name
    shutil.copytree(base_tree(), tree, symlinks=True)
    return tree


@functools.cache
def release(version: str, probe: str | None = None, broken: bool = False) -> bundle.Built:
    """A release of the agents: the base tree plus ``ppprobe`` of version ``probe`` (a
    dependency the base does not have), with a pp-setlive that cannot start if ``broken``."""
    tree = _copy_of_base(f"release-{version}")
    if probe is not None:
        subprocess.run(
            [bundle.sys.executable, "-m", "pip", "install", "-q", "--no-deps", "--no-index",
             "--no-compile", "--find-links", str(probe_wheels()), "--target",
             str(tree / "site"), f"ppprobe=={probe}"],
            check=True, capture_output=True,
        )  # fmt: skip
        pins = [*(tree / "REQUIREMENTS.txt").read_text().splitlines(), f"ppprobe=={probe}"]
        (tree / "REQUIREMENTS.txt").write_text("\n".join(sorted(pins)) + "\n")
    if broken:
        main = tree / "src" / "agents" / "setlive" / "__main__.py"
        main.write_text("raise SystemExit('this pp-setlive is broken')\n" + main.read_text())
    return bundle.finish(tree, _SCRATCH / "out" / f"release-{version}", version)


def unpack(tarball: Path, into: Path) -> Path:
    into.mkdir(parents=True)
    with tarfile.open(tarball) as tar:
        tar.extractall(into, filter="tar")
    return into


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
    store_url: str = ""
    """Default: an embedded store in ``root``."""
    prefix: str = keys.DEFAULT_PREFIX
    store: IntentStore = field(init=False)

    def __post_init__(self) -> None:
        self.store_url = self.store_url or f"sqlite://{self.root / 'store.db'}"
        self.store = open_store(self.store_url, self.prefix)

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
            "--prefix", self.prefix,
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
            timeout=600,
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
def bare_host(store_url: str = "", prefix: str = keys.DEFAULT_PREFIX) -> Iterator[BareHost]:
    handle = start_bare_runsvdir()
    host = None
    try:
        (handle.root / "host").mkdir(mode=0o755)
        host = BareHost(handle.root / "host", handle, store_url, prefix)
        yield host
    finally:
        kill_our_guards(handle.root)
        if host is not None:
            host.store.close()
        stop_runsvdir(handle)
        kill_our_guards(handle.root)


def hup(host: BareHost, *agents: str) -> float:
    """Make the agents resync now; returns the time, to wait for reports made after it."""
    since = time.time()
    for agent in agents:
        subprocess.run(["sv", "hup", str(host.stage / f"{APP}-{agent}")], check=True)
    return since


__all__ = ["APP", "NODE", "BareHost", "bare_host", "built", "hup", "release", "signal",
           "unpack", "wait_for"]  # fmt: skip


class _AgentsHost(Protocol):
    def report(self, agent: str) -> Reality | None: ...

    def runs(self, agent: str, version: str) -> bool: ...


def setlive_rolled_back(host: _AgentsHost, to: str, failed: str) -> Callable[[], bool]:
    """True once pp-setlive reports the rollback from ``failed`` and ``to`` runs it again:
    the end of a self-deploy whose setlive could not start, under runit or systemd, given
    up on by its guard because it kept exiting."""

    def rolled_back() -> bool:
        report = host.report("setlive")
        return (
            report is not None
            and report.status == "error"
            and report.version == to
            and report.details.get("rolled_back_from") == failed
            and "times without finishing its own deploy" in (report.error or "")
            and host.runs("setlive", to)
        )

    return rolled_back
