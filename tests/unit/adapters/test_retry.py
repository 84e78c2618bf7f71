"""Retry decisions as plain data, and the retry loop with a recording sleep (no wall clock)."""

from __future__ import annotations

import pytest

from core.adapters.retry import FailureKind, RetryPolicy, retry_async

POLICY = RetryPolicy(max_retries=3, max_retry_after=30.0, base_delay=0.5, max_delay=8.0, jitter=False)


@pytest.mark.parametrize(
    ("attempt", "kind", "idempotent", "retry_after", "expected"),
    [
        # 429: any request, Retry-After honoured up to the bound, else handed to the caller
        (1, FailureKind.THROTTLED, False, 2.0, 2.0),
        (1, FailureKind.THROTTLED, True, 0.0, 0.0),
        (1, FailureKind.THROTTLED, False, 30.0, 30.0),
        (1, FailureKind.THROTTLED, False, 31.0, None),
        (2, FailureKind.THROTTLED, False, None, 1.0),  # no Retry-After: exponential backoff
        # transient: only idempotent requests
        (1, FailureKind.TRANSIENT, True, None, 0.5),
        (2, FailureKind.TRANSIENT, True, None, 1.0),
        (3, FailureKind.TRANSIENT, True, None, 2.0),
        (1, FailureKind.TRANSIENT, False, None, None),
        (1, FailureKind.TRANSIENT, True, 5.0, 5.0),  # 503 + Retry-After
        # never sent: safe for everything
        (1, FailureKind.NOT_SENT, False, None, 0.5),
        # permanent, or out of attempts
        (1, FailureKind.PERMANENT, True, None, None),
        (4, FailureKind.TRANSIENT, True, None, None),
        (4, FailureKind.THROTTLED, True, 1.0, None),
    ],
)
def test_delay_for(
    attempt: int, kind: FailureKind, idempotent: bool, retry_after: float | None, expected: float | None
) -> None:
    assert POLICY.delay_for(attempt, kind, idempotent=idempotent, retry_after=retry_after) == expected


def test_backoff_is_capped_and_jittered_within_the_cap() -> None:
    capped = RetryPolicy(max_retries=10, base_delay=1.0, max_delay=4.0, jitter=False)
    assert [capped.backoff(n) for n in range(1, 6)] == [1.0, 2.0, 4.0, 4.0, 4.0]
    jittered = RetryPolicy(base_delay=1.0, max_delay=4.0, random=lambda: 0.25)
    assert jittered.backoff(3) == 1.0


class Flaky:
    def __init__(self, failures: list[BaseException]) -> None:
        self.failures = failures
        self.calls = 0

    async def __call__(self) -> str:
        self.calls += 1
        if self.failures:
            raise self.failures.pop(0)
        return "ok"


class Boom(Exception):
    def __init__(self, kind: FailureKind, retry_after: float | None = None) -> None:
        super().__init__(kind.value)
        self.kind = kind
        self.retry_after = retry_after


def classify(exc: BaseException) -> tuple[FailureKind, float | None]:
    assert isinstance(exc, Boom)
    return exc.kind, exc.retry_after


async def test_retry_async_sleeps_as_decided_then_succeeds() -> None:
    slept: list[float] = []

    async def sleep(seconds: float) -> None:
        slept.append(seconds)

    op = Flaky([Boom(FailureKind.THROTTLED, 3.0), Boom(FailureKind.TRANSIENT)])
    assert await retry_async(op, policy=POLICY, classify=classify, idempotent=True, sleep=sleep) == "ok"
    assert op.calls == 3 and slept == [3.0, 1.0]


async def test_retry_async_reraises_when_the_policy_gives_up() -> None:
    async def sleep(seconds: float) -> None:
        raise AssertionError("must not sleep")

    op = Flaky([Boom(FailureKind.TRANSIENT)])
    with pytest.raises(Boom):
        await retry_async(op, policy=POLICY, classify=classify, idempotent=False, sleep=sleep)
    assert op.calls == 1


async def test_retry_async_stops_after_max_retries() -> None:
    async def sleep(seconds: float) -> None:
        return None

    op = Flaky([Boom(FailureKind.NOT_SENT) for _ in range(10)])
    with pytest.raises(Boom):
        await retry_async(op, policy=POLICY, classify=classify, idempotent=False, sleep=sleep)
    assert op.calls == POLICY.max_retries + 1
