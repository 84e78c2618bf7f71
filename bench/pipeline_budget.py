"""Throughput under Dataverse's service-protection budgets, with K application users (the router's pool).

The Dataverse emulator enforces a per-user budget (requests per sliding window, execution time, concurrency:
``/_emulator/limits``); the Functions host restarts with a pool of K application users paced to the same budget
(``DATAVERSE_CLIENT_IDS`` + ``DATAVERSE_USER_*``). Mail to tracked mailboxes is then offered faster than the
budget allows (1.25 x the ceiling, open loop) for ``duration_s``. The window is shortened from Microsoft's 300 s
to ``window_s`` with the request count scaled alike (600 per 30 s = 20 requests/s, the same rate), so the steady
state is reached within the run: the first window (when a fresh budget allows a burst) is left out, and the
figures come from the rest of the offered period:

* throughput = CRM rows first seen in the measured period / its length;
* Dataverse calls per email = the pool's requests in that period (the emulator's request log, by app id) / rows;
* ceiling = K x per-user rate / calls per email; ratio = throughput / ceiling (= the pool's request rate / K x
  per-user rate: how much of the budget the router turns into tracked email);
* lost = tracked mails without a CRM row after the drain; 429s = the pool's requests answered 429 / all of them.
"""

from __future__ import annotations

import time
import uuid
from typing import Any

from bench.pipeline_load import BenchOrg, RowPoller, make_mails, send_mails, wait_rows
from local.stack import AppUser, Stack

__all__ = ["measure_budget", "pool_settings"]


def pool_settings(users: list[AppUser], **budget: int) -> dict[str, str]:
    values = {"DATAVERSE_CLIENT_IDS": ",".join(u.client_id for u in users),
              "DATAVERSE_CLIENT_SECRETS": ",".join(u.client_secret for u in users)}
    names = {"requests": "DATAVERSE_USER_REQUESTS_PER_WINDOW", "window_s": "DATAVERSE_USER_WINDOW_SECONDS",
             "execution_ms": "DATAVERSE_USER_EXECUTION_MS"}
    values.update({names[k]: str(v) for k, v in budget.items()})
    return values


def measure_budget(stack: Stack, org: BenchOrg, poller: RowPoller, users: list[AppUser], *, per_user_requests: int,
                   window_s: int, duration_s: float, calls_guess: float = 1.25, offered_factor: float = 1.25,
                   drain_cap_s: float = 120.0) -> dict[str, Any]:
    k = len(users)
    execution_ms = int(1_200_000 * window_s / 300)
    limits = {"requests": per_user_requests, "window_s": window_s, "execution_ms": execution_ms, "concurrent": 52}
    stack.host_values.update(pool_settings(users, requests=per_user_requests, window_s=window_s,
                                           execution_ms=execution_ms))
    stack.restart_host()
    # warm: the new host's caches, tokens and connections (not measured)
    warm = make_mails(org, 20, f"bw{uuid.uuid4().hex[:4]}", tracked_only=True)
    send_mails(stack, warm, rate=5.0, cap_s=30)
    wait_rows(poller, {s.message_id for s, _ in warm if s.accepted is not None}, within=90)
    stack.emulator("dataverse", "POST", "limits", limits)  # also starts every user's window afresh
    stack.emulator("dataverse", "DELETE", "requests")
    per_user_rate = per_user_requests / window_s
    ceiling_guess = k * per_user_rate / calls_guess
    offered = offered_factor * ceiling_guess
    mails = make_mails(org, int(offered * duration_s), f"bb{uuid.uuid4().hex[:6]}", tracked_only=True)
    wall0, t0 = time.time(), time.monotonic()
    try:
        sending = send_mails(stack, mails, rate=offered, cap_s=duration_s + 10)
        end = t0 + duration_s
        expected = {s.message_id for s, _ in mails if s.accepted is not None}
        drained_at = wait_rows(poller, expected, within=max(0.0, end - time.monotonic()) + drain_cap_s)
        log = stack.emulator("dataverse", "GET", "requests")["value"]
    finally:
        stack.emulator("dataverse", "POST", "limits", {"reset": True})
    seen = {m: t for m, t in poller.snapshot().items() if m in expected}
    pool_ids = {u.client_id.lower() for u in users}
    router = [e for e in log if str(e.get("caller") or "").lower() in pool_ids]
    start, stop = t0 + window_s, t0 + duration_s
    wall_start, wall_stop = wall0 + window_s, wall0 + duration_s
    rows = sum(1 for t in seen.values() if start <= t < stop)
    requests = sum(1 for e in router if wall_start <= float(e.get("at") or 0) < wall_stop)
    span = stop - start
    throttled = sum(1 for e in router if int(e.get("status") or 0) == 429)
    by_user: dict[str, int] = {}
    for e in router:
        by_user[str(e.get("caller"))] = by_user.get(str(e.get("caller")), 0) + 1
    calls = requests / rows if rows else None
    ceiling = (k * per_user_rate / calls) if calls else None
    throughput = rows / span if span > 0 else 0.0
    return {
        "k": k, "per_user_requests": per_user_requests, "window_s": window_s, "per_user_rate": round(per_user_rate, 3),
        "execution_ms": execution_ms, "duration_s": duration_s, "offered_per_s": round(offered, 2),
        "sent": sending["sent"], "send_rate": sending["rate_per_s"], "expected": len(expected), "seen": len(seen),
        "lost": len(expected) - len(seen), "drain_s": round(drained_at - stop, 1),
        "measured_span_s": round(span, 1), "rows_in_span": rows, "requests_in_span": requests,
        "throughput_per_s": round(throughput, 2), "calls_per_email": round(calls, 3) if calls else None,
        "ceiling_per_s": round(ceiling, 2) if ceiling else None,
        "ratio": round(throughput / ceiling, 3) if ceiling else None,
        "request_rate_ratio": round(requests / span / (k * per_user_rate), 3) if span > 0 else None,
        "router_requests": len(router), "throttled_429": throttled,
        "throttled_fraction": round(throttled / len(router), 4) if router else None,
        "requests_by_app": by_user,
    }
