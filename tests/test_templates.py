"""Provisioning template engine: creation-time checks and provision-time evaluation.

Spec: fleet-provisioning.md §3, §1.4, §4, §7 and edge cases 7, 9, 10, 13-16.
"""

from __future__ import annotations

import functools
import hashlib
import json
from pathlib import Path
from typing import Any

import pytest
from cryptography import x509
from cryptography.x509.oid import NameOID
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from harness import pki
from harness.emulator import templates as t
from harness.emulator.templates import (
    TemplateError,
    TemplateEvaluationError,
    UndeclaredRefs,
    certificate_parameters,
    evaluate,
    merge_hook_overrides,
    validate_template_body,
)
from harness.errors import InvalidRequestException, ProvisioningError

FIXTURES = Path(__file__).parent / "fixtures" / "templates"
CERT_ID = "5f" * 32
AUTO = {t.CERTIFICATE_ID_PARAMETER: CERT_ID}


def body(
    resources: dict[str, Any] | None = None,
    *,
    parameters: dict[str, Any] | None = None,
    mappings: dict[str, Any] | None = None,
    device_configuration: dict[str, Any] | None = None,
    **extra: Any,
) -> str:
    """A template body; only the sections given."""
    doc: dict[str, Any] = {}
    if parameters is not None:
        doc["Parameters"] = parameters
    if mappings is not None:
        doc["Mappings"] = mappings
    if resources is not None:
        doc["Resources"] = resources
    if device_configuration is not None:
        doc["DeviceConfiguration"] = device_configuration
    doc.update(extra)
    return json.dumps(doc)


def config(value: Any, **kw: Any) -> str:
    """A template whose DeviceConfiguration has one entry ``v`` holding ``value``."""
    return body(device_configuration={"v": value}, **kw)


def value_of(expr: Any, params: dict[str, str] | None = None, **kw: Any) -> str:
    """Evaluate one expression through DeviceConfiguration."""
    return evaluate(config(expr, **kw), params or {}, AUTO).device_configuration["v"]


def thing(props: dict[str, Any], overrides: dict[str, Any] | None = None) -> dict[str, Any]:
    resource: dict[str, Any] = {"Type": t.THING_TYPE, "Properties": props}
    if overrides is not None:
        resource["OverrideSettings"] = overrides
    return {"thing": resource}


def certificate(props: dict[str, Any], overrides: dict[str, Any] | None = None) -> dict:
    resource: dict[str, Any] = {"Type": t.CERTIFICATE_TYPE, "Properties": props}
    if overrides is not None:
        resource["OverrideSettings"] = overrides
    return {"certificate": resource}


def policy(props: dict[str, Any], name: str = "policy") -> dict[str, Any]:
    return {name: {"Type": t.POLICY_TYPE, "Properties": props}}


CERT_REF = {"CertificateId": {"Ref": t.CERTIFICATE_ID_PARAMETER}}
STRING = {"Type": "String"}


def refused(text: str) -> TemplateError:
    with pytest.raises(TemplateError) as info:
        validate_template_body(text)
    return info.value


def rejected(text: str, params: dict[str, str] | None = None,
             automatic: dict[str, str] | None = None, **kw: Any) -> TemplateEvaluationError:
    with pytest.raises(TemplateEvaluationError) as info:
        evaluate(text, params or {}, AUTO if automatic is None else automatic, **kw)
    return info.value


# --------------------------------------------------------------------------- the guide's examples


def test_guide_fleet_example_evaluates_as_documented() -> None:
    # spec §3.1-§3.5, S3 "Template example for fleet provisioning"
    text = (FIXTURES / "fleet-provisioning-template.json").read_text()
    validate_template_body(text)
    plan = evaluate(text, {"ThingName": "bulb-7", "SerialNumber": "0042",
                           "DeviceLocation": "Seattle"}, AUTO)
    assert plan.thing is not None
    assert plan.thing.thing_name == "bulb-7"
    assert plan.thing.thing_type_name == "ThingPrefix_0042"
    assert dict(plan.thing.attributes or {}) == {"version": "v1", "serialNumber": "serialNumber"}
    assert plan.thing.thing_groups == ("v1-lightbulbs", "WA")
    assert plan.thing.billing_group == "LightBulbBillingGroup"
    assert dict(plan.thing.overrides) == {"AttributePayload": "MERGE",
                                          "ThingTypeName": "REPLACE",
                                          "ThingGroups": "DO_NOTHING"}
    assert plan.certificate == t.CertificatePlan(status="ACTIVE", overrides={})
    assert plan.device_configuration == {"FallbackUrl": "https://www.example.com/test-site",
                                         "LocationUrl": "https://example.aws"}
    (pol,) = plan.policies
    assert pol.policy_name is None
    assert json.loads(pol.policy_document or "") == {
        "Version": "2012-10-17",
        "Statement": [{"Effect": "Allow", "Action": ["iot:Publish"],
                       "Resource": ["arn:aws:iot:us-east-1:123456789012:topic/foo/bar"]}],
    }


def test_guide_fleet_example_unknown_location_is_a_400_naming_the_key() -> None:
    # spec §3.5 Fn::FindInMap missing key -> provisioning error
    text = (FIXTURES / "fleet-provisioning-template.json").read_text()
    err = rejected(text, {"ThingName": "b", "SerialNumber": "1", "DeviceLocation": "Boston"})
    assert err.status_code == 400
    assert err.error_code == t.INVALID_PARAMETERS_ERROR_CODE
    assert '"LocationTable"' in err.message and '"Boston"' in err.message


def test_guide_hook_example_with_undeclared_serial_number_is_accepted_at_creation() -> None:
    # spec §3.7: the guide's hook example references SerialNumber without declaring it
    validate_template_body((FIXTURES / "pre-provisioning-hook-template.json").read_text())


def test_guide_hook_example_names_the_thing_from_the_device_serial_and_hook_location() -> None:
    # spec §3.7 (undeclared Ref resolved from parameters), §4 (overrides added before evaluation)
    text = (FIXTURES / "pre-provisioning-hook-template.json").read_text()
    params = merge_hook_overrides({"SerialNumber": "A1"}, {"DeviceLocation": "Seattle"})
    plan = evaluate(text, params, AUTO)
    assert plan.thing is not None
    assert plan.thing.thing_name == "ThingPrefix_A1"
    assert plan.thing.thing_type_name == "ThingTypePrefix_A1"
    assert plan.thing.thing_groups == ("widgets", "WA")
    assert plan.thing.billing_group == "BillingGroup"
    assert plan.device_configuration["LocationUrl"] == "https://example.aws"
    assert plan.parameters["SerialNumber"] == "A1"


def test_guide_hook_example_without_serial_number_is_a_400_naming_it() -> None:
    # spec §3.1: a Ref without value needed to build a resource rejects RegisterThing
    text = (FIXTURES / "pre-provisioning-hook-template.json").read_text()
    err = rejected(text, {"DeviceLocation": "Seattle"})
    assert err.status_code == 400 and '"SerialNumber"' in err.message


def test_guide_hook_configuration_fixture_has_target_and_payload_version() -> None:
    hook = json.loads((FIXTURES / "pre-provisioning-hook.json").read_text())
    assert hook == {"targetArn": "arn:aws:lambda:us-east-1:765219403047:function:"
                                 "pre_provisioning_test", "payloadVersion": "2020-04-01"}


def test_observed_s14_template_ignores_undeclared_device_location() -> None:
    # spec §1.4 observed (S14), edge case 9
    text = body(thing({"ThingName": {"Fn::Join": ["", ["mything_", {"Ref": "SerialNumber"}]]}}),
                parameters={"SerialNumber": STRING})
    plan = evaluate(text, {"SerialNumber": "1", "DeviceLocation": "Seattle"}, AUTO)
    assert plan.thing is not None and plan.thing.thing_name == "mything_1"
    assert plan.device_configuration == {}
    assert "DeviceLocation" not in plan.parameters


# --------------------------------------------------------------------------- parameters


def test_declared_parameter_takes_the_request_value_over_its_default() -> None:
    # spec §3.1 parameter resolution
    params = {"Location": {"Type": "String", "Default": "WA"}}
    assert value_of({"Ref": "Location"}, {"Location": "OR"}, parameters=params) == "OR"


def test_declared_parameter_falls_back_to_its_default() -> None:
    # spec §3.1
    params = {"Location": {"Type": "String", "Default": "WA"}}
    assert value_of({"Ref": "Location"}, parameters=params) == "WA"


def test_declared_parameter_without_value_or_default_is_a_400_naming_it() -> None:
    # spec §3.1, §1.5 template evaluation error
    err = rejected(config({"Ref": "Serial"}, parameters={"Serial": STRING}))
    assert isinstance(err, ProvisioningError)
    assert err.to_payload()["statusCode"] == 400
    assert err.error_code == "InvalidParameters"
    assert '"Serial"' in err.message


def test_unused_declared_parameter_without_value_is_fine() -> None:
    # spec §3.1: only a value that is needed must exist
    plan = evaluate(body(parameters={"Unused": STRING}), {}, AUTO)
    assert "Unused" not in plan.parameters


def test_plan_parameters_are_the_resolved_ones_only() -> None:
    # spec §1.4 step 6, edge case 9
    text = config({"Ref": "A"}, parameters={"A": STRING, "B": {"Type": "String", "Default": "b"}})
    plan = evaluate(text, {"A": "a", "Stray": "s"}, AUTO)
    assert dict(plan.parameters) == {"A": "a", "B": "b", t.CERTIFICATE_ID_PARAMETER: CERT_ID}


def test_certificate_id_resolves_without_being_declared() -> None:
    # spec §3.4, edge case 9
    assert value_of({"Ref": t.CERTIFICATE_ID_PARAMETER}) == CERT_ID


def test_device_cannot_override_a_reserved_certificate_parameter() -> None:
    # spec §3.4: the reserved value is the provisioned certificate's
    text = config({"Ref": t.CERTIFICATE_ID_PARAMETER},
                  parameters={t.CERTIFICATE_ID_PARAMETER: STRING})
    plan = evaluate(text, {t.CERTIFICATE_ID_PARAMETER: "00" * 32}, AUTO)
    assert plan.device_configuration["v"] == CERT_ID
    assert plan.parameters[t.CERTIFICATE_ID_PARAMETER] == CERT_ID


def test_undeclared_ref_resolves_from_request_parameters_by_default() -> None:
    # spec §3.7 (UNCONFIRMED default UNDECLARED_REFS)
    assert t.UNDECLARED_REFS is UndeclaredRefs.FROM_PARAMETERS
    assert value_of({"Ref": "Serial"}, {"Serial": "9"}) == "9"


def test_undeclared_ref_missing_from_request_is_a_400_naming_it() -> None:
    # spec §3.7
    err = rejected(config({"Ref": "Serial"}))
    assert '"Serial"' in err.message and "not declared" in err.message


def test_undeclared_ref_can_be_set_to_always_reject() -> None:
    # spec §3.7: the emulator's guess is a setting
    err = rejected(config({"Ref": "Serial"}), {"Serial": "9"},
                   undeclared_refs=UndeclaredRefs.REJECT)
    assert '"Serial"' in err.message


def test_non_string_parameter_value_is_a_400() -> None:
    # spec §3.1: parameter values are strings
    err = rejected(config({"Ref": "A"}), {"A": 5})  # type: ignore[dict-item]
    assert '"A"' in err.message


# --------------------------------------------------------------------------- hook overrides


def test_hook_override_wins_over_the_device_value() -> None:
    # spec §4 (inferred), edge case 8
    merged = merge_hook_overrides({"A": "device", "B": "b"}, {"A": "hook", "C": "new"})
    assert merged == {"A": "hook", "B": "b", "C": "new"}


def test_no_hook_overrides_leaves_parameters_unchanged_and_copied() -> None:
    # spec §4
    original = {"A": "a"}
    merged = merge_hook_overrides(original, None)
    assert merged == original and merged is not original


# --------------------------------------------------------------------------- certificate parameters


@functools.cache
def _ca() -> pki.CertificateAuthority:
    return pki.CertificateAuthority.create()


def _cert(subject: x509.Name | None = None) -> x509.Certificate:
    return _ca().issue_device_certificate(pki.generate_ec_key().public_key(), subject)


def test_certificate_parameters_cover_every_subject_attribute_present() -> None:
    # spec §3.4
    subject = x509.Name([
        x509.NameAttribute(NameOID.COMMON_NAME, "dev-1"),
        x509.NameAttribute(NameOID.COUNTRY_NAME, "US"),
        x509.NameAttribute(NameOID.ORGANIZATION_NAME, "Acme"),
        x509.NameAttribute(NameOID.ORGANIZATIONAL_UNIT_NAME, "Bulbs"),
        x509.NameAttribute(NameOID.DN_QUALIFIER, "q1"),
        x509.NameAttribute(NameOID.STATE_OR_PROVINCE_NAME, "WA"),
        x509.NameAttribute(NameOID.SERIAL_NUMBER, "SN-9"),
    ])
    cert = _cert(subject)
    params = certificate_parameters(cert, pki.certificate_id(cert))
    assert params == {
        "AWS::IoT::Certificate::Id": pki.certificate_id(cert),
        "AWS::IoT::Certificate::CommonName": "dev-1",
        "AWS::IoT::Certificate::Country": "US",
        "AWS::IoT::Certificate::Organization": "Acme",
        "AWS::IoT::Certificate::OrganizationalUnit": "Bulbs",
        "AWS::IoT::Certificate::DistinguishedNameQualifier": "q1",
        "AWS::IoT::Certificate::StateName": "WA",
        "AWS::IoT::Certificate::SerialNumber": "SN-9",
    }


def test_aws_issued_certificate_gives_only_id_and_common_name() -> None:
    # spec §3.4: CreateKeysAndCertificate subject is CN=AWS IoT Certificate
    cert = _cert()
    assert certificate_parameters(cert, "ab" * 32) == {
        "AWS::IoT::Certificate::Id": "ab" * 32,
        "AWS::IoT::Certificate::CommonName": "AWS IoT Certificate",
    }


def test_subject_parameter_missing_from_the_certificate_is_a_400() -> None:
    # spec §3.4 (JITP: every certificate parameter used must be present)
    err = rejected(config({"Ref": "AWS::IoT::Certificate::Country"}))
    assert "AWS::IoT::Certificate::Country" in err.message


def test_declared_subject_parameter_missing_from_the_certificate_uses_its_default() -> None:
    # spec §3.1 Default, §3.4
    params = {"AWS::IoT::Certificate::Country": {"Type": "String", "Default": "XX"}}
    assert value_of({"Ref": "AWS::IoT::Certificate::Country"}, parameters=params) == "XX"


# --------------------------------------------------------------------------- intrinsic functions


def test_join_concatenates_with_delimiter_and_with_empty_delimiter() -> None:
    # spec §3.5 Fn::Join
    assert value_of({"Fn::Join": ["-", ["a", {"Ref": "X"}, "c"]]}, {"X": "b"}) == "a-b-c"
    assert value_of({"Fn::Join": ["", ["a", "b"]]}) == "ab"


def test_select_picks_by_literal_string_and_referenced_index() -> None:
    # spec §3.5 Fn::Select
    assert value_of({"Fn::Select": [1, ["a", "b", "c"]]}) == "b"
    assert value_of({"Fn::Select": ["2", ["a", "b", "c"]]}) == "c"
    assert value_of({"Fn::Select": [{"Ref": "I"}, ["a", "b"]]}, {"I": "0"}) == "a"


def test_select_out_of_range_is_a_400_with_the_index_and_length() -> None:
    # spec §3.5: no bounds checking -> provisioning error
    err = rejected(config({"Fn::Select": [{"Ref": "I"}, ["a", "b"]]}), {"I": "5"})
    assert "out of range" in err.message and '"5"' in err.message and "2 element" in err.message
    err = rejected(config({"Fn::Select": [{"Ref": "I"}, ["a"]]}), {"I": "-1"})
    assert "out of range" in err.message


def test_select_of_a_null_element_is_a_400() -> None:
    # spec §3.5: null element -> provisioning error (not a creation error)
    text = config({"Fn::Select": [1, ["a", None]]})
    validate_template_body(text)
    assert "null" in rejected(text).message
    assert value_of({"Fn::Select": [0, ["a", None]]}) == "a"


def test_select_with_a_non_integer_index_from_parameters_is_a_400() -> None:
    # spec §3.5
    err = rejected(config({"Fn::Select": [{"Ref": "I"}, ["a"]]}), {"I": "first"})
    assert "not an integer" in err.message


def test_split_feeds_select() -> None:
    # spec §3.5 Fn::Split
    expr = {"Fn::Select": [1, {"Fn::Split": [",", {"Ref": "Csv"}]}]}
    assert value_of(expr, {"Csv": "x,y,z"}) == "y"


def test_split_result_can_be_thing_groups() -> None:
    # spec §3.2 ThingGroups list, §3.5 Fn::Split
    text = body(thing({"ThingName": "t", "ThingGroups": {"Fn::Split": [",", {"Ref": "G"}]}}))
    plan = evaluate(text, {"G": "g1,g2"}, AUTO)
    assert plan.thing is not None and plan.thing.thing_groups == ("g1", "g2")


def test_find_in_map_looks_up_two_levels() -> None:
    # spec §3.5 Fn::FindInMap
    maps = {"Region": {"eu": {"Url": "https://eu", "Port": 8883}}}
    assert value_of({"Fn::FindInMap": ["Region", {"Ref": "R"}, "Url"]}, {"R": "eu"},
                    mappings=maps) == "https://eu"
    assert value_of({"Fn::FindInMap": ["Region", "eu", "Port"]}, mappings=maps) == "8883"


def test_find_in_map_missing_second_key_is_a_400() -> None:
    # spec §3.5 (inferred)
    maps = {"Region": {"eu": {"Url": "u"}}}
    err = rejected(config({"Fn::FindInMap": ["Region", "eu", {"Ref": "K"}]}, mappings=maps),
                   {"K": "Nope"})
    assert '"Nope"' in err.message


def test_find_in_map_with_a_referenced_unknown_map_is_a_400() -> None:
    maps = {"Region": {"eu": {"Url": "u"}}}
    err = rejected(config({"Fn::FindInMap": [{"Ref": "M"}, "eu", "Url"]}, mappings=maps),
                   {"M": "Other"})
    assert '"Other"' in err.message


def test_find_in_map_list_value_feeds_thing_groups() -> None:
    # spec §3.1 Mappings
    maps = {"Groups": {"eu": {"All": ["g1", "g2"]}}}
    text = body(thing({"ThingName": "t",
                       "ThingGroups": {"Fn::FindInMap": ["Groups", "eu", "All"]}}), mappings=maps)
    plan = evaluate(text, {}, AUTO)
    assert plan.thing is not None and plan.thing.thing_groups == ("g1", "g2")


def test_sub_string_form_substitutes_parameters_and_reserved_names() -> None:
    # spec §3.5 Fn::Sub
    expr = {"Fn::Sub": "dev/${Serial}/${AWS::IoT::Certificate::Id}"}
    assert value_of(expr, {"Serial": "7"}) == f"dev/7/{CERT_ID}"


def test_sub_list_form_uses_its_variables_before_parameters() -> None:
    # spec §3.5 Fn::Sub [text, {var: value}]
    expr = {"Fn::Sub": ["${A}-${B}", {"A": {"Fn::Join": ["", ["x", {"Ref": "B"}]]}}]}
    assert value_of(expr, {"A": "ignored", "B": "b"}) == "xb-b"


def test_sub_bang_escape_keeps_a_policy_variable_literal() -> None:
    # spec §3.5 (CloudFormation semantics)
    assert value_of({"Fn::Sub": "${!iot:ClientId}/${N}"}, {"N": "n"}) == "${iot:ClientId}/n"


def test_sub_missing_parameter_is_a_400_naming_it() -> None:
    err = rejected(config({"Fn::Sub": "x-${Nope}"}))
    assert '"Nope"' in err.message


def test_deeply_nested_functions_evaluate() -> None:
    # spec §3.5: functions compose
    expr = {"Fn::Join": ["/", [
        {"Fn::Select": [0, {"Fn::Split": ["-", {"Ref": "Serial"}]}]},
        {"Fn::Sub": ["${Loc}", {"Loc": {"Fn::FindInMap": ["M", {"Ref": "Where"}, "Code"]}}]},
        {"Fn::Select": [{"Fn::Select": [1, ["0", "1"]]}, {"Fn::Split": [".", "a.b"]}]},
    ]]}
    maps = {"M": {"Seattle": {"Code": "SEA"}}}
    assert value_of(expr, {"Serial": "AB-12", "Where": "Seattle"}, mappings=maps) == "AB/SEA/b"


# --------------------------------------------------------------------------- resources


def test_thing_plan_is_none_without_a_thing_resource() -> None:
    # spec §1.4 (no thing -> no thingName)
    plan = evaluate(body(policy({"PolicyName": "p"})), {}, AUTO)
    assert plan.thing is None and plan.certificate is None


def test_empty_thing_name_is_a_400() -> None:
    err = rejected(body(thing({"ThingName": {"Ref": "N"}})), {"N": ""})
    assert "empty" in err.message


def test_attribute_payload_values_are_strings() -> None:
    # spec §3.2 AttributePayload flat map
    text = body(thing({"ThingName": "t", "AttributePayload": {"n": 3, "ok": True,
                                                              "s": {"Ref": "S"}}}))
    plan = evaluate(text, {"S": "x"}, AUTO)
    assert plan.thing is not None
    assert dict(plan.thing.attributes or {}) == {"n": "3", "ok": "true", "s": "x"}


def test_absent_optional_thing_properties_stay_none() -> None:
    plan = evaluate(body(thing({"ThingName": "t"})), {}, AUTO)
    assert plan.thing == t.ThingPlan("t", None, None, None, None, {})


def test_certificate_status_defaults_to_active() -> None:
    # spec §3.2, edge case 4
    plan = evaluate(body(certificate(CERT_REF)), {}, AUTO)
    assert plan.certificate is not None and plan.certificate.status == "ACTIVE"


@pytest.mark.parametrize(("written", "status"), [
    ("ACTIVE", "ACTIVE"), ("Active", "ACTIVE"), ("INACTIVE", "INACTIVE"), ("inactive", "INACTIVE"),
])
def test_certificate_status_is_case_insensitive(written: str, status: str) -> None:
    # spec §3.2 Status ("Active" observed, S14)
    plan = evaluate(body(certificate({**CERT_REF, "Status": written})), {}, AUTO)
    assert plan.certificate is not None and plan.certificate.status == status


def test_certificate_status_from_a_bad_parameter_is_a_400() -> None:
    err = rejected(body(certificate({**CERT_REF, "Status": {"Ref": "S"}})), {"S": "REVOKED"})
    assert '"REVOKED"' in err.message


def test_certificate_id_other_than_the_provisioned_one_is_a_400() -> None:
    # spec §3.2: fleet provisioning targets the new certificate
    err = rejected(body(certificate({"CertificateId": "00" * 32})))
    assert t.CERTIFICATE_ID_PARAMETER in err.message


def test_csr_certificate_method_is_valid_but_not_usable_in_fleet_provisioning() -> None:
    # spec §3.2: CertificateSigningRequest is bulk/control-plane only
    text = body(certificate({"CertificateSigningRequest": {"Ref": "CSR"}}),
                parameters={"CSR": STRING})
    validate_template_body(text)
    assert "CertificateId" in rejected(text, {"CSR": "x"}).message


def test_certificate_id_spelled_as_in_the_property_list_is_accepted() -> None:
    # S3 lists the property as "CertificateID"; its examples use "CertificateId"
    plan = evaluate(body(certificate({"CertificateID": {"Ref": t.CERTIFICATE_ID_PARAMETER}})),
                    {}, AUTO)
    assert plan.certificate is not None


# --------------------------------------------------------------------------- policies


def test_named_policy_plan_keeps_the_name() -> None:
    # spec §3.2 PolicyName, edge case 14
    plan = evaluate(body(policy({"PolicyName": {"Fn::Sub": "p-${T}"}})), {"T": "x"}, AUTO)
    assert plan.policies == (t.PolicyPlan("policy", "p-x", None),)
    assert plan.policies[0].resolved_name() == "p-x"


def test_inline_policy_is_named_by_sha1_of_its_canonical_document() -> None:
    # spec §3.2, edge case 14 (UNCONFIRMED hash: SHA-1 of canonical JSON)
    doc = {"Version": "2012-10-17", "Statement": [{"Effect": "Allow", "Action": "iot:Connect",
                                                   "Resource": "*"}]}
    (pol,) = evaluate(body(policy({"PolicyDocument": doc})), {}, AUTO).policies
    canonical = json.dumps(doc, sort_keys=True, separators=(",", ":"))
    assert pol.policy_document == canonical
    name = pol.resolved_name()
    assert name == hashlib.sha1(canonical.encode()).hexdigest().upper()
    assert len(name) == 40 and name == name.upper()


def test_identical_documents_written_differently_share_one_policy_name() -> None:
    # spec §3.2: identical resolved documents map to the same policy
    doc = {"Version": "2012-10-17", "Statement": [{"Effect": "Allow", "Action": "iot:*",
                                                   "Resource": "*"}]}
    as_object = body(policy({"PolicyDocument": doc}))
    as_string = body(policy({"PolicyDocument": json.dumps(doc, indent=4)}))
    reordered = body(policy({"PolicyDocument": dict(reversed(list(doc.items())))}))
    names = {evaluate(b, {}, AUTO).policies[0].resolved_name()
             for b in (as_object, as_string, reordered)}
    assert len(names) == 1


def test_per_device_policy_documents_get_different_names() -> None:
    # spec §3.2 (S21: per-device policy when the document embeds device values)
    doc = {"Version": "2012-10-17", "Statement": [{
        "Effect": "Allow", "Action": "iot:Connect",
        "Resource": {"Fn::Join": ["", ["arn:aws:iot:us-east-1:123456789012:client/",
                                       {"Ref": "N"}]]}}]}
    text = body(policy({"PolicyDocument": doc}), parameters={"N": STRING})
    a, b = (evaluate(text, {"N": n}, AUTO).policies[0] for n in ("a", "b"))
    assert a.resolved_name() != b.resolved_name()
    assert json.loads(a.policy_document or "")["Statement"][0]["Resource"].endswith("client/a")


def test_policy_document_keeps_literal_policy_variables_and_json_types() -> None:
    doc = {"Version": "2012-10-17", "Statement": [{
        "Effect": "Allow", "Action": ["iot:Publish"],
        "Resource": ["arn:aws:iot:*:*:topic/${iot:Connection.Thing.ThingName}/*"],
        "Condition": {"NumericLessThan": {"x": 3}, "Bool": {"y": True}}}]}
    (pol,) = evaluate(body(policy({"PolicyDocument": doc})), {}, AUTO).policies
    assert json.loads(pol.policy_document or "") == doc


def test_policy_document_from_a_parameter_is_parsed_and_bad_json_is_a_400() -> None:
    text = body(policy({"PolicyDocument": {"Ref": "Doc"}}))
    (pol,) = evaluate(text, {"Doc": '{"Version": "2012-10-17", "Statement": []}'},
                      AUTO).policies
    assert pol.policy_document == '{"Statement":[],"Version":"2012-10-17"}'
    assert "not valid JSON" in rejected(text, {"Doc": "{nope"}).message
    assert "JSON object" in rejected(text, {"Doc": "[]"}).message


def test_several_policies_keep_template_order() -> None:
    text = body({**policy({"PolicyName": "a"}, "p1"), **policy({"PolicyName": "b"}, "p2")})
    plans = evaluate(text, {}, AUTO).policies
    assert [(p.logical_name, p.policy_name) for p in plans] == [("p1", "a"), ("p2", "b")]


# --------------------------------------------------------------------------- overrides


@pytest.mark.parametrize(("key", "normalised"), [
    ("AttributePayload", "AttributePayload"), ("ATTRIBUTE_PAYLOAD", "AttributePayload"),
    ("ThingTypeName", "ThingTypeName"), ("THING_TYPE_NAME", "ThingTypeName"),
    ("ThingGroups", "ThingGroups"), ("THING_GROUPS", "ThingGroups"),
])
@pytest.mark.parametrize("value", ["DO_NOTHING", "REPLACE", "FAIL"])
def test_thing_override_keys_accept_both_spellings(key: str, normalised: str,
                                                   value: str) -> None:
    # spec §3.3: both spellings, values DO_NOTHING/REPLACE/FAIL everywhere
    plan = evaluate(body(thing({"ThingName": "t"}, {key: value})), {}, AUTO)
    assert plan.thing is not None
    assert dict(plan.thing.overrides) == {normalised: value}
    assert plan.thing.override_for(normalised) == t.Override(value)


@pytest.mark.parametrize("key", ["AttributePayload", "ATTRIBUTE_PAYLOAD", "ThingGroups",
                                 "THING_GROUPS"])
def test_merge_is_accepted_for_attributes_and_groups(key: str) -> None:
    # spec §3.3, edge case 15
    plan = evaluate(body(thing({"ThingName": "t"}, {key: "MERGE"})), {}, AUTO)
    assert plan.thing is not None and "MERGE" in plan.thing.overrides.values()


@pytest.mark.parametrize("key", ["ThingTypeName", "THING_TYPE_NAME"])
def test_merge_is_refused_for_thing_type(key: str) -> None:
    # spec §3.3, edge case 15
    assert "MERGE" in refused(body(thing({"ThingName": "t"}, {key: "MERGE"}))).message


@pytest.mark.parametrize("value", ["DO_NOTHING", "REPLACE", "FAIL"])
def test_certificate_status_override_values(value: str) -> None:
    # spec §3.3 certificate Status
    plan = evaluate(body(certificate(CERT_REF, {"Status": value})), {}, AUTO)
    assert plan.certificate is not None and dict(plan.certificate.overrides) == {"Status": value}


def test_merge_is_refused_for_certificate_status() -> None:
    assert "MERGE" in refused(body(certificate(CERT_REF, {"Status": "MERGE"}))).message


def test_absent_override_means_replace() -> None:
    # spec §3.3 (UNCONFIRMED default)
    plan = evaluate(body(thing({"ThingName": "t"})), {}, AUTO)
    assert plan.thing is not None
    assert plan.thing.override_for("ThingGroups") is t.Override.REPLACE is t.DEFAULT_OVERRIDE


@pytest.mark.parametrize("overrides", [
    {"ThingGroups": "KEEP"}, {"ThingGroups": "merge"}, {"ThingGroups": ["MERGE"]},
    {"BillingGroup": "REPLACE"}, {"ThingName": "REPLACE"},
    {"ThingGroups": "MERGE", "THING_GROUPS": "REPLACE"},
])
def test_bad_thing_overrides_are_refused(overrides: dict[str, Any]) -> None:
    # spec §3.3
    refused(body(thing({"ThingName": "t"}, overrides)))


def test_overrides_on_a_policy_are_refused() -> None:
    # spec §3.3: not available for policy resources
    resources = policy({"PolicyName": "p"})
    resources["policy"]["OverrideSettings"] = {"PolicyName": "REPLACE"}
    assert "policy" in refused(body(resources)).message


# --------------------------------------------------------------------------- device configuration


def test_device_configuration_is_an_empty_map_when_absent() -> None:
    # edge case 10
    assert evaluate(body(thing({"ThingName": "t"})), {}, AUTO).device_configuration == {}


def test_device_configuration_stringifies_scalars() -> None:
    # spec §7: flat string map, non-string scalars stringified
    text = body(device_configuration={"i": 8883, "f": 1.5, "b": False, "s": "x",
                                      "r": {"Ref": "R"}})
    assert evaluate(text, {"R": "r"}, AUTO).device_configuration == {
        "i": "8883", "f": "1.5", "b": "false", "s": "x", "r": "r"}


@pytest.mark.parametrize("value", [{"nested": "x"}, ["a", "b"], None,
                                   {"Fn::Split": [",", "a,b"]}])
def test_device_configuration_refuses_non_flat_values(value: Any) -> None:
    # spec §3.1, §7: nested objects refused at creation
    refused(config(value))


def test_device_configuration_list_from_a_mixed_mapping_is_a_400() -> None:
    maps = {"M": {"k": {"s": "x", "l": ["a"]}}}
    text = config({"Fn::FindInMap": ["M", "k", {"Ref": "W"}]}, mappings=maps)
    validate_template_body(text)
    assert value_of({"Fn::FindInMap": ["M", "k", "s"]}, mappings=maps) == "x"
    assert "list" in rejected(text, {"W": "l"}).message


# --------------------------------------------------------------------------- refused at creation


def test_template_error_is_an_invalid_request_exception() -> None:
    # spec §3.7: creation-time failures are InvalidRequestException (400)
    err = refused("[]")
    assert isinstance(err, InvalidRequestException)
    assert err.code == "InvalidRequestException" and err.status == 400


@pytest.mark.parametrize("text", ["", "not json", "[]", '"x"', "{", '{"a": NaN}',
                                  '{"a": 1e999}'])
def test_body_must_be_a_json_object(text: str) -> None:
    refused(text)


def test_body_over_10240_characters_is_refused_and_at_the_limit_accepted() -> None:
    # spec §5, edge case 13
    base = body(device_configuration={"a": "b"})
    at_limit = base + " " * (t.TEMPLATE_BODY_MAX_CHARS - len(base))
    validate_template_body(at_limit)
    assert "10240" in refused(at_limit + " ").message


@pytest.mark.parametrize("section", ["Parameters", "Mappings", "Resources",
                                     "DeviceConfiguration"])
def test_sections_must_be_objects(section: str) -> None:
    assert section in refused(json.dumps({section: []})).message


@pytest.mark.parametrize("section", ["Conditions", "Outputs", "Transform", "Metadata"])
def test_undocumented_sections_are_refused(section: str) -> None:
    # spec §3.1 / §3.5: Conditions is not documented for IoT templates
    assert section in refused(json.dumps({section: {}})).message


@pytest.mark.parametrize("kind", ["AWS::IoT::ThingGroup", "AWS::S3::Bucket", None, 3])
def test_resource_type_must_be_one_of_the_three(kind: Any) -> None:
    # spec §3.2
    resource: dict[str, Any] = {"Properties": {}}
    if kind is not None:
        resource["Type"] = kind
    assert "Type" in refused(body({"r": resource})).message


@pytest.mark.parametrize("function", [
    "Fn::If", "Fn::Equals", "Fn::Not", "Fn::And", "Fn::Or", "Fn::Base64", "Fn::GetAtt",
    "Fn::ImportValue", "Fn::GetAZs", "Fn::Cidr", "Fn::Length", "Fn::ToJsonString",
])
def test_undocumented_functions_are_refused_as_undocumented(function: str) -> None:
    # spec §3.5: a template that works only in the emulator would be a false pass
    message = refused(config({function: ["a", "b"]})).message
    assert function in message and "not documented by AWS" in message


@pytest.mark.parametrize("function", ["Fn::Nope", "Fn:Join", "Fn::join"])
def test_unknown_functions_are_refused(function: str) -> None:
    assert "unknown intrinsic function" in refused(config({function: ["", ["a"]]})).message


@pytest.mark.parametrize("name", ["AWS::Region", "AWS::AccountId", "AWS::Partition",
                                  "AWS::NoValue", "AWS::IoT::Certificate::Title"])
def test_pseudo_parameters_are_refused(name: str) -> None:
    # spec §3.4 / §3.5: pseudo parameters are not documented for provisioning templates
    assert name in refused(config({"Ref": name})).message
    assert name in refused(config({"Fn::Sub": "x-${" + name + "}"})).message
    assert name in refused(body(parameters={name: STRING})).message


def test_condition_on_a_resource_is_refused() -> None:
    resources = thing({"ThingName": "t"})
    resources["thing"]["Condition"] = "IsProd"
    assert "Condition" in refused(body(resources)).message


def test_ref_to_a_resource_logical_name_is_refused() -> None:
    # spec §3.5: Ref to a resource is UNCONFIRMED, treated as an error
    text = body({**thing({"ThingName": "t"}), **policy({"PolicyName": {"Ref": "thing"}})})
    assert "resource" in refused(text).message


@pytest.mark.parametrize("expr", [
    {"Ref": ""}, {"Ref": ["A"]}, {"Ref": "A", "Other": 1},
    {"Fn::Join": "a,b"}, {"Fn::Join": [",", ["a"], "extra"]}, {"Fn::Join": [{"Ref": "D"}, ["a"]]},
    {"Fn::Join": [",", "a"]}, {"Fn::Join": [",", {"Ref": "L"}]},
    {"Fn::Select": [1.5, ["a"]]}, {"Fn::Select": [True, ["a"]]}, {"Fn::Select": ["x", ["a"]]},
    {"Fn::Select": [-1, ["a"]]}, {"Fn::Select": [0]},
    {"Fn::Split": ["", "a"]}, {"Fn::Split": [",", ["a"]]}, {"Fn::Split": [","]},
    {"Fn::FindInMap": ["M", "k"]}, {"Fn::FindInMap": ["Missing", "k", "v"]},
    {"Fn::Sub": {"Ref": "A"}}, {"Fn::Sub": ["x", ["A"]]}, {"Fn::Sub": ["x"]},
    {"Fn::Sub": "${}"}, {"Fn::Sub": "${iot:ClientId}"}, {"Fn::Sub": "${thing.Arn}"},
    {"Fn::Join": ["", [{"Fn::Split": [",", "a"]}]]},
])
def test_malformed_function_arguments_are_refused(expr: dict[str, Any]) -> None:
    # spec §3.7: malformed function arguments -> creation error
    refused(config(expr, mappings={"M": {"k": {"v": "x"}}}))


def test_policy_with_neither_name_nor_document_gets_aws_message() -> None:
    # spec §3.2 (S26 wording), edge case 14
    message = refused(body(policy({}))).message
    assert ("Invalid registration template. Neither policyName nor policyDocument is present "
            "in the Template.") in message


def test_policy_with_both_name_and_document_is_refused() -> None:
    # spec §3.2, edge case 14
    text = body(policy({"PolicyName": "p", "PolicyDocument": {"Version": "2012-10-17"}}))
    assert "Both policyName and policyDocument" in refused(text).message


@pytest.mark.parametrize("document", ["{not json", "[1]", 42, ["a"]])
def test_bad_inline_policy_documents_are_refused(document: Any) -> None:
    refused(body(policy({"PolicyDocument": document})))


@pytest.mark.parametrize("props", [
    {},
    {"CertificateId": "x", "CertificateSigningRequest": "y"},
    {"CertificatePem": "x", "CertificateSigningRequest": "y"},
    {"CertificateId": "x", "CACertificatePem": "c"},
    {"CertificateId": "x", "CertificateID": "x"},
    {"CertificateId": "x", "Status": "REVOKED"},
    {"CertificateId": "x", "Color": "red"},
])
def test_certificate_resource_must_use_exactly_one_method(props: dict[str, Any]) -> None:
    # spec §3.2: exactly one of CSR / ID / PEM
    refused(body(certificate(props)))


def test_certificate_pem_with_ca_pem_is_a_valid_method() -> None:
    # spec §3.2 (bulk/JITP form)
    validate_template_body(body(certificate({"CertificatePem": {"Ref": "P"},
                                             "CACertificatePem": {"Ref": "C"}})))


@pytest.mark.parametrize("props", [
    {}, {"ThingName": "t", "Colour": "red"}, {"ThingName": "t", "PackageVersions": {}},
    {"ThingName": {"nested": "x"}}, {"ThingName": None}, {"ThingName": ["a"]},
    {"ThingName": "t", "AttributePayload": ["a"]},
    {"ThingName": "t", "AttributePayload": {"a": {"b": "c"}}},
    {"ThingName": "t", "ThingGroups": "g1"}, {"ThingName": "t", "ThingGroups": [["g"]]},
    {"ThingName": {"Fn::Split": [",", "a"]}},
])
def test_malformed_thing_properties_are_refused(props: dict[str, Any]) -> None:
    # spec §3.2 thing properties
    refused(body(thing(props)))


def test_second_thing_resource_is_refused() -> None:
    # spec §3.2 (inferred: at most one thing)
    resources = {**thing({"ThingName": "a"}),
                 "other": {"Type": t.THING_TYPE, "Properties": {"ThingName": "b"}}}
    assert "at most one" in refused(body(resources)).message


@pytest.mark.parametrize("spec", [
    {"Type": "Number"}, {}, {"Type": "String", "Default": 3},
    {"Type": "String", "AllowedValues": ["a"]}, "String",
])
def test_malformed_parameter_declarations_are_refused(spec: Any) -> None:
    # spec §3.1: only type String is documented
    refused(body(parameters={"P": spec}))


@pytest.mark.parametrize("mappings", [
    {"M": {"k": {"v": {"Ref": "P"}}}},
    {"M": {"k": {"v": {"Fn::Join": ["", ["a"]]}}}},
    {"M": {"k": {"v": {"deeper": "x"}}}},
    {"M": {"k": "flat"}}, {"M": "flat"}, {"M": {"k": {"v": None}}},
])
def test_intrinsic_functions_and_nesting_in_mappings_are_refused(mappings: Any) -> None:
    # spec §3.1: no parameters or intrinsic functions inside Mappings
    refused(body(mappings=mappings))


def test_intrinsic_functions_in_mappings_say_so() -> None:
    assert "Mappings" in refused(body(mappings={"M": {"k": {"v": {"Ref": "P"}}}})).message


def test_excessive_nesting_is_refused() -> None:
    deep: Any = "x"
    for _ in range(t.MAX_NESTING_DEPTH + 2):
        deep = {"a": deep}
    refused(body(policy({"PolicyDocument": deep})))
    refused(body(policy({"PolicyDocument": json.dumps(deep)})))
    refused("[" * 5000 + "]" * 5000)


def test_evaluating_an_invalid_stored_body_is_a_400_invalid_template() -> None:
    # spec §1.5: the device gets a rejected payload, never an internal error
    err = rejected('{"Conditions": {}}')
    assert err.status_code == 400 and err.error_code == t.INVALID_TEMPLATE_ERROR_CODE


# --------------------------------------------------------------------------- properties

_EXAMPLES = [
    (FIXTURES / "fleet-provisioning-template.json").read_text(),
    (FIXTURES / "pre-provisioning-hook-template.json").read_text(),
    body(
        {**thing({"ThingName": {"Fn::Sub": "${P}-${AWS::IoT::Certificate::Id}"},
                  "ThingGroups": {"Fn::Split": [",", {"Ref": "G"}]},
                  "AttributePayload": {"i": {"Fn::Select": [{"Ref": "I"},
                                                            {"Fn::Split": ["/", {"Ref": "P"}]}]}}}),
         **certificate({**CERT_REF, "Status": {"Ref": "S"}}),
         **policy({"PolicyDocument": {"Ref": "Doc"}}),
         **policy({"PolicyName": {"Fn::FindInMap": ["M", {"Ref": "G"}, {"Ref": "P"}]}}, "p2")},
        parameters={"P": {"Type": "String", "Default": "d"}, "I": STRING},
        mappings={"M": {"a": {"b": "c"}}},
        device_configuration={"x": {"Ref": "AWS::IoT::Certificate::Country"}},
    ),
]
_KEYS = st.sampled_from(["ThingName", "SerialNumber", "DeviceLocation", "P", "G", "I", "S",
                         "Doc", t.CERTIFICATE_ID_PARAMETER, "AWS::IoT::Certificate::Country"])
_VALUES = st.one_of(st.sampled_from(["Seattle", "0", "1", "-1", "a,b", "ACTIVE", "", "{}",
                                     '{"a": [1]}', "9" * 30]), st.text(max_size=20))


@settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(template=st.sampled_from(_EXAMPLES),
       params=st.dictionaries(st.one_of(_KEYS, st.text(max_size=8)), _VALUES, max_size=8),
       automatic=st.dictionaries(st.sampled_from(sorted(t.RESERVED_PARAMETERS)),
                                 st.text(max_size=10), max_size=3))
def test_evaluate_raises_only_template_evaluation_errors(
        template: str, params: dict[str, str], automatic: dict[str, str]) -> None:
    # spec §1.5: any evaluation failure is a rejected payload
    try:
        plan = evaluate(template, params, automatic)
    except TemplateEvaluationError as exc:
        assert exc.status_code == 400
        return
    assert all(isinstance(v, str) for v in plan.device_configuration.values())
    for pol in plan.policies:
        assert len(pol.resolved_name()) > 0


_JSON = st.recursive(
    st.one_of(st.none(), st.booleans(), st.integers(), st.text(max_size=5),
              st.sampled_from(["Ref", "Fn::Join", "AWS::IoT::Thing", "String",
                               t.CERTIFICATE_ID_PARAMETER, "MERGE"])),
    lambda inner: st.one_of(
        st.lists(inner, max_size=3),
        st.dictionaries(st.sampled_from(["Ref", "Fn::Join", "Fn::Select", "Fn::Split",
                                         "Fn::Sub", "Fn::FindInMap", "Type", "Properties",
                                         "ThingName", "PolicyDocument", "Resources", "x"]),
                        inner, max_size=3)),
    max_leaves=12,
)


@settings(max_examples=150, deadline=None)
@given(doc=st.dictionaries(st.sampled_from(list(t.SECTIONS)), _JSON, max_size=4),
       params=st.dictionaries(st.text(max_size=4), st.text(max_size=4), max_size=3))
def test_random_bodies_raise_only_the_documented_errors(doc: dict[str, Any],
                                                        params: dict[str, str]) -> None:
    text = json.dumps(doc)
    try:
        validate_template_body(text)
    except TemplateError:
        pass
    try:
        evaluate(text, params, AUTO)
    except TemplateEvaluationError:
        pass
