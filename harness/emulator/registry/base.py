"""The registry's machinery: memory, transactions, durability, events, validation.

Writes run in a transaction: one per operation, or the caller's
:meth:`RegistryCore.transaction` that every operation on the same thread joins.
A transaction holds the writer lock, changes only its overlay, commits to SQLite,
then applies the overlay to memory under the memory lock and fires its events.
Reads outside a transaction take only the memory lock, so the broker's event loop
never waits for SQLite; reads inside one see its own uncommitted changes.

Operation methods are declared with :func:`write_op` / :func:`read_op` /
:func:`checked_op`, which validate the keyword arguments against botocore's model
of the named operation and hand the body its :class:`View`.
"""

from __future__ import annotations

import functools
import inspect
import logging
import random
import threading
import uuid
from collections.abc import Callable, Iterator, Mapping, Sequence
from contextlib import contextmanager
from pathlib import Path
from typing import Any, Concatenate, ParamSpec, TypeVar

from harness import pki
from harness.clock import Clock
from harness.emulator.registry import codec
from harness.emulator.registry.events import RegistryEvent, RegistryEventKind
from harness.emulator.registry.records import (
    BillingGroup,
    Certificate,
    CertificateMode,
    Policy,
    Tag,
    Thing,
    ThingGroup,
)
from harness.emulator.registry.schema import Tables
from harness.emulator.registry.settings import RegistrySettings
from harness.emulator.registry.store import Store
from harness.emulator.registry.tables import K, Overlay, Table, V, View
from harness.emulator.registry.validation import input_members, validate_input
from harness.errors import ResourceNotFoundException, VersionConflictException

log = logging.getLogger("fleetbench.registry")

P = ParamSpec("P")
R = TypeVar("R")
C = TypeVar("C", bound="RegistryCore")

Listener = Callable[[RegistryEvent], None]


def tags_of(tags: Sequence[Mapping[str, Any]] | None) -> tuple[Tag, ...]:
    """Wire ``tags`` (``[{"Key": ..., "Value": ...}]``) as records."""
    return tuple(Tag(t["Key"], t.get("Value")) for t in tags or ())


class TxView(View):
    """A transaction's view: writes go to its overlay, events wait for the commit.

    Every overlay write is journalled (what the key held before), so a savepoint is two
    list lengths and rolling back to it undoes only the writes made since: nested
    operations, and the jobs of a group commit, cost nothing to mark however large
    the transaction has grown.
    """

    def __init__(self) -> None:
        super().__init__({})
        self.events: list[RegistryEvent] = []
        self._journal: list[tuple[dict[Any, Any], Any, bool, Any]] = []

    def emit(self, kind: RegistryEventKind, **fields: Any) -> None:
        self.events.append(RegistryEvent(kind, **fields))

    def _set(self, table: Table[Any, Any], key: Any, record: Any) -> None:
        changes = self._writable().setdefault(table.name, {})
        self._journal.append((changes, key, key in changes, changes.get(key)))
        changes[key] = record

    def put(self, table: Table[K, V], record: V) -> V:
        self._set(table, table.key(record), record)
        return record

    def delete(self, table: Table[K, V], key: K) -> None:
        if self.get(table, key) is not None:
            self._set(table, key, None)

    def mark(self) -> tuple[int, int]:
        return len(self._journal), len(self.events)

    def rollback_to(self, mark: tuple[int, int]) -> None:
        journal = self._journal
        while len(journal) > mark[0]:
            changes, key, existed, previous = journal.pop()
            if existed:
                changes[key] = previous
            else:
                del changes[key]
        del self.events[mark[1]:]


def _public_signature(fn: Callable[..., Any], drop_view: bool) -> inspect.Signature:
    sig = inspect.signature(fn)
    params = list(sig.parameters.values())
    if drop_view:
        del params[1]
    return sig.replace(parameters=params)


def _operation(operation: str, mode: str) -> Callable[[Callable[..., Any]], Callable[..., Any]]:
    def decorate(fn: Callable[..., Any]) -> Callable[..., Any]:
        @functools.wraps(fn)
        def wrapper(self: RegistryCore, *args: Any, **kwargs: Any) -> Any:
            self._check_call(operation, fn.__name__, args, kwargs)
            if mode == "write":
                with self._writing() as view:
                    return fn(self, view, **kwargs)
            if mode == "read":
                with self._reading() as read_view:
                    return fn(self, read_view, **kwargs)
            return fn(self, **kwargs)

        wrapper.__signature__ = _public_signature(fn, mode != "plain")  # type: ignore[attr-defined]
        wrapper.aws_operation = operation  # type: ignore[attr-defined]
        return wrapper

    return decorate


def write_op(operation: str) -> Callable[[Callable[Concatenate[C, TxView, P], R]],
                                         Callable[Concatenate[C, P], R]]:
    """An operation that writes: runs in (or joins) a transaction and gets its view."""
    return _operation(operation, "write")


def read_op(operation: str) -> Callable[[Callable[Concatenate[C, View, P], R]],
                                        Callable[Concatenate[C, P], R]]:
    """An operation that only reads: gets a consistent view without the writer lock."""
    return _operation(operation, "read")


def checked_op(operation: str) -> Callable[[Callable[Concatenate[C, P], R]],
                                           Callable[Concatenate[C, P], R]]:
    """An operation that does slow work (key generation, signing) before it writes with
    :meth:`RegistryCore._writing` itself; only its arguments are validated."""
    return _operation(operation, "plain")


class RegistryCore:
    """State, locks and helpers shared by the operation mixins."""

    def __init__(
        self,
        path: Path,
        *,
        region: str,
        account_id: str,
        clock: Clock,
        ca: pki.CertificateAuthority,
        template_validator: Callable[[str], None] | None = None,
        policy_parser: Callable[[str], object] | None = None,
        settings: RegistrySettings | None = None,
    ) -> None:
        self.region = region
        self.account_id = account_id
        self.clock = clock
        self.ca = ca
        self.settings = settings or RegistrySettings()
        self._template_validator = template_validator
        self._policy_parser = policy_parser
        self._t = Tables()
        self._writer_lock = threading.RLock()
        self._mem_lock = threading.RLock()
        self._local = threading.local()
        self._listeners: list[Listener] = []
        self._base = View()
        self._store = Store(Path(path), [t.name for t in self._t.all()],
                            synchronous=self.settings.synchronous)
        self._load()
        self._anchors = self._compute_anchors()

    # -- lifecycle -----------------------------------------------------------------------------
    def _load(self) -> None:
        for table in self._t.all():
            rows = {codec.decode_key(k): codec.decode(table.record_type, r)
                    for k, r in self._store.rows(table.name)}
            table.apply(rows)
        log.info("event=registry_loaded path=%s certificates=%d things=%d", self._store.path,
                 len(self._t.certificates.rows), len(self._t.things.rows))

    def close(self) -> None:
        with self._writer_lock:
            self._store.close()

    @property
    def arn_prefix(self) -> str:
        return f"arn:aws:iot:{self.region}:{self.account_id}:"

    def arn(self, kind: str, name: str) -> str:
        return f"{self.arn_prefix}{kind}/{name}"

    # -- listeners -----------------------------------------------------------------------------
    def add_listener(self, fn: Listener) -> None:
        """Call ``fn(event)`` after each commit, in the writer's thread, in commit order."""
        with self._mem_lock:
            self._listeners = [*self._listeners, fn]

    def remove_listener(self, fn: Listener) -> None:
        with self._mem_lock:
            self._listeners = [f for f in self._listeners if f is not fn]

    def _fire(self, events: list[RegistryEvent]) -> None:
        for event in events:
            for listener in self._listeners:
                try:
                    listener(event)
                except Exception:
                    log.exception("event=registry_listener_failed kind=%s", event.kind.value)

    # -- transactions --------------------------------------------------------------------------
    def _current_tx(self) -> TxView | None:
        return getattr(self._local, "tx", None)

    @contextmanager
    def _writing(self) -> Iterator[TxView]:
        """Join this thread's transaction (as a savepoint) or run a new one."""
        tx = self._current_tx()
        if tx is not None:
            mark = tx.mark()
            try:
                yield tx
            except BaseException:
                tx.rollback_to(mark)
                raise
            return
        with self._writer_lock:
            tx = TxView()
            self._local.tx = tx
            try:
                yield tx
                events = self._commit(tx)
            finally:
                self._local.tx = None
            self._fire(events)

    @contextmanager
    def _reading(self) -> Iterator[View]:
        tx = self._current_tx()
        if tx is not None:
            yield tx
            return
        with self._mem_lock:
            yield self._base

    def _commit(self, tx: TxView) -> list[RegistryEvent]:
        assert tx.overlay is not None
        tables = [t for t in self._t.all() if tx.overlay.get(t.name)]
        self._store.write([
            (t.name, codec.encode_key(key), None if rec is None else codec.encode(rec))
            for t in tables for key, rec in tx.overlay[t.name].items()
        ])
        events = list(dict.fromkeys(tx.events))
        with self._mem_lock:
            trust = self._touches_trust(tx.overlay)
            for table in tables:
                table.apply(tx.overlay[table.name])
            if trust:
                anchors = self._compute_anchors()
                if anchors != self._anchors:
                    self._anchors = anchors
                    events.append(RegistryEvent(RegistryEventKind.TRUST_CHANGED))
        return events

    def _check_call(self, operation: str, method: str, args: tuple[Any, ...],
                    kwargs: dict[str, Any]) -> None:
        if args:
            raise TypeError(f"{method}() takes keyword arguments only (the operation's members)")
        unknown = kwargs.keys() - input_members(operation).keys()
        if unknown:
            raise TypeError(f"{method}() got unexpected keyword arguments: {sorted(unknown)}")
        validate_input(operation, kwargs)

    # -- trust anchors -------------------------------------------------------------------------
    def _touches_trust(self, overlay: Overlay) -> bool:
        """Whether committing ``overlay`` may change :meth:`trust_anchors_pem`: a CA certificate
        changed, or an SNI_ONLY certificate came, went or changed (before or after). Checked
        before the overlay is applied, so that a certificate leaving SNI_ONLY is seen; a
        device certificate (DEFAULT mode) never changes the anchors, and provisioning commits
        thousands of those."""
        if overlay.get(self._t.ca_certificates.name):
            return True
        rows = self._t.certificates.rows
        for key, new in overlay.get(self._t.certificates.name, {}).items():
            old = rows.get(key)
            if ((new is not None and new.certificate_mode is CertificateMode.SNI_ONLY)
                    or (old is not None and old.certificate_mode is CertificateMode.SNI_ONLY)):
                return True
        return False

    def _compute_anchors(self) -> tuple[str, ...]:
        cas = [c.certificate_pem for c in self._t.ca_certificates.rows.values()]
        sni = [self._t.certificates.rows[k].certificate_pem
               for k in sorted(self._t.certificates.lookup("mode", CertificateMode.SNI_ONLY))]
        return (self.ca.pem, *sorted(cas), *sni)

    def trust_anchors_pem(self) -> list[str]:
        """PEMs a TLS server must trust: the emulator CA, every registered CA certificate and
        every SNI_ONLY certificate. Changes fire a ``trust_changed`` event."""
        return list(self._anchors)

    # -- helpers the operations share ----------------------------------------------------------
    def _now(self) -> float:
        return self.clock.now()

    @staticmethod
    def _new_id() -> str:
        """A version-4 UUID for AWS's ids (thingId, generationId): unique, never secret, so
        the process's PRNG serves (``uuid4`` makes a getrandom syscall per id, and a
        RegisterThing needs four)."""
        return str(uuid.UUID(int=random.getrandbits(128), version=4))

    def _certificate_id_of(self, principal: str) -> str | None:
        """The certificate id in a certificate ARN of this account, else None."""
        prefix = self.arn_prefix + "cert/"
        if principal.startswith(prefix):
            return principal[len(prefix):].lower()
        return None

    def _group_name_of(self, arn: str, kind: str = "thinggroup") -> str | None:
        prefix = f"{self.arn_prefix}{kind}/"
        return arn[len(prefix):] if arn.startswith(prefix) else None

    @staticmethod
    def _require(view: View, table: Table[K, V], key: K, message: str) -> V:
        """The record under ``key``, or ResourceNotFoundException(``message``)."""
        record = view.get(table, key)
        if record is None:
            raise ResourceNotFoundException(message)
        return record

    def _require_certificate(self, view: View, certificate_id: str) -> Certificate:
        return self._require(view, self._t.certificates, certificate_id.lower(),
                             f"The certificate {certificate_id} does not exist in your account")

    @staticmethod
    def _check_version(kind: str, name: str, version: int, expected: int | None) -> None:
        """``expectedVersion`` must match the record's version when given."""
        if expected is not None and expected != version:
            raise VersionConflictException(
                f"The version for {kind} {name} does not match the expected version.")

    def _require_thing(self, view: View, thing_name: str) -> Thing:
        return self._require(view, self._t.things, thing_name,
                             f"Thing {thing_name} cannot be found.")

    def _require_group(self, view: View, name: str) -> ThingGroup:
        return self._require(view, self._t.thing_groups, name,
                             f"Thing group {name} cannot be found.")

    def _require_billing_group(self, view: View, name: str) -> BillingGroup:
        return self._require(view, self._t.billing_groups, name,
                             f"Billing group {name} cannot be found.")

    def _require_policy(self, view: View, policy_name: str) -> Policy:
        return self._require(view, self._t.policies, policy_name,
                             f"Policy {policy_name} does not exist.")

    def _ancestors(self, view: View, group: ThingGroup) -> list[ThingGroup]:
        """``group``'s ancestors, root first."""
        chain: list[ThingGroup] = []
        parent = group.parent_group_name
        while parent is not None:
            found = view.get(self._t.thing_groups, parent)
            if found is None:
                break
            chain.append(found)
            parent = found.parent_group_name
        chain.reverse()
        return chain

    def _effective_policy_names(self, view: View, certificate_arn: str | None,
                                thing_name: str | None) -> list[str]:
        """Spec broker §3.4: policies of the certificate, then of every static group of the
        thing and of those groups' ancestors (each once, in that order)."""
        names: dict[str, None] = {}
        if certificate_arn is not None:
            for a in view.where(self._t.policy_targets, "target", certificate_arn):
                names[a.policy_name] = None
        if thing_name is not None:
            for m in view.where(self._t.group_members, "thing", thing_name):
                group = view.get(self._t.thing_groups, m.thing_group_name)
                if group is None:
                    continue
                for g in [*self._ancestors(view, group), group]:
                    for a in view.where(self._t.policy_targets, "target", g.thing_group_arn):
                        names[a.policy_name] = None
        return list(names)

    def _default_document(self, view: View, policy_name: str) -> str | None:
        policy = view.get(self._t.policies, policy_name)
        if policy is None:
            return None
        version = view.get(self._t.policy_versions, (policy_name, policy.default_version_id))
        return version.policy_document if version is not None else None
