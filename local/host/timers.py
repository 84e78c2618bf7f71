"""Timer triggers: fire on the schedule, never overlap one function with itself, flag late runs.

Like the host's TimerListener: the next occurrence is computed after each run; if a run (or a busy
machine) made the host miss occurrences, the function runs once, at once, with ``past_due=True``,
and the schedule resumes from now (missed occurrences are not replayed). ``useMonitor`` is ignored:
there is no schedule monitor storage locally, so occurrences missed while the host was down are not
detected.
"""

from __future__ import annotations

import asyncio
import datetime as dt
import logging

from azure.functions.timer import TimerRequest

from .discovery import FunctionSpec, TimerTriggerSpec
from .invoke import InvocationResult, Invoker

__all__ = ["PAST_DUE_TOLERANCE", "TimerRunner"]

log = logging.getLogger("Host.Timers")

PAST_DUE_TOLERANCE = 1.0  # seconds late before an occurrence counts as past due


def _now() -> dt.datetime:
    return dt.datetime.now(dt.UTC)


class TimerRunner:
    def __init__(self, spec: FunctionSpec, invoker: Invoker) -> None:
        assert isinstance(spec.trigger, TimerTriggerSpec)
        self.spec = spec
        self.trigger: TimerTriggerSpec = spec.trigger
        self._invoker = invoker
        self._lock = asyncio.Lock()  # no overlap, also with "run now" from the admin API
        self._stopping = asyncio.Event()
        self._task: asyncio.Task[None] | None = None
        self._current: asyncio.Task[InvocationResult] | None = None
        self._last: dt.datetime | None = None

    def start(self) -> None:
        self._task = asyncio.create_task(self._loop(), name=f"timer:{self.spec.name}")
        self._task.add_done_callback(self._crashed)

    def _crashed(self, task: asyncio.Task[None]) -> None:
        if not task.cancelled() and task.exception() is not None:
            log.error("Timer '%s' stopped: %s", self.spec.name, task.exception(), exc_info=task.exception())

    def stop(self) -> None:
        self._stopping.set()

    async def drain(self, deadline: float) -> None:
        loop = asyncio.get_running_loop()
        if self._task is None:
            return
        done, _ = await asyncio.wait({self._task}, timeout=max(0.0, deadline - loop.time()))
        if not done:
            self._task.cancel()
            await asyncio.gather(self._task, return_exceptions=True)

    async def run_now(self) -> InvocationResult:
        """Invoke outside the schedule (admin API), waiting for a running occurrence to end first."""
        reason = "This function was programmatically called via the host APIs."
        return await self._fire(_now(), past_due=False, reason=reason)

    async def _loop(self) -> None:
        schedule = self.trigger.schedule
        log.info("The next 5 occurrences of '%s' (%s): %s", self.spec.name, schedule.expression, self._preview())
        if self.trigger.run_on_startup:
            await self._fire(_now(), past_due=False, reason="Timer fired at startup (runOnStartup)")
        base = _now()
        while not self._stopping.is_set():
            due = schedule.next_after(base)
            wait = (due - _now()).total_seconds()
            if wait > 0:
                try:
                    await asyncio.wait_for(self._stopping.wait(), wait)
                    break  # stopping
                except TimeoutError:
                    pass
            past_due = (_now() - due).total_seconds() > PAST_DUE_TOLERANCE
            await self._fire(due, past_due=past_due, reason=f"Timer fired at {_now().isoformat()}")
            # A late occurrence runs once; the ones missed meanwhile are skipped, not replayed. The
            # next loop turn fires the following occurrence late (past_due) if this run overran it.
            base = _now() if past_due else due

    def _preview(self) -> str:
        out, moment = [], _now()
        for _ in range(5):
            moment = self.trigger.schedule.next_after(moment)
            out.append(moment.isoformat(timespec="seconds"))
        return ", ".join(out)

    async def _fire(self, scheduled: dt.datetime, *, past_due: bool, reason: str) -> InvocationResult:
        async with self._lock:
            nxt = self.trigger.schedule.next_after(max(scheduled, _now()))
            # The concrete class the worker's converter builds (func.TimerRequest is the abstract one).
            request = TimerRequest(
                past_due=past_due,
                schedule_status={
                    "Last": (self._last or scheduled).isoformat(),
                    "Next": nxt.isoformat(),
                    "LastUpdated": _now().isoformat(),
                },
                schedule={"AdjustForDST": True},
            )
            self._last = scheduled
            return await self._invoker.invoke(self.spec, request, reason=reason)
