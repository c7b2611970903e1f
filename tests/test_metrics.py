"""Agent metrics: a real pp-preparer serving /metrics, scraped and parsed with
prometheus_client's own parser; the AWS call counters against moto in server mode."""

from __future__ import annotations

import subprocess
import sys
import urllib.request
from collections.abc import Iterator
from pathlib import Path

import boto3
import pytest
from preparer_support import free_port, moto_server, put_app, tree_tarball, wait_for
from prometheus_client.parser import text_string_to_metric_families
from prometheus_client.samples import Sample

from agents import metrics
from agents.system.aws import Aws, AwsError
from intent.model import ClassicElb
from intent.store import IntentStore
from intent.store.sqlite import SqliteStore

PREPARER = Path(sys.executable).parent / "pp-preparer"
NODE = "web1"


def scrape(port: int) -> list[Sample]:
    with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=5) as answer:
        assert answer.headers["Content-Type"].startswith("text/plain; version=")
        text = answer.read().decode()
    return [s for family in text_string_to_metric_families(text) for s in family.samples]


def value(samples: list[Sample], name: str, **labels: str) -> float | None:
    for sample in samples:
        if sample.name == name and all(sample.labels.get(k) == v for k, v in labels.items()):
            return float(sample.value)
    return None


@pytest.fixture
def preparer(tmp_path: Path) -> Iterator[tuple[IntentStore, int, subprocess.Popen[bytes]]]:
    """pp-preparer with --metrics-listen on a free loopback port, app hello 1.0.7 assigned."""
    store = IntentStore(SqliteStore(tmp_path / "intent.db"))
    (tmp_path / "repo" / "hello").mkdir(parents=True)
    sha = tree_tarball(tmp_path / "repo" / "hello" / "hello_1.0.7.tar.gz", {"bin/launch": b"#!"})
    put_app(
        store,
        NODE,
        "hello",
        tmp_path / "srv" / "hello",
        {"1.0.7": {"state": "active", "sha256": sha}},
    )
    port = free_port()
    log = (tmp_path / "agent.log").open("w")
    agent = subprocess.Popen(
        [str(PREPARER), "--store", f"sqlite://{tmp_path / 'intent.db'}", "--node", NODE,
         "--log-format", "json", "--state-dir", str(tmp_path / "state"),
         "--repo", f"file://{tmp_path / 'repo'}", "--metrics-listen", str(port)],
        stdout=log, stderr=subprocess.STDOUT,
    )  # fmt: skip
    log.close()
    try:
        yield store, port, agent
    finally:
        agent.terminate()
        try:
            agent.wait(20)
        except subprocess.TimeoutExpired:
            agent.kill()
            agent.wait()
        store.close()


def converged(store: IntentStore) -> bool:
    return any(
        r.status == "converged" and r.version == "1.0.7" for r in store.reality(NODE, "hello")
    )


def test_a_running_agent_serves_metrics_that_count_its_converge(
    preparer: tuple[IntentStore, int, subprocess.Popen[bytes]], tmp_path: Path
) -> None:
    store, port, _ = preparer
    wait_for(lambda: converged(store), timeout_s=30)
    # The report is written after the converge is counted: the count is there now.
    samples = scrape(port)
    assert value(
        samples,
        "platypus_converge_duration_seconds_count",
        agent="preparer",
        app="hello",
        status="converged",
    ), (tmp_path / "agent.log").read_text()
    assert value(samples, "platypus_preparer_installs_total", app="hello", result="done") == 1
    artifact = tmp_path / "repo" / "hello" / "hello_1.0.7.tar.gz"
    assert (
        value(samples, "platypus_preparer_fetched_bytes_total", app="hello")
        == artifact.stat().st_size
    )
    assert value(samples, "platypus_apps", agent="preparer", status="converged") == 1
    assert value(samples, "platypus_apps", agent="preparer", status="error") == 0
    assert (
        value(samples, "platypus_intent_to_converged_seconds_count", agent="preparer", app="hello")
        == 1
    )
    passes = value(samples, "platypus_passes_total", agent="preparer", result="converged") or 0
    passes += value(samples, "platypus_passes_total", agent="preparer", result="pending") or 0
    assert passes >= 1
    watch_age = value(samples, "platypus_watch_age_seconds", agent="preparer")
    assert watch_age is not None and 0 <= watch_age < 60
    assert value(samples, "platypus_store_errors_total", agent="preparer") is not None
    assert value(samples, "process_resident_memory_bytes") is not None
    # No label carries a node or a version: their values grow without bound.
    for sample in samples:
        assert NODE not in sample.labels.values() and "1.0.7" not in sample.labels.values()


def test_a_broken_install_is_counted_as_failed_and_the_app_as_in_error(
    preparer: tuple[IntentStore, int, subprocess.Popen[bytes]], tmp_path: Path
) -> None:
    store, port, _ = preparer
    wait_for(lambda: converged(store), timeout_s=30)
    put_app(
        store,
        NODE,
        "hello",
        tmp_path / "srv" / "hello",
        {"2.0": {"state": "active", "sha256": "0" * 64}},
    )

    def failed() -> bool:
        return bool(
            value(scrape(port), "platypus_preparer_installs_total", app="hello", result="failed")
        )

    wait_for(failed, timeout_s=60, interval_s=0.2)
    samples = scrape(port)
    assert value(samples, "platypus_apps", agent="preparer", status="error") == 1
    assert value(
        samples,
        "platypus_converge_duration_seconds_count",
        agent="preparer",
        app="hello",
        status="error",
    )


def test_metrics_listen_refuses_a_bad_address_in_one_line(tmp_path: Path) -> None:
    done = subprocess.run(
        [str(PREPARER), "--store", f"sqlite://{tmp_path}/x.db", "--metrics-listen", "h:http"],
        capture_output=True, text=True, timeout=30, check=False,
    )  # fmt: skip
    assert done.returncode == 2
    assert done.stderr.strip().splitlines() == [
        "pp-preparer: error: Invalid value for '--metrics-listen': 'h:http': give PORT or"
        " ADDR:PORT with a port from 1 to 65535 (see 'pp-preparer --help')"
    ]


def test_listen_addresses() -> None:
    assert metrics.parse_listen("9100") == ("127.0.0.1", 9100)
    assert metrics.parse_listen("0.0.0.0:9100") == ("0.0.0.0", 9100)
    assert metrics.parse_listen("[::1]:9100") == ("::1", 9100)
    for bad in ("", ":9100", "x:0", "x:70000", "x:"):
        with pytest.raises(ValueError):
            metrics.parse_listen(bad)


def test_aws_calls_and_their_errors_are_counted_per_operation() -> None:
    session = boto3.Session(
        aws_access_key_id="testing", aws_secret_access_key="testing", region_name="us-east-1"
    )
    with moto_server() as endpoint:
        aws = Aws(session=session, endpoint_url=endpoint, hooks=metrics.AWS_HOOKS, attempts=1)
        operation = {"operation": "DescribeInstanceHealth"}
        error = {**operation, "code": "LoadBalancerNotFound"}
        calls = metrics.REGISTRY.get_sample_value("platypus_aws_calls_total", operation) or 0
        errors = metrics.REGISTRY.get_sample_value("platypus_aws_call_errors_total", error) or 0
        with pytest.raises(AwsError):
            aws.instance_health(
                ClassicElb(type="classic", name="missing", region="us-east-1"), "i-1"
            )
        assert metrics.REGISTRY.get_sample_value("platypus_aws_calls_total", operation) == calls + 1
        assert (
            metrics.REGISTRY.get_sample_value("platypus_aws_call_errors_total", error) == errors + 1
        )


def test_a_report_is_a_status_the_runtime_counts_once_per_app() -> None:
    def apps(status: str) -> float | None:
        return metrics.REGISTRY.get_sample_value("platypus_apps", {"agent": "t", "status": status})

    metrics.reported("t", "a", "converged")
    metrics.reported("t", "b", "error")
    metrics.reported("t", "a", "error")
    assert (apps("error"), apps("converged")) == (2, 0)
    metrics.app_gone("t", "a")
    assert (apps("error"), apps("converged")) == (1, 0)
