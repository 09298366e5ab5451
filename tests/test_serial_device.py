"""SerialDevice and the board simulator: the whole bench path, pyserial included, against
the emulator; the labgrid path; and devices of every kind provisioning at once."""

from __future__ import annotations

import os
import select
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

import pytest
import serial
from hypothesis import given, settings
from hypothesis import strategies as st

from devices.base import (
    DeviceConfigError,
    FaultPoint,
    create_device,
)
from devices.boards.firmware import BANNER
from devices.boards.simulator import PowerControl
from devices.transcript import Expectation, ExpectTimeout, Transcript
from harness import protocol as fp
from harness.observer import StepKind
from tests.device_kit import disabled_fleet_fixture, run_inputs

EXAMPLE_BENCH = Path(__file__).resolve().parents[1] / "devices" / "benches" / "simulator.yaml"
STARTUP_TIMEOUT_S = 20.0


# --------------------------------------------------------------------------- the simulator


@dataclass
class SimulatedBoard:
    process: subprocess.Popen[str]
    pty: str
    directory: Path


def start_board(directory: Path, log: Path) -> SimulatedBoard:
    """``python -m devices.boards.simulator --pty``, powered off, its pty read from stdout."""
    with log.open("w") as stderr:
        process = subprocess.Popen(
            [sys.executable, "-m", "devices.boards.simulator", "--pty", "--dir", str(directory),
             "--power", "off"], stdout=subprocess.PIPE, stderr=stderr, text=True)
    assert process.stdout is not None
    ready, _, _ = select.select([process.stdout], [], [], STARTUP_TIMEOUT_S)
    if not ready:
        process.kill()
        raise AssertionError(f"the simulator printed no pty within {STARTUP_TIMEOUT_S}s")
    return SimulatedBoard(process, process.stdout.readline().strip(), directory)


def stop_board(board: SimulatedBoard) -> None:
    board.process.terminate()
    try:
        board.process.wait(10)
    except subprocess.TimeoutExpired:
        board.process.kill()
        board.process.wait(10)


@pytest.fixture
def sim_dir(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    directory = tmp_path / "sim"
    monkeypatch.setenv("FLEETBENCH_SIM_DIR", str(directory))  # read by the example bench
    return directory


@pytest.fixture
def board(sim_dir: Path, tmp_path: Path) -> Iterator[SimulatedBoard]:
    started = start_board(sim_dir / "sim-1", tmp_path / "simulator.log")
    yield started
    stop_board(started)


disabled_fleet = disabled_fleet_fixture("-sr")


# --------------------------------------------------------------------------- expect-style waits


@settings(max_examples=40, deadline=None)
@given(st.lists(st.integers(min_value=1, max_value=40), max_size=12))
def test_expect_finds_the_same_milestones_however_the_output_is_split(cuts):
    text = ("boot\r\nfp> [fp] connected claim\r\n[fp] credentials saved cert=" + "c" * 64
            + "\r\n[fp] done thing=t-1 cert=" + "c" * 64 + "\r\nfp> ").replace("\r\n", "\n")
    transcript = Transcript()
    position = 0
    for size in cuts:
        transcript.feed(text[position:position + size])
        position += size
    transcript.feed(text[position:])
    transcript.end()
    wanted = [Expectation.of("prompt", r"fp> "),
              Expectation.of("claim", r"\[fp\] connected claim"),
              Expectation.of("done", r"\[fp\] done thing=(?P<thing_name>\S*) "
                                     r"cert=(?P<certificate_id>[0-9a-f]{64})")]
    seen = [transcript.expect(wanted, 1.0) for _ in range(4)]
    assert [s.name for s in seen] == ["prompt", "claim", "done", "prompt"]
    assert seen[2].groups == {"thing_name": "t-1", "certificate_id": "c" * 64}
    assert transcript.lines[0].text == "boot"


def test_a_board_has_the_fault_points_its_bench_names(sim_dir):
    device = create_device("serial", bench=EXAMPLE_BENCH, board="sim-1")
    assert set(device.fault_points) == set(FaultPoint)
    with pytest.raises(DeviceConfigError, match="fault point"):
        device.cut_at("after_lunch")


def test_a_missing_serial_port_fails_fast_before_power_is_touched(
        tmp_path, fleet, claim, endpoint_params):
    marker = tmp_path / "powered"
    bench = tmp_path / "bench.yaml"
    bench.write_text(f"""\
boards:
  sim-1:
    console: {{port: {tmp_path / "ttyUSB9"}, prompt: 'fp> '}}
    power: {{on: [touch, {marker}], off: [rm, -f, {marker}]}}
    boot: {{ready: 'fp> '}}
    setup: ['set serial {{serial}}']
    milestones: {{done: 'done'}}
""")
    device = create_device("serial", bench=bench, board="sim-1")
    with pytest.raises(DeviceConfigError, match=r"ttyUSB9 does not exist"):
        device.provision(run_inputs(fleet, endpoint_params, claim, tmp_path))
    assert not marker.exists()


# --------------------------------------------------------------------------- the simulated board


def test_the_simulated_board_switches_resets_and_reboots_like_hardware(board):
    console = serial.Serial(board.pty, 115200, timeout=0.1)
    transcript = Transcript()

    def pump_until(regex: str, timeout: float = 20.0) -> None:
        wanted = [Expectation.of("wanted", regex)]
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            transcript.feed(console.read(4096).decode(errors="replace").replace("\r\n", "\n"))
            try:
                transcript.expect(wanted, 0)
                return
            except ExpectTimeout:
                continue
        raise AssertionError(f"the board never printed {regex!r}:\n{transcript.text()}")

    try:
        power = PowerControl(board.directory / "power")
        assert power.request("on") == "on"
        pump_until(r"reset reason: power-on[\s\S]*fp> ")
        os.kill(board.process.pid, signal.SIGUSR1)  # the reset button
        pump_until(r"reset reason: reset pin[\s\S]*fp> ")
        console.write(b"reboot\r\n")
        pump_until(r"reset reason: software reset[\s\S]*fp> ")
        console.write(b"set colour blue\r\n")
        pump_until(r"error: unknown setting 'colour'")
        assert power.request("off") == "off"
        console.write(b"help\r\n")  # typed at an unpowered board: lost
        assert console.read(100) == b""
    finally:
        console.close()


def test_a_simulated_board_provisions_by_claim_over_pyserial(
        board, endpoint, fleet, claim, endpoint_params, observer, tmp_path):
    # spec fleet §1.2 (CreateKeysAndCertificate), §1.4 (RegisterThing), §2.3 (by claim)
    device = create_device("serial", bench=EXAMPLE_BENCH, board="sim-1")
    inputs = run_inputs(fleet, endpoint_params, claim, tmp_path)
    mark = observer.mark()
    result = device.provision(inputs)
    assert result.ok, result.log_path.read_text() if result.log_path else result
    assert result.kind == "serial" and result.thing_name == fleet.thing_name(inputs.serial)
    assert [s.name for s in result.steps][:2] == ["boot", "setup"]
    assert result.steps[-1].name == "provisioned"
    trace = observer.trace(client_id=inputs.client_id, since=mark)
    trace.assert_provisioned()
    assert trace.certificate_id == result.certificate_id
    described = endpoint.iot.describe_certificate(certificateId=result.certificate_id)
    assert described["certificateDescription"]["status"] == "ACTIVE"
    # Console capture started before the power cycle: the boot banner is in the log.
    lines = result.log_path.read_text().splitlines()
    power = next(i for i, line in enumerate(lines) if line.endswith("## | power cycle"))
    banner = next(i for i, line in enumerate(lines) if BANNER in line)
    assert power < banner
    assert any("set claim-key <redacted>" in line for line in lines)
    claim_key = claim.key_path.read_text().splitlines()[1]
    assert all(claim_key not in line for line in lines)


def test_a_simulated_board_provisions_by_trusted_user_with_a_csr_in_cbor_over_mqtt5(
        board, fleet, trusted_user, endpoint_params, observer, tmp_path):
    # spec fleet §2.2 (temporary claim), §1.3 (CreateCertificateFromCsr), §7 (CBOR)
    device = create_device("serial", bench=EXAMPLE_BENCH, board="sim-1")
    inputs = run_inputs(fleet, endpoint_params, trusted_user.claim(), tmp_path,
                        cert_api="csr", payload_format="cbor", mqtt_version=5)
    mark = observer.mark()
    result = device.provision(inputs)
    assert result.ok, result.log_path.read_text() if result.log_path else result
    trace = observer.trace(client_id=inputs.client_id, since=mark)
    trace.assert_provisioned()
    created = trace.first(StepKind.CERTIFICATE_CREATED)
    assert created is not None and created.api == fp.Api.CREATE_CERTIFICATE_FROM_CSR.value


def test_a_rejected_registration_is_reported_with_aws_error_code_and_the_board_log(
        board, disabled_fleet, endpoint_params, observer, tmp_path):
    # spec fleet §1.5: the rejected payload, as the firmware printed it
    device = create_device("serial", bench=EXAMPLE_BENCH, board="sim-1")
    inputs = run_inputs(disabled_fleet, endpoint_params, disabled_fleet.create_claim(),
                        tmp_path)
    mark = observer.mark()
    result = device.provision(inputs)
    assert not result.ok and result.error is not None
    assert result.error.status_code == fp.TEMPLATE_DISABLED_STATUS
    assert result.error.error_code == fp.INVALID_REQUEST_CODE
    assert result.steps[-1].name == "rejected"
    assert result.log_path is not None
    assert f"[fp] error {fp.TEMPLATE_DISABLED_STATUS} {fp.INVALID_REQUEST_CODE}" in \
        result.log_path.read_text()
    trace = observer.trace(client_id=inputs.client_id, since=mark, until=StepKind.REJECTED)
    assert trace.rejections[-1].error_code == fp.INVALID_REQUEST_CODE


def test_a_board_cut_at_a_fault_point_recovers_on_its_next_boot(
        board, endpoint, fleet, claim, endpoint_params, observer, clock, tmp_path):
    # issue 10; spec fleet §1.6: the token kept in flash finishes the registration
    device = create_device("serial", bench=EXAMPLE_BENCH, board="sim-1")
    inputs = run_inputs(fleet, endpoint_params, claim, tmp_path)
    mark = observer.mark()
    device.cut_at(FaultPoint.AFTER_CREDENTIALS_SAVED)
    cut = device.provision(inputs)
    assert not cut.ok and cut.stopped_at == FaultPoint.AFTER_CREDENTIALS_SAVED.value
    assert cut.certificate_id is not None  # from "[fp] credentials saved cert=..."
    state = (board.directory / "power" / "state").read_text().split()
    assert state[-1] == "off"  # the harness cut the power
    clock.advance(1.5)  # AWS allows one CONNECT per client id per second
    rebooted = device.provision(inputs)
    assert rebooted.ok, rebooted.log_path.read_text() if rebooted.log_path else rebooted
    assert rebooted.certificate_id == cut.certificate_id
    assert "[fp] resume phase=credentials_saved" in rebooted.log_path.read_text()
    trace = observer.trace(client_id=inputs.client_id, since=mark)
    trace.assert_provisioned()
    assert len(trace.of(StepKind.CERTIFICATE_CREATED)) == 1  # provisioned exactly once
    assert endpoint.iot.describe_thing(thingName=rebooted.thing_name)["thingName"]


# --------------------------------------------------------------------------- labgrid


def test_labgrid_drives_the_board_through_a_raw_serial_port_and_external_power(
        board, fleet, claim, endpoint_params, observer, tmp_path):
    # spec fleet §1.4; console and power through labgrid's ConsoleProtocol/PowerProtocol
    pytest.importorskip("labgrid", reason="the labgrid path needs fleetbench[bench]")
    power = f"{sys.executable} -m devices.boards.simulator power --dir {board.directory}"
    env = tmp_path / "lab.yaml"
    env.write_text(f"""\
targets:
  main:
    resources:
      RawSerialPort:
        port: {board.pty}
        speed: 115200
    drivers:
      SerialDriver: {{}}
      ExternalPowerDriver:
        cmd_on: {power} on
        cmd_off: {power} off
        cmd_cycle: {power} cycle
""")
    example = EXAMPLE_BENCH.read_text()
    example = example[:example.index("\n  sim-2:")] + "\n"  # sim-1 only
    start, end = example.index("    console:"), example.index("    boot:")
    labgrid_section = (f"    labgrid:\n      env: {env}\n      target: main\n"
                       "    console:\n      prompt: 'fp> '\n"
                       "      command_error: '^error: (?P<reason>.*)$'\n")
    bench = tmp_path / "bench.yaml"
    bench.write_text(example[:start] + labgrid_section + example[end:])
    device = create_device("serial", bench=bench, board="sim-1")
    inputs = run_inputs(fleet, endpoint_params, claim, tmp_path)
    mark = observer.mark()
    result = device.provision(inputs)
    assert result.ok, result.log_path.read_text() if result.log_path else result
    observer.trace(client_id=inputs.client_id, since=mark).assert_provisioned()
    assert BANNER in result.log_path.read_text()


# --------------------------------------------------------------------------- all kinds at once


def test_devices_of_every_kind_provision_concurrently_without_interfering(
        board, endpoint, fleet, endpoint_params, observer, tmp_path):
    # spec fleet §1.1: replies go only to the connection that asked, so devices do not mix
    devices = {
        "virtual": create_device("virtual"),
        "sdk": create_device("sdk"),
        "process": create_device("process"),
        "serial": create_device("serial", bench=EXAMPLE_BENCH, board="sim-1"),
    }
    inputs = {kind: run_inputs(fleet, endpoint_params, fleet.create_claim(), tmp_path,
                               cert_api="csr" if kind in ("sdk", "serial") else "keys")
              for kind in devices}
    mark = observer.mark()
    with ThreadPoolExecutor(max_workers=len(devices)) as pool:
        futures = {kind: pool.submit(devices[kind].provision, inputs[kind]) for kind in devices}
        results = {kind: future.result(timeout=120) for kind, future in futures.items()}
    for kind, result in results.items():
        assert result.ok, f"{kind}: {result.to_json()}"
        assert result.kind == kind
        assert result.thing_name == fleet.thing_name(inputs[kind].serial)
        trace = observer.trace(client_id=inputs[kind].client_id, since=mark)
        trace.assert_provisioned()
        assert trace.thing_name == result.thing_name
        principals = endpoint.iot.list_thing_principals(thingName=result.thing_name)
        assert [p.rsplit("/", 1)[1] for p in principals["principals"]] == \
            [trace.certificate_id]
    assert len({r.certificate_id for r in results.values()}) == len(devices)
