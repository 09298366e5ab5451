"""What an endpoint observed: the record the harness judges a run from.

The emulator appends an :class:`Observation` for everything it does (connects
with the certificate id, subscribes, publishes, provisioning API requests and
responses, disconnects with the reason, applied faults). The same record shape
is served as JSON by the admin API (``GET /_fleetbench/events``) and rebuilt on
the harness side with :meth:`Observation.from_dict`, so scenarios read one type
whichever way they reached the log.
"""

from __future__ import annotations

import asyncio
import threading
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from enum import Enum
from typing import Any

from harness.clock import Clock


class Kind(str, Enum):
    """Kinds of observation (values are the wire names)."""

    TLS_FAILED = "tls_failed"
    CONNECT = "connect"
    CONNECT_FAILED = "connect_failed"
    DISCONNECT = "disconnect"
    SUBSCRIBE = "subscribe"
    UNSUBSCRIBE = "unsubscribe"
    PUBLISH = "publish"
    DELIVER_DENIED = "deliver_denied"
    API_REQUEST = "api_request"
    API_RESPONSE = "api_response"
    CERTIFICATE_CREATED = "certificate_created"
    CERTIFICATE_STATUS = "certificate_status"
    CERTIFICATE_DELETED = "certificate_deleted"
    THING_REGISTERED = "thing_registered"
    HOOK = "hook"
    KEY_POOL_EMPTY = "key_pool_empty"
    FAULT = "fault"
    THROTTLED = "throttled"
    PROTOCOL_ERROR = "protocol_error"
    CONTROL_PLANE = "control_plane"


@dataclass(frozen=True)
class Observation:
    """One thing the endpoint did. ``detail`` never holds keys or tokens."""

    seq: int
    timestamp: float
    kind: str
    client_id: str | None = None
    certificate_id: str | None = None
    detail: Mapping[str, Any] = field(default_factory=dict)

    def to_dict(self) -> dict[str, Any]:
        return {
            "seq": self.seq,
            "timestamp": self.timestamp,
            "kind": self.kind,
            "clientId": self.client_id,
            "certificateId": self.certificate_id,
            "detail": dict(self.detail),
        }

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> Observation:
        return cls(
            seq=int(data["seq"]),
            timestamp=float(data["timestamp"]),
            kind=str(data["kind"]),
            client_id=data.get("clientId"),
            certificate_id=data.get("certificateId"),
            detail=dict(data.get("detail") or {}),
        )


def matches(
    obs: Observation,
    *,
    client_id: str | None = None,
    certificate_id: str | None = None,
    kinds: Iterable[str] | None = None,
    since: int | None = None,
) -> bool:
    """Whether ``obs`` passes the filters (``since`` is an exclusive ``seq``)."""
    if since is not None and obs.seq <= since:
        return False
    if client_id is not None and obs.client_id != client_id:
        return False
    if certificate_id is not None and obs.certificate_id != certificate_id:
        return False
    return not (kinds is not None and obs.kind not in set(kinds))


class ObservationLog:
    """Append-only, thread-safe, bounded log with async waiting for new entries."""

    def __init__(self, clock: Clock, max_entries: int = 1_000_000) -> None:
        self._clock = clock
        self._entries: list[Observation] = []
        self._lock = threading.Lock()
        self._seq = 0
        self._max = max_entries
        self._waiters: list[tuple[asyncio.AbstractEventLoop, asyncio.Event]] = []
        self._thread_cond = threading.Condition(self._lock)
        self._thread_waiters = 0  # threads in wait_sync: record() notifies only if any

    def record(
        self,
        kind: Kind | str,
        *,
        client_id: str | None = None,
        certificate_id: str | None = None,
        **detail: Any,
    ) -> Observation:
        """Append an observation; safe from any thread."""
        # ``_value_``: the member's value without the enum property lookup (record() runs
        # a dozen times per provisioning flow)
        kind_value = kind._value_ if isinstance(kind, Kind) else kind
        waiters: list[tuple[asyncio.AbstractEventLoop, asyncio.Event]] = []
        with self._lock:
            self._seq += 1
            obs = Observation(
                seq=self._seq,
                timestamp=self._clock.now(),
                kind=kind_value,
                client_id=client_id,
                certificate_id=certificate_id,
                detail=detail,
            )
            self._entries.append(obs)
            if len(self._entries) > self._max:
                del self._entries[: len(self._entries) - self._max]
            if self._waiters:
                waiters, self._waiters = self._waiters, []
            if self._thread_waiters:
                self._thread_cond.notify_all()
        for loop, event in waiters:
            if loop.is_closed():
                continue
            try:
                loop.call_soon_threadsafe(event.set)
            except RuntimeError:
                pass
        return obs

    @property
    def last_seq(self) -> int:
        return self._seq

    def query(
        self,
        *,
        client_id: str | None = None,
        certificate_id: str | None = None,
        kinds: Iterable[str] | None = None,
        since: int | None = None,
        limit: int | None = None,
    ) -> list[Observation]:
        """Observations passing the filters, oldest first."""
        kind_set = set(kinds) if kinds is not None else None
        with self._lock:
            entries = list(self._entries)
        out = [
            o
            for o in entries
            if matches(o, client_id=client_id, certificate_id=certificate_id, kinds=kind_set,
                       since=since)
        ]
        return out[:limit] if limit is not None else out

    async def wait(
        self,
        *,
        timeout: float,
        client_id: str | None = None,
        certificate_id: str | None = None,
        kinds: Iterable[str] | None = None,
        since: int | None = None,
    ) -> list[Observation]:
        """Wait until at least one matching observation exists (or ``timeout``), return all."""
        kind_set = set(kinds) if kinds is not None else None
        loop = asyncio.get_running_loop()
        deadline = loop.time() + timeout
        while True:
            event = asyncio.Event()
            with self._lock:
                self._waiters.append((loop, event))
            found = self.query(client_id=client_id, certificate_id=certificate_id,
                               kinds=kind_set, since=since)
            if found:
                return found
            remaining = deadline - loop.time()
            if remaining <= 0:
                return []
            try:
                await asyncio.wait_for(event.wait(), remaining)
            except asyncio.TimeoutError:
                return []

    def wait_sync(
        self,
        *,
        timeout: float,
        client_id: str | None = None,
        certificate_id: str | None = None,
        kinds: Iterable[str] | None = None,
        since: int | None = None,
    ) -> list[Observation]:
        """Blocking variant of :meth:`wait` for threads that are not event loops."""
        import time

        kind_set = set(kinds) if kinds is not None else None
        deadline = time.monotonic() + timeout
        while True:
            found = self.query(client_id=client_id, certificate_id=certificate_id,
                               kinds=kind_set, since=since)
            if found:
                return found
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                return []
            with self._lock:
                self._thread_waiters += 1
                try:
                    self._thread_cond.wait(min(remaining, 0.5))
                finally:
                    self._thread_waiters -= 1

    def clear(self) -> None:
        with self._lock:
            self._entries.clear()
