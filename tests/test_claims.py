"""Trusted-user claims (spec fleet §2): five minutes on the emulator clock, a built-in policy
scoped to one template, never listed among the account's certificates."""

from __future__ import annotations

import hashlib
from collections.abc import Iterator
from pathlib import Path

import pytest
from cryptography import x509
from cryptography.hazmat.primitives import serialization
from cryptography.x509.oid import NameOID

from harness import pki
from harness.clock import Clock
from harness.emulator.app import EmbeddedEmulator
from harness.emulator.auth import Authentication, Refusal
from harness.emulator.broker_settings import BrokerSettings
from harness.emulator.claims import (
    CLAIM_CERTIFICATE_VALIDITY_SECONDS,
    CLAIM_LIFETIME_SECONDS,
    CLAIM_PRINCIPAL_KIND,
    ClaimStore,
)
from harness.emulator.keypool import KeyPool
from harness.emulator.policy import Authorizer, ConnectionContext
from harness.errors import InvalidRequestException, ResourceNotFoundException
from tests.test_provisioning_kit import (
    ACCOUNT,
    REGION,
    PahoDevice,
    Refused,
    boto3_client,
    create_template,
    emulator,
    fleet_template,
    service_of,
    trusted_user_claim,
    unique,
)

__all__ = ["emulator"]


@pytest.fixture(scope="module")
def keys() -> Iterator[KeyPool]:
    pool = KeyPool(2, 1, niceness=0)
    pool.start()
    yield pool
    pool.close()


@pytest.fixture()
def store(keys: KeyPool) -> ClaimStore:
    return ClaimStore(ca=pki.CertificateAuthority.create(), clock=Clock(), keys=keys,
                      region=REGION, account_id=ACCOUNT)


class _NoDirectory:
    """A registry that knows no certificate: only the claim resolver can admit."""

    def get_certificate(self, certificate_id: str) -> None:
        return None


def _der(pem: str) -> bytes:
    return pki.load_certificate(pem).public_bytes(serialization.Encoding.DER)


def test_a_claim_certificate_looks_like_the_observed_one(store: ClaimStore) -> None:
    # spec fleet §2.2 (observed): CN = 64 hex, RSA 2048, 7 minutes, CA:FALSE, digitalSignature
    claim = store.issue("widgets")
    cert = pki.load_certificate(claim.certificate_pem)
    (cn,) = cert.subject.get_attributes_for_oid(NameOID.COMMON_NAME)
    assert len(str(cn.value)) == 64 and int(str(cn.value), 16) >= 0
    assert cn.value != claim.certificate_id  # not its own hash (observed)
    assert cert.public_key().key_size == 2048  # type: ignore[union-attr]
    lifetime = cert.not_valid_after_utc - cert.not_valid_before_utc
    assert lifetime.total_seconds() == CLAIM_CERTIFICATE_VALIDITY_SECONDS
    assert cert.extensions.get_extension_for_class(x509.BasicConstraints).value.ca is False
    assert cert.extensions.get_extension_for_class(x509.KeyUsage).value.digital_signature
    assert claim.certificate_id == hashlib.sha256(_der(claim.certificate_pem)).hexdigest()
    assert claim.key_pair.private_key.startswith("-----BEGIN RSA PRIVATE KEY-----")
    assert "PRIVATE" not in repr(claim)


def test_a_claim_expires_five_minutes_after_issue_on_the_emulator_clock(
        store: ClaimStore) -> None:
    # spec fleet §2.1/§2.2: expiration = issue + 300 s; refused from then on
    claim = store.issue("widgets")
    assert claim.expiration == pytest.approx(store._clock.now() + CLAIM_LIFETIME_SECONDS, abs=1)
    auth = Authentication(_NoDirectory(), BrokerSettings(),  # type: ignore[arg-type]
                          region=REGION, account_id=ACCOUNT)
    auth.add_resolver(store.resolve)
    der = _der(claim.certificate_pem)
    admitted = auth.authenticate(der, None, claim.expiration - 1)
    assert admitted.principal is not None and admitted.principal.kind == CLAIM_PRINCIPAL_KIND
    refused = auth.authenticate(der, None, claim.expiration)
    assert refused.principal is None and refused.refusal is Refusal.PRINCIPAL_EXPIRED


def test_any_other_certificate_is_left_to_the_registry(store: ClaimStore) -> None:
    other = pki.self_signed_certificate(pki.generate_ec_key())
    assert store.resolve(pki.certificate_id(other), other) is None


def _authorizer(store: ClaimStore, template: str) -> Authorizer:
    claim = store.issue(template)
    principal = store.resolve(claim.certificate_id, pki.load_certificate(claim.certificate_pem))
    assert principal is not None and principal.policy_documents is not None
    context = ConnectionContext(region=REGION, account_id=ACCOUNT, client_id="any-client",
                                certificate=principal.certificate,
                                certificate_id=claim.certificate_id)
    return Authorizer(list(principal.policy_documents), context)  # type: ignore[arg-type]


@pytest.mark.parametrize("fmt", ["json", "cbor"])
def test_the_built_in_policy_allows_only_the_provisioning_topics_of_its_template(
        store: ClaimStore, fmt: str) -> None:
    # spec fleet §2.2 best inference: Connect with any client id; publish/receive/subscribe on
    # create/*, create-from-csr/* and this template's provision/* only
    authz = _authorizer(store, "widgets")
    assert authz.can_connect()
    for topic in (f"$aws/certificates/create/{fmt}",
                  f"$aws/certificates/create-from-csr/{fmt}",
                  f"$aws/provisioning-templates/widgets/provision/{fmt}"):
        assert authz.can_publish(topic)
        assert authz.can_subscribe(f"{topic}/accepted") and authz.can_subscribe(f"{topic}/rejected")
        assert authz.can_receive(f"{topic}/accepted") and authz.can_receive(f"{topic}/rejected")
    assert not authz.can_publish(f"$aws/provisioning-templates/gadgets/provision/{fmt}")
    assert not authz.can_subscribe(f"$aws/provisioning-templates/gadgets/provision/{fmt}/accepted")
    assert not authz.can_publish("telemetry/anything")
    assert not authz.can_subscribe("#")


def test_forgotten_claims_are_pruned_after_their_window(store: ClaimStore) -> None:
    claim = store.issue("widgets")
    assert store.prune(store._clock.now()) == 0
    store._clock.advance(CLAIM_LIFETIME_SECONDS * 2 + 1)
    assert store.prune() == 1
    assert store.get(claim.certificate_id) is None


# -- through the endpoint -------------------------------------------------------------------------

def test_a_claim_is_not_listed_among_the_account_certificates(
        emulator: EmbeddedEmulator) -> None:
    # spec fleet §2.2, edge case 11: invisible in ListCertificates; keyPair capitalised
    template = create_template(emulator, fleet_template())
    iot = boto3_client(emulator)
    claim = iot.create_provisioning_claim(templateName=template)
    assert len(claim["certificateId"]) == 64
    assert set(claim["keyPair"]) == {"PublicKey", "PrivateKey"}
    assert claim["expiration"].timestamp() == pytest.approx(
        emulator.emulator.clock.now() + CLAIM_LIFETIME_SECONDS, abs=5)
    listed = {c["certificateId"] for c in iot.list_certificates(pageSize=250)["certificates"]}
    assert claim["certificateId"] not in listed
    with pytest.raises(iot.exceptions.ResourceNotFoundException):
        iot.describe_certificate(certificateId=claim["certificateId"])


def test_a_claim_for_a_missing_template_is_not_found(emulator: EmbeddedEmulator) -> None:
    # spec fleet §2.1/§2.2: missing template → 404 ResourceNotFoundException
    with pytest.raises(ResourceNotFoundException):
        service_of(emulator).create_provisioning_claim(unique("missing"))
    iot = boto3_client(emulator)
    with pytest.raises(iot.exceptions.ResourceNotFoundException):
        iot.create_provisioning_claim(templateName=unique("missing"))


def test_a_claim_for_a_jitp_template_is_an_invalid_request(emulator: EmbeddedEmulator) -> None:
    # spec fleet §2.2 inference: JITP template → 400 InvalidRequest
    name = unique("jitp")
    emulator.emulator.registry.create_provisioning_template(
        template_name=name, template_body='{"Resources": {}}',
        provisioning_role_arn="arn:aws:iam::123456789012:role/provisioning-role", type="JITP")
    with pytest.raises(InvalidRequestException):
        service_of(emulator).create_provisioning_claim(name)


def test_a_disabled_template_still_gets_a_claim(emulator: EmbeddedEmulator) -> None:
    # spec fleet §2.2 inference: disabled template → claim issued, RegisterThing fails later
    template = create_template(emulator, fleet_template(), enabled=False)
    assert service_of(emulator).create_provisioning_claim(template).certificate_id


def test_the_broker_admits_a_claim_until_it_expires(emulator: EmbeddedEmulator,
                                                    tmp_path: Path) -> None:
    # spec fleet §2.2: new connections with the claim are refused once it expired
    template = create_template(emulator, fleet_template())
    identity = trusted_user_claim(emulator, tmp_path, template, via_boto3=True)
    device = PahoDevice(emulator, identity, unique("installer"))
    device.close()
    emulator.emulator.clock.advance(CLAIM_LIFETIME_SECONDS)
    with pytest.raises(Refused):
        PahoDevice(emulator, identity, unique("installer"))


def test_a_claim_connection_is_cut_off_from_another_templates_topics(
        emulator: EmbeddedEmulator, tmp_path: Path) -> None:
    # spec fleet §2.2 + broker §1.9: publishing outside the claim's scope closes a 3.1.1 client
    template = create_template(emulator, fleet_template())
    other = create_template(emulator, fleet_template())
    identity = trusted_user_claim(emulator, tmp_path, template)
    device = PahoDevice(emulator, identity, unique("installer"))
    try:
        with pytest.raises(Refused):
            device.publish(f"$aws/provisioning-templates/{other}/provision/json", b"{}")
    finally:
        device.close()
