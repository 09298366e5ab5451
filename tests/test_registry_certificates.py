"""Certificates and CA certificates in the registry (spec broker §2, §5.3, §5.4)."""

from __future__ import annotations

from collections.abc import Callable, Iterator
from pathlib import Path

import pytest
from cryptography import x509
from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.asymmetric import rsa
from cryptography.x509.oid import NameOID

from harness import pki
from harness.emulator.registry import (
    CertificateMode,
    CertificateStatus,
    Registry,
    RegistrySettings,
)
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
from tests.test_registry_kit import (
    ACCOUNT,
    ALLOW_ALL,
    REGION,
    EventLog,
    csr_pem,
    device_pem,
    emulator_ca,
    make_ca_pem,
    make_registry,
    raises_message,
    self_signed_pem,
    tampered_csr_pem,
    verification_pem,
)


@pytest.fixture
def registry(tmp_path: Path) -> Iterator[Registry]:
    reg = make_registry(tmp_path / "registry.db")
    yield reg
    reg.close()


def _register_ca(registry: Registry, common_name: str = "Test CA", *, active: bool = True
                 ) -> tuple[pki.CertificateAuthority, str]:
    ca, pem = make_ca_pem(common_name)
    code = registry.get_registration_code().registration_code
    registry.register_ca_certificate(ca_certificate=pem,
                                     verification_certificate=verification_pem(ca, code),
                                     set_as_active=active)
    return ca, pki.certificate_id(pem)


# -- creation ------------------------------------------------------------------------------------

def test_create_keys_and_certificate_issues_an_rsa_2048_key_and_an_aws_style_certificate(
        registry: Registry) -> None:
    # spec broker §2.1, §2.2; fleet-provisioning.md edge case 17
    result = registry.create_keys_and_certificate(set_as_active=True)
    cert = pki.load_certificate(result.certificate_pem)
    assert result.certificate_id == pki.certificate_id(cert)
    assert result.certificate_arn == f"arn:aws:iot:{REGION}:{ACCOUNT}:cert/{result.certificate_id}"
    assert cert.subject.rfc4514_string() == "CN=AWS IoT Certificate"
    assert cert.not_valid_after_utc == pki.AWS_NOT_AFTER
    assert result.key_pair.private_key.startswith("-----BEGIN RSA PRIVATE KEY-----")
    key = pki.load_private_key(result.key_pair.private_key)
    assert isinstance(key, rsa.RSAPrivateKey) and key.key_size == 2048
    assert "PRIVATE" not in repr(result)
    described = registry.describe_certificate(certificate_id=result.certificate_id)
    assert described.certificate_description.status is CertificateStatus.ACTIVE


def test_create_keys_and_certificate_is_inactive_unless_set_as_active(registry: Registry) -> None:
    # spec broker §2.2
    result = registry.create_keys_and_certificate()
    described = registry.describe_certificate(certificate_id=result.certificate_id)
    assert described.certificate_description.status is CertificateStatus.INACTIVE


def test_create_certificate_from_csr_signs_the_csr_key_and_twice_gives_two_certificates(
        registry: Registry) -> None:
    # spec broker §2.2; fleet-provisioning.md §1.3 (subject copied, UNCONFIRMED setting)
    key = pki.generate_ec_key("P-384")
    csr = csr_pem(key, "my-device")
    first = registry.create_certificate_from_csr(certificate_signing_request=csr,
                                                 set_as_active=True)
    second = registry.create_certificate_from_csr(certificate_signing_request=csr)
    assert first.certificate_id != second.certificate_id
    cert = pki.load_certificate(first.certificate_pem)
    assert cert.public_key() == key.public_key()
    assert cert.subject.get_attributes_for_oid(NameOID.COMMON_NAME)[0].value == "my-device"
    assert first.status is CertificateStatus.ACTIVE
    assert second.status is CertificateStatus.INACTIVE


def test_csr_subject_is_fixed_when_the_setting_says_so(tmp_path: Path) -> None:
    # fleet-provisioning.md §1.3 UNCONFIRMED: setting csr_subject_from_csr
    reg = make_registry(tmp_path / "r.db", settings=RegistrySettings(csr_subject_from_csr=False))
    result = reg.create_certificate_from_csr(
        certificate_signing_request=csr_pem(pki.generate_ec_key(), "ignored"))
    subject = pki.load_certificate(result.certificate_pem).subject.rfc4514_string()
    assert subject == "CN=AWS IoT Certificate"
    reg.close()


@pytest.mark.parametrize(("make", "fragment"), [
    (lambda: "not a csr", "not a valid PEM"),
    (lambda: csr_pem(pki.generate_rsa_key(1024)), "at least 2048"),
    (tampered_csr_pem, "signature is not valid"),
])
def test_create_certificate_from_csr_refuses_bad_csrs(
        registry: Registry, make: Callable[[], str], fragment: str) -> None:
    # spec broker §2.2: RSA ≥ 2048 or EC P-256/384/521, valid PEM and signature
    csr = make()
    message = raises_message(
        lambda: registry.create_certificate_from_csr(certificate_signing_request=csr),
        InvalidRequestException)
    assert fragment in message
    assert registry.list_certificates().certificates == []


def test_create_certificate_from_csr_refuses_an_unsupported_curve(registry: Registry) -> None:
    # spec broker §2.2: only NIST P-256, P-384, P-521
    from cryptography.hazmat.primitives.asymmetric import ec

    csr = pki.make_csr(ec.generate_private_key(ec.SECP256K1()))
    message = raises_message(
        lambda: registry.create_certificate_from_csr(certificate_signing_request=csr),
        InvalidRequestException)
    assert "secp256k1" in message


def test_insert_certificate_stores_a_provisioning_certificate(registry: Registry) -> None:
    # spec broker §2.2 (fleet provisioning MQTT API row)
    pem = device_pem(emulator_ca())
    cert = registry.insert_certificate(pem, status=CertificateStatus.PENDING_ACTIVATION,
                                       owned_by_provisioning=True)
    assert registry.get_certificate(cert.certificate_id) == cert
    assert registry.provisioning_certificates() == [cert]
    with pytest.raises(ResourceAlreadyExistsException):
        registry.insert_certificate(pem, status=CertificateStatus.ACTIVE)


# -- registration --------------------------------------------------------------------------------

def test_register_certificate_finds_its_ca_and_inherits_its_mode(registry: Registry) -> None:
    # spec broker §2.2 RegisterCertificate row
    ca, ca_id = _register_ca(registry)
    pem = device_pem(ca)
    result = registry.register_certificate(certificate_pem=pem, status="ACTIVE")
    assert result.certificate_id == pki.certificate_id(pem)
    assert result.ca_certificate_id == ca_id
    assert result.certificate_mode is CertificateMode.DEFAULT
    assert result.status is CertificateStatus.ACTIVE
    other = registry.register_certificate(certificate_pem=device_pem(ca),
                                          ca_certificate_pem=ca.pem)
    assert other.status is CertificateStatus.INACTIVE
    listed = registry.list_certificates_by_ca(ca_certificate_id=ca_id, ascending_order=True)
    assert [c.certificate_id for c in listed.certificates] == [result.certificate_id,
                                                              other.certificate_id]


def test_registering_a_certificate_twice_carries_its_id(registry: Registry) -> None:
    # spec broker §2.2, §7 item 16: ResourceAlreadyExistsException with resourceId
    pem = self_signed_pem()
    registry.register_certificate_without_ca(certificate_pem=pem)
    with pytest.raises(ResourceAlreadyExistsException) as info:
        registry.register_certificate_without_ca(certificate_pem=pem)
    assert info.value.message == "The certificate is already provisioned or registered"
    assert info.value.extra["resourceId"] == pki.certificate_id(pem)
    assert info.value.extra["resourceArn"].endswith(":cert/" + pki.certificate_id(pem))


def test_register_certificate_refuses_unknown_or_ambiguous_cas(registry: Registry) -> None:
    # spec broker §2.2: unregistered / mismatching CA → CertificateValidationException,
    # several candidate CAs → CertificateConflictException
    stranger, _ = make_ca_pem("Stranger CA")
    with pytest.raises(CertificateValidationException):
        registry.register_certificate(certificate_pem=device_pem(stranger))
    ca, _ = _register_ca(registry, "Shared Subject")
    with pytest.raises(CertificateValidationException):
        registry.register_certificate(certificate_pem=device_pem(stranger),
                                      ca_certificate_pem=ca.pem)
    with pytest.raises(CertificateValidationException):
        registry.register_certificate(certificate_pem="garbage")
    # A second registered CA with the same subject and key: both could have signed.
    twin_cert = (x509.CertificateBuilder().subject_name(ca.cert.subject)
                 .issuer_name(ca.cert.subject).public_key(ca.key.public_key())
                 .serial_number(x509.random_serial_number())
                 .not_valid_before(ca.cert.not_valid_before_utc)
                 .not_valid_after(ca.cert.not_valid_after_utc)
                 .add_extension(x509.BasicConstraints(ca=True, path_length=None), critical=True)
                 .sign(ca.key, hashes.SHA256()))
    twin = pki.CertificateAuthority(key=ca.key, cert=twin_cert)
    code = registry.get_registration_code().registration_code
    registry.register_ca_certificate(ca_certificate=twin.pem,
                                     verification_certificate=verification_pem(twin, code))
    pem = device_pem(ca)
    with pytest.raises(CertificateConflictException):
        registry.register_certificate(certificate_pem=pem)
    chosen = registry.register_certificate(certificate_pem=pem, ca_certificate_pem=twin.pem)
    assert chosen.ca_certificate_id == pki.certificate_id(twin.pem)


@pytest.mark.parametrize("status", ["PENDING_TRANSFER", "PENDING_ACTIVATION", "REGISTER_INACTIVE"])
def test_register_certificate_accepts_only_active_inactive_or_revoked(registry: Registry,
                                                                      status: str) -> None:
    # botocore doc of RegisterCertificate.status
    with pytest.raises(CertificateStateException):
        registry.register_certificate_without_ca(certificate_pem=self_signed_pem(),
                                                 status=status)


def test_register_certificate_without_ca_is_sni_only_and_a_trust_anchor(registry: Registry
                                                                         ) -> None:
    # spec broker §2.2, §2.4; trust anchors for the broker's TLS context
    events = EventLog()
    registry.add_listener(events)
    pem = self_signed_pem()
    result = registry.register_certificate_without_ca(certificate_pem=pem, status="ACTIVE")
    assert result.certificate_mode is CertificateMode.SNI_ONLY
    assert result.ca_certificate_id is None
    assert registry.trust_anchors_pem() == [emulator_ca().pem, result.certificate_pem]
    assert "trust_changed" in events.kinds()
    registry.update_certificate(certificate_id=result.certificate_id, new_status="INACTIVE")
    events.clear()
    registry.delete_certificate(certificate_id=result.certificate_id)
    assert registry.trust_anchors_pem() == [emulator_ca().pem]
    assert events.kinds() == ["certificate_deleted", "trust_changed"]


# -- CA certificates -----------------------------------------------------------------------------

def test_registration_code_is_stable_64_hex(registry: Registry) -> None:
    # spec broker §2.4
    code = registry.get_registration_code().registration_code
    assert len(code) == 64 and int(code, 16) >= 0
    assert registry.get_registration_code().registration_code == code


def test_register_ca_certificate_checks_the_verification_certificate(registry: Registry) -> None:
    # spec broker §2.4: CN = registration code, signed by the CA; DEFAULT needs one
    ca, pem = make_ca_pem("Verified CA")
    code = registry.get_registration_code().registration_code
    with pytest.raises(RegistrationCodeValidationException):
        registry.register_ca_certificate(ca_certificate=pem,
                                         verification_certificate=verification_pem(ca, "wrong"))
    other, _ = make_ca_pem("Other CA")
    with pytest.raises(CertificateValidationException):
        registry.register_ca_certificate(ca_certificate=pem,
                                         verification_certificate=verification_pem(other, code))
    with pytest.raises(InvalidRequestException):
        registry.register_ca_certificate(ca_certificate=pem)
    with pytest.raises(CertificateValidationException):
        registry.register_ca_certificate(ca_certificate=device_pem(ca),
                                         verification_certificate=verification_pem(ca, code))
    events = EventLog()
    registry.add_listener(events)
    result = registry.register_ca_certificate(
        ca_certificate=pem, verification_certificate=verification_pem(ca, code),
        set_as_active=True, allow_auto_registration=True)
    assert events.kinds() == ["trust_changed"]
    assert pem in registry.trust_anchors_pem()
    described = registry.describe_ca_certificate(certificate_id=result.certificate_id)
    desc = described.certificate_description
    assert (desc.status.value, desc.auto_registration_status.value) == ("ACTIVE", "ENABLE")
    assert desc.certificate_mode is CertificateMode.DEFAULT
    assert desc.certificate_arn.endswith(":cacert/" + result.certificate_id)
    with pytest.raises(ResourceAlreadyExistsException):
        registry.register_ca_certificate(ca_certificate=pem,
                                         verification_certificate=verification_pem(ca, code))


def test_sni_only_ca_takes_no_verification_certificate(registry: Registry) -> None:
    # spec broker §2.4
    ca, pem = make_ca_pem("SNI CA")
    with pytest.raises(InvalidRequestException):
        registry.register_ca_certificate(
            ca_certificate=pem, certificate_mode="SNI_ONLY",
            verification_certificate=verification_pem(ca, "x"))
    result = registry.register_ca_certificate(ca_certificate=pem, certificate_mode="SNI_ONLY")
    assert result.certificate_mode is CertificateMode.SNI_ONLY
    device = registry.register_certificate(certificate_pem=device_pem(ca))
    assert device.certificate_mode is CertificateMode.SNI_ONLY


def test_at_most_ten_cas_share_a_subject(tmp_path: Path) -> None:
    # spec broker §2.4 (limit as a setting)
    reg = make_registry(tmp_path / "r.db",
                        settings=RegistrySettings(max_ca_certificates_per_subject=2))
    for _ in range(2):
        reg.register_ca_certificate(ca_certificate=make_ca_pem("Same")[1],
                                    certificate_mode="SNI_ONLY")
    with pytest.raises(LimitExceededException):
        reg.register_ca_certificate(ca_certificate=make_ca_pem("Same")[1],
                                    certificate_mode="SNI_ONLY")
    reg.close()


def test_update_delete_and_list_ca_certificates(registry: Registry) -> None:
    # spec broker §2.4, §5.3; UNCONFIRMED: deleting an ACTIVE CA is refused
    registry.create_provisioning_template(
        template_name="jitp", template_body="{}", type="JITP",
        provisioning_role_arn="arn:aws:iam::123456789012:role/Provisioning")
    _, first = _register_ca(registry, "CA one")
    _, second = _register_ca(registry, "CA two", active=False)
    registry.update_ca_certificate(certificate_id=first, new_auto_registration_status="ENABLE",
                                   registration_config={"templateName": "jitp"})
    described = registry.describe_ca_certificate(certificate_id=first)
    config = described.registration_config
    assert config is not None and config.template_name == "jitp"
    with pytest.raises(ResourceNotFoundException):
        registry.update_ca_certificate(certificate_id=first,
                                       registration_config={"templateName": "nope"})
    listed = registry.list_ca_certificates(template_name="jitp")
    assert [c.certificate_id for c in listed.certificates] == [first]
    newest_first = registry.list_ca_certificates().certificates
    assert [c.certificate_id for c in newest_first] == [second, first]
    message = raises_message(lambda: registry.delete_ca_certificate(certificate_id=first),
                             CertificateStateException)
    assert first in message
    registry.update_ca_certificate(certificate_id=first, new_status="INACTIVE",
                                   remove_auto_registration=True)
    assert registry.describe_ca_certificate(certificate_id=first).registration_config is None
    registry.delete_ca_certificate(certificate_id=first)
    with pytest.raises(ResourceNotFoundException):
        registry.describe_ca_certificate(certificate_id=first)


# -- status and deletion -------------------------------------------------------------------------

def test_update_certificate_follows_the_state_machine(registry: Registry) -> None:
    # spec broker §2.3: PENDING_* / REGISTER_INACTIVE cannot be set; REVOKED → ACTIVE refused
    cert = registry.register_certificate_without_ca(certificate_pem=self_signed_pem())
    events = EventLog()
    registry.add_listener(events)
    for status in ("PENDING_ACTIVATION", "PENDING_TRANSFER", "REGISTER_INACTIVE"):
        with pytest.raises(CertificateStateException):
            registry.update_certificate(certificate_id=cert.certificate_id, new_status=status)
    registry.update_certificate(certificate_id=cert.certificate_id, new_status="ACTIVE")
    registry.update_certificate(certificate_id=cert.certificate_id, new_status="ACTIVE")
    registry.update_certificate(certificate_id=cert.certificate_id, new_status="REVOKED")
    with pytest.raises(CertificateStateException):
        registry.update_certificate(certificate_id=cert.certificate_id, new_status="ACTIVE")
    assert [(e.kind.value, e.status) for e in events.events] == [
        ("certificate_status", CertificateStatus.ACTIVE),
        ("certificate_status", CertificateStatus.REVOKED)]
    described = registry.describe_certificate(certificate_id=cert.certificate_id)
    assert described.certificate_description.customer_version == 3


def test_pending_activation_certificate_can_be_activated(registry: Registry) -> None:
    # spec broker §2.2: RegisterThing (or a JITR handler) activates the certificate
    cert = registry.insert_certificate(device_pem(emulator_ca()),
                                       status=CertificateStatus.PENDING_ACTIVATION)
    registry.update_certificate(certificate_id=cert.certificate_id, new_status="ACTIVE")
    described = registry.describe_certificate(certificate_id=cert.certificate_id)
    assert described.certificate_description.status is CertificateStatus.ACTIVE


def test_delete_certificate_preconditions_and_messages(registry: Registry) -> None:
    # spec broker §5.4, §7 item 20
    cert = registry.register_certificate_without_ca(certificate_pem=self_signed_pem(),
                                                    status="ACTIVE")
    cid, arn = cert.certificate_id, cert.certificate_arn
    message = raises_message(lambda: registry.delete_certificate(certificate_id=cid),
                             CertificateStateException)
    assert message == f"Certificate must be deactivated (not ACTIVE) before deletion. Id: {cid}"
    registry.update_certificate(certificate_id=cid, new_status="INACTIVE")
    registry.create_thing(thing_name="t")
    registry.attach_thing_principal(thing_name="t", principal=arn)
    message = raises_message(lambda: registry.delete_certificate(certificate_id=cid),
                             DeleteConflictException)
    assert message == f"Things must be detached before deletion (arn: {arn})"
    registry.detach_thing_principal(thing_name="t", principal=arn)
    registry.create_policy(policy_name="p", policy_document=ALLOW_ALL)
    registry.attach_policy(policy_name="p", target=arn)
    message = raises_message(lambda: registry.delete_certificate(certificate_id=cid),
                             DeleteConflictException)
    assert message == f"Certificate policies must be detached before deletion (arn: {arn})"
    registry.delete_certificate(certificate_id=cid, force_delete=True)
    assert registry.get_certificate(cid) is None
    assert registry.list_targets_for_policy(policy_name="p").targets == []
    with pytest.raises(ResourceNotFoundException):
        registry.describe_certificate(certificate_id=cid)


def test_revoked_certificates_can_be_deleted(registry: Registry) -> None:
    # spec broker §5.4: REVOKED and INACTIVE certificates can be deleted
    cert = registry.register_certificate_without_ca(certificate_pem=self_signed_pem(),
                                                    status="REVOKED")
    registry.delete_certificate(certificate_id=cert.certificate_id)
    assert registry.get_certificate(cert.certificate_id) is None


def test_delete_certificate_record_removes_everything_attached(registry: Registry) -> None:
    # used by the provisioning sweeper for expired, unused certificates
    cert = registry.insert_certificate(device_pem(emulator_ca()),
                                       status=CertificateStatus.PENDING_ACTIVATION)
    registry.create_thing(thing_name="t")
    registry.attach_thing_principal(thing_name="t", principal=cert.certificate_arn)
    events = EventLog()
    registry.add_listener(events)
    registry.delete_certificate_record(cert.certificate_id)
    registry.delete_certificate_record(cert.certificate_id)
    assert registry.get_certificate(cert.certificate_id) is None
    assert registry.list_thing_principals(thing_name="t").principals == []
    assert events.kinds() == ["policies_changed", "certificate_deleted"]


def test_certificate_id_in_other_case_finds_the_same_certificate(registry: Registry) -> None:
    # spec broker §2.1: the id is lowercase hex; the API pattern allows upper case
    cert = registry.register_certificate_without_ca(certificate_pem=self_signed_pem())
    upper = cert.certificate_id.upper()
    assert registry.describe_certificate(certificate_id=upper).certificate_description == cert


# -- listing -------------------------------------------------------------------------------------

def test_list_certificates_pages_with_markers_newest_first(registry: Registry) -> None:
    # spec broker §5.1, §7 item 21: marker/pageSize/nextMarker; isAscendingOrder
    ids = [registry.register_certificate_without_ca(certificate_pem=self_signed_pem()
                                                    ).certificate_id for _ in range(5)]
    seen: list[str] = []
    marker = None
    while True:
        page = registry.list_certificates(page_size=2, marker=marker)
        seen += [c.certificate_id for c in page.certificates]
        marker = page.next_marker
        if marker is None:
            break
        assert len(page.certificates) == 2
    assert seen == list(reversed(ids))
    ascending = registry.list_certificates(page_size=250, ascending_order=True)
    assert [c.certificate_id for c in ascending.certificates] == ids
    assert ascending.next_marker is None
    with pytest.raises(InvalidRequestException):
        registry.list_certificates(marker="bm90IGEgbGlzdA==")
    with pytest.raises(InvalidRequestException):
        registry.list_certificates(page_size=251)


def test_a_device_certificate_leaves_the_trust_anchors_alone(registry: Registry) -> None:
    # only CA and SNI_ONLY certificates are anchors (the registry skips recomputing them)
    events = EventLog()
    registry.add_listener(events)
    cert = registry.insert_certificate(device_pem(emulator_ca()),
                                       status=CertificateStatus.PENDING_ACTIVATION)
    registry.update_certificate(certificate_id=cert.certificate_id, new_status="ACTIVE")
    assert events.kinds() == ["certificate_status", "certificate_status"]
    assert registry.trust_anchors_pem() == [emulator_ca().pem]
