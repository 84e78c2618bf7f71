"""Leases: who is running a job (or creating a mailbox's subscription) right now, as plain values.

A job an admin can start by hand while a timer starts it too (subscription reconcile, CRM sync, delta fan-out,
health probe, retention) holds a lease for as long as it runs, renewed while it works; a second run finds the
lease held and waits or stops with :func:`describe_holder`'s message. Work that must happen once per mailbox (a
subscription create for a mailbox folder, a delta round) holds a lease on that mailbox as well, so a run that is
not the job's (a lifecycle event's re-subscribe) cannot duplicate it either. A lease ends when released, or when
its holder stops renewing it (crash): it expires at ``until``.

The store (``core.adapters.leases``) keeps one ETag-guarded table row per lease; this module holds what the
services and the adapter share.
"""

from __future__ import annotations

import os
import socket
import uuid
from dataclasses import dataclass
from datetime import datetime, timedelta
from typing import Final

__all__ = [
    "JOB_CRM_SYNC",
    "JOB_DELTA_FANOUT",
    "JOB_HEALTH",
    "JOB_RECONCILE",
    "JOB_RETENTION",
    "Lease",
    "LeaseHeld",
    "LeaseLost",
    "delta_lease",
    "describe_holder",
    "new_owner",
    "renew_interval",
    "subscribe_lease",
]

JOB_RECONCILE: Final = "job/subscription-reconcile"
JOB_CRM_SYNC: Final = "job/crm-sync"
JOB_DELTA_FANOUT: Final = "job/delta-fanout"
JOB_HEALTH: Final = "job/health-probe"
JOB_RETENTION: Final = "job/retention"

_JOB_LABELS: Final = {
    JOB_RECONCILE: "subscription reconcile", JOB_CRM_SYNC: "CRM sync", JOB_DELTA_FANOUT: "delta catch-up",
    JOB_HEALTH: "mailbox health probe", JOB_RETENTION: "retention clean-up",
}


def subscribe_lease(mailbox: str, folder: str) -> str:
    """The lease held while a subscription for (mailbox, folder) is being created."""
    return f"subscribe/{mailbox.strip().lower()}/{folder.strip().lower()}"


def delta_lease(mailbox: str) -> str:
    """The lease held while delta rounds run for a mailbox."""
    return f"delta/{mailbox.strip().lower()}"


def new_owner(role: str) -> str:
    """A lease owner id that says where the run is (host, process) and what started it (timer, cli, ...)."""
    return f"{role}@{socket.gethostname()}:{os.getpid()}:{uuid.uuid4().hex[:8]}"


@dataclass(frozen=True)
class Lease:
    name: str
    owner: str
    acquired_at: datetime
    until: datetime
    purpose: str = ""
    etag: str = ""  # the store's concurrency token of the row (renew/release need it)

    def held(self, now: datetime) -> bool:
        return self.until > now


class LeaseHeld(Exception):
    """Someone else holds the lease (``holder``)."""

    def __init__(self, holder: Lease) -> None:
        super().__init__(holder.name)
        self.holder = holder


class LeaseLost(Exception):
    """Our lease was taken over (it expired and another run acquired it) or removed."""


def _label(name: str) -> str:
    if name in _JOB_LABELS:
        return _JOB_LABELS[name]
    kind, _, rest = name.partition("/")
    return {"subscribe": "subscription create for", "delta": "delta round for"}.get(kind, kind) + f" {rest}"


def describe_holder(holder: Lease, now: datetime) -> str:
    """``another subscription reconcile is running (cli@host:123:ab12cd34, started 12 s ago; its lease expires in
    48 s unless renewed)``: what a losing run prints (CLI) or logs (timer)."""
    started = max(0, int((now - holder.acquired_at).total_seconds()))
    left = max(0, int((holder.until - now).total_seconds()))
    what = f" ({holder.purpose})" if holder.purpose else ""
    return (f"another {_label(holder.name)} is running{what}: {holder.owner}, started {started} s ago; its lease "
            f"expires in {left} s unless renewed")


def renew_interval(duration: timedelta) -> float:
    """Seconds between renewals: a third of the lease, so two renewals may fail before it lapses."""
    return max(0.5, duration.total_seconds() / 3)
