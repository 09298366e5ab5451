"""Certificates and CA certificates through boto3 against a live emulator (issue 4).

Spec: iot-broker-and-policy.md §2.1-§2.4 (identity, registration paths, states, CAs),
§5.3 "Certificates", §5.4 (deletion), §7 items 16, 20, 21.
"""

from __future__ import annotations

import datetime as dt
from typing import Any

from harness import pki
from tests.cp_live_kit import (
    ALLOW_ALL,
    ARN_PREFIX,
    Live,
    assert_item_members,
    assert_members,
    aws_error,
    csr_pem,
    emulator_fixture,
    key_matches_certificate,
    make_ca,
    paged_alike,
    public_der,
    unchanged,
    unique,
)

live = emulator_fixture()

#: AWS-issued certificates expire at the end of 2049 (spec broker §2.2).
AWS_NOT_AFTER = dt.datetime(2049, 12, 31, 23, 59, 59, tzinfo=dt.timezone.utc)


def _description(iot: Any, certificate_id: str) -> dict[str, Any]:
    return iot.describe_certificate(certificateId=certificate_id)["certificateDescription"]


def test_create_keys_and_certificate_returns_aws_members_and_a_pkcs1_key(live: Live) -> None:
    # spec broker §2.1 (id = SHA-256 of the DER, ARN), §2.2 (ACTIVE with setAsActive, PKCS#1)
    iot = live.iot
    created = iot.create_keys_and_certificate(setAsActive=True)
    assert_members(iot, "CreateKeysAndCertificate", created)
    assert set(created["keyPair"]) == {"PublicKey", "PrivateKey"}
    pkcs1 = created["keyPair"]["PrivateKey"].startswith("-----BEGIN RSA PRIVATE KEY-----")
    assert pkcs1, "the private key is not a PKCS#1 PEM"  # the key itself is never shown
    certificate_id = created["certificateId"]
    assert certificate_id == pki.certificate_id(created["certificatePem"])
    assert created["certificateArn"] == f"{ARN_PREFIX}cert/{certificate_id}"
    assert key_matches_certificate(created["keyPair"]["PrivateKey"], created["certificatePem"])
    assert _description(iot, certificate_id)["status"] == "ACTIVE"
    inactive = iot.create_keys_and_certificate()
    assert _description(iot, inactive["certificateId"])["status"] == "INACTIVE"


def test_create_certificate_from_csr_signs_the_csr_key_and_twice_gives_two(live: Live) -> None:
    # spec broker §2.2: the CSR's key is certified; the same CSR twice yields two certificates
    iot = live.iot
    key = pki.generate_ec_key()
    csr = pki.make_csr(key, "sensor-1")
    first = iot.create_certificate_from_csr(certificateSigningRequest=csr, setAsActive=True)
    second = iot.create_certificate_from_csr(certificateSigningRequest=csr)
    assert_members(iot, "CreateCertificateFromCsr", first)
    assert first["certificateId"] != second["certificateId"]
    cert = pki.load_certificate(first["certificatePem"])
    assert public_der(cert.public_key()) == public_der(key.public_key())
    assert first["certificateId"] == pki.certificate_id(first["certificatePem"])
    assert _description(iot, first["certificateId"])["status"] == "ACTIVE"
    assert _description(iot, second["certificateId"])["status"] == "INACTIVE"


def test_describe_certificate_returns_the_description_with_datetimes(live: Live) -> None:
    # spec broker §5.3 DescribeCertificate; §5.1 timestamps; §2.2 expiry 2049-12-31
    iot = live.iot
    created = iot.create_certificate_from_csr(certificateSigningRequest=csr_pem())
    described = iot.describe_certificate(certificateId=created["certificateId"])
    assert_members(iot, "DescribeCertificate", described)
    description = described["certificateDescription"]
    # Not issued by a registered CA, never transferred: AWS leaves these out.
    absent = {"caCertificateId", "previousOwnedBy", "transferData"}
    modeled = iot.meta.service_model.shape_for("CertificateDescription").members
    assert set(description) == set(modeled) - absent
    assert description["certificatePem"] == created["certificatePem"]
    assert description["certificateMode"] == "DEFAULT"
    assert description["ownedBy"] == "123456789012"
    assert isinstance(description["creationDate"], dt.datetime)
    assert description["validity"]["notAfter"] == AWS_NOT_AFTER
    assert description["validity"]["notBefore"] <= dt.datetime.now(dt.timezone.utc)


def test_update_certificate_moves_between_states_and_refuses_the_reserved_ones(
        live: Live) -> None:
    # spec broker §2.3: ACTIVE/INACTIVE/REVOKED by UpdateCertificate; PENDING_* and
    # REGISTER_INACTIVE cannot be set; REVOKED→ACTIVE refused (UNCONFIRMED default)
    iot = live.iot
    certificate_id = iot.create_keys_and_certificate(setAsActive=True)["certificateId"]
    before = _description(iot, certificate_id)
    assert iot.update_certificate(certificateId=certificate_id,
                                  newStatus="INACTIVE")["ResponseMetadata"]["HTTPStatusCode"] \
        == 200
    after = _description(iot, certificate_id)
    assert after["status"] == "INACTIVE"
    assert after["lastModifiedDate"] >= before["lastModifiedDate"]
    assert after["customerVersion"] == before["customerVersion"] + 1
    for reserved in ("PENDING_ACTIVATION", "PENDING_TRANSFER", "REGISTER_INACTIVE"):
        with unchanged(live), aws_error(iot, "CertificateStateException", match=reserved):
            iot.update_certificate(certificateId=certificate_id, newStatus=reserved)
    iot.update_certificate(certificateId=certificate_id, newStatus="REVOKED")
    with unchanged(live), aws_error(iot, "CertificateStateException", match=certificate_id):
        iot.update_certificate(certificateId=certificate_id, newStatus="ACTIVE")
    assert _description(iot, certificate_id)["status"] == "REVOKED"


def test_delete_certificate_after_deactivation_with_force_delete_skips_policies(
        live: Live) -> None:
    # spec broker §5.4: INACTIVE/REVOKED can be deleted; forceDelete skips the policy check
    iot = live.iot
    created = iot.create_keys_and_certificate(setAsActive=True)
    policy = unique("pol")
    iot.create_policy(policyName=policy, policyDocument=ALLOW_ALL)
    iot.attach_policy(policyName=policy, target=created["certificateArn"])
    iot.update_certificate(certificateId=created["certificateId"], newStatus="INACTIVE")
    assert iot.delete_certificate(certificateId=created["certificateId"],
                                  forceDelete=True)["ResponseMetadata"]["HTTPStatusCode"] == 200
    with aws_error(iot, "ResourceNotFoundException"):
        iot.describe_certificate(certificateId=created["certificateId"])
    assert iot.list_targets_for_policy(policyName=policy)["targets"] == []
    revoked = iot.create_keys_and_certificate()["certificateId"]
    iot.update_certificate(certificateId=revoked, newStatus="REVOKED")
    iot.delete_certificate(certificateId=revoked)
    with aws_error(iot, "ResourceNotFoundException"):
        iot.describe_certificate(certificateId=revoked)


def test_list_certificates_pages_by_marker_newest_first(live: Live) -> None:
    # spec broker §5.1, §7 item 21: marker/pageSize/nextMarker; isAscendingOrder
    iot = live.iot
    mine = [iot.create_certificate_from_csr(certificateSigningRequest=csr_pem())["certificateId"]
            for _ in range(3)]
    first = iot.list_certificates(pageSize=2)
    assert_members(iot, "ListCertificates", first)
    assert len(first["certificates"]) == 2
    assert_item_members(iot, "ListCertificates", first["certificates"], "certificates")
    pages = list(iot.get_paginator("list_certificates").paginate(
        PaginationConfig={"PageSize": 2}))
    assert all(len(p["certificates"]) <= 2 for p in pages)
    assert all("nextMarker" in p for p in pages[:-1]) and "nextMarker" not in pages[-1]
    newest_first = [c["certificateId"] for p in pages for c in p["certificates"]]
    assert len(newest_first) == len(set(newest_first))
    assert [c for c in newest_first if c in mine] == mine[::-1]
    oldest_first = [c["certificateId"] for p in iot.get_paginator("list_certificates").paginate(
        ascendingOrder=True, PaginationConfig={"PageSize": 2}) for c in p["certificates"]]
    assert [c for c in oldest_first if c in mine] == mine


def test_a_ca_registered_with_the_registration_code_vouches_for_its_certificates(
        live: Live) -> None:
    # spec broker §2.2 RegisterCertificate, §2.4 DEFAULT mode and the registration code,
    # §5.3 DescribeCACertificate, ListCACertificates, ListCertificatesByCA
    iot = live.iot
    code = iot.get_registration_code()
    assert_members(iot, "GetRegistrationCode", code)
    assert iot.get_registration_code()["registrationCode"] == code["registrationCode"]
    ca = make_ca(code["registrationCode"])
    registered = iot.register_ca_certificate(
        caCertificate=ca.pem, verificationCertificate=ca.verification_pem, setAsActive=True)
    assert_members(iot, "RegisterCACertificate", registered)
    ca_id = registered["certificateId"]
    assert ca_id == pki.certificate_id(ca.pem)
    assert registered["certificateArn"] == f"{ARN_PREFIX}cacert/{ca_id}"
    described = iot.describe_ca_certificate(certificateId=ca_id)
    assert_members(iot, "DescribeCACertificate", described, absent=("registrationConfig",))
    description = described["certificateDescription"]
    assert (description["status"], description["autoRegistrationStatus"],
            description["certificateMode"]) == ("ACTIVE", "DISABLE", "DEFAULT")
    listed = [c for p in iot.get_paginator("list_ca_certificates").paginate()
              for c in p["certificates"]]
    assert_item_members(iot, "ListCACertificates", listed, "certificates")
    assert ca_id in [c["certificateId"] for c in listed]

    with_ca = iot.register_certificate(certificatePem=ca.device_pem(), caCertificatePem=ca.pem,
                                       status="ACTIVE")
    assert_members(iot, "RegisterCertificate", with_ca)
    found_ca = iot.register_certificate(certificatePem=ca.device_pem())
    for cert, status in ((with_ca, "ACTIVE"), (found_ca, "INACTIVE")):
        description = _description(iot, cert["certificateId"])
        assert (description["caCertificateId"], description["status"],
                description["certificateMode"]) == (ca_id, status, "DEFAULT")
    by_ca = iot.list_certificates_by_ca(caCertificateId=ca_id)
    assert_members(iot, "ListCertificatesByCA", by_ca, absent=("nextMarker",))
    assert {c["certificateId"] for c in by_ca["certificates"]} == {
        with_ca["certificateId"], found_ca["certificateId"]}


def test_a_verification_certificate_without_the_code_is_refused(live: Live) -> None:
    # spec broker §2.4: verification CN ≠ registration code → RegistrationCodeValidation
    iot = live.iot
    ca = make_ca("not-the-registration-code")
    with unchanged(live, iot.list_ca_certificates), \
            aws_error(iot, "RegistrationCodeValidationException"):
        iot.register_ca_certificate(caCertificate=ca.pem,
                                    verificationCertificate=ca.verification_pem)


def test_an_sni_only_ca_registers_without_a_verification_certificate(live: Live) -> None:
    # spec broker §2.4: SNI_ONLY takes no verification certificate; supplying one is an error
    iot = live.iot
    ca = make_ca(iot.get_registration_code()["registrationCode"])
    with unchanged(live), aws_error(iot, "InvalidRequestException"):
        iot.register_ca_certificate(caCertificate=ca.pem,
                                    verificationCertificate=ca.verification_pem,
                                    certificateMode="SNI_ONLY")
    ca_id = iot.register_ca_certificate(caCertificate=ca.pem,
                                        certificateMode="SNI_ONLY")["certificateId"]
    description = iot.describe_ca_certificate(certificateId=ca_id)["certificateDescription"]
    assert (description["certificateMode"], description["status"]) == ("SNI_ONLY", "INACTIVE")


def test_update_ca_certificate_then_delete_it_once_inactive(live: Live) -> None:
    # spec broker §2.4: CA status and auto-registration; deleting an ACTIVE CA is refused
    # (UNCONFIRMED default, RegistrySettings.refuse_delete_active_ca)
    iot = live.iot
    ca = make_ca(iot.get_registration_code()["registrationCode"])
    ca_id = iot.register_ca_certificate(caCertificate=ca.pem,
                                        verificationCertificate=ca.verification_pem,
                                        setAsActive=True)["certificateId"]

    def describe() -> Any:
        return iot.describe_ca_certificate(certificateId=ca_id)

    with unchanged(live, describe), aws_error(iot, "CertificateStateException", match=ca_id):
        iot.delete_ca_certificate(certificateId=ca_id)
    iot.update_ca_certificate(certificateId=ca_id, newStatus="INACTIVE",
                              newAutoRegistrationStatus="ENABLE")
    description = describe()["certificateDescription"]
    assert (description["status"], description["autoRegistrationStatus"]) == (
        "INACTIVE", "ENABLE")
    assert iot.delete_ca_certificate(certificateId=ca_id)["ResponseMetadata"][
        "HTTPStatusCode"] == 200
    with aws_error(iot, "ResourceNotFoundException"):
        describe()


def test_register_certificate_without_ca_is_sni_only_with_the_given_status(live: Live) -> None:
    # spec broker §2.2 RegisterCertificateWithoutCA (SNI_ONLY), §2.1 id of a foreign cert
    iot = live.iot
    cert_pem = pki.certificate_pem(pki.self_signed_certificate(pki.generate_ec_key()))
    registered = iot.register_certificate_without_ca(certificatePem=cert_pem, status="ACTIVE")
    assert_members(iot, "RegisterCertificateWithoutCA", registered)
    assert registered["certificateId"] == pki.certificate_id(cert_pem)
    description = _description(iot, registered["certificateId"])
    assert (description["certificateMode"], description["status"]) == ("SNI_ONLY", "ACTIVE")
    assert "caCertificateId" not in description


def test_ca_and_by_ca_listings_page_one_item_at_a_time(live: Live) -> None:
    # spec broker §5.1, §7 item 21: marker paging for ListCACertificates and
    # ListCertificatesByCA gives what one page gives
    iot = live.iot
    code = iot.get_registration_code()["registrationCode"]
    cas = [make_ca(code) for _ in range(2)]
    ca_ids = [iot.register_ca_certificate(caCertificate=ca.pem,
                                          verificationCertificate=ca.verification_pem)[
        "certificateId"] for ca in cas]
    device_ids = [iot.register_certificate(certificatePem=cas[0].device_pem())["certificateId"]
                  for _ in range(3)]
    listed = [c["certificateId"] for c in paged_alike(iot, "list_ca_certificates")]
    assert set(ca_ids) <= set(listed)
    by_ca = paged_alike(iot, "list_certificates_by_ca", caCertificateId=ca_ids[0])
    assert sorted(c["certificateId"] for c in by_ca) == sorted(device_ids)
    assert paged_alike(iot, "list_certificates_by_ca", caCertificateId=ca_ids[1]) == []
