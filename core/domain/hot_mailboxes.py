"""Hot mailboxes: when one (mailbox, folder) sends more notifications than a threshold, stop fetching per notification.

Graph allows 4 concurrent requests and 10,000 requests per 10 minutes per app per mailbox (graph.md §8). A forward
sink or a busy shared mailbox concentrates many users' mail into one mailbox; one queue item (one GET, on any
instance) per notification then spreads that mailbox's requests over every instance, where no per-process limit
can keep them at 4. Past the threshold the webhook turns the mailbox's notifications into one delayed delta request
per coalescing window: the delta round runs under the mailbox's lease (one instance at a time) and works the
messages it finds itself, so the mailbox's Graph traffic comes from one place and one page lists up to 100 of them.

Pure bookkeeping with the time passed in (seconds, monotonic): the webhook service decides, this class remembers.
Bounded: at most ``threshold + 1`` timestamps per key and ``max_keys`` keys (the oldest key is forgotten first).
"""

from __future__ import annotations

from collections import OrderedDict, deque
from dataclasses import dataclass, field
from typing import Final, Literal

Route = Literal["fetch", "delta", "covered"]

WINDOW_S: Final = 60.0


@dataclass
class HotMailboxes:
    """Per-process view of the notification rate per (mailbox, folder).

    ``threshold``: notifications per minute above which the key is hot (0: never). ``delay_s``: how long a delta
    request waits before it becomes visible; notifications arriving before then are covered by it."""

    threshold: int
    delay_s: float = 10.0
    max_keys: int = 10_000
    _seen: OrderedDict[tuple[str, str], deque[float]] = field(default_factory=OrderedDict)
    _visible_at: dict[tuple[str, str], float] = field(default_factory=dict)

    @staticmethod
    def key(mailbox: str, folder: str) -> tuple[str, str]:
        return mailbox.lower(), folder.lower()

    def route(self, mailbox: str, folder: str, now: float) -> Route:
        """What to do with one notification for (mailbox, folder) arriving at ``now``.

        ``fetch``: the normal path (one inbound item). ``delta``: the key is hot and no delta request covers this
        moment: enqueue one, delayed by ``delay_s``, then call :meth:`scheduled`. ``covered``: a delta request
        already enqueued becomes visible after ``now``; its round starts after this message arrived and lists it."""
        if self.threshold <= 0:
            return "fetch"
        key = self.key(mailbox, folder)
        times = self._seen.get(key)
        if times is None:
            times = self._seen[key] = deque(maxlen=self.threshold + 1)
            while len(self._seen) > self.max_keys:
                old, _ = self._seen.popitem(last=False)
                self._visible_at.pop(old, None)
        else:
            self._seen.move_to_end(key)
        times.append(now)
        if len(times) <= self.threshold or now - times[0] > WINDOW_S:
            return "fetch"
        if self._visible_at.get(key, float("-inf")) > now:
            return "covered"
        return "delta"

    def scheduled(self, mailbox: str, folder: str, now: float) -> None:
        """A delta request for the key was enqueued at ``now`` (only after the queue took it: a failed enqueue makes
        the webhook answer 5xx and Graph redeliver, and the redelivery must not be counted as covered)."""
        self._visible_at[self.key(mailbox, folder)] = now + self.delay_s

    def is_hot(self, mailbox: str, folder: str, now: float) -> bool:
        times = self._seen.get(self.key(mailbox, folder))
        return bool(self.threshold > 0 and times and len(times) > self.threshold and now - times[0] <= WINDOW_S)
