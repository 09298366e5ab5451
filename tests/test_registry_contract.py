"""The registry's contract with the control plane: one method per botocore operation, named
and parameterised mechanically, whose results serialise through botocore's output shapes
(spec broker §5.3; task brief "mechanically mappable")."""

from __future__ import annotations

import datetime as dt
import inspect
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from botocore import xform_name

from harness import pki
from harness.emulator.registry import Registry
from harness.emulator.registry.validation import input_members, operation_model
from harness.errors import InvalidRequestException
from tests.test_registry_kit import (
    ALLOW_ALL,
    device_pem,
    make_ca_pem,
    make_registry,
    raises_message,
    self_signed_pem,
    verification_pem,
    wire_output,
)

#: The operations the registry owns (task brief).
EXPECTED_OPERATIONS = (
    "CreateKeysAndCertificate", "CreateCertificateFromCsr", "RegisterCertificate",
    "RegisterCertificateWithoutCA", "RegisterCACertificate", "GetRegistrationCode",
    "DescribeCertificate", "UpdateCertificate", "DeleteCertificate", "ListCertificates",
    "ListCertificatesByCA", "DescribeCACertificate", "UpdateCACertificate", "DeleteCACertificate",
    "ListCACertificates", "CreatePolicy", "GetPolicy", "DeletePolicy", "ListPolicies",
    "CreatePolicyVersion", "GetPolicyVersion", "ListPolicyVersions", "SetDefaultPolicyVersion",
    "DeletePolicyVersion", "AttachPolicy", "DetachPolicy", "ListAttachedPolicies",
    "ListTargetsForPolicy", "GetEffectivePolicies", "AttachPrincipalPolicy",
    "DetachPrincipalPolicy", "ListPrincipalPolicies", "ListPolicyPrincipals", "CreateThing",
    "DescribeThing", "UpdateThing", "DeleteThing", "ListThings", "AttachThingPrincipal",
    "DetachThingPrincipal", "ListThingPrincipals", "ListThingPrincipalsV2", "ListPrincipalThings",
    "ListPrincipalThingsV2", "CreateThingType", "DescribeThingType", "UpdateThingType",
    "DeprecateThingType", "DeleteThingType", "ListThingTypes", "CreateThingGroup",
    "DescribeThingGroup", "UpdateThingGroup", "DeleteThingGroup", "ListThingGroups",
    "AddThingToThingGroup", "RemoveThingFromThingGroup", "UpdateThingGroupsForThing",
    "ListThingsInThingGroup", "ListThingGroupsForThing", "CreateBillingGroup",
    "DescribeBillingGroup", "UpdateBillingGroup", "DeleteBillingGroup", "ListBillingGroups",
    "AddThingToBillingGroup", "RemoveThingFromBillingGroup", "ListThingsInBillingGroup",
    "CreateProvisioningTemplate", "DescribeProvisioningTemplate", "UpdateProvisioningTemplate",
    "DeleteProvisioningTemplate", "ListProvisioningTemplates", "CreateProvisioningTemplateVersion",
    "DescribeProvisioningTemplateVersion", "ListProvisioningTemplateVersions",
    "DeleteProvisioningTemplateVersion",
)

#: Output members the registry deliberately leaves out (features it does not emulate).
NOT_EMULATED = {
    "DescribeCertificate": {"previousOwnedBy", "transferData"},
    "DescribeThingGroup": {"indexName", "queryString", "queryVersion", "status"},
}


@pytest.fixture
def registry(tmp_path: Path) -> Iterator[Registry]:
    reg = make_registry(tmp_path / "registry.db")
    yield reg
    reg.close()


def test_every_expected_operation_is_a_method_named_by_xform_name() -> None:
    # task brief: method name = botocore operation name in snake_case
    operations = Registry.operations()
    assert sorted(operations) == sorted(EXPECTED_OPERATIONS)
    for operation, method in operations.items():
        assert method == xform_name(operation)


@pytest.mark.parametrize("operation", sorted(EXPECTED_OPERATIONS))
def test_parameters_are_exactly_the_input_members(operation: str) -> None:
    # task brief: keyword arguments = the operation's input members in snake_case
    method = getattr(Registry, xform_name(operation))
    params = list(inspect.signature(method).parameters.values())[1:]
    assert all(p.kind is inspect.Parameter.KEYWORD_ONLY for p in params)
    assert {p.name for p in params} == set(input_members(operation))
    shape = operation_model(operation).input_shape
    required = {xform_name(m) for m in (shape.required_members if shape else [])}
    for param in params:
        assert (param.default is inspect.Parameter.empty) == (param.name in required), param.name


def _exercise(registry: Registry) -> dict[str, Any]:
    """Call (nearly) every operation once; results by operation name."""
    r: dict[str, Any] = {}
    ca, ca_pem = make_ca_pem("Contract CA")
    r["GetRegistrationCode"] = code = registry.get_registration_code()
    r["RegisterCACertificate"] = registry.register_ca_certificate(
        ca_certificate=ca_pem, set_as_active=True,
        verification_certificate=verification_pem(ca, code.registration_code))
    ca_id = r["RegisterCACertificate"].certificate_id
    r["DescribeCACertificate"] = registry.describe_ca_certificate(certificate_id=ca_id)
    r["ListCACertificates"] = registry.list_ca_certificates()
    r["CreateKeysAndCertificate"] = registry.create_keys_and_certificate(set_as_active=True)
    r["CreateCertificateFromCsr"] = registry.create_certificate_from_csr(
        certificate_signing_request=pki.make_csr(pki.generate_ec_key()))
    r["RegisterCertificateWithoutCA"] = registry.register_certificate_without_ca(
        certificate_pem=self_signed_pem())
    r["RegisterCertificate"] = registry.register_certificate(certificate_pem=device_pem(ca))
    cert = r["CreateKeysAndCertificate"]
    r["DescribeCertificate"] = registry.describe_certificate(certificate_id=cert.certificate_id)
    r["ListCertificates"] = registry.list_certificates(page_size=1)
    r["ListCertificatesByCA"] = registry.list_certificates_by_ca(ca_certificate_id=ca_id)
    r["CreatePolicy"] = registry.create_policy(policy_name="p", policy_document=ALLOW_ALL)
    r["GetPolicy"] = registry.get_policy(policy_name="p")
    r["CreatePolicyVersion"] = registry.create_policy_version(policy_name="p",
                                                              policy_document=ALLOW_ALL)
    r["GetPolicyVersion"] = registry.get_policy_version(policy_name="p", policy_version_id="2")
    r["ListPolicyVersions"] = registry.list_policy_versions(policy_name="p")
    r["ListPolicies"] = registry.list_policies()
    registry.attach_policy(policy_name="p", target=cert.certificate_arn)
    r["ListAttachedPolicies"] = registry.list_attached_policies(target=cert.certificate_arn)
    r["ListTargetsForPolicy"] = registry.list_targets_for_policy(policy_name="p")
    r["ListPrincipalPolicies"] = registry.list_principal_policies(principal=cert.certificate_arn)
    r["ListPolicyPrincipals"] = registry.list_policy_principals(policy_name="p")
    r["CreateThingType"] = registry.create_thing_type(
        thing_type_name="kind", thing_type_properties={"thingTypeDescription": "d",
                                                       "searchableAttributes": ["a"]})
    r["DescribeThingType"] = registry.describe_thing_type(thing_type_name="kind")
    r["ListThingTypes"] = registry.list_thing_types()
    r["CreateBillingGroup"] = registry.create_billing_group(billing_group_name="bg")
    r["DescribeBillingGroup"] = registry.describe_billing_group(billing_group_name="bg")
    r["ListBillingGroups"] = registry.list_billing_groups()
    r["UpdateBillingGroup"] = registry.update_billing_group(billing_group_name="bg",
                                                            billing_group_properties={})
    r["CreateThing"] = registry.create_thing(thing_name="t", thing_type_name="kind",
                                             billing_group_name="bg",
                                             attribute_payload={"attributes": {"a": "1"}})
    r["DescribeThing"] = registry.describe_thing(thing_name="t")
    r["ListThings"] = registry.list_things()
    r["ListThingsInBillingGroup"] = registry.list_things_in_billing_group(billing_group_name="bg")
    registry.attach_thing_principal(thing_name="t", principal=cert.certificate_arn)
    r["ListThingPrincipals"] = registry.list_thing_principals(thing_name="t")
    r["ListThingPrincipalsV2"] = registry.list_thing_principals_v2(thing_name="t")
    r["ListPrincipalThings"] = registry.list_principal_things(principal=cert.certificate_arn)
    r["ListPrincipalThingsV2"] = registry.list_principal_things_v2(
        principal=cert.certificate_arn)
    r["CreateThingGroup"] = registry.create_thing_group(thing_group_name="root")
    registry.create_thing_group(thing_group_name="leaf", parent_group_name="root",
                                thing_group_properties={"thingGroupDescription": "x"})
    r["DescribeThingGroup"] = registry.describe_thing_group(thing_group_name="leaf")
    r["UpdateThingGroup"] = registry.update_thing_group(thing_group_name="leaf",
                                                        thing_group_properties={})
    r["ListThingGroups"] = registry.list_thing_groups()
    registry.add_thing_to_thing_group(thing_group_name="leaf", thing_name="t")
    r["ListThingsInThingGroup"] = registry.list_things_in_thing_group(thing_group_name="root",
                                                                      recursive=True)
    r["ListThingGroupsForThing"] = registry.list_thing_groups_for_thing(thing_name="t")
    r["GetEffectivePolicies"] = registry.get_effective_policies(principal=cert.certificate_arn,
                                                                thing_name="t")
    role = "arn:aws:iam::123456789012:role/Provisioning"
    r["CreateProvisioningTemplate"] = registry.create_provisioning_template(
        template_name="tmpl", template_body="{}", provisioning_role_arn=role,
        pre_provisioning_hook={"targetArn": "arn:aws:lambda:us-east-1:1:function:f",
                               "payloadVersion": "2020-04-01"})
    r["DescribeProvisioningTemplate"] = registry.describe_provisioning_template(
        template_name="tmpl")
    r["ListProvisioningTemplates"] = registry.list_provisioning_templates()
    r["CreateProvisioningTemplateVersion"] = registry.create_provisioning_template_version(
        template_name="tmpl", template_body="{}")
    r["DescribeProvisioningTemplateVersion"] = registry.describe_provisioning_template_version(
        template_name="tmpl", version_id=2)
    r["ListProvisioningTemplateVersions"] = registry.list_provisioning_template_versions(
        template_name="tmpl")
    r["UpdateThing"] = registry.update_thing(thing_name="t")
    return r


def _unset_members(operation: str, result: Any) -> set[str]:
    shape = operation_model(operation).output_shape
    missing = set()
    for name in shape.members:
        if not hasattr(result, xform_name(name)):
            missing.add(name)
    if operation in ("DescribeCertificate", "DescribeCACertificate"):
        inner = shape.members["certificateDescription"]
        missing |= {name for name in inner.members
                    if not hasattr(result.certificate_description, xform_name(name))}
    return missing


def test_results_carry_every_output_member_and_parse_with_botocore(registry: Registry) -> None:
    # task brief: snake_case attributes = output members; nested structures likewise
    results = _exercise(registry)
    for operation, result in results.items():
        assert _unset_members(operation, result) == NOT_EMULATED.get(operation, set()), operation
        wire_output(operation, result)


def test_parsed_outputs_look_like_aws(registry: Registry) -> None:
    # spec broker §5.1: timestamps are epoch numbers (parsed to datetimes by botocore)
    results = _exercise(registry)
    described = wire_output("DescribeCertificate", results["DescribeCertificate"])
    description = described["certificateDescription"]
    assert description["status"] == "ACTIVE" and description["certificateMode"] == "DEFAULT"
    assert isinstance(description["validity"]["notBefore"], dt.datetime)
    assert description["ownedBy"] == registry.account_id
    keys = wire_output("CreateKeysAndCertificate", results["CreateKeysAndCertificate"])
    assert keys["keyPair"]["PrivateKey"].startswith("-----BEGIN RSA PRIVATE KEY-----")
    thing = wire_output("DescribeThing", results["DescribeThing"])
    assert thing["defaultClientId"] == "t" and thing["version"] == 1
    assert thing["billingGroupName"] == "bg" and thing["attributes"] == {"a": "1"}
    group = wire_output("DescribeThingGroup", results["DescribeThingGroup"])
    assert group["thingGroupMetadata"]["rootToParentThingGroups"] == [
        {"groupName": "root", "groupArn": registry.arn("thinggroup", "root")}]
    assert group["thingGroupProperties"]["thingGroupDescription"] == "x"
    thing_type = wire_output("DescribeThingType", results["DescribeThingType"])
    assert thing_type["thingTypeMetadata"]["deprecated"] is False
    assert thing_type["thingTypeProperties"]["searchableAttributes"] == ["a"]
    v2 = wire_output("ListThingPrincipalsV2", results["ListThingPrincipalsV2"])
    assert v2["thingPrincipalObjects"][0]["thingPrincipalType"] == "NON_EXCLUSIVE_THING"
    template = wire_output("DescribeProvisioningTemplate", results["DescribeProvisioningTemplate"])
    assert template["defaultVersionId"] == 1 and template["type"] == "FLEET_PROVISIONING"
    assert template["preProvisioningHook"]["payloadVersion"] == "2020-04-01"
    versions = wire_output("ListPolicyVersions", results["ListPolicyVersions"])
    assert [v["versionId"] for v in versions["policyVersions"]] == ["2", "1"]
    ca = wire_output("DescribeCACertificate", results["DescribeCACertificate"])
    assert ca["certificateDescription"]["autoRegistrationStatus"] == "DISABLE"


@pytest.mark.parametrize(("call", "fragment"), [
    (lambda r: r.list_things(max_results=251),
     "Value '251' at 'maxResults' failed to satisfy constraint: Member must have value less than "
     "or equal to 250"),
    (lambda r: r.update_certificate(certificate_id="ab" * 32, new_status="BROKEN"),
     "at 'newStatus' failed to satisfy constraint: Member must satisfy enum value set: [ACTIVE, "
     "INACTIVE, REVOKED, PENDING_TRANSFER, REGISTER_INACTIVE, PENDING_ACTIVATION]"),
    (lambda r: r.describe_certificate(certificate_id="zz" * 32),
     "Member must satisfy regular expression pattern: (0x)?[a-fA-F0-9]+"),
    (lambda r: r.describe_certificate(certificate_id="ab"),
     "Member must have length greater than or equal to 64"),
    (lambda r: r.create_thing_group(thing_group_name="g",
                                    thing_group_properties={"thingGroupDescription": "\x01"}),
     "at 'thingGroupProperties.thingGroupDescription' failed to satisfy constraint: Member must "
     "satisfy regular expression pattern: [\\p{Graph}\\x20]*"),
    (lambda r: r.create_policy(policy_name="p", policy_document=ALLOW_ALL,
                               tags=[{"Key": "bad\x07key"}]),
     "at 'tags.1.member.Key' failed to satisfy constraint"),
    (lambda r: r.update_thing_groups_for_thing(thing_name="t", thing_groups_to_add=["a b"]),
     "at 'thingGroupsToAdd' failed to satisfy constraint: Member must satisfy constraint: "
     "[Member must have length less than or equal to 128, Member must have length greater than "
     "or equal to 1, Member must satisfy regular expression pattern: [a-zA-Z0-9:_-]+]"),
    (lambda r: r.create_provisioning_template(template_name="t", template_body="{}",
                                              provisioning_role_arn="r" * 20,
                                              description="tab\there"),
     "at 'description' failed to satisfy constraint"),
    (lambda r: r.create_thing(thing_name=None),  # type: ignore[arg-type]
     "Value null at 'thingName' failed to satisfy constraint: Member must not be null"),
])
def test_model_constraints_are_enforced_with_aws_messages(registry: Registry, call: Any,
                                                          fragment: str) -> None:
    # spec broker §5.1, §5.2: patterns, max lengths and enums are checked by the server
    message = raises_message(lambda: call(registry), InvalidRequestException)
    assert fragment in message
    assert message.startswith("1 validation error detected: ")
