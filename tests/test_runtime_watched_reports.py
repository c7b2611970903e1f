"""The runtime's two ways of converging an app though its intent did not change: a
watched agent's report that changed (``watched_reports``), and a re-check the app's
last outcome asked for (``Outcome.recheck_after``). Over a real embedded store."""

from __future__ import annotations

import uuid
from typing import ClassVar

import pytest
from test_runtime import NODE, RecordingAgent, eventually, looping, put_app

from agents.runtime import Outcome, Runtime, RuntimeOptions
from intent.model import Reality
from intent.store import AppIntent, IntentStore
from intent.store.kv import KVStore


@pytest.fixture
def store(kv: KVStore) -> IntentStore:
    """On both backends: the watch of another agent's reports is each one's own wait."""
    return IntentStore(kv, prefix=f"watched-{uuid.uuid4().hex[:8]}/")


class ReadsSetlive(RecordingAgent):
    """Acts on setlive's drain requests, as the load balancer registrar does."""

    name = "reader"
    converges_in_background = True
    watched_reports: ClassVar[tuple[str, ...]] = ("setlive",)

    def report_input(self, report: Reality) -> object:
        return report.details.get("drain_request")


class Rechecks(RecordingAgent):
    name = "rechecker"
    converges_in_background = True

    def converge(self, intent: AppIntent) -> Outcome:
        return super().converge(intent).recheck_after(0.05)


def setlive_says(store: IntentStore, app: str, **details: object) -> None:
    store.write_reality(
        Reality(node=NODE, agent="setlive", app=app, status="converging", details=details)
    )


def converges_of(agent: RecordingAgent, app: str) -> int:
    return sum(1 for name, _ in agent.converged if name == app)


def test_a_watched_report_that_changes_converges_that_app_again_and_no_other(
    store: IntentStore,
) -> None:
    put_app(store, "web")
    put_app(store, "api")
    agent = ReadsSetlive()
    options = RuntimeOptions(node=NODE, resync_interval_s=3600, watch_timeout_s=0.2)
    with looping(Runtime(agent, store, options)):
        assert eventually(lambda: converges_of(agent, "web") == 1 and converges_of(agent, "api"))
        before_api = converges_of(agent, "api")

        setlive_says(store, "web", drain_request={"token": "t1", "at": 1, "until": 2})
        assert eventually(lambda: converges_of(agent, "web") == 2)

        setlive_says(store, "web")  # withdrawn
        assert eventually(lambda: converges_of(agent, "web") == 3)
        assert converges_of(agent, "api") == before_api


def test_a_watched_report_rewritten_with_the_same_input_converges_nothing(
    store: IntentStore,
) -> None:
    put_app(store, "web")
    agent = ReadsSetlive()
    options = RuntimeOptions(node=NODE, resync_interval_s=3600, watch_timeout_s=0.2)
    rt = Runtime(agent, store, options)
    request = {"token": "t1", "at": 1, "until": 2}
    setlive_says(store, "web", drain_request=request)
    with looping(rt):
        assert eventually(lambda: converges_of(agent, "web") == 1)
        setlive_says(store, "web", drain_request=request, health="unknown")
        # The loop woke for it (the watch covers setlive's reports) and read it...
        assert eventually(lambda: rt._report_inputs.get(("setlive", "web")) == request)
        setlive_says(store, "web", drain_request={**request, "token": "t2"})
        assert eventually(lambda: converges_of(agent, "web") == 2)
    # ...but only the new token converged the app again.
    assert converges_of(agent, "web") == 2


def test_an_outcome_that_asks_for_a_recheck_is_converged_again_and_still_counts_converged(
    store: IntentStore,
) -> None:
    put_app(store, "web")
    agent = Rechecks()
    rt = Runtime(agent, store, RuntimeOptions(node=NODE, once=True))
    assert rt.run_pass(force=True)  # a re-check to come is not work left undone

    options = RuntimeOptions(node=NODE, resync_interval_s=3600)
    with looping(Runtime(agent, store, options)):
        assert eventually(lambda: converges_of(agent, "web") >= 4)
