"""The registry's compiled input validation accepts exactly what the model walk accepts
(spec broker §5.1: AWS's validation errors), on every operation the registry implements."""

from __future__ import annotations

from typing import Any

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from harness.emulator.registry import Registry
from harness.emulator.registry.validation import (
    _accepts,
    input_errors,
    input_members,
    operation_model,
    validate_input,
)
from harness.errors import InvalidRequestException

OPERATIONS = sorted(Registry.operations())

_scalars = st.one_of(
    st.none(), st.booleans(), st.integers(-5, 2**31), st.floats(allow_nan=False),
    st.text(max_size=8), st.text(alphabet="abcAZ09:_-", min_size=1, max_size=140),
    st.sampled_from(["ACTIVE", "INACTIVE", "REVOKED", "DEFAULT", "thing-1", "a b", ""]),
)
_values = st.recursive(
    _scalars,
    lambda inner: st.one_of(st.lists(inner, max_size=3),
                            st.dictionaries(st.text(max_size=12), inner, max_size=3)),
    max_leaves=8,
)


def _params(operation: str, data: st.DataObject) -> dict[str, Any]:
    shape = operation_model(operation).input_shape
    params: dict[str, Any] = {}
    for snake, wire in input_members(operation).items():
        member = shape.members[wire]
        params[snake] = data.draw(st.one_of(_values, _typical(member)), label=snake)
    return params


def _typical(shape: Any) -> st.SearchStrategy[Any]:
    """Values of the member's own shape (mostly valid), so acceptance is exercised too."""
    kind = shape.type_name
    if kind == "string":
        enum = getattr(shape, "enum", None)
        if enum:
            return st.sampled_from(list(enum))
        return st.text(alphabet="abcdefAZ019:_-", min_size=1, max_size=20)
    if kind in ("integer", "long"):
        return st.integers(0, 100)
    if kind == "boolean":
        return st.booleans()
    if kind == "structure":
        return st.fixed_dictionaries(
            {}, optional={name: _typical(m) for name, m in shape.members.items()})
    if kind == "list":
        return st.lists(_typical(shape.member), max_size=2)
    if kind == "map":
        return st.dictionaries(_typical(shape.key), _typical(shape.value), max_size=2)
    return st.none()


@pytest.mark.parametrize("operation", OPERATIONS)
@settings(max_examples=30, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(data=st.data())
def test_compiled_validation_agrees_with_the_model_walk(operation: str,
                                                       data: st.DataObject) -> None:
    params = _params(operation, data)
    assert _accepts(operation)(params) == (not input_errors(operation, params))


def test_refused_input_still_gets_aws_wording() -> None:
    with pytest.raises(InvalidRequestException) as raised:
        validate_input("CreateThing", {"thing_name": "a b"})
    assert raised.value.message == (
        "1 validation error detected: Value 'a b' at 'thingName' failed to satisfy "
        "constraint: Member must satisfy regular expression pattern: [a-zA-Z0-9:_-]+")
