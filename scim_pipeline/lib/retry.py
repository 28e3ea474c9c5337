"""The one retry policy: every caller that waits for something to recover — Scalekit's rate limits, the
application's 429/5xx, a warehouse file locked by another process — retries through ``RetryPolicy.call``.

Waits are exponential with full jitter (uniform between 0 and ``min(max_delay_s, base_s * 2^(n-1))`` before retry
n), so that callers who failed together do not retry together; a delay the other side asks for (``Retry-After``)
replaces the jitter, capped at ``max_delay_s``. The loop itself is ``tenacity``'s.
"""

from __future__ import annotations

import random
import time
from dataclasses import dataclass
from typing import Callable, TypeVar

import tenacity

T = TypeVar("T")


@dataclass(frozen=True)
class RetryPolicy:
    attempts: int | None = 8  # calls at most (None: no limit but the deadline)
    deadline_s: float | None = None  # no new attempt once this long has passed since the first
    base_s: float = 0.2
    max_delay_s: float = 10.0

    def __post_init__(self) -> None:
        if self.attempts is not None and self.attempts < 1:
            raise ValueError("a retry policy needs at least one attempt")
        if self.attempts is None and self.deadline_s is None:
            raise ValueError("a retry policy needs a bound: attempts or deadline_s")

    def delay(self, retry: int, rng: random.Random | None = None) -> float:
        """The jittered wait before retry number ``retry`` (1 for the first retry)."""
        return (rng or random).uniform(0.0, min(self.max_delay_s, self.base_s * 2 ** (retry - 1)))

    def call(
        self,
        fn: Callable[[], T],
        retry_if: Callable[[BaseException], bool],
        *,
        delay_hint: Callable[[BaseException], float | None] | None = None,
        on_retry: Callable[[BaseException, float], None] | None = None,
        sleep: Callable[[float], None] = time.sleep,
        rng: random.Random | None = None,
    ) -> T:
        """``fn()``, called again while it raises an exception that ``retry_if`` accepts, until the attempts or the
        deadline are spent; then that last exception is raised as it was. ``delay_hint`` may name the wait an
        exception asks for; ``on_retry(exc, delay)`` is told before each wait."""

        def wait(state: tenacity.RetryCallState) -> float:
            exc = state.outcome.exception()
            hint = delay_hint(exc) if delay_hint is not None else None
            if hint is not None:
                return min(max(0.0, hint), self.max_delay_s)
            return self.delay(state.attempt_number, rng)

        def before_sleep(state: tenacity.RetryCallState) -> None:
            if on_retry is not None:
                on_retry(state.outcome.exception(), state.upcoming_sleep)

        stops = []
        if self.attempts is not None:
            stops.append(tenacity.stop_after_attempt(self.attempts))
        if self.deadline_s is not None:
            stops.append(tenacity.stop_after_delay(self.deadline_s))
        retrying = tenacity.Retrying(
            stop=tenacity.stop_any(*stops),
            wait=wait,
            retry=tenacity.retry_if_exception(retry_if),
            before_sleep=before_sleep,
            sleep=sleep,
            reraise=True,
        )
        return retrying(fn)
