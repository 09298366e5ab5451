"""Synchronous client for the emulator's admin API (``/_fleetbench/``).

The harness side reads the endpoint's observations, moves its clock and sets hook
targets through this client, whether the emulator runs in-process, in another
process or in a container. Standard library only (urllib), proxies ignored: the
admin API is always reached directly.
"""

from __future__ import annotations

import json
import urllib.error
import urllib.parse
import urllib.request
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from enum import Enum
from typing import TYPE_CHECKING, Any

from harness.emulator.controlplane import API_TOKEN_HEADER
from harness.observations import Observation

if TYPE_CHECKING:
    from harness.emulator.faults import FaultPlan


class AdminApiError(Exception):
    """The admin API answered an error (same shape as AWS's REST errors)."""

    def __init__(self, status: int, code: str, message: str) -> None:
        super().__init__(f"{status} {code}: {message}")
        self.status = status
        self.code = code
        self.message = message


@dataclass(frozen=True)
class EventsPage:
    """Observations in ``seq`` order; pass ``last_seq`` as the next ``since``."""

    events: list[Observation]
    last_seq: int


@dataclass(frozen=True)
class ClockReading:
    now: float
    offset: float


class AdminClient:
    """``AdminClient(api_url).events(client_id=..., kinds=[...], wait=5.0)`` and friends."""

    def __init__(self, api_url: str, *, api_token: str | None = None,
                 timeout: float = 10.0) -> None:
        self.base = api_url.rstrip("/") + "/_fleetbench"
        self.timeout = timeout
        self._headers = {API_TOKEN_HEADER: api_token} if api_token else {}
        self._opener = urllib.request.build_opener(urllib.request.ProxyHandler({}))

    def events_page(
        self,
        *,
        client_id: str | None = None,
        certificate_id: str | None = None,
        kinds: Iterable[str | Enum] | None = None,
        since: int | None = None,
        wait: float | None = None,
        limit: int | None = None,
    ) -> EventsPage:
        """Matching observations; with ``wait``, block up to that long for a first match."""
        query: dict[str, Any] = {
            "clientId": client_id,
            "certificateId": certificate_id,
            "kind": ",".join(k.value if isinstance(k, Enum) else k for k in kinds)
            if kinds is not None else None,
            "since": since,
            "wait": wait,
            "limit": limit,
        }
        doc = self._call("GET", "/events", query=query, extra_timeout=wait or 0.0)
        return EventsPage([Observation.from_dict(e) for e in doc["events"]], int(doc["lastSeq"]))

    def events(
        self,
        *,
        client_id: str | None = None,
        certificate_id: str | None = None,
        kinds: Iterable[str | Enum] | None = None,
        since: int | None = None,
        wait: float | None = None,
        limit: int | None = None,
    ) -> list[Observation]:
        return self.events_page(client_id=client_id, certificate_id=certificate_id, kinds=kinds,
                                since=since, wait=wait, limit=limit).events

    def clock(self) -> ClockReading:
        return _reading(self._call("GET", "/clock"))

    def advance(self, seconds: float) -> ClockReading:
        """Move the emulated clock forward (expiries take effect at once)."""
        return _reading(self._call("POST", "/clock", body={"advance": seconds}))

    def hooks(self) -> dict[str, str]:
        return dict(self._call("GET", "/hooks")["hooks"])

    def set_hooks(self, mapping: Mapping[str, str]) -> dict[str, str]:
        """Replace the Lambda-ARN → target mapping; returns the mapping now in force."""
        return dict(self._call("PUT", "/hooks", body={"hooks": dict(mapping)})["hooks"])

    def reset(self) -> None:
        """Empty the emulated account."""
        self._call("POST", "/reset")

    # -- faults and quotas (issue 10; docs/faults-and-quotas.md) ------------------------------
    def faults(self) -> dict[str, Any]:
        """The plan in force and per-rule counters: ``{"plan": {...}, "rules": [{"index",
        "rule", "matched", "applied"}]}``."""
        return self._call("GET", "/faults")

    def set_faults(self, plan: Mapping[str, Any] | FaultPlan) -> dict[str, Any]:
        """Replace the fault plan (its YAML structure as a dict, or a ``FaultPlan``);
        counters and random draws start afresh. A bad plan raises :class:`AdminApiError`
        (400) naming the key."""
        body = dict(plan) if isinstance(plan, Mapping) else plan.to_wire()
        return self._call("PUT", "/faults", body=body)

    def clear_faults(self) -> dict[str, Any]:
        """Remove every fault rule."""
        return self._call("DELETE", "/faults")

    def quotas(self) -> dict[str, str]:
        """Quotas in force, by API name: ``{"RegisterThing": "10/s", ...}``."""
        return dict(self._call("GET", "/quotas")["quotas"])

    def set_quotas(self, quotas: Mapping[str, str] | None = None, *,
                   preset: str | None = None) -> dict[str, str]:
        """Replace every quota: ``preset`` (``"aws"`` or ``"none"``) then ``quotas``
        (``{"RegisterThing": "5/s", "Connect": "off"}``) on top. ``set_quotas()`` removes
        them all. Returns the quotas now in force."""
        body = {"preset": preset, "quotas": dict(quotas or {})}
        return dict(self._call("PUT", "/quotas", body=body)["quotas"])

    def _call(self, method: str, path: str, *, query: Mapping[str, Any] | None = None,
              body: Any = None, extra_timeout: float = 0.0) -> dict[str, Any]:
        url = self.base + path
        if query:
            present = {k: v for k, v in query.items() if v is not None}
            if present:
                url += "?" + urllib.parse.urlencode(present)
        data = None if body is None else json.dumps(body).encode()
        headers = dict(self._headers)
        if data is not None:
            headers["Content-Type"] = "application/json"
        request = urllib.request.Request(url, data=data, headers=headers, method=method)
        try:
            with self._opener.open(request, timeout=self.timeout + extra_timeout) as response:
                return dict(json.loads(response.read() or b"{}"))
        except urllib.error.HTTPError as exc:
            raise _api_error(exc) from None


def _reading(doc: Mapping[str, Any]) -> ClockReading:
    return ClockReading(now=float(doc["now"]), offset=float(doc["offset"]))


def _api_error(exc: urllib.error.HTTPError) -> AdminApiError:
    code = (exc.headers.get("x-amzn-ErrorType") or "").split(":", 1)[0] or str(exc.code)
    try:
        message = str(json.loads(exc.read()).get("message", ""))
    except (ValueError, AttributeError):
        message = exc.reason if isinstance(exc.reason, str) else ""
    return AdminApiError(exc.code, code, message)
