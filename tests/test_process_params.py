"""ProcessDevice passes every template parameter to its program (``param_args``).

A template may name any parameters (spec fleet §3: ``Parameters`` of the template body,
sent in RegisterThing's ``parameters``); a process device cannot know their names in
advance, so ``param_args`` are repeated once per parameter the run gives.
"""

from __future__ import annotations

import sys
from pathlib import Path

import pytest

from devices.base import ClaimCredentials, DeviceInputs, EndpointParams, create_device
from devices.placeholders import PlaceholderError
from devices.process import DEFAULT_PARAM_ARGS, load_process_options
from devices.virtual_main import build_parser, inputs_from_args
from harness import pki

EXAMPLE = Path(__file__).resolve().parents[1] / "examples" / "process-device" / "device.yaml"
PARAMETERS = {"SerialNumber": "SN1", "Color": "dark red", "Rack": "r-7;echo x"}


@pytest.fixture
def inputs(tmp_path: Path) -> DeviceInputs:
    """Inputs that never reach an endpoint: real claim files, several parameters."""
    key = pki.generate_ec_key()
    key_path, cert_path = tmp_path / "claim.key", tmp_path / "claim.pem"
    pki.write_secret(key_path, pki.private_key_pem(key))
    pki.write_public(cert_path, pki.certificate_pem(pki.self_signed_certificate(key, "claim")))
    ca = tmp_path / "ca.pem"
    ca.write_text("ca")
    workdir = tmp_path / "dev"
    workdir.mkdir()
    return DeviceInputs(
        endpoint=EndpointParams("127.0.0.1", 8883, ca, "localhost"),
        claim=ClaimCredentials(cert_path, key_path, "0" * 64), template_name="tmpl",
        parameters=PARAMETERS, serial="SN1", workdir=workdir, timeout_s=20)


def _param_pairs(argv: list[str]) -> list[str]:
    return [argv[i + 1] for i, arg in enumerate(argv) if arg == "--param"]


def test_the_default_command_passes_every_template_parameter(inputs: DeviceInputs) -> None:
    # spec fleet §3: every parameter the run gives reaches RegisterThing
    argv = create_device("process").command_line(inputs)
    assert _param_pairs(argv) == [f"{k}={v}" for k, v in PARAMETERS.items()]


def test_virtual_main_reads_back_the_parameters_the_default_command_gives(
        inputs: DeviceInputs) -> None:
    # the program's own parser is the judge of what it receives
    argv = create_device("process").command_line(inputs)
    module = argv.index("devices.virtual_main")
    parsed, _options = inputs_from_args(build_parser().parse_args(argv[module + 1:]))
    assert dict(parsed.parameters) == PARAMETERS


def test_the_example_configuration_passes_every_template_parameter(
        inputs: DeviceInputs) -> None:
    assert load_process_options(EXAMPLE).param_args == DEFAULT_PARAM_ARGS
    argv = create_device("process", config_file=EXAMPLE).command_line(inputs)
    assert _param_pairs(argv) == [f"{k}={v}" for k, v in PARAMETERS.items()]


def test_param_args_come_before_the_cut_args(inputs: DeviceInputs) -> None:
    device = create_device("process")
    device.cut_at("after_credentials_saved")
    argv = device.command_line(inputs)
    assert argv[-2:] == ["--cut-at", "after_credentials_saved"]
    assert _param_pairs(argv)


def test_a_configured_command_gets_no_param_args_unless_it_asks(inputs: DeviceInputs) -> None:
    assert create_device("process", command=["prog", "{serial}"]).command_line(inputs) == [
        "prog", "SN1"]
    asked = create_device("process", command=["prog"], param_args=["-D{name}", "{value}"])
    assert asked.command_line(inputs) == [
        "prog", "-DSerialNumber", "SN1", "-DColor", "dark red", "-DRack", "r-7;echo x"]


def test_a_shell_command_gets_each_parameter_quoted(inputs: DeviceInputs) -> None:
    device = create_device(
        "process", result="exit-code", param_args=["{name}={value}"],
        command=f"{sys.executable} -c 'import sys; print(sys.argv[1:])'")
    result = device.provision(inputs)
    assert result.ok, result.to_json()
    assert result.log_path is not None
    expected = str([f"{k}={v}" for k, v in PARAMETERS.items()])
    assert expected in result.log_path.read_text()  # one argument each, nothing run


def test_name_and_value_are_placeholders_of_param_args_only() -> None:
    with pytest.raises(PlaceholderError, match="unknown placeholder"):
        create_device("process", command=["prog", "{name}"])
    with pytest.raises(PlaceholderError, match="unknown placeholder"):
        create_device("process", command=["prog"], param_args=["{nme}"])


def test_param_args_in_a_config_file_are_checked_when_it_is_loaded(tmp_path: Path) -> None:
    config = tmp_path / "device.yaml"
    config.write_text("command: [prog]\nparam_args: [--set, '{name}:{valu}']\n")
    with pytest.raises(PlaceholderError, match=r"device\.yaml.*param_args\[1\]"):
        load_process_options(config)
