"""The application-user pool and its client-side pacing (core/adapters/dataverse_pool.py), with a fake clock: no
network, no wall-clock waits. The pool inside ``DataverseClient`` is exercised over httpx's MockTransport."""

from __future__ import annotations

import asyncio

import httpx
import pytest

from core.adapters.dataverse import DataverseClient, ThrottledError
from core.adapters.dataverse_pool import ApplicationUserPool, PacingWait, ServiceProtectionBudget, UserPacer
from core.adapters.retry import RetryPolicy
from tests.fakes import Clock

API = "https://contoso.crm.dynamics.com/api/data/v9.2"


def budget(**kw: float) -> ServiceProtectionBudget:
    values: dict[str, float] = {"requests": 10, "window_s": 10.0, "headroom": 1.0}
    values.update(kw)
    return ServiceProtectionBudget(**values)  # type: ignore[arg-type]


def test_budget_caps_follow_share_and_headroom() -> None:
    real = ServiceProtectionBudget()
    assert (real.request_cap, real.concurrency_cap) == (5700, 52)
    assert real.sustained_rate == pytest.approx(19.0)
    half = ServiceProtectionBudget(share=0.5)
    assert (half.request_cap, half.concurrency_cap, half.execution_cap_ms) == (2850, 26, 570_000)
    with pytest.raises(ValueError):
        ServiceProtectionBudget(share=0)


def test_sliding_window_allows_the_burst_then_the_rate_old_requests_leave() -> None:
    clock = Clock()
    pacer = UserPacer(budget(), clock.monotonic)
    slots = [pacer.reserve() - clock.now for _ in range(12)]
    assert slots[:10] == [0.0] * 10
    assert slots[10:] == [10.0, 10.0]  # the 11th waits until the 1st leaves the window (and the 12th the 2nd)
    clock.now += 10.0  # the first 10 have left the window; the two reserved for now are in it
    assert [pacer.reserve() - clock.now for _ in range(8)] == [0.0] * 8
    clock.now += 0.5
    assert pacer.earliest() - clock.now == pytest.approx(9.5)  # 10 in (t-10, t]: the next when they leave


def test_execution_time_budget() -> None:
    clock = Clock()
    pacer = UserPacer(budget(requests=1000, execution_ms=1000), clock.monotonic)
    pacer.reserve()
    pacer.finished(1200.0)  # one slow request spent the window's execution time
    assert pacer.earliest() - clock.now == pytest.approx(10.0)


def test_the_services_own_execution_figure_decides_when_it_sends_one() -> None:
    """A slow exchange (a busy client, not a busy server) must not stop a user the service says has time left;
    when the service says the time is nearly spent, the user waits even if the client saw fast requests."""
    clock = Clock()
    pacer = UserPacer(budget(requests=1000, execution_ms=1000, headroom=0.95), clock.monotonic)
    pacer.reserve()
    pacer.finished(1200.0, server_time_left="900")
    assert pacer.earliest() == clock.now
    pacer.reserve()
    pacer.finished(5.0, server_time_left="40")  # under 5 % (the headroom) of the window's 1,000 ms left
    assert pacer.earliest() - clock.now == pytest.approx(10.0)
    pacer.finished(5.0, server_time_left="not a number")  # ignored: the last figure stands
    assert pacer.earliest() - clock.now == pytest.approx(10.0)


def test_429_pauses_the_user_and_dop_hint_lowers_its_concurrency() -> None:
    clock = Clock()
    pacer = UserPacer(budget(concurrency=8), clock.monotonic)
    pacer.throttle(7.0)
    assert pacer.paused_for == 7.0 and pacer.earliest() == clock.now + 7.0
    pacer.hint("2")
    assert pacer.limit == 2
    pacer.hint("50")
    assert pacer.limit == 8  # never above the budget's


async def test_pool_spreads_requests_over_users_within_each_budget() -> None:
    clock = Clock()
    pool = ApplicationUserPool([("a", _token("a")), ("b", _token("b"))], budget(), clock=clock.monotonic,
                               sleep=clock.sleep)
    used = []
    for _ in range(20):
        async with pool.lease() as user:
            used.append(user.name)
    assert sorted(used) == ["a"] * 10 + ["b"] * 10
    assert clock.slept == []  # two budgets of 10: nobody waited
    async with pool.lease() as user:
        used.append(user.name)
    assert clock.slept == [10.0]


async def test_pool_refuses_to_wait_longer_than_max_wait() -> None:
    clock = Clock()
    pool = ApplicationUserPool([("a", _token("a"))], budget(requests=1, window_s=300), clock=clock.monotonic,
                               sleep=clock.sleep, max_wait_s=30)
    async with pool.lease():
        pass
    with pytest.raises(PacingWait) as caught:
        async with pool.lease():
            pass
    assert caught.value.wait == pytest.approx(300.0)
    assert pool.users[0].pacer.stats.sent == 1  # the refused request reserved nothing


async def test_pool_concurrency_cap_per_user() -> None:
    clock = Clock()
    pool = ApplicationUserPool([("a", _token("a")), ("b", _token("b"))], budget(requests=1000, concurrency=1),
                               clock=clock.monotonic, sleep=clock.sleep)
    active: list[str] = []
    peak = 0
    release = asyncio.Event()

    async def one() -> None:
        nonlocal peak
        async with pool.lease() as user:
            assert user.name not in active
            active.append(user.name)
            peak = max(peak, len(active))
            await release.wait()
            active.remove(user.name)

    tasks = [asyncio.create_task(one()) for _ in range(5)]
    await asyncio.sleep(0)
    await asyncio.sleep(0)
    assert peak == 2  # one per user
    release.set()
    await asyncio.gather(*tasks)


# ------------------------------------------------------------------------------------------------ in the client


def _token(name: str):  # type: ignore[no-untyped-def]
    async def token() -> str:
        return f"token-{name}"
    return token


def _client(handler, clock: Clock, users: int = 2, **kw: object) -> DataverseClient:  # type: ignore[no-untyped-def]
    return DataverseClient(API, [_token(chr(97 + n)) for n in range(users)],
                           user_names=[chr(97 + n) for n in range(users)], transport=httpx.MockTransport(handler),
                           sleep=clock.sleep, clock=clock.monotonic,
                           retry_policy=RetryPolicy(max_retries=3, max_retry_after=30.0, jitter=False), **kw)  # type: ignore[arg-type]


async def test_client_sends_a_throttled_request_through_another_user_at_once() -> None:
    clock = Clock()
    seen: list[str] = []

    def handler(request: httpx.Request) -> httpx.Response:
        seen.append(request.headers["Authorization"])
        if request.headers["Authorization"] == "Bearer token-a":
            return httpx.Response(429, headers={"Retry-After": "60"}, json={"error": {
                "code": "0x80072322", "message": "Number of requests exceeded the limit of 6000 over time window "
                                                 "of 300 seconds."}})
        return httpx.Response(200, json={"UserId": "x"})

    client = _client(handler, clock)
    assert (await client.whoami())["UserId"] == "x"
    assert (await client.whoami())["UserId"] == "x"
    await client.close()
    assert seen.count("Bearer token-a") == 1  # paused after its 429: the next request goes to b directly
    assert seen.count("Bearer token-b") == 2
    assert clock.slept == []
    stats = client.pool.stats()
    assert stats["a"]["throttled"] == 1 and stats["a"]["paused_for_s"] == 60


async def test_client_raises_throttled_without_sending_when_every_budget_is_spent() -> None:
    clock = Clock()
    sent = 0

    def handler(request: httpx.Request) -> httpx.Response:
        nonlocal sent
        sent += 1
        return httpx.Response(200, json={"UserId": "x"})

    client = _client(handler, clock, users=1, budget=budget(requests=2, window_s=300))
    await client.whoami()
    await client.whoami()
    with pytest.raises(ThrottledError) as caught:
        await client.whoami()
    await client.close()
    assert sent == 2 and caught.value.code == "client_pacing" and caught.value.retry_after == pytest.approx(300)
