"""Bad input is cut off with the right reason and never disturbs other clients."""

from __future__ import annotations

import socket
import time
from pathlib import Path

import pytest

from harness.emulator.mqtt.codec import encode
from harness.emulator.mqtt.packets import (
    Connect,
    Disconnect,
    Puback,
    Publish,
    Suback,
    Subscribe,
    Subscription,
)
from harness.observations import Kind
from tests.brokerkit import HOST, BrokerKit, RawClient, kit_fixture

kit = kit_fixture(connect_timeout=0.5, packet_timeout=0.5)


def healthy(kit: BrokerKit, name: str) -> RawClient:
    c = kit.client(kit.device(name))
    assert c.connect(name).reason_code == 0
    c.send(Subscribe(1, [Subscription(f"echo/{name}", 1)]))
    assert c.recv_until(Suback).reason_codes == [1]
    return c


def round_trip(c: RawClient, name: str, n: int) -> None:
    """The healthy client still gets its own message back."""
    c.send(Publish(f"echo/{name}", f"ping-{n}".encode(), 1, packet_id=n))
    assert c.recv_until(Publish).payload == f"ping-{n}".encode()


@pytest.mark.parametrize(("garbage", "reason_code"), [
    (b"\x30\xff\xff\xff\xff\x01", 0x81),  # remaining length longer than four bytes
    (b"\xa0\x02\x00\x01", 0x81),  # UNSUBSCRIBE with fixed-header flags 0000 (spec §6)
    (b"\x82\x05\x00\x01\x00\x01a", 0x81),  # SUBSCRIBE whose filter has no options byte
    (b"\x30\xff\xff\xff\x7f", 0x95),  # a 256 MB PUBLISH announced: refused before the body
])
def test_malformed_packets_cut_the_sender_off_with_client_error(kit: BrokerKit, garbage: bytes,
                                                                reason_code: int) -> None:
    # spec broker §1.1 (malformed packets → CLIENT_ERROR disconnect), §1.8
    other = healthy(kit, "bystander")
    bad = kit.client(kit.device("bad"))
    assert bad.connect("bad", protocol_level=5).reason_code == 0
    bad.send_bytes(garbage)
    disconnect = bad.recv_until(Disconnect)
    assert disconnect.reason_code == reason_code
    assert bad.closed()
    assert kit.wait_for(Kind.DISCONNECT, client_id="bad").detail["reason"] == "CLIENT_ERROR"
    assert kit.wait_for(Kind.PROTOCOL_ERROR, client_id="bad").detail["reason_code"] == reason_code
    round_trip(other, "bystander", 2)


def test_truncated_packet_then_hang_up_is_connection_lost(kit: BrokerKit) -> None:
    # spec broker §4.2: socket dropped without DISCONNECT → CONNECTION_LOST
    c = kit.client(kit.device("trunc"))
    assert c.connect("trunc").reason_code == 0
    c.send_bytes(encode(Publish("t/x", b"x" * 100, 1, packet_id=1), 4)[:20])
    c.close()
    assert kit.wait_for(Kind.DISCONNECT, client_id="trunc").detail["reason"] == "CONNECTION_LOST"


def test_slow_loris_packet_is_cut_off_while_others_keep_working(kit: BrokerKit) -> None:
    # design principle 6: a packet started must complete within settings.packet_timeout
    other = healthy(kit, "worker")
    slow = kit.client(kit.device("slow"))
    assert slow.connect("slow").reason_code == 0
    data = encode(Publish("t/x", b"x" * 50, 1, packet_id=1), 4)
    started = time.monotonic()
    slow.send_bytes(data[:10])
    round_trip(other, "worker", 2)
    assert slow.closed(timeout=5)
    assert 0.4 < time.monotonic() - started < 4
    assert kit.wait_for(Kind.DISCONNECT, client_id="slow").detail["reason"] == "CLIENT_ERROR"
    round_trip(other, "worker", 3)


def test_client_that_never_sends_connect_is_closed(kit: BrokerKit) -> None:
    # settings.connect_timeout: a TLS session without CONNECT does not hold a slot
    silent = kit.client(kit.device("silent"))
    half = kit.client(kit.device("half"))
    half.send_bytes(encode(Connect(4, "half"), 4)[:6])
    assert silent.closed(timeout=5)
    assert half.closed(timeout=5)
    failures = kit.observations.query(kinds=[Kind.PROTOCOL_ERROR])
    assert len(failures) == 2 and all(f.detail["stage"] == "before_connect" for f in failures)


def test_first_packet_other_than_connect_closes_the_connection(kit: BrokerKit) -> None:
    # spec broker §1.1: nothing but CONNECT before CONNACK
    c = kit.client(kit.device("rude"))
    c.send(Publish("a", b"x"))
    assert c.closed()


def test_plain_tcp_garbage_is_a_tls_failure(kit: BrokerKit) -> None:
    # not TLS at all: the handshake fails and is observed; the broker serves others
    other = healthy(kit, "steady")
    with socket.create_connection((HOST, kit.port), timeout=5) as raw:
        raw.sendall(b"GET / HTTP/1.1\r\nHost: x\r\n\r\n")
        raw.recv(100)  # an alert or the end of the stream
    kit.wait_for(Kind.TLS_FAILED)
    round_trip(other, "steady", 2)


def test_slow_reader_does_not_block_the_publisher(tmp_path: Path) -> None:
    # a subscriber that never reads: QoS 0 dropped past the write buffer, QoS 1 windowed
    with BrokerKit(tmp_path, write_buffer_limit=64 * 1024,
                   publish_rate_per_connection=None) as kit:
        lazy = kit.client(kit.device("lazy"))
        assert lazy.connect("lazy").reason_code == 0
        lazy.send(Subscribe(1, [Subscription("flood", 0)]))
        lazy.recv_until(Suback)
        pub = kit.client(kit.device("flooder"))
        assert pub.connect("flooder").reason_code == 0
        payload = b"x" * 60000
        for i in range(1, 201):
            pub.send(Publish("flood", payload, 1, packet_id=i))
            assert pub.recv_until(Puback).packet_id == i
