"""The registrar's decisions with plain data: in/out/hold, the actions and their order,
what AWS's words mean, min_nodes arithmetic. No AWS, no store, no host."""

from __future__ import annotations

from collections.abc import Iterable, Mapping

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from agents.elb_registrar import plan as p
from agents.elb_registrar.observe import classify, drain_token, setlive_says
from agents.elb_registrar.plan import (
    APP_TAG,
    CLUSTER_TAG,
    AwaitDrained,
    AwaitInService,
    Deregister,
    Desired,
    Forget,
    Local,
    Observed,
    Phase,
    Record,
    Register,
    Seen,
    Tag,
    Want,
    decide,
    lb_key,
)
from agents.system.aws import TargetHealth
from intent.model import ClassicElb, Reality, TargetGroup

APP, CLUSTER = "web", "prod"
ARN = "arn:aws:elasticloadbalancing:us-east-1:123456789012:targetgroup/web/0123456789abcdef"
CLASSIC = ClassicElb(type="classic", name="web-lb", region="us-east-1")
TG = TargetGroup(type="target_group", arn=ARN, port=8080, region="us-east-1")
TG_9090 = TargetGroup(type="target_group", arn=ARN, port=9090, region="us-east-1")
OURS = {APP_TAG: APP, CLUSTER_TAG: CLUSTER}

IN = Want("in", "runs and passes")
OUT = Want("out", "drained")
HOLD = Want("hold", "waiting for setlive")


def desired(*lbs: p.LoadBalancer, want: Want = IN) -> Desired:
    return Desired(APP, CLUSTER, lbs, want)


def observed(
    seen: Mapping[p.LoadBalancer, Seen], recorded: Iterable[p.LoadBalancer] = ()
) -> Observed:
    return Observed({lb_key(lb): s for lb, s in seen.items()}, {lb_key(lb): lb for lb in recorded})


def seen(phase: Phase | None, tags: Mapping[str, str] | None = None) -> Seen:
    return Seen(phase, state=str(phase), tags=tags)


def kinds(plan: p.Plan) -> list[str]:
    return [type(a).__name__ for a in plan.actions]


# -- decide -----------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("local", "direction", "health_based"),
    [
        (Local(None, None), "out", False),
        (Local(None, "1", health="healthy"), "out", False),
        (Local("1", "1", drained=True, health="healthy"), "out", False),
        (Local("1", "1", drained=True, health="unhealthy"), "out", False),
        (Local("1", "1", drain_token="t", health="healthy"), "out", False),
        (Local("2", "1", health="healthy"), "hold", False),
        (Local("2", None), "hold", False),
        (Local("2", "1", health="unhealthy"), "hold", False),
        (Local("1", "1", health="unhealthy", health_output="503"), "out", True),
        (Local("1", "1", health="unknown"), "hold", False),
        (Local("1", "1", health="unchecked"), "in", False),
        (Local("1", "1", health="healthy"), "in", False),
        # setlive rolled back from 2 (its gate failed) to 1: 1 serves, and is put back.
        (Local("2", "1", rolled_back_to="1", health="healthy"), "in", False),
        (Local("2", "1", rolled_back_to="1", health="unknown"), "hold", False),
        (Local("2", "2", rolled_back_to="1", health="healthy"), "hold", False),
        (Local("2", "1", rolled_back_to="1", drain_token="t", health="healthy"), "out", False),
    ],
)
def test_decide_puts_the_node_in_only_when_the_active_version_runs_healthy_and_undrained(
    local: Local, direction: str, health_based: bool
) -> None:
    want = decide(local)
    assert (want.direction, want.health_based) == (direction, health_based)
    assert want.reason


def test_decide_says_why_in_its_reason() -> None:
    assert "pp drain" in decide(Local("1", "1", drained=True)).reason
    sick = Local("1", "1", health="unhealthy", health_output="503 from /health")
    assert "503 from /health" in decide(sick).reason
    assert "runs 1" in decide(Local("2", "1")).reason
    assert "runs nothing" in decide(Local("2", None)).reason
    assert "tok-1" in decide(Local("1", "1", drain_token="tok-1")).reason


# -- min_nodes --------------------------------------------------------------------------------


def report(node: str, in_service: bool, age: float = 0.0, agent: str = p.AGENT) -> Reality:
    return Reality(
        node=node,
        agent=agent,
        app=APP,
        status="converged",
        details={"in_service": in_service},
        updated_at=1000.0 - age,
    )


def test_peers_in_service_counts_fresh_reports_of_other_nodes_of_the_cluster() -> None:
    reports = [
        report("n1", True),
        report("n2", True, age=500),  # stale: its agent stopped
        report("n3", False),
        report("n4", True),  # another cluster
        report("me", True),
        report("n5", True, agent="setlive"),
        report("n6", True, age=100),
    ]
    assert p.peers_in_service(reports, ["n1", "n2", "n3", "me", "n5", "n6"], "me", 1000.0, 180) == 2


@pytest.mark.parametrize(
    ("here", "peers", "min_nodes", "allowed"),
    [
        (True, 2, 2, True),
        (True, 1, 2, False),
        (True, 0, 1, False),
        (True, 0, 0, True),
        (False, 0, 5, True),  # not in service anyway: leaving takes nothing away
    ],
)
def test_may_leave_keeps_min_nodes_in_service(
    here: bool, peers: int, min_nodes: int, allowed: bool
) -> None:
    assert p.may_leave(here, peers, min_nodes) is allowed


# -- plan: joining ---------------------------------------------------------------------------


def test_a_new_registration_is_recorded_tagged_registered_then_awaited() -> None:
    plan = p.plan(desired(CLASSIC), observed({CLASSIC: seen("not_registered", {})}))
    assert plan.actions == (
        Record(CLASSIC),
        Tag(CLASSIC, ((APP_TAG, APP), (CLUSTER_TAG, CLUSTER))),
        Register(CLASSIC),
        AwaitInService((CLASSIC,)),
    )
    assert not plan.errors


def test_in_service_and_recorded_needs_nothing_not_even_tags() -> None:
    plan = p.plan(desired(CLASSIC, TG), observed(
        {CLASSIC: seen("in_service"), TG: seen("in_service")}, [CLASSIC, TG]))  # fmt: skip
    assert plan.actions == ()
    assert not plan.errors
    assert plan.targets == {lb_key(CLASSIC): "in", lb_key(TG): "in"}


def test_in_service_found_on_first_sight_is_recorded_and_tagged_without_registering() -> None:
    plan = p.plan(desired(TG), observed({TG: seen("in_service", {})}))
    assert kinds(plan) == ["Record", "Tag"]


def test_a_record_under_another_role_is_brought_up_to_date() -> None:
    role = "arn:aws:iam::123456789012:role/registrar"
    moved = TG.model_copy(update={"role_arn": role})
    plan = p.plan(desired(moved), observed({moved: seen("in_service")}, [TG]))
    assert plan.actions == (Record(moved),)


def test_only_the_missing_ownership_tag_is_added() -> None:
    plan = p.plan(desired(TG), observed({TG: seen("not_registered", {APP_TAG: APP, "x": "y"})}))
    assert Tag(TG, ((CLUSTER_TAG, CLUSTER),)) in plan.actions


@pytest.mark.parametrize(
    "tags",
    [{APP_TAG: "other"}, {CLUSTER_TAG: "staging"}, {APP_TAG: "other", CLUSTER_TAG: CLUSTER}],
)
def test_a_load_balancer_tagged_for_another_app_or_cluster_is_refused(
    tags: dict[str, str],
) -> None:
    plan = p.plan(desired(CLASSIC, TG), observed({
        CLASSIC: seen("not_registered", tags), TG: seen("not_registered", OURS)}))  # fmt: skip
    assert "refusing to register web/prod" in plan.errors[lb_key(CLASSIC)]
    assert all(getattr(a, "lb", None) != CLASSIC for a in plan.actions)
    assert CLASSIC not in next(a for a in plan.actions if isinstance(a, AwaitInService)).lbs
    assert Register(TG) in plan.actions  # the other load balancer is not held up


def test_registered_but_not_yet_in_service_is_only_awaited() -> None:
    plan = p.plan(desired(TG), observed({TG: seen("pending", OURS)}, [TG]))
    assert plan.actions == (AwaitInService((TG,)),)


def test_pending_without_a_record_is_registered_again_which_aws_takes_as_a_no_op() -> None:
    plan = p.plan(desired(CLASSIC), observed({CLASSIC: seen("pending", OURS)}))
    assert kinds(plan) == ["Record", "Register", "AwaitInService"]


def test_a_draining_instance_that_is_wanted_again_is_registered_again() -> None:
    plan = p.plan(desired(TG), observed({TG: seen("draining", OURS)}, [TG]))
    assert plan.actions == (Register(TG), AwaitInService((TG,)))


def test_target_not_in_use_is_an_error_not_success() -> None:
    plan = p.plan(desired(TG), observed({TG: seen("not_in_use", OURS)}))
    assert "Target.NotInUse" in plan.errors[lb_key(TG)]
    assert plan.actions == (Record(TG),)  # it is registered: removal must know


def test_no_registration_without_the_ownership_tags_read() -> None:
    plan = p.plan(desired(TG), observed({TG: seen("not_registered", None)}))
    assert plan.actions == ()
    assert "tags" in plan.errors[lb_key(TG)]


# -- plan: leaving ---------------------------------------------------------------------------


def test_leaving_deregisters_waits_for_the_drain_then_forgets() -> None:
    plan = p.plan(desired(CLASSIC, want=OUT), observed({CLASSIC: seen("in_service")}, [CLASSIC]))
    assert plan.actions == (Deregister(CLASSIC), AwaitDrained((CLASSIC,)), Forget(CLASSIC))


def test_leaving_one_registered_by_hand_deregisters_it_and_has_nothing_to_forget() -> None:
    plan = p.plan(desired(CLASSIC, want=OUT), observed({CLASSIC: seen("pending")}))
    assert plan.actions == (Deregister(CLASSIC), AwaitDrained((CLASSIC,)))


def test_already_draining_is_awaited_not_deregistered_again() -> None:
    plan = p.plan(desired(TG, want=OUT), observed({TG: seen("draining")}, [TG]))
    assert plan.actions == (AwaitDrained((TG,)), Forget(TG))


def test_out_and_recorded_only_drops_the_record() -> None:
    plan = p.plan(desired(TG, want=OUT), observed({TG: seen("not_registered")}, [TG]))
    assert plan.actions == (Forget(TG),)


def test_out_and_not_registered_needs_nothing() -> None:
    assert p.plan(desired(TG, want=OUT), observed({TG: seen("not_registered")})).actions == ()


def test_not_in_use_is_deregistered_when_leaving() -> None:
    plan = p.plan(desired(TG, want=OUT), observed({TG: seen("not_in_use")}, [TG]))
    assert kinds(plan) == ["Deregister", "AwaitDrained", "Forget"]


def test_a_load_balancer_dropped_from_the_intent_is_left() -> None:
    plan = p.plan(desired(TG), observed(
        {TG: seen("in_service"), CLASSIC: seen("in_service")}, [TG, CLASSIC]))  # fmt: skip
    assert plan.actions == (Deregister(CLASSIC), AwaitDrained((CLASSIC,)), Forget(CLASSIC))
    assert plan.targets[lb_key(CLASSIC)] == "out"


def test_a_target_group_port_change_joins_the_new_port_before_leaving_the_old() -> None:
    plan = p.plan(desired(TG_9090), observed(
        {TG: seen("in_service"), TG_9090: seen("not_registered", OURS)}, [TG]))  # fmt: skip
    assert plan.actions == (
        Record(TG_9090),
        Register(TG_9090),
        AwaitInService((TG_9090,)),
        Deregister(TG),
        AwaitDrained((TG,)),
        Forget(TG),
    )


# -- plan: holding and errors ---------------------------------------------------------------


def test_hold_touches_nothing_desired_and_needs_no_observation() -> None:
    plan = p.plan(desired(CLASSIC, TG, want=HOLD), observed({}, [CLASSIC]))
    assert plan.actions == ()
    assert not plan.errors


def test_hold_still_leaves_a_load_balancer_dropped_from_the_intent() -> None:
    plan = p.plan(desired(CLASSIC, want=HOLD), observed({TG: seen("in_service")}, [CLASSIC, TG]))
    assert plan.actions == (Deregister(TG), AwaitDrained((TG,)), Forget(TG))


def test_a_missing_load_balancer_is_an_error_when_wanted_and_forgotten_when_not() -> None:
    gone = Seen(None, error="classic load balancer web-lb (us-east-1) does not exist", missing=True)
    wanted = p.plan(desired(CLASSIC, TG), observed(
        {CLASSIC: gone, TG: seen("not_registered", OURS)}))  # fmt: skip
    assert "does not exist" in wanted.errors[lb_key(CLASSIC)]
    assert Register(TG) in wanted.actions
    left = p.plan(desired(want=OUT), observed({CLASSIC: gone}, [CLASSIC]))
    assert left.actions == (Forget(CLASSIC),)
    assert not left.errors


def test_an_unobservable_load_balancer_is_left_alone_and_reported() -> None:
    denied = Seen(None, error="access denied for elasticloadbalancing:DescribeTargetHealth")
    plan = p.plan(desired(TG, want=OUT), observed({TG: denied}, [TG]))
    assert plan.actions == ()  # not even Forget: it may well be registered
    assert "access denied" in plan.errors[lb_key(TG)]
    assert "not observed" in p.plan(desired(TG), observed({})).errors[lb_key(TG)]


def test_a_load_balancer_listed_twice_counts_once() -> None:
    plan = p.plan(desired(CLASSIC, CLASSIC), observed({CLASSIC: seen("not_registered", OURS)}))
    assert kinds(plan) == ["Record", "Register", "AwaitInService"]
    assert plan.actions[-1] == AwaitInService((CLASSIC,))


@pytest.mark.parametrize(
    ("target", "phase", "known", "read"),
    [
        ("in", "not_registered", True, True),  # before any registration
        ("in", "pending", True, True),
        ("in", "in_service", False, True),  # first sight
        ("in", "in_service", True, False),  # the steady state: one describe per pass
        ("out", "in_service", False, False),
        ("hold", "not_registered", False, False),
        ("in", None, False, False),
    ],
)
def test_tags_are_read_before_registering_and_once_per_load_balancer(
    target: p.Direction, phase: Phase | None, known: bool, read: bool
) -> None:
    assert p.needs_tags(target, phase, known) is read


# -- what AWS's words mean --------------------------------------------------------------------


@pytest.mark.parametrize(
    ("lb", "health", "phase"),
    [
        (CLASSIC, None, "not_registered"),
        (CLASSIC, TargetHealth("InService", "N/A", "N/A"), "in_service"),
        (CLASSIC, TargetHealth("InService", "N/A",
                               "Instance deregistration currently in progress."), "draining"),
        (CLASSIC, TargetHealth("OutOfService", "Instance",
                               "Instance has failed at least the UnhealthyThreshold"), "pending"),
        (CLASSIC, TargetHealth("OutOfService", "ELB",
                               "Instance registration is still in progress."), "pending"),
        (CLASSIC, TargetHealth("OutOfService", "N/A",
                               "Instance is not currently registered with the LoadBalancer."),
         "not_registered"),
        (CLASSIC, TargetHealth("Unknown", "N/A", "N/A"), "not_registered"),
        (TG, TargetHealth("healthy"), "in_service"),
        (TG, TargetHealth("initial", "Elb.RegistrationInProgress"), "pending"),
        (TG, TargetHealth("unhealthy", "Target.ResponseCodeMismatch"), "pending"),
        (TG, TargetHealth("draining", "Target.DeregistrationInProgress"), "draining"),
        (TG, TargetHealth("unused", "Target.NotRegistered"), "not_registered"),
        (TG, TargetHealth("unused", "Target.NotInUse"), "not_in_use"),
        (TG, TargetHealth("unused", "Target.InvalidState"), "pending"),
        (TG, TargetHealth("unavailable", "Elb.InternalError"), "pending"),
    ],
)  # fmt: skip
def test_classify_reads_aws_states_reasons_and_descriptions(
    lb: p.LoadBalancer, health: TargetHealth | None, phase: Phase
) -> None:
    assert classify(lb, health) == phase


@pytest.mark.parametrize(
    ("raw", "token"),
    [
        (None, None),
        (b'{"details": {"drain_request": {"token": "t1", "at": 1, "until": 2000}}}', "t1"),
        (b'{"details": {"drain_request": {"token": "t1", "at": 1, "until": 999}}}', None),
        (b'{"details": {"drain_request": {"token": 5, "until": 2000}}}', None),
        (b'{"details": {"drain_request": {"token": "t1"}}}', None),
        (b'{"details": {}}', None),
        (b"not json", None),
        (b"[]", None),
    ],
)
def test_only_a_live_drain_request_from_setlive_counts(
    raw: bytes | None, token: str | None
) -> None:
    assert drain_token(raw, now=1000.0) == token


@pytest.mark.parametrize(
    ("raw", "rolled_back_to"),
    [
        (b'{"version": "1", "details": {"rolled_back_from": "2"}}', "1"),
        (b'{"version": null, "details": {"rolled_back_from": "2"}}', None),
        (b'{"version": "1", "details": {}}', None),
        (b'{"version": "1", "details": {"rolled_back_from": 2}}', None),
        (b'{"version": "1", "details": []}', None),
        (b"[]", None),
        (None, None),
    ],
)
def test_a_rollback_is_read_from_setlive_report(
    raw: bytes | None, rolled_back_to: str | None
) -> None:
    assert setlive_says(raw, now=1000.0).rolled_back_to == rolled_back_to


# -- properties over every combination -------------------------------------------------------

LBS = [CLASSIC, TG, TG_9090, ClassicElb(type="classic", name="other", region="eu-west-1")]
PHASES: list[Phase | None] = ["in_service", "pending", "not_registered", "draining", "not_in_use"]
WRITES = (Register, Deregister, Tag)


def world_after(
    plan: p.Plan,
    world: dict[str, Phase | None],
    recorded: set[str],
    tags: dict[str, dict[str, str]],
) -> None:
    """What AWS and the state file look like once the plan is carried out (every wait
    ends as hoped)."""
    for action in plan.actions:
        if isinstance(action, Tag):
            tags[lb_key(action.lb)] = {**tags[lb_key(action.lb)], **dict(action.tags)}
        elif isinstance(action, Record):
            recorded.add(lb_key(action.lb))
        elif isinstance(action, Register):
            world[lb_key(action.lb)] = "pending"
        elif isinstance(action, AwaitInService):
            for lb in action.lbs:
                world[lb_key(lb)] = "in_service"
        elif isinstance(action, (Deregister, AwaitDrained)):
            for lb in getattr(action, "lbs", (getattr(action, "lb", None),)):
                world[lb_key(lb)] = (
                    "draining" if isinstance(action, Deregister) else "not_registered"
                )
        elif isinstance(action, Forget):
            recorded.discard(lb_key(action.lb))


def touched(action: p.Action) -> set[str]:
    if isinstance(action, (AwaitInService, AwaitDrained)):
        return {lb_key(lb) for lb in action.lbs}
    return {lb_key(action.lb)}


@st.composite
def situations(
    draw: st.DrawFn,
) -> tuple[Desired, dict[str, Phase | None], set[str], dict[str, dict[str, str]]]:
    wanted = draw(st.lists(st.sampled_from(LBS), unique=True, max_size=3))
    recorded = draw(st.lists(st.sampled_from(LBS), unique=True, max_size=3))
    want = draw(st.sampled_from([IN, OUT, HOLD, Want("out", "sick", health_based=True)]))
    world = {lb_key(lb): draw(st.sampled_from(PHASES)) for lb in LBS}
    tags = {lb_key(lb): draw(st.sampled_from([{}, OURS, {APP_TAG: "other"}])) for lb in LBS}
    return desired(*wanted, want=want), world, {lb_key(lb) for lb in recorded}, tags


def observe_world(
    d: Desired,
    world: Mapping[str, Phase | None],
    recorded: set[str],
    tags: Mapping[str, Mapping[str, str]],
) -> Observed:
    by_key = {lb_key(lb): lb for lb in LBS}
    seen = {}
    for key in set(p.desired_lbs(d.lbs)) | recorded:
        phase = world[key]
        target = p.target_of(d, key)
        seen[key] = Seen(phase, tags=tags[key] if p.needs_tags(target, phase, False) else None)
    return Observed(seen, {k: by_key[k] for k in recorded})


@settings(max_examples=600, deadline=None)
@given(situations())
def test_plans_keep_their_promises(
    situation: tuple[Desired, dict[str, Phase | None], set[str], dict[str, dict[str, str]]],
) -> None:
    d, world, recorded, tags = situation
    plan = p.plan(d, observe_world(d, world, recorded, tags))
    position = {action: i for i, action in enumerate(plan.actions)}
    for i, action in enumerate(plan.actions):
        (key,) = (
            touched(action) if not isinstance(action, (AwaitInService, AwaitDrained)) else ("",)
        )
        if isinstance(action, (*WRITES, Forget)):
            assert key not in plan.errors, "no write where something is wrong"
        if isinstance(action, Register):
            assert plan.targets[key] == "in"
            assert key in recorded or position[Record(action.lb)] < i, "recorded before registered"
            assert p.ownership_problem(tags[key], APP, CLUSTER) is None
        if isinstance(action, Deregister):
            assert plan.targets[key] == "out"
        if isinstance(action, Forget):
            drained = [a for a in plan.actions[:i] if isinstance(a, AwaitDrained)]
            deregistered = any(a == Deregister(action.lb) for a in plan.actions)
            assert not deregistered or any(action.lb in a.lbs for a in drained)
    for key, target in plan.targets.items():
        if target == "hold":
            assert not [a for a in plan.actions if key in touched(a)]

    # Carried out, the plan leaves nothing to do: a second pass writes nothing.
    world_after(plan, world, recorded, tags)
    again = p.plan(d, observe_world(d, world, recorded, tags))
    assert not [a for a in again.actions if isinstance(a, WRITES)], again.actions
