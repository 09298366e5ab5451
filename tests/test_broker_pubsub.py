"""Publish/subscribe as AWS does it, over real TLS: authorization outcomes, Will, retained
messages, persistent sessions, duplicate client ids, keep-alive and lifecycle events."""

from __future__ import annotations

import json
from pathlib import Path

from harness.emulator.mqtt.packets import (
    Disconnect,
    Pingreq,
    Pingresp,
    Puback,
    Publish,
    Suback,
    Subscribe,
    Subscription,
    Will,
)
from harness.observations import Kind
from tests.brokerkit import BrokerKit, RawClient, allow, arn, kit_fixture, policy

kit = kit_fixture()


def connected(kit: BrokerKit, client_id: str, *, level: int = 4, policies: tuple[str, ...]
              | None = None, **connect: object) -> RawClient:
    device = kit.device(client_id) if policies is None else kit.device(client_id,
                                                                       policies=policies)
    client = kit.client(device)
    connack = client.connect(client_id, protocol_level=level, **connect)  # type: ignore[arg-type]
    assert connack is not None and connack.reason_code == 0, connack
    return client


def subscribe(client: RawClient, *filters: str, qos: int = 1, packet_id: int = 1) -> list[int]:
    client.send(Subscribe(packet_id, [Subscription(f, qos) for f in filters]))
    return client.recv_until(Suback).reason_codes


def publish(client: RawClient, topic: str, payload: bytes, *, qos: int = 1, retain: bool = False,
            packet_id: int = 1) -> None:
    client.send(Publish(topic, payload, qos, retain, packet_id=packet_id if qos else None))
    if qos:
        assert client.recv_until(Puback).packet_id == packet_id


def quiet(client: RawClient) -> bool:
    """True if nothing but our PINGRESP comes back: proves a non-delivery without sleeping."""
    client.send(Pingreq())
    return client.recv() == Pingresp()


# -- authorization outcomes -----------------------------------------------------------------------

def test_unauthorized_publish_disconnects_a_311_client_and_fires_its_will(kit: BrokerKit) -> None:
    # spec broker §1.9, §7 item 2: close, lifecycle AUTH_ERROR, Will sent
    watcher = connected(kit, "watcher")
    subscribe(watcher, "will/#", "$aws/events/presence/disconnected/pub")
    doc = policy(allow("iot:Connect", "*"), allow("iot:Publish", arn("topic", "will/*")))
    client = connected(kit, "pub", policies=(doc,), will=Will("will/pub", b"gone"))
    client.send(Publish("forbidden", b"x", 1, packet_id=5))
    assert client.closed()
    got = {}
    for _ in range(2):
        msg = watcher.recv_until(Publish)
        got[msg.topic] = msg.payload
    assert got["will/pub"] == b"gone"
    event = json.loads(got["$aws/events/presence/disconnected/pub"])
    assert event["disconnectReason"] == "AUTH_ERROR"
    assert event["clientInitiatedDisconnect"] is False


def test_unauthorized_mqtt5_publish_gets_puback_0x87_and_stays_connected(kit: BrokerKit) -> None:
    # spec broker §1.9: MQTT 5 PUBACK 0x87 (no disconnect, UNCONFIRMED default)
    doc = policy(allow("iot:Connect", "*"))
    client = connected(kit, "pub5", level=5, policies=(doc,))
    client.send(Publish("forbidden", b"x", 1, packet_id=9))
    assert client.recv() == Puback(9, 0x87)
    assert quiet(client)
    assert kit.wait_for(Kind.PUBLISH, client_id="pub5").detail["dropped"] == "not_authorized"


def test_missing_receive_permission_silently_skips_delivery(kit: BrokerKit) -> None:
    # spec broker §1.9, §6, §7 item 3: subscribe works, nothing arrives, no disconnect
    doc = policy(allow("iot:Connect", "*"), allow("iot:Subscribe", "*"))
    sub = connected(kit, "nosee", policies=(doc,))
    assert subscribe(sub, "dev/data") == [1]
    pub = connected(kit, "talker")
    publish(pub, "dev/data", b"secret")
    denied = kit.wait_for(Kind.DELIVER_DENIED, client_id="nosee")
    assert denied.detail["topic"] == "dev/data"
    assert quiet(sub)


def test_subscribe_deny_on_311_closes_the_connection(kit: BrokerKit) -> None:
    # spec broker §1.9, §7 item 25 (UNCONFIRMED default: close; lifecycle AUTH_ERROR)
    doc = policy(allow("iot:Connect", "*"), allow("iot:Subscribe", arn("topicfilter", "ok")))
    client = connected(kit, "subdeny", policies=(doc,))
    client.send(Subscribe(1, [Subscription("secret/#", 1)]))
    assert client.closed()
    assert kit.wait_for(Kind.DISCONNECT, client_id="subdeny").detail["reason"] == "AUTH_ERROR"


def test_publish_to_lifecycle_topics_is_refused(kit: BrokerKit) -> None:
    # spec broker §1.5, §4.1: clients may only subscribe to $aws/events/...
    client = connected(kit, "faker")
    client.send(Publish("$aws/events/presence/connected/x", b"{}", 0))
    assert client.closed()


# -- QoS ------------------------------------------------------------------------------------------

def test_qos2_publish_disconnects_and_qos1_subscribers_get_min_qos(kit: BrokerKit) -> None:
    # spec broker §1.4, §7 item 13
    sub = connected(kit, "sub0")
    assert subscribe(sub, "q/t", qos=0) == [0]
    pub = connected(kit, "pub1")
    publish(pub, "q/t", b"one", qos=1)
    assert sub.recv_until(Publish).qos == 0
    pub.send(Publish("q/t", b"two", 2, packet_id=2))
    assert pub.closed()
    assert kit.wait_for(Kind.DISCONNECT, client_id="pub1").detail["reason"] == "CLIENT_ERROR"


# -- Will -----------------------------------------------------------------------------------------

def test_will_is_published_when_the_socket_drops(kit: BrokerKit) -> None:
    # spec broker §1.3 Last Will, §4.2 CONNECTION_LOST
    watcher = connected(kit, "w-watch")
    subscribe(watcher, "lwt/#")
    client = connected(kit, "dies", will=Will("lwt/dies", b"offline", qos=1))
    client.close()
    msg = watcher.recv_until(Publish)
    assert (msg.topic, msg.payload, msg.qos) == ("lwt/dies", b"offline", 1)
    assert kit.wait_for(Kind.DISCONNECT, client_id="dies").detail["reason"] == "CONNECTION_LOST"


def test_clean_disconnect_does_not_publish_the_will(kit: BrokerKit) -> None:
    # spec broker §4.2: CLIENT_INITIATED_DISCONNECT never fires the Will
    watcher = connected(kit, "w-watch2")
    subscribe(watcher, "lwt/#")
    client = connected(kit, "polite", will=Will("lwt/polite", b"offline"))
    client.send(Disconnect())
    assert client.closed()
    assert kit.wait_for(Kind.DISCONNECT, client_id="polite").detail["will"] is False
    assert quiet(watcher)


def test_keep_alive_timeout_disconnects_and_fires_the_will(tmp_path: Path) -> None:
    # spec broker §1.3: 1.5 x keep-alive silence → MQTT_KEEP_ALIVE_TIMEOUT, DISCONNECT 0x8D
    with BrokerKit(tmp_path, keep_alive_min=1, keep_alive_grace=0.3) as kit:
        watcher = connected(kit, "ka-watch", keep_alive=60)
        subscribe(watcher, "lwt/#")
        client = connected(kit, "sleepy", level=5, keep_alive=1, will=Will("lwt/sleepy", b"x"))
        disconnect = client.recv_until(Disconnect, timeout=5)
        assert disconnect.reason_code == 0x8D
        assert watcher.recv_until(Publish).topic == "lwt/sleepy"
        observed = kit.wait_for(Kind.DISCONNECT, client_id="sleepy")
        assert observed.detail["reason"] == "MQTT_KEEP_ALIVE_TIMEOUT"
        assert quiet(watcher)  # the watcher itself was kept alive by its longer keep-alive


# -- retained messages ----------------------------------------------------------------------------

def test_retained_message_goes_only_to_exact_topic_subscriptions(kit: BrokerKit) -> None:
    # spec broker §1.6, §7 item 9
    pub = connected(kit, "retainer")
    live = connected(kit, "live")
    subscribe(live, "r/#")
    publish(pub, "r/t", b"state", retain=True)
    forwarded = live.recv_until(Publish)
    assert forwarded.retain is False  # live forwarding carries RETAIN=0
    exact = connected(kit, "exact")
    subscribe(exact, "r/t")
    stored = exact.recv_until(Publish)
    assert (stored.payload, stored.retain) == (b"state", True)
    wild = connected(kit, "wild")
    subscribe(wild, "r/+")
    assert quiet(wild)


def test_zero_byte_retained_publish_deletes_and_is_still_forwarded(kit: BrokerKit) -> None:
    # spec broker §1.6
    pub = connected(kit, "deleter")
    live = connected(kit, "live2")
    subscribe(live, "z/t")
    publish(pub, "z/t", b"v1", retain=True)
    live.recv_until(Publish)
    publish(pub, "z/t", b"", retain=True, packet_id=2)
    assert live.recv_until(Publish).payload == b""
    late = connected(kit, "late")
    subscribe(late, "z/t")
    assert quiet(late)
    assert kit.call(kit.broker.retained_message, "z/t") is None


def test_retain_needs_retain_publish_permission(kit: BrokerKit) -> None:
    # spec broker §1.6: iot:Publish + iot:RetainPublish
    doc = policy(allow("iot:Connect", "*"), allow("iot:Publish", "*"))
    client = connected(kit, "noretain", policies=(doc,))
    client.send(Publish("r/x", b"v", 1, retain=True, packet_id=1))
    assert client.closed()


# -- persistent sessions --------------------------------------------------------------------------

def test_persistent_311_session_keeps_subscriptions_and_qos1_backlog(kit: BrokerKit) -> None:
    # spec broker §1.3, §7 item 12: sessionPresent, QoS 1 backlog only, subscriptions restored
    device = kit.device("persist")
    first = kit.client(device)
    assert first.connect("persist", clean_start=False).session_present is False
    subscribe(first, "p/t")
    first.send(Disconnect())
    assert first.closed()
    pub = connected(kit, "feeder")
    publish(pub, "p/t", b"q1-a")
    publish(pub, "p/t", b"q0", qos=0)
    publish(pub, "p/t", b"q1-b", packet_id=2)
    kit.clock.advance(1.0)  # 1 CONNECT/s per client id
    second = kit.client(device)
    assert second.connect("persist", clean_start=False).session_present is True
    got = [second.recv_until(Publish).payload for _ in range(2)]
    assert got == [b"q1-a", b"q1-b"]
    assert quiet(second)
    publish(pub, "p/t", b"live", packet_id=3)  # the subscription was restored
    assert second.recv_until(Publish).payload == b"live"


def test_persistent_session_expires_on_the_shared_clock(kit: BrokerKit) -> None:
    # spec broker §1.3: account quota 3600 s; expiry exact in the emulator
    device = kit.device("expiring")
    first = kit.client(device)
    first.connect("expiring", clean_start=False)
    subscribe(first, "e/t")
    first.send(Disconnect())
    assert first.closed()
    kit.clock.advance(3599.0)
    second = kit.client(device)
    assert second.connect("expiring", clean_start=False).session_present is True
    second.send(Disconnect())
    assert second.closed()
    kit.clock.advance(3601.0)
    third = kit.client(device)
    assert third.connect("expiring", clean_start=False).session_present is False


def test_mqtt5_session_expiry_interval_and_no_cross_version_resume(kit: BrokerKit) -> None:
    # spec broker §1.3: SEI decides persistence; a 3.1.1 session is not resumed by MQTT 5
    device = kit.device("sei")
    first = kit.client(device)
    first.connect("sei", protocol_level=5, clean_start=False,
                  properties={"session_expiry_interval": 30})
    first.send(Disconnect())
    assert first.closed()
    kit.clock.advance(10.0)
    second = kit.client(device)
    assert second.connect("sei", protocol_level=5, clean_start=False,
                          properties={"session_expiry_interval": 30}).session_present
    second.send(Disconnect())
    assert second.closed()
    kit.clock.advance(1.0)
    third = kit.client(device)
    assert third.connect("sei", protocol_level=4, clean_start=False).session_present is False


# -- duplicate client id --------------------------------------------------------------------------

def test_duplicate_client_id_evicts_the_old_connection_and_fires_its_will(kit: BrokerKit) -> None:
    # spec broker §1.3, §4.3, §7 item 10
    watcher = connected(kit, "dup-watch")
    subscribe(watcher, "lwt/dup", "$aws/events/presence/+/dup")
    device = kit.device("dup")
    old = kit.client(device)
    assert old.connect("dup", protocol_level=5, will=Will("lwt/dup", b"old-will")).reason_code == 0
    connected_old = json.loads(watcher.recv_until(Publish).payload)
    kit.clock.advance(1.0)  # 1 CONNECT/s per client id
    new = kit.client(device)
    assert new.connect("dup", protocol_level=5).reason_code == 0
    assert old.recv_until(Disconnect).reason_code == 0x8E  # Session taken over
    assert old.closed()
    seen = {}
    for _ in range(3):
        msg = watcher.recv_until(Publish)
        seen[msg.topic] = msg.payload
    assert seen["lwt/dup"] == b"old-will"
    gone = json.loads(seen["$aws/events/presence/disconnected/dup"])
    came = json.loads(seen["$aws/events/presence/connected/dup"])
    assert gone["disconnectReason"] == "DUPLICATE_CLIENTID"
    assert gone["versionNumber"] == connected_old["versionNumber"]
    assert came["versionNumber"] > gone["versionNumber"]


# -- DeleteConnection -----------------------------------------------------------------------------

def test_api_disconnect_sends_0x98_and_can_suppress_the_will(kit: BrokerKit) -> None:
    # spec broker §1.3 DeleteConnection: API_INITIATED_DISCONNECT, preventWillMessage
    watcher = connected(kit, "api-watch")
    subscribe(watcher, "lwt/#")
    client = connected(kit, "victim", level=5, will=Will("lwt/victim", b"x"))
    assert kit.run(kit.broker.disconnect("victim", prevent_will=True)) is True
    assert client.recv_until(Disconnect).reason_code == 0x98
    assert kit.wait_for(Kind.DISCONNECT, client_id="victim").detail["reason"] == \
        "API_INITIATED_DISCONNECT"
    assert quiet(watcher)
    assert kit.run(kit.broker.disconnect("nobody")) is False


# -- lifecycle events -----------------------------------------------------------------------------

def test_lifecycle_payloads_carry_aws_keys(kit: BrokerKit) -> None:
    # spec broker §4.2, §7 item 23
    watcher = connected(kit, "lc-watch")
    subscribe(watcher, "$aws/events/presence/+/lc", "$aws/events/subscriptions/+/lc")
    device = kit.device("lc")
    client = kit.client(device)
    client.connect("lc")
    subscribe(client, "a/b", "c/#")
    client.send(Disconnect())
    events = [json.loads(watcher.recv_until(Publish).payload) for _ in range(3)]
    by_type = {e["eventType"]: e for e in events}
    on, sub, off = by_type["connected"], by_type["subscribed"], by_type["disconnected"]
    assert set(on) == {"clientId", "timestamp", "eventType", "sessionIdentifier",
                       "principalIdentifier", "ipAddress", "versionNumber"}
    assert set(off) == {"clientId", "timestamp", "eventType", "sessionIdentifier",
                        "principalIdentifier", "clientInitiatedDisconnect", "disconnectReason",
                        "versionNumber"}
    assert on["principalIdentifier"] == device.certificate_id
    assert on["ipAddress"] == "127.0.0.1"
    assert isinstance(on["timestamp"], int) and on["timestamp"] > 1_600_000_000_000
    assert on["versionNumber"] == off["versionNumber"]
    assert on["sessionIdentifier"] == off["sessionIdentifier"]
    assert (off["clientInitiatedDisconnect"], off["disconnectReason"]) == (
        True, "CLIENT_INITIATED_DISCONNECT")
    assert sub["topics"] == ["a/b", "c/#"]


def test_no_lifecycle_events_for_client_ids_with_wildcards(kit: BrokerKit) -> None:
    # spec broker §4.1
    watcher = connected(kit, "wc-watch")
    subscribe(watcher, "$aws/events/presence/connected/#")
    connected(kit, "odd+id")
    assert quiet(watcher)


def test_wildcard_first_filters_do_not_see_lifecycle_events(kit: BrokerKit) -> None:
    # spec broker §1.5, §7 item 7
    watcher = connected(kit, "hash-watch")
    subscribe(watcher, "#")
    connected(kit, "someone")
    assert quiet(watcher)


# -- shared subscriptions -------------------------------------------------------------------------

def test_shared_subscription_delivers_each_message_to_one_member(kit: BrokerKit) -> None:
    # spec broker §1.5: one member per group
    members = [connected(kit, f"member-{i}") for i in range(2)]
    for member in members:
        assert subscribe(member, "$share/g/s/t") == [1]
    pub = connected(kit, "sharer")
    for i in range(6):
        publish(pub, "s/t", str(i).encode(), packet_id=i + 1)
    got: list[bytes] = []
    for member in members:
        member.send(Pingreq())
        while (packet := member.recv()) != Pingresp():
            assert isinstance(packet, Publish)
            got.append(packet.payload)
            member.send(Puback(packet.packet_id or 0))
    assert sorted(got) == [str(i).encode() for i in range(6)]


# -- MQTT 5 Will Delay and Message Expiry ---------------------------------------------------------

def test_will_delay_waits_and_is_cancelled_by_a_reconnect(kit: BrokerKit) -> None:
    # spec broker §1.3 (UNCONFIRMED default: honour Will Delay, capped by session expiry)
    watcher = connected(kit, "delay-watch")
    subscribe(watcher, "lwt/#")
    device = kit.device("delayed")
    will = Will("lwt/delayed", b"late", properties={"will_delay_interval": 60})
    first = kit.client(device)
    first.connect("delayed", protocol_level=5, clean_start=False, will=will,
                  properties={"session_expiry_interval": 120})
    first.close()  # abnormal: the Will waits for its delay
    kit.wait_for(Kind.DISCONNECT, client_id="delayed")
    assert quiet(watcher)
    kit.clock.advance(1.0)  # 1 CONNECT/s per client id
    second = kit.client(device)
    second.connect("delayed", protocol_level=5, clean_start=False, will=will,
                   properties={"session_expiry_interval": 120})
    since = kit.observations.last_seq  # before the close: its DISCONNECT may be quick
    second.close()
    kit.wait_for(Kind.DISCONNECT, client_id="delayed", since=since)
    assert quiet(watcher)  # the reconnect cancelled the first Will
    kit.clock.advance(121.0)  # the session ends before the delay: the Will goes out then
    assert watcher.recv_until(Publish).payload == b"late"


def test_expired_messages_are_not_delivered_from_the_offline_queue(kit: BrokerKit) -> None:
    # spec broker §1.3 / §1.7: Message Expiry lapsed while offline → not delivered
    device = kit.device("expiry-sub")
    sub = kit.client(device)
    sub.connect("expiry-sub", protocol_level=5, clean_start=False,
                properties={"session_expiry_interval": 600})
    subscribe(sub, "x/t")
    sub.send(Disconnect())
    assert sub.closed()
    pub = connected(kit, "expiry-pub", level=5)
    pub.send(Publish("x/t", b"short", 1, packet_id=1, properties={"message_expiry_interval": 5}))
    pub.recv_until(Puback)
    pub.send(Publish("x/t", b"long", 1, packet_id=2, properties={"message_expiry_interval": 50}))
    pub.recv_until(Puback)
    kit.clock.advance(10.0)
    again = kit.client(device)
    assert again.connect("expiry-sub", protocol_level=5, clean_start=False,
                         properties={"session_expiry_interval": 600}).session_present
    delivered = again.recv_until(Publish)
    assert delivered.payload == b"long"
    assert 39 <= delivered.properties["message_expiry_interval"] <= 40  # remaining time
    assert quiet(again)


def test_registry_reset_forgets_retained_messages_and_disconnects(kit: BrokerKit) -> None:
    # the admin reset empties the account: certificates, sessions, retained messages
    pub = connected(kit, "before-reset")
    publish(pub, "keep/me", b"v", retain=True)
    kit.directory.reset()
    assert pub.closed()  # its certificate is no longer registered (spec §2.3)
    assert kit.call(kit.broker.retained_message, "keep/me") is None
