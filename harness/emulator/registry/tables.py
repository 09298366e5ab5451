"""The in-memory copy of the registry: one :class:`Table` per kind of record.

Committed rows live in the tables; reads are dict lookups. A transaction never
touches them: it records its changes in an overlay (``table name → key → record or
None for deleted``) that its :class:`View` reads through, and the overlay is applied
to the tables only after SQLite committed it. Secondary indexes answer "which rows
have this value" (the things of a principal, the policies of a target) without scans.
"""

from __future__ import annotations

import bisect
from collections.abc import Callable, Hashable, Iterable, Iterator, Mapping, Sequence
from typing import Any, Generic, TypeVar

K = TypeVar("K", bound=Hashable)
V = TypeVar("V")
T = TypeVar("T")
SortKey = tuple[Any, ...]
Overlay = dict[str, dict[Any, Any]]


def as_tuple(key: Any) -> SortKey:
    return key if isinstance(key, tuple) else (key,)


class Table(Generic[K, V]):
    """Committed rows of one record type, keyed by ``key(record)``.

    ``order(record)`` is the listing order (it must end with the key so it is unique);
    ``indexes`` map an index name to the values a record is found under.
    """

    def __init__(
        self,
        name: str,
        record_type: type[V],
        key: Callable[[V], K],
        *,
        indexes: Mapping[str, Callable[[V], Iterable[Hashable]]] | None = None,
        order: Callable[[V], SortKey] | None = None,
    ) -> None:
        self.name = name
        self.record_type = record_type
        self.key = key
        self.order: Callable[[V], SortKey] = order or (lambda v: as_tuple(key(v)))
        self.index_fns: dict[str, Callable[[V], Iterable[Hashable]]] = dict(indexes or {})
        self.rows: dict[K, V] = {}
        self._indexes: dict[str, dict[Hashable, set[K]]] = {n: {} for n in self.index_fns}
        self._ordered: list[tuple[SortKey, K]] | None = None

    def lookup(self, index: str, value: Hashable) -> set[K]:
        return self._indexes[index].get(value, set())

    def ordered(self) -> list[tuple[SortKey, K]]:
        if self._ordered is None:
            self._ordered = sorted((self.order(v), k) for k, v in self.rows.items())
        return self._ordered

    def apply(self, changes: Mapping[K, V | None]) -> None:
        """Make committed ``changes`` visible (caller holds the memory lock)."""
        for key, new in changes.items():
            old = self.rows.get(key)
            if old is not None:
                self._unindex(key, old)
            if new is None:
                self.rows.pop(key, None)
            else:
                self.rows[key] = new
                self._index(key, new)
        if changes:
            self._ordered = None

    def clear(self) -> None:
        self.rows.clear()
        for index in self._indexes.values():
            index.clear()
        self._ordered = None

    def _index(self, key: K, record: V) -> None:
        for name, fn in self.index_fns.items():
            index = self._indexes[name]
            for value in fn(record):
                index.setdefault(value, set()).add(key)

    def _unindex(self, key: K, record: V) -> None:
        for name, fn in self.index_fns.items():
            index = self._indexes[name]
            for value in fn(record):
                keys = index.get(value)
                if keys is not None:
                    keys.discard(key)
                    if not keys:
                        del index[value]


class View:
    """Reads committed rows, through a transaction's overlay when it has one.

    A view without an overlay is read-only (the caller holds the memory lock); a
    transaction's view also writes, into its overlay only.
    """

    def __init__(self, overlay: Overlay | None = None) -> None:
        self.overlay = overlay

    def _changes(self, table: Table[Any, Any]) -> dict[Any, Any] | None:
        return self.overlay.get(table.name) if self.overlay is not None else None

    def get(self, table: Table[K, V], key: K) -> V | None:
        changes = self._changes(table)
        if changes is not None and key in changes:
            return changes[key]  # type: ignore[no-any-return]
        return table.rows.get(key)

    def keys_where(self, table: Table[K, V], index: str, value: Hashable) -> set[K]:
        keys = set(table.lookup(index, value))
        changes = self._changes(table)
        if changes:
            fn = table.index_fns[index]
            for key, record in changes.items():
                if record is not None and value in fn(record):
                    keys.add(key)
                else:
                    keys.discard(key)
        return keys

    def where(self, table: Table[K, V], index: str, value: Hashable) -> list[V]:
        """Records found under ``value`` in ``index``, in listing order."""
        records = [self.get(table, k) for k in self.keys_where(table, index, value)]
        present = [r for r in records if r is not None]
        present.sort(key=table.order)
        return present

    def ordered(self, table: Table[K, V]) -> list[tuple[SortKey, K]]:
        """(order, key) of every row, ascending."""
        changes = self._changes(table)
        if not changes:
            return table.ordered()
        merged = {k: v for k, v in table.rows.items() if k not in changes}
        merged.update({k: v for k, v in changes.items() if v is not None})
        return sorted((table.order(v), k) for k, v in merged.items())

    def values(self, table: Table[K, V]) -> list[V]:
        out = []
        for _, key in self.ordered(table):
            record = self.get(table, key)
            if record is not None:
                out.append(record)
        return out

    def count(self, table: Table[Any, Any]) -> int:
        changes = self._changes(table)
        if not changes:
            return len(table.rows)
        added = sum(1 for k, v in changes.items() if v is not None and k not in table.rows)
        removed = sum(1 for k, v in changes.items() if v is None and k in table.rows)
        return len(table.rows) + added - removed

    def put(self, table: Table[K, V], record: V) -> V:
        self._writable().setdefault(table.name, {})[table.key(record)] = record
        return record

    def delete(self, table: Table[K, V], key: K) -> None:
        if self.get(table, key) is not None:
            self._writable().setdefault(table.name, {})[key] = None

    def _writable(self) -> Overlay:
        if self.overlay is None:
            raise RuntimeError("registry write outside a transaction")
        return self.overlay


def after(entries: Sequence[tuple[SortKey, T]], token: SortKey | None, descending: bool
          ) -> Iterator[tuple[SortKey, T]]:
    """Entries strictly after ``token`` in the requested direction (``entries`` ascending)."""
    if not descending:
        start = 0 if token is None else bisect.bisect_right(entries, token, key=lambda e: e[0])
        return (entries[i] for i in range(start, len(entries)))
    end = len(entries) if token is None else bisect.bisect_left(entries, token,
                                                                 key=lambda e: e[0])
    return (entries[i] for i in range(end - 1, -1, -1))
