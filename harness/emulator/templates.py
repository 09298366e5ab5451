"""Provisioning template engine: check a body when it is stored, evaluate it at RegisterThing.

Pure and synchronous: no I/O, no clock, no registry. The registry calls
:func:`validate_template_body` at CreateProvisioningTemplate(Version) time; the
provisioning service calls :func:`certificate_parameters`, :func:`merge_hook_overrides`
and :func:`evaluate`, then checks the resulting :class:`ProvisioningPlan` against the
registry (existence of thing types, groups, billing groups and named policies,
``OverrideSettings`` conflicts) and applies it. A body is compiled once into a small tree
of frozen expression nodes (cached by body text), so creation-time checks and
provision-time evaluation share one parser.

Spec: fleet-provisioning.md §3 (templates), §1.4 step 6-7 (processing order), §4 (hook
overrides), §7 (``deviceConfiguration`` is a flat string map), edge cases 7, 9, 10, 13-16.

Emulator guesses (UNCONFIRMED in the spec; each is a named setting or constant here):

* ``Ref`` to an undeclared, non-reserved name (the developer guide's pre-provisioning-hook
  example references ``SerialNumber`` without declaring it and AWS accepts the template):
  accepted at creation; at provisioning it resolves from the request's ``parameters``
  (hook overrides included) when present, else RegisterThing is rejected with 400
  naming the parameter. Setting :data:`UNDECLARED_REFS` (``UndeclaredRefs.REJECT``
  makes every such reference a 400).
* Reserved ``AWS::IoT::Certificate::*`` names always take their value from the
  provisioned certificate (declared or not); values a device or hook sends under those
  names are ignored. A subject-derived one the certificate lacks falls back to the
  parameter's ``Default`` if declared, else 400.
* An inline ``PolicyDocument`` is named by the 40 uppercase hex characters of the SHA-1
  of its canonical resolved JSON (keys sorted, no whitespace, UTF-8):
  :meth:`PolicyPlan.resolved_name`. Identical resolved documents share one name.
* An absent ``OverrideSettings`` key means :data:`DEFAULT_OVERRIDE` (``REPLACE``),
  also for ``BillingGroup`` (which has no documented override key).
* errorCode strings on the ``rejected`` topic: :data:`INVALID_PARAMETERS_ERROR_CODE`
  for evaluation failures, :data:`INVALID_TEMPLATE_ERROR_CODE` for a stored body that
  does not validate; status :data:`EVALUATION_STATUS_CODE` (400).
* Anything AWS does not document for provisioning templates is refused at creation
  (``Conditions``, ``Fn::If``/``Fn::Equals``/..., ``Fn::GetAtt``, ``Fn::Base64``, pseudo
  parameters, unknown sections, keys and properties, parameter types other than
  ``String``, ``PackageVersions`` whose shape is unknown): a template that works only in
  the emulator would be a false pass. At most one thing and one certificate resource.
* ``Fn::Sub`` follows CloudFormation: ``${Name}`` substitutes, ``${!Name}`` is the literal
  ``${Name}`` (write IoT policy variables as ``${!iot:ClientId}`` inside ``Fn::Sub``).
  ``Fn::Join``/``Fn::Split`` delimiters and the ``Fn::Sub`` text must be literals.
* Non-string JSON scalars (numbers, booleans) in string positions, ``DeviceConfiguration``
  and ``AttributePayload`` are stringified (``1`` -> ``"1"``, ``true`` -> ``"true"``).
* Certificate ``Status`` is case-insensitive (``Active`` is observed to work). In fleet
  provisioning the certificate resource must use ``CertificateId`` resolving to the
  provisioned certificate's id; CSR/PEM methods are bulk/JITP only and give 400.
"""

from __future__ import annotations

import enum
import functools
import hashlib
import json
import math
import re
from collections.abc import Mapping
from dataclasses import dataclass
from types import MappingProxyType
from typing import TYPE_CHECKING, Any, TypeAlias

from cryptography import x509
from cryptography.x509.oid import NameOID

from harness import protocol
from harness.errors import AwsError, InvalidRequestException, ProvisioningError

if TYPE_CHECKING:
    _InvalidRequest = AwsError
else:
    _InvalidRequest = InvalidRequestException

# --------------------------------------------------------------------------- constants

#: Template body cap (spec §5, §6.1: ``templateBody`` 0-10240).
TEMPLATE_BODY_MAX_CHARS = 10240
#: Nesting deeper than this is refused at creation (keeps evaluation off Python's recursion limit).
MAX_NESTING_DEPTH = 48

THING_TYPE = "AWS::IoT::Thing"
CERTIFICATE_TYPE = "AWS::IoT::Certificate"
POLICY_TYPE = "AWS::IoT::Policy"
RESOURCE_TYPES = (THING_TYPE, CERTIFICATE_TYPE, POLICY_TYPE)

SECTIONS = ("Parameters", "Mappings", "Resources", "DeviceConfiguration")

CERTIFICATE_ID_PARAMETER = "AWS::IoT::Certificate::Id"
#: Subject attribute -> reserved parameter (spec §3.4).
SUBJECT_PARAMETERS: Mapping[x509.ObjectIdentifier, str] = MappingProxyType({
    NameOID.COMMON_NAME: "AWS::IoT::Certificate::CommonName",
    NameOID.COUNTRY_NAME: "AWS::IoT::Certificate::Country",
    NameOID.ORGANIZATION_NAME: "AWS::IoT::Certificate::Organization",
    NameOID.ORGANIZATIONAL_UNIT_NAME: "AWS::IoT::Certificate::OrganizationalUnit",
    NameOID.DN_QUALIFIER: "AWS::IoT::Certificate::DistinguishedNameQualifier",
    NameOID.STATE_OR_PROVINCE_NAME: "AWS::IoT::Certificate::StateName",
    NameOID.SERIAL_NUMBER: "AWS::IoT::Certificate::SerialNumber",
})
RESERVED_PARAMETERS = frozenset({CERTIFICATE_ID_PARAMETER, *SUBJECT_PARAMETERS.values()})

SUPPORTED_FUNCTIONS = ("Ref", "Fn::Join", "Fn::Select", "Fn::Split", "Fn::FindInMap", "Fn::Sub")
#: CloudFormation functions AWS does not document for provisioning templates (spec §3.5).
UNDOCUMENTED_FUNCTIONS = frozenset({
    "Fn::If", "Fn::Equals", "Fn::Not", "Fn::And", "Fn::Or", "Fn::Base64", "Fn::GetAtt",
    "Fn::ImportValue", "Fn::GetAZs", "Fn::Cidr", "Fn::Length", "Fn::ToJsonString",
    "Fn::Transform", "Fn::ForEach", "Fn::Contains", "Fn::EachMemberEquals",
    "Fn::EachMemberIn", "Fn::RefAll", "Fn::ValueOf", "Fn::ValueOfAll",
})

#: HTTP-like status of every template evaluation failure (spec §1.5: 400, codes UNCONFIRMED).
EVALUATION_STATUS_CODE = 400
#: errorCode when the request's parameters cannot satisfy the template: the protocol
#: module's constant, so emulator and devices agree on it (UNCONFIRMED).
INVALID_PARAMETERS_ERROR_CODE = protocol.INVALID_PARAMETERS_CODE
#: errorCode when the stored body does not validate (cannot happen for validated bodies).
INVALID_TEMPLATE_ERROR_CODE = "InvalidTemplate"

#: AWS's observed wording for a policy resource without name or document (spec §3.2, S26).
NEITHER_POLICY_NAME_NOR_DOCUMENT = (
    "Invalid registration template. Neither policyName nor policyDocument is present in "
    "the Template."
)
#: Same wording for both present (UNCONFIRMED: AWS's text for this case is unknown).
BOTH_POLICY_NAME_AND_DOCUMENT = (
    "Invalid registration template. Both policyName and policyDocument are present in "
    "the Template."
)

_MAX_VALUE_IN_MESSAGE = 80


class UndeclaredRefs(enum.Enum):
    """What provisioning does with a ``Ref`` to a name neither declared nor reserved."""

    FROM_PARAMETERS = "FROM_PARAMETERS"  # use the request's value if sent, else 400
    REJECT = "REJECT"  # always 400


#: Default for :func:`evaluate` (UNCONFIRMED, see the module docstring).
UNDECLARED_REFS = UndeclaredRefs.FROM_PARAMETERS


class Override(str, enum.Enum):
    """``OverrideSettings`` values (spec §3.3); compare equal to their AWS strings."""

    DO_NOTHING = "DO_NOTHING"
    REPLACE = "REPLACE"
    FAIL = "FAIL"
    MERGE = "MERGE"


#: What an absent ``OverrideSettings`` key means when the resource exists (UNCONFIRMED, §3.3).
DEFAULT_OVERRIDE = Override.REPLACE

#: Both documented spellings of thing override keys -> the normalised key (spec §3.3).
THING_OVERRIDE_KEYS: Mapping[str, str] = MappingProxyType({
    "AttributePayload": "AttributePayload", "ATTRIBUTE_PAYLOAD": "AttributePayload",
    "ThingTypeName": "ThingTypeName", "THING_TYPE_NAME": "ThingTypeName",
    "ThingGroups": "ThingGroups", "THING_GROUPS": "ThingGroups",
})
CERTIFICATE_OVERRIDE_KEYS: Mapping[str, str] = MappingProxyType(
    {"Status": "Status", "STATUS": "Status"}
)
_MERGEABLE = frozenset({"AttributePayload", "ThingGroups"})
_STATUSES = ("ACTIVE", "INACTIVE")


# --------------------------------------------------------------------------- errors


class TemplateError(_InvalidRequest):
    """A template body refused at creation time (InvalidRequestException, 400)."""

    def __init__(self, message: str) -> None:
        super().__init__(f"Invalid provisioning template: {message}")


class TemplateEvaluationError(ProvisioningError):
    """RegisterThing rejected while evaluating the template (``rejected`` payload)."""


def _fail(message: str) -> TemplateEvaluationError:
    return TemplateEvaluationError(EVALUATION_STATUS_CODE, INVALID_PARAMETERS_ERROR_CODE, message)


def _show(value: str) -> str:
    """A value quoted for a message, cut short: messages stay bounded."""
    if len(value) > _MAX_VALUE_IN_MESSAGE:
        value = value[:_MAX_VALUE_IN_MESSAGE] + "..."
    return json.dumps(value, ensure_ascii=False)


# --------------------------------------------------------------------------- plan records


@dataclass(frozen=True)
class ThingPlan:
    """The thing a template asks for. ``None`` fields were not in the template."""

    thing_name: str
    attributes: Mapping[str, str] | None
    thing_type_name: str | None
    thing_groups: tuple[str, ...] | None
    billing_group: str | None
    overrides: Mapping[str, str]  # keys "AttributePayload", "ThingTypeName", "ThingGroups"
    logical_name: str = "thing"

    def override_for(self, prop: str) -> Override:
        """The override for ``prop``; :data:`DEFAULT_OVERRIDE` when the template sets none."""
        value = self.overrides.get(prop)
        return Override(value) if value is not None else DEFAULT_OVERRIDE


@dataclass(frozen=True)
class CertificatePlan:
    """Status the provisioned certificate gets (``ACTIVE``/``INACTIVE``)."""

    status: str
    overrides: Mapping[str, str]  # key "Status"
    logical_name: str = "certificate"


@dataclass(frozen=True)
class PolicyPlan:
    """One policy to attach: an existing one by name, or one created from a document."""

    logical_name: str
    policy_name: str | None
    policy_document: str | None  # canonical JSON text when inline

    def resolved_name(self) -> str:
        """``policy_name``, or 40 uppercase hex chars: SHA-1 of the canonical document
        (UNCONFIRMED algorithm and input, spec §3.2; the documented example name is
        160 bits of uppercase hex)."""
        if self.policy_name is not None:
            return self.policy_name
        assert self.policy_document is not None
        digest = hashlib.sha1(self.policy_document.encode("utf-8", "surrogatepass"))
        return digest.hexdigest().upper()


@dataclass(frozen=True)
class ProvisioningPlan:
    """Everything RegisterThing must apply, and what it answers with."""

    thing: ThingPlan | None
    certificate: CertificatePlan | None
    policies: tuple[PolicyPlan, ...]
    device_configuration: dict[str, str]
    parameters: Mapping[str, str]  # the final resolved parameters


# --------------------------------------------------------------------------- public functions


def validate_template_body(body: str) -> None:
    """Creation-time checks (spec §3.7); raises :class:`TemplateError` naming the problem."""
    _compile(body)


def certificate_parameters(cert: x509.Certificate, certificate_id: str) -> dict[str, str]:
    """Automatic parameters for ``cert`` (spec §3.4): the id, plus each subject-derived
    one the subject carries (first value when an attribute repeats)."""
    params = {CERTIFICATE_ID_PARAMETER: certificate_id}
    first: dict[x509.ObjectIdentifier, Any] = {}
    for attribute in cert.subject:  # one parse of the subject (each .subject builds a Name)
        first.setdefault(attribute.oid, attribute.value)
    for oid, name in SUBJECT_PARAMETERS.items():
        value = first.get(oid)
        if isinstance(value, str):
            params[name] = value
    return params


def merge_hook_overrides(
    parameters: Mapping[str, str], overrides: Mapping[str, str] | None
) -> dict[str, str]:
    """The device's parameters with the hook's ``parameterOverrides`` added; an override
    wins over the device's value for the same key (inferred, spec §4)."""
    merged = dict(parameters)
    if overrides:
        merged.update(overrides)
    return merged


def evaluate(
    body: str,
    parameters: Mapping[str, str],
    automatic: Mapping[str, str],
    *,
    undeclared_refs: UndeclaredRefs = UNDECLARED_REFS,
) -> ProvisioningPlan:
    """Evaluate ``body`` for one RegisterThing (spec §1.4 step 6-7).

    ``parameters`` are the device's, hook overrides already merged; ``automatic`` comes
    from :func:`certificate_parameters`. Raises only :class:`TemplateEvaluationError`.
    """
    try:
        template = _compile(body)
    except TemplateError as exc:
        raise TemplateEvaluationError(
            EVALUATION_STATUS_CODE, INVALID_TEMPLATE_ERROR_CODE, exc.message
        ) from None
    env = _Env(template, parameters, automatic, undeclared_refs)
    thing = template.thing.evaluate(env) if template.thing else None
    certificate = template.certificate.evaluate(env) if template.certificate else None
    policies = tuple(policy.evaluate(env) for policy in template.policies)
    device_configuration = {
        key: _need_string(expr.evaluate(env), f"DeviceConfiguration.{key}")
        for key, expr in template.device_configuration
    }
    return ProvisioningPlan(
        thing=thing,
        certificate=certificate,
        policies=policies,
        device_configuration=device_configuration,
        parameters=MappingProxyType(env.final_parameters()),
    )


# --------------------------------------------------------------------------- evaluation state

_ListValue: TypeAlias = tuple[str | None, ...]
_Value: TypeAlias = str | _ListValue


class _Env:
    """Name resolution for one evaluation; remembers what it resolved."""

    def __init__(self, template: _Template, parameters: Mapping[str, str],
                 automatic: Mapping[str, str], undeclared_refs: UndeclaredRefs) -> None:
        self.template = template
        self.parameters = parameters
        self.automatic = automatic
        self.undeclared_refs = undeclared_refs
        self.resolved: dict[str, str] = {}

    def ref(self, name: str, where: str) -> str:
        value = self._lookup(name, where)
        if not isinstance(value, str):
            raise _fail(f"{where}: parameter {_show(name)} must be a string")
        self.resolved[name] = value
        return value

    def _lookup(self, name: str, where: str) -> object:
        declared = self.template.parameters
        if name in RESERVED_PARAMETERS:
            value = self.automatic.get(name)
            if value is None and name in declared:
                value = declared[name]
            if value is None:
                raise _fail(f"{where}: {name} has no value: the provisioned certificate "
                            "does not carry it")
            return value
        if name in declared:
            value = self.parameters.get(name, declared[name])
            if value is None:
                raise _fail(f"{where}: parameter {_show(name)} has no value: the request's "
                            "parameters do not set it and it declares no Default")
            return value
        if self.undeclared_refs is UndeclaredRefs.FROM_PARAMETERS and name in self.parameters:
            return self.parameters[name]
        if self.undeclared_refs is UndeclaredRefs.REJECT:
            raise _fail(f"{where}: parameter {_show(name)} is not declared in the template's "
                        "Parameters")
        raise _fail(f"{where}: parameter {_show(name)} is not declared in the template's "
                    "Parameters and the request's parameters do not set it")

    def final_parameters(self) -> dict[str, str]:
        final: dict[str, str] = {}
        for name, default in self.template.parameters.items():
            if name in RESERVED_PARAMETERS:
                continue
            value = self.parameters.get(name, default)
            if isinstance(value, str):
                final[name] = value
        for name, value in self.automatic.items():
            if name in RESERVED_PARAMETERS and isinstance(value, str):
                final[name] = value
        final.update(self.resolved)
        return final


def _need_string(value: _Value, where: str) -> str:
    if not isinstance(value, str):
        raise _fail(f"{where}: expected a string but the expression produced a list")
    return value


def _need_list(value: _Value, where: str) -> _ListValue:
    if isinstance(value, str):
        raise _fail(f"{where}: expected a list but the expression produced a string")
    return value


def _strings(values: _ListValue, where: str) -> tuple[str, ...]:
    for i, item in enumerate(values):
        if item is None:
            raise _fail(f"{where}: element {i} is null")
    return tuple(v for v in values if v is not None)


# --------------------------------------------------------------------------- expressions


class _Kind(enum.Enum):
    STRING = "string"
    LIST = "list"
    ANY = "string or list"


class _Expr:
    """A compiled value: a literal or an intrinsic function call."""

    where: str

    def kind(self) -> _Kind:
        raise NotImplementedError

    def evaluate(self, env: _Env) -> _Value:
        raise NotImplementedError


@dataclass(frozen=True)
class _Literal(_Expr):
    where: str
    value: str

    def kind(self) -> _Kind:
        return _Kind.STRING

    def evaluate(self, env: _Env) -> _Value:
        return self.value


@dataclass(frozen=True)
class _Null(_Expr):
    """A JSON null inside a literal list: legal until something uses it (Fn::Select docs)."""

    where: str

    def kind(self) -> _Kind:
        return _Kind.STRING

    def evaluate(self, env: _Env) -> _Value:
        raise _fail(f"{self.where}: null value")


@dataclass(frozen=True)
class _List(_Expr):
    where: str
    items: tuple[_Expr, ...]

    def kind(self) -> _Kind:
        return _Kind.LIST

    def evaluate(self, env: _Env) -> _Value:
        out: list[str | None] = []
        for item in self.items:
            if isinstance(item, _Null):
                out.append(None)
            else:
                out.append(_need_string(item.evaluate(env), item.where))
        return tuple(out)


@dataclass(frozen=True)
class _Ref(_Expr):
    where: str
    name: str

    def kind(self) -> _Kind:
        return _Kind.STRING

    def evaluate(self, env: _Env) -> _Value:
        return env.ref(self.name, self.where)


@dataclass(frozen=True)
class _Join(_Expr):
    where: str
    delimiter: str
    values: _Expr

    def kind(self) -> _Kind:
        return _Kind.STRING

    def evaluate(self, env: _Env) -> _Value:
        items = _need_list(self.values.evaluate(env), self.where)
        return self.delimiter.join(_strings(items, self.where))


@dataclass(frozen=True)
class _Select(_Expr):
    where: str
    index: _Expr
    values: _Expr

    def kind(self) -> _Kind:
        return _Kind.STRING

    def evaluate(self, env: _Env) -> _Value:
        text = _need_string(self.index.evaluate(env), self.where)
        if not re.fullmatch(r"-?[0-9]+", text):
            raise _fail(f"{self.where}: index {_show(text)} is not an integer")
        items = _need_list(self.values.evaluate(env), self.where)
        index = int(text) if len(text) < 20 else -1
        if not 0 <= index < len(items):
            raise _fail(f"{self.where}: index {_show(text)} is out of range for a list of "
                        f"{len(items)} element(s)")
        item = items[index]
        if item is None:
            raise _fail(f"{self.where}: element {index} is null")
        return item


@dataclass(frozen=True)
class _Split(_Expr):
    where: str
    delimiter: str
    source: _Expr

    def kind(self) -> _Kind:
        return _Kind.LIST

    def evaluate(self, env: _Env) -> _Value:
        return tuple(_need_string(self.source.evaluate(env), self.where).split(self.delimiter))


@dataclass(frozen=True)
class _FindInMap(_Expr):
    where: str
    map_name: _Expr
    top_key: _Expr
    second_key: _Expr
    result_kind: _Kind

    def kind(self) -> _Kind:
        return self.result_kind

    def evaluate(self, env: _Env) -> _Value:
        name = _need_string(self.map_name.evaluate(env), self.where)
        top = _need_string(self.top_key.evaluate(env), self.where)
        second = _need_string(self.second_key.evaluate(env), self.where)
        mapping = env.template.mappings.get(name)
        if mapping is None:
            raise _fail(f"{self.where}: Mappings has no map {_show(name)}")
        entry = mapping.get(top)
        if entry is None:
            raise _fail(f"{self.where}: map {_show(name)} has no key {_show(top)}")
        value = entry.get(second)
        if value is None:
            raise _fail(f"{self.where}: map {_show(name)} key {_show(top)} has no key "
                        f"{_show(second)}")
        return value


@dataclass(frozen=True)
class _Sub(_Expr):
    where: str
    parts: tuple[str | _Expr, ...]  # literal text, or the expression for one ${...}

    def kind(self) -> _Kind:
        return _Kind.STRING

    def evaluate(self, env: _Env) -> _Value:
        out = []
        for part in self.parts:
            out.append(part if isinstance(part, str)
                       else _need_string(part.evaluate(env), self.where))
        return "".join(out)


# JSON with embedded expressions (policy documents keep their JSON types).


@dataclass(frozen=True)
class _JsonScalar:
    """A constant: a JSON scalar, or a whole subtree without expressions (folded at compile
    time, shared by every evaluation: the evaluated document is only serialised)."""

    value: Any


@dataclass(frozen=True)
class _JsonArray:
    items: tuple[_JsonNode, ...]


@dataclass(frozen=True)
class _JsonObject:
    items: tuple[tuple[str, _JsonNode], ...]


_JsonNode: TypeAlias = _JsonScalar | _JsonArray | _JsonObject | _Expr


def _evaluate_json(node: _JsonNode, env: _Env) -> Any:
    if isinstance(node, _JsonScalar):
        return node.value
    if isinstance(node, _JsonArray):
        return [_evaluate_json(item, env) for item in node.items]
    if isinstance(node, _JsonObject):
        return {key: _evaluate_json(value, env) for key, value in node.items}
    value = node.evaluate(env)
    return value if isinstance(value, str) else list(_strings(value, node.where))


def _canonical_json(document: Any) -> str:
    return json.dumps(document, sort_keys=True, separators=(",", ":"), ensure_ascii=False)


# --------------------------------------------------------------------------- compiled resources


@dataclass(frozen=True)
class _Thing:
    logical_name: str
    thing_name: _Expr
    attributes: tuple[tuple[str, _Expr], ...] | None
    thing_type_name: _Expr | None
    thing_groups: _Expr | None
    billing_group: _Expr | None
    overrides: Mapping[str, str]

    def evaluate(self, env: _Env) -> ThingPlan:
        name = _need_string(self.thing_name.evaluate(env), self.thing_name.where)
        if not name:
            raise _fail(f"{self.thing_name.where}: the thing name is empty")
        attributes = None
        if self.attributes is not None:
            attributes = MappingProxyType(
                {k: _need_string(v.evaluate(env), v.where) for k, v in self.attributes}
            )
        groups = None
        if self.thing_groups is not None:
            where = self.thing_groups.where
            groups = _strings(_need_list(self.thing_groups.evaluate(env), where), where)
        return ThingPlan(
            thing_name=name,
            attributes=attributes,
            thing_type_name=_optional_string(self.thing_type_name, env),
            thing_groups=groups,
            billing_group=_optional_string(self.billing_group, env),
            overrides=self.overrides,
            logical_name=self.logical_name,
        )


def _optional_string(expr: _Expr | None, env: _Env) -> str | None:
    return None if expr is None else _need_string(expr.evaluate(env), expr.where)


@dataclass(frozen=True)
class _Certificate:
    logical_name: str
    method: str  # "CertificateId", "CertificateSigningRequest" or "CertificatePem"
    value: _Expr
    status: _Expr | None
    overrides: Mapping[str, str]

    def evaluate(self, env: _Env) -> CertificatePlan:
        where = self.value.where
        if self.method != "CertificateId":
            raise _fail(f"{where}: fleet provisioning templates must identify the certificate "
                        f"with CertificateId, not {self.method}")
        certificate_id = _need_string(self.value.evaluate(env), where)
        if certificate_id != env.automatic.get(CERTIFICATE_ID_PARAMETER):
            raise _fail(f"{where}: CertificateId must be the provisioned certificate "
                        f"({{\"Ref\": \"{CERTIFICATE_ID_PARAMETER}\"}})")
        status = "ACTIVE"
        if self.status is not None:
            text = _need_string(self.status.evaluate(env), self.status.where)
            status = text.upper()
            if status not in _STATUSES:
                raise _fail(f"{self.status.where}: Status {_show(text)} is not ACTIVE or INACTIVE")
        return CertificatePlan(status=status, overrides=self.overrides,
                               logical_name=self.logical_name)


@dataclass(frozen=True)
class _Policy:
    logical_name: str
    policy_name: _Expr | None
    document: _JsonNode | None  # a _JsonObject, or an _Expr producing JSON text
    where: str

    def evaluate(self, env: _Env) -> PolicyPlan:
        if self.policy_name is not None:
            name = _need_string(self.policy_name.evaluate(env), self.policy_name.where)
            if not name:
                raise _fail(f"{self.policy_name.where}: the policy name is empty")
            return PolicyPlan(self.logical_name, name, None)
        assert self.document is not None
        if isinstance(self.document, _Expr):
            text = _need_string(self.document.evaluate(env), self.where)
            try:
                document = json.loads(text, parse_constant=_no_constant, parse_float=_finite)
            except (ValueError, RecursionError):
                raise _fail(f"{self.where}: the PolicyDocument is not valid JSON") from None
            if not isinstance(document, dict):
                raise _fail(f"{self.where}: the PolicyDocument is not a JSON object")
        else:
            document = _evaluate_json(self.document, env)
        return PolicyPlan(self.logical_name, None, _canonical_json(document))


@dataclass(frozen=True)
class _Template:
    parameters: Mapping[str, str | None]  # declared name -> Default
    mappings: Mapping[str, Mapping[str, Mapping[str, _Value]]]
    thing: _Thing | None
    certificate: _Certificate | None
    policies: tuple[_Policy, ...]
    device_configuration: tuple[tuple[str, _Expr], ...]


# --------------------------------------------------------------------------- compiler


def _no_constant(name: str) -> Any:
    raise ValueError(f"{name} is not JSON")


def _finite(text: str) -> float:
    value = float(text)
    if not math.isfinite(value):
        raise ValueError(f"number {text} is out of range")
    return value


def _scalar_text(value: object) -> str | None:
    """JSON scalar as text (numbers and booleans stringified); None for anything else."""
    if isinstance(value, str):
        return value
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, int):
        return str(value)
    if isinstance(value, float):
        return json.dumps(value)
    return None


def _describe(value: object) -> str:
    if isinstance(value, dict):
        return "an object"
    if isinstance(value, list):
        return "a list"
    if value is None:
        return "null"
    if isinstance(value, bool):
        return "a boolean"
    if isinstance(value, (int, float)):
        return "a number"
    return "a string"


def _is_function_key(key: str) -> bool:
    return key == "Ref" or key.startswith("Fn:")


def _compile(body: str) -> _Template:
    if not isinstance(body, str):
        raise TemplateError("the template body must be a string")
    if len(body) > TEMPLATE_BODY_MAX_CHARS:
        raise TemplateError(f"the template body is {len(body)} characters; the limit is "
                            f"{TEMPLATE_BODY_MAX_CHARS}")
    return _compile_body(body)


@functools.lru_cache(maxsize=256)
def _compile_body(body: str) -> _Template:
    """Parse and check once per distinct body; the result is never mutated."""
    try:
        document = json.loads(body, parse_constant=_no_constant, parse_float=_finite)
    except RecursionError:
        raise TemplateError("the template body is nested too deeply") from None
    except ValueError as exc:
        raise TemplateError(f"the template body is not valid JSON ({exc})") from None
    if not isinstance(document, dict):
        raise TemplateError(f"the template body must be a JSON object, not {_describe(document)}")
    return _Compiler(document).template()


class _Compiler:
    """Turns a parsed body into a :class:`_Template`, refusing what AWS does not document."""

    def __init__(self, document: dict[str, Any]) -> None:
        self.document = document
        self.parameters: dict[str, str | None] = {}
        self.mappings: dict[str, dict[str, dict[str, _Value]]] = {}
        self.resource_names: frozenset[str] = frozenset()

    def template(self) -> _Template:
        for key in self.document:
            if key == "Conditions":
                raise TemplateError("the Conditions section is not documented by AWS for "
                                    "provisioning templates")
            if key not in SECTIONS:
                raise TemplateError(f"unknown section {_show(key)}; provisioning templates "
                                    f"have {', '.join(SECTIONS)}")
        for key in SECTIONS:
            if key in self.document and not isinstance(self.document[key], dict):
                raise TemplateError(f"{key} must be a JSON object, not "
                                    f"{_describe(self.document[key])}")
        self._parameters(self.document.get("Parameters", {}))
        self._mappings(self.document.get("Mappings", {}))
        resources: dict[str, Any] = self.document.get("Resources", {})
        self.resource_names = frozenset(resources)
        thing: _Thing | None = None
        certificate: _Certificate | None = None
        policies: list[_Policy] = []
        for name, resource in resources.items():
            where = f"Resources.{name}"
            kind = self._resource_type(resource, where)
            if kind == THING_TYPE:
                if thing is not None:
                    raise TemplateError(f"{where}: a template declares at most one "
                                        f"{THING_TYPE} resource")
                thing = self._thing(name, resource, where)
            elif kind == CERTIFICATE_TYPE:
                if certificate is not None:
                    raise TemplateError(f"{where}: a template declares at most one "
                                        f"{CERTIFICATE_TYPE} resource")
                certificate = self._certificate(name, resource, where)
            else:
                policies.append(self._policy(name, resource, where))
        config = self._device_configuration(self.document.get("DeviceConfiguration", {}))
        return _Template(
            parameters=MappingProxyType(self.parameters),
            mappings=MappingProxyType(self.mappings),
            thing=thing,
            certificate=certificate,
            policies=tuple(policies),
            device_configuration=config,
        )

    # sections ---------------------------------------------------------------

    def _parameters(self, section: dict[str, Any]) -> None:
        for name, spec in section.items():
            where = f"Parameters.{name}"
            if name.startswith("AWS::") and name not in RESERVED_PARAMETERS:
                raise TemplateError(f"{where}: {name} is not a parameter AWS documents for "
                                    "provisioning templates")
            if not isinstance(spec, dict):
                raise TemplateError(f"{where} must be an object like {{\"Type\": \"String\"}}")
            for key in spec:
                if key not in ("Type", "Default"):
                    raise TemplateError(f"{where}: unknown key {_show(key)}; parameters have "
                                        "Type and an optional Default")
            if spec.get("Type") != "String":
                raise TemplateError(f"{where}.Type must be \"String\" (the only documented "
                                    "parameter type)")
            default = spec.get("Default")
            if default is not None and not isinstance(default, str):
                raise TemplateError(f"{where}.Default must be a string")
            self.parameters[name] = default

    def _mappings(self, section: dict[str, Any]) -> None:
        for map_name, mapping in section.items():
            where = f"Mappings.{map_name}"
            if not isinstance(mapping, dict):
                raise TemplateError(f"{where} must be an object of objects")
            self.mappings[map_name] = {}
            for top, entry in mapping.items():
                if not isinstance(entry, dict):
                    raise TemplateError(f"{where}.{top} must be an object")
                values: dict[str, _Value] = {}
                for second, value in entry.items():
                    values[second] = self._mapping_value(value, f"{where}.{top}.{second}")
                self.mappings[map_name][top] = values

    def _mapping_value(self, value: Any, where: str) -> _Value:
        text = _scalar_text(value)
        if text is not None:
            return text
        if isinstance(value, list):
            texts = [_scalar_text(item) for item in value]
            if all(t is not None for t in texts):
                return tuple(texts)
        if isinstance(value, dict) and any(_is_function_key(k) for k in value):
            raise TemplateError(f"{where}: intrinsic functions and parameters cannot be used "
                                "in Mappings")
        raise TemplateError(f"{where}: a mapping value must be a string or a list of "
                            f"strings, not {_describe(value)}")

    def _device_configuration(self, section: dict[str, Any]) -> tuple[tuple[str, _Expr], ...]:
        entries = []
        for key, value in section.items():
            where = f"DeviceConfiguration.{key}"
            if isinstance(value, (dict, list)) and not self._is_function(value, where):
                raise TemplateError(f"{where}: DeviceConfiguration is a flat map of strings; "
                                    "nested objects and lists are not supported")
            entries.append((key, self._string(value, where, 0)))
        return tuple(entries)

    # resources ----------------------------------------------------------------

    def _resource_type(self, resource: Any, where: str) -> str:
        if not isinstance(resource, dict):
            raise TemplateError(f"{where} must be an object")
        for key in resource:
            if key == "Condition":
                raise TemplateError(f"{where}: Condition is not documented by AWS for "
                                    "provisioning templates")
            if key not in ("Type", "Properties", "OverrideSettings"):
                raise TemplateError(f"{where}: unknown key {_show(key)}; resources have Type, "
                                    "Properties and OverrideSettings")
        kind = resource.get("Type")
        if kind not in RESOURCE_TYPES:
            shown = _show(kind) if isinstance(kind, str) else _describe(kind)
            raise TemplateError(f"{where}.Type {shown} is not one of {', '.join(RESOURCE_TYPES)}")
        props = resource.get("Properties", {})
        if not isinstance(props, dict):
            raise TemplateError(f"{where}.Properties must be an object")
        settings = resource.get("OverrideSettings", {})
        if not isinstance(settings, dict):
            raise TemplateError(f"{where}.OverrideSettings must be an object")
        return str(kind)

    def _overrides(self, resource: dict[str, Any], keys: Mapping[str, str],
                   where: str) -> Mapping[str, str]:
        out: dict[str, str] = {}
        where = f"{where}.OverrideSettings"
        for key, value in resource.get("OverrideSettings", {}).items():
            if key not in keys:
                raise TemplateError(f"{where}: unknown key {_show(key)}; valid keys are "
                                    f"{', '.join(keys)}")
            if not isinstance(value, str) or value not in Override.__members__:
                shown = _show(value) if isinstance(value, str) else _describe(value)
                raise TemplateError(f"{where}.{key}: {shown} is not one of "
                                    f"{', '.join(Override.__members__)}")
            normalised = keys[key]
            if value == Override.MERGE and normalised not in _MERGEABLE:
                raise TemplateError(f"{where}.{key}: MERGE is only valid for a thing's "
                                    "AttributePayload and ThingGroups")
            if normalised in out and out[normalised] != value:
                raise TemplateError(f"{where}: {normalised} is set twice with different values")
            out[normalised] = value
        return MappingProxyType(out)

    def _properties(self, resource: dict[str, Any], allowed: tuple[str, ...],
                    where: str) -> dict[str, Any]:
        props: dict[str, Any] = resource.get("Properties", {})
        for key in props:
            if key not in allowed:
                raise TemplateError(f"{where}.Properties: unknown property {_show(key)}; "
                                    f"valid properties are {', '.join(allowed)}")
        return props

    def _thing(self, name: str, resource: dict[str, Any], where: str) -> _Thing:
        if "PackageVersions" in resource.get("Properties", {}):
            raise TemplateError(f"{where}.Properties.PackageVersions is not modelled by the "
                                "emulator (AWS does not document its shape)")
        props = self._properties(resource, ("ThingName", "AttributePayload", "ThingTypeName",
                                            "ThingGroups", "BillingGroup"), where)
        where = f"{where}.Properties"
        if "ThingName" not in props:
            raise TemplateError(f"{where}: ThingName is required")
        attributes: list[tuple[str, _Expr]] | None = None
        if "AttributePayload" in props:
            payload = props["AttributePayload"]
            if not isinstance(payload, dict) or self._is_function(payload, where):
                raise TemplateError(f"{where}.AttributePayload must be an object of "
                                    "attribute name to value")
            attributes = []
            for key, value in payload.items():
                at = f"{where}.AttributePayload.{key}"
                if isinstance(value, (dict, list)) and not self._is_function(value, at):
                    raise TemplateError(f"{at}: attribute values are strings")
                attributes.append((key, self._string(value, at, 0)))
        return _Thing(
            logical_name=name,
            thing_name=self._string(props["ThingName"], f"{where}.ThingName", 0),
            attributes=tuple(attributes) if attributes is not None else None,
            thing_type_name=self._optional(props, "ThingTypeName", where),
            thing_groups=(self._list(props["ThingGroups"], f"{where}.ThingGroups", 0)
                          if "ThingGroups" in props else None),
            billing_group=self._optional(props, "BillingGroup", where),
            overrides=self._overrides(resource, THING_OVERRIDE_KEYS, f"Resources.{name}"),
        )

    def _optional(self, props: dict[str, Any], key: str, where: str) -> _Expr | None:
        return self._string(props[key], f"{where}.{key}", 0) if key in props else None

    def _certificate(self, name: str, resource: dict[str, Any], where: str) -> _Certificate:
        props = dict(self._properties(resource, (
            "CertificateId", "CertificateID", "CertificateSigningRequest", "CertificatePem",
            "CACertificatePem", "Status"), where))
        where = f"{where}.Properties"
        if "CertificateID" in props:
            if "CertificateId" in props:
                raise TemplateError(f"{where}: CertificateId is given twice")
            props["CertificateId"] = props.pop("CertificateID")
        methods = [m for m in ("CertificateId", "CertificateSigningRequest", "CertificatePem")
                   if m in props]
        if len(methods) != 1:
            raise TemplateError(f"{where}: a certificate resource uses exactly one of "
                                "CertificateId, CertificateSigningRequest and CertificatePem "
                                f"(found {', '.join(methods) or 'none'})")
        if "CACertificatePem" in props and methods != ["CertificatePem"]:
            raise TemplateError(f"{where}: CACertificatePem goes only with CertificatePem")
        if "CACertificatePem" in props:
            self._string(props["CACertificatePem"], f"{where}.CACertificatePem", 0)
        status = self._optional(props, "Status", where)
        if isinstance(status, _Literal) and status.value.upper() not in _STATUSES:
            raise TemplateError(f"{where}.Status {_show(status.value)} is not ACTIVE or "
                                "INACTIVE")
        return _Certificate(
            logical_name=name,
            method=methods[0],
            value=self._string(props[methods[0]], f"{where}.{methods[0]}", 0),
            status=status,
            overrides=self._overrides(resource, CERTIFICATE_OVERRIDE_KEYS, f"Resources.{name}"),
        )

    def _policy(self, name: str, resource: dict[str, Any], where: str) -> _Policy:
        if "OverrideSettings" in resource:
            raise TemplateError(f"{where}: OverrideSettings are not available for policy "
                                "resources")
        props = self._properties(resource, ("PolicyName", "PolicyDocument"), where)
        where = f"{where}.Properties"
        if "PolicyName" not in props and "PolicyDocument" not in props:
            raise TemplateError(f"{where}: {NEITHER_POLICY_NAME_NOR_DOCUMENT}")
        if "PolicyName" in props and "PolicyDocument" in props:
            raise TemplateError(f"{where}: {BOTH_POLICY_NAME_AND_DOCUMENT}")
        if "PolicyName" in props:
            return _Policy(name, self._string(props["PolicyName"], f"{where}.PolicyName", 0),
                           None, f"{where}.PolicyName")
        at = f"{where}.PolicyDocument"
        document = props["PolicyDocument"]
        node: _JsonNode
        if isinstance(document, str):
            try:
                parsed = json.loads(document, parse_constant=_no_constant, parse_float=_finite)
            except (ValueError, RecursionError):
                raise TemplateError(f"{at}: the escaped policy document is not valid "
                                    "JSON") from None
            if not isinstance(parsed, dict):
                raise TemplateError(f"{at}: the policy document must be a JSON object")
            self._check_depth(parsed, at, 0)
            node = _Literal(at, _canonical_json(parsed))
        elif isinstance(document, dict) and self._is_function(document, at):
            node = self._string(document, at, 0)
        elif isinstance(document, dict):
            node = self._json(document, at, 0)
        else:
            raise TemplateError(f"{at} must be a JSON object or a JSON-encoded string, not "
                                f"{_describe(document)}")
        return _Policy(name, None, node, at)

    # values -------------------------------------------------------------------

    def _check_depth(self, node: Any, where: str, depth: int) -> None:
        if depth > MAX_NESTING_DEPTH:
            raise TemplateError(f"{where}: nested deeper than {MAX_NESTING_DEPTH} levels")
        children = node.values() if isinstance(node, dict) else node if isinstance(
            node, list) else ()
        for child in children:
            self._check_depth(child, where, depth + 1)

    def _is_function(self, node: Any, where: str) -> bool:
        """Whether ``node`` is an intrinsic function call; refuses malformed mixtures."""
        if not isinstance(node, dict):
            return False
        keys = [k for k in node if _is_function_key(k)]
        if not keys:
            return False
        if len(node) != 1:
            raise TemplateError(f"{where}: {keys[0]} must be the only key of its object")
        return True

    def _json(self, node: Any, where: str, depth: int) -> _JsonNode:
        if depth > MAX_NESTING_DEPTH:
            raise TemplateError(f"{where}: nested deeper than {MAX_NESTING_DEPTH} levels")
        if isinstance(node, dict):
            if self._is_function(node, where):
                return self._call(node, where, depth)
            fields = tuple((k, self._json(v, f"{where}.{k}", depth + 1))
                           for k, v in node.items())
            if all(isinstance(v, _JsonScalar) for _, v in fields):  # constant: fold it
                return _JsonScalar({k: v.value for k, v in fields})  # type: ignore[union-attr]
            return _JsonObject(fields)
        if isinstance(node, list):
            items = tuple(self._json(v, f"{where}[{i}]", depth + 1) for i, v in enumerate(node))
            if all(isinstance(v, _JsonScalar) for v in items):
                return _JsonScalar([v.value for v in items])  # type: ignore[union-attr]
            return _JsonArray(items)
        return _JsonScalar(node)

    def _string(self, node: Any, where: str, depth: int) -> _Expr:
        """An expression in a position that needs a string."""
        text = _scalar_text(node)
        if text is not None:
            return _Literal(where, text)
        if self._is_function(node, where):
            expr = self._call(node, where, depth)
            if expr.kind() is _Kind.LIST:
                raise TemplateError(f"{where}: expected a string but {next(iter(node))} "
                                    "produces a list")
            return expr
        raise TemplateError(f"{where}: expected a string, not {_describe(node)}")

    def _list(self, node: Any, where: str, depth: int) -> _Expr:
        """An expression in a position that needs a list of strings."""
        if isinstance(node, list):
            items: list[_Expr] = []
            for i, item in enumerate(node):
                at = f"{where}[{i}]"
                items.append(_Null(at) if item is None else self._string(item, at, depth + 1))
            return _List(where, tuple(items))
        if self._is_function(node, where):
            expr = self._call(node, where, depth)
            if expr.kind() is _Kind.STRING:
                raise TemplateError(f"{where}: expected a list but {next(iter(node))} "
                                    "produces a string")
            return expr
        raise TemplateError(f"{where}: expected a list, not {_describe(node)}")

    def _call(self, node: dict[str, Any], where: str, depth: int) -> _Expr:
        if depth > MAX_NESTING_DEPTH:
            raise TemplateError(f"{where}: nested deeper than {MAX_NESTING_DEPTH} levels")
        ((name, args),) = node.items()
        where = f"{where}.{name}" if name != "Ref" else where
        if name in UNDOCUMENTED_FUNCTIONS:
            raise TemplateError(f"{where}: {name} is not documented by AWS for provisioning "
                                f"templates (supported: {', '.join(SUPPORTED_FUNCTIONS)})")
        if name == "Ref":
            return self._ref(args, where)
        if name == "Fn::Join":
            self._arity(args, 2, "[delimiter, [values]]", where)
            return _Join(where, self._delimiter(args[0], where),
                         self._list(args[1], where, depth + 1))
        if name == "Fn::Select":
            self._arity(args, 2, "[index, [values]]", where)
            return _Select(where, self._index(args[0], where, depth),
                           self._list(args[1], where, depth + 1))
        if name == "Fn::Split":
            self._arity(args, 2, "[delimiter, string]", where)
            delimiter = self._delimiter(args[0], where)
            if not delimiter:
                raise TemplateError(f"{where}: the delimiter must not be empty")
            return _Split(where, delimiter, self._string(args[1], where, depth + 1))
        if name == "Fn::FindInMap":
            return self._find_in_map(args, where, depth)
        if name == "Fn::Sub":
            return self._sub(args, where, depth)
        raise TemplateError(f"{where}: unknown intrinsic function {_show(name)} (supported: "
                            f"{', '.join(SUPPORTED_FUNCTIONS)})")

    @staticmethod
    def _arity(args: Any, count: int, shape: str, where: str) -> None:
        if not isinstance(args, list) or len(args) != count:
            raise TemplateError(f"{where}: expected {shape}")

    @staticmethod
    def _delimiter(value: Any, where: str) -> str:
        if not isinstance(value, str):
            raise TemplateError(f"{where}: the delimiter must be a literal string")
        return value

    def _index(self, value: Any, where: str, depth: int) -> _Expr:
        if isinstance(value, (bool, float)):
            raise TemplateError(f"{where}: the index must be an integer")
        if isinstance(value, int):
            value = str(value)
        if isinstance(value, str):
            if not re.fullmatch(r"[0-9]+", value):
                raise TemplateError(f"{where}: the index {_show(value)} is not a non-negative "
                                    "integer")
            return _Literal(where, value)
        return self._string(value, where, depth + 1)

    def _check_name(self, name: str, where: str, what: str) -> None:
        """Refuse references AWS does not document; accept the rest (maybe undeclared)."""
        if name in RESERVED_PARAMETERS or name in self.parameters:
            return
        if name.startswith("AWS::"):
            raise TemplateError(f"{where}: {what} {name} is not documented by AWS for "
                                "provisioning templates (pseudo parameters are not supported)")
        if name in self.resource_names:
            raise TemplateError(f"{where}: {what} {_show(name)} names a resource; only "
                                "parameters can be referenced")

    def _ref(self, args: Any, where: str) -> _Expr:
        if not isinstance(args, str) or not args:
            raise TemplateError(f"{where}: Ref takes a parameter name")
        self._check_name(args, where, "Ref")
        return _Ref(where, args)

    def _find_in_map(self, args: Any, where: str, depth: int) -> _Expr:
        self._arity(args, 3, "[MapName, TopLevelKey, SecondLevelKey]", where)
        map_name, top, second = (self._string(a, where, depth + 1) for a in args)
        maps = self.mappings
        if isinstance(map_name, _Literal):
            if map_name.value not in maps:
                raise TemplateError(f"{where}: Mappings has no map {_show(map_name.value)}")
            maps = {map_name.value: maps[map_name.value]}
        leaves = [v for m in maps.values() for entry in m.values() for v in entry.values()]
        if leaves and all(isinstance(v, str) for v in leaves):
            kind = _Kind.STRING
        elif leaves and all(isinstance(v, tuple) for v in leaves):
            kind = _Kind.LIST
        else:
            kind = _Kind.ANY
        return _FindInMap(where, map_name, top, second, kind)

    def _sub(self, args: Any, where: str, depth: int) -> _Expr:
        variables: dict[str, _Expr] = {}
        if isinstance(args, list):
            self._arity(args, 2, "a string or [string, {variable: value}]", where)
            text, names = args
            if not isinstance(names, dict) or self._is_function(names, where):
                raise TemplateError(f"{where}: the variables must be an object")
            for key, value in names.items():
                variables[key] = self._string(value, f"{where}.{key}", depth + 1)
        else:
            text = args
        if not isinstance(text, str):
            raise TemplateError(f"{where}: the text must be a literal string")
        parts: list[str | _Expr] = []
        position = 0
        for match in re.finditer(r"\$\{([^}]*)\}", text):
            parts.append(text[position:match.start()])
            position = match.end()
            inner = match.group(1)
            if inner.startswith("!"):
                parts.append("${" + inner[1:] + "}")
            elif inner in variables:
                parts.append(variables[inner])
            else:
                parts.append(self._sub_name(inner, where))
        parts.append(text[position:])
        return _Sub(where, tuple(p for p in parts if p != ""))

    def _sub_name(self, name: str, where: str) -> _Expr:
        if not name:
            raise TemplateError(f"{where}: empty ${{}} placeholder")
        if name not in RESERVED_PARAMETERS and not name.startswith("AWS::"):
            if ":" in name:
                raise TemplateError(f"{where}: ${{{name}}} is neither a parameter nor a "
                                    f"variable (write an IoT policy variable as ${{!{name}}})")
            if "." in name:
                raise TemplateError(f"{where}: ${{{name}}} reads a resource attribute, which "
                                    "AWS does not document for provisioning templates")
        self._check_name(name, where, "${}")
        return _Ref(where, name)
