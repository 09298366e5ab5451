"""Sans-I/O MQTT 3.1.1 / 5.0 codec: bytes to packet objects and back.

Knows nothing of sockets or asyncio (the h11 model): the broker hands received
bytes to :meth:`Decoder.feed` and writes what :func:`encode` returns. Both
directions are supported, so test and benchmark clients can reuse it.

The decoder checks everything the MQTT 3.1.1 and 5.0 specifications make a
receiver check (spec iot-broker-and-policy.md §1.1: AWS disconnects on malformed
packets) and raises :class:`MalformedPacket` carrying the MQTT 5 reason code to
disconnect with:

* 0x81 Malformed Packet: bad fixed-header flags, truncated or trailing bytes,
  invalid UTF-8 or U+0000, a property not valid for the packet, QoS 3, ...
* 0x82 Protocol Error: first packet not CONNECT, packet id 0, duplicated property,
  property value out of range, SUBSCRIBE/UNSUBSCRIBE without filters, ...
* 0x84 Unsupported Protocol Version: CONNECT with a protocol level other than
  3 ("MQIsdp"), 4 or 5 ("MQTT"); the broker answers CONNACK 0x84 (5) / 0x01 (3.1.1).
* 0x94 Topic Alias Invalid: a PUBLISH with Topic Alias 0 (the upper bound is the
  broker's, it knows the maximum it advertised).
* 0x95 Packet Too Large: raised as soon as the fixed header is read.

Semantic rules stay with their owners: topic syntax and AWS limits in
:mod:`harness.emulator.mqtt.topics`, QoS 2 / Subscription Identifier / topic
alias maximum refusals in the broker.

MQTT 5 properties decode to a dict keyed by the names in ``PROPERTY_NAMES``:
byte/integer properties are ``int``, strings ``str``, binary data ``bytes``,
``user_property`` a list of ``(name, value)`` tuples in wire order and
``subscription_identifier`` a list of ``int`` (a PUBLISH to a client may carry
several). On encode ``subscription_identifier`` may also be a single ``int``.
"""

from __future__ import annotations

import struct
from collections.abc import Callable
from typing import Any

from harness.emulator.mqtt.packets import (
    MQTT_5,
    PROPERTY_NAMES,
    Auth,
    Connack,
    Connect,
    Disconnect,
    MalformedPacket,
    Packet,
    PacketType,
    Pingreq,
    Pingresp,
    Properties,
    Puback,
    Pubcomp,
    Publish,
    Pubrec,
    Pubrel,
    ReasonCode,
    Suback,
    Subscribe,
    Subscription,
    Unsuback,
    Unsubscribe,
    Will,
)

__all__ = [
    "DEFAULT_MAX_PACKET_SIZE",
    "MAX_REMAINING_LENGTH",
    "Decoder",
    "decode_packet",
    "encode",
]

#: 128 KB payload (spec broker §1.8, "Message size") plus room for topic and properties.
DEFAULT_MAX_PACKET_SIZE = 128 * 1024 + 4096
#: The largest value a four-byte Variable Byte Integer can hold.
MAX_REMAINING_LENGTH = 268_435_455

_MALFORMED = int(ReasonCode.MALFORMED_PACKET)
_PROTOCOL = int(ReasonCode.PROTOCOL_ERROR)
_UNSUPPORTED_VERSION = int(ReasonCode.UNSUPPORTED_PROTOCOL_VERSION)
_ALIAS_INVALID = int(ReasonCode.TOPIC_ALIAS_INVALID)
_TOO_LARGE = int(ReasonCode.PACKET_TOO_LARGE)

_U16 = struct.Struct(">H")
_U32 = struct.Struct(">I")
_U16_U8 = struct.Struct(">HB")
_ACK2 = struct.Struct(">BBH")  # fixed header byte, remaining length 2, packet id
_BYTE = [bytes((i,)) for i in range(256)]

_SHARE_PREFIX = "$share/"


# ---------------------------------------------------------------------------
# MQTT 5 properties (MQTT 5.0 §2.2.2.2)
# ---------------------------------------------------------------------------


# Property value encodings. Plain ints, not an enum: enum attribute lookups cost
# ~100 ns each and this is on the per-PUBLISH path.
_BYTE_KIND, _U16_KIND, _U32_KIND, _VARINT_KIND, _UTF8_KIND, _BINARY_KIND, _PAIR_KIND = range(1, 8)
_NUMERIC = frozenset({_BYTE_KIND, _U16_KIND, _U32_KIND, _VARINT_KIND})

_WILL = 0  # property context of the Will Properties inside CONNECT

_C, _CA, _PUB, _PA, _PRC, _PRL, _PC, _S, _SA, _U, _UA, _PINGREQ, _PINGRESP, _D, _A = range(1, 16)
assert (_PUB, _PINGREQ, _A) == (PacketType.PUBLISH, PacketType.PINGREQ, PacketType.AUTH)

# id -> (kind, packet types it may appear in, lowest, highest, reason code if out of range)
_PROPERTY_RULES: dict[int, tuple[int, frozenset[int], int, int, int]] = {
    0x01: (_BYTE_KIND, frozenset({_PUB, _WILL}), 0, 1, _PROTOCOL),
    0x02: (_U32_KIND, frozenset({_PUB, _WILL}), 0, 0xFFFFFFFF, _PROTOCOL),
    0x03: (_UTF8_KIND, frozenset({_PUB, _WILL}), 0, 0, _PROTOCOL),
    0x08: (_UTF8_KIND, frozenset({_PUB, _WILL}), 0, 0, _PROTOCOL),
    0x09: (_BINARY_KIND, frozenset({_PUB, _WILL}), 0, 0, _PROTOCOL),
    0x0B: (_VARINT_KIND, frozenset({_PUB, _S}), 1, MAX_REMAINING_LENGTH, _PROTOCOL),
    0x11: (_U32_KIND, frozenset({_C, _CA, _D}), 0, 0xFFFFFFFF, _PROTOCOL),
    0x12: (_UTF8_KIND, frozenset({_CA}), 0, 0, _PROTOCOL),
    0x13: (_U16_KIND, frozenset({_CA}), 0, 0xFFFF, _PROTOCOL),
    0x15: (_UTF8_KIND, frozenset({_C, _CA, _A}), 0, 0, _PROTOCOL),
    0x16: (_BINARY_KIND, frozenset({_C, _CA, _A}), 0, 0, _PROTOCOL),
    0x17: (_BYTE_KIND, frozenset({_C}), 0, 1, _PROTOCOL),
    0x18: (_U32_KIND, frozenset({_WILL}), 0, 0xFFFFFFFF, _PROTOCOL),
    0x19: (_BYTE_KIND, frozenset({_C}), 0, 1, _PROTOCOL),
    0x1A: (_UTF8_KIND, frozenset({_CA}), 0, 0, _PROTOCOL),
    0x1C: (_UTF8_KIND, frozenset({_CA, _D}), 0, 0, _PROTOCOL),
    0x1F: (_UTF8_KIND, frozenset({_CA, _PA, _PRC, _PRL, _PC, _SA, _UA, _D, _A}), 0, 0, _PROTOCOL),
    0x21: (_U16_KIND, frozenset({_C, _CA}), 1, 0xFFFF, _PROTOCOL),
    0x22: (_U16_KIND, frozenset({_C, _CA}), 0, 0xFFFF, _PROTOCOL),
    0x23: (_U16_KIND, frozenset({_PUB}), 1, 0xFFFF, _ALIAS_INVALID),
    0x24: (_BYTE_KIND, frozenset({_CA}), 0, 1, _PROTOCOL),
    0x25: (_BYTE_KIND, frozenset({_CA}), 0, 1, _PROTOCOL),
    0x26: (_PAIR_KIND, frozenset({_C, _CA, _PUB, _WILL, _PA, _PRC, _PRL, _PC, _S, _SA, _U, _UA,
                                  _D, _A}), 0, 0, _PROTOCOL),
    0x27: (_U32_KIND, frozenset({_C, _CA}), 1, 0xFFFFFFFF, _PROTOCOL),
    0x28: (_BYTE_KIND, frozenset({_CA}), 0, 1, _PROTOCOL),
    0x29: (_BYTE_KIND, frozenset({_CA}), 0, 1, _PROTOCOL),
    0x2A: (_BYTE_KIND, frozenset({_CA}), 0, 1, _PROTOCOL),
}
assert set(_PROPERTY_RULES) == set(PROPERTY_NAMES)

_PROPERTY_IDS: dict[str, int] = {name: pid for pid, name in PROPERTY_NAMES.items()}
_USER_PROPERTY = 0x26
_SUBSCRIPTION_IDENTIFIER = 0x0B
_TOPIC_ALIAS = "topic_alias"

# MQTT 5 reason codes each packet may carry (MQTT 5.0 §2.4, tables in §3).
_CONNACK_CODES = frozenset({0x00, 0x80, 0x81, 0x82, 0x83, 0x84, 0x85, 0x86, 0x87, 0x88, 0x89,
                            0x8A, 0x8C, 0x90, 0x95, 0x97, 0x99, 0x9A, 0x9B, 0x9C, 0x9D, 0x9F})
_PUBACK_CODES = frozenset({0x00, 0x10, 0x80, 0x83, 0x87, 0x90, 0x91, 0x97, 0x99})
_PUBREL_CODES = frozenset({0x00, 0x92})
_SUBACK_CODES = frozenset({0x00, 0x01, 0x02, 0x80, 0x83, 0x87, 0x8F, 0x91, 0x97, 0x9E, 0xA1,
                           0xA2})
_UNSUBACK_CODES = frozenset({0x00, 0x11, 0x80, 0x83, 0x87, 0x8F, 0x91})
_DISCONNECT_CODES = frozenset({0x00, 0x04, 0x80, 0x81, 0x82, 0x83, 0x87, 0x89, 0x8B, 0x8D, 0x8E,
                               0x8F, 0x90, 0x93, 0x94, 0x95, 0x96, 0x97, 0x98, 0x99, 0x9A, 0x9B,
                               0x9C, 0x9D, 0x9E, 0x9F, 0xA0, 0xA1, 0xA2})
_AUTH_CODES = frozenset({0x00, 0x18, 0x19})
_ACK_CODES: dict[int, frozenset[int]] = {
    _PA: _PUBACK_CODES, _PRC: _PUBACK_CODES, _PRL: _PUBREL_CODES, _PC: _PUBREL_CODES,
}
_SUBACK_311_CODES = frozenset({0x00, 0x01, 0x02, 0x80})


# ---------------------------------------------------------------------------
# Reading primitives. Each takes (data, pos, end) and returns (value, new_pos).
# Error messages never quote field contents: they may hold passwords or tokens.
# ---------------------------------------------------------------------------


def _malformed(message: str) -> MalformedPacket:
    return MalformedPacket(message, _MALFORMED)


def _protocol_error(message: str) -> MalformedPacket:
    return MalformedPacket(message, _PROTOCOL)


def _read_u16(data: bytes, pos: int, end: int) -> int:
    if pos + 2 > end:
        raise _malformed("truncated two-byte integer")
    return (data[pos] << 8) | data[pos + 1]


def _read_varint(data: bytes, pos: int, end: int) -> tuple[int, int]:
    value = 0
    shift = 0
    for i in range(pos, min(pos + 4, end)):
        byte = data[i]
        value |= (byte & 0x7F) << shift
        if byte < 0x80:
            return value, i + 1
        shift += 7
    if end - pos >= 4:
        raise _malformed("variable byte integer longer than four bytes")
    raise _malformed("truncated variable byte integer")


def _read_string(data: bytes, pos: int, end: int) -> tuple[str, int]:
    if pos + 2 > end:
        raise _malformed("truncated string length")
    stop = pos + 2 + ((data[pos] << 8) | data[pos + 1])
    if stop > end:
        raise _malformed("string runs past the end of the packet")
    try:
        text = data[pos + 2 : stop].decode("utf-8")
    except UnicodeDecodeError:
        raise _malformed("string is not well-formed UTF-8") from None
    if "\x00" in text:
        raise _malformed("string contains U+0000")
    return text, stop


def _read_binary(data: bytes, pos: int, end: int) -> tuple[bytes, int]:
    if pos + 2 > end:
        raise _malformed("truncated binary data length")
    stop = pos + 2 + ((data[pos] << 8) | data[pos + 1])
    if stop > end:
        raise _malformed("binary data runs past the end of the packet")
    return data[pos + 2 : stop], stop


def _read_packet_id(data: bytes, pos: int, end: int) -> int:
    packet_id = _read_u16(data, pos, end)
    if packet_id == 0:
        raise _protocol_error("packet identifier is 0")
    return packet_id


def _read_properties(data: bytes, pos: int, end: int, context: int) -> tuple[Properties, int]:
    """Decode a property block; ``context`` is the packet type (or ``_WILL``)."""
    length, pos = _read_varint(data, pos, end)
    stop = pos + length
    if stop > end:
        raise _malformed("properties run past the end of the packet")
    props: Properties = {}
    while pos < stop:
        pid = data[pos]
        pos += 1
        rule = _PROPERTY_RULES.get(pid)
        if rule is None or context not in rule[1]:
            raise _malformed(f"property 0x{pid:02X} is not valid in this packet")
        kind = rule[0]
        value: Any
        if kind == _BYTE_KIND:
            if pos >= stop:
                raise _malformed("truncated byte property")
            value = data[pos]
            pos += 1
        elif kind == _U16_KIND:
            value = _read_u16(data, pos, stop)
            pos += 2
        elif kind == _U32_KIND:
            if pos + 4 > stop:
                raise _malformed("truncated four-byte integer")
            value = _U32.unpack_from(data, pos)[0]
            pos += 4
        elif kind == _VARINT_KIND:
            value, pos = _read_varint(data, pos, stop)
        elif kind == _UTF8_KIND:
            value, pos = _read_string(data, pos, stop)
        elif kind == _BINARY_KIND:
            value, pos = _read_binary(data, pos, stop)
        else:
            key, pos = _read_string(data, pos, stop)
            val, pos = _read_string(data, pos, stop)
            value = (key, val)
        name = PROPERTY_NAMES[pid]
        if kind in _NUMERIC and not rule[2] <= value <= rule[3]:
            raise MalformedPacket(f"property {name} out of range", rule[4])
        if pid == _USER_PROPERTY or (pid == _SUBSCRIPTION_IDENTIFIER and context != _S):
            props.setdefault(name, []).append(value)
        elif name in props:
            raise _protocol_error(f"property {name} included more than once")
        elif pid == _SUBSCRIPTION_IDENTIFIER:
            props[name] = [value]
        else:
            props[name] = value
    return props, stop


def _expect_end(pos: int, end: int, what: str) -> None:
    if pos != end:
        raise _malformed(f"{what}: unexpected bytes after the last field")


# ---------------------------------------------------------------------------
# Packet decoders: (first byte, data, start of variable header, end, is MQTT 5)
# ---------------------------------------------------------------------------


def _decode_connect(data: bytes, pos: int, end: int) -> Connect:
    name, pos = _read_string(data, pos, end)
    if pos + 4 > end:
        raise _malformed("CONNECT: truncated variable header")
    level = data[pos]
    flags = data[pos + 1]
    keep_alive = (data[pos + 2] << 8) | data[pos + 3]
    pos += 4
    if name == "MQTT":
        if level not in (4, 5):
            raise MalformedPacket("CONNECT: unsupported protocol level", _UNSUPPORTED_VERSION)
    elif name == "MQIsdp":
        if level != 3:
            raise MalformedPacket("CONNECT: unsupported protocol level", _UNSUPPORTED_VERSION)
    else:
        raise _protocol_error("CONNECT: protocol name is neither MQTT nor MQIsdp")
    if flags & 0x01:
        raise _malformed("CONNECT: reserved flag bit is set")
    has_will = flags & 0x04
    will_qos = (flags >> 3) & 0x03
    will_retain = bool(flags & 0x20)
    has_password = flags & 0x40
    has_username = flags & 0x80
    if will_qos == 3:
        raise _malformed("CONNECT: Will QoS is 3")
    if not has_will and (will_qos or will_retain):
        raise _malformed("CONNECT: Will QoS or Will Retain set without the Will flag")
    if has_password and not has_username and level < MQTT_5:
        raise _malformed("CONNECT: password flag set without user name flag")
    v5 = level == MQTT_5
    properties: Properties = {}
    if v5:
        properties, pos = _read_properties(data, pos, end, _C)
    client_id, pos = _read_string(data, pos, end)
    will = None
    if has_will:
        will_props: Properties = {}
        if v5:
            will_props, pos = _read_properties(data, pos, end, _WILL)
        topic, pos = _read_string(data, pos, end)
        payload, pos = _read_binary(data, pos, end)
        will = Will(topic, payload, will_qos, will_retain, will_props)
    username = None
    password = None
    if has_username:
        username, pos = _read_string(data, pos, end)
    if has_password:
        password, pos = _read_binary(data, pos, end)
    _expect_end(pos, end, "CONNECT")
    return Connect(level, client_id, bool(flags & 0x02), keep_alive, username, password, will,
                   properties, name)


def _decode_connack(b1: int, data: bytes, pos: int, end: int, v5: bool) -> Connack:
    if end - pos < 2:
        raise _malformed("CONNACK: truncated")
    flags = data[pos]
    code = data[pos + 1]
    if flags & 0xFE:
        raise _malformed("CONNACK: reserved acknowledge flag bits are set")
    if flags and code:
        raise _protocol_error("CONNACK: session present with a failure code")
    properties: Properties = {}
    if v5:
        if code not in _CONNACK_CODES:
            raise _protocol_error(f"CONNACK: reason code 0x{code:02X} is not valid")
        properties, pos = _read_properties(data, pos + 2, end, _CA)
        _expect_end(pos, end, "CONNACK")
    else:
        if code > 5:
            raise _protocol_error(f"CONNACK: return code {code} is reserved")
        _expect_end(pos + 2, end, "CONNACK")
    return Connack(bool(flags), code, properties)


def _decode_publish(b1: int, data: bytes, pos: int, end: int, v5: bool) -> Publish:
    # Fixed-header flags (QoS 3, DUP on QoS 0) were checked with the first byte.
    qos = (b1 >> 1) & 0x03
    if pos + 2 > end:
        raise _malformed("PUBLISH: truncated topic length")
    stop = pos + 2 + ((data[pos] << 8) | data[pos + 1])
    if stop > end:
        raise _malformed("PUBLISH: topic runs past the end of the packet")
    try:
        topic = data[pos + 2 : stop].decode("utf-8")
    except UnicodeDecodeError:
        raise _malformed("PUBLISH: topic is not well-formed UTF-8") from None
    if "\x00" in topic:
        raise _malformed("PUBLISH: topic contains U+0000")
    pos = stop
    packet_id = None
    if qos:
        if pos + 2 > end:
            raise _malformed("PUBLISH: truncated packet identifier")
        packet_id = (data[pos] << 8) | data[pos + 1]
        if not packet_id:
            raise _protocol_error("PUBLISH: packet identifier is 0")
        pos += 2
    properties: Properties
    if not v5:
        properties = {}
    elif pos < end and data[pos] == 0:  # fast path: no properties
        properties = {}
        pos += 1
    else:
        properties, pos = _read_properties(data, pos, end, _PUB)
    if v5 and not topic and _TOPIC_ALIAS not in properties:
        raise _protocol_error("PUBLISH: empty topic name without a Topic Alias")
    return Publish(topic, data[pos:end], qos, bool(b1 & 0x01), bool(b1 & 0x08), packet_id,
                   properties)


_ACK_CLASSES: dict[int, type[Puback] | type[Pubrec] | type[Pubrel] | type[Pubcomp]] = {
    _PA: Puback, _PRC: Pubrec, _PRL: Pubrel, _PC: Pubcomp,
}


def _decode_ack(b1: int, data: bytes, pos: int, end: int, v5: bool) -> Packet:
    ptype = b1 >> 4
    cls = _ACK_CLASSES[ptype]
    packet_id = _read_packet_id(data, pos, end)
    length = end - pos
    if length == 2:
        return cls(packet_id)
    if not v5:
        raise _malformed("acknowledgement: remaining length is not 2")
    code = data[pos + 2]
    if code not in _ACK_CODES[ptype]:
        raise _protocol_error(f"acknowledgement: reason code 0x{code:02X} is not valid")
    if length == 3:
        return cls(packet_id, code)
    properties, stop = _read_properties(data, pos + 3, end, ptype)
    _expect_end(stop, end, "acknowledgement")
    return cls(packet_id, code, properties)


def _decode_subscribe(b1: int, data: bytes, pos: int, end: int, v5: bool) -> Subscribe:
    packet_id = _read_packet_id(data, pos, end)
    pos += 2
    properties: Properties = {}
    if v5:
        properties, pos = _read_properties(data, pos, end, _S)
    subscriptions = []
    while pos < end:
        topic_filter, pos = _read_string(data, pos, end)
        if pos >= end:
            raise _malformed("SUBSCRIBE: missing subscription options")
        options = data[pos]
        pos += 1
        qos = options & 0x03
        if qos == 3:
            raise _malformed("SUBSCRIBE: requested QoS is 3")
        if not v5:
            if options & 0xFC:
                raise _malformed("SUBSCRIBE: reserved option bits are set")
            subscriptions.append(Subscription(topic_filter, qos))
            continue
        if options & 0xC0:
            raise _malformed("SUBSCRIBE: reserved option bits are set")
        retain_handling = (options >> 4) & 0x03
        if retain_handling == 3:
            raise _protocol_error("SUBSCRIBE: Retain Handling is 3")
        no_local = bool(options & 0x04)
        if no_local and topic_filter.startswith(_SHARE_PREFIX):
            raise _protocol_error("SUBSCRIBE: No Local set on a shared subscription")
        subscriptions.append(
            Subscription(topic_filter, qos, no_local, bool(options & 0x08), retain_handling)
        )
    if not subscriptions:
        raise _protocol_error("SUBSCRIBE: no topic filters")
    return Subscribe(packet_id, subscriptions, properties)


def _read_codes(data: bytes, pos: int, end: int, allowed: frozenset[int], what: str) -> list[int]:
    codes = list(data[pos:end])
    if not codes:
        raise _protocol_error(f"{what}: no reason codes")
    for code in codes:
        if code not in allowed:
            raise _protocol_error(f"{what}: reason code 0x{code:02X} is not valid")
    return codes


def _decode_suback(b1: int, data: bytes, pos: int, end: int, v5: bool) -> Suback:
    packet_id = _read_packet_id(data, pos, end)
    pos += 2
    properties: Properties = {}
    if v5:
        properties, pos = _read_properties(data, pos, end, _SA)
    allowed = _SUBACK_CODES if v5 else _SUBACK_311_CODES
    return Suback(packet_id, _read_codes(data, pos, end, allowed, "SUBACK"), properties)


def _decode_unsubscribe(b1: int, data: bytes, pos: int, end: int, v5: bool) -> Unsubscribe:
    packet_id = _read_packet_id(data, pos, end)
    pos += 2
    properties: Properties = {}
    if v5:
        properties, pos = _read_properties(data, pos, end, _U)
    topic_filters = []
    while pos < end:
        topic_filter, pos = _read_string(data, pos, end)
        topic_filters.append(topic_filter)
    if not topic_filters:
        raise _protocol_error("UNSUBSCRIBE: no topic filters")
    return Unsubscribe(packet_id, topic_filters, properties)


def _decode_unsuback(b1: int, data: bytes, pos: int, end: int, v5: bool) -> Unsuback:
    packet_id = _read_packet_id(data, pos, end)
    pos += 2
    if not v5:
        _expect_end(pos, end, "UNSUBACK")
        return Unsuback(packet_id)
    properties, pos = _read_properties(data, pos, end, _UA)
    return Unsuback(packet_id, _read_codes(data, pos, end, _UNSUBACK_CODES, "UNSUBACK"),
                    properties)


def _decode_ping(b1: int, data: bytes, pos: int, end: int, v5: bool) -> Packet:
    _expect_end(pos, end, "PINGREQ/PINGRESP")
    return Pingreq() if b1 >> 4 == _PINGREQ else Pingresp()


def _decode_disconnect_or_auth(b1: int, data: bytes, pos: int, end: int, v5: bool) -> Packet:
    is_auth = b1 >> 4 == _A
    cls = Auth if is_auth else Disconnect
    if pos == end:
        return cls()
    if not v5:
        raise _malformed("DISCONNECT: remaining length is not 0")
    code = data[pos]
    if code not in (_AUTH_CODES if is_auth else _DISCONNECT_CODES):
        raise _protocol_error(f"reason code 0x{code:02X} is not valid")
    if pos + 1 == end:
        return cls(code)
    properties, stop = _read_properties(data, pos + 1, end, _A if is_auth else _D)
    _expect_end(stop, end, "AUTH" if is_auth else "DISCONNECT")
    return cls(code, properties)


def _decode_connect_anywhere(b1: int, data: bytes, pos: int, end: int, v5: bool) -> Connect:
    return _decode_connect(data, pos, end)


_Decode = Callable[[int, bytes, int, int, bool], Packet]
_DECODERS: list[_Decode | None] = [
    None,
    _decode_connect_anywhere,
    _decode_connack,
    _decode_publish,
    _decode_ack,
    _decode_ack,
    _decode_ack,
    _decode_ack,
    _decode_subscribe,
    _decode_suback,
    _decode_unsubscribe,
    _decode_unsuback,
    _decode_ping,
    _decode_ping,
    _decode_disconnect_or_auth,
    _decode_disconnect_or_auth,
]

# Required fixed-header flags per packet type (MQTT 5.0 §2.1.3); PUBLISH is special.
_REQUIRED_FLAGS = {t: 0 for t in range(1, 16)} | {_PRL: 2, _S: 2, _U: 2}


def _first_byte_problem(b1: int, v5: bool) -> str | None:
    """Why ``b1`` cannot start a packet, or None if it can."""
    ptype, flags = b1 >> 4, b1 & 0x0F
    if ptype == 0 or (ptype == PacketType.AUTH and not v5):
        return f"packet type {ptype} is reserved"
    if ptype == PacketType.PUBLISH:
        if (flags >> 1) & 0x03 == 3:
            return "PUBLISH with QoS 3"
        if flags & 0x08 and not flags & 0x06:
            return "PUBLISH with QoS 0 and DUP set"
        return None
    if flags != _REQUIRED_FLAGS[ptype]:
        return f"{PacketType(ptype).name}: invalid fixed-header flags 0x{flags:X}"
    return None


_FIRST_BYTE_OK_5 = tuple(_first_byte_problem(b, True) is None for b in range(256))
_FIRST_BYTE_OK_311 = tuple(_first_byte_problem(b, False) is None for b in range(256))


# ---------------------------------------------------------------------------
# Decoder
# ---------------------------------------------------------------------------


class Decoder:
    """Incremental decoder for one connection's byte stream.

    ``protocol_level`` is None until a CONNECT was decoded (server side) or is
    given up front (client side, which then decodes CONNACK and the rest). After
    :class:`MalformedPacket` was raised the decoder only raises it again: the
    connection must be closed.
    """

    __slots__ = ("_buf", "_error", "_need", "max_packet_size", "protocol_level")

    def __init__(
        self, max_packet_size: int = DEFAULT_MAX_PACKET_SIZE, protocol_level: int | None = None
    ) -> None:
        if protocol_level not in (None, 3, 4, 5):
            raise ValueError(f"unsupported protocol level {protocol_level!r}")
        if max_packet_size < 2:
            raise ValueError("max_packet_size must be at least 2")
        self.max_packet_size = max_packet_size
        self.protocol_level: int | None = protocol_level
        self._buf = bytearray()
        self._need = 0  # total size of the buffered packet once its header is known
        self._error: MalformedPacket | None = None

    @property
    def buffered(self) -> int:
        """Bytes received that wait for the rest of their packet (slow-loris checks)."""
        return len(self._buf)

    def feed(self, data: bytes) -> list[Packet]:
        """Buffer ``data`` and return every packet it completes, in order.

        Raises :class:`MalformedPacket` on bad input; packets decoded earlier in
        the same call are then discarded, as the connection is closing anyway.
        """
        if self._error is not None:
            raise MalformedPacket(str(self._error), self._error.reason_code)
        if type(data) is not bytes:
            data = bytes(data)
        buf = self._buf
        if buf:
            buf += data
            if len(buf) < self._need:
                return []
            data = bytes(buf)
            buf.clear()
        try:
            return self._parse(data)
        except MalformedPacket as exc:
            self._error = exc
            self._buf.clear()
            raise

    def _parse(self, data: bytes) -> list[Packet]:
        packets: list[Packet] = []
        level = self.protocol_level
        v5 = level == MQTT_5
        first_ok = _FIRST_BYTE_OK_5 if v5 else _FIRST_BYTE_OK_311
        max_size = self.max_packet_size
        size = len(data)
        pos = 0
        need = 0
        while pos < size:
            b1 = data[pos]
            if level is None:
                if b1 >> 4 != _C:
                    raise _protocol_error("the first packet must be CONNECT")
                if b1 != 0x10:
                    raise _malformed("CONNECT: invalid fixed-header flags")
            elif not first_ok[b1]:
                raise _malformed(_first_byte_problem(b1, v5) or "invalid first byte")
            if pos + 1 >= size:
                break
            length = data[pos + 1]
            if length < 0x80:
                header = 2
            else:
                length, header = self._remaining_length(data, pos + 1, size)
                if not header:
                    break
            total = header + length
            if total > max_size:
                raise MalformedPacket(
                    f"packet of {total} bytes exceeds the maximum of {max_size}", _TOO_LARGE
                )
            end = pos + total
            if end > size:
                need = total
                break
            if b1 >> 4 == _PUB:
                packets.append(_decode_publish(b1, data, pos + header, end, v5))
            elif b1 == 0x40 and total == 4:  # fast path: PUBACK without reason code
                packet_id = (data[pos + 2] << 8) | data[pos + 3]
                if not packet_id:
                    raise _protocol_error("PUBACK: packet identifier is 0")
                packets.append(Puback(packet_id))
            elif b1 >> 4 == _C:
                connect = _decode_connect(data, pos + header, end)
                if level is None:
                    level = self.protocol_level = connect.protocol_level
                    v5 = level == MQTT_5
                    first_ok = _FIRST_BYTE_OK_5 if v5 else _FIRST_BYTE_OK_311
                packets.append(connect)
            else:
                decode = _DECODERS[b1 >> 4]
                assert decode is not None
                packets.append(decode(b1, data, pos + header, end, v5))
            pos = end
        if pos < size:
            self._buf += memoryview(data)[pos:]
        self._need = need
        return packets

    @staticmethod
    def _remaining_length(data: bytes, pos: int, size: int) -> tuple[int, int]:
        """(remaining length, fixed-header size), or (0, 0) while incomplete."""
        value = 0
        for i in range(4):
            if pos + i >= size:
                return 0, 0
            byte = data[pos + i]
            value |= (byte & 0x7F) << (7 * i)
            if byte < 0x80:
                return value, i + 2
        raise _malformed("remaining length longer than four bytes")


def decode_packet(data: bytes, protocol_level: int) -> Packet:
    """Decode exactly one whole packet (convenience for tests and tools)."""
    decoder = Decoder(MAX_REMAINING_LENGTH + 5, protocol_level)
    packets = decoder.feed(data)
    if len(packets) != 1 or decoder.buffered:
        raise _malformed(f"expected exactly one whole packet, got {len(packets)} "
                         f"and {decoder.buffered} bytes left over")
    return packets[0]


# ---------------------------------------------------------------------------
# Encoding
# ---------------------------------------------------------------------------


def _varint(value: int) -> bytes:
    if value < 0x80:
        return _BYTE[value]
    if value > MAX_REMAINING_LENGTH:
        raise ValueError("value too large for a variable byte integer")
    out = bytearray()
    while True:
        byte = value & 0x7F
        value >>= 7
        if value:
            out.append(byte | 0x80)
        else:
            out.append(byte)
            return bytes(out)


def _fixed_header(b1: int, remaining: int) -> bytes:
    if remaining < 0x80:
        return bytes((b1, remaining))
    return _BYTE[b1] + _varint(remaining)


def _string(text: str) -> bytes:
    raw = text.encode("utf-8")
    if len(raw) > 0xFFFF:
        raise ValueError("string longer than 65535 bytes")
    if "\x00" in text:
        raise ValueError("string contains U+0000")
    return _U16.pack(len(raw)) + raw


def _binary(data: bytes) -> bytes:
    if len(data) > 0xFFFF:
        raise ValueError("binary data longer than 65535 bytes")
    return _U16.pack(len(data)) + bytes(data)


def _properties(props: Properties, context: int) -> bytes:
    if not props:
        return b"\x00"
    out = bytearray()
    for name, value in props.items():
        pid = _PROPERTY_IDS.get(name)
        if pid is None:
            raise ValueError(f"unknown MQTT 5 property {name!r}")
        kind, contexts = _PROPERTY_RULES[pid][:2]
        if context not in contexts:
            raise ValueError(f"property {name} is not valid in this packet")
        if kind == _PAIR_KIND:
            for key, val in value:
                out.append(pid)
                out += _string(key)
                out += _string(val)
            continue
        if kind == _VARINT_KIND:
            for identifier in [value] if isinstance(value, int) else value:
                out.append(pid)
                out += _varint(identifier)
            continue
        out.append(pid)
        if kind == _BYTE_KIND:
            out.append(value)
        elif kind == _U16_KIND:
            out += _U16.pack(value)
        elif kind == _U32_KIND:
            out += _U32.pack(value)
        elif kind == _UTF8_KIND:
            out += _string(value)
        else:
            out += _binary(value)
    return _varint(len(out)) + out


def _encode_connect(p: Connect, level: int) -> bytes:
    v5 = level == MQTT_5
    flags = 0x02 if p.clean_start else 0
    payload = [_string(p.client_id)]
    will = p.will
    if will is not None:
        if will.qos not in (0, 1, 2):
            raise ValueError("Will QoS must be 0, 1 or 2")
        flags |= 0x04 | (will.qos << 3) | (0x20 if will.retain else 0)
        if v5:
            payload.append(_properties(will.properties, _WILL))
        payload.append(_string(will.topic))
        payload.append(_binary(will.payload))
    if p.username is not None:
        flags |= 0x80
        payload.append(_string(p.username))
    if p.password is not None:
        if p.username is None and not v5:
            raise ValueError("MQTT 3.1.1 does not allow a password without a user name")
        flags |= 0x40
        payload.append(_binary(p.password))
    header = _string(p.protocol_name) + bytes((level, flags)) + _U16.pack(p.keep_alive)
    if v5:
        header += _properties(p.properties, _C)
    body = header + b"".join(payload)
    return _fixed_header(0x10, len(body)) + body


def _encode_connack(p: Connack, level: int) -> bytes:
    flags = 1 if p.session_present else 0
    if level != MQTT_5:
        return bytes((0x20, 2, flags, p.reason_code))
    body = bytes((flags, p.reason_code)) + _properties(p.properties, _CA)
    return _fixed_header(0x20, len(body)) + body


def _encode_publish(p: Publish, level: int) -> bytes:
    topic = p.topic.encode("utf-8")
    if len(topic) > 0xFFFF or "\x00" in p.topic:
        raise ValueError("PUBLISH topic longer than 65535 bytes or containing U+0000")
    qos = p.qos
    if qos not in (0, 1, 2):
        raise ValueError("PUBLISH QoS must be 0, 1 or 2")
    b1 = 0x30 | (qos << 1)
    if p.retain:
        b1 |= 0x01
    if p.dup:
        if not qos:
            raise ValueError("PUBLISH with QoS 0 cannot have DUP set")
        b1 |= 0x08
    if qos:
        if not p.packet_id:
            raise ValueError("PUBLISH with QoS > 0 needs a non-zero packet_id")
        head = _U16.pack(len(topic)) + topic + _U16.pack(p.packet_id)
    else:
        head = _U16.pack(len(topic)) + topic
    if level == MQTT_5:
        head += _properties(p.properties, _PUB) if p.properties else b"\x00"
    payload = p.payload
    return b"".join((_fixed_header(b1, len(head) + len(payload)), head, payload))


def _ack_encoder(b1: int, context: int) -> Callable[[Any, int], bytes]:
    def encode_ack(p: Puback | Pubrec | Pubrel | Pubcomp, level: int) -> bytes:
        if not p.packet_id:
            raise ValueError("acknowledgement needs a non-zero packet_id")
        if level != MQTT_5 or not (p.reason_code or p.properties):
            return _ACK2.pack(b1, 2, p.packet_id)
        body = _U16_U8.pack(p.packet_id, p.reason_code)
        if p.properties:
            body += _properties(p.properties, context)
        return _fixed_header(b1, len(body)) + body

    return encode_ack


def _encode_subscribe(p: Subscribe, level: int) -> bytes:
    if not p.packet_id:
        raise ValueError("SUBSCRIBE needs a non-zero packet_id")
    if not p.subscriptions:
        raise ValueError("SUBSCRIBE needs at least one topic filter")
    v5 = level == MQTT_5
    parts = [_U16.pack(p.packet_id)]
    if v5:
        parts.append(_properties(p.properties, _S))
    for sub in p.subscriptions:
        if sub.qos not in (0, 1, 2) or sub.retain_handling not in (0, 1, 2):
            raise ValueError("subscription QoS and Retain Handling must be 0, 1 or 2")
        options = sub.qos
        if v5:
            options |= ((0x04 if sub.no_local else 0) | (0x08 if sub.retain_as_published else 0)
                        | (sub.retain_handling << 4))
        parts.append(_string(sub.topic_filter))
        parts.append(_BYTE[options])
    body = b"".join(parts)
    return _fixed_header(0x82, len(body)) + body


def _encode_suback(p: Suback, level: int) -> bytes:
    if not p.packet_id:
        raise ValueError("SUBACK needs a non-zero packet_id")
    body = _U16.pack(p.packet_id)
    if level == MQTT_5:
        body += _properties(p.properties, _SA)
    body += bytes(p.reason_codes)
    return _fixed_header(0x90, len(body)) + body


def _encode_unsubscribe(p: Unsubscribe, level: int) -> bytes:
    if not p.packet_id:
        raise ValueError("UNSUBSCRIBE needs a non-zero packet_id")
    if not p.topic_filters:
        raise ValueError("UNSUBSCRIBE needs at least one topic filter")
    parts = [_U16.pack(p.packet_id)]
    if level == MQTT_5:
        parts.append(_properties(p.properties, _U))
    parts.extend(_string(f) for f in p.topic_filters)
    body = b"".join(parts)
    return _fixed_header(0xA2, len(body)) + body


def _encode_unsuback(p: Unsuback, level: int) -> bytes:
    if not p.packet_id:
        raise ValueError("UNSUBACK needs a non-zero packet_id")
    if level != MQTT_5:
        return _ACK2.pack(0xB0, 2, p.packet_id)
    body = _U16.pack(p.packet_id) + _properties(p.properties, _UA) + bytes(p.reason_codes)
    return _fixed_header(0xB0, len(body)) + body


def _encode_pingreq(p: Pingreq, level: int) -> bytes:
    return b"\xc0\x00"


def _encode_pingresp(p: Pingresp, level: int) -> bytes:
    return b"\xd0\x00"


def _encode_disconnect(p: Disconnect, level: int) -> bytes:
    if level != MQTT_5 or not (p.reason_code or p.properties):
        return b"\xe0\x00"
    body = _BYTE[p.reason_code]
    if p.properties:
        body += _properties(p.properties, _D)
    return _fixed_header(0xE0, len(body)) + body


def _encode_auth(p: Auth, level: int) -> bytes:
    if level != MQTT_5:
        raise ValueError("AUTH exists only in MQTT 5")
    if not (p.reason_code or p.properties):
        return b"\xf0\x00"
    body = _BYTE[p.reason_code] + _properties(p.properties, _A)
    return _fixed_header(0xF0, len(body)) + body


_ENCODERS: dict[type, Callable[[Any, int], bytes]] = {
    Connect: _encode_connect,
    Connack: _encode_connack,
    Publish: _encode_publish,
    Puback: _ack_encoder(0x40, _PA),
    Pubrec: _ack_encoder(0x50, _PRC),
    Pubrel: _ack_encoder(0x62, _PRL),
    Pubcomp: _ack_encoder(0x70, _PC),
    Subscribe: _encode_subscribe,
    Suback: _encode_suback,
    Unsubscribe: _encode_unsubscribe,
    Unsuback: _encode_unsuback,
    Pingreq: _encode_pingreq,
    Pingresp: _encode_pingresp,
    Disconnect: _encode_disconnect,
    Auth: _encode_auth,
}


def encode(packet: Packet, protocol_level: int) -> bytes:
    """Serialise for MQTT 3.1.1 (4) or 5 (5). MQTT-5-only fields/properties are dropped for 4.

    Level 3 (MQTT 3.1) encodes like 4; a CONNECT carries ``protocol_level`` as
    its level byte and ``packet.protocol_name`` verbatim. Raises ValueError for
    a packet that cannot be put on the wire (missing packet id, QoS > 0 without
    one, string over 65535 bytes, unknown or misplaced property, AUTH for 3.1.1).
    """
    if protocol_level not in (3, 4, 5):
        raise ValueError(f"unsupported protocol level {protocol_level!r}")
    encoder = _ENCODERS.get(type(packet))
    if encoder is None:
        raise TypeError(f"not an MQTT packet: {type(packet).__name__}")
    try:
        return encoder(packet, protocol_level)
    except (struct.error, OverflowError, TypeError) as exc:
        raise ValueError(f"{type(packet).__name__}: field out of range ({exc})") from None
