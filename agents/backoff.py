"""How long the agents wait before trying again: tenacity's wait strategies used as
calculators.

- An app whose converge is waiting on something outside (the preparer's install, a
  lease) is checked again after 0.25 s, then twice as long each time up to 2 s.
- An app whose converge failed retries after ``min(max, initial * 2**(n-1)) + up to
  1 s`` (exponential with a little jitter): a broken artifact or a failing health
  gate is not hammered, and a fixed one is picked up by the next intent change.
- An unreachable store is tried again after a delay drawn uniformly from
  ``[0.1, min(cap, 0.5 * 2**(n-1))]`` seconds ("full jitter"): a node notices the
  store's return within ``cap`` seconds (half that on average), and a fleet that
  lost its store together spreads its reconnects evenly over ``cap`` seconds
  instead of arriving in waves. ``--store-retry-max`` sets ``cap`` (default 5 s).
"""

from __future__ import annotations

from collections.abc import Callable

import tenacity
from tenacity.wait import wait_base

STORE_RETRY_FIRST_S = 0.5
"""The widest first delay after the store failed; each failure doubles it up to the cap."""
STORE_RETRY_MIN_S = 0.1
DEFAULT_STORE_RETRY_MAX_S = 5.0


def app_retry(initial_s: float, max_s: float) -> wait_base:
    return tenacity.wait_exponential_jitter(multiplier=initial_s, max=max_s)


def store_retry(max_s: float = DEFAULT_STORE_RETRY_MAX_S) -> wait_base:
    return tenacity.wait_random_exponential(
        multiplier=STORE_RETRY_FIRST_S, max=max_s, min=min(STORE_RETRY_MIN_S, max_s)
    )


def recheck(first_s: float, max_s: float) -> wait_base:
    """An app waiting on something outside: ``first_s``, doubling, up to ``max_s``."""
    return tenacity.wait_exponential(multiplier=first_s, max=max_s)


def calculator(wait: wait_base) -> Callable[[int], float]:
    """``delay(n)``: seconds to wait after ``n`` consecutive failures."""

    def delay(failures: int) -> float:
        state = tenacity.RetryCallState(retry_object=None, fn=None, args=(), kwargs={})  # type: ignore[arg-type]
        state.attempt_number = max(1, failures)
        return float(wait(state))

    return delay
