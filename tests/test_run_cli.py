"""``fleetbench run``: pytest on the scenarios with the plugin's options, and the report.

The end-to-end case runs the real command on a one-scenario ``-k`` selection (an
emulator on free ports, one virtual device) and reads the report it leaves; the exit
status cases use a tiny scenarios directory of their own.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import pytest

from harness import cli
from harness.run_cli import add_run_parser, default_scenarios_dir, pytest_command

#: One matrix scenario: by claim, CreateKeysAndCertificate, JSON, on a virtual device.
ONE_SCENARIO = "test_device_is_provisioned_and_publishes_under_the_template_policy and " \
               "claim-keys-json"
#: Keep the child pytest from writing a cache into the repository.
NO_CACHE = ("--", "-p", "no:cacheprovider")


def parse(*argv: str) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="fleetbench")
    add_run_parser(parser.add_subparsers(dest="command", required=True))
    return parser.parse_args(["run", *argv])


def test_the_defaults_are_the_local_emulator_virtual_devices_and_a_report() -> None:
    command = pytest_command(parse(), Path("/s"), Path("/r"))
    assert command == [sys.executable, "-m", "pytest", "/s", "--endpoint", "local",
                       "--device", "virtual", "--fleetbench-report", "/r"]
    assert default_scenarios_dir() == Path(cli.__file__).resolve().parent.parent / "scenarios"


def test_options_and_the_args_after_the_double_dash_reach_pytest() -> None:
    args = parse("--endpoint", "aws", "--device", "sdk", "process", "--device", "sdk",
                 "-k", "matrix and json", "-n", "auto", "--", "--aws-profile", "lab", "-x")
    assert pytest_command(args, Path("/s"), Path("/r"))[3:] == [
        "/s", "--endpoint", "aws", "--device", "sdk", "--device", "process",
        "--fleetbench-report", "/r", "-k", "matrix and json", "-n", "auto",
        "--aws-profile", "lab", "-x"]


@pytest.mark.parametrize("argv", [["-n", "0"], ["-n", "many"], ["--endpoint", "moon"],
                                  ["--not-a-run-option"]])
def test_bad_arguments_are_a_usage_error(argv: list[str],
                                         capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as exited:
        cli.main(["run", *argv])
    assert exited.value.code == 2
    assert "error:" in capsys.readouterr().err


def test_a_missing_scenarios_directory_is_a_usage_error(
        tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    code = cli.main(["run", "--scenarios", str(tmp_path / "nowhere"), "--reports-dir",
                     str(tmp_path / "reports")])
    assert code == 2
    assert "no scenarios directory" in capsys.readouterr().err


def _suite(tmp_path: Path, body: str) -> Path:
    suite = tmp_path / "suite"
    suite.mkdir()
    (suite / "test_tiny.py").write_text(body)
    return suite


@pytest.mark.parametrize(("body", "expected"), [
    ("def test_passes():\n    pass\n", 0),
    ("def test_fails():\n    assert False\n", 1),
], ids=["passing", "failing"])
def test_the_exit_status_is_pytests_and_a_report_is_written_either_way(
        body: str, expected: int, tmp_path: Path, capfd: pytest.CaptureFixture[str]) -> None:
    reports = tmp_path / "reports"
    code = cli.main(["run", "--scenarios", str(_suite(tmp_path, body)), "--reports-dir",
                     str(reports), *NO_CACHE])
    assert code == expected
    results = json.loads((reports / "latest" / "results.json").read_text())
    assert results["summary"]["passed" if expected == 0 else "failed"] == 1
    assert f"fleetbench run: report in {reports.resolve()}" in capfd.readouterr().out


def test_fleetbench_run_on_a_tiny_selection_writes_the_report(
        tmp_path: Path, capfd: pytest.CaptureFixture[str]) -> None:
    # issue 7: `fleetbench run` runs the scenarios against the embedded emulator with
    # virtual devices and writes reports/<run-id>/ and reports/latest
    reports = tmp_path / "reports"
    code = cli.main(["run", "-k", ONE_SCENARIO, "--reports-dir", str(reports), *NO_CACHE])
    out = capfd.readouterr().out
    assert code == 0, out[-4000:]

    latest = reports / "latest"
    assert latest.is_symlink()
    run_dir = latest.resolve()
    assert run_dir.parent == reports.resolve()
    for name in ("results.json", "junit.xml", "report.html"):
        assert (run_dir / name).is_file(), name
    results = json.loads((run_dir / "results.json").read_text())
    assert (results["run"]["kind"], results["run"]["endpoint_kind"]) == ("scenarios", "local")
    (outcome,) = results["outcomes"]
    assert outcome["outcome"] == "passed"
    assert (outcome["flow"], outcome["cert_path"], outcome["payload_format"],
            outcome["device_kind"]) == ("claim", "keys", "json", "virtual")
    (device,) = results["devices"]
    assert device["kind"] == "virtual" and device["thing_name"]
    assert [step["name"] for step in device["trace"]][:1] == ["connected"]
    assert "<testcase" in (run_dir / "junit.xml").read_text()
    assert f"fleetbench run: report in {run_dir}" in out
