"""Outlook throttling (per app id + mailbox) and the fault-injection registry."""

from __future__ import annotations

import itertools
import math
import random
import re
import threading
import time
from collections import deque
from dataclasses import asdict, dataclass, field
from typing import Any, Generic, Protocol, TypeVar

from .util import GraphError

__all__ = ["Fault", "FaultRegistry", "MailboxLimits", "NotificationFault", "NotificationFaults", "SubscriptionLimits"]


class MailboxLimits:
    """10,000 requests / 10 min and 4 concurrent requests per (app id, mailbox) (graph.md §8).

    The budget is a fixed window per key: simple, and what clients observe is the same — 429 with a
    Retry-After up to the end of the window. Concurrency counts requests currently inside the handler.
    """

    def __init__(self, budget: int, window_s: float, concurrency: int) -> None:
        self.budget = budget
        self.window_s = window_s
        self.concurrency = concurrency
        self._windows: dict[tuple[str, str], list[float]] = {}  # key -> [window start, count]
        self._inflight: dict[tuple[str, str], int] = {}
        self._lock = threading.Lock()

    def acquire(self, app_id: str, mailbox: str) -> None:
        key = (app_id, mailbox)
        now = time.monotonic()
        with self._lock:
            window = self._windows.get(key)
            if window is None or now - window[0] >= self.window_s:
                window = [now, 0.0]
                self._windows[key] = window
            if window[1] >= self.budget:
                retry = max(1, math.ceil(self.window_s - (now - window[0])))
                raise GraphError(429, "ApplicationThrottled",
                                 "Application is over its MailboxRequests limit.", headers={"Retry-After": str(retry)})
            inflight = self._inflight.get(key, 0)
            if inflight >= self.concurrency:
                raise GraphError(429, "ApplicationThrottled", "Application is over its MailboxConcurrency limit.",
                                 headers={"Retry-After": "1"})
            window[1] += 1
            self._inflight[key] = inflight + 1

    def release(self, app_id: str, mailbox: str) -> None:
        key = (app_id, mailbox)
        with self._lock:
            n = self._inflight.get(key, 0) - 1
            if n <= 0:
                self._inflight.pop(key, None)
            else:
                self._inflight[key] = n

    def reset(self) -> None:
        with self._lock:
            self._windows.clear()
            self._inflight.clear()


class SubscriptionLimits:
    """The subscription service's own limits (throttling-limits, "Subscription services"), sliding windows:

    per app per tenant 1,000 writes (POST/PUT/PATCH/DELETE) and 5,000 requests of any kind per 20 s; per tenant
    2,000 writes and 10,000 requests. The emulator serves one tenant, so the tenant windows span every app.
    Over a limit: 429 with ``Retry-After`` = seconds until the oldest counted request leaves the window.
    A refused request is not counted.
    """

    WRITES: frozenset[str] = frozenset({"POST", "PUT", "PATCH", "DELETE"})

    def __init__(self, window_s: float, writes_per_app: int, writes_per_tenant: int, requests_per_app: int,
                 requests_per_tenant: int, clock: Any = time.monotonic) -> None:
        self.window_s = window_s
        self._limits = {"app-write": writes_per_app, "tenant-write": writes_per_tenant,
                        "app-any": requests_per_app, "tenant-any": requests_per_tenant}
        self._windows: dict[tuple[str, str], deque[float]] = {}
        self._lock = threading.Lock()
        self._clock = clock

    def check(self, app_id: str, method: str) -> None:
        now = self._clock()
        keys = [("app-any", app_id.lower()), ("tenant-any", "")]
        if method.upper() in self.WRITES:
            keys += [("app-write", app_id.lower()), ("tenant-write", "")]
        with self._lock:
            for key in keys:
                window = self._windows.setdefault(key, deque())
                while window and now - window[0] >= self.window_s:
                    window.popleft()
                if len(window) >= self._limits[key[0]]:
                    retry = max(1, math.ceil(window[0] + self.window_s - now))
                    scope = "application" if key[0].startswith("app") else "tenant"
                    kind = "write requests" if key[0].endswith("write") else "requests"
                    raise GraphError(429, "TooManyRequests",
                                     f"Too many subscription {kind} for this {scope} "
                                     f"({self._limits[key[0]]} per {self.window_s:g} seconds). Please retry "
                                     "again later.", headers={"Retry-After": str(retry)})
            for key in keys:
                self._windows[key].append(now)

    def reset(self) -> None:
        with self._lock:
            self._windows.clear()


_ids = itertools.count(1)


@dataclass
class Fault:
    id: str
    method: str | None
    path: str
    status: int = 0  # 0 = no error (latency only)
    retry_after: float | None = None
    latency_ms: int = 0
    probability: float = 1.0
    count: int | None = None  # None = unlimited; decremented per injection
    error_code: str | None = None
    message: str | None = None
    hits: int = 0
    _regex: re.Pattern[str] = field(default=re.compile(""), repr=False)

    def public(self) -> dict[str, Any]:
        return {k: v for k, v in asdict(self).items() if not k.startswith("_")}


_DEFAULT_CODES = {429: "TooManyRequests", 500: "InternalServerError", 502: "BadGateway", 503: "ServiceNotAvailable",
                  504: "GatewayTimeout", 401: "InvalidAuthenticationToken", 403: "ErrorAccessDenied",
                  404: "ErrorItemNotFound", 409: "ErrorIrresolvableConflict"}
_DEFAULT_MESSAGES = {429: "Please retry again later.", 503: "The service is temporarily unavailable."}


class _Public(Protocol):
    def public(self) -> dict[str, Any]: ...


_F = TypeVar("_F", bound=_Public)


class _Registry(Generic[_F]):
    """Faults by id, thread-safe: the list/remove half shared by request and notification faults."""

    def __init__(self) -> None:
        self._faults: dict[str, _F] = {}
        self._lock = threading.Lock()

    def list(self) -> list[dict[str, Any]]:
        with self._lock:
            return [f.public() for f in self._faults.values()]

    def remove(self, fault_id: str | None = None) -> bool:
        with self._lock:
            if fault_id is None:
                self._faults.clear()
                return True
            return self._faults.pop(fault_id, None) is not None


class FaultRegistry(_Registry[Fault]):

    def add(self, spec: dict[str, Any]) -> Fault:
        try:
            regex = re.compile(str(spec.get("path") or ".*"))
        except re.error as exc:
            raise GraphError(400, "BadRequest", f"invalid path regex: {exc}") from None
        status = int(spec.get("status") or 0)
        fault = Fault(
            id=str(next(_ids)), method=(str(spec["method"]).upper() if spec.get("method") else None),
            path=regex.pattern, status=status,
            retry_after=float(spec["retry_after"]) if spec.get("retry_after") is not None else None,
            latency_ms=int(spec.get("latency_ms") or 0), probability=float(spec.get("probability", 1.0)),
            count=int(spec["count"]) if spec.get("count") is not None else None,
            error_code=spec.get("error_code") or _DEFAULT_CODES.get(status, "InternalServerError"),
            message=spec.get("message") or _DEFAULT_MESSAGES.get(status, "Injected fault."), _regex=regex)
        with self._lock:
            self._faults[fault.id] = fault
        return fault

    def match(self, method: str, path: str) -> Fault | None:
        if not self._faults:  # the common case costs one dict check
            return None
        with self._lock:
            for fault in list(self._faults.values()):
                if fault.method and fault.method != method:
                    continue
                if not fault._regex.search(path):
                    continue
                if fault.probability < 1.0 and random.random() >= fault.probability:
                    continue
                fault.hits += 1
                if fault.count is not None:
                    fault.count -= 1
                    if fault.count <= 0:
                        del self._faults[fault.id]
                return fault
        return None


@dataclass
class NotificationFault:
    id: str
    action: str  # drop | duplicate | delay | reorder
    probability: float = 1.0
    count: int | None = None
    delay_ms: int = 0
    hits: int = 0

    def public(self) -> dict[str, Any]:
        return asdict(self)


class NotificationFaults(_Registry[NotificationFault]):
    ACTIONS = ("drop", "duplicate", "delay", "reorder")

    def add(self, spec: dict[str, Any]) -> NotificationFault:
        action = str(spec.get("action") or "").lower()
        if action not in self.ACTIONS:
            raise GraphError(400, "BadRequest", f"action must be one of {', '.join(self.ACTIONS)}")
        fault = NotificationFault(str(next(_ids)), action, float(spec.get("probability", 1.0)),
                                  int(spec["count"]) if spec.get("count") is not None else None,
                                  int(spec.get("delay_ms") or 0))
        with self._lock:
            self._faults[fault.id] = fault
        return fault

    def pick(self) -> NotificationFault | None:
        if not self._faults:
            return None
        with self._lock:
            for fault in list(self._faults.values()):
                if fault.probability < 1.0 and random.random() >= fault.probability:
                    continue
                fault.hits += 1
                if fault.count is not None:
                    fault.count -= 1
                    if fault.count <= 0:
                        del self._faults[fault.id]
                return fault
        return None
