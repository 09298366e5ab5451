"""The virtual device, its MQTT transport and its flash, against the embedded emulator.

Unit tests first (backoff, credential store, fault payloads against the real protocol
module), then the transport against the emulator's broker, then every flow variant and
step control end to end: each asserts on the device's result AND on what the endpoint
holds afterwards (boto3 against the control plane, the admin API's observations).
"""

from __future__ import annotations

import importlib.util
import json
import os
import random
import stat
import subprocess
import sys
import threading
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any, cast

import pytest
from cryptography import x509

from devices.base import (
    ClaimCredentials,
    DeviceInputs,
    DeviceResult,
    EndpointParams,
    FaultPoint,
    MqttVersion,
    Step,
)
from devices.credentials import CredentialStore, CredentialStoreError, Phase
from devices.mqtt_transport import (
    ConnectionLost,
    LoopDriver,
    MqttTransport,
    PublishRefused,
    SubscribeRefused,
    TlsIdentity,
    ssl_context,
)
from devices.virtual import (
    CsrFault,
    Jitter,
    KeyType,
    PayloadFault,
    ProvisioningClient,
    Recovery,
    Rejected,
    RetryPolicy,
    StepControl,
    TokenFault,
    VirtualDevice,
    VirtualOptions,
    bad_csr,
    malformed_payload,
)
from harness import pki
from harness import protocol as fp
from harness.errors import ProvisioningError
from harness.protocol import Api, PayloadFormat

PROVISIONING_PRESENT = importlib.util.find_spec("harness.emulator.provisioning") is not None
needs_provisioning = pytest.mark.skipif(
    not PROVISIONING_PRESENT, reason="the emulator's provisioning service is not in this build")


# =========================================================================== unit


def test_backoff_schedule_with_full_jitter_is_reproducible_from_a_seed():
    # issue 6: AWS-style retries, exponential backoff with full jitter, capped
    policy = RetryPolicy(max_attempts=6, base_delay_s=0.1, max_delay_s=1.0)
    expected_rng = random.Random(42)
    expected = tuple(expected_rng.uniform(0.0, min(1.0, 0.1 * 2 ** n)) for n in range(5))
    assert policy.schedule(random.Random(42)) == expected
    assert [policy.ceiling(n) for n in range(1, 6)] == [0.1, 0.2, 0.4, 0.8, 1.0]
    assert all(0.0 <= d <= c for d, c in zip(expected, [0.1, 0.2, 0.4, 0.8, 1.0], strict=True))


def test_backoff_without_jitter_doubles_to_the_cap_and_equal_jitter_keeps_half():
    assert RetryPolicy(max_attempts=5, base_delay_s=0.5, max_delay_s=2.0,
                       jitter=Jitter.NONE).schedule(random.Random(1)) == (0.5, 1.0, 2.0, 2.0)
    equal = RetryPolicy(max_attempts=8, jitter="equal").schedule(  # type: ignore[arg-type]
        random.Random(3))
    ceilings = [RetryPolicy().ceiling(n) for n in range(1, 8)]
    assert all(c / 2 <= d <= c for d, c in zip(equal, ceilings, strict=True))


def test_only_listed_statuses_are_retried_and_only_while_attempts_remain():
    # spec fleet §5: a throttled device sees 429
    policy = RetryPolicy(max_attempts=3)
    assert policy.retries_status(429, 1) and policy.retries_status(429, 2)
    assert not policy.retries_status(429, 3)
    assert not policy.retries_status(400, 1)


class ScriptedTransport:
    """Stands in for the network below ProvisioningClient (the client is under test):
    answers each request with the next scripted (suffix, wire dict)."""

    def __init__(self, replies: list[tuple[str, dict[str, Any]]]) -> None:
        self.replies = replies
        self.requests: list[tuple[str, bytes]] = []

    def request(self, topic: str, payload: bytes, *, accepted: str, rejected: str,
                timeout: float) -> Any:
        from devices.mqtt_transport import Message

        self.requests.append((topic, payload))
        suffix, body = self.replies.pop(0)
        return Message(accepted if suffix == "accepted" else rejected,
                       fp.encode(body, PayloadFormat.JSON), 1)


def test_a_throttled_request_is_retried_after_the_seeded_backoff_delays():
    # spec fleet §5: 429 is retried with backoff; the token survives a throttled attempt
    throttled = fp.throttled(Api.REGISTER_THING).to_payload()
    transport = ScriptedTransport([("rejected", throttled), ("rejected", throttled),
                                   ("accepted", {"thingName": "t1", "deviceConfiguration": {}})])
    slept: list[float] = []
    policy = RetryPolicy(max_attempts=4, base_delay_s=0.2, max_delay_s=1.0)
    client = ProvisioningClient(cast(MqttTransport, transport), "json", retry=policy,
                                rng=random.Random(9), sleep=slept.append)
    response = client.register_thing("tmpl", "token", {"SerialNumber": "1"})
    assert response.thing_name == "t1"
    assert client.attempts == 3
    assert slept == list(policy.schedule(random.Random(9))[:2])
    assert len({payload for _, payload in transport.requests}) == 1


def test_throttling_that_outlasts_the_attempts_ends_in_the_rejection():
    throttled = fp.throttled(Api.CREATE_KEYS_AND_CERTIFICATE).to_payload()
    transport = ScriptedTransport([("rejected", throttled)] * 2)
    client = ProvisioningClient(cast(MqttTransport, transport), "json",
                                retry=RetryPolicy(max_attempts=2), sleep=lambda _s: None)
    with pytest.raises(Rejected) as caught:
        client.create_keys_and_certificate()
    assert caught.value.response.status_code == 429
    assert caught.value.attempts == 2


def test_credential_store_keeps_keys_0600_and_tokens_out_of_state_json(tmp_path):
    store = CredentialStore(tmp_path / "dev")
    key = pki.generate_ec_key()
    cert = pki.CertificateAuthority.create().issue_device_certificate(key.public_key())
    state = store.save_credentials(pki.certificate_pem(cert), pki.private_key_pem(key),
                                   "c" * 64, "the-secret-token", "tmpl", 1000.0)
    assert state.phase is Phase.CREDENTIALS_SAVED
    assert stat.S_IMODE(os.stat(store.device_key).st_mode) == 0o600
    assert stat.S_IMODE(os.stat(store.directory).st_mode) == 0o700
    assert "the-secret-token" not in store.state_file.read_text()
    assert store.load_token() == "the-secret-token"
    registered = store.mark_registered("thing-1", {"k": "v"}, 1001.0)
    assert registered.phase is Phase.REGISTERED and store.load_token() is None
    assert store.load_state() == registered
    store.forget_progress()
    assert store.load_state().phase is Phase.NEW and not store.has_device_credentials()


def test_a_corrupt_state_file_is_reported_with_its_name(tmp_path):
    store = CredentialStore(tmp_path)
    store.state_file.write_text("{not json")
    with pytest.raises(CredentialStoreError, match=r"state\.json"):
        store.load_state()
    store.state_file.write_text(json.dumps({"phase": "registered"}))
    with pytest.raises(CredentialStoreError, match="missing"):
        store.load_state()


@pytest.mark.parametrize("fmt", list(PayloadFormat))
@pytest.mark.parametrize("fault,api", [
    (PayloadFault.NOT_DECODABLE, Api.CREATE_KEYS_AND_CERTIFICATE),
    (PayloadFault.NOT_AN_OBJECT, Api.CREATE_CERTIFICATE_FROM_CSR),
    (PayloadFault.WRONG_FIELD_TYPES, Api.CREATE_CERTIFICATE_FROM_CSR),
    (PayloadFault.WRONG_FIELD_TYPES, Api.REGISTER_THING),
])
def test_malformed_payloads_are_refused_by_the_protocol_parser(fmt, fault, api):
    # spec fleet §1.5: malformed JSON/CBOR → 400 InvalidPayload
    with pytest.raises(ProvisioningError) as caught:
        fp.parse_request(api, malformed_payload(fault, api, fmt, token="t"), fmt)
    assert (caught.value.status_code, caught.value.error_code) == (400, fp.INVALID_PAYLOAD_CODE)


@pytest.mark.parametrize("fault", list(CsrFault))
def test_bad_csrs_do_not_verify(fault):
    # spec fleet §1.3: the CSR's self-signature is verified, weak keys refused
    pem = bad_csr(fault, "SN1")
    if fault in (CsrFault.EMPTY, CsrFault.GARBAGE):
        with pytest.raises(ValueError):
            x509.load_pem_x509_csr(pem.encode())
        return
    csr = x509.load_pem_x509_csr(pem.encode())
    if fault is CsrFault.WEAK_KEY:
        assert csr.public_key().key_size == 1024  # type: ignore[union-attr]
    else:
        assert not csr.is_signature_valid


def test_step_control_refuses_an_expired_token_fault_without_a_clock():
    with pytest.raises(ValueError, match="advance_clock"):
        StepControl(token_fault="expired")  # type: ignore[arg-type]
    control = StepControl(stop_after="register_thing")  # type: ignore[arg-type]
    assert control.stop_after is Step.REGISTER_THING


# =========================================================================== emulator


@pytest.fixture(scope="module")
def endpoint() -> Iterator[Any]:
    from harness.endpoints.local import LocalEndpoint

    ep = LocalEndpoint.start(mode="in-process")
    try:
        yield ep
    finally:
        ep.close()


@pytest.fixture(scope="module")
def fleet(endpoint: Any) -> Iterator[Any]:
    from harness.fleet import Fleet, FleetSpec

    made = Fleet.for_endpoint(endpoint, FleetSpec(prefix=f"vd{uuid.uuid4().hex[:6]}")).setup()
    try:
        yield made
    finally:
        made.teardown()


@pytest.fixture(scope="module")
def mqtt_endpoint(endpoint: Any) -> EndpointParams:
    return EndpointParams.from_endpoint_info(endpoint.info)


@pytest.fixture
def claim(fleet: Any) -> ClaimCredentials:
    return cast(ClaimCredentials, fleet.create_claim())


def serial() -> str:
    return uuid.uuid4().hex[:10]


# --------------------------------------------------------------------------- transport


def claim_transport(mqtt_endpoint: EndpointParams, claim: ClaimCredentials,
                    version: MqttVersion, driver: LoopDriver | None = None) -> MqttTransport:
    identity = TlsIdentity.for_endpoint(mqtt_endpoint, claim.cert_path, claim.key_path)
    return MqttTransport(f"t-{uuid.uuid4().hex[:8]}", mqtt_endpoint, identity, version=version,
                         driver=driver)


def test_transport_connects_over_mutual_tls_with_nodelay_and_one_context_per_identity(
        mqtt_endpoint, claim):
    # perf-notes: TCP_NODELAY after connect, one SSLContext per identity; spec broker §1.2
    import socket

    transport = claim_transport(mqtt_endpoint, claim, MqttVersion.V5)
    transport.connect(timeout=10)
    try:
        sock: Any = transport._client.socket()  # type: ignore[union-attr]
        assert sock.getsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY) == 1
        assert ssl_context(transport.identity) is ssl_context(transport.identity)
    finally:
        transport.disconnect()
    assert not transport.connected


def test_unauthorized_subscribe_closes_a_311_connection(mqtt_endpoint, claim):
    # spec broker §1.9: SUBSCRIBE denied → 3.1.1 connection closed, no SUBACK
    transport = claim_transport(mqtt_endpoint, claim, MqttVersion.V3_1_1)
    transport.connect(timeout=10)
    with pytest.raises(ConnectionLost, match="closed by the endpoint"):
        transport.subscribe(["not/in/the/claim/policy"], timeout=5)


def test_unauthorized_subscribe_gets_suback_0x87_over_mqtt5(mqtt_endpoint, claim):
    # spec broker §1.9: MQTT 5 SUBACK 0x87 per denied filter
    transport = claim_transport(mqtt_endpoint, claim, MqttVersion.V5)
    transport.connect(timeout=10)
    try:
        with pytest.raises(SubscribeRefused) as caught:
            transport.subscribe(["not/in/the/claim/policy"], timeout=5)
        assert caught.value.refused == (("not/in/the/claim/policy", 0x87),)
        assert transport.connected
    finally:
        transport.disconnect()


def test_unauthorized_publish_gets_puback_0x87_over_mqtt5(mqtt_endpoint, claim):
    # spec broker §1.9: QoS 1 PUBLISH denied → PUBACK 0x87
    transport = claim_transport(mqtt_endpoint, claim, MqttVersion.V5)
    transport.connect(timeout=10)
    try:
        with pytest.raises(PublishRefused) as caught:
            transport.publish("not/in/the/claim/policy", b"x", timeout=5)
        assert caught.value.reason_code == 0x87
    finally:
        transport.disconnect()


def test_one_external_loop_drives_many_clients(mqtt_endpoint, claim):
    # issue 8: many devices from one selectors loop (paho loop_read/loop_write/loop_misc)
    driver = LoopDriver()
    runner = threading.Thread(target=driver.run_forever, daemon=True)
    runner.start()
    try:
        transports = [claim_transport(mqtt_endpoint, claim, MqttVersion.V3_1_1, driver)
                      for _ in range(8)]
        for transport in transports:
            transport.connect(timeout=10)
        for transport in transports:  # all on the claim policy's own topics
            transport.subscribe(fp.subscription_filters(Api.CREATE_KEYS_AND_CERTIFICATE,
                                                        "json"), timeout=5)
        assert all(t.connected for t in transports)
        for transport in transports:
            transport.disconnect()
        assert not any(t.connected for t in transports)
    finally:
        driver.stop()
        runner.join(5)
    assert not runner.is_alive()


class _FakeClient:
    """What LoopDriver uses of a paho client, with a write backlog a test controls."""

    def __init__(self, sock: Any) -> None:
        self.sock = sock
        self.backlog = 0
        self.writes = 0

    def want_write(self) -> bool:
        return self.backlog > 0

    def loop_write(self) -> None:
        self.writes += 1
        self.backlog = 0

    def loop_read(self) -> None:
        self.sock.recv(4096)

    def loop_misc(self) -> None:
        pass

    def socket(self) -> Any:
        return self.sock


def test_a_cooperative_driver_watches_for_writing_only_while_paho_has_bytes_left():
    # A cooperative driver leaves writing to paho (inline, from the greenlet that queued
    # the packet); a write the socket did not take whole is finished by the driver.
    import selectors
    import socket

    driver = LoopDriver(cooperative=True)
    mine, peer = socket.socketpair()
    client = _FakeClient(mine)
    try:
        driver._on_open(cast(Any, client), None, mine)
        driver.run_once(0)
        assert driver._selector.get_key(mine).events == selectors.EVENT_READ
        driver.wrote(cast(Any, client))  # nothing left: nothing to watch
        driver.run_once(0)
        assert driver._selector.get_key(mine).events == selectors.EVENT_READ
        client.backlog = 1  # paho could not write it all
        driver.wrote(cast(Any, client))
        driver.run_once(0)  # watches for writing, the socket is writable, paho writes
        assert client.writes == 1 and not client.want_write()
        assert driver._selector.get_key(mine).events == selectors.EVENT_READ
    finally:
        driver._on_close(cast(Any, client), None, mine)
        driver.run_once(0)
        mine.close()
        peer.close()


def test_abort_drops_the_connection_without_disconnect(endpoint, mqtt_endpoint, claim):
    # issue 10: a power cut, seen from the endpoint, is a connection lost without DISCONNECT
    transport = claim_transport(mqtt_endpoint, claim, MqttVersion.V3_1_1)
    transport.connect(timeout=10)
    transport.abort()
    assert not transport.connected
    events = endpoint.admin.events(client_id=transport.client_id, kinds=["disconnect"], wait=5)
    assert events, "the endpoint saw no disconnect"
    assert events[-1].detail["reason"] == "CONNECTION_LOST"  # spec broker §4.2


# --------------------------------------------------------------------------- flows


def device_inputs(mqtt_endpoint: EndpointParams, fleet: Any, claim: ClaimCredentials,
                  workdir: Path, sn: str, **kw: Any) -> DeviceInputs:
    return DeviceInputs(endpoint=mqtt_endpoint, claim=claim, template_name=fleet.template_name,
                        serial=sn, workdir=workdir, timeout_s=30, **kw)


def assert_provisioned(endpoint: Any, fleet: Any, result: DeviceResult, sn: str) -> dict:
    """The endpoint's verdict: the thing exists with exactly this ACTIVE certificate, and the
    endpoint saw the device connect with it."""
    assert result.ok, (result.error, result.failure)
    thing = fleet.thing_name(sn)
    assert result.thing_name == thing
    endpoint.iot.describe_thing(thingName=thing)
    certificate = endpoint.iot.describe_certificate(
        certificateId=result.certificate_id)["certificateDescription"]
    assert certificate["status"] == "ACTIVE"
    principals = endpoint.iot.list_thing_principals(thingName=thing)["principals"]
    assert principals == [certificate["certificateArn"]]
    connects = endpoint.admin.events(certificate_id=result.certificate_id, kinds=["connect"],
                                     wait=5)
    assert any(e.client_id == thing for e in connects)
    return cast(dict, certificate)


@needs_provisioning
@pytest.mark.parametrize("mqtt", [MqttVersion.V3_1_1, MqttVersion.V5])
@pytest.mark.parametrize("fmt", ["json", "cbor"])
@pytest.mark.parametrize("cert_api", ["keys", "csr"])
@pytest.mark.parametrize("flow", ["claim", "trusted-user"])
def test_every_flow_variant_provisions_and_publishes_under_the_new_policy(
        endpoint, fleet, mqtt_endpoint, tmp_path, flow, cert_api, fmt, mqtt):
    # spec fleet §1.2-§1.4, §2: by claim and by trusted user, keys or CSR, JSON or CBOR
    claim = fleet.create_trusted_user_claim() if flow == "trusted-user" else fleet.create_claim()
    sn = serial()
    result = VirtualDevice().provision(device_inputs(
        mqtt_endpoint, fleet, claim, tmp_path / "dev", sn, flow=flow, cert_api=cert_api,
        payload_format=fmt, mqtt_version=mqtt))
    assert_provisioned(endpoint, fleet, result, sn)
    assert [s.name for s in result.steps if not s.ok] == []
    assert result.step(Step.PUBLISH_TELEMETRY) is not None
    assert (result.step(Step.GENERATE_KEY) is not None) == (cert_api == "csr")
    assert result.device_configuration["fleetbenchRun"] == fleet.prefix
    assert pki.certificate_id((tmp_path / "dev" / "device.pem").read_text()) == \
        result.certificate_id


@needs_provisioning
def test_an_rsa_2048_csr_key_is_kept_on_the_device(endpoint, fleet, mqtt_endpoint, claim,
                                                    tmp_path):
    # spec fleet §1.3: RSA ≥ 2048 accepted; the key never leaves the device
    sn = serial()
    device = VirtualDevice(VirtualOptions(key_type=KeyType.RSA_2048))
    result = device.provision(device_inputs(mqtt_endpoint, fleet, claim, tmp_path, sn,
                                            cert_api="csr"))
    assert_provisioned(endpoint, fleet, result, sn)
    key = pki.load_private_key((tmp_path / "device.key").read_bytes())
    assert key.key_size == 2048
    assert stat.S_IMODE(os.stat(tmp_path / "device.key").st_mode) == 0o600


@needs_provisioning
def test_a_rebooted_device_reuses_its_stored_credentials(endpoint, fleet, mqtt_endpoint, claim,
                                                          tmp_path):
    # issue 6: credentials kept as in flash; a restart reuses them
    sn = serial()
    inputs = device_inputs(mqtt_endpoint, fleet, claim, tmp_path, sn)
    first = VirtualDevice().provision(inputs)
    assert_provisioned(endpoint, fleet, first, sn)
    reboot_delay(endpoint)
    second = VirtualDevice().provision(inputs)
    assert second.ok and second.certificate_id == first.certificate_id, second.failure
    assert second.step(Step.RESUME).detail["action"] == "reuse"  # type: ignore[union-attr]
    assert second.step(Step.CREATE_CERTIFICATE) is None
    assert_provisioned(endpoint, fleet, second, sn)


# --------------------------------------------------------------------------- step control


def run_with(mqtt_endpoint: EndpointParams, fleet: Any, claim: ClaimCredentials, tmp_path: Path,
             control: StepControl, *, options: VirtualOptions | None = None,
             **inputs: Any) -> DeviceResult:
    device = VirtualDevice(options or VirtualOptions(response_timeout_s=5))
    return device.provision(device_inputs(mqtt_endpoint, fleet, claim, tmp_path, serial(),
                                          **inputs), control)


def assert_rejected(result: DeviceResult, status: int, code: str, step: Step) -> None:
    assert not result.ok
    assert result.error is not None, result.failure
    assert (result.error.status_code, result.error.error_code) == (status, code)
    record = result.step(step)
    assert record is not None and not record.ok and record.error_code == code


@needs_provisioning
def test_an_empty_token_is_rejected_with_aws_observed_message(mqtt_endpoint, fleet, claim,
                                                               tmp_path):
    # spec fleet §1.5 (observed): 400 InvalidCertificateOwnershipToken, exact message
    result = run_with(mqtt_endpoint, fleet, claim, tmp_path,
                      StepControl(token_fault=TokenFault.EMPTY))
    assert_rejected(result, 400, fp.INVALID_TOKEN_CODE, Step.REGISTER_THING)
    assert result.error is not None
    assert result.error.error_message == fp.TOKEN_EMPTY_MESSAGE


@needs_provisioning
def test_a_wrong_token_is_rejected(mqtt_endpoint, fleet, claim, tmp_path):
    # spec fleet §1.5, §1.6: unknown token → 400 InvalidCertificateOwnershipToken
    result = run_with(mqtt_endpoint, fleet, claim, tmp_path,
                      StepControl(token_fault=TokenFault.WRONG))
    assert_rejected(result, 400, fp.INVALID_TOKEN_CODE, Step.REGISTER_THING)


@needs_provisioning
def test_an_expired_token_is_rejected(endpoint, mqtt_endpoint, fleet, claim, tmp_path):
    # spec fleet §1.6: the token lives one hour
    result = run_with(mqtt_endpoint, fleet, claim, tmp_path,
                      StepControl(token_fault=TokenFault.EXPIRED,
                                  advance_clock=endpoint.clock.advance))
    assert_rejected(result, 400, fp.INVALID_TOKEN_CODE, Step.REGISTER_THING)


@needs_provisioning
def test_a_reused_token_is_rejected_after_the_first_registration(endpoint, mqtt_endpoint, fleet,
                                                                   claim, tmp_path):
    # spec fleet §1.6 (UNCONFIRMED default): reuse after success → 400
    result = run_with(mqtt_endpoint, fleet, claim, tmp_path,
                      StepControl(token_fault=TokenFault.REUSED))
    assert_rejected(result, 400, fp.INVALID_TOKEN_CODE, Step.REGISTER_THING)
    registrations = [s for s in result.steps if s.name == Step.REGISTER_THING.value]
    assert [s.ok for s in registrations] == [True, False]
    endpoint.iot.describe_thing(thingName=result.thing_name)


@needs_provisioning
@pytest.mark.parametrize("fault", list(CsrFault))
def test_a_bad_csr_is_rejected(mqtt_endpoint, fleet, claim, tmp_path, fault):
    # spec fleet §1.3, §1.5: bad PEM, bad signature or weak key → 400 InvalidCsr
    result = run_with(mqtt_endpoint, fleet, claim, tmp_path, StepControl(csr_fault=fault),
                      cert_api="csr")
    assert_rejected(result, 400, fp.INVALID_CSR_CODE, Step.CREATE_CERTIFICATE)


@needs_provisioning
def test_a_wrong_template_name_is_rejected_with_404(endpoint, mqtt_endpoint, fleet, tmp_path):
    # spec fleet §1.5, edge case 6: unknown template → 404 on that template's rejected topic.
    # The claim policy must let the device use the topic (authorization is broker-level).
    made = endpoint.iot.create_keys_and_certificate(setAsActive=True)
    fleet.track_certificate(made["certificateId"])
    policy = f"{fleet.prefix}-any-template"
    endpoint.iot.create_policy(policyName=policy, policyDocument=json.dumps(
        fp.claim_policy_document("*")))
    endpoint.iot.attach_policy(policyName=policy, target=made["certificateArn"])
    pki.write_public(tmp_path / "c.pem", made["certificatePem"])
    pki.write_secret(tmp_path / "c.key", made["keyPair"]["PrivateKey"])
    claim = ClaimCredentials.from_files(tmp_path / "c.pem", tmp_path / "c.key")
    try:
        result = run_with(mqtt_endpoint, fleet, claim, tmp_path / "dev",
                          StepControl(template_name="no-such-template"))
        assert_rejected(result, 404, fp.RESOURCE_NOT_FOUND_CODE, Step.REGISTER_THING)
    finally:
        endpoint.iot.detach_policy(policyName=policy, target=made["certificateArn"])
        endpoint.iot.delete_policy(policyName=policy)


@needs_provisioning
def test_a_wrong_template_outside_the_claim_policy_closes_a_311_connection(
        mqtt_endpoint, fleet, claim, tmp_path):
    # spec fleet §1.5 / edge case 12: authorization failures are not rejected payloads
    result = run_with(mqtt_endpoint, fleet, claim, tmp_path,
                      StepControl(template_name="no-such-template"))
    assert not result.ok and result.error is None
    record = result.step(Step.SUBSCRIBE_REGISTER)
    assert record is not None and record.error_code == "ConnectionLost"


@needs_provisioning
@pytest.mark.parametrize("fault", [PayloadFault.NOT_DECODABLE, PayloadFault.NOT_AN_OBJECT])
@pytest.mark.parametrize("fmt", ["json", "cbor"])
def test_a_malformed_certificate_request_is_rejected(mqtt_endpoint, fleet, claim, tmp_path,
                                                     fault, fmt):
    # spec fleet §1.5: malformed payload → 400 InvalidPayload
    result = run_with(mqtt_endpoint, fleet, claim, tmp_path,
                      StepControl(malformed_certificate_request=fault), payload_format=fmt)
    assert_rejected(result, 400, fp.INVALID_PAYLOAD_CODE, Step.CREATE_CERTIFICATE)


@needs_provisioning
def test_unknown_fields_in_create_keys_are_ignored(endpoint, mqtt_endpoint, fleet, claim,
                                                   tmp_path):
    # spec fleet §1.2: unknown fields ignored
    sn = serial()
    result = VirtualDevice().provision(
        device_inputs(mqtt_endpoint, fleet, claim, tmp_path, sn),
        StepControl(malformed_certificate_request=PayloadFault.WRONG_FIELD_TYPES))
    assert_provisioned(endpoint, fleet, result, sn)


@needs_provisioning
def test_a_malformed_register_request_is_rejected(mqtt_endpoint, fleet, claim, tmp_path):
    # spec fleet §1.4, §1.5: parameters must be a map of strings
    result = run_with(mqtt_endpoint, fleet, claim, tmp_path,
                      StepControl(malformed_register_request=PayloadFault.WRONG_FIELD_TYPES),
                      payload_format="cbor")
    assert_rejected(result, 400, fp.INVALID_PAYLOAD_CODE, Step.REGISTER_THING)


@needs_provisioning
def test_without_subscribing_the_reply_is_lost(mqtt_endpoint, fleet, claim, tmp_path):
    # spec fleet §1.1: no matching subscription at response time → reply dropped
    result = run_with(mqtt_endpoint, fleet, claim, tmp_path, StepControl(skip_subscribe=True),
                      options=VirtualOptions(response_timeout_s=1))
    assert not result.ok and result.error is None
    assert result.step(Step.SUBSCRIBE_CERTIFICATE) is None
    assert result.step(Step.CREATE_CERTIFICATE).error_code == "Timeout"  # type: ignore[union-attr]


@needs_provisioning
@pytest.mark.parametrize("mqtt,code", [(MqttVersion.V3_1_1, "ConnectionLost"),
                                       (MqttVersion.V5, "PublishRefused")])
def test_publishing_outside_the_new_policy_is_refused(endpoint, mqtt_endpoint, fleet, claim,
                                                      tmp_path, mqtt, code):
    # spec broker §1.9: 3.1.1 connection closed; MQTT 5 PUBACK 0x87
    result = run_with(mqtt_endpoint, fleet, claim, tmp_path,
                      StepControl(publish_topic="dt/someone-else/telemetry"), mqtt_version=mqtt)
    assert not result.ok and result.error is None
    assert result.step(Step.PUBLISH_TELEMETRY).error_code == code  # type: ignore[union-attr]
    status = endpoint.iot.describe_certificate(
        certificateId=result.certificate_id)["certificateDescription"]["status"]
    assert status == "ACTIVE"  # provisioning itself succeeded


@needs_provisioning
def test_reconnecting_with_the_claim_cannot_publish_telemetry(mqtt_endpoint, fleet, claim,
                                                              tmp_path):
    # spec fleet §2.3: the claim policy only covers the provisioning topics
    result = run_with(mqtt_endpoint, fleet, claim, tmp_path,
                      StepControl(reconnect_with_claim=True), mqtt_version=MqttVersion.V5)
    assert not result.ok
    assert result.step(Step.CONNECT_DEVICE).detail["certificate"] == "claim"  # type: ignore
    assert result.step(Step.PUBLISH_TELEMETRY).error_code == "PublishRefused"  # type: ignore


@needs_provisioning
def test_stopping_after_the_certificate_leaves_it_pending(endpoint, mqtt_endpoint, fleet, claim,
                                                          tmp_path):
    # spec fleet §1.2: a new certificate is PENDING_ACTIVATION until RegisterThing
    result = run_with(mqtt_endpoint, fleet, claim, tmp_path,
                      StepControl(stop_after=Step.CREATE_CERTIFICATE))
    assert not result.ok and result.stopped_at == Step.CREATE_CERTIFICATE.value
    status = endpoint.iot.describe_certificate(
        certificateId=result.certificate_id)["certificateDescription"]["status"]
    assert status == "PENDING_ACTIVATION"
    fleet.track_certificate(result.certificate_id)


@needs_provisioning
def test_step_events_report_each_step_and_its_error_code(mqtt_endpoint, fleet, claim, tmp_path):
    # issue 8: on_step(name, duration_s, error_code) for Locust's statistics
    events: list[tuple[str, float, str | None]] = []
    device = VirtualDevice(VirtualOptions(on_step=lambda *e: events.append(e)))
    result = device.provision(device_inputs(mqtt_endpoint, fleet, claim, tmp_path, serial()),
                              StepControl(token_fault=TokenFault.EMPTY))
    assert [(n, c) for n, _, c in events] == [(s.name, s.error_code) for s in result.steps]
    assert events[-1][0] == Step.REGISTER_THING.value
    assert events[-1][2] == fp.INVALID_TOKEN_CODE
    assert all(d >= 0 for _, d, _ in events)
    log_text = (tmp_path / "device.log").read_text()
    assert "event=step name=register_thing ok=false" in log_text
    assert "BEGIN" not in log_text  # no key or certificate material in the device log


# --------------------------------------------------------------------------- recovery


def principals(endpoint: Any, thing: str) -> list[str]:
    return cast(list, endpoint.iot.list_thing_principals(thingName=thing)["principals"])


def reboot_delay(endpoint: Any) -> None:
    """A reboot takes time: let the per-client-id CONNECT rate (1/s) pass on the emulated
    clock (spec broker §1.8)."""
    endpoint.clock.advance(2.0)


@needs_provisioning
@pytest.mark.parametrize("mqtt", [MqttVersion.V3_1_1, MqttVersion.V5])
def test_a_cut_after_saving_credentials_is_finished_on_the_next_boot(
        endpoint, mqtt_endpoint, fleet, claim, tmp_path, mqtt):
    # issue 10: the device finishes with its stored token and ends provisioned exactly once
    sn = serial()
    inputs = device_inputs(mqtt_endpoint, fleet, claim, tmp_path, sn, mqtt_version=mqtt)
    device = VirtualDevice()
    device.cut_at(FaultPoint.AFTER_CREDENTIALS_SAVED)
    cut = device.provision(inputs)
    assert not cut.ok and cut.stopped_at == Step.SAVE_CREDENTIALS.value
    reboot_delay(endpoint)
    recovered = device.provision(inputs)
    assert recovered.step(Step.RESUME).detail["action"] == "finish"  # type: ignore[union-attr]
    assert recovered.step(Step.CREATE_CERTIFICATE) is None
    assert recovered.certificate_id == cut.certificate_id
    assert_provisioned(endpoint, fleet, recovered, sn)


@needs_provisioning
def test_a_cut_after_register_is_recognised_by_probing_the_stored_certificate(
        endpoint, mqtt_endpoint, fleet, claim, tmp_path):
    # issue 10: the token is spent (spec fleet §1.6); the stored certificate already works
    sn = serial()
    inputs = device_inputs(mqtt_endpoint, fleet, claim, tmp_path, sn)
    device = VirtualDevice(VirtualOptions(device_client_id=fleet.thing_name(sn)))
    device.cut_at("after_register")
    cut = device.provision(inputs)
    assert cut.stopped_at == Step.REGISTER_THING.value
    reboot_delay(endpoint)
    recovered = device.provision(inputs)
    probe = recovered.step(Step.PROBE_DEVICE)
    assert probe is not None and probe.detail["outcome"] == "connected"
    assert recovered.ok and recovered.certificate_id == cut.certificate_id
    assert len(principals(endpoint, fleet.thing_name(sn))) == 1


@needs_provisioning
@pytest.mark.parametrize("point,recovery", [(FaultPoint.AFTER_CERTIFICATE, Recovery.FINISH),
                                            (FaultPoint.AFTER_CREDENTIALS_SAVED,
                                             Recovery.RESTART)])
def test_a_device_that_starts_over_still_ends_with_one_certificate(
        endpoint, mqtt_endpoint, fleet, claim, tmp_path, point, recovery):
    # issue 10: starting over leaves the first certificate unregistered (spec fleet §1.6:
    # AWS deletes it after the hour) and the thing with one principal
    sn = serial()
    inputs = device_inputs(mqtt_endpoint, fleet, claim, tmp_path, sn, cert_api="csr")
    device = VirtualDevice(VirtualOptions(recovery=recovery))
    cut = device.provision(inputs, StepControl(cut_at=point))
    assert not cut.ok
    fleet.track_certificate(cut.certificate_id)
    reboot_delay(endpoint)
    recovered = device.provision(inputs)
    assert recovered.step(Step.CREATE_CERTIFICATE) is not None
    assert recovered.certificate_id != cut.certificate_id
    assert_provisioned(endpoint, fleet, recovered, sn)
    first = endpoint.iot.describe_certificate(
        certificateId=cut.certificate_id)["certificateDescription"]
    assert first["status"] == "PENDING_ACTIVATION"


@needs_provisioning
def test_power_off_mid_flow_cuts_the_run_and_power_on_boots_into_recovery(
        endpoint, mqtt_endpoint, fleet, claim, tmp_path):
    # issue 10 / labgrid Power: off() during a run drops the connections like a cut
    sn = serial()
    inputs = device_inputs(mqtt_endpoint, fleet, claim, tmp_path, sn)
    device = VirtualDevice()

    def pull_the_plug(step: Step) -> None:
        if step is Step.SUBSCRIBE_REGISTER:
            device.off()

    cut = device.provision(inputs, StepControl(before_step=pull_the_plug))
    assert not cut.ok and cut.failure is not None and "powered off" in cut.failure
    assert cut.stopped_at == Step.SUBSCRIBE_REGISTER.value
    reboot_delay(endpoint)
    device.on()
    recovered = device.provision(inputs)
    assert recovered.step(Step.RESUME).detail["action"] == "finish"  # type: ignore[union-attr]
    assert_provisioned(endpoint, fleet, recovered, sn)


@needs_provisioning
def test_many_virtual_devices_run_on_one_external_loop(endpoint, mqtt_endpoint, fleet,
                                                       tmp_path):
    # issue 8: a Locust user drives many devices from one selectors loop, step events out
    driver = LoopDriver()
    runner = threading.Thread(target=driver.run_forever, daemon=True)
    runner.start()
    events: list[tuple[str, float, str | None]] = []
    lock = threading.Lock()

    def on_step(name: str, duration: float, error_code: str | None) -> None:
        with lock:
            events.append((name, duration, error_code))

    results: list[DeviceResult] = []
    serials = [serial() for _ in range(4)]

    def one(sn: str) -> None:
        device = VirtualDevice(VirtualOptions(driver=driver, on_step=on_step,
                                              log_to_file=False))
        results.append(device.provision(device_inputs(mqtt_endpoint, fleet, fleet.create_claim(),
                                                      tmp_path / sn, sn)))

    try:
        workers = [threading.Thread(target=one, args=(sn,)) for sn in serials]
        for worker in workers:
            worker.start()
        for worker in workers:
            worker.join(60)
    finally:
        driver.stop()
        runner.join(5)
    assert len(results) == 4
    for result in results:
        assert_provisioned(endpoint, fleet, result, result.device_id)
        assert result.log_path is None
    assert sum(1 for name, _, code in events
               if name == Step.REGISTER_THING.value and code is None) == 4


# --------------------------------------------------------------------------- the program


def run_main(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "devices.virtual_main", *args],
                          capture_output=True, text=True, timeout=120, check=False)


@needs_provisioning
def test_virtual_main_provisions_as_a_separate_program(endpoint, fleet, claim, tmp_path):
    # issue 6: the example program ProcessDevice runs; JSON result on stdout, exit 0
    sn = serial()
    done = run_main("--endpoint-file", str(Path(endpoint.info.data_dir) / "endpoint.json"),
                    "--claim-cert", str(claim.cert_path), "--claim-key", str(claim.key_path),
                    "--template", fleet.template_name, "--serial", sn,
                    "--workdir", str(tmp_path / "dev"), "--cert", "csr", "--format", "cbor",
                    "--mqtt", "5")
    assert done.returncode == 0, done.stderr
    lines = done.stdout.strip().splitlines()
    assert len(lines) == 1  # one JSON line: what ProcessDevice reads
    result = DeviceResult.from_dict(json.loads(lines[0]))
    assert result.kind == "virtual" and result.device_id == sn
    assert_provisioned(endpoint, fleet, result, sn)


@needs_provisioning
def test_virtual_main_exits_1_when_the_flow_does_not_finish(endpoint, mqtt_endpoint, fleet,
                                                            claim, tmp_path):
    done = run_main("--endpoint", mqtt_endpoint.host, "--port", str(mqtt_endpoint.port),
                    "--ca-file", str(mqtt_endpoint.ca_file), "--server-name", "localhost",
                    "--claim-cert", str(claim.cert_path), "--claim-key", str(claim.key_path),
                    "--template", fleet.template_name, "--serial", serial(),
                    "--workdir", str(tmp_path), "--stop-after", "connect_claim")
    assert done.returncode == 1, done.stderr
    assert json.loads(done.stdout)["stopped_at"] == "connect_claim"


def test_virtual_main_exits_2_on_bad_usage(tmp_path):
    done = run_main("--claim-cert", str(tmp_path / "missing.pem"), "--claim-key",
                    str(tmp_path / "missing.key"), "--template", "t", "--workdir", str(tmp_path),
                    "--endpoint", "127.0.0.1", "--port", "8883", "--ca-file", "ca.pem")
    assert done.returncode == 2
    assert "missing.pem" in done.stderr
    assert run_main("--template", "t").returncode == 2
