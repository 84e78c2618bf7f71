"""Application-user pool and client-side pacing for Dataverse's service-protection budgets.

Dataverse evaluates service protection per authenticated user, per web server (api-limits.md): 6,000 requests
and 1,200,000 ms of execution time in a sliding 300 s window, and 52 concurrent requests. One application user
therefore sustains 20 requests/s; a router that needs more uses several application users (one app registration
each) and spreads its requests across them (docs/deploy.md §9 sizes the pool).

Each user here gets a :class:`UserPacer` that keeps this process inside that user's budget *before* sending, so
429s stay rare instead of being the control signal:

* **requests**: a sliding window of the send times this process reserved; a request goes when fewer than
  ``request_cap`` were sent in the last ``window_s`` (bursts up to the cap are allowed, as Dataverse allows them,
  then requests flow at the rate old ones leave the window: ``request_cap / window_s`` sustained);
* **execution time**: the same window over the duration of finished requests, timed around the HTTP exchange only
  (not the wait for a slot or a token: that is this process's queueing, not the server's execution), an upper bound
  of the server's execution time, so conservative. When the service reports what is left
  (``x-ms-ratelimit-time-remaining-xrm-requests``, a documented debugging header), that figure decides instead: the
  user waits for execution time only when the service says it is nearly spent (NOT VERIFIED that every org sends
  the header; without it the client-side figure applies);
* **concurrency**: at most ``concurrency_cap`` in flight, lowered by the org's ``x-ms-dop-hint``;
* **429**: the user is paused for ``Retry-After``; the pool sends the request through another user at once when
  one is free, else the caller gets :class:`~core.adapters.dataverse.ThrottledError` as before.

A request that would have to wait longer than ``max_wait_s`` for its slot is not sent: the pool raises
:class:`PacingWait` (a ``ThrottledError``), so a queue worker re-enqueues its message with that delay instead of
holding an invocation.

``share`` is the part of every user's budget this *process* may use (the budgets are per user, not per process):
1.0 by default, with ``headroom`` (0.95) left for clock skew and the odd request of another process. With several
Functions instances busy at once, set ``DATAVERSE_BUDGET_PERCENT`` to 95 / (the instances that run Dataverse-bound
functions at the same time) for zero 429s, or leave it and let the pause-on-429 rule absorb the overlap (429s are
then bounded by one per user per ``Retry-After``; docs/deploy.md §9).

Ownership is unaffected by which user writes a row: the router binds ``ownerid`` explicitly; ``createdby`` is the
application user that wrote it (one of the pool), as SSS's rows show ``SYSTEM``/``# SSSAdminProd`` there.
"""

from __future__ import annotations

import asyncio
import itertools
import math
import time
from collections import deque
from collections.abc import AsyncIterator, Awaitable, Callable, Collection, Sequence
from contextlib import asynccontextmanager
from dataclasses import dataclass, field
from typing import Final

__all__ = ["ApplicationUserPool", "PacingWait", "PoolUser", "ServiceProtectionBudget", "UserPacer"]

TokenProvider = Callable[[], Awaitable[str]]
Clock = Callable[[], float]
Sleep = Callable[[float], Awaitable[None]]

DEFAULT_MAX_WAIT_S: Final = 30.0


@dataclass(frozen=True)
class ServiceProtectionBudget:
    """One application user's service-protection budget (defaults: Microsoft's documented values) and the part of
    it this process may use."""

    requests: int = 6000
    window_s: float = 300.0
    execution_ms: int = 1_200_000
    concurrency: int = 52
    share: float = 1.0
    headroom: float = 0.95

    def __post_init__(self) -> None:
        if self.requests < 1 or self.window_s <= 0 or self.execution_ms < 1 or self.concurrency < 1:
            raise ValueError("service-protection budget values must be positive")
        if not 0 < self.share <= 1 or not 0 < self.headroom <= 1:
            raise ValueError("share and headroom must be within (0, 1]")

    @property
    def request_cap(self) -> int:
        """Requests this process sends per user within any ``window_s``."""
        return max(1, math.floor(self.requests * self.share * self.headroom))

    @property
    def execution_cap_ms(self) -> float:
        return self.execution_ms * self.share * self.headroom

    @property
    def concurrency_cap(self) -> int:
        return max(1, math.floor(self.concurrency * self.share))

    @property
    def sustained_rate(self) -> float:
        """Requests per second per user once a window's burst is spent."""
        return self.request_cap / self.window_s


class PacingWait(Exception):
    """The soonest slot is more than ``max_wait_s`` away; ``wait`` says how far (the client turns it into a
    ``ThrottledError`` with that ``retry_after``, without sending anything)."""

    def __init__(self, wait: float) -> None:
        super().__init__(f"the application users' budgets allow the next request in {wait:.1f} s")
        self.wait = wait


@dataclass
class _Stats:
    sent: int = 0
    throttled: int = 0  # 429s answered to this user
    waited_s: float = 0.0  # time requests spent waiting for this user's budget


class UserPacer:
    """The budget bookkeeping of one application user in this process (see the module doc)."""

    def __init__(self, budget: ServiceProtectionBudget, clock: Clock = time.monotonic) -> None:
        self.budget = budget
        self._clock = clock
        self._sent: deque[float] = deque()  # reserved send times, non-decreasing
        self._executions: deque[tuple[float, float]] = deque()  # (finished at, ms)
        self._execution_total = 0.0
        self._paused_until = 0.0
        self._server_time_left: float | None = None  # ms, the service's own figure when it sends one
        self.limit = budget.concurrency_cap
        self.in_flight = 0
        self.stats = _Stats()

    def _trim(self, now: float) -> None:
        horizon = now - self.budget.window_s
        while self._sent and self._sent[0] <= horizon:
            self._sent.popleft()
        while self._executions and self._executions[0][0] <= horizon:
            self._execution_total -= self._executions.popleft()[1]

    def earliest(self, now: float | None = None) -> float:
        """The earliest time a new request of this user may be sent (budget and pause; not concurrency)."""
        now = self._clock() if now is None else now
        self._trim(now)
        slot = max(now, self._paused_until)
        cap = self.budget.request_cap
        if self._sent:
            slot = max(slot, self._sent[-1])  # reservations stay in order (module doc)
            if len(self._sent) >= cap:
                slot = max(slot, self._sent[-cap] + self.budget.window_s)
        if self._executions and self._execution_spent():
            slot = max(slot, self._executions[0][0] + self.budget.window_s)
        return slot

    def reserve(self, now: float | None = None) -> float:
        """Reserve the next send slot; returns it (the caller sleeps until then)."""
        now = self._clock() if now is None else now
        slot = self.earliest(now)
        self._sent.append(slot)
        self.stats.sent += 1
        self.stats.waited_s += slot - now
        return slot

    def _execution_spent(self) -> bool:
        if self._server_time_left is not None:
            return self._server_time_left <= self.budget.execution_ms * (1 - self.budget.headroom * self.budget.share)
        return self._execution_total >= self.budget.execution_cap_ms

    def finished(self, elapsed_ms: float, server_time_left: str | None = None) -> None:
        """A request of this user took ``elapsed_ms`` on the wire; ``server_time_left``: the service's
        ``x-ms-ratelimit-time-remaining-xrm-requests`` value, when it sent one."""
        now = self._clock()
        self._executions.append((now, elapsed_ms))
        self._execution_total += elapsed_ms
        if server_time_left:
            try:
                self._server_time_left = max(0.0, float(server_time_left.strip()))
            except ValueError:  # a malformed debugging header: the last figure (or the client's) stands
                pass

    def throttle(self, retry_after: float | None) -> None:
        """A 429 for this user: no request of it before ``Retry-After`` (1 s when absent)."""
        self.stats.throttled += 1
        self._paused_until = max(self._paused_until, self._clock() + (retry_after if retry_after else 1.0))

    def hint(self, value: str | None) -> None:
        """``x-ms-dop-hint``: the degree of parallelism the service recommends; never above the budget's."""
        if not value:
            return
        try:
            hinted = int(value.strip())
        except ValueError:
            return
        if hinted > 0:
            self.limit = min(hinted, self.budget.concurrency_cap)

    @property
    def paused_for(self) -> float:
        return max(0.0, self._paused_until - self._clock())


@dataclass
class PoolUser:
    """One application user of the pool: a name for logs (its app id), its token provider and its pacer."""

    name: str
    token: TokenProvider
    pacer: UserPacer = field(repr=False)


class ApplicationUserPool:
    """Picks the application user for each request: the one that may send soonest, with a free concurrency slot;
    ties go round the pool. ``lease()`` waits for the slot (or raises :class:`PacingWait` beyond ``max_wait_s``)."""

    def __init__(self, users: Sequence[tuple[str, TokenProvider]], budget: ServiceProtectionBudget | None = None,
                 *, clock: Clock = time.monotonic, sleep: Sleep = asyncio.sleep,
                 max_wait_s: float = DEFAULT_MAX_WAIT_S) -> None:
        if not users:
            raise ValueError("an application-user pool needs at least one user")
        self.budget = budget or ServiceProtectionBudget()
        self._clock = clock
        self._sleep = sleep
        self.max_wait_s = max_wait_s
        self.users = [PoolUser(name, token, UserPacer(self.budget, clock)) for name, token in users]
        self._turn = itertools.count()
        self._slot_freed = asyncio.Event()

    def __len__(self) -> int:
        return len(self.users)

    def _pick(self, exclude: Collection[str]) -> tuple[PoolUser | None, float]:
        """(user with a free concurrency slot that may send soonest, that time); (None, t) when every candidate is
        at its concurrency limit (t = the soonest budget time anyway)."""
        now = self._clock()
        start = next(self._turn) % len(self.users)
        best: PoolUser | None = None
        best_at = math.inf
        soonest = math.inf
        for offset in range(len(self.users)):
            user = self.users[(start + offset) % len(self.users)]
            if user.name in exclude:
                continue
            at = user.pacer.earliest(now)
            soonest = min(soonest, at)
            if user.pacer.in_flight < user.pacer.limit and at < best_at:
                best, best_at = user, at
        return best, (best_at if best is not None else soonest)

    def available_now(self, exclude: Collection[str] = ()) -> bool:
        """Is there a user (not in ``exclude``) that is not paused by a 429?"""
        return any(u.pacer.paused_for == 0 for u in self.users if u.name not in exclude)

    def soonest_wait(self) -> float:
        now = self._clock()
        return max(0.0, min(u.pacer.earliest(now) for u in self.users) - now)

    @asynccontextmanager
    async def lease(self, exclude: Collection[str] = ()) -> AsyncIterator[PoolUser]:
        """Hold a send slot of the best user for one request. The caller times the HTTP exchange itself and reports it
        with ``user.pacer.finished(ms, server_time_left)``."""
        while True:
            user, at = self._pick(exclude)
            wait = at - self._clock()
            if wait > self.max_wait_s:
                raise PacingWait(wait)
            if user is not None:
                break
            self._slot_freed.clear()
            await self._slot_freed.wait()  # every user of the candidates is at its concurrency limit
        user.pacer.in_flight += 1
        try:
            slot = user.pacer.reserve()
            delay = slot - self._clock()
            if delay > 0:
                await self._sleep(delay)
            yield user  # the caller reports the request's duration: user.pacer.finished(...)
        finally:
            user.pacer.in_flight -= 1
            self._slot_freed.set()

    def stats(self) -> dict[str, dict[str, float]]:
        return {u.name: {"sent": u.pacer.stats.sent, "throttled": u.pacer.stats.throttled,
                         "waited_s": round(u.pacer.stats.waited_s, 3), "paused_for_s": round(u.pacer.paused_for, 3)}
                for u in self.users}
