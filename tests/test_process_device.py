"""ProcessDevice: templated command lines, captured logs, timeouts, log patterns, fault
points, and the reference virtual device run as a separate program against the emulator."""

from __future__ import annotations

import time
from collections.abc import Callable
from pathlib import Path

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from devices.base import (
    ClaimCredentials,
    DeviceConfigError,
    DeviceInputs,
    EndpointParams,
    FaultPoint,
    Step,
    create_device,
)
from devices.placeholders import PlaceholderError, Template, Values
from harness import pki
from harness import protocol as fp
from harness.observer import StepKind
from tests.device_kit import disabled_fleet_fixture, run_inputs

EXAMPLE = Path(__file__).resolve().parents[1] / "examples" / "process-device" / "device.yaml"


# --------------------------------------------------------------------------- helpers


@pytest.fixture
def offline_inputs(tmp_path: Path) -> DeviceInputs:
    """Inputs for runs that never reach an endpoint (real files, a made-up endpoint)."""
    key = pki.generate_ec_key()
    key_path, cert_path = tmp_path / "claim.key", tmp_path / "claim.pem"
    pki.write_secret(key_path, pki.private_key_pem(key))
    pki.write_public(cert_path, pki.certificate_pem(pki.self_signed_certificate(key, "claim")))
    ca = tmp_path / "ca.pem"
    ca.write_text("ca")
    return DeviceInputs(
        endpoint=EndpointParams("127.0.0.1", 8883, ca, "localhost"),
        claim=ClaimCredentials(cert_path, key_path, "0" * 64), template_name="tmpl",
        parameters={"Region": "eu"}, serial="SN1", workdir=tmp_path / "dev", timeout_s=20)


def alive(pid: int) -> bool:
    try:
        state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    except (FileNotFoundError, IndexError):
        return False
    return state != "Z"


def wait_until(predicate: Callable[[], bool], timeout: float = 5.0) -> bool:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if predicate():
            return True
        time.sleep(0.05)
    return predicate()


disabled_fleet = disabled_fleet_fixture("-pd")


# --------------------------------------------------------------------------- placeholders


def test_templates_fill_the_run_inputs(offline_inputs, tmp_path):
    values = Values.from_inputs(offline_inputs, workdir=tmp_path)
    text = "{endpoint}:{port} {server_name} {template} {serial} {client_id} {param:Region} " \
           "{flow}/{cert}/{format}/{mqtt} {{literal}}"
    assert Template(text).render(values) == \
        "127.0.0.1:8883 localhost tmpl SN1 SN1-claim eu claim/keys/json/3 {literal}"
    assert Template("{claim_key}").render(values) == str(offline_inputs.claim.key_path)


def test_claim_key_content_is_redacted_wherever_it_is_shown(offline_inputs, tmp_path):
    values = Values.from_inputs(offline_inputs, workdir=tmp_path)
    template = Template("set claim-key {claim_key:b64}")
    assert template.secret
    assert template.render_redacted(values) == "set claim-key <redacted>"
    assert template.render(values) != template.render_redacted(values)
    assert template.render(values).split()[-1] in values.secrets()


def test_a_placeholder_the_run_lacks_is_named():
    values = Values.only(board="b1")
    with pytest.raises(PlaceholderError, match=r"\{param:Region\}.*no parameter 'Region'"):
        Template("{param:Region}").render(Values({}, {}, {"Other": "x"}))
    with pytest.raises(PlaceholderError, match=r"\{serial\} has no value"):
        Template("{serial}").render(Values({"serial": None}, {}, {}))
    assert Template("{board}", {"board": ""}).render(values) == "b1"


@pytest.mark.parametrize("text, problem", [
    ("{endpiont}", "unknown placeholder {endpiont}"),
    ("{param}", "needs a name"),
    ("{serial:b64}", "takes no ':' form"),
    ("{claim_key:hex}", "must be one of b64, text"),
    ("unclosed {", "unmatched"),
])
def test_malformed_templates_are_refused_with_the_reason(text, problem):
    with pytest.raises(PlaceholderError) as info:
        Template(text, where="device.yaml: command[3]")
    assert problem in str(info.value) and str(info.value).startswith("device.yaml: command[3]")


@settings(max_examples=60, deadline=None)
@given(st.text(max_size=40))
def test_escaped_braces_render_any_text_unchanged(text):
    escaped = text.replace("{", "{{").replace("}", "}}")
    assert Template(escaped).render(Values({}, {}, {})) == text


# --------------------------------------------------------------------------- configuration


def test_an_unknown_placeholder_fails_when_the_device_is_made():
    with pytest.raises(PlaceholderError, match=r"command\[1\].*\{endpiont\}"):
        create_device("process", command=["echo", "{endpiont}"])


def test_a_malformed_config_file_names_the_file_and_line(tmp_path):
    config = tmp_path / "device.yaml"
    config.write_text("command: [echo, hi]\nresult: sometimes\n")
    with pytest.raises(DeviceConfigError, match=r"device\.yaml:2: result: expected one of"):
        create_device("process", config_file=config)
    config.write_text("command: [echo, '{nope}']\n")
    with pytest.raises(DeviceConfigError, match=r"device\.yaml.*\{nope\}"):
        create_device("process", config_file=config)


def test_config_file_and_inline_options_do_not_mix():
    with pytest.raises(DeviceConfigError, match="either config_file or the options"):
        create_device("process", config_file=EXAMPLE, command=["true"])


def test_the_example_configuration_runs_virtual_main():
    device = create_device("process", config_file=EXAMPLE)
    assert set(device.fault_points) == set(FaultPoint)  # through virtual_main's --cut-at


# --------------------------------------------------------------------------- running


def test_a_placeholder_the_run_cannot_fill_fails_before_the_program_starts(offline_inputs):
    device = create_device("process", command="touch {workdir}/started; echo {param:Missing}")
    with pytest.raises(PlaceholderError, match="Missing"):
        device.provision(offline_inputs)
    assert offline_inputs.workdir is not None
    assert not (offline_inputs.workdir / "started").exists()


def test_output_is_captured_with_timestamps_and_the_claim_key_scrubbed(offline_inputs):
    device = create_device("process", result="exit-code", command=(
        "echo to-stdout; echo to-stderr >&2; cat {claim_key}; echo {claim_key:b64}"))
    result = device.provision(offline_inputs)
    assert result.ok and result.kind == "process"
    log = result.log_path.read_text()
    assert "stdout | to-stdout" in log and "stderr | to-stderr" in log
    assert "<redacted>" in log
    key_body = [line for line in offline_inputs.claim.key_path.read_text().splitlines()
                if not line.startswith("-----")]
    assert not any(line in log for line in key_body)
    assert "+" in log.splitlines()[1][:12]  # every line carries its arrival time


def test_a_timeout_kills_the_whole_process_group(offline_inputs):
    device = create_device("process", result="exit-code", timeout_s=1.0, kill_grace_s=0.5,
                           command="sleep 30 & echo $! > {workdir}/child.pid; sleep 30")
    started = time.monotonic()
    result = device.provision(offline_inputs)
    assert time.monotonic() - started < 10
    assert not result.ok and "timeout after 1s" in (result.failure or "")
    child = int((offline_inputs.workdir / "child.pid").read_text())
    assert wait_until(lambda: not alive(child)), "the program's child survived the timeout"


def test_log_patterns_give_the_facts_and_aws_error_of_a_foreign_program(offline_inputs):
    cert = "ab" * 32
    device = create_device(
        "process", result="exit-code",
        command=f"echo 'claim up'; echo 'got cert {cert}'; "
                "echo 'rejected 400 InvalidRequest Template tmpl is disabled.'; exit 1",
        milestones={"connect_claim": r"claim up",
                    "create_certificate": r"got cert (?P<certificate_id>[0-9a-f]{64})"},
        failures={"rejected": r"rejected (?P<status_code>\d+) (?P<error_code>\S+) "
                              r"(?P<error_message>.*)$"})
    result = device.provision(offline_inputs)
    assert not result.ok
    assert result.certificate_id == cert
    assert result.error == fp.ErrorResponse(400, "InvalidRequest", "Template tmpl is disabled.")
    assert [s.name for s in result.steps] == ["connect_claim", "create_certificate", "rejected"]
    assert result.steps[-1].error_code == "InvalidRequest"


def test_an_armed_fault_point_pattern_cuts_the_program(offline_inputs):
    device = create_device("process", result="exit-code",
                           command="echo 'claim connection up'; sleep 30; echo never",
                           fault_points={"after_connect": r"claim connection up"})
    assert device.fault_points == (FaultPoint.AFTER_CONNECT,)
    with pytest.raises(DeviceConfigError, match="cannot be cut at after_register"):
        device.cut_at("after_register")
    device.cut_at("after_connect")
    started = time.monotonic()
    result = device.provision(offline_inputs)
    assert time.monotonic() - started < 10
    assert result.stopped_at == "after_connect" and "power cut" in (result.failure or "")
    assert "stdout | never" not in result.log_path.read_text()


# --------------------------------------------------------------------------- against the endpoint


def test_the_example_program_provisions_by_claim(endpoint, fleet, claim, endpoint_params,
                                                observer, tmp_path):
    # spec fleet §1.2 (CreateKeysAndCertificate), §1.4 (RegisterThing), §2.3 (by claim)
    device = create_device("process", config_file=EXAMPLE)
    inputs = run_inputs(fleet, endpoint_params, claim, tmp_path)
    mark = observer.mark()
    result = device.provision(inputs)
    assert result.ok, result.to_json()
    assert result.kind == "process" and result.thing_name == fleet.thing_name(inputs.serial)
    assert {s.name for s in result.steps} >= {Step.REGISTER_THING.value,
                                               Step.CONNECT_DEVICE.value}
    trace = observer.trace(client_id=inputs.client_id, since=mark)
    trace.assert_provisioned()
    assert trace.thing_name == result.thing_name
    described = endpoint.iot.describe_certificate(certificateId=trace.certificate_id)
    assert described["certificateDescription"]["status"] == "ACTIVE"
    assert "event=step name=register_thing ok=true" in result.log_path.read_text()


def test_the_default_program_provisions_by_trusted_user_with_a_csr_in_cbor(
        fleet, trusted_user, endpoint_params, observer, tmp_path):
    # spec fleet §2.2 (temporary claim), §1.3 (CreateCertificateFromCsr), §7 (CBOR)
    device = create_device("process")
    inputs = run_inputs(fleet, endpoint_params, trusted_user.claim(), tmp_path,
                        cert_api="csr", payload_format="cbor", mqtt_version=5)
    mark = observer.mark()
    result = device.provision(inputs)
    assert result.ok, result.to_json()
    trace = observer.trace(client_id=inputs.client_id, since=mark)
    trace.assert_provisioned()
    created = trace.first(StepKind.CERTIFICATE_CREATED)
    assert created is not None and created.api == fp.Api.CREATE_CERTIFICATE_FROM_CSR.value


def test_a_rejected_registration_is_reported_with_aws_error_code_and_the_log(
        disabled_fleet, endpoint_params, observer, tmp_path):
    # spec fleet §1.5: the rejected payload's statusCode/errorCode/errorMessage
    device = create_device("process", config_file=EXAMPLE)
    inputs = run_inputs(disabled_fleet, endpoint_params, disabled_fleet.create_claim(),
                        tmp_path)
    mark = observer.mark()
    result = device.provision(inputs)
    assert not result.ok and result.error is not None
    assert result.error.status_code == fp.TEMPLATE_DISABLED_STATUS
    assert result.error.error_code == fp.INVALID_REQUEST_CODE
    assert result.log_path is not None and fp.INVALID_REQUEST_CODE in result.log_path.read_text()
    trace = observer.trace(client_id=inputs.client_id, since=mark, until=StepKind.REJECTED)
    assert trace.rejections and trace.rejections[-1].error_code == fp.INVALID_REQUEST_CODE


def test_a_program_cut_at_a_fault_point_recovers_on_its_next_boot(
        endpoint, fleet, claim, endpoint_params, observer, clock, tmp_path):
    # issue 10; spec fleet §1.6: the stored ownership token finishes the registration
    device = create_device("process", config_file=EXAMPLE)
    inputs = run_inputs(fleet, endpoint_params, claim, tmp_path)
    mark = observer.mark()
    device.cut_at(FaultPoint.AFTER_CREDENTIALS_SAVED)
    cut = device.provision(inputs)
    assert not cut.ok and cut.stopped_at is not None
    saved = cut.step(Step.CREATE_CERTIFICATE)
    assert saved is not None and saved.ok
    clock.advance(1.5)  # a reboot takes time: AWS allows one CONNECT per client id per second
    rebooted = device.provision(inputs)
    assert rebooted.ok, rebooted.to_json()
    assert rebooted.certificate_id == saved.detail["certificate_id"]
    trace = observer.trace(client_id=inputs.client_id, since=mark)
    trace.assert_provisioned()
    assert len(trace.of(StepKind.CERTIFICATE_CREATED)) == 1  # provisioned exactly once
    assert endpoint.iot.describe_thing(thingName=rebooted.thing_name)["thingName"]
