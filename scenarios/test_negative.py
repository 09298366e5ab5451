"""Requests AWS refuses: each is rejected with AWS's error and leaves nothing behind.

Unknown and disabled templates, missing and ill-typed parameters, bad CSRs (garbage,
wrong signature, weak key), wrong, empty, reused and expired ownership tokens, an expired
temporary claim, and a trusted-user device that registers more than five minutes after
connecting (spec fleet §1.5 error catalogue). The verdict: the ``rejected`` answer the
endpoint logged (emulator) and the device received, and the registry afterwards: no
thing, no ACTIVE certificate, no policy (RegisterThing is one transaction, §1.4).

Scenarios that move the emulator's clock are ``emulator_only``.
"""

from __future__ import annotations

import json
from typing import Any

import pytest

from devices.base import CertApi, Flow, Step
from devices.virtual import CsrFault, PayloadFault, StepControl, TokenFault
from harness import protocol
from harness.fleet import Fleet
from harness.observer import StepKind
from harness.protocol import Api, PayloadFormat
from scenarios.conftest import FleetMaker, Outcome, Provision, Registry

#: The claim and trusted-user windows (spec fleet §2.2) and one second more.
FIVE_MINUTES_AND_A_BIT_S = 301.0


def assert_rejected(run: Outcome, api: Api, status: int, code: str,
                    message: str | None = None) -> None:
    """The device was refused ``api`` with ``status``/``code``: the device says so, and so
    does the endpoint where it reports rejections (the emulator; AWS does not)."""
    error = run.result.error
    assert error is not None, run.result.to_json(indent=2)
    assert (error.status_code, error.error_code) == (status, code)
    if message is not None:
        assert error.error_message == message
    if run.trace.source == "emulator":
        assert [(r.api, r.status_code, r.error_code) for r in run.trace.rejections] == \
            [(api.value, status, code)]


# --------------------------------------------------------------------------- templates


def test_registering_with_an_unknown_template_is_rejected_with_404(
        make_fleet: FleetMaker, endpoint: Any, make_device: Any, device_factory: Any,
        provision: Provision, registry: Registry) -> None:
    # spec fleet §1.5 / edge case 6: an unknown template is a 404 on that template's
    # rejected topic. The claim policy must allow the topic, or the broker closes the
    # connection instead (edge case 12), so this claim may use any of the fleet's names.
    fleet = make_fleet()
    claim = fleet.create_claim()
    wide = f"{fleet.prefix}-claim-any"
    endpoint.iot.create_policy(policyName=wide, policyDocument=json.dumps(
        protocol.claim_policy_document(f"{fleet.prefix}-*", region=endpoint.region,
                                       account_id=endpoint.account_id)))
    arn = registry.certificate(claim.certificate_id).arn  # type: ignore[union-attr]
    endpoint.iot.attach_policy(policyName=wide, target=arn)
    missing = f"{fleet.prefix}-missing"
    device = make_device(control=StepControl(template_name=missing))
    inputs = device_factory.inputs(claim, template_name=fleet.template_name)
    run = provision(device, inputs, snapshot=True)

    assert_rejected(run, Api.REGISTER_THING, protocol.STATUS_NOT_FOUND,
                    protocol.RESOURCE_NOT_FOUND_CODE)
    registry.assert_left_nothing(run, thing_name=fleet.thing_name(inputs.serial))


def test_registering_with_a_disabled_template_is_rejected(
        make_fleet: FleetMaker, device_factory: Any, provision: Provision,
        registry: Registry) -> None:
    # spec fleet §3.6: templates may be disabled; RegisterThing on one fails (§1.5: status
    # and errorCode UNCONFIRMED, harness.protocol.TEMPLATE_DISABLED_STATUS / INVALID_REQUEST)
    fleet = make_fleet(enabled=False)
    inputs = device_factory.inputs(fleet.create_claim(), template_name=fleet.template_name)
    run = provision(device_factory(), inputs, snapshot=True)

    assert_rejected(run, Api.REGISTER_THING, protocol.TEMPLATE_DISABLED_STATUS,
                    protocol.INVALID_REQUEST_CODE)
    registry.assert_left_nothing(run, thing_name=fleet.thing_name(inputs.serial))


# --------------------------------------------------------------------------- parameters


def test_a_missing_parameter_the_template_needs_is_rejected(
        fleet: Fleet, make_device: Any, device_factory: Any, provision: Provision,
        registry: Registry) -> None:
    # spec fleet §3.1 / §3.7: a Ref to a parameter without a value is a provision-time
    # 400 (errorCode UNCONFIRMED: harness.protocol.INVALID_PARAMETERS_CODE)
    device = make_device(serial_parameter=None)  # the device sends no SerialNumber
    inputs = device_factory.inputs(fleet.create_claim(), parameters={})
    run = provision(device, inputs, snapshot=True)

    assert_rejected(run, Api.REGISTER_THING, protocol.STATUS_BAD_REQUEST,
                    protocol.INVALID_PARAMETERS_CODE)
    registry.assert_left_nothing(run, thing_name=fleet.thing_name(inputs.serial))


MALFORMED = {
    "register-parameters-not-a-map": ("register", PayloadFault.WRONG_FIELD_TYPES),
    "register-not-decodable": ("register", PayloadFault.NOT_DECODABLE),
    "certificate-request-not-an-object": ("certificate", PayloadFault.NOT_AN_OBJECT),
}


@pytest.mark.parametrize("payload_format", list(PayloadFormat), ids=lambda f: f.value)
@pytest.mark.parametrize("case", sorted(MALFORMED))
def test_an_ill_typed_or_malformed_request_is_rejected(
        case: str, payload_format: PayloadFormat, fleet: Fleet, make_device: Any,
        device_factory: Any, provision: Provision, registry: Registry) -> None:
    # spec fleet §1.4 (parameters is a map of strings), §1.5 / §7 (malformed JSON or CBOR:
    # 400, errorCode UNCONFIRMED: harness.protocol.INVALID_PAYLOAD_CODE)
    where, fault = MALFORMED[case]
    if where == "register":
        control = StepControl(malformed_register_request=fault)
        api = Api.REGISTER_THING
    else:
        control = StepControl(malformed_certificate_request=fault)
        api = Api.CREATE_KEYS_AND_CERTIFICATE
    inputs = device_factory.inputs(fleet.create_claim(), payload_format=payload_format)
    run = provision(make_device(control=control), inputs, snapshot=True)

    assert_rejected(run, api, protocol.STATUS_BAD_REQUEST, protocol.INVALID_PAYLOAD_CODE)
    registry.assert_left_nothing(run, thing_name=fleet.thing_name(inputs.serial))


# --------------------------------------------------------------------------- CSRs


@pytest.mark.parametrize("fault", [CsrFault.GARBAGE, CsrFault.BAD_SIGNATURE, CsrFault.WEAK_KEY],
                         ids=lambda f: f.value)
def test_a_bad_csr_is_rejected_and_no_certificate_is_made(
        fault: CsrFault, fleet: Fleet, make_device: Any, device_factory: Any,
        provision: Provision, registry: Registry) -> None:
    # spec fleet §1.3: RSA ≥ 2048 or EC P-256/384/521 with a valid self-signature; §1.5:
    # 400 (errorCode UNCONFIRMED: harness.protocol.INVALID_CSR_CODE)
    inputs = device_factory.inputs(fleet.create_claim(), cert_api=CertApi.CSR)
    run = provision(make_device(control=StepControl(csr_fault=fault)), inputs, snapshot=True)

    assert_rejected(run, Api.CREATE_CERTIFICATE_FROM_CSR, protocol.STATUS_BAD_REQUEST,
                    protocol.INVALID_CSR_CODE)
    assert not run.trace.has(StepKind.CERTIFICATE_CREATED)
    assert run.result.certificate_id is None
    registry.assert_left_nothing(run, thing_name=fleet.thing_name(inputs.serial))


# --------------------------------------------------------------------------- ownership tokens


@pytest.mark.parametrize("fault", [TokenFault.WRONG, TokenFault.EMPTY], ids=lambda f: f.value)
def test_a_wrong_or_empty_ownership_token_is_rejected(
        fault: TokenFault, fleet: Fleet, make_device: Any, device_factory: Any,
        provision: Provision, registry: Registry) -> None:
    # spec fleet §1.5 / §1.6 / edge case 5: 400 InvalidCertificateOwnershipToken (the empty
    # token's message is observed exactly); the certificate stays PENDING_ACTIVATION
    inputs = device_factory.inputs(fleet.create_claim())
    run = provision(make_device(control=StepControl(token_fault=fault)), inputs, snapshot=True)

    message = protocol.TOKEN_EMPTY_MESSAGE if fault is TokenFault.EMPTY else None
    assert_rejected(run, Api.REGISTER_THING, protocol.STATUS_BAD_REQUEST,
                    protocol.INVALID_TOKEN_CODE, message)
    (certificate_id,) = run.created_certificates
    cert = registry.certificate(certificate_id)
    assert cert is not None and cert.status == "PENDING_ACTIVATION"
    registry.assert_left_nothing(run, thing_name=fleet.thing_name(inputs.serial))


def test_a_reused_ownership_token_is_rejected_and_changes_nothing(
        fleet: Fleet, make_device: Any, device_factory: Any, provision: Provision,
        registry: Registry) -> None:
    # spec fleet §1.6: reuse after a successful RegisterThing is refused (UNCONFIRMED;
    # 400 InvalidCertificateOwnershipToken); the first registration stands, once
    inputs = device_factory.inputs(fleet.create_claim())
    run = provision(make_device(control=StepControl(token_fault=TokenFault.REUSED)), inputs)

    assert_rejected(run, Api.REGISTER_THING, protocol.STATUS_BAD_REQUEST,
                    protocol.INVALID_TOKEN_CODE)
    assert len(run.trace.of(StepKind.THING_REGISTERED)) == 1
    thing = registry.thing(fleet.thing_name(inputs.serial))
    assert thing is not None
    (certificate_id,) = run.created_certificates
    assert thing.certificates == {certificate_id}
    cert = registry.certificate(certificate_id)
    assert cert is not None and cert.status == "ACTIVE" and len(cert.policies) == 1


@pytest.mark.emulator_only
def test_an_expired_ownership_token_is_rejected_and_its_certificate_removed(
        fleet: Fleet, clock: Any, make_device: Any, device_factory: Any,
        provision: Provision, registry: Registry) -> None:
    # spec fleet §1.6: RegisterThing within one hour of issue; afterwards the token is
    # refused (400 InvalidCertificateOwnershipToken) and the unused certificate deleted
    control = StepControl(token_fault=TokenFault.EXPIRED, advance_clock=clock.advance)
    inputs = device_factory.inputs(fleet.create_claim())
    run = provision(make_device(control=control), inputs, snapshot=True)

    assert_rejected(run, Api.REGISTER_THING, protocol.STATUS_BAD_REQUEST,
                    protocol.INVALID_TOKEN_CODE)
    (certificate_id,) = run.created_certificates
    assert registry.certificate(certificate_id) is None
    registry.assert_left_nothing(run, thing_name=fleet.thing_name(inputs.serial))


# --------------------------------------------------------------------------- temporary claims


@pytest.mark.emulator_only
def test_an_expired_temporary_claim_cannot_connect(
        trusted_user: Any, clock: Any, fleet: Fleet, device_factory: Any,
        provision: Provision, registry: Registry) -> None:
    # spec fleet §2.2: a trusted user's claim is valid five minutes; afterwards connections
    # with it are refused (spec broker §1.9: no CONNACK, connect_failed)
    claim = trusted_user.claim()
    clock.advance(FIVE_MINUTES_AND_A_BIT_S)
    inputs = device_factory.inputs(claim)
    run = provision(device_factory(), inputs, snapshot=True)

    assert not run.result.ok and run.result.error is None
    connect = run.result.step(Step.CONNECT_CLAIM)
    assert connect is not None and not connect.ok
    trace = provision.wait(run, lambda t: t.has(StepKind.CONNECT_FAILED))
    assert not trace.has(StepKind.CONNECTED)
    failed = trace.first(StepKind.CONNECT_FAILED)
    assert failed is not None and failed.certificate_id == claim.certificate_id
    registry.assert_left_nothing(run, thing_name=fleet.thing_name(inputs.serial))


@pytest.mark.emulator_only
def test_a_trusted_user_device_registering_after_five_minutes_is_rejected(
        trusted_user: Any, clock: Any, fleet: Fleet, make_device: Any, device_factory: Any,
        provision: Provision, registry: Registry) -> None:
    # spec fleet §2.2: the device must finish within five minutes of connecting with the
    # temporary claim (UNCONFIRMED form: 403 AccessDenied, harness.emulator.provisioning)
    def late(step: Step) -> None:
        if step is Step.REGISTER_THING:
            clock.advance(FIVE_MINUTES_AND_A_BIT_S)

    inputs = device_factory.inputs(trusted_user.claim())
    assert inputs.flow is Flow.TRUSTED_USER
    run = provision(make_device(control=StepControl(before_step=late)), inputs, snapshot=True)

    assert_rejected(run, Api.REGISTER_THING, protocol.STATUS_FORBIDDEN,
                    protocol.ACCESS_DENIED_CODE)
    assert run.trace.has(StepKind.CERTIFICATE_CREATED)  # within the window, it worked
    registry.assert_left_nothing(run, thing_name=fleet.thing_name(inputs.serial))
