"""Admin routes for fault plans and quotas (emulator-only, under ``/_fleetbench/``).

A scenario sets faults and quotas on a running emulator, wherever it runs, with the
same structures the command line and Python take (:mod:`.faults`, :mod:`.quotas`).
Errors are :class:`~harness.errors.AwsError` (400 ``InvalidRequestException`` naming the
offending key), rendered by the control plane's boundary like every admin error.

* ``GET /_fleetbench/faults`` → ``{"plan": {"seed": N, "rules": [...]}, "rules":
  [{"index", "rule", "matched", "applied"}]}``
* ``PUT /_fleetbench/faults`` with a plan (the YAML file's structure as JSON) replaces
  the plan; counters and random draws start afresh. Answers like ``GET``.
* ``DELETE /_fleetbench/faults`` removes every rule. Answers like ``GET``.
* ``GET /_fleetbench/quotas`` → ``{"quotas": {"RegisterThing": "10/s", ...}}``
* ``PUT /_fleetbench/quotas`` with ``{"preset": "aws"|"none"|null, "quotas": {name:
  "N/s" | "N/s,burst=M" | "off"}}`` replaces every quota (buckets start full). Answers
  like ``GET``.
"""

from __future__ import annotations

import json
from collections.abc import Callable
from typing import Any

from aiohttp import web

from harness.emulator.faults import FaultInjector, FaultPlan, FaultPlanError
from harness.emulator.quotas import PRESETS, QuotaEnforcer, QuotaSet, QuotaSpecError
from harness.errors import InvalidRequestException

PREFIX = "/_fleetbench"

_FAULTS = web.AppKey("fleetbench.faults", FaultInjector)
_QUOTAS = web.AppKey("fleetbench.quotas", QuotaEnforcer)


def fault_routes(faults: FaultInjector, quotas: QuotaEnforcer
                 ) -> Callable[[web.Application], None]:
    """An ``AdminState`` extension that adds the fault and quota routes."""

    def extend(app: web.Application) -> None:
        add_fault_routes(app, faults, quotas)

    return extend


def add_fault_routes(app: web.Application, faults: FaultInjector,
                     quotas: QuotaEnforcer) -> None:
    """Register the routes (before any catch-all route)."""
    app[_FAULTS] = faults
    app[_QUOTAS] = quotas
    app.router.add_get(f"{PREFIX}/faults", _get_faults)
    app.router.add_put(f"{PREFIX}/faults", _put_faults)
    app.router.add_delete(f"{PREFIX}/faults", _delete_faults)
    app.router.add_get(f"{PREFIX}/quotas", _get_quotas)
    app.router.add_put(f"{PREFIX}/quotas", _put_quotas)


async def _body(request: web.Request) -> Any:
    raw = await request.read()
    if not raw.strip():
        return None
    try:
        return json.loads(raw)
    except (UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise InvalidRequestException(f"Could not parse request body into json: {exc}") \
            from None


def _faults_body(faults: FaultInjector) -> dict[str, Any]:
    return {"plan": faults.plan.to_wire(),
            "rules": [c.to_wire() for c in faults.counters()]}


async def _get_faults(request: web.Request) -> web.Response:
    return web.json_response(_faults_body(request.app[_FAULTS]))


async def _put_faults(request: web.Request) -> web.Response:
    faults = request.app[_FAULTS]
    try:
        plan = FaultPlan.from_wire(await _body(request))
    except FaultPlanError as exc:
        raise InvalidRequestException(f"Invalid fault plan: {exc}") from None
    faults.set_plan(plan)
    return web.json_response(_faults_body(faults))


async def _delete_faults(request: web.Request) -> web.Response:
    faults = request.app[_FAULTS]
    faults.clear()
    return web.json_response(_faults_body(faults))


def _quotas_body(quotas: QuotaEnforcer) -> dict[str, Any]:
    return {"quotas": quotas.quotas.to_wire()}


async def _get_quotas(request: web.Request) -> web.Response:
    return web.json_response(_quotas_body(request.app[_QUOTAS]))


async def _put_quotas(request: web.Request) -> web.Response:
    quotas = request.app[_QUOTAS]
    doc = await _body(request) or {}
    if not isinstance(doc, dict):
        raise InvalidRequestException("The request body must be a JSON object")
    unknown = sorted(set(doc) - {"preset", "quotas"})
    if unknown:
        raise InvalidRequestException(
            f"Unknown key '{unknown[0]}'; expected 'preset' and 'quotas'")
    preset = doc.get("preset")
    entries = doc.get("quotas") or {}
    if preset is not None and preset not in PRESETS:
        raise InvalidRequestException(
            f"'preset' must be one of {', '.join(PRESETS)} or null, got {preset!r}")
    if not isinstance(entries, dict):
        raise InvalidRequestException("'quotas' must map API names to rates such as \"5/s\"")
    try:
        quota_set = QuotaSet.from_wire(entries, preset=preset)
    except QuotaSpecError as exc:
        raise InvalidRequestException(f"Invalid quota: {exc}") from None
    quotas.replace(quota_set)  # on the loop: the broker's settings change here too
    return web.json_response(_quotas_body(quotas))
