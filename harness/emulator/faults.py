"""Fault injection: the failures firmware meets in the field, made to happen on purpose.

A :class:`FaultPlan` (seeded, so a run can be repeated exactly) is a list of
:class:`FaultRule`. A rule *selects* requests (API, client id glob, certificate,
template, nth occurrence, probability, how many times) and applies one :class:`Fault`.
The :class:`FaultInjector` is consulted at four decision points:

* MQTT request (CreateKeysAndCertificate, CreateCertificateFromCsr, RegisterThing):
  delay, drop_response, reject, disconnect_before, disconnect_after, restart_broker;
* pre-provisioning hook (RegisterThing): hook_slow, hook_fail;
* TLS handshake (Connect): stall_handshake;
* control plane (``iot:<Operation>``; ``iot:`` optional where unambiguous): delay, reject,
  restart_broker.

What each action does:

* ``delay: S`` -- MQTT: the request is handled, its answer is sent ``S`` seconds late;
  control plane: the call is answered ``S`` seconds late.
* ``drop_response`` -- handled (and committed), the answer is never sent.
* ``reject`` -- not handled; the device gets ``rejected`` with the given ``statusCode``,
  ``errorCode`` and ``errorMessage`` (control plane: that AWS error code as a REST error).
* ``disconnect_before`` / ``disconnect_after`` -- the client is disconnected (lifecycle
  ``SERVER_INITIATED_DISCONNECT``) before its request is handled, or after it was handled
  and committed but before the answer went out.
* ``stall_handshake: S`` -- the broker reads no byte of the next TLS handshake for ``S``
  seconds, then carries on (a firmware with a shorter connect timeout gives up first).
* ``hook_slow: S`` -- the pre-provisioning hook takes ``S`` seconds more; past the hook
  timeout (AWS: 5 s) RegisterThing is denied as for a real timeout (403).
* ``hook_fail`` -- the hook fails (403 ``AccessDenied``, reason ``error: ...``).
* ``restart_broker: S`` -- the request is not handled; the whole broker stops (every
  connection dropped, no Will), stays down ``S`` seconds and listens again on the same
  port. Registry, sessions and ownership tokens are kept.

Every applied fault is recorded as a ``fault`` observation (rule, action, API,
occurrence), so a report shows which fault a device met and, from the events after it,
how it recovered. A rule's ``nth`` counts the requests its other selectors match (1 is
the first); its probability draws come from its own RNG, seeded by the plan's ``seed``
and the rule's position, so a plan replays identically for the same request sequence.
At a decision point the first rule (in plan order) that fires applies.

A plan comes from Python (:class:`FaultPlan`), a YAML file (:func:`load_fault_plan`,
errors name ``file:line``) or the admin API (``PUT /_fleetbench/faults``, the same
structure as JSON)::

    seed: 7
    rules:
      - name: lose-first-registration-reply
        api: RegisterThing
        client_id: "sn-*"
        nth: 1
        drop_response: true
      - api: CreateCertificateFromCsr
        probability: 0.1
        reject: {status_code: 500, error_code: InternalFailure}
"""

from __future__ import annotations

import asyncio
import fnmatch
import logging
import math
import random
import threading
from collections.abc import Awaitable, Callable, Coroutine, Iterable, Mapping
from concurrent.futures import Executor
from dataclasses import dataclass, field
from enum import Enum
from pathlib import Path
from typing import Any

import yaml

from harness import protocol
from harness.emulator.hooks import (
    ERROR_PREFIX,
    REASON_TIMEOUT,
    HookInput,
    HookOutcome,
    HookRunner,
    HookTargets,
)
from harness.emulator.quotas import (
    CONNECT,
    CONNECT_PER_CLIENT_ID,
    ApiKind,
    ApiName,
    UnknownApiError,
    resolve_api,
)
from harness.errors import ERROR_KINDS, AwsError, ProvisioningError
from harness.observations import Kind, ObservationLog

log = logging.getLogger("fleetbench.faults")

#: The lifecycle reason of a fault's disconnect (the broker, not the client, ended it).
DISCONNECT_REASON = "SERVER_INITIATED_DISCONNECT"
#: ``statusCode`` of an MQTT ``reject`` that names none, by ``errorCode``.
MQTT_REJECT_STATUS: Mapping[str, int] = {
    protocol.THROTTLING_CODE: protocol.STATUS_TOO_MANY_REQUESTS,
    protocol.INTERNAL_FAILURE_CODE: protocol.STATUS_INTERNAL_ERROR,
    protocol.ACCESS_DENIED_CODE: protocol.STATUS_FORBIDDEN,
    protocol.RESOURCE_NOT_FOUND_CODE: protocol.STATUS_NOT_FOUND,
}
#: ``errorCode`` of an MQTT ``reject`` that names none.
DEFAULT_MQTT_REJECT_CODE = protocol.INTERNAL_FAILURE_CODE
#: The template name in a template ARN (``...:provisioningtemplate/<name>``).
_TEMPLATE_ARN_MARK = ":provisioningtemplate/"


class FaultAction(str, Enum):
    """What a rule does to the requests it selects (values are the YAML keys)."""

    DELAY = "delay"
    DROP_RESPONSE = "drop_response"
    REJECT = "reject"
    DISCONNECT_BEFORE = "disconnect_before"
    DISCONNECT_AFTER = "disconnect_after"
    STALL_HANDSHAKE = "stall_handshake"
    HOOK_SLOW = "hook_slow"
    HOOK_FAIL = "hook_fail"
    RESTART_BROKER = "restart_broker"

    @property
    def takes_seconds(self) -> bool:
        return self in _TIMED


_TIMED = frozenset({FaultAction.DELAY, FaultAction.STALL_HANDSHAKE, FaultAction.HOOK_SLOW,
                    FaultAction.RESTART_BROKER})


class DecisionPoint(str, Enum):
    """Where the injector is consulted."""

    REQUEST = "request"  # an MQTT provisioning API request
    HOOK = "hook"  # RegisterThing's pre-provisioning hook
    HANDSHAKE = "handshake"  # a new TLS connection, before its handshake
    CONTROL_PLANE = "control_plane"  # a boto3 ``iot`` call


_ACTIONS: Mapping[DecisionPoint, frozenset[FaultAction]] = {
    DecisionPoint.REQUEST: frozenset({
        FaultAction.DELAY, FaultAction.DROP_RESPONSE, FaultAction.REJECT,
        FaultAction.DISCONNECT_BEFORE, FaultAction.DISCONNECT_AFTER,
        FaultAction.RESTART_BROKER}),
    DecisionPoint.HOOK: frozenset({FaultAction.HOOK_SLOW, FaultAction.HOOK_FAIL}),
    DecisionPoint.HANDSHAKE: frozenset({FaultAction.STALL_HANDSHAKE}),
    DecisionPoint.CONTROL_PLANE: frozenset({FaultAction.DELAY, FaultAction.REJECT,
                                            FaultAction.RESTART_BROKER}),
}


# --------------------------------------------------------------------------- errors


class FaultPlanError(ValueError):
    """A plan that cannot be used. ``key`` is the dotted path of the offending value
    (``rules[2].api``); files add ``path`` and ``line`` (``plan.yaml:14: rules[2].api: ...``)."""

    def __init__(self, message: str, *, key: str = "", path: Path | str | None = None,
                 line: int | None = None) -> None:
        self.problem = message
        self.key = key
        self.path = Path(path) if path is not None else None
        self.line = line
        where = ""
        if self.path is not None:
            where = f"{self.path}:{line}: " if line is not None else f"{self.path}: "
        super().__init__(f"{where}{key + ': ' if key else ''}{message}")

    def under(self, prefix: str) -> FaultPlanError:
        """The same error with ``prefix`` in front of its key."""
        key = f"{prefix}.{self.key}" if self.key and not self.key.startswith("[") \
            else f"{prefix}{self.key}"
        return FaultPlanError(self.problem, key=key, path=self.path, line=self.line)

    def located(self, path: Path | str, line: int | None) -> FaultPlanError:
        return FaultPlanError(self.problem, key=self.key, path=path, line=line)


# --------------------------------------------------------------------------- records


@dataclass(frozen=True)
class Fault:
    """One action and its arguments (build them with :func:`delay`, :func:`reject`, ...)."""

    action: FaultAction
    seconds: float = 0.0
    status_code: int | None = None
    error_code: str | None = None
    message: str | None = None

    def __post_init__(self) -> None:
        object.__setattr__(self, "action", FaultAction(self.action))
        if not (math.isfinite(self.seconds) and self.seconds >= 0):
            raise FaultPlanError(f"seconds must be a number >= 0, got {self.seconds!r}",
                                 key=self.action.value)
        if self.action.takes_seconds and self.action is not FaultAction.RESTART_BROKER \
                and self.seconds <= 0:
            raise FaultPlanError("expected a number of seconds > 0", key=self.action.value)
        if self.status_code is not None and not 100 <= self.status_code <= 599:
            raise FaultPlanError(f"status_code must be 100-599, got {self.status_code}",
                                 key=f"{self.action.value}.status_code")
        if self.error_code is not None and not self.error_code.strip():
            raise FaultPlanError("error_code must not be empty",
                                 key=f"{self.action.value}.error_code")

    def to_wire(self) -> Any:
        """The YAML/JSON value of the action key."""
        if self.action is FaultAction.REJECT:
            out: dict[str, Any] = {}
            if self.status_code is not None:
                out["status_code"] = self.status_code
            if self.error_code is not None:
                out["error_code"] = self.error_code
            if self.message is not None:
                out["message"] = self.message
            return out
        if self.action.takes_seconds:
            return self.seconds
        return True

    def mqtt_rejection(self, api: str) -> ProvisioningError:
        """The ``rejected`` payload of a ``reject`` on an MQTT API."""
        code = self.error_code or DEFAULT_MQTT_REJECT_CODE
        status = self.status_code or MQTT_REJECT_STATUS.get(code, protocol.STATUS_BAD_REQUEST)
        if self.message is not None:
            return ProvisioningError(status, code, self.message)
        if code == protocol.THROTTLING_CODE:
            return ProvisioningError(status, code, protocol.throttled(api).message)
        if code == protocol.INTERNAL_FAILURE_CODE:
            return ProvisioningError(status, code, protocol.internal_error().message)
        return ProvisioningError(status, code, f"Request rejected ({code}).")

    def control_plane_error(self) -> AwsError:
        """The REST error of a ``reject`` on a control-plane operation."""
        code = self.error_code or "InternalFailureException"
        known = ERROR_KINDS.get(code)
        status = self.status_code or (known.status if known is not None else 400)
        kind: type[AwsError] = known if known is not None and known.status == status else \
            type(code, (AwsError,), {"code": code, "status": status})
        message = self.message or ("Rate exceeded" if code == "ThrottlingException"
                                   else f"Request rejected ({code}).")
        return kind(message)


def delay(seconds: float) -> Fault:
    """Answer ``seconds`` late."""
    return Fault(FaultAction.DELAY, seconds=seconds)


def drop_response() -> Fault:
    """Handle the request, never answer."""
    return Fault(FaultAction.DROP_RESPONSE)


def reject(error_code: str | None = None, *, status_code: int | None = None,
           message: str | None = None) -> Fault:
    """Refuse without handling (MQTT: ``rejected`` payload; control plane: REST error)."""
    return Fault(FaultAction.REJECT, status_code=status_code, error_code=error_code,
                 message=message)


def disconnect_before() -> Fault:
    return Fault(FaultAction.DISCONNECT_BEFORE)


def disconnect_after() -> Fault:
    return Fault(FaultAction.DISCONNECT_AFTER)


def stall_handshake(seconds: float) -> Fault:
    return Fault(FaultAction.STALL_HANDSHAKE, seconds=seconds)


def hook_slow(seconds: float) -> Fault:
    return Fault(FaultAction.HOOK_SLOW, seconds=seconds)


def hook_fail() -> Fault:
    return Fault(FaultAction.HOOK_FAIL)


def restart_broker(down_seconds: float = 0.0) -> Fault:
    return Fault(FaultAction.RESTART_BROKER, seconds=down_seconds)


def _point_of(action: FaultAction, api: ApiName | None) -> DecisionPoint:
    if action in (FaultAction.HOOK_SLOW, FaultAction.HOOK_FAIL):
        return DecisionPoint.HOOK
    if action is FaultAction.STALL_HANDSHAKE:
        return DecisionPoint.HANDSHAKE
    if api is not None and api.kind is ApiKind.CONTROL_PLANE:
        return DecisionPoint.CONTROL_PLANE
    return DecisionPoint.REQUEST


@dataclass(frozen=True)
class FaultRule:
    """Selectors and one :class:`Fault`. Unset selectors match everything; ``api`` unset
    means every MQTT provisioning API (RegisterThing for hook faults, Connect for
    ``stall_handshake``). ``nth`` lists the matching occurrences to act on (1-based;
    empty: all), ``times`` caps how often the rule applies."""

    fault: Fault
    api: str | None = None
    client_id: str | None = None
    certificate_id: str | None = None
    template: str | None = None
    nth: tuple[int, ...] = ()
    probability: float = 1.0
    times: int | None = None
    name: str | None = None
    point: DecisionPoint = field(init=False, compare=False)

    def __post_init__(self) -> None:
        set_ = object.__setattr__
        action = self.fault.action
        api: ApiName | None = None
        if self.api is not None:
            try:
                api = resolve_api(self.api)
            except UnknownApiError as exc:
                raise FaultPlanError(str(exc), key="api") from None
            if api.name == CONNECT_PER_CLIENT_ID:
                raise FaultPlanError(f"{CONNECT_PER_CLIENT_ID} names a quota, not an API; "
                                     f"use {CONNECT}", key="api")
            set_(self, "api", api.name)
        elif action in (FaultAction.HOOK_SLOW, FaultAction.HOOK_FAIL):
            set_(self, "api", protocol.Api.REGISTER_THING.value)
            api = resolve_api(protocol.Api.REGISTER_THING.value)
        elif action is FaultAction.STALL_HANDSHAKE:
            set_(self, "api", CONNECT)
            api = resolve_api(CONNECT)
        point = _point_of(action, api)
        set_(self, "point", point)
        self._check_action(action, api, point)
        self._check_selectors(api, point)
        given: Any = self.nth  # an int is accepted too
        nth = (given,) if isinstance(given, int) else tuple(given)
        if any(isinstance(n, bool) or not isinstance(n, int) or n < 1 for n in nth):
            raise FaultPlanError("expected occurrence numbers >= 1 (1 is the first match)",
                                 key="nth")
        set_(self, "nth", tuple(sorted(set(nth))))
        if isinstance(self.probability, bool) or not 0.0 <= float(self.probability) <= 1.0:
            raise FaultPlanError(f"expected a probability between 0 and 1, got "
                                 f"{self.probability!r}", key="probability")
        set_(self, "probability", float(self.probability))
        if self.times is not None and (isinstance(self.times, bool) or self.times < 1):
            raise FaultPlanError(f"expected a number of times >= 1, got {self.times!r}",
                                 key="times")

    @staticmethod
    def _check_action(action: FaultAction, api: ApiName | None, point: DecisionPoint) -> None:
        """The action must belong to the decision point the API is served at."""
        if api is None:
            return
        if api.kind is ApiKind.CONNECT:
            ok = action is FaultAction.STALL_HANDSHAKE
        elif point is DecisionPoint.HOOK:
            ok = api.name == protocol.Api.REGISTER_THING.value
        elif api.kind is ApiKind.CONTROL_PLANE:
            ok = action in _ACTIONS[DecisionPoint.CONTROL_PLANE]
        else:
            ok = action in _ACTIONS[DecisionPoint.REQUEST]
        if not ok:
            where = {ApiKind.MQTT: "an MQTT API", ApiKind.CONNECT: "a new connection",
                     ApiKind.CONTROL_PLANE: "a control-plane operation"}[api.kind]
            raise FaultPlanError(f"{action.value} does not apply to {api.name} ({where})",
                                 key=action.value)

    def _check_selectors(self, api: ApiName | None, point: DecisionPoint) -> None:
        if point is DecisionPoint.HANDSHAKE:
            for key in ("client_id", "certificate_id", "template"):
                if getattr(self, key) is not None:
                    raise FaultPlanError("a TLS handshake is stalled before the client id, "
                                         "certificate and template are known", key=key)
        if point is DecisionPoint.CONTROL_PLANE and self.client_id is not None:
            raise FaultPlanError("a control-plane call has no MQTT client id", key="client_id")
        if self.template is not None and api is not None and api.kind is ApiKind.MQTT \
                and api.name != protocol.Api.REGISTER_THING.value:
            raise FaultPlanError(f"{api.name} names no template (only RegisterThing does)",
                                 key="template")
        for key in ("client_id", "certificate_id", "template", "name"):
            value = getattr(self, key)
            if value is not None and (not isinstance(value, str) or not value):
                raise FaultPlanError("expected a non-empty string", key=key)

    # -- selection ------------------------------------------------------------------------
    def selects(self, context: FaultContext) -> bool:
        """Whether this rule's API and pattern selectors match (not nth/probability)."""
        if context.point is not self.point:
            return False
        if self.api is not None and context.api != self.api:
            return False
        if self.client_id is not None and (
                context.client_id is None or not fnmatch.fnmatchcase(context.client_id,
                                                                     self.client_id)):
            return False
        if self.certificate_id is not None and context.certificate_id != self.certificate_id:
            return False
        return self.template is None or context.template == self.template

    @property
    def label(self) -> str:
        return self.name or f"{self.fault.action.value}@{self.api or 'any'}"

    def to_wire(self) -> dict[str, Any]:
        out: dict[str, Any] = {}
        for key in ("name", "api", "client_id", "certificate_id", "template"):
            value = getattr(self, key)
            if value is not None:
                out[key] = value
        if self.nth:
            out["nth"] = self.nth[0] if len(self.nth) == 1 else list(self.nth)
        if self.probability != 1.0:
            out["probability"] = self.probability
        if self.times is not None:
            out["times"] = self.times
        out[self.fault.action.value] = self.fault.to_wire()
        return out


@dataclass(frozen=True)
class FaultPlan:
    """Rules in order, and the seed of their probability draws."""

    rules: tuple[FaultRule, ...] = ()
    seed: int = 0

    def __post_init__(self) -> None:
        object.__setattr__(self, "rules", tuple(self.rules))

    def to_wire(self) -> dict[str, Any]:
        return {"seed": self.seed, "rules": [rule.to_wire() for rule in self.rules]}

    @classmethod
    def from_wire(cls, doc: Any) -> FaultPlan:
        """A plan from its YAML/JSON structure; :class:`FaultPlanError` naming the key."""
        return _parse_plan(doc)


# --------------------------------------------------------------------------- parsing

_RULE_KEYS = ("name", "api", "client_id", "certificate_id", "template", "nth", "probability",
              "times")
_ACTION_KEYS = tuple(action.value for action in FaultAction)
_REJECT_KEYS = ("status_code", "error_code", "message")


def _type_name(value: Any) -> str:
    if value is None:
        return "nothing (null)"
    if isinstance(value, dict):
        return "a mapping"
    if isinstance(value, list):
        return "a list"
    return f"{type(value).__name__} {value!r}"


def _number(value: Any, key: str) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise FaultPlanError(f"expected a number, got {_type_name(value)}", key=key)
    return float(value)


def _integer(value: Any, key: str) -> int:
    if isinstance(value, bool) or not isinstance(value, int):
        raise FaultPlanError(f"expected an integer, got {_type_name(value)}", key=key)
    return value


def _string(value: Any, key: str) -> str:
    if not isinstance(value, str) or not value:
        raise FaultPlanError(f"expected a non-empty string, got {_type_name(value)}", key=key)
    return value


def _parse_plan(doc: Any) -> FaultPlan:
    if doc is None:
        return FaultPlan()
    if not isinstance(doc, dict):
        raise FaultPlanError(f"expected a mapping with 'rules' (and 'seed'), got "
                             f"{_type_name(doc)}")
    unknown = sorted(str(k) for k in doc if k not in ("seed", "rules"))
    if unknown:
        raise FaultPlanError("unknown key; expected 'seed' and 'rules'", key=unknown[0])
    seed = _integer(doc.get("seed", 0), "seed")
    raw_rules = doc.get("rules", [])
    if raw_rules is None:
        raw_rules = []
    if not isinstance(raw_rules, list):
        raise FaultPlanError(f"expected a list of rules, got {_type_name(raw_rules)}",
                             key="rules")
    rules = []
    for index, raw in enumerate(raw_rules):
        try:
            rules.append(_parse_rule(raw))
        except FaultPlanError as exc:
            raise exc.under(f"rules[{index}]") from None
    return FaultPlan(tuple(rules), seed)


def _parse_rule(raw: Any) -> FaultRule:
    if not isinstance(raw, dict):
        raise FaultPlanError(f"expected a mapping (selectors and one action), got "
                             f"{_type_name(raw)}")
    for key in raw:
        if key not in _RULE_KEYS and key not in _ACTION_KEYS:
            raise FaultPlanError(f"unknown key; selectors are {', '.join(_RULE_KEYS)} and "
                                 f"actions {', '.join(_ACTION_KEYS)}", key=str(key))
    actions = [key for key in _ACTION_KEYS if key in raw]
    if len(actions) != 1:
        found = f"found {', '.join(actions)}" if actions else "found none"
        raise FaultPlanError(f"expected exactly one action ({', '.join(_ACTION_KEYS)}); {found}")
    action = FaultAction(actions[0])
    fault = _parse_fault(action, raw[action.value])
    kwargs: dict[str, Any] = {}
    for key in ("name", "api", "client_id", "certificate_id", "template"):
        if key in raw:
            kwargs[key] = _string(raw[key], key)
    if "nth" in raw:
        value = raw["nth"]
        items = value if isinstance(value, list) else [value]
        kwargs["nth"] = tuple(_integer(v, "nth") for v in items)
    if "probability" in raw:
        kwargs["probability"] = _number(raw["probability"], "probability")
    if "times" in raw:
        kwargs["times"] = _integer(raw["times"], "times")
    return FaultRule(fault, **kwargs)


def _parse_fault(action: FaultAction, value: Any) -> Fault:
    key = action.value
    if action is FaultAction.REJECT:
        if isinstance(value, str):
            return reject(value)
        if isinstance(value, bool) and value:
            return reject()
        if not isinstance(value, dict):
            raise FaultPlanError(f"expected an error code or a mapping with status_code, "
                                 f"error_code, message; got {_type_name(value)}", key=key)
        for sub in value:
            if sub not in _REJECT_KEYS:
                raise FaultPlanError(f"unknown key; expected {', '.join(_REJECT_KEYS)}",
                                     key=f"{key}.{sub}")
        status = _integer(value["status_code"], f"{key}.status_code") \
            if "status_code" in value else None
        code = _string(value["error_code"], f"{key}.error_code") if "error_code" in value \
            else None
        message = _string(value["message"], f"{key}.message") if "message" in value else None
        return reject(code, status_code=status, message=message)
    if action.takes_seconds:
        if action is FaultAction.RESTART_BROKER and (value is True or value is None):
            return restart_broker()
        return Fault(action, seconds=_number(value, key))
    if value is not True:
        raise FaultPlanError(f"expected true, got {_type_name(value)}", key=key)
    return Fault(action)


def _key_lines(node: yaml.Node, key: str, out: dict[str, int]) -> None:
    """Record the 1-based line of every key path under ``node`` (``rules[0].api``)."""
    out.setdefault(key, node.start_mark.line + 1)
    if isinstance(node, yaml.MappingNode):
        for key_node, value_node in node.value:
            name = str(key_node.value)
            child = f"{key}.{name}" if key else name
            out[child] = key_node.start_mark.line + 1
            _key_lines(value_node, child, out)
    elif isinstance(node, yaml.SequenceNode):
        for index, item in enumerate(node.value):
            _key_lines(item, f"{key}[{index}]", out)


def _line_for(lines: Mapping[str, int], key: str) -> int | None:
    """The line of ``key`` or of its nearest ancestor that has one."""
    while key:
        if key in lines:
            return lines[key]
        cut = max(key.rfind("."), key.rfind("["))
        key = key[:cut] if cut > 0 else ""
    return lines.get("")


def parse_fault_plan_text(text: str, path: Path | str = "<plan>") -> FaultPlan:
    """Parse YAML ``text``; every error is a :class:`FaultPlanError` naming ``path:line``."""
    try:
        node = yaml.compose(text, Loader=yaml.SafeLoader)
    except yaml.YAMLError as exc:
        mark = getattr(exc, "problem_mark", None) or getattr(exc, "context_mark", None)
        problem = getattr(exc, "problem", None) or str(exc)
        raise FaultPlanError(f"not valid YAML: {problem}", path=path,
                             line=mark.line + 1 if mark is not None else None) from None
    if node is None:
        return FaultPlan()
    lines: dict[str, int] = {}
    _key_lines(node, "", lines)
    try:
        doc = yaml.SafeLoader(text).get_single_data()
    except yaml.YAMLError as exc:  # composed but not constructible (bad tag, ...)
        mark = getattr(exc, "problem_mark", None)
        raise FaultPlanError(f"not valid YAML: {getattr(exc, 'problem', exc)}", path=path,
                             line=mark.line + 1 if mark is not None else None) from None
    try:
        return _parse_plan(doc)
    except FaultPlanError as exc:
        raise exc.located(path, _line_for(lines, exc.key)) from None


def load_fault_plan(path: Path | str) -> FaultPlan:
    """Read a YAML fault plan (``fleetbench emulator --faults plan.yaml``)."""
    path = Path(path)
    try:
        text = path.read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as exc:
        raise FaultPlanError(f"cannot read the plan: {exc}", path=path) from None
    return parse_fault_plan_text(text, path)


# --------------------------------------------------------------------------- injection


@dataclass(frozen=True)
class FaultContext:
    """One request at a decision point (what selectors see)."""

    point: DecisionPoint
    api: str
    client_id: str | None = None
    certificate_id: str | None = None
    template: str | None = None
    detail: Mapping[str, Any] = field(default_factory=dict)


@dataclass(frozen=True)
class AppliedFault:
    """A rule that fired on a request: which, and on which of its matches."""

    fault: Fault
    rule_index: int
    rule: FaultRule
    occurrence: int

    @property
    def action(self) -> FaultAction:
        return self.fault.action


@dataclass(frozen=True)
class RuleCounters:
    """How often a rule matched its selectors and how often it applied."""

    index: int
    label: str
    matched: int
    applied: int

    def to_wire(self) -> dict[str, Any]:
        return {"index": self.index, "rule": self.label, "matched": self.matched,
                "applied": self.applied}


Disconnect = Callable[[str, str], Awaitable[bool]]
Restart = Callable[[float], Coroutine[Any, Any, Any]]


class FaultInjector:
    """The running emulator's fault plan: decides, records and carries out faults.

    ``bind`` gives it the broker's ``disconnect(client_id, reason)`` and a
    ``restart(down_seconds)`` coroutine; without them those actions are recorded only.
    """

    def __init__(self, plan: FaultPlan | None = None, *,
                 observations: ObservationLog | None = None) -> None:
        self._observations = observations
        self._lock = threading.Lock()
        self._disconnect: Disconnect | None = None
        self._restart: Restart | None = None
        self._tasks: set[asyncio.Task[Any]] = set()
        self._plan = FaultPlan()
        self._matched: list[int] = []
        self._applied: list[int] = []
        self._rngs: list[random.Random] = []
        self._points: frozenset[DecisionPoint] = frozenset()
        self.set_plan(plan or FaultPlan())

    # -- the plan -------------------------------------------------------------------------
    @property
    def plan(self) -> FaultPlan:
        return self._plan

    def set_plan(self, plan: FaultPlan) -> None:
        """Replace the plan; counters and random draws start afresh."""
        with self._lock:
            self._plan = plan
            self._matched = [0] * len(plan.rules)
            self._applied = [0] * len(plan.rules)
            self._rngs = [random.Random(f"{plan.seed}/{i}") for i in range(len(plan.rules))]
            self._points = frozenset(rule.point for rule in plan.rules)
        log.info("event=fault_plan rules=%d seed=%d", len(plan.rules), plan.seed)

    def clear(self) -> None:
        self.set_plan(FaultPlan())

    def counters(self) -> list[RuleCounters]:
        with self._lock:
            return [RuleCounters(i, rule.label, self._matched[i], self._applied[i])
                    for i, rule in enumerate(self._plan.rules)]

    def bind(self, *, disconnect: Disconnect | None = None,
             restart: Restart | None = None) -> None:
        self._disconnect = disconnect
        self._restart = restart

    # -- deciding -------------------------------------------------------------------------
    def decide(self, context: FaultContext) -> AppliedFault | None:
        """The fault to apply to ``context`` (first rule that fires), recorded; or None."""
        if context.point not in self._points:  # the common case: nothing to consider
            return None
        chosen: AppliedFault | None = None
        with self._lock:
            for index, rule in enumerate(self._plan.rules):
                if not rule.selects(context):
                    continue
                self._matched[index] += 1
                occurrence = self._matched[index]
                if rule.nth and occurrence not in rule.nth:
                    continue
                if rule.times is not None and self._applied[index] >= rule.times:
                    continue
                if rule.probability < 1.0 and \
                        self._rngs[index].random() >= rule.probability:
                    continue
                if chosen is None:
                    self._applied[index] += 1
                    chosen = AppliedFault(rule.fault, index, rule, occurrence)
        if chosen is not None:
            self._record(chosen, context)
        return chosen

    def _record(self, applied: AppliedFault, context: FaultContext) -> None:
        fault = applied.fault
        detail: dict[str, Any] = {
            "rule": applied.rule.label,
            "ruleIndex": applied.rule_index,
            "action": fault.action.value,
            "api": context.api,
            "point": context.point.value,
            "occurrence": applied.occurrence,
        }
        if context.template is not None:
            detail["template"] = context.template
        if fault.action.takes_seconds:
            detail["seconds"] = fault.seconds
        if fault.action is FaultAction.REJECT:
            detail.update(statusCode=fault.status_code, errorCode=fault.error_code)
        detail.update(context.detail)
        if self._observations is not None:
            self._observations.record(Kind.FAULT, client_id=context.client_id,
                                      certificate_id=context.certificate_id, **detail)
        log.info("event=fault action=%s api=%s rule=%s client_id=%s occurrence=%d",
                 fault.action.value, context.api, applied.rule.label, context.client_id,
                 applied.occurrence)

    # -- decision points ------------------------------------------------------------------
    def on_request(self, api: str, *, client_id: str, certificate_id: str | None,
                   template: str | None = None) -> RequestFault | None:
        """An MQTT provisioning request arrived (see :class:`RequestFault`)."""
        if DecisionPoint.REQUEST not in self._points:  # no plan: not even a context to build
            return None
        applied = self.decide(FaultContext(DecisionPoint.REQUEST, api, client_id,
                                           certificate_id, template))
        return RequestFault(self, applied, api, client_id) if applied is not None else None

    async def on_control_plane(self, operation: str, params: Mapping[str, Any]) -> None:
        """A control-plane call is about to run: delay it, reject it (raises
        :class:`AwsError`) or restart the broker."""
        template = params.get("templateName")
        certificate = params.get("certificateId")
        applied = self.decide(FaultContext(
            DecisionPoint.CONTROL_PLANE, f"iot:{operation}",
            certificate_id=certificate if isinstance(certificate, str) else None,
            template=template if isinstance(template, str) else None))
        if applied is None:
            return
        fault = applied.fault
        if fault.action is FaultAction.DELAY:
            await asyncio.sleep(fault.seconds)
        elif fault.action is FaultAction.REJECT:
            raise fault.control_plane_error()
        elif fault.action is FaultAction.RESTART_BROKER:
            self.schedule_restart(fault.seconds)

    def handshake_stall(self, peer_ip: str) -> float:
        """Seconds to hold a new connection's TLS handshake back (0: none)."""
        if DecisionPoint.HANDSHAKE not in self._points:
            return 0.0
        applied = self.decide(FaultContext(DecisionPoint.HANDSHAKE, CONNECT,
                                           detail={"ip": peer_ip}))
        return applied.fault.seconds if applied is not None else 0.0

    def hook_fault(self, hook_input: HookInput) -> Fault | None:
        """The hook fault for this RegisterThing's hook call, if any."""
        if DecisionPoint.HOOK not in self._points:
            return None
        template = hook_input.template_arn.rpartition(_TEMPLATE_ARN_MARK)[2] or None
        applied = self.decide(FaultContext(
            DecisionPoint.HOOK, protocol.Api.REGISTER_THING.value, hook_input.client_id,
            hook_input.claim_certificate_id, template))
        return applied.fault if applied is not None else None

    # -- effects --------------------------------------------------------------------------
    async def disconnect(self, client_id: str) -> None:
        if self._disconnect is None:
            log.warning("event=fault_disconnect_unbound client_id=%s", client_id)
            return
        await self._disconnect(client_id, DISCONNECT_REASON)

    def schedule_restart(self, down_seconds: float) -> None:
        """Restart the broker in a task of its own (stopping the broker cancels the request
        that asked for it)."""
        if self._restart is None:
            log.warning("event=fault_restart_unbound")
            return
        task = asyncio.get_running_loop().create_task(self._restart(down_seconds))
        self._tasks.add(task)
        task.add_done_callback(self._restart_done)

    def _restart_done(self, task: asyncio.Task[Any]) -> None:
        self._tasks.discard(task)
        if not task.cancelled() and task.exception() is not None:
            log.error("event=fault_restart_failed error=%r", task.exception())

    async def close(self) -> None:
        """Cancel a broker restart under way (emulator shutdown)."""
        tasks = list(self._tasks)
        for task in tasks:
            task.cancel()
        if tasks:
            await asyncio.gather(*tasks, return_exceptions=True)


class RequestFault:
    """A fault applied to one MQTT provisioning request. The service calls
    :meth:`before` (True: do not handle the request at all), uses :attr:`rejection`
    instead of handling when set, and calls :meth:`after` (False: send no answer)."""

    def __init__(self, injector: FaultInjector, applied: AppliedFault, api: str,
                 client_id: str) -> None:
        self._injector = injector
        self.applied = applied
        self.fault = applied.fault
        self._api = api
        self._client_id = client_id

    @property
    def rejection(self) -> ProvisioningError | None:
        if self.fault.action is FaultAction.REJECT:
            return self.fault.mqtt_rejection(self._api)
        return None

    async def before(self) -> bool:
        action = self.fault.action
        if action is FaultAction.DISCONNECT_BEFORE:
            await self._injector.disconnect(self._client_id)
            return True
        if action is FaultAction.RESTART_BROKER:
            self._injector.schedule_restart(self.fault.seconds)
            return True
        return False

    async def after(self) -> bool:
        action = self.fault.action
        if action is FaultAction.DELAY:
            await asyncio.sleep(self.fault.seconds)
            return True
        if action is FaultAction.DROP_RESPONSE:
            return False
        if action is FaultAction.DISCONNECT_AFTER:
            await self._injector.disconnect(self._client_id)
            return False
        return True


class FaultingHookRunner(HookRunner):
    """A :class:`HookRunner` that also applies ``hook_slow`` / ``hook_fail`` faults.

    ``hook_slow`` counts against the hook timeout: a hook that would have answered in
    ``t`` seconds answers in ``S + t``, and is denied as timed out once that passes
    :attr:`timeout`.
    """

    def __init__(self, targets: HookTargets, *, faults: FaultInjector, timeout: float,
                 executor: Executor | None = None) -> None:
        super().__init__(targets, timeout=timeout, executor=executor)
        self.faults = faults

    async def invoke(self, target_arn: str, hook_input: HookInput) -> HookOutcome:
        fault = self.faults.hook_fault(hook_input)
        if fault is None:
            return await super().invoke(target_arn, hook_input)
        if fault.action is FaultAction.HOOK_FAIL:
            return HookOutcome.deny(f"{ERROR_PREFIX}fault injected (hook_fail)")
        if fault.seconds >= self.timeout:
            await asyncio.sleep(self.timeout)
            return HookOutcome.deny(REASON_TIMEOUT)
        await asyncio.sleep(fault.seconds)
        try:
            return await asyncio.wait_for(super().invoke(target_arn, hook_input),
                                          self.timeout - fault.seconds)
        except asyncio.TimeoutError:
            return HookOutcome.deny(REASON_TIMEOUT)


def plan_of(rules: Iterable[FaultRule], seed: int = 0) -> FaultPlan:
    """``FaultPlan(tuple(rules), seed)``, for readable scenario code."""
    return FaultPlan(tuple(rules), seed)
