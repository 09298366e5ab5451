"""Both pagination styles (spec broker §5.1): ``nextToken``/``maxResults`` for registry
lists, ``marker``/``pageSize``/``nextMarker`` for certificates and policies.

A token is the base64 of the listing-order key of the last item returned, so a page
starts after it even when rows were added or deleted between calls.
"""

from __future__ import annotations

import base64
import binascii
import json
from collections.abc import Callable, Sequence
from typing import Any, TypeVar

from harness.emulator.registry.tables import SortKey, after
from harness.errors import InvalidRequestException

T = TypeVar("T")


def encode_token(key: SortKey) -> str:
    return base64.b64encode(json.dumps(list(key), separators=(",", ":")).encode()).decode()


def decode_token(token: str | None) -> SortKey | None:
    if token is None:
        return None
    try:
        value = json.loads(base64.b64decode(token.encode(), validate=True))
    except (binascii.Error, ValueError, UnicodeDecodeError):
        value = None
    if not isinstance(value, list):
        raise InvalidRequestException("The pagination token is invalid.")
    return tuple(value)


def paginate(
    entries: Sequence[tuple[SortKey, T]],
    token: str | None,
    limit: int,
    *,
    descending: bool = False,
    keep: Callable[[T], bool] | None = None,
) -> tuple[list[T], str | None]:
    """One page of ``entries`` (ascending by key) after ``token``, and the next token."""
    start = decode_token(token)
    out: list[T] = []
    last: SortKey | None = None
    for key, item in after(entries, start, descending):
        if keep is not None and not keep(item):
            continue
        if len(out) >= limit:
            assert last is not None
            return out, encode_token(last)
        out.append(item)
        last = key
    return out, None


def ordered(items: Sequence[Any], key: Callable[[Any], SortKey]) -> list[tuple[SortKey, Any]]:
    """``(key, item)`` pairs sorted by key, for paginating a computed list."""
    return sorted(((key(item), item) for item in items), key=lambda e: e[0])
