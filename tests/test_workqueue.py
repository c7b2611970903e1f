"""The runtime's work queue, with plain data and a clock the test moves."""

from __future__ import annotations

import random
import threading
import time
from collections import Counter

import hypothesis.strategies as st
from hypothesis import settings
from hypothesis.stateful import RuleBasedStateMachine, invariant, precondition, rule

from agents.workqueue import WorkQueue


class Clock:
    def __init__(self) -> None:
        self.now = 100.0

    def __call__(self) -> float:
        return self.now


def doubling(failures: int) -> float:
    return float(2 ** (failures - 1))


def queue() -> tuple[WorkQueue[str], Clock]:
    clock = Clock()
    return WorkQueue(doubling, clock), clock


def test_a_key_added_many_times_is_queued_once() -> None:
    q, _ = queue()
    for key in ("a", "b", "a", "a", "b"):
        q.add(key)
    assert len(q) == 2
    assert [q.get(0), q.get(0), q.get(0)] == ["a", "b", None]


def test_a_resync_asked_for_while_the_app_converges_converges_it_again_after() -> None:
    """The interleaving that once lost a SIGHUP: the request arrives while the app's
    converge is in flight."""
    q, _ = queue()
    q.add("hello")
    assert q.get(0) == "hello"  # the converge starts
    q.add("hello")  # SIGHUP: converge everything again
    assert q.get(0) is None  # never two converges of one app at once
    q.done("hello")  # the first converge ends
    assert q.get(0) == "hello"  # and the requested one follows
    q.done("hello")
    assert q.get(0) is None


def test_a_retry_scheduled_during_a_converge_waits_for_its_delay() -> None:
    q, clock = queue()
    q.add("a")
    assert q.get(0) == "a"
    q.add_after("a", 5)
    q.done("a")
    assert q.get(0) is None
    clock.now += 5
    assert q.get(0) == "a"


def test_failures_back_off_per_key_and_forget_resets_them() -> None:
    q, clock = queue()
    assert [q.add_rate_limited("a") for _ in range(4)] == [1, 2, 4, 8]
    assert q.add_rate_limited("b") == 1
    clock.now += 1
    assert q.get(0) == "a"  # the earliest delay asked for wins
    assert q.get(0) == "b"
    q.forget("a")
    assert q.failures("a") == 0 and q.failures("b") == 1
    assert q.add_rate_limited("a") == 1


def test_an_immediate_add_replaces_a_pending_retry() -> None:
    q, clock = queue()
    q.add_after("a", 10)
    q.add("a")
    assert q.get(0) == "a"
    q.done("a")
    clock.now += 10
    assert q.get(0) is None
    assert q.next_ready() is None


def test_next_ready_is_the_earliest_delayed_key() -> None:
    q, clock = queue()
    assert q.next_ready() is None
    q.add_after("a", 7)
    q.add_after("b", 3)
    q.add_after("a", 9)  # later than what is asked already: ignored
    assert q.next_ready() == clock.now + 3


def test_a_discarded_key_is_not_processed_again() -> None:
    q, clock = queue()
    q.add("queued")
    q.add_after("later", 1)
    q.add("busy")
    q.add_rate_limited("failing")
    assert q.get(0) == "queued"
    q.add("queued")
    for key in ("queued", "later", "failing"):
        q.discard(key)
    q.done("queued")
    clock.now += 10
    assert [q.get(0), q.get(0)] == ["busy", None]
    assert q.failures("failing") == 0


def test_shut_down_wakes_a_waiting_worker_and_refuses_new_keys() -> None:
    q: WorkQueue[str] = WorkQueue(doubling)
    got: list[str | None] = []
    worker = threading.Thread(target=lambda: got.append(q.get()))
    worker.start()
    time.sleep(0.05)
    q.shut_down()
    worker.join(5)
    assert not worker.is_alive() and got == [None]
    q.add("a")
    assert q.get(0) is None and q.shutting_down


def test_a_waiting_worker_wakes_for_a_delayed_key_in_real_time() -> None:
    q: WorkQueue[str] = WorkQueue(doubling)
    q.add_after("a", 0.05)
    started = time.monotonic()
    assert q.get(timeout=10) == "a"
    assert time.monotonic() - started >= 0.05


def test_workers_never_share_a_key_and_lose_no_request() -> None:
    """Real threads: every add is followed by a get of that key that starts after it."""
    q: WorkQueue[int] = WorkQueue(doubling)
    lock = threading.Lock()
    busy: set[int] = set()
    overlaps: list[int] = []
    requested: dict[int, int] = Counter()
    served_after: dict[int, int] = Counter()
    """For each key, the number of adds seen when its last processing began."""
    stop = threading.Event()

    def work() -> None:
        while (key := q.get()) is not None:
            with lock:
                if key in busy:
                    overlaps.append(key)
                busy.add(key)
                served_after[key] = requested[key]
            time.sleep(random.uniform(0, 0.002))
            with lock:
                busy.discard(key)
            q.done(key)

    workers = [threading.Thread(target=work) for _ in range(4)]
    for worker in workers:
        worker.start()
    rng = random.Random(7)
    for _ in range(3000):
        key = rng.randrange(8)
        with lock:
            requested[key] += 1
        q.add(key)
        if rng.random() < 0.1:
            time.sleep(0.001)
    deadline = time.monotonic() + 20
    while time.monotonic() < deadline:
        with lock:
            if not busy and len(q) == 0 and served_after == requested:
                break
        time.sleep(0.01)
    stop.set()
    q.shut_down()
    for worker in workers:
        worker.join(10)
    assert overlaps == []
    assert served_after == requested


class QueueMachine(RuleBasedStateMachine):
    """Random interleavings of every operation against a model of what is owed.

    ``owed``: keys added (or whose delay came due) since a get last handed them out;
    ``delayed``: keys waiting for their time. The queue must hand out exactly the
    owed keys that no worker holds, never a key a worker holds, and never a key
    before its time."""

    keys = st.sampled_from(["a", "b", "c"])

    def __init__(self) -> None:
        super().__init__()
        self.clock = Clock()
        self.q: WorkQueue[str] = WorkQueue(doubling, self.clock)
        self.owed: set[str] = set()
        self.delayed: dict[str, float] = {}
        self.processing: set[str] = set()
        self.failures: Counter[str] = Counter()
        self.down = False

    def _model_add(self, key: str) -> None:
        if self.down:
            return
        self.delayed.pop(key, None)
        self.owed.add(key)

    def _model_add_after(self, key: str, delay: float) -> None:
        if self.down:
            return
        if delay <= 0:
            self._model_add(key)
        elif key not in self.owed:
            ready = self.clock.now + delay
            self.delayed[key] = min(ready, self.delayed.get(key, ready))

    def _promote(self) -> None:
        for key, ready in list(self.delayed.items()):
            if ready <= self.clock.now:
                self._model_add(key)

    @rule(key=keys)
    def add(self, key: str) -> None:
        self.q.add(key)
        self._model_add(key)

    @rule(key=keys, delay=st.sampled_from([0, 0.5, 1, 3]))
    def add_after(self, key: str, delay: float) -> None:
        self.q.add_after(key, delay)
        self._model_add_after(key, delay)

    @rule(key=keys)
    def fail(self, key: str) -> None:
        self.failures[key] += 1
        assert self.q.add_rate_limited(key) == doubling(self.failures[key])
        self._model_add_after(key, doubling(self.failures[key]))

    @rule(key=keys)
    def forget(self, key: str) -> None:
        self.q.forget(key)
        self.failures.pop(key, None)

    @rule(key=keys)
    def discard(self, key: str) -> None:
        self.q.discard(key)
        self.owed.discard(key)
        self.delayed.pop(key, None)
        self.failures.pop(key, None)

    @rule(seconds=st.sampled_from([0.25, 1, 2]))
    def tick(self, seconds: float) -> None:
        self.clock.now += seconds

    @rule()
    def get(self) -> None:
        self._promote()
        key = self.q.get(0)
        if key is None:
            # Nothing ready is left behind: every owed key is held by a worker.
            assert self.down or self.owed <= self.processing
            return
        assert not self.down
        assert key not in self.processing, f"{key} handed to two workers"
        assert key in self.owed, f"{key} handed out unasked, or before its time"
        self.owed.discard(key)
        self.processing.add(key)

    @precondition(lambda self: bool(self.processing))
    @rule(data=st.data())
    def done(self, data: st.DataObject) -> None:
        key = data.draw(st.sampled_from(sorted(self.processing)))
        self.q.done(key)
        self.processing.discard(key)

    @rule()
    def shut_down(self) -> None:
        self.q.shut_down()
        self.down = True

    @invariant()
    def counts_match(self) -> None:
        for key in ("a", "b", "c"):
            assert self.q.failures(key) == self.failures[key]
        assert self.q.processing() == self.processing

    def teardown(self) -> None:
        """Finish everything and wait out every delay: all that was owed is served."""
        for key in list(self.processing):
            self.q.done(key)
        self.processing.clear()
        self.clock.now += 100
        self._promote()
        served = set()
        while (key := self.q.get(0)) is not None:
            served.add(key)
            self.q.done(key)
        if not self.down:
            assert served == self.owed


QueueMachine.TestCase.settings = settings(max_examples=300, stateful_step_count=40, deadline=None)
test_random_interleavings_never_lose_or_share_a_key = QueueMachine.TestCase
