"""Fleet provisioning MQTT protocol: topics, messages, errors and codecs (spec §1, §7)."""

from __future__ import annotations

import json
from typing import Any

import cbor2
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from paho.mqtt.client import topic_matches_sub

from harness import protocol as p
from harness.errors import ProvisioningError
from harness.protocol import Api, ParsedTopic, PayloadFormat

TEMPLATE = "widget-template"
TOKEN = "eyJ2ZXJzaW9uIjoiMjAxOTEwMjMiLCJjaXBoZXIiOiJBQUFBIn0="
PEM = "-----BEGIN CERTIFICATE-----\nMIIB\n-----END CERTIFICATE-----\n"
KEY = "-----BEGIN RSA PRIVATE KEY-----\nMIIE\n-----END RSA PRIVATE KEY-----\n"
FORMATS = list(PayloadFormat)

def _all_topics() -> dict[str, ParsedTopic]:
    """spec §1.1: the full expansion, written out as the spec lists it."""
    topics: dict[str, ParsedTopic] = {}
    for fmt in PayloadFormat:
        for base, api, template in [
            (f"$aws/certificates/create/{fmt.value}", Api.CREATE_KEYS_AND_CERTIFICATE, None),
            (f"$aws/certificates/create-from-csr/{fmt.value}",
             Api.CREATE_CERTIFICATE_FROM_CSR, None),
            (f"$aws/provisioning-templates/{TEMPLATE}/provision/{fmt.value}",
             Api.REGISTER_THING, TEMPLATE),
        ]:
            topics[base] = ParsedTopic(api, fmt, template, None)
            topics[f"{base}/accepted"] = ParsedTopic(api, fmt, template, "accepted")
            topics[f"{base}/rejected"] = ParsedTopic(api, fmt, template, "rejected")
    return topics


ALL_TOPICS = _all_topics()


def status_and_code(exc_info: pytest.ExceptionInfo[ProvisioningError]) -> tuple[int, str]:
    return exc_info.value.status_code, exc_info.value.error_code


# --------------------------------------------------------------------------- topics


def test_there_are_eighteen_provisioning_topics() -> None:
    # spec §1.1: three topics per format, two formats, three operations
    assert len(ALL_TOPICS) == 18


@pytest.mark.parametrize("topic", sorted(ALL_TOPICS))
def test_parse_topic_recognises_every_provisioning_topic(topic: str) -> None:
    # spec §1.1 exact strings
    parsed = p.parse_topic(topic)
    assert parsed == ALL_TOPICS[topic]
    assert parsed is not None and topic.startswith(parsed.request_topic)


@pytest.mark.parametrize("fmt", FORMATS)
def test_topic_builders_produce_the_spec_strings(fmt: PayloadFormat) -> None:
    # spec §1.1 table; edge case 2: reply topics carry the request's format
    f = fmt.value
    assert p.create_keys_topic(fmt) == f"$aws/certificates/create/{f}"
    assert p.create_from_csr_topic(f) == f"$aws/certificates/create-from-csr/{f}"
    assert p.register_thing_topic(TEMPLATE, fmt) == (
        f"$aws/provisioning-templates/{TEMPLATE}/provision/{f}"
    )
    assert p.subscription_filters(Api.REGISTER_THING, fmt, TEMPLATE) == (
        f"$aws/provisioning-templates/{TEMPLATE}/provision/{f}/accepted",
        f"$aws/provisioning-templates/{TEMPLATE}/provision/{f}/rejected",
    )
    assert p.subscription_filters(Api.CREATE_CERTIFICATE_FROM_CSR, fmt) == (
        f"$aws/certificates/create-from-csr/{f}/accepted",
        f"$aws/certificates/create-from-csr/{f}/rejected",
    )
    topic = p.create_keys_topic(fmt)
    assert p.accepted(topic) == topic + "/accepted"
    assert p.rejected(topic) == topic + "/rejected"


@pytest.mark.parametrize(
    "topic",
    [
        "",
        "$aws/certificates/create",
        "$aws/certificates/create/xml",
        "$aws/certificates/create/JSON",
        "$aws/certificates/create/json/",
        "$aws/certificates/create/json/other",
        "$aws/certificates/create/json/accepted/more",
        "$aws/certificates/delete/json",
        "aws/certificates/create/json",
        "$aws/certificates/create-from-csr/cbor/Accepted",
        "$aws/provisioning-templates//provision/json",
        "$aws/provisioning-templates/+/provision/json",
        "$aws/provisioning-templates/#/provision/json",
        "$aws/provisioning-templates/t/register/json",
        "$aws/provisioning-templates/t/provision",
        "$aws/provisioning-templates/t/provision/json/rejected/x",
        "$aws/things/t/shadow/update",
    ],
)
def test_parse_topic_rejects_other_topics(topic: str) -> None:
    assert p.parse_topic(topic) is None


def test_template_names_are_one_topic_segment_whatever_they_spell() -> None:
    # spec §1.1: <templateName> is a segment; unknown names are the service's 404, not ours
    assert p.parse_topic("$aws/provisioning-templates/accepted/provision/json") == ParsedTopic(
        Api.REGISTER_THING, PayloadFormat.JSON, "accepted", None
    )
    for bad in ["", "a/b", "+", "x#"]:
        with pytest.raises(ValueError):
            p.register_thing_topic(bad, "json")


def test_reply_topics_need_a_request_topic() -> None:
    for topic in ["$aws/certificates/create/json/accepted", "a/b", "$aws/certificates/create/xml"]:
        with pytest.raises(ValueError):
            p.accepted(topic)
        with pytest.raises(ValueError):
            p.rejected(topic)
    with pytest.raises(ValueError):
        p.subscription_filters(Api.REGISTER_THING, "json")


REQUEST_TOPICS = sorted(t for t, parsed in ALL_TOPICS.items() if not parsed.suffix)


@pytest.mark.parametrize("topic", REQUEST_TOPICS)
def test_request_filters_catch_every_request_topic_and_no_reply(topic: str) -> None:
    # spec §1.1: the emulator's handler sees requests, never its own replies
    assert sum(topic_matches_sub(f, topic) for f in p.REQUEST_FILTERS) == 1
    assert not any(topic_matches_sub(f, p.accepted(topic)) for f in p.REQUEST_FILTERS)


# --------------------------------------------------------------------------- messages

texts = st.text(max_size=40)
string_maps = st.dictionaries(st.text(max_size=20), texts, max_size=6)
requests = st.one_of(
    st.just(p.CreateKeysAndCertificateRequest()),
    st.builds(p.CreateCertificateFromCsrRequest, st.text(min_size=1, max_size=60)),
    st.builds(p.RegisterThingRequest, st.text(min_size=1, max_size=60), string_maps),
)
responses = st.one_of(
    st.builds(p.CreateKeysAndCertificateResponse, texts, texts, texts, texts),
    st.builds(p.CreateCertificateFromCsrResponse, texts, texts, texts),
    st.builds(p.RegisterThingResponse, st.none() | texts, string_maps),
)
API_OF = {
    p.CreateKeysAndCertificateRequest: Api.CREATE_KEYS_AND_CERTIFICATE,
    p.CreateCertificateFromCsrRequest: Api.CREATE_CERTIFICATE_FROM_CSR,
    p.RegisterThingRequest: Api.REGISTER_THING,
    p.CreateKeysAndCertificateResponse: Api.CREATE_KEYS_AND_CERTIFICATE,
    p.CreateCertificateFromCsrResponse: Api.CREATE_CERTIFICATE_FROM_CSR,
    p.RegisterThingResponse: Api.REGISTER_THING,
}


@settings(max_examples=60, deadline=None)
@given(request=requests, fmt=st.sampled_from(FORMATS))
def test_every_request_survives_a_round_trip(request: Any, fmt: PayloadFormat) -> None:
    # spec §1.2-1.4 request shapes, §7 encodings
    assert p.parse_request(API_OF[type(request)], p.encode(request, fmt), fmt) == request


@settings(max_examples=60, deadline=None)
@given(response=responses, fmt=st.sampled_from(FORMATS))
def test_every_response_survives_a_round_trip(response: Any, fmt: PayloadFormat) -> None:
    # spec §1.2-1.4 accepted payloads, §7 encodings
    payload = p.encode(response, fmt)
    assert p.parse_response(API_OF[type(response)], "accepted", payload, fmt) == response


@settings(max_examples=40, deadline=None)
@given(status=st.integers(0, 999), code=texts, message=texts, fmt=st.sampled_from(FORMATS),
       api=st.sampled_from(list(Api)))
def test_every_rejection_survives_a_round_trip(
    status: int, code: str, message: str, fmt: PayloadFormat, api: Api
) -> None:
    # spec §1.5: one rejected shape for all three operations
    error = p.ErrorResponse(status, code, message)
    assert p.parse_response(api, "rejected", p.encode(error, fmt), fmt) == error


def test_wire_names_are_awss_camel_case() -> None:
    # spec §1.2-1.4 field tables
    assert p.CreateKeysAndCertificateResponse("id", PEM, KEY, TOKEN).to_wire() == {
        "certificateId": "id", "certificatePem": PEM, "privateKey": KEY,
        "certificateOwnershipToken": TOKEN,
    }
    assert p.CreateCertificateFromCsrResponse("id", PEM, TOKEN).to_wire() == {
        "certificateId": "id", "certificatePem": PEM, "certificateOwnershipToken": TOKEN,
    }
    assert p.CreateCertificateFromCsrRequest("csr").to_wire() == {
        "certificateSigningRequest": "csr"
    }
    assert p.RegisterThingRequest(TOKEN, {"SerialNumber": "1"}).to_wire() == {
        "certificateOwnershipToken": TOKEN, "parameters": {"SerialNumber": "1"},
    }
    assert p.RegisterThingResponse("mything_1", {}).to_wire() == {
        "deviceConfiguration": {}, "thingName": "mything_1",
    }


def test_register_thing_response_always_carries_device_configuration() -> None:
    # spec edge case 10 (present even when empty); §1.4: thingName omitted without a thing
    assert p.RegisterThingResponse().to_wire() == {"deviceConfiguration": {}}
    assert p.encode(p.RegisterThingResponse(), "json") == b'{"deviceConfiguration":{}}'


def test_secrets_stay_out_of_reprs() -> None:
    # secrets rule: private keys and ownership tokens never reach a log
    text = repr(p.CreateKeysAndCertificateResponse("id", PEM, KEY, TOKEN))
    text += repr(p.CreateCertificateFromCsrResponse("id", PEM, TOKEN))
    text += repr(p.RegisterThingRequest(TOKEN, {"a": "b"}))
    assert "PRIVATE KEY" not in text
    assert TOKEN not in text


def test_message_maps_are_read_only() -> None:
    request = p.RegisterThingRequest(TOKEN, {"a": "b"})
    with pytest.raises(TypeError):
        request.parameters["a"] = "c"  # type: ignore[index]


# --------------------------------------------------------------------------- parsing requests


@pytest.mark.parametrize(
    ("payload", "fmt"),
    [(b"", "json"), (b"{}", "json"), (b" {} ", "json"), (b'{"unknown":1}', "json"),
     (b"", "cbor"), (b"\xa0", "cbor")],
)
def test_create_keys_accepts_empty_payloads(payload: bytes, fmt: str) -> None:
    # spec §1.2, §7, edge case 3: zero bytes, {} and the empty CBOR map all work
    assert p.parse_request(Api.CREATE_KEYS_AND_CERTIFICATE, payload, fmt) == (
        p.CreateKeysAndCertificateRequest()
    )


@pytest.mark.parametrize(
    "payload",
    [b"", b"{}", b'{"certificateOwnershipToken":""}', b'{"certificateOwnershipToken":null}',
     b'{"parameters":{"SerialNumber":"1"}}'],
)
def test_missing_or_empty_token_is_the_observed_rejection(payload: bytes) -> None:
    # spec §1.5 (observed, S12), edge case 5
    with pytest.raises(ProvisioningError) as exc_info:
        p.parse_request(Api.REGISTER_THING, payload, "json")
    assert exc_info.value.to_payload() == {
        "statusCode": 400,
        "errorCode": "InvalidCertificateOwnershipToken",
        "errorMessage": "Certificate ownership token cannot be empty.",
    }


def test_observed_rejection_encodes_to_the_spec_json() -> None:
    # spec §1.5 example payload, byte for byte (compact JSON)
    payload = p.encode(p.ErrorResponse.from_error(p.token_empty()), "json")
    assert payload == (
        b'{"statusCode":400,"errorCode":"InvalidCertificateOwnershipToken",'
        b'"errorMessage":"Certificate ownership token cannot be empty."}'
    )


def test_register_thing_parameters_may_be_absent_or_null() -> None:
    # spec §1.4: parameters are optional
    for body in ({"certificateOwnershipToken": TOKEN},
                 {"certificateOwnershipToken": TOKEN, "parameters": None}):
        request = p.parse_request(Api.REGISTER_THING, p.encode(body, "cbor"), "cbor")
        assert request == p.RegisterThingRequest(TOKEN, {})


@pytest.mark.parametrize(
    "body",
    [
        {"certificateOwnershipToken": 7},
        {"certificateOwnershipToken": TOKEN, "parameters": ["SerialNumber"]},
        {"certificateOwnershipToken": TOKEN, "parameters": {"SerialNumber": 1}},
        {"certificateOwnershipToken": TOKEN, "parameters": {"Flag": True}},
        {"certificateOwnershipToken": TOKEN, "parameters": {"Nested": {"a": "b"}}},
        {"certificateOwnershipToken": TOKEN, "parameters": {"Null": None}},
    ],
)
@pytest.mark.parametrize("fmt", FORMATS)
def test_wrongly_typed_register_thing_fields_are_invalid_payload(
    body: dict[str, Any], fmt: PayloadFormat
) -> None:
    # spec §1.4 types (token string, parameters string→string); non-strings rejected by default
    assert p.NON_STRING_PARAMETERS is p.NonStringParameters.REJECT
    with pytest.raises(ProvisioningError) as exc_info:
        p.parse_request(Api.REGISTER_THING, p.encode(body, fmt), fmt)
    assert status_and_code(exc_info) == (400, "InvalidPayload")
    assert TOKEN not in str(exc_info.value)


def test_parameter_scalars_can_be_stringified_instead() -> None:
    # the NonStringParameters.STRINGIFY setting: numbers and booleans become JSON text
    body = {"certificateOwnershipToken": TOKEN, "parameters": {"n": 1, "f": 1.5, "b": True}}
    request = p.parse_request(Api.REGISTER_THING, p.encode(body, "json"), "json",
                              non_string_parameters=p.NonStringParameters.STRINGIFY)
    assert request == p.RegisterThingRequest(TOKEN, {"n": "1", "f": "1.5", "b": "true"})
    body["parameters"] = {"nested": {"a": "b"}}
    with pytest.raises(ProvisioningError):
        p.parse_request(Api.REGISTER_THING, p.encode(body, "json"), "json",
                        non_string_parameters=p.NonStringParameters.STRINGIFY)


@pytest.mark.parametrize(
    ("payload", "expected"),
    [
        (b"", (400, "InvalidCsr")),
        (b'{"certificateSigningRequest":""}', (400, "InvalidCsr")),
        (b'{"certificateSigningRequest":42}', (400, "InvalidPayload")),
    ],
)
def test_csr_request_needs_a_csr_string(payload: bytes, expected: tuple[int, str]) -> None:
    # spec §1.3: certificateSigningRequest is a required string
    with pytest.raises(ProvisioningError) as exc_info:
        p.parse_request(Api.CREATE_CERTIFICATE_FROM_CSR, payload, "json")
    assert status_and_code(exc_info) == expected


# --------------------------------------------------------------------------- decoding


@pytest.mark.parametrize(
    ("payload", "fmt"),
    [
        (b"{", "json"),
        (b'{"a":1}{"b":2}', "json"),
        (b"[]", "json"),
        (b"1", "json"),
        (b'"text"', "json"),
        (b"null", "json"),
        (b'{"a": NaN}', "json"),
        (b'{"a": "\xff"}', "json"),
        (b"\xef\xbb\xbf{}", "json"),
        (b"\xa1", "cbor"),
        (b"\xff", "cbor"),
        (b"\xa0\x00", "cbor"),
        (b"\x80", "cbor"),
        (b"\x61a", "cbor"),
        (b"\xa1\x01\x61a", "cbor"),
        (b"{}", "cbor"),
        (b"\xa0", "json"),
    ],
)
def test_malformed_payloads_are_invalid_payload(payload: bytes, fmt: str) -> None:
    # spec §1.5: malformed JSON/CBOR → 400 (errorCode InvalidPayload, the spec's suggestion)
    with pytest.raises(ProvisioningError) as exc_info:
        p.decode(payload, fmt)
    assert status_and_code(exc_info) == (400, "InvalidPayload")


def test_decode_errors_do_not_quote_the_payload() -> None:
    # secrets rule: a broken payload may hold a token; the error never echoes it
    for payload, fmt in [(b'{"certificateOwnershipToken":"' + TOKEN.encode() + b'"', "json"),
                         (cbor2.dumps({"certificateOwnershipToken": TOKEN})[:-3], "cbor")]:
        with pytest.raises(ProvisioningError) as exc_info:
            p.decode(payload, fmt)
        assert TOKEN[:12] not in str(exc_info.value)


def test_decoders_read_other_implementations_output() -> None:
    # spec §7: devices built on other encoders (indefinite-length maps, spaced JSON) still parse
    indefinite = b"\xbf" + _text("certificateSigningRequest") + _text("csr") + b"\xff"
    assert p.decode(indefinite, "cbor") == {"certificateSigningRequest": "csr"}
    assert p.decode(b'{ "a" : "b" }\n', "json") == {"a": "b"}


# --------------------------------------------------------------------------- CBOR bytes (§7)


def _text(s: str) -> bytes:
    """A definite-length CBOR text string, encoded by hand (ASCII, < 256 bytes)."""
    data = s.encode()
    head = bytes([0x60 + len(data)]) if len(data) < 24 else bytes([0x78, len(data)])
    return head + data


def test_cbor_rejection_is_a_definite_map_with_unsigned_status() -> None:
    # spec §7: definite-length map, text keys, statusCode a CBOR unsigned integer
    payload = p.encode(p.ErrorResponse(404, "ResourceNotFound", "gone"), "cbor")
    assert payload == (
        b"\xa3"  # map(3), definite length
        + _text("statusCode") + b"\x19\x01\x94"  # unsigned(404), major type 0
        + _text("errorCode") + _text("ResourceNotFound")
        + _text("errorMessage") + _text("gone")
    )


def test_cbor_nested_maps_are_definite_text_maps() -> None:
    # spec §7: deviceConfiguration / parameters are nested maps of text→text
    payload = p.encode(p.RegisterThingResponse("t", {"k": "v"}), "cbor")
    assert payload == (
        b"\xa2"
        + _text("deviceConfiguration") + b"\xa1" + _text("k") + _text("v")
        + _text("thingName") + _text("t")
    )
    request = p.encode(p.RegisterThingRequest("tok", {}), "cbor")
    assert request == (
        b"\xa2" + _text("certificateOwnershipToken") + _text("tok") + _text("parameters") + b"\xa0"
    )


def test_json_is_compact_utf8() -> None:
    # spec §7: UTF-8 object, PEM newlines as \n escapes
    payload = p.encode(p.RegisterThingResponse("cafè", {"pem": "a\nb"}), "json")
    assert payload == '{"deviceConfiguration":{"pem":"a\\nb"},"thingName":"cafè"}'.encode()
    assert json.loads(payload) == {"deviceConfiguration": {"pem": "a\nb"}, "thingName": "cafè"}


# --------------------------------------------------------------------------- device-side replies


def test_parse_response_picks_the_type_from_the_suffix() -> None:
    body = p.encode(p.ErrorResponse(403, "AccessDenied", "no"), "json")
    assert p.parse_response(Api.REGISTER_THING, "rejected", body, "json") == p.ErrorResponse(
        403, "AccessDenied", "no"
    )
    with pytest.raises(ValueError):
        p.parse_response(Api.REGISTER_THING, "other", body, "json")  # type: ignore[arg-type]


@pytest.mark.parametrize(
    ("api", "suffix", "body"),
    [
        (Api.CREATE_KEYS_AND_CERTIFICATE, "accepted", {"certificateId": "x"}),
        (Api.CREATE_CERTIFICATE_FROM_CSR, "accepted",
         {"certificateId": "x", "certificatePem": 1, "certificateOwnershipToken": "t"}),
        (Api.REGISTER_THING, "accepted", {"thingName": 3, "deviceConfiguration": {}}),
        (Api.REGISTER_THING, "accepted", {"deviceConfiguration": {"a": {"b": "c"}}}),
        (Api.REGISTER_THING, "rejected", {"statusCode": "400"}),
        (Api.REGISTER_THING, "rejected", {"statusCode": True}),
        (Api.REGISTER_THING, "rejected", {"statusCode": -1, "errorCode": "x"}),
        (Api.REGISTER_THING, "rejected", {"statusCode": 400, "errorCode": 5}),
    ],
)
def test_malformed_replies_are_invalid_payload(api: Api, suffix: p.Suffix,
                                               body: dict[str, Any]) -> None:
    with pytest.raises(ProvisioningError) as exc_info:
        p.parse_response(api, suffix, p.encode(body, "cbor"), "cbor")
    assert status_and_code(exc_info) == (400, "InvalidPayload")


def test_error_response_converts_to_and_from_provisioning_error() -> None:
    error = p.template_not_found(TEMPLATE)
    response = p.ErrorResponse.from_error(error)
    assert response.to_wire() == error.to_payload()
    back = response.to_error()
    assert (back.status_code, back.error_code, back.message) == (
        error.status_code, error.error_code, error.message
    )


# --------------------------------------------------------------------------- error catalogue


@pytest.mark.parametrize(
    ("error", "status", "code"),
    [
        (p.token_empty(), 400, "InvalidCertificateOwnershipToken"),
        (p.token_invalid("expired"), 400, "InvalidCertificateOwnershipToken"),
        (p.invalid_csr("bad signature"), 400, "InvalidCsr"),
        (p.invalid_payload("not JSON"), 400, "InvalidPayload"),
        (p.template_not_found(TEMPLATE), 404, "ResourceNotFound"),
        (p.template_disabled(TEMPLATE), p.TEMPLATE_DISABLED_STATUS, "InvalidRequest"),
        (p.template_wrong_type(TEMPLATE), p.TEMPLATE_WRONG_TYPE_STATUS, "InvalidRequest"),
        (p.hook_denied(), 403, "AccessDenied"),
        (p.provisioning_role_denied("iot:CreateThing"), 403, "AccessDenied"),
        (p.throttled(Api.REGISTER_THING), 429, "ThrottlingException"),
        (p.internal_error(), 500, "InternalFailure"),
        (p.resource_conflict("Thing", "mything_1"), 409, "ResourceConflictsException"),
        (p.invalid_parameters("SerialNumber has no value"), 400, "InvalidParameters"),
        (p.template_evaluation_failed("Fn::Select index 3"), 400, "InvalidParameters"),
    ],
)
def test_error_catalogue(error: ProvisioningError, status: int, code: str) -> None:
    # spec §1.5 table: observed values exact, UNCONFIRMED ones the spec's suggestions
    assert (error.status_code, error.error_code) == (status, code)
    assert error.message.endswith(".")
    assert status in (400, 403, 404, 409, 429, 500)


def test_throttling_message_names_the_operation() -> None:
    assert "RegisterThing" in p.throttled(Api.REGISTER_THING).message


# --------------------------------------------------------------------------- claim policy (§2.3)


def test_claim_policy_matches_the_aws_guide() -> None:
    # spec §2.3: the documented claim policy (CreateKeysAndCertificate flavour)
    document = p.claim_policy_document(TEMPLATE, region="us-east-1", account_id="123456789012",
                                       csr=False)
    arn = "arn:aws:iot:us-east-1:123456789012:"
    assert document == {
        "Version": "2012-10-17",
        "Statement": [
            {"Effect": "Allow", "Action": ["iot:Connect"], "Resource": "*"},
            {"Effect": "Allow", "Action": ["iot:Publish", "iot:Receive"],
             "Resource": [f"{arn}topic/$aws/certificates/create/*",
                          f"{arn}topic/$aws/provisioning-templates/{TEMPLATE}/provision/*"]},
            {"Effect": "Allow", "Action": ["iot:Subscribe"],
             "Resource": [f"{arn}topicfilter/$aws/certificates/create/*",
                          f"{arn}topicfilter/$aws/provisioning-templates/{TEMPLATE}/provision/*"]},
        ],
    }


def test_csr_claim_policy_grants_create_from_csr_explicitly() -> None:
    # spec §1.1 / edge case 12: create/* does not cover create-from-csr
    document = p.claim_policy_document(TEMPLATE, keys=False)
    resources = [r for s in document["Statement"][1:] for r in s["Resource"]]
    assert all("create-from-csr/*" in r or "provisioning-templates" in r for r in resources)
    assert "arn:aws:iot:*:*:topic/$aws/certificates/create-from-csr/*" in resources
    assert "arn:aws:iot:*:*:topicfilter/$aws/certificates/create-from-csr/*" in resources
    both = p.claim_policy_document(TEMPLATE)
    assert len(both["Statement"][1]["Resource"]) == 3
