"""Pre-provisioning hooks: allow with ``parameterOverrides``, deny, fail, garbage, timeout.

AWS runs the template's Lambda before RegisterThing creates anything (spec fleet §4).
The emulator maps the Lambda ARN to a function of ``scenarios/hooks.py``; against AWS a
real Lambda would be needed, so these scenarios are ``emulator_only``. The verdict: the
hook's own record in the endpoint's log (allowed, why not), the rejection the device got,
and the registry: the overrides visibly on the thing, or nothing left behind.
"""

from __future__ import annotations

from typing import Any

import pytest

from devices.base import Flow
from harness import protocol
from harness.emulator.hooks import (
    ERROR_PREFIX,
    MALFORMED_PREFIX,
    REASON_DENIED,
    REASON_TIMEOUT,
)
from harness.observations import Kind
from harness.observer import StepKind
from scenarios.conftest import FleetMaker, HookArns, Provision, Registry, device_policy_name
from scenarios.hooks import HOOK_LOCATION

pytestmark = pytest.mark.emulator_only


def hook_template(prefix: str) -> dict[str, Any]:
    """Thing ``<prefix>-<SerialNumber>`` whose attributes and device configuration show the
    parameters after the hook: ``Location`` (device value, then the hook's), and the hook's
    view of the request (claim, new certificate, client id, template)."""
    return {
        "Parameters": {
            "SerialNumber": {"Type": "String"},
            "Location": {"Type": "String", "Default": "unknown"},
            "HookClaim": {"Type": "String", "Default": "not-set"},
            "HookCertificate": {"Type": "String", "Default": "not-set"},
            "HookClient": {"Type": "String", "Default": "not-set"},
            "HookTemplate": {"Type": "String", "Default": "not-set"},
        },
        "Resources": {
            "thing": {"Type": "AWS::IoT::Thing", "Properties": {
                "ThingName": {"Fn::Join": ["-", [prefix, {"Ref": "SerialNumber"}]]},
                "AttributePayload": {"location": {"Ref": "Location"},
                                     "hookClaim": {"Ref": "HookClaim"},
                                     "hookCertificate": {"Ref": "HookCertificate"}}}},
            "certificate": {"Type": "AWS::IoT::Certificate", "Properties": {
                "CertificateId": {"Ref": "AWS::IoT::Certificate::Id"}, "Status": "ACTIVE"}},
            "policy": {"Type": "AWS::IoT::Policy",
                       "Properties": {"PolicyName": device_policy_name(prefix)}},
        },
        "DeviceConfiguration": {"hookClient": {"Ref": "HookClient"},
                                "hookTemplate": {"Ref": "HookTemplate"}},
    }


@pytest.mark.parametrize("flow", list(Flow), ids=lambda f: f.value)
def test_an_allowing_hook_sees_the_request_and_its_overrides_land_on_the_thing(
        flow: Flow, make_fleet: FleetMaker, hook_arn: HookArns, claim_for: Any,
        device_factory: Any, provision: Provision, registry: Registry) -> None:
    # spec fleet §4 (input event, allowProvisioning, parameterOverrides win), §2.2 (the
    # hook runs for trusted-user claims too; claimCertificateId is the temporary claim's)
    fleet = make_fleet(hook_template, device_policy=True,
                       hook_arn=hook_arn("allow_with_overrides"))
    claim = claim_for(flow, of=fleet)
    inputs = device_factory.inputs(claim, template_name=fleet.template_name,
                                   parameters={"Location": "said-by-device"})
    run = provision(device_factory(), inputs)

    certificate_id = run.assert_provisioned()
    thing_name = f"{fleet.prefix}-{inputs.serial}"
    assert run.trace.thing_name == thing_name
    (hook,) = provision.events(run, certificate_id=certificate_id, kind=Kind.HOOK)
    assert hook.detail["allowed"] is True
    thing = registry.thing(thing_name)
    assert thing is not None
    assert thing.attributes == {"location": HOOK_LOCATION, "hookClaim": claim.certificate_id,
                                "hookCertificate": certificate_id}
    assert thing.certificates == {certificate_id}
    cert = registry.certificate(certificate_id)
    assert cert is not None and cert.status == "ACTIVE"
    assert cert.policies == {device_policy_name(fleet.prefix)}
    assert dict(run.result.device_configuration) == {
        "hookClient": inputs.client_id, "hookTemplate": fleet.template_arn}


@pytest.mark.parametrize(("function", "reason"), [
    ("deny", REASON_DENIED),
    ("fail", ERROR_PREFIX),
    ("garbage", MALFORMED_PREFIX),
    ("never_answers", REASON_TIMEOUT),
], ids=["denies", "fails", "answers-garbage", "times-out"])
def test_a_hook_that_does_not_allow_rejects_registration_and_nothing_is_created(
        function: str, reason: str, make_fleet: FleetMaker, hook_arn: HookArns,
        device_factory: Any, provision: Provision, registry: Registry) -> None:
    # spec fleet §4: deny, Lambda error, an answer without allowProvisioning and no answer
    # within 5 s all fail RegisterThing (403 AccessDenied, §1.5); the new certificate stays
    # PENDING_ACTIVATION (§1.6) and no thing or policy is made
    fleet = make_fleet(hook_template, device_policy=True, hook_arn=hook_arn(function))
    inputs = device_factory.inputs(fleet.create_claim(), template_name=fleet.template_name)
    run = provision(device_factory(), inputs, snapshot=True)

    error = run.result.error
    assert error is not None and (error.status_code, error.error_code) == \
        (protocol.STATUS_FORBIDDEN, protocol.ACCESS_DENIED_CODE)
    rejections = run.trace.rejections
    assert [(r.api, r.status_code, r.error_code) for r in rejections] == [
        (protocol.Api.REGISTER_THING.value, protocol.STATUS_FORBIDDEN,
         protocol.ACCESS_DENIED_CODE)]
    assert not run.trace.has(StepKind.THING_REGISTERED)
    (certificate_id,) = run.created_certificates
    (hook,) = provision.events(run, certificate_id=certificate_id, kind=Kind.HOOK)
    assert hook.detail["allowed"] is False
    assert str(hook.detail["reason"]).startswith(reason)
    cert = registry.certificate(certificate_id)
    assert cert is not None and cert.status == "PENDING_ACTIVATION"
    registry.assert_left_nothing(run, thing_name=f"{fleet.prefix}-{inputs.serial}")
