"""Every rejection of the fleet provisioning MQTT API, end to end over mutual TLS, with
AWS's rejected payload, and nothing left behind: no thing, no policy, no attachment, the
certificate still PENDING_ACTIVATION (spec fleet §1.5, §1.6, §3.7, §4)."""

from __future__ import annotations

import asyncio
import base64
import json
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from harness import pki, protocol
from harness.emulator.app import EmbeddedEmulator
from harness.emulator.hooks import REASON_TIMEOUT
from harness.emulator.keypool import generate_key_material
from harness.emulator.tokens import TOKEN_LIFETIME_SECONDS
from harness.observations import Kind
from harness.protocol import Api, ErrorResponse
from tests.test_provisioning_kit import (
    ACCOUNT,
    HOOK_ARN,
    REGION,
    PahoDevice,
    Refused,
    account_state,
    assert_nothing_left,
    create_certificate,
    create_template,
    emulator,
    factory_claim,
    fleet_template,
    register,
    registry_of,
    service_of,
    unique,
)

__all__ = ["emulator"]

HERE = "tests.test_provisioning_rejections"


# -- hook targets (python:tests.test_provisioning_rejections:<name>) ------------------------------

def deny_hook(event: dict[str, Any]) -> dict[str, Any]:
    return {"allowProvisioning": False}


def failing_hook(event: dict[str, Any]) -> dict[str, Any]:
    raise RuntimeError("the hook's database is down")


def garbage_hook(event: dict[str, Any]) -> Any:
    return ["not", "an", "object"]


def silent_hook(event: dict[str, Any]) -> dict[str, Any]:
    return {"parameterOverrides": {"SerialNumber": "x"}}  # no allowProvisioning: deny


async def slow_hook(event: dict[str, Any]) -> dict[str, Any]:
    await asyncio.sleep(30)
    return {"allowProvisioning": True}


# -- helpers --------------------------------------------------------------------------------------

@pytest.fixture()
def device(emulator: EmbeddedEmulator, tmp_path: Path) -> Iterator[PahoDevice]:
    """A factory-claim device (3.1.1) allowed on every template's topics."""
    identity = factory_claim(emulator, tmp_path, "*")
    connected = PahoDevice(emulator, identity, unique("claim"))
    yield connected
    connected.close()


def rejected(answer: Any, status: int, code: str) -> ErrorResponse:
    assert isinstance(answer, ErrorResponse), answer
    assert (answer.status_code, answer.error_code) == (status, code), answer
    return answer


def attempt(emulator: EmbeddedEmulator, device: PahoDevice, template: str,
            parameters: dict[str, str] | None = None, fmt: str = "json"
            ) -> tuple[ErrorResponse | Any, str]:
    """Create a certificate, RegisterThing with its token; returns (answer, certificate id)
    after checking that the account did not change (for rejections)."""
    new = create_certificate(device, "csr", fmt)
    before = account_state(emulator)
    answer = register(device, template, fmt, new.token,
                      parameters if parameters is not None else {"SerialNumber": unique("sn")})
    if isinstance(answer, ErrorResponse):
        assert_nothing_left(emulator, before, new.certificate_id)
    return answer, new.certificate_id


# -- the ownership token (§1.5, §1.6) -------------------------------------------------------------

@pytest.mark.parametrize("fmt", ["json", "cbor"])
@pytest.mark.parametrize("request_body", [{}, {"certificateOwnershipToken": ""},
                                          {"certificateOwnershipToken": None}])
def test_a_missing_or_empty_token_is_rejected_as_aws_does(
        emulator: EmbeddedEmulator, device: PahoDevice, fmt: str,
        request_body: dict[str, Any]) -> None:
    # spec fleet §1.5 (observed S12), edge case 5
    template = create_template(emulator, fleet_template())
    before = account_state(emulator)
    answer = device.call(Api.REGISTER_THING, fmt, protocol.encode(request_body, fmt), template)
    error = rejected(answer, 400, "InvalidCertificateOwnershipToken")
    assert error.error_message == "Certificate ownership token cannot be empty."
    assert_nothing_left(emulator, before, None)


@pytest.mark.parametrize("token", [
    "definitely-not-a-token",
    base64.b64encode(json.dumps({"version": "20191023", "cipher": base64.b64encode(
        b"\0" * 64).decode()}).encode()).decode(),
])
def test_an_unknown_token_is_rejected(emulator: EmbeddedEmulator, device: PahoDevice,
                                      token: str) -> None:
    # spec fleet §1.5: token unknown or malformed → 400 InvalidCertificateOwnershipToken
    template = create_template(emulator, fleet_template())
    before = account_state(emulator)
    error = rejected(register(device, template, "json", token, {"SerialNumber": "1"}),
                     400, "InvalidCertificateOwnershipToken")
    assert token not in error.error_message
    assert_nothing_left(emulator, before, None)


def test_an_expired_token_is_rejected_and_its_certificate_deleted(
        emulator: EmbeddedEmulator, device: PahoDevice) -> None:
    # spec fleet §1.6: RegisterThing within one hour; the unused certificate is then deleted
    template = create_template(emulator, fleet_template())
    new = create_certificate(device, "csr", "json")
    before = account_state(emulator)
    emulator.emulator.clock.advance(TOKEN_LIFETIME_SECONDS)
    error = rejected(register(device, template, "json", new.token, {"SerialNumber": "1"}),
                     400, "InvalidCertificateOwnershipToken")
    assert "expired" in error.error_message
    assert registry_of(emulator).get_certificate(new.certificate_id) is None
    deleted = emulator.emulator.observations.query(kinds=[Kind.CERTIFICATE_DELETED.value],
                                                   certificate_id=new.certificate_id)
    assert len(deleted) == 1
    after = account_state(emulator)
    assert after["things"] == before["things"] and after["policies"] == before["policies"]


def test_a_token_cannot_be_used_twice(emulator: EmbeddedEmulator, device: PahoDevice) -> None:
    # spec fleet §1.6 UNCONFIRMED default: reuse → 400 InvalidCertificateOwnershipToken
    template = create_template(emulator, fleet_template())
    new = create_certificate(device, "csr", "json")
    first = register(device, template, "json", new.token, {"SerialNumber": unique("sn")})
    assert not isinstance(first, ErrorResponse), first
    before = account_state(emulator)
    error = rejected(register(device, template, "json", new.token, {"SerialNumber": unique("sn")}),
                     400, "InvalidCertificateOwnershipToken")
    assert "already used" in error.error_message
    assert account_state(emulator) == before


def test_a_token_whose_certificate_was_revoked_is_rejected(
        emulator: EmbeddedEmulator, device: PahoDevice) -> None:
    # spec fleet §1.4 step 4: the token must refer to a PENDING_ACTIVATION certificate
    template = create_template(emulator, fleet_template())
    new = create_certificate(device, "csr", "json")
    registry_of(emulator).update_certificate(certificate_id=new.certificate_id,
                                             new_status="REVOKED")
    before = account_state(emulator)
    error = rejected(register(device, template, "json", new.token, {"SerialNumber": "1"}),
                     400, "InvalidCertificateOwnershipToken")
    assert "REVOKED" in error.error_message
    assert account_state(emulator) == before


# -- the CSR (§1.3) -------------------------------------------------------------------------------

def _csr_with_a_bad_signature() -> str:
    from cryptography import x509
    from cryptography.hazmat.primitives import serialization

    good = x509.load_pem_x509_csr(pki.make_csr(pki.generate_ec_key()).encode())
    der = bytearray(good.public_bytes(serialization.Encoding.DER))
    der[-1] ^= 0x01  # last byte of the signature
    body = base64.encodebytes(bytes(der)).decode()
    return f"-----BEGIN CERTIFICATE REQUEST-----\n{body}-----END CERTIFICATE REQUEST-----\n"


def _csr_with(key: Any) -> str:
    return pki.make_csr(key)


def _weak_rsa() -> Any:
    from cryptography.hazmat.primitives.asymmetric import rsa

    return rsa.generate_private_key(public_exponent=65537, key_size=1024)


def _p192() -> Any:
    from cryptography.hazmat.primitives.asymmetric import ec

    return ec.generate_private_key(ec.SECP192R1())


@pytest.mark.parametrize("fmt", ["json", "cbor"])
@pytest.mark.parametrize("make_csr", [
    lambda: "garbage",
    lambda: "-----BEGIN CERTIFICATE REQUEST-----\nAAAA\n-----END CERTIFICATE REQUEST-----\n",
    _csr_with_a_bad_signature,
    lambda: _csr_with(_weak_rsa()),
    lambda: _csr_with(_p192()),
    lambda: pki.certificate_pem(pki.self_signed_certificate(pki.generate_ec_key())),
], ids=["garbage", "bad-der", "bad-signature", "rsa-1024", "ec-p192", "a-certificate"])
def test_a_bad_csr_is_rejected_and_creates_nothing(
        emulator: EmbeddedEmulator, device: PahoDevice, fmt: str, make_csr: Any) -> None:
    # spec fleet §1.3, §1.5: 400, errorCode InvalidCsr (suggested); no certificate issued
    before = account_state(emulator)
    request = protocol.CreateCertificateFromCsrRequest(make_csr())
    answer = device.call(Api.CREATE_CERTIFICATE_FROM_CSR, fmt, protocol.encode(request, fmt))
    rejected(answer, 400, protocol.INVALID_CSR_CODE)
    assert account_state(emulator)["certificates"] == before["certificates"]


@pytest.mark.parametrize("fmt", ["json", "cbor"])
def test_a_csr_request_without_a_csr_is_rejected(emulator: EmbeddedEmulator,
                                                 device: PahoDevice, fmt: str) -> None:
    answer = device.call(Api.CREATE_CERTIFICATE_FROM_CSR, fmt, protocol.encode({}, fmt))
    rejected(answer, 400, protocol.INVALID_CSR_CODE)


@pytest.mark.parametrize("fmt", ["json", "cbor"])
def test_a_malformed_payload_is_rejected(emulator: EmbeddedEmulator, device: PahoDevice,
                                         fmt: str) -> None:
    # spec fleet §1.5 UNCONFIRMED: malformed JSON/CBOR → 400 InvalidPayload
    template = create_template(emulator, fleet_template())
    answer = device.call(Api.REGISTER_THING, fmt, b"\xff{not", template)
    rejected(answer, 400, protocol.INVALID_PAYLOAD_CODE)


def test_rsa_csrs_of_2048_bits_are_accepted(emulator: EmbeddedEmulator,
                                            device: PahoDevice) -> None:
    # spec fleet §1.3: RSA >= 2048 is accepted
    key = pki.load_private_key(generate_key_material().private_key_pem)
    request = protocol.CreateCertificateFromCsrRequest(pki.make_csr(key))
    answer = device.call(Api.CREATE_CERTIFICATE_FROM_CSR, "json", protocol.encode(request, "json"))
    assert not isinstance(answer, ErrorResponse), answer


# -- the template (§1.4 steps 2-3, §3.7) ----------------------------------------------------------

@pytest.mark.parametrize("fmt", ["json", "cbor"])
def test_an_unknown_template_is_404_on_its_own_rejected_topic(
        emulator: EmbeddedEmulator, device: PahoDevice, fmt: str) -> None:
    # spec fleet edge case 6: 404 on the rejected topic of the requested template name
    name = unique("nosuch")
    new = create_certificate(device, "csr", fmt)
    before = account_state(emulator)
    accepted_topic, rejected_topic = protocol.subscription_filters(Api.REGISTER_THING, fmt, name)
    device.subscribe(accepted_topic, rejected_topic)
    request = protocol.RegisterThingRequest(new.token, {"SerialNumber": "1"})
    device.publish(protocol.register_thing_topic(name, fmt), protocol.encode(request, fmt))
    topic, body = device.expect()
    assert topic == rejected_topic
    rejected(protocol.parse_response(Api.REGISTER_THING, "rejected", body, fmt), 404,
             protocol.RESOURCE_NOT_FOUND_CODE)
    assert_nothing_left(emulator, before, new.certificate_id)


def test_a_disabled_template_is_rejected(emulator: EmbeddedEmulator,
                                         device: PahoDevice) -> None:
    # spec fleet edge case 6, §3.6: templates are disabled unless enabled=true
    template = create_template(emulator, fleet_template(), enabled=False)
    answer, _ = attempt(emulator, device, template)
    rejected(answer, protocol.TEMPLATE_DISABLED_STATUS, protocol.INVALID_REQUEST_CODE)


def test_a_missing_parameter_is_rejected(emulator: EmbeddedEmulator,
                                         device: PahoDevice) -> None:
    # spec fleet §3.1: a Ref to a parameter without value → 400
    template = create_template(emulator, fleet_template())
    answer, _ = attempt(emulator, device, template, parameters={"Location": "lab"})
    error = rejected(answer, 400, protocol.INVALID_PARAMETERS_CODE)
    assert "SerialNumber" in error.error_message


def test_a_thing_group_that_does_not_exist_is_rejected(emulator: EmbeddedEmulator,
                                                       device: PahoDevice) -> None:
    # spec fleet §3.2, edge case 16: referenced groups must exist
    template = create_template(emulator, fleet_template(thing_groups=[unique("nogroup")]))
    answer, _ = attempt(emulator, device, template)
    error = rejected(answer, 400, protocol.INVALID_PARAMETERS_CODE)
    assert "does not exist" in error.error_message


def test_a_named_policy_that_does_not_exist_is_rejected(emulator: EmbeddedEmulator,
                                                        device: PahoDevice) -> None:
    # spec fleet §3.2, edge case 14: PolicyName must reference an existing IoT policy
    template = create_template(emulator, fleet_template(policy_name=unique("nopolicy")))
    answer, _ = attempt(emulator, device, template)
    rejected(answer, 400, protocol.INVALID_PARAMETERS_CODE)


def test_override_fail_on_an_existing_thing_is_a_resource_conflict(
        emulator: EmbeddedEmulator, device: PahoDevice) -> None:
    # spec fleet §3.3, edge case 15: FAIL → ResourceConflictsException
    template = create_template(emulator, fleet_template(overrides={"AttributePayload": "FAIL"}))
    serial = unique("sn")
    registry_of(emulator).create_thing(thing_name=f"dev-{serial}")
    answer, _ = attempt(emulator, device, template, parameters={"SerialNumber": serial})
    rejected(answer, protocol.RESOURCE_CONFLICTS_STATUS, protocol.RESOURCE_CONFLICTS_CODE)


def test_an_evaluation_failure_rolls_back_every_write(emulator: EmbeddedEmulator,
                                                      device: PahoDevice) -> None:
    # design principle 5 / task: one transaction; a failure late in it leaves nothing
    # (the thing is created first, then attaching an eleventh policy fails the limit)
    policies = [unique("p") for _ in range(11)]
    for name in policies:
        registry_of(emulator).create_policy(policy_name=name, policy_document=json.dumps(
            {"Version": "2012-10-17", "Statement": [
                {"Effect": "Allow", "Action": "iot:Connect", "Resource": "*"}]}))
    body = fleet_template()
    body["Resources"].pop("policy")
    for i, name in enumerate(policies):
        body["Resources"][f"policy{i}"] = {"Type": "AWS::IoT::Policy",
                                           "Properties": {"PolicyName": name}}
    template = create_template(emulator, body)
    answer, _ = attempt(emulator, device, template)
    rejected(answer, 400, protocol.INVALID_PARAMETERS_CODE)


# -- pre-provisioning hooks (§4) ------------------------------------------------------------------

@pytest.mark.parametrize("hook, reason", [
    ("deny_hook", "denied"),
    ("silent_hook", "denied"),
    ("failing_hook", "error: "),
    ("garbage_hook", "malformed answer: "),
])
def test_a_hook_that_does_not_allow_rejects_the_registration(
        emulator: EmbeddedEmulator, device: PahoDevice, hook: str, reason: str) -> None:
    # spec fleet §4: deny, error, malformed answer or no allowProvisioning → 403
    arn = f"{HOOK_ARN}-{unique(hook)}"
    emulator.emulator.hook_targets.set(arn, f"python:{HERE}:{hook}")
    template = create_template(emulator, fleet_template(), hook_arn=arn)
    answer, certificate_id = attempt(emulator, device, template)
    rejected(answer, 403, protocol.ACCESS_DENIED_CODE)
    (seen,) = emulator.emulator.observations.query(kinds=[Kind.HOOK.value],
                                                   certificate_id=certificate_id)
    assert seen.detail["reason"].startswith(reason) and seen.detail["allowed"] is False
    assert "BEGIN CERTIFICATE" not in json.dumps(seen.detail)


def test_a_hook_that_times_out_rejects_the_registration(emulator: EmbeddedEmulator,
                                                        device: PahoDevice) -> None:
    # spec fleet §4: no answer within AWS's limit (5 s; shortened here) → 403
    arn = f"{HOOK_ARN}-{unique('slow')}"
    emulator.emulator.hook_targets.set(arn, f"python:{HERE}:slow_hook")
    template = create_template(emulator, fleet_template(), hook_arn=arn)
    hooks = service_of(emulator).hooks
    saved, hooks.timeout = hooks.timeout, 0.2
    try:
        answer, certificate_id = attempt(emulator, device, template)
    finally:
        hooks.timeout = saved
    rejected(answer, 403, protocol.ACCESS_DENIED_CODE)
    (seen,) = emulator.emulator.observations.query(kinds=[Kind.HOOK.value],
                                                   certificate_id=certificate_id)
    assert seen.detail["reason"] == REASON_TIMEOUT


def test_a_hook_arn_mapped_to_nothing_is_rejected_clearly(emulator: EmbeddedEmulator,
                                                          device: PahoDevice) -> None:
    # task: a template whose hook ARN maps to nothing rejects registrations clearly
    arn = f"{HOOK_ARN}-{unique('unmapped')}"
    template = create_template(emulator, fleet_template(), hook_arn=arn)
    answer, _ = attempt(emulator, device, template)
    error = rejected(answer, 403, protocol.ACCESS_DENIED_CODE)
    assert arn in error.error_message and "not mapped" in error.error_message


# -- what the caller's policy does not allow (§1.1, §1.5, edge case 12) -------------------------

def test_the_guides_claim_policy_does_not_grant_create_from_csr(
        emulator: EmbeddedEmulator, tmp_path: Path) -> None:
    # spec fleet §1.1/edge case 12: create/* does not cover create-from-csr; an unauthorized
    # publish closes a 3.1.1 connection (broker §1.9), no rejected payload
    template = create_template(emulator, fleet_template())
    document = protocol.claim_policy_document(template, csr=False)
    device = PahoDevice(emulator, factory_claim(emulator, tmp_path, template, document),
                        unique("claim"))
    try:
        with pytest.raises(Refused):
            device.call(Api.CREATE_CERTIFICATE_FROM_CSR, "json", b"{}")
    finally:
        device.close()


def test_a_payload_format_the_policy_does_not_allow_gets_puback_0x87_on_mqtt5(
        emulator: EmbeddedEmulator, tmp_path: Path) -> None:
    # spec broker §1.9: MQTT 5 QoS 1 unauthorized publish → PUBACK 0x87, no answer
    template = create_template(emulator, fleet_template())
    arn = f"arn:aws:iot:{REGION}:{ACCOUNT}:"
    json_only = {"Version": "2012-10-17", "Statement": [
        {"Effect": "Allow", "Action": "iot:Connect", "Resource": "*"},
        {"Effect": "Allow", "Action": ["iot:Publish", "iot:Receive"],
         "Resource": f"{arn}topic/$aws/certificates/create/json*"},
        {"Effect": "Allow", "Action": "iot:Subscribe",
         "Resource": f"{arn}topicfilter/$aws/certificates/create/*"}]}
    before = account_state(emulator)
    device = PahoDevice(emulator, factory_claim(emulator, tmp_path, template, json_only),
                        unique("claim"), version=5)
    try:
        device.subscribe(*protocol.subscription_filters(Api.CREATE_KEYS_AND_CERTIFICATE, "cbor"))
        assert device.publish(protocol.create_keys_topic("cbor"), b"") == 0x87
        with pytest.raises(TimeoutError):
            device.expect(timeout=0.3)
        answer = device.call(Api.CREATE_KEYS_AND_CERTIFICATE, "json", b"{}")
    finally:
        device.close()
    assert not isinstance(answer, ErrorResponse), answer
    assert len(account_state(emulator)["certificates"] - before["certificates"]) == 2  # +claim


def test_without_receive_the_answer_is_silently_not_delivered(
        emulator: EmbeddedEmulator, tmp_path: Path) -> None:
    # spec fleet §1.1 UNCONFIRMED: the reply is subject to the requester's iot:Receive
    template = create_template(emulator, fleet_template())
    arn = f"arn:aws:iot:{REGION}:{ACCOUNT}:"
    no_receive = {"Version": "2012-10-17", "Statement": [
        {"Effect": "Allow", "Action": "iot:Connect", "Resource": "*"},
        {"Effect": "Allow", "Action": "iot:Publish",
         "Resource": f"{arn}topic/$aws/certificates/create-from-csr/*"},
        {"Effect": "Allow", "Action": "iot:Subscribe",
         "Resource": f"{arn}topicfilter/$aws/certificates/create-from-csr/*"}]}
    device = PahoDevice(emulator, factory_claim(emulator, tmp_path, template, no_receive),
                        unique("claim"))
    try:
        device.subscribe(*protocol.subscription_filters(Api.CREATE_CERTIFICATE_FROM_CSR, "json"))
        request = protocol.CreateCertificateFromCsrRequest(pki.make_csr(pki.generate_ec_key()))
        device.publish(protocol.create_from_csr_topic("json"), protocol.encode(request, "json"))
        with pytest.raises(TimeoutError):
            device.expect(timeout=0.5)
        assert not device.disconnected.is_set()
    finally:
        device.close()


def test_a_jitp_template_is_rejected_on_the_mqtt_topic(emulator: EmbeddedEmulator,
                                                       device: PahoDevice) -> None:
    # spec fleet §3.6 / open question 12 (UNCONFIRMED, 400)
    name = unique("jitp")
    registry_of(emulator).create_provisioning_template(
        template_name=name, template_body=json.dumps(fleet_template()),
        provisioning_role_arn="arn:aws:iam::123456789012:role/provisioning-role", type="JITP",
        enabled=True)
    answer, _ = attempt(emulator, device, name)
    rejected(answer, protocol.TEMPLATE_WRONG_TYPE_STATUS, protocol.INVALID_REQUEST_CODE)
