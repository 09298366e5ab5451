"""Expiries on the emulator clock: unused certificates disappear with their ownership token
(spec fleet §1.6) and a trusted-user claim connection has five minutes (§2.2)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from harness import protocol
from harness.emulator.app import EmbeddedEmulator
from harness.emulator.claims import CLAIM_REGISTRATION_WINDOW_SECONDS
from harness.emulator.registry import CertificateStatus
from harness.emulator.tokens import TOKEN_LIFETIME_SECONDS
from harness.observations import Kind
from harness.protocol import Api, ErrorResponse
from tests.test_provisioning_kit import (
    PahoDevice,
    create_certificate,
    create_template,
    emulator,
    factory_claim,
    fleet_template,
    register,
    registry_of,
    service_of,
    trusted_user_claim,
    unique,
)

__all__ = ["emulator"]

POLICY = json.dumps({"Version": "2012-10-17", "Statement": [
    {"Effect": "Allow", "Action": "iot:Connect", "Resource": "*"}]})


def _deleted(emu: EmbeddedEmulator, certificate_id: str) -> bool:
    found = emu.emulator.observations.query(kinds=[Kind.CERTIFICATE_DELETED.value],
                                            certificate_id=certificate_id)
    return registry_of(emu).get_certificate(certificate_id) is None and len(found) == 1


def test_unused_certificates_are_deleted_when_their_token_expires(
        emulator: EmbeddedEmulator, tmp_path: Path) -> None:
    # spec fleet §1.6, edge case 4: neither activated nor attached after one hour → deleted;
    # a registered one and an attached one stay
    template = create_template(emulator, fleet_template())
    device = PahoDevice(emulator, factory_claim(emulator, tmp_path, template), unique("claim"))
    try:
        unused = create_certificate(device, "keys", "cbor")
        attached = create_certificate(device, "csr", "json")
        used = create_certificate(device, "csr", "json")
        answer = register(device, template, "json", used.token, {"SerialNumber": unique("sn")})
    finally:
        device.close()
    assert not isinstance(answer, ErrorResponse), answer
    reg = registry_of(emulator)
    policy = unique("kept")
    reg.create_policy(policy_name=policy, policy_document=POLICY)
    reg.attach_policy(policy_name=policy, target=reg.arn("cert", attached.certificate_id))
    emulator.emulator.clock.advance(TOKEN_LIFETIME_SECONDS - 1)
    assert reg.get_certificate(unused.certificate_id) is not None  # not yet
    emulator.emulator.clock.advance(1)  # the sweep runs as the clock moves
    assert _deleted(emulator, unused.certificate_id)
    kept = reg.get_certificate(attached.certificate_id)
    assert kept is not None and kept.status is CertificateStatus.PENDING_ACTIVATION
    active = reg.get_certificate(used.certificate_id)
    assert active is not None and active.status is CertificateStatus.ACTIVE


def test_a_sweep_deletes_only_certificates_whose_hour_is_over(
        emulator: EmbeddedEmulator, tmp_path: Path) -> None:
    # spec fleet §1.6: the sweep the loop runs every 30 s, at a chosen time
    template = create_template(emulator, fleet_template())
    device = PahoDevice(emulator, factory_claim(emulator, tmp_path, template), unique("claim"))
    try:
        unused = create_certificate(device, "csr", "json")
    finally:
        device.close()
    service = service_of(emulator)
    assert emulator.call(service.sweep()) == 0  # the periodic path, on the loop
    cutoff = emulator.emulator.clock.now() + TOKEN_LIFETIME_SECONDS
    assert service.sweep_blocking(cutoff - 1) == 0
    assert service.sweep_blocking(cutoff) >= 1
    assert _deleted(emulator, unused.certificate_id)


@pytest.mark.parametrize("api", ["keys", "csr", "register"])
def test_a_claim_connection_has_five_minutes_from_connecting(
        emulator: EmbeddedEmulator, tmp_path: Path, api: str) -> None:
    # spec fleet §2.2: the device must provision within five minutes of connecting with the
    # temporary claim (UNCONFIRMED form: 403 AccessDenied on each operation afterwards)
    template = create_template(emulator, fleet_template())
    device = PahoDevice(emulator, trusted_user_claim(emulator, tmp_path, template),
                        unique("installer"))
    try:
        token = create_certificate(device, "csr", "json").token  # within the window
        emulator.emulator.clock.advance(CLAIM_REGISTRATION_WINDOW_SECONDS + 1)
        if api == "register":
            answer = register(device, template, "json", token, {"SerialNumber": "1"})
        elif api == "keys":
            answer = device.call(Api.CREATE_KEYS_AND_CERTIFICATE, "json", b"{}")
        else:
            answer = device.call(Api.CREATE_CERTIFICATE_FROM_CSR, "json", b"{}")
    finally:
        device.close()
    assert isinstance(answer, ErrorResponse), answer
    assert (answer.status_code, answer.error_code) == (403, protocol.ACCESS_DENIED_CODE)
