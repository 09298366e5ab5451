"""Reserved-topic APIs: requests go to an in-process handler, replies only to the requester."""

from __future__ import annotations

import concurrent.futures
from collections.abc import Iterator
from pathlib import Path

import pytest

from harness.emulator.mqtt.packets import (
    Pingreq,
    Pingresp,
    Puback,
    Publish,
    Suback,
    Subscribe,
    Subscription,
)
from harness.emulator.mqtt.server import ApiRequest
from harness.observations import Kind
from tests.brokerkit import BrokerKit, RawClient, allow, arn, policy

REQUEST = "$aws/test/echo/json"
ACCEPTED = "$aws/test/echo/json/accepted"


@pytest.fixture
def kit(tmp_path: Path) -> Iterator[BrokerKit]:
    with BrokerKit(tmp_path, publish_rate_per_connection=None) as k:
        seen: list[ApiRequest] = []

        async def echo(request: ApiRequest) -> None:
            seen.append(request)
            await request.reply(ACCEPTED, request.client_id.encode() + b":" + request.payload)

        k.broker.register_api("$aws/test/echo/+", echo)
        k.api_requests = seen  # type: ignore[attr-defined]
        yield k


def client(kit: BrokerKit, client_id: str, device: object | None = None, *,
           subscribe: bool = True) -> RawClient:
    c = kit.client(device or kit.device(client_id))  # type: ignore[arg-type]
    assert c.connect(client_id).reason_code == 0
    if subscribe:
        c.send(Subscribe(1, [Subscription(ACCEPTED, 1)]))
        assert c.recv_until(Suback).reason_codes == [1]
    return c


def test_each_of_100_concurrent_requesters_gets_only_its_own_reply(kit: BrokerKit) -> None:
    # fleet-provisioning §1.1 and edge case 1: replies only on the requesting connection
    device = kit.device("fleet")
    clients = [client(kit, f"dev-{i:03d}", device) for i in range(100)]
    for i, c in enumerate(clients):  # all requests out before any reply is read
        c.send(Publish(REQUEST, f"req-{i}".encode(), 1, packet_id=2))

    def first_reply(i: int) -> bytes:
        packet = clients[i].recv_until(Publish, timeout=10)
        clients[i].send(Puback(packet.packet_id or 0))
        return packet.payload

    with concurrent.futures.ThreadPoolExecutor(max_workers=16) as pool:
        replies = list(pool.map(first_reply, range(100)))
    assert replies == [f"dev-{i:03d}:req-{i}".encode() for i in range(100)]
    for c in clients:  # every reply is out by now: a misrouted one would precede the PINGRESP
        c.send(Pingreq())
        assert c.recv() == Pingresp()
    assert len(kit.api_requests) == 100  # type: ignore[attr-defined]
    assert all(r.certificate_id == device.certificate_id
               for r in kit.api_requests)  # type: ignore[attr-defined]


def test_api_requests_are_not_fanned_out_to_subscribers(kit: BrokerKit) -> None:
    # the handler takes the request instead of subscribers
    snoop = kit.client(kit.device("snoop"))
    snoop.connect("snoop")
    snoop.send(Subscribe(1, [Subscription("$aws/test/#", 1)]))
    snoop.recv_until(Suback)
    asker = client(kit, "asker")
    asker.send(Publish(REQUEST, b"hi", 1, packet_id=2))
    assert asker.recv_until(Publish).payload == b"asker:hi"
    snoop.send(Pingreq())
    assert snoop.recv() == Pingresp()  # neither the request nor the reply reached it


def test_reply_without_a_matching_subscription_is_dropped_and_observed(kit: BrokerKit) -> None:
    # fleet-provisioning §1.1: no matching subscription at response time → dropped silently
    asker = client(kit, "unsubscribed", subscribe=False)
    asker.send(Publish(REQUEST, b"hi", 1, packet_id=2))
    response = kit.wait_for(Kind.API_RESPONSE, client_id="unsubscribed")
    assert response.detail["outcome"] == "no_subscription"
    asker.send(Pingreq())
    assert asker.recv_until(Pingresp) == Pingresp()


def test_reply_is_subject_to_the_requesters_receive_permission(kit: BrokerKit) -> None:
    # fleet-provisioning §1.1 (UNCONFIRMED, inferred): no iot:Receive → not delivered
    doc = policy(allow("iot:Connect", "*"), allow(["iot:Publish", "iot:Subscribe"], "*"))
    asker = client(kit, "deaf", kit.device("deaf", policies=[doc]))
    asker.send(Publish(REQUEST, b"hi", 1, packet_id=2))
    assert kit.wait_for(Kind.API_RESPONSE, client_id="deaf").detail["outcome"] == \
        "not_authorized"
    assert kit.wait_for(Kind.DELIVER_DENIED, client_id="deaf").detail["topic"] == ACCEPTED


def test_api_request_needs_publish_permission(kit: BrokerKit) -> None:
    # spec broker §1.9: the PUBLISH is authorized before the API sees it
    doc = policy(allow("iot:Connect", "*"), allow("iot:Subscribe", "*"),
                 allow("iot:Publish", arn("topic", "$aws/test/echo/cbor")))
    asker = client(kit, "limited", kit.device("limited", policies=[doc]))
    asker.send(Publish(REQUEST, b"hi", 1, packet_id=2))
    assert asker.closed()
    assert kit.api_requests == []  # type: ignore[attr-defined]
