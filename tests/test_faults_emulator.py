"""Each fault kind on a running emulator, met by a real MQTT client or boto3.

Spec: fleet-provisioning.md §1.1 (answers go to the requesting connection), §1.5 (rejected
payload), §1.6 (tokens survive until used), §4 (hook limit → 403); iot-broker-and-policy.md
§1.3/§4.2 (server-initiated disconnects), §5.2 (REST error shape).
"""

from __future__ import annotations

import socket
import ssl
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import boto3
import pytest
from botocore.config import Config

from harness import pki, protocol
from harness.emulator.app import EmbeddedEmulator
from harness.emulator.faults import (
    FaultPlan,
    FaultRule,
    delay,
    disconnect_after,
    disconnect_before,
    drop_response,
    hook_fail,
    hook_slow,
    reject,
    restart_broker,
    stall_handshake,
)
from harness.emulator.registry import CertificateStatus
from harness.observations import Kind, Observation
from harness.protocol import Api, ErrorResponse
from tests.test_provisioning_kit import (
    HOOK_ARN,
    REGION,
    TIMEOUT,
    Identity,
    PahoDevice,
    Refused,
    create_certificate,
    create_template,
    factory_claim,
    fleet_template,
    register,
    registry_of,
    running_emulator,
    unique,
)

#: The emulator's hook limit here (AWS: 5 s); short so that a timeout costs little.
HOOK_TIMEOUT = 0.8


@pytest.fixture(scope="module")
def emu() -> Iterator[EmbeddedEmulator]:
    with running_emulator(hook_timeout=HOOK_TIMEOUT,
                          hooks={HOOK_ARN: "python:tests.hooks_fixtures:allow_async"}) as e:
        yield e


@pytest.fixture(autouse=True)
def no_faults_after(emu: EmbeddedEmulator) -> Iterator[None]:
    yield
    emu.emulator.faults.clear()


@pytest.fixture(scope="module")
def setup(emu: EmbeddedEmulator) -> tuple[str, str, Identity]:
    """A plain template, a template with a hook, and a claim allowed on both."""
    template = create_template(emu, fleet_template())
    hooked = create_template(emu, fleet_template(), hook_arn=HOOK_ARN)
    directory = Path(tempfile.mkdtemp(prefix="fleetbench-faults-"))
    document = protocol.claim_policy_document(template, region=REGION,
                                              account_id="123456789012")
    extra = protocol.claim_policy_document(hooked, region=REGION, account_id="123456789012")
    document["Statement"] = [*document["Statement"], *extra["Statement"]]
    return template, hooked, factory_claim(emu, directory, template, document)


def _plan(emu: EmbeddedEmulator, *rules: FaultRule) -> None:
    emu.emulator.faults.set_plan(FaultPlan(rules))


def _wait(emu: EmbeddedEmulator, *, kinds: list[str], client_id: str | None = None,
          since: int = 0, timeout: float = TIMEOUT) -> list[Observation]:
    found = emu.emulator.observations.wait_sync(timeout=timeout, kinds=kinds,
                                                client_id=client_id, since=since)
    assert found, f"no {kinds} observation for {client_id}"
    return found


def _faults_of(emu: EmbeddedEmulator, client_id: str) -> list[str]:
    return [o.detail["action"] for o in
            emu.emulator.observations.query(kinds=[Kind.FAULT], client_id=client_id)]


def _csr_request() -> bytes:
    csr = pki.make_csr(pki.generate_ec_key())
    return protocol.encode(protocol.CreateCertificateFromCsrRequest(csr), "json")


# --------------------------------------------------------------------------- MQTT requests


def test_a_delayed_answer_arrives_late_and_intact(emu: EmbeddedEmulator,
                                                  setup: tuple[str, str, Identity]) -> None:
    client_id = unique("delay")
    _plan(emu, FaultRule(delay(0.6), api="CreateKeysAndCertificate", client_id=client_id))
    device = PahoDevice(emu, setup[2], client_id)
    try:
        started = time.monotonic()
        made = create_certificate(device, "keys", "json")
        assert time.monotonic() - started >= 0.6
    finally:
        device.close()
    assert registry_of(emu).get_certificate(made.certificate_id) is not None
    assert _faults_of(emu, client_id) == ["delay"]


def test_a_dropped_answer_never_comes_but_the_request_was_handled(
        emu: EmbeddedEmulator, setup: tuple[str, str, Identity]) -> None:
    # spec fleet §1.6: the certificate exists (PENDING_ACTIVATION) though the device never
    # learnt of it
    client_id = unique("drop")
    _plan(emu, FaultRule(drop_response(), api="CreateCertificateFromCsr", client_id=client_id))
    device = PahoDevice(emu, setup[2], client_id)
    try:
        device.subscribe(*protocol.subscription_filters(Api.CREATE_CERTIFICATE_FROM_CSR, "json"))
        device.publish(protocol.create_from_csr_topic("json"), _csr_request())
        created = _wait(emu, kinds=[Kind.CERTIFICATE_CREATED], client_id=client_id)
        _wait(emu, kinds=[Kind.API_RESPONSE], client_id=client_id)
        with pytest.raises(TimeoutError):
            device.expect(timeout=0.3)
    finally:
        device.close()
    cert = registry_of(emu).get_certificate(created[0].certificate_id or "")
    assert cert is not None and cert.status is CertificateStatus.PENDING_ACTIVATION
    delivered = emu.emulator.observations.query(kinds=[Kind.API_RESPONSE], client_id=client_id)
    assert [o.detail["source"] for o in delivered] == ["provisioning"]  # nothing reached it
    assert _faults_of(emu, client_id) == ["drop_response"]


def test_a_rejected_request_gets_the_given_error_and_changes_nothing(
        emu: EmbeddedEmulator, setup: tuple[str, str, Identity]) -> None:
    # spec fleet §1.5: statusCode, errorCode, errorMessage as the plan says
    template, _, identity = setup
    client_id = unique("reject")
    _plan(emu, FaultRule(reject("InternalFailure", status_code=500, message="boom"),
                         api="RegisterThing", client_id=client_id, template=template))
    device = PahoDevice(emu, identity, client_id)
    try:
        made = create_certificate(device, "csr", "json")
        answer = register(device, template, "json", made.token, {"SerialNumber": client_id})
        assert isinstance(answer, ErrorResponse)
        assert (answer.status_code, answer.error_code, answer.error_message) == (
            500, "InternalFailure", "boom")
        emu.emulator.faults.clear()  # the token was not spent: the retry succeeds
        again = register(device, template, "json", made.token, {"SerialNumber": client_id})
        assert not isinstance(again, ErrorResponse) and again.thing_name == f"dev-{client_id}"
    finally:
        device.close()


def test_disconnect_before_handling_drops_the_client_and_creates_nothing(
        emu: EmbeddedEmulator, setup: tuple[str, str, Identity]) -> None:
    # spec broker §4.2: the broker ends the connection (SERVER_INITIATED_DISCONNECT)
    client_id = unique("dcb")
    _plan(emu, FaultRule(disconnect_before(), api="CreateKeysAndCertificate",
                         client_id=client_id))
    device = PahoDevice(emu, setup[2], client_id)
    try:
        device.subscribe(*protocol.subscription_filters(Api.CREATE_KEYS_AND_CERTIFICATE, "json"))
        device.client.publish(protocol.create_keys_topic("json"), b"{}", 1)
        assert device.disconnected.wait(TIMEOUT)
    finally:
        device.close()
    gone = _wait(emu, kinds=[Kind.DISCONNECT], client_id=client_id)
    assert gone[0].detail["reason"] == "SERVER_INITIATED_DISCONNECT"
    assert not emu.emulator.observations.query(kinds=[Kind.CERTIFICATE_CREATED],
                                               client_id=client_id)


def test_disconnect_after_handling_commits_then_drops_the_client(
        emu: EmbeddedEmulator, setup: tuple[str, str, Identity]) -> None:
    client_id = unique("dca")
    _plan(emu, FaultRule(disconnect_after(), api="CreateCertificateFromCsr",
                         client_id=client_id))
    device = PahoDevice(emu, setup[2], client_id)
    try:
        device.subscribe(*protocol.subscription_filters(Api.CREATE_CERTIFICATE_FROM_CSR, "json"))
        device.client.publish(protocol.create_from_csr_topic("json"), _csr_request(), 1)
        assert device.disconnected.wait(TIMEOUT)
    finally:
        device.close()
    created = _wait(emu, kinds=[Kind.CERTIFICATE_CREATED], client_id=client_id)
    assert registry_of(emu).get_certificate(created[0].certificate_id or "") is not None
    assert device.messages.empty()


# --------------------------------------------------------------------------- TLS handshake


def _handshake(emu: EmbeddedEmulator, identity: Identity, timeout: float) -> float:
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
    ctx.load_verify_locations(str(identity.ca_file))
    ctx.load_cert_chain(str(identity.cert_file), str(identity.key_file))
    ctx.check_hostname = False
    started = time.monotonic()
    with socket.create_connection(("127.0.0.1", emu.info.mqtt_port), timeout=timeout) as raw, \
            ctx.wrap_socket(raw):
        return time.monotonic() - started


def test_a_stalled_handshake_holds_the_connection_then_carries_on(
        emu: EmbeddedEmulator, setup: tuple[str, str, Identity]) -> None:
    _plan(emu, FaultRule(stall_handshake(0.5), times=1))
    assert _handshake(emu, setup[2], timeout=TIMEOUT) >= 0.5
    assert _handshake(emu, setup[2], timeout=TIMEOUT) < 0.5  # times: 1
    stalls = emu.emulator.observations.query(kinds=[Kind.FAULT])
    assert stalls[-1].detail["action"] == "stall_handshake"


def test_a_device_with_a_shorter_connect_timeout_gives_up_on_a_stalled_handshake(
        emu: EmbeddedEmulator, setup: tuple[str, str, Identity]) -> None:
    _plan(emu, FaultRule(stall_handshake(1.0), times=1))
    with pytest.raises((TimeoutError, ssl.SSLError, OSError)):
        _handshake(emu, setup[2], timeout=0.2)
    device = PahoDevice(emu, setup[2], unique("after-stall"))  # the next one is served
    device.close()


# --------------------------------------------------------------------------- hook


def _register_hooked(emu: EmbeddedEmulator, setup: tuple[str, str, Identity],
                     client_id: str) -> Any:
    _, hooked, identity = setup
    device = PahoDevice(emu, identity, client_id)
    try:
        made = create_certificate(device, "csr", "json")
        return register(device, hooked, "json", made.token, {"SerialNumber": client_id})
    finally:
        device.close()


def test_a_slow_hook_within_the_limit_lets_registration_through(
        emu: EmbeddedEmulator, setup: tuple[str, str, Identity]) -> None:
    client_id = unique("hs")
    _plan(emu, FaultRule(hook_slow(0.2), client_id=client_id))
    answer = _register_hooked(emu, setup, client_id)
    assert not isinstance(answer, ErrorResponse)
    assert _faults_of(emu, client_id) == ["hook_slow"]


@pytest.mark.parametrize(("fault", "reason"), [
    (hook_slow(5.0), "timeout"), (hook_fail(), "error: fault injected (hook_fail)")])
def test_a_hook_that_times_out_or_fails_denies_registration_with_403(
        emu: EmbeddedEmulator, setup: tuple[str, str, Identity], fault: Any,
        reason: str) -> None:
    # spec fleet §4: hook error or no answer within the limit → 403 AccessDenied
    client_id = unique("hook")
    _plan(emu, FaultRule(fault, client_id=client_id))
    answer = _register_hooked(emu, setup, client_id)
    assert isinstance(answer, ErrorResponse)
    assert (answer.status_code, answer.error_code) == (403, "AccessDenied")
    hooks = emu.emulator.observations.query(kinds=[Kind.HOOK], client_id=client_id)
    assert [(o.detail["allowed"], o.detail["reason"]) for o in hooks] == [(False, reason)]


# --------------------------------------------------------------------------- broker restart


def _connect_when_back(emu: EmbeddedEmulator, identity: Identity, client_id: str) -> PahoDevice:
    deadline = time.monotonic() + TIMEOUT
    while True:
        try:
            return PahoDevice(emu, identity, client_id)
        except Refused:
            if time.monotonic() > deadline:
                raise
            time.sleep(0.05)  # the listener is down: try again, as a device would


def test_a_broker_restart_drops_every_connection_and_keeps_the_registry(
        emu: EmbeddedEmulator, setup: tuple[str, str, Identity]) -> None:
    template, _, identity = setup
    client_id, bystander_id = unique("restart"), unique("bystander")
    port = emu.info.mqtt_port
    _plan(emu, FaultRule(restart_broker(0.2), api="RegisterThing", client_id=client_id))
    bystander = PahoDevice(emu, identity, bystander_id)
    device = PahoDevice(emu, identity, client_id)
    try:
        made = create_certificate(device, "csr", "json")
        device.subscribe(*protocol.subscription_filters(Api.REGISTER_THING, "json", template))
        body = protocol.encode(protocol.RegisterThingRequest(made.token, {
            "SerialNumber": client_id}), "json")
        device.client.publish(protocol.register_thing_topic(template, "json"), body, 1)
        assert device.disconnected.wait(TIMEOUT) and bystander.disconnected.wait(TIMEOUT)
    finally:
        device.close()
        bystander.close()
    assert device.messages.empty()  # the request was never answered
    back = _connect_when_back(emu, identity, unique("back"))  # same port, same claim
    try:
        assert emu.emulator.broker.port == port
        again = register(back, template, "json", made.token, {"SerialNumber": client_id})
        assert not isinstance(again, ErrorResponse)  # the token was kept and is unspent
    finally:
        back.close()
    assert _faults_of(emu, client_id) == ["restart_broker"]


# --------------------------------------------------------------------------- control plane


def _iot(emu: EmbeddedEmulator) -> Any:
    return boto3.client("iot", endpoint_url=emu.info.api_url, region_name=REGION,
                        aws_access_key_id="AKIDFLEETBENCH", aws_secret_access_key="secret",
                        config=Config(retries={"total_max_attempts": 1}))


def test_a_control_plane_call_can_be_rejected_with_any_aws_error_code(
        emu: EmbeddedEmulator) -> None:
    # spec broker §5.2: the modeled code makes boto3 raise the named exception
    name = unique("thing")
    _plan(emu, FaultRule(reject("ServiceUnavailableException", message="try later"),
                         api="CreateThing"))
    iot = _iot(emu)
    with pytest.raises(iot.exceptions.ServiceUnavailableException) as raised:
        iot.create_thing(thingName=name)
    assert raised.value.response["Error"]["Message"] == "try later"
    assert raised.value.response["ResponseMetadata"]["HTTPStatusCode"] == 503
    emu.emulator.faults.clear()
    iot.create_thing(thingName=name)  # the rejected call changed nothing


def test_a_control_plane_call_can_be_delayed(emu: EmbeddedEmulator) -> None:
    _plan(emu, FaultRule(delay(0.5), api="iot:ListThings", nth=(1,)))
    iot = _iot(emu)
    started = time.monotonic()
    iot.list_things()
    assert time.monotonic() - started >= 0.5
    started = time.monotonic()
    iot.list_things()
    assert time.monotonic() - started < 0.5
