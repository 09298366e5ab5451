"""Provisioning templates: what a template says is what the endpoint holds afterwards.

Attributes from parameters, ``Fn::Join`` / ``Fn::Sub`` names, ``Fn::FindInMap`` lookups,
``Fn::Select`` / ``Fn::Split`` on certificate fields, thing type, groups and billing
group, policies by name and inline, device configuration, parameter defaults, the
certificate's own fields, re-provisioning under each ``OverrideSettings`` value, and
templates AWS does not support refused at creation (spec fleet §3).

Each scenario gets a fleet of its own (``make_fleet``) whose template names things
``<fleet prefix>-...`` and attaches the fleet's named device policy, so the device can
reconnect and publish once provisioned.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest
from botocore.exceptions import ClientError

from devices.base import CertApi
from harness import protocol
from harness.fleet import Fleet
from scenarios.conftest import (
    SERIAL,
    FleetMaker,
    Outcome,
    Provision,
    Registry,
    device_policy_name,
    template,
)


def run_on(fleet: Fleet, device_factory: Any, provision: Provision, **inputs: Any) -> Outcome:
    """Provision one device of this test's kind through ``fleet``'s template."""
    made = device_factory.inputs(fleet.create_claim(), template_name=fleet.template_name,
                                 **inputs)
    return provision(device_factory(), made, snapshot=True)


def provisioned_thing(run: Outcome, registry: Registry, thing_name: str) -> Any:
    """The endpoint saw the whole flow end on ``thing_name``; the registry has that thing
    with the new certificate ACTIVE on it."""
    certificate_id = run.assert_provisioned()
    assert run.trace.thing_name == thing_name
    thing = registry.thing(thing_name)
    assert thing is not None
    assert certificate_id in thing.certificates
    cert = registry.certificate(certificate_id)
    assert cert is not None and cert.status == "ACTIVE"
    return thing


def assert_refused(run: Outcome, status: int, code: str) -> None:
    """The device got ``status``/``code`` on a rejected topic, and the endpoint says so
    too where it can (AWS does not report rejections to observers)."""
    error = run.result.error
    assert error is not None, run.result.to_json(indent=2)
    assert (error.status_code, error.error_code) == (status, code)
    if run.trace.source == "emulator":
        assert [(r.status_code, r.error_code) for r in run.trace.rejections] == [(status, code)]


# --------------------------------------------------------------------------- names, attributes


NAMES = {
    "join": lambda prefix: {"Fn::Join": ["-", [prefix, SERIAL]]},
    "sub": lambda prefix: {"Fn::Sub": f"{prefix}-${{SerialNumber}}"},
}


@pytest.mark.parametrize("naming", sorted(NAMES))
def test_attributes_come_from_parameters_and_the_name_from_join_or_sub(
        naming: str, make_fleet: FleetMaker, device_factory: Any, provision: Provision,
        registry: Registry) -> None:
    # spec fleet §3.1 (parameters), §3.2 (AttributePayload), §3.5 (Fn::Join, Fn::Sub, Ref);
    # undeclared device parameters are ignored (§1.4, observed)
    fleet = make_fleet(lambda prefix: template(prefix, {
        "ThingName": NAMES[naming](prefix),
        "AttributePayload": {"model": {"Ref": "Model"}, "firmware": {"Ref": "Firmware"},
                             "label": {"Fn::Sub": "${Model}/${Firmware}"}},
    }, parameters={"Model": {"Type": "String"}, "Firmware": {"Type": "String"}}),
        device_policy=True)
    run = run_on(fleet, device_factory, provision, parameters={
        "Model": "mk2", "Firmware": "1.4.0", "Undeclared": "ignored"})

    thing = provisioned_thing(run, registry, f"{fleet.prefix}-{run.inputs.serial}")
    assert thing.attributes == {"model": "mk2", "firmware": "1.4.0", "label": "mk2/1.4.0"}


def test_find_in_map_looks_up_attributes_and_device_configuration(
        make_fleet: FleetMaker, device_factory: Any, provision: Provision,
        registry: Registry) -> None:
    # spec fleet §3.1 (Mappings), §3.5 (Fn::FindInMap in resources and DeviceConfiguration)
    lookup = {"Fn::FindInMap": ["Sites", {"Ref": "Site"}, "Tier"]}
    fleet = make_fleet(lambda prefix: template(prefix, {
        "AttributePayload": {"site": {"Ref": "Site"}, "tier": lookup}},
        parameters={"Site": {"Type": "String"}},
        mappings={"Sites": {"berlin": {"Tier": "gold", "Broker": "eu.example.com"},
                            "austin": {"Tier": "silver", "Broker": "us.example.com"}}},
        configuration={"broker": {"Fn::FindInMap": ["Sites", {"Ref": "Site"}, "Broker"]}}),
        device_policy=True)
    run = run_on(fleet, device_factory, provision, parameters={"Site": "austin"})

    thing = provisioned_thing(run, registry, f"{fleet.prefix}-{run.inputs.serial}")
    assert thing.attributes == {"site": "austin", "tier": "silver"}
    assert dict(run.result.device_configuration) == {"broker": "us.example.com"}


def test_a_lookup_of_a_key_the_map_lacks_is_rejected_and_creates_nothing(
        make_fleet: FleetMaker, device_factory: Any, provision: Provision,
        registry: Registry) -> None:
    # spec fleet §3.5 / §3.7: a missing map key is a provision-time error (400; errorCode
    # UNCONFIRMED, harness.protocol.INVALID_PARAMETERS_CODE); §1.4: nothing is written
    fleet = make_fleet(lambda prefix: template(prefix, {
        "AttributePayload": {"tier": {"Fn::FindInMap": ["Sites", {"Ref": "Site"}, "Tier"]}}},
        parameters={"Site": {"Type": "String"}},
        mappings={"Sites": {"berlin": {"Tier": "gold"}}}), device_policy=True)
    run = run_on(fleet, device_factory, provision, parameters={"Site": "atlantis"})

    assert_refused(run, protocol.STATUS_BAD_REQUEST, protocol.INVALID_PARAMETERS_CODE)
    registry.assert_left_nothing(run, thing_name=f"{fleet.prefix}-{run.inputs.serial}")


# --------------------------------------------------------------------------- certificate fields


@pytest.mark.parametrize("declared", [True, False], ids=["declared", "undeclared"])
@pytest.mark.parametrize("cert_api", list(CertApi), ids=lambda c: c.value)
def test_the_certificates_own_id_is_a_parameter(
        cert_api: CertApi, declared: bool, make_fleet: FleetMaker, device_factory: Any,
        provision: Provision, registry: Registry) -> None:
    # spec fleet §3.4 and edge case 9: AWS::IoT::Certificate::Id is the provisioned
    # certificate's id, declared in Parameters or not
    parameters = {"AWS::IoT::Certificate::Id": {"Type": "String"}} if declared else {}
    fleet = make_fleet(lambda prefix: template(prefix, {
        "AttributePayload": {"certificate": {"Ref": "AWS::IoT::Certificate::Id"}}},
        parameters=parameters), device_policy=True)
    run = run_on(fleet, device_factory, provision, cert_api=cert_api)

    thing = provisioned_thing(run, registry, f"{fleet.prefix}-{run.inputs.serial}")
    assert thing.attributes == {"certificate": run.trace.certificate_id}


def test_select_and_split_take_apart_the_certificate_common_name(
        make_fleet: FleetMaker, device_factory: Any, provision: Provision,
        registry: Registry) -> None:
    # spec fleet §3.4 (AWS::IoT::Certificate::CommonName from the CSR's subject; UNCONFIRMED
    # for fleet provisioning on AWS), §3.5 (Fn::Split, Fn::Select), §1.3 (CSR subject kept)
    common_name = {"Ref": "AWS::IoT::Certificate::CommonName"}
    part = lambda index: {"Fn::Select": [index, {"Fn::Split": [".", common_name]}]}  # noqa: E731
    fleet = make_fleet(lambda prefix: template(prefix, {
        "ThingName": {"Fn::Join": ["-", [prefix, part(1)]]},
        "AttributePayload": {"model": part(0)},
    }), device_policy=True)
    claim = fleet.create_claim()
    serial = f"mk3.{claim.certificate_id[:10]}"  # the device puts its serial in its CSR's CN
    run = run_on(fleet, device_factory, provision, serial=serial, client_id=serial,
                 cert_api=CertApi.CSR)

    thing = provisioned_thing(run, registry, f"{fleet.prefix}-{serial.split('.')[1]}")
    assert thing.attributes == {"model": "mk3"}


# --------------------------------------------------------------------------- type, groups, policies


def test_thing_type_groups_and_billing_group_come_from_the_template(
        make_fleet: FleetMaker, device_factory: Any, provision: Provision,
        registry: Registry) -> None:
    # spec fleet §3.2: ThingTypeName, ThingGroups and BillingGroup reference existing ones
    fleet = make_fleet(lambda prefix: template(prefix, {
        "ThingTypeName": f"{prefix}-widget",
        "ThingGroups": [f"{prefix}-east", f"{prefix}-beta"],
        "BillingGroup": f"{prefix}-prepaid",
    }), device_policy=True, thing_types=("widget",), thing_groups=("east", "beta"),
        billing_groups=("prepaid",))
    run = run_on(fleet, device_factory, provision)

    thing = provisioned_thing(run, registry, f"{fleet.prefix}-{run.inputs.serial}")
    assert thing.thing_type == f"{fleet.prefix}-widget"
    assert thing.groups == {f"{fleet.prefix}-east", f"{fleet.prefix}-beta"}
    assert thing.billing_group == f"{fleet.prefix}-prepaid"


def test_a_template_naming_a_thing_group_that_does_not_exist_is_rejected(
        make_fleet: FleetMaker, device_factory: Any, provision: Provision,
        registry: Registry) -> None:
    # spec fleet §3.2 / §3.7 / edge case 16: referenced groups must exist; checked when a
    # device registers (400, errorCode UNCONFIRMED), and nothing is written (§1.4)
    fleet = make_fleet(lambda prefix: template(prefix, {
        "ThingGroups": [f"{prefix}-never-created"]}), device_policy=True)
    run = run_on(fleet, device_factory, provision)

    assert_refused(run, protocol.STATUS_BAD_REQUEST, protocol.INVALID_PARAMETERS_CODE)
    registry.assert_left_nothing(run, thing_name=f"{fleet.prefix}-{run.inputs.serial}")


def test_policies_by_name_and_inline_are_both_attached_to_the_certificate(
        make_fleet: FleetMaker, device_factory: Any, provision: Provision,
        registry: Registry) -> None:
    # spec fleet §3.2: PolicyName attaches an existing policy; PolicyDocument creates one
    # (named by a hash of the document, edge case 14) and attaches it
    def body(prefix: str) -> dict[str, Any]:
        topic = {"Fn::Join": ["", ["arn:aws:iot:*:*:topic/cmd/", prefix, "-", SERIAL, "/*"]]}
        inline = {"Version": "2012-10-17", "Statement": [
            {"Effect": "Allow", "Action": ["iot:Publish", "iot:Receive"], "Resource": [topic]}]}
        return template(prefix, {}, policies={
            "named": {"PolicyName": device_policy_name(prefix)},
            "inline": {"PolicyDocument": inline}})

    fleet = make_fleet(body, device_policy=True)
    run = run_on(fleet, device_factory, provision)

    thing_name = f"{fleet.prefix}-{run.inputs.serial}"
    provisioned_thing(run, registry, thing_name)
    cert = registry.certificate(run.assert_provisioned())
    assert cert is not None
    named = device_policy_name(fleet.prefix)
    assert named in cert.policies and len(cert.policies) == 2
    (inline_name,) = cert.policies - {named}
    assert inline_name not in (run.policies_before or ())  # made by this registration
    document = registry.policy_document(inline_name)
    assert document["Statement"][0]["Resource"] == [
        f"arn:aws:iot:*:*:topic/cmd/{thing_name}/*"]


def test_device_configuration_is_returned_to_the_device(
        make_fleet: FleetMaker, device_factory: Any, provision: Provision,
        registry: Registry) -> None:
    # spec fleet §1.4 (deviceConfiguration in the accepted payload), §3.1 (DeviceConfiguration
    # with intrinsic functions), §7 (a flat string map)
    fleet = make_fleet(lambda prefix: template(prefix, {},
        parameters={"Region": {"Type": "String"}},
        mappings={"Endpoints": {"eu": {"Ota": "https://ota.eu.example.com"}}},
        configuration={
            "fallbackUrl": "https://www.example.com/setup",
            "region": {"Ref": "Region"},
            "otaUrl": {"Fn::FindInMap": ["Endpoints", {"Ref": "Region"}, "Ota"]},
            "telemetryTopic": {"Fn::Join": ["", ["dt/", prefix, "-", SERIAL, "/telemetry"]]},
            "greeting": {"Fn::Sub": "hello ${SerialNumber}"},
        }), device_policy=True)
    run = run_on(fleet, device_factory, provision, parameters={"Region": "eu"})

    thing_name = f"{fleet.prefix}-{run.inputs.serial}"
    provisioned_thing(run, registry, thing_name)
    assert dict(run.result.device_configuration) == {
        "fallbackUrl": "https://www.example.com/setup",
        "region": "eu",
        "otaUrl": "https://ota.eu.example.com",
        "telemetryTopic": f"dt/{thing_name}/telemetry",
        "greeting": f"hello {run.inputs.serial}",
    }


@pytest.mark.parametrize(("sent", "expected"), [({}, "1.0.0"), ({"Firmware": "2.1.0"}, "2.1.0")],
                         ids=["default", "sent"])
def test_a_parameter_default_fills_what_the_device_leaves_out(
        sent: dict[str, str], expected: str, make_fleet: FleetMaker, device_factory: Any,
        provision: Provision, registry: Registry) -> None:
    # spec fleet §3.1: a value passed in parameters wins, else the Default
    fleet = make_fleet(lambda prefix: template(prefix, {
        "AttributePayload": {"firmware": {"Ref": "Firmware"}}},
        parameters={"Firmware": {"Type": "String", "Default": "1.0.0"}}), device_policy=True)
    run = run_on(fleet, device_factory, provision, parameters=sent)

    thing = provisioned_thing(run, registry, f"{fleet.prefix}-{run.inputs.serial}")
    assert thing.attributes == {"firmware": expected}


# --------------------------------------------------------------------------- OverrideSettings


#: After the thing was edited to {"state": "edited", "owner": "ops"} in group "old", a
#: second registration with {"state": "fresh", "version": "2"} and group "new" leaves:
OVERRIDE_OUTCOMES: dict[str, tuple[dict[str, str], set[str]] | None] = {
    "DO_NOTHING": ({"state": "edited", "owner": "ops"}, {"old"}),
    "REPLACE": ({"state": "fresh", "version": "2"}, {"new"}),
    "MERGE": ({"state": "fresh", "owner": "ops", "version": "2"}, {"old", "new"}),
    "FAIL": None,  # ResourceConflictsException, the thing untouched
}


@pytest.mark.parametrize("override", sorted(OVERRIDE_OUTCOMES))
def test_reprovisioning_an_existing_thing_follows_its_override_settings(
        override: str, make_fleet: FleetMaker, device_factory: Any, provision: Provision,
        registry: Registry, endpoint: Any, connect_rate_pause: Any, tmp_path: Path) -> None:
    # spec fleet §3.3: DO_NOTHING keeps, REPLACE overwrites, MERGE unions (attributes and
    # groups), FAIL fails with ResourceConflictsException; older certificates stay attached
    # (UNCONFIRMED); edge case 15
    fleet = make_fleet(lambda prefix: template(prefix, {
        "AttributePayload": {"state": "fresh", "version": {"Ref": "Version"}},
        "ThingGroups": [f"{prefix}-new"],
    }, parameters={"Version": {"Type": "String"}},
        overrides={"AttributePayload": override, "ThingGroups": override}),
        device_policy=True, thing_groups=("old", "new"))
    first = run_on(fleet, device_factory, provision, parameters={"Version": "1"})
    serial = first.inputs.serial
    thing_name = f"{fleet.prefix}-{serial}"
    provisioned_thing(first, registry, thing_name)
    iot = endpoint.iot
    iot.update_thing(thingName=thing_name, attributePayload={
        "attributes": {"state": "edited", "owner": "ops"}})
    iot.update_thing_groups_for_thing(thingName=thing_name,
                                      thingGroupsToAdd=[f"{fleet.prefix}-old"],
                                      thingGroupsToRemove=[f"{fleet.prefix}-new"])
    connect_rate_pause()  # the same device again: same client ids

    # the same device after a factory reset: empty flash, a new certificate
    second = run_on(fleet, device_factory, provision, serial=serial, workdir=tmp_path / "reset",
                    parameters={"Version": "2"})
    thing = registry.thing(thing_name)
    assert thing is not None
    expected = OVERRIDE_OUTCOMES[override]
    first_cert = first.trace.certificate_id
    if expected is None:
        assert_refused(second, protocol.RESOURCE_CONFLICTS_STATUS,
                       protocol.RESOURCE_CONFLICTS_CODE)
        assert thing.attributes == {"state": "edited", "owner": "ops"}
        assert thing.groups == {f"{fleet.prefix}-old"}
        assert thing.certificates == {first_cert}
        registry.assert_left_nothing(second, thing_name=None)
        return
    attributes, groups = expected
    provisioned_thing(second, registry, thing_name)
    assert thing.attributes == attributes
    assert thing.groups == {f"{fleet.prefix}-{g}" for g in groups}
    assert thing.certificates == {first_cert, second.trace.certificate_id}


# --------------------------------------------------------------------------- refused at creation


def valid_body(prefix: str) -> dict[str, Any]:
    return template(prefix, {}, policies={"policy": {"PolicyName": f"{prefix}-any"}})


def _with(change: Any) -> Any:
    def make(prefix: str) -> dict[str, Any]:
        body = valid_body(prefix)
        change(body)
        return body
    return make


def _thing_props(body: dict[str, Any]) -> dict[str, Any]:
    return dict(body["Resources"]["thing"]["Properties"])


UNSUPPORTED = {
    "conditions-section": _with(lambda b: b.update(Conditions={
        "IsLab": {"Fn::Equals": [{"Ref": "SerialNumber"}, "lab"]}})),
    "fn-if": _with(lambda b: b["Resources"]["thing"]["Properties"].update(
        AttributePayload={"lab": {"Fn::If": ["IsLab", "yes", "no"]}})),
    "fn-getatt": _with(lambda b: b["Resources"]["thing"]["Properties"].update(
        AttributePayload={"arn": {"Fn::GetAtt": ["thing", "Arn"]}})),
    "fn-base64": _with(lambda b: b["Resources"]["thing"]["Properties"].update(
        AttributePayload={"blob": {"Fn::Base64": "x"}})),
    "unknown-resource-type": _with(lambda b: b["Resources"].update(
        job={"Type": "AWS::IoT::Job", "Properties": {}})),
    "policy-name-and-document": _with(lambda b: b["Resources"]["policy"]["Properties"].update(
        PolicyDocument={"Version": "2012-10-17", "Statement": []})),
    "nested-device-configuration": _with(lambda b: b.update(
        DeviceConfiguration={"nested": {"not": "flat"}})),
}


@pytest.mark.parametrize("case", sorted(UNSUPPORTED))
def test_a_template_using_what_aws_does_not_support_is_refused_at_creation(
        case: str, fleet: Fleet, endpoint: Any) -> None:
    # spec fleet §3.5 (undocumented functions and Conditions), §3.2 (resource types; exactly
    # one of PolicyName/PolicyDocument), §7 (flat DeviceConfiguration), §3.7 (refused at
    # creation with InvalidRequestException; UNCONFIRMED on AWS)
    iot = endpoint.iot
    name = f"{fleet.prefix}-bad-{case}"[:36]
    with pytest.raises(ClientError) as refused:
        iot.create_provisioning_template(
            templateName=name, templateBody=json.dumps(UNSUPPORTED[case](fleet.prefix)),
            provisioningRoleArn=fleet.role_arn, enabled=True)
    assert refused.value.response["Error"]["Code"] == "InvalidRequestException"
    with pytest.raises(iot.exceptions.ResourceNotFoundException):
        iot.describe_provisioning_template(templateName=name)
