"""Emulator-only extensions under ``/_fleetbench/``: what AWS cannot do.

The event trace, the emulated clock, pre-provisioning hook targets and an account
reset. The prefix cannot collide with an AWS ``iot`` route, and these routes are
registered before the catch-all AWS dispatcher. Errors are raised as
:class:`harness.errors.AwsError` and rendered by the control plane's boundary
middleware, so they share AWS's error shape and its authentication.

Routes (JSON in and out):

* ``GET /_fleetbench/events?clientId=&certificateId=&kind=a,b&since=N&limit=N&wait=S``
  → ``{"events": [...], "lastSeq": N}``. ``since`` is an exclusive ``seq``;
  ``wait`` long-polls up to ``S`` seconds (at most :data:`MAX_WAIT_SECONDS`) until
  a matching event exists. Every matching event with ``seq <= lastSeq`` has been
  returned, so ``since=lastSeq`` on the next call misses nothing. Kinds are not
  checked against :class:`harness.observations.Kind`: other modules may record
  their own.
* ``GET /_fleetbench/clock`` and ``POST /_fleetbench/clock`` with
  ``{"advance": seconds}`` → ``{"now": epoch, "offset": seconds}``.
* ``GET /_fleetbench/hooks`` and ``PUT /_fleetbench/hooks`` with
  ``{"hooks": {lambdaArn: target}}`` (replaces the mapping) → ``{"hooks": {...}}``.
* ``POST /_fleetbench/reset`` → ``{}``; what it empties is the ``reset`` callable's
  business.
"""

from __future__ import annotations

import asyncio
import functools
import json
import math
from collections.abc import Callable, Mapping
from concurrent.futures import Executor
from dataclasses import dataclass
from typing import Any, TypeVar

from aiohttp import web

from harness.clock import Clock
from harness.errors import InvalidRequestException
from harness.observations import ObservationLog

PREFIX = "/_fleetbench"
#: Longest long-poll a client may ask for, in seconds.
MAX_WAIT_SECONDS = 300.0

T = TypeVar("T")
N = TypeVar("N", int, float)


@dataclass(frozen=True)
class AdminState:
    """What the admin routes act on; callables may block (they run in the executor)."""

    observations: ObservationLog
    clock: Clock
    get_hooks: Callable[[], Mapping[str, str]]
    set_hooks: Callable[[Mapping[str, str]], None]
    reset: Callable[[], None]
    #: More ``/_fleetbench/`` routes, each added by ``extension(app)`` after these ones
    #: (faults and quotas: :func:`harness.emulator.admin_faults.fault_routes`).
    extensions: tuple[Callable[[web.Application], None], ...] = ()


@dataclass
class _Runtime:
    state: AdminState
    executor: Executor | None
    #: Set on application shutdown so that long polls answer at once.
    closing: asyncio.Event


_RUNTIME = web.AppKey("fleetbench.admin", _Runtime)


def add_admin_routes(
    app: web.Application, state: AdminState, *, executor: Executor | None = None
) -> None:
    """Register the ``/_fleetbench/`` routes (call before any catch-all route)."""
    app[_RUNTIME] = _Runtime(state, executor, asyncio.Event())
    app.on_shutdown.append(_on_shutdown)
    app.router.add_get(f"{PREFIX}/events", _events)
    app.router.add_get(f"{PREFIX}/clock", _get_clock)
    app.router.add_post(f"{PREFIX}/clock", _advance_clock)
    app.router.add_get(f"{PREFIX}/hooks", _get_hooks)
    app.router.add_put(f"{PREFIX}/hooks", _put_hooks)
    app.router.add_post(f"{PREFIX}/reset", _reset)
    for extension in state.extensions:
        extension(app)


async def _on_shutdown(app: web.Application) -> None:
    app[_RUNTIME].closing.set()


async def _off_loop(runtime: _Runtime, func: Callable[..., T], *args: Any) -> T:
    loop = asyncio.get_running_loop()
    return await loop.run_in_executor(runtime.executor, functools.partial(func, *args))


def _number(query: Mapping[str, str], name: str, convert: Callable[[str], N]) -> N | None:
    """A non-negative number from the query string (None when absent)."""
    text = query.get(name)
    if not text:
        return None
    try:
        value = convert(text)
    except ValueError:
        raise InvalidRequestException(f"Query parameter '{name}' is not a number: {text}") \
            from None
    if not math.isfinite(value) or value < 0:
        raise InvalidRequestException(f"Query parameter '{name}' must be >= 0: {text}")
    return value


async def _json_body(request: web.Request) -> dict[str, Any]:
    try:
        doc = json.loads(await request.read())
    except (UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise InvalidRequestException(f"Could not parse request body into json: {exc}") \
            from None
    if not isinstance(doc, dict):
        raise InvalidRequestException("The request body must be a JSON object")
    return doc


async def _events(request: web.Request) -> web.Response:
    runtime = request.app[_RUNTIME]
    log = runtime.state.observations
    query = request.query
    kinds = [k for value in query.getall("kind", []) for k in value.split(",") if k] or None
    filters: dict[str, Any] = {
        "client_id": query.get("clientId"),
        "certificate_id": query.get("certificateId"),
        "kinds": kinds,
        "since": _number(query, "since", int),
    }
    limit = _number(query, "limit", int)
    wait = min(_number(query, "wait", float) or 0.0, MAX_WAIT_SECONDS)
    last_seq = log.last_seq  # read first: later entries are either returned or > lastSeq
    if wait > 0:
        found = await _wait(runtime, log, wait, filters)
    else:
        found = log.query(**filters)
    if limit is not None and len(found) > limit:
        found = found[:limit]
        last_seq = found[-1].seq if found else last_seq
    elif found:
        last_seq = max(last_seq, found[-1].seq)
    return web.json_response({"events": [o.to_dict() for o in found], "lastSeq": last_seq})


async def _wait(
    runtime: _Runtime, log: ObservationLog, timeout: float, filters: dict[str, Any]
) -> list[Any]:
    """``ObservationLog.wait`` that also ends when the application shuts down."""
    waiter = asyncio.ensure_future(log.wait(timeout=timeout, **filters))
    closing = asyncio.ensure_future(runtime.closing.wait())
    try:
        await asyncio.wait({waiter, closing}, return_when=asyncio.FIRST_COMPLETED)
    finally:
        closing.cancel()
        if not waiter.done():
            waiter.cancel()
    return waiter.result() if waiter.done() and not waiter.cancelled() else []


def _clock_body(clock: Clock) -> dict[str, float]:
    return {"now": clock.now(), "offset": clock.offset}


async def _get_clock(request: web.Request) -> web.Response:
    return web.json_response(_clock_body(request.app[_RUNTIME].state.clock))


async def _advance_clock(request: web.Request) -> web.Response:
    runtime = request.app[_RUNTIME]
    seconds = (await _json_body(request)).get("advance")
    if isinstance(seconds, bool) or not isinstance(seconds, (int, float)) \
            or not math.isfinite(seconds) or seconds < 0:
        raise InvalidRequestException(
            "'advance' must be a number of seconds >= 0 (the clock only moves forward)")
    # Listeners (expiry sweeps) may touch the registry: keep them off the loop.
    await _off_loop(runtime, runtime.state.clock.advance, float(seconds))
    return web.json_response(_clock_body(runtime.state.clock))


async def _get_hooks(request: web.Request) -> web.Response:
    runtime = request.app[_RUNTIME]
    hooks = await _off_loop(runtime, runtime.state.get_hooks)
    return web.json_response({"hooks": dict(hooks)})


async def _put_hooks(request: web.Request) -> web.Response:
    runtime = request.app[_RUNTIME]
    hooks = (await _json_body(request)).get("hooks")
    if not isinstance(hooks, dict) or not all(
        isinstance(k, str) and isinstance(v, str) for k, v in hooks.items()
    ):
        raise InvalidRequestException(
            "'hooks' must be an object mapping Lambda ARNs (strings) to targets (strings)")
    await _off_loop(runtime, runtime.state.set_hooks, hooks)
    current = await _off_loop(runtime, runtime.state.get_hooks)
    return web.json_response({"hooks": dict(current)})


async def _reset(request: web.Request) -> web.Response:
    runtime = request.app[_RUNTIME]
    await _off_loop(runtime, runtime.state.reset)
    return web.json_response({})
