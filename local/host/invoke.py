"""Invoke one function: bind parameters by binding name, run it, collect outputs, log like the host.

Async functions run on the host's event loop (so they run concurrently); sync functions run in a
thread pool, as the Python worker does by default. Output bindings are written only when the
function succeeds, as the real host does; a failed output write fails the invocation.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import contextvars
import functools
import logging
import threading
import time
import uuid
from collections.abc import Awaitable, Callable, Mapping
from dataclasses import dataclass
from typing import Any

import azure.functions as func

from .discovery import FunctionSpec, OutputSpec

__all__ = ["FunctionTimeoutError", "InvocationResult", "Invoker", "OutValue", "current_invocation_id"]

current_invocation_id: contextvars.ContextVar[str | None] = contextvars.ContextVar("invocation_id", default=None)

OutputWriter = Callable[[OutputSpec, Any], Awaitable[None]]


class FunctionTimeoutError(TimeoutError):
    pass


class OutValue(func.Out[Any]):
    """What the worker passes for a ``func.Out[...]`` parameter."""

    def __init__(self) -> None:
        self._value: Any = None
        self._set = False

    def set(self, val: Any) -> None:
        self._value = val
        self._set = True

    def get(self) -> Any:
        return self._value


class _TraceContext:
    # Duck-typed: the library keeps TraceContext/RetryContext private (azure.functions._abc).
    def __init__(self, invocation_id: str) -> None:
        # W3C traceparent with the invocation id as trace id, so logs can be correlated.
        self._parent = f"00-{invocation_id.replace('-', '')}-{uuid.uuid4().hex[:16]}-01"

    @property
    def trace_state(self) -> str:
        return ""

    @property
    def trace_parent(self) -> str:
        return self._parent

    @property
    def attributes(self) -> dict[str, str]:
        return {}


class _RetryContext:
    def __init__(self, retry_count: int, max_retry_count: int) -> None:
        self._count, self._max = retry_count, max_retry_count

    @property
    def retry_count(self) -> int:
        return self._count

    @property
    def max_retry_count(self) -> int:
        return self._max

    @property
    def exception(self) -> Any:
        return None


class InvocationContext(func.Context):
    _tls = threading.local()

    def __init__(self, invocation_id: str, function_name: str, function_directory: str) -> None:
        self._id, self._name, self._dir = invocation_id, function_name, function_directory
        self._trace = _TraceContext(invocation_id)
        self._retry = _RetryContext(0, 0)

    @property
    def invocation_id(self) -> str:
        return self._id

    @property
    def thread_local_storage(self) -> Any:
        return self._tls

    @property
    def function_name(self) -> str:
        return self._name

    @property
    def function_directory(self) -> str:
        return self._dir

    @property
    def trace_context(self) -> Any:
        return self._trace

    @property
    def retry_context(self) -> Any:
        return self._retry


@dataclass
class InvocationResult:
    invocation_id: str
    succeeded: bool
    return_value: Any = None
    outputs: Mapping[str, Any] | None = None
    error: BaseException | None = None
    duration_ms: float = 0.0


class Invoker:
    def __init__(
        self,
        *,
        script_root: str,
        write_output: OutputWriter,
        function_timeout: float | None,
        max_threads: int | None = None,
    ) -> None:
        self._script_root = script_root
        self._write_output = write_output
        self._timeout = function_timeout
        self._pool = concurrent.futures.ThreadPoolExecutor(max_workers=max_threads, thread_name_prefix="fn")
        self.in_flight = 0

    def shutdown(self) -> None:
        # Do not wait: a sync function past the grace period must not hold the process (the real host
        # would kill the worker process too).
        self._pool.shutdown(wait=False, cancel_futures=True)

    async def invoke(
        self,
        spec: FunctionSpec,
        trigger_value: Any,
        *,
        reason: str,
        invocation_id: str | None = None,
    ) -> InvocationResult:
        inv_id = invocation_id or str(uuid.uuid4())
        log = logging.getLogger(f"Function.{spec.name}")
        log.info("Executing 'Functions.%s' (Reason='%s', Id=%s)", spec.name, reason, inv_id)
        token = current_invocation_id.set(inv_id)
        started = time.perf_counter()
        self.in_flight += 1
        try:
            kwargs, outs = self._bind(spec, trigger_value, inv_id)
            value = await self._run(spec, kwargs, inv_id)
            outputs: dict[str, Any] = {name: o.get() for name, o in outs.items() if o._set}
            if value is not None:
                outputs["$return"] = value
            for out in spec.outputs:
                if out.type == "queue" and out.name in outputs and outputs[out.name] is not None:
                    await self._write_output(out, outputs[out.name])
        except asyncio.CancelledError:
            duration = (time.perf_counter() - started) * 1000
            log.warning("Executed 'Functions.%s' (Cancelled, Id=%s, Duration=%dms)", spec.name, inv_id, duration)
            raise
        except Exception as exc:
            duration = (time.perf_counter() - started) * 1000
            log.error(
                "Executed 'Functions.%s' (Failed, Id=%s, Duration=%dms) %s",
                spec.name, inv_id, duration, type(exc).__name__,
            )
            # The traceback helps local debugging; the real host logs it at Error as well. The app
            # is responsible for keeping bodies and secrets out of its exception messages.
            log.error("Exception while executing function: Functions.%s", spec.name, exc_info=exc)
            return InvocationResult(inv_id, False, error=exc, duration_ms=duration)
        finally:
            self.in_flight -= 1
            current_invocation_id.reset(token)
        duration = (time.perf_counter() - started) * 1000
        log.info("Executed 'Functions.%s' (Succeeded, Id=%s, Duration=%dms)", spec.name, inv_id, duration)
        return InvocationResult(inv_id, True, return_value=value, outputs=outputs, duration_ms=duration)

    def _bind(self, spec: FunctionSpec, trigger_value: Any, inv_id: str) -> tuple[dict[str, Any], dict[str, OutValue]]:
        kwargs: dict[str, Any] = {}
        outs: dict[str, OutValue] = {}
        output_names = {o.name for o in spec.outputs}
        for p in spec.parameters:
            if p.name == spec.trigger_param:
                kwargs[p.name] = _convert_trigger(trigger_value, p.annotation)
            elif p.name in output_names:
                outs[p.name] = kwargs[p.name] = OutValue()
            elif p.name == "context":
                kwargs[p.name] = InvocationContext(inv_id, spec.name, self._script_root)
        return kwargs, outs

    async def _run(self, spec: FunctionSpec, kwargs: dict[str, Any], inv_id: str) -> Any:
        if spec.is_async:
            awaitable: Awaitable[Any] = spec.user_function(**kwargs)
        else:
            loop = asyncio.get_running_loop()
            ctx = contextvars.copy_context()
            call = functools.partial(_call_in_thread, spec.user_function, kwargs, inv_id)
            awaitable = loop.run_in_executor(self._pool, ctx.run, call)
        if self._timeout is None:
            return await awaitable
        try:
            return await asyncio.wait_for(awaitable, self._timeout)
        except TimeoutError as exc:
            raise FunctionTimeoutError(
                f"Timeout value of {self._timeout:g}s exceeded by function 'Functions.{spec.name}'"
            ) from exc


def _call_in_thread(fn: Callable[..., Any], kwargs: dict[str, Any], inv_id: str) -> Any:
    # The worker exposes the invocation id to user threads through context.thread_local_storage.
    InvocationContext._tls.invocation_id = inv_id
    try:
        return fn(**kwargs)
    finally:
        InvocationContext._tls.invocation_id = None


def _convert_trigger(value: Any, annotation: Any) -> Any:
    """Hand the trigger value over in the type the parameter asks for, as the worker's converters do."""
    if annotation is str or annotation == "str":
        if isinstance(value, func.QueueMessage):
            return value.get_body().decode("utf-8")
        if isinstance(value, func.HttpRequest):
            return value.get_body().decode("utf-8")
    if annotation is bytes or annotation == "bytes":
        if isinstance(value, func.QueueMessage | func.HttpRequest):
            return value.get_body()
    return value
