"""The run recorder (``--fleetbench-report``) as users meet it: inner pytest runs.

A report names each device once, however often a run records it (a reboot scenario
records a device's first and second boot); device records carry the endpoint's trace
across pytest-xdist's process boundary; and a report that cannot be written is a clear
error, not a crashed session.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest

pytest_plugins = ("pytester",)

#: See tests/test_pytest_plugin.py: plugins these inner runs do not use.
ISOLATE = ("-p", "no:labgrid", "-p", "no:hypothesispytest", "-p", "no:cacheprovider")

FAKE_KIND = '''
from dataclasses import dataclass
from pathlib import Path

from devices.base import DeviceResult, register_device_kind


@dataclass(frozen=True)
class FakeOptions:
    workdir: Path | None = None


@register_device_kind("fake")
class FakeDevice:
    options_type = FakeOptions

    def __init__(self, options):
        self.options = options

    def provision(self, inputs):
        return DeviceResult(ok=True, device_id=inputs.device_id, kind=self.kind)
'''

#: Two scenarios recording the same device id three times in all, with a trace each.
REBOOTS = '''
from devices.base import DeviceResult
from harness.observations import Kind, Observation
from harness.observer import build_trace


def trace(client):
    seen = [Observation(seq=1, timestamp=10.0, kind=Kind.CONNECT.value, client_id=client,
                        certificate_id="c" * 64, detail={}),
            Observation(seq=2, timestamp=11.0, kind=Kind.DISCONNECT.value, client_id=client,
                        certificate_id="c" * 64, detail={"reason": "CONNECTION_LOST"})]
    return build_trace(seen, client_id=client)


def test_first_and_second_boot(device_factory):
    for boot in ("first", "second"):
        device_factory.record(DeviceResult(ok=boot == "second", device_id="SN9", kind="fake",
                                           failure=f"{boot} boot"), trace("SN9"))


def test_same_serial_elsewhere(device_factory):
    device_factory.record(DeviceResult(ok=True, device_id="SN9", kind="fake"), trace("SN9"))


def test_another_device(device_factory):
    device_factory.record(DeviceResult(ok=True, device_id="SN1", kind="fake"), trace("SN1"))
'''


def test_repeated_device_ids_get_a_suffix_in_devices_and_outcomes_under_xdist(
        pytester: pytest.Pytester) -> None:
    pytester.makeconftest(FAKE_KIND)
    pytester.makepyfile(test_reboots=REBOOTS)
    reports = pytester.path / "reports"
    result = pytester.runpytest_subprocess(*ISOLATE, "-p", "xdist", "-n", "2", "--device",
                                           "fake", "--fleetbench-report", str(reports),
                                           timeout=120)
    result.assert_outcomes(passed=3)
    assert result.ret == 0
    latest = reports / "latest"
    assert {p.name for p in latest.iterdir()} >= {"results.json", "junit.xml", "report.html"}
    results = json.loads((latest / "results.json").read_text())
    ids = [d["device_id"] for d in results["devices"]]
    assert sorted(ids) == ["SN1", "SN9", "SN9#2", "SN9#3"]
    by_test = {o["name"]: o["device_ids"] for o in results["outcomes"]}
    assert by_test["test_another_device[fake]"] == ["SN1"]
    boots = by_test["test_first_and_second_boot[fake]"]
    assert len(boots) == 2 and sorted([*boots, *by_test["test_same_serial_elsewhere[fake]"]]) \
        == ["SN9", "SN9#2", "SN9#3"]
    devices = {d["device_id"]: d for d in results["devices"]}
    # the two boots keep their order: the first recorded is the unsuffixed or lower one
    assert [devices[i]["registry_state"]["failure"] for i in boots] == [
        "first boot", "second boot"]
    # the endpoint's trace crossed from the worker with plain values only
    assert [s["name"] for s in devices["SN1"]["trace"]] == ["connected", "disconnected"]
    assert devices["SN1"]["trace"][1]["detail"]["reason"] == "CONNECTION_LOST"


def test_a_report_that_cannot_be_written_is_a_clear_error_not_a_crash(
        pytester: pytest.Pytester) -> None:
    pytester.makeconftest(FAKE_KIND)
    pytester.makepyfile(test_reboots=REBOOTS)
    blocked = pytester.path / "not-a-directory"
    blocked.write_text("a file where the reports directory should be")
    result = pytester.runpytest(*ISOLATE, "--device", "fake", "--fleetbench-report",
                                str(blocked))
    result.assert_outcomes(passed=3)
    assert result.ret == pytest.ExitCode.INTERNAL_ERROR
    result.stdout.fnmatch_lines(
        [f"fleetbench report: ERROR: could not write the run's report to {blocked}: *"])
    assert "INTERNALERROR" not in result.stdout.str() + result.stderr.str()
    assert blocked.is_file()


def test_a_failed_run_keeps_its_exit_status_when_the_report_fails(
        pytester: pytest.Pytester, tmp_path: Path) -> None:
    pytester.makepyfile("def test_fails():\n    assert False\n")
    blocked = tmp_path / "file"
    blocked.write_text("")
    result = pytester.runpytest(*ISOLATE, "--fleetbench-report", str(blocked))
    assert result.ret == pytest.ExitCode.TESTS_FAILED
    result.stdout.fnmatch_lines(["fleetbench report: ERROR: *"])
