"""``fleetbench provision``: one device from the command line, exit 0/1/2, a JSON report
with the endpoint's trace; run as a user runs it (a separate process)."""

from __future__ import annotations

import json
import os
import select
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest

from harness import protocol as fp
from harness.provision_cli import EXIT_FAILED, EXIT_OK, EXIT_USAGE, main
from tests.device_kit import disabled_fleet_fixture

EXAMPLE_BENCH = Path(__file__).resolve().parents[1] / "devices" / "benches" / "simulator.yaml"
CLI_TIMEOUT_S = 120


@pytest.fixture(scope="module")
def endpoint_file(endpoint: Any) -> Path:
    """The running emulator's endpoint.json (what a technician passes)."""
    if not endpoint.supports_emulator_extensions:
        pytest.skip("needs an emulator's endpoint.json")
    path = Path(endpoint.info.data_dir) / "endpoint.json"
    if not path.exists():
        pytest.skip(f"the emulator wrote no {path}")
    return path


disabled_fleet = disabled_fleet_fixture("-cl")


def provision(*args: str | Path, env: dict[str, str] | None = None,
              ) -> tuple[int, dict[str, Any], str]:
    """Run ``fleetbench provision`` as its own process: (exit status, JSON, stderr)."""
    done = subprocess.run([sys.executable, "-m", "harness.provision_cli", "provision",
                           *map(str, args)], capture_output=True, text=True,
                          timeout=CLI_TIMEOUT_S, env=env)
    report = json.loads(done.stdout) if done.stdout.strip() else {}
    return done.returncode, report, done.stderr


# --------------------------------------------------------------------------- bad usage


@pytest.mark.parametrize("argv, message", [
    (["--device", "virtual"], "--endpoint-file"),
    (["--endpoint-file", "e.json", "--device", "serial"], "--bench FILE and --board"),
    (["--endpoint-file", "e.json", "--device", "virtual", "--bench", "b.yaml"],
     "for --device serial"),
    (["--endpoint-file", "e.json", "--device", "sdk", "--format", "cbor"], "JSON only"),
    (["--endpoint-file", "e.json", "--device", "virtual", "--template", "t"],
     "--claim-cert and --claim-key"),
    (["--endpoint-file", "e.json", "--device", "virtual", "--claim-cert", "c.pem"],
     "both --claim-cert and --claim-key"),
    (["--endpoint-file", "e.json", "--device", "virtual", "--device-config", "d.yaml"],
     "for --device process"),
])
def test_bad_usage_exits_2_and_names_the_problem(argv, message, capsys):
    assert main(["provision", *argv]) == EXIT_USAGE
    assert message in capsys.readouterr().err


def test_an_unknown_choice_is_bad_usage(capsys):
    with pytest.raises(SystemExit) as info:
        main(["provision", "--endpoint-file", "e.json", "--device", "toaster"])
    assert info.value.code == EXIT_USAGE


def test_a_missing_endpoint_file_is_bad_usage(tmp_path, capsys):
    assert main(["provision", "--endpoint-file", str(tmp_path / "nope.json"), "--device",
                 "virtual"]) == EXIT_USAGE
    assert "no such endpoint file" in capsys.readouterr().err


def test_a_malformed_bench_file_fails_fast_naming_file_and_line(tmp_path, capsys):
    bench = tmp_path / "bench.yaml"
    bench.write_text("boards:\n  b1:\n    console: {port: /dev/ttyUSB0}\n    boot: 5\n"
                     "    milestones: {done: done}\n")
    code = main(["provision", "--endpoint-file", str(tmp_path / "never-read.json"),
                 "--device", "serial", "--bench", str(bench), "--board", "b1"])
    assert code == EXIT_USAGE
    err = capsys.readouterr().err
    assert f"{bench}:4: boards.b1.boot: expected a mapping" in err


def test_an_unknown_placeholder_in_a_process_config_is_bad_usage(tmp_path, capsys):
    config = tmp_path / "device.yaml"
    config.write_text("command: [my-firmware, --host, '{endpoint}', --sn, '{serail}']\n")
    code = main(["provision", "--endpoint-file", str(tmp_path / "e.json"), "--device",
                 "process", "--device-config", str(config)])
    assert code == EXIT_USAGE
    assert "unknown placeholder {serail}" in capsys.readouterr().err


# --------------------------------------------------------------------------- against the emulator


def test_without_a_template_a_demo_fleet_is_prepared_and_the_device_provisioned(
        endpoint, endpoint_file, tmp_path):
    # spec fleet §1.3 (CSR), §1.4 (RegisterThing), §2.3 (claim policy); design principle 2
    code, report, err = provision("--endpoint-file", endpoint_file, "--device", "virtual",
                                  "--cert", "csr", "--serial", "SN-CLI-1",
                                  "--workdir", tmp_path / "w")
    assert code == EXIT_OK, err
    assert "demo fleet was prepared" in err and "fleetbench cleanup --prefix" in err
    prefix = report["demo_fleet_prefix"]
    assert report["ok"] and report["outcome"] == "provisioned"
    assert report["verdict_from"] == "endpoint"
    assert report["thing_name"] == f"{prefix}-SN-CLI-1"
    assert len(report["certificate_id"]) == 64
    steps = [s["step"] for s in report["trace"]]
    assert steps[0] == "connected" and "thing_registered" in steps and "reconnected" in steps
    assert report["statusCode"] is None and report["errorCode"] is None
    assert Path(report["device_log"]).exists()
    thing = endpoint.iot.describe_thing(thingName=report["thing_name"])
    assert thing["attributes"]["serial"] == "SN-CLI-1"
    from harness.teardown import cleanup_prefix

    assert cleanup_prefix(endpoint.iot, prefix).ok


def test_cleanup_removes_the_demo_fleet_afterwards(endpoint, endpoint_file, tmp_path):
    code, report, err = provision("--endpoint-file", endpoint_file, "--device", "sdk",
                                  "--mqtt", "5", "--cleanup", "--workdir", tmp_path / "w")
    assert code == EXIT_OK, err
    assert "removed" in err
    with pytest.raises(endpoint.iot.exceptions.ResourceNotFoundException):
        endpoint.iot.describe_thing(thingName=report["thing_name"])


def test_a_rejected_flow_exits_1_with_aws_error_fields_and_the_device_log(
        endpoint_file, disabled_fleet, tmp_path):
    # spec fleet §1.5: statusCode, errorCode, errorMessage of the rejected payload
    claim = disabled_fleet.create_claim()
    code, report, err = provision(
        "--endpoint-file", endpoint_file, "--device", "process",
        "--template", disabled_fleet.template_name, "--claim-cert", claim.cert_path,
        "--claim-key", claim.key_path, "--param", "SerialNumber=SN-CLI-2",
        "--serial", "SN-CLI-2", "--workdir", tmp_path / "w")
    assert code == EXIT_FAILED, err
    assert report["outcome"] == "rejected" and not report["ok"]
    assert report["statusCode"] == fp.TEMPLATE_DISABLED_STATUS
    assert report["errorCode"] == fp.INVALID_REQUEST_CODE
    assert report["errorMessage"]
    assert any(s["step"] == "rejected" and s["error_code"] == fp.INVALID_REQUEST_CODE
               for s in report["trace"])
    assert fp.INVALID_REQUEST_CODE in Path(report["device_log"]).read_text()


def test_a_trusted_user_flow_on_a_given_template_asks_for_a_temporary_claim(
        endpoint_file, fleet, tmp_path):
    # spec fleet §2.1: CreateProvisioningClaim; §2.2: the device runs the flow with it
    code, report, err = provision(
        "--endpoint-file", endpoint_file, "--device", "sdk", "--flow", "trusted-user",
        "--template", fleet.template_name, "--serial", "SN-CLI-3",
        "--workdir", tmp_path / "w")
    assert code == EXIT_OK, err
    assert report["thing_name"] == fleet.thing_name("SN-CLI-3")
    assert report["template"] == fleet.template_name


def test_a_technician_provisions_a_bench_board(endpoint_file, fleet, tmp_path):
    # spec fleet §1.4, through the bench file, pyserial and the simulated board's console
    board_dir = tmp_path / "sim" / "sim-1"
    with (tmp_path / "simulator.log").open("w") as log:
        simulator = subprocess.Popen(
            [sys.executable, "-m", "devices.boards.simulator", "--pty", "--dir", str(board_dir),
             "--power", "off"], stdout=subprocess.PIPE, stderr=log, text=True)
    try:
        assert simulator.stdout is not None
        assert select.select([simulator.stdout], [], [], 20)[0], "no pty from the simulator"
        simulator.stdout.readline()
        claim = fleet.create_claim()
        env = {**os.environ, "FLEETBENCH_SIM_DIR": str(tmp_path / "sim")}
        code, report, err = provision(
            "--endpoint-file", endpoint_file, "--device", "serial", "--bench", EXAMPLE_BENCH,
            "--board", "sim-1", "--template", fleet.template_name, "--claim-cert",
            claim.cert_path, "--claim-key", claim.key_path, "--serial", "SN-CLI-4",
            "--workdir", tmp_path / "w", env=env)
    finally:
        simulator.terminate()
        simulator.wait(10)
    assert code == EXIT_OK, err
    assert report["thing_name"] == fleet.thing_name("SN-CLI-4")
    assert report["device"]["kind"] == "serial"
    assert "[fp] done" in Path(report["device_log"]).read_text()
