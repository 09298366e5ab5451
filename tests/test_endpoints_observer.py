"""Observation: one provisioning trace from the emulator's log or from AWS's lifecycle events.

``build_trace`` is checked on hand-made observations; ``EmulatorObserver`` against a live
emulator's admin API (entries recorded in its log, and real MQTT connections);
``AwsObserver`` against the emulator too, through the same lifecycle topics, certificate
and policy it would use on AWS (spec broker §4).
"""

from __future__ import annotations

import json
import ssl
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import boto3
import execnet
import paho.mqtt.client as mqtt
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from paho.mqtt.enums import CallbackAPIVersion

from harness.endpoints.aws import AwsEndpoint
from harness.endpoints.base import Endpoint
from harness.endpoints.local import LocalEndpoint
from harness.observations import Kind, Observation
from harness.observer import (
    CertificateCreated,
    Disconnected,
    ProvisioningTrace,
    Rejected,
    StepKind,
    ThingRegistered,
    build_trace,
    presence_observation,
)
from harness.pytest_report import device_record

CLAIM, NEW, OTHER = "c" * 64, "d" * 64, "e" * 64


def obs(seq: int, kind: Kind, client: str | None, cert: str | None, **detail: Any) -> Observation:
    return Observation(seq=seq, timestamp=1000.0 + seq, kind=kind.value, client_id=client,
                       certificate_id=cert, detail=detail)


def full_flow(client: str = "dev-1", thing: str = "fb-SN1") -> list[Observation]:
    return [
        obs(1, Kind.CONNECT, client, CLAIM),
        obs(2, Kind.SUBSCRIBE, client, CLAIM, topics=["$aws/certificates/create/json/+"]),
        obs(3, Kind.CERTIFICATE_CREATED, client, NEW, api="CreateKeysAndCertificate"),
        obs(4, Kind.THING_REGISTERED, client, NEW, thingName=thing, template="t"),
        obs(5, Kind.DISCONNECT, client, CLAIM, reason="CLIENT_INITIATED_DISCONNECT"),
        obs(6, Kind.CONNECT, thing, NEW),
    ]


# --------------------------------------------------------------------------- build_trace


def test_a_complete_claim_flow_reads_as_connect_create_register_disconnect_reconnect() -> None:
    trace = build_trace(full_flow(), client_id="dev-1")
    assert trace.kinds == (StepKind.CONNECTED, StepKind.CERTIFICATE_CREATED,
                           StepKind.THING_REGISTERED, StepKind.DISCONNECTED,
                           StepKind.RECONNECTED)
    assert trace.claim_certificate_id == CLAIM
    assert trace.certificate_id == NEW
    assert trace.thing_name == "fb-SN1"
    assert trace.provisioned
    created = trace.first(StepKind.CERTIFICATE_CREATED)
    assert isinstance(created, CertificateCreated) and created.api == "CreateKeysAndCertificate"
    gone = trace.first(StepKind.DISCONNECTED)
    assert isinstance(gone, Disconnected) and gone.reason == "CLIENT_INITIATED_DISCONNECT"
    trace.assert_provisioned()


def test_devices_sharing_a_claim_are_told_apart_by_client_id() -> None:
    other = [obs(o.seq + 10, Kind(o.kind), "dev-2" if o.client_id == "dev-1" else "fb-SN2",
                 OTHER if o.certificate_id == NEW else o.certificate_id,
                 **({"thingName": "fb-SN2"} if o.kind == Kind.THING_REGISTERED.value else {}))
             for o in full_flow()]
    trace = build_trace([*full_flow(), *other], client_id="dev-2")
    assert trace.certificate_id == OTHER
    assert trace.thing_name == "fb-SN2"
    assert all(s.client_id in ("dev-2", "fb-SN2") for s in trace.steps)


def renumbered(events: list[Observation]) -> list[Observation]:
    return [Observation(seq=i + 1, timestamp=1000.0 + i, kind=o.kind, client_id=o.client_id,
                        certificate_id=o.certificate_id, detail=o.detail)
            for i, o in enumerate(events)]


def second_device() -> list[Observation]:
    """Another device on the same claim certificate, provisioning at the same time."""
    return [obs(1, Kind.CONNECT, "dev-2", CLAIM),
            obs(2, Kind.CERTIFICATE_CREATED, "dev-2", OTHER, api="CreateCertificateFromCsr"),
            obs(3, Kind.THING_REGISTERED, "dev-2", OTHER, thingName="fb-SN2"),
            obs(4, Kind.DISCONNECT, "dev-2", CLAIM, reason="CLIENT_INITIATED_DISCONNECT"),
            obs(5, Kind.CONNECT, "fb-SN2", OTHER),
            obs(6, Kind.DISCONNECT, "fb-SN2", OTHER, reason="CONNECTION_LOST")]


@settings(max_examples=60, deadline=None)
@given(st.permutations([0] * 6 + [1] * 6))
def test_interleaved_devices_never_leak_into_each_others_trace(order: list[int]) -> None:
    queues = [list(full_flow()), second_device()]
    merged = renumbered([queues[i].pop(0) for i in order])  # each device keeps its order
    alone = build_trace(renumbered(full_flow()), client_id="dev-1")
    mixed = build_trace(merged, client_id="dev-1")
    assert mixed.kinds == alone.kinds
    assert {s.certificate_id for s in mixed.steps} == {CLAIM, NEW}
    other = build_trace(merged, client_id="dev-2")
    assert other.provisioned and other.thing_name == "fb-SN2"


def test_a_rejection_carries_awss_status_and_error_code() -> None:
    # spec fleet §1.5: the rejected payload's statusCode / errorCode / errorMessage
    events = [obs(1, Kind.CONNECT, "dev-1", CLAIM),
              obs(2, Kind.API_RESPONSE, "dev-1", CLAIM, api="RegisterThing", outcome="rejected",
                  statusCode=400, errorCode="InvalidCertificateOwnershipToken",
                  errorMessage="Certificate ownership token cannot be empty."),
              obs(3, Kind.API_RESPONSE, "dev-1", CLAIM, api="CreateKeysAndCertificate",
                  outcome="accepted", statusCode=200)]
    trace = build_trace(events, client_id="dev-1")
    assert trace.kinds == (StepKind.CONNECTED, StepKind.REJECTED)
    rejected = trace.rejections[0]
    assert isinstance(rejected, Rejected)
    assert (rejected.api, rejected.status_code, rejected.error_code) == (
        "RegisterThing", 400, "InvalidCertificateOwnershipToken")
    assert not trace.provisioned
    with pytest.raises(AssertionError, match="InvalidCertificateOwnershipToken"):
        trace.assert_provisioned()


def test_a_trace_by_claim_certificate_follows_the_client_it_connected_as() -> None:
    trace = build_trace(full_flow(), certificate_id=CLAIM)
    assert trace.client_id is None
    assert trace.provisioned


def test_trace_steps_become_plain_values_that_cross_to_an_xdist_controller() -> None:
    # the kind is the "step" name only: pytest-xdist's execnet carries no enum members
    trace = build_trace([*full_flow(), *[obs(7, Kind.API_RESPONSE, "fb-SN1", NEW,
                                             api="RegisterThing", outcome="rejected",
                                             statusCode=400, errorCode="X")]],
                        client_id="dev-1")
    for step in trace.steps:
        as_dict = step.to_dict()
        assert "kind" not in as_dict and as_dict["step"] == step.kind.value
        assert all(type(v) in (str, int, float, type(None)) for v in as_dict.values())
    execnet.dumps([step.to_dict() for step in trace.steps])
    execnet.dumps(device_record(None, trace=trace).to_dict())


def test_a_trace_needs_a_client_id_or_a_certificate_id() -> None:
    with pytest.raises(ValueError):
        build_trace(full_flow())


@pytest.mark.parametrize(("payload", "kind", "reason"), [
    ({"eventType": "connected", "clientId": "a", "principalIdentifier": CLAIM,
      "timestamp": 1573002230757, "versionNumber": 0}, Kind.CONNECT, None),
    ({"eventType": "disconnected", "clientId": "a", "principalIdentifier": CLAIM,
      "timestamp": 1573002230757, "clientInitiatedDisconnect": True,
      "disconnectReason": "CLIENT_INITIATED_DISCONNECT"}, Kind.DISCONNECT,
     "CLIENT_INITIATED_DISCONNECT"),
    ({"eventType": "connect_failed", "clientId": "a", "principalIdentifier": CLAIM,
      "timestamp": 1460065214626, "connectFailureReason": "AUTHORIZATION_FAILED"},
     Kind.CONNECT_FAILED, "AUTHORIZATION_FAILED"),
])
def test_presence_events_become_observations(payload: dict[str, Any], kind: Kind,
                                             reason: str | None) -> None:
    # spec broker §4.2: payload keys; timestamp in epoch milliseconds
    o = presence_observation(7, payload)
    assert o is not None
    assert (o.kind, o.client_id, o.certificate_id) == (kind.value, "a", CLAIM)
    assert o.timestamp == payload["timestamp"] / 1000
    assert o.detail.get("reason") == reason


def test_subscription_events_are_not_presence() -> None:
    assert presence_observation(1, {"eventType": "subscribed", "clientId": "a"}) is None


# --------------------------------------------------------------------------- EmulatorObserver


@pytest.fixture(scope="module")
def emulator() -> Iterator[LocalEndpoint]:
    endpoint = LocalEndpoint.start(mode="in-process")
    yield endpoint
    endpoint.close()


def record(endpoint: LocalEndpoint, events: list[Observation]) -> None:
    """Append to the running emulator's own observation log (what its services do)."""
    log = endpoint._embedded.emulator.observations
    for o in events:
        log.record(o.kind, client_id=o.client_id, certificate_id=o.certificate_id, **o.detail)


def test_emulator_trace_waits_for_the_reconnect(emulator: LocalEndpoint) -> None:
    observer = emulator.observer
    mark = observer.mark()
    first, last = full_flow("wait-1", "fb-wait-1")[:-1], full_flow("wait-1", "fb-wait-1")[-1:]
    record(emulator, first)
    timer = threading.Timer(0.3, record, (emulator, last))
    timer.start()
    try:
        trace = observer.trace(client_id="wait-1", since=mark, timeout=10)
    finally:
        timer.join()
    assert trace.source == "emulator"
    assert trace.provisioned, str(trace)


def test_emulator_trace_ignores_what_came_before_the_mark(emulator: LocalEndpoint) -> None:
    observer = emulator.observer
    record(emulator, full_flow("mark-1", "fb-mark-1"))
    mark = observer.mark()
    trace = observer.trace(client_id="mark-1", since=mark, until=None)
    assert trace.steps == ()
    assert observer.trace(client_id="mark-1", until=None).provisioned


def test_an_incomplete_trace_is_returned_after_the_timeout(emulator: LocalEndpoint) -> None:
    mark = emulator.observer.mark()
    record(emulator, full_flow("slow-1")[:2])
    trace = emulator.observer.trace(client_id="slow-1", since=mark, timeout=0.3)
    assert trace.kinds == (StepKind.CONNECTED,)
    assert not trace.provisioned


def test_wait_for_returns_as_soon_as_the_emulator_sees_what_it_waits_for(
        emulator: LocalEndpoint) -> None:
    observer = emulator.observer
    mark = observer.mark()
    timer = threading.Timer(0.3, record, (emulator, full_flow("waitfor-1")[:1]))
    timer.start()
    try:
        found = observer.wait_for(lambda: observer.events(client_id="waitfor-1", since=mark),
                                  timeout=10)
    finally:
        timer.join()
    assert [o.kind for o in found] == [Kind.CONNECT.value]


def test_wait_for_gives_the_last_falsy_answer_after_the_timeout(
        emulator: LocalEndpoint) -> None:
    observer = emulator.observer
    mark = observer.mark()
    asked: list[int] = []

    def check() -> list[Observation]:
        asked.append(1)
        return observer.events(client_id="never-1", since=mark)

    assert observer.wait_for(check, timeout=0.3) == []
    assert asked  # asked at least once, even with nothing new


def test_a_trace_waits_until_a_test_of_the_whole_trace_holds(emulator: LocalEndpoint) -> None:
    # a reboot scenario waits for the second reconnection, not the first
    observer = emulator.observer
    mark = observer.mark()
    flow = full_flow("twice-1", "fb-twice-1")
    again = [obs(7, Kind.DISCONNECT, "fb-twice-1", NEW, reason="CONNECTION_LOST"),
             obs(8, Kind.CONNECT, "fb-twice-1", NEW)]
    record(emulator, flow)
    timer = threading.Timer(0.3, record, (emulator, again))
    timer.start()

    def twice(trace: ProvisioningTrace) -> bool:
        return len(trace.of(StepKind.RECONNECTED)) >= 2

    started = time.monotonic()
    try:
        trace = observer.trace(client_id="twice-1", since=mark, until=twice, timeout=30)
    finally:
        timer.join()
    assert time.monotonic() - started < 15  # it returned when the test held, not at timeout
    assert len(trace.of(StepKind.RECONNECTED)) == 2, str(trace)
    assert trace.provisioned


def device_credentials(endpoint: Endpoint, name: str, directory: Path,
                       *, thing: str | None = None) -> tuple[Path, Path, str]:
    """A certificate allowed to connect as anyone (optionally attached to ``thing``)."""
    iot = endpoint.iot
    policy = f"{name}-connect"
    if policy not in {p["policyName"] for p in iot.list_policies()["policies"]}:
        iot.create_policy(policyName=policy, policyDocument=json.dumps({
            "Version": "2012-10-17",
            "Statement": [{"Effect": "Allow", "Action": "iot:Connect", "Resource": "*"}]}))
    made = iot.create_keys_and_certificate(setAsActive=True)
    iot.attach_policy(policyName=policy, target=made["certificateArn"])
    if thing is not None:
        iot.create_thing(thingName=thing)
        iot.attach_thing_principal(thingName=thing, principal=made["certificateArn"])
    cert, key = directory / f"{name}.pem", directory / f"{name}.key"
    cert.write_text(made["certificatePem"])
    key.write_text(made["keyPair"]["PrivateKey"])
    return cert, key, str(made["certificateId"])


class Device:
    """A paho client that connects and disconnects cleanly, waiting on its callbacks."""

    def __init__(self, endpoint: Endpoint, client_id: str, cert: Path, key: Path) -> None:
        context = ssl.create_default_context(cafile=str(endpoint.ca_file))
        context.load_cert_chain(str(cert), str(key))
        self.connected, self.gone = threading.Event(), threading.Event()
        self.client = mqtt.Client(CallbackAPIVersion.VERSION2, client_id=client_id)
        self.client.tls_set_context(context)
        self.client.on_connect = lambda *_a: self.connected.set()
        self.client.on_disconnect = lambda *_a: self.gone.set()
        self.client.connect(endpoint.mqtt_server_name, endpoint.mqtt_port)
        self.client.loop_start()
        assert self.connected.wait(10), "no CONNACK"

    def close(self) -> None:
        self.client.disconnect()
        assert self.gone.wait(10)
        self.client.loop_stop()


def test_emulator_trace_shows_a_real_connection_and_its_disconnect_reason(
        emulator: LocalEndpoint, tmp_path: Path) -> None:
    mark = emulator.observer.mark()
    cert, key, cert_id = device_credentials(emulator, "real-1", tmp_path)
    Device(emulator, "real-1", cert, key).close()
    trace = emulator.observer.trace(client_id="real-1", since=mark, until=StepKind.DISCONNECTED)
    # spec broker §4.2: a client DISCONNECT is CLIENT_INITIATED_DISCONNECT
    assert trace.kinds == (StepKind.CONNECTED, StepKind.DISCONNECTED)
    assert trace.claim_certificate_id == cert_id
    gone = trace.first(StepKind.DISCONNECTED)
    assert isinstance(gone, Disconnected) and gone.reason == "CLIENT_INITIATED_DISCONNECT"


# --------------------------------------------------------------------------- AwsObserver


@pytest.fixture
def aws_over_emulator(emulator: LocalEndpoint) -> Iterator[AwsEndpoint]:
    session = boto3.Session(aws_access_key_id="fleetbench", aws_secret_access_key="x",
                            region_name=emulator.region)
    endpoint = AwsEndpoint(session, prefix="fb-obs", iot_endpoint_url=emulator.api_url,
                           ca_file=emulator.ca_file, mqtt_port=emulator.mqtt_port,
                           account_id=emulator.account_id)
    yield endpoint
    endpoint.close()


def test_aws_observer_builds_the_trace_from_lifecycle_events_and_the_registry(
        aws_over_emulator: AwsEndpoint, tmp_path: Path) -> None:
    endpoint = aws_over_emulator
    observer = endpoint.observer  # creates its certificate, subscribes to presence events
    mark = observer.mark()
    claim_cert, claim_key, claim_id = device_credentials(endpoint, "aws-claim", tmp_path)
    claim = Device(endpoint, "aws-dev-1", claim_cert, claim_key)
    # what RegisterThing does while the claim connection is open
    cert, key, new_id = device_credentials(endpoint, "aws-new", tmp_path, thing="fb-obs-SN1")
    claim.close()
    Device(endpoint, "fb-obs-SN1", cert, key).close()

    trace = observer.trace(client_id="aws-dev-1", since=mark, timeout=15)

    assert trace.source == "aws"
    assert trace.claim_certificate_id == claim_id
    assert trace.kinds[:2] == (StepKind.CONNECTED, StepKind.CERTIFICATE_CREATED)
    assert {StepKind.THING_REGISTERED, StepKind.DISCONNECTED, StepKind.RECONNECTED} <= set(
        trace.kinds)
    assert trace.certificate_id == new_id
    registered = trace.first(StepKind.THING_REGISTERED)
    assert isinstance(registered, ThingRegistered) and registered.thing_name == "fb-obs-SN1"
    created = trace.first(StepKind.CERTIFICATE_CREATED)
    assert isinstance(created, CertificateCreated) and created.api is None  # AWS cannot tell
    assert trace.provisioned, str(trace)


def test_aws_observer_wait_for_returns_when_the_lifecycle_event_arrives(
        aws_over_emulator: AwsEndpoint, tmp_path: Path) -> None:
    # spec broker §4.2: a connection is announced on $aws/events/presence/connected/<id>
    endpoint = aws_over_emulator
    observer = endpoint.observer
    mark = observer.mark()
    cert, key, cert_id = device_credentials(endpoint, "aws-wait", tmp_path)
    opened: list[Device] = []
    timer = threading.Timer(0.3, lambda: opened.append(Device(endpoint, "aws-wait-1", cert,
                                                               key)))
    timer.start()
    try:
        found = observer.wait_for(
            lambda: [o for o in observer.events(client_id="aws-wait-1", since=mark)
                     if o.kind == Kind.CONNECT.value], timeout=15)
    finally:
        timer.join()
        for device in opened:
            device.close()
    assert [o.certificate_id for o in found] == [cert_id]
    assert observer.wait_for(lambda: observer.events(client_id="aws-nobody", since=mark),
                             timeout=0.2) == []


def test_aws_observer_removes_its_certificate_and_policy_on_close(
        aws_over_emulator: AwsEndpoint) -> None:
    iot = aws_over_emulator.iot
    aws_over_emulator.observer.mark()
    policies = {p["policyName"] for p in iot.list_policies()["policies"]}
    assert "fb-obs-observer" in policies
    targets = iot.list_targets_for_policy(policyName="fb-obs-observer")["targets"]
    aws_over_emulator.close()
    assert "fb-obs-observer" not in {p["policyName"] for p in iot.list_policies()["policies"]}
    certificate_id = targets[0].rsplit("/", 1)[1]
    with pytest.raises(iot.exceptions.ResourceNotFoundException):
        iot.describe_certificate(certificateId=certificate_id)
