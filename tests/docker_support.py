"""A private Docker engine and registry on loopback, and a tiny image built with no network.

``dockerd`` runs with its own data root, exec root, socket, pidfile and config file
under a temp directory, with ``--bridge=none --iptables=false --ip-forward=false
--ip-masq=false``: containers use the host network, so the engine never makes an
interface, a route or a firewall rule. The overlay2 storage driver is tried first and
``vfs`` where overlay does not work (nested in another container's overlay, say).
Teardown stops only the dockerd this module started, by its pid (it stops its own
containers and containerd), unmounts what is left under the temp directory, removes it.

The registry is Debian's ``docker-registry`` on a free 127.0.0.1 port (the engine
speaks plain HTTP to loopback registries without being told). Images are a rootfs of
Debian's static busybox fed to ``docker import``: a shell script as entrypoint serves
``/health`` with busybox's httpd on ``$PP_PORT_HTTP``.

Where no engine can start (no packages, not root) the tests skip with the reason;
``PP_REQUIRE_DOCKER=1`` (CI, as root) makes that a failure.
"""

from __future__ import annotations

import contextlib
import ctypes
import json
import os
import shutil
import signal
import struct
import subprocess
import tempfile
import time
import urllib.error
import urllib.request
import warnings
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import docker
import pytest
from runit_support import free_port

REQUIRE_VAR = "PP_REQUIRE_DOCKER"
BUSYBOX = Path("/bin/busybox")
START_TIMEOUT_S = 60.0


def _die_with_parent() -> None:
    """In the child before exec: SIGTERM when the test process dies, however it dies, so a
    killed test run leaves no engine or registry behind (prctl PR_SET_PDEATHSIG)."""
    _prctl(1, signal.SIGTERM, 0, 0, 0)


_prctl = ctypes.CDLL(None, use_errno=True).prctl
"""Resolved here, before any fork: the child only calls it."""


def missing(reason: str) -> None:
    """Skip locally; fail where the environment promises an engine (CI)."""
    if os.environ.get(REQUIRE_VAR) == "1":
        pytest.fail(f"{reason}, but {REQUIRE_VAR}=1", pytrace=False)
    pytest.skip(reason)


def docker_cli() -> str | None:
    return shutil.which("docker") or (
        "/usr/bin/docker" if os.access("/usr/bin/docker", os.X_OK) else None
    )


def is_static_elf(path: Path) -> bool:
    """Whether ``path`` is an ELF executable with no program interpreter (it needs no
    libc in the image). Read by hand: it is four header fields."""
    try:
        with path.open("rb") as f:
            header = f.read(64)
            if header[:4] != b"\x7fELF" or header[4] != 2:  # 64-bit only
                return False
            (phoff,) = struct.unpack_from("<Q", header, 32)
            phentsize, phnum = struct.unpack_from("<HH", header, 54)
            for i in range(phnum):
                f.seek(phoff + i * phentsize)
                (p_type,) = struct.unpack("<I", f.read(4))
                if p_type == 3:  # PT_INTERP
                    return False
            return True
    except (OSError, struct.error):
        return False


def require_docker() -> str:
    """The docker CLI's path, once everything an engine needs is here."""
    if os.geteuid() != 0:
        missing("needs root: dockerd runs as root")
    needed = {
        "dockerd": shutil.which("dockerd"),
        "docker-registry": shutil.which("docker-registry"),
    }
    cli = docker_cli()
    absent = [name for name, path in needed.items() if path is None]
    if cli is None:
        absent.append("docker")
    if absent:
        missing(
            f"no Docker engine here (missing {', '.join(absent)}): "
            "apt-get install docker.io docker-registry (scripts/setup --test)"
        )
    if not is_static_elf(BUSYBOX):
        missing(f"{BUSYBOX} is not a static busybox: apt-get install busybox-static")
    assert cli is not None
    return cli


@dataclass
class Engine:
    root: Path
    process: subprocess.Popen[bytes]
    storage_driver: str
    cli: str

    @property
    def socket(self) -> Path:
        return self.root / "docker.sock"

    @property
    def url(self) -> str:
        return f"unix://{self.socket}"

    @property
    def config_dir(self) -> Path:
        """An empty Docker config of its own: the host user's credentials stay out of it."""
        return self.root / "client-config"

    def env(self) -> dict[str, str]:
        return {**os.environ, "DOCKER_HOST": self.url, "DOCKER_CONFIG": str(self.config_dir)}

    def client(self) -> docker.DockerClient:
        return docker.DockerClient(base_url=self.url, timeout=60)

    def run_cli(self, *args: str, data: bytes | None = None) -> str:
        done = subprocess.run(
            [self.cli, *args], input=data, capture_output=True, env=self.env(), timeout=120
        )
        if done.returncode != 0:
            raise AssertionError(f"docker {' '.join(args)}: {done.stderr.decode().strip()}")
        return done.stdout.decode().strip()

    def containers(self, name_prefix: str = "") -> list[str]:
        """Names of all containers (running or not) starting with ``name_prefix``."""
        out = self.run_cli("ps", "-a", "--format", "{{.Names}}")
        return sorted(n for n in out.splitlines() if n.startswith(name_prefix))


def _dockerd(root: Path, driver: str) -> subprocess.Popen[bytes]:
    (root / "daemon.json").write_text("{}")
    log = (root / f"dockerd-{driver}.log").open("wb")
    places = {
        "--config-file": root / "daemon.json",
        "--data-root": root / "data",
        "--exec-root": root / "exec",
        "--pidfile": root / "docker.pid",
        "--host": f"unix://{root / 'docker.sock'}",
        "--storage-driver": driver,
    }
    # No bridge, no iptables, no forwarding or masquerading: nothing on the host's network.
    isolated = ["--bridge=none", "--iptables=false", "--ip-forward=false", "--ip-masq=false"]
    return subprocess.Popen(
        ["dockerd", *isolated, "--log-level=warn"]
        + [f"{flag}={value}" for flag, value in places.items()],
        stdin=subprocess.DEVNULL,
        stdout=log,
        stderr=log,
        start_new_session=True,
        preexec_fn=_die_with_parent,
    )


def _answers(root: Path) -> bool:
    try:
        client = docker.DockerClient(base_url=f"unix://{root / 'docker.sock'}", timeout=5)
        try:
            return bool(client.ping())
        finally:
            client.close()
    except docker.errors.DockerException:
        return False


def _stop_process(process: subprocess.Popen[bytes], timeout_s: float) -> None:
    if process.poll() is not None:
        return
    process.send_signal(signal.SIGTERM)
    try:
        process.wait(timeout_s)
    except subprocess.TimeoutExpired:
        process.kill()
        process.wait(10)


def _unmount_under(root: Path) -> None:
    """What the engine left mounted below our temp root (its netns file, say), deepest first."""
    with open("/proc/self/mounts") as mounts:
        points = [line.split()[1] for line in mounts]
    prefix = str(root) + "/"
    for point in sorted((p for p in points if p.startswith(prefix)), key=len, reverse=True):
        subprocess.run(["umount", "-l", point], capture_output=True, check=False)


def start_engine() -> Engine:
    cli = require_docker()
    root = Path(tempfile.mkdtemp(prefix="pp-docker-", dir="/tmp"))
    root.chmod(0o755)
    (root / "client-config").mkdir()
    reasons = []
    for driver in ("overlay2", "vfs"):
        process = _dockerd(root, driver)
        deadline = time.monotonic() + START_TIMEOUT_S
        while time.monotonic() < deadline and process.poll() is None and not _answers(root):
            time.sleep(0.2)
        if process.poll() is None and _answers(root):
            return Engine(root, process, driver, cli)
        _stop_process(process, 20)
        log = (root / f"dockerd-{driver}.log").read_text(errors="replace").strip().splitlines()
        reasons.append(f"{driver}: {log[-1] if log else 'no output'}")
        shutil.rmtree(root / "data", ignore_errors=True)
    _unmount_under(root)
    shutil.rmtree(root, ignore_errors=True)
    missing(f"dockerd did not start ({'; '.join(reasons)})")
    raise AssertionError("unreachable")


def stop_engine(engine: Engine) -> None:
    """TERM our dockerd (it stops its containers and its containerd), KILL it after 30 s."""
    _stop_process(engine.process, 30)
    _unmount_under(engine.root)
    shutil.rmtree(engine.root, ignore_errors=True)


@dataclass
class Registry:
    address: str
    """``127.0.0.1:<port>``"""
    process: subprocess.Popen[bytes]


def start_registry(root: Path, users: Mapping[str, str] | None = None) -> Registry:
    """A registry on a free loopback port; with ``users``, one that wants their passwords
    (htpasswd, bcrypt by the C library's crypt(3))."""
    port = free_port()
    config = root / f"registry-{port}.yml"
    settings: dict[str, Any] = {
        "version": 0.1,
        "storage": {"filesystem": {"rootdirectory": str(root / f"registry-{port}")}},
        "http": {"addr": f"127.0.0.1:{port}", "secret": os.urandom(16).hex()},
        "log": {"level": "warn", "accesslog": {"disabled": True}},
    }
    if users:
        htpasswd = root / f"registry-{port}.htpasswd"
        htpasswd.write_text(
            "".join(f"{user}:{_bcrypt(password)}\n" for user, password in users.items())
        )
        settings["auth"] = {"htpasswd": {"realm": "pp-test", "path": str(htpasswd)}}
    config.write_text(json.dumps(settings))  # YAML is a superset of JSON
    log = (root / f"registry-{port}.log").open("wb")
    process = subprocess.Popen(
        ["docker-registry", "serve", str(config)],
        stdin=subprocess.DEVNULL,
        stdout=log,
        stderr=log,
        start_new_session=True,
        preexec_fn=_die_with_parent,
    )
    deadline = time.monotonic() + START_TIMEOUT_S
    while time.monotonic() < deadline and process.poll() is None:
        with (
            contextlib.suppress(OSError),
            urllib.request.urlopen(f"http://127.0.0.1:{port}/v2/", timeout=2) as answer,
        ):
            if answer.status == 200:
                return Registry(f"127.0.0.1:{port}", process)
        if users and _answers_401(port):
            return Registry(f"127.0.0.1:{port}", process)
        time.sleep(0.1)
    _stop_process(process, 10)
    missing(f"docker-registry did not answer on 127.0.0.1:{port}")
    raise AssertionError("unreachable")


def _answers_401(port: int) -> bool:
    try:
        urllib.request.urlopen(f"http://127.0.0.1:{port}/v2/", timeout=2).close()
    except urllib.error.HTTPError as exc:
        return exc.code == 401
    except OSError:
        return False
    return False


def _bcrypt(password: str) -> str:
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", DeprecationWarning)
        import crypt

        return crypt.crypt(password, crypt.mksalt(crypt.METHOD_BLOWFISH, rounds=16))


def stop_registry(registry: Registry) -> None:
    _stop_process(registry.process, 10)


SERVE = """#!/bin/sh
# The test app: /health answers with the image's label, on $PP_PORT_HTTP.
exec /bin/busybox httpd -f -p "127.0.0.1:${PP_PORT_HTTP:?}" -h /www
"""

BROKEN = """#!/bin/sh
echo "this image is broken on purpose" >&2
exit 3
"""


def build_image(
    engine: Engine,
    repository: str,
    tag: str,
    label: str,
    broken: bool = False,
    extra_files: Sequence[tuple[str, bytes]] = (),
) -> str:
    """``repository:tag`` built from a busybox rootfs (no network needed); returns its id."""
    with tempfile.TemporaryDirectory(dir=engine.root) as tmp:
        rootfs = Path(tmp) / "rootfs"
        for d in ("bin", "www", "tmp", "etc"):
            (rootfs / d).mkdir(parents=True)
        shutil.copy2(BUSYBOX, rootfs / "bin" / "busybox")
        (rootfs / "bin" / "sh").symlink_to("busybox")
        (rootfs / "bin" / "serve").write_text(BROKEN if broken else SERVE)
        (rootfs / "bin" / "serve").chmod(0o755)
        (rootfs / "www" / "health").write_text(f"{label}\n")
        (rootfs / "www").chmod(0o755)
        for rel, data in extra_files:
            path = rootfs / rel
            path.parent.mkdir(parents=True, exist_ok=True)
            path.write_bytes(data)
        tarball = Path(tmp) / "rootfs.tar"
        subprocess.run(["tar", "-C", str(rootfs), "-cf", str(tarball), "."], check=True)
        return engine.run_cli(
            "import",
            "--change",
            'ENTRYPOINT ["/bin/serve"]',
            str(tarball),
            f"{repository}:{tag}",
        )


def push(engine: Engine, repository: str, tag: str) -> str:
    """Push ``repository:tag``; returns the pinned reference ``repository@sha256:...``."""
    engine.run_cli("push", f"{repository}:{tag}")
    digests = json.loads(
        engine.run_cli(
            "image", "inspect", "--format", "{{json .RepoDigests}}", f"{repository}:{tag}"
        )
    )
    pinned = [d for d in digests if d.startswith(repository + "@")]
    assert pinned, f"{repository}:{tag} has no digest after its push ({digests})"
    return str(pinned[0])


def run_preparer(
    engine: Engine, store_url: str, node: str, state_dir: Path, *extra: str, **env: str
) -> subprocess.CompletedProcess[str]:
    """``pp-preparer --once`` against ``engine`` (its empty Docker config unless ``env``
    says otherwise), its output as text."""
    return subprocess.run(
        [
            str(Path(__file__).resolve().parent.parent / ".venv" / "bin" / "pp-preparer"),
            *("--store", store_url, "--node", node, "--once", "--log-format", "json"),
            *("--state-dir", str(state_dir), "--docker-host", engine.url, *extra),
        ],
        capture_output=True,
        text=True,
        timeout=300,
        env=engine.env() | env,
    )


_shared: dict[str, object] = {}
"""The session's engine and registry, or why there is none. Test modules import the
fixtures, and each module's copy would otherwise start an engine of its own."""


@pytest.fixture(scope="session")
def docker_engine() -> Iterator[Engine]:
    if isinstance(reason := _shared.get("no-engine"), str):
        missing(reason)
    engine = _shared.get("engine")
    if not isinstance(engine, Engine):
        try:
            engine = _shared["engine"] = start_engine()
        except pytest.skip.Exception as exc:
            _shared["no-engine"] = str(exc.msg)
            raise
    try:
        yield engine
    finally:
        if _shared.pop("engine", None) is not None:
            stop_engine(engine)


@pytest.fixture(scope="session")
def registry(docker_engine: Engine) -> Iterator[Registry]:
    handle = _shared.get("registry")
    if not isinstance(handle, Registry):
        handle = _shared["registry"] = start_registry(docker_engine.root)
    try:
        yield handle
    finally:
        if _shared.pop("registry", None) is not None:
            stop_registry(handle)


@dataclass(frozen=True)
class Images:
    """Pinned references (``repository@sha256:...``) in the session's registry, of
    images the engine does not hold until something pulls them."""

    v1: str
    v2: str
    broken: str


@pytest.fixture(scope="session")
def images(docker_engine: Engine, registry: Registry) -> Images:
    built = _shared.get("images")
    if isinstance(built, Images):
        return built
    repository = f"{registry.address}/web"
    refs = {}
    for tag, broken in (("1", False), ("2", False), ("broken", True)):
        image_id = build_image(docker_engine, repository, tag, label=f"web {tag}", broken=broken)
        refs[tag] = push(docker_engine, repository, tag)
        docker_engine.run_cli("rmi", "--force", image_id)
    made = Images(refs["1"], refs["2"], refs["broken"])
    _shared["images"] = made
    return made
