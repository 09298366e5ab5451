"""AWS IoT lifecycle events: topics, payloads and versionNumber bookkeeping (spec §4).

The broker publishes these on ``$aws/events/...`` like any message, so a
subscriber needs ``iot:Subscribe`` and ``iot:Receive`` as on AWS. Payload keys
and types are AWS's exactly (§4.2, §7 item 23); they are built here in one
place so the broker code never spells a wire name.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from enum import Enum
from typing import Any

PRESENCE_PREFIX = "$aws/events/presence/"
SUBSCRIPTIONS_PREFIX = "$aws/events/subscriptions/"
EVENTS_PREFIX = "$aws/events/"


class DisconnectReason(str, Enum):
    """AWS's ``disconnectReason`` values (§4.2)."""

    AUTH_ERROR = "AUTH_ERROR"
    CLIENT_INITIATED_DISCONNECT = "CLIENT_INITIATED_DISCONNECT"
    CLIENT_ERROR = "CLIENT_ERROR"
    CONNECTION_LOST = "CONNECTION_LOST"
    DUPLICATE_CLIENTID = "DUPLICATE_CLIENTID"
    FORBIDDEN_ACCESS = "FORBIDDEN_ACCESS"
    MQTT_KEEP_ALIVE_TIMEOUT = "MQTT_KEEP_ALIVE_TIMEOUT"
    SERVER_ERROR = "SERVER_ERROR"
    SERVER_INITIATED_DISCONNECT = "SERVER_INITIATED_DISCONNECT"
    API_INITIATED_DISCONNECT = "API_INITIATED_DISCONNECT"
    THROTTLED = "THROTTLED"
    WEBSOCKET_TTL_EXPIRATION = "WEBSOCKET_TTL_EXPIRATION"
    CUSTOMAUTH_TTL_EXPIRATION = "CUSTOMAUTH_TTL_EXPIRATION"

    @property
    def fires_will(self) -> bool:
        """Whether AWS publishes the Will for an established connection ending this way.

        Every reason but a client DISCONNECT; ``API_INITIATED_DISCONNECT`` can
        still suppress it (``preventWillMessage``), which the caller decides.
        """
        return self is not DisconnectReason.CLIENT_INITIATED_DISCONNECT


def emits_events(client_id: str) -> bool:
    """AWS sends no lifecycle events for client ids containing ``+`` or ``#`` (§4.1)."""
    return "+" not in client_id and "#" not in client_id


def event_topic(event_type: str, client_id: str) -> str:
    """The topic of an event (§4.1): presence events and subscription events."""
    if event_type in ("subscribed", "unsubscribed"):
        return f"{SUBSCRIPTIONS_PREFIX}{event_type}/{client_id}"
    return f"{PRESENCE_PREFIX}{event_type}/{client_id}"


@dataclass(frozen=True)
class LifecycleEvent:
    """One event to publish: its topic and its JSON payload (wire names)."""

    topic: str
    payload: dict[str, Any]

    def to_bytes(self) -> bytes:
        return json.dumps(self.payload, separators=(",", ":")).encode()


def _base(client_id: str, timestamp_ms: int, event_type: str, session_identifier: str,
          principal_identifier: str) -> dict[str, Any]:
    return {
        "clientId": client_id,
        "timestamp": timestamp_ms,
        "eventType": event_type,
        "sessionIdentifier": session_identifier,
        "principalIdentifier": principal_identifier,
    }


def connected(client_id: str, *, timestamp_ms: int, session_identifier: str,
              principal_identifier: str, ip_address: str, version_number: int,
              thing_name: str | None = None) -> LifecycleEvent:
    payload = _base(client_id, timestamp_ms, "connected", session_identifier, principal_identifier)
    payload["ipAddress"] = ip_address
    payload["versionNumber"] = version_number
    if thing_name is not None:
        payload["thingName"] = thing_name
    return LifecycleEvent(event_topic("connected", client_id), payload)


def disconnected(client_id: str, *, timestamp_ms: int, session_identifier: str,
                 principal_identifier: str, version_number: int, client_initiated: bool,
                 reason: DisconnectReason, thing_name: str | None = None) -> LifecycleEvent:
    payload = _base(client_id, timestamp_ms, "disconnected", session_identifier,
                    principal_identifier)
    payload["clientInitiatedDisconnect"] = client_initiated
    payload["disconnectReason"] = reason.value
    payload["versionNumber"] = version_number
    if thing_name is not None:
        payload["thingName"] = thing_name
    return LifecycleEvent(event_topic("disconnected", client_id), payload)


def connect_failed(client_id: str, *, timestamp_ms: int, session_identifier: str,
                   principal_identifier: str, ip_address: str,
                   thing_name: str | None = None) -> LifecycleEvent:
    payload = _base(client_id, timestamp_ms, "connect_failed", session_identifier,
                    principal_identifier)
    payload["connectFailureReason"] = "AUTHORIZATION_FAILED"
    payload["ipAddress"] = ip_address
    if thing_name is not None:
        payload["thingName"] = thing_name
    return LifecycleEvent(event_topic("connect_failed", client_id), payload)


def subscription_event(event_type: str, client_id: str, *, timestamp_ms: int,
                       session_identifier: str, principal_identifier: str,
                       topics: list[str], thing_name: str | None = None) -> LifecycleEvent:
    """``subscribed`` or ``unsubscribed`` with the filters of one request."""
    if event_type not in ("subscribed", "unsubscribed"):
        raise ValueError(f"not a subscription event type: {event_type!r}")
    payload = _base(client_id, timestamp_ms, event_type, session_identifier,
                    principal_identifier)
    payload["topics"] = list(topics)
    if thing_name is not None:
        payload["thingName"] = thing_name
    return LifecycleEvent(event_topic(event_type, client_id), payload)


@dataclass
class _Version:
    number: int
    disconnected_at: float | None  # None while a connection with this number is live


class VersionNumbers:
    """``versionNumber`` per client id (§4.2): one value shared by a connection's connected and
    disconnected events, increasing on every new connection, back to 0 after ``reset_after``
    seconds disconnected or when the client's persistent session expires."""

    def __init__(self, reset_after: float = 3600.0) -> None:
        self.reset_after = reset_after
        self._by_client: dict[str, _Version] = {}

    def begin(self, client_id: str, now: float) -> int:
        """The number of a connection that starts now."""
        entry = self._by_client.get(client_id)
        if entry is None or (entry.disconnected_at is not None
                             and now - entry.disconnected_at >= self.reset_after):
            number = 0
        else:
            number = entry.number + 1
        self._by_client[client_id] = _Version(number, None)
        return number

    def end(self, client_id: str, number: int, now: float) -> None:
        """The connection holding ``number`` ended (ignored if a newer one took over)."""
        entry = self._by_client.get(client_id)
        if entry is not None and entry.number == number:
            entry.disconnected_at = now

    def forget(self, client_id: str) -> None:
        """Restart at 0 (the client's persistent session expired)."""
        entry = self._by_client.get(client_id)
        if entry is not None and entry.disconnected_at is not None:
            del self._by_client[client_id]

    def prune(self, now: float) -> None:
        """Drop entries that would restart at 0 anyway (bounded memory)."""
        stale = [cid for cid, e in self._by_client.items()
                 if e.disconnected_at is not None and now - e.disconnected_at >= self.reset_after]
        for cid in stale:
            del self._by_client[cid]
