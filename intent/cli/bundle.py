"""The agents' own bundle: one reproducible tarball that runs on a host with only python3.

    platypus-<version>.tar.gz, packed by ``pack.build`` (sorted members, root-owned,
    fixed mtimes, gzip without name or time), unpacks to:

    src/intent/, src/agents/   Platypus's code, copied from the installed project
    site/                      every runtime dependency, installed by ``pip --target``
    bin/launch/<agent>         one service per agent (pp-preparer, pp-setlive, ...)
    bin/check                  the health gate of a release
    bin/kickstart              the host bootstrap (agents/kickstart/host.py)
    VERSION, PYTHON            the bundle's version; the Python (major.minor) it was built for
    REQUIREMENTS.txt           what site/ holds, pinned

Why ``pip install --target`` and not shiv or pex: both of those build one zip that,
when run, unpacks itself into a cache under the user's home (``~/.shiv``, ``~/.pex``),
outside the install and beyond what pp-preparer verified; a ``--target`` tree is a
plain directory that the preparer extracts, checks and marks like any app, that nobody
modifies at run time, and that ``PYTHONPATH`` points at. pip is also the one tool
every Python host already has. Wheels come from a wheelhouse (``--wheels``) that
``scripts/setup --test`` fills: a build reads only that directory when it holds every
pinned wheel, and asks pip's index for the missing ones otherwise.

Dependencies are pinned to the versions installed beside the project (the virtualenv
the tests run in), so the bundle carries exactly what was tested, and binary wheels are
those of the building Python's ``major.minor`` (recorded in ``PYTHON``; ``bin/kickstart``
refuses another one).
"""

from __future__ import annotations

import hashlib
import importlib.metadata
import importlib.util
import os
import shutil
import subprocess
import sys
import tempfile
from dataclasses import dataclass
from pathlib import Path

from intent.cli import pack

DISTRIBUTION = "platypus-deploy"
PACKAGES = ("intent", "agents")
AGENTS = ("preparer", "setlive", "iptables", "elb-registrar")
"""Every agent a bundle can run; a host runs those its kickstart names."""
NAME = "platypus"


class BundleError(Exception):
    """The bundle cannot be built; the message says what to fix."""


@dataclass(frozen=True)
class Built:
    path: Path
    version: str
    sha256: str
    size: int


def python_tag() -> str:
    return f"{sys.version_info.major}.{sys.version_info.minor}"


def _package_dir(package: str) -> Path:
    spec = importlib.util.find_spec(package)
    if spec is None or not spec.submodule_search_locations:
        raise BundleError(f"package {package} is not installed: run scripts/setup")
    return Path(next(iter(spec.submodule_search_locations)))


def runtime_requirements() -> list[str]:
    """The project's own dependencies, without the test extras."""
    try:
        requires = importlib.metadata.requires(DISTRIBUTION) or []
    except importlib.metadata.PackageNotFoundError as exc:
        raise BundleError(f"{DISTRIBUTION} is not installed: run scripts/setup") from exc
    return [r for r in requires if "extra ==" not in r]


def installed_pins() -> list[str]:
    """Every distribution installed beside the project, as pip constraints: what was
    tested is what is carried."""
    pins = {
        (dist.metadata["Name"] or "").lower(): f"{dist.metadata['Name']}=={dist.version}"
        for dist in importlib.metadata.distributions()
        if dist.metadata["Name"] and dist.metadata["Name"].lower() != DISTRIBUTION
    }
    return [pins[name] for name in sorted(pins)]


def default_wheelhouse() -> Path:
    return Path(os.environ.get("PP_WHEELHOUSE") or Path(sys.prefix) / "wheelhouse")


def _pip(*args: str) -> subprocess.CompletedProcess[str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("PIP_")}
    env |= {"PIP_DISABLE_PIP_VERSION_CHECK": "1", "SOURCE_DATE_EPOCH": "0"}
    return subprocess.run(
        [sys.executable, "-m", "pip", *args], capture_output=True, text=True, env=env, check=False
    )


def fill_wheelhouse(
    wheelhouse: Path, requirements: Path, constraints: Path, links: list[Path]
) -> None:
    """Put a wheel of every pinned dependency in ``wheelhouse``, fetching only what is missing."""
    wheelhouse.mkdir(parents=True, exist_ok=True)
    link_args = [arg for d in [wheelhouse, *links] for arg in ("--find-links", str(d))]
    wheel = [
        "wheel", "-q", "--wheel-dir", str(wheelhouse), *link_args,
        "-r", str(requirements), "-c", str(constraints),
    ]  # fmt: skip
    done = _pip(*wheel, "--no-index")  # everything already there: no index needed
    if done.returncode != 0:
        done = _pip(*wheel)
    if done.returncode != 0:
        raise BundleError(
            f"pip could not get the dependencies' wheels into {wheelhouse}: "
            f"{_last_line(done.stderr)}"
        )


def _last_line(text: str) -> str:
    lines = [line.strip() for line in text.splitlines() if line.strip()]
    return lines[-1] if lines else "no output"


def prepare_wheelhouse(wheelhouse: Path) -> None:
    """Fill ``wheelhouse`` with every pinned dependency (``scripts/setup --test``), so
    later builds need no index."""
    with tempfile.TemporaryDirectory(prefix="pp-bundle-") as scratch:
        requirements, constraints = _requirement_files(Path(scratch), [])
        fill_wheelhouse(wheelhouse, requirements, constraints, [])


def _requirement_files(scratch: Path, extra: list[str]) -> tuple[Path, Path]:
    requirements = scratch / "requirements.txt"
    constraints = scratch / "constraints.txt"
    requirements.write_text("\n".join([*runtime_requirements(), *extra]) + "\n")
    # An extra requirement names its own version: it is not held to the installed one.
    extra_names = {_requirement_name(r) for r in extra}
    constraints.write_text(
        "\n".join(p for p in installed_pins() if _requirement_name(p) not in extra_names) + "\n"
    )
    return requirements, constraints


def install_dependencies(
    site: Path, wheelhouse: Path, extra: list[str], links: list[Path]
) -> list[str]:
    """``pip install --target site`` from the wheelhouse alone; returns the pins carried."""
    with tempfile.TemporaryDirectory(prefix="pp-bundle-") as scratch:
        requirements, constraints = _requirement_files(Path(scratch), extra)
        link_args = [arg for d in [wheelhouse, *links] for arg in ("--find-links", str(d))]
        install = [
            "install", "-q", "--target", str(site), "--no-index", *link_args,
            "--no-compile", "--only-binary", ":all:", "--no-warn-script-location",
            "-r", str(requirements), "-c", str(constraints),
        ]  # fmt: skip
        done = _pip(*install)
        if done.returncode != 0:
            fill_wheelhouse(wheelhouse, requirements, constraints, links)
            done = _pip(*install)
            if done.returncode != 0:
                raise BundleError(f"pip install --target failed: {_last_line(done.stderr)}")
    # Console scripts name the building interpreter in their #! line: the agents run
    # as ``python3 -m``, so nothing in site/bin is needed, and it would not be portable.
    shutil.rmtree(site / "bin", ignore_errors=True)
    for cache in site.rglob("__pycache__"):
        shutil.rmtree(cache, ignore_errors=True)
    return sorted(
        f"{d.name.removesuffix('.dist-info').rsplit('-', 1)[0]}=="
        f"{d.name.removesuffix('.dist-info').rsplit('-', 1)[1]}"
        for d in site.glob("*.dist-info")
    )


def _requirement_name(requirement: str) -> str:
    name = requirement
    for stop in "=<>!~;[ ":
        name = name.split(stop, 1)[0]
    return name.strip().lower().replace("_", "-").replace(".", "-")


LAUNCH = """\
#!/bin/sh
# pp-{agent} from this install: its code in src/, its dependencies in site/, the flags
# this host's kickstart wrote (agents/kickstart/launch.py).
exec 2>&1
here=$(cd "$(dirname "$0")/../.." && pwd -P) || exit 1
export PYTHONPATH="$here/src:$here/site" PYTHONNOUSERSITE=1 PYTHONDONTWRITEBYTECODE=1
python="$here/../../python3"  # <basedir>/python3, chosen by the kickstart
[ -x "$python" ] || python=python3
exec "$python" -m agents.kickstart.launch {agent} "$here" "$@"
"""

CHECK = """\
#!/bin/sh
# Healthy when this install's agents load from it, dependencies and all.
here=$(cd "$(dirname "$0")/.." && pwd -P) || exit 1
cd / || exit 1
export PYTHONPATH="$here/src:$here/site" PYTHONNOUSERSITE=1 PYTHONDONTWRITEBYTECODE=1
python="$here/../../python3"  # <basedir>/python3, chosen by the kickstart
[ -x "$python" ] || python=python3
exec "$python" -m agents.kickstart.check "$here"
"""

KICKSTART = """\
#!/bin/sh
# Install this bundle's agents on this host: see --help (agents/kickstart/host.py).
here=$(cd "$(dirname "$0")/.." && pwd -P) || exit 1
export PYTHONPATH="$here/src:$here/site" PYTHONNOUSERSITE=1 PYTHONDONTWRITEBYTECODE=1
exec python3 -m agents.kickstart.host --bundle "$here" "$@"
"""


def _write(path: Path, text: str, mode: int) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(text)
    path.chmod(mode)


def lay_out(
    tree: Path,
    wheelhouse: Path,
    extra: list[str] | None = None,
    links: list[Path] | None = None,
    source: Path | None = None,
) -> None:
    """Lay the bundle's tree out in ``tree`` (which must not exist), without ``VERSION``;
    the code comes from the installed packages, or from ``source`` (a tree holding
    ``intent/`` and ``agents/``)."""
    tree.mkdir(parents=True)
    for package in PACKAGES:
        shutil.copytree(
            source / package if source is not None else _package_dir(package),
            tree / "src" / package,
            ignore=shutil.ignore_patterns("__pycache__", "*.pyc", ".*"),
        )
    pins = install_dependencies(tree / "site", wheelhouse, extra or [], links or [])
    for agent in AGENTS:
        _write(tree / "bin" / "launch" / agent, LAUNCH.format(agent=agent), 0o755)
    _write(tree / "bin" / "check", CHECK, 0o755)
    _write(tree / "bin" / "kickstart", KICKSTART, 0o755)
    _write(tree / "PYTHON", python_tag() + "\n", 0o644)
    _write(tree / "REQUIREMENTS.txt", "\n".join(pins) + "\n", 0o644)


def tree_digest(tree: Path) -> str:
    """A digest of every name, kind, executable bit and content in ``tree``: what the
    default version is derived from (cheaper than packing it twice)."""
    digest = hashlib.sha256()
    for path in sorted(tree.rglob("*")):
        name = path.relative_to(tree).as_posix()
        if path.is_symlink():
            digest.update(f"l {name} {os.readlink(path)}\n".encode())
        elif path.is_dir():
            digest.update(f"d {name}\n".encode())
        else:
            digest.update(f"f {name} {os.access(path, os.X_OK)} {sha256_of(path)}\n".encode())
    return digest.hexdigest()


def default_version(tree: Path) -> str:
    try:
        release = importlib.metadata.version(DISTRIBUTION)
    except importlib.metadata.PackageNotFoundError:
        release = "0"
    return f"{release}-{tree_digest(tree)[:12]}"


def finish(tree: Path, out: Path, version: str | None) -> Built:
    """Write ``VERSION`` and pack ``tree`` into ``out/platypus-<version>.tar.gz``."""
    if version is None:
        version = default_version(tree)
    _write(tree / "VERSION", version + "\n", 0o644)
    out.mkdir(parents=True, exist_ok=True)
    target = out / f"{NAME}-{version}.tar.gz"
    temp = out / f".{target.name}{pack.TEMP_MARK}{os.getpid()}"
    try:
        with temp.open("wb") as sink:
            sha256 = pack.build(tree, sink, mtime=0)
        os.replace(temp, target)
    finally:
        temp.unlink(missing_ok=True)
    return Built(target, version, sha256, target.stat().st_size)


def build(
    out: Path,
    version: str | None = None,
    wheelhouse: Path | None = None,
    extra: list[str] | None = None,
    links: list[Path] | None = None,
    source: Path | None = None,
) -> Built:
    """Build ``platypus-<version>.tar.gz`` in ``out``; by default the version is derived
    from the tree, so the same code and dependencies give the same name and bytes."""
    with tempfile.TemporaryDirectory(prefix="pp-bundle-") as scratch:
        tree = Path(scratch) / "tree"
        lay_out(tree, wheelhouse or default_wheelhouse(), extra, links, source)
        return finish(tree, out, version)


def sha256_of(path: Path) -> str:
    digest = hashlib.sha256()
    with path.open("rb") as source:
        for chunk in iter(lambda: source.read(1 << 20), b""):
            digest.update(chunk)
    return digest.hexdigest()
