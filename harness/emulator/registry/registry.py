"""The :class:`Registry`: every operation mixin plus what the broker and the
provisioning service call directly."""

from __future__ import annotations

import inspect
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any, TypeVar

from harness.emulator.registry.certificates import CertificatesMixin
from harness.emulator.registry.events import RegistryEvent, RegistryEventKind
from harness.emulator.registry.groups import GroupsMixin
from harness.emulator.registry.policies import PoliciesMixin
from harness.emulator.registry.records import ConnectionView, ThingPrincipalType
from harness.emulator.registry.templates_store import TemplatesMixin
from harness.emulator.registry.things import ThingsMixin

R = TypeVar("R", bound="Registry")


class Registry(CertificatesMixin, PoliciesMixin, ThingsMixin, GroupsMixin, TemplatesMixin):
    """The durable AWS IoT registry of one emulated account and region.

    ``Registry(path, *, region, account_id, clock, ca, template_validator=None,
    policy_parser=None, settings=None)``. One method per control-plane operation,
    named and parameterised like botocore (``CreateThing`` → ``create_thing(thing_name=...)``,
    keyword arguments only); :meth:`operations` lists them. Write operations may be
    called from any thread (not the event loop: they wait for SQLite); reads are
    in-memory.
    """

    @classmethod
    def operations(cls) -> dict[str, str]:
        """botocore operation name → method name, for every operation implemented here."""
        return {fn.aws_operation: name
                for name, fn in inspect.getmembers(cls, inspect.isfunction)
                if hasattr(fn, "aws_operation")}

    @contextmanager
    def transaction(self: R) -> Iterator[R]:
        """One all-or-nothing transaction: every operation called on this thread inside the
        block joins it; memory and listeners see it only after the commit. Nested blocks
        (and each operation inside) roll back alone when they raise.

        The yielded object is the registry itself; use it only on this thread.
        """
        with self._writing():
            yield self

    def connection_view(self, certificate_id: str, client_id: str) -> ConnectionView:
        """Spec broker §3.4 for one connection (in-memory; raises ResourceNotFoundException
        when the certificate is unknown)."""
        with self._reading() as view:
            cert = self._require_certificate(view, certificate_id)
            attachments = view.where(self._t.thing_principals, "principal", cert.certificate_arn)
            exclusive = next((a for a in attachments if a.thing_principal_type
                              is ThingPrincipalType.EXCLUSIVE_THING), None)
            chosen = exclusive or next((a for a in attachments if a.thing_name == client_id),
                                       None)
            thing = view.get(self._t.things, chosen.thing_name) if chosen is not None else None
            names = self._effective_policy_names(
                view, cert.certificate_arn, thing.thing_name if thing is not None else None)
            documents = [(n, d) for n in names if (d := self._default_document(view, n))]
            return ConnectionView(
                certificate=cert, thing=thing, is_attached=thing is not None,
                exclusive=exclusive is not None and thing is not None,
                policy_documents=tuple(d for _, d in documents),
                policy_names=tuple(n for n, _ in documents))

    def reset(self) -> None:
        """Empty the account (admin API): every table, on disk and in memory."""
        if self._current_tx() is not None:
            raise RuntimeError("reset() inside a transaction")
        with self._writer_lock:
            self._store.clear()
            with self._mem_lock:
                for table in self._t.all():
                    table.clear()
                anchors = self._compute_anchors()
                events = [RegistryEvent(RegistryEventKind.RESET)]
                if anchors != self._anchors:
                    self._anchors = anchors
                    events.append(RegistryEvent(RegistryEventKind.TRUST_CHANGED))
            self._fire(events)

    def dump(self) -> dict[str, dict[Any, Any]]:
        """Every committed record by table and key (tests and diagnostics)."""
        with self._mem_lock:
            return {t.name: dict(t.rows) for t in self._t.all()}

    def __enter__(self: R) -> R:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()



