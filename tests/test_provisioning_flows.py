"""End-to-end fleet provisioning with paho-mqtt over mutual TLS against the embedded emulator:
both certificate paths x both payload formats x by claim and by trusted user, on MQTT 3.1.1
and 5, then the device reconnects with its new certificate under the template's policy."""

from __future__ import annotations

from pathlib import Path

import pytest

from harness.emulator.app import EmbeddedEmulator
from harness.emulator.registry import CertificateStatus
from harness.protocol import ErrorResponse
from tests.test_provisioning_kit import (
    PahoDevice,
    Refused,
    claim_identity,
    create_certificate,
    create_template,
    emulator,
    fleet_template,
    register,
    registry_of,
    unique,
    write_identity,
)

__all__ = ["emulator"]


@pytest.mark.parametrize("version", [4, 5])
@pytest.mark.parametrize("fmt", ["json", "cbor"])
@pytest.mark.parametrize("path", ["keys", "csr"])
@pytest.mark.parametrize("by", ["claim", "trusted_user"])
def test_device_provisions_and_reconnects_under_the_template_policy(
        emulator: EmbeddedEmulator, tmp_path: Path, version: int, fmt: str, path: str,
        by: str) -> None:
    # spec fleet §1.2, §1.3, §1.4, §2; edge cases 2, 3, 4, 10, 17
    template = create_template(emulator, fleet_template())
    claim = claim_identity(emulator, tmp_path, template, by)
    serial = unique("sn")
    device = PahoDevice(emulator, claim, unique("claim"), version=version)
    try:
        new = create_certificate(device, path, fmt)
        answer = register(device, template, fmt, new.token, {"SerialNumber": serial})
    finally:
        device.close()
    assert not isinstance(answer, ErrorResponse), answer
    assert answer.thing_name == f"dev-{serial}"
    assert dict(answer.device_configuration) == {"serial": serial, "location": "factory"}
    cert = registry_of(emulator).get_certificate(new.certificate_id)
    assert cert is not None and cert.status is CertificateStatus.ACTIVE

    identity = write_identity(tmp_path, new.certificate_pem, new.private_key_pem,
                              emulator.info.ca_file)
    thing = PahoDevice(emulator, identity, answer.thing_name, version=version)
    try:
        assert thing.publish(f"telemetry/{answer.thing_name}", b"{}") == 0
        if version == 5:
            # spec broker §1.9: MQTT 5 gets PUBACK 0x87 for an unauthorized publish
            assert thing.publish("telemetry/someone-else", b"{}") == 0x87
        else:
            # spec broker §1.9: 3.1.1 is disconnected for an unauthorized publish
            with pytest.raises(Refused):
                thing.publish("telemetry/someone-else", b"{}")
    finally:
        thing.close()
