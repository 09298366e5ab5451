"""Clients nobody here wrote are the conformance test (design principle 3): paho-mqtt,
mosquitto's command-line clients and the AWS IoT Device SDK v2 (awscrt)."""

from __future__ import annotations

import queue
import threading
from typing import Any

import pytest

from harness.observations import Kind
from tests.brokerkit import (
    BrokerKit,
    PahoClient,
    allow,
    crt_connection,
    crt_mqtt5_client,
    kit_fixture,
    mosquitto_available,
    mosquitto_pub,
    mosquitto_sub,
    policy,
)

kit = kit_fixture()


# -- paho-mqtt ------------------------------------------------------------------------------------

@pytest.mark.parametrize("version", [4, 5])
def test_paho_publishes_and_receives(kit: BrokerKit, version: int) -> None:
    # spec broker §1.1: 3.1.1 and 5 on one port
    client = PahoClient(kit, kit.device(f"paho{version}"), f"paho{version}", version=version)
    try:
        assert client.connack()[0] == 0
        assert [int(getattr(c, "value", c)) for c in client.subscribe("paho/t", 1)] == [1]
        client.publish("paho/t", b"hello", 1)
        got = client.expect()
        assert (got.topic, got.payload, got.qos) == ("paho/t", b"hello", 1)
    finally:
        client.close()


def test_paho_311_refused_certificate_sees_no_connack(kit: BrokerKit) -> None:
    # spec broker §1.9, §6 ("unexpected hangup", no CONNACK)
    client = PahoClient(kit, kit.device("paho-off", status="INACTIVE"), "paho-off", version=4)
    try:
        client.wait_disconnected()
        with pytest.raises(queue.Empty):
            client.connacks.get_nowait()
    finally:
        client.close()


def test_paho_5_refused_certificate_gets_not_authorized(kit: BrokerKit) -> None:
    # spec broker §1.9: MQTT 5 CONNACK 0x87
    client = PahoClient(kit, kit.device("paho5-off", status="REVOKED"), "paho5-off", version=5)
    try:
        assert client.connack()[0] == 0x87
    finally:
        client.close()


def test_paho_5_unauthorized_publish_gets_puback_0x87(kit: BrokerKit) -> None:
    # spec broker §1.9: MQTT 5 PUBACK 0x87, the connection stays
    device = kit.device("paho5-pub", policies=[policy(allow("iot:Connect", "*"))])
    client = PahoClient(kit, device, "paho5-pub", version=5)
    reasons: queue.Queue[Any] = queue.Queue()
    client.client.on_publish = lambda _c, _u, mid, reason, props: reasons.put(reason)
    try:
        assert client.connack()[0] == 0
        client.client.publish("not/mine", b"x", 1)
        assert int(reasons.get(timeout=5).value) == 0x87
        assert client.disconnects.empty()
    finally:
        client.close()


# -- mosquitto_pub / mosquitto_sub ----------------------------------------------------------------

needs_mosquitto = pytest.mark.skipif(not mosquitto_available(), reason="mosquitto-clients absent")


@needs_mosquitto
@pytest.mark.parametrize("version", ["mqttv311", "mqttv5"])
def test_mosquitto_clients_exchange_a_message(kit: BrokerKit, version: str) -> None:
    # spec broker §1.2: --cafile/--cert/--key mutual TLS, both protocol versions
    device = kit.device("mosq")
    sub = mosquitto_sub(kit, device, "mosq/t", version=version, client_id=f"msub-{version}")
    try:
        kit.wait_for(Kind.SUBSCRIBE, client_id=f"msub-{version}")
        result = mosquitto_pub(kit, device, "mosq/t", "from-mosquitto", version=version,
                               client_id=f"mpub-{version}")
        assert result.returncode == 0, result.stderr
        out, err = sub.communicate(timeout=10)
        assert out.strip() == "from-mosquitto", err
    finally:
        if sub.poll() is None:
            sub.kill()
            sub.wait()


@needs_mosquitto
@pytest.mark.parametrize("version", ["mqttv311", "mqttv5"])
def test_mosquitto_pub_with_unregistered_certificate_fails(kit: BrokerKit, version: str) -> None:
    # spec broker §2.3: an unregistered certificate completes TLS and fails at CONNECT
    device = kit.device("mosq-unknown", status=None)
    result = mosquitto_pub(kit, device, "mosq/t", "x", version=version, client_id="mosq-x")
    assert result.returncode != 0
    assert kit.wait_for(Kind.CONNECT_FAILED).detail["detail"] == "certificate_unknown"
    if version == "mqttv5":
        assert "not authori" in (result.stderr + result.stdout).lower()


# -- AWS IoT Device SDK v2 (awscrt) ---------------------------------------------------------------

def test_sdk_v2_mqtt311_connection_subscribes_and_publishes(kit: BrokerKit) -> None:
    # the SDK samples' way: mqtt_connection_builder.mtls_from_path(port=, ca_filepath=)
    from awscrt import mqtt

    connection = crt_connection(kit, kit.device("crt311"), "crt311")
    received: queue.Queue[tuple[str, bytes]] = queue.Queue()
    connection.connect().result(10)
    try:
        future, _ = connection.subscribe(
            "crt/t", mqtt.QoS.AT_LEAST_ONCE,
            callback=lambda topic, payload, **_kw: received.put((topic, payload)))
        assert future.result(10)["qos"] == mqtt.QoS.AT_LEAST_ONCE
        future, _ = connection.publish("crt/t", b"sdk-hello", mqtt.QoS.AT_LEAST_ONCE)
        future.result(10)
        assert received.get(timeout=10) == ("crt/t", b"sdk-hello")
    finally:
        connection.disconnect().result(10)
    assert kit.wait_for(Kind.DISCONNECT, client_id="crt311").detail["reason"] == \
        "CLIENT_INITIATED_DISCONNECT"


def test_sdk_v2_mqtt311_refused_connect_fails(kit: BrokerKit) -> None:
    # spec broker §6: the SDK reports an unexpected hangup (no CONNACK)
    connection = crt_connection(kit, kit.device("crt-off", status="INACTIVE"), "crt-off")
    with pytest.raises(Exception):  # noqa: B017 - awscrt raises its own AwsCrtError
        connection.connect().result(10)


def _mqtt5(kit: BrokerKit, name: str, **device: Any) -> tuple[Any, dict[str, Any]]:
    state: dict[str, Any] = {"success": threading.Event(), "failure": queue.Queue(),
                             "received": queue.Queue(), "stopped": threading.Event()}
    client = crt_mqtt5_client(
        kit, kit.device(name, **device), name,
        on_lifecycle_connection_success=lambda data: state["success"].set(),
        on_lifecycle_connection_failure=lambda data: state["failure"].put(data),
        on_lifecycle_stopped=lambda data: state["stopped"].set(),
        on_publish_received=lambda data: state["received"].put(data.publish_packet))
    return client, state


def test_sdk_v2_mqtt5_client_subscribes_and_publishes(kit: BrokerKit) -> None:
    from awscrt import mqtt5

    client, state = _mqtt5(kit, "crt5")
    client.start()
    try:
        assert state["success"].wait(10)
        suback = client.subscribe(mqtt5.SubscribePacket(subscriptions=[
            mqtt5.Subscription("crt5/t", mqtt5.QoS.AT_LEAST_ONCE)])).result(10)
        assert suback.reason_codes == [mqtt5.SubackReasonCode.GRANTED_QOS_1]
        puback = client.publish(mqtt5.PublishPacket(topic="crt5/t", payload=b"v5",
                                                    qos=mqtt5.QoS.AT_LEAST_ONCE)).result(10)
        assert puback.puback.reason_code == mqtt5.PubackReasonCode.SUCCESS
        packet = state["received"].get(timeout=10)
        assert (packet.topic, bytes(packet.payload)) == ("crt5/t", b"v5")
    finally:
        client.stop()
        state["stopped"].wait(10)


def test_sdk_v2_mqtt5_refused_certificate_gets_not_authorized(kit: BrokerKit) -> None:
    # spec broker §1.9: CONNACK 0x87
    from awscrt import mqtt5

    client, state = _mqtt5(kit, "crt5-off", status="REVOKED")
    client.start()
    try:
        failure = state["failure"].get(timeout=10)
        assert failure.connack_packet.reason_code == mqtt5.ConnectReasonCode.NOT_AUTHORIZED
    finally:
        client.stop()
        state["stopped"].wait(10)
