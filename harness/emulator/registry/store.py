"""The registry's SQLite file: one table per record kind, one JSON row per record.

WAL journal, ``synchronous=FULL`` by default (see :class:`RegistrySettings`), one
connection used by one writer at a time (the registry's writer lock), every write
one ``BEGIN IMMEDIATE … COMMIT``: when :meth:`Store.write` returns, the change is
on disk. The schema version is ``PRAGMA user_version``.
"""

from __future__ import annotations

import sqlite3
from collections.abc import Iterable, Iterator
from pathlib import Path

from harness.errors import InternalFailureException

#: Bump with a migration in :meth:`Store._migrate` when the table layout changes.
SCHEMA_VERSION = 1

Change = tuple[str, str, str | None]
"""(table, encoded key, encoded record or None to delete)."""


class Store:
    def __init__(self, path: Path, tables: Iterable[str], *, synchronous: str = "FULL") -> None:
        if synchronous.upper() not in ("FULL", "NORMAL", "EXTRA"):
            raise ValueError(f"unsupported synchronous mode {synchronous!r}")
        self.path = path
        self._tables = list(tables)
        path.parent.mkdir(parents=True, exist_ok=True)
        self._db = sqlite3.connect(path, isolation_level=None, check_same_thread=False)
        self._db.execute("PRAGMA journal_mode=WAL")
        self._db.execute(f"PRAGMA synchronous={synchronous.upper()}")
        self._db.execute("PRAGMA busy_timeout=5000")
        self._migrate()

    def _migrate(self) -> None:
        version = self._db.execute("PRAGMA user_version").fetchone()[0]
        if version > SCHEMA_VERSION:
            raise RuntimeError(
                f"{self.path}: registry schema version {version} is newer than this "
                f"fleetbench ({SCHEMA_VERSION})")
        self._db.execute("BEGIN IMMEDIATE")
        try:
            for table in self._tables:
                self._db.execute(
                    f'CREATE TABLE IF NOT EXISTS "{table}" '
                    "(key TEXT PRIMARY KEY NOT NULL, record TEXT NOT NULL) WITHOUT ROWID")
            if version != SCHEMA_VERSION:
                self._db.execute(f"PRAGMA user_version={SCHEMA_VERSION}")
            self._db.execute("COMMIT")
        except BaseException:
            self._db.execute("ROLLBACK")
            raise

    def rows(self, table: str) -> Iterator[tuple[str, str]]:
        yield from self._db.execute(f'SELECT key, record FROM "{table}"')

    def write(self, changes: list[Change]) -> None:
        """Apply ``changes`` in one durable transaction (all or nothing)."""
        if not changes:
            return
        try:
            self._db.execute("BEGIN IMMEDIATE")
            try:
                for table, key, record in changes:
                    if record is None:
                        self._db.execute(f'DELETE FROM "{table}" WHERE key = ?', (key,))
                    else:
                        self._db.execute(
                            f'INSERT OR REPLACE INTO "{table}" (key, record) VALUES (?, ?)',
                            (key, record))
                self._db.execute("COMMIT")
            except BaseException:
                self._db.execute("ROLLBACK")
                raise
        except sqlite3.Error as exc:
            raise InternalFailureException(f"The registry could not be written: {exc}") from exc

    def clear(self) -> None:
        """Delete every row of every table in one transaction."""
        self._db.execute("BEGIN IMMEDIATE")
        try:
            for table in self._tables:
                self._db.execute(f'DELETE FROM "{table}"')
            self._db.execute("COMMIT")
        except BaseException:
            self._db.execute("ROLLBACK")
            raise

    def close(self) -> None:
        self._db.close()
