"""Server-side input validation driven by botocore's ``iot`` model (spec broker §5.1).

boto3 checks required members, types and minimum lengths; patterns, maximum lengths
and enums reach the server unchecked, and in-process callers (the provisioning
service filling a thing name from device parameters) check nothing. Every registry
operation validates its keyword arguments here and raises
``InvalidRequestException`` with AWS's message style::

    1 validation error detected: Value 'a b' at 'thingName' failed to satisfy
    constraint: Member must satisfy regular expression pattern: [a-zA-Z0-9:_-]+

Nested structures are wire dicts (camelCase keys); unknown nested keys are ignored
as AWS does. Java-only patterns (``\\p{...}``) are checked with equivalent predicates.
"""

from __future__ import annotations

import functools
import re
import unicodedata
from collections.abc import Callable, Mapping
from typing import Any

import botocore.session
from botocore import xform_name
from botocore.model import OperationModel, Shape

from harness.errors import InvalidRequestException

_Check = Callable[[str], bool]


def _all_chars(ok: Callable[[str], bool]) -> _Check:
    return lambda s: all(ok(ch) for ch in s)


def _tag_key_char(ch: str) -> bool:
    return unicodedata.category(ch)[0] in "LZN" or ch in "_.:/=+-@"


#: Model patterns Python's ``re`` cannot express, as predicates.
_JAVA_PATTERNS: dict[str, _Check] = {
    "[^\\p{C}]*": _all_chars(lambda ch: unicodedata.category(ch)[0] != "C"),
    "[\\p{Graph}\\x20]*": _all_chars(lambda ch: "\x20" <= ch <= "\x7e"),
    "^([\\p{L}\\p{Z}\\p{N}_.:/=+\\-@]*)$": _all_chars(_tag_key_char),
}


@functools.cache
def service_model() -> Any:
    return botocore.session.get_session().get_service_model("iot")


@functools.cache
def operation_model(name: str) -> OperationModel:
    return service_model().operation_model(name)  # type: ignore[no-any-return]


#: Java's POSIX-like classes that have an ASCII equivalent in a Python character class.
_JAVA_CLASSES = {
    r"\p{Graph}": r"\x21-\x7e",
    r"\p{Upper}": "A-Z",
    r"\p{Digit}": "0-9",
    r"\p{Cntrl}": r"\x00-\x1f\x7f",
}


@functools.cache
def pattern_check(pattern: str) -> _Check | None:
    """A model pattern as a full-match predicate, or None when it cannot be expressed.

    The one translation of the model's (Java) patterns: the control plane's wire
    validation and the registry's in-process validation both use it.
    """
    if pattern in _JAVA_PATTERNS:
        return _JAVA_PATTERNS[pattern]
    for java, python in _JAVA_CLASSES.items():
        pattern = pattern.replace(java, python)
    try:
        compiled = re.compile(pattern, re.ASCII)
    except re.error:
        return None
    return lambda s: compiled.fullmatch(s) is not None


@functools.cache
def input_members(operation: str) -> dict[str, str]:
    """snake_case keyword → AWS member name, for every input member of ``operation``."""
    shape = operation_model(operation).input_shape
    return {xform_name(name): name for name in shape.members} if shape is not None else {}


def validate_input(operation: str, params: Mapping[str, Any]) -> None:
    """Check ``params`` (snake_case keywords, None = absent) against the model.

    Valid input (nearly all of it) is accepted by the operation's compiled predicate
    (:func:`_accepts`); only input it refuses walks the model to word the errors.
    """
    if _accepts(operation)(params):
        return
    errors = input_errors(operation, params)
    if errors:
        count = len(errors)
        noun = "error" if count == 1 else "errors"
        raise InvalidRequestException(f"{count} validation {noun} detected: " + "; ".join(errors))


def input_errors(operation: str, params: Mapping[str, Any]) -> list[str]:
    """Every validation error of ``params``, worded as AWS words them (the model walk)."""
    shape = operation_model(operation).input_shape
    if shape is None:
        return []
    errors: list[str] = []
    for snake, wire in input_members(operation).items():
        value = params.get(snake)
        if value is None:
            if wire in shape.required_members:
                errors.append(f"Value null at '{wire}' failed to satisfy constraint: "
                              "Member must not be null")
            continue
        _check(shape.members[wire], value, wire, errors)
    return errors


def _show(value: Any) -> str:
    """Java's rendering of a value in a validation message."""
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, Mapping):
        return "{" + ", ".join(f"{_show(k)}={_show(v)}" for k, v in value.items()) + "}"
    if isinstance(value, (list, tuple)):
        return "[" + ", ".join(_show(v) for v in value) + "]"
    return str(value)


def _scalar_problems(shape: Shape, value: Any) -> list[str]:
    """Constraint texts that ``value`` violates (type, length, range, pattern, enum)."""
    meta = shape.metadata
    kind = shape.type_name
    if kind == "string":
        if not isinstance(value, str):
            return ["Member must be a string"]
        problems = []
        if "max" in meta and len(value) > meta["max"]:
            problems.append(f"Member must have length less than or equal to {meta['max']}")
        if "min" in meta and len(value) < meta["min"]:
            problems.append(f"Member must have length greater than or equal to {meta['min']}")
        check = pattern_check(meta["pattern"]) if "pattern" in meta else None
        if check is not None and not check(value):
            problems.append(
                f"Member must satisfy regular expression pattern: {meta['pattern']}")
        enum = getattr(shape, "enum", None)
        if enum and value not in enum:
            problems.append(f"Member must satisfy enum value set: [{', '.join(enum)}]")
        return problems
    if kind in ("integer", "long"):
        if isinstance(value, bool) or not isinstance(value, int):
            return ["Member must be an integer"]
        problems = []
        if "max" in meta and value > meta["max"]:
            problems.append(f"Member must have value less than or equal to {meta['max']}")
        if "min" in meta and value < meta["min"]:
            problems.append(f"Member must have value greater than or equal to {meta['min']}")
        return problems
    if kind == "boolean":
        return [] if isinstance(value, bool) else ["Member must be a boolean"]
    if kind in ("double", "float", "timestamp"):
        ok = isinstance(value, (int, float)) and not isinstance(value, bool)
        return [] if ok else ["Member must be a number"]
    return []


def _constraint_list(shape: Shape) -> str:
    """All constraints of an element shape, as AWS lists them for map keys and values."""
    meta = shape.metadata
    parts = []
    if "max" in meta:
        parts.append(f"Member must have length less than or equal to {meta['max']}")
    if "min" in meta:
        parts.append(f"Member must have length greater than or equal to {meta['min']}")
    if "pattern" in meta:
        parts.append(f"Member must satisfy regular expression pattern: {meta['pattern']}")
    enum = getattr(shape, "enum", None)
    if enum:
        parts.append(f"Member must satisfy enum value set: [{', '.join(enum)}]")
    return "[" + ", ".join(parts) + "]"


def _check(shape: Shape, value: Any, path: str, errors: list[str]) -> None:
    def fail(problem: str) -> None:
        errors.append(f"Value '{_show(value)}' at '{path}' failed to satisfy constraint: "
                      + problem)

    kind = shape.type_name
    if kind == "structure":
        if not isinstance(value, Mapping):
            fail("Member must be a structure")
            return
        for name, member in shape.members.items():
            sub = value.get(name)
            if sub is None:
                if name in shape.required_members:
                    errors.append(f"Value null at '{path}.{name}' failed to satisfy "
                                  "constraint: Member must not be null")
                continue
            _check(member, sub, f"{path}.{name}", errors)
        return
    if kind == "list":
        if not isinstance(value, (list, tuple)):
            fail("Member must be a list")
            return
        meta = shape.metadata
        if "max" in meta and len(value) > meta["max"]:
            fail(f"Member must have length less than or equal to {meta['max']}")
        if "min" in meta and len(value) < meta["min"]:
            fail(f"Member must have length greater than or equal to {meta['min']}")
        element = shape.member
        if element.type_name == "structure":
            for i, item in enumerate(value):
                _check(element, item, f"{path}.{i + 1}.member", errors)
        elif any(_scalar_problems(element, item) for item in value):
            fail("Member must satisfy constraint: " + _constraint_list(element))
        return
    if kind == "map":
        if not isinstance(value, Mapping):
            fail("Member must be a map")
            return
        if any(_scalar_problems(shape.key, k) for k in value):
            fail("Map keys must satisfy constraint: " + _constraint_list(shape.key))
        if shape.value.type_name in ("structure", "list", "map"):
            for k, v in value.items():
                _check(shape.value, v, f"{path}.{k}", errors)
        elif any(_scalar_problems(shape.value, v) for v in value.values()):
            fail("Map value must satisfy constraint: " + _constraint_list(shape.value))
        return
    for problem in _scalar_problems(shape, value):
        fail(problem)


# -- compiled acceptance ------------------------------------------------------------------------
# The walk above reads botocore's shapes on every call (some 60 µs for a CreateThing); the
# registry validates every operation, including the ones the provisioning service makes per
# device. Each operation's input shape is compiled once into nested predicates that say
# only "valid or not", with exactly the walk's rules (test: the two always agree).

_Accept = Callable[[Any], bool]


def _accept_all(_value: Any) -> bool:
    return True


def _compile_scalar(shape: Shape) -> _Accept:
    """True iff :func:`_scalar_problems` finds nothing."""
    meta = shape.metadata
    kind = shape.type_name
    if kind == "string":
        high = meta.get("max")
        low = meta.get("min")
        check = pattern_check(meta["pattern"]) if "pattern" in meta else None
        enum = frozenset(getattr(shape, "enum", None) or ())

        def string(value: Any) -> bool:
            return (isinstance(value, str)
                    and (high is None or len(value) <= high)
                    and (low is None or len(value) >= low)
                    and (check is None or check(value))
                    and (not enum or value in enum))
        return string
    if kind in ("integer", "long"):
        top = meta.get("max")
        bottom = meta.get("min")

        def integer(value: Any) -> bool:
            return (isinstance(value, int) and not isinstance(value, bool)
                    and (top is None or value <= top)
                    and (bottom is None or value >= bottom))
        return integer
    if kind == "boolean":
        return lambda value: isinstance(value, bool)
    if kind in ("double", "float", "timestamp"):
        return lambda value: isinstance(value, (int, float)) and not isinstance(value, bool)
    return _accept_all


def _compile_shape(shape: Shape) -> _Accept:
    """True iff :func:`_check` reports nothing for a (non-None) value of ``shape``."""
    kind = shape.type_name
    if kind == "structure":
        members = _compile_members(shape)

        def structure(value: Any) -> bool:
            return isinstance(value, Mapping) and _members_ok(members, value)
        return structure
    if kind == "list":
        high = shape.metadata.get("max")
        low = shape.metadata.get("min")
        element = shape.member
        item_ok = (_compile_shape(element) if element.type_name == "structure"
                   else _compile_scalar(element))

        def sequence(value: Any) -> bool:
            return (isinstance(value, (list, tuple))
                    and (high is None or len(value) <= high)
                    and (low is None or len(value) >= low)
                    and all(item_ok(item) for item in value))
        return sequence
    if kind == "map":
        key_ok = _compile_scalar(shape.key)
        value_ok = (_compile_shape(shape.value)
                    if shape.value.type_name in ("structure", "list", "map")
                    else _compile_scalar(shape.value))

        def mapping(value: Any) -> bool:
            return (isinstance(value, Mapping) and all(key_ok(k) for k in value)
                    and all(value_ok(v) for v in value.values()))
        return mapping
    return _compile_scalar(shape)


_Members = tuple[tuple[str, bool, _Accept], ...]


def _compile_members(shape: Shape, names: Mapping[str, str] | None = None) -> _Members:
    """(key in the value, required, predicate) per member; ``names`` maps the keys used
    (snake_case keywords at the top level) to the model's member names."""
    keys = names or {name: name for name in shape.members}
    required = set(shape.required_members)
    return tuple((key, wire in required, _compile_shape(shape.members[wire]))
                 for key, wire in keys.items())


def _members_ok(members: _Members, value: Mapping[str, Any]) -> bool:
    for key, required, ok in members:
        sub = value.get(key)
        if sub is None:
            if required:
                return False
        elif not ok(sub):
            return False
    return True


@functools.cache
def _accepts(operation: str) -> Callable[[Mapping[str, Any]], bool]:
    """The compiled "is this input valid" predicate of ``operation``."""
    shape = operation_model(operation).input_shape
    if shape is None:
        return _accept_all
    members = _compile_members(shape, input_members(operation))
    return lambda params: _members_ok(members, params)
