"""A small platform of real parts, for the tests that prove absence is not intent.

``World``: an intent store (embedded or Consul) written with ``pp`` as operators write
it, and two hosts on this machine, each with its own private runsvdir and its own
agents as daemons: ``n1`` runs pp-preparer, pp-setlive and pp-iptables (its iptables
commands run inside a network namespace of the test) for two apps, ``n2`` runs
pp-preparer and pp-setlive for one. The apps are the sample HTTP app
(test_data/apps/httpapp), published in a file:// repository.

A ``Backend`` does to its store what operators and accidents do: wipe the prefix in
one step, back it up, write the backup back (a key at a time, as ``consul kv
import`` does), or hand out another, empty store.
"""

from __future__ import annotations

import abc
import base64
import contextlib
import json
import os
import signal
import sqlite3
import subprocess
import sys
import uuid
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from click.testing import CliRunner
from fault_support import APP_SOURCE, GATE, answer, wait_until
from netns_support import Namespace, ours
from preparer_support import member, write_tar
from runit_support import Runsvdir, free_port, start_runsvdir, stop_runsvdir

from agents.system import runit
from agents.system.layout import AppLayout
from intent.artifacts import artifact_name
from intent.cli import cli
from intent.model import AgentStatus, Reality
from intent.store import IntentStore, open_store
from intent.store.sqlite import SqliteStore

BIN = Path(sys.executable).parent
CLUSTER = "c"
PLAN = {"n1": ("alpha", "beta"), "n2": ("gamma",)}
"""Which apps each host runs when the world is built."""
PUBLIC_PORTS = {"alpha": 8001, "beta": 8002, "gamma": 8003}
RESYNC_S = 1.0
"""The agents' --resync-interval: a held agent looks at the store again this often."""
STORE_RETRY_MAX_S = 0.5


# -- stores -------------------------------------------------------------------------------


@dataclass(frozen=True)
class StoreRef:
    url: str
    prefix: str

    @contextlib.contextmanager
    def opened(self) -> Iterator[IntentStore]:
        """A short-lived client: a test holds no handle on a file it may replace."""
        store = open_store(self.url, self.prefix)
        try:
            yield store
        finally:
            store.close()

    def identity(self) -> str | None:
        with self.opened() as store:
            found = store.identity()
        return found.id if found is not None else None

    def reports(self, node: str) -> list[Reality]:
        with self.opened() as store:
            return store.reality(node=node)

    def statuses(self) -> list[AgentStatus]:
        with self.opened() as store:
            return store.agent_statuses()


Backup = list[tuple[str, bytes]]
"""Every key under the prefix (full key, value), in key order."""


class Backend(abc.ABC):
    kind: str

    @abc.abstractmethod
    def primary(self) -> StoreRef:
        """A store for a new world, empty until ``pp`` writes to it."""

    @abc.abstractmethod
    def fresh(self, like: StoreRef) -> StoreRef:
        """Another store, empty, that agents can open: a restarted ``consul agent
        -dev`` (with ``like``'s prefix when that is free there), a new database file."""

    @abc.abstractmethod
    def delete_tree(self, ref: StoreRef, below: str) -> None:
        """Delete every key under the prefix that starts with ``below``, in one step."""

    def wipe(self, ref: StoreRef) -> None:
        self.delete_tree(ref, "")

    @abc.abstractmethod
    def backup(self, ref: StoreRef) -> Backup: ...

    @abc.abstractmethod
    def restore(self, ref: StoreRef, backup: Backup) -> None:
        """Write ``backup`` into ``ref``, one key after another, in key order."""

    def close(self) -> None:  # noqa: B027 - optional
        pass


class SqliteBackend(Backend):
    kind = "sqlite"

    def __init__(self, root: Path) -> None:
        self.root = root
        self._made = 0

    def _path(self) -> Path:
        self._made += 1
        return self.root / f"intent-{self._made}.db"

    def primary(self) -> StoreRef:
        return StoreRef(f"sqlite://{self._path()}", "platypus/")

    def fresh(self, like: StoreRef) -> StoreRef:
        path = self._path()
        SqliteStore(path).close()
        return StoreRef(f"sqlite://{path}", like.prefix)

    def delete_tree(self, ref: StoreRef, below: str) -> None:
        # What `sqlite3 intent.db "DELETE FROM kv WHERE ..."` does: one statement.
        start = ref.prefix + below
        with contextlib.closing(sqlite3.connect(path_of(ref))) as db, db:
            db.execute("DELETE FROM kv WHERE key >= ? AND key < ?", (start, start + "\U0010ffff"))

    def backup(self, ref: StoreRef) -> Backup:
        with contextlib.closing(SqliteStore(path_of(ref), create=False)) as kv:
            return [(e.key, e.value) for e in kv.list(ref.prefix)]

    def restore(self, ref: StoreRef, backup: Backup) -> None:
        with contextlib.closing(SqliteStore(path_of(ref), create=False)) as kv:
            for key, value in backup:
                kv.put(key, value)


def path_of(ref: StoreRef) -> Path:
    assert ref.url.startswith("sqlite://"), ref.url
    return Path(ref.url.removeprefix("sqlite://"))


def copy_database(source: Path, target: Path) -> None:
    """SQLite's online backup of ``source`` into ``target`` (what ``sqlite3 target.db
    ".restore source.db"`` does): safe while other processes have ``target`` open, and
    they see the new content."""
    with (
        contextlib.closing(sqlite3.connect(source)) as src,
        contextlib.closing(sqlite3.connect(target)) as dst,
    ):
        src.backup(dst)


class ConsulBackend(Backend):
    """The primary store on ``addr``; fresh ones on a second agent, started when first
    needed (``second``)."""

    kind = "consul"

    def __init__(self, binary: str, addr: str, second: Callable[[], str], cwd: Path) -> None:
        self.binary, self.addr, self._second, self.cwd = binary, addr, second, cwd
        self._made: list[StoreRef] = []

    def _new(self, addr: str, prefix: str | None = None) -> StoreRef:
        ref = StoreRef(f"consul://{addr}", prefix or f"failsafe-{uuid.uuid4().hex[:10]}/")
        self._made.append(ref)
        return ref

    def primary(self) -> StoreRef:
        return self._new(self.addr)

    def fresh(self, like: StoreRef) -> StoreRef:
        first, second = f"consul://{self.addr}", f"consul://{self._second()}"
        other = second if like.url == first else first
        taken = any(r.url == other and r.prefix == like.prefix for r in self._made)
        return self._new(other.removeprefix("consul://"), None if taken else like.prefix)

    def consul(self, ref: StoreRef, *args: str) -> str:
        """``consul <args>`` against ``ref``'s agent, as an operator types it."""
        env = {**os.environ, "CONSUL_HTTP_ADDR": ref.url.removeprefix("consul://")}
        env.pop("CONSUL_HTTP_TOKEN", None)
        done = subprocess.run(
            [self.binary, *args], capture_output=True, text=True, timeout=30, env=env, cwd=self.cwd
        )
        assert done.returncode == 0, f"consul {' '.join(args)}: {done.stderr.strip()}"
        return done.stdout

    def delete_tree(self, ref: StoreRef, below: str) -> None:
        self.consul(ref, "kv", "delete", "-recurse", ref.prefix + below)

    def backup(self, ref: StoreRef) -> Backup:
        exported = json.loads(self.consul(ref, "kv", "export", ref.prefix))
        return [(e["key"], base64.b64decode(e["value"])) for e in exported]

    def restore(self, ref: StoreRef, backup: Backup) -> None:
        entries = [
            {"key": key, "flags": 0, "value": base64.b64encode(value).decode()}
            for key, value in backup
        ]
        path = self.cwd / f"backup-{uuid.uuid4().hex[:8]}.json"
        path.write_text(json.dumps(entries))
        self.consul(ref, "kv", "import", f"@{path}")

    def close(self) -> None:
        for ref in self._made:
            with contextlib.suppress(AssertionError, OSError, subprocess.SubprocessError):
                self.wipe(ref)


# -- hosts ---------------------------------------------------------------------------------


@dataclass
class Host:
    """One host's agents, run as daemons of the test against a store chosen per start."""

    name: str
    runsvdir: Runsvdir
    repo: Path
    netns: Namespace | None = None
    processes: dict[str, subprocess.Popen[bytes]] = field(default_factory=dict)
    logs: dict[str, Path] = field(default_factory=dict)
    """The log of each agent's current (or last) process."""
    marks: dict[str, int] = field(default_factory=dict)
    """Where in each log ``events`` starts reading (see ``mark``)."""
    _runs: int = 0

    @property
    def root(self) -> Path:
        """World-traversable (below the runsvdir's root): the apps run as nobody."""
        return self.runsvdir.root / "host"

    @property
    def agents(self) -> tuple[str, ...]:
        return ("preparer", "setlive", "iptables") if self.netns else ("preparer", "setlive")

    def command(self, agent: str, store: StoreRef, once: bool = False) -> list[str]:
        common = [
            str(BIN / f"pp-{agent}"), "--store", store.url, "--prefix", store.prefix,
            "--node", self.name, "--log-format", "json",
            "--resync-interval", str(RESYNC_S), "--store-retry-max", str(STORE_RETRY_MAX_S),
            "--state-dir", str(self.root / f"{agent}-state"),
        ]  # fmt: skip
        if once:
            common.append("--once")
        if agent == "preparer":
            return [*common, "--repo", f"file://{self.repo}"]
        if agent == "setlive":
            return [
                *common, "--runit", str(self.runsvdir.service_dir),
                "--runit-stage", str(self.root / "stage"), "--log-root", str(self.root / "log"),
            ]  # fmt: skip
        assert self.netns is not None
        return [*common, *self.netns.flags()]

    def start(self, store: StoreRef) -> None:
        (self.root / "logs").mkdir(parents=True, exist_ok=True)
        for agent in self.agents:
            self._runs += 1
            log_path = self.logs[agent] = self.root / "logs" / f"{agent}-{self._runs}.log"
            self.marks[agent] = 0
            with log_path.open("wb") as log:
                self.processes[agent] = subprocess.Popen(
                    self.command(agent, store),
                    stdin=subprocess.DEVNULL,
                    stdout=log,
                    stderr=subprocess.STDOUT,
                    start_new_session=True,
                )

    def stop(self, timeout_s: float = 20) -> None:
        """SIGTERM every agent and wait for it (SIGKILL after ``timeout_s``)."""
        procs, self.processes = self.processes, {}
        for proc in procs.values():
            if proc.poll() is None:
                proc.send_signal(signal.SIGTERM)
        for proc in procs.values():
            try:
                proc.wait(timeout_s)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()

    def alive(self) -> bool:
        return bool(self.processes) and all(p.poll() is None for p in self.processes.values())

    def once(self, store: StoreRef) -> dict[str, subprocess.CompletedProcess[str]]:
        """Every agent's ``--once`` pass, run side by side; the daemons must be stopped
        (pp-setlive allows one per state directory)."""
        assert not self.processes, "stop the daemons first"
        procs = {
            agent: subprocess.Popen(
                self.command(agent, store, once=True),
                stdin=subprocess.DEVNULL,
                stdout=subprocess.PIPE,
                stderr=subprocess.PIPE,
                text=True,
            )
            for agent in self.agents
        }
        done = {}
        for agent, proc in procs.items():
            out, err = proc.communicate(timeout=60)
            done[agent] = subprocess.CompletedProcess(proc.args, proc.returncode, out, err)
        return done

    def mark(self) -> None:
        """From now on ``events`` reads only what the agents log after this."""
        for agent, path in self.logs.items():
            self.marks[agent] = path.stat().st_size

    def events(self, agent: str, name: str | None = None) -> list[dict[str, Any]]:
        """The events the agent's current process logged since it started or since the
        last ``mark`` (``name``: only those)."""
        with self.logs[agent].open("rb") as log:
            log.seek(self.marks.get(agent, 0))
            text = log.read().decode(errors="replace")
        return parse_events(text, name)

    def log_tail(self, lines: int = 6) -> str:
        tails = []
        for agent, path in self.logs.items():
            with contextlib.suppress(OSError):
                tail = path.read_text(errors="replace").splitlines()[-lines:]
                tails += [f"  {self.name}/{agent}> {line[:400]}" for line in tail]
        return "\n".join(tails)

    # -- what the host shows ------------------------------------------------------------

    def layout(self, app: str) -> AppLayout:
        return AppLayout(self.root / "apps" / app, app)

    def pid(self, app: str) -> int | None:
        return runit.status(self.root / "stage" / app).pid

    def linked(self, app: str) -> bool:
        return (self.runsvdir.service_dir / app).is_symlink()

    def current(self, app: str) -> str | None:
        """The install ``current`` points at (its directory name), if any."""
        current = self.layout(app).current
        return current.resolve().name if current.is_symlink() else None

    def rules(self, app: str | None = None) -> list[str]:
        """pp-iptables' rules in the host's namespace (only ``app``'s, if given)."""
        if self.netns is None:
            return []
        text = self.netns.run("iptables-save")
        lines = [line for line in ours(text) if not line.startswith("#")]
        return [line for line in lines if app is None or f"app={app} " in line]


def parse_events(text: str, name: str | None = None) -> list[dict[str, Any]]:
    events = []
    for line in text.splitlines():
        if not line.startswith("{"):
            continue
        with contextlib.suppress(ValueError):
            event = json.loads(line)
            if name is None or event.get("event") == name:
                events.append(event)
    return events


# -- the world ---------------------------------------------------------------------------


@dataclass(frozen=True)
class AppState:
    """What a host shows of one app: all of it must survive anything but intent."""

    pid: int | None
    linked: bool
    current: str | None
    rules: tuple[str, ...]


@dataclass
class World:
    backend: Backend
    root: Path
    store: StoreRef
    hosts: dict[str, Host] = field(default_factory=dict)
    ports: dict[str, int] = field(default_factory=dict)
    shas: dict[tuple[str, str], str] = field(default_factory=dict)
    active: dict[str, str] = field(default_factory=dict)
    running: dict[str, set[str]] = field(default_factory=dict)
    """Which apps each host runs now: what a test may count on."""
    reusable: bool = True
    """False once a test left the world in a state the next one cannot count on."""

    @property
    def repo(self) -> Path:
        return self.root / "repo"

    def node_of(self, app: str) -> str:
        return next(node for node, apps in PLAN.items() if app in apps)

    # -- intent, written with pp ------------------------------------------------------

    def pp(self, *args: str, store: StoreRef | None = None, ok: bool = True) -> str:
        """``pp --store ... --prefix ... <args>``; its output (exit 0 asserted if ``ok``)."""
        ref = store or self.store
        result = CliRunner().invoke(
            cli, ["--store", ref.url, "--prefix", ref.prefix, *args], env={"PP_ACTOR": "ops"}
        )
        if ok:
            assert result.exit_code == 0, f"pp {' '.join(args)}: {result.output}"
        return result.output

    def publish(self, app: str, version: str) -> str:
        files = [
            member(str(p.relative_to(APP_SOURCE)), p.read_bytes(), mode=p.stat().st_mode & 0o777)
            for p in sorted(APP_SOURCE.rglob("*"))
            if p.is_file()
        ]
        files.append(member("VERSION", f"{version}\n".encode()))
        artifact = self.repo / app / artifact_name(app, version)
        artifact.parent.mkdir(parents=True, exist_ok=True)
        sha = self.shas[(app, version)] = write_tar(artifact, files)
        return sha

    def app_file(self, app: str) -> Path:
        """The app as an app file of ``pp apply`` (JSON is YAML), assigned to its host."""
        node = self.node_of(app)
        version = self.active[app]
        port = {"name": "http", "port": self.ports[app], "public_port": PUBLIC_PORTS[app]}
        document = {
            "app": app,
            "clusters": {
                CLUSTER: {
                    "config": {
                        "versions": {
                            version: {"state": "active", "sha256": self.shas[(app, version)]}
                        }
                    },
                    "deploy_config": {
                        "basedir": str(self.hosts[node].layout(app).basedir),
                        "run_as": "nobody",
                        "ports": [port],
                        "health_check": GATE,
                    },
                    "nodes": [node],
                }
            },
        }
        path = self.root / "apps" / f"{app}.yaml"
        path.parent.mkdir(exist_ok=True)
        path.write_text(json.dumps(document, indent=1))
        return path

    def apply_all(self, store: StoreRef | None = None) -> None:
        """``pp apply -f`` every app file of the world."""
        files = [arg for app in self.active for arg in ("-f", str(self.app_file(app)))]
        self.pp("apply", *files, store=store)

    # -- agents ---------------------------------------------------------------------------

    def start(self, store: StoreRef | None = None) -> None:
        for host in self.hosts.values():
            host.start(store or self.store)

    def stop(self) -> None:
        for host in self.hosts.values():
            host.stop()

    def agents(self) -> list[tuple[Host, str]]:
        return [(host, agent) for host in self.hosts.values() for agent in host.agents]

    # -- what the world shows -------------------------------------------------------------

    def state(self) -> dict[str, AppState]:
        """Every running app's process, service link, install and rules."""
        found = {}
        for node, apps in self.running.items():
            host = self.hosts[node]
            for app in sorted(apps):
                found[app] = AppState(
                    host.pid(app), host.linked(app), host.current(app), tuple(host.rules(app))
                )
        return found

    def converged(self, app: str, store: StoreRef | None = None) -> bool:
        """Installed, switched, answering and reported by every agent of its host."""
        host = self.hosts[self.node_of(app)]
        version = self.active[app]
        if answer(self.ports[app]) != version or host.current(app) != f"{app}_{version}":
            return False
        reports = {r.agent: r for r in (store or self.store).reports(host.name) if r.app == app}
        return all(
            agent in reports
            and reports[agent].status == "converged"
            and reports[agent].version == version
            for agent in host.agents
        )

    def all_converged(self, store: StoreRef | None = None) -> bool:
        return all(self.converged(app, store) for apps in self.running.values() for app in apps)

    def held(self, store: StoreRef | None = None) -> dict[tuple[str, str], str]:
        """The ``HELD`` lines of ``pp status``, by (node, agent): the rest of the line."""
        lines = {}
        for line in self.pp("status", store=store).splitlines():
            if line.startswith("HELD "):
                _, node, agent, rest = line.split(" ", 3)
                lines[(node, agent)] = rest
        return lines

    def logged(self, name: str) -> dict[tuple[str, str], int]:
        """How often each agent's current process logged ``name``."""
        return {(h.name, a): len(h.events(a, name)) for h, a in self.agents()}

    def every_agent_logged(self, name: str, timeout_s: float = 30) -> bool:
        return wait_until(lambda: all(self.logged(name).values()), timeout_s, 0.1)

    def describe(self, store: StoreRef | None = None) -> str:
        lines = [f"store {(store or self.store).url} {(store or self.store).prefix}"]
        with contextlib.suppress(Exception):
            for host in self.hosts.values():
                for report in (store or self.store).reports(host.name):
                    lines.append(
                        f"  {report.node}/{report.agent}/{report.app}: {report.status} "
                        f"{report.version} {report.error or ''}"
                    )
        lines += [host.log_tail() for host in self.hosts.values()]
        return "\n".join(lines)

    def close(self) -> None:
        for host in self.hosts.values():
            for proc in host.processes.values():
                if proc.poll() is None:
                    proc.kill()
                    proc.wait()
            host.processes.clear()
            stop_runsvdir(host.runsvdir)
            if host.netns is not None:
                host.netns.delete()


def build_world(backend: Backend, root: Path, timeout_s: float = 90) -> World:
    """Every host running every app of ``PLAN`` on version 1, converged."""
    world = World(backend, root, backend.primary())
    try:
        for node in PLAN:
            netns = Namespace.create() if node == "n1" else None
            world.hosts[node] = Host(node, start_runsvdir(), world.repo, netns)
            world.hosts[node].root.mkdir(mode=0o755)
            world.running[node] = set(PLAN[node])
            for app in PLAN[node]:
                world.ports[app] = free_port()
                world.publish(app, "1")
                world.active[app] = "1"
        world.apply_all()
        world.start()
        if not wait_until(world.all_converged, timeout_s, 0.2):
            raise AssertionError(f"the world did not converge:\n{world.describe()}")
    except BaseException:
        world.close()
        raise
    return world
