"""The runtime's per-app work queue: each app converged by one worker at a time, and
nothing asked for while it converges is lost.

The semantics are those of client-go's rate-limited delaying work queue (the
queue Kubernetes controllers drain), for any hashable key (here, app names)::

    add(k) ──► queued ──get()──► processing ──done(k)──► idle
                 ▲                   │ add(k) meanwhile: k is marked
                 └───────────────────┘ and queued again by done(k)

- a key is queued at most once, however often it is added;
- a key added while a worker processes it is processed again right after
  ``done``: an intent change, a resync or a retry requested during a converge
  is never lost, and no key is ever processed by two workers at once;
- ``add_after`` queues a key once a delay has passed ("check again soon");
- ``add_rate_limited`` queues a key after its own backoff, which grows with each
  call until ``forget`` (on success) resets it;
- ``shut_down`` wakes every waiting ``get``.

Two choices differ from client-go, both so that nothing waits for no reason:
an immediate ``add`` replaces the key's pending delayed add (the processing it
causes decides the next retry itself), and ``get`` returns None as soon as the
queue shuts down instead of draining it (a stopping agent leaves the rest to
its next start; every converge is idempotent).

Delayed keys move to the queue when a ``get`` or ``next_ready`` looks at them,
against an injectable clock, so tests drive the queue with plain data and no
sleeps. Written by hand: no well-kept Python library has these semantics
(``queue.Queue`` has no per-key deduplication, processing set or delays).
"""

from __future__ import annotations

import threading
import time
from collections import deque
from collections.abc import Callable, Hashable
from typing import Generic, TypeVar

K = TypeVar("K", bound=Hashable)


class WorkQueue(Generic[K]):
    def __init__(
        self,
        backoff: Callable[[int], float],
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        """``backoff(n)``: seconds to wait after a key's ``n``-th consecutive failure.
        Blocking ``get`` calls wait in real seconds, so give them a real clock."""
        self._backoff = backoff
        self._clock = clock
        self._cond = threading.Condition()
        self._queue: deque[K] = deque()
        self._dirty: set[K] = set()
        """Keys to process: queued, or marked while processing."""
        self._processing: set[K] = set()
        self._delayed: dict[K, float] = {}
        """Keys to add once the clock reaches their time (the earliest asked for)."""
        self._failures: dict[K, int] = {}
        self._shutting_down = False

    # -- adding -----------------------------------------------------------------------------

    def add(self, key: K) -> None:
        """Queue ``key`` (or mark it to run again if a worker has it)."""
        with self._cond:
            self._add(key)

    def add_after(self, key: K, delay_s: float) -> None:
        """Queue ``key`` once ``delay_s`` seconds have passed."""
        with self._cond:
            if self._shutting_down:
                return
            if delay_s <= 0:
                self._add(key)
                return
            if key in self._dirty:
                return  # it runs anyway, and that run schedules what follows
            ready = self._clock() + delay_s
            if ready < self._delayed.get(key, float("inf")):
                self._delayed[key] = ready
                self._cond.notify()  # a waiting get may have to wake sooner

    def add_rate_limited(self, key: K) -> float:
        """Count one more failure of ``key`` and queue it after its backoff; returns
        the delay chosen."""
        with self._cond:
            failures = self._failures.get(key, 0) + 1
            self._failures[key] = failures
        delay = self._backoff(failures)
        self.add_after(key, delay)
        return delay

    def forget(self, key: K) -> None:
        """``key`` succeeded: its next failure backs off from the start again."""
        with self._cond:
            self._failures.pop(key, None)

    def failures(self, key: K) -> int:
        with self._cond:
            return self._failures.get(key, 0)

    def discard(self, key: K) -> None:
        """Drop everything asked for ``key`` (it no longer exists); a worker that has it
        finishes, and it does not run again."""
        with self._cond:
            self._delayed.pop(key, None)
            self._failures.pop(key, None)
            if key in self._dirty:
                self._dirty.discard(key)
                if key not in self._processing:
                    self._queue.remove(key)

    def _add(self, key: K) -> None:
        if self._shutting_down:
            return
        self._delayed.pop(key, None)
        if key in self._dirty:
            return
        self._dirty.add(key)
        if key not in self._processing:
            self._queue.append(key)
            self._cond.notify()

    # -- processing -------------------------------------------------------------------------

    def get(self, timeout: float | None = None) -> K | None:
        """The next key, now marked as processing until ``done``. Waits for one (at
        most ``timeout`` seconds; 0 does not wait); None on timeout or shutdown."""
        with self._cond:
            deadline = None if timeout is None else self._clock() + timeout
            while not self._shutting_down:
                now = self._clock()
                self._promote(now)
                if self._queue:
                    key = self._queue.popleft()
                    self._dirty.discard(key)
                    self._processing.add(key)
                    return key
                if deadline is not None and now >= deadline:
                    return None
                waits = [t - now for t in (deadline, self._next_delayed()) if t is not None]
                self._cond.wait(min(waits) if waits else None)
            return None

    def done(self, key: K) -> None:
        """A worker has finished ``key``; queue it again if it was added meanwhile."""
        with self._cond:
            self._processing.discard(key)
            if key not in self._dirty:
                return
            if self._shutting_down:
                self._dirty.discard(key)  # nobody will get it: left for the next start
            else:
                self._queue.append(key)
                self._cond.notify()

    def shut_down(self) -> None:
        """Refuse new keys and make every ``get`` return None, now and from now on."""
        with self._cond:
            self._shutting_down = True
            self._cond.notify_all()

    # -- looking at it ----------------------------------------------------------------------

    @property
    def shutting_down(self) -> bool:
        with self._cond:
            return self._shutting_down

    def next_ready(self) -> float | None:
        """When the earliest delayed key comes due (None: no delayed key)."""
        with self._cond:
            self._promote(self._clock())
            return self._next_delayed()

    def processing(self) -> frozenset[K]:
        with self._cond:
            return frozenset(self._processing)

    def pending(self, key: K) -> bool:
        """Whether ``key`` is queued, being processed or waiting for its delay."""
        with self._cond:
            return key in self._dirty or key in self._processing or key in self._delayed

    def __len__(self) -> int:
        """Keys queued and ready now."""
        with self._cond:
            return len(self._queue)

    def _promote(self, now: float) -> None:
        for key, ready in list(self._delayed.items()):
            if ready <= now:
                self._add(key)

    def _next_delayed(self) -> float | None:
        return min(self._delayed.values(), default=None)
