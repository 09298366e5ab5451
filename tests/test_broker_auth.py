"""Principals, policy sets and cache invalidation as live connections see them."""

from __future__ import annotations

import json
from pathlib import Path

from cryptography import x509

from harness.emulator.auth import Principal
from harness.emulator.mqtt.packets import (
    Pingreq,
    Pingresp,
    Puback,
    Publish,
    Suback,
    Subscribe,
    Subscription,
)
from harness.observations import Kind
from tests.brokerkit import ALLOW_ALL, BrokerKit, MemThing, allow, arn, kit_fixture, policy

kit = kit_fixture()


def test_policy_change_reaches_a_live_connection_without_reconnecting(kit: BrokerKit) -> None:
    # spec broker §1.9: Publish is checked per operation against the current policies;
    # the per-connection cache is dropped when attachments change
    device = kit.device("live-policy")
    client = kit.client(device)
    assert client.connect("live-policy").reason_code == 0
    client.send(Publish("data/x", b"1", 1, packet_id=1))
    assert client.recv() == Puback(1)
    kit.directory.set_policies(device.certificate_id, [policy(allow("iot:Connect", "*"))])
    client.send(Pingreq())
    assert client.recv() == Pingresp()  # the registry event was handled before this
    client.send(Publish("data/x", b"2", 1, packet_id=2))
    assert client.closed()  # 3.1.1: unauthorized publish closes the connection


def test_thing_policy_variables_and_exclusive_thing_name(kit: BrokerKit) -> None:
    # spec broker §3.5 (thing variables need client id = thing name unless exclusive),
    # §4.2 (thingName in lifecycle events only with an exclusive association)
    doc = policy(allow("iot:Connect", "*"), allow(["iot:Subscribe"], "*"),
                 allow("iot:Receive", "*"),
                 allow("iot:Publish", arn("topic", "things/${iot:Connection.Thing.ThingName}/*")))
    watcher = kit.client(kit.device("tw"))
    watcher.connect("tw")
    watcher.send(Subscribe(1, [Subscription("$aws/events/presence/connected/+", 1)]))
    watcher.recv_until(Suback)
    device = kit.device("thing-dev", policies=[doc])
    kit.directory.attach_thing(device.certificate_id, MemThing("pump-7"), exclusive=True)
    client = kit.client(device)
    assert client.connect("any-client-id").reason_code == 0
    event = json.loads(watcher.recv_until(Publish).payload)
    assert event["thingName"] == "pump-7"
    client.send(Publish("things/pump-7/state", b"on", 1, packet_id=1))
    assert client.recv() == Puback(1)
    client.send(Publish("things/pump-8/state", b"on", 1, packet_id=2))
    assert client.closed()


def test_principal_resolver_admits_unregistered_certificate_with_own_policy(
        kit: BrokerKit) -> None:
    # fleet-provisioning §2.2: temporary claims connect with a built-in policy (part 2's hook)
    device = kit.device("claim", status=None)
    claim_policy = policy(allow("iot:Connect", "*"),
                          allow(["iot:Publish", "iot:Subscribe", "iot:Receive"], "*"))
    expires_at = kit.clock.now() + 300

    def resolver(certificate_id: str, certificate: x509.Certificate) -> Principal | None:
        if certificate_id != device.certificate_id:
            return None
        return Principal(certificate_id, certificate, (claim_policy,),
                         expires_at=expires_at, kind="temporary_claim")

    kit.broker.add_principal_resolver(resolver)
    client = kit.client(device)
    assert client.connect("claimer").reason_code == 0
    assert kit.wait_for(Kind.CONNECT, client_id="claimer").detail["principal"] == \
        "temporary_claim"
    kit.clock.advance(301)
    late = kit.client(device)
    assert late.try_connect("claimer-2") is None  # expired: refused like any principal
    assert kit.wait_for(Kind.CONNECT_FAILED).detail["detail"] == "principal_expired"
    client.send(Pingreq())
    assert client.recv() == Pingresp()  # open connections stay (UNCONFIRMED default)


def test_deleting_a_certificate_disconnects_and_reset_disconnects_everyone(
        kit: BrokerKit) -> None:
    # spec broker §2.3: connections of certificates that are no longer ACTIVE are closed
    a, b = kit.device("del-a"), kit.device("del-b", policies=[ALLOW_ALL])
    ca, cb = kit.client(a), kit.client(b)
    assert ca.connect("del-a").reason_code == 0 and cb.connect("del-b").reason_code == 0
    kit.directory.delete(a.certificate_id)
    assert ca.closed()
    cb.send(Pingreq())
    assert cb.recv() == Pingresp()


def test_expiring_principal_can_be_cut_off_at_expiry(tmp_path: Path) -> None:
    # fleet-provisioning §2.2 (UNCONFIRMED: open connections stay by default; switch)
    with BrokerKit(tmp_path, disconnect_at_principal_expiry=True) as kit:
        device = kit.device("short", status=None)
        expires_at = kit.clock.now() + 300

        def resolver(certificate_id: str, certificate: x509.Certificate) -> Principal | None:
            if certificate_id != device.certificate_id:
                return None
            return Principal(certificate_id, certificate, (ALLOW_ALL,), expires_at=expires_at,
                             kind="temporary_claim")

        kit.broker.add_principal_resolver(resolver)
        client = kit.client(device)
        assert client.connect("short-lived").reason_code == 0
        kit.clock.advance(301)
        assert client.closed()
        assert kit.wait_for(Kind.DISCONNECT, client_id="short-lived").detail["reason"] == \
            "AUTH_ERROR"
