"""Security: claims and provisioned certificates can do what their policies say, no more.

An inactive or revoked claim cannot connect; a claim cannot publish or subscribe outside
its policy and is disconnected as AWS disconnects a 3.1.1 client; a device that keeps
using its claim after provisioning is cut off; a provisioned certificate reaches the
provisioning API only when its policy allows it; a device whose client id is taken over
mid-flow loses its connection and leaves nothing half-made. Judged from the endpoint:
lifecycle events and the trace (why a connection ended), and the registry.
"""

from __future__ import annotations

import secrets
from typing import Any

import pytest

from devices.base import Step
from devices.credentials import CredentialStore
from devices.mqtt_transport import TransportError
from devices.virtual import ProvisioningClient, StepControl
from harness.emulator.lifecycle import DisconnectReason
from harness.fleet import Fleet
from harness.observations import Kind
from harness.observer import ProvisioningTrace, StepKind
from harness.protocol import Api, PayloadFormat
from scenarios.conftest import (
    FleetMaker,
    Outcome,
    Provision,
    Registry,
    Watch,
    device_policy_document,
    record_device,
    template,
)


def disconnect_reason(watch: Watch, since: Any, client_id: str,
                      certificate_id: str) -> str | None:
    """Why the endpoint ended ``client_id``'s connection made with ``certificate_id``."""
    event = watch.wait_for_event(since, Kind.DISCONNECT, client_id=client_id,
                                 certificate_id=certificate_id)
    return None if event is None else event.detail.get("reason")


# --------------------------------------------------------------------------- claims


@pytest.mark.parametrize("status", ["INACTIVE", "REVOKED"])
def test_an_inactive_or_revoked_claim_certificate_cannot_connect(
        status: str, fleet: Fleet, endpoint: Any, device_factory: Any, provision: Provision,
        registry: Registry) -> None:
    # spec broker §2.3: only ACTIVE certificates authenticate; the refusal is a closed
    # connection without CONNACK (§1.9), reported as connect_failed (§4.1)
    claim = fleet.create_claim()
    endpoint.iot.update_certificate(certificateId=claim.certificate_id, newStatus=status)
    inputs = device_factory.inputs(claim)
    run = provision(device_factory(), inputs, snapshot=True)

    assert not run.result.ok and run.result.error is None
    assert not run.trace.has(StepKind.CONNECTED)
    assert not run.trace.has(StepKind.CERTIFICATE_CREATED)
    if provision.emulated:  # AWS need not report a refused certificate at all
        trace = provision.wait(run, lambda t: t.has(StepKind.CONNECT_FAILED))
        failed = trace.first(StepKind.CONNECT_FAILED)
        assert failed is not None and failed.certificate_id == claim.certificate_id
    registry.assert_left_nothing(run, thing_name=fleet.thing_name(inputs.serial))


@pytest.mark.parametrize("operation", ["publish", "subscribe"])
def test_a_claim_outside_its_policy_is_disconnected(
        operation: str, claim: Any, connect_as: Any, observer: Any, watch: Watch) -> None:
    # spec fleet §2.3 (the claim policy covers the provisioning topics only), spec broker
    # §1.9 and edge cases 2 / 25: an unauthorized PUBLISH or SUBSCRIBE closes a 3.1.1
    # connection, lifecycle disconnectReason AUTH_ERROR
    client_id = f"claim-{secrets.token_hex(4)}"
    mark = observer.mark()
    transport = connect_as(claim.cert_path, claim.key_path, client_id)
    with pytest.raises(TransportError):
        if operation == "publish":
            transport.publish(f"dt/{client_id}/telemetry", b"{}", qos=1, timeout=10)
        else:
            transport.subscribe(["dt/#"], qos=1, timeout=10)
    assert not transport.connected
    assert disconnect_reason(watch, mark, client_id, claim.certificate_id) == \
        DisconnectReason.AUTH_ERROR.value


def test_a_device_that_keeps_using_its_claim_after_provisioning_is_cut_off(
        fleet: Fleet, claim: Any, make_device: Any, device_factory: Any,
        provision: Provision, registry: Registry) -> None:
    # spec fleet §2.3 / §1.4 (reconnect with the new certificate), spec broker §1.9: the
    # claim may not publish telemetry; the connection is closed with AUTH_ERROR
    device = make_device(control=StepControl(reconnect_with_claim=True))
    inputs = device_factory.inputs(claim)
    run = provision(device, inputs)

    thing_name = fleet.thing_name(inputs.serial)
    assert run.trace.thing_name == thing_name  # provisioning itself worked
    publish = run.result.step(Step.PUBLISH_TELEMETRY)
    assert publish is not None and not publish.ok
    assert disconnect_reason(provision, run, thing_name, claim.certificate_id) == \
        DisconnectReason.AUTH_ERROR.value
    assert not run.trace.has(StepKind.RECONNECTED)  # the new certificate was never used
    thing = registry.thing(thing_name)
    assert thing is not None and thing.certificates == {run.trace.certificate_id}


# --------------------------------------------------------------------------- certificates


def device_credentials(run: Outcome) -> CredentialStore:
    directory = run.result.credentials_dir
    store = CredentialStore(directory) if directory is not None else None
    if store is None or not store.device_key.is_file():
        pytest.skip(f"device kind {run.result.kind!r} keeps its key where the host cannot "
                    "use it")
    return store


def provisioning_api_policy(prefix: str) -> dict[str, Any]:
    """The usual device policy, plus CreateKeysAndCertificate's topics (as a gateway that
    provisions its children would have)."""
    document = device_policy_document(prefix)
    arn = "arn:aws:iot:*:*:"
    document["Statement"] += [
        {"Effect": "Allow", "Action": ["iot:Publish", "iot:Receive"],
         "Resource": f"{arn}topic/$aws/certificates/create/*"},
        {"Effect": "Allow", "Action": "iot:Subscribe",
         "Resource": f"{arn}topicfilter/$aws/certificates/create/*"},
    ]
    return document


def test_a_provisioned_certificate_cannot_call_the_provisioning_api_by_default(
        fleet: Fleet, claim: Any, device_factory: Any, provision: Provision,
        connect_as: Any, connect_rate_pause: Any) -> None:
    # spec fleet §2.3: the provisioning topics are granted by the claim policy, not by the
    # template's device policy; spec broker §1.9: the SUBSCRIBE is refused by closing
    inputs = device_factory.inputs(claim)
    run = provision(device_factory(), inputs)
    certificate_id = run.assert_provisioned()
    store = device_credentials(run)
    thing_name = fleet.thing_name(inputs.serial)
    connect_rate_pause()  # the device's own client id, just used

    mark = provision.observer.mark()
    transport = connect_as(store.device_cert, store.device_key, thing_name)
    client = ProvisioningClient(transport, PayloadFormat.JSON, timeout=10)
    with pytest.raises(TransportError):
        client.subscribe(Api.CREATE_KEYS_AND_CERTIFICATE)
        client.create_keys_and_certificate()
    assert disconnect_reason(provision, mark, thing_name, certificate_id) == \
        DisconnectReason.AUTH_ERROR.value
    if provision.emulated:
        assert not provision.events(mark, client_id=thing_name, kind=Kind.CERTIFICATE_CREATED)


def test_a_provisioned_certificate_whose_policy_allows_it_can_call_the_provisioning_api(
        make_fleet: FleetMaker, device_factory: Any, provision: Provision,
        registry: Registry, connect_as: Any, connect_rate_pause: Any) -> None:
    # spec fleet §1.2 (CreateKeysAndCertificate for any authorised connection) and §2.3:
    # what a certificate may call is its policy's business alone
    fleet = make_fleet(lambda prefix: template(prefix, {}),
                       device_policy=provisioning_api_policy)
    inputs = device_factory.inputs(fleet.create_claim(), template_name=fleet.template_name)
    run = provision(device_factory(), inputs)
    run.assert_provisioned()
    store = device_credentials(run)
    thing_name = f"{fleet.prefix}-{inputs.serial}"
    connect_rate_pause()

    transport = connect_as(store.device_cert, store.device_key, thing_name)
    client = ProvisioningClient(transport, PayloadFormat.JSON, timeout=10)
    client.subscribe(Api.CREATE_KEYS_AND_CERTIFICATE)
    made = client.create_keys_and_certificate()
    fleet.track_certificate(made.certificate_id)
    cert = registry.certificate(made.certificate_id)
    assert cert is not None and cert.status == "PENDING_ACTIVATION"
    assert transport.connected


# --------------------------------------------------------------------------- duplicate client ids


def test_a_device_whose_client_id_is_taken_over_mid_flow_leaves_nothing_half_made(
        request: pytest.FixtureRequest, fleet: Fleet, make_device: Any, device_factory: Any,
        observer: Any, provision: Provision, registry: Registry,
        connect_rate_pause: Any) -> None:
    # spec broker §1.3 / edge case 10: a second CONNECT with the same client id is accepted
    # and the first connection is closed (DUPLICATE_CLIENTID); spec fleet §1.1: replies go
    # to the requesting connection only, so the evicted device's flow ends there, and §1.4
    # leaves its certificate unregistered
    shared = f"shared-{secrets.token_hex(4)}"
    first_claim, second_claim = fleet.create_claim(), fleet.create_claim()
    second_inputs = device_factory.inputs(second_claim, client_id=shared)
    second: list[Any] = []

    def take_over(step: Step) -> None:
        if step is Step.REGISTER_THING and not second:
            connect_rate_pause()  # AWS allows one CONNECT per second per client id
            second.append(device_factory().provision(second_inputs))

    first_inputs = device_factory.inputs(first_claim, client_id=shared)
    mark = observer.mark()
    first = make_device(control=StepControl(before_step=take_over)).provision(first_inputs)

    assert not first.ok and first.error is None
    register = first.step(Step.REGISTER_THING)
    assert register is not None and not register.ok
    assert second and second[0].ok, second[0].to_json(indent=2) if second else "not run"
    # One client id for both devices: the trace follows the id, so the evicted device's
    # own steps are those of its claim and of the certificate it was given.
    evicted_certificate = first.certificate_id
    assert evicted_certificate is not None
    shared_trace = observer.trace(client_id=shared, certificate_id=first_claim.certificate_id,
                                  since=mark, until=StepKind.DISCONNECTED)
    mine = {first_claim.certificate_id, evicted_certificate}
    trace = ProvisioningTrace(tuple(s for s in shared_trace.steps if s.certificate_id in mine),
                              shared_trace.source, shared, first_claim.certificate_id)
    record_device(request.node, first, trace, first_inputs)
    assert [getattr(s, "reason", None) for s in trace.of(StepKind.DISCONNECTED)] == \
        [DisconnectReason.DUPLICATE_CLIENTID.value]
    if provision.emulated:  # AWS shows a certificate only once something connects with it
        assert [s.certificate_id for s in trace.of(StepKind.CERTIFICATE_CREATED)] == \
            [evicted_certificate]
    assert not trace.has(StepKind.THING_REGISTERED)
    taker = observer.trace(client_id=shared, certificate_id=second_claim.certificate_id,
                           since=mark)
    record_device(request.node, second[0], taker, second_inputs)
    taker.assert_provisioned()
    evicted = Outcome(first_inputs, first, trace, mark)
    registry.assert_left_nothing(evicted, thing_name=fleet.thing_name(first_inputs.serial))
    assert registry.thing(fleet.thing_name(second_inputs.serial)) is not None

