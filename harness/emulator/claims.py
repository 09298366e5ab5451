"""Temporary provisioning claims for provisioning by trusted user (spec fleet-provisioning.md §2).

CreateProvisioningClaim hands an installer's app a claim certificate, its key pair
and an expiration five minutes out. The claim never enters the registry (it is not
listed by ListCertificates, §2.2); it lives here, in memory, and the broker admits
it through :meth:`ClaimStore.resolve`, registered as a principal resolver, until it
expires on the emulator's clock. Its policy is built in: Connect with any client id,
and Publish/Receive/Subscribe on the three fleet provisioning topic families of its
own template only (the spec's best inference, §2.2).

Emulator guesses (UNCONFIRMED in the spec), as named constants below:

* the claim certificate is issued by the emulator's CA (it must chain for TLS) with
  subject ``CN=<random 64 hex>`` and a validity of seven minutes as observed, measured
  on the real clock because TLS stacks check it against the real clock; the claim's
  five minutes are on the emulator clock;
* new connections are refused from expiry on; whether an open connection is cut is
  the broker's ``disconnect_at_principal_expiry`` setting;
* a device connected with a claim must finish provisioning within five minutes of
  connecting (:data:`CLAIM_REGISTRATION_WINDOW_SECONDS`, checked by the service);
* claims are not persisted: an emulator restart forgets them (they last 5 minutes).
"""

from __future__ import annotations

import datetime as dt
import json
import logging
import os
import threading
from dataclasses import dataclass, field

from cryptography import x509
from cryptography.x509.oid import NameOID

from harness import pki
from harness.clock import Clock
from harness.emulator.auth import Principal
from harness.emulator.keypool import KeyPool
from harness.emulator.policy import PolicyDocument, parse_policy
from harness.protocol import claim_policy_document

log = logging.getLogger("fleetbench.claims")

#: Spec §2.2: a claim is valid for five minutes from issue (emulator clock).
CLAIM_LIFETIME_SECONDS = 300.0
#: Observed (S14): the claim certificate's notAfter - notBefore is seven minutes.
CLAIM_CERTIFICATE_VALIDITY_SECONDS = 420.0
#: Spec §2.2: a device must finish provisioning within five minutes of connecting.
CLAIM_REGISTRATION_WINDOW_SECONDS = 300.0
#: ``Principal.kind`` of a connection authenticated with a temporary claim.
CLAIM_PRINCIPAL_KIND = "provisioning_claim"
#: How long a block waits for a key pair before CreateProvisioningClaim fails.
KEY_WAIT_SECONDS = 30.0


@dataclass(frozen=True)
class ClaimKeyPair:
    """AWS capitalises these on the wire: ``keyPair.PublicKey`` / ``keyPair.PrivateKey``."""

    public_key: str = field(repr=False)
    private_key: str = field(repr=False)


@dataclass(frozen=True)
class ProvisioningClaim:
    """CreateProvisioningClaim's answer (§2.1); ``expiration`` is epoch seconds."""

    certificate_id: str
    certificate_pem: str = field(repr=False)
    key_pair: ClaimKeyPair = field(repr=False)
    expiration: float
    template_name: str


@dataclass(frozen=True)
class ClaimRecord:
    """What the endpoint remembers of a claim (no key)."""

    certificate_id: str
    template_name: str
    issued_at: float
    expires_at: float
    principal: Principal = field(repr=False)

    @property
    def forget_at(self) -> float:
        """After this, no connection made with the claim may still provision."""
        return self.expires_at + CLAIM_REGISTRATION_WINDOW_SECONDS


def claim_policy(template_name: str, *, region: str, account_id: str) -> PolicyDocument:
    """The built-in policy of a claim for ``template_name`` (§2.2 best inference)."""
    document = claim_policy_document(template_name, region=region, account_id=account_id)
    return parse_policy(json.dumps(document, separators=(",", ":")))


def _claim_subject() -> x509.Name:
    return x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, os.urandom(32).hex())])


class ClaimStore:
    """Issues temporary claims and answers the broker's "who is this certificate?"."""

    def __init__(self, *, ca: pki.CertificateAuthority, clock: Clock, keys: KeyPool,
                 region: str, account_id: str,
                 lifetime: float = CLAIM_LIFETIME_SECONDS) -> None:
        self._ca = ca
        self._clock = clock
        self._keys = keys
        self.region = region
        self.account_id = account_id
        self.lifetime = lifetime
        self._lock = threading.Lock()
        self._claims: dict[str, ClaimRecord] = {}
        self._policies: dict[str, PolicyDocument] = {}

    def _policy(self, template_name: str) -> PolicyDocument:
        with self._lock:
            policy = self._policies.get(template_name)
        if policy is None:
            policy = claim_policy(template_name, region=self.region, account_id=self.account_id)
            with self._lock:
                self._policies[template_name] = policy
        return policy

    def issue(self, template_name: str) -> ProvisioningClaim:
        """A new claim for ``template_name`` (which the caller has checked exists).

        Blocking and thread-safe: call it from an executor thread, never the loop.
        """
        key = self._keys.take_blocking(KEY_WAIT_SECONDS)
        issued_at = self._clock.now()
        real_now = dt.datetime.now(dt.timezone.utc).replace(microsecond=0)
        cert = self._ca.issue_device_certificate(
            key.public_key(),
            _claim_subject(),
            not_before=real_now,
            not_after=real_now + dt.timedelta(seconds=CLAIM_CERTIFICATE_VALIDITY_SECONDS),
        )
        certificate_id = pki.certificate_id(cert)
        expires_at = issued_at + self.lifetime
        principal = Principal(
            certificate_id=certificate_id,
            certificate=cert,
            policy_documents=(self._policy(template_name),),
            expires_at=expires_at,
            kind=CLAIM_PRINCIPAL_KIND,
        )
        record = ClaimRecord(certificate_id, template_name, issued_at, expires_at, principal)
        with self._lock:
            self._claims[certificate_id] = record
        log.info("event=claim_issued cert=%s template=%s expires_at=%.0f", certificate_id,
                 template_name, expires_at)
        return ProvisioningClaim(
            certificate_id=certificate_id,
            certificate_pem=pki.certificate_pem(cert),
            key_pair=ClaimKeyPair(public_key=key.public_key_pem,
                                  private_key=key.private_key_pem),
            expiration=expires_at,
            template_name=template_name,
        )

    def get(self, certificate_id: str) -> ClaimRecord | None:
        with self._lock:
            return self._claims.get(certificate_id)

    def resolve(self, certificate_id: str, certificate: x509.Certificate) -> Principal | None:
        """The broker's principal resolver: a claim's principal (the broker refuses it
        from ``expires_at`` on), or ``None`` for any other certificate. Cheap: on the loop."""
        with self._lock:
            record = self._claims.get(certificate_id)
        return record.principal if record is not None else None

    def prune(self, now: float | None = None) -> int:
        """Forget claims no connection can use any more; returns how many."""
        now = self._clock.now() if now is None else now
        with self._lock:
            gone = [cid for cid, rec in self._claims.items() if rec.forget_at <= now]
            for cid in gone:
                del self._claims[cid]
        return len(gone)

    def clear(self) -> None:
        """Forget every claim (the account was reset)."""
        with self._lock:
            self._claims.clear()

    def __len__(self) -> int:
        with self._lock:
            return len(self._claims)

