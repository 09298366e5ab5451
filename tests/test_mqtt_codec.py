"""The sans-I/O MQTT 3.1.1 / 5.0 codec: round trips, malformed input, golden bytes.

Spec: iot-broker-and-policy.md §1.1 (malformed packets disconnect), §1.7 (MQTT 5
properties), §1.8 (packet size), plus the OASIS MQTT 3.1.1 and 5.0 wire formats.
"""

from __future__ import annotations

import struct
from typing import Any

import paho.mqtt.client as paho
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from paho.mqtt.packettypes import PacketTypes
from paho.mqtt.properties import Properties as PahoProperties
from paho.mqtt.subscribeoptions import SubscribeOptions

from harness.emulator.mqtt.codec import Decoder, decode_packet, encode
from harness.emulator.mqtt.packets import (
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
    Suback,
    Subscribe,
    Subscription,
    Unsuback,
    Unsubscribe,
    Will,
)

FAST = settings(max_examples=40, deadline=None,
                suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large])

# ---------------------------------------------------------------------------
# Strategies: valid packets of every type, MQTT 5 properties included
# ---------------------------------------------------------------------------

texts = st.text(st.characters(exclude_categories=["Cs"], exclude_characters="\x00"), max_size=12)
binaries = st.binary(max_size=16)
packet_ids = st.integers(1, 0xFFFF)
u16 = st.integers(0, 0xFFFF)
u32 = st.integers(0, 0xFFFFFFFF)
flag = st.integers(0, 1)

PROPERTY_VALUES: dict[str, st.SearchStrategy[Any]] = {
    "payload_format_indicator": flag,
    "message_expiry_interval": u32,
    "content_type": texts,
    "response_topic": texts,
    "correlation_data": binaries,
    "subscription_identifier": st.lists(st.integers(1, 268_435_455), min_size=1, max_size=3),
    "session_expiry_interval": u32,
    "assigned_client_identifier": texts,
    "server_keep_alive": u16,
    "authentication_method": texts,
    "authentication_data": binaries,
    "request_problem_information": flag,
    "will_delay_interval": u32,
    "request_response_information": flag,
    "response_information": texts,
    "server_reference": texts,
    "reason_string": texts,
    "receive_maximum": st.integers(1, 0xFFFF),
    "topic_alias_maximum": u16,
    "topic_alias": st.integers(1, 0xFFFF),
    "maximum_qos": flag,
    "retain_available": flag,
    "user_property": st.lists(st.tuples(texts, texts), min_size=1, max_size=3),
    "maximum_packet_size": st.integers(1, 0xFFFFFFFF),
    "wildcard_subscription_available": flag,
    "subscription_identifier_available": flag,
    "shared_subscription_available": flag,
}

# MQTT 5.0 §2.2.2.2: which properties each packet may carry (written out independently
# of the codec's table, so each checks the other).
_ACK_PROPS = ["reason_string", "user_property"]
ALLOWED_PROPERTIES: dict[str, list[str]] = {
    "CONNECT": ["session_expiry_interval", "authentication_method", "authentication_data",
                "request_problem_information", "request_response_information",
                "receive_maximum", "topic_alias_maximum", "user_property", "maximum_packet_size"],
    "WILL": ["payload_format_indicator", "message_expiry_interval", "content_type",
             "response_topic", "correlation_data", "will_delay_interval", "user_property"],
    "CONNACK": ["session_expiry_interval", "assigned_client_identifier", "server_keep_alive",
                "authentication_method", "authentication_data", "response_information",
                "server_reference", "reason_string", "receive_maximum", "topic_alias_maximum",
                "maximum_qos", "retain_available", "user_property", "maximum_packet_size",
                "wildcard_subscription_available", "subscription_identifier_available",
                "shared_subscription_available"],
    "PUBLISH": ["payload_format_indicator", "message_expiry_interval", "content_type",
                "response_topic", "correlation_data", "subscription_identifier", "topic_alias",
                "user_property"],
    "ACK": _ACK_PROPS,
    "SUBSCRIBE": ["subscription_identifier", "user_property"],
    "SUBACK": _ACK_PROPS,
    "UNSUBSCRIBE": ["user_property"],
    "UNSUBACK": _ACK_PROPS,
    "DISCONNECT": ["session_expiry_interval", "server_reference", "reason_string",
                   "user_property"],
    "AUTH": ["authentication_method", "authentication_data", "reason_string", "user_property"],
}

CONNACK_CODES = [0x00, 0x80, 0x81, 0x82, 0x83, 0x84, 0x85, 0x86, 0x87, 0x88, 0x89, 0x8A, 0x8C,
                 0x90, 0x95, 0x97, 0x99, 0x9A, 0x9B, 0x9C, 0x9D, 0x9F]
PUBACK_CODES = [0x00, 0x10, 0x80, 0x83, 0x87, 0x90, 0x91, 0x97, 0x99]
PUBREL_CODES = [0x00, 0x92]
SUBACK_CODES = [0x00, 0x01, 0x02, 0x80, 0x83, 0x87, 0x8F, 0x91, 0x97, 0x9E, 0xA1, 0xA2]
UNSUBACK_CODES = [0x00, 0x11, 0x80, 0x83, 0x87, 0x8F, 0x91]
DISCONNECT_CODES = [0x00, 0x04, 0x80, 0x81, 0x82, 0x83, 0x87, 0x89, 0x8B, 0x8D, 0x8E, 0x8F, 0x90,
                    0x93, 0x94, 0x95, 0x96, 0x97, 0x98, 0x99, 0x9A, 0x9B, 0x9C, 0x9D, 0x9E, 0x9F,
                    0xA0, 0xA1, 0xA2]
AUTH_CODES = [0x00, 0x18, 0x19]


def properties(context: str, version: int) -> st.SearchStrategy[dict[str, Any]]:
    if version != 5:
        return st.just({})
    optional = {name: PROPERTY_VALUES[name] for name in ALLOWED_PROPERTIES[context]}
    if context == "SUBSCRIBE":  # at most one Subscription Identifier in a SUBSCRIBE
        optional["subscription_identifier"] = st.lists(
            st.integers(1, 268_435_455), min_size=1, max_size=1)
    return st.fixed_dictionaries({}, optional=optional)  # type: ignore[arg-type]


@st.composite
def connects(draw: st.DrawFn, version: int) -> Connect:
    username = draw(st.none() | texts)
    password = draw(st.none() | binaries) if username is not None or version == 5 else None
    will = None
    if draw(st.booleans()):
        will = Will(draw(texts), draw(binaries), draw(st.integers(0, 2)), draw(st.booleans()),
                    draw(properties("WILL", version)))
    return Connect(version, draw(texts), draw(st.booleans()), draw(u16), username, password,
                   will, draw(properties("CONNECT", version)), "MQIsdp" if version == 3 else "MQTT")


@st.composite
def connacks(draw: st.DrawFn, version: int) -> Connack:
    code = draw(st.sampled_from(CONNACK_CODES) if version == 5 else st.integers(0, 5))
    present = draw(st.booleans()) and code == 0
    return Connack(present, code, draw(properties("CONNACK", version)))


@st.composite
def publishes(draw: st.DrawFn, version: int) -> Publish:
    qos = draw(st.integers(0, 2))
    props = draw(properties("PUBLISH", version))
    topic = draw(texts if "topic_alias" in props else texts.filter(bool))
    return Publish(topic, draw(st.binary(max_size=300)), qos, draw(st.booleans()),
                   draw(st.booleans()) and qos > 0, draw(packet_ids) if qos else None, props)


def acks(cls: type[Any], codes: list[int], version: int) -> st.SearchStrategy[Any]:
    code = st.sampled_from(codes) if version == 5 else st.just(0)
    return st.builds(cls, packet_ids, code, properties("ACK", version))


@st.composite
def subscribes(draw: st.DrawFn, version: int) -> Subscribe:
    subs = []
    for _ in range(draw(st.integers(1, 4))):
        topic_filter = draw(texts | st.sampled_from(["a/+", "$share/g/a/#", "#"]))
        if version == 5:
            no_local = draw(st.booleans()) and not topic_filter.startswith("$share/")
            subs.append(Subscription(topic_filter, draw(st.integers(0, 2)), no_local,
                                     draw(st.booleans()), draw(st.integers(0, 2))))
        else:
            subs.append(Subscription(topic_filter, draw(st.integers(0, 2))))
    return Subscribe(draw(packet_ids), subs, draw(properties("SUBSCRIBE", version)))


def subacks(version: int) -> st.SearchStrategy[Suback]:
    codes = st.sampled_from(SUBACK_CODES if version == 5 else [0, 1, 2, 0x80])
    return st.builds(Suback, packet_ids, st.lists(codes, min_size=1, max_size=8),
                     properties("SUBACK", version))


def unsubacks(version: int) -> st.SearchStrategy[Unsuback]:
    if version != 5:
        return st.builds(Unsuback, packet_ids)
    return st.builds(Unsuback, packet_ids,
                     st.lists(st.sampled_from(UNSUBACK_CODES), min_size=1, max_size=8),
                     properties("UNSUBACK", version))


def disconnects(version: int) -> st.SearchStrategy[Disconnect]:
    if version != 5:
        return st.just(Disconnect())
    return st.builds(Disconnect, st.sampled_from(DISCONNECT_CODES),
                     properties("DISCONNECT", version))


def packet_strategy(kind: str, version: int) -> st.SearchStrategy[Any]:
    return {
        "CONNECT": lambda: connects(version),
        "CONNACK": lambda: connacks(version),
        "PUBLISH": lambda: publishes(version),
        "PUBACK": lambda: acks(Puback, PUBACK_CODES, version),
        "PUBREC": lambda: acks(Pubrec, PUBACK_CODES, version),
        "PUBREL": lambda: acks(Pubrel, PUBREL_CODES, version),
        "PUBCOMP": lambda: acks(Pubcomp, PUBREL_CODES, version),
        "SUBSCRIBE": lambda: subscribes(version),
        "SUBACK": lambda: subacks(version),
        "UNSUBSCRIBE": lambda: st.builds(Unsubscribe, packet_ids,
                                         st.lists(texts, min_size=1, max_size=4),
                                         properties("UNSUBSCRIBE", version)),
        "UNSUBACK": lambda: unsubacks(version),
        "PINGREQ": lambda: st.just(Pingreq()),
        "PINGRESP": lambda: st.just(Pingresp()),
        "DISCONNECT": lambda: disconnects(version),
        "AUTH": lambda: st.builds(Auth, st.sampled_from(AUTH_CODES), properties("AUTH", 5)),
    }[kind]()


KINDS = ["CONNECT", "CONNACK", "PUBLISH", "PUBACK", "PUBREC", "PUBREL", "PUBCOMP", "SUBSCRIBE",
         "SUBACK", "UNSUBSCRIBE", "UNSUBACK", "PINGREQ", "PINGRESP", "DISCONNECT", "AUTH"]
CASES = [(kind, v) for v in (4, 5) for kind in KINDS if (kind, v) != ("AUTH", 4)]


def any_packet(version: int) -> st.SearchStrategy[Any]:
    return st.one_of([packet_strategy(k, version) for k in KINDS
                      if k != "CONNECT" and (k, version) != ("AUTH", 4)])


def frame(b1: int, body: bytes) -> bytes:
    """A packet with a correct remaining length around a hand-made body."""
    length, out = len(body), bytearray()
    while True:
        byte, length = length & 0x7F, length >> 7
        out.append(byte | (0x80 if length else 0))
        if not length:
            return bytes([b1]) + bytes(out) + body


def s(text: str | bytes) -> bytes:
    raw = text.encode() if isinstance(text, str) else text
    return struct.pack(">H", len(raw)) + raw


CONNECT_311 = encode(Connect(4, "dev"), 4)
CONNECT_5 = encode(Connect(5, "dev"), 5)


def malformed(data: bytes, protocol_level: int | None = None) -> MalformedPacket:
    decoder = Decoder(protocol_level=protocol_level)
    with pytest.raises(MalformedPacket) as info:
        decoder.feed(data)
    return info.value


# ---------------------------------------------------------------------------
# Round trips
# ---------------------------------------------------------------------------


# MQTT 3.1.1 and 5.0 wire formats; spec broker §1.1 (both versions), §1.7 (properties)
@pytest.mark.parametrize(("kind", "version"), CASES)
@FAST
@given(data=st.data())
def test_every_packet_type_round_trips_in_both_versions(kind: str, version: int,
                                                         data: st.DataObject) -> None:
    packet = data.draw(packet_strategy(kind, version))
    assert decode_packet(encode(packet, version), version) == packet


# spec broker §1.1 (MQTT 3.1 is level 3, "MQIsdp": decoded so the broker can refuse it)
@FAST
@given(connect=connects(3))
def test_mqtt_31_connect_round_trips_and_sets_level_3(connect: Connect) -> None:
    decoder = Decoder()
    assert decoder.feed(encode(connect, 3)) == [connect]
    assert decoder.protocol_level == 3


# spec broker §1.1: a stream of packets arrives in arbitrary TCP segments
@pytest.mark.parametrize("version", [4, 5])
@FAST
@given(data=st.data())
def test_a_stream_split_anywhere_decodes_to_the_same_packets(version: int,
                                                              data: st.DataObject) -> None:
    connect = data.draw(connects(version))
    packets = [connect, *data.draw(st.lists(any_packet(version), max_size=6))]
    wire = b"".join(encode(p, version) for p in packets)
    cuts = sorted(data.draw(st.lists(st.integers(0, len(wire)), max_size=8)))
    decoder = Decoder()
    decoded: list[Packet] = []
    for start, stop in zip([0, *cuts], [*cuts, len(wire)], strict=True):
        decoded += decoder.feed(wire[start:stop])
    assert decoded == packets
    assert decoder.protocol_level == version
    assert decoder.buffered == 0


# ---------------------------------------------------------------------------
# Fuzz: the decoder only ever returns packets or raises MalformedPacket
# ---------------------------------------------------------------------------


def _feed_in_chunks(decoder: Decoder, wire: bytes, cuts: list[int]) -> list[Packet]:
    out: list[Packet] = []
    try:
        for start, stop in zip([0, *cuts], [*cuts, len(wire)], strict=True):
            out += decoder.feed(wire[start:stop])
    except MalformedPacket as exc:
        assert exc.reason_code in (0x81, 0x82, 0x84, 0x94, 0x95)
        with pytest.raises(MalformedPacket):  # unusable from now on
            decoder.feed(b"\xc0\x00")
    return out


def _still_round_trips(packets: list[Packet], level: int) -> None:
    for packet in packets:
        version = packet.protocol_level if isinstance(packet, Connect) else level
        assert decode_packet(encode(packet, version), version) == packet


# spec broker §1.1 / design principle 6: bad input gets a clear error, nothing else
@settings(max_examples=150, deadline=None)
@given(wire=st.binary(max_size=200), level=st.sampled_from([None, 3, 4, 5]),
       cuts=st.lists(st.integers(0, 200), max_size=6).map(sorted))
def test_random_bytes_only_yield_packets_or_malformed_packet(
        wire: bytes, level: int | None, cuts: list[int]) -> None:
    cuts = [c for c in cuts if c <= len(wire)]
    decoder = Decoder(max_packet_size=150, protocol_level=level)
    packets = _feed_in_chunks(decoder, wire, cuts)
    _still_round_trips(packets, decoder.protocol_level or 4)


# spec broker §1.1: truncated and bit-flipped packets never crash or hang the decoder
@pytest.mark.parametrize("version", [4, 5])
@settings(max_examples=100, deadline=None,
          suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large])
@given(data=st.data())
def test_mutated_valid_packets_only_yield_packets_or_malformed_packet(
        version: int, data: st.DataObject) -> None:
    packets = [data.draw(connects(version)), *data.draw(st.lists(any_packet(version),
                                                                 max_size=3))]
    wire = bytearray(b"".join(encode(p, version) for p in packets))
    for position in data.draw(st.lists(st.integers(0, len(wire) * 8 - 1), max_size=4)):
        wire[position // 8] ^= 1 << (position % 8)
    wire = wire[: data.draw(st.integers(0, len(wire)))]
    cuts = sorted(data.draw(st.lists(st.integers(0, len(wire)), max_size=5)))
    decoder = Decoder()
    decoded = _feed_in_chunks(decoder, bytes(wire), cuts)
    _still_round_trips(decoded, decoder.protocol_level or version)


# ---------------------------------------------------------------------------
# Fixed header and stream rules
# ---------------------------------------------------------------------------


# spec broker §1.1 (mqtt_client#312: UNSUBSCRIBE without flags 0010 -> CLIENT_ERROR disconnect)
@pytest.mark.parametrize("version", [4, 5])
@pytest.mark.parametrize("b1", [0x80, 0xA0, 0x60, 0x83, 0xA8])
def test_subscribe_unsubscribe_pubrel_without_flags_0010_are_malformed(b1: int,
                                                                       version: int) -> None:
    body = b"\x00\x01" + (b"\x00" if version == 5 else b"") + s("a/b") + b"\x00"
    assert malformed(frame(b1, body), version).reason_code == 0x81


# MQTT 5.0 §2.1.3: reserved flag bits must be 0 for every other packet type
@pytest.mark.parametrize("b1", [0x11, 0x21, 0x41, 0x58, 0x72, 0x91, 0xB4, 0xC1, 0xD8, 0xE2, 0xF1])
def test_other_packets_with_nonzero_flag_bits_are_malformed(b1: int) -> None:
    assert malformed(CONNECT_5 + frame(b1, b"\x00\x01"), None).reason_code == 0x81


# MQTT 3.1.1 §2.2: packet types 0 and 15 are reserved in 3.1.1 (AUTH exists only in 5)
@pytest.mark.parametrize("b1", [0x00, 0xF0])
def test_reserved_packet_types_are_malformed_in_311(b1: int) -> None:
    assert malformed(frame(b1, b""), 4).reason_code == 0x81


# spec broker §1.1: a client must send CONNECT first; detected from the first byte
def test_first_packet_other_than_connect_is_a_protocol_error_from_its_first_byte() -> None:
    assert malformed(b"\x30", None).reason_code == 0x82


# MQTT 5.0 §1.5.5: the remaining length is at most four bytes
def test_remaining_length_of_five_bytes_is_malformed() -> None:
    assert malformed(b"\xc0\xff\xff\xff\xff\x01", 5).reason_code == 0x81


# spec broker §1.8: 128 KB message size; refused from the header, the body never buffered
def test_oversize_packet_is_refused_with_0x95_as_soon_as_its_header_arrives() -> None:
    decoder = Decoder(max_packet_size=1024, protocol_level=4)
    with pytest.raises(MalformedPacket) as info:
        decoder.feed(b"\x30\xff\xff\x7f")
    assert info.value.reason_code == 0x95
    assert decoder.buffered == 0


# spec broker §1.8: the default limit admits a 128 KB payload and refuses more
def test_default_limit_admits_a_128_kb_payload_and_not_much_more() -> None:
    fits = encode(Publish("t", b"x" * 128 * 1024, 1, packet_id=1), 4)
    assert Decoder(protocol_level=4).feed(fits)[0].payload == b"x" * 128 * 1024  # type: ignore
    too_big = encode(Publish("t", b"x" * 140 * 1024), 4)
    assert malformed(too_big[:8], 4).reason_code == 0x95


# spec broker §1.1: a failed connection stays failed (it is being closed)
def test_decoder_is_unusable_after_a_malformed_packet() -> None:
    decoder = Decoder(protocol_level=4)
    with pytest.raises(MalformedPacket):
        decoder.feed(b"\x00\x00")
    with pytest.raises(MalformedPacket) as info:
        decoder.feed(b"\xc0\x00")
    assert info.value.reason_code == 0x81


# slow-loris checks need to see how much of a packet is waiting
def test_buffered_counts_bytes_of_an_incomplete_packet() -> None:
    wire = encode(Publish("a/b", b"payload", 1, packet_id=3), 5)
    decoder = Decoder(protocol_level=5)
    assert decoder.feed(wire[:5]) == []
    assert decoder.buffered == 5
    assert decoder.feed(wire[5:] + b"\xc0") == [Publish("a/b", b"payload", 1, packet_id=3)]
    assert decoder.buffered == 1
    assert decoder.feed(b"\x00") == [Pingreq()]
    assert decoder.buffered == 0


# spec broker §1.1: a second CONNECT is decoded and left to the broker (CLIENT_ERROR)
def test_second_connect_is_decoded_without_changing_the_protocol_level() -> None:
    decoder = Decoder()
    packets = decoder.feed(CONNECT_311 + CONNECT_5)
    assert [p.protocol_level for p in packets] == [4, 5]  # type: ignore[union-attr]
    assert decoder.protocol_level == 4


# MQTT 5.0 §2.1.4: a packet is exactly its fixed header plus Remaining Length bytes
def test_decode_packet_refuses_partial_or_extra_bytes() -> None:
    with pytest.raises(MalformedPacket):
        decode_packet(b"\xc0", 4)
    with pytest.raises(MalformedPacket):
        decode_packet(b"\xc0\x00\xc0\x00", 4)


# ---------------------------------------------------------------------------
# PUBLISH
# ---------------------------------------------------------------------------


# MQTT 3.1.1 §3.3.1.2, 5.0 §3.3.1.2: QoS 3 is malformed
def test_publish_with_qos_3_is_malformed() -> None:
    assert malformed(frame(0x36, s("a") + b"\x00\x01"), 4).reason_code == 0x81


# MQTT 5.0 §3.3.1.1 (MQTT-3.3.1-2): DUP must be 0 on QoS 0
def test_publish_qos_0_with_dup_is_malformed() -> None:
    assert malformed(frame(0x38, s("a") + b"\x00"), 5).reason_code == 0x81


# MQTT 5.0 §2.2.1: packet identifiers are non-zero
def test_publish_qos_1_with_packet_id_0_is_a_protocol_error() -> None:
    assert malformed(frame(0x32, s("a") + b"\x00\x00"), 4).reason_code == 0x82


# MQTT 5.0 §1.5.4: strings are well-formed UTF-8 without U+0000 (surrogates included)
@pytest.mark.parametrize("raw", [b"\xff", b"a\xc0\x80", b"\xed\xa0\x80", b"a\x00b"])
@pytest.mark.parametrize("version", [4, 5])
def test_publish_topic_with_invalid_utf8_or_nul_is_malformed(raw: bytes, version: int) -> None:
    props = b"\x00" if version == 5 else b""
    assert malformed(frame(0x30, s(raw) + props), version).reason_code == 0x81


# MQTT 5.0 §3.3.2.1: an empty topic needs a Topic Alias
def test_mqtt5_publish_with_empty_topic_and_no_alias_is_a_protocol_error() -> None:
    assert malformed(frame(0x30, s("") + b"\x00"), 5).reason_code == 0x82
    with_alias = frame(0x30, s("") + b"\x03\x23\x00\x02" + b"hi")
    assert decode_packet(with_alias, 5) == Publish("", b"hi", properties={"topic_alias": 2})


# spec broker §1.7 / edge case 14: topic alias 0 is invalid (0x94)
def test_publish_topic_alias_0_is_refused_with_0x94() -> None:
    assert malformed(frame(0x30, s("a") + b"\x03\x23\x00\x00"), 5).reason_code == 0x94


# MQTT 5.0 §1.5.4: a string's length prefix must fit inside the packet (spec broker §1.1)
def test_publish_topic_running_past_the_packet_is_malformed() -> None:
    assert malformed(frame(0x30, b"\x00\x09abc"), 4).reason_code == 0x81


# ---------------------------------------------------------------------------
# CONNECT
# ---------------------------------------------------------------------------


def connect_body(name: bytes = b"MQTT", level: int = 4, flags: int = 0x02,
                 rest: bytes = s("dev")) -> bytes:
    props = b"\x00" if level == 5 else b""
    return frame(0x10, s(name) + bytes([level, flags]) + b"\x00\x3c" + props + rest)


# MQTT 3.1.1 §3.1.2.1: the protocol name is "MQTT" ("MQIsdp" for 3.1)
def test_connect_with_unknown_protocol_name_is_a_protocol_error() -> None:
    assert malformed(connect_body(name=b"MQTX")).reason_code == 0x82


# MQTT 5.0 §3.1.2.2 / 3.1.1 §3.1.2.2: unknown level -> CONNACK 0x84 / 0x01, so tell the broker
@pytest.mark.parametrize(("name", "level"), [(b"MQTT", 6), (b"MQTT", 3), (b"MQIsdp", 4)])
def test_connect_with_unsupported_level_is_refused_with_0x84(name: bytes, level: int) -> None:
    assert malformed(connect_body(name=name, level=level)).reason_code == 0x84


# MQTT 3.1.1 §3.1.2.3 (MQTT-3.1.2-3): the reserved flag is 0
@pytest.mark.parametrize("level", [4, 5])
def test_connect_with_reserved_flag_set_is_malformed(level: int) -> None:
    assert malformed(connect_body(level=level, flags=0x03)).reason_code == 0x81


# MQTT 3.1.1 §3.1.2.6-7 (MQTT-3.1.2-13/15): Will QoS / Retain need the Will flag; QoS 3 invalid
@pytest.mark.parametrize("flags", [0x0A, 0x22, 0x1E])
@pytest.mark.parametrize("level", [4, 5])
def test_connect_with_inconsistent_will_flags_is_malformed(flags: int, level: int) -> None:
    rest = s("dev") + (b"\x00" if level == 5 else b"") + s("w") + s("x")
    assert malformed(connect_body(level=level, flags=flags, rest=rest)).reason_code == 0x81


# MQTT 3.1.1 §3.1.2.9 (MQTT-3.1.2-22): no password without a user name in 3.1.1; allowed in 5
def test_password_without_user_name_is_malformed_in_311_but_valid_in_5() -> None:
    assert malformed(connect_body(flags=0x42, rest=s("dev") + s("pw"))).reason_code == 0x81
    packet = decode_packet(connect_body(level=5, flags=0x42, rest=s("dev") + s("pw")), 5)
    assert isinstance(packet, Connect)
    assert packet.password == b"pw"
    assert packet.username is None


# MQTT 5.0 §3.1.3: CONNECT's payload is exactly its flagged fields (spec broker §1.1)
def test_connect_with_trailing_bytes_is_malformed() -> None:
    assert malformed(connect_body(rest=s("dev") + b"\x00")).reason_code == 0x81


# MQTT 3.1.1 §3.1.3.4: a user name flagged in CONNECT must be present (spec broker §1.1)
def test_connect_with_truncated_user_name_is_malformed() -> None:
    assert malformed(connect_body(flags=0x82, rest=s("dev") + b"\x00\x05ab")).reason_code == 0x81


# Private keys and tokens never appear in exceptions (task rules, spec fleet provisioning)
def test_malformed_connect_message_does_not_quote_the_password() -> None:
    secret = b"ownership-token-secret"
    error = malformed(connect_body(flags=0xC2, rest=s("dev") + s("user") + s(secret) + b"!"))
    assert b"secret" not in str(error).encode()


# ---------------------------------------------------------------------------
# SUBSCRIBE / UNSUBSCRIBE and acknowledgements
# ---------------------------------------------------------------------------


# MQTT 3.1.1 §3.8.3 (MQTT-3.8.3-3), 5.0 §3.8.3: at least one topic filter
@pytest.mark.parametrize("version", [4, 5])
@pytest.mark.parametrize("b1", [0x82, 0xA2])
def test_subscribe_or_unsubscribe_without_filters_is_a_protocol_error(b1: int,
                                                                      version: int) -> None:
    body = b"\x00\x01" + (b"\x00" if version == 5 else b"")
    assert malformed(frame(b1, body), version).reason_code == 0x82


# MQTT 5.0 §2.2.1: SUBSCRIBE/UNSUBSCRIBE need a non-zero packet identifier
@pytest.mark.parametrize("b1", [0x82, 0xA2, 0x40, 0x90])
def test_packets_with_packet_id_0_are_a_protocol_error(b1: int) -> None:
    assert malformed(frame(b1, b"\x00\x00" + s("a") + b"\x00"), 4).reason_code == 0x82


# MQTT 5.0 §2.2.1: the short two-byte PUBACK too (the decoder's fast path)
@pytest.mark.parametrize("version", [4, 5])
def test_short_puback_with_packet_id_0_is_a_protocol_error(version: int) -> None:
    assert malformed(b"\x40\x02\x00\x00", version).reason_code == 0x82


# MQTT 3.1.1 §3.8.3.1: requested QoS 3 and reserved option bits are malformed
@pytest.mark.parametrize(("version", "options"), [(4, 0x03), (4, 0x04), (5, 0x03), (5, 0x40)])
def test_subscribe_with_qos_3_or_reserved_option_bits_is_malformed(version: int,
                                                                   options: int) -> None:
    body = b"\x00\x01" + (b"\x00" if version == 5 else b"") + s("a") + bytes([options])
    assert malformed(frame(0x82, body), version).reason_code == 0x81


# MQTT 5.0 §3.8.3.1: Retain Handling 3 and No Local on a shared subscription
@pytest.mark.parametrize(("topic_filter", "options"), [("a", 0x30), ("$share/g/a", 0x04)])
def test_subscribe_protocol_errors_in_mqtt5(topic_filter: str, options: int) -> None:
    body = b"\x00\x01\x00" + s(topic_filter) + bytes([options])
    assert malformed(frame(0x82, body), 5).reason_code == 0x82


# MQTT 3.1.1 §3.8.3: every topic filter is followed by its options byte
def test_subscribe_missing_options_byte_is_malformed() -> None:
    assert malformed(frame(0x82, b"\x00\x01" + s("a")), 4).reason_code == 0x81


# MQTT 3.1.1 §3.4.1: PUBACK's remaining length is 2
def test_311_puback_with_extra_bytes_is_malformed() -> None:
    assert malformed(frame(0x40, b"\x00\x01\x00"), 4).reason_code == 0x81


# MQTT 3.1.1 §3.12 / 3.13 / 3.14: PINGREQ, PINGRESP, 3.1.1 DISCONNECT have no body
@pytest.mark.parametrize("b1", [0xC0, 0xD0, 0xE0])
def test_bodiless_packets_with_a_body_are_malformed(b1: int) -> None:
    assert malformed(frame(b1, b"\x00"), 4).reason_code == 0x81


# MQTT 5.0 §3.4.2.1: only the listed reason codes are valid
def test_mqtt5_puback_with_unknown_reason_code_is_a_protocol_error() -> None:
    assert malformed(frame(0x40, b"\x00\x01\x05"), 5).reason_code == 0x82


# MQTT 5.0 §3.4.2.1, §3.14.2.1, §3.15.2.1: reason code and properties may be omitted
def test_mqtt5_acks_accept_short_forms() -> None:
    assert decode_packet(b"\x40\x02\x00\x07", 5) == Puback(7)
    assert decode_packet(b"\x40\x03\x00\x07\x87", 5) == Puback(7, 0x87)
    assert decode_packet(b"\xe0\x00", 5) == Disconnect()
    assert decode_packet(b"\xe0\x01\x8e", 5) == Disconnect(0x8E)
    assert decode_packet(b"\xf0\x00", 5) == Auth()


# MQTT 3.1.1 §3.2.2.1: CONNACK reserved bits; session present only with success
@pytest.mark.parametrize("body", [b"\x02\x00", b"\x01\x05", b"\x00\x06"])
def test_invalid_311_connack_is_refused(body: bytes) -> None:
    with pytest.raises(MalformedPacket):
        decode_packet(frame(0x20, body), 4)


# ---------------------------------------------------------------------------
# MQTT 5 properties (spec broker §1.7)
# ---------------------------------------------------------------------------


def publish_with(props: bytes) -> bytes:
    return frame(0x30, s("a") + bytes([len(props)]) + props)


# MQTT 5.0 §2.2.2.2: a property not valid for the packet is malformed
@pytest.mark.parametrize("props", [b"\x11\x00\x00\x00\x01", b"\x7f\x00", b"\x21\x00\x01"])
def test_property_not_valid_for_the_packet_type_is_malformed(props: bytes) -> None:
    assert malformed(publish_with(props), 5).reason_code == 0x81


# MQTT 5.0 §3.3.2.3: each property at most once, except User Property (and Subscription
# Identifier in a PUBLISH to a client)
def test_duplicated_property_is_a_protocol_error() -> None:
    twice = b"\x02\x00\x00\x00\x01" * 2
    assert malformed(publish_with(twice), 5).reason_code == 0x82


# spec broker §1.7: User Properties pass through in order; MQTT 5.0 §3.3.2.3.8
def test_user_property_and_subscription_identifier_may_repeat_in_publish() -> None:
    props = b"\x26" + s("k") + s("1") + b"\x26" + s("k") + s("2") + b"\x0b\x01\x0b\x81\x01"
    packet = decode_packet(publish_with(props), 5)
    assert packet == Publish("a", properties={"user_property": [("k", "1"), ("k", "2")],
                                              "subscription_identifier": [1, 129]})


# MQTT 5.0 §3.8.2.1.2: one Subscription Identifier in a SUBSCRIBE, and never 0
@pytest.mark.parametrize("props", [b"\x04\x0b\x01\x0b\x02", b"\x02\x0b\x00"])
def test_subscribe_subscription_identifier_twice_or_zero_is_a_protocol_error(props: bytes) -> None:
    assert malformed(frame(0x82, b"\x00\x01" + props + s("a") + b"\x00"), 5).reason_code == 0x82


# spec broker §1.7 / edge case 14: a SUBSCRIBE with a Subscription Identifier decodes (the
# broker answers DISCONNECT 0xA1)
def test_subscribe_with_subscription_identifier_decodes_for_the_broker_to_refuse() -> None:
    packet = decode_packet(frame(0x82, b"\x00\x01\x02\x0b\x05" + s("a") + b"\x01"), 5)
    assert packet == Subscribe(1, [Subscription("a", 1)], {"subscription_identifier": [5]})


# MQTT 5.0 §1.5.5: variable byte integers in properties are at most four bytes
def test_property_varint_longer_than_four_bytes_is_malformed() -> None:
    assert malformed(publish_with(b"\x0b\xff\xff\xff\xff\x01"), 5).reason_code == 0x81


# MQTT 5.0 §3.3.2.3.2, §3.1.2.11.3, §3.1.2.11.4: values out of range are protocol errors
@pytest.mark.parametrize("frame_bytes", [
    publish_with(b"\x01\x02"),  # payload_format_indicator 2
    frame(0x10, s("MQTT") + b"\x05\x02\x00\x3c\x03\x21\x00\x00" + s("dev")),  # receive max 0
    frame(0x10, s("MQTT") + b"\x05\x02\x00\x3c\x05\x27\x00\x00\x00\x00" + s("dev")),  # max size 0
])
def test_property_values_out_of_range_are_protocol_errors(frame_bytes: bytes) -> None:
    decoder = Decoder(protocol_level=None if frame_bytes[0] == 0x10 else 5)
    with pytest.raises(MalformedPacket) as info:
        decoder.feed(frame_bytes)
    assert info.value.reason_code == 0x82


# MQTT 5.0 §2.2.2.1: the property block must fit inside the packet
def test_property_length_past_the_end_of_the_packet_is_malformed() -> None:
    assert malformed(frame(0x30, s("a") + b"\x09\x01\x01"), 5).reason_code == 0x81


# MQTT 5.0 §3.1.3.2: Will Properties have their own allowed set (Will Delay Interval)
def test_will_properties_are_checked_in_their_own_context() -> None:
    will_props = b"\x05\x18\x00\x00\x00\x0a"  # will_delay_interval: valid only for the Will
    body = s("MQTT") + b"\x05\x06\x00\x3c\x00" + s("dev") + will_props + s("w") + s("bye")
    packet = decode_packet(frame(0x10, body), 5)
    assert isinstance(packet, Connect)
    assert packet.will == Will("w", b"bye", properties={"will_delay_interval": 10})
    assert malformed(frame(0x10, s("MQTT") + b"\x05\x02\x00\x3c" + will_props + s("dev"))
                     ).reason_code == 0x81


# ---------------------------------------------------------------------------
# Encoding
# ---------------------------------------------------------------------------


# spec broker §1.1: MQTT-5-only fields are dropped for a 3.1.1 peer (cross-version delivery)
def test_encoding_for_311_drops_mqtt5_only_fields() -> None:
    publish = Publish("a/b", b"x", 1, packet_id=5,
                      properties={"user_property": [("k", "v")], "message_expiry_interval": 9})
    assert decode_packet(encode(publish, 4), 4) == Publish("a/b", b"x", 1, packet_id=5)
    assert encode(Puback(5, 0x87, {"reason_string": "no"}), 4) == b"\x40\x02\x00\x05"
    assert encode(Unsuback(5, [0x00]), 4) == b"\xb0\x02\x00\x05"
    assert encode(Disconnect(0x8E), 4) == b"\xe0\x00"
    sub = Subscribe(2, [Subscription("a", 1, no_local=True, retain_handling=2)])
    assert decode_packet(encode(sub, 4), 4) == Subscribe(2, [Subscription("a", 1)])


# MQTT 5.0 §1.5, §2.2.1, §3.3.1: the encoder never emits what a receiver must refuse
@pytest.mark.parametrize(("packet", "level"), [
    (Publish("a", qos=1), 4),
    (Publish("a", qos=3, packet_id=1), 4),
    (Publish("a", dup=True), 4),
    (Publish("a" * 70000), 4),
    (Puback(0), 4),
    (Puback(70000), 4),
    (Subscribe(1, []), 4),
    (Connect(4, "c", password=b"pw"), 4),
    (Auth(), 4),
    (Publish("a", properties={"no_such_property": 1}), 5),
    (Publish("a", properties={"session_expiry_interval": 1}), 5),
    (Publish("a\x00b"), 4),
])
def test_encode_refuses_packets_that_cannot_go_on_the_wire(packet: Packet, level: int) -> None:
    with pytest.raises(ValueError):
        encode(packet, level)


# MQTT 5.0 §3.4.2.1, §3.14.2.1: short forms when the reason is Success with no properties
def test_encode_uses_the_short_forms_paho_and_aws_send() -> None:
    assert encode(Puback(7), 5) == b"\x40\x02\x00\x07"
    assert encode(Disconnect(), 5) == b"\xe0\x00"
    assert encode(Disconnect(0x8E), 5) == b"\xe0\x01\x8e"
    assert encode(Connack(False, 0x87), 5) == b"\x20\x03\x00\x87\x00"


# ---------------------------------------------------------------------------
# Golden bytes: MQTT specification examples and what paho-mqtt really sends
# ---------------------------------------------------------------------------


# MQTT 3.1.1 §3.1.2.10 example: "MQTT", level 4, flags 0xCE, keep alive 10
def test_connect_matches_the_311_specification_example() -> None:
    connect = Connect(4, "c", keep_alive=10, username="u", password=b"p",
                      will=Will("w", b"m", qos=1))
    wire = encode(connect, 4)
    assert wire[2:12] == b"\x00\x04MQTT\x04\xce\x00\x0a"
    assert decode_packet(wire, 4) == connect


# MQTT 3.1.1 §2.2.3 remaining-length examples (127, 128, 16383, 16384, 2097152)
@pytest.mark.parametrize(("length", "encoded"), [
    (0, b"\x00"), (127, b"\x7f"), (128, b"\x80\x01"), (16_383, b"\xff\x7f"),
    (16_384, b"\x80\x80\x01"), (2_097_152, b"\x80\x80\x80\x01"),
])
def test_remaining_length_matches_the_specification_examples(length: int, encoded: bytes) -> None:
    # a PUBLISH to "t" has 3 bytes before its payload
    packet = Pingreq() if length == 0 else Publish("t", b"x" * (length - 3))
    wire = encode(packet, 4)
    assert wire[1 : 1 + len(encoded)] == encoded
    assert len(wire) == 1 + len(encoded) + length
    assert decode_packet(wire, 4) == packet


class _Wire:
    """Stands in for paho's socket and keeps what paho writes."""

    def __init__(self) -> None:
        self.data = bytearray()

    def send(self, buf: bytes) -> int:
        self.data += buf
        return len(buf)

    def close(self) -> None:
        pass


def _paho_client(protocol: paho.MQTTProtocolVersion) -> tuple[paho.Client, _Wire]:
    client = paho.Client(paho.CallbackAPIVersion.VERSION2, client_id="thing-1", protocol=protocol)
    wire = _Wire()
    client._sock = wire  # type: ignore[assignment]
    return client, wire


def _same_bytes_both_ways(wire: bytes, version: int) -> None:
    decoder = Decoder()
    packets = decoder.feed(wire)
    assert decoder.buffered == 0
    assert b"".join(encode(p, version) for p in packets) == wire


# spec broker §1.1 / design principle 3: paho-mqtt 3.1.1 is a conformance client
def test_paho_311_packets_decode_and_reencode_to_the_same_bytes() -> None:
    client, wire = _paho_client(paho.MQTTv311)
    client.username_pw_set("user", "secret")
    client.will_set("will/t", b"bye", qos=1, retain=True)
    client._send_connect(60)
    client._send_publish(5, b"dt/thing-1/data", b"hello", 1, False, False)
    client._send_publish(6, b"dt/thing-1/data", b"x" * 300, 0, True, False,
                         info=paho.MQTTMessageInfo(6))
    client._send_subscribe(False, [(b"cmd/+/#", 1), (b"$aws/things/thing-1/shadow/get/accepted",
                                                     0)])
    client._send_unsubscribe(False, [b"cmd/+/#"])
    client._send_puback(7)
    client._send_pingreq()
    client._send_disconnect()
    _same_bytes_both_ways(bytes(wire.data), 4)
    packets = Decoder().feed(bytes(wire.data))
    assert packets[0] == Connect(4, "thing-1", True, 60, "user", b"secret",
                                 Will("will/t", b"bye", 1, True))
    assert packets[1] == Publish("dt/thing-1/data", b"hello", 1, packet_id=5)


# spec broker §1.7: paho-mqtt's MQTT 5 properties decode and re-encode unchanged
def test_paho_mqtt5_packets_with_properties_decode_and_reencode_to_the_same_bytes() -> None:
    client, wire = _paho_client(paho.MQTTv5)
    connect_props = PahoProperties(PacketTypes.CONNECT)
    connect_props.SessionExpiryInterval = 3600
    connect_props.ReceiveMaximum = 10
    client._connect_properties = connect_props
    client._send_connect(30)
    publish_props = PahoProperties(PacketTypes.PUBLISH)
    publish_props.ResponseTopic = "reply/thing-1"
    publish_props.CorrelationData = b"\x01\x02"
    publish_props.UserProperty = [("a", "b"), ("a", "c")]
    publish_props.MessageExpiryInterval = 60
    client._send_publish(9, b"req/thing-1", b"{}", 1, False, False, properties=publish_props)
    client._send_subscribe(False, [(b"$share/workers/req/#",
                                    SubscribeOptions(qos=1, retainHandling=1))])
    disconnect_props = PahoProperties(PacketTypes.DISCONNECT)
    disconnect_props.SessionExpiryInterval = 0
    client._send_disconnect(paho.ReasonCode(PacketTypes.DISCONNECT, identifier=4),
                            disconnect_props)
    _same_bytes_both_ways(bytes(wire.data), 5)
    packets = Decoder().feed(bytes(wire.data))
    assert packets[0].properties == {  # type: ignore[union-attr]
        "session_expiry_interval": 3600, "receive_maximum": 10}
    assert packets[1] == Publish("req/thing-1", b"{}", 1, packet_id=9, properties={
        "response_topic": "reply/thing-1", "correlation_data": b"\x01\x02",
        "user_property": [("a", "b"), ("a", "c")], "message_expiry_interval": 60})
    assert packets[2].subscriptions == [  # type: ignore[union-attr]
        Subscription("$share/workers/req/#", 1, retain_handling=1)]
    assert packets[3] == Disconnect(4, {"session_expiry_interval": 0})
