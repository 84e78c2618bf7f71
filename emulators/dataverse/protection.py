"""Service protection limits (dataverse.md §7.2), injected faults and the request log.

Limits are per user over a sliding window: number of requests, combined execution time, and concurrent requests.
Exceeding any yields 429 with ``Retry-After`` and the documented code. The clock is injectable so tests can move
time instead of sleeping.

Which user: api-limits.md says "The service protection API limits are evaluated per user. Each authenticated user
is limited independently." Whether an application user that impersonates (``CallerObjectId``/``MSCRMCallerID``) is
counted as itself or as the impersonated user is not documented (NOT VERIFIED). The emulator takes the stricter
reading by default: the **authenticated** user (``per="caller"``), so impersonation cannot multiply a budget and a
router that needs more than one user's budget needs more application users (docs/deploy.md §9). ``per="effective"``
counts the impersonated user instead (the lenient reading), for comparison.

Every answered request carries the documented debugging headers ``x-ms-ratelimit-burst-remaining-xrm-requests``
(requests left in the window) and ``x-ms-ratelimit-time-remaining-xrm-requests`` (execution milliseconds left).
"""

from __future__ import annotations

import math
import random
import re
import threading
import time
import uuid
from collections import deque
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from typing import Any

from .errors import DataverseError

__all__ = ["Fault", "FaultInjector", "Limits", "RequestLog", "ServiceProtection"]


@dataclass
class Limits:
    requests: int = 6000
    window_s: int = 300
    execution_ms: int = 1_200_000
    concurrent: int = 52
    per: str = "caller"  # "caller": the authenticated (application) user; "effective": the impersonated user

    def scaled(self, changes: dict[str, Any]) -> Limits:
        allowed = {"requests", "window_s", "execution_ms", "concurrent"}
        unknown = set(changes) - allowed - {"scale", "per"}
        if unknown:
            raise ValueError(f"unknown limit fields: {', '.join(sorted(unknown))}")
        new = Limits(**asdict(self))
        if "scale" in changes:
            # One knob for tests: 0.001 turns 6000 requests / 20 min / 52 concurrent into 6 / 1.2 s / 1.
            f = float(changes["scale"])
            new.requests = max(1, int(new.requests * f))
            new.execution_ms = max(1, int(new.execution_ms * f))
            new.concurrent = max(1, int(new.concurrent * f))
        for k in allowed & set(changes):
            setattr(new, k, int(changes[k]))
        return new

    def with_scope(self, per: str) -> Limits:
        if per not in ("caller", "effective"):
            raise ValueError("per must be 'caller' or 'effective'")
        new = Limits(**asdict(self))
        new.per = per
        return new


@dataclass
class _UserWindow:
    requests: deque[float] = field(default_factory=deque)
    executions: deque[tuple[float, float]] = field(default_factory=deque)  # (end time, ms)
    exec_total_ms: float = 0.0
    in_flight: int = 0


class ServiceProtection:
    def __init__(self, limits: Limits | None = None, clock: Callable[[], float] = time.monotonic) -> None:
        self.limits = limits or Limits()
        self.clock = clock
        self._users: dict[str, _UserWindow] = {}
        self._lock = threading.Lock()

    def reset(self) -> None:
        with self._lock:
            self._users.clear()

    def in_flight(self) -> int:
        return sum(w.in_flight for w in self._users.values())

    def _trim(self, w: _UserWindow, now: float) -> None:
        horizon = now - self.limits.window_s
        while w.requests and w.requests[0] <= horizon:
            w.requests.popleft()
        while w.executions and w.executions[0][0] <= horizon:
            w.exec_total_ms -= w.executions.popleft()[1]

    def charged_user(self, caller_user: str, app_user: str | None) -> str:
        """The user a request counts against: ``caller_user`` is the effective user, ``app_user`` the authenticated
        application user when it impersonates (None otherwise)."""
        if self.limits.per == "caller" and app_user:
            return app_user
        return caller_user

    def remaining(self, user: str) -> tuple[int, int]:
        """(requests, execution ms) left in the user's current window: the debugging headers' values."""
        with self._lock:
            w = self._users.get(user)
            if w is None:
                return self.limits.requests, self.limits.execution_ms
            self._trim(w, self.clock())
            return (max(0, self.limits.requests - len(w.requests)),
                    max(0, int(self.limits.execution_ms - w.exec_total_ms)))

    def enter(self, user: str) -> None:
        """Admit a request or raise the matching 429. Concurrency is checked first: it fails immediately."""
        lim = self.limits
        with self._lock:
            now = self.clock()
            w = self._users.setdefault(user, _UserWindow())
            self._trim(w, now)
            if w.in_flight >= lim.concurrent:
                raise DataverseError.throttled_concurrency(lim.concurrent, 1)
            if len(w.requests) >= lim.requests:
                retry = max(1, math.ceil(w.requests[0] + lim.window_s - now))
                raise DataverseError.throttled_requests(lim.requests, lim.window_s, retry)
            if w.exec_total_ms >= lim.execution_ms:
                retry = max(1, math.ceil(w.executions[0][0] + lim.window_s - now)) if w.executions else 1
                raise DataverseError.throttled_time(lim.execution_ms, lim.window_s, retry)
            w.requests.append(now)
            w.in_flight += 1

    def leave(self, user: str, elapsed_ms: float) -> None:
        with self._lock:
            w = self._users.setdefault(user, _UserWindow())
            w.in_flight = max(0, w.in_flight - 1)
            w.executions.append((self.clock(), elapsed_ms))
            w.exec_total_ms += elapsed_ms


@dataclass
class Fault:
    id: str
    method: str | None
    path: re.Pattern[str]
    status: int | None
    retry_after: int | None
    latency_ms: int
    probability: float
    count: int | None  # remaining applications; None = unlimited
    error_code: str | None
    message: str | None

    def public(self) -> dict[str, Any]:
        return {"id": self.id, "method": self.method, "path": self.path.pattern, "status": self.status,
                "retry_after": self.retry_after, "latency_ms": self.latency_ms, "probability": self.probability,
                "count": self.count, "error_code": self.error_code, "message": self.message}


_DEFAULT_FAULT_CODES = {429: "0x80072322", 503: "0x80040216", 500: "0x80040216"}


class FaultInjector:
    def __init__(self, rng: random.Random | None = None) -> None:
        self.faults: list[Fault] = []
        self.rng = rng or random.Random()
        self._lock = threading.Lock()

    def add(self, spec: dict[str, Any]) -> Fault:
        if not isinstance(spec, dict):
            raise ValueError("a fault must be a JSON object")
        try:
            pattern = re.compile(str(spec.get("path", ".*")))
        except re.error as exc:
            raise ValueError(f"bad path regex: {exc}") from None
        status = spec.get("status")
        latency = int(spec.get("latency_ms", 0) or 0)
        if status is None and latency <= 0:
            raise ValueError("a fault needs a status or a latency_ms")
        count = spec.get("count")
        fault = Fault(
            id=str(uuid.uuid4()), method=(str(spec["method"]).upper() if spec.get("method") else None), path=pattern,
            status=int(status) if status is not None else None,
            retry_after=int(spec["retry_after"]) if spec.get("retry_after") is not None else None,
            latency_ms=latency, probability=float(spec.get("probability", 1.0)),
            count=int(count) if count is not None else None, error_code=spec.get("error_code"),
            message=spec.get("message"),
        )
        with self._lock:
            self.faults.append(fault)
        return fault

    def remove(self, fault_id: str | None = None) -> bool:
        with self._lock:
            if fault_id is None:
                self.faults.clear()
                return True
            before = len(self.faults)
            self.faults = [f for f in self.faults if f.id != fault_id]
            return len(self.faults) != before

    def match(self, method: str, target: str) -> Fault | None:
        """First fault that matches and fires (probability); consumes one of its ``count``."""
        with self._lock:
            for f in list(self.faults):
                if f.method and f.method != method.upper():
                    continue
                if not f.path.search(target):
                    continue
                if f.probability < 1.0 and self.rng.random() >= f.probability:
                    continue
                if f.count is not None:
                    f.count -= 1
                    if f.count <= 0:
                        self.faults.remove(f)
                return f
        return None

    @staticmethod
    def error_for(f: Fault) -> DataverseError | None:
        if f.status is None:
            return None
        code = f.error_code if f.error_code is not None else _DEFAULT_FAULT_CODES.get(f.status, "")
        message = f.message or {
            "0x80072322": "Number of requests exceeded the limit of 6000 over time window of 300 seconds.",
            "0x80072321": "Combined execution time of incoming requests exceeded limit of 1,200,000 milliseconds "
                          "over time window of 300 seconds. Decrease number of concurrent requests or reduce the "
                          "duration of requests and try again later.",
            "0x80072326": "Number of concurrent requests exceeded the limit of 52.",
        }.get(code, f"Injected fault (HTTP {f.status}).")
        headers = {}
        if f.retry_after is not None:
            headers["Retry-After"] = str(f.retry_after)
        elif f.status == 429:
            headers["Retry-After"] = "1"
        return DataverseError(f.status, code, message, headers)


class RequestLog:
    def __init__(self, maxlen: int = 200_000) -> None:
        self.entries: deque[dict[str, Any]] = deque(maxlen=maxlen)

    def add(self, method: str, path: str, status: int, ms: float, caller: str | None) -> None:
        self.entries.append({"method": method, "path": path, "status": status, "ms": round(ms, 3),
                             "at": time.time(), "caller": caller})

    def clear(self) -> None:
        self.entries.clear()
