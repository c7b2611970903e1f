"""A hostile app, for real: a process running as ``nobody`` that races the agents.

The agents run as root and hand installs and log directories to an app's
``run_as`` user, whose processes may already be running. ``Racer`` is such a
process: it walks a tree it can reach and, as fast as it can, replaces every
temporary name (``.pp-tmp-*``) and every name it is told about with a symlink to
a file only root may touch. Root following any of those links would show on that
file; the tests assert it never does, and that the racer really did swap names
while root worked (so a passing test is not one where the attack never ran).
"""

from __future__ import annotations

import contextlib
import os
import pwd
import shutil
import signal
import subprocess
import tempfile
from collections.abc import Iterator
from pathlib import Path
from types import TracebackType

from runit_support import require_root

NOBODY = pwd.getpwnam("nobody")
PYTHON = "/usr/bin/python3"
"""An interpreter nobody may run (the project's own may live under root's home)."""

_RACER = r"""
import os, signal, sys
root, target, names = sys.argv[1], sys.argv[2], set(sys.argv[3:])
stop = []
signal.signal(signal.SIGTERM, lambda *_: stop.append(1))
swaps = 0
spare = ".racer-%d" % os.getpid()
print("ready", flush=True)
while not stop:
    for dirpath, dirnames, filenames in os.walk(root):
        for name in filenames:
            if not (name.startswith(".pp-tmp-") or name in names):
                continue
            link = os.path.join(dirpath, spare)
            try:
                os.symlink(target, link)
                os.rename(link, os.path.join(dirpath, name))
                swaps += 1
            except OSError:
                try:
                    os.unlink(link)
                except OSError:
                    pass
print(swaps, flush=True)
"""


class Racer:
    """``with Racer(root, target, "name", ...) as racer:`` ... then ``racer.swaps``."""

    def __init__(self, root: Path, target: Path, *names: str) -> None:
        self.argv = [PYTHON, "-I", "-c", _RACER, str(root), str(target), *names]
        self.swaps = 0
        self._proc: subprocess.Popen[str] | None = None

    def __enter__(self) -> Racer:
        self._proc = as_nobody(self.argv, stdout=subprocess.PIPE)
        assert self._proc.stdout is not None
        assert self._proc.stdout.readline().strip() == "ready"
        return self

    def __exit__(
        self, kind: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        assert self._proc is not None
        self._proc.send_signal(signal.SIGTERM)
        out, _ = self._proc.communicate(timeout=30)
        if kind is None:
            assert self._proc.returncode == 0, out
            self.swaps = int(out.split()[-1])


def as_nobody(argv: list[str], **kwargs: object) -> subprocess.Popen[str]:
    """Start ``argv`` as nobody:nogroup with no supplementary groups."""
    return subprocess.Popen(  # type: ignore[call-overload,no-any-return]
        argv,
        user=NOBODY.pw_uid,
        group=NOBODY.pw_gid,
        extra_groups=[],
        cwd="/",
        env={"PATH": "/usr/bin:/bin"},
        text=True,
        **kwargs,
    )


def run_as_nobody(code: str, *args: str) -> subprocess.CompletedProcess[str]:
    """Run Python ``code`` as nobody; its stdout, stderr and exit status."""
    proc = as_nobody(
        [PYTHON, "-I", "-c", code, *args], stdout=subprocess.PIPE, stderr=subprocess.PIPE
    )
    out, err = proc.communicate(timeout=30)
    return subprocess.CompletedProcess(proc.args, proc.returncode, out, err)


def fingerprint(path: Path) -> tuple[int, int, int, int, int, bytes]:
    """Everything root following a link to ``path`` could change."""
    st = path.lstat()
    return st.st_mode, st.st_uid, st.st_gid, st.st_mtime_ns, st.st_ctime_ns, path.read_bytes()


@contextlib.contextmanager
def open_root() -> Iterator[Path]:
    """A temp directory nobody can traverse (pytest's own are root's, 0700)."""
    require_root()
    root = Path(tempfile.mkdtemp(prefix="pp-race-", dir="/tmp"))
    try:
        root.chmod(0o755)
        yield root
    finally:
        shutil.rmtree(root, ignore_errors=True)


def make_secret(private_dir: Path) -> Path:
    """A root-only file in a directory nobody can enter: nobody cannot name it usefully,
    but could trick root into touching it through a link."""
    path = private_dir / "secret"
    path.write_bytes(b"root only\n")
    path.chmod(0o600)
    os.utime(path, ns=(1, 1))
    return path
