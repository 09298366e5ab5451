"""Fifty devices provisioning at once with one shared claim: nobody gets anyone else's
certificate or key.

All fifty subscribe to the same ``accepted`` topics with the same claim certificate; AWS
answers each request on the connection that made it and nowhere else (spec fleet §1.1,
edge case 1). Half take CreateKeysAndCertificate (the private key travels in the reply),
half CreateCertificateFromCsr with EC keys; JSON and CBOR alternate. Checked from the
endpoint (each trace links the certificate created on a device's connection to the
reconnection with it; the registry has one certificate per thing) and from what each
device stored (its key pairs with its certificate, which is the one the endpoint made).

The devices are virtual, whatever ``--device`` selects: this is a property of the
endpoint, and fifty virtual devices share one I/O loop (perf-notes: EC keys, one
``LoopDriver``).
"""

from __future__ import annotations

import threading
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import pytest
from cryptography.hazmat.primitives import serialization

from devices.base import CertApi, DeviceInputs, DeviceResult, create_device
from devices.credentials import CredentialStore
from devices.mqtt_transport import LoopDriver
from devices.virtual import KeyType, RetryPolicy
from harness import pki
from harness.fleet import Fleet
from harness.observer import Observer, StepKind
from harness.protocol import PayloadFormat
from scenarios.conftest import Registry, record_device

DEVICES = 50
#: Generous retries: an endpoint enforcing AWS's provisioning TPS answers 429 to a burst
#: (spec fleet §5), and the devices back off as AWS's SDKs do.
RETRY = RetryPolicy(max_attempts=10, base_delay_s=0.2, max_delay_s=2.0)


def _public_der(key: Any) -> bytes:
    return bytes(key.public_bytes(serialization.Encoding.DER,
                                  serialization.PublicFormat.SubjectPublicKeyInfo))


@pytest.fixture
def loop_driver() -> Any:
    driver = LoopDriver()
    runner = threading.Thread(target=driver.run_forever, name="scenario-loop", daemon=True)
    runner.start()
    yield driver
    driver.stop()
    runner.join(5)


def test_fifty_devices_at_once_each_get_only_their_own_certificate_and_key(
        request: pytest.FixtureRequest, fleet: Fleet, endpoint_params: Any, observer: Observer,
        registry: Registry, loop_driver: LoopDriver, tmp_path: Path) -> None:
    # spec fleet §1.1 / edge case 1 (replies only on the requesting connection), §1.2 / §1.3
    # (one new certificate per request), §1.4 (the thing gets that certificate)
    claim = fleet.create_claim()  # shared by all fifty, as a factory's claim is
    inputs = []
    for n in range(DEVICES):
        serial = f"c{n:02d}{claim.certificate_id[:6]}"
        inputs.append(DeviceInputs(
            endpoint=endpoint_params, claim=claim, template_name=fleet.template_name,
            cert_api=CertApi.KEYS if n % 2 else CertApi.CSR,
            payload_format=PayloadFormat.CBOR if n % 4 >= 2 else PayloadFormat.JSON,
            parameters={"SerialNumber": serial}, serial=serial, client_id=serial,
            workdir=tmp_path / serial, timeout_s=120))
    start = threading.Barrier(DEVICES)

    def run(one: DeviceInputs) -> DeviceResult:
        device = create_device("virtual", key_type=KeyType.EC_P256, retry=RETRY,
                               driver=loop_driver)
        start.wait(30)
        return device.provision(one)

    mark = observer.mark()
    with ThreadPoolExecutor(max_workers=DEVICES) as pool:
        results = list(pool.map(run, inputs))

    certificates: dict[str, str] = {}
    for one, result in zip(inputs, results, strict=True):
        trace = observer.trace(client_id=one.client_id, since=mark)
        record_device(request.node, result, trace, one)
        assert result.ok, result.to_json(indent=2)
        trace.assert_provisioned()
        (created,) = [s.certificate_id or "" for s in trace.of(StepKind.CERTIFICATE_CREATED)]
        assert [s.certificate_id for s in trace.of(StepKind.RECONNECTED)] == [created]
        assert result.certificate_id == created
        certificates[one.device_id] = created

        store = CredentialStore(one.workdir or tmp_path)
        stored = store.device_certificate_pem()
        assert pki.certificate_id(stored) == created
        key = pki.load_private_key(store.device_key.read_bytes())
        assert _public_der(key.public_key()) == _public_der(pki.load_certificate(stored)
                                                            .public_key())

        thing = registry.thing(fleet.thing_name(one.serial or ""))
        assert thing is not None and thing.certificates == {created}

    assert len(set(certificates.values())) == DEVICES
