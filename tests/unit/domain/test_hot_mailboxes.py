"""The hot-mailbox switch: per (mailbox, folder) notification rate, coalesced delta requests, bounded memory."""

from core.domain.hot_mailboxes import HotMailboxes


def test_below_the_threshold_every_notification_is_fetched() -> None:
    hot = HotMailboxes(threshold=3)
    assert [hot.route("sink@x.com", "inbox", t) for t in (0.0, 1.0, 2.0)] == ["fetch"] * 3
    assert not hot.is_hot("sink@x.com", "inbox", 2.0)


def test_past_the_threshold_one_delta_request_covers_its_window() -> None:
    hot = HotMailboxes(threshold=3, delay_s=10)
    routes = [hot.route("Sink@x.com", "inbox", t) for t in (0.0, 1.0, 2.0, 3.0)]
    assert routes == ["fetch", "fetch", "fetch", "delta"]
    hot.scheduled("sink@x.com", "inbox", 3.0)  # visible at 13.0
    assert hot.route("sink@x.com", "INBOX", 12.9) == "covered"  # its round starts after this message arrived
    assert hot.route("sink@x.com", "inbox", 13.0) == "delta"  # the request may already be running: a new one
    assert hot.is_hot("sink@x.com", "inbox", 13.0)


def test_an_unscheduled_delta_is_asked_for_again() -> None:
    """A failed enqueue never calls ``scheduled``: the redelivered notification must not count as covered."""
    hot = HotMailboxes(threshold=1)
    assert [hot.route("a@x.com", "inbox", t) for t in (0.0, 0.5, 0.6)] == ["fetch", "delta", "delta"]


def test_the_rate_is_per_minute_and_per_folder() -> None:
    hot = HotMailboxes(threshold=2)
    assert [hot.route("a@x.com", "inbox", t) for t in (0.0, 30.0, 61.0)] == ["fetch"] * 3  # 3 in 61 s: 2/min
    assert hot.route("a@x.com", "inbox", 62.0) == "delta"  # 30, 61, 62: 3 within a minute
    assert hot.route("a@x.com", "sentitems", 62.0) == "fetch"
    assert hot.route("b@x.com", "inbox", 62.0) == "fetch"


def test_zero_switches_it_off_and_memory_is_bounded() -> None:
    off = HotMailboxes(threshold=0)
    assert all(off.route("a@x.com", "inbox", t / 100) == "fetch" for t in range(1000))
    hot = HotMailboxes(threshold=5, max_keys=100)
    for n in range(1000):
        hot.route(f"user{n}@x.com", "inbox", float(n))
        hot.scheduled(f"user{n}@x.com", "inbox", float(n))
    assert len(hot._seen) == 100 and len(hot._visible_at) <= 100
    assert all(len(times) <= 6 for times in hot._seen.values())
