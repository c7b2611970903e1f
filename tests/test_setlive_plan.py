"""setlive's planner, with plain data: which version runs, in which order steps happen."""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping

from hypothesis import given, settings
from hypothesis import strategies as st

from agents.setlive import plan as p
from agents.setlive.plan import Desired, Observed, ServiceObs, VersionInfo
from agents.setlive.services import FileSpec, ServiceSpec
from agents.setlive.state import Failure, Pending
from agents.system.runit import ServiceStatus
from intent.model import DeployConfig, HealthCheck, Reality

APP = "web"
FP = "fp-1"


def spec(name: str = APP, digest: str = "d1", entry: str | None = None) -> ServiceSpec:
    files = {
        "run": FileSpec(f"run {name}".encode(), 0o755),
        "env/X": FileSpec(digest.encode(), 0o600),
    }
    return ServiceSpec(name, APP, entry, files, digest)


def installed(*specs: ServiceSpec, error: str | None = None) -> VersionInfo:
    return VersionInfo(True, specs or (spec(),), error)


RUNNING = ServiceStatus(supervised=True, state="run", pid=42, started_at=100.0, want_up=True)
DOWN_BY_HAND = ServiceStatus(supervised=True, state="down", started_at=100.0, want_up=False)
CRASHING = ServiceStatus(supervised=True, state="down", started_at=100.0, want_up=True)


def running(
    version: str | None,
    s: ServiceSpec | None = None,
    status: ServiceStatus = RUNNING,
    digest: str | None = None,
    **kw: object,
) -> ServiceObs:
    s = s or spec()
    fields: dict[str, object] = {
        "name": s.name,
        "owner": APP,
        "staged": s.files,
        "link": "ours",
        "status": status,
        "running_version": version if status.up else None,
        "running_digest": (digest or s.digest) if status.up else None,
    }
    fields.update(kw)
    return ServiceObs(**fields)  # type: ignore[arg-type]


def desired(version: str | None = "2", min_nodes: int = 0, fingerprint: str = FP) -> Desired:
    return Desired(APP, version, fingerprint, min_nodes)


def observed(
    current: str | None = "1",
    versions: Mapping[str, VersionInfo] | None = None,
    services: Mapping[str, ServiceObs] | None = None,
    **kw: object,
) -> Observed:
    if versions is None:
        versions = {"1": installed(), "2": installed()}
    if services is None:
        services = {APP: running(current)} if current else {}
    return Observed(current=current, versions=versions, services=services, **kw)  # type: ignore[arg-type]


def kinds(plan: p.Plan) -> list[str]:
    return plan.kinds()


def gate_of(plan: p.Plan) -> p.AwaitHealth:
    gates = [a for a in plan.actions if isinstance(a, p.AwaitHealth)]
    assert len(gates) == 1
    return gates[0]


# -- deploys -----------------------------------------------------------------------------------


def test_first_deploy_stages_and_links_with_a_down_file_switches_then_starts() -> None:
    result = p.plan(desired("1"), observed(current=None, versions={"1": installed()}, services={}))
    assert kinds(result) == [
        "StageService",
        "LinkService",
        "AwaitSupervised",
        "SavePending",
        "SetCurrent",
        "StartService",
        "SetAutostart",
        "AwaitHealth",
        "ClearPending",
    ]
    stage = result.actions[0]
    assert isinstance(stage, p.StageService) and stage.new
    gate = gate_of(result)
    assert gate.deploy and gate.rollback_to is None
    assert result.target == "1" and result.error is None


def test_upgrade_moves_previous_then_current_before_restarting() -> None:
    result = p.plan(desired("2"), observed(current="1"))
    assert kinds(result) == [
        "SavePending",
        "SetPrevious",
        "SetCurrent",
        "RestartService",
        "AwaitHealth",
        "ClearPending",
    ]
    assert result.actions[0] == p.SavePending("2", "1")
    assert result.actions[1] == p.SetPrevious("1")
    gate = gate_of(result)
    assert gate.deploy and gate.rollback_to == "1"


def test_steady_state_plans_nothing() -> None:
    result = p.plan(desired("2"), observed(current="2"))
    assert result.actions == () and result.target == "2"
    assert result.wait is None and result.error is None


def test_a_version_not_installed_yet_means_wait_not_error() -> None:
    versions = {"1": installed(), "2": VersionInfo(False)}
    result = p.plan(desired("2"), observed(current="1", versions=versions))
    assert result.actions == ()
    assert result.target == "1"
    assert result.wait is not None and "preparer" in result.wait and "2" in result.wait
    assert result.error is None


def test_nothing_installed_at_all_waits_with_nothing_running() -> None:
    result = p.plan(
        desired("2"), observed(current=None, versions={"2": VersionInfo(False)}, services={})
    )
    assert result.actions == () and result.target is None and result.wait


def test_while_waiting_for_the_preparer_the_running_version_is_still_repaired() -> None:
    versions = {"1": installed(), "2": VersionInfo(False)}
    services = {APP: running("1", status=DOWN_BY_HAND)}
    result = p.plan(desired("2"), observed(current="1", versions=versions, services=services))
    assert "StartService" in kinds(result)
    assert not gate_of(result).deploy
    assert result.wait


def test_a_broken_artifact_is_an_error_and_nothing_moves() -> None:
    versions = {"1": installed(), "2": installed(error="bin/launch is missing or not executable")}
    result = p.plan(desired("2"), observed(current="1", versions=versions))
    assert result.actions == ()
    assert result.error and "bin/launch" in result.error
    assert result.target == "1"


# -- min_nodes lease -----------------------------------------------------------------------------


def test_restarting_a_healthy_app_with_min_nodes_takes_a_lease_first() -> None:
    result = p.plan(desired("2", min_nodes=1), observed(current="1", healthy=True))
    assert kinds(result)[0] == "AcquireLease"
    assert result.actions[0] == p.AcquireLease(1)


def test_no_lease_when_min_nodes_is_zero_or_the_app_is_not_healthy() -> None:
    assert "AcquireLease" not in kinds(p.plan(desired("2"), observed(current="1", healthy=True)))
    unhealthy = p.plan(desired("2", min_nodes=2), observed(current="1", healthy=False))
    assert "AcquireLease" not in kinds(unhealthy)


def test_no_lease_to_start_a_service_that_is_down() -> None:
    services = {APP: running("2", status=DOWN_BY_HAND)}
    result = p.plan(desired("2", min_nodes=1), observed(current="2", services=services))
    assert "AcquireLease" not in kinds(result)


def test_retiring_a_running_service_of_a_healthy_app_needs_the_lease() -> None:
    web, worker = spec("web-web", entry="web"), spec("web-worker", entry="worker")
    versions = {"1": installed(), "2": installed(web, worker)}
    services = {
        APP: running("2"),
        "web-web": running("2", web),
        "web-worker": running("2", worker),
    }
    result = p.plan(
        desired("2", min_nodes=1),
        observed(current="2", versions=versions, services=services, healthy=True),
    )
    assert kinds(result)[:2] == ["AcquireLease", "RetireService"]


# -- failures and rollback -----------------------------------------------------------------------


def failure(version: str = "2", to: str | None = "1", **kw: object) -> Failure:
    fields: dict[str, object] = {
        "version": version,
        "fingerprint": FP,
        "rolled_back_to": to,
        "output": "http 127.0.0.1:8080/health: 503 unhealthy",
        "failed_at": 1.0,
    }
    fields.update(kw)
    return Failure(**fields)  # type: ignore[arg-type]


def test_after_a_failed_gate_the_plan_rolls_back_without_touching_previous() -> None:
    # the failure was just recorded: current still points at the failed version
    result = p.plan(desired("2"), observed(current="2", failure=failure(), previous="1"))
    assert kinds(result) == [
        "SavePending",
        "SetCurrent",
        "RestartService",
        "AwaitHealth",
        "ClearPending",
    ]
    assert result.actions[1] == p.SetCurrent("1")
    assert not gate_of(result).deploy
    assert result.target == "1" and result.rolled_back_from == "2"
    assert result.error and "failed its health gate" in result.error and "503" in result.error


def test_a_rolled_back_version_is_not_tried_again_while_intent_is_unchanged() -> None:
    result = p.plan(desired("2"), observed(current="1", failure=failure()))
    assert result.actions == ()
    assert result.target == "1" and result.error and "pp retry" in result.error


def test_changed_intent_clears_the_failure_and_deploys() -> None:
    result = p.plan(desired("2", fingerprint="fp-2"), observed(current="1", failure=failure()))
    assert kinds(result)[0] == "ClearFailure"
    assert "SetCurrent" in kinds(result) and gate_of(result).deploy


def test_a_new_retry_token_clears_the_failure_and_deploys() -> None:
    result = p.plan(
        desired("2"),
        observed(current="1", failure=failure(retry_token="a"), retry_token="b"),
    )
    assert kinds(result)[0] == "ClearFailure" and gate_of(result).deploy


def test_the_same_retry_token_keeps_the_failure() -> None:
    result = p.plan(
        desired("2"), observed(current="1", failure=failure(retry_token="a"), retry_token="a")
    )
    assert result.actions == () and result.error


def test_a_failed_first_deploy_stops_the_app() -> None:
    result = p.plan(
        desired("1"),
        observed(current="1", versions={"1": installed()}, failure=failure("1", None)),
    )
    assert kinds(result) == ["StopService", "SetAutostart"]
    assert result.actions[1] == p.SetAutostart(APP, False)
    assert result.target is None
    assert result.error and "nothing to roll back to" in result.error


def test_a_rollback_target_that_was_removed_stops_the_app() -> None:
    versions = {"1": VersionInfo(False), "2": installed()}
    result = p.plan(
        desired("2"), observed(current="2", versions=versions, failure=failure("2", "1"))
    )
    assert result.target is None and "StopService" in kinds(result)


# -- stopping ------------------------------------------------------------------------------------


def test_no_active_version_stops_the_app_and_keeps_it_from_starting_at_boot() -> None:
    result = p.plan(desired(None), observed(current="1"))
    assert kinds(result) == ["StopService", "SetAutostart"]
    assert result.target is None and result.error is None and result.wait is None


def test_a_stopped_app_stays_stopped_with_nothing_to_do() -> None:
    services = {APP: running("1", status=DOWN_BY_HAND, down_file=True)}
    result = p.plan(desired(None), observed(current="1", services=services))
    assert result.actions == ()


# -- drift ---------------------------------------------------------------------------------------


def test_a_manual_sv_down_is_repaired_and_gated_without_rollback() -> None:
    services = {APP: running("2", status=DOWN_BY_HAND)}
    result = p.plan(desired("2"), observed(current="2", services=services))
    assert kinds(result) == ["StartService", "AwaitHealth", "ClearPending"]
    assert not gate_of(result).deploy


def test_a_hand_changed_current_is_switched_back() -> None:
    result = p.plan(desired("2"), observed(current="1", services={APP: running("1")}))
    assert p.SetCurrent("2") in result.actions and "RestartService" in kinds(result)


def test_current_moved_by_hand_off_the_last_good_version_is_repaired_not_redeployed() -> None:
    # 3 passed its gate here (previous 2); someone pointed current at 1 and restarted.
    result = p.plan(
        desired("3"),
        observed(
            current="1",
            previous="2",
            versions={v: installed() for v in ("1", "2", "3")},
            services={APP: running("1")},
            last_good="3",
        ),
    )
    assert p.SetCurrent("3") in result.actions and "RestartService" in kinds(result)
    assert "SetPrevious" not in kinds(result), "the hand-set version became previous"
    assert not gate_of(result).deploy, "a failed check would mark 3 failed and roll back"
    killed_after_switch = p.plan(
        desired("3"),
        observed(
            current="3",
            previous="2",
            versions={v: installed() for v in ("1", "2", "3")},
            services={APP: running("1")},
            pending=Pending("3", "1", 1.0),
            last_good="3",
        ),
    )
    assert not gate_of(killed_after_switch).deploy


def test_repairing_the_bundle_setlive_runs_from_leaves_no_guard() -> None:
    agent = spec("web-agent", entry="agent")
    versions = {"1": installed(agent), "2": installed(agent)}
    result = p.plan(
        desired("2"),
        observed(
            current="1",
            versions=versions,
            services={"web-agent": running("1", agent)},
            self_service="web-agent",
            last_good="2",
        ),
    )
    assert "StartGuard" not in kinds(result) and p.SetCurrent("2") in result.actions


def test_a_version_that_never_passed_here_is_still_deployed_with_rollback() -> None:
    result = p.plan(desired("2"), observed(current="1", last_good="1"))
    assert "SetPrevious" in kinds(result) and gate_of(result).deploy


def test_a_process_running_another_version_than_current_is_restarted() -> None:
    result = p.plan(desired("2"), observed(current="2", services={APP: running("1")}))
    assert kinds(result) == ["RestartService", "AwaitHealth", "ClearPending"]


def test_a_changed_definition_is_restaged_and_restarted() -> None:
    services = {APP: running("2", spec(digest="old"), digest="old")}
    result = p.plan(desired("2"), observed(current="2", services=services))
    assert kinds(result) == ["StageService", "RestartService", "AwaitHealth", "ClearPending"]
    stage = result.actions[0]
    assert isinstance(stage, p.StageService) and not stage.new


def test_an_unknown_running_version_is_not_a_reason_to_restart() -> None:
    services = {APP: running("2", running_version=None, running_digest=None)}
    assert p.plan(desired("2"), observed(current="2", services=services)).actions == ()


def test_a_crash_looping_service_is_left_to_runsv_not_restarted_in_a_loop() -> None:
    services = {APP: running("2", status=CRASHING)}
    assert p.plan(desired("2"), observed(current="2", services=services)).actions == ()


def test_a_missing_link_is_restored() -> None:
    services = {APP: running("2", link=None, status=ServiceStatus(supervised=False))}
    result = p.plan(desired("2"), observed(current="2", services=services))
    assert kinds(result) == [
        "LinkService",
        "AwaitSupervised",
        "StartService",
        "AwaitHealth",
        "ClearPending",
    ]


def test_a_leftover_down_file_is_removed_once_the_app_should_run() -> None:
    services = {APP: running("2", down_file=True)}
    assert kinds(p.plan(desired("2"), observed(current="2", services=services))) == ["SetAutostart"]


def test_a_group_change_alone_restages() -> None:
    s = dataclasses.replace(spec(), files={"config.json": FileSpec(b"{}", 0o640, 65534)})
    staged = {"config.json": FileSpec(b"{}", 0o640, 0)}
    services = {APP: running("2", s, staged=staged)}
    result = p.plan(
        desired("2"), observed(current="2", versions={"2": installed(s)}, services=services)
    )
    assert kinds(result)[0] == "StageService"


# -- crashes halfway -----------------------------------------------------------------------------


def test_killed_after_pending_before_current_redoes_the_switch() -> None:
    result = p.plan(desired("2"), observed(current="1", pending=Pending("2", "1", 1.0)))
    assert kinds(result)[:3] == ["SavePending", "SetPrevious", "SetCurrent"]


def test_killed_after_current_before_restart_restarts_and_gates_as_a_deploy() -> None:
    result = p.plan(
        desired("2"),
        observed(current="2", services={APP: running("1")}, pending=Pending("2", "1", 1.0)),
    )
    assert kinds(result) == ["RestartService", "AwaitHealth", "ClearPending"]
    gate = gate_of(result)
    assert gate.deploy and gate.rollback_to == "1"


def test_killed_during_the_gate_gates_again_without_restarting() -> None:
    result = p.plan(desired("2"), observed(current="2", pending=Pending("2", "1", 1.0)))
    assert kinds(result) == ["AwaitHealth", "ClearPending"]
    assert gate_of(result).deploy and gate_of(result).rollback_to == "1"


def test_a_stale_pending_note_for_another_version_is_dropped() -> None:
    result = p.plan(desired("2"), observed(current="2", pending=Pending("3", "2", 1.0)))
    assert kinds(result) == ["ClearPending"]


# -- multi-service artifacts and conflicts -------------------------------------------------------


def test_a_launch_directory_becomes_services_switched_together() -> None:
    web, worker = spec("web-web", entry="web"), spec("web-worker", entry="worker")
    versions = {"1": installed(), "2": installed(web, worker)}
    result = p.plan(desired("2"), observed(current="1", versions=versions))
    assert [a.name for a in result.actions if isinstance(a, p.StartService)] == [
        "web-web",
        "web-worker",
    ]
    assert gate_of(result).services == ("web-web", "web-worker")


def test_a_changed_service_set_is_ready_before_the_switch_and_the_old_goes_last() -> None:
    # The old service keeps serving while the new ones are staged and wait for runsvdir;
    # it is retired only after the switch, right before the new ones start.
    web, worker = spec("web-web", entry="web"), spec("web-worker", entry="worker")
    versions = {"1": installed(), "2": installed(web, worker)}
    result = p.plan(desired("2"), observed(current="1", versions=versions))
    assert kinds(result) == [
        "StageService",
        "StageService",
        "LinkService",
        "LinkService",
        "AwaitSupervised",
        "AwaitSupervised",
        "SavePending",
        "SetPrevious",
        "SetCurrent",
        "RetireService",
        "StartService",
        "StartService",
        "SetAutostart",
        "SetAutostart",
        "AwaitHealth",
        "ClearPending",
    ]
    assert all(a.new for a in result.actions if isinstance(a, p.StageService))
    assert p.RetireService(APP) in result.actions


def test_a_changed_service_set_back_to_one_service_retires_the_entries_after_the_switch() -> None:
    web, worker = spec("web-web", entry="web"), spec("web-worker", entry="worker")
    versions = {"1": installed(web, worker), "2": installed()}
    services = {"web-web": running("1", web), "web-worker": running("1", worker)}
    k = kinds(p.plan(desired("2"), observed(current="1", versions=versions, services=services)))
    assert k.index("AwaitSupervised") < k.index("SetCurrent") < k.index("RetireService")
    assert k.index("RetireService") < k.index("StartService")


def test_a_service_name_taken_by_another_app_is_an_error() -> None:
    services = {APP: running("1", owner="web-other")}
    result = p.plan(desired("2"), observed(current="1", services=services))
    assert result.actions == ()
    assert result.error and "already taken by app web-other" in result.error


def test_a_foreign_runit_service_of_the_same_name_is_an_error() -> None:
    services = {APP: ServiceObs(APP, link="foreign")}
    result = p.plan(desired("1"), observed(current=None, services=services))
    assert result.error and "not managed by pp-setlive" in result.error


# -- helpers -------------------------------------------------------------------------------------


def test_fingerprint_follows_what_a_deploy_depends_on_only() -> None:
    deploy = DeployConfig(basedir="/srv/web")
    base = p.fingerprint("2", "a" * 64, deploy, {"k": 1})
    assert base == p.fingerprint("2", "a" * 64, deploy, {"k": 1})
    assert base != p.fingerprint("3", "a" * 64, deploy, {"k": 1})
    assert base != p.fingerprint("2", "b" * 64, deploy, {"k": 1})
    assert base != p.fingerprint("2", "a" * 64, deploy, {"k": 2})
    fixed = DeployConfig(basedir="/srv/web", health_check=HealthCheck(type="tcp"))
    assert base != p.fingerprint("2", "a" * 64, fixed, {"k": 1})


def _report(
    node: str, health: str = "healthy", status: str = "converged", at: float = 100.0
) -> Reality:
    return Reality(
        node=node,
        agent="setlive",
        app=APP,
        status=status,  # type: ignore[arg-type]
        details={"health": health},
        updated_at=at,
    )


def test_healthy_peers_counts_fresh_healthy_reports_of_the_same_cluster_but_not_itself() -> None:
    reports = [
        _report("a"),
        _report("b"),
        _report("self"),
        _report("other-cluster"),
        _report("c", health="unhealthy"),
        _report("d", status="converging", health="unknown"),
        _report("f", status="error"),  # rolled back, but serving the previous version
        _report("e", at=10.0),
    ]
    cluster = ["a", "b", "c", "d", "e", "f", "self"]
    assert p.healthy_peers(reports, cluster, "self", now=110.0, freshness_s=60.0) == 3


def test_lease_limit_keeps_min_nodes_healthy() -> None:
    assert p.lease_limit(3, 2) == 1
    assert p.lease_limit(5, 2) == 3
    assert p.lease_limit(2, 2) == 0


# -- property: any state converges in one plan ---------------------------------------------------


def simulate(o: Observed, plan: p.Plan, specs: Mapping[str, ServiceSpec]) -> Observed:
    """What the host looks like after a plan succeeds (health gates pass)."""
    services = dict(o.services)
    fields: dict[str, object] = {}
    current = o.current
    for a in plan.actions:
        match a:
            case p.ClearFailure():
                fields["failure"] = None
            case p.SavePending():
                fields["pending"] = Pending(a.target, a.from_version, 1.0)
            case p.ClearPending():
                fields["pending"] = None
            case p.AwaitHealth():
                fields["last_good"] = a.version
            case p.SetPrevious():
                fields["previous"] = a.version
            case p.SetCurrent():
                current = a.version
            case p.StageService():
                old = services.get(a.spec.name) or ServiceObs(a.spec.name)
                services[a.spec.name] = dataclasses.replace(
                    old, owner=APP, staged=a.spec.files, down_file=a.new or old.down_file
                )
            case p.LinkService():
                services[a.name] = dataclasses.replace(services[a.name], link="ours")
            case p.AwaitSupervised():
                s = services[a.name]
                status = RUNNING if not s.down_file else DOWN_BY_HAND
                services[a.name] = dataclasses.replace(
                    s,
                    status=status,
                    running_version=current if status.up else None,
                    running_digest=specs[a.name].digest if status.up else None,
                )
            case p.StartService() | p.RestartService():
                services[a.name] = dataclasses.replace(
                    services[a.name],
                    status=RUNNING,
                    running_version=current,
                    running_digest=specs[a.name].digest,
                )
            case p.StopService():
                services[a.name] = dataclasses.replace(
                    services[a.name], status=DOWN_BY_HAND, running_version=None
                )
            case p.SetAutostart():
                services[a.name] = dataclasses.replace(services[a.name], down_file=not a.on)
            case p.RetireService():
                del services[a.name]
    return dataclasses.replace(o, current=current, services=services, **fields)  # type: ignore[arg-type]


VERSIONS = ["1", "2", "3"]
STATUSES = [RUNNING, DOWN_BY_HAND, CRASHING, ServiceStatus(supervised=False)]


@st.composite
def situations(draw: st.DrawFn) -> tuple[Desired, Observed, dict[str, ServiceSpec]]:
    multi = draw(st.sampled_from(VERSIONS))  # this version ships two services
    specs: dict[str, ServiceSpec] = {}
    infos = {}
    for v in VERSIONS:
        if draw(st.booleans()):
            vs = (spec("web-a", entry="a"), spec("web-b", entry="b")) if v == multi else (spec(),)
            specs.update({s.name: s for s in vs})
            infos[v] = VersionInfo(True, vs)
        else:
            infos[v] = VersionInfo(False)
    specs.setdefault(APP, spec())
    current = draw(st.sampled_from([None, *VERSIONS]))
    services = {}
    for name in draw(st.sets(st.sampled_from(sorted(specs)))):
        status = draw(st.sampled_from(STATUSES))
        services[name] = ServiceObs(
            name,
            owner=APP,
            staged=specs[name].files if draw(st.booleans()) else {},
            down_file=draw(st.booleans()),
            link=draw(st.sampled_from(["ours", None])),
            status=status,
            running_version=draw(st.sampled_from([None, *VERSIONS])) if status.up else None,
            running_digest=draw(st.sampled_from([None, "old", "d1"])) if status.up else None,
        )
    fail = None
    if draw(st.booleans()):
        fail = failure(draw(st.sampled_from(VERSIONS)), draw(st.sampled_from([None, *VERSIONS])))
    pending = None
    if draw(st.booleans()):
        pending = Pending(
            draw(st.sampled_from(VERSIONS)), draw(st.sampled_from([None, *VERSIONS])), 1.0
        )
    d = Desired(APP, draw(st.sampled_from([None, *VERSIONS])), FP, draw(st.integers(0, 2)))
    o = Observed(
        current=current,
        previous=draw(st.sampled_from([None, *VERSIONS])),
        versions=infos,
        services=services,
        pending=pending,
        failure=fail,
        healthy=draw(st.sampled_from([None, True, False])),
        self_service=draw(st.sampled_from([None, *sorted(services)])),
        last_good=draw(st.sampled_from([None, *VERSIONS])),
    )
    return d, o, specs


@settings(max_examples=400, deadline=None)
@given(situations())
def test_any_situation_converges_after_one_successful_plan(
    case: tuple[Desired, Observed, dict[str, ServiceSpec]],
) -> None:
    d, o, specs = case
    first = p.plan(d, o)
    if first.error and "taken" in first.error:
        return
    after = simulate(o, first, specs)
    second = p.plan(d, after)
    assert second.actions == (), (first.kinds(), second.kinds())
    assert second.target == first.target


@settings(max_examples=400, deadline=None)
@given(situations())
def test_steps_keep_the_crash_safe_order(
    case: tuple[Desired, Observed, dict[str, ServiceSpec]],
) -> None:
    d, o, _ = case
    k = p.plan(d, o).kinds()
    if "AcquireLease" in k:
        assert k.index("AcquireLease") == 0 or k[:2] == ["ClearFailure", "AcquireLease"]
    actions = p.plan(d, o).actions
    if "SetCurrent" in k:
        switch = k.index("SetCurrent")
        assert k.index("SavePending") < switch
        if "SetPrevious" in k:
            assert k.index("SetPrevious") < switch
        for later in ("StartService", "RestartService", "AwaitHealth"):
            if later in k:
                assert switch < k.index(later)
        # Before the switch, runsv may only see services a down file keeps from starting.
        held = {a.spec.name for a in actions if isinstance(a, p.StageService) and a.new}
        held |= {name for name, s in o.services.items() if s.down_file}
        for a in actions[:switch]:
            if isinstance(a, p.LinkService | p.AwaitSupervised):
                assert a.name in held, a
    if "AwaitHealth" in k:
        assert k[k.index("AwaitHealth") + 1 :] == ["ClearPending"]
    if "StartGuard" in k:
        assert k.index("SavePending") < k.index("StartGuard") < k.index("SetCurrent")
    own = [
        i
        for i, a in enumerate(actions)
        if isinstance(a, p.RestartService) and a.name == o.self_service
    ]
    if own:
        assert all(isinstance(a, p.AwaitHealth | p.ClearPending) for a in actions[own[0] + 1 :])
    # Old services go after the new ones are supervised and current has moved, and
    # before anything starts (setlive retiring itself goes last).
    for i, a in enumerate(actions):
        if isinstance(a, p.RetireService) and a.name != o.self_service:
            assert all(
                not isinstance(x, p.StartService | p.RestartService | p.AwaitHealth)
                for x in actions[:i]
            )
            assert all(
                not isinstance(x, p.StageService | p.LinkService | p.AwaitSupervised)
                and not isinstance(x, p.SavePending | p.SetPrevious | p.SetCurrent)
                for x in actions[i + 1 :]
            )


# -- self-deploy ---------------------------------------------------------------------------------


def test_switching_the_bundle_setlive_runs_from_leaves_a_guard_and_restarts_itself_last() -> None:
    agent, worker = spec("web-agent", entry="agent"), spec("web-worker", entry="worker")
    versions = {"1": installed(agent, worker), "2": installed(agent, worker)}
    services = {"web-agent": running("1", agent), "web-worker": running("1", worker)}
    result = p.plan(
        desired("2"),
        observed(current="1", versions=versions, services=services, self_service="web-agent"),
    )
    k = kinds(result)
    assert k.index("SavePending") < k.index("StartGuard") < k.index("SetCurrent")
    guard = next(a for a in result.actions if isinstance(a, p.StartGuard))
    assert guard == p.StartGuard("2", "1", ("web-agent", "web-worker"), FP, "web-agent")
    restarts = [a.name for a in result.actions if isinstance(a, p.RestartService)]
    assert restarts == ["web-worker", "web-agent"]
    assert k[-3:] == ["RestartService", "AwaitHealth", "ClearPending"]


def test_no_guard_for_a_rollback_or_for_apps_setlive_does_not_run_in() -> None:
    agent = spec("web-agent", entry="agent")
    versions = {"1": installed(agent), "2": installed(agent)}
    services = {"web-agent": running("2", agent)}
    rollback = p.plan(
        desired("2"),
        observed(
            current="2",
            versions=versions,
            services=services,
            self_service="web-agent",
            failure=failure(),
        ),
    )
    assert "StartGuard" not in kinds(rollback) and p.SetCurrent("1") in rollback.actions
    other = p.plan(desired("2"), observed(current="1", self_service="something-else"))
    assert "StartGuard" not in kinds(other)


def test_the_new_setlive_finishes_its_own_switch_by_gating_itself() -> None:
    agent = spec("web-agent", entry="agent")
    versions = {"1": installed(agent), "2": installed(agent)}
    result = p.plan(
        desired("2"),
        observed(
            current="2",
            versions=versions,
            services={"web-agent": running("2", agent)},
            pending=Pending("2", "1", 1.0),
            self_service="web-agent",
        ),
    )
    assert kinds(result) == ["AwaitHealth", "ClearPending"]
