"""Endpoints: LocalEndpoint (subprocess and in-process) and AwsEndpoint's discovery.

The AWS code path is exercised twice without an account: against moto (DescribeEndpoint,
STS, Amazon's root CAs) and against the emulator through the same boto3 calls, where only
the discovery inputs (control-plane URL, CA file, port) are supplied.
"""

from __future__ import annotations

import json
import socket
import ssl
import threading
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import boto3
import paho.mqtt.client as mqtt
import pytest
from moto import mock_aws
from paho.mqtt.enums import CallbackAPIVersion

from harness.endpoints.aws import AMAZON_ROOT_COMMON_NAMES, AwsEndpoint, amazon_root_ca_bundle
from harness.endpoints.base import Endpoint, EndpointError, EndpointKind
from harness.endpoints.local import EmulatorMode, LocalEndpoint, wait_for_endpoint_file
from harness.fleet import Fleet, FleetSpec

REGION = "us-east-1"


@pytest.fixture(scope="module")
def in_process() -> Iterator[LocalEndpoint]:
    endpoint = LocalEndpoint.start(mode="in-process")
    yield endpoint
    endpoint.close()


def connect_device(endpoint: Endpoint, client_id: str, timeout: float = 10.0) -> mqtt.Client:
    """A device connecting with a fresh certificate allowed to connect; CONNACK awaited."""
    iot = endpoint.iot
    policy = f"{client_id}-connect"
    iot.create_policy(policyName=policy, policyDocument=json.dumps({
        "Version": "2012-10-17",
        "Statement": [{"Effect": "Allow", "Action": "iot:Connect", "Resource": "*"}]}))
    made = iot.create_keys_and_certificate(setAsActive=True)
    iot.attach_policy(policyName=policy, target=made["certificateArn"])
    workdir = Path(endpoint.ca_file).parent
    cert, key = workdir / f"{client_id}.pem", workdir / f"{client_id}.key"
    cert.write_text(made["certificatePem"])
    key.write_text(made["keyPair"]["PrivateKey"])
    context = ssl.create_default_context(cafile=str(endpoint.ca_file))
    context.load_cert_chain(str(cert), str(key))
    connected = threading.Event()
    client = mqtt.Client(CallbackAPIVersion.VERSION2, client_id=client_id)
    client.tls_set_context(context)
    client.on_connect = lambda *_args: connected.set()
    client.connect(endpoint.mqtt_host, endpoint.mqtt_port)
    client.loop_start()
    assert connected.wait(timeout), "no CONNACK"
    return client


def test_in_process_endpoint_serves_boto3_on_a_free_port(in_process: LocalEndpoint) -> None:
    assert in_process.kind is EndpointKind.LOCAL
    assert in_process.mode is EmulatorMode.IN_PROCESS
    assert in_process.supports_emulator_extensions
    assert in_process.mqtt_port not in (0, 8883)
    # spec broker §5.3: DescribeEndpoint names the host the server certificate carries
    address = in_process.iot.describe_endpoint(endpointType="iot:Data-ATS")["endpointAddress"]
    assert address == in_process.mqtt_server_name
    assert (in_process.region, in_process.account_id) == ("us-east-1", "123456789012")


def test_clock_moves_the_emulators_clock_through_the_admin_api(in_process: LocalEndpoint) -> None:
    clock = in_process.clock
    before = clock.now()
    after = clock.advance(120)
    assert after - before >= 120
    assert clock.now() >= after


def test_two_local_endpoints_do_not_share_an_account(in_process: LocalEndpoint) -> None:
    # each xdist worker gets its own emulator: nothing leaks between them
    with LocalEndpoint.start(mode="in-process") as other:
        other.iot.create_thing(thingName="only-in-other")
        assert other.mqtt_port != in_process.mqtt_port
        names = [t["thingName"] for t in in_process.iot.list_things()["things"]]
        assert "only-in-other" not in names


def test_subprocess_endpoint_accepts_a_device_and_stops_on_close(tmp_path: Path) -> None:
    endpoint = LocalEndpoint.start()
    try:
        assert endpoint.mode is EmulatorMode.SUBPROCESS
        assert endpoint.process is not None and endpoint.is_running()
        # the CA bundle, host, port and server name are what a device needs (spec broker §1.2)
        client = connect_device(endpoint, "subprocess-device")
        client.disconnect()
        client.loop_stop()
    finally:
        endpoint.close()
    assert endpoint.process.returncode is not None
    assert not endpoint.data_dir.exists()
    with pytest.raises(OSError):
        socket.create_connection((endpoint.mqtt_host, endpoint.mqtt_port), timeout=2).close()


def test_subprocess_that_cannot_start_reports_its_stderr() -> None:
    with pytest.raises(EndpointError) as err:
        LocalEndpoint.start(extra_args=["--hook", "not-a-mapping"])
    assert "exited with status 2" in str(err.value)
    assert "--hook expects ARN=TARGET" in str(err.value)


def test_waiting_for_endpoint_json_gives_up_with_a_clear_error(tmp_path: Path) -> None:
    with pytest.raises(EndpointError, match="did not write"):
        wait_for_endpoint_file(tmp_path / "endpoint.json", None, timeout=0.2)


# --------------------------------------------------------------------------- AWS


def test_amazon_root_cas_come_from_certifi(tmp_path: Path) -> None:
    bundle = amazon_root_ca_bundle(tmp_path / "roots.pem")
    context = ssl.create_default_context(cafile=str(bundle))  # usable as a trust store
    cas: list[Any] = context.get_ca_certs()
    names = {value for ca in cas for rdn in ca["subject"] for key, value in rdn
             if key == "commonName"}
    assert names == set(AMAZON_ROOT_COMMON_NAMES)


@pytest.fixture
def moto_aws(monkeypatch: pytest.MonkeyPatch) -> Iterator[None]:
    for name in ("AWS_PROFILE", "AWS_DEFAULT_PROFILE"):
        monkeypatch.delenv(name, raising=False)
    monkeypatch.setenv("AWS_ACCESS_KEY_ID", "testing")
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", "testing")
    with mock_aws():
        yield


def test_aws_endpoint_discovers_the_ats_endpoint_account_and_roots(moto_aws: None) -> None:
    with AwsEndpoint.from_profile(region=REGION, prefix="fb-test") as endpoint:
        assert endpoint.kind is EndpointKind.AWS
        assert not endpoint.supports_emulator_extensions
        assert endpoint.clock is None
        # spec broker §5.3: iot:Data-ATS is <prefix>-ats.iot.<region>.amazonaws.com
        assert endpoint.mqtt_host.endswith(f"-ats.iot.{REGION}.amazonaws.com")
        assert endpoint.mqtt_server_name == endpoint.mqtt_host
        assert endpoint.mqtt_port == 8883
        assert endpoint.account_id == boto3.client("sts").get_caller_identity()["Account"]
        assert Path(endpoint.ca_file).read_text().count("BEGIN CERTIFICATE") == \
            len(AMAZON_ROOT_COMMON_NAMES)
        workdir = endpoint.workdir
    assert not workdir.exists()


def test_aws_endpoint_without_a_region_is_refused(monkeypatch: pytest.MonkeyPatch,
                                                 tmp_path: Path) -> None:
    for name in ("AWS_REGION", "AWS_DEFAULT_REGION", "AWS_PROFILE"):
        monkeypatch.delenv(name, raising=False)
    monkeypatch.setenv("AWS_CONFIG_FILE", str(tmp_path / "none"))
    with pytest.raises(EndpointError, match="no AWS region"):
        AwsEndpoint(boto3.Session(aws_access_key_id="a", aws_secret_access_key="b"))


@pytest.fixture
def aws_over_emulator(in_process: LocalEndpoint) -> Iterator[AwsEndpoint]:
    """The AWS code path pointed at the emulator: only discovery inputs are given."""
    session = boto3.Session(aws_access_key_id="fleetbench", aws_secret_access_key="x",
                            region_name=in_process.region)
    endpoint = AwsEndpoint(session, prefix="fb-awsemu", iot_endpoint_url=in_process.api_url,
                           ca_file=in_process.ca_file, mqtt_port=in_process.mqtt_port,
                           account_id=in_process.account_id)
    yield endpoint
    endpoint.close()


def test_aws_code_path_sets_up_and_tears_down_a_fleet_on_the_emulator(
        aws_over_emulator: AwsEndpoint, tmp_path: Path) -> None:
    endpoint = aws_over_emulator
    assert endpoint.mqtt_host == "localhost"  # found through DescribeEndpoint
    spec = FleetSpec(prefix="fb-awsemu-f", role_arn="arn:aws:iam::123456789012:role/given",
                     workdir=tmp_path)
    fleet = Fleet.for_endpoint(endpoint, spec).setup()
    claim = fleet.create_claim()
    assert endpoint.iot.describe_certificate(certificateId=claim.certificate_id)
    report = fleet.teardown()
    assert report.ok, report.summary()
