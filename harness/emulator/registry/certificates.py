"""Certificates and CA certificates (spec broker §2, §5.3 "Certificates", §5.4).

Key generation and signing happen before the write transaction opens, so a slow
RSA key never holds the writer lock.
"""

from __future__ import annotations

import dataclasses
import secrets
from collections.abc import Mapping, Sequence
from typing import Any

from cryptography import x509
from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives.asymmetric import ec, rsa
from cryptography.x509.oid import NameOID

from harness import pki
from harness.emulator.registry.base import (
    RegistryCore,
    TxView,
    checked_op,
    read_op,
    tags_of,
    write_op,
)
from harness.emulator.registry.events import RegistryEventKind
from harness.emulator.registry.paging import ordered, paginate
from harness.emulator.registry.records import (
    AutoRegistrationStatus,
    CaCertificate,
    CaCertificateStatus,
    Certificate,
    CertificateMode,
    CertificateStatus,
    RegistrationConfig,
    Setting,
)
from harness.emulator.registry.results import (
    CaCertificatePage,
    CertificatePage,
    DescribeCaCertificateResult,
    DescribeCertificateResult,
    KeyPair,
    KeysAndCertificate,
    RegistrationCode,
)
from harness.emulator.registry.tables import View
from harness.errors import (
    CertificateConflictException,
    CertificateStateException,
    CertificateValidationException,
    DeleteConflictException,
    InvalidRequestException,
    LimitExceededException,
    RegistrationCodeValidationException,
    ResourceAlreadyExistsException,
    ResourceNotFoundException,
)

#: Statuses UpdateCertificate refuses to set (spec broker §2.3; botocore doc of newStatus).
UNSETTABLE_STATUSES = frozenset({CertificateStatus.PENDING_ACTIVATION,
                                 CertificateStatus.PENDING_TRANSFER,
                                 CertificateStatus.REGISTER_INACTIVE})
#: Statuses RegisterCertificate(WithoutCA) accepts (botocore doc of ``status``).
REGISTRABLE_STATUSES = frozenset({CertificateStatus.ACTIVE, CertificateStatus.INACTIVE,
                                  CertificateStatus.REVOKED})
#: CSR keys AWS signs (botocore doc of CreateCertificateFromCsr).
CSR_CURVES = frozenset({"secp256r1", "secp384r1", "secp521r1"})
_REGISTRATION_CODE = "registration_code"


def parse_certificate(pem: str, what: str = "certificate") -> x509.Certificate:
    """The first certificate of ``pem``; CertificateValidationException when unparsable."""
    try:
        return pki.load_certificate(pem)
    except (ValueError, TypeError) as exc:
        raise CertificateValidationException(
            f"The {what} is not a valid PEM-encoded X.509 certificate") from exc


def parse_csr(pem: str) -> x509.CertificateSigningRequest:
    """A CSR AWS would sign: valid PEM, valid self-signature, RSA ≥ 2048 or EC P-256/384/521.

    Every refusal is an InvalidRequestException (the only client error botocore models
    for CreateCertificateFromCsr) with a message saying what is wrong.
    """
    try:
        csr = x509.load_pem_x509_csr(pem.encode())
    except (ValueError, TypeError) as exc:
        raise InvalidRequestException(
            "The certificate signing request is not a valid PEM-encoded PKCS#10 request"
        ) from exc
    try:
        key = csr.public_key()
    except (ValueError, TypeError) as exc:
        raise InvalidRequestException("The certificate signing request's key is not supported"
                                      ) from exc
    if isinstance(key, rsa.RSAPublicKey):
        if key.key_size < 2048:
            raise InvalidRequestException(
                f"The certificate signing request has an RSA key of {key.key_size} bits; "
                "at least 2048 are required")
    elif isinstance(key, ec.EllipticCurvePublicKey):
        if key.curve.name not in CSR_CURVES:
            raise InvalidRequestException(
                f"The certificate signing request uses curve {key.curve.name}; "
                "only NIST P-256, P-384 and P-521 are supported")
    else:
        raise InvalidRequestException(
            "The certificate signing request must use an RSA (≥ 2048 bits) or EC "
            "(P-256, P-384, P-521) key")
    if not csr.is_signature_valid:
        raise InvalidRequestException("The certificate signing request's signature is not valid")
    return csr


def signed_by(cert: x509.Certificate, issuer: x509.Certificate) -> bool:
    try:
        cert.verify_directly_issued_by(issuer)
    except (ValueError, TypeError, InvalidSignature):
        return False
    return True


def _timestamps(cert: x509.Certificate) -> tuple[float, float]:
    return cert.not_valid_before_utc.timestamp(), cert.not_valid_after_utc.timestamp()


class CertificatesMixin(RegistryCore):
    # -- creation ------------------------------------------------------------------------------
    @checked_op("CreateKeysAndCertificate")
    def create_keys_and_certificate(self, *, set_as_active: bool | None = None
                                    ) -> KeysAndCertificate:
        """RSA-2048 key and a CA-signed certificate, CN ``AWS IoT Certificate`` (§2.2)."""
        key = pki.generate_rsa_key()
        cert = self.ca.issue_device_certificate(key.public_key())
        status = CertificateStatus.ACTIVE if set_as_active else CertificateStatus.INACTIVE
        with self._writing() as view:
            record = self._insert(view, cert, status=status)
        return KeysAndCertificate(
            certificate_arn=record.certificate_arn,
            certificate_id=record.certificate_id,
            certificate_pem=record.certificate_pem,
            key_pair=KeyPair(public_key=pki.public_key_pem(key),
                             private_key=pki.private_key_pem(key, pkcs1=True)),
        )

    @checked_op("CreateCertificateFromCsr")
    def create_certificate_from_csr(self, *, certificate_signing_request: str,
                                    set_as_active: bool | None = None) -> Certificate:
        """A certificate for the CSR's key; the same CSR twice gives two certificates."""
        csr = parse_csr(certificate_signing_request)
        subject = csr.subject if self.settings.csr_subject_from_csr and len(csr.subject) else None
        cert = self.ca.issue_device_certificate(csr.public_key(), subject)
        status = CertificateStatus.ACTIVE if set_as_active else CertificateStatus.INACTIVE
        with self._writing() as view:
            return self._insert(view, cert, status=status)

    @checked_op("RegisterCertificate")
    def register_certificate(self, *, certificate_pem: str, ca_certificate_pem: str | None = None,
                             set_as_active: bool | None = None, status: str | None = None
                             ) -> Certificate:
        """Register a certificate signed by a registered CA; it takes the CA's mode (§2.2)."""
        cert = parse_certificate(certificate_pem)
        given_ca = (parse_certificate(ca_certificate_pem, "CA certificate")
                    if ca_certificate_pem is not None else None)
        initial = self._registration_status(status, set_as_active)
        with self._writing() as view:
            ca = self._signing_ca(view, cert, given_ca)
            return self._insert(view, cert, status=initial, mode=ca.certificate_mode,
                                ca_certificate_id=ca.certificate_id)

    @checked_op("RegisterCertificateWithoutCA")
    def register_certificate_without_ca(self, *, certificate_pem: str, status: str | None = None
                                        ) -> Certificate:
        """Register any certificate in SNI_ONLY mode (the multi-account path, §2.4)."""
        cert = parse_certificate(certificate_pem)
        initial = self._registration_status(status, None)
        with self._writing() as view:
            return self._insert(view, cert, status=initial, mode=CertificateMode.SNI_ONLY)

    def insert_certificate(self, certificate: x509.Certificate | str, *,
                           status: CertificateStatus, ca_certificate_id: str | None = None,
                           mode: CertificateMode = CertificateMode.DEFAULT,
                           owned_by_provisioning: bool = False) -> Certificate:
        """Store a certificate signed elsewhere (the fleet provisioning MQTT API): the
        certificate itself (as just signed: no PEM round trip) or its PEM."""
        cert = (certificate if isinstance(certificate, x509.Certificate)
                else parse_certificate(certificate))
        with self._writing() as view:
            return self._insert(view, cert, status=CertificateStatus(status), mode=mode,
                                ca_certificate_id=ca_certificate_id,
                                owned_by_provisioning=owned_by_provisioning)

    def _insert(self, view: TxView, cert: x509.Certificate, *, status: CertificateStatus,
                mode: CertificateMode = CertificateMode.DEFAULT,
                ca_certificate_id: str | None = None,
                owned_by_provisioning: bool = False) -> Certificate:
        cert_id = pki.certificate_id(cert)
        arn = self.arn("cert", cert_id)
        if view.get(self._t.certificates, cert_id) is not None:
            raise ResourceAlreadyExistsException(
                "The certificate is already provisioned or registered",
                resourceId=cert_id, resourceArn=arn)
        now = self._now()
        not_before, not_after = _timestamps(cert)
        record = view.put(self._t.certificates, Certificate(
            certificate_id=cert_id, certificate_arn=arn, certificate_pem=pki.certificate_pem(cert),
            status=status, certificate_mode=mode, ca_certificate_id=ca_certificate_id,
            owned_by=self.account_id, creation_date=now, last_modified_date=now,
            not_before=not_before, not_after=not_after, generation_id=self._new_id(),
            owned_by_provisioning=owned_by_provisioning))
        view.emit(RegistryEventKind.CERTIFICATE_STATUS, certificate_id=cert_id, status=status)
        return record

    @staticmethod
    def _registration_status(status: str | None, set_as_active: bool | None
                             ) -> CertificateStatus:
        if status is None:
            return CertificateStatus.ACTIVE if set_as_active else CertificateStatus.INACTIVE
        chosen = CertificateStatus(status)
        if chosen not in REGISTRABLE_STATUSES:
            raise CertificateStateException(
                f"A certificate cannot be registered with status {chosen.value}")
        return chosen

    def _signing_ca(self, view: View, cert: x509.Certificate,
                    given: x509.Certificate | None) -> CaCertificate:
        """The registered CA that signed ``cert`` (the given one, or the only candidate)."""
        if given is not None:
            ca = view.get(self._t.ca_certificates, pki.certificate_id(given))
            if ca is None:
                raise CertificateValidationException(
                    "The CA certificate is not registered in this account")
            if not signed_by(cert, given):
                raise CertificateValidationException(
                    "The certificate is not signed by the given CA certificate")
            return ca
        issuer = cert.issuer.rfc4514_string()
        candidates = [ca for ca in view.where(self._t.ca_certificates, "subject", issuer)
                      if signed_by(cert, pki.load_certificate(ca.certificate_pem))]
        if not candidates:
            raise CertificateValidationException(
                "The certificate is not signed by any CA certificate registered in this account")
        if len(candidates) > 1:
            raise CertificateConflictException(
                "More than one registered CA certificate could have signed this certificate; "
                "specify caCertificatePem")
        return candidates[0]

    # -- reads ---------------------------------------------------------------------------------
    def get_certificate(self, certificate_id: str) -> Certificate | None:
        """In-memory lookup (safe on the broker's event loop)."""
        with self._reading() as view:
            return view.get(self._t.certificates, certificate_id.lower())

    def provisioning_certificates(self) -> list[Certificate]:
        """Certificates the provisioning MQTT API issued that RegisterThing has not used yet
        (still PENDING_ACTIVATION), oldest first: what the expiry sweeper looks at."""
        with self._reading() as view:
            return [c for c in view.values(self._t.certificates)
                    if c.owned_by_provisioning and c.status is CertificateStatus.PENDING_ACTIVATION]

    @read_op("DescribeCertificate")
    def describe_certificate(self, view: View, *, certificate_id: str
                             ) -> DescribeCertificateResult:
        return DescribeCertificateResult(self._require_certificate(view, certificate_id))

    @read_op("ListCertificates")
    def list_certificates(self, view: View, *, page_size: int | None = None,
                          marker: str | None = None, ascending_order: bool | None = None
                          ) -> CertificatePage:
        """Newest first unless ``ascending_order`` (by creation date)."""
        table = self._t.certificates
        keys, next_marker = paginate(view.ordered(table), marker,
                                     page_size or self.settings.default_page_size,
                                     descending=not ascending_order)
        return CertificatePage([c for k in keys if (c := view.get(table, k))], next_marker)

    @read_op("ListCertificatesByCA")
    def list_certificates_by_ca(self, view: View, *, ca_certificate_id: str,
                                page_size: int | None = None, marker: str | None = None,
                                ascending_order: bool | None = None) -> CertificatePage:
        table = self._t.certificates
        certs = view.where(table, "ca", ca_certificate_id.lower())
        page, next_marker = paginate(ordered(certs, table.order), marker,
                                     page_size or self.settings.default_page_size,
                                     descending=not ascending_order)
        return CertificatePage(page, next_marker)

    # -- state ---------------------------------------------------------------------------------
    @write_op("UpdateCertificate")
    def update_certificate(self, view: TxView, *, certificate_id: str, new_status: str) -> None:
        """The §2.3 state machine; leaving ACTIVE makes the broker disconnect the device."""
        cert = self._require_certificate(view, certificate_id)
        new = CertificateStatus(new_status)
        if new in UNSETTABLE_STATUSES:
            raise CertificateStateException(
                f"The certificate status cannot be set to {new.value}. Id: {cert.certificate_id}")
        if cert.status is CertificateStatus.PENDING_TRANSFER:
            raise CertificateStateException(
                f"The certificate is pending transfer. Id: {cert.certificate_id}")
        if (cert.status is CertificateStatus.REVOKED and new is CertificateStatus.ACTIVE
                and not self.settings.allow_revoked_to_active):
            raise CertificateStateException(
                f"A revoked certificate cannot be activated. Id: {cert.certificate_id}")
        if new is cert.status:
            return
        view.put(self._t.certificates, dataclasses.replace(
            cert, status=new, last_modified_date=self._now(),
            customer_version=cert.customer_version + 1))
        view.emit(RegistryEventKind.CERTIFICATE_STATUS, certificate_id=cert.certificate_id,
                  status=new)

    @write_op("DeleteCertificate")
    def delete_certificate(self, view: TxView, *, certificate_id: str,
                           force_delete: bool | None = None) -> None:
        """Spec broker §5.4: not ACTIVE, no things, no policies unless ``force_delete``."""
        cert = self._require_certificate(view, certificate_id)
        if cert.status is CertificateStatus.ACTIVE:
            raise CertificateStateException(
                "Certificate must be deactivated (not ACTIVE) before deletion. "
                f"Id: {cert.certificate_id}")
        arn = cert.certificate_arn
        if view.keys_where(self._t.thing_principals, "principal", arn):
            raise DeleteConflictException(f"Things must be detached before deletion (arn: {arn})")
        if view.keys_where(self._t.policy_targets, "target", arn) and not force_delete:
            raise DeleteConflictException(
                f"Certificate policies must be detached before deletion (arn: {arn})")
        self._remove_certificate(view, cert)

    def delete_certificate_record(self, certificate_id: str) -> None:
        """Delete a certificate and whatever is attached to it, unconditionally (expired,
        unused provisioning certificates). Missing certificates are ignored."""
        with self._writing() as view:
            cert = view.get(self._t.certificates, certificate_id.lower())
            if cert is not None:
                self._remove_certificate(view, cert)

    def _remove_certificate(self, view: TxView, cert: Certificate) -> None:
        arn = cert.certificate_arn
        policies = view.keys_where(self._t.policy_targets, "target", arn)
        things = view.keys_where(self._t.thing_principals, "principal", arn)
        for key in policies:
            view.delete(self._t.policy_targets, key)
        for key in things:
            view.delete(self._t.thing_principals, key)
        if policies or things:
            view.emit(RegistryEventKind.POLICIES_CHANGED, certificate_id=cert.certificate_id)
        view.delete(self._t.certificates, cert.certificate_id)
        view.emit(RegistryEventKind.CERTIFICATE_DELETED, certificate_id=cert.certificate_id)

    # -- CA certificates -----------------------------------------------------------------------
    @write_op("GetRegistrationCode")
    def get_registration_code(self, view: TxView) -> RegistrationCode:
        """The account's code (64 hex), made on first use; verification certificates carry it
        as their CN."""
        return RegistrationCode(self._registration_code(view, create=True) or "")

    def _registration_code(self, view: View, *, create: bool) -> str | None:
        setting = view.get(self._t.settings, _REGISTRATION_CODE)
        if setting is None and create:
            setting = view.put(self._t.settings, Setting(_REGISTRATION_CODE, secrets.token_hex(32)))
        return setting.value if setting is not None else None

    @checked_op("RegisterCACertificate")
    def register_ca_certificate(
        self, *, ca_certificate: str, verification_certificate: str | None = None,
        set_as_active: bool | None = None, allow_auto_registration: bool | None = None,
        registration_config: Mapping[str, Any] | None = None,
        tags: Sequence[Mapping[str, Any]] | None = None, certificate_mode: str | None = None,
    ) -> CaCertificate:
        """DEFAULT mode proves key possession with a verification certificate whose CN is the
        registration code; SNI_ONLY takes none (spec broker §2.4)."""
        ca = parse_certificate(ca_certificate, "CA certificate")
        try:
            constraints = ca.extensions.get_extension_for_class(x509.BasicConstraints).value
        except x509.ExtensionNotFound:
            constraints = None
        if constraints is not None and not constraints.ca:
            raise CertificateValidationException("The certificate is not a CA certificate")
        mode = CertificateMode(certificate_mode or CertificateMode.DEFAULT)
        verification = None
        if mode is CertificateMode.DEFAULT:
            if verification_certificate is None:
                raise InvalidRequestException(
                    "verificationCertificate is required when certificateMode is DEFAULT")
            verification = parse_certificate(verification_certificate, "verification certificate")
            if not signed_by(verification, ca):
                raise CertificateValidationException(
                    "The verification certificate is not signed by the CA certificate")
        elif verification_certificate is not None:
            raise InvalidRequestException(
                "verificationCertificate must be empty when certificateMode is SNI_ONLY")
        with self._writing() as view:
            if verification is not None:
                names = verification.subject.get_attributes_for_oid(NameOID.COMMON_NAME)
                code = self._registration_code(view, create=False)
                if code is None or not names or names[0].value != code:
                    raise RegistrationCodeValidationException(
                        "The verification certificate's common name is not the registration "
                        "code of this account")
            return self._insert_ca(view, ca, mode, set_as_active, allow_auto_registration,
                                   registration_config, tags)

    def _insert_ca(self, view: TxView, ca: x509.Certificate, mode: CertificateMode,
                   set_as_active: bool | None, allow_auto_registration: bool | None,
                   registration_config: Mapping[str, Any] | None,
                   tags: Sequence[Mapping[str, Any]] | None) -> CaCertificate:
        ca_id = pki.certificate_id(ca)
        arn = self.arn("cacert", ca_id)
        if view.get(self._t.ca_certificates, ca_id) is not None:
            raise ResourceAlreadyExistsException("The CA certificate is already registered",
                                                 resourceId=ca_id, resourceArn=arn)
        subject = ca.subject.rfc4514_string()
        limit = self.settings.max_ca_certificates_per_subject
        if len(view.keys_where(self._t.ca_certificates, "subject", subject)) >= limit:
            raise LimitExceededException(
                f"At most {limit} CA certificates with the same subject can be registered")
        now = self._now()
        not_before, not_after = _timestamps(ca)
        return view.put(self._t.ca_certificates, CaCertificate(
            certificate_id=ca_id, certificate_arn=arn, certificate_pem=pki.certificate_pem(ca),
            status=CaCertificateStatus.ACTIVE if set_as_active else CaCertificateStatus.INACTIVE,
            auto_registration_status=(AutoRegistrationStatus.ENABLE if allow_auto_registration
                                      else AutoRegistrationStatus.DISABLE),
            certificate_mode=mode, subject=subject, owned_by=self.account_id,
            creation_date=now, last_modified_date=now, not_before=not_before,
            not_after=not_after,
            registration_config=self._registration_config(view, registration_config),
            generation_id=self._new_id(), tags=tags_of(tags)))

    def _registration_config(self, view: View, config: Mapping[str, Any] | None
                             ) -> RegistrationConfig | None:
        if config is None:
            return None
        name = config.get("templateName")
        if name is not None and view.get(self._t.templates, name) is None:
            raise ResourceNotFoundException(f"The provisioning template {name} does not exist")
        return RegistrationConfig(template_body=config.get("templateBody"),
                                  role_arn=config.get("roleArn"), template_name=name)

    def _require_ca(self, view: View, certificate_id: str) -> CaCertificate:
        return self._require(view, self._t.ca_certificates, certificate_id.lower(),
                             f"The CA certificate {certificate_id} does not exist in your account")

    @read_op("DescribeCACertificate")
    def describe_ca_certificate(self, view: View, *, certificate_id: str
                                ) -> DescribeCaCertificateResult:
        ca = self._require_ca(view, certificate_id)
        return DescribeCaCertificateResult(ca, ca.registration_config)

    @write_op("UpdateCACertificate")
    def update_ca_certificate(
        self, view: TxView, *, certificate_id: str, new_status: str | None = None,
        new_auto_registration_status: str | None = None,
        registration_config: Mapping[str, Any] | None = None,
        remove_auto_registration: bool | None = None,
    ) -> None:
        """INACTIVE stops auto-registration only; registered device certificates keep working."""
        ca = self._require_ca(view, certificate_id)
        if registration_config is not None and remove_auto_registration:
            raise InvalidRequestException(
                "registrationConfig and removeAutoRegistration cannot both be given")
        config = ca.registration_config
        if remove_auto_registration:
            config = None
        elif registration_config is not None:
            config = self._registration_config(view, registration_config)
        view.put(self._t.ca_certificates, dataclasses.replace(
            ca,
            status=CaCertificateStatus(new_status) if new_status else ca.status,
            auto_registration_status=(AutoRegistrationStatus(new_auto_registration_status)
                                      if new_auto_registration_status
                                      else ca.auto_registration_status),
            registration_config=config, last_modified_date=self._now(),
            customer_version=ca.customer_version + 1))

    @write_op("DeleteCACertificate")
    def delete_ca_certificate(self, view: TxView, *, certificate_id: str) -> None:
        ca = self._require_ca(view, certificate_id)
        if (ca.status is CaCertificateStatus.ACTIVE and self.settings.refuse_delete_active_ca):
            raise CertificateStateException(
                f"The CA certificate must be deactivated before deletion. Id: {ca.certificate_id}")
        view.delete(self._t.ca_certificates, ca.certificate_id)

    @read_op("ListCACertificates")
    def list_ca_certificates(self, view: View, *, page_size: int | None = None,
                             marker: str | None = None, ascending_order: bool | None = None,
                             template_name: str | None = None) -> CaCertificatePage:
        table = self._t.ca_certificates

        def keep(key: str) -> bool:
            ca = view.get(table, key)
            config = ca.registration_config if ca is not None else None
            return template_name is None or (config is not None
                                             and config.template_name == template_name)

        keys, next_marker = paginate(view.ordered(table), marker,
                                     page_size or self.settings.default_page_size,
                                     descending=not ascending_order, keep=keep)
        return CaCertificatePage([c for k in keys if (c := view.get(table, k))], next_marker)
