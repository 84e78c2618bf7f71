"""Change and lifecycle notifications: really POSTed, batched per URL, retried, faults applied.

Store change events (any thread) are matched against subscriptions on the event loop, turned into
Graph's notification JSON and queued. A dispatcher task POSTs ``{"value": [...]}`` batches per
notification URL (query string preserved); a non-2xx answer or no answer within 3 s is retried with
exponential backoff until the retry window (4 h by default) closes, after which the notifications are
discarded and a ``missed`` lifecycle event is sent, as Graph does for endpoints it gives up on. Optionally
(``slow_endpoint_throttling``) slow endpoints are throttled as Graph documents: delayed, then dropped.
A sweeper deletes expired subscriptions silently (Graph documents no lifecycle event for plain expiry),
sends ``reauthorizationRequired`` on the access-token cadence (and before expiry, if configured), pauses
change notifications of a subscription whose challenge goes unanswered, and emits ``missed`` after drops.
"""

from __future__ import annotations

import asyncio
import heapq
import http
import itertools
import logging
import os
import ssl
import threading
import time
import uuid
from collections.abc import Callable
from dataclasses import dataclass, field
from datetime import datetime
from typing import Any
from urllib.parse import quote, urlsplit

import httpx

from .config import GraphConfig
from .limits import NotificationFaults
from .store import ChangeEvent, Store
from .util import GraphError, now_utc, parse_dt

log = logging.getLogger("emulators.graph.notify")

__all__ = ["Notifier", "check_notification_url"]

_LOOPBACK = {"127.0.0.1", "localhost", "::1", "[::1]"}
_seq = itertools.count()


def check_notification_url(url: Any, config: GraphConfig, name: str = "notificationUrl") -> str:
    if not isinstance(url, str) or not url:
        raise GraphError(400, "InvalidRequest", f"{name} is required.")
    parts = urlsplit(url)
    if parts.scheme == "https" and parts.hostname:
        return url
    if parts.scheme == "http" and config.allow_http_loopback and (parts.hostname or "") in _LOOPBACK:
        return url  # documented deviation: the local Functions host listens on plain http
    raise GraphError(400, "InvalidRequest", f"The {name} must use the HTTPS protocol.")


@dataclass(order=True)
class _Pending:
    due: float
    seq: int
    url: str = field(compare=False)
    item: dict[str, Any] = field(compare=False)
    sub_id: str = field(compare=False)
    lifecycle: bool = field(compare=False, default=False)
    attempts: int = field(compare=False, default=0)
    first_at: float = field(compare=False, default=0.0)
    throttled: bool = field(compare=False, default=False)  # already held back once for a slow endpoint


@dataclass
class _Sub:
    id: str
    user_id: str
    folder_id: str | None
    kinds: frozenset[str]
    immutable: bool
    expires: datetime
    url: str
    lifecycle_url: str | None
    client_state: str | None
    matcher: Callable[[dict[str, Any]], bool] | None
    raw: dict[str, Any]
    paused_since: float | None = None  # wall clock of the first unanswered reauthorization challenge


@dataclass
class _SlowStats:
    """Per notification URL: answered POSTs and slow ones since ``since`` (flushed every slow_window_s)."""

    since: float
    total: int = 0
    slow: int = 0


class Notifier:
    def __init__(self, store: Store, config: GraphConfig, faults: NotificationFaults) -> None:
        self.store = store
        self.config = config
        self.faults = faults
        self._subs: dict[str, list[_Sub]] = {}
        self._dirty = True  # the cache is rebuilt when next read, not on every subscription write
        # Rebuilds run on the dispatcher's thread, creates on the API's: an append must not land in a dict a
        # concurrent rebuild is about to replace.
        self._cache_lock = threading.Lock()
        self._heap: list[_Pending] = []
        self._loop: asyncio.AbstractEventLoop | None = None
        self._wake: asyncio.Event | None = None
        self._tasks: list[asyncio.Task[None]] = []
        self._inflight: dict[str, int] = {}
        self._missed_due: dict[str, float] = {}
        self._client: httpx.AsyncClient | None = None
        self._posts: set[asyncio.Task[None]] = set()
        self._thread: threading.Thread | None = None
        self._stopping: asyncio.Event | None = None
        self.delivered = 0  # POSTs answered 2xx (for the request log / tests)
        self.attempts = 0
        self.paused_dropped = 0  # changes lost while a subscription's reauthorization challenge was unanswered
        self.slow_dropped = 0  # notifications dropped for a throttled slow endpoint
        self._slow: dict[str, _SlowStats] = {}
        store.add_listener(self.publish)

    # -- lifecycle -----------------------------------------------------------------------------
    def _verify(self) -> ssl.SSLContext | bool:
        path = self.config.ca_bundle or os.environ.get("SSL_CERT_FILE") or os.environ.get("REQUESTS_CA_BUNDLE")
        return ssl.create_default_context(cafile=path) if path else True

    def start(self) -> None:
        """Run the dispatcher on its own event loop thread.

        Notification delivery (and its slow or failing endpoints) then never competes with request
        handling on the server's loop, and the emulator does not depend on ASGI lifespan events (uvicorn
        in a thread does not always deliver the shutdown event).
        """
        if self._thread is not None:
            return
        ready = threading.Event()

        def run() -> None:
            loop = asyncio.new_event_loop()
            asyncio.set_event_loop(loop)
            self._loop = loop
            self._wake = asyncio.Event()
            self._client = httpx.AsyncClient(verify=self._verify(), http2=False,
                                             limits=httpx.Limits(max_connections=64, max_keepalive_connections=32))
            self.invalidate()
            self._tasks = [loop.create_task(self._dispatch(), name="graph-notify"),
                           loop.create_task(self._sweep(), name="graph-sweep")]
            ready.set()
            try:
                loop.run_until_complete(self._until_stopped())
            finally:
                loop.run_until_complete(self._shutdown())
                loop.close()

        self._stopping = None
        self._thread = threading.Thread(target=run, name="graph-notifier", daemon=True)
        self._thread.start()
        ready.wait(10)

    async def _until_stopped(self) -> None:
        self._stopping = asyncio.Event()
        await self._stopping.wait()

    async def _shutdown(self) -> None:
        for task in self._tasks:
            task.cancel()
        # shutting down: a cancelled task has nothing left to report
        await asyncio.gather(*self._tasks, *self._posts, return_exceptions=True)
        self._tasks = []
        if self._client is not None:
            await self._client.aclose()
            self._client = None

    def stop(self) -> None:
        loop, thread = self._loop, self._thread
        if loop is None or thread is None:
            return
        for _ in range(200):  # the loop thread creates _stopping right after start; wait for it
            if self._stopping is not None:
                break
            time.sleep(0.01)
        if self._stopping is not None:
            loop.call_soon_threadsafe(self._stopping.set)
        thread.join(10)
        self._thread = None
        self._loop = None

    async def run_on_loop(self, coro: Any) -> Any:
        """Await ``coro`` on the dispatcher's loop (the shared httpx client lives there)."""
        loop = self._loop
        if loop is None:
            return await coro
        try:
            running = asyncio.get_running_loop()
        except RuntimeError:
            running = None
        if running is loop:
            return await coro
        return await asyncio.wrap_future(asyncio.run_coroutine_threadsafe(coro, loop))

    def reset(self) -> None:
        self._heap.clear()
        self._missed_due.clear()
        self._slow.clear()
        self.invalidate()

    # -- subscriptions cache -------------------------------------------------------------------
    def invalidate(self) -> None:
        """A subscription changed: the cache is rebuilt on its next use. (Rebuilding here, once per create, made a
        10,000-mailbox reconcile quadratic in the emulator: it measured the emulator, not the router.)"""
        self._dirty = True

    def _current(self) -> dict[str, list[_Sub]]:
        with self._cache_lock:
            if self._dirty:
                self._dirty = False  # before the load: a change during it marks the cache dirty again
                self._subs = self._load()
            return self._subs

    def added(self, raw: dict[str, Any]) -> None:
        """A new subscription: appended to a clean cache (a create must not cost a rebuild of every subscription,
        and the 1 s sweep would otherwise rebuild it every second while a large reconcile runs)."""
        sub = self._sub(raw)
        with self._cache_lock:
            if not self._dirty:  # (a dirty cache is rebuilt from the store, which has the new subscription)
                self._subs.setdefault(sub.user_id, []).append(sub)

    def _load(self) -> dict[str, list[_Sub]]:
        subs: dict[str, list[_Sub]] = {}
        for raw in self.store.list_subscriptions():
            sub = self._sub(raw)
            subs.setdefault(sub.user_id, []).append(sub)
        return subs

    @staticmethod
    def _sub(raw: dict[str, Any]) -> _Sub:
        from .odata import compile_filter

        matcher = None
        if raw.get("_filter"):
            try:
                matcher = compile_filter(raw["_filter"])
            except GraphError:
                matcher = None
        return _Sub(raw["id"], raw["_userId"], raw.get("_folderId"),
                    frozenset(k.strip().lower() for k in str(raw["changeType"]).split(",")),
                    bool(raw.get("_immutable")), parse_dt(raw["expirationDateTime"]), raw["notificationUrl"],
                    raw.get("lifecycleNotificationUrl"), raw.get("clientState"), matcher, raw,
                    raw.get("_challengedSince"))

    # -- validation handshake ------------------------------------------------------------------
    async def validate_endpoint(self, url: str) -> None:
        """POST ?validationToken=... and require 200, text/plain, the decoded token, within the timeout."""
        await self.run_on_loop(self._validate(url))

    async def _validate(self, url: str) -> None:
        # Real tokens read like this sentence: spaces and colons force clients to URL-decode properly.
        token = f"Validation: Testing client application reachability for subscription Request-Id: {uuid.uuid4()}"
        target = f"{url}{'&' if '?' in url else '?'}validationToken={quote(token, safe='')}"
        client = self._client or httpx.AsyncClient(verify=self._verify())
        failed = ("Subscription validation request failed. Notification endpoint must respond with 200 OK to "
                  "validation request.")
        try:
            resp = await client.post(target, content=b"", headers={"Content-Type": "text/plain; charset=utf-8"},
                                     timeout=self.config.validation_timeout_s)
        except httpx.TimeoutException:
            raise GraphError(400, "InvalidRequest", "Subscription validation request timed out.") from None
        except httpx.HTTPError:
            raise GraphError(400, "ValidationError", failed) from None
        finally:
            if client is not self._client:
                await client.aclose()
        if resp.status_code != 200:
            try:
                phrase = http.HTTPStatus(resp.status_code).phrase.replace(" ", "")
            except ValueError:
                phrase = str(resp.status_code)
            raise GraphError(400, "ValidationError",
                             f"Subscription validation request failed. HTTP status code is '{phrase}'. "
                             "Notification endpoint must respond with 200 OK to validation request.")
        if not resp.headers.get("content-type", "").lower().startswith("text/plain"):
            raise GraphError(400, "ValidationError",
                             "Subscription validation request failed. Response must be of content type text/plain.")
        if resp.text != token:
            raise GraphError(400, "ValidationError", "Subscription validation request failed. Response must exactly "
                                                     "match validationToken query parameter.")

    # -- events -> notifications ---------------------------------------------------------------
    def publish(self, events: list[ChangeEvent]) -> None:
        """Store listener; may run on any thread (SMTP deliveries arrive on the listener's thread)."""
        loop = self._loop
        if loop is None or (not self._dirty and not self._subs):
            return
        try:
            running = asyncio.get_running_loop()
        except RuntimeError:
            running = None
        if running is loop:
            self._on_events(events)
        else:
            loop.call_soon_threadsafe(self._on_events, events)

    def _paused(self, sub: _Sub) -> bool:
        """Graph pauses change notifications of a subscription whose reauthorization challenge is not answered;
        changes meanwhile are lost (the app catches up with delta)."""
        grace = self.config.reauthorize_pause_after_s
        return sub.paused_since is not None and grace is not None and time.time() - sub.paused_since >= grace

    def _on_events(self, events: list[ChangeEvent]) -> None:
        now_dt = now_utc()
        for ev in events:
            for sub in self._current().get(ev.user_id, ()):
                if sub.expires <= now_dt:
                    continue
                if self._paused(sub):
                    self.paused_dropped += 1
                    continue
                kind = ev.kind
                if sub.folder_id is None:
                    if ev.move and sub.immutable:
                        if ev.kind != "created":
                            continue
                        kind = "updated"  # same id, another folder: an update of the mailbox item
                elif ev.folder_id != sub.folder_id:
                    continue
                if kind not in sub.kinds:
                    continue
                if sub.matcher is not None and kind != "deleted":
                    row = self.store.get_message_by_iid(ev.iid)
                    if row is None or not sub.matcher(row.data):
                        continue
                mid = ev.iid if sub.immutable else ev.rid
                self._enqueue_change(sub, self.change_item(sub.raw, kind, mid, ev.change_key))
        if self._wake is not None:
            self._wake.set()

    def change_item(self, sub: dict[str, Any], kind: str, message_id: str, change_key: str) -> dict[str, Any]:
        resource = f"Users/{sub['_userId']}/Messages/{message_id}"
        return {
            "id": uuid.uuid4().hex[:13],
            "subscriptionId": sub["id"],
            "subscriptionExpirationDateTime": sub["expirationDateTime"],
            "clientState": sub.get("clientState"),
            "changeType": kind,
            "resource": resource,
            "tenantId": self.config.tenant_id,
            "resourceData": {"@odata.type": "#Microsoft.Graph.Message", "@odata.id": resource,
                             "@odata.etag": f'W/"{change_key}"', "id": message_id},
        }

    def lifecycle_item(self, sub: dict[str, Any], event: str) -> dict[str, Any]:
        return {"subscriptionId": sub["id"], "subscriptionExpirationDateTime": sub["expirationDateTime"],
                "tenantId": self.config.tenant_id, "clientState": sub.get("clientState"), "lifecycleEvent": event}

    def _push(self, pending: _Pending) -> None:
        heapq.heappush(self._heap, pending)

    def _enqueue_change(self, sub: _Sub, item: dict[str, Any]) -> None:
        now = time.monotonic()
        due = now
        fault = self.faults.pick()
        copies = 1
        if fault is not None:
            if fault.action == "drop":
                log.info("notification fault: dropped one for subscription %s", sub.id)
                if sub.lifecycle_url:
                    self._missed_due.setdefault(sub.id, now + self.config.missed_after_s)
                return
            if fault.action == "duplicate":
                copies = 2
            elif fault.action == "delay":
                due = now + fault.delay_ms / 1000.0
            elif fault.action == "reorder":
                # held back so that notifications queued after it overtake it
                due = now + (fault.delay_ms or 300) / 1000.0
        for _ in range(copies):
            self._push(_Pending(due, next(_seq), sub.url, item, sub.id, first_at=now))

    def fire_lifecycle(self, sub: dict[str, Any], event: str) -> bool:
        """Queue one lifecycle notification (thread-safe); False if the subscription has no lifecycle URL."""
        url = sub.get("lifecycleNotificationUrl")
        if not url:
            return False
        item = self.lifecycle_item(sub, event)

        def push() -> None:
            now = time.monotonic()
            self._push(_Pending(now, next(_seq), url, item, sub["id"], lifecycle=True, first_at=now))
            if self._wake is not None:
                self._wake.set()

        loop = self._loop
        if loop is None:
            return False
        try:
            running = asyncio.get_running_loop()
        except RuntimeError:
            running = None
        if running is loop:
            push()
        else:
            loop.call_soon_threadsafe(push)
        return True

    # -- dispatcher ----------------------------------------------------------------------------
    async def _dispatch(self) -> None:
        assert self._wake is not None
        while True:
            now = time.monotonic()
            groups: dict[str, list[_Pending]] = {}
            deferred: list[_Pending] = []
            while self._heap and self._heap[0].due <= now:
                p = heapq.heappop(self._heap)
                if self._inflight.get(p.url, 0) >= self.config.notification_concurrency_per_url:
                    deferred.append(p)
                    continue
                group = groups.setdefault(p.url, [])
                if len(group) >= self.config.notification_batch_max:
                    deferred.append(p)
                    continue
                group.append(p)
            for url, batch in groups.items():
                self._inflight[url] = self._inflight.get(url, 0) + 1
                task = asyncio.create_task(self._post(url, batch))
                self._posts.add(task)  # keep a reference until done (the loop holds only weak ones)
                task.add_done_callback(self._posts.discard)
            for p in deferred:
                self._push(p)
            timeout = 1.0
            if deferred:
                timeout = 0.005
            elif self._heap:
                timeout = max(0.0, min(1.0, self._heap[0].due - time.monotonic()))
            self._wake.clear()
            try:
                await asyncio.wait_for(self._wake.wait(), timeout)
            except TimeoutError:
                pass

    def _slow_verdict(self, url: str) -> str:
        """"ok", "throttled" or "dropped" for a notification URL (change-notifications-delivery-webhooks
        #throttling); always "ok" unless ``slow_endpoint_throttling`` is on."""
        if not self.config.slow_endpoint_throttling:
            return "ok"
        stats = self._slow.get(url)
        if stats is None or stats.total < self.config.slow_min_notifications:
            return "ok"
        ratio = stats.slow / stats.total
        if ratio >= self.config.slow_drop_ratio:
            return "dropped"
        return "throttled" if ratio >= self.config.slow_throttle_ratio else "ok"

    def _record_answer(self, url: str, elapsed_ms: float, count: int) -> None:
        if not self.config.slow_endpoint_throttling:
            return
        now = time.monotonic()
        stats = self._slow.get(url)
        if stats is None or now - stats.since >= self.config.slow_window_s:
            stats = self._slow[url] = _SlowStats(now)
        stats.total += count
        if elapsed_ms > self.config.slow_notification_ms:
            stats.slow += count

    async def _post(self, url: str, batch: list[_Pending]) -> None:
        ok = False
        status: int | str = "-"
        verdict = self._slow_verdict(url)
        if verdict == "dropped":
            # Graph drops notifications for an endpoint at >= 15 % slow answers; the app learns it from `missed`
            self._inflight[url] = self._inflight.get(url, 1) - 1
            now = time.monotonic()
            for p in batch:
                if not p.lifecycle:
                    self.slow_dropped += 1
                    self._missed_due.setdefault(p.sub_id, now + self.config.missed_after_s)
            log.info("slow endpoint %s throttled: %d notification(s) dropped", urlsplit(url).netloc, len(batch))
            return
        if verdict == "throttled" and not any(p.attempts or p.throttled for p in batch):
            # flagged endpoint: every notification is delayed by 10 minutes (slow_delay_s)
            self._inflight[url] = self._inflight.get(url, 1) - 1
            for p in batch:
                p.throttled = True
                p.due = time.monotonic() + self.config.slow_delay_s
                p.seq = next(_seq)
                self._push(p)
            return
        started = time.monotonic()
        try:
            assert self._client is not None
            self.attempts += 1
            resp = await self._client.post(url, json={"value": [p.item for p in batch]},
                                           timeout=self.config.notification_timeout_s)
            status = resp.status_code
            ok = 200 <= resp.status_code < 300
        except Exception as exc:  # timeouts, refused connections: all retried
            status = type(exc).__name__
        finally:
            self._inflight[url] = self._inflight.get(url, 1) - 1
        self._record_answer(url, (time.monotonic() - started) * 1000.0, len(batch))
        if ok:
            self.delivered += len(batch)
            return
        now = time.monotonic()
        log.info("notification POST to %s failed (%s); %d item(s) retried", urlsplit(url).netloc, status, len(batch))
        for p in batch:
            p.attempts += 1
            if now - p.first_at > self.config.notification_retry_window_s:
                log.warning("giving up on a notification for subscription %s after %d attempts", p.sub_id, p.attempts)
                if not p.lifecycle:
                    self._missed_due.setdefault(p.sub_id, now)
                continue
            delay = min(self.config.notification_retry_max_s,
                        self.config.notification_retry_base_s * (2 ** (p.attempts - 1)))
            p.due = now + delay
            p.seq = next(_seq)
            self._push(p)
        if self._wake is not None:
            self._wake.set()

    # -- sweeper -------------------------------------------------------------------------------
    async def _sweep(self) -> None:
        last_delta_gc = time.monotonic()
        while True:
            await asyncio.sleep(self.config.sweep_interval_s)
            try:
                self.sweep_once()
                if time.monotonic() - last_delta_gc > 60:
                    last_delta_gc = time.monotonic()
                    self.store.expire_delta_states(self.config.delta_token_ttl_s)
            except Exception:
                log.exception("subscription sweep failed")

    def _challenge_due(self, sub: dict[str, Any], now: float) -> bool:
        """Is a ``reauthorizationRequired`` due for this stored subscription? Marks it sent when it is."""
        before = self.config.reauthorize_before_s
        if before is not None and not sub.get("_reauthNotified") and \
                (parse_dt(sub["expirationDateTime"]) - now_utc()).total_seconds() <= before:
            sub["_reauthNotified"] = True
            sub["_challengedSince"] = sub.get("_challengedSince") or now
            sub["_challengedAt"] = now
            return True
        interval = self.config.reauthorize_interval_s
        if interval is None:
            return False
        last = sub.get("_challengedAt")
        due = (float(sub.get("_authorizedAt") or now) + interval if last is None
               else float(last) + self.config.reauthorize_repeat_s)
        if now < due:
            return False
        sub["_challengedSince"] = sub.get("_challengedSince") or now
        sub["_challengedAt"] = now
        return True

    def sweep_once(self) -> None:
        now_dt = now_utc()
        changed = False
        for subs in list(self._current().values()):
            for sub in subs:
                if sub.expires <= now_dt:
                    # "If you don't renew a subscription in time, Microsoft Graph deletes the subscription": no
                    # lifecycle event is documented for plain expiry, so none is sent.
                    self.store.delete_subscription(sub.id)
                    changed = True
                    continue
                now = time.time()
                if not self._challenge_due(dict(sub.raw), now):  # cheap check on the cached copy, nothing saved
                    continue
                # decided again on the stored record, atomically: the API may have renewed it a moment ago
                fire: list[bool] = []
                stored = self.store.update_subscription(
                    sub.id, lambda s, fire=fire, now=now: fire.append(self._challenge_due(s, now)) or fire[-1])
                if stored is not None and fire and fire[0]:
                    self.fire_lifecycle(stored, "reauthorizationRequired")
                    changed = True
        now = time.monotonic()
        for sub_id, due in list(self._missed_due.items()):
            if due <= now:
                del self._missed_due[sub_id]
                stored = self.store.get_subscription(sub_id)
                if stored is not None:
                    self.fire_lifecycle(stored, "missed")
        if changed:
            self.invalidate()

    def pending_count(self) -> int:
        return len(self._heap)
