"""Tests of the IoT policy engine (spec iot-broker-and-policy.md §3, §1.9, §7 items 4-6;
fleet-provisioning.md §2.3 for the claim policy)."""

from __future__ import annotations

import datetime as dt
import fnmatch
import ipaddress
import json
from typing import Any

import botocore.session
import pytest
from cryptography import x509
from cryptography.hazmat.primitives import hashes
from cryptography.x509.oid import NameOID
from hypothesis import given, settings
from hypothesis import strategies as st

from harness import pki
from harness.emulator import policy
from harness.emulator.policy import (
    Authorizer,
    ConnectionContext,
    Decision,
    NamedPolicy,
    parse_policy,
    resource_arn,
    test_authorization,
    wildcard_matcher,
)
from harness.errors import InvalidRequestException, MalformedPolicyException

REGION = "us-east-1"
ACCOUNT = "123456789012"
ARN = f"arn:aws:iot:{REGION}:{ACCOUNT}:"


def doc(*statements: dict[str, Any], version: str | None = "2012-10-17") -> str:
    body: dict[str, Any] = {"Statement": list(statements)}
    if version is not None:
        body = {"Version": version, **body}
    return json.dumps(body)


def allow(action: str | list[str], resource: str | list[str], **extra: Any) -> dict[str, Any]:
    return {"Effect": "Allow", "Action": action, "Resource": resource, **extra}


def deny(action: str | list[str], resource: str | list[str], **extra: Any) -> dict[str, Any]:
    return {"Effect": "Deny", "Action": action, "Resource": resource, **extra}


def context(client_id: str = "dev1", **kwargs: Any) -> ConnectionContext:
    kwargs.setdefault("certificate", None)
    return ConnectionContext(region=REGION, account_id=ACCOUNT, client_id=client_id, **kwargs)


def authorizer(*documents: str, **ctx: Any) -> Authorizer:
    return Authorizer([parse_policy(d) for d in documents], context(**ctx))


# A certificate with multi-valued DN fields, SAN and IAN, like the developer guide's example.
SERIAL = 0x921285CBB7A5E086


def make_certificate() -> x509.Certificate:
    key = pki.generate_ec_key()
    subject = x509.Name([
        x509.NameAttribute(NameOID.COUNTRY_NAME, "US"),
        x509.NameAttribute(NameOID.ORGANIZATION_NAME, "Example Corp"),
        x509.NameAttribute(NameOID.ORGANIZATION_NAME, "AnyCompany"),
        x509.NameAttribute(NameOID.ORGANIZATIONAL_UNIT_NAME, "LightBulb"),
        x509.NameAttribute(NameOID.ORGANIZATIONAL_UNIT_NAME, "Kitchen, Floor=2"),
        x509.NameAttribute(NameOID.ORGANIZATIONAL_UNIT_NAME, "wild+card"),
        x509.NameAttribute(NameOID.COMMON_NAME, "LightBulb Device Cert"),
        x509.NameAttribute(NameOID.SERIAL_NUMBER, "123"),
    ])
    issuer = x509.Name([
        x509.NameAttribute(NameOID.ORGANIZATION_NAME, "IoT Devices"),
        x509.NameAttribute(NameOID.COMMON_NAME, "IoT Devices Primary CA"),
    ])
    now = dt.datetime.now(dt.timezone.utc)
    return (
        x509.CertificateBuilder()
        .subject_name(subject)
        .issuer_name(issuer)
        .public_key(key.public_key())
        .serial_number(SERIAL)
        .not_valid_before(now - dt.timedelta(days=1))
        .not_valid_after(now + dt.timedelta(days=1))
        .add_extension(x509.SubjectAlternativeName([
            x509.DNSName("example.com"),
            x509.DNSName("second.example.com"),
            x509.IPAddress(ipaddress.ip_address("1.2.3.4")),
            x509.UniformResourceIdentifier("ResourceIdentifier001"),
            x509.RFC822Name("device1@example.com"),
        ]), critical=False)
        .add_extension(x509.IssuerAlternativeName([x509.DNSName("issuer.com")]), critical=False)
        .sign(key, hashes.SHA256())
    )


CERT = make_certificate()


# -- §3.1 document structure ---------------------------------------------------------------


def test_statement_may_be_a_single_object_and_elements_single_strings() -> None:
    # spec broker §3.1: Statement object or array; Action/Resource string or list
    parsed = parse_policy(json.dumps({
        "Version": "2012-10-17",
        "Statement": {"Effect": "Allow", "Action": "iot:Connect", "Resource": "*"},
    }))
    assert len(parsed.statements) == 1
    statement = parsed.statements[0]
    assert statement.effect == "Allow"
    assert statement.actions == ("iot:Connect",)
    assert statement.resources == ("*",)


def test_mapping_and_text_parse_to_the_same_statements() -> None:
    # spec broker §3.1
    body = {"Version": "2012-10-17", "Statement": [allow(["iot:Publish"], [f"{ARN}topic/a"])]}
    assert parse_policy(body).statements == parse_policy(json.dumps(body, indent=2)).statements


def test_not_resource_and_not_action_parse() -> None:
    # spec broker §3.1: NotResource (AWS examples), NotAction (IAM grammar)
    statement = parse_policy(doc({"Effect": "Deny", "NotAction": "iot:Connect",
                                  "NotResource": [f"{ARN}topic/ok"]})).statements[0]
    assert statement.not_actions == ("iot:Connect",)
    assert statement.not_resources == (f"{ARN}topic/ok",)
    assert statement.actions == () and statement.resources == ()


def test_white_space_does_not_count_toward_the_2048_character_limit() -> None:
    # spec broker §3.1: size ≤ 2048 characters excluding white space
    base = json.loads(doc(allow("iot:Publish", f"{ARN}topic/x")))
    compact = json.dumps(base, separators=(",", ":"))
    filler = 2048 - len(compact)
    base["Statement"][0]["Resource"] = f"{ARN}topic/x" + "y" * filler
    exact = json.dumps(base, indent=8)  # plenty of white space
    assert len(exact) > 2048
    parse_policy(exact)
    base["Statement"][0]["Resource"] += "y"
    with pytest.raises(MalformedPolicyException, match="2049 characters excluding white space"):
        parse_policy(json.dumps(base))


MALFORMED = [
    ("{not json", "not valid JSON: Expecting property name"),
    ("[]", "must be a JSON object"),
    (json.dumps({"Version": "2012-10-17"}), "has no Statement"),
    (json.dumps({"Version": "2013-01-01", "Statement": []}),
     "Unsupported policy Version '2013-01-01'"),
    (json.dumps({"Version": "2012-10-17", "Statement": []}), "non-empty list of objects"),
    (json.dumps({"Version": "2012-10-17", "Statement": "x"}), "non-empty list of objects"),
    (json.dumps({"Version": "2012-10-17", "Statement": ["x"]}), "Statement[0] must be an object"),
    (json.dumps({"Version": "2012-10-17", "Principal": "*", "Statement": []}),
     "Principal is not allowed"),
    (json.dumps({"Version": "2012-10-17", "Foo": 1, "Statement": []}),
     "Unknown policy element 'Foo'"),
    (doc(allow("iot:Connect", "*", Principal={"AWS": "*"})),
     "Statement[0]: Principal is not allowed"),
    (doc({"Action": "iot:Connect", "Resource": "*"}), "Statement[0]: Effect is missing"),
    (doc({"Effect": "allow", "Action": "iot:Connect", "Resource": "*"}),
     "Effect must be 'Allow' or 'Deny', got 'allow'"),
    (doc({"Effect": "Allow", "Resource": "*"}), "needs exactly one of Action or NotAction"),
    (doc(allow("iot:Connect", "*", NotAction="iot:Publish")),
     "needs exactly one of Action or NotAction"),
    (doc({"Effect": "Allow", "Action": "iot:Connect"}),
     "needs exactly one of Resource or NotResource"),
    (doc(allow("iot:Connect", "*", NotResource="*")),
     "needs exactly one of Resource or NotResource"),
    (doc(allow([], "*")), "Action must be a string or a non-empty list of strings"),
    (doc(allow(["iot:Connect", 7], "*")),  # type: ignore[list-item]
     "Action must be a string or a non-empty list of strings"),
    (doc(allow("Publish", "*")), "Action 'Publish' is not '*' or '<service>:<action>'"),
    (doc(allow("iot:Publish", "topic/a")), "Resource 'topic/a' is not '*' or an ARN"),
    (doc(allow("iot:Publish", "*", Effects="Allow")), "Statement[0]: unknown element 'Effects'"),
    (doc(allow("iot:Publish", "*", Sid=3)), "Sid must be a string"),
    (doc(allow("iot:Publish", "*", Condition=["x"])), "Condition must be an object"),
    (doc(allow("iot:Publish", "*", Condition={"StringEqual": {"iot:ClientId": "a"}})),
     "Condition operator 'StringEqual' is not supported"),
    (doc(allow("iot:Publish", "*", Condition={"ForSomeValues:StringEquals": {"k": "a"}})),
     "unknown qualifier 'ForSomeValues'"),
    (doc(allow("iot:Publish", "*", Condition={"NullIfExists": {"k": "true"}})),
     "Condition operator 'NullIfExists' is not supported"),
    (doc(allow("iot:Publish", "*", Condition={"StringEquals": "a"})),
     "must map condition keys to values"),
    (doc(allow("iot:Publish", "*", Condition={"StringEquals": {"k": {"a": 1}}})),
     "values must be strings, numbers or booleans"),
    (doc(allow("iot:Publish", "*", Condition={"StringEquals": {"k": []}})), "has no values"),
    (doc(allow("iot:Publish", "*", Condition={"IpAddress": {"aws:SourceIp": "10.0.0.0/33"}})),
     "IpAddress value '10.0.0.0/33' is not an IP address or CIDR block"),
]


@pytest.mark.parametrize(("text", "message"), MALFORMED, ids=[m for _, m in MALFORMED])
def test_malformed_documents_are_rejected_with_a_precise_message(text: str, message: str) -> None:
    # spec broker §3.1: invalid JSON / grammar / Principal / Version → MalformedPolicyException 400
    with pytest.raises(MalformedPolicyException) as info:
        parse_policy(text)
    assert message in info.value.message
    assert info.value.status == 400
    assert info.value.code == "MalformedPolicyException"


def test_missing_version_defaults_to_the_variables_version() -> None:
    # spec broker §3.1 (UNCONFIRMED; named setting MISSING_VERSION)
    assert parse_policy(doc(allow("iot:Connect", "*"), version=None)).version == "2012-10-17"


# -- §3.3 matching rules, §3.2 resources -----------------------------------------------------

MATCHING = [
    # (policy resource, asked resource, allowed?)  — all for iot:Publish
    (f"{ARN}topic/a/*", f"{ARN}topic/a/b/c", True),  # §3.3 * spans levels
    (f"{ARN}topic/a/*", f"{ARN}topic/a", False),
    (f"{ARN}topic/a?", f"{ARN}topic/ab", True),  # §3.3 ? is one character
    (f"{ARN}topic/a?", f"{ARN}topic/a", False),
    (f"{ARN}topic/a?", f"{ARN}topic/abc", False),
    (f"{ARN}topic/a?c", f"{ARN}topic/a/c", True),  # ? matches / too
    ("arn:aws:iot:*:*:topic/*", f"{ARN}topic/x", True),  # §3.3 wildcards in region/account
    ("arn:aws:iot:us-west-2:*:topic/*", f"{ARN}topic/x", False),
    (f"arn:aws:iot:{REGION}:999999999999:topic/x", f"{ARN}topic/x", False),
    (f"{ARN}topic/a/+", f"{ARN}topic/a/b", False),  # §3.3 + is literal
    (f"{ARN}topic/a/+", f"{ARN}topic/a/+", True),
    (f"{ARN}topic/a/#", f"{ARN}topic/a/b", False),  # §3.3 # is literal
    (f"{ARN}topic/Foo", f"{ARN}topic/foo", False),  # §3.3 case-sensitive
    (f"{ARN}topic/a${{*}}", f"{ARN}topic/a*", True),  # §3.3 ${*} literal
    (f"{ARN}topic/a${{*}}", f"{ARN}topic/ab", False),
    (f"{ARN}topic/a${{?}}", f"{ARN}topic/a?", True),  # §3.3 ${?} literal
    (f"{ARN}topic/a${{?}}", f"{ARN}topic/ab", False),
    (f"{ARN}topic/${{$}}aws/x", f"{ARN}topic/$aws/x", True),  # §3.3 ${$} literal
    (f"{ARN}topic/$aws/things/*/shadow/*", f"{ARN}topic/$aws/things/t1/shadow/update", True),
    ("*", f"{ARN}topic/anything", True),
    (f"{ARN}topic/*", f"{ARN}topicfilter/a", False),  # §3.2 the resource type is part of the ARN
]


@pytest.mark.parametrize(("pattern", "resource", "expected"), MATCHING)
def test_resource_wildcards_follow_iot_matching_rules(pattern: str, resource: str,
                                                     expected: bool) -> None:
    # spec broker §3.3
    auth = authorizer(doc(allow("iot:Publish", pattern)))
    assert auth.allows("iot:Publish", resource) is expected


ACTIONS = [
    ("iot:*", "iot:Receive", True),  # §3.3 wildcards in Action
    ("*", "iot:Connect", True),
    ("iot:Pub*", "iot:Publish", True),
    ("iot:Pub*", "iot:Receive", False),
    ("iot:Publish", "iot:RetainPublish", False),
    ("IOT:publish", "iot:Publish", True),  # §3.3 action names case-insensitive (UNCONFIRMED)
    ("iot:Publish", "iot:PUBLISH", True),
]


@pytest.mark.parametrize(("pattern", "action", "expected"), ACTIONS)
def test_action_patterns_match_case_insensitively_with_wildcards(pattern: str, action: str,
                                                                 expected: bool) -> None:
    # spec broker §3.3
    auth = authorizer(doc(allow(pattern, "*")))
    assert auth.allows(action, f"{ARN}topic/a") is expected


def test_action_case_sensitivity_is_a_named_setting(monkeypatch: pytest.MonkeyPatch) -> None:
    # spec broker §3.3 (UNCONFIRMED default made a setting)
    monkeypatch.setattr(policy, "ACTION_NAMES_CASE_INSENSITIVE", False)
    auth = authorizer(doc(allow("IOT:publish", "*")))
    assert not auth.allows("iot:Publish", f"{ARN}topic/a")


def test_subscribe_checks_the_literal_filter_against_topicfilter_resources() -> None:
    # spec broker §3.3, §7 item 4: a/# is checked as the literal string topicfilter/a/#
    star = authorizer(doc(allow("iot:Subscribe", f"{ARN}topicfilter/a/*")))
    plus = authorizer(doc(allow("iot:Subscribe", f"{ARN}topicfilter/a/+")))
    assert star.can_subscribe("a/#")
    assert star.can_subscribe("a/+/c")
    assert not plus.can_subscribe("a/#")
    assert not plus.can_subscribe("a/b")
    assert plus.can_subscribe("a/+")
    topic_only = authorizer(doc(allow("iot:Subscribe", f"{ARN}topic/a/*")))
    assert not topic_only.can_subscribe("a/b")  # §6: Subscribe on topic/ instead of topicfilter/


def test_deny_on_a_topicfilter_does_not_stop_a_wider_filter_only_deny_receive_does() -> None:
    # spec broker §3.3, §7 items 4-5
    text = doc(
        allow(["iot:Subscribe"], f"{ARN}topicfilter/a/*"),
        allow(["iot:Receive"], f"{ARN}topic/a/*"),
        deny("iot:Subscribe", f"{ARN}topicfilter/a/restricted/*"),
    )
    auth = authorizer(text)
    assert not auth.can_subscribe("a/restricted/x")
    assert auth.can_subscribe("a/#")
    assert auth.can_receive("a/restricted/x")
    receive_denied = authorizer(text, doc(deny("iot:Receive", f"{ARN}topic/a/restricted/*")))
    assert not receive_denied.can_receive("a/restricted/x")
    assert receive_denied.can_receive("a/open")


def test_receive_is_checked_on_the_concrete_topic() -> None:
    # spec broker §1.9, §7 item 4
    auth = authorizer(doc(allow("iot:Receive", f"{ARN}topic/sensors/*/temp")))
    assert auth.can_receive("sensors/k1/temp")
    assert not auth.can_receive("sensors/k1/humidity")


def test_connect_is_checked_on_the_client_resource() -> None:
    # spec broker §1.9, §3.2
    auth = authorizer(doc(allow("iot:Connect", f"{ARN}client/dev-*")), client_id="dev-7")
    assert auth.can_connect()
    other = authorizer(doc(allow("iot:Connect", f"{ARN}client/dev-*")), client_id="x")
    assert not other.can_connect()


def test_retained_publish_also_needs_retain_publish() -> None:
    # spec broker §1.9, §3.2: iot:RetainPublish in addition to iot:Publish when RETAIN is set
    only_publish = authorizer(doc(allow("iot:Publish", f"{ARN}topic/will")))
    assert only_publish.can_publish("will")
    assert not only_publish.can_publish("will", retain=True)
    both = authorizer(doc(allow(["iot:Publish", "iot:RetainPublish"], f"{ARN}topic/will")))
    assert both.can_publish("will", retain=True)
    retain_only = authorizer(doc(allow("iot:RetainPublish", f"{ARN}topic/will")))
    assert not retain_only.can_publish("will", retain=True)


def test_resource_arn_builds_the_checked_arn() -> None:
    # spec broker §1.9: prefix arn:aws:iot:<region>:<account>:
    assert resource_arn(REGION, ACCOUNT, "topicfilter", "a/#") == f"{ARN}topicfilter/a/#"
    assert resource_arn("cn-north-1", ACCOUNT, "client", "c").startswith("arn:aws-cn:iot:")


# -- §3.4 evaluation ------------------------------------------------------------------------


def test_no_policy_means_implicit_deny() -> None:
    # spec broker §3.4 item 4: default deny
    auth = Authorizer([], context())
    assert auth.evaluate("iot:Connect", f"{ARN}client/dev1") is Decision.IMPLICIT_DENY
    assert not auth.can_connect()


def test_explicit_deny_beats_allow_within_and_across_documents() -> None:
    # spec broker §3.4 item 4, §7 item 5
    same = authorizer(doc(allow("iot:*", "*"), deny("iot:Publish", f"{ARN}topic/secret")))
    assert same.evaluate("iot:Publish", f"{ARN}topic/secret") is Decision.EXPLICIT_DENY
    assert same.evaluate("iot:Publish", f"{ARN}topic/open") is Decision.ALLOWED
    across = authorizer(doc(deny("iot:Publish", f"{ARN}topic/secret")), doc(allow("iot:*", "*")))
    assert across.evaluate("iot:Publish", f"{ARN}topic/secret") is Decision.EXPLICIT_DENY


def test_not_resource_allows_everything_but_the_listed_resources() -> None:
    # spec broker §3.1 NotResource
    auth = authorizer(doc({"Effect": "Allow", "Action": "iot:Publish",
                           "NotResource": [f"{ARN}topic/admin/*"]}))
    assert auth.can_publish("telemetry")
    assert not auth.can_publish("admin/reboot")
    assert auth.evaluate("iot:Publish", f"{ARN}topic/admin/x") is Decision.IMPLICIT_DENY


def test_not_action_denies_every_other_action() -> None:
    # spec broker §3.1 NotAction (IAM grammar, UNCONFIRMED for IoT)
    auth = authorizer(doc(allow("iot:*", "*"),
                          {"Effect": "Deny", "NotAction": ["iot:Connect", "iot:Receive"],
                           "Resource": "*"}))
    assert auth.can_connect()
    assert auth.can_receive("t")
    assert auth.evaluate("iot:Publish", f"{ARN}topic/t") is Decision.EXPLICIT_DENY


def test_decisions_are_cached_in_a_bounded_dict(monkeypatch: pytest.MonkeyPatch) -> None:
    # spec broker §3.4; the cache is bounded (DECISION_CACHE_SIZE) and never changes an answer
    monkeypatch.setattr(policy, "DECISION_CACHE_SIZE", 8)
    auth = authorizer(doc(allow("iot:Publish", f"{ARN}topic/even/*")))
    for round_ in range(2):
        for i in range(40):
            assert auth.can_publish(f"even/{i}") and not auth.can_publish(f"odd/{i}"), round_
    assert auth.decisions.cached <= 8


def test_a_policy_set_shares_decisions_only_between_equal_referenced_values() -> None:
    # spec broker §3.5: a binding depends on the values of the variables the documents use
    shared = policy.PolicySet([parse_policy(doc(allow("iot:Publish", f"{ARN}topic/claim/*")))])
    a = Authorizer.for_policy_set(shared, context(client_id="a"))
    b = Authorizer.for_policy_set(shared, context(client_id="b"))
    assert a.decisions is b.decisions  # ${iot:ClientId} is not used: one binding
    own = policy.PolicySet([parse_policy(doc(
        allow("iot:Publish", f"{ARN}topic/devices/${{iot:ClientId}}/*")))])
    a, b = (Authorizer.for_policy_set(own, context(client_id=c)) for c in "ab")
    again = Authorizer.for_policy_set(own, context(client_id="a"))
    assert a.decisions is not b.decisions and a.decisions is again.decisions
    assert a.can_publish("devices/a/x") and not a.can_publish("devices/b/x")
    assert b.can_publish("devices/b/x") and not b.can_publish("devices/a/x")


def test_condition_keys_are_part_of_the_binding() -> None:
    # spec broker §3.5: condition keys decide statements, so they split bindings too
    text = doc(allow("iot:Publish", f"{ARN}topic/*",
                     Condition={"StringEquals": {"iot:ClientId": "admin"}}))
    shared = policy.PolicySet([parse_policy(text)])
    admin = Authorizer.for_policy_set(shared, context(client_id="admin"))
    other = Authorizer.for_policy_set(shared, context(client_id="other"))
    assert admin.can_publish("t") and not other.can_publish("t")
    assert shared.referenced == ("iot:ClientId",)


def test_a_policy_set_keeps_a_bounded_number_of_bindings() -> None:
    text = doc(allow("iot:Publish", f"{ARN}topic/devices/${{iot:ClientId}}/*"))
    bounded = policy.PolicySet([parse_policy(text)], max_bindings=2)
    first = Authorizer.for_policy_set(bounded, context(client_id="c0")).decisions
    for i in range(1, 4):
        Authorizer.for_policy_set(bounded, context(client_id=f"c{i}"))
    again = Authorizer.for_policy_set(bounded, context(client_id="c0"))
    assert again.decisions is not first and again.can_publish("devices/c0/x")


# -- §3.5 policy variables ------------------------------------------------------------------


def test_client_id_variable_is_substituted() -> None:
    # spec broker §3.5 ${iot:ClientId}
    text = doc(allow("iot:Publish", f"{ARN}topic/devices/${{iot:ClientId}}/*"))
    auth = authorizer(text, client_id="dev1")
    assert auth.can_publish("devices/dev1/telemetry")
    assert not auth.can_publish("devices/dev2/telemetry")


def test_variable_names_are_case_insensitive() -> None:
    # spec broker §3.5 (IAM convention)
    auth = authorizer(doc(allow("iot:Publish", f"{ARN}topic/${{IOT:clientid}}")), client_id="d")
    assert auth.can_publish("d")


def test_domain_name_variable_is_substituted_when_known() -> None:
    # spec broker §3.5 ${iot:DomainName}
    text = doc(allow("iot:Publish", f"{ARN}topic/${{iot:DomainName}}/x"))
    assert authorizer(text, domain_name="iot.example.com").can_publish("iot.example.com/x")
    assert not authorizer(text).can_publish("${iot:DomainName}/x")


def test_thing_variables_resolve_for_a_connection_with_a_thing() -> None:
    # spec broker §3.5 thing variables, §7 item 6
    text = doc(allow("iot:Publish", [
        f"{ARN}topic/things/${{iot:Connection.Thing.ThingName}}/*",
        f"{ARN}topic/types/${{iot:Connection.Thing.ThingTypeName}}",
        f"{ARN}topic/sites/${{iot:Connection.Thing.Attributes[site]}}",
    ]))
    auth = authorizer(text, client_id="bulb-1", thing_name="bulb-1", thing_type_name="Bulb",
                      thing_attributes={"site": "paris", "Site": "other"}, is_attached=True)
    assert auth.can_publish("things/bulb-1/state")
    assert auth.can_publish("types/Bulb")
    assert auth.can_publish("sites/paris")
    assert not auth.can_publish("sites/other")  # attribute names are case-sensitive
    assert not auth.can_publish("things/bulb-2/state")


def test_unresolved_thing_variable_gives_neither_allow_nor_deny() -> None:
    # spec broker §3.5, §7 items 5-6: without a thing the ${...} stays and matches nothing,
    # so a Deny with an unresolved variable does not protect (UNRESOLVED_VARIABLE_MATCHES_NOTHING)
    allow_text = doc(
        allow("iot:Publish", f"{ARN}topic/things/${{iot:Connection.Thing.ThingName}}/*"))
    auth = authorizer(allow_text, client_id="bulb-1")
    assert not auth.can_publish("things/bulb-1/state")
    assert not auth.can_publish("things/${iot:Connection.Thing.ThingName}/state")
    guarded = authorizer(
        doc(allow("iot:Publish", "*"),
            deny("iot:Publish", f"{ARN}topic/${{iot:Connection.Thing.ThingName}}/*")),
        client_id="bulb-1",
    )
    assert guarded.evaluate("iot:Publish", f"{ARN}topic/bulb-1/x") is Decision.ALLOWED
    missing_attr = authorizer(
        doc(allow("iot:Publish", f"{ARN}topic/${{iot:Connection.Thing.Attributes[nope]}}")),
        thing_name="t", client_id="t",
    )
    assert not missing_attr.can_publish("${iot:Connection.Thing.Attributes[nope]}")


def test_unresolved_variable_in_not_resource_makes_the_statement_inert() -> None:
    # spec broker §3.5: an unresolved statement contributes neither Allow nor Deny
    auth = authorizer(doc({"Effect": "Allow", "Action": "iot:Publish",
                           "NotResource": f"{ARN}topic/${{iot:Connection.Thing.ThingName}}"}))
    assert not auth.can_publish("anything")


def test_unresolved_variable_is_literal_when_the_setting_is_off(
        monkeypatch: pytest.MonkeyPatch) -> None:
    # spec broker §3.5 (UNCONFIRMED default made a setting)
    monkeypatch.setattr(policy, "UNRESOLVED_VARIABLE_MATCHES_NOTHING", False)
    auth = authorizer(doc(allow("iot:Publish", f"{ARN}topic/${{iot:Connection.Thing.ThingName}}")))
    assert auth.can_publish("${iot:Connection.Thing.ThingName}")


def test_version_2008_documents_have_no_variables() -> None:
    # IAM rule for Version 2008-10-17, applied to IoT (spec broker §3.1 "same grammar as IAM")
    auth = authorizer(doc(allow("iot:Publish", f"{ARN}topic/${{iot:ClientId}}"),
                          version="2008-10-17"), client_id="d")
    assert not auth.can_publish("d")
    assert auth.can_publish("${iot:ClientId}")


def test_values_with_wildcard_characters_or_over_1024_characters_are_not_substituted() -> None:
    # spec broker §3.5: values containing * $ + ? # or longer than 1024 are not substituted
    text = doc(allow("iot:Publish", f"{ARN}topic/c/${{iot:ClientId}}"))
    for client_id in ("a+b", "a#", "a*", "a?", "$a"):
        assert not authorizer(text, client_id=client_id).can_publish(f"c/{client_id}")
    long_id = "x" * 1025
    assert not authorizer(text, client_id=long_id).can_publish(f"c/{long_id}")
    ok_id = "x" * 1024
    assert authorizer(text, client_id=ok_id).can_publish(f"c/{ok_id}")


def test_certificate_subject_and_issuer_fields_are_substituted() -> None:
    # spec broker §3.5 ${iot:Certificate.Subject.<F>} / Issuer.<F>, first value by default
    text = doc(allow("iot:Publish", [
        f"{ARN}topic/cn/${{iot:Certificate.Subject.CommonName}}",
        f"{ARN}topic/org/${{iot:Certificate.Subject.Organization}}",
        f"{ARN}topic/org1/${{iot:Certificate.Subject.Organization.1}}",
        f"{ARN}topic/org2/${{iot:Certificate.Subject.Organization.2}}",
        f"{ARN}topic/issuer/${{iot:Certificate.Issuer.CommonName}}",
        f"{ARN}topic/dnserial/${{iot:Certificate.Subject.SerialNumber}}",
    ]))
    auth = authorizer(text, certificate=CERT)
    assert auth.can_publish("cn/LightBulb Device Cert")
    assert auth.can_publish("org/Example Corp")
    assert auth.can_publish("org1/AnyCompany")  # .1 is the second value
    assert not auth.can_publish("org2/AnyCompany")  # index out of range: unresolved
    assert auth.can_publish("issuer/IoT Devices Primary CA")
    assert auth.can_publish("dnserial/123")


def test_dn_special_characters_are_backslash_escaped_in_values() -> None:
    # spec broker §3.5: , " \ + = < > ; must be backslash-escaped in the policy
    ou = "iot:Certificate.Subject.OrganizationalUnit"
    text = doc(allow("iot:Publish", f"{ARN}topic/ou/${{{ou}.1}}"))
    auth = authorizer(text, certificate=CERT)
    assert auth.can_publish("ou/Kitchen\\, Floor\\=2")
    assert not auth.can_publish("ou/Kitchen, Floor=2")
    plus = doc(allow("iot:Publish", f"{ARN}topic/ou/${{{ou}.2}}"))
    assert not authorizer(plus, certificate=CERT).can_publish("ou/wild\\+card")  # has +: kept


def test_alternative_names_serial_number_and_certificate_id_are_substituted() -> None:
    # spec broker §3.5: ...AlternativeName.{DNSName,...}, SerialNumber (decimal), CertificateId
    text = doc(allow("iot:Publish", [
        f"{ARN}topic/dns/${{iot:Certificate.Subject.AlternativeName.DNSName}}",
        f"{ARN}topic/dns1/${{iot:Certificate.Subject.AlternativeName.DNSName.1}}",
        f"{ARN}topic/ip/${{iot:Certificate.Subject.AlternativeName.IPAddress}}",
        f"{ARN}topic/uri/${{iot:Certificate.Subject.AlternativeName.UniformResourceIdentifier}}",
        f"{ARN}topic/mail/${{iot:Certificate.Subject.AlternativeName.RFC822Name}}",
        f"{ARN}topic/ian/${{iot:Certificate.Issuer.AlternativeName.DNSName}}",
        f"{ARN}topic/serial/${{iot:Certificate.SerialNumber}}",
        f"{ARN}topic/id/${{iot:CertificateId}}",
        f"{ARN}topic/dir/${{iot:Certificate.Subject.AlternativeName.DirectoryName}}",
    ]))
    auth = authorizer(text, certificate=CERT)
    assert auth.can_publish("dns/example.com")
    assert auth.can_publish("dns1/second.example.com")
    assert auth.can_publish("ip/1.2.3.4")
    assert auth.can_publish("uri/ResourceIdentifier001")
    assert auth.can_publish("mail/device1@example.com")
    assert auth.can_publish("ian/issuer.com")
    assert auth.can_publish("serial/10525622389124227206")  # developer guide's example value
    assert auth.can_publish(f"id/{pki.certificate_id(CERT)}")
    assert not auth.can_publish("dir/${iot:Certificate.Subject.AlternativeName.DirectoryName}")


def test_certificate_variables_are_unresolved_without_a_certificate() -> None:
    # spec broker §3.5
    text = doc(allow("iot:Publish", f"{ARN}topic/${{iot:Certificate.Subject.CommonName}}"))
    assert not authorizer(text).can_publish("${iot:Certificate.Subject.CommonName}")


def test_list_form_feeds_set_conditions() -> None:
    # spec broker §3.5 .List with ForAllValues:, the cert-policy-variables page's example
    def publish_allowed(values: list[str]) -> bool:
        text = doc(allow("iot:Publish", f"{ARN}topic/t", Condition={
            "ForAllValues:StringEquals": {"iot:Certificate.Subject.Organization.List": values}}))
        return authorizer(text, certificate=CERT).can_publish("t")

    assert publish_allowed(["Example Corp", "AnyCompany"])
    assert not publish_allowed(["Example Corp"])


def test_available_keys_lists_populated_certificate_variables() -> None:
    # spec broker §3.5 iot:Certificate.AvailableKeys
    def allowed(key: str) -> bool:
        text = doc(allow("iot:Connect", "*", Condition={
            "ForAnyValue:StringEquals": {"iot:Certificate.AvailableKeys": key}}))
        return authorizer(text, certificate=CERT).can_connect()

    assert allowed("iot:Certificate.Subject.CommonName")
    assert allowed("iot:Certificate.SerialNumber")
    assert allowed("iot:Certificate.Subject.AlternativeName.DNSName")
    assert not allowed("iot:Certificate.Subject.Title")


# -- conditions (IAM semantics, spec broker §3.5) -------------------------------------------


def connect_allowed(condition: dict[str, Any], **ctx: Any) -> bool:
    return authorizer(doc(allow("iot:Connect", "*", Condition=condition)), **ctx).can_connect()


@pytest.mark.parametrize(("condition", "ctx", "expected"), [
    ({"StringEquals": {"iot:ClientId": "dev1"}}, {}, True),
    ({"StringEquals": {"iot:ClientId": ["a", "dev1"]}}, {}, True),  # values OR-ed
    ({"StringEquals": {"iot:ClientId": "DEV1"}}, {}, False),
    ({"StringNotEquals": {"iot:ClientId": ["a", "b"]}}, {}, True),
    ({"StringNotEquals": {"iot:ClientId": ["a", "dev1"]}}, {}, False),  # NOR for negations
    ({"StringEqualsIgnoreCase": {"iot:ClientId": "DEV1"}}, {}, True),
    ({"StringLike": {"iot:ClientId": "dev*"}}, {}, True),
    ({"StringLike": {"iot:ClientId": "de?"}}, {}, False),
    ({"StringNotLike": {"iot:ClientId": "dev*"}}, {}, False),
    ({"StringEquals": {"iot:ClientId": "${iot:Connection.Thing.ThingName}"}},
     {"thing_name": "dev1"}, True),  # variables in condition values
    ({"StringEquals": {"iot:ClientId": "${iot:Connection.Thing.ThingName}"}}, {}, False),
    ({"StringNotEquals": {"iot:ClientId": "${iot:Connection.Thing.ThingName}"}}, {}, False),
    ({"StringEquals": {"iot:Connection.Thing.ThingTypeName": "Bulb"}},
     {"thing_name": "dev1", "thing_type_name": "Bulb"}, True),
    ({"StringEquals": {"iot:Connection.Thing.Attributes[site]": "paris"}},
     {"thing_name": "dev1", "thing_attributes": {"site": "paris"}}, True),
    ({"Bool": {"iot:Connection.Thing.IsAttached": "true"}}, {"is_attached": True}, True),
    ({"Bool": {"iot:Connection.Thing.IsAttached": True}}, {"is_attached": True}, True),
    ({"Bool": {"iot:Connection.Thing.IsAttached": "true"}}, {"is_attached": False}, False),
    ({"Bool": {"iot:Connection.Thing.IsAttached": "false"}}, {"is_attached": False}, True),
    ({"IpAddress": {"aws:SourceIp": "10.0.0.0/8"}}, {"source_ip": "10.1.2.3"}, True),
    ({"IpAddress": {"aws:SourceIp": ["192.168.0.0/16", "10.1.2.3"]}}, {"source_ip": "10.1.2.3"},
     True),
    ({"IpAddress": {"aws:SourceIp": "10.0.0.0/8"}}, {"source_ip": "11.0.0.1"}, False),
    ({"NotIpAddress": {"aws:SourceIp": "10.0.0.0/8"}}, {"source_ip": "11.0.0.1"}, True),
    ({"NotIpAddress": {"aws:SourceIp": "10.0.0.0/8"}}, {"source_ip": "10.0.0.1"}, False),
    ({"IpAddress": {"aws:SourceIp": "2001:db8::/32"}}, {"source_ip": "2001:db8::1"}, True),
    ({"IpAddress": {"aws:SourceIp": "10.0.0.0/8"}}, {}, False),  # missing key → false
    ({"NotIpAddress": {"aws:SourceIp": "10.0.0.0/8"}}, {}, False),  # even for negations
    ({"IpAddressIfExists": {"aws:SourceIp": "10.0.0.0/8"}}, {}, True),  # ...IfExists
    ({"StringEqualsIfExists": {"iot:DomainName": "x"}}, {"domain_name": "y"}, False),
    ({"Null": {"iot:Connection.Thing.ThingName": "true"}}, {}, True),
    ({"Null": {"iot:Connection.Thing.ThingName": "false"}}, {}, False),
    ({"Null": {"iot:Connection.Thing.ThingName": "false"}}, {"thing_name": "t"}, True),
    ({"Null": {"iot:Certificate.SerialNumber": "false",
               "iot:Certificate.Subject.CommonName": "false"}}, {"certificate": CERT}, True),
    ({"StringEquals": {"iot:ClientId": "dev1", "iot:DomainName": "d"}}, {"domain_name": "e"},
     False),  # keys AND-ed
    ({"StringEquals": {"iot:ClientId": "dev1"},
      "Bool": {"iot:Connection.Thing.IsAttached": "true"}}, {}, False),  # operators AND-ed
    ({"StringEquals": {"iot:Certificate.Subject.OrganizationalUnit": "LightBulb"}},
     {"certificate": CERT}, True),
    ({"StringEquals": {"iot:Certificate.Subject.OrganizationalUnit.1": "Kitchen\\, Floor\\=2"}},
     {"certificate": CERT}, True),
    ({"StringEquals": {"aws:unknownKey": "x"}}, {}, False),
    ({"stringequals": {"IOT:CLIENTID": "dev1"}}, {}, True),  # operator and key case-insensitive
])
def test_condition_operators_follow_iam_semantics(condition: dict[str, Any], ctx: dict[str, Any],
                                                  expected: bool) -> None:
    # spec broker §3.5: conditions, missing key → false except IfExists/Null (IAM semantics)
    assert connect_allowed(condition, **ctx) is expected


@pytest.mark.parametrize(("operator", "attributes", "expected"), [
    # AWS's connect-policy examples: PersistentConnect allowed / forbidden
    ("ForAllValues:StringEquals", frozenset(), True),
    ("ForAllValues:StringEquals", frozenset({"PersistentConnect"}), True),
    ("ForAllValues:StringEquals", frozenset({"LastWill"}), False),
    ("ForAllValues:StringEquals", frozenset({"LastWill", "PersistentConnect"}), False),
    ("ForAllValues:StringNotEquals", frozenset(), True),
    ("ForAllValues:StringNotEquals", frozenset({"PersistentConnect"}), False),
    ("ForAllValues:StringNotEquals", frozenset({"LastWill"}), True),
    ("ForAnyValue:StringEquals", frozenset(), False),
    ("ForAnyValue:StringEquals", frozenset({"LastWill", "PersistentConnect"}), True),
    ("ForAnyValue:StringEqualsIfExists", frozenset(), True),
])
def test_connect_attributes_use_set_operators(operator: str, attributes: frozenset[str],
                                              expected: bool) -> None:
    # spec broker §3.5 iot:ConnectAttributes with ForAllValues:/ForAnyValue:
    condition = {operator: {"iot:ConnectAttributes": ["PersistentConnect"]}}
    assert connect_allowed(condition, connect_attributes=attributes) is expected


def test_is_attached_gates_connect_as_in_the_thing_policy_example() -> None:
    # spec broker §3.5 iot:Connection.Thing.IsAttached, §7 item 6 ("true"/"false" string)
    text = doc(allow("iot:Connect", "*",
                     Condition={"Bool": {"iot:Connection.Thing.IsAttached": ["true"]}}))
    assert authorizer(text, thing_name="dev1", is_attached=True).can_connect()
    assert not authorizer(text).can_connect()


def test_a_deny_whose_condition_fails_does_not_deny() -> None:
    # spec broker §3.4: a Deny matches only when action, resource and all conditions match
    text = doc(allow("iot:*", "*"),
               deny("iot:Connect", "*", Condition={"NotIpAddress": {"aws:SourceIp": "10.0.0.0/8"}}))
    assert authorizer(text, source_ip="10.0.0.7").can_connect()
    assert not authorizer(text, source_ip="8.8.8.8").can_connect()


# -- fleet-provisioning.md §2.3: the documented claim policy ----------------------------------

CLAIM_POLICY = json.dumps({
    "Version": "2012-10-17",
    "Statement": [
        {"Effect": "Allow", "Action": ["iot:Connect"], "Resource": "*"},
        {"Effect": "Allow", "Action": ["iot:Publish", "iot:Receive"], "Resource": [
            f"{ARN}topic/$aws/certificates/create/*",
            f"{ARN}topic/$aws/provisioning-templates/FleetTemplate/provision/*",
        ]},
        {"Effect": "Allow", "Action": "iot:Subscribe", "Resource": [
            f"{ARN}topicfilter/$aws/certificates/create/*",
            f"{ARN}topicfilter/$aws/provisioning-templates/FleetTemplate/provision/*",
        ]},
    ],
}, indent=4)


def test_claim_policy_grants_the_create_and_provision_topics() -> None:
    # fleet-provisioning.md §2.3, §1.1
    auth = Authorizer([parse_policy(CLAIM_POLICY)], context(client_id="claim-anything"))
    assert auth.can_connect()
    for fmt in ("json", "cbor"):
        assert auth.can_publish(f"$aws/certificates/create/{fmt}")
        assert auth.can_subscribe(f"$aws/certificates/create/{fmt}/accepted")
        assert auth.can_receive(f"$aws/certificates/create/{fmt}/rejected")
        assert auth.can_publish(f"$aws/provisioning-templates/FleetTemplate/provision/{fmt}")
        assert auth.can_receive(
            f"$aws/provisioning-templates/FleetTemplate/provision/{fmt}/accepted")
    assert auth.can_subscribe("$aws/certificates/create/+/accepted")  # + is literal, * spans it
    assert not auth.can_publish("$aws/provisioning-templates/OtherTemplate/provision/json")
    assert not auth.can_publish("devices/telemetry")
    assert not auth.can_publish("$aws/certificates/create/json", retain=True)


def test_claim_policy_create_wildcard_does_not_cover_create_from_csr() -> None:
    # fleet-provisioning.md §1.1 and edge case 12: create/* does not grant create-from-csr
    auth = Authorizer([parse_policy(CLAIM_POLICY)], context())
    assert not auth.can_publish("$aws/certificates/create-from-csr/json")
    assert not auth.can_subscribe("$aws/certificates/create-from-csr/json/accepted")
    assert not auth.can_receive("$aws/certificates/create-from-csr/json/accepted")


# -- TestAuthorization (§3.4 item 5) --------------------------------------------------------


def _check_shape(value: Any, shape: Any, path: str = "") -> None:
    """Every key and enum value is one botocore's ``iot`` model knows for this shape."""
    if shape.type_name == "structure":
        assert isinstance(value, dict), path
        for key, item in value.items():
            assert key in shape.members, f"{path}.{key} not in {shape.name}"
            _check_shape(item, shape.members[key], f"{path}.{key}")
    elif shape.type_name == "list":
        assert isinstance(value, list), path
        for i, item in enumerate(value):
            _check_shape(item, shape.member, f"{path}[{i}]")
    elif shape.type_name == "string":
        assert isinstance(value, str), path
        if shape.enum:
            assert value in shape.enum, path


def test_test_authorization_reports_decisions_in_botocores_shape() -> None:
    # spec broker §3.4 item 5: ALLOWED, EXPLICIT_DENY, IMPLICIT_DENY, missingContextValues
    policies = {
        "Allower": parse_policy(doc(allow("iot:*", "*"))),
        "Denier": parse_policy(doc(deny("iot:Publish", f"{ARN}topic/secret"))),
        "Thingy": parse_policy(doc(allow("iot:Publish",
                                         f"{ARN}topic/${{iot:Connection.Thing.ThingName}}"))),
    }
    results = test_authorization(policies, context(), [
        {"actionType": "PUBLISH", "resources": [f"{ARN}topic/open"]},
        {"actionType": "PUBLISH", "resources": [f"{ARN}topic/open", f"{ARN}topic/secret"]},
        {"actionType": "CONNECT", "resources": [f"{ARN}client/dev1"]},
    ])
    model = botocore.session.get_session().get_service_model("iot")
    output = model.operation_model("TestAuthorization").output_shape
    _check_shape({"authResults": results}, output)

    first, second, third = results
    assert first["authDecision"] == "ALLOWED"
    assert first["allowed"]["policies"] == [
        {"policyName": "Allower", "policyArn": f"{ARN}policy/Allower"}]
    assert [p["policyName"] for p in first["denied"]["implicitDeny"]["policies"]] == [
        "Denier", "Thingy"]
    assert first["missingContextValues"] == ["iot:Connection.Thing.ThingName"]
    assert second["authDecision"] == "EXPLICIT_DENY"
    assert [p["policyName"] for p in second["denied"]["explicitDeny"]["policies"]] == ["Denier"]
    assert third["authDecision"] == "ALLOWED"
    assert third["missingContextValues"] == []
    assert third["authInfo"] == {"actionType": "CONNECT", "resources": [f"{ARN}client/dev1"]}


def test_test_authorization_gives_implicit_deny_without_policies_and_takes_named_policies() -> None:
    # spec broker §3.4 item 4-5
    [empty] = test_authorization([], context(), [
        {"actionType": "SUBSCRIBE", "resources": [f"{ARN}topicfilter/a/#"]}])
    assert empty["authDecision"] == "IMPLICIT_DENY"
    named = NamedPolicy("p", parse_policy(doc(allow("iot:Subscribe", f"{ARN}topicfilter/a/*"))),
                        arn="arn:custom")
    [result] = test_authorization([named], context(), [
        {"actionType": "SUBSCRIBE", "resources": [f"{ARN}topicfilter/a/#"]}])
    assert result["authDecision"] == "ALLOWED"
    assert result["allowed"]["policies"] == [{"policyName": "p", "policyArn": "arn:custom"}]


def test_test_authorization_rejects_an_unknown_action_type() -> None:
    # botocore model: actionType ∈ PUBLISH, SUBSCRIBE, RECEIVE, CONNECT
    with pytest.raises(InvalidRequestException, match="actionType"):
        test_authorization([], context(), [{"actionType": "DANCE", "resources": []}])


# -- property tests -------------------------------------------------------------------------

_ALPHABET = "ab/+#$*?"


def _brute_force(pattern: str, value: str) -> bool:
    # fnmatch's * and ? have exactly IoT's meaning once [ is absent; fnmatchcase is case-exact.
    return fnmatch.fnmatchcase(value, pattern)


@settings(max_examples=300, deadline=None)
@given(pattern=st.text(alphabet=_ALPHABET, max_size=10),
       value=st.text(alphabet=_ALPHABET, max_size=12))
def test_wildcard_matcher_agrees_with_brute_force_fnmatch(pattern: str, value: str) -> None:
    # spec broker §3.3: * any run (incl. /), ? one character, + # $ literal
    assert wildcard_matcher(pattern)(value) is _brute_force(pattern, value)


@settings(max_examples=150, deadline=None)
@given(pattern=st.text(alphabet=_ALPHABET, max_size=8),
       topics=st.lists(st.text(alphabet="ab/+#$", max_size=8), min_size=1, max_size=6))
def test_authorizer_decisions_match_the_pattern_and_survive_caching(pattern: str,
                                                                    topics: list[str]) -> None:
    # spec broker §3.3-3.4: a single Allow grants exactly what its pattern matches
    auth = authorizer(doc(allow("iot:Publish", f"{ARN}topic/{pattern}")))
    for _ in range(2):  # second round answers from the cache
        for topic in topics:
            assert auth.can_publish(topic) is _brute_force(pattern, topic)


@settings(max_examples=100, deadline=None)
@given(literal=st.text(alphabet="ab*?$/", max_size=8))
def test_escaped_wildcards_match_only_themselves(literal: str) -> None:
    # spec broker §3.3: ${*}, ${?}, ${$} are literal characters
    escaped = "".join("${" + c + "}" if c in "*?$" else c for c in literal)
    matcher = wildcard_matcher(escaped)
    assert matcher(literal)
    assert not matcher(literal + "a")
