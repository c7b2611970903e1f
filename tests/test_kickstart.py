"""The host bootstrap from the bundle alone: no checkout, no virtualenv.

The bundle is built, unpacked in a temp dir, and its ``bin/kickstart`` run in a mount
namespace where the checkout is an empty directory, with a clean PATH and no
PYTHONPATH, against a private runsvdir started the same way: the agents come up from
the install pp-preparer made, report in ``reality/``, and converge a sample app.
"""

from __future__ import annotations

import json
import shutil
from collections.abc import Iterator

import pytest
from kickstart_support import APP, NODE, BareHost, bare_host, built, hup, unpack, wait_for

from agents.system import runit

pytestmark = pytest.mark.timeout(1800)  # the first test builds the bundle (once per run)


@pytest.fixture
def host() -> Iterator[BareHost]:
    with bare_host() as made:
        yield made


def test_kickstart_from_the_bundle_runs_the_agents_which_then_converge_an_app(
    host: BareHost,
) -> None:
    bundle = built("repro-a")
    downloaded = host.root / "downloaded"
    tree = unpack(bundle.path, downloaded / "platypus")
    tarball = downloaded / bundle.path.name
    shutil.copyfile(bundle.path, tarball)
    version = bundle.version
    verified = ("--tarball", str(tarball), "--sha256", bundle.sha256)

    first = host.kickstart(tree, *verified)
    assert first.returncode == 0, first.stdout + first.stderr
    assert f"kickstart: {APP} {version} runs here" in first.stdout

    # The agents run from the install, with the host's python3 and the bundle's
    # dependencies; what they report after a resync, they report themselves.
    for agent in ("preparer", "setlive"):
        assert wait_for(lambda a=agent: host.runs(a, version), 180), host.describe()  # type: ignore[misc]
    since = hup(host, "preparer", "setlive")
    for agent in ("preparer", "setlive"):
        assert wait_for(  # type: ignore[misc]
            lambda a=agent: host.reports_since(a, version, since), 180
        ), host.describe()
    assert host.current() == version
    config = json.loads((host.layout.basedir / "agents.json").read_text())
    assert (config["node"], config["init"], config["agents"]) == (
        NODE,
        "runit",
        ["preparer", "setlive"],
    )
    # The agents this host does not run idle, so the release's gate passes.
    assert host.service("iptables").up and not host.running("iptables").get("PP_STORE")

    # The agents converge an app on their own.
    host.put_sample_app("1", host.root / "srv" / "sample")
    assert wait_for(lambda: host.reports_since("setlive", "1", since, app="sample"), 180), (
        host.describe()
    )
    assert runit.status(host.stage / "sample").up

    # A second run changes nothing: the same bytes are already published, the intent
    # is unchanged, and the agents keep running (not restarted).
    pids = {agent: host.service(agent).pid for agent in ("preparer", "setlive")}
    second = host.kickstart(tree, *verified)
    assert second.returncode == 0, second.stdout + second.stderr
    assert "already published" in second.stdout
    assert "already active, nothing changed" in second.stdout
    assert "already runs here" in second.stdout
    assert "wrote" not in second.stdout
    assert {agent: host.service(agent).pid for agent in pids} == pids


def test_kickstart_refuses_what_is_not_the_verified_tarball(host: BareHost) -> None:
    bundle = built("repro-a")
    tree = unpack(bundle.path, host.root / "downloaded" / "platypus")
    (tree / "src" / "agents" / "setlive" / "plan.py").write_text("# changed after download\n")
    tarball = host.root / "downloaded" / bundle.path.name
    tarball.write_bytes(bundle.path.read_bytes()[:-1] + b"\0")

    for refused in (
        host.kickstart(tree, "--sha256", bundle.sha256),
        host.kickstart(tree, "--tarball", str(tarball), "--sha256", bundle.sha256),
    ):
        assert refused.returncode == 1, refused.stdout + refused.stderr
        assert "changed since it was verified" in refused.stderr
        assert len(refused.stderr.strip().splitlines()) == 1
    assert not host.layout.basedir.exists()
    assert not (host.root / "repo").exists()
