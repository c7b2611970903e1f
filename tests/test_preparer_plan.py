"""The preparer's planner: plain data in, actions out, no disk."""

from __future__ import annotations

import posixpath
from collections.abc import Iterable
from urllib.parse import unquote, urlsplit

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from agents.preparer.plan import (
    Action,
    CleanStray,
    Install,
    Observed,
    Present,
    Refuse,
    Remove,
    Wanted,
    local_url_refusal,
    source_refusal,
)
from agents.preparer.plan import plan as plan_for
from agents.system import file_url

A, B, C = "a" * 64, "b" * 64, "c" * 64


def plan(wanted: Iterable[Wanted], observed: Observed, keep_old: int = 1) -> list[Action]:
    """The planner of a preparer whose --repo is /repo, where these tests' URLs point."""
    return plan_for(wanted, observed, keep_old, local_root="/repo")


def url(version: str) -> str:
    return f"file:///repo/app/app_{version}.tar.gz"


def want(version: str, sha: str = A, active: bool = False, has_url: bool = True) -> Wanted:
    return Wanted(version, sha, url(version) if has_url else None, active)


def present(version: str, sha: str | None = A, at: float | None = 1.0) -> Present:
    return Present(version, sha, at)


def observed(*installs: Present, current: str | None = None, previous: str | None = None,
             strays: Iterable[str] = ()) -> Observed:  # fmt: skip
    return Observed({p.version: p for p in installs}, current, previous, tuple(strays))


def test_nothing_to_do_when_every_wanted_version_is_installed_with_its_sha() -> None:
    wanted = [want("1.0", active=True), want("2.0", B)]
    assert plan(wanted, observed(present("1.0"), present("2.0", B), current="1.0")) == []


def test_missing_versions_are_installed_active_first() -> None:
    wanted = [want("2.0", B), want("1.0", active=True), want("0.9", C)]
    assert plan(wanted, observed()) == [
        Install("1.0", A, url("1.0"), replace=False),
        Install("0.9", C, url("0.9"), replace=False),
        Install("2.0", B, url("2.0"), replace=False),
    ]


def test_a_directory_without_marker_is_not_an_install_and_is_replaced() -> None:
    actions = plan([want("1.0", active=True)], observed(present("1.0", sha=None)))
    assert actions == [Install("1.0", A, url("1.0"), replace=True)]


def test_installs_marked_before_launch_records_are_verified_again() -> None:
    """After an upgrade of the agents: the running install is re-marked in place (its
    app keeps running), the others are installed again; the sha256 must still match."""
    legacy = [Present(v, A, 1.0, legacy=True) for v in ("1.0", "2.0")]
    wanted = [want("1.0", active=True), want("2.0")]
    assert plan(wanted, observed(*legacy, current="1.0")) == [
        Install("1.0", A, url("1.0"), replace=False, in_place=True),
        Install("2.0", A, url("2.0"), replace=True),
    ]
    # Without a url to fetch it again from, it is reported, not removed.
    refused = plan([want("1.0", active=True, has_url=False)], observed(legacy[0], current="1.0"))
    assert [type(a) for a in refused] == [Refuse]
    # Another sha256 under the running install stays refused, whatever its marker.
    other = Present("1.0", B, 1.0, legacy=True)
    assert [type(a) for a in plan(wanted[:1], observed(other, current="1.0"))] == [Refuse]


def test_an_install_with_another_sha_is_replaced_when_it_is_not_running() -> None:
    actions = plan([want("1.0", B)], observed(present("1.0", A), current="0.9"))
    assert actions == [Install("1.0", B, url("1.0"), replace=True)]


def test_the_running_install_is_never_replaced_under_the_app() -> None:
    actions = plan([want("1.0", B, active=True)], observed(present("1.0", A), current="1.0"))
    assert len(actions) == 1
    assert isinstance(actions[0], Refuse) and actions[0].version == "1.0"
    assert "current" in actions[0].reason and B in actions[0].reason


def test_a_version_without_url_or_repo_is_refused_with_a_reason() -> None:
    (action,) = plan([want("1.0", has_url=False)], observed())
    assert isinstance(action, Refuse)
    assert "--repo" in action.reason


def test_crash_leftovers_are_cleaned_first() -> None:
    actions = plan([want("1.0")], observed(strays=[".pp-tmp-app_1.0.ab12"]))
    assert actions[0] == CleanStray(".pp-tmp-app_1.0.ab12")
    assert isinstance(actions[1], Install)


def test_old_versions_are_removed_keeping_current_and_previous() -> None:
    state = observed(
        present("1.0", at=1), present("2.0", at=2), present("3.0", at=3), present("4.0", at=4),
        current="3.0", previous="2.0",
    )  # fmt: skip
    actions = plan([want("5.0")], state, keep_old=1)
    assert actions == [
        Install("5.0", A, url("5.0"), replace=False),
        Remove("1.0", "no longer in the intent"),
        Remove("4.0", "no longer in the intent"),
    ]


def test_keep_old_zero_keeps_only_wanted_and_current() -> None:
    state = observed(present("1.0"), present("2.0"), current="2.0", previous="1.0")
    assert plan([want("3.0")], state, keep_old=0) == [
        Install("3.0", A, url("3.0"), replace=False),
        Remove("1.0", "no longer in the intent"),
    ]


def test_keep_old_beyond_previous_keeps_the_most_recently_installed() -> None:
    state = observed(
        present("1.0", at=10), present("2.0", at=30), present("3.0", at=20),
        present("4.0", at=40), current="4.0", previous="1.0",
    )  # fmt: skip
    actions = plan([want("4.0")], state, keep_old=2)
    assert actions == [Remove("3.0", "no longer in the intent")]


def test_incomplete_old_installs_are_removed_even_when_previous_points_at_them() -> None:
    state = observed(present("1.0", sha=None), present("2.0"), current="2.0", previous="1.0")
    assert plan([want("2.0")], state, keep_old=5) == [Remove("1.0", "incomplete")]


def test_current_is_kept_even_when_no_version_is_wanted() -> None:
    state = observed(present("1.0"), present("2.0"), current="2.0", previous="1.0")
    assert plan([], state, keep_old=0) == [Remove("1.0", "no longer in the intent")]


def test_previous_that_is_wanted_again_does_not_use_the_keep_old_slot() -> None:
    state = observed(
        present("1.0", at=1), present("2.0", at=2), present("3.0", at=3),
        current="3.0", previous="1.0",
    )  # fmt: skip
    # 1.0 is wanted (a prepared rollback), so the one old slot goes to 2.0.
    assert plan([want("1.0"), want("3.0")], state, keep_old=1) == []


# -- properties over many generated cases -----------------------------------------------

versions = st.sampled_from(["1.0", "1.1", "2.0", "2.1", "3.0", "10.0"])
shas = st.sampled_from([A, B, C])


@st.composite
def scenarios(draw: st.DrawFn) -> tuple[list[Wanted], Observed, int]:
    wanted_versions = draw(st.lists(versions, unique=True, max_size=4))
    active = draw(st.sampled_from([None, *wanted_versions]))
    wanted = [
        Wanted(v, draw(shas), draw(st.sampled_from([url(v), url(v), None])), v == active)
        for v in wanted_versions
    ]
    present_versions = draw(st.lists(versions, unique=True, max_size=6))
    installs = {
        v: Present(v, draw(st.one_of(st.none(), shas)), draw(st.floats(0, 100)))
        for v in present_versions
    }
    links = st.one_of(st.none(), versions)
    strays = draw(st.lists(st.sampled_from([".pp-tmp-app_1.0.aa", ".pp-tmp-app_2.0.bb"]),
                           unique=True))  # fmt: skip
    state = Observed(installs, draw(links), draw(links), tuple(strays))
    return wanted, state, draw(st.integers(0, 3))


def simulate(state: Observed, actions: list[Action]) -> Observed:
    """What the disk looks like after the actions succeed."""
    installs = dict(state.installs)
    for action in actions:
        if isinstance(action, Remove):
            del installs[action.version]
        elif isinstance(action, Install):
            installs[action.version] = Present(action.version, action.sha256, 1000.0)
    return Observed(installs, state.current, state.previous, ())


@settings(max_examples=1000)
@given(scenarios())
def test_plan_properties(scenario: tuple[list[Wanted], Observed, int]) -> None:
    wanted, state, keep_old = scenario
    actions = plan(wanted, state, keep_old)
    by_version = {w.version: w for w in wanted}
    removed = {a.version for a in actions if isinstance(a, Remove)}
    touched = [a.version for a in actions if isinstance(a, Install | Refuse)]

    # Never removes what runs or what is wanted; removes only what exists.
    assert state.current not in removed
    assert not removed & set(by_version)
    assert removed <= set(state.installs)
    # Each wanted version is in place, or has exactly one install/refusal.
    assert len(touched) == len(set(touched))
    for version, w in by_version.items():
        found = state.installs.get(version)
        in_place = found is not None and found.sha256 == w.sha256
        assert in_place != (version in touched)
        if not in_place and (w.url is None or (found is not None and version == state.current)):
            assert any(isinstance(a, Refuse) and a.version == version for a in actions)
    # Leftovers first, installs before garbage, active version first among installs.
    kinds = [type(a).__name__ for a in actions]
    order = {"CleanStray": 0, "Install": 1, "Refuse": 1, "Remove": 2}
    assert [order[k] for k in kinds] == sorted(order[k] for k in kinds)
    assert [a.name for a in actions if isinstance(a, CleanStray)] == sorted(state.strays)
    installs = [a for a in actions if isinstance(a, Install | Refuse)]
    if installs and any(by_version[a.version].active for a in installs):
        assert by_version[installs[0].version].active
    # Exactly the keep_old best old complete installs survive.
    old_complete = [
        p for v, p in state.installs.items()
        if v not in by_version and v != state.current and p.sha256 is not None
    ]  # fmt: skip
    kept = [p for p in old_complete if p.version not in removed]
    assert len(kept) == min(keep_old, len(old_complete))
    if keep_old and any(p.version == state.previous for p in old_complete):
        assert state.previous in {p.version for p in kept}
    # Applying the plan converges: planning again finds only the refusals.
    again = plan(wanted, simulate(state, actions), keep_old)
    assert all(isinstance(a, Refuse) for a in again)
    assert again == [a for a in actions if isinstance(a, Refuse)]


def test_local_files_are_fetched_only_from_under_the_repo() -> None:
    assert local_url_refusal("file:///repo/app/app_1.tar.gz", "/repo") is None
    assert local_url_refusal("https://x/app_1.tar.gz", None) is None
    for hostile in ("file:///root/secret", "file:///repo/../etc/shadow", "file:///repository/x"):
        refusal = local_url_refusal(hostile, "/repo")
        assert refusal is not None and "only under /repo" in refusal
    refusal = local_url_refusal("file:///srv/app.tar.gz", None)
    assert refusal is not None and "file:// --repo" in refusal


BYPASSES = [
    "FILE:///etc/shadow",
    "File:///etc/shadow",
    "file:/etc/shadow",
    "file:///repo/%2e%2e/etc/shadow",
    "file:///repo/%2E%2E/%2E%2E/etc/shadow",
    "file:///repo/app/..%2f..%2fetc/shadow",
    "file://evil.example/repo/app_1.tar.gz",
    "file://localhost@evil/repo/app_1.tar.gz",
    "file:repo/app_1.tar.gz",
    "file:///repo/app_1.tar.gz%00.txt",
    "file:///repo",
    "file://[bad/repo/x",
]


@pytest.mark.parametrize("url", BYPASSES)
@pytest.mark.parametrize("local_root", ["/repo", None])
def test_file_urls_that_only_look_local_to_the_repo_are_refused(
    url: str, local_root: str | None
) -> None:
    assert local_url_refusal(url, local_root) is not None
    (action,) = plan_for([Wanted("1.0", A, url, active=True)], observed(), local_root=local_root)
    assert isinstance(action, Refuse)


@pytest.mark.parametrize(
    "url",
    [
        "FILE:///repo/app/app_1.tar.gz",
        "file:/repo/app/app_1.tar.gz",
        "file://localhost/repo/app/app_1.tar.gz",
        "file:///repo/app/%61pp_1.tar.gz",
        "file:///repo/other/../app/app_1.tar.gz",
    ],
)
def test_the_scheme_case_and_spelling_do_not_matter_under_the_repo(url: str) -> None:
    assert local_url_refusal(url, "/repo") is None
    assert local_url_refusal(url, None) is not None


@settings(max_examples=2000, deadline=None)
@given(st.lists(st.sampled_from(["a", "repo", ".", "..", "%2e%2e", "%2E.", "%2f", "", "%00"])))
def test_an_accepted_file_url_names_a_path_beneath_the_repo(segments: list[str]) -> None:
    url = "file:///repo/" + "/".join(segments)
    if local_url_refusal(url, "/repo") is not None:
        return
    names = file_url.beneath(url, "/repo")
    assert names and all(n not in ("", ".", "..") and "/" not in n for n in names)
    assert "\0" not in "".join(names)
    assert posixpath.normpath(unquote(urlsplit(url).path)) == "/repo/" + "/".join(names)


def test_a_file_url_outside_the_repo_is_refused_not_fetched() -> None:
    wanted = [Wanted("1.0", A, "file:///etc/shadow", active=True)]
    (action,) = plan_for(wanted, observed(), local_root="/repo")
    assert isinstance(action, Refuse) and action.version == "1.0"


ALLOWED = ("https://releases.example/apps/", "s3://releases/")


@pytest.mark.parametrize(
    "url",
    [
        "https://releases.example/apps/web/web_1.tar.gz",
        "HTTPS://Releases.Example/apps/web_1.tar.gz",
        "s3://releases/web/web_1.tar.gz",
    ],
)
def test_a_source_under_an_allowed_url_is_fetched(url: str) -> None:
    assert source_refusal(url, ALLOWED) is None
    assert source_refusal(url, ()) is None  # no list: any source


@pytest.mark.parametrize(
    "url",
    [
        "https://releases.example.evil/apps/web_1.tar.gz",  # another host sharing a prefix
        "https://releases.example/appsx/web_1.tar.gz",  # another path sharing a prefix
        "https://releases.example/other/web_1.tar.gz",
        "http://releases.example/apps/web_1.tar.gz",  # the scheme counts too
        "s3://releases-evil/web_1.tar.gz",
        "https://user@releases.example.evil/apps/web_1.tar.gz",
    ],
)
def test_a_source_outside_the_allowed_urls_is_refused_naming_the_list(url: str) -> None:
    refusal = source_refusal(url, ALLOWED)
    assert refusal is not None and "--allowed-sources" in refusal
    (action,) = plan_for([Wanted("1.0", A, url, active=True)], observed(), allowed_sources=ALLOWED)
    assert isinstance(action, Refuse) and action.reason == refusal
