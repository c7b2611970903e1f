"""The trust decision with plain data: every way a store can lie about "nothing here"."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from agents.trust import Guard, Memory, MemoryFile, Seen, assess
from intent import keys
from intent.model import StoreIdentity
from intent.store import IntentStore, open_store

NODE = "web1"
A = StoreIdentity(id="a" * 32)
B = StoreIdentity(id="b" * 32)
B_ADOPTING_A = StoreIdentity(id="b" * 32, adopts=["a" * 32])
APPS = frozenset({"web", "api"})


def test_a_first_start_trusts_and_remembers_what_it_sees() -> None:
    verdict = assess(Memory(), Seen(A, APPS), NODE)
    assert verdict.trusted
    assert verdict.remember == Memory(A.id, APPS)


def test_the_same_store_is_trusted() -> None:
    assert assess(Memory(A.id, APPS), Seen(A, APPS), NODE).trusted


@pytest.mark.parametrize(
    ("seen", "reason"),
    [
        (Seen(None, frozenset()), "has no identity record"),  # prefix wiped, dev agent restarted
        (Seen(None, APPS), "has no identity record"),  # identity deleted alone
        (Seen(B, frozenset()), f"the store is {B.id}"),  # another, empty store
        (Seen(B, APPS), f"the store is {B.id}"),  # another store with the same apps
        (Seen(None, APPS, identity_error="not valid JSON"), "cannot be read"),
    ],
)
def test_a_store_that_is_not_the_one_known_is_held(seen: Seen, reason: str) -> None:
    memory = Memory(A.id, APPS)
    verdict = assess(memory, seen, NODE)
    assert not verdict.trusted
    assert verdict.reason is not None and reason in verdict.reason
    assert verdict.remember == memory  # held: nothing forgotten


def test_the_held_message_says_how_to_recover() -> None:
    verdict = assess(Memory(A.id, APPS), Seen(None, frozenset()), NODE)
    assert verdict.reason is not None
    assert f"pp init --adopt {A.id}" in verdict.reason
    assert "consul kv import" in verdict.reason


def test_a_store_declared_the_successor_is_trusted_and_remembered() -> None:
    verdict = assess(Memory(A.id, APPS), Seen(B_ADOPTING_A, APPS), NODE)
    assert verdict.trusted
    assert verdict.remember.identity == B.id


def test_every_assignment_vanishing_at_once_is_held() -> None:
    verdict = assess(Memory(A.id, APPS), Seen(A, frozenset()), NODE)
    assert not verdict.trusted
    assert verdict.reason is not None
    assert "api, web" in verdict.reason and f"pp unassign --all {NODE}" in verdict.reason


def test_a_node_recorded_as_emptied_may_lose_every_assignment() -> None:
    verdict = assess(Memory(A.id, APPS), Seen(A, frozenset(), emptied=True), NODE)
    assert verdict.trusted
    assert verdict.remember.assigned == frozenset()


def test_losing_some_assignments_is_an_ordinary_change() -> None:
    assert assess(Memory(A.id, APPS), Seen(A, frozenset({"web"})), NODE).trusted


def test_a_store_without_identity_is_trusted_until_one_was_known() -> None:
    """A store written only with consul kv put has no identity until pp init; the
    vanishing guard still protects the node."""
    assert assess(Memory(None, APPS), Seen(None, APPS), NODE).trusted
    assert not assess(Memory(None, APPS), Seen(None, frozenset()), NODE).trusted


def test_memory_survives_a_restart_and_damage_is_read_as_the_worst_case(tmp_path: Path) -> None:
    path = tmp_path / "state" / "trust-web1.json"
    MemoryFile(path).save(Memory(A.id, APPS))
    assert path.stat().st_mode & 0o777 == 0o600
    assert MemoryFile(path).load() == Memory(A.id, APPS)
    path.write_text("{not json")
    damaged = MemoryFile(path).load()
    assert not assess(damaged, Seen(A, frozenset()), NODE).trusted
    assert assess(damaged, Seen(A, APPS), NODE).trusted


# -- the guard over a real store: a restore under way -------------------------------------


class Clock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


def guarded(tmp_path: Path) -> tuple[IntentStore, Guard, Clock]:
    store = open_store(f"sqlite://{tmp_path / 'intent.db'}")
    store.ensure_identity("tester")
    clock = Clock()
    guard = Guard(store, NODE, MemoryFile(None), clock, settle_s=2.0)
    assert guard.check(APPS).trusted
    return store, guard, clock


def held_by_a_wipe(store: IntentStore, guard: Guard) -> str:
    identity = store.get_raw(keys.IDENTITY)
    assert identity is not None
    store.delete(keys.IDENTITY)
    verdict = guard.check(frozenset())
    assert not verdict.trusted and verdict.reason is not None
    store.put_json(keys.IDENTITY, json.loads(identity.value))  # the restore begins
    return verdict.reason


def test_a_restore_still_writing_assignments_holds_until_the_missing_ones_are_back(
    tmp_path: Path,
) -> None:
    store, guard, clock = guarded(tmp_path)
    reason = held_by_a_wipe(store, guard)
    for _ in range(2):
        verdict = guard.check(frozenset({"web"}))  # api's key is not back yet
        assert not verdict.trusted
        assert verdict.reason == reason  # held as it was: nothing new to say
        clock.now += 1.9
    assert guard.check(APPS).trusted  # every app back: at once
    assert guard.memory.load().assigned == APPS


def test_a_restore_without_an_app_is_acted_on_once_it_stays_the_same(tmp_path: Path) -> None:
    store, guard, clock = guarded(tmp_path)
    held_by_a_wipe(store, guard)
    assert not guard.check(frozenset({"web"})).trusted
    clock.now += 1.9
    assert not guard.check(frozenset({"web"})).trusted
    clock.now += 0.1
    verdict = guard.check(frozenset({"web"}))
    assert verdict.trusted
    assert guard.memory.load().assigned == {"web"}
    assert guard.check(frozenset({"web"})).trusted


def test_without_a_hold_losing_an_app_is_acted_on_at_once(tmp_path: Path) -> None:
    _, guard, _ = guarded(tmp_path)
    assert guard.check(frozenset({"web"})).trusted
