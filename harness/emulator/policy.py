"""AWS IoT policy documents: parsing and evaluation (spec iot-broker-and-policy.md §3, §1.9).

:func:`parse_policy` validates a document once (registry, control plane) and returns an
immutable :class:`PolicyDocument`. The broker prepares each distinct set of attached documents
once (:class:`PolicySet`: action patterns compiled, resource patterns split into templates) and
builds one :class:`Authorizer` per connection on it. A connection's context is fixed, so
variables are substituted and conditions decided once per distinct value of the variables the
documents reference; connections with equal values (every claim connection of a fleet) share
those bound statements and their decision cache, and each PUBLISH/SUBSCRIBE/delivery costs a
dict lookup once its decision is cached.

Matching rules (§3.3): ``*`` matches any run of characters including ``/``, ``?`` exactly one
character, anywhere in a resource ARN or an action; MQTT's ``+`` and ``#`` are literal;
``${*}``, ``${?}``, ``${$}`` are literal ``*``, ``?``, ``$``. Resources are case-sensitive.
Evaluation (§3.4): an explicit Deny wins, then any Allow, else implicit deny.

Settings below carry the spec's UNCONFIRMED defaults; change them at module level.
"""

from __future__ import annotations

import ipaddress
import json
import re
from collections import OrderedDict
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass
from enum import Enum
from functools import lru_cache
from typing import Any, TypeAlias

from harness.emulator.policy_variables import ConnectionContext, PolicyVariables
from harness.errors import InvalidRequestException, MalformedPolicyException

__all__ = [
    "ACTION_NAMES_CASE_INSENSITIVE",
    "BINDINGS_PER_POLICY_SET",
    "DECISION_CACHE_SIZE",
    "MAX_POLICY_CHARACTERS",
    "MISSING_VERSION",
    "SUPPORTED_VERSIONS",
    "UNRESOLVED_VARIABLE_MATCHES_NOTHING",
    "Authorizer",
    "Condition",
    "ConnectionContext",
    "Decision",
    "Effect",
    "NamedPolicy",
    "PolicyDecisions",
    "PolicyDocument",
    "PolicySet",
    "Statement",
    "parse_policy",
    "resource_arn",
    "test_authorization",
    "wildcard_matcher",
]

# -- settings (UNCONFIRMED defaults from the spec) ----------------------------------------------

#: §3.5: a resource whose ``${...}`` cannot be resolved matches nothing, so its statement gives
#: neither Allow nor Deny (a NotResource or a condition value with an unresolved variable makes
#: the whole statement inert). False: the ``${...}`` text is matched literally instead.
UNRESOLVED_VARIABLE_MATCHES_NOTHING = True
#: §3.3: action names compare case-insensitively, as in IAM (``iot:publish`` == ``iot:Publish``).
ACTION_NAMES_CASE_INSENSITIVE = True
#: §3.1: the service's limit, counted without white space.
MAX_POLICY_CHARACTERS = 2048
#: Versions of the IAM policy grammar; ``2008-10-17`` has no policy variables (IAM rule).
SUPPORTED_VERSIONS = ("2012-10-17", "2008-10-17")
#: Version assumed when a document has none (IoT's docs require 2012-10-17; lenient default).
MISSING_VERSION = "2012-10-17"
#: Decisions one binding of a policy set remembers (first in, first out beyond this).
DECISION_CACHE_SIZE = 4096
#: Bindings (distinct values of the referenced variables) a :class:`PolicySet` keeps, LRU.
BINDINGS_PER_POLICY_SET = 1024

_VARIABLES_VERSION = "2012-10-17"
_TOP_LEVEL = ("Version", "Id", "Statement")
_STATEMENT_KEYS = frozenset(
    {"Sid", "Effect", "Action", "NotAction", "Resource", "NotResource", "Condition"}
)


class Effect(str, Enum):
    ALLOW = "Allow"
    DENY = "Deny"


class Decision(Enum):
    """Outcome of an authorization; values are TestAuthorization's ``authDecision``."""

    ALLOWED = "ALLOWED"
    EXPLICIT_DENY = "EXPLICIT_DENY"
    IMPLICIT_DENY = "IMPLICIT_DENY"


# -- condition operators ---------------------------------------------------------------------

# canonical base operator -> (positive operator it negates, or itself; negated?)
_OPERATORS: dict[str, tuple[str, bool]] = {
    "StringEquals": ("StringEquals", False),
    "StringNotEquals": ("StringEquals", True),
    "StringEqualsIgnoreCase": ("StringEqualsIgnoreCase", False),
    "StringNotEqualsIgnoreCase": ("StringEqualsIgnoreCase", True),
    "StringLike": ("StringLike", False),
    "StringNotLike": ("StringLike", True),
    "ArnEquals": ("StringLike", False),
    "ArnLike": ("StringLike", False),
    "ArnNotEquals": ("StringLike", True),
    "ArnNotLike": ("StringLike", True),
    "Bool": ("Bool", False),
    "IpAddress": ("IpAddress", False),
    "NotIpAddress": ("IpAddress", True),
    "NumericEquals": ("NumericEquals", False),
    "NumericNotEquals": ("NumericEquals", True),
    "NumericLessThan": ("NumericLessThan", False),
    "NumericLessThanEquals": ("NumericLessThanEquals", False),
    "NumericGreaterThan": ("NumericGreaterThan", False),
    "NumericGreaterThanEquals": ("NumericGreaterThanEquals", False),
    "Null": ("Null", False),
}
_OPERATOR_BY_LOWER = {name.lower(): name for name in _OPERATORS}
_QUALIFIERS = {"forallvalues": "ForAllValues", "foranyvalue": "ForAnyValue"}


@dataclass(frozen=True)
class Condition:
    """One (operator, key, values) triple of a ``Condition`` block.

    ``operator`` is the canonical full spelling (``ForAllValues:StringEqualsIfExists``);
    ``base`` the operator without qualifier and suffix, ``qualifier`` ``ForAllValues`` /
    ``ForAnyValue`` or None, ``if_exists`` the ``...IfExists`` suffix.
    """

    operator: str
    key: str
    values: tuple[str, ...]
    base: str
    qualifier: str | None = None
    if_exists: bool = False


@dataclass(frozen=True)
class Statement:
    """One statement; exactly one of actions/not_actions and of resources/not_resources is set."""

    effect: Effect
    actions: tuple[str, ...] = ()
    not_actions: tuple[str, ...] = ()
    resources: tuple[str, ...] = ()
    not_resources: tuple[str, ...] = ()
    conditions: tuple[Condition, ...] = ()
    sid: str | None = None


@dataclass(frozen=True)
class PolicyDocument:
    """A validated policy. ``raw`` is the text as given (compact JSON for a mapping)."""

    statements: tuple[Statement, ...]
    raw: str
    version: str = "2012-10-17"


@dataclass(frozen=True)
class NamedPolicy:
    """A document with the name (and ARN) TestAuthorization reports it under."""

    name: str
    document: PolicyDocument
    arn: str | None = None


# -- ARNs --------------------------------------------------------------------------------------


def _partition(region: str) -> str:
    if region.startswith("cn-"):
        return "aws-cn"
    if region.startswith("us-gov-"):
        return "aws-us-gov"
    return "aws"


def arn_prefix(region: str, account_id: str) -> str:
    """``arn:aws:iot:<region>:<account>:`` (partition ``aws-cn``/``aws-us-gov`` where due)."""
    return f"arn:{_partition(region)}:iot:{region}:{account_id}:"


def resource_arn(region: str, account_id: str, kind: str, name: str) -> str:
    """The ARN IoT authorizes against, e.g. ``kind="topic"`` → ``arn:aws:iot:r:a:topic/<name>``
    (kinds: client, topic, topicfilter, thing, rolealias, policy, cert, ...)."""
    return f"{arn_prefix(region, account_id)}{kind}/{name}"


# -- parsing -----------------------------------------------------------------------------------


def parse_policy(document: str | bytes | Mapping[str, Any]) -> PolicyDocument:
    """Validate a policy document (§3.1) and return it parsed.

    Raises :class:`MalformedPolicyException` naming the first problem found: invalid JSON,
    wrong grammar, a ``Principal`` element, more than 2048 characters excluding white space,
    or an unknown ``Version``.
    """
    if isinstance(document, bytes):
        try:
            document = document.decode("utf-8")
        except UnicodeDecodeError as exc:
            raise MalformedPolicyException("Policy document is not valid UTF-8") from exc
    if isinstance(document, str):
        return _parse_text(document)
    if isinstance(document, Mapping):
        try:
            text = json.dumps(document, separators=(",", ":"), ensure_ascii=False,
                              allow_nan=False)
        except (TypeError, ValueError) as exc:
            raise MalformedPolicyException(
                f"Policy document is not representable as JSON: {exc}"
            ) from exc
        return _parse_text(text)
    raise MalformedPolicyException("Policy document must be a JSON object")


@lru_cache(maxsize=1024)
def _parse_text(text: str) -> PolicyDocument:
    # Cached: the broker parses the same few attached documents for every connection.
    size = len("".join(text.split()))
    if size > MAX_POLICY_CHARACTERS:
        raise MalformedPolicyException(
            f"Policy document is {size} characters excluding white space; "
            f"the limit is {MAX_POLICY_CHARACTERS}"
        )
    try:
        data = json.loads(text)
    except json.JSONDecodeError as exc:
        raise MalformedPolicyException(
            f"Policy document is not valid JSON: {exc.msg} at line {exc.lineno} column {exc.colno}"
        ) from None
    if not isinstance(data, dict):
        raise MalformedPolicyException("Policy document must be a JSON object")
    for key in data:
        if key in ("Principal", "NotPrincipal"):
            raise MalformedPolicyException(f"{key} is not allowed in an IoT policy")
        if key not in _TOP_LEVEL:
            raise MalformedPolicyException(
                f"Unknown policy element {key!r}; expected Version, Id or Statement"
            )
    version = data.get("Version", MISSING_VERSION)
    if version not in SUPPORTED_VERSIONS:
        raise MalformedPolicyException(
            f"Unsupported policy Version {version!r}; expected one of "
            + ", ".join(repr(v) for v in SUPPORTED_VERSIONS)
        )
    if "Id" in data and not isinstance(data["Id"], str):
        raise MalformedPolicyException("Id must be a string")
    if "Statement" not in data:
        raise MalformedPolicyException("Policy document has no Statement")
    raw_statements = data["Statement"]
    if isinstance(raw_statements, dict):
        raw_statements = [raw_statements]
    if not isinstance(raw_statements, list) or not raw_statements:
        raise MalformedPolicyException(
            "Statement must be an object or a non-empty list of objects"
        )
    statements = tuple(_parse_statement(i, s) for i, s in enumerate(raw_statements))
    return PolicyDocument(statements=statements, raw=text, version=version)


def _parse_statement(index: int, raw: Any) -> Statement:
    where = f"Statement[{index}]"
    if not isinstance(raw, dict):
        raise MalformedPolicyException(f"{where} must be an object")
    for key in raw:
        if key in ("Principal", "NotPrincipal"):
            raise MalformedPolicyException(f"{where}: {key} is not allowed in an IoT policy")
        if key not in _STATEMENT_KEYS:
            raise MalformedPolicyException(f"{where}: unknown element {key!r}")
    sid = raw.get("Sid")
    if sid is not None and not isinstance(sid, str):
        raise MalformedPolicyException(f"{where}: Sid must be a string")
    if "Effect" not in raw:
        raise MalformedPolicyException(f"{where}: Effect is missing")
    effect = raw["Effect"]
    if effect not in ("Allow", "Deny"):
        raise MalformedPolicyException(f"{where}: Effect must be 'Allow' or 'Deny', got {effect!r}")
    actions, not_actions = _exactly_one(raw, where, "Action", "NotAction", _check_action)
    resources, not_resources = _exactly_one(raw, where, "Resource", "NotResource", _check_resource)
    conditions = _parse_conditions(where, raw["Condition"]) if "Condition" in raw else ()
    return Statement(effect=Effect(effect), actions=actions, not_actions=not_actions,
                     resources=resources, not_resources=not_resources,
                     conditions=conditions, sid=sid)


def _exactly_one(raw: dict[str, Any], where: str, name: str, not_name: str,
                 check: Callable[[str, str, str], None]
                 ) -> tuple[tuple[str, ...], tuple[str, ...]]:
    if (name in raw) == (not_name in raw):
        raise MalformedPolicyException(f"{where}: needs exactly one of {name} or {not_name}")
    element = name if name in raw else not_name
    value = raw[element]
    items = [value] if isinstance(value, str) else value
    if not isinstance(items, list) or not items or not all(isinstance(v, str) for v in items):
        raise MalformedPolicyException(
            f"{where}: {element} must be a string or a non-empty list of strings"
        )
    for item in items:
        check(where, element, item)
    parsed = tuple(items)
    return (parsed, ()) if element == name else ((), parsed)


_ACTION_SHAPE = re.compile(r"[A-Za-z0-9*?-]+:[A-Za-z0-9*?]+")


def _check_action(where: str, element: str, action: str) -> None:
    if action != "*" and not _ACTION_SHAPE.fullmatch(action):
        raise MalformedPolicyException(
            f"{where}: {element} {action!r} is not '*' or '<service>:<action>'"
        )


def _check_resource(where: str, element: str, resource: str) -> None:
    if resource != "*" and not resource.startswith("arn:"):
        raise MalformedPolicyException(f"{where}: {element} {resource!r} is not '*' or an ARN")


def _parse_conditions(where: str, raw: Any) -> tuple[Condition, ...]:
    if not isinstance(raw, dict):
        raise MalformedPolicyException(f"{where}: Condition must be an object")
    conditions: list[Condition] = []
    for operator, block in raw.items():
        base, qualifier, if_exists = _parse_operator(where, operator)
        if not isinstance(block, dict) or not block:
            raise MalformedPolicyException(
                f"{where}: Condition {operator!r} must map condition keys to values"
            )
        canonical = "".join(
            (f"{qualifier}:" if qualifier else "", base, "IfExists" if if_exists else "")
        )
        for key, value in block.items():
            values = _condition_values(where, operator, key, value)
            if base in ("IpAddress", "NotIpAddress"):
                for v in values:
                    _check_ip(where, base, v)
            conditions.append(Condition(operator=canonical, key=key, values=values, base=base,
                                        qualifier=qualifier, if_exists=if_exists))
    return tuple(conditions)


def _parse_operator(where: str, operator: str) -> tuple[str, str | None, bool]:
    text = operator
    qualifier = None
    if ":" in text:
        prefix, _, text = text.partition(":")
        qualifier = _QUALIFIERS.get(prefix.lower())
        if qualifier is None:
            raise MalformedPolicyException(
                f"{where}: Condition operator {operator!r} has an unknown qualifier {prefix!r}; "
                "expected ForAllValues or ForAnyValue"
            )
    if_exists = text.lower().endswith("ifexists") and text.lower() != "ifexists"
    if if_exists:
        text = text[: -len("IfExists")]
    base = _OPERATOR_BY_LOWER.get(text.lower())
    if base is None or (base == "Null" and (if_exists or qualifier)):
        raise MalformedPolicyException(f"{where}: Condition operator {operator!r} is not supported")
    return base, qualifier, if_exists


def _condition_values(where: str, operator: str, key: str, value: Any) -> tuple[str, ...]:
    items = value if isinstance(value, list) else [value]
    if not items:
        raise MalformedPolicyException(f"{where}: Condition {operator} {key!r} has no values")
    out: list[str] = []
    for item in items:
        if isinstance(item, bool):
            out.append("true" if item else "false")
        elif isinstance(item, (str, int, float)):
            out.append(str(item))
        else:
            raise MalformedPolicyException(
                f"{where}: Condition {operator} {key!r} values must be strings, numbers or booleans"
            )
    return tuple(out)


def _check_ip(where: str, operator: str, value: str) -> None:
    if "${" in value:
        return
    try:
        ipaddress.ip_network(value, strict=False)
    except ValueError:
        raise MalformedPolicyException(
            f"{where}: {operator} value {value!r} is not an IP address or CIDR block"
        ) from None


# -- wildcard patterns -------------------------------------------------------------------------


class _Wild(Enum):
    STAR = "*"
    ONE = "?"


@dataclass(frozen=True)
class _Var:
    name: str


_Part: TypeAlias = str | _Wild | _Var
_TOKENS = re.compile(r"\$\{([^}]*)\}|[*?]")
_TOKENS_NO_VARIABLES = re.compile(r"[*?]")


@lru_cache(maxsize=8192)
def _template(text: str, variables: bool) -> tuple[_Part, ...]:
    """Split a pattern into literals, wildcards and variables (``${*}``-style escapes → literal)."""
    parts: list[_Part] = []
    pos = 0
    for match in (_TOKENS if variables else _TOKENS_NO_VARIABLES).finditer(text):
        if match.start() > pos:
            parts.append(text[pos:match.start()])
        token = match.group(0)
        if token == "*":
            parts.append(_Wild.STAR)
        elif token == "?":
            parts.append(_Wild.ONE)
        elif match.group(1) in ("*", "?", "$"):
            parts.append(match.group(1))
        else:
            parts.append(_Var(match.group(1)))
        pos = match.end()
    if pos < len(text):
        parts.append(text[pos:])
    return tuple(parts)


def _resolve(template: tuple[_Part, ...], variables: PolicyVariables,
             missing: set[str]) -> tuple[str | _Wild, ...] | None:
    """Substitute variables; ``None`` if one is unresolved and that makes it match nothing."""
    out: list[str | _Wild] = []
    for part in template:
        if isinstance(part, _Var):
            value = variables.substitution(part.name)
            if value is None:
                missing.add(part.name)
                if UNRESOLVED_VARIABLE_MATCHES_NOTHING:
                    return None
                value = "${" + part.name + "}"
            out.append(value)
        else:
            out.append(part)
    return _merge(out)


def _always(_value: str) -> bool:
    return True


@lru_cache(maxsize=8192)
def _matcher(parts: tuple[str | _Wild, ...]) -> Callable[[str], bool]:
    """A predicate for a resolved pattern: equality or prefix test when possible, else a regex."""
    if not parts:
        return "".__eq__
    if parts == (_Wild.STAR,):
        return _always
    if len(parts) == 1 and isinstance(parts[0], str):
        return parts[0].__eq__
    if len(parts) == 2 and isinstance(parts[0], str) and parts[1] is _Wild.STAR:
        prefix = parts[0]
        return lambda value: value.startswith(prefix)
    regex = "".join(
        re.escape(p) if isinstance(p, str) else (".*" if p is _Wild.STAR else ".") for p in parts
    )
    compiled = re.compile(regex, re.DOTALL)
    return lambda value: compiled.fullmatch(value) is not None


def wildcard_matcher(pattern: str) -> Callable[[str], bool]:
    """Predicate for an IoT policy pattern: ``*`` any run, ``?`` one character, ``${*}``,
    ``${?}``, ``${$}`` literal; any other ``${...}`` is kept as literal text."""
    parts = tuple(
        "${" + p.name + "}" if isinstance(p, _Var) else p for p in _template(pattern, True)
    )
    return _matcher(_merge(parts))


def _merge(parts: Iterable[str | _Wild]) -> tuple[str | _Wild, ...]:
    out: list[str | _Wild] = []
    for part in parts:
        if isinstance(part, str) and out and isinstance(out[-1], str):
            out[-1] = out[-1] + part
        else:
            out.append(part)
    return tuple(out)


def _action_pattern(action: str) -> Callable[[str], bool]:
    return _action_matcher(action.lower() if ACTION_NAMES_CASE_INSENSITIVE else action)


@lru_cache(maxsize=1024)
def _action_matcher(text: str) -> Callable[[str], bool]:
    return _matcher(_merge(p for p in _template(text, False) if not isinstance(p, _Var)))


# -- conditions --------------------------------------------------------------------------------


def _positive(base: str, value: str, expected: Any) -> bool:
    """Whether one context value satisfies one (prepared) policy value."""
    if base == "StringEquals":
        return bool(value == expected)
    if base == "StringEqualsIgnoreCase":
        return bool(value.casefold() == expected)
    if base == "StringLike":
        return bool(expected(value))
    if base == "Bool":
        return bool(value.lower() == expected)
    if base == "IpAddress":
        try:
            return ipaddress.ip_address(value) in expected
        except (ValueError, TypeError):
            return False
    try:
        number = float(value)
    except ValueError:
        return False
    if base == "NumericEquals":
        return bool(number == expected)
    if base == "NumericLessThan":
        return bool(number < expected)
    if base == "NumericLessThanEquals":
        return bool(number <= expected)
    if base == "NumericGreaterThan":
        return bool(number > expected)
    return bool(number >= expected)  # NumericGreaterThanEquals


def _prepare(base: str, texts: Iterable[tuple[str | _Wild, ...]]) -> list[Any]:
    """Turn resolved policy values into what :func:`_positive` compares with (invalid ones,
    such as a malformed CIDR behind a variable, are dropped: they match nothing)."""
    out: list[Any] = []
    for parts in texts:
        if base == "StringLike":
            out.append(_matcher(parts))
            continue
        text = "".join(p if isinstance(p, str) else p.value for p in parts)
        try:
            if base == "StringEqualsIgnoreCase":
                out.append(text.casefold())
            elif base == "Bool":
                out.append(text.lower())
            elif base == "IpAddress":
                out.append(ipaddress.ip_network(text, strict=False))
            elif base.startswith("Numeric"):
                out.append(float(text))
            else:
                out.append(text)
        except ValueError:
            continue  # a value that can never match
    return out


def _condition_holds(condition: Condition, variables: PolicyVariables, substitute: bool,
                     missing: set[str]) -> bool:
    """IAM semantics: values of one key OR-ed (NOR for negated operators); missing key → false
    unless IfExists (ForAllValues: true); Null tests presence."""
    context = variables.values(condition.key)
    if condition.base == "Null":
        is_null = context is None
        return any((v.lower() == "true") == is_null for v in condition.values)
    positive, negated = _OPERATORS[condition.base]
    if context is None:
        missing.add(condition.key)
        if condition.if_exists:
            return True
        return condition.qualifier == "ForAllValues"
    resolved: list[tuple[str | _Wild, ...]] = []
    for value in condition.values:
        # Only StringLike-style operators give * and ? a meaning; elsewhere they are literal.
        wild = positive == "StringLike"
        template = _template(value, substitute) if (wild or substitute) else (value,)
        if not wild:
            template = tuple(p.value if isinstance(p, _Wild) else p for p in template)
        parts = _resolve(template, variables, missing)
        if parts is None:
            return False  # unresolved variable: the statement matches nothing (§3.5)
        resolved.append(parts)
    expected = _prepare(positive, resolved)

    def one(value: str) -> bool:
        hit = any(_positive(positive, value, e) for e in expected)
        return not hit if negated else hit

    if condition.qualifier == "ForAllValues":
        return all(one(v) for v in context)
    if condition.qualifier == "ForAnyValue":
        return any(one(v) for v in context)
    if len(context) == 1:
        return one(context[0])
    return all(one(v) for v in context) if negated else any(one(v) for v in context)


# -- compiled statements -----------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class _Plan:
    """A statement prepared once for every connection: action patterns compiled; resource
    patterns and conditions are bound to a connection's variables by :func:`_bind`."""

    effect: Effect
    actions: tuple[Callable[[str], bool], ...]
    not_action: bool
    resources: tuple[str, ...]
    not_resource: bool
    conditions: tuple[Condition, ...]
    substitute: bool  # the document's Version has policy variables

    def applies_to_action(self, action: str) -> bool:
        hit = any(m(action) for m in self.actions)
        return hit != self.not_action

    def referenced(self) -> tuple[list[str], list[str]]:
        """(variables substituted, condition keys looked up): all a binding depends on."""
        names: list[str] = []
        keys: list[str] = []
        if self.substitute:
            names.extend(_variable_names(self.resources))
        for condition in self.conditions:
            keys.append(condition.key)
            if self.substitute and condition.base != "Null":
                names.extend(_variable_names(condition.values))
        return names, keys


def _variable_names(patterns: Iterable[str]) -> Iterator[str]:
    for pattern in patterns:
        if "${" in pattern:
            yield from (p.name for p in _template(pattern, True) if isinstance(p, _Var))


def _plan(statement: Statement, substitute: bool) -> _Plan:
    return _Plan(
        effect=statement.effect,
        actions=tuple(_action_pattern(a) for a in statement.not_actions or statement.actions),
        not_action=bool(statement.not_actions),
        resources=statement.not_resources or statement.resources,
        not_resource=bool(statement.not_resources),
        conditions=statement.conditions,
        substitute=substitute,
    )


@dataclass(frozen=True, slots=True)
class _Compiled:
    """A statement bound to one connection's variables."""

    effect: Effect
    resources: tuple[Callable[[str], bool], ...]
    not_resource: bool
    active: bool  # conditions hold and the resource element is usable
    missing: frozenset[str]

    def applies_to_resource(self, resource: str) -> bool:
        hit = any(m(resource) for m in self.resources)
        return hit != self.not_resource


def _bind(plan: _Plan, variables: PolicyVariables) -> _Compiled:
    """Substitute variables and decide conditions: a pure function of ``plan`` and the values
    :meth:`_Plan.referenced` names (which is what lets :class:`PolicySet` share bindings)."""
    missing: set[str] = set()
    active = all(_condition_holds(c, variables, plan.substitute, missing)
                 for c in plan.conditions)
    not_resource = plan.not_resource
    matchers: list[Callable[[str], bool]] = []
    for pattern in plan.resources:
        parts = _resolve(_template(pattern, plan.substitute), variables, missing)
        if parts is None:
            if not_resource:
                active = False  # excluding "nothing" would allow everything: inert instead
            continue
        matchers.append(_matcher(parts))
    if not matchers and not not_resource:
        active = False
    return _Compiled(effect=plan.effect, resources=tuple(matchers), not_resource=not_resource,
                     active=active, missing=frozenset(missing))


_Entries = tuple[tuple[_Compiled, ...], tuple[_Compiled, ...]]  # (denies, allows)


class PolicyDecisions:
    """Statements bound to one set of variable values, and the decisions taken with them
    (cached by (action, resource); first in, first out beyond :data:`DECISION_CACHE_SIZE`).

    A statement is bound on the first question about one of its actions: a device that only
    connects binds its ``iot:Connect`` statements and nothing else.
    """

    __slots__ = ("_bound", "_by_action", "_cache", "_plans", "_variables")

    def __init__(self, plans: Sequence[_Plan], variables: PolicyVariables) -> None:
        self._plans = plans
        self._variables = variables  # any connection's: the bindings only read shared values
        self._bound: list[_Compiled | None] = [None] * len(plans)
        self._by_action: dict[str, _Entries] = {}
        self._cache: dict[tuple[str, str], Decision] = {}

    @property
    def cached(self) -> int:
        """How many decisions are remembered."""
        return len(self._cache)

    def evaluate(self, action: str, resource: str) -> Decision:
        """The decision for ``action`` on ``resource`` (a full ARN), cached."""
        key = (action, resource)
        decision = self._cache.get(key)
        if decision is not None:
            return decision
        decision = self.decide(action, resource)
        if len(self._cache) >= DECISION_CACHE_SIZE:
            del self._cache[next(iter(self._cache))]
        self._cache[key] = decision
        return decision

    def decide(self, action: str, resource: str) -> Decision:
        """The decision without the cache (for resources asked about once, such as a
        connection's own client id)."""
        denies, allows = self._entries(action)
        if any(c.applies_to_resource(resource) for c in denies):
            return Decision.EXPLICIT_DENY
        if any(c.applies_to_resource(resource) for c in allows):
            return Decision.ALLOWED
        return Decision.IMPLICIT_DENY

    def missing_context_values(self, action: str) -> list[str]:
        found: set[str] = set()
        for c in self._about(action):
            found |= c.missing
        return sorted(found)

    def _about(self, action: str) -> list[_Compiled]:
        """The bound statements whose Action / NotAction covers ``action``."""
        normalized = action.lower() if ACTION_NAMES_CASE_INSENSITIVE else action
        out = []
        bound = self._bound
        for i, plan in enumerate(self._plans):
            if plan.applies_to_action(normalized):
                compiled = bound[i]
                if compiled is None:
                    compiled = bound[i] = _bind(plan, self._variables)
                out.append(compiled)
        return out

    def _entries(self, action: str) -> _Entries:
        entries = self._by_action.get(action)
        if entries is None:
            relevant = [c for c in self._about(action) if c.active]
            entries = (
                tuple(c for c in relevant if c.effect is Effect.DENY),
                tuple(c for c in relevant if c.effect is Effect.ALLOW),
            )
            self._by_action[action] = entries
        return entries


class PolicySet:
    """Policy documents prepared once for every connection that has exactly these documents.

    A connection's decisions depend only on the documents and on the values of the policy
    variables and condition keys they reference. :meth:`bind` therefore shares one
    :class:`PolicyDecisions` (bound statements and decision cache) between all connections
    whose referenced values are equal: the claim connections of a fleet, whose claim policy
    references nothing per device, decide each topic once between them. The bindings are a
    bounded LRU (``max_bindings``; 0 keeps none). Nothing here needs invalidating: a changed
    policy is a different document, so the broker looks up a different set; a changed thing
    attribute is a different binding key.
    """

    __slots__ = ("_bindings", "_condition_keys", "_max_bindings", "_plans", "_variables",
                 "documents")

    def __init__(self, documents: Iterable[PolicyDocument], *,
                 max_bindings: int = BINDINGS_PER_POLICY_SET) -> None:
        self.documents = tuple(documents)
        plans: list[_Plan] = []
        names: dict[str, None] = {}  # ordered sets
        keys: dict[str, None] = {}
        for document in self.documents:
            substitute = document.version == _VARIABLES_VERSION
            for statement in document.statements:
                plan = _plan(statement, substitute)
                plans.append(plan)
                plan_names, plan_keys = plan.referenced()
                names.update(dict.fromkeys(plan_names))
                keys.update(dict.fromkeys(plan_keys))
        self._plans = tuple(plans)
        self._variables = tuple(names)
        self._condition_keys = tuple(keys)
        self._max_bindings = max_bindings
        self._bindings: OrderedDict[tuple[Any, ...], PolicyDecisions] = OrderedDict()

    @property
    def referenced(self) -> tuple[str, ...]:
        """The variable names and condition keys the documents refer to."""
        return self._variables + self._condition_keys

    def bind(self, variables: PolicyVariables) -> PolicyDecisions:
        """The decisions of a connection with ``variables`` (shared when cached)."""
        if self._max_bindings <= 0:
            return PolicyDecisions(self._plans, variables)
        key = (tuple(variables.substitution(n) for n in self._variables),
               tuple(variables.values(k) for k in self._condition_keys))
        bindings = self._bindings
        decisions = bindings.get(key)
        if decisions is not None:
            bindings.move_to_end(key)
            return decisions
        decisions = PolicyDecisions(self._plans, variables)
        bindings[key] = decisions
        if len(bindings) > self._max_bindings:
            bindings.popitem(last=False)
        return decisions


# -- the per-connection authorizer -------------------------------------------------------------


class Authorizer:
    """One connection's evaluator over a fixed set of documents and a fixed context.

    ``Authorizer(documents, context)`` prepares the documents for this connection alone;
    :meth:`for_policy_set` uses a :class:`PolicySet` shared between connections (the broker's
    way). Build a new one when the connection's policy set changes (the registry's
    "policies_changed" event): documents and context are frozen at construction.
    """

    __slots__ = ("_decisions", "_prefix", "context")

    def __init__(self, documents: Sequence[PolicyDocument | str],
                 context: ConnectionContext) -> None:
        parsed = [parse_policy(d) if isinstance(d, str) else d for d in documents]
        self._setup(PolicySet(parsed, max_bindings=0), context)

    @classmethod
    def for_policy_set(cls, policy_set: PolicySet, context: ConnectionContext) -> Authorizer:
        """An authorizer sharing ``policy_set``'s prepared statements and decision caches."""
        authorizer = cls.__new__(cls)
        authorizer._setup(policy_set, context)
        return authorizer

    def _setup(self, policy_set: PolicySet, context: ConnectionContext) -> None:
        self.context = context
        self._prefix = arn_prefix(context.region, context.account_id)
        self._decisions = policy_set.bind(PolicyVariables(context))

    @property
    def decisions(self) -> PolicyDecisions:
        """The (possibly shared) bound statements and decision cache."""
        return self._decisions

    def evaluate(self, action: str, resource: str) -> Decision:
        """The decision for ``action`` (``iot:Publish``) on ``resource`` (a full ARN)."""
        return self._decisions.evaluate(action, resource)

    def allows(self, action: str, resource: str) -> bool:
        return self._decisions.evaluate(action, resource) is Decision.ALLOWED

    def can_connect(self) -> bool:
        """``iot:Connect`` on ``client/<clientId>`` (the Will topic is the broker's extra check).
        Not cached: a client id is asked about once per connection."""
        return self._decisions.decide(
            "iot:Connect", f"{self._prefix}client/{self.context.client_id}") is Decision.ALLOWED

    def can_publish(self, topic: str, retain: bool = False) -> bool:
        """``iot:Publish`` on ``topic/<topic>``, plus ``iot:RetainPublish`` when RETAIN is set."""
        arn = f"{self._prefix}topic/{topic}"
        return self.allows("iot:Publish", arn) and (
            not retain or self.allows("iot:RetainPublish", arn)
        )

    def can_subscribe(self, topic_filter: str) -> bool:
        """``iot:Subscribe`` on ``topicfilter/<filter exactly as sent>`` (``+``/``#`` literal)."""
        return self.allows("iot:Subscribe", f"{self._prefix}topicfilter/{topic_filter}")

    def can_receive(self, topic: str) -> bool:
        """``iot:Receive`` on ``topic/<topic name of the message>``."""
        return self.allows("iot:Receive", f"{self._prefix}topic/{topic}")

    def missing_context_values(self, action: str) -> list[str]:
        """Variables and condition keys this connection lacks, in statements about ``action``."""
        return self._decisions.missing_context_values(action)


# -- TestAuthorization -------------------------------------------------------------------------

#: TestAuthorization ``actionType`` → IoT action.
ACTION_TYPES = {
    "PUBLISH": "iot:Publish",
    "SUBSCRIBE": "iot:Subscribe",
    "RECEIVE": "iot:Receive",
    "CONNECT": "iot:Connect",
}


def test_authorization(
    documents: Sequence[NamedPolicy | PolicyDocument | str] | Mapping[str, PolicyDocument | str],
    context: ConnectionContext,
    auth_infos: Sequence[Mapping[str, Any]],
) -> list[dict[str, Any]]:
    """``authResults`` of TestAuthorization (botocore shape ``AuthResult``) for ``auth_infos``.

    ``documents`` are the principal's effective policies: a name → document mapping or
    :class:`NamedPolicy` items (bare documents are evaluated but not listed). Each result lists
    the policies that allow, explicitly deny or do neither; its decision covers all of its
    ``resources`` (full ARNs): any explicit deny wins, ALLOWED needs every resource allowed.
    """
    named = _named_policies(documents, context)
    authorizers = [(policy, Authorizer([policy.document], context)) for policy in named]
    results: list[dict[str, Any]] = []
    for index, info in enumerate(auth_infos):
        action_type = info.get("actionType")
        action = ACTION_TYPES.get(action_type) if isinstance(action_type, str) else None
        if action is None:
            raise InvalidRequestException(
                f"authInfos[{index}].actionType must be one of {', '.join(ACTION_TYPES)}"
            )
        resources = info.get("resources")
        if not isinstance(resources, list) or not all(isinstance(r, str) for r in resources):
            raise InvalidRequestException(f"authInfos[{index}].resources must be a list of strings")
        allowed, denied, neither = [], [], []
        missing: set[str] = set()
        per_resource = [Decision.IMPLICIT_DENY] * len(resources)
        for policy, authorizer in authorizers:
            decisions = [authorizer.evaluate(action, r) for r in resources]
            for i, d in enumerate(decisions):
                if d is Decision.EXPLICIT_DENY or (
                    d is Decision.ALLOWED and per_resource[i] is Decision.IMPLICIT_DENY
                ):
                    per_resource[i] = d
            entry = {"policyName": policy.name, "policyArn": policy.arn}
            if Decision.EXPLICIT_DENY in decisions:
                denied.append(entry)
            elif Decision.ALLOWED in decisions:
                allowed.append(entry)
            else:
                neither.append(entry)
            missing.update(authorizer.missing_context_values(action))
        if Decision.EXPLICIT_DENY in per_resource:
            decision = Decision.EXPLICIT_DENY
        elif resources and all(d is Decision.ALLOWED for d in per_resource):
            decision = Decision.ALLOWED
        else:
            decision = Decision.IMPLICIT_DENY
        results.append({
            "authInfo": {"actionType": action_type, "resources": list(resources)},
            "allowed": {"policies": [p for p in allowed if p["policyName"] is not None]},
            "denied": {
                "implicitDeny": {"policies": [p for p in neither if p["policyName"] is not None]},
                "explicitDeny": {"policies": [p for p in denied if p["policyName"] is not None]},
            },
            "authDecision": decision.value,
            "missingContextValues": sorted(missing),
        })
    return results


def _named_policies(
    documents: Sequence[NamedPolicy | PolicyDocument | str] | Mapping[str, PolicyDocument | str],
    context: ConnectionContext,
) -> list[_Listed]:
    items: Iterable[tuple[str | None, PolicyDocument | str, str | None]]
    if isinstance(documents, Mapping):
        items = ((name, doc, None) for name, doc in documents.items())
    else:
        items = (
            (d.name, d.document, d.arn) if isinstance(d, NamedPolicy) else (None, d, None)
            for d in documents
        )
    listed: list[_Listed] = []
    for name, doc, arn in items:
        document = parse_policy(doc) if isinstance(doc, str) else doc
        if name is not None and arn is None:
            arn = resource_arn(context.region, context.account_id, "policy", name)
        listed.append(_Listed(name, document, arn))
    return listed


@dataclass(frozen=True)
class _Listed:
    name: str | None
    document: PolicyDocument
    arn: str | None


# pytest would collect a module-level ``test_*`` function imported into a test module.
test_authorization.__test__ = False  # type: ignore[attr-defined]
