"""The provisioning matrix: by claim and by trusted user, CreateKeysAndCertificate and
CreateCertificateFromCsr, JSON and CBOR, on every selected device kind.

Each run ends with the device reconnected on its new certificate and publishing under the
policy the template gave it. The verdict is the endpoint's: the trace (claim connection,
certificate created with which API, thing registered, reconnection, a clean disconnect
after the publish) and the registry afterwards (thing, attributes, groups, billing group,
certificate status, attached policy); the device's own account is evidence.
"""

from __future__ import annotations

from typing import Any

import pytest

from devices.base import CertApi, Flow
from harness.emulator.lifecycle import DisconnectReason
from harness.fleet import Fleet
from harness.observations import Kind
from harness.observer import CertificateCreated, StepKind
from harness.protocol import Api, PayloadFormat
from scenarios.conftest import Provision, Registry

API_OF = {CertApi.KEYS: Api.CREATE_KEYS_AND_CERTIFICATE,
          CertApi.CSR: Api.CREATE_CERTIFICATE_FROM_CSR}


@pytest.mark.parametrize("payload_format", list(PayloadFormat), ids=lambda f: f.value)
@pytest.mark.parametrize("cert_api", list(CertApi), ids=lambda c: c.value)
@pytest.mark.parametrize("flow", list(Flow), ids=lambda f: f.value)
def test_device_is_provisioned_and_publishes_under_the_template_policy(
        flow: Flow, cert_api: CertApi, payload_format: PayloadFormat, fleet: Fleet,
        claim_for: Any, device_factory: Any, provision: Provision, registry: Registry) -> None:
    # spec fleet §1.2 / §1.3 (certificate APIs), §1.4 (RegisterThing), §2 (trusted user),
    # §7 (JSON and CBOR); spec broker §1.9 (publishing under the new policy)
    claim = claim_for(flow)
    inputs = device_factory.inputs(claim, cert_api=cert_api, payload_format=payload_format)
    assert inputs.serial is not None
    thing_name = fleet.thing_name(inputs.serial)
    run = provision(device_factory(), inputs)

    run.assert_provisioned()
    trace = run.trace
    assert run.result.ok, run.result.to_json(indent=2)
    connected = trace.first(StepKind.CONNECTED)
    assert connected is not None and connected.certificate_id == claim.certificate_id
    created = trace.first(StepKind.CERTIFICATE_CREATED)
    assert isinstance(created, CertificateCreated)
    if created.api is not None:  # AWS does not say which API made a certificate
        assert created.api == API_OF[cert_api].value
    certificate_id = created.certificate_id
    assert certificate_id is not None and certificate_id != claim.certificate_id
    assert trace.thing_name == thing_name
    assert [s.certificate_id for s in trace.of(StepKind.RECONNECTED)] == [certificate_id]

    # The device published under the template's policy and then left on its own: an
    # unauthorized publish would have closed the connection with AUTH_ERROR (broker §1.9).
    trace = provision.wait(run, lambda t: any(
        s.certificate_id == certificate_id for s in t.of(StepKind.DISCONNECTED)))
    ends = [s for s in trace.of(StepKind.DISCONNECTED) if s.certificate_id == certificate_id]
    assert [getattr(s, "reason", None) for s in ends] == \
        [DisconnectReason.CLIENT_INITIATED_DISCONNECT.value]
    telemetry = f"dt/{thing_name}/telemetry"
    if provision.emulated:  # the emulator also logs each accepted PUBLISH
        published = provision.events(run, certificate_id=certificate_id, kind=Kind.PUBLISH)
        assert telemetry in [o.detail.get("topic") for o in published]

    thing = registry.thing(thing_name)
    assert thing is not None
    assert thing.attributes == {"serial": inputs.serial, "fleetbench_run": fleet.prefix}
    assert thing.groups == set(fleet.thing_groups)
    assert thing.billing_group == fleet.billing_groups[0]
    assert thing.certificates == {certificate_id}
    cert = registry.certificate(certificate_id)
    assert cert is not None and cert.status == "ACTIVE"
    assert cert.things == {thing_name}
    (policy_name,) = cert.policies  # the template's inline policy (spec fleet §3.2)
    document = registry.policy_document(policy_name)
    assert f"client/{thing_name}" in str(document)
    assert dict(run.result.device_configuration) == {
        "fleetbenchRun": fleet.prefix, "telemetryTopic": telemetry}
