"""Timer schedules: 6-field NCRONTAB (seconds first) and TimeSpan intervals, as the host accepts them.

Times are UTC unless WEBSITE_TIME_ZONE names an IANA zone (the Linux host's convention).
"""

from __future__ import annotations

import datetime as dt
import os
import re
from dataclasses import dataclass
from zoneinfo import ZoneInfo, ZoneInfoNotFoundError

from croniter import croniter

from .config import HostConfigError, parse_timespan

__all__ = ["Schedule", "ScheduleError", "parse_schedule"]


class ScheduleError(ValueError):
    pass


def _zone() -> dt.tzinfo:
    name = os.environ.get("WEBSITE_TIME_ZONE")
    if not name:
        return dt.UTC
    try:
        return ZoneInfo(name)
    except (ZoneInfoNotFoundError, ValueError) as exc:
        raise ScheduleError(f"WEBSITE_TIME_ZONE={name!r} is not an IANA time zone") from exc


@dataclass(frozen=True)
class Schedule:
    expression: str
    interval: float | None  # TimeSpan schedules: fixed interval in seconds

    def next_after(self, moment: dt.datetime) -> dt.datetime:
        """The first occurrence strictly after ``moment`` (aware datetime)."""
        if self.interval is not None:
            return moment + dt.timedelta(seconds=self.interval)
        local = moment.astimezone(_zone())
        # second_at_beginning: NCRONTAB puts seconds first; croniter's 6-field default puts them last.
        it = croniter(self.expression, local, second_at_beginning=True)
        nxt: dt.datetime = it.get_next(dt.datetime)
        return nxt.astimezone(dt.UTC)


_SPAN_LIKE = re.compile(r"^\d+(\.\d+)?:|^\d+:\d")


def parse_schedule(expression: str) -> Schedule:
    text = expression.strip()
    if _SPAN_LIKE.match(text):
        try:
            seconds = parse_timespan(text)
        except HostConfigError as exc:
            raise ScheduleError(str(exc)) from exc
        if seconds <= 0:
            raise ScheduleError(f"timer interval must be positive: {expression!r}")
        return Schedule(text, seconds)
    fields = text.split()
    if len(fields) != 6:
        raise ScheduleError(
            f"'{expression}' is not a valid NCRONTAB expression for the Functions host: "
            f"6 fields expected ({{second}} {{minute}} {{hour}} {{day}} {{month}} {{day-of-week}}), got {len(fields)}"
        )
    if not croniter.is_valid(text, second_at_beginning=True):
        raise ScheduleError(f"'{expression}' is not a valid NCRONTAB expression")
    return Schedule(text, None)
