"""Retry and backoff policy shared by the HTTP adapters (Dataverse today, usable by any adapter).

The policy is deliberately small and *decides* rather than *does*: :meth:`RetryPolicy.delay_for` is a pure
function from (attempt, what went wrong, may we repeat the request) to "sleep this long and try again" or
"give up", so every rule is unit-tested with plain values. :func:`retry_async` is the loop that applies it.

Rules (documented in docs/adapters.md):

* A **throttled** request (HTTP 429, Dataverse service protection) was rejected before it ran, so any request,
  idempotent or not, may be repeated after ``Retry-After``. If the server asks for a longer wait than
  ``max_retry_after`` we do not block the worker: the error goes to the caller, which re-enqueues the work item
  with a visibility delay of ``error.retry_after``.
* A **transient** failure (5xx, timeout, dropped connection) may have happened *after* the server applied the
  request, so it is repeated only when the request is idempotent (GET, DELETE, PATCH/PUT without a specific
  ETag, POST that carries a client-chosen primary key). A failure that provably happened before the request
  left this process (connect error, pool timeout) counts as "not sent" and is retried for every request.
* Everything else (4xx) is permanent: never retried here.

Backoff without ``Retry-After`` is exponential with "full jitter" (AWS architecture blog), capped.
"""

from __future__ import annotations

import asyncio
import logging
import random
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from enum import StrEnum
from typing import TypeVar

__all__ = [
    "FailureKind",
    "RetryPolicy",
    "Sleep",
    "retry_async",
]

_log = logging.getLogger(__name__)

T = TypeVar("T")
Sleep = Callable[[float], Awaitable[None]]


class FailureKind(StrEnum):
    """What kind of failure an attempt ended with, as far as retrying is concerned."""

    THROTTLED = "throttled"  # 429: rejected before execution; Retry-After given (or not)
    TRANSIENT = "transient"  # 5xx / read timeout / connection dropped mid-request: may have been applied
    NOT_SENT = "not_sent"  # connect error / pool timeout: the request never reached the server
    PERMANENT = "permanent"  # everything else: retrying cannot help


@dataclass(frozen=True)
class RetryPolicy:
    """How many times and how long to wait. Immutable; share one per client.

    ``max_retries`` counts repetitions after the first attempt. ``max_retry_after`` is the longest
    server-requested wait we block a worker for (seconds); longer waits are handed back to the caller.
    """

    max_retries: int = 3
    max_retry_after: float = 30.0
    base_delay: float = 0.5
    max_delay: float = 8.0
    jitter: bool = True
    # Injected so decisions are reproducible in tests; the default is process-global randomness.
    random: Callable[[], float] = field(default=random.random, repr=False, compare=False)

    def backoff(self, attempt: int) -> float:
        """Delay before repetition number ``attempt`` (1-based) when the server gave no Retry-After."""
        ceiling = min(self.max_delay, self.base_delay * 2.0 ** (attempt - 1))
        return ceiling * self.random() if self.jitter else ceiling

    def delay_for(
        self,
        attempt: int,
        kind: FailureKind,
        *,
        idempotent: bool,
        retry_after: float | None = None,
    ) -> float | None:
        """Seconds to wait before repetition ``attempt`` (1-based), or ``None`` to give up and raise.

        Pure: depends only on its arguments and the policy (plus ``random`` for jitter).
        """
        if attempt > self.max_retries or kind is FailureKind.PERMANENT:
            return None
        if kind is FailureKind.THROTTLED:
            if retry_after is None:
                return self.backoff(attempt)
            if retry_after > self.max_retry_after:
                return None  # too long to hold a worker: the caller re-enqueues with this delay
            return max(0.0, retry_after)
        if kind is FailureKind.TRANSIENT and not idempotent:
            return None  # might have been applied; repeating could duplicate a side effect
        if retry_after is not None and retry_after <= self.max_retry_after:
            return max(0.0, retry_after)  # a 503 may carry Retry-After too: honour it
        return self.backoff(attempt)


async def retry_async(
    operation: Callable[[], Awaitable[T]],
    *,
    policy: RetryPolicy,
    classify: Callable[[BaseException], tuple[FailureKind, float | None]],
    idempotent: bool,
    sleep: Sleep = asyncio.sleep,
    describe: str = "request",
) -> T:
    """Run ``operation`` until it succeeds or the policy gives up; re-raise the last error then.

    ``classify`` maps an exception to its :class:`FailureKind` and server-requested delay (seconds).
    """
    attempt = 0
    while True:
        try:
            return await operation()
        except Exception as exc:
            attempt += 1
            kind, retry_after = classify(exc)
            delay = policy.delay_for(attempt, kind, idempotent=idempotent, retry_after=retry_after)
            if delay is None:
                raise
            _log.info(
                "%s failed (%s, %s); retry %d/%d in %.2fs",
                describe, kind.value, type(exc).__name__, attempt, policy.max_retries, delay,
            )
            await sleep(delay)
