"""MQTT sessions, the persistent-session store, retained messages and QoS 1 windows.

A :class:`Session` outlives its connection when it is persistent (3.1.1
cleanSession=0, MQTT 5 Session Expiry Interval > 0): it keeps the
subscriptions, the unacknowledged outbound QoS 1 messages (at most
``max_inflight_outbound``) and the QoS 1 messages that arrive while the client
is away (spec §1.3, §1.4). Expiry runs on the shared :class:`~harness.clock.Clock`
so tests move time instead of waiting. No sockets here: the connection state
machine and the server call these methods on the event loop.
"""

from __future__ import annotations

import heapq
import random
import uuid
from collections import deque
from collections.abc import Iterator, Mapping
from dataclasses import dataclass
from typing import Any

from harness.emulator.mqtt.topics import SubscriptionTree, split_shared

#: Properties an MQTT 5 PUBLISH carries through to subscribers unchanged (spec §1.7).
PASS_THROUGH_PROPERTIES = frozenset({
    "payload_format_indicator", "content_type", "response_topic", "correlation_data",
    "user_property",
})


@dataclass(frozen=True, slots=True)
class Message:
    """An application message as the broker routes it (immutable, shared by all deliveries).

    ``properties`` holds only the pass-through MQTT 5 properties; ``expires_at``
    is the Message Expiry deadline on the shared clock; ``origin`` is the
    publishing client id (MQTT 5 No Local), None for service messages.
    """

    topic: str
    payload: bytes
    qos: int = 0
    retain: bool = False
    properties: Mapping[str, Any] | None = None
    expires_at: float | None = None
    origin: str | None = None

    def expired(self, now: float) -> bool:
        return self.expires_at is not None and now >= self.expires_at


@dataclass(frozen=True, slots=True)
class SubscriptionOptions:
    """What a client asked for in one SUBSCRIBE entry (after the QoS was granted)."""

    qos: int
    no_local: bool = False
    retain_as_published: bool = False
    retain_handling: int = 0


@dataclass(frozen=True, slots=True)
class Delivery:
    """One message on its way to one session, at the QoS and RETAIN flag it goes out with."""

    message: Message
    qos: int
    retain: bool = False


@dataclass(frozen=True, slots=True)
class RetainedMessage:
    message: Message
    last_modified: float


class Session:
    """State of one client id that may span several connections."""

    __slots__ = (
        "_next_id",
        "backlog",
        "client_id",
        "connection",
        "expires_at",
        "expiry_interval",
        "inflight",
        "pending",
        "protocol_level",
        "session_identifier",
        "subscriptions",
    )

    def __init__(self, client_id: str, protocol_level: int, expiry_interval: int) -> None:
        self.client_id = client_id
        self.protocol_level = protocol_level
        self.expiry_interval = expiry_interval
        self.session_identifier = str(uuid.uuid4())
        self.subscriptions: dict[str, SubscriptionOptions] = {}  # filter as sent -> options
        #: packet id -> (delivery, time sent on the shared clock)
        self.inflight: dict[int, tuple[Delivery, float]] = {}
        #: QoS 1 deliveries waiting for room in the in-flight window (client online)
        self.pending: deque[Delivery] = deque()
        #: QoS 1 deliveries stored while the client was away (delivered paced on resume)
        self.backlog: deque[Delivery] = deque()
        self.connection: Any = None  # the live connection, if any
        self.expires_at: float | None = None  # set while disconnected and persistent
        self._next_id = 1

    @property
    def persistent(self) -> bool:
        return self.expiry_interval > 0

    def allocate(self, delivery: Delivery, window: int, now: float) -> int | None:
        """Reserve a packet id for a QoS 1 delivery, or None when ``window`` is full."""
        if len(self.inflight) >= window:
            return None
        pid = self._next_id
        while pid in self.inflight:
            pid = pid % 65535 + 1
        self._next_id = pid % 65535 + 1
        self.inflight[pid] = (delivery, now)
        return pid

    def ack(self, packet_id: int) -> bool:
        """The client PUBACKed ``packet_id``; False if it was not in flight."""
        return self.inflight.pop(packet_id, None) is not None

    def store(self, queue: deque[Delivery], delivery: Delivery, limit: int) -> bool:
        """Append to ``pending`` or ``backlog`` unless ``limit`` messages wait already."""
        if len(self.pending) + len(self.backlog) >= limit:
            return False
        queue.append(delivery)
        return True

    def resend_after_resume(self, now: float, retry_window: float) -> list[tuple[int, Delivery]]:
        """In-flight messages to send again on resume; drops those past the retry window
        or past their Message Expiry (spec §1.4, §1.7)."""
        keep: list[tuple[int, Delivery]] = []
        for pid, (delivery, sent_at) in list(self.inflight.items()):
            if now - sent_at > retry_window or delivery.message.expired(now):
                del self.inflight[pid]
            else:
                keep.append((pid, delivery))
        return keep


class RetainedStore:
    """One retained message per topic (spec §1.6); Message Expiry applies."""

    def __init__(self) -> None:
        self._by_topic: dict[str, RetainedMessage] = {}

    def __len__(self) -> int:
        return len(self._by_topic)

    def apply(self, message: Message, now: float) -> None:
        """Store a RETAIN publish; a zero-byte payload deletes the stored one."""
        if message.payload:
            self._by_topic[message.topic] = RetainedMessage(message, now)
        else:
            self._by_topic.pop(message.topic, None)

    def get(self, topic: str, now: float) -> RetainedMessage | None:
        entry = self._by_topic.get(topic)
        if entry is not None and entry.message.expired(now):
            del self._by_topic[topic]
            return None
        return entry

    def items(self, now: float) -> Iterator[RetainedMessage]:
        """Live retained messages in topic order (data-plane ListRetainedMessages)."""
        for topic in sorted(self._by_topic):
            entry = self.get(topic, now)
            if entry is not None:
                yield entry

    def clear(self) -> None:
        self._by_topic.clear()


class SessionStore:
    """All sessions by client id plus the subscription index used for routing."""

    def __init__(self, *, expiry_slack: float = 0.0, rng: random.Random | None = None) -> None:
        self.sessions: dict[str, Session] = {}
        self._tree: SubscriptionTree[str, SubscriptionOptions] = SubscriptionTree()
        self._expiry_heap: list[tuple[float, str, int]] = []
        self._expiry_slack = expiry_slack
        self._rng = rng or random.Random()

    def __len__(self) -> int:
        return len(self.sessions)

    def get(self, client_id: str, now: float) -> Session | None:
        """The live or unexpired stored session of ``client_id``."""
        session = self.sessions.get(client_id)
        if session is not None and session.expires_at is not None and now >= session.expires_at:
            self.discard(session)
            return None
        return session

    def open(self, client_id: str, protocol_level: int, *, clean_start: bool,
             expiry_interval: int, now: float,
             keep_identifier: bool = True) -> tuple[Session, bool]:
        """Create or resume the session of a connection being accepted.

        Returns (session, session_present). A session of the other MQTT version is
        never resumed (spec §1.3). The caller must have detached any connection
        still holding the session.
        """
        existing = self.get(client_id, now)
        if existing is not None and existing.connection is not None:
            raise RuntimeError(f"session of {client_id!r} is still attached to a connection")
        if existing is not None and not clean_start and existing.protocol_level == protocol_level:
            existing.expiry_interval = expiry_interval
            existing.expires_at = None
            if not keep_identifier:
                existing.session_identifier = str(uuid.uuid4())
            return existing, True
        if existing is not None:
            self.discard(existing)
        session = Session(client_id, protocol_level, expiry_interval)
        self.sessions[client_id] = session
        return session, False

    def detach(self, session: Session, now: float) -> bool:
        """The session's connection ended; returns True if the session is kept."""
        session.connection = None
        if self.sessions.get(session.client_id) is not session:
            return False
        if not session.persistent:
            self.discard(session)
            return False
        session.pending.extendleft(reversed(session.backlog))  # everything waits as backlog now
        session.backlog = session.pending
        session.pending = deque()
        session.expires_at = now + session.expiry_interval + self._expiry_slack
        heapq.heappush(self._expiry_heap, (session.expires_at, session.client_id, id(session)))
        return True

    def discard(self, session: Session) -> None:
        """End a session: forget its subscriptions and queued messages."""
        for topic_filter in session.subscriptions:
            self._tree.remove(topic_filter, session.client_id)
        session.subscriptions.clear()
        session.inflight.clear()
        session.pending.clear()
        session.backlog.clear()
        if self.sessions.get(session.client_id) is session:
            del self.sessions[session.client_id]

    def next_expiry(self) -> float | None:
        return self._expiry_heap[0][0] if self._expiry_heap else None

    def expire(self, now: float) -> list[Session]:
        """Discard every stored session whose expiry has passed; returns them."""
        expired: list[Session] = []
        heap = self._expiry_heap
        while heap and heap[0][0] <= now:
            when, client_id, ident = heapq.heappop(heap)
            session = self.sessions.get(client_id)
            if (session is None or id(session) != ident or session.connection is not None
                    or session.expires_at != when):
                continue  # resumed, replaced or discarded since
            self.discard(session)
            expired.append(session)
        return expired

    def subscribe(self, session: Session, topic_filter: str, options: SubscriptionOptions) -> bool:
        """Add or replace a subscription; True if the filter is new for the session."""
        is_new = topic_filter not in session.subscriptions
        session.subscriptions[topic_filter] = options
        self._tree.add(topic_filter, session.client_id, options)
        return is_new

    def unsubscribe(self, session: Session, topic_filter: str) -> bool:
        if session.subscriptions.pop(topic_filter, None) is None:
            return False
        self._tree.remove(topic_filter, session.client_id)
        return True

    def has_subscribers(self, topic: str) -> bool:
        return bool(self._tree.match(topic))

    def route(self, topic: str) -> list[tuple[Session, SubscriptionOptions]]:
        """The sessions a message on ``topic`` goes to, each once, with the options of its
        highest-QoS matching subscription; one member per shared-subscription group
        (an online one if any, spec §1.5)."""
        hits = self._tree.match(topic)
        if not hits:
            return []
        sessions = self.sessions
        if len(hits) == 1 and hits[0][2][:1] != "$":
            session = sessions.get(hits[0][0])
            return [(session, hits[0][1])] if session is not None else []
        best: dict[str, SubscriptionOptions] = {}
        groups: dict[tuple[str, str], list[tuple[str, SubscriptionOptions]]] = {}
        for client_id, options, topic_filter in hits:
            share, inner = split_shared(topic_filter) if topic_filter[:1] == "$" else (None, "")
            if share is None:
                previous = best.get(client_id)
                if previous is None or options.qos > previous.qos:
                    best[client_id] = options
            else:
                groups.setdefault((share, inner), []).append((client_id, options))
        out = [(sessions[cid], opts) for cid, opts in best.items() if cid in sessions]
        for members in groups.values():
            live = [m for m in members if m[0] in sessions and sessions[m[0]].connection]
            pool = live or [m for m in members if m[0] in sessions]
            if pool:
                cid, opts = self._rng.choice(pool)
                out.append((sessions[cid], opts))
        return out

    def clear(self) -> None:
        for session in list(self.sessions.values()):
            self.discard(session)
        self._expiry_heap.clear()
