"""Refused calls through boto3 against a live emulator: the botocore exception AWS would
raise, AWS's status and message, and nothing changed (issue 4; design principle 6).

Spec: iot-broker-and-policy.md §5.1 (server-side validation), §5.2 (error shape and
codes), §5.4 (deletion preconditions and messages), §7 items 16, 17, 20, 22;
fleet-provisioning.md §3.7 (template validation at creation), §6.1 (duplicate template).
"""

from __future__ import annotations

import json
from collections.abc import Callable
from typing import Any

import pytest

from harness import pki
from tests.cp_live_kit import (
    ALLOW_ALL,
    ARN_PREFIX,
    FLEET_TEMPLATE,
    ROLE_ARN,
    Live,
    aws_error,
    csr_pem,
    emulator_fixture,
    make_ca,
    unchanged,
    unique,
)

live = emulator_fixture()

MISSING = "missing-" + "0" * 8
MISSING_CERT = "ab" * 32  # a well-formed certificate id nobody has
MISSING_CERT_ARN = f"{ARN_PREFIX}cert/{MISSING_CERT}"

Call = Callable[[Any], Any]


# --------------------------------------------------------------------------- unknown resources

UNKNOWN: list[tuple[str, Call, str]] = [
    ("DescribeThing", lambda c: c.describe_thing(thingName=MISSING), MISSING),
    ("UpdateThing", lambda c: c.update_thing(thingName=MISSING, attributePayload={
        "attributes": {"a": "1"}}), MISSING),
    ("ListThingPrincipals", lambda c: c.list_thing_principals(thingName=MISSING), MISSING),
    ("AttachThingPrincipal", lambda c: c.attach_thing_principal(
        thingName=MISSING, principal=MISSING_CERT_ARN), MISSING),
    ("DescribeThingType", lambda c: c.describe_thing_type(thingTypeName=MISSING), MISSING),
    ("CreateThing with an unknown type", lambda c: c.create_thing(
        thingName=unique("typed"), thingTypeName=MISSING), MISSING),
    ("DescribeThingGroup", lambda c: c.describe_thing_group(thingGroupName=MISSING), MISSING),
    ("ListThingsInThingGroup", lambda c: c.list_things_in_thing_group(
        thingGroupName=MISSING), MISSING),
    ("AddThingToThingGroup", lambda c: c.add_thing_to_thing_group(
        thingGroupName=MISSING, thingName=MISSING), MISSING),
    ("DescribeBillingGroup", lambda c: c.describe_billing_group(billingGroupName=MISSING),
     MISSING),
    ("ListThingsInBillingGroup", lambda c: c.list_things_in_billing_group(
        billingGroupName=MISSING), MISSING),
    ("DescribeCertificate", lambda c: c.describe_certificate(certificateId=MISSING_CERT),
     MISSING_CERT),
    ("UpdateCertificate", lambda c: c.update_certificate(certificateId=MISSING_CERT,
                                                         newStatus="ACTIVE"), MISSING_CERT),
    ("DeleteCertificate", lambda c: c.delete_certificate(certificateId=MISSING_CERT),
     MISSING_CERT),
    ("ListPrincipalThings", lambda c: c.list_principal_things(principal=MISSING_CERT_ARN),
     MISSING_CERT),
    ("DescribeCACertificate", lambda c: c.describe_ca_certificate(certificateId=MISSING_CERT),
     MISSING_CERT),
    ("DeleteCACertificate", lambda c: c.delete_ca_certificate(certificateId=MISSING_CERT),
     MISSING_CERT),
    ("GetPolicy", lambda c: c.get_policy(policyName=MISSING), MISSING),
    ("DeletePolicy", lambda c: c.delete_policy(policyName=MISSING), MISSING),
    ("GetPolicyVersion", lambda c: c.get_policy_version(policyName=MISSING,
                                                        policyVersionId="1"), MISSING),
    ("CreatePolicyVersion", lambda c: c.create_policy_version(
        policyName=MISSING, policyDocument=ALLOW_ALL), MISSING),
    ("AttachPolicy", lambda c: c.attach_policy(policyName=MISSING, target=MISSING_CERT_ARN),
     MISSING),
    ("ListTargetsForPolicy", lambda c: c.list_targets_for_policy(policyName=MISSING), MISSING),
    ("ListAttachedPolicies", lambda c: c.list_attached_policies(target=MISSING_CERT_ARN),
     MISSING_CERT),
    ("DescribeProvisioningTemplate", lambda c: c.describe_provisioning_template(
        templateName=MISSING), MISSING),
    ("UpdateProvisioningTemplate", lambda c: c.update_provisioning_template(
        templateName=MISSING, enabled=True), MISSING),
    ("DeleteProvisioningTemplate", lambda c: c.delete_provisioning_template(
        templateName=MISSING), MISSING),
    ("CreateProvisioningTemplateVersion", lambda c: c.create_provisioning_template_version(
        templateName=MISSING, templateBody=FLEET_TEMPLATE.read_text()), MISSING),
    ("DescribeProvisioningTemplateVersion", lambda c: c.describe_provisioning_template_version(
        templateName=MISSING, versionId=1), MISSING),
    ("ListProvisioningTemplateVersions", lambda c: c.list_provisioning_template_versions(
        templateName=MISSING), MISSING),
    ("CreateProvisioningClaim", lambda c: c.create_provisioning_claim(templateName=MISSING),
     MISSING),
]


@pytest.mark.parametrize(("call", "named"), [(c, n) for _, c, n in UNKNOWN],
                         ids=[i for i, _, _ in UNKNOWN])
def test_an_unknown_resource_raises_resource_not_found_and_changes_nothing(
        live: Live, call: Call, named: str) -> None:
    # spec broker §5.2: unknown thing/group/type/certificate/policy/version/CA → 404
    # ResourceNotFoundException naming it; fleet §6 for templates and claims
    iot = live.iot
    with unchanged(live), aws_error(iot, "ResourceNotFoundException", match=named):
        call(iot)


def test_an_unknown_policy_version_of_a_known_policy_is_not_found(live: Live) -> None:
    # spec broker §5.2: unknown version → ResourceNotFoundException
    iot = live.iot
    name = unique("known")
    iot.create_policy(policyName=name, policyDocument=ALLOW_ALL)
    with unchanged(live), aws_error(iot, "ResourceNotFoundException", match="Version 7"):
        iot.get_policy_version(policyName=name, policyVersionId="7")


# --------------------------------------------------------------------------- duplicates


def test_creating_a_policy_twice_raises_resource_already_exists(live: Live) -> None:
    # spec broker §5.4: CreatePolicy with an existing name → ResourceAlreadyExistsException
    iot = live.iot
    name = unique("dup")
    iot.create_policy(policyName=name, policyDocument=ALLOW_ALL)
    with unchanged(live, lambda: iot.get_policy(policyName=name)), aws_error(
            iot, "ResourceAlreadyExistsException",
            f"Policy cannot be created - name already exists (name={name})") as info:
        iot.create_policy(policyName=name, policyDocument=json.dumps(json.loads(ALLOW_ALL)))
    assert info.value.response["resourceArn"] == f"{ARN_PREFIX}policy/{name}"


def test_creating_a_template_twice_raises_resource_already_exists(live: Live) -> None:
    # spec fleet §6.1: "Template with name <name> already exists" (409)
    iot = live.iot
    name = unique("dup")
    body = FLEET_TEMPLATE.read_text()
    iot.create_provisioning_template(templateName=name, templateBody=body,
                                     provisioningRoleArn=ROLE_ARN)
    with unchanged(live, lambda: iot.describe_provisioning_template(templateName=name)), \
            aws_error(iot, "ResourceAlreadyExistsException",
                      f"Template with name {name} already exists"):
        iot.create_provisioning_template(templateName=name, templateBody=body,
                                         provisioningRoleArn=ROLE_ARN, enabled=True)


@pytest.mark.parametrize("kind", ["thing", "thing type", "thing group", "billing group"])
def test_creating_an_existing_name_with_a_different_configuration_is_refused(
        live: Live, kind: str) -> None:
    # spec broker §5.4: same name, different configuration → ResourceAlreadyExistsException
    # carrying the existing resource's id and ARN (idempotency for identical input is
    # UNCONFIRMED for types and groups: RegistrySettings.idempotent_create)
    iot = live.iot
    name = unique("dup")
    create: dict[str, Callable[[str], Any]] = {
        "thing": lambda d: iot.create_thing(
            thingName=name, attributePayload={"attributes": {"d": d}}),
        "thing type": lambda d: iot.create_thing_type(
            thingTypeName=name, thingTypeProperties={"thingTypeDescription": d}),
        "thing group": lambda d: iot.create_thing_group(
            thingGroupName=name, thingGroupProperties={"thingGroupDescription": d}),
        "billing group": lambda d: iot.create_billing_group(
            billingGroupName=name, billingGroupProperties={"billingGroupDescription": d}),
    }
    first = create[kind]("one")
    arn = next(v for k, v in first.items() if k.endswith("Arn"))
    resource_id = next(v for k, v in first.items() if k.endswith("Id"))
    with unchanged(live), aws_error(iot, "ResourceAlreadyExistsException", match=name) as info:
        create[kind]("two")
    assert (info.value.response["resourceId"], info.value.response["resourceArn"]) == (
        resource_id, arn)


def test_registering_a_registered_certificate_again_names_it(live: Live) -> None:
    # spec broker §2.2, §7 item 16: already registered → ResourceAlreadyExistsException
    # whose body carries resourceId (and resourceArn)
    iot = live.iot
    ca = make_ca(iot.get_registration_code()["registrationCode"])
    ca_id = iot.register_ca_certificate(caCertificate=ca.pem,
                                        verificationCertificate=ca.verification_pem)[
        "certificateId"]
    with unchanged(live), aws_error(iot, "ResourceAlreadyExistsException") as info:
        iot.register_ca_certificate(caCertificate=ca.pem,
                                    verificationCertificate=ca.verification_pem)
    assert info.value.response["resourceId"] == ca_id
    device_pem = ca.device_pem()
    cert_id = iot.register_certificate(certificatePem=device_pem, caCertificatePem=ca.pem)[
        "certificateId"]
    with unchanged(live), aws_error(iot, "ResourceAlreadyExistsException") as info:
        iot.register_certificate(certificatePem=device_pem, caCertificatePem=ca.pem)
    assert (info.value.response["resourceId"], info.value.response["resourceArn"]) == (
        cert_id, f"{ARN_PREFIX}cert/{cert_id}")
    own = iot.create_keys_and_certificate()
    with unchanged(live), aws_error(iot, "ResourceAlreadyExistsException") as info:
        iot.register_certificate_without_ca(certificatePem=own["certificatePem"])
    assert info.value.response["resourceId"] == own["certificateId"]


# --------------------------------------------------------------------------- blocked deletes


def test_deleting_an_attached_policy_is_a_delete_conflict(live: Live) -> None:
    # spec broker §5.4, §7 item 20: attached policy → DeleteConflictException (AWS's words)
    iot = live.iot
    name = unique("attached")
    iot.create_policy(policyName=name, policyDocument=ALLOW_ALL)
    cert_arn = iot.create_keys_and_certificate()["certificateArn"]
    iot.attach_policy(policyName=name, target=cert_arn)
    with unchanged(live, lambda: iot.get_policy(policyName=name),
                   lambda: iot.list_targets_for_policy(policyName=name)), aws_error(
            iot, "DeleteConflictException",
            "The policy cannot be deleted as the policy is attached to one or more principals "
            f"(name={name})"):
        iot.delete_policy(policyName=name)


def test_deleting_an_active_certificate_is_a_certificate_state_error(live: Live) -> None:
    # spec broker §5.4, §7 item 20: ACTIVE → CertificateStateException (406, AWS's words)
    iot = live.iot
    certificate_id = iot.create_keys_and_certificate(setAsActive=True)["certificateId"]
    with unchanged(live, lambda: iot.describe_certificate(certificateId=certificate_id)), \
            aws_error(iot, "CertificateStateException",
                      "Certificate must be deactivated (not ACTIVE) before deletion. "
                      f"Id: {certificate_id}"):
        iot.delete_certificate(certificateId=certificate_id, forceDelete=True)


def test_deleting_a_certificate_with_policies_or_things_is_a_delete_conflict(
        live: Live) -> None:
    # spec broker §5.4: policies attached and no forceDelete → DeleteConflictException
    # (observed wording); things attached → DeleteConflictException even with forceDelete
    iot = live.iot
    created = iot.create_keys_and_certificate()
    certificate_id, arn = created["certificateId"], created["certificateArn"]
    policy, thing = unique("kept"), unique("holder")
    iot.create_policy(policyName=policy, policyDocument=ALLOW_ALL)
    iot.attach_policy(policyName=policy, target=arn)

    def describe() -> Any:
        return iot.describe_certificate(certificateId=certificate_id)

    with unchanged(live, describe), aws_error(
            iot, "DeleteConflictException",
            f"Certificate policies must be detached before deletion (arn: {arn})"):
        iot.delete_certificate(certificateId=certificate_id)
    iot.create_thing(thingName=thing)
    iot.attach_thing_principal(thingName=thing, principal=arn)
    with unchanged(live, describe, lambda: iot.list_thing_principals(thingName=thing)), \
            aws_error(iot, "DeleteConflictException", match=arn):
        iot.delete_certificate(certificateId=certificate_id, forceDelete=True)


def test_deleting_a_thing_with_principals_is_refused(live: Live) -> None:
    # spec broker §5.4, §7 item 20: "Cannot delete. Thing <name> is still attached to one or
    # more principals" (InvalidRequestException)
    iot = live.iot
    thing = unique("attached")
    iot.create_thing(thingName=thing)
    arn = iot.create_keys_and_certificate()["certificateArn"]
    iot.attach_thing_principal(thingName=thing, principal=arn)
    with unchanged(live, lambda: iot.describe_thing(thingName=thing)), aws_error(
            iot, "InvalidRequestException",
            f"Cannot delete. Thing {thing} is still attached to one or more principals"):
        iot.delete_thing(thingName=thing)


# --------------------------------------------------------------------------- malformed input


@pytest.mark.parametrize("document", [
    "{not json",
    json.dumps({"Version": "2012-10-17"}),
    json.dumps({"Version": "2012-10-17", "Statement": [
        {"Effect": "Perhaps", "Action": "iot:Connect", "Resource": "*"}]}),
], ids=["not-json", "no-statement", "bad-effect"])
def test_a_malformed_policy_document_is_a_malformed_policy_error(live: Live, document: str
                                                                ) -> None:
    # spec broker §3.1, §5.2: bad policy JSON/grammar → MalformedPolicyException (400)
    iot = live.iot
    name = unique("bad")
    with unchanged(live, lambda: iot.get_policy(policyName=name)), \
            aws_error(iot, "MalformedPolicyException"):
        iot.create_policy(policyName=name, policyDocument=document)
    existing = unique("good")
    iot.create_policy(policyName=existing, policyDocument=ALLOW_ALL)
    with unchanged(live, lambda: iot.list_policy_versions(policyName=existing)), \
            aws_error(iot, "MalformedPolicyException"):
        iot.create_policy_version(policyName=existing, policyDocument=document,
                                  setAsDefault=True)


@pytest.mark.parametrize("body", [
    "{nope",
    "[]",
    json.dumps({"Resources": {"x": {"Type": "AWS::IoT::Nope", "Properties": {}}}}),
], ids=["not-json", "not-an-object", "unknown-resource-type"])
def test_a_malformed_template_body_is_refused_at_creation(live: Live, body: str) -> None:
    # spec fleet §3.7: body must be a JSON object with known resource types, checked at
    # CreateProvisioningTemplate and CreateProvisioningTemplateVersion
    iot = live.iot
    name = unique("bad")
    with unchanged(live, lambda: iot.describe_provisioning_template(templateName=name)), \
            aws_error(iot, "InvalidRequestException", match="template"):
        iot.create_provisioning_template(templateName=name, templateBody=body,
                                         provisioningRoleArn=ROLE_ARN)
    existing = unique("good")
    iot.create_provisioning_template(templateName=existing,
                                     templateBody=FLEET_TEMPLATE.read_text(),
                                     provisioningRoleArn=ROLE_ARN)
    with unchanged(live, lambda: iot.list_provisioning_template_versions(
            templateName=existing)), aws_error(iot, "InvalidRequestException"):
        iot.create_provisioning_template_version(templateName=existing, templateBody=body,
                                                 setAsDefault=True)


def _sending_body(live: Live, operation: str, body: bytes) -> Any:
    """A client whose ``operation`` requests carry ``body`` instead of boto3's JSON (what
    a hand-written or broken client sends)."""
    client = live.client()

    def replace_body(request: Any, **_: Any) -> None:
        request.data = body

    client.meta.events.register(f"request-created.iot.{operation}", replace_body)
    return client


@pytest.mark.parametrize(("operation", "body", "match"), [
    ("CreatePolicy", b'{"policyDocument": ', "Could not parse request body into json"),
    ("CreateThing", b'["not", "an", "object"]', "Could not parse request body into json"),
    ("CreateThing", b'{"attributePayload": "flat"}', "attributePayload"),
    ("CreatePolicy", b'{"policyDocument": 7}', "policyDocument"),
], ids=["truncated", "array", "structure-as-string", "number-as-string"])
def test_a_malformed_json_request_body_is_an_invalid_request(live: Live, operation: str,
                                                             body: bytes, match: str) -> None:
    # spec broker §5.1, §5.2; design principle 6: unparsable or mistyped JSON → 400
    # InvalidRequestException (the modeled error botocore can raise), nothing created
    client = _sending_body(live, operation, body)
    name = unique("raw")
    call: dict[str, Call] = {
        "CreatePolicy": lambda c: c.create_policy(policyName=name, policyDocument=ALLOW_ALL),
        "CreateThing": lambda c: c.create_thing(thingName=name),
    }
    with unchanged(live), aws_error(client, "InvalidRequestException", match=match):
        call[operation](client)


def test_unparsable_certificates_and_csrs_are_refused(live: Live) -> None:
    # spec broker §5.2: unparsable PEM → CertificateValidationException; a CSR AWS would
    # not sign → InvalidRequestException (the only client error modeled for it)
    iot = live.iot
    garbage = "-----BEGIN CERTIFICATE-----\nbm90IGEgY2VydA==\n-----END CERTIFICATE-----\n"
    with unchanged(live), aws_error(iot, "CertificateValidationException"):
        iot.register_certificate_without_ca(certificatePem=garbage)
    with unchanged(live), aws_error(iot, "CertificateValidationException"):
        iot.register_certificate(certificatePem=garbage)
    with unchanged(live), aws_error(iot, "InvalidRequestException", match="signing request"):
        iot.create_certificate_from_csr(certificateSigningRequest="not a csr")
    weak = pki.make_csr(pki.generate_rsa_key(1024))
    with unchanged(live), aws_error(iot, "InvalidRequestException", match="2048"):
        iot.create_certificate_from_csr(certificateSigningRequest=weak)


# --------------------------------------------------------------------------- missing members


MISSING_MEMBERS: list[tuple[str, Call, str]] = [
    ("CreatePolicy", lambda c: c.create_policy(policyName=unique("p")), "policyDocument"),
    ("AttachPolicy", lambda c: c.attach_policy(policyName=unique("p")), "target"),
    ("CreateCertificateFromCsr", lambda c: c.create_certificate_from_csr(),
     "certificateSigningRequest"),
    ("RegisterCertificate", lambda c: c.register_certificate(), "certificatePem"),
    ("UpdateCertificate", lambda c: c.update_certificate(certificateId=MISSING_CERT),
     "newStatus"),
    ("AttachThingPrincipal", lambda c: c.attach_thing_principal(thingName=MISSING),
     "principal"),
    ("CreateProvisioningTemplateVersion", lambda c: c.create_provisioning_template_version(
        templateName=MISSING), "templateBody"),
]


@pytest.mark.parametrize(("call", "member"), [(c, m) for _, c, m in MISSING_MEMBERS],
                         ids=[i for i, _, _ in MISSING_MEMBERS])
def test_a_missing_required_member_is_named_in_aws_words(live: Live, call: Call,
                                                         member: str) -> None:
    # spec broker §5.1: boto3 checks required members itself; a client that does not
    # (parameter_validation off) gets AWS's validation message from the server
    client = live.client(parameter_validation=False)
    with unchanged(live), aws_error(
            client, "InvalidRequestException",
            f"1 validation error detected: Value null at '{member}' failed to satisfy "
            "constraint: Member must not be null"):
        call(client)


def test_every_violation_is_listed_in_one_answer(live: Live) -> None:
    # spec broker §5.2: "N validation errors detected: ..."
    client = live.client(parameter_validation=False)
    with unchanged(live), aws_error(client, "InvalidRequestException",
                                    match="^2 validation errors detected: ") as info:
        client.create_provisioning_template(templateName=unique("t"))
    message = info.value.response["Error"]["Message"]
    assert "'templateBody'" in message and "'provisioningRoleArn'" in message


@pytest.mark.parametrize(("call", "message"), [
    (lambda c: c.create_thing(thingName="no spaces"),
     "1 validation error detected: Value 'no spaces' at 'thingName' failed to satisfy "
     "constraint: Member must satisfy regular expression pattern: [a-zA-Z0-9:_-]+"),
    (lambda c: c.update_certificate(certificateId=MISSING_CERT, newStatus="DORMANT"),
     "1 validation error detected: Value 'DORMANT' at 'newStatus' failed to satisfy "
     "constraint: Member must satisfy enum value set: [ACTIVE, INACTIVE, REVOKED, "
     "PENDING_TRANSFER, REGISTER_INACTIVE, PENDING_ACTIVATION]"),
    (lambda c: c.create_provisioning_template(
        templateName="x" * 37, templateBody="{}", provisioningRoleArn=ROLE_ARN),
     f"1 validation error detected: Value '{'x' * 37}' at 'templateName' failed to satisfy "
     "constraint: Member must have length less than or equal to 36"),
], ids=["pattern", "enum", "max-length"])
def test_constraints_boto3_leaves_to_the_server_are_enforced(live: Live, call: Call,
                                                             message: str) -> None:
    # spec broker §5.1, §7 item 22: patterns, enums and maximum lengths are checked
    # server-side with AWS's validation message
    iot = live.iot
    with unchanged(live), aws_error(iot, "InvalidRequestException", message):
        call(iot)


def test_a_csr_path_error_leaves_no_half_made_certificate(live: Live) -> None:
    # design principle 6: a refused CreateCertificateFromCsr adds nothing; a good one after
    # it still works
    iot = live.iot
    with unchanged(live, iot.list_certificates), aws_error(iot, "InvalidRequestException"):
        iot.create_certificate_from_csr(certificateSigningRequest=csr_pem()[:-40])
    assert iot.create_certificate_from_csr(certificateSigningRequest=csr_pem())[
        "certificateId"]
