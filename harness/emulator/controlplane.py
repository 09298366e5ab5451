"""The boto3- and AWS-CLI-compatible control plane, driven by botocore's ``iot`` model.

Nothing here knows an individual operation. Routes, request parsing, validation
and response serialisation all come from botocore's own service model
(``iot`` 2015-05-28, protocol rest-json), so adding an operation means writing
one backend method (spec iot-broker-and-policy.md §5; fleet-provisioning.md §6).

Backend contract
    One synchronous method per operation, named like boto3's (``ListAttachedPolicies``
    → ``list_attached_policies``), called in the given executor with the input
    members present in the request as snake_case keyword arguments. Values are typed
    per the model: booleans and integers parsed from query strings, timestamps as
    epoch-second floats, blobs as bytes; nested structures stay wire dicts/lists
    (camelCase keys). It returns None, a mapping or an object; the output shape is
    walked and each member is looked up as ``getattr(obj, snake)``, ``obj[snake]`` or
    ``obj[wireName]``. Timestamps (datetime or number) become epoch seconds, Enums
    their ``.value``; None is omitted. Raise :class:`harness.errors.AwsError` kinds.
    Paging (``nextToken``/``maxResults``, ``marker``/``pageSize``) is the backend's:
    the model only types and range-checks the members (1-250).

Errors (§5.2)
    An :class:`AwsError` becomes its status, ``x-amzn-ErrorType: <Code>:``,
    ``x-amzn-RequestId`` and ``AwsError.to_body()``; anything else is logged and
    answered 500 ``InternalFailureException`` without a trace. Choices where AWS's
    answer is not documented:

    * no route for method + path: 404 ``UnknownOperationException`` (botocore raises
      a plain ``ClientError`` with that code; AWS was observed answering 404
      ``ResourceNotFoundException`` "Not Found" for a path its endpoint lacks, which a
      test would confuse with a missing resource);
    * modeled operation the backend lacks: 501 ``NotImplementedException`` naming it
      (not retried by boto3, unlike 500);
    * malformed JSON body or a value of the wrong JSON type: 400
      ``InvalidRequestException`` (Coral services answer ``SerializationException``,
      which the ``iot`` model does not declare, so boto3 could not raise it as a
      modeled exception);
    * constraint violations (required, length, pattern, enum, range): 400
      ``InvalidRequestException`` in AWS's words, "1 validation error detected: Value
      'x' at 'thingName' failed to satisfy constraint: Member must satisfy regular
      expression pattern: [a-zA-Z0-9:_-]+". Values of ``sensitive`` shapes are not
      echoed. Java patterns Python cannot compile are skipped (the POSIX classes
      ``\\p{Graph}``, ``\\p{Upper}``, ``\\p{Digit}``, ``\\p{Cntrl}`` are translated).

Authentication
    With neither ``api_token`` nor ``key_pairs``, every request is accepted, signed
    or not, with any credentials. With either configured, every request (admin routes
    included, whatever the peer address) must carry one of:

    * header ``x-fleetbench-api-token`` equal to ``api_token``; or
    * a SigV4 ``Authorization`` header (``AWS4-HMAC-SHA256``) whose signature,
      recomputed with botocore's own :class:`botocore.auth.SigV4Auth` over the request
      as received, matches; the secret is ``key_pairs[access_key_id]`` when that key
      id is configured, else ``api_token`` (so boto3 and the CLI work with any access
      key id and the token as secret access key). The credential scope's region must
      equal ``region``. Request age is not checked (the emulated clock may be moved).

    Refusals are 403: no credentials → ``MissingAuthenticationTokenException``
    "Missing Authentication Token"; wrong token or unknown key id →
    ``UnrecognizedClientException`` "The security token included in the request is
    invalid."; bad signature → ``InvalidSignatureException``.
"""

from __future__ import annotations

import asyncio
import base64
import binascii
import datetime as dt
import functools
import hmac
import ipaddress
import json
import logging
import re
import threading
import uuid
from collections.abc import Awaitable, Callable, Mapping, Sequence
from concurrent.futures import Executor
from dataclasses import dataclass, field
from enum import Enum
from hashlib import sha256
from typing import TYPE_CHECKING, Any
from urllib.parse import parse_qsl, unquote

import botocore.session
from aiohttp import web
from botocore import xform_name
from botocore.auth import SigV4Auth
from botocore.awsrequest import AWSRequest
from botocore.credentials import Credentials
from botocore.model import OperationModel, ServiceModel, Shape, StructureShape
from botocore.utils import parse_timestamp

from harness.emulator.registry.validation import pattern_check
from harness.errors import AwsError, InvalidRequestException
from harness.observations import Kind, ObservationLog

if TYPE_CHECKING:
    from harness.emulator.admin import AdminState

log = logging.getLogger(__name__)

#: Header carrying the plain API token (emulator-only; see module docstring).
API_TOKEN_HEADER = "x-fleetbench-api-token"


# --------------------------------------------------------------------------- errors


class UnknownOperationException(AwsError):
    """No modeled operation matches the method and path."""

    code = "UnknownOperationException"
    status = 404


class NotImplementedException(AwsError):
    """A modeled operation the backend has no method for."""

    code = "NotImplementedException"
    status = 501


class MissingAuthenticationTokenException(AwsError):
    code = "MissingAuthenticationTokenException"
    status = 403


class UnrecognizedClientException(AwsError):
    code = "UnrecognizedClientException"
    status = 403


class InvalidSignatureException(AwsError):
    code = "InvalidSignatureException"
    status = 403


def error_response(
    status: int, code: str, body: Mapping[str, Any], request_id: str
) -> web.Response:
    """The REST error botocore parses into ``client.exceptions.<code>`` (spec §5.2)."""
    return web.Response(
        status=status,
        body=json.dumps(body).encode(),
        content_type="application/json",
        headers={"x-amzn-ErrorType": f"{code}:", "x-amzn-RequestId": request_id},
    )


# --------------------------------------------------------------------------- model


@functools.lru_cache(maxsize=1)
def iot_service_model() -> ServiceModel:
    """botocore's ``iot`` model, loaded once per process."""
    return botocore.session.get_session().get_service_model("iot")


@functools.lru_cache(maxsize=4096)
def snake(name: str) -> str:
    """boto3's Python name for a wire name (``thingName`` → ``thing_name``)."""
    return str(xform_name(name))


# --------------------------------------------------------------------------- routing

_LITERAL, _LABEL, _GREEDY = 0, 1, 2


@dataclass(frozen=True)
class Route:
    """One operation's ``requestUri`` template compiled to a matcher."""

    operation: str
    method: str
    template: str
    pattern: re.Pattern[str]
    #: ``(group, label)`` pairs: regex group name and the template's label name.
    labels: tuple[tuple[str, str], ...]
    #: ``?key`` / ``?key=value`` parts fixed by the template (value None: any).
    fixed_query: tuple[tuple[str, str | None], ...]
    #: Sort key: literal segments beat labels, labels beat greedy labels.
    rank: tuple[Any, ...]

    @classmethod
    def compile(cls, operation: str, method: str, template: str) -> Route:
        path, _, query = template.partition("?")
        parts: list[str] = []
        labels: list[tuple[str, str]] = []
        kinds: list[int] = []
        for segment in path.split("/")[1:]:
            found = re.fullmatch(r"\{([^}]+)\}", segment)
            if found is None:
                parts.append(re.escape(segment))
                kinds.append(_LITERAL)
                continue
            label = found.group(1)
            group = f"g{len(labels)}"
            if label.endswith("+"):
                labels.append((group, label[:-1]))
                parts.append(f"(?P<{group}>.+)")
                kinds.append(_GREEDY)
            else:
                labels.append((group, label))
                parts.append(f"(?P<{group}>[^/]+)")
                kinds.append(_LABEL)
        fixed = tuple(
            (key, value if sep else None)
            for key, sep, value in (p.partition("=") for p in query.split("&") if p)
        )
        return cls(
            operation=operation,
            method=method.upper(),
            template=template,
            pattern=re.compile("/" + "/".join(parts)),
            labels=tuple(labels),
            fixed_query=fixed,
            rank=(tuple(kinds), -len(fixed)),
        )

    def match(self, path: str, query: Sequence[tuple[str, str]]) -> dict[str, str] | None:
        """Percent-decoded label values when ``path`` (raw) and ``query`` match."""
        found = self.pattern.fullmatch(path)
        if found is None:
            return None
        present = dict(query)
        for key, value in self.fixed_query:
            if key not in present or (value is not None and present[key] != value):
                return None
        # Each label is decoded as one segment: %2F stays inside the value (§5.1).
        return {label: unquote(found.group(group)) for group, label in self.labels}


@dataclass(frozen=True)
class RouteMatch:
    route: Route
    labels: dict[str, str]


class RouteTable:
    """Every operation of a service model, indexed by method and first segment."""

    def __init__(self, routes: Sequence[Route]) -> None:
        self._index: dict[tuple[str, str], list[Route]] = {}
        for route in sorted(routes, key=lambda r: r.rank):
            first = route.template.partition("?")[0].split("/")[1]
            key = (route.method, "" if first.startswith("{") else first)
            self._index.setdefault(key, []).append(route)

    @classmethod
    def from_model(cls, model: ServiceModel) -> RouteTable:
        routes = []
        for name in model.operation_names:
            http = model.operation_model(name).http
            routes.append(Route.compile(name, http["method"], http["requestUri"]))
        return cls(routes)

    def match(
        self, method: str, path: str, query: Sequence[tuple[str, str]]
    ) -> RouteMatch | None:
        """The most specific route for a raw (still percent-encoded) path."""
        first = path.split("/", 2)[1] if path.startswith("/") else ""
        method = method.upper()
        for key in dict.fromkeys(((method, first), (method, ""))):
            for route in self._index.get(key, ()):
                labels = route.match(path, query)
                if labels is not None:
                    return RouteMatch(route, labels)
        return None


@functools.lru_cache(maxsize=1)
def iot_routes() -> RouteTable:
    return RouteTable.from_model(iot_service_model())


# --------------------------------------------------------------------------- validation

def _render(value: Any) -> str:
    """A value the way AWS's (Java) validation messages print it."""
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, (bytes, bytearray)):
        return "<binary>"
    if isinstance(value, list):
        return "[" + ", ".join(_render(v) for v in value) + "]"
    if isinstance(value, dict):
        return "{" + ", ".join(f"{k}={_render(v)}" for k, v in value.items()) + "}"
    return str(value)


_NUMERIC = ("integer", "long", "float", "double")

Rule = tuple[str, Callable[[Any], bool]]


def _rules(shape: Shape) -> list[Rule]:
    """Each constraint of a shape: AWS's wording and a test the value passes.

    Numbers are bounded by value, strings, lists and maps by length.
    """
    meta = shape.metadata
    numeric = shape.type_name in _NUMERIC
    unit = "value" if numeric else "length"

    def measure(value: Any) -> float:
        return value if numeric else len(value)

    rules: list[Rule] = []
    if "max" in meta:
        rules.append((f"Member must have {unit} less than or equal to {meta['max']}",
                      lambda v: measure(v) <= meta["max"]))
    if "min" in meta:
        rules.append((f"Member must have {unit} greater than or equal to {meta['min']}",
                      lambda v: measure(v) >= meta["min"]))
    if "pattern" in meta:
        check = pattern_check(meta["pattern"])
        if check is not None:
            rules.append((f"Member must satisfy regular expression pattern: {meta['pattern']}",
                          check))
    if "enum" in meta:
        rules.append((f"Member must satisfy enum value set: [{', '.join(meta['enum'])}]",
                      lambda v: v in meta["enum"]))
    return rules


def _all_of(shape: Shape) -> str:
    """The bracketed constraint list AWS prints for list members, map keys and values."""
    return "[" + ", ".join(text for text, _ in _rules(shape)) + "]"


_JSON_TYPES: dict[str, tuple[type, ...]] = {
    "string": (str,),
    "boolean": (bool,),
    "integer": (int,),
    "long": (int,),
    "float": (int, float),
    "double": (int, float),
}


class _Validator:
    """Walks a value against its shape: checks types and constraints, converts blobs/timestamps.

    Violations are collected (not raised) so that one answer lists them all, as AWS does.
    """

    def __init__(self) -> None:
        self.errors: list[str] = []

    def fail(self, shape: Shape, value: Any, path: str, constraint: str) -> None:
        shown = "Value" if shape.metadata.get("sensitive") else (
            "Value null" if value is None else f"Value '{_render(value)}'"
        )
        self.errors.append(f"{shown} at '{path}' failed to satisfy constraint: {constraint}")

    def raise_if_failed(self) -> None:
        if self.errors:
            n = len(self.errors)
            plural = "s" if n > 1 else ""
            raise InvalidRequestException(
                f"{n} validation error{plural} detected: " + "; ".join(self.errors)
            )

    def structure(
        self, shape: StructureShape, value: Mapping[str, Any], path: str, *, top: bool = False
    ) -> dict[str, Any]:
        """Check the members present and the required ones.

        The top level is keyed by member name (members come from several locations);
        nested structures keep their JSON keys.
        """
        out: dict[str, Any] = {}
        for name, member in shape.members.items():
            key = name if top else member.serialization.get("name", name)
            item = value.get(key)
            where = f"{path}.{name}" if path else name
            if item is None:
                if name in shape.required_members:
                    self.fail(member, None, where, "Member must not be null")
                continue
            out[key] = self.value(member, item, where)
        return out

    def value(self, shape: Shape, value: Any, path: str) -> Any:
        kind = shape.type_name
        if shape.metadata.get("document"):
            return value
        if kind == "structure":
            if not isinstance(value, dict):
                self.fail(shape, value, path, "Member must be a structure")
                return value
            assert isinstance(shape, StructureShape)
            return self.structure(shape, value, path)
        if kind == "list":
            return self._list(shape, value, path)
        if kind == "map":
            return self._map(shape, value, path)
        if kind == "timestamp":
            return self._timestamp(shape, value, path)
        if kind == "blob":
            return self._blob(shape, value, path)
        expected = _JSON_TYPES.get(kind)
        if expected is not None and (
            not isinstance(value, expected)
            or (kind != "boolean" and isinstance(value, bool))
        ):
            self.fail(shape, value, path, f"Member must be of type {kind}")
            return value
        self._check(shape, value, path)
        return value

    def _check(self, shape: Shape, value: Any, path: str) -> None:
        for text, passes in _rules(shape):
            if not passes(value):
                self.fail(shape, value, path, text)

    def _list(self, shape: Any, value: Any, path: str) -> Any:
        if not isinstance(value, list):
            self.fail(shape, value, path, "Member must be a list")
            return value
        self._check(shape, value, path)
        member = shape.member
        if member.type_name in ("structure", "list", "map"):
            return [self.value(member, v, f"{path}.{i}.member") for i, v in enumerate(value, 1)]
        inner = _Validator()
        out = [inner.value(member, v, path) for v in value]
        if inner.errors:
            self.fail(shape, value, path,
                      f"Member must satisfy constraint: {_all_of(member)}")
        return out

    def _map(self, shape: Any, value: Any, path: str) -> Any:
        if not isinstance(value, dict):
            self.fail(shape, value, path, "Member must be a map")
            return value
        self._check(shape, value, path)
        keys = _Validator()
        for key in value:
            keys.value(shape.key, key, path)
        if keys.errors:
            self.fail(shape, value, path,
                      f"Map keys must satisfy constraint: {_all_of(shape.key)}")
        vshape = shape.value
        if vshape.type_name in ("structure", "list", "map"):
            return {k: self.value(vshape, v, f"{path}.{k}") for k, v in value.items()}
        values = _Validator()
        out = {k: values.value(vshape, v, path) for k, v in value.items()}
        if values.errors:
            self.fail(shape, value, path,
                      f"Map value must satisfy constraint: {_all_of(vshape)}")
        return out

    def _timestamp(self, shape: Shape, value: Any, path: str) -> Any:
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            return float(value)
        if isinstance(value, dt.datetime):
            return _epoch(value)
        if isinstance(value, str):
            try:
                return _epoch(parse_timestamp(value))
            except (ValueError, TypeError):
                pass
        self.fail(shape, value, path, "Member must be a timestamp")
        return value

    def _blob(self, shape: Shape, value: Any, path: str) -> Any:
        if isinstance(value, (bytes, bytearray)):
            return bytes(value)
        if isinstance(value, str):
            try:
                return base64.b64decode(value, validate=True)
            except (binascii.Error, ValueError):
                pass
        self.fail(shape, value, path, "Member must be base64-encoded binary")
        return value


def _epoch(value: dt.datetime) -> float:
    if value.tzinfo is None:
        value = value.replace(tzinfo=dt.timezone.utc)
    return value.timestamp()


def _from_text(shape: Shape, text: str) -> Any:
    """A URI label, query value or header value typed per its shape.

    Text that does not parse is returned unchanged, for the validator to report
    as a type violation.
    """
    kind = shape.type_name
    try:
        if kind == "boolean":
            lowered = text.lower()
            return lowered == "true" if lowered in ("true", "false") else text
        if kind in ("integer", "long"):
            return int(text)
        if kind in ("float", "double"):
            return float(text)
        if kind == "timestamp":
            return _epoch(parse_timestamp(text))
        if kind == "list":
            return [_from_text(shape.member, p.strip())  # type: ignore[attr-defined]
                    for p in text.split(",")]
        if kind == "string" and shape.serialization.get("jsonvalue"):
            return json.loads(base64.b64decode(text))
    except (ValueError, TypeError, OverflowError, binascii.Error):
        return text
    return text


def _parse_json_object(body: bytes) -> dict[str, Any]:
    try:
        doc = json.loads(body)
    except (UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise InvalidRequestException(f"Could not parse request body into json: {exc}") from None
    if not isinstance(doc, dict):
        raise InvalidRequestException("Could not parse request body into json: "
                                      "expected a JSON object")
    return doc


def parse_input(
    op: OperationModel,
    labels: Mapping[str, str],
    query: Sequence[tuple[str, str]],
    headers: Mapping[str, str],
    body: bytes,
) -> dict[str, Any]:
    """The request's input members (wire member names), typed and validated.

    Raises :class:`InvalidRequestException` listing every violated constraint.
    """
    shape = op.input_shape
    if shape is None:
        return {}
    assert isinstance(shape, StructureShape)
    validator = _Validator()
    raw: dict[str, Any] = {}
    payload = shape.serialization.get("payload")
    if payload is not None:
        pshape = shape.members[payload]
        if pshape.type_name == "structure":
            if body.strip():
                raw[payload] = _parse_json_object(body)
        elif body:
            raw[payload] = body if pshape.type_name == "blob" else body.decode("utf-8", "replace")
    else:
        in_body = [n for n, m in shape.members.items() if not m.serialization.get("location")]
        if in_body and body.strip():
            doc = _parse_json_object(body)
            for name in in_body:
                key = shape.members[name].serialization.get("name", name)
                if key in doc:
                    raw[name] = doc[key]
    for name, member in shape.members.items():
        location = member.serialization.get("location")
        wire = member.serialization.get("name", name)
        if location == "uri" and wire in labels:
            raw[name] = _from_text(member, labels[wire])
        elif location == "querystring":
            values = [v for k, v in query if k == wire]
            if member.type_name == "list" and values:
                raw[name] = [_from_text(member.member, v)  # type: ignore[attr-defined]
                             for v in values]
            elif values:
                raw[name] = _from_text(member, values[0])
        elif location == "header" and wire in headers:
            raw[name] = _from_text(member, headers[wire])
    params = validator.structure(shape, raw, "", top=True)
    validator.raise_if_failed()
    return params


# --------------------------------------------------------------------------- output


def _lookup(obj: Any, wire: str) -> Any:
    if isinstance(obj, Mapping):
        value = obj.get(snake(wire))
        return obj.get(wire) if value is None else value
    return getattr(obj, snake(wire), None)


def _serialize(shape: Shape, value: Any) -> Any:
    if isinstance(value, Enum):
        value = value.value
    kind = shape.type_name
    if value is None or shape.metadata.get("document"):
        return value
    if kind == "structure":
        out = {}
        for name, member in shape.members.items():
            if member.serialization.get("location"):
                continue
            item = _serialize(member, _lookup(value, name))
            if item is not None:
                out[member.serialization.get("name", name)] = item
        return out
    if kind == "list":
        return [_serialize(shape.member, v) for v in value]  # type: ignore[attr-defined]
    if kind == "map":
        return {
            str(k.value if isinstance(k, Enum) else k): _serialize(shape.value, v)  # type: ignore[attr-defined]
            for k, v in value.items()
        }
    if kind == "timestamp":
        return _epoch(value) if isinstance(value, dt.datetime) else float(value)
    if kind == "blob":
        return base64.b64encode(value).decode("ascii")
    if kind in ("integer", "long"):
        return int(value)
    if kind in ("float", "double"):
        return float(value)
    if kind == "boolean":
        return bool(value)
    return str(value)


def _header_text(value: Any) -> str:
    if isinstance(value, Enum):
        value = value.value
    if isinstance(value, bool):
        return "true" if value else "false"
    return str(value)


@dataclass(frozen=True)
class SerializedOutput:
    status: int
    headers: dict[str, str]
    body: bytes


def serialize_output(op: OperationModel, result: Any) -> SerializedOutput:
    """The HTTP response for a backend result, walking the operation's output shape."""
    shape = op.output_shape
    status = 200
    headers: dict[str, str] = {}
    if shape is None or result is None:
        return SerializedOutput(status, headers, b"{}")
    assert isinstance(shape, StructureShape)
    for name, member in shape.members.items():
        location = member.serialization.get("location")
        if location is None:
            continue
        value = _lookup(result, name)
        if value is None:
            continue
        if location == "statusCode":
            status = int(value)
        elif location == "header":
            headers[member.serialization.get("name", name)] = _header_text(value)
    payload = shape.serialization.get("payload")
    if payload is not None:
        pshape = shape.members[payload]
        value = _lookup(result, payload)
        if pshape.type_name in ("blob", "string") and value is not None:
            raw = value if isinstance(value, bytes) else str(value).encode()
            return SerializedOutput(status, headers, raw)
        return SerializedOutput(status, headers,
                                json.dumps(_serialize(pshape, value) or {}).encode())
    return SerializedOutput(status, headers, json.dumps(_serialize(shape, result)).encode())


# --------------------------------------------------------------------------- auth

_AUTH_RE = re.compile(
    r"AWS4-HMAC-SHA256\s+Credential=(?P<credential>[^,\s]+),\s*"
    r"SignedHeaders=(?P<signed>[^,\s]+),\s*Signature=(?P<signature>[0-9a-fA-F]+)\s*"
)
_INVALID_TOKEN = "The security token included in the request is invalid."


def exposure_requires_token(host: str) -> bool:
    """Whether binding the API to ``host`` exposes it beyond loopback (then use a token)."""
    if host == "localhost":
        return False
    try:
        return not ipaddress.ip_address(host).is_loopback
    except ValueError:
        return True


@dataclass(frozen=True)
class Authenticator:
    """Who may call the API; see the module docstring for the exact rule."""

    region: str
    api_token: str | None = None
    key_pairs: Mapping[str, str] = field(default_factory=dict)

    @property
    def enforcing(self) -> bool:
        return self.api_token is not None or bool(self.key_pairs)

    def check(self, method: str, raw_path: str, headers: Mapping[str, str], body: bytes) -> None:
        """Return if the request may proceed; raise a 403 :class:`AwsError` otherwise."""
        if not self.enforcing:
            return
        token = headers.get(API_TOKEN_HEADER)
        if token is not None:
            if self.api_token is None or not hmac.compare_digest(
                token.encode(), self.api_token.encode()
            ):
                raise UnrecognizedClientException(_INVALID_TOKEN)
            return
        authorization = headers.get("Authorization")
        if authorization is None:
            raise MissingAuthenticationTokenException("Missing Authentication Token")
        self._check_sigv4(method, raw_path, headers, body, authorization)

    def _check_sigv4(
        self, method: str, raw_path: str, headers: Mapping[str, str], body: bytes,
        authorization: str,
    ) -> None:
        parsed = _AUTH_RE.fullmatch(authorization.strip())
        timestamp = headers.get("X-Amz-Date")
        if parsed is None or timestamp is None:
            raise InvalidSignatureException(
                "Authorization header requires 'Credential', 'SignedHeaders' and "
                "'Signature' (AWS4-HMAC-SHA256) and an X-Amz-Date header.")
        scope = parsed["credential"].split("/")
        if len(scope) != 5 or scope[4] != "aws4_request":
            raise InvalidSignatureException("Credential must have exactly 5 slash-delimited "
                                            "elements, e.g. keyid/date/region/service/term")
        access_key, _date, region, service, _term = scope
        if region != self.region:
            raise InvalidSignatureException(
                f"Credential should be scoped to a valid region, not '{region}'.")
        secret = self.key_pairs.get(access_key, self.api_token)
        if secret is None:
            raise UnrecognizedClientException(_INVALID_TOKEN)
        signed = parsed["signed"].split(";")
        content_sha = headers.get("X-Amz-Content-SHA256")
        if content_sha not in (None, "UNSIGNED-PAYLOAD") and not hmac.compare_digest(
            content_sha.encode(), sha256(body).hexdigest().encode()
        ):
            raise InvalidSignatureException("The provided 'x-amz-content-sha256' header does "
                                            "not match what was computed.")
        host = headers.get("Host", "localhost")
        request = AWSRequest(
            method=method,
            url=f"http://{host}{raw_path}",
            headers={name: headers.get(name, "") for name in signed},
            data=body,
        )
        request.context["timestamp"] = timestamp
        signer = SigV4Auth(Credentials(access_key, secret), service, region)
        canonical = signer.canonical_request(request)
        expected = signer.signature(signer.string_to_sign(request, canonical), request)
        if not hmac.compare_digest(expected.encode(), parsed["signature"].lower().encode()):
            raise InvalidSignatureException(
                "The request signature we calculated does not match the signature you "
                "provided. Check your AWS Secret Access Key and signing method. Consult the "
                "service documentation for details.")


# --------------------------------------------------------------------------- application


Gate = Callable[[str, Mapping[str, Any]], Awaitable[None]]


@dataclass(frozen=True)
class ControlPlane:
    """What the request handlers share (stored on the aiohttp application)."""

    backend: Any
    model: ServiceModel
    routes: RouteTable
    auth: Authenticator
    executor: Executor | None
    region: str
    account_id: str
    observations: ObservationLog | None = None
    #: Awaited with the operation name and its parsed (wire-named) input before the backend
    #: runs: quotas and fault injection (issue 10) raise an AwsError or delay here.
    gate: Gate | None = None


CONTROL_PLANE = web.AppKey("fleetbench.controlplane", ControlPlane)
_OPERATION = web.RequestKey("fleetbench.operation", str)


@web.middleware
async def _boundary(
    request: web.Request, handler: Callable[[web.Request], Awaitable[web.StreamResponse]]
) -> web.StreamResponse:
    """Authenticate, then render every error once, in AWS's shape (spec §5.2)."""
    plane = request.app[CONTROL_PLANE]
    request_id = str(uuid.uuid4())
    try:
        if plane.auth.enforcing:
            plane.auth.check(request.method, request.raw_path, request.headers,
                             await request.read())
        response = await handler(request)
    except AwsError as exc:
        response = error_response(exc.status, exc.code, exc.to_body(), request_id)
    except web.HTTPException as exc:
        code = "InvalidRequestException" if exc.status < 500 else "InternalFailureException"
        response = error_response(exc.status, code, {"message": exc.reason}, request_id)
    except Exception:
        log.exception("event=internal_error operation=%s", request.get(_OPERATION))
        response = error_response(500, "InternalFailureException",
                                  {"message": "Internal failure"}, request_id)
    response.headers["x-amzn-RequestId"] = request_id
    operation = request.get(_OPERATION)
    if operation is not None and plane.observations is not None:
        detail: dict[str, Any] = {"operation": operation, "status": response.status}
        if response.status >= 300:
            detail["errorCode"] = response.headers.get("x-amzn-ErrorType", "").split(":")[0]
        plane.observations.record(Kind.CONTROL_PLANE, **detail)
    return response


async def _dispatch(request: web.Request) -> web.StreamResponse:
    """Route an AWS request by the model, call the backend off the loop, serialise."""
    plane = request.app[CONTROL_PLANE]
    path, _, raw_query = request.raw_path.partition("?")
    query = parse_qsl(raw_query, keep_blank_values=True)
    found = plane.routes.match(request.method, path, query)
    if found is None:
        raise UnknownOperationException(
            f"Not Found: no AWS IoT operation matches {request.method} {path}")
    name = found.route.operation
    request[_OPERATION] = name
    op = plane.model.operation_model(name)
    params = parse_input(op, found.labels, query, request.headers, await request.read())
    method = getattr(plane.backend, snake(name), None)
    if method is None:
        raise NotImplementedException(
            f"Operation {name} is not implemented by the fleetbench emulator")
    if plane.gate is not None:
        await plane.gate(name, params)
    kwargs = {snake(k): v for k, v in params.items()}
    loop = asyncio.get_running_loop()
    result = await loop.run_in_executor(plane.executor, functools.partial(method, **kwargs))
    out = serialize_output(op, result)
    return web.Response(status=out.status, body=out.body, headers=out.headers,
                        content_type="application/json")


def build_app(
    backend: Any,
    *,
    region: str = "us-east-1",
    account_id: str = "123456789012",
    admin: AdminState | None = None,
    api_token: str | None = None,
    executor: Executor | None = None,
    key_pairs: Mapping[str, str] | None = None,
    gate: Gate | None = None,
) -> web.Application:
    """The control-plane HTTP application (admin routes first, then every ``iot`` route).

    ``executor`` runs the synchronous backend methods (None: the loop's default
    executor). ``api_token``/``key_pairs`` switch authentication on (module docstring).
    ``gate`` is awaited before each operation (quotas and faults, issue 10).
    """
    app = web.Application(middlewares=[_boundary])
    app[CONTROL_PLANE] = ControlPlane(
        backend=backend,
        model=iot_service_model(),
        routes=iot_routes(),
        auth=Authenticator(region=region, api_token=api_token, key_pairs=dict(key_pairs or {})),
        executor=executor,
        region=region,
        account_id=account_id,
        observations=admin.observations if admin is not None else None,
        gate=gate,
    )
    if admin is not None:
        from harness.emulator.admin import add_admin_routes

        add_admin_routes(app, admin, executor=executor)
    app.router.add_route("*", "/{tail:.*}", _dispatch)
    return app


# --------------------------------------------------------------------------- serving


class BackgroundServer:
    """An aiohttp application served from its own event loop in a daemon thread.

    For tests and for embedding the API in synchronous code; ``url`` is known once
    :meth:`start` returns.
    """

    def __init__(self, app: web.Application, host: str = "127.0.0.1", port: int = 0,
                 shutdown_timeout: float = 2.0) -> None:
        self._app = app
        self._host = host
        self._port = port
        self._shutdown_timeout = shutdown_timeout
        self._loop = asyncio.new_event_loop()
        self._thread = threading.Thread(target=self._loop.run_forever, daemon=True,
                                        name="fleetbench-api")
        self._runner: web.AppRunner | None = None
        self.url = ""

    def start(self, timeout: float = 10.0) -> str:
        self._thread.start()
        future = asyncio.run_coroutine_threadsafe(self._start(), self._loop)
        try:
            self.url = future.result(timeout)
        except BaseException:
            self.stop(timeout)
            raise
        return self.url

    async def _start(self) -> str:
        self._runner = web.AppRunner(self._app, access_log=None,
                                     shutdown_timeout=self._shutdown_timeout)
        await self._runner.setup()
        site = web.TCPSite(self._runner, self._host, self._port)
        await site.start()
        host, port = self._runner.addresses[0][:2]
        return f"http://{host}:{port}"

    def stop(self, timeout: float = 10.0) -> None:
        if self._loop.is_closed():
            return
        if self._runner is not None:
            runner, self._runner = self._runner, None
            asyncio.run_coroutine_threadsafe(runner.cleanup(), self._loop).result(timeout)
        self._loop.call_soon_threadsafe(self._loop.stop)
        self._thread.join(timeout)
        self._loop.close()

    def __enter__(self) -> BackgroundServer:
        self.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()
