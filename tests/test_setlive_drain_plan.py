"""setlive's side of the drain handshake, as plain data: when an app behind load
balancers is drained before a stop or restart, how long that waits, and when the
request is withdrawn."""

from __future__ import annotations

import dataclasses

from hypothesis import given
from hypothesis import strategies as st
from test_setlive_plan import APP, FP, installed, kinds, observed, running

from agents.setlive import plan as p
from agents.setlive.observe import drain_seen
from agents.setlive.plan import Desired, DrainBounds, DrainSeen
from agents.setlive.state import AppState, Drain, Pending

BOUNDS = DrainBounds(wait_s=30.0, hold_s=200.0)
WAITING = DrainSeen("tok", acknowledged=False, expired=False)
ANSWERED = DrainSeen("tok", acknowledged=True, expired=False)
UNANSWERED = DrainSeen("tok", acknowledged=False, expired=True)


def behind_lb(version: str | None = "2", min_nodes: int = 0) -> Desired:
    return Desired(APP, version, FP, min_nodes, drain=BOUNDS)


UPGRADE = ["SavePending", "SetPrevious", "SetCurrent", "RestartService", "AwaitHealth"]


def test_an_upgrade_behind_a_load_balancer_first_asks_for_a_drain_and_goes_no_further() -> None:
    result = p.plan(behind_lb(), observed(current="1"))
    assert result.actions[0] == p.RequestDrain(BOUNDS)
    # Apply stops at the request: nothing after it runs before the registrar answers.
    assert kinds(result)[1:] == [*UPGRADE, "ClearPending"]


def test_while_the_registrar_has_not_answered_the_plan_stops_at_await_drain() -> None:
    result = p.plan(behind_lb(), observed(current="1", drain=WAITING))
    assert result.actions[0] == p.AwaitDrain("tok")
    assert "ClearDrain" not in kinds(result)


def test_an_acknowledged_drain_switches_and_withdraws_the_request_after_the_gate() -> None:
    result = p.plan(behind_lb(), observed(current="1", drain=ANSWERED))
    assert kinds(result) == [*UPGRADE, "ClearPending", "ClearDrain"]
    assert result.undrained is None


def test_no_answer_by_the_deadline_switches_anyway_and_says_so() -> None:
    result = p.plan(behind_lb(), observed(current="1", drain=UNANSWERED))
    assert kinds(result) == [*UPGRADE, "ClearPending", "ClearDrain"]
    assert result.undrained is not None
    assert "did not acknowledge" in result.undrained and "30s" in result.undrained


def test_an_app_without_load_balancers_never_asks_nor_waits() -> None:
    result = p.plan(Desired(APP, "2", FP), observed(current="1"))
    assert kinds(result) == [*UPGRADE, "ClearPending"]


def test_a_first_start_serves_nothing_yet_so_nothing_is_drained() -> None:
    result = p.plan(behind_lb("1"), observed(current=None, versions={"1": installed()}))
    assert "RequestDrain" not in kinds(result)


def test_a_steady_app_is_not_drained() -> None:
    assert p.plan(behind_lb("1"), observed(current="1")).actions == ()


def test_a_restart_for_new_settings_is_drained_too() -> None:
    stale = {APP: running("1", digest="old")}
    result = p.plan(behind_lb("1"), observed(current="1", services=stale))
    assert kinds(result)[:2] == ["RequestDrain", "RestartService"]


def test_stopping_a_load_balanced_app_drains_it_first() -> None:
    result = p.plan(behind_lb(None), observed(current="1"))
    assert kinds(result) == ["RequestDrain", "StopService", "SetAutostart"]
    answered = p.plan(behind_lb(None), observed(current="1", drain=ANSWERED))
    assert kinds(answered) == ["StopService", "SetAutostart", "ClearDrain"]


def test_a_resumed_gate_keeps_the_request_until_it_passes() -> None:
    # setlive died after restarting: nothing disrupts any more, but the gate is pending.
    pending = Pending("2", "1", 100.0)
    result = p.plan(behind_lb(), observed(current="2", pending=pending, drain=WAITING))
    assert kinds(result) == ["AwaitHealth", "ClearPending", "ClearDrain"]


def test_a_request_left_with_nothing_to_switch_is_withdrawn() -> None:
    assert kinds(p.plan(behind_lb("1"), observed(current="1", drain=WAITING))) == ["ClearDrain"]
    no_lb = Desired(APP, "1", FP)
    assert kinds(p.plan(no_lb, observed(current="1", drain=ANSWERED))) == ["ClearDrain"]


def test_the_lease_comes_before_the_drain() -> None:
    result = p.plan(behind_lb(min_nodes=1), observed(current="1", healthy=True))
    assert kinds(result)[:2] == ["AcquireLease", "RequestDrain"]


@given(
    version=st.sampled_from(["1", "2", None]),
    current=st.sampled_from(["1", "2", None]),
    drain=st.sampled_from([None, WAITING, ANSWERED, UNANSWERED]),
    lb=st.booleans(),
    healthy=st.sampled_from([None, True, False]),
)
def test_nothing_stops_or_restarts_a_load_balanced_app_before_an_answer_or_the_deadline(
    version: str | None,
    current: str | None,
    drain: DrainSeen | None,
    lb: bool,
    healthy: bool | None,
) -> None:
    desired = dataclasses.replace(behind_lb(version), drain=BOUNDS if lb else None)
    result = p.plan(desired, observed(current=current, drain=drain, healthy=healthy))
    steps = kinds(result)
    disrupting = {"RestartService", "StopService", "RetireService"}
    first = next((i for i, k in enumerate(steps) if k in disrupting), None)
    if first is None:
        return
    before = steps[:first]
    if not lb:
        assert "RequestDrain" not in steps and "AwaitDrain" not in steps
    elif drain is None:
        assert "RequestDrain" in before
    elif drain is WAITING:
        assert "AwaitDrain" in before
    else:
        assert "RequestDrain" not in steps and "AwaitDrain" not in steps
        assert steps[-1] == "ClearDrain"
        assert (result.undrained is not None) == (drain is UNANSWERED)


def test_drain_seen_compares_the_answer_with_its_own_token_and_the_deadline() -> None:
    note = AppState(drain=Drain("tok", at=100.0, wait_until=130.0, until=330.0))
    assert drain_seen(AppState(), "tok", 120.0) is None
    assert drain_seen(note, "tok", 120.0) == ANSWERED
    assert drain_seen(note, "other", 120.0) == WAITING
    assert drain_seen(note, None, 130.0) == UNANSWERED
    assert note.drain is not None
    assert note.drain.request() == {"token": "tok", "at": 100.0, "until": 330.0}
