"""Records to JSON text and back, driven by the dataclasses' type hints.

SQLite rows hold one JSON object per record, so adding a field with a default
needs no migration: rows written before it load with the default.
"""

from __future__ import annotations

import dataclasses
import functools
import json
import types
import typing
from collections.abc import Callable, Mapping
from enum import Enum
from typing import Any

_PLAIN = frozenset({str, int, float, bool})


def to_plain(value: Any) -> Any:
    """A JSON-ready copy of ``value`` (dataclasses become dicts, enums their values)."""
    if value is None or type(value) in _PLAIN:
        return value
    if isinstance(value, Enum):
        return value.value
    names = _field_names(type(value))
    if names:
        return _record_to_plain(value, names)
    if isinstance(value, Mapping):
        return {str(k): to_plain(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [to_plain(v) for v in value]
    return value


_FIELDS: dict[type, tuple[str, ...]] = {}


def _field_names(cls: type) -> tuple[str, ...]:
    """Field names of a dataclass type, () for anything else (cached per type)."""
    names = _FIELDS.get(cls)
    if names is None:
        names = _FIELDS[cls] = (tuple(f.name for f in dataclasses.fields(cls))
                                if dataclasses.is_dataclass(cls) else ())
    return names


def _record_to_plain(record: Any, names: tuple[str, ...]) -> dict[str, Any]:
    """A dataclass record's fields; plain values (most of them) are taken as they are,
    without a call each (a RegisterThing encodes some 70 fields)."""
    out: dict[str, Any] = {}
    for name in names:
        value = getattr(record, name)
        out[name] = value if value is None or type(value) in _PLAIN else to_plain(value)
    return out


#: One compact encoder for every row: ``json.dumps`` with ``separators`` builds a new
#: JSONEncoder per call.
_ENCODER = json.JSONEncoder(separators=(",", ":"))


def encode(record: Any) -> str:
    return _ENCODER.encode(to_plain(record))


def decode(cls: type, text: str) -> Any:
    return _decoder(cls)(json.loads(text))


def encode_key(key: Any) -> str:
    return _ENCODER.encode(list(key) if isinstance(key, tuple) else key)


def decode_key(text: str) -> Any:
    value = json.loads(text)
    return tuple(value) if isinstance(value, list) else value


def _identity(value: Any) -> Any:
    return value


@functools.cache
def _decoder(tp: Any) -> Callable[[Any], Any]:
    origin = typing.get_origin(tp)
    args = typing.get_args(tp)
    if origin in (typing.Union, types.UnionType):
        inner = _decoder(next(a for a in args if a is not type(None)))
        return lambda v: None if v is None else inner(v)
    if isinstance(tp, type) and issubclass(tp, Enum):
        return tp
    if isinstance(tp, type) and dataclasses.is_dataclass(tp):
        return _dataclass_decoder(tp)
    if origin is tuple:
        item = _decoder(args[0]) if args else _identity
        return lambda v: tuple(item(x) for x in v)
    if origin is list:
        item = _decoder(args[0]) if args else _identity
        return lambda v: [item(x) for x in v]
    if origin in (dict, Mapping, typing.Mapping):
        value_decoder = _decoder(args[1]) if len(args) == 2 else _identity
        return lambda v: {k: value_decoder(x) for k, x in v.items()}
    if tp is float:
        return float
    return _identity


def _dataclass_decoder(cls: type) -> Callable[[Any], Any]:
    hints = typing.get_type_hints(cls)
    fields = [(f.name, _decoder(hints[f.name])) for f in dataclasses.fields(cls)]

    def build(data: Mapping[str, Any]) -> Any:
        return cls(**{name: dec(data[name]) for name, dec in fields if name in data})

    return build
