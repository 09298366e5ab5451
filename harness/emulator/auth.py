"""Who is connecting and what they may do: certificate → principal → per-connection authorizer.

The broker only needs a small view of the registry, :class:`DeviceDirectory`, so
tests can use an in-memory one. A principal comes from the first
:data:`PrincipalResolver` that knows the certificate (part 2 resolves live
temporary provisioning claims this way, with their own policy and expiry),
else from the directory: a registered certificate in ACTIVE state (spec §2.3).

Authorization is evaluated per connection through :class:`ConnectionAuthorization`,
which builds the policy engine's :class:`~harness.emulator.policy.Authorizer` on
first use and rebuilds it after :meth:`Authentication.invalidate` (policies,
attachments or things changed) touched it: invalidation is a counter increment
(and a stamp per certificate or thing it names), the rebuild happens lazily on the
next check of each connection it concerns. Rebuilds are cheap: each distinct set of
policy texts is prepared once (:class:`~harness.emulator.policy.PolicySet`, an LRU
keyed by the texts themselves, so a new policy version is simply another key), and
connections whose referenced policy variables have equal values share bound
statements and decisions.
"""

from __future__ import annotations

import logging
from collections import OrderedDict
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass
from enum import Enum
from functools import lru_cache
from typing import Any, Protocol

from cryptography import x509

from harness import pki
from harness.emulator.broker_settings import BrokerSettings
from harness.emulator.policy import (
    Authorizer,
    ConnectionContext,
    PolicyDocument,
    PolicySet,
    parse_policy,
)

log = logging.getLogger("fleetbench.broker.auth")


# -- the registry view the broker needs ---------------------------------------------------------

class CertificateRecord(Protocol):
    @property
    def certificate_id(self) -> str: ...
    @property
    def certificate_pem(self) -> str: ...
    @property
    def status(self) -> Any: ...  # Enum whose .value is "ACTIVE", "INACTIVE", "REVOKED", ...
    @property
    def certificate_mode(self) -> Any: ...  # Enum whose .value is "DEFAULT" or "SNI_ONLY"
    @property
    def ca_certificate_id(self) -> str | None: ...


class ThingRecord(Protocol):
    @property
    def thing_name(self) -> str: ...
    @property
    def thing_type_name(self) -> str | None: ...
    @property
    def attributes(self) -> Mapping[str, str]: ...


class ConnectionViewRecord(Protocol):
    @property
    def certificate(self) -> CertificateRecord: ...
    @property
    def thing(self) -> ThingRecord | None: ...
    @property
    def is_attached(self) -> bool: ...
    @property
    def exclusive(self) -> bool: ...
    @property
    def policy_documents(self) -> tuple[str, ...]: ...


class DeviceDirectory(Protocol):
    """What the broker reads from the registry; every read is in memory (safe on the loop)."""

    def get_certificate(self, certificate_id: str) -> CertificateRecord | None: ...

    def connection_view(self, certificate_id: str, client_id: str) -> ConnectionViewRecord:
        """Spec §3.4: the connection's thing and policy set for this certificate and client id."""
        ...

    def add_listener(self, fn: Callable[[Any], None]) -> None:
        """``fn(event)`` after each commit, in the writer's thread; ``event.kind`` is one of
        certificate_status, certificate_deleted, policies_changed, thing_changed, reset,
        trust_changed (with ``certificate_id`` / ``status`` where relevant)."""
        ...

    def trust_anchors_pem(self) -> list[str]:
        """CA certificates (registered CAs, SNI_ONLY certificates) TLS clients may chain to,
        besides the emulator's own CA."""
        ...


def _wire(value: Any) -> Any:
    """An enum's wire value, or the value itself (in-memory directories may use strings)."""
    return value.value if isinstance(value, Enum) else value


# -- principals -----------------------------------------------------------------------------------

@dataclass(frozen=True)
class Principal:
    """The identity a connection authenticated as.

    ``policy_documents`` None means the directory supplies the policy set (a
    registered certificate); a resolver's principal (a temporary claim) brings
    its own. ``expires_at`` is on the shared clock.
    """

    certificate_id: str
    certificate: x509.Certificate
    policy_documents: tuple[str | PolicyDocument, ...] | None = None
    expires_at: float | None = None
    kind: str = "certificate"

    @property
    def from_directory(self) -> bool:
        return self.policy_documents is None


#: ``resolver(certificate_id, certificate) -> Principal | None``, consulted before the directory.
PrincipalResolver = Callable[[str, x509.Certificate], "Principal | None"]


class Refusal(str, Enum):
    """Why a certificate may not connect (observation detail; the device sees no difference)."""

    CERTIFICATE_UNKNOWN = "certificate_unknown"
    CERTIFICATE_NOT_ACTIVE = "certificate_not_active"
    PRINCIPAL_EXPIRED = "principal_expired"
    SNI_REQUIRED = "sni_required"
    SNI_MISMATCH = "sni_mismatch"
    NO_CERTIFICATE = "no_certificate"


@dataclass(frozen=True)
class Admission:
    """Result of authenticating a TLS peer: a principal, or why not."""

    certificate_id: str | None
    principal: Principal | None = None
    refusal: Refusal | None = None
    detail: str = ""


@lru_cache(maxsize=2048)
def _parsed_policy(text: str) -> PolicyDocument:
    return parse_policy(text)


#: Peer certificates (DER -> id, id -> parsed) an :class:`Authentication` remembers.
CERTIFICATES_CACHED = 4096
#: Distinct policy sets (tuples of attached documents) an :class:`Authentication` keeps, LRU.
POLICY_SETS_CACHED = 256
#: Certificates and things an :class:`Authentication` remembers as recently invalidated;
#: past this, the next invalidation is treated as touching every connection.
INVALIDATION_STAMPS = 65536


def _documents(texts: Sequence[str | PolicyDocument]) -> list[PolicyDocument]:
    out = []
    for text in texts:
        if isinstance(text, PolicyDocument):
            out.append(text)
            continue
        try:
            out.append(_parsed_policy(text))
        except Exception as exc:  # a stored policy the engine cannot read grants nothing
            log.warning("event=policy_unreadable error=%s", exc)
    return out


@dataclass(frozen=True)
class RegistryReaction:
    """What a registry event means for live connections."""

    recheck_all: bool = False
    recheck: frozenset[str] = frozenset()  # certificate ids whose connections to re-admit
    invalidate: bool = False  # policy sets / thing data may have changed
    #: When set, ``invalidate`` concerns only connections of these certificates or with these
    #: things (as chosen thing or as client id); both empty: every connection.
    invalidate_certificates: frozenset[str] = frozenset()
    invalidate_things: frozenset[str] = frozenset()
    trust_changed: bool = False


class Authentication:
    """Turns TLS peers into principals and principals into per-connection authorization."""

    def __init__(self, directory: DeviceDirectory, settings: BrokerSettings, *,
                 region: str, account_id: str) -> None:
        self.directory = directory
        self.settings = settings
        self.region = region
        self.account_id = account_id
        #: Bumped by every invalidation; a connection built at the current value is current.
        self.generation = 0
        self._everything_at = 0  # generation of the last invalidation of every connection
        self._stamps: dict[tuple[str, str], int] = {}  # ("cert"|"thing", id) -> generation
        self._resolvers: list[PrincipalResolver] = []
        self._certificates: OrderedDict[str, x509.Certificate] = OrderedDict()
        self._certificate_ids: dict[bytes, str] = {}
        self._policy_sets: OrderedDict[tuple[Any, ...], PolicySet] = OrderedDict()

    def add_resolver(self, resolver: PrincipalResolver) -> None:
        self._resolvers.append(resolver)

    def invalidate(self, certificates: Iterable[str] = (), things: Iterable[str] = ()) -> None:
        """Connections rebuild their authorizer on their next check: those of ``certificates``
        and those whose thing or client id is one of ``things``; every connection when both
        are empty."""
        self.generation += 1
        stamps = self._stamps
        scoped = False
        for certificate_id in certificates:
            stamps[("cert", certificate_id)] = self.generation
            scoped = True
        for thing_name in things:
            stamps[("thing", thing_name)] = self.generation
            scoped = True
        if not scoped or len(stamps) > INVALIDATION_STAMPS:
            self._everything_at = self.generation
            stamps.clear()

    def unchanged_since(self, generation: int, scopes: tuple[tuple[str, str], ...]) -> bool:
        """Whether no invalidation after ``generation`` concerned any of ``scopes``."""
        if self._everything_at > generation:
            return False
        stamps = self._stamps
        return all(stamps.get(scope, 0) <= generation for scope in scopes)

    def policy_set(self, documents: Sequence[str | PolicyDocument]) -> PolicySet:
        """The prepared :class:`PolicySet` of these documents (an LRU keyed by their text:
        a changed policy is another key, so entries never go stale)."""
        key = tuple(d.raw or d if isinstance(d, PolicyDocument) else d for d in documents)
        sets = self._policy_sets
        found = sets.get(key)
        if found is not None:
            sets.move_to_end(key)
            return found
        found = PolicySet(_documents(documents))
        sets[key] = found
        if len(sets) > POLICY_SETS_CACHED:
            sets.popitem(last=False)
        return found

    def certificate_id(self, der: bytes) -> str:
        """:func:`pki.certificate_id` of a peer's DER (cached, first in first out: every claim
        connection of a fleet presents the same certificate)."""
        ids = self._certificate_ids
        found = ids.get(der)
        if found is None:
            found = ids[der] = pki.certificate_id(der)
            if len(ids) > CERTIFICATES_CACHED:
                del ids[next(iter(ids))]
        return found

    def certificate(self, der: bytes, certificate_id: str) -> x509.Certificate:
        """The parsed certificate (an LRU cache: devices reconnect with the same one)."""
        cert = self._certificates.get(certificate_id)
        if cert is None:
            cert = x509.load_der_x509_certificate(der)
            self._certificates[certificate_id] = cert
            if len(self._certificates) > CERTIFICATES_CACHED:
                self._certificates.popitem(last=False)
        else:
            self._certificates.move_to_end(certificate_id)
        return cert

    def authenticate(self, der: bytes | None, sni: str | None, now: float, *,
                     certificate_id: str | None = None) -> Admission:
        """Spec §2.3, §1.2: the principal of a TLS peer presenting ``der`` (whose id the
        caller may already know)."""
        if not der:
            return Admission(None, refusal=Refusal.NO_CERTIFICATE)
        certificate_id = certificate_id or self.certificate_id(der)
        if sni is not None and self.settings.sni_host_names \
                and sni not in self.settings.sni_host_names:
            return Admission(certificate_id, refusal=Refusal.SNI_MISMATCH, detail=sni)
        cert = self.certificate(der, certificate_id)
        for resolver in self._resolvers:
            principal = resolver(certificate_id, cert)
            if principal is not None:
                if principal.expires_at is not None and now >= principal.expires_at:
                    return Admission(certificate_id, refusal=Refusal.PRINCIPAL_EXPIRED)
                return Admission(certificate_id, principal)
        record = self.directory.get_certificate(certificate_id)
        if record is None:
            return Admission(certificate_id, refusal=Refusal.CERTIFICATE_UNKNOWN)
        status = _wire(record.status)
        if status != "ACTIVE":
            return Admission(certificate_id, refusal=Refusal.CERTIFICATE_NOT_ACTIVE,
                             detail=str(status))
        if sni is None and (self.settings.require_sni
                            or _wire(record.certificate_mode) == "SNI_ONLY"):
            return Admission(certificate_id, refusal=Refusal.SNI_REQUIRED)
        return Admission(certificate_id, Principal(certificate_id, cert))

    def still_admitted(self, principal: Principal, now: float) -> bool:
        """Whether a live connection of ``principal`` may stay (certificate still ACTIVE;
        a resolver's principal until its expiry if the setting says so)."""
        if not principal.from_directory:
            return not (self.settings.disconnect_at_principal_expiry
                        and principal.expires_at is not None and now >= principal.expires_at)
        record = self.directory.get_certificate(principal.certificate_id)
        return record is not None and _wire(record.status) == "ACTIVE"

    def authorization(self, principal: Principal, client_id: str, *, source_ip: str | None,
                      domain_name: str | None,
                      connect_attributes: frozenset[str]) -> ConnectionAuthorization:
        return ConnectionAuthorization(self, principal, client_id, source_ip=source_ip,
                                       domain_name=domain_name,
                                       connect_attributes=connect_attributes)

    def reaction(self, event: Any) -> RegistryReaction:
        """Spec §2.3 and §1.9: what a registry event changes for live connections."""
        kind = getattr(event, "kind", None)
        if kind == "certificate_status":
            status = _wire(getattr(event, "status", None))
            if status == "ACTIVE":
                return RegistryReaction()
            return RegistryReaction(recheck=frozenset({event.certificate_id}))
        if kind == "certificate_deleted":
            return RegistryReaction(recheck=frozenset({event.certificate_id}), invalidate=True,
                                    invalidate_certificates=_named(event, "certificate_id"))
        if kind in ("policies_changed", "thing_changed"):
            # An event naming a certificate and/or a thing concerns only the connections of
            # that certificate, or whose thing (chosen or named by the client id) it is; one
            # naming neither (a policy version, a thing group's policies) concerns everyone.
            return RegistryReaction(invalidate=True,
                                    invalidate_certificates=_named(event, "certificate_id"),
                                    invalidate_things=_named(event, "thing_name"))
        if kind == "reset":
            return RegistryReaction(recheck_all=True, invalidate=True, trust_changed=True)
        if kind == "trust_changed":
            return RegistryReaction(trust_changed=True)
        return RegistryReaction()


def _scopes(certificate_id: str, client_id: str,
            thing_name: str | None) -> tuple[tuple[str, str], ...]:
    """What a connection's authorizer depends on, as :meth:`Authentication.invalidate` names
    it: its certificate, and the things its client id and its chosen thing name."""
    scopes: tuple[tuple[str, str], ...] = (("cert", certificate_id), ("thing", client_id))
    if thing_name is not None and thing_name != client_id:
        scopes += (("thing", thing_name),)
    return scopes


def _named(event: Any, attribute: str) -> frozenset[str]:
    value = getattr(event, attribute, None)
    return frozenset((value,)) if value else frozenset()


class ConnectionAuthorization:
    """One connection's authorization; cached, rebuilt lazily after invalidation (spec §1.9:
    Publish, Subscribe and Receive are checked per operation against current policies)."""

    __slots__ = ("_auth", "_authorizer", "_generation", "_scopes", "client_id",
                 "connect_attributes", "domain_name", "exclusive_thing_name", "principal",
                 "source_ip")

    def __init__(self, auth: Authentication, principal: Principal, client_id: str, *,
                 source_ip: str | None, domain_name: str | None,
                 connect_attributes: frozenset[str]) -> None:
        self._auth = auth
        self.principal = principal
        self.client_id = client_id
        self.source_ip = source_ip
        self.domain_name = domain_name
        self.connect_attributes = connect_attributes
        self.exclusive_thing_name: str | None = None
        self._authorizer: Authorizer | None = None
        self._generation = -1  # the Authentication generation the authorizer is current at
        # what the authorizer depends on, as Authentication.invalidate names it
        self._scopes = _scopes(principal.certificate_id, client_id, None)

    @property
    def authorizer(self) -> Authorizer:
        authorizer = self._authorizer
        auth = self._auth
        if authorizer is None or (
                self._generation != auth.generation
                and not auth.unchanged_since(self._generation, self._scopes)):
            authorizer = self._authorizer = self._build()
        self._generation = auth.generation
        return authorizer

    def _build(self) -> Authorizer:
        principal = self.principal
        thing = None
        is_attached = False
        exclusive = False
        if principal.policy_documents is not None:
            texts: Sequence[str | PolicyDocument] = principal.policy_documents
        else:
            try:
                view = self._auth.directory.connection_view(principal.certificate_id,
                                                            self.client_id)
            except Exception as exc:  # certificate vanished: nothing is allowed any more
                log.info("event=connection_view_failed cert=%s error=%s",
                         principal.certificate_id, exc)
                texts = ()
            else:
                texts = view.policy_documents
                thing = view.thing
                is_attached = bool(view.is_attached)
                exclusive = bool(view.exclusive)
        thing_name = thing.thing_name if thing is not None else None
        self.exclusive_thing_name = thing_name if exclusive else None
        self._scopes = _scopes(principal.certificate_id, self.client_id, thing_name)
        context = ConnectionContext(
            region=self._auth.region,
            account_id=self._auth.account_id,
            client_id=self.client_id,
            certificate=principal.certificate,
            certificate_id=principal.certificate_id,
            thing_name=thing_name,
            thing_type_name=thing.thing_type_name if thing is not None else None,
            thing_attributes=dict(thing.attributes or {}) if thing is not None else {},
            is_attached=is_attached,
            source_ip=self.source_ip,
            domain_name=self.domain_name,
            connect_attributes=self.connect_attributes,
        )
        return Authorizer.for_policy_set(self._auth.policy_set(texts), context)

    def can_connect(self) -> bool:
        return self.authorizer.can_connect()

    def can_publish(self, topic: str, retain: bool = False) -> bool:
        return self.authorizer.can_publish(topic, retain)

    def can_subscribe(self, topic_filter: str) -> bool:
        return self.authorizer.can_subscribe(topic_filter)

    def can_receive(self, topic: str) -> bool:
        return self.authorizer.can_receive(topic)
