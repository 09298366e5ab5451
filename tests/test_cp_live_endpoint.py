"""DescribeEndpoint through boto3 against a live emulator (issue 4).

Spec: iot-broker-and-policy.md §5.3 "Endpoint" (types; the emulator answers a host that
resolves to it and matches its server certificate), §1.2 (mutual TLS, SNI).
"""

from __future__ import annotations

import socket
import ssl
from pathlib import Path

import pytest

from harness import pki
from tests.cp_live_kit import (
    Live,
    assert_members,
    aws_error,
    emulator_fixture,
    unchanged,
)

live = emulator_fixture()

ENDPOINT_TYPES = ["iot:Data-ATS", "iot:Data", "iot:CredentialProvider", "iot:Jobs"]


@pytest.mark.parametrize("endpoint_type", ENDPOINT_TYPES)
def test_describe_endpoint_answers_the_emulator_mqtt_host(live: Live, endpoint_type: str
                                                          ) -> None:
    # spec broker §5.3 DescribeEndpoint: every documented type answers a host; here the
    # emulator's MQTT host, the same on every call
    iot = live.iot
    answer = iot.describe_endpoint(endpointType=endpoint_type)
    assert_members(iot, "DescribeEndpoint", answer)
    assert answer["endpointAddress"] == live.embedded.info.mqtt_server_name
    assert iot.describe_endpoint(endpointType=endpoint_type)["endpointAddress"] == \
        answer["endpointAddress"]


def test_describe_endpoint_without_a_type_answers_the_same_host(live: Live) -> None:
    # spec broker §5.3 (UNCONFIRMED: an omitted endpointType answers the legacy iot:Data host)
    iot = live.iot
    assert iot.describe_endpoint()["endpointAddress"] == \
        iot.describe_endpoint(endpointType="iot:Data")["endpointAddress"]


def test_an_unknown_endpoint_type_is_refused(live: Live) -> None:
    # spec broker §5.3 (UNCONFIRMED: unknown value → InvalidRequestException)
    iot = live.iot
    with unchanged(live), aws_error(iot, "InvalidRequestException", match="iot:Nope"):
        iot.describe_endpoint(endpointType="iot:Nope")


def test_the_ats_endpoint_host_completes_mutual_tls_with_the_broker(live: Live,
                                                                    tmp_path: Path) -> None:
    # spec broker §5.3: the answered host resolves to the emulator and its server
    # certificate verifies for that name (SNI and host-name check, §1.2)
    iot = live.iot
    host = iot.describe_endpoint(endpointType="iot:Data-ATS")["endpointAddress"]
    created = iot.create_keys_and_certificate(setAsActive=True)
    pki.write_public(tmp_path / "device.pem", created["certificatePem"])
    pki.write_secret(tmp_path / "device.key", created["keyPair"]["PrivateKey"])
    context = ssl.create_default_context(cafile=live.embedded.info.ca_file)
    context.load_cert_chain(tmp_path / "device.pem", tmp_path / "device.key")
    port = live.embedded.info.mqtt_port
    with socket.create_connection((host, port), timeout=10) as raw, \
            context.wrap_socket(raw, server_hostname=host) as tls:
        assert tls.version() in ("TLSv1.2", "TLSv1.3")
        peer = tls.getpeercert()
    assert peer is not None and ("DNS", host) in peer.get("subjectAltName", ())
