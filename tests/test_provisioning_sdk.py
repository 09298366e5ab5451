"""The AWS IoT Device SDK v2 runs fleet provisioning against the emulator: its MQTT 3.1.1
``IotIdentityClient`` and its MQTT 5 request-response ``IotIdentityClientV2``, both
certificate paths, by claim and by trusted user, then reconnects with the new certificate
and publishes under the template's policy (spec fleet §1, §2; S8)."""

from __future__ import annotations

import concurrent.futures
import threading
from pathlib import Path
from typing import Any

import pytest

from harness import pki
from harness.emulator.app import EmbeddedEmulator
from harness.emulator.registry import CertificateStatus
from tests.test_provisioning_kit import (
    TIMEOUT,
    Identity,
    claim_identity,
    create_template,
    emulator,
    fleet_template,
    registry_of,
    unique,
    write_identity,
)

__all__ = ["emulator"]

awsiot = pytest.importorskip("awsiot")
SERVER_NAME = "localhost"  # in the emulator's server certificate


def _builder_args(emu: EmbeddedEmulator, identity: Identity, client_id: str) -> dict[str, Any]:
    return {"endpoint": SERVER_NAME, "port": emu.info.mqtt_port,
            "cert_filepath": str(identity.cert_file), "pri_key_filepath": str(identity.key_file),
            "ca_filepath": str(identity.ca_file), "client_id": client_id}


def _csr() -> tuple[str, str]:
    key = pki.generate_ec_key()
    return pki.make_csr(key), pki.private_key_pem(key)


# -- MQTT 3.1.1: IotIdentityClient ----------------------------------------------------------------

def _v1_call(subscribe_accepted: Any, subscribe_rejected: Any, publish: Any,
             subscription: Any) -> Any:
    """The SDK sample's pattern: subscribe to accepted and rejected, publish, wait."""
    from awscrt import mqtt

    answer: concurrent.futures.Future[Any] = concurrent.futures.Future()

    def done(kind: str) -> Any:
        def deliver(response: Any) -> None:
            if not answer.done():
                answer.set_result((kind, response))
        return deliver

    future, _ = subscribe_accepted(request=subscription, qos=mqtt.QoS.AT_LEAST_ONCE,
                                   callback=done("accepted"))
    future.result(TIMEOUT)
    future, _ = subscribe_rejected(request=subscription, qos=mqtt.QoS.AT_LEAST_ONCE,
                                   callback=done("rejected"))
    future.result(TIMEOUT)
    publish(qos=mqtt.QoS.AT_LEAST_ONCE).result(TIMEOUT)
    kind, response = answer.result(TIMEOUT)
    assert kind == "accepted", vars(response)
    return response


def _provision_v1(emu: EmbeddedEmulator, claim: Identity, template: str, path: str,
                  serial: str) -> tuple[str, str, str]:
    from awsiot import iotidentity, mqtt_connection_builder

    connection = mqtt_connection_builder.mtls_from_path(
        **_builder_args(emu, claim, unique("sdk-claim")), clean_session=True,
        keep_alive_secs=30)
    connection.connect().result(TIMEOUT)
    try:
        client = iotidentity.IotIdentityClient(connection)
        if path == "keys":
            created = _v1_call(
                client.subscribe_to_create_keys_and_certificate_accepted,
                client.subscribe_to_create_keys_and_certificate_rejected,
                lambda qos: client.publish_create_keys_and_certificate(
                    request=iotidentity.CreateKeysAndCertificateRequest(), qos=qos),
                iotidentity.CreateKeysAndCertificateSubscriptionRequest())
            private_key = created.private_key
        else:
            csr, private_key = _csr()
            created = _v1_call(
                client.subscribe_to_create_certificate_from_csr_accepted,
                client.subscribe_to_create_certificate_from_csr_rejected,
                lambda qos: client.publish_create_certificate_from_csr(
                    request=iotidentity.CreateCertificateFromCsrRequest(
                        certificate_signing_request=csr), qos=qos),
                iotidentity.CreateCertificateFromCsrSubscriptionRequest())
        registered = _v1_call(
            client.subscribe_to_register_thing_accepted,
            client.subscribe_to_register_thing_rejected,
            lambda qos: client.publish_register_thing(
                request=iotidentity.RegisterThingRequest(
                    template_name=template,
                    certificate_ownership_token=created.certificate_ownership_token,
                    parameters={"SerialNumber": serial}), qos=qos),
            iotidentity.RegisterThingSubscriptionRequest(template_name=template))
    finally:
        connection.disconnect().result(TIMEOUT)
    assert registered.device_configuration == {"serial": serial, "location": "factory"}
    return registered.thing_name, created.certificate_pem, private_key


# -- MQTT 5: IotIdentityClientV2 over the request-response client ---------------------------------

class _Mqtt5:
    """An ``awscrt.mqtt5.Client`` from the SDK's builder, started and connected."""

    def __init__(self, emu: EmbeddedEmulator, identity: Identity, client_id: str) -> None:
        from awsiot import mqtt5_client_builder

        self.connected = threading.Event()
        self.stopped = threading.Event()
        self.client = mqtt5_client_builder.mtls_from_path(
            **_builder_args(emu, identity, client_id),
            on_lifecycle_connection_success=lambda _data: self.connected.set(),
            on_lifecycle_stopped=lambda _data: self.stopped.set())
        self.client.start()
        assert self.connected.wait(TIMEOUT), "no CONNACK"

    def close(self) -> None:
        self.client.stop()
        self.stopped.wait(TIMEOUT)


def _provision_v2(emu: EmbeddedEmulator, claim: Identity, template: str, path: str,
                  serial: str) -> tuple[str, str, str]:
    from awscrt import mqtt_request_response
    from awsiot import iotidentity

    mqtt5 = _Mqtt5(emu, claim, unique("sdk5-claim"))
    try:
        client = iotidentity.IotIdentityClientV2(
            mqtt5.client, mqtt_request_response.ClientOptions(
                max_request_response_subscriptions=2, max_streaming_subscriptions=2,
                operation_timeout_in_seconds=int(TIMEOUT)))
        if path == "keys":
            created = client.create_keys_and_certificate(
                iotidentity.CreateKeysAndCertificateRequest()).result(TIMEOUT)
            private_key = created.private_key
        else:
            csr, private_key = _csr()
            created = client.create_certificate_from_csr(
                iotidentity.CreateCertificateFromCsrRequest(
                    certificate_signing_request=csr)).result(TIMEOUT)
        registered = client.register_thing(iotidentity.RegisterThingRequest(
            template_name=template,
            certificate_ownership_token=created.certificate_ownership_token,
            parameters={"SerialNumber": serial})).result(TIMEOUT)
    finally:
        mqtt5.close()
    assert registered.device_configuration == {"serial": serial, "location": "factory"}
    return registered.thing_name, created.certificate_pem, private_key


def _publish_as_thing(emu: EmbeddedEmulator, identity: Identity, thing_name: str) -> None:
    """Reconnect with the new certificate (MQTT 5) and publish on the allowed topic."""
    from awscrt import mqtt5

    device = _Mqtt5(emu, identity, thing_name)
    try:
        packet = mqtt5.PublishPacket(topic=f"telemetry/{thing_name}", payload=b"{}",
                                     qos=mqtt5.QoS.AT_LEAST_ONCE)
        result = device.client.publish(packet).result(TIMEOUT)
        assert result.puback.reason_code == mqtt5.PubackReasonCode.SUCCESS
        denied = mqtt5.PublishPacket(topic="telemetry/someone-else", payload=b"{}",
                                     qos=mqtt5.QoS.AT_LEAST_ONCE)
        result = device.client.publish(denied).result(TIMEOUT)
        assert result.puback.reason_code == mqtt5.PubackReasonCode.NOT_AUTHORIZED
    finally:
        device.close()


@pytest.mark.parametrize("client", ["IotIdentityClient", "IotIdentityClientV2"])
@pytest.mark.parametrize("path", ["keys", "csr"])
@pytest.mark.parametrize("by", ["claim", "trusted_user"])
def test_the_device_sdk_provisions_and_reconnects(emulator: EmbeddedEmulator, tmp_path: Path,
                                                   client: str, path: str, by: str) -> None:
    # spec fleet §1.2-§1.4, §2; the SDK is JSON-only (S8)
    template = create_template(emulator, fleet_template())
    claim = claim_identity(emulator, tmp_path, template, by)
    serial = unique("sn")
    provision = _provision_v1 if client == "IotIdentityClient" else _provision_v2
    thing_name, certificate_pem, private_key = provision(emulator, claim, template, path, serial)
    assert thing_name == f"dev-{serial}"
    identity = write_identity(tmp_path, certificate_pem, private_key, emulator.info.ca_file)
    cert = registry_of(emulator).get_certificate(identity.certificate_id)
    assert cert is not None and cert.status is CertificateStatus.ACTIVE
    _publish_as_thing(emulator, identity, thing_name)
