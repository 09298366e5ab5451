"""SdkDevice: the flows through the AWS IoT Device SDK v2's identity clients (MQTT 3.1.1
``IotIdentityClient`` and MQTT 5 ``IotIdentityClientV2``) against the emulator."""

from __future__ import annotations

import pytest

from devices.base import (
    DeviceConfigError,
    FaultPoint,
    Step,
    create_device,
)
from harness import protocol as fp
from harness.observer import StepKind
from tests.device_kit import disabled_fleet_fixture, run_inputs

pytest.importorskip("awsiot", reason="the sdk device needs awsiotsdk (fleetbench[sdk])")


disabled_fleet = disabled_fleet_fixture("-sd")


def test_the_sdk_device_refuses_cbor_because_the_sdk_speaks_json_only(
        fleet, claim, endpoint_params, tmp_path):
    # spec fleet §1.1: the SDK's identity clients publish on the .../json topics only
    device = create_device("sdk")
    with pytest.raises(DeviceConfigError, match="JSON only"):
        device.provision(run_inputs(fleet, endpoint_params, claim, tmp_path,
                                    payload_format="cbor"))


def test_sdk_options_are_checked_when_the_device_is_made():
    with pytest.raises(DeviceConfigError, match="key_type"):
        create_device("sdk", key_type="dsa-512")


@pytest.mark.parametrize("mqtt, cert_api", [(3, "keys"), (5, "csr")], ids=["mqtt3-keys",
                                                                           "mqtt5-csr"])
def test_the_sdk_provisions_by_claim(endpoint, fleet, claim, endpoint_params, observer,
                                     tmp_path, mqtt, cert_api):
    # spec fleet §1.2/§1.3 (certificate), §1.4 (RegisterThing), §2.3 (by claim)
    device = create_device("sdk")
    inputs = run_inputs(fleet, endpoint_params, claim, tmp_path, mqtt_version=mqtt,
                        cert_api=cert_api)
    mark = observer.mark()
    result = device.provision(inputs)
    assert result.ok, result.to_json()
    assert result.kind == "sdk" and result.thing_name == fleet.thing_name(inputs.serial)
    names = [s.name for s in result.steps]
    if mqtt == 3:  # the classic client subscribes as its own step; V2 does it per request
        assert Step.SUBSCRIBE_CERTIFICATE.value in names
    assert Step.PUBLISH_TELEMETRY.value in names
    trace = observer.trace(client_id=inputs.client_id, since=mark)
    trace.assert_provisioned()
    assert trace.certificate_id == result.certificate_id
    described = endpoint.iot.describe_certificate(certificateId=result.certificate_id)
    assert described["certificateDescription"]["status"] == "ACTIVE"


@pytest.mark.parametrize("mqtt", [3, 5], ids=["mqtt3", "mqtt5"])
def test_the_sdk_provisions_by_trusted_user(fleet, trusted_user, endpoint_params, observer,
                                            tmp_path, mqtt):
    # spec fleet §2.2: the temporary claim from CreateProvisioningClaim runs the same calls
    device = create_device("sdk")
    inputs = run_inputs(fleet, endpoint_params, trusted_user.claim(), tmp_path,
                        mqtt_version=mqtt)
    mark = observer.mark()
    result = device.provision(inputs)
    assert result.ok, result.to_json()
    observer.trace(client_id=inputs.client_id, since=mark).assert_provisioned()


@pytest.mark.parametrize("mqtt", [3, 5], ids=["mqtt3", "mqtt5"])
def test_a_rejected_registration_is_reported_with_aws_error_code_and_the_log(
        disabled_fleet, endpoint_params, observer, tmp_path, mqtt):
    # spec fleet §1.5: statusCode/errorCode/errorMessage of the rejected payload
    device = create_device("sdk")
    inputs = run_inputs(disabled_fleet, endpoint_params, disabled_fleet.create_claim(),
                        tmp_path, mqtt_version=mqtt)
    mark = observer.mark()
    result = device.provision(inputs)
    assert not result.ok and result.error is not None
    assert result.error.status_code == fp.TEMPLATE_DISABLED_STATUS
    assert result.error.error_code == fp.INVALID_REQUEST_CODE
    assert result.error.error_message
    register = result.step(Step.REGISTER_THING)
    assert register is not None and register.error_code == fp.INVALID_REQUEST_CODE
    assert result.log_path is not None
    assert f"error={fp.INVALID_REQUEST_CODE}" in result.log_path.read_text()
    trace = observer.trace(client_id=inputs.client_id, since=mark, until=StepKind.REJECTED)
    assert trace.rejections[-1].error_code == fp.INVALID_REQUEST_CODE


def test_an_sdk_device_cut_after_saving_credentials_finishes_on_its_next_boot(
        endpoint, fleet, claim, endpoint_params, observer, clock, tmp_path):
    # issue 10; spec fleet §1.6: RegisterThing with the token kept in flash
    device = create_device("sdk")
    assert set(device.fault_points) == set(FaultPoint)
    inputs = run_inputs(fleet, endpoint_params, claim, tmp_path, mqtt_version=5)
    mark = observer.mark()
    device.cut_at("after_credentials_saved")
    cut = device.provision(inputs)
    assert not cut.ok and cut.stopped_at == "after_credentials_saved"
    assert cut.step(Step.REGISTER_THING) is None
    clock.advance(1.5)  # a reboot takes time: AWS allows one CONNECT per client id per second
    rebooted = device.provision(inputs)
    assert rebooted.ok, rebooted.to_json()
    resume = rebooted.step(Step.RESUME)
    assert resume is not None and resume.detail["action"] == "finish"
    assert rebooted.certificate_id == cut.certificate_id
    trace = observer.trace(client_id=inputs.client_id, since=mark)
    trace.assert_provisioned()
    assert len(trace.of(StepKind.CERTIFICATE_CREATED)) == 1
    clock.advance(1.5)
    again = device.provision(inputs)  # registered: a boot only reconnects
    assert again.ok and again.step(Step.CONNECT_CLAIM) is None
    assert again.thing_name == rebooted.thing_name
