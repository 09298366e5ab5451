"""Who gets in: certificates, states, SNI, ALPN, CONNECT authorization (real TLS)."""

from __future__ import annotations

import datetime as dt
import json
import socket
import ssl
import time
from pathlib import Path

import pytest

from harness import pki
from harness.emulator.broker_settings import RefusalPoint
from harness.emulator.mqtt.packets import (
    Connack,
    Disconnect,
    Pingreq,
    Pingresp,
    Publish,
    Suback,
    Subscribe,
    Subscription,
)
from harness.observations import Kind
from tests.brokerkit import (
    SERVER_NAME,
    BrokerKit,
    RawClient,
    allow,
    arn,
    kit_fixture,
    policy,
    write_device,
)

kit = kit_fixture()


def watch_presence(kit: BrokerKit, client_id: str) -> RawClient:
    """A client subscribed to every presence event of ``client_id``."""
    watcher = kit.client(kit.device(f"watch-{client_id}"))
    assert watcher.connect(f"watch-{client_id}").reason_code == 0
    watcher.send(Subscribe(1, [Subscription(f"$aws/events/presence/+/{client_id}", 1)]))
    watcher.recv_until(Suback)
    return watcher


def next_event(watcher: RawClient, timeout: float = 5.0) -> dict:
    publish = watcher.recv_until(Publish, timeout)
    return json.loads(publish.payload)


@pytest.mark.parametrize("level", [4, 5])
def test_registered_active_certificate_is_admitted(kit: BrokerKit, level: int) -> None:
    # spec broker §2.3: ACTIVE is the only state that may connect
    device = kit.device("active")
    with kit.client(device) as client:
        connack = client.connect("active", protocol_level=level)
        assert connack is not None and connack.reason_code == 0
    obs = kit.wait_for(Kind.CONNECT, client_id="active")
    assert obs.certificate_id == device.certificate_id
    assert obs.detail["tls"] in ("TLSv1.2", "TLSv1.3")


@pytest.mark.parametrize("status", ["INACTIVE", "REVOKED", "PENDING_ACTIVATION", None])
def test_refused_certificate_gets_no_connack_on_311(kit: BrokerKit, status: str | None) -> None:
    # spec broker §2.3, §1.9, §7 items 1/15: handshake completes, CONNECT closed, no CONNACK
    device = kit.device("refused", status=status)
    with kit.client(device) as client:
        assert client.try_connect("refused") is None
    failed = kit.wait_for(Kind.CONNECT_FAILED, client_id="refused")
    assert failed.certificate_id == device.certificate_id
    assert failed.detail["reason"] == "not_authorized"
    assert not kit.observations.query(kinds=[Kind.CONNECT], client_id="refused")


@pytest.mark.parametrize("status", ["INACTIVE", "REVOKED", None])
def test_refused_certificate_gets_connack_0x87_on_mqtt5(kit: BrokerKit, status: str | None
                                                        ) -> None:
    # spec broker §1.9 (MQTT 5 CONNACK 0x87 Not authorized), §2.3
    device = kit.device("refused5", status=status)
    with kit.client(device) as client:
        connack = client.connect("refused5", protocol_level=5)
        assert connack is not None and connack.reason_code == 0x87
        assert client.closed()


def test_explain_refusals_answers_a_311_refusal_with_a_return_code(tmp_path: Path) -> None:
    # spec broker §1.9 (UNCONFIRMED rc 5/7 never observed): emulator-only aid
    with BrokerKit(tmp_path, explain_refusals=True) as kit:
        device = kit.device("explained", status="INACTIVE")
        with kit.client(device) as client:
            assert client.connect("explained") == Connack(False, 5)


def test_certificate_from_an_unknown_ca_fails_the_tls_handshake(kit: BrokerKit,
                                                                tmp_path: Path) -> None:
    # spec broker §2.3 / §1.2: no chain to a trust anchor → the handshake fails (TLS_FAILED)
    stranger_ca = pki.CertificateAuthority.create("stranger")
    device = kit.device("stranger", ca=stranger_ca, status=None)
    with pytest.raises((ssl.SSLError, ConnectionError, OSError)):
        client = kit.client(device)
        client.try_connect("stranger")
        assert client.recv() is None
        raise ConnectionError("closed")
    failed = kit.wait_for(Kind.TLS_FAILED)
    assert "certificate" in failed.detail["reason"].lower()


def test_expired_device_certificate_fails_the_handshake(kit: BrokerKit, tmp_path: Path) -> None:
    # spec broker §2.3 (UNCONFIRMED default: reject expired certificates)
    key = pki.generate_ec_key()
    past = dt.datetime.now(dt.timezone.utc) - dt.timedelta(days=2)
    cert = kit.ca.issue_device_certificate(key.public_key(), not_before=past - dt.timedelta(1),
                                           not_after=past)
    device = write_device(tmp_path / "expired", "expired", key, cert, kit.ca_file)
    kit.directory.register(device.certificate_pem)
    with pytest.raises((ssl.SSLError, ConnectionError, OSError)):
        client = kit.client(device)
        assert client.try_connect("expired") is None
        raise ConnectionError("closed")
    assert "expired" in kit.wait_for(Kind.TLS_FAILED).detail["reason"].lower()


def test_refusal_at_handshake_closes_before_any_mqtt_byte(tmp_path: Path) -> None:
    # spec broker §2.3: the "fail in handshake" switch (Python's ssl: right after it)
    with BrokerKit(tmp_path, refuse_certificates_at=RefusalPoint.HANDSHAKE) as kit:
        device = kit.device("early", status="INACTIVE")
        with kit.client(device) as client:
            assert client.recv() is None
        failed = kit.wait_for(Kind.CONNECT_FAILED)
        assert failed.detail["stage"] == "handshake"


def test_policy_denying_connect_emits_only_connect_failed(kit: BrokerKit) -> None:
    # spec broker §1.9, §4.3, §7 item 1: no CONNACK, connect_failed, never connected
    watcher = watch_presence(kit, "denied")
    device = kit.device("denied", policies=[policy(allow("iot:Connect",
                                                         arn("client", "someone-else")))])
    with kit.client(device) as client:
        assert client.try_connect("denied") is None
    event = next_event(watcher)
    assert event["eventType"] == "connect_failed"
    assert event["connectFailureReason"] == "AUTHORIZATION_FAILED"
    assert event["principalIdentifier"] == device.certificate_id
    assert set(event) == {"clientId", "timestamp", "eventType", "connectFailureReason",
                          "principalIdentifier", "sessionIdentifier", "ipAddress"}
    watcher.send(Pingreq())
    assert watcher.recv() == Pingresp()  # and nothing else came before it


def test_deactivating_a_certificate_disconnects_its_live_connections(kit: BrokerKit) -> None:
    # spec broker §2.3, §7 item 15: leaving ACTIVE disconnects live sessions
    device = kit.device("doomed")
    watcher = watch_presence(kit, "doomed-5")
    c4, c5 = kit.client(device), kit.client(device)
    assert c4.connect("doomed-4").reason_code == 0
    assert c5.connect("doomed-5", protocol_level=5).reason_code == 0
    assert next_event(watcher)["eventType"] == "connected"
    kit.directory.set_status(device.certificate_id, "INACTIVE")
    assert c4.closed()
    disconnect = c5.recv_until(Disconnect)
    assert disconnect.reason_code == 0x98  # Administrative action (UNCONFIRMED mapping)
    assert c5.closed()
    event = next_event(watcher)
    assert (event["eventType"], event["disconnectReason"]) == ("disconnected", "AUTH_ERROR")
    kit.clock.advance(1.0)  # 1 CONNECT/s per client id
    with kit.client(device) as again:
        assert again.try_connect("doomed-4") is None


def test_sni_only_certificate_needs_sni(kit: BrokerKit) -> None:
    # spec broker §1.2, §7 item 15: SNI_ONLY certificates must send SNI; DEFAULT need not
    device = kit.device("sni", mode="SNI_ONLY")
    with kit.client(device) as client:
        assert client.try_connect("sni-a") is None
    assert kit.wait_for(Kind.CONNECT_FAILED).detail["detail"] == "sni_required"
    with kit.client(device, sni=SERVER_NAME) as client:
        assert client.connect("sni-b").reason_code == 0
    assert kit.wait_for(Kind.CONNECT, client_id="sni-b").detail["sni"] == SERVER_NAME


def test_alpn_x_amzn_mqtt_ca_and_no_alpn_share_the_port(kit: BrokerKit) -> None:
    # spec broker §1.2: 8883 (no ALPN) and 443 + x-amzn-mqtt-ca behave alike here
    device = kit.device("alpn")
    with kit.client(device, alpn=["x-amzn-mqtt-ca"]) as client:
        assert client.connect("alpn-1").reason_code == 0
    with kit.client(device) as client:
        assert client.connect("alpn-2").reason_code == 0
    assert kit.wait_for(Kind.CONNECT, client_id="alpn-1").detail["alpn"] == "x-amzn-mqtt-ca"
    assert kit.wait_for(Kind.CONNECT, client_id="alpn-2").detail["alpn"] is None


def test_require_alpn_refuses_clients_without_it(tmp_path: Path) -> None:
    # spec broker §1.2: port 443 needs x-amzn-mqtt-ca for X.509 MQTT (switch require_alpn)
    with BrokerKit(tmp_path, require_alpn=True) as kit:
        device = kit.device("no-alpn")
        with kit.client(device) as client:
            assert client.recv() is None
        with kit.client(device, alpn=["x-amzn-mqtt-ca"]) as client:
            assert client.connect("with-alpn").reason_code == 0


def test_one_connect_per_second_per_client_id(kit: BrokerKit) -> None:
    # spec broker §1.8 / §7 item 24: excess CONNECTs for one client id are refused
    device = kit.device("rate")
    first = kit.client(device)
    assert first.connect("rate").reason_code == 0
    with kit.client(device) as second:
        assert second.try_connect("rate") is None  # 3.1.1: closed (UNCONFIRMED presentation)
    assert kit.wait_for(Kind.CONNECT_FAILED).detail["reason"] == "throttled"
    first.send(Pingreq())
    assert first.recv() == Pingresp()  # the throttled attempt did not evict it
    kit.clock.advance(1.0)
    with kit.client(device) as third:
        assert third.connect("rate").reason_code == 0


def test_trust_anchor_added_at_runtime_lets_its_devices_in(kit: BrokerKit) -> None:
    # spec broker §2.4 (registered CAs): the server context is rebuilt when anchors change
    other_ca = pki.CertificateAuthority.create("registered CA")
    device = kit.device("via-ca", ca=other_ca)
    before = kit.broker.ssl_context
    kit.directory.add_trust_anchor(other_ca.pem)
    deadline = time.monotonic() + 5
    while kit.broker.ssl_context is before:  # the rebuild runs in an executor
        assert time.monotonic() < deadline, "SSL context not rebuilt"
        kit.observations.wait_sync(timeout=0.05, since=kit.observations.last_seq)
    with kit.client(device) as client:
        assert client.connect("via-ca").reason_code == 0


@pytest.mark.parametrize("gated", [False, True])
def test_accepted_connections_have_nagle_off(tmp_path: Path, gated: bool) -> None:
    # perf-notes: request/response needs TCP_NODELAY; the event loop sets it on every TCP
    # transport (create_server and connect_accepted_socket alike), the broker relies on that
    kit = BrokerKit(tmp_path)
    if gated:  # the accept path the emulator uses (it may hold handshakes back)
        kit.broker.handshake_gate = lambda _ip: 0.0
    with kit:
        client = kit.client(kit.device("nagle"))
        assert client.connect("nagle").reason_code == 0

        def nodelay() -> list[int]:
            return [link.transport.get_extra_info("socket").getsockopt(
                socket.IPPROTO_TCP, socket.TCP_NODELAY) for link in kit.broker._links]

        assert kit.call(nodelay) and all(kit.call(nodelay))
