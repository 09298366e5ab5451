"""One MQTT connection as AWS IoT Core treats it: a sans-I/O state machine.

Bytes go in through :meth:`Connection.receive_data`; what the server must act on
comes back as events (:class:`ConnectRequested`, :class:`MessageReceived`,
:class:`Subscribed`, :class:`Closed` ...); bytes to send collect in
:attr:`Connection.outbox`. The connection applies every per-connection rule of
the spec (§1.1-§1.9): packet order, QoS 0/1 only, client-id, topic, payload and
subscription limits, authorization outcomes per MQTT version, keep-alive and
session-expiry negotiation, topic aliases and the outbound QoS 1 window. What
involves other connections (routing, takeover, lifecycle events, timers) is the
server's job. Every UNCONFIRMED reaction is a :class:`BrokerSettings` switch.
"""

from __future__ import annotations

import uuid
from collections.abc import Callable
from dataclasses import dataclass
from enum import Enum
from typing import Any

from harness.emulator.auth import ConnectionAuthorization
from harness.emulator.broker_settings import BrokerSettings, Qos2Subscribe
from harness.emulator.lifecycle import EVENTS_PREFIX, DisconnectReason
from harness.emulator.mqtt.codec import Decoder, encode
from harness.emulator.mqtt.packets import (
    MQTT_5,
    MQTT_311,
    Auth,
    Connack,
    Connect,
    Disconnect,
    MalformedPacket,
    Packet,
    Pingreq,
    Pingresp,
    Puback,
    Pubcomp,
    Publish,
    Pubrec,
    Pubrel,
    ReasonCode,
    Suback,
    Subscribe,
    Unsuback,
    Unsubscribe,
)
from harness.emulator.mqtt.sessions import (
    PASS_THROUGH_PROPERTIES,
    Delivery,
    Message,
    Session,
    SessionStore,
    SubscriptionOptions,
)
from harness.emulator.mqtt.topics import (
    TopicError,
    TopicLimits,
    split_shared,
    validate_topic_filter,
    validate_topic_name,
)

_RC = ReasonCode


class ConnectionState(Enum):
    AWAIT_CONNECT = "await_connect"
    AWAIT_ADMISSION = "await_admission"  # CONNECT decoded, the server is deciding
    CONNECTED = "connected"
    CLOSED = "closed"


class ConnectRefusal(Enum):
    """Why a CONNECT is turned away; :data:`_REFUSALS` says how each looks on the wire."""

    NOT_AUTHORIZED = "not_authorized"  # iot:Connect denied, or the certificate is not admitted
    CLIENT_ID_INVALID = "client_id_invalid"  # starts with '$' or is too long
    IDENTIFIER_REJECTED = "identifier_rejected"  # 3.1.1 empty id without cleanSession
    UNSUPPORTED_VERSION = "unsupported_version"  # MQTT 3.1
    WILL_QOS_NOT_SUPPORTED = "will_qos_not_supported"
    WILL_TOPIC_INVALID = "will_topic_invalid"
    WILL_NOT_AUTHORIZED = "will_not_authorized"
    WILL_TOO_LARGE = "will_too_large"
    THROTTLED = "throttled"
    BAD_AUTHENTICATION_METHOD = "bad_authentication_method"
    SERVER_BUSY = "server_busy"


# refusal -> (3.1.1 CONNACK code sent even without explain_refusals, 3.1.1 code with
# explain_refusals, MQTT 5 CONNACK reason code); None = close without CONNACK.
_REFUSALS: dict[ConnectRefusal, tuple[int | None, int | None, int]] = {
    ConnectRefusal.NOT_AUTHORIZED: (None, 5, _RC.NOT_AUTHORIZED),
    ConnectRefusal.CLIENT_ID_INVALID: (None, 2, _RC.CLIENT_IDENTIFIER_NOT_VALID),
    ConnectRefusal.IDENTIFIER_REJECTED: (2, 2, _RC.CLIENT_IDENTIFIER_NOT_VALID),
    ConnectRefusal.UNSUPPORTED_VERSION: (None, 1, _RC.UNSUPPORTED_PROTOCOL_VERSION),
    ConnectRefusal.WILL_QOS_NOT_SUPPORTED: (None, None, _RC.QOS_NOT_SUPPORTED),
    ConnectRefusal.WILL_TOPIC_INVALID: (None, None, _RC.TOPIC_NAME_INVALID),
    ConnectRefusal.WILL_NOT_AUTHORIZED: (None, 5, _RC.NOT_AUTHORIZED),
    ConnectRefusal.WILL_TOO_LARGE: (None, None, _RC.PACKET_TOO_LARGE),
    ConnectRefusal.THROTTLED: (None, 3, _RC.QUOTA_EXCEEDED),
    ConnectRefusal.BAD_AUTHENTICATION_METHOD: (None, None, 0x8C),
    ConnectRefusal.SERVER_BUSY: (None, 3, _RC.QUOTA_EXCEEDED),
}


class DeliveryStatus(Enum):
    SENT = "sent"
    QUEUED = "queued"  # waits for room in the in-flight window
    DENIED = "denied"  # iot:Receive refused: silently not delivered (spec §1.9)
    DROPPED = "dropped"  # expired, too large for the client, QoS 0 to a congested client, full


@dataclass(frozen=True, slots=True)
class WillMessage:
    """A Will as set at CONNECT; its Message Expiry counts from its publication."""

    message: Message
    delay: int = 0  # MQTT 5 Will Delay Interval, seconds
    expiry_interval: int | None = None  # MQTT 5 Message Expiry Interval (clamped), seconds

    def to_publish(self, now: float) -> Message:
        """The message to route when the Will fires at ``now``."""
        if self.expiry_interval is None:
            return self.message
        m = self.message
        return Message(m.topic, m.payload, m.qos, m.retain, m.properties,
                       now + self.expiry_interval, m.origin)


@dataclass(frozen=True, slots=True)
class ConnectRequest:
    """A CONNECT that passed the protocol checks, with the values the broker will use."""

    client_id: str
    assigned_client_id: bool
    protocol_level: int
    clean_start: bool
    keep_alive: int  # clamped (spec §1.3)
    requested_keep_alive: int
    session_expiry: int  # seconds the session outlives the connection (0: not persistent)
    requested_session_expiry: int  # as sent (3.1.1: 0 or the account value)
    will: WillMessage | None
    connect_attributes: frozenset[str]  # iot:ConnectAttributes


# -- events -------------------------------------------------------------------------------------

@dataclass(frozen=True, slots=True)
class ConnectRequested:
    request: ConnectRequest


@dataclass(frozen=True, slots=True)
class MessageReceived:
    """An authorized PUBLISH to route (already acknowledged)."""

    message: Message


@dataclass(frozen=True, slots=True)
class PublishDropped:
    """A PUBLISH the broker did not route and did not close the connection for."""

    topic: str
    qos: int
    why: str  # "not_authorized" | "throttled" | "invalid_topic"


@dataclass(frozen=True, slots=True)
class Subscribed:
    """Filters granted by one SUBSCRIBE (new or replaced) and the SUBACK codes sent."""

    granted: tuple[tuple[str, SubscriptionOptions, bool], ...]  # (filter, options, is_new)
    requested: tuple[str, ...]
    reason_codes: tuple[int, ...]


@dataclass(frozen=True, slots=True)
class Unsubscribed:
    filters: tuple[str, ...]


@dataclass(frozen=True, slots=True)
class Closed:
    """The connection is over; the server flushes the outbox and closes the transport.

    ``refusal`` is set when a CONNECT was refused (never connected). ``will`` is
    the Will to publish now (or after its delay), already decided per §4.2.
    """

    reason: DisconnectReason
    was_connected: bool
    client_initiated: bool = False
    will: WillMessage | None = None
    refusal: ConnectRefusal | None = None
    reason_code: int | None = None
    protocol_error: bool = False
    detail: str = ""


Event = ConnectRequested | MessageReceived | PublishDropped | Subscribed | Unsubscribed | Closed


def clamp_keep_alive(requested: int, settings: BrokerSettings) -> int:
    """Spec §1.3: 0 or above the ceiling → ceiling; below the floor → floor."""
    if requested == 0 or requested > settings.keep_alive_max:
        return settings.keep_alive_max
    return max(requested, settings.keep_alive_min)


def clamp_message_expiry(requested: int, settings: BrokerSettings) -> int:
    """Spec §1.7: Message Expiry Interval 0 becomes 1, above the maximum is clamped."""
    return min(max(requested, 1), settings.message_expiry_max)


def _pass_through(properties: dict[str, Any]) -> dict[str, Any] | None:
    kept = {k: v for k, v in properties.items() if k in PASS_THROUGH_PROPERTIES}
    return kept or None


class Connection:
    """Per-connection MQTT state; see the module docstring for the division of labour."""

    __slots__ = ("_aliases", "_client_max_packet", "_deferred", "_events", "_limits",
                 "_problem_info", "_tokens", "_tokens_at", "_valid_topics", "_will", "_window",
                 "authz", "certificate_id", "client_id", "congested", "connected_at", "decoder",
                 "now", "on_output", "outbox", "packets", "peer_ip", "protocol_level",
                 "request", "session", "settings", "sni", "state", "store", "touched")

    def __init__(self, settings: BrokerSettings, store: SessionStore, *,
                 now: Callable[[], float],
                 on_output: Callable[[Connection], None] | None = None,
                 peer_ip: str = "", sni: str | None = None, certificate_id: str | None = None
                 ) -> None:
        self.settings = settings
        self.store = store
        self.now = now
        self.on_output = on_output
        self.peer_ip = peer_ip
        self.sni = sni
        self.certificate_id = certificate_id
        self.state = ConnectionState.AWAIT_CONNECT
        self.decoder = Decoder(settings.max_packet_bytes)
        self.outbox: list[bytes] = []
        self.protocol_level = MQTT_311
        self.client_id = ""
        self.request: ConnectRequest | None = None
        self.session: Session | None = None
        self.authz: ConnectionAuthorization | None = None
        self.connected_at: float | None = None
        self.touched = False  # a packet that resets keep-alive arrived (the server clears it)
        self.packets = 0  # packets decoded so far (the slow-packet timer watches progress)
        self.congested = False  # the transport's write buffer is over its limit
        self._limits = TopicLimits(settings.max_topic_bytes, settings.max_topic_slashes)
        self._valid_topics: dict[str, bool] = {}
        self._aliases: dict[int, str] = {}
        self._window = settings.max_inflight_outbound
        self._client_max_packet: int | None = None
        self._problem_info = True
        self._deferred: list[Packet] = []
        self._events: list[Event] = []
        self._will: WillMessage | None = None
        self._tokens = float(settings.publish_rate_per_connection or 0.0)
        self._tokens_at = 0.0

    # -- input -----------------------------------------------------------------------------------

    @property
    def buffered(self) -> int:
        """Bytes of an incomplete packet (the server's slow-loris timer watches this)."""
        return self.decoder.buffered

    @property
    def closed(self) -> bool:
        return self.state is ConnectionState.CLOSED

    def receive_data(self, data: bytes) -> list[Event]:
        """Consume bytes from the peer; returns the events they caused, in order."""
        if self.state is ConnectionState.CLOSED:
            return []
        try:
            packets = self.decoder.feed(data) if data else []
        except MalformedPacket as exc:
            if (exc.reason_code == _RC.UNSUPPORTED_PROTOCOL_VERSION
                    and self.state is ConnectionState.AWAIT_CONNECT):
                self._emit_refusal(ConnectRefusal.UNSUPPORTED_VERSION, str(exc))
            else:
                self._protocol_close(exc.reason_code, str(exc))
            return self._take_events()
        self.packets += len(packets)
        if self._deferred:
            packets = self._deferred + packets
            self._deferred = []
        self._handle(packets)
        return self._take_events()

    def _handle(self, packets: list[Packet]) -> None:
        handlers = _HANDLERS
        for index, packet in enumerate(packets):
            if self.state is ConnectionState.CLOSED:
                return
            if self.state is ConnectionState.AWAIT_ADMISSION:
                self._deferred = packets[index:]  # handled once the CONNECT is accepted
                return
            handler = handlers.get(type(packet))
            if handler is None:
                self._protocol_close(_RC.PROTOCOL_ERROR, f"unexpected {type(packet).__name__}")
                return
            handler(self, packet)

    def _take_events(self) -> list[Event]:
        events, self._events = self._events, []
        return events

    # -- output ----------------------------------------------------------------------------------

    def _write(self, data: bytes) -> None:
        if not self.outbox:
            self.outbox.append(data)
            if self.on_output is not None:
                self.on_output(self)
        else:
            self.outbox.append(data)

    def _send(self, packet: Packet) -> None:
        self._write(encode(packet, self.protocol_level))

    def data_to_send(self) -> bytes:
        """Drain the outbox (tests and simple servers)."""
        data = b"".join(self.outbox)
        self.outbox.clear()
        return data

    # -- closing ---------------------------------------------------------------------------------

    def close(self, reason: DisconnectReason, reason_code: int | None = None, *,
              publish_will: bool | None = None, detail: str = "",
              protocol_error: bool = False) -> Closed | None:
        """End the connection from the server side (MQTT 5: DISCONNECT ``reason_code`` first,
        if it had been accepted). Returns the :class:`Closed` event, None if already closed."""
        if self.state is ConnectionState.CLOSED:
            return None
        was_connected = self.state is ConnectionState.CONNECTED
        if was_connected and self.protocol_level == MQTT_5 and reason_code is not None:
            props = {"reason_string": detail[:200]} if detail and self._problem_info else {}
            self._send(Disconnect(reason_code, props))
        self.state = ConnectionState.CLOSED
        fire = reason.fires_will if publish_will is None else publish_will
        will = self._will if (fire and was_connected) else None
        self._will = None
        client_initiated = reason is DisconnectReason.CLIENT_INITIATED_DISCONNECT or (
            reason is DisconnectReason.CONNECTION_LOST
            and self.settings.client_initiated_on_connection_lost)
        return Closed(reason, was_connected, client_initiated, will, None, reason_code,
                      protocol_error, detail)

    def connection_lost(self) -> Closed | None:
        """The transport closed without a DISCONNECT (spec §4.2 CONNECTION_LOST)."""
        return self.close(DisconnectReason.CONNECTION_LOST)

    def _emit_close(self, reason: DisconnectReason, reason_code: int | None = None, *,
                    publish_will: bool | None = None, detail: str = "",
                    protocol_error: bool = False) -> None:
        """Close from inside packet handling: the event goes out with the others."""
        event = self.close(reason, reason_code, publish_will=publish_will, detail=detail,
                           protocol_error=protocol_error)
        if event is not None:
            self._events.append(event)

    def _protocol_close(self, reason_code: int, detail: str) -> None:
        self._emit_close(DisconnectReason.CLIENT_ERROR, reason_code, detail=detail,
                         protocol_error=True)

    def refuse(self, refusal: ConnectRefusal, detail: str = "") -> Closed:
        """Turn the CONNECT away as AWS does (spec §1.9, §2.3); see :data:`_REFUSALS`."""
        always_311, explained_311, code_5 = _REFUSALS[refusal]
        if refusal is ConnectRefusal.THROTTLED:
            code_5 = self.settings.connect_throttle_reason_code
        if self.protocol_level == MQTT_5:
            props: dict[str, Any] = {}
            if code_5 == _RC.CLIENT_IDENTIFIER_NOT_VALID:
                props["reason_string"] = f"CONNACK:ClientId is invalid:{uuid.uuid4()}"
            elif self.settings.explain_refusals and self._problem_info:
                props["reason_string"] = f"{refusal.value}: {detail}"[:200] if detail \
                    else refusal.value
            self._send(Connack(False, int(code_5), props))
        else:
            code = explained_311 if self.settings.explain_refusals else always_311
            if code is not None:
                self._send(Connack(False, code))
        self.state = ConnectionState.CLOSED
        self._will = None
        self._deferred = []
        return Closed(DisconnectReason.AUTH_ERROR if refusal in (
            ConnectRefusal.NOT_AUTHORIZED, ConnectRefusal.WILL_NOT_AUTHORIZED)
            else DisconnectReason.CLIENT_ERROR, False, refusal=refusal, detail=detail)

    def _emit_refusal(self, refusal: ConnectRefusal, detail: str = "") -> None:
        self._events.append(self.refuse(refusal, detail))

    # -- CONNECT and admission -------------------------------------------------------------------

    def _on_connect(self, p: Connect) -> None:
        if self.state is not ConnectionState.AWAIT_CONNECT:  # spec §1.1: a second CONNECT
            self._protocol_close(_RC.PROTOCOL_ERROR, "second CONNECT")
            return
        settings = self.settings
        self.protocol_level = MQTT_5 if p.protocol_level == MQTT_5 else MQTT_311
        v5 = self.protocol_level == MQTT_5
        props = p.properties if v5 else {}
        if v5:
            self._problem_info = props.get("request_problem_information", 1) != 0
            self._window = min(settings.max_inflight_outbound,
                               props.get("receive_maximum", 65535))
            self._client_max_packet = props.get("maximum_packet_size")
        self.client_id = p.client_id
        if p.protocol_level == 3 and settings.mqtt31_refused:
            self._emit_refusal(ConnectRefusal.UNSUPPORTED_VERSION, "MQTT 3.1 is not supported")
            return
        if v5 and "authentication_method" in props:
            self._emit_refusal(ConnectRefusal.BAD_AUTHENTICATION_METHOD,
                               "enhanced authentication is not supported")
            return
        client_id, assigned = p.client_id, False
        if not client_id:
            if v5 or (settings.assign_client_id_311 and p.clean_start):
                client_id, assigned = f"$GEN/{uuid.uuid4()}", True
            else:
                self._emit_refusal(ConnectRefusal.IDENTIFIER_REJECTED, "empty client id")
                return
        elif client_id.startswith("$"):
            self._emit_refusal(ConnectRefusal.CLIENT_ID_INVALID, "client id starts with '$'")
            return
        elif len(client_id.encode("utf-8")) > settings.max_client_id_bytes:
            self._emit_refusal(ConnectRefusal.CLIENT_ID_INVALID,
                        f"client id longer than {settings.max_client_id_bytes} bytes")
            return
        self.client_id = client_id
        will = None
        if p.will is not None:
            w = p.will
            if w.qos == 2:
                self._emit_refusal(ConnectRefusal.WILL_QOS_NOT_SUPPORTED, "Will QoS 2")
                return
            try:
                validate_topic_name(w.topic, self._limits)
            except TopicError as exc:
                self._emit_refusal(ConnectRefusal.WILL_TOPIC_INVALID, str(exc))
                return
            if len(w.payload) > settings.max_payload_bytes:
                self._emit_refusal(ConnectRefusal.WILL_TOO_LARGE, "Will payload over the limit")
                return
            wprops = w.properties if v5 else {}
            will_expiry = wprops.get("message_expiry_interval")
            message = Message(w.topic, w.payload, w.qos, w.retain, _pass_through(wprops),
                              None, client_id)
            will = WillMessage(message, int(wprops.get("will_delay_interval", 0)),
                               clamp_message_expiry(will_expiry, settings)
                               if will_expiry is not None else None)
        if v5:
            requested_expiry = int(props.get("session_expiry_interval", 0))
            expiry = min(requested_expiry, settings.persistent_session_expiry)
            persistent_requested = requested_expiry > 0
        else:
            persistent_requested = not p.clean_start
            expiry = settings.persistent_session_expiry if persistent_requested else 0
            requested_expiry = expiry
        attributes = set()
        if persistent_requested:
            attributes.add("PersistentConnect")
        if will is not None:
            attributes.add("LastWill")
        self._will = will
        self.request = ConnectRequest(
            client_id=client_id,
            assigned_client_id=assigned,
            protocol_level=self.protocol_level,
            clean_start=p.clean_start,
            keep_alive=clamp_keep_alive(p.keep_alive, settings),
            requested_keep_alive=p.keep_alive,
            session_expiry=expiry,
            requested_session_expiry=requested_expiry,
            will=will,
            connect_attributes=frozenset(attributes),
        )
        self.state = ConnectionState.AWAIT_ADMISSION
        self._events.append(ConnectRequested(self.request))

    def authorize(self, authz: ConnectionAuthorization) -> ConnectRefusal | None:
        """Spec §1.3/§1.9: ``iot:Connect`` on the client id, then the Will's publish rights."""
        self.authz = authz
        if not authz.can_connect():
            return ConnectRefusal.NOT_AUTHORIZED
        will = self.request.will if self.request is not None else None
        if will is not None:
            m = will.message
            if self._reserved_misuse(m.topic, m.retain) or not authz.can_publish(m.topic,
                                                                                 m.retain):
                return ConnectRefusal.WILL_NOT_AUTHORIZED
        return None

    def accept(self, session: Session, session_present: bool) -> list[Event]:
        """Send CONNACK, resend in-flight QoS 1 messages of a resumed session, then handle
        packets the client sent before the CONNACK. Returns their events."""
        request = self.request
        assert request is not None and self.authz is not None
        self.session = session
        session.connection = self
        self.state = ConnectionState.CONNECTED
        self.connected_at = self.now()
        settings = self.settings
        props: dict[str, Any] = {}
        if self.protocol_level == MQTT_5:
            props = {
                "maximum_qos": 1,
                "retain_available": 1,
                "wildcard_subscription_available": 1,
                "subscription_identifier_available": 0,
                "topic_alias_maximum": settings.topic_alias_maximum,
                "maximum_packet_size": settings.max_packet_bytes,
                "receive_maximum": settings.receive_maximum,
            }
            if settings.advertise_shared_subscriptions:
                props["shared_subscription_available"] = 1
            if request.assigned_client_id:
                props["assigned_client_identifier"] = request.client_id
            if (request.keep_alive != request.requested_keep_alive
                    or not settings.server_keep_alive_only_when_changed):
                props["server_keep_alive"] = request.keep_alive
            if request.session_expiry != request.requested_session_expiry:  # spec §1.3
                props["session_expiry_interval"] = request.session_expiry
        self._send(Connack(session_present, 0, props))
        now = self.now()
        for pid, delivery in session.resend_after_resume(now, settings.qos1_retry_window):
            if self.authz.can_receive(delivery.message.topic):
                self._send_publish(delivery, pid, now, dup=settings.set_dup_on_redelivery)
            else:
                session.ack(pid)
        if settings.backlog_delivery_rate is None and session.backlog:
            session.pending.extend(session.backlog)
            session.backlog.clear()
        self._fill_window()
        packets, self._deferred = self._deferred, []
        self._handle(packets)
        return self._take_events()

    # -- PUBLISH in ------------------------------------------------------------------------------

    def _reserved_misuse(self, topic: str, retain: bool) -> bool:
        """Spec §1.5: no RETAIN on a reserved topic, no publishing under $aws/events/."""
        return (topic[:1] == "$" and self.settings.reserved_topic_misuse_denied
                and (retain or topic.startswith(EVENTS_PREFIX)))

    def _topic_ok(self, topic: str) -> TopicError | None:
        known = self._valid_topics.get(topic)
        if known:
            return None
        try:
            validate_topic_name(topic, self._limits)
        except TopicError as exc:
            return exc
        if len(self._valid_topics) < 256:
            self._valid_topics[topic] = True
        return None

    def _on_publish(self, p: Publish) -> None:
        self.touched = True
        settings = self.settings
        qos = p.qos
        v5 = self.protocol_level == MQTT_5
        if qos == 2:  # spec §1.4
            self._protocol_close(settings.qos2_publish_reason_code, "QoS 2 is not supported")
            return
        topic = p.topic
        props = p.properties
        if v5 and props:
            response_topic = props.get("response_topic")
            if response_topic is not None and ("+" in response_topic or "#" in response_topic):
                self._protocol_close(_RC.PROTOCOL_ERROR, "Response Topic with a wildcard")
                return
            alias = props.get("topic_alias")
            if alias is not None:
                if not 0 < alias <= settings.topic_alias_maximum:  # spec §1.7
                    self._protocol_close(_RC.TOPIC_ALIAS_INVALID, f"topic alias {alias}")
                    return
                if topic:
                    self._aliases[alias] = topic
                else:
                    known = self._aliases.get(alias)
                    if known is None:
                        self._protocol_close(_RC.PROTOCOL_ERROR, f"unknown topic alias {alias}")
                        return
                    topic = known
        if len(p.payload) > settings.max_payload_bytes:  # spec §1.8
            self._protocol_close(settings.payload_too_large_reason_code,
                                 f"payload of {len(p.payload)} bytes over the limit")
            return
        error = self._topic_ok(topic)
        if error is not None:  # spec §1.5
            if v5:
                if qos:
                    self._send(Puback(p.packet_id or 0, _RC.TOPIC_NAME_INVALID))
                    self._events.append(PublishDropped(topic, qos, "invalid_topic"))
                else:
                    self._protocol_close(_RC.TOPIC_NAME_INVALID, str(error))
            elif settings.invalid_topic_disconnects_311:
                self._protocol_close(_RC.TOPIC_NAME_INVALID, str(error))
            else:
                if qos:
                    self._send(Puback(p.packet_id or 0))
                self._events.append(PublishDropped(topic, qos, "invalid_topic"))
            return
        assert self.authz is not None
        if self._reserved_misuse(topic, p.retain) or not self.authz.can_publish(topic, p.retain):
            self._publish_denied(topic, qos, p.packet_id)  # spec §1.9
            return
        rate = settings.publish_rate_per_connection
        if rate is not None and not self._take_token(rate):  # spec §1.8
            if qos:
                self._send(Puback(p.packet_id or 0,
                                  settings.publish_throttle_reason_code if v5 else 0))
            self._events.append(PublishDropped(topic, qos, "throttled"))
            return
        expires_at = None
        passed = None
        if v5 and props:
            expiry = props.get("message_expiry_interval")
            if expiry is not None:
                expires_at = self.now() + clamp_message_expiry(expiry, settings)
            passed = _pass_through(props)
        if qos:
            code = 0
            if v5 and settings.send_no_matching_subscribers and topic[:1] != "$" \
                    and not self.store.has_subscribers(topic):
                code = _RC.NO_MATCHING_SUBSCRIBERS
            self._send(Puback(p.packet_id or 0, code))
        self._events.append(MessageReceived(
            Message(topic, p.payload, qos, p.retain, passed, expires_at, self.client_id)))

    def _publish_denied(self, topic: str, qos: int, packet_id: int | None) -> None:
        if self.protocol_level != MQTT_5 or self.settings.denied_publish_disconnects_5:
            self._emit_close(DisconnectReason.AUTH_ERROR, _RC.NOT_AUTHORIZED,
                       detail=f"not authorized to publish to {topic}")
            return
        if qos:
            self._send(Puback(packet_id or 0, _RC.NOT_AUTHORIZED))
        self._events.append(PublishDropped(topic, qos, "not_authorized"))

    def _take_token(self, rate: float) -> bool:
        now = self.now()
        tokens = min(rate, self._tokens + (now - self._tokens_at) * rate)
        self._tokens_at = now
        if tokens < 1.0:
            self._tokens = tokens
            return False
        self._tokens = tokens - 1.0
        return True

    # -- acknowledgements and the outbound window ------------------------------------------------

    def _on_puback(self, p: Puback) -> None:
        self.touched = True
        session = self.session
        if session is not None and session.ack(p.packet_id) and session.pending:
            self._fill_window()

    def _fill_window(self) -> None:
        session = self.session
        if session is None:
            return
        pending = session.pending
        while (pending and len(session.inflight) < self._window
               and self.state is ConnectionState.CONNECTED):
            self._deliver_now(pending.popleft())

    def drain_backlog(self, count: int) -> int:
        """Send up to ``count`` messages stored while the client was away (the server paces
        this, spec §1.3). Returns how many left the backlog."""
        session = self.session
        if session is None or self.state is not ConnectionState.CONNECTED:
            return 0
        moved = 0
        backlog = session.backlog
        while backlog and moved < count and len(session.inflight) < self._window:
            self._deliver_now(backlog.popleft())
            moved += 1
        return moved

    def deliver(self, delivery: Delivery) -> DeliveryStatus:
        """Send a routed message to this client, subject to ``iot:Receive`` (spec §1.9)."""
        session = self.session
        if session is None or self.state is not ConnectionState.CONNECTED:
            return DeliveryStatus.DROPPED
        if delivery.qos and (session.pending or len(session.inflight) >= self._window):
            if session.store(session.pending, delivery, self.settings.max_offline_messages):
                return DeliveryStatus.QUEUED
            return DeliveryStatus.DROPPED
        return self._deliver_now(delivery)

    def _deliver_now(self, delivery: Delivery) -> DeliveryStatus:
        message = delivery.message
        now = self.now()
        if message.expires_at is not None and now >= message.expires_at:
            return DeliveryStatus.DROPPED
        assert self.authz is not None and self.session is not None
        if not self.authz.can_receive(message.topic):
            return DeliveryStatus.DENIED
        if not delivery.qos:
            if self.congested:
                return DeliveryStatus.DROPPED
            return self._send_publish(delivery, None, now)
        pid = self.session.allocate(delivery, self._window, now)
        if pid is None:
            return DeliveryStatus.DROPPED
        return self._send_publish(delivery, pid, now)

    def _send_publish(self, delivery: Delivery, packet_id: int | None, now: float,
                      dup: bool = False) -> DeliveryStatus:
        message = delivery.message
        props: dict[str, Any] = {}
        if self.protocol_level == MQTT_5:
            if message.properties:
                props.update(message.properties)
            if message.expires_at is not None:
                props["message_expiry_interval"] = max(0, int(message.expires_at - now))
        data = encode(Publish(message.topic, message.payload, delivery.qos, delivery.retain,
                              dup and packet_id is not None, packet_id, props),
                      self.protocol_level)
        if self._client_max_packet is not None and len(data) > self._client_max_packet:
            if packet_id is not None and self.session is not None:
                self.session.ack(packet_id)
            return DeliveryStatus.DROPPED
        self._write(data)
        return DeliveryStatus.SENT

    # -- SUBSCRIBE / UNSUBSCRIBE -----------------------------------------------------------------

    def _on_subscribe(self, p: Subscribe) -> None:
        self.touched = True
        settings = self.settings
        v5 = self.protocol_level == MQTT_5
        session = self.session
        assert session is not None and self.authz is not None
        if v5 and "subscription_identifier" in p.properties:  # spec §1.7
            self._protocol_close(_RC.SUBSCRIPTION_IDENTIFIERS_NOT_SUPPORTED,
                                 "subscription identifiers are not supported")
            return
        requested = tuple(s.topic_filter for s in p.subscriptions)
        if len(p.subscriptions) > settings.max_filters_per_subscribe:  # spec §1.8
            if v5 or not settings.subscription_quota_disconnects_311:
                code = _RC.QUOTA_EXCEEDED if v5 else 0x80
                self._send(Suback(p.packet_id, [code] * len(p.subscriptions)))
                self._events.append(Subscribed((), requested, (code,) * len(requested)))
            else:
                self._protocol_close(_RC.QUOTA_EXCEEDED,
                                     f"more than {settings.max_filters_per_subscribe} filters")
            return
        codes: list[int] = []
        granted: list[tuple[str, SubscriptionOptions, bool]] = []
        count = len(session.subscriptions)
        for sub in p.subscriptions:
            topic_filter = sub.topic_filter
            try:
                validate_topic_filter(topic_filter, self._limits)
            except TopicError as exc:  # spec §1.5
                if v5:
                    codes.append(_RC.TOPIC_FILTER_INVALID)
                    continue
                if settings.invalid_topic_disconnects_311:
                    self._protocol_close(_RC.TOPIC_FILTER_INVALID, str(exc))
                    return
                codes.append(0x80)
                continue
            qos = sub.qos
            if qos == 2:  # spec §1.4
                mode = settings.subscribe_qos2_5 if v5 else settings.subscribe_qos2_311
                if mode is Qos2Subscribe.DISCONNECT:
                    self._protocol_close(_RC.QOS_NOT_SUPPORTED, "SUBSCRIBE with QoS 2")
                    return
                qos = 1
            resource = topic_filter
            if not settings.shared_subscribe_checks_full_filter \
                    and topic_filter.startswith("$share/"):
                resource = split_shared(topic_filter)[1]
            if not self.authz.can_subscribe(resource):  # spec §1.9
                if v5:
                    codes.append(_RC.NOT_AUTHORIZED)
                    continue
                if settings.denied_subscribe_disconnects_311:
                    self._emit_close(DisconnectReason.AUTH_ERROR, _RC.NOT_AUTHORIZED,
                               detail=f"not authorized to subscribe to {topic_filter}")
                    return
                codes.append(0x80)
                continue
            if topic_filter.startswith("$share/") and sub.no_local:
                self._protocol_close(_RC.PROTOCOL_ERROR, "No Local on a shared subscription")
                return
            is_new = topic_filter not in session.subscriptions
            if is_new and count >= settings.max_subscriptions_per_connection:  # spec §1.8
                if v5:
                    codes.append(_RC.QUOTA_EXCEEDED)
                    continue
                if settings.subscription_quota_disconnects_311:
                    self._protocol_close(
                        _RC.QUOTA_EXCEEDED,
                        f"more than {settings.max_subscriptions_per_connection} subscriptions")
                    return
                codes.append(0x80)
                continue
            options = SubscriptionOptions(qos, sub.no_local, sub.retain_as_published,
                                          sub.retain_handling) if v5 else SubscriptionOptions(qos)
            count += is_new
            granted.append((topic_filter, options, is_new))
            codes.append(qos)
        for topic_filter, options, _ in granted:
            self.store.subscribe(session, topic_filter, options)
        self._send(Suback(p.packet_id, codes))
        self._events.append(Subscribed(tuple(granted), requested, tuple(codes)))

    def _on_unsubscribe(self, p: Unsubscribe) -> None:
        settings = self.settings
        if settings.unsubscribe_resets_keep_alive:
            self.touched = True
        v5 = self.protocol_level == MQTT_5
        session = self.session
        assert session is not None
        n = len(p.topic_filters)
        if n > settings.max_filters_per_subscribe:  # spec §6: 9 filters → no UNSUBACK
            if v5 or not settings.subscription_quota_disconnects_311:
                self._send(Unsuback(p.packet_id, [0x80] * n if v5 else []))
            else:
                self._protocol_close(_RC.QUOTA_EXCEEDED,
                                     f"more than {settings.max_filters_per_subscribe} filters")
            return
        removed = []
        codes = []
        for topic_filter in p.topic_filters:
            if self.store.unsubscribe(session, topic_filter):
                removed.append(topic_filter)
            codes.append(0)
        self._send(Unsuback(p.packet_id, codes if v5 else []))
        self._events.append(Unsubscribed(tuple(p.topic_filters)))

    # -- the rest --------------------------------------------------------------------------------

    def _on_pingreq(self, _p: Pingreq) -> None:
        self.touched = True
        self._send(Pingresp())

    def _on_disconnect(self, p: Disconnect) -> None:
        session = self.session
        if self.protocol_level == MQTT_5 and session is not None:
            expiry = p.properties.get("session_expiry_interval")
            if expiry is not None:
                if session.expiry_interval == 0 and expiry > 0:  # MQTT 5 §3.14.2.2.2
                    self._protocol_close(_RC.PROTOCOL_ERROR,
                                         "Session Expiry raised from 0 on DISCONNECT")
                    return
                session.expiry_interval = min(int(expiry), self.settings.persistent_session_expiry)
        with_will = self.protocol_level == MQTT_5 and p.reason_code == 0x04
        self._emit_close(DisconnectReason.CLIENT_INITIATED_DISCONNECT, publish_will=with_will)

    def _on_unsupported(self, p: Packet) -> None:
        self._protocol_close(_RC.PROTOCOL_ERROR, f"{type(p).__name__} is not supported")


#: Packet type → handler (one table for all connections: no per-connection bound methods).
_HANDLERS: dict[type, Callable[[Connection, Any], None]] = {
    Connect: Connection._on_connect,
    Publish: Connection._on_publish,
    Puback: Connection._on_puback,
    Subscribe: Connection._on_subscribe,
    Unsubscribe: Connection._on_unsubscribe,
    Pingreq: Connection._on_pingreq,
    Disconnect: Connection._on_disconnect,
    Pubrec: Connection._on_unsupported,
    Pubrel: Connection._on_unsupported,
    Pubcomp: Connection._on_unsupported,
    Auth: Connection._on_unsupported,
}
