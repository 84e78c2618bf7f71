"""The fault mix of the chaos runs (issue 10) and the counters read back from the emulators' logs."""

from __future__ import annotations

from collections import Counter
from dataclasses import dataclass
from typing import Any

from tests.e2e.stack_harness import Stack

# ~10 % of Graph mail API calls: 429 with Retry-After, 503, added latency (the emulator evaluates the rules in
# order, each with its own probability, so the total is about the sum).
GRAPH_FAULTS: tuple[dict[str, Any], ...] = (
    {"path": "/users/", "status": 429, "retry_after": 1, "probability": 0.04},
    {"path": "/users/", "status": 503, "probability": 0.03},
    {"path": "/users/", "status": 0, "latency_ms": 400, "probability": 0.03},
)
# ~10 % of Dataverse calls: the three service-protection 429s and 5xx.
DATAVERSE_FAULTS: tuple[dict[str, Any], ...] = (
    {"path": ".", "status": 429, "error_code": "0x80072322", "retry_after": 1, "probability": 0.03},
    {"path": ".", "status": 429, "error_code": "0x80072321", "retry_after": 1, "probability": 0.02},
    {"path": ".", "status": 429, "error_code": "0x80072326", "retry_after": 1, "probability": 0.01},
    {"path": ".", "status": 503, "probability": 0.02},
    {"path": ".", "status": 500, "probability": 0.02},
)
# Notifications: duplicated, reordered (held back so later ones overtake), dropped (-> `missed` lifecycle -> delta).
NOTIFICATION_FAULTS: tuple[dict[str, Any], ...] = (
    {"action": "duplicate", "probability": 0.06},
    {"action": "reorder", "probability": 0.06, "delay_ms": 500},
    {"action": "drop", "probability": 0.03},
)


# Exchange evicts delta sync states when its token cache needs room ("lifetime isn't fixed"): a fifth of the
# delta/skip token uses answer 410 syncStateNotFound / resyncRequired / SyncStateInvalid.
DELTA_EVICTION = 0.2


def inject(stack: Stack, *, notifications: bool = True) -> None:
    stack.clear_faults()
    for spec in GRAPH_FAULTS:
        stack.emulator("graph", "POST", "faults", spec)
    for spec in DATAVERSE_FAULTS:
        stack.emulator("dataverse", "POST", "faults", spec)
    if notifications:
        for spec in NOTIFICATION_FAULTS:
            stack.emulator("graph", "POST", "notification-faults", spec)
        stack.emulator("graph", "POST", "config", {"delta_evict_probability": DELTA_EVICTION})


@dataclass
class FaultReport:
    graph_requests: int
    graph_faulted: Counter[int]
    dataverse_requests: int
    dataverse_faulted: Counter[int]
    notification_faults: dict[str, int]
    delta_resets: int = 0  # delta requests answered 410 (evicted sync states)

    def summary(self) -> str:
        return (f"graph {self.graph_requests} requests, faulted {dict(self.graph_faulted)}, "
                f"{self.delta_resets} delta tokens evicted; "
                f"dataverse {self.dataverse_requests} requests, faulted {dict(self.dataverse_faulted)}; "
                f"notification faults fired {self.notification_faults}")


def read_counters(stack: Stack) -> FaultReport:
    """Requests and fault answers since the last ``reset_counters`` (the emulators' request logs)."""
    g = stack.emulator("graph", "GET", "requests")["value"]
    d = stack.emulator("dataverse", "GET", "requests")["value"]
    notif = stack.emulator("graph", "GET", "notification-faults")
    items = notif.get("value", notif) if isinstance(notif, dict) else notif
    fired: dict[str, int] = {}
    for f in items or []:
        fired[str(f.get("action"))] = fired.get(str(f.get("action")), 0) + int(f.get("hits") or 0)
    return FaultReport(
        len(g), Counter(int(r["status"]) for r in g if int(r["status"]) in (429, 500, 502, 503, 504)),
        len(d), Counter(int(r["status"]) for r in d if int(r["status"]) in (429, 500, 502, 503, 504)),
        fired, sum(1 for r in g if int(r["status"]) == 410 and "/delta" in str(r["path"])))


def reset_counters(stack: Stack) -> None:
    stack.emulator("graph", "DELETE", "requests")
    stack.emulator("dataverse", "DELETE", "requests")
