"""The fleet provisioning MQTT API: topics, messages, errors and the JSON/CBOR codecs.

Spec: fleet-provisioning.md §1 and §7. Design principle 4 puts all of it in one place:
the emulator's provisioning service and every device adapter import this module, so
both sides agree on each topic byte, field name and error code. Pure data and
functions: no I/O, no emulator imports.

Where the spec says UNCONFIRMED, the spec's suggested default is used and kept in a
named constant below, so changing a guess is a one-line edit.
"""

from __future__ import annotations

import functools
import io
import json
from collections.abc import Mapping
from dataclasses import dataclass, field
from enum import Enum
from types import MappingProxyType
from typing import Any, Literal, Protocol

import cbor2

from harness.errors import ProvisioningError


class PayloadFormat(str, Enum):
    """The ``<fmt>`` topic segment; the response format follows the request's (§1.1)."""

    JSON = "json"
    CBOR = "cbor"


class Api(str, Enum):
    """The three device MQTT operations (values are AWS's operation names)."""

    CREATE_KEYS_AND_CERTIFICATE = "CreateKeysAndCertificate"
    CREATE_CERTIFICATE_FROM_CSR = "CreateCertificateFromCsr"
    REGISTER_THING = "RegisterThing"


# --------------------------------------------------------------------------- topics (§1.1)

Suffix = Literal["accepted", "rejected"]
ACCEPTED: Suffix = "accepted"
REJECTED: Suffix = "rejected"

_CERTIFICATE_SEGMENTS: dict[str, Api] = {
    "create": Api.CREATE_KEYS_AND_CERTIFICATE,
    "create-from-csr": Api.CREATE_CERTIFICATE_FROM_CSR,
}
_SEGMENT_OF: dict[Api, str] = {api: segment for segment, api in _CERTIFICATE_SEGMENTS.items()}

#: The filters the emulator registers its provisioning API handler on. ``+`` also matches
#: formats other than json/cbor; :func:`parse_topic` returns ``None`` for those.
REQUEST_FILTERS: tuple[str, ...] = (
    "$aws/certificates/create/+",
    "$aws/certificates/create-from-csr/+",
    "$aws/provisioning-templates/+/provision/+",
)


def _is_topic_segment(template: str) -> bool:
    # Only what would break the topic's structure is refused; a well-formed but unknown
    # name is the service's business (404 on the rejected topic, edge case 6).
    return bool(template) and not any(c in template for c in "/+#\0")


def _check_template_segment(template: str) -> None:
    if not _is_topic_segment(template):
        raise ValueError(f"template name {template!r} cannot form a topic segment")


def create_keys_topic(fmt: PayloadFormat | str) -> str:
    """``$aws/certificates/create/<fmt>``: the CreateKeysAndCertificate request topic."""
    return request_topic(Api.CREATE_KEYS_AND_CERTIFICATE, fmt)


def create_from_csr_topic(fmt: PayloadFormat | str) -> str:
    """``$aws/certificates/create-from-csr/<fmt>``: the CreateCertificateFromCsr request topic."""
    return request_topic(Api.CREATE_CERTIFICATE_FROM_CSR, fmt)


def register_thing_topic(template: str, fmt: PayloadFormat | str) -> str:
    """``$aws/provisioning-templates/<template>/provision/<fmt>``: the RegisterThing topic."""
    _check_template_segment(template)
    return f"$aws/provisioning-templates/{template}/provision/{PayloadFormat(fmt).value}"


@functools.lru_cache(maxsize=1024)
def request_topic(api: Api, fmt: PayloadFormat | str, template: str | None = None) -> str:
    """The request topic of ``api``; ``template`` is required for RegisterThing only
    (and ignored for the two certificate operations)."""
    if Api(api) is Api.REGISTER_THING:
        if template is None:
            raise ValueError("RegisterThing topics need a template name")
        return register_thing_topic(template, fmt)
    return f"$aws/certificates/{_SEGMENT_OF[Api(api)]}/{PayloadFormat(fmt).value}"


def _require_request_topic(topic: str) -> None:
    parsed = parse_topic(topic)
    if parsed is None or parsed.suffix is not None:
        raise ValueError(f"{topic!r} is not a fleet provisioning request topic")


@functools.lru_cache(maxsize=1024)
def accepted(topic: str) -> str:
    """The ``accepted`` reply topic of a request topic."""
    _require_request_topic(topic)
    return f"{topic}/{ACCEPTED}"


@functools.lru_cache(maxsize=1024)
def rejected(topic: str) -> str:
    """The ``rejected`` reply topic of a request topic."""
    _require_request_topic(topic)
    return f"{topic}/{REJECTED}"


@functools.lru_cache(maxsize=1024)
def subscription_filters(
    api: Api, fmt: PayloadFormat | str, template: str | None = None
) -> tuple[str, str]:
    """``(accepted, rejected)``: what a device subscribes to before publishing (§1.1)."""
    topic = request_topic(api, fmt, template)
    return accepted(topic), rejected(topic)


@dataclass(frozen=True)
class ParsedTopic:
    """A provisioning topic taken apart; ``suffix`` is ``None`` for a request topic."""

    api: Api
    fmt: PayloadFormat
    template_name: str | None = None
    suffix: Suffix | None = None

    @property
    def request_topic(self) -> str:
        """The request topic this topic belongs to (itself when it is one)."""
        return request_topic(self.api, self.fmt, self.template_name)


@functools.lru_cache(maxsize=1024)
def parse_topic(topic: str) -> ParsedTopic | None:
    """Recognise one of the 18 provisioning topics (any template name); ``None`` otherwise.

    Format segments are case-sensitive (``json``/``cbor`` exactly, §1.1).
    """
    parts = topic.split("/")
    if len(parts) < 4 or parts[0] != "$aws":
        return None
    template: str | None = None
    if parts[1] == "certificates":
        api = _CERTIFICATE_SEGMENTS.get(parts[2])
        base = 4
    elif parts[1] == "provisioning-templates" and len(parts) >= 5 and parts[3] == "provision":
        api, template, base = Api.REGISTER_THING, parts[2], 5
        if not _is_topic_segment(template):
            return None
    else:
        return None
    if api is None or parts[base - 1] not in ("json", "cbor"):
        return None
    fmt, rest = PayloadFormat(parts[base - 1]), parts[base:]
    if not rest:
        return ParsedTopic(api, fmt, template)
    if rest == [ACCEPTED]:
        return ParsedTopic(api, fmt, template, ACCEPTED)
    if rest == [REJECTED]:
        return ParsedTopic(api, fmt, template, REJECTED)
    return None


# --------------------------------------------------------------------------- errors (§1.5)

STATUS_BAD_REQUEST = 400
STATUS_FORBIDDEN = 403
STATUS_NOT_FOUND = 404
STATUS_TOO_MANY_REQUESTS = 429
STATUS_INTERNAL_ERROR = 500

#: Observed (S12): empty or missing ownership token.
INVALID_TOKEN_CODE = "InvalidCertificateOwnershipToken"
TOKEN_EMPTY_MESSAGE = "Certificate ownership token cannot be empty."
#: UNCONFIRMED, spec's suggestion: bad CSR (unparseable, bad signature, weak key).
INVALID_CSR_CODE = "InvalidCsr"
#: UNCONFIRMED, spec's suggestion: malformed JSON/CBOR or wrongly typed fields.
INVALID_PAYLOAD_CODE = "InvalidPayload"
#: UNCONFIRMED, spec's suggestion (status 404 from S11): unknown template.
RESOURCE_NOT_FOUND_CODE = "ResourceNotFound"
#: UNCONFIRMED, spec's suggestion (403 inferred; S4 calls the outcome ACCESS_DENIED):
#: hook denial, hook failure, provisioning role not allowed.
ACCESS_DENIED_CODE = "AccessDenied"
#: UNCONFIRMED, spec's suggestion (status 429 from S11).
THROTTLING_CODE = "ThrottlingException"
#: Named in S3 for ``OverrideSettings`` = ``FAIL``; its status is UNCONFIRMED (409 chosen
#: from the spec's "409 or 400").
RESOURCE_CONFLICTS_CODE = "ResourceConflictsException"
RESOURCE_CONFLICTS_STATUS = 409
#: UNCONFIRMED, no suggestion in the spec: provision-time template evaluation errors
#: (missing parameter value, ``Fn::Select`` out of range, unknown thing group, ...).
INVALID_PARAMETERS_CODE = "InvalidParameters"
#: UNCONFIRMED, no suggestion in the spec: a disabled or non-fleet template. Named after
#: the control plane's InvalidRequestException.
INVALID_REQUEST_CODE = "InvalidRequest"
#: UNCONFIRMED (spec: "400 or 403"): 400, the request cannot succeed until the template changes.
TEMPLATE_DISABLED_STATUS = 400
#: UNCONFIRMED (spec open question 12, "404/400"): a JITP template named on the MQTT topic.
TEMPLATE_WRONG_TYPE_STATUS = 400
#: UNCONFIRMED, no suggestion in the spec (status 500 from S11).
INTERNAL_FAILURE_CODE = "InternalFailure"


def token_empty() -> ProvisioningError:
    """Missing or empty ``certificateOwnershipToken`` (observed exactly, edge case 5)."""
    return ProvisioningError(STATUS_BAD_REQUEST, INVALID_TOKEN_CODE, TOKEN_EMPTY_MESSAGE)


def token_invalid(reason: str) -> ProvisioningError:
    """Unknown, malformed, expired or reused token. ``reason`` is a short phrase such as
    ``"expired"``; never pass the token itself."""
    return ProvisioningError(
        STATUS_BAD_REQUEST, INVALID_TOKEN_CODE, f"Certificate ownership token is invalid: {reason}."
    )


def invalid_csr(reason: str) -> ProvisioningError:
    return ProvisioningError(
        STATUS_BAD_REQUEST, INVALID_CSR_CODE, f"Invalid certificate signing request: {reason}."
    )


def invalid_payload(reason: str) -> ProvisioningError:
    return ProvisioningError(
        STATUS_BAD_REQUEST, INVALID_PAYLOAD_CODE, f"Invalid payload: {reason}."
    )


def template_not_found(name: str) -> ProvisioningError:
    return ProvisioningError(
        STATUS_NOT_FOUND, RESOURCE_NOT_FOUND_CODE, f"Template {name} does not exist."
    )


def template_disabled(name: str) -> ProvisioningError:
    return ProvisioningError(
        TEMPLATE_DISABLED_STATUS, INVALID_REQUEST_CODE, f"Template {name} is disabled."
    )


def template_wrong_type(name: str) -> ProvisioningError:
    """RegisterThing named a template that is not of type FLEET_PROVISIONING (§3.6)."""
    return ProvisioningError(
        TEMPLATE_WRONG_TYPE_STATUS,
        INVALID_REQUEST_CODE,
        f"Template {name} is not a FLEET_PROVISIONING template.",
    )


def hook_denied() -> ProvisioningError:
    """The pre-provisioning hook denied, failed, timed out or answered badly (§4).

    The device learns no more than that; the precise reason goes to the observation log.
    """
    return ProvisioningError(
        STATUS_FORBIDDEN, ACCESS_DENIED_CODE, "Pre-provisioning hook denied the request."
    )


def provisioning_role_denied(action: str) -> ProvisioningError:
    """The template's provisioning role may not perform ``action`` (UNCONFIRMED, 403 inferred)."""
    return ProvisioningError(
        STATUS_FORBIDDEN,
        ACCESS_DENIED_CODE,
        f"The provisioning role is not authorized to perform {action}.",
    )


def throttled(api: Api | str) -> ProvisioningError:
    name = api.value if isinstance(api, Api) else api
    return ProvisioningError(
        STATUS_TOO_MANY_REQUESTS, THROTTLING_CODE, f"Rate exceeded for {name}."
    )


def internal_error() -> ProvisioningError:
    return ProvisioningError(
        STATUS_INTERNAL_ERROR, INTERNAL_FAILURE_CODE, "An internal error occurred."
    )


def resource_conflict(resource_type: str, name: str) -> ProvisioningError:
    """A resource exists and the template's ``OverrideSettings`` say ``FAIL`` (§3.3)."""
    return ProvisioningError(
        RESOURCE_CONFLICTS_STATUS,
        RESOURCE_CONFLICTS_CODE,
        f"{resource_type} {name} already exists and its OverrideSettings is FAIL.",
    )


def invalid_parameters(reason: str) -> ProvisioningError:
    """A parameter the template needs has no value, or a value it cannot use (§3.1)."""
    return ProvisioningError(
        STATUS_BAD_REQUEST, INVALID_PARAMETERS_CODE, f"Invalid template parameters: {reason}."
    )


def claim_window_passed() -> ProvisioningError:
    """A trusted-user claim connection older than five minutes (§2.2; UNCONFIRMED form)."""
    return ProvisioningError(
        STATUS_FORBIDDEN, ACCESS_DENIED_CODE,
        "The provisioning claim's five minutes after connecting have passed.")


def hook_unmapped(target_arn: str) -> ProvisioningError:
    """The template's hook ARN maps to no local target (emulator-only, said plainly)."""
    return ProvisioningError(
        STATUS_FORBIDDEN, ACCESS_DENIED_CODE,
        f"Pre-provisioning hook {target_arn} is not mapped to a target in this emulator "
        "(map it with --hook ARN=TARGET or PUT /_fleetbench/hooks).")


def template_evaluation_failed(reason: str) -> ProvisioningError:
    """Any other provision-time template error: ``Fn::Select`` out of range, missing
    map key, thing group or type that does not exist (§3.7)."""
    return ProvisioningError(
        STATUS_BAD_REQUEST, INVALID_PARAMETERS_CODE, f"Template evaluation failed: {reason}."
    )


# --------------------------------------------------------------------------- field helpers


class NonStringParameters(str, Enum):
    """What to do with a RegisterThing parameter value that is not a string."""

    REJECT = "reject"  # 400 InvalidPayload
    STRINGIFY = "stringify"  # numbers and booleans become their JSON text


#: UNCONFIRMED: §1.4 types ``parameters`` as string→string and AWS's handling of other
#: JSON types is not documented; reject them so tests notice sloppy devices. Objects,
#: arrays and null are refused under either setting.
NON_STRING_PARAMETERS = NonStringParameters.REJECT


def _readonly(mapping: Mapping[str, str]) -> Mapping[str, str]:
    return MappingProxyType(dict(mapping))


def _type_name(value: object) -> str:
    return "null" if value is None else type(value).__name__


def _string(data: Mapping[str, Any], key: str) -> str:
    """A required string field of a response (absent or wrongly typed → InvalidPayload)."""
    value = data.get(key)
    if not isinstance(value, str):
        raise invalid_payload(f"{key} must be a string, got {_type_name(value)}")
    return value


def _scalar_text(value: object) -> str | None:
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, (int, float)):
        return json.dumps(value)
    return None


def _string_map(
    data: Mapping[str, Any],
    key: str,
    non_string: NonStringParameters = NonStringParameters.REJECT,
) -> dict[str, str]:
    """An optional map of text to text (absent or null → empty)."""
    value = data.get(key)
    if value is None:
        return {}
    if not isinstance(value, Mapping):
        raise invalid_payload(f"{key} must be a map of strings, got {_type_name(value)}")
    out: dict[str, str] = {}
    for name, item in value.items():
        if not isinstance(name, str):
            raise invalid_payload(f"{key} keys must be strings")
        if isinstance(item, str):
            out[name] = item
            continue
        text = _scalar_text(item) if non_string is NonStringParameters.STRINGIFY else None
        if text is None:
            raise invalid_payload(f"{key}.{name} must be a string, got {_type_name(item)}")
        out[name] = text
    return out


# --------------------------------------------------------------------------- messages (§1.2-1.5)


class WireMessage(Protocol):
    def to_wire(self) -> dict[str, Any]: ...


@dataclass(frozen=True)
class CreateKeysAndCertificateRequest:
    """Empty by definition; unknown fields in the payload are ignored (§1.2)."""

    def to_wire(self) -> dict[str, Any]:
        return {}

    @classmethod
    def from_wire(cls, data: Mapping[str, Any]) -> CreateKeysAndCertificateRequest:
        return cls()


@dataclass(frozen=True)
class CreateKeysAndCertificateResponse:
    certificate_id: str
    certificate_pem: str
    private_key: str = field(repr=False)
    certificate_ownership_token: str = field(repr=False)

    def to_wire(self) -> dict[str, Any]:
        return {
            "certificateId": self.certificate_id,
            "certificatePem": self.certificate_pem,
            "privateKey": self.private_key,
            "certificateOwnershipToken": self.certificate_ownership_token,
        }

    @classmethod
    def from_wire(cls, data: Mapping[str, Any]) -> CreateKeysAndCertificateResponse:
        return cls(
            certificate_id=_string(data, "certificateId"),
            certificate_pem=_string(data, "certificatePem"),
            private_key=_string(data, "privateKey"),
            certificate_ownership_token=_string(data, "certificateOwnershipToken"),
        )


@dataclass(frozen=True)
class CreateCertificateFromCsrRequest:
    certificate_signing_request: str

    def to_wire(self) -> dict[str, Any]:
        return {"certificateSigningRequest": self.certificate_signing_request}

    @classmethod
    def from_wire(cls, data: Mapping[str, Any]) -> CreateCertificateFromCsrRequest:
        csr = data.get("certificateSigningRequest")
        if csr is None or csr == "":
            raise invalid_csr("certificateSigningRequest is missing or empty")
        if not isinstance(csr, str):
            raise invalid_payload(
                f"certificateSigningRequest must be a string, got {_type_name(csr)}"
            )
        return cls(certificate_signing_request=csr)


@dataclass(frozen=True)
class CreateCertificateFromCsrResponse:
    certificate_id: str
    certificate_pem: str
    certificate_ownership_token: str = field(repr=False)

    def to_wire(self) -> dict[str, Any]:
        return {
            "certificateId": self.certificate_id,
            "certificatePem": self.certificate_pem,
            "certificateOwnershipToken": self.certificate_ownership_token,
        }

    @classmethod
    def from_wire(cls, data: Mapping[str, Any]) -> CreateCertificateFromCsrResponse:
        return cls(
            certificate_id=_string(data, "certificateId"),
            certificate_pem=_string(data, "certificatePem"),
            certificate_ownership_token=_string(data, "certificateOwnershipToken"),
        )


@dataclass(frozen=True)
class RegisterThingRequest:
    certificate_ownership_token: str = field(repr=False)
    parameters: Mapping[str, str] = field(default_factory=dict)

    def __post_init__(self) -> None:
        object.__setattr__(self, "parameters", _readonly(self.parameters))

    def to_wire(self) -> dict[str, Any]:
        return {
            "certificateOwnershipToken": self.certificate_ownership_token,
            "parameters": dict(self.parameters),
        }

    @classmethod
    def from_wire(
        cls,
        data: Mapping[str, Any],
        *,
        non_string_parameters: NonStringParameters = NON_STRING_PARAMETERS,
    ) -> RegisterThingRequest:
        token = data.get("certificateOwnershipToken")
        if token is None or token == "":
            raise token_empty()
        if not isinstance(token, str):
            raise invalid_payload(
                f"certificateOwnershipToken must be a string, got {_type_name(token)}"
            )
        return cls(
            certificate_ownership_token=token,
            parameters=_string_map(data, "parameters", non_string_parameters),
        )


@dataclass(frozen=True)
class RegisterThingResponse:
    """``thing_name`` is ``None`` when the template creates no thing: the field is then
    omitted on the wire (§1.4, UNCONFIRMED). ``deviceConfiguration`` is always sent,
    ``{}`` when the template has none (edge case 10)."""

    thing_name: str | None = None
    device_configuration: Mapping[str, str] = field(default_factory=dict)

    def __post_init__(self) -> None:
        object.__setattr__(self, "device_configuration", _readonly(self.device_configuration))

    def to_wire(self) -> dict[str, Any]:
        wire: dict[str, Any] = {"deviceConfiguration": dict(self.device_configuration)}
        if self.thing_name is not None:
            wire["thingName"] = self.thing_name
        return wire

    @classmethod
    def from_wire(cls, data: Mapping[str, Any]) -> RegisterThingResponse:
        thing_name = data.get("thingName")
        if thing_name is not None and not isinstance(thing_name, str):
            raise invalid_payload(f"thingName must be a string, got {_type_name(thing_name)}")
        return cls(
            thing_name=thing_name,
            device_configuration=_string_map(data, "deviceConfiguration"),
        )


@dataclass(frozen=True)
class ErrorResponse:
    """The ``rejected`` payload, identical for the three operations (§1.5)."""

    status_code: int
    error_code: str
    error_message: str

    def to_wire(self) -> dict[str, Any]:
        return {
            "statusCode": self.status_code,
            "errorCode": self.error_code,
            "errorMessage": self.error_message,
        }

    @classmethod
    def from_wire(cls, data: Mapping[str, Any]) -> ErrorResponse:
        status = data.get("statusCode")
        if not isinstance(status, int) or isinstance(status, bool) or status < 0:
            raise invalid_payload(
                f"statusCode must be an unsigned integer, got {_type_name(status)}"
            )
        code = data.get("errorCode", "")
        message = data.get("errorMessage", "")
        if not isinstance(code, str) or not isinstance(message, str):
            raise invalid_payload("errorCode and errorMessage must be strings")
        return cls(status_code=status, error_code=code, error_message=message)

    @classmethod
    def from_error(cls, error: ProvisioningError) -> ErrorResponse:
        return cls(error.status_code, error.error_code, error.message)

    def to_error(self) -> ProvisioningError:
        return ProvisioningError(self.status_code, self.error_code, self.error_message)


Request = CreateKeysAndCertificateRequest | CreateCertificateFromCsrRequest | RegisterThingRequest
Response = (
    CreateKeysAndCertificateResponse | CreateCertificateFromCsrResponse | RegisterThingResponse
)

REQUEST_TYPES: Mapping[Api, type[Request]] = MappingProxyType({
    Api.CREATE_KEYS_AND_CERTIFICATE: CreateKeysAndCertificateRequest,
    Api.CREATE_CERTIFICATE_FROM_CSR: CreateCertificateFromCsrRequest,
    Api.REGISTER_THING: RegisterThingRequest,
})
RESPONSE_TYPES: Mapping[Api, type[Response]] = MappingProxyType({
    Api.CREATE_KEYS_AND_CERTIFICATE: CreateKeysAndCertificateResponse,
    Api.CREATE_CERTIFICATE_FROM_CSR: CreateCertificateFromCsrResponse,
    Api.REGISTER_THING: RegisterThingResponse,
})


# --------------------------------------------------------------------------- codecs (§7)


def encode(message: WireMessage | Mapping[str, Any], fmt: PayloadFormat | str) -> bytes:
    """Serialise a message (or a wire dict) for ``fmt``.

    JSON: compact UTF-8 object. CBOR: definite-length map with text keys; integers such
    as ``statusCode`` come out as CBOR unsigned integers (major type 0).
    """
    data = dict(message) if isinstance(message, Mapping) else message.to_wire()
    if PayloadFormat(fmt) is PayloadFormat.JSON:
        return json.dumps(data, separators=(",", ":"), ensure_ascii=False,
                          allow_nan=False).encode("utf-8")
    return cbor2.dumps(data)


def _reject_constant(name: str) -> Any:
    raise ValueError(f"{name} is not valid JSON")


def _decode_json(payload: bytes) -> Any:
    try:
        text = payload.decode("utf-8")
    except UnicodeDecodeError as exc:
        raise invalid_payload(f"not UTF-8 (byte {exc.start})") from None
    try:
        return json.loads(text, parse_constant=_reject_constant)
    except json.JSONDecodeError as exc:
        # exc.msg never quotes the document, which may carry a token.
        raise invalid_payload(f"not valid JSON: {exc.msg} at offset {exc.pos}") from None
    except (ValueError, RecursionError) as exc:
        raise invalid_payload(f"not valid JSON: {type(exc).__name__}") from None


def _decode_cbor(payload: bytes) -> Any:
    stream = io.BytesIO(payload)
    try:
        value = cbor2.CBORDecoder(stream).decode()
    except Exception as exc:  # untrusted bytes: any decoder failure is the device's error
        # The library's text is left out on purpose: it may quote payload bytes.
        raise invalid_payload(f"not valid CBOR ({type(exc).__name__})") from None
    if stream.tell() != len(payload):
        raise invalid_payload(f"{len(payload) - stream.tell()} bytes after the CBOR item")
    return value


_DECODERS = {PayloadFormat.JSON: _decode_json, PayloadFormat.CBOR: _decode_cbor}


def decode(payload: bytes, fmt: PayloadFormat | str) -> dict[str, Any]:
    """Parse a payload into its wire dict.

    An empty payload is ``{}`` (a valid CreateKeysAndCertificate request in both formats,
    edge case 3). Malformed bytes or a top level that is not an object/map raise
    ``ProvisioningError(400, "InvalidPayload", ...)``.
    """
    if not payload:
        return {}
    value = _DECODERS[PayloadFormat(fmt)](bytes(payload))
    if not isinstance(value, dict):
        raise invalid_payload(f"top level must be an object, got {_type_name(value)}")
    if not all(isinstance(key, str) for key in value):
        raise invalid_payload("keys must be text strings")
    return value


def parse_request(
    api: Api,
    payload: bytes,
    fmt: PayloadFormat | str,
    *,
    non_string_parameters: NonStringParameters = NON_STRING_PARAMETERS,
) -> Request:
    """Decode and validate a device's request (emulator side); raises ProvisioningError."""
    data = decode(payload, fmt)
    if Api(api) is Api.REGISTER_THING:
        return RegisterThingRequest.from_wire(data, non_string_parameters=non_string_parameters)
    return REQUEST_TYPES[Api(api)].from_wire(data)


def parse_response(
    api: Api, suffix: Suffix, payload: bytes, fmt: PayloadFormat | str
) -> Response | ErrorResponse:
    """Decode a service reply (device side): the operation's response on ``accepted``,
    :class:`ErrorResponse` on ``rejected``. A malformed reply raises
    ``ProvisioningError(400, "InvalidPayload", ...)``."""
    data = decode(payload, fmt)
    if suffix == REJECTED:
        return ErrorResponse.from_wire(data)
    if suffix == ACCEPTED:
        return RESPONSE_TYPES[Api(api)].from_wire(data)
    raise ValueError(f"suffix must be {ACCEPTED!r} or {REJECTED!r}, got {suffix!r}")


# --------------------------------------------------------------------------- claim policy (§2.3)

POLICY_VERSION = "2012-10-17"


def claim_policy_document(
    template_name: str,
    *,
    region: str = "*",
    account_id: str = "*",
    csr: bool = True,
    keys: bool = True,
    partition: str = "aws",
) -> dict[str, Any]:
    """The claim certificate policy of AWS's guide (§2.3): Connect on ``*``;
    Publish/Receive on the topics and Subscribe on the filters of the operations the
    device uses. ``keys`` grants ``$aws/certificates/create/*``, ``csr`` grants
    ``$aws/certificates/create-from-csr/*`` (the guide's ``create/*`` does not cover it,
    edge case 12); RegisterThing on ``template_name`` is always granted.
    """
    _check_template_segment(template_name)
    paths: list[str] = []
    if keys:
        paths.append("$aws/certificates/create/*")
    if csr:
        paths.append("$aws/certificates/create-from-csr/*")
    paths.append(f"$aws/provisioning-templates/{template_name}/provision/*")
    arn = f"arn:{partition}:iot:{region}:{account_id}:"
    return {
        "Version": POLICY_VERSION,
        "Statement": [
            {"Effect": "Allow", "Action": ["iot:Connect"], "Resource": "*"},
            {
                "Effect": "Allow",
                "Action": ["iot:Publish", "iot:Receive"],
                "Resource": [f"{arn}topic/{path}" for path in paths],
            },
            {
                "Effect": "Allow",
                "Action": ["iot:Subscribe"],
                "Resource": [f"{arn}topicfilter/{path}" for path in paths],
            },
        ],
    }

