"""The device interface: inputs, results, capabilities and the kind registry.

No network here; the flows themselves are in test_virtual_device.py.
"""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path
from typing import Any, ClassVar

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from devices import base
from devices.base import (
    FAULT_POINT_AFTER,
    CertApi,
    ClaimCredentials,
    Console,
    DeviceConfigError,
    DeviceInputs,
    DeviceResult,
    EndpointParams,
    ErrorResponse,
    FaultPoint,
    FaultPoints,
    Flow,
    MqttVersion,
    Power,
    Provisioner,
    Step,
    StepRecord,
    create_device,
    missing_capability,
    register_device_kind,
)
from harness import pki
from harness.endpoint_info import EndpointInfo
from harness.protocol import PayloadFormat


@pytest.fixture
def claim_files(tmp_path: Path) -> tuple[Path, Path]:
    key = pki.generate_ec_key()
    ca = pki.CertificateAuthority.create()
    cert = ca.issue_device_certificate(key.public_key())
    cert_path, key_path = tmp_path / "claim.pem", tmp_path / "claim.key"
    pki.write_public(cert_path, pki.certificate_pem(cert))
    pki.write_secret(key_path, pki.private_key_pem(key))
    return cert_path, key_path


@pytest.fixture
def endpoint(tmp_path: Path) -> EndpointParams:
    return EndpointParams("127.0.0.1", 8883, tmp_path / "ca.pem", "localhost")


def make_inputs(endpoint: EndpointParams, claim: ClaimCredentials, **kw: Any) -> DeviceInputs:
    return DeviceInputs(endpoint=endpoint, claim=claim, template_name="tmpl", **kw)


# --------------------------------------------------------------------------- inputs


def test_claim_credentials_from_files_compute_aws_certificate_id(claim_files):
    # spec broker §2.1: the certificate id is the SHA-256 of the DER
    cert_path, key_path = claim_files
    claim = ClaimCredentials.from_files(cert_path, key_path)
    assert claim.certificate_id == pki.certificate_id(cert_path.read_text())
    assert len(claim.certificate_id) == 64
    assert not claim.temporary and claim.expiration is None


def test_claim_credentials_from_a_missing_file_is_a_config_error(tmp_path):
    with pytest.raises(DeviceConfigError, match="not a readable PEM certificate"):
        ClaimCredentials.from_files(tmp_path / "nope.pem", tmp_path / "nope.key")


def test_device_inputs_accept_the_strings_users_type(endpoint, claim_files):
    claim = ClaimCredentials.from_files(*claim_files, temporary=True, expiration=1.0)
    inputs = make_inputs(endpoint, claim, flow="trusted-user", cert_api="csr",
                         payload_format="cbor", mqtt_version="5", workdir="/tmp/x",
                         parameters={"SerialNumber": "1"})
    assert inputs.flow is Flow.TRUSTED_USER
    assert inputs.cert_api is CertApi.CSR
    assert inputs.payload_format is PayloadFormat.CBOR
    assert inputs.mqtt_version is MqttVersion.V5
    assert inputs.workdir == Path("/tmp/x")
    with pytest.raises(TypeError):
        inputs.parameters["x"] = "y"  # type: ignore[index]


@pytest.mark.parametrize("field,value,message", [
    ("flow", "by-magic", "flow must be one of"),
    ("cert_api", "pkcs12", "cert_api must be one of"),
    ("payload_format", "xml", "payload_format must be one of"),
    ("mqtt_version", 4, "mqtt_version must be one of"),
    ("parameters", {"SerialNumber": 7}, "must map strings to strings"),
    ("timeout_s", 0, "timeout_s must be positive"),
])
def test_device_inputs_refuse_bad_values_with_a_clear_message(endpoint, claim_files, field,
                                                               value, message):
    claim = ClaimCredentials.from_files(*claim_files)
    with pytest.raises(DeviceConfigError, match=message):
        make_inputs(endpoint, claim, **{field: value})


def test_trusted_user_flow_needs_a_temporary_claim(endpoint, claim_files):
    # spec fleet §2.2: the trusted-user flow runs on a temporary claim
    permanent = ClaimCredentials.from_files(*claim_files)
    with pytest.raises(DeviceConfigError, match="temporary"):
        make_inputs(endpoint, permanent, flow="trusted-user")
    temporary = dataclasses.replace(permanent, temporary=True)
    with pytest.raises(DeviceConfigError, match="permanent"):
        make_inputs(endpoint, temporary, flow="claim")


def test_device_id_prefers_the_serial(endpoint, claim_files):
    claim = ClaimCredentials.from_files(*claim_files)
    assert make_inputs(endpoint, claim, serial="SN1", client_id="c").device_id == "SN1"
    assert make_inputs(endpoint, claim, client_id="c").device_id == "c"


def test_endpoint_params_come_from_endpoint_json(tmp_path):
    info = EndpointInfo(mqtt_host="127.0.0.1", mqtt_port=18883, api_url="http://x",
                        ca_file=str(tmp_path / "ca.pem"), region="us-east-1",
                        account_id="123456789012", data_dir=str(tmp_path))
    info.write(tmp_path / "endpoint.json")
    params = EndpointParams.from_file(tmp_path / "endpoint.json")
    assert (params.host, params.port, params.ca_file) == ("127.0.0.1", 18883,
                                                          tmp_path / "ca.pem")
    assert params.tls_name == "localhost"  # the emulator's certificate name (spec broker §1.2)


@pytest.mark.parametrize("port", [0, 70000])
def test_endpoint_params_refuse_impossible_ports(tmp_path, port):
    with pytest.raises(DeviceConfigError, match="port"):
        EndpointParams("127.0.0.1", port, tmp_path / "ca.pem")


# --------------------------------------------------------------------------- results

text = st.text(min_size=0, max_size=12)
step_records = st.builds(
    StepRecord, name=st.sampled_from([s.value for s in Step]),
    started_at=st.floats(0, 2e9), duration=st.floats(0, 100), ok=st.booleans(),
    detail=st.dictionaries(text, text, max_size=3),
    error_code=st.none() | st.sampled_from(["Timeout", "InvalidCsr"]))
results = st.builds(
    DeviceResult, ok=st.booleans(), device_id=text, kind=st.sampled_from(["virtual", "sdk"]),
    thing_name=st.none() | text, certificate_id=st.none() | text,
    device_configuration=st.dictionaries(text, text, max_size=3),
    error=st.none() | st.builds(ErrorResponse, st.integers(0, 599), text, text),
    failure=st.none() | text, stopped_at=st.none() | st.sampled_from([s.value for s in Step]),
    steps=st.lists(step_records, max_size=4).map(tuple),
    log_path=st.none() | st.just(Path("/tmp/device.log")),
    credentials_dir=st.none() | st.just(Path("/tmp/dev")))


@settings(max_examples=50, deadline=None)
@given(results)
def test_device_result_survives_its_json_form(result):
    # the form a device program prints and ProcessDevice parses back
    assert DeviceResult.from_dict(json.loads(result.to_json())) == result


def test_device_result_error_keeps_aws_field_names():
    # spec fleet §1.5: the rejected payload's names stay AWS's
    result = DeviceResult(ok=False, device_id="d", kind="virtual",
                          error=ErrorResponse(404, "ResourceNotFound", "Template x does not "
                                              "exist."))
    assert result.to_dict()["error"] == {"statusCode": 404, "errorCode": "ResourceNotFound",
                                         "errorMessage": "Template x does not exist."}


@pytest.mark.parametrize("data", [{}, {"ok": True}, {"ok": True, "device_id": "d",
                                                     "kind": "k", "steps": [{"name": 1}]}])
def test_a_malformed_device_result_is_a_config_error(data):
    with pytest.raises(DeviceConfigError, match="not a device result"):
        DeviceResult.from_dict(data)


def test_result_step_finds_the_last_record_of_a_step():
    first = StepRecord("register_thing", 1.0, 0.1, True)
    second = StepRecord("register_thing", 2.0, 0.1, False, error_code="X")
    result = DeviceResult(ok=False, device_id="d", kind="virtual", steps=(first, second))
    assert result.step(Step.REGISTER_THING) == second
    assert result.step("connect_claim") is None


def test_every_fault_point_names_the_step_it_follows():
    # issue 10: named fault points on the flow
    assert set(FAULT_POINT_AFTER) == set(FaultPoint)
    assert FAULT_POINT_AFTER[FaultPoint.AFTER_CERTIFICATE] is Step.CREATE_CERTIFICATE
    assert FAULT_POINT_AFTER[FaultPoint.AFTER_REGISTER] is Step.REGISTER_THING


# --------------------------------------------------------------------------- registry


def test_create_device_builds_a_registered_kind_from_keyword_options():
    device = create_device("virtual", key_type="rsa-2048", rng_seed=3)
    assert type(device).__name__ == "VirtualDevice"
    assert device.kind == "virtual"
    assert device.options.key_type.value == "rsa-2048"


def test_create_device_names_the_known_kinds_for_an_unknown_one():
    with pytest.raises(DeviceConfigError, match=r"unknown device kind 'toaster'.*virtual"):
        create_device("toaster")


def test_create_device_names_an_unknown_option_and_the_accepted_ones():
    with pytest.raises(DeviceConfigError, match=r"no option\(s\) colour; accepted: .*key_type"):
        create_device("virtual", colour="red")


def test_create_device_reports_a_refused_option_value():
    with pytest.raises(DeviceConfigError, match=r"'virtual': key_type must be one of"):
        create_device("virtual", key_type="dsa-512")


def test_register_device_kind_adds_a_kind_to_the_registry(monkeypatch):
    monkeypatch.setattr(base, "DEVICE_KINDS", dict(base.DEVICE_KINDS))

    @dataclasses.dataclass(frozen=True)
    class BenchOptions:
        port: str = "/dev/ttyUSB0"

    @register_device_kind("bench-test")
    class BenchDevice:
        options_type: ClassVar[type] = BenchOptions

        def __init__(self, options: BenchOptions) -> None:
            self.options = options

    device = create_device("bench-test", port="/dev/ttyACM1")
    assert isinstance(device, BenchDevice)
    assert device.options.port == "/dev/ttyACM1"
    assert base.option_names("bench-test") == ("port",)


def test_register_device_kind_needs_an_options_dataclass():
    with pytest.raises(TypeError, match="options_type"):
        @register_device_kind("broken")
        class Broken:
            pass


def test_capabilities_of_the_virtual_device_and_skip_reasons():
    device = create_device("virtual")
    for capability in (Provisioner, Power, FaultPoints):
        assert missing_capability(device, capability) is None
    assert missing_capability(device, Console) == \
        "device kind 'virtual' has no Console capability"
