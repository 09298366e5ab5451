"""The per-connection state machine without a network: packets in, events and packets out."""

from __future__ import annotations

from typing import Any

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from harness import pki
from harness.clock import Clock
from harness.emulator.auth import Authentication, Principal
from harness.emulator.broker_settings import BrokerSettings, Qos2Subscribe
from harness.emulator.lifecycle import DisconnectReason
from harness.emulator.mqtt.codec import Decoder, encode
from harness.emulator.mqtt.connection import (
    Closed,
    Connection,
    ConnectRequested,
    DeliveryStatus,
    MessageReceived,
    PublishDropped,
    Subscribed,
    clamp_keep_alive,
)
from harness.emulator.mqtt.packets import (
    MQTT_5,
    Connack,
    Connect,
    Disconnect,
    Packet,
    Pingreq,
    Pingresp,
    Puback,
    Publish,
    Pubrel,
    Suback,
    Subscribe,
    Subscription,
    Unsuback,
    Unsubscribe,
    Will,
)
from harness.emulator.mqtt.sessions import Delivery, Message, SessionStore
from tests.brokerkit import ALLOW_ALL, MemoryDirectory, allow, arn, policy

_KEY = pki.generate_ec_key()
_CERT = pki.self_signed_certificate(_KEY, "sans-io")
_CERT_ID = pki.certificate_id(_CERT)


class Rig:
    """A Connection wired to a session store and an authorizer, no sockets."""

    def __init__(self, settings: BrokerSettings | None = None,
                 policies: tuple[str, ...] = (ALLOW_ALL,)) -> None:
        self.settings = settings or BrokerSettings()
        self.clock = Clock()
        self.store = SessionStore()
        self.auth = Authentication(MemoryDirectory(), self.settings, region="us-east-1",
                                   account_id="123456789012")
        self.principal = Principal(_CERT_ID, _CERT, policies)

    def open(self, client_id: str = "c1", level: int = 4, **connect: Any
             ) -> tuple[Connection, list[Any], list[Any]]:
        """CONNECT and admit (or refuse as the connection decides); returns the connection,
        its events and the packets it sent."""
        conn = Connection(self.settings, self.store, now=self.clock.now)
        events = conn.receive_data(encode(Connect(level, client_id, **connect), level))
        if events and isinstance(events[0], ConnectRequested):
            request = events[0].request
            authz = self.auth.authorization(self.principal, request.client_id,
                                            source_ip="192.0.2.1", domain_name=None,
                                            connect_attributes=request.connect_attributes)
            refusal = conn.authorize(authz)
            if refusal is not None:
                events = [conn.refuse(refusal)]
            else:
                session, present = self.store.open(
                    request.client_id, request.protocol_level, clean_start=request.clean_start,
                    expiry_interval=request.session_expiry, now=self.clock.now())
                events = [events[0], *conn.accept(session, present)]
        return conn, events, self.sent(conn)

    @staticmethod
    def sent(conn: Connection) -> list[Any]:
        """The packets the connection wrote (decoded; ``Any`` as tests read their fields)."""
        level = conn.protocol_level
        return Decoder(1 << 24, protocol_level=level).feed(conn.data_to_send())

    def feed(self, conn: Connection, *packets: Packet) -> tuple[list[Any], list[Any]]:
        data = b"".join(encode(p, conn.protocol_level) for p in packets)
        events = conn.receive_data(data)
        return events, self.sent(conn)


def closed_event(events: list[Any]) -> Closed:
    found = [e for e in events if isinstance(e, Closed)]
    assert found, events
    return found[0]


# -- CONNECT --------------------------------------------------------------------------------------

@given(st.integers(min_value=0, max_value=65535))
@settings(max_examples=60)
def test_keep_alive_is_clamped_to_aws_range(requested: int) -> None:
    # spec broker §1.3: 0 or > 1200 → 1200; 1-29 → 30; otherwise as requested
    s = BrokerSettings()
    used = clamp_keep_alive(requested, s)
    assert 30 <= used <= 1200
    if requested == 0 or requested > 1200:
        assert used == 1200
    elif requested < 30:
        assert used == 30
    else:
        assert used == requested


def test_mqtt5_connack_advertises_aws_capabilities_and_clamped_keep_alive() -> None:
    # spec broker §1.7, §1.3 (Server Keep Alive when the value differs)
    _, _, sent = Rig().open(level=5, keep_alive=10)
    connack = sent[0]
    assert isinstance(connack, Connack) and connack.reason_code == 0
    props = connack.properties
    assert props["maximum_qos"] == 1
    assert props["retain_available"] == 1
    assert props["subscription_identifier_available"] == 0
    assert props["topic_alias_maximum"] == 8
    assert props["receive_maximum"] == 100
    assert props["server_keep_alive"] == 30


def test_mqtt5_connack_omits_server_keep_alive_when_unchanged() -> None:
    # spec broker §1.3 (UNCONFIRMED default: only when it differs)
    _, _, sent = Rig().open(level=5, keep_alive=60)
    assert "server_keep_alive" not in sent[0].properties


def test_mqtt5_session_expiry_above_account_maximum_is_lowered_and_echoed() -> None:
    # spec broker §1.3: SEI capped at the account quota, the lowered value in CONNACK
    _, events, sent = Rig().open(level=5, clean_start=False,
                                 properties={"session_expiry_interval": 7200})
    assert sent[0].properties["session_expiry_interval"] == 3600
    assert events[0].request.session_expiry == 3600
    _, _, sent = Rig().open(level=5, properties={"session_expiry_interval": 100})
    assert "session_expiry_interval" not in sent[0].properties


def test_mqtt5_empty_client_id_gets_a_gen_identifier() -> None:
    # spec broker §1.3 / §7 item 14
    _, events, sent = Rig().open("", level=5)
    assigned = sent[0].properties["assigned_client_identifier"]
    assert assigned.startswith("$GEN/") and len(assigned) == len("$GEN/") + 36
    assert events[0].request.client_id == assigned


def test_mqtt5_dollar_client_id_is_refused_with_0x85_and_aws_reason_string() -> None:
    # spec broker §1.3: "$" prefix → CONNACK 0x85 "CONNACK:ClientId is invalid:<trace-id>"
    _, events, sent = Rig().open("$GEN/0123", level=5)
    assert sent[0].reason_code == 0x85
    assert sent[0].properties["reason_string"].startswith("CONNACK:ClientId is invalid:")
    assert closed_event(events).refusal is not None


def test_311_dollar_client_id_is_closed_without_connack() -> None:
    # spec broker §1.3 (UNCONFIRMED default: close without CONNACK)
    conn, _events, sent = Rig().open("$bad")
    assert sent == [] and conn.closed


def test_311_empty_client_id_needs_clean_session() -> None:
    # spec broker §1.3 (UNCONFIRMED default: accept with cleanSession=1, else CONNACK 2)
    _, events, sent = Rig().open("", clean_start=False)
    assert sent == [Connack(False, 2)]
    _, events, sent = Rig().open("", clean_start=True)
    assert sent[0].reason_code == 0
    assert events[0].request.client_id.startswith("$GEN/")


@pytest.mark.parametrize("level", [4, 5])
def test_client_id_over_128_bytes_is_refused(level: int) -> None:
    # spec broker §1.3: over 128 bytes → MQTT 5 0x85, 3.1.1 close
    rig = Rig()
    _, _, sent = rig.open("é" * 64, level=level)  # 128 bytes: fine
    assert sent[0].reason_code == 0
    conn, _, sent = rig.open("x" * 129, level=level)
    assert conn.closed
    assert sent == ([] if level == 4 else [sent[0]])
    if level == 5:
        assert sent[0].reason_code == 0x85


def test_mqtt31_is_refused_and_explained_only_on_request() -> None:
    # spec broker §1.1 (UNCONFIRMED: MQTT 3.1 unsupported → close)
    conn, _, sent = Rig().open("old", level=3, protocol_name="MQIsdp")
    assert conn.closed and sent == []
    _, _, sent = Rig(BrokerSettings(explain_refusals=True)).open("old", level=3,
                                                                protocol_name="MQIsdp")
    assert sent == [Connack(False, 1)]


@pytest.mark.parametrize(("level", "expected"), [(4, []), (5, [0x9B])])
def test_will_with_qos_2_is_refused(level: int, expected: list[int]) -> None:
    # spec broker §1.3: Will QoS 2 → 3.1.1 TCP close, MQTT 5 CONNACK 0x9B
    conn, _, sent = Rig().open("w", level=level, will=Will("w/t", b"x", qos=2))
    assert conn.closed
    assert [p.reason_code for p in sent] == expected


def test_unauthorized_will_topic_refuses_the_connect() -> None:
    # spec broker §1.3: a Will topic that is not authorized makes the CONNECT fail
    doc = policy(allow("iot:Connect", "*"), allow("iot:Publish", arn("topic", "ok/*")))
    conn, _events, sent = Rig(policies=(doc,)).open("w", level=5, will=Will("no/x", b"x"))
    assert sent[0].reason_code == 0x87 and conn.closed
    _, _, sent = Rig(policies=(doc,)).open("w", level=5, will=Will("ok/x", b"x"))
    assert sent[0].reason_code == 0


def test_persistent_and_will_connect_attributes_reach_the_policy() -> None:
    # spec broker §1.3 / §3.5: iot:ConnectAttributes PersistentConnect and LastWill
    doc = policy({"Effect": "Allow", "Action": "iot:Connect", "Resource": "*",
                  "Condition": {"ForAllValues:StringEquals": {
                      "iot:ConnectAttributes": ["LastWill"]}}},
                 allow("iot:Publish", "*"))
    _, _, sent = Rig(policies=(doc,)).open("p", clean_start=False)
    assert sent == []  # PersistentConnect is not in the allowed set: refused
    _, _, sent = Rig(policies=(doc,)).open("p", clean_start=True, will=Will("a/b", b"x"))
    assert sent[0].reason_code == 0


@pytest.mark.parametrize("level", [4, 5])
def test_second_connect_is_a_client_error(level: int) -> None:
    # spec broker §1.1: a second CONNECT → disconnect, lifecycle CLIENT_ERROR
    rig = Rig()
    conn, _, _ = rig.open(level=level)
    events, sent = rig.feed(conn, Connect(level, "c1"))
    closed = closed_event(events)
    assert closed.reason is DisconnectReason.CLIENT_ERROR and closed.will is None
    if level == 5:
        assert isinstance(sent[-1], Disconnect) and sent[-1].reason_code == 0x82


def test_packets_sent_before_connack_are_handled_after_admission() -> None:
    # spec broker §1.1 (packet order): nothing is lost when a client pipelines
    rig = Rig()
    conn = Connection(rig.settings, rig.store, now=rig.clock.now)
    events = conn.receive_data(encode(Connect(4, "pipe"), 4) + encode(Pingreq(), 4))
    assert isinstance(events[0], ConnectRequested)
    request = events[0].request
    assert conn.authorize(rig.auth.authorization(rig.principal, "pipe", source_ip=None,
                                                 domain_name=None,
                                                 connect_attributes=frozenset())) is None
    session, present = rig.store.open("pipe", 4, clean_start=True, expiry_interval=0,
                                      now=rig.clock.now())
    conn.accept(session, present)
    assert request.client_id == "pipe"
    assert rig.sent(conn) == [Connack(False, 0), Pingresp()]


# -- PUBLISH --------------------------------------------------------------------------------------

@pytest.mark.parametrize(("level", "code"), [(4, None), (5, 0x9B)])
def test_qos2_publish_closes_the_connection(level: int, code: int | None) -> None:
    # spec broker §1.4: 3.1.1 close; MQTT 5 DISCONNECT 0x9B
    rig = Rig()
    conn, _, _ = rig.open(level=level)
    events, sent = rig.feed(conn, Publish("a/b", b"x", qos=2, packet_id=1))
    assert closed_event(events).reason is DisconnectReason.CLIENT_ERROR
    assert [p.reason_code for p in sent if isinstance(p, Disconnect)] == ([code] if code else [])


def test_unauthorized_publish_closes_a_311_connection_with_auth_error_and_will() -> None:
    # spec broker §1.9, §7 item 2
    doc = policy(allow("iot:Connect", "*"), allow("iot:Publish", arn("topic", "will/*")))
    rig = Rig(policies=(doc,))
    conn, _, _ = rig.open(will=Will("will/x", b"gone"))
    events, sent = rig.feed(conn, Publish("other", b"x", qos=1, packet_id=1))
    closed = closed_event(events)
    assert closed.reason is DisconnectReason.AUTH_ERROR
    assert closed.will is not None and closed.will.message.payload == b"gone"
    assert sent == []  # no PUBACK


def test_unauthorized_mqtt5_publish_gets_puback_0x87_and_qos0_is_dropped_silently() -> None:
    # spec broker §1.9 (MQTT 5: PUBACK 0x87, QoS 0 silent drop; UNCONFIRMED defaults)
    doc = policy(allow("iot:Connect", "*"))
    rig = Rig(policies=(doc,))
    conn, _, _ = rig.open(level=5)
    events, sent = rig.feed(conn, Publish("a", b"x", qos=1, packet_id=7), Publish("a", b"y"))
    assert sent == [Puback(7, 0x87)]
    assert [type(e) for e in events] == [PublishDropped, PublishDropped]
    assert not conn.closed


def test_payload_limit_is_128_kib() -> None:
    # spec broker §1.8: 128 KB payload; larger → disconnect CLIENT_ERROR
    rig = Rig()
    conn, _, _ = rig.open(level=5)
    events, _ = rig.feed(conn, Publish("big", b"x" * 131072, qos=1, packet_id=1))
    assert isinstance(events[0], MessageReceived)
    events, sent = rig.feed(conn, Publish("big", b"x" * 131073, qos=1, packet_id=2))
    assert closed_event(events).reason is DisconnectReason.CLIENT_ERROR
    assert sent[-1] == Disconnect(0x95, sent[-1].properties)


@pytest.mark.parametrize(("topic", "ok"), [
    ("a/b/c/d/e/f/g/h", True),  # 7 slashes
    ("a/b/c/d/e/f/g/h/i", False),  # 8 slashes
    ("/b/c/d/e/f/g/h", True),  # a leading slash counts: 7
    ("x" * 256, True),
    ("x" * 257, False),
    ("$aws/rules/myrule/a/b/c/d/e/f/g/h", True),  # Basic Ingest prefix not counted
])
def test_topic_size_and_slash_limits_on_publish(topic: str, ok: bool) -> None:
    # spec broker §1.5 / §7 item 8; MQTT 5: PUBACK 0x90 for a QoS 1 PUBLISH
    rig = Rig()
    conn, _, _ = rig.open(level=5)
    events, sent = rig.feed(conn, Publish(topic, b"x", qos=1, packet_id=3))
    if ok:
        assert isinstance(events[0], MessageReceived) and sent == [Puback(3)]
    else:
        assert sent == [Puback(3, 0x90)]


def test_invalid_topic_closes_a_311_connection() -> None:
    # spec broker §1.5 (UNCONFIRMED default: 3.1.1 close)
    rig = Rig()
    conn, _, _ = rig.open()
    events, _ = rig.feed(conn, Publish("a/+/b", b"x"))
    assert closed_event(events).reason is DisconnectReason.CLIENT_ERROR


def test_topic_alias_is_resolved_and_an_alias_above_8_disconnects() -> None:
    # spec broker §1.7: alias above the maximum → DISCONNECT 0x94
    rig = Rig()
    conn, _, _ = rig.open(level=5)
    events, _ = rig.feed(conn, Publish("t/1", b"a", properties={"topic_alias": 3}),
                         Publish("", b"b", properties={"topic_alias": 3}))
    assert [e.message.topic for e in events] == ["t/1", "t/1"]
    events, sent = rig.feed(conn, Publish("t/2", b"c", properties={"topic_alias": 9}))
    assert closed_event(events).reason is DisconnectReason.CLIENT_ERROR
    assert sent[-1].reason_code == 0x94


def test_mqtt5_properties_pass_through_and_response_topic_must_be_a_name() -> None:
    # spec broker §1.7: Response Topic (no wildcards), Correlation Data, User Property passed on
    rig = Rig()
    conn, _, _ = rig.open(level=5)
    props = {"response_topic": "reply/me", "correlation_data": b"42",
             "user_property": [("a", "1"), ("b", "2")], "content_type": "text/plain"}
    events, _ = rig.feed(conn, Publish("p", b"x", properties=dict(props)))
    assert dict(events[0].message.properties) == props
    events, sent = rig.feed(conn, Publish("p", b"x", properties={"response_topic": "r/#"}))
    assert closed_event(events).reason is DisconnectReason.CLIENT_ERROR
    assert sent[-1].reason_code == 0x82


def test_message_expiry_is_clamped_between_1_and_604800() -> None:
    # spec broker §1.7
    rig = Rig()
    conn, _, _ = rig.open(level=5)
    before = rig.clock.now()
    events, _ = rig.feed(conn, Publish("e", b"1", properties={"message_expiry_interval": 0}),
                         Publish("e", b"2", properties={"message_expiry_interval": 10**7}))
    first, second = (e.message.expires_at - before for e in events)
    assert 1 <= first < 2
    assert 604800 <= second < 604801


def test_publish_rate_per_connection_discards_the_excess() -> None:
    # spec broker §1.8: 100 publish requests/s per connection, excess discarded
    rig = Rig()
    conn, _, _ = rig.open(level=5)
    events, sent = rig.feed(conn, *[Publish("r", b"x", qos=1, packet_id=i + 1)
                                    for i in range(150)])
    throttled = [e for e in events if isinstance(e, PublishDropped) and e.why == "throttled"]
    assert 40 <= len(throttled) <= 50
    assert sum(1 for p in sent if p.reason_code == 0x97) == len(throttled)
    rig.clock.advance(1.0)
    events, _ = rig.feed(conn, Publish("r", b"x"))
    assert isinstance(events[0], MessageReceived)


@pytest.mark.parametrize("packet", [Pubrel(1), Publish("a", b"", qos=2, packet_id=1)])
def test_qos2_flow_packets_are_client_errors(packet: Packet) -> None:
    # spec broker §1.1: PUBREC/PUBREL/PUBCOMP unsupported
    rig = Rig()
    conn, _, _ = rig.open(level=4)
    events, _ = rig.feed(conn, packet)
    assert closed_event(events).reason is DisconnectReason.CLIENT_ERROR


def test_disconnect_with_will_reason_publishes_the_will() -> None:
    # spec broker §1.3: Will on every disconnect not initiated by a client DISCONNECT;
    # MQTT 5 reason 0x04 asks for it explicitly
    rig = Rig()
    conn, _, _ = rig.open(level=5, will=Will("w", b"bye"))
    events, _ = rig.feed(conn, Disconnect(0x04))
    closed = closed_event(events)
    assert closed.reason is DisconnectReason.CLIENT_INITIATED_DISCONNECT and closed.will
    conn, _, _ = rig.open("c2", level=5, will=Will("w", b"bye"))
    events, _ = rig.feed(conn, Disconnect(0))
    assert closed_event(events).will is None


def test_disconnect_cannot_raise_session_expiry_from_zero() -> None:
    # spec broker §1.3: SEI 0 cannot be raised on DISCONNECT (protocol error)
    rig = Rig()
    conn, _, _ = rig.open(level=5)
    events, sent = rig.feed(conn, Disconnect(0, {"session_expiry_interval": 60}))
    assert closed_event(events).reason is DisconnectReason.CLIENT_ERROR
    assert sent[-1].reason_code == 0x82


# -- SUBSCRIBE ------------------------------------------------------------------------------------

def test_subscribe_qos2_closes_311_and_is_downgraded_on_mqtt5() -> None:
    # spec broker §1.4 (UNCONFIRMED defaults, both switchable)
    rig = Rig()
    conn, _, _ = rig.open()
    events, sent = rig.feed(conn, Subscribe(1, [Subscription("a", 2)]))
    assert closed_event(events) and sent == []
    conn, _, _ = rig.open("c5", level=5)
    _, sent = rig.feed(conn, Subscribe(1, [Subscription("a", 2)]))
    assert sent == [Suback(1, [1])]
    rig = Rig(BrokerSettings(subscribe_qos2_311=Qos2Subscribe.DOWNGRADE))
    conn, _, _ = rig.open()
    _, sent = rig.feed(conn, Subscribe(1, [Subscription("a", 2)]))
    assert sent == [Suback(1, [1])]


def test_subscription_identifier_gets_disconnect_0xa1() -> None:
    # spec broker §1.7
    rig = Rig()
    conn, _, _ = rig.open(level=5)
    events, sent = rig.feed(conn, Subscribe(1, [Subscription("a", 1)],
                                            {"subscription_identifier": [4]}))
    assert closed_event(events) and sent[-1].reason_code == 0xA1


@pytest.mark.parametrize("level", [4, 5])
def test_more_than_8_filters_in_one_subscribe(level: int) -> None:
    # spec broker §1.8 (UNCONFIRMED: 3.1.1 close; MQTT 5 SUBACK 0x97 for all)
    rig = Rig()
    conn, _, _ = rig.open(level=level)
    _, sent = rig.feed(conn, Subscribe(1, [Subscription(f"f/{i}", 1) for i in range(8)]))
    assert sent == [Suback(1, [1] * 8)]
    _events, sent = rig.feed(conn, Subscribe(2, [Subscription(f"g/{i}", 1) for i in range(9)]))
    if level == 4:
        assert conn.closed and sent == []
    else:
        assert sent == [Suback(2, [0x97] * 9)] and not conn.closed


@pytest.mark.parametrize("level", [4, 5])
def test_fifty_subscriptions_per_connection(level: int) -> None:
    # spec broker §1.8: 50 subscriptions per connection
    rig = Rig()
    conn, _, _ = rig.open(level=level)
    for batch in range(6):
        _, sent = rig.feed(conn, Subscribe(batch + 1, [Subscription(f"s/{batch}/{i}", 0)
                                                       for i in range(8)]))
    _, sent = rig.feed(conn, Subscribe(9, [Subscription(f"t/{i}", 0) for i in range(2)]))
    assert sent == [Suback(9, [0, 0])]  # 50 now
    _, sent = rig.feed(conn, Subscribe(10, [Subscription("s/0/0", 1)]))
    assert sent == [Suback(10, [1])]  # replacing an existing one is fine
    _events, sent = rig.feed(conn, Subscribe(11, [Subscription("u/1", 0)]))
    if level == 4:
        assert conn.closed
    else:
        assert sent == [Suback(11, [0x97])]


def test_unauthorized_subscribe_closes_311_and_gets_0x87_on_mqtt5() -> None:
    # spec broker §1.9 / §7 item 25 (both UNCONFIRMED defaults)
    doc = policy(allow("iot:Connect", "*"), allow("iot:Subscribe", arn("topicfilter", "ok/*")),
                 allow("iot:Publish", arn("topic", "w")))
    rig = Rig(policies=(doc,))
    conn, _, _ = rig.open(will=Will("w", b"x"))
    events, sent = rig.feed(conn, Subscribe(1, [Subscription("ok/a", 1),
                                                Subscription("no/a", 1)]))
    closed = closed_event(events)
    assert closed.reason is DisconnectReason.AUTH_ERROR and sent == []
    conn, _, _ = rig.open("c5", level=5)
    events, sent = rig.feed(conn, Subscribe(1, [Subscription("ok/a", 1),
                                                Subscription("no/a", 1)]))
    assert sent == [Suback(1, [1, 0x87])]
    subscribed = next(e for e in events if isinstance(e, Subscribed))
    assert [f for f, _, _ in subscribed.granted] == ["ok/a"]


def test_subscribe_checks_the_literal_filter_string() -> None:
    # spec broker §3.3 / §7 item 4: topicfilter/a/* allows "a/#", topicfilter/a/+ does not
    doc = policy(allow("iot:Connect", "*"), allow("iot:Subscribe", arn("topicfilter", "a/*")))
    rig = Rig(policies=(doc,))
    conn, _, _ = rig.open(level=5)
    _, sent = rig.feed(conn, Subscribe(1, [Subscription("a/#", 1), Subscription("b/#", 1)]))
    assert sent == [Suback(1, [1, 0x87])]


def test_unsubscribe_with_nine_filters_gets_no_unsuback_on_311() -> None:
    # spec broker §6 (UNSUBSCRIBE with 9 filters gets no UNSUBACK)
    rig = Rig()
    conn, _, _ = rig.open()
    _, sent = rig.feed(conn, Unsubscribe(1, ["a"]))
    assert sent == [Unsuback(1)]
    _, sent = rig.feed(conn, Unsubscribe(2, [f"x/{i}" for i in range(9)]))
    assert sent == [] and conn.closed


# -- outbound QoS 1 window ------------------------------------------------------------------------

def test_outbound_qos1_window_holds_100_and_acks_release_the_rest() -> None:
    # spec broker §1.4: at most 100 unacknowledged QoS 1 messages to a client
    rig = Rig()
    conn, _, _ = rig.open(level=4)
    statuses = [conn.deliver(Delivery(Message("q", str(i).encode(), 1), 1)) for i in range(150)]
    assert statuses.count(DeliveryStatus.SENT) == 100
    assert statuses.count(DeliveryStatus.QUEUED) == 50
    sent = rig.sent(conn)
    assert len(sent) == 100
    _, more = rig.feed(conn, *[Puback(p.packet_id) for p in sent[:30]])
    assert [p.payload for p in more] == [str(i).encode() for i in range(100, 130)]


def test_mqtt5_client_receive_maximum_narrows_the_window() -> None:
    # MQTT 5 Receive Maximum from the client bounds our in-flight window
    rig = Rig()
    conn, _, _ = rig.open(level=5, properties={"receive_maximum": 3})
    statuses = [conn.deliver(Delivery(Message("q", b"x", 1), 1)) for _ in range(5)]
    assert statuses.count(DeliveryStatus.SENT) == 3


def test_missing_receive_permission_denies_delivery_silently() -> None:
    # spec broker §1.9 / §7 item 3
    doc = policy(allow("iot:Connect", "*"), allow("iot:Receive", arn("topic", "yes")))
    rig = Rig(policies=(doc,))
    conn, _, _ = rig.open()
    assert conn.deliver(Delivery(Message("no", b"x"), 0)) is DeliveryStatus.DENIED
    assert conn.deliver(Delivery(Message("yes", b"x"), 0)) is DeliveryStatus.SENT
    assert not conn.closed


# -- robustness -----------------------------------------------------------------------------------

@given(st.binary(max_size=300), st.integers(min_value=1, max_value=64))
@settings(max_examples=150, suppress_health_check=[HealthCheck.too_slow], deadline=None)
def test_random_bytes_after_connect_only_ever_produce_events(data: bytes, chunk: int) -> None:
    # spec broker §1.1 (malformed packets) / design principle 6: bad input → clean close
    rig = Rig(BrokerSettings(publish_rate_per_connection=None))
    conn, _, _ = rig.open(level=5)
    for i in range(0, len(data), chunk):
        for event in conn.receive_data(data[i:i + chunk]):
            assert isinstance(event, (MessageReceived, PublishDropped, Subscribed, Closed,
                                      type(event)))
    rig.sent(conn)  # whatever was sent decodes


@given(st.lists(st.sampled_from(["a", "b/c", "d"]), min_size=1, max_size=8),
       st.integers(min_value=1, max_value=9))
@settings(max_examples=40, deadline=None)
def test_chunking_never_changes_what_a_stream_means(topics: list[str], chunk: int) -> None:
    # the decoder buffers partial packets: any split of the stream yields the same messages
    stream = b"".join(encode(Publish(t, t.encode(), 1, packet_id=i + 1), MQTT_5)
                      for i, t in enumerate(topics))
    rig = Rig(BrokerSettings(publish_rate_per_connection=None))
    conn, _, _ = rig.open(level=5)
    got = []
    for i in range(0, len(stream), chunk):
        got += [e.message.topic for e in conn.receive_data(stream[i:i + chunk])
                if isinstance(e, MessageReceived)]
    assert got == topics


def test_no_matching_subscribers_puback_only_when_switched_on() -> None:
    # spec broker §1.7 (UNCONFIRMED: PUBACK 0x10 never sent by default)
    rig = Rig()
    conn, _, _ = rig.open(level=5)
    _, sent = rig.feed(conn, Publish("nobody", b"x", 1, packet_id=1))
    assert sent == [Puback(1)]
    rig = Rig(BrokerSettings(send_no_matching_subscribers=True))
    conn, _, _ = rig.open(level=5)
    _, sent = rig.feed(conn, Publish("nobody", b"x", 1, packet_id=1))
    assert sent == [Puback(1, 0x10)]


def test_shared_subscription_is_authorized_on_the_full_filter_string() -> None:
    # spec broker §3.2 (UNCONFIRMED: the resource is the full $share/<group>/<filter>)
    doc = policy(allow("iot:Connect", "*"), allow("iot:Subscribe", arn("topicfilter", "s/*")))
    rig = Rig(policies=(doc,))
    conn, _, _ = rig.open(level=5)
    _, sent = rig.feed(conn, Subscribe(1, [Subscription("$share/g/s/t", 1)]))
    assert sent == [Suback(1, [0x87])]
    rig = Rig(BrokerSettings(shared_subscribe_checks_full_filter=False), policies=(doc,))
    conn, _, _ = rig.open(level=5)
    _, sent = rig.feed(conn, Subscribe(1, [Subscription("$share/g/s/t", 1)]))
    assert sent == [Suback(1, [1])]
