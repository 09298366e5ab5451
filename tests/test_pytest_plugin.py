"""The pytest plugin, driven as users drive it: inner pytest runs through ``pytester``.

Option parsing, marker skips, device-kind parametrisation, the fixtures against a real
(emulated) endpoint, teardown after failing tests, xdist, and the report option.
"""

from __future__ import annotations

import json
from collections.abc import Iterator
from pathlib import Path

import pytest

from harness.endpoints.local import LocalEndpoint
from harness.teardown import owned

pytest_plugins = ("pytester",)

FAKE_KINDS = '''
from dataclasses import dataclass
from pathlib import Path

from devices.base import DeviceResult, register_device_kind


@dataclass(frozen=True)
class FakeOptions:
    workdir: Path | None = None
    colour: str = "grey"


@register_device_kind("fake")
class FakeDevice:
    options_type = FakeOptions

    def __init__(self, options):
        self.options = options

    def provision(self, inputs):
        return DeviceResult(ok=True, device_id=inputs.device_id, kind=self.kind)


@register_device_kind("fake2")
class OtherFakeDevice(FakeDevice):
    options_type = FakeOptions
'''


@pytest.fixture(scope="module")
def emulator() -> Iterator[LocalEndpoint]:
    endpoint = LocalEndpoint.start(mode="in-process")
    yield endpoint
    endpoint.close()


#: labgrid's plugin (installed for benches) cannot be configured twice in one process;
#: hypothesis' plugin costs seconds per inner run and these runs use neither.
ISOLATE = ("-p", "no:labgrid", "-p", "no:hypothesispytest", "-p", "no:cacheprovider")


def run(pytester: pytest.Pytester, *args: str) -> pytest.RunResult:
    return pytester.runpytest(*ISOLATE, *args)


def endpoint_file(emulator: LocalEndpoint) -> str:
    return str(Path(emulator.data_dir) / "endpoint.json")


# --------------------------------------------------------------------------- options, markers


def test_options_are_parsed(pytester: pytest.Pytester) -> None:
    pytester.makepyfile("""
        def test_options(request):
            get = request.config.getoption
            assert get("--endpoint") == "aws"
            assert (get("--aws-profile"), get("--aws-region")) == ("lab", "eu-west-1")
            assert get("--device") == ["virtual", "sdk"]
            assert get("--bench") == "bench.yaml"
            assert get("--fleetbench-report") is None
    """)
    result = run(pytester, "--endpoint", "aws", "--aws-profile", "lab", "--aws-region",
                                "eu-west-1", "--device", "virtual", "--device", "sdk",
                                "--bench", "bench.yaml")
    result.assert_outcomes(passed=1)


def test_an_unknown_endpoint_is_a_usage_error(pytester: pytest.Pytester) -> None:
    result = run(pytester, "--endpoint", "moon")
    assert result.ret == pytest.ExitCode.USAGE_ERROR
    result.stderr.fnmatch_lines(["*--endpoint*invalid choice*moon*"])


def test_the_header_names_the_run_prefix_and_the_cleanup_command(
        pytester: pytest.Pytester) -> None:
    pytester.makepyfile("def test_nothing(): pass")
    result = run(pytester, "--fleetbench-prefix", "fb-head1")
    result.stdout.fnmatch_lines(["*run prefix=fb-head1*",
                                 "*fleetbench cleanup --prefix fb-head1*"])


def test_emulator_only_scenarios_are_skipped_on_aws_with_a_reason(
        pytester: pytest.Pytester) -> None:
    pytester.makepyfile("""
        import pytest

        @pytest.mark.emulator_only
        def test_needs_the_clock():
            pass

        def test_runs_anywhere():
            pass
    """)
    result = run(pytester, "--endpoint", "aws", "-rs")
    result.assert_outcomes(passed=1, skipped=1)
    result.stdout.fnmatch_lines(["*emulator_only*not available with --endpoint aws*"])
    run(pytester).assert_outcomes(passed=2)  # the emulator runs both


def test_hardware_scenarios_need_a_bench(pytester: pytest.Pytester) -> None:
    pytester.makepyfile("""
        import pytest

        @pytest.mark.hardware
        def test_on_a_board():
            pass
    """)
    result = run(pytester, "-rs")
    result.assert_outcomes(skipped=1)
    result.stdout.fnmatch_lines(["*hardware: needs a lab bench; pass --bench FILE*"])
    run(pytester, "--bench", "bench.yaml").assert_outcomes(passed=1)


def test_the_clock_fixture_skips_where_time_cannot_be_moved(pytester: pytest.Pytester) -> None:
    pytester.makeconftest("""
        import pytest
        from pathlib import Path
        from harness.endpoints.base import Endpoint, EndpointAddress, EndpointKind

        class NoClock(Endpoint):
            kind = EndpointKind.AWS
            iot = observer = None
            def client(self, name): return None
            def close(self): pass

        @pytest.fixture(scope="session")
        def endpoint():
            return NoClock(EndpointAddress("h", 8883, "h", Path("ca.pem"), "r", "1"))
    """)
    pytester.makepyfile("def test_moves_time(clock): pass")
    result = run(pytester, "-rs")
    result.assert_outcomes(skipped=1)
    result.stdout.fnmatch_lines(["*needs the emulator's clock (not available on aws)*"])


# --------------------------------------------------------------------------- devices


def test_device_is_parametrised_over_the_selected_kinds(pytester: pytest.Pytester) -> None:
    pytester.makeconftest(FAKE_KINDS)
    pytester.makepyfile("""
        def test_device(device, device_kind):
            assert device.kind == device_kind
            assert device.options.workdir is not None  # the plugin gives each device its flash

        def test_factory_passes_options(device_factory):
            assert device_factory(colour="red").options.colour == "red"
    """)
    result = run(pytester, "--device", "fake", "--device", "fake2", "-v")
    result.assert_outcomes(passed=4)
    result.stdout.fnmatch_lines(["*test_device?fake? PASSED*", "*test_device?fake2? PASSED*",
                                 "*test_factory_passes_options?fake2? PASSED*"])


def test_the_default_device_kind_is_virtual(pytester: pytest.Pytester) -> None:
    pytester.makepyfile("def test_device(device_kind): assert device_kind == 'virtual'")
    result = run(pytester, "--collect-only", "-q")
    result.stdout.fnmatch_lines(["*test_device?virtual?*"])


def test_an_unknown_device_kind_fails_with_the_known_kinds(pytester: pytest.Pytester) -> None:
    pytester.makepyfile("def test_device(device): pass")
    result = run(pytester, "--device", "toaster")
    result.assert_outcomes(errors=1)
    result.stdout.fnmatch_lines(["*unknown device kind 'toaster'; known kinds:*virtual*"])


def test_serial_devices_without_a_bench_are_skipped(pytester: pytest.Pytester) -> None:
    pytester.makepyfile("def test_device(device): pass")
    result = run(pytester, "--device", "serial", "-rs")
    result.assert_outcomes(skipped=1)
    result.stdout.fnmatch_lines(["*device kind serial needs a lab bench*"])


# --------------------------------------------------------------------------- fleet


def test_fixtures_reach_the_endpoint_and_the_fleet_is_removed_after_failures(
        pytester: pytest.Pytester, emulator: LocalEndpoint) -> None:
    pytester.makeconftest(FAKE_KINDS)
    pytester.makepyfile("""
        import pytest

        def test_claim_and_inputs(endpoint, fleet, claim, device_factory, observer):
            assert endpoint.supports_emulator_extensions
            desc = endpoint.iot.describe_certificate(certificateId=claim.certificate_id)
            assert desc["certificateDescription"]["status"] == "ACTIVE"
            inputs = device_factory.inputs(claim, serial="SN1")
            assert inputs.template_name == fleet.template_name
            assert dict(inputs.parameters) == {"SerialNumber": "SN1"}
            assert inputs.endpoint.port == endpoint.mqtt_port
            assert device_factory().provision(inputs).ok
            assert observer.trace(client_id="SN1", until=None).steps == ()

        def test_fails_after_provisioning_something(endpoint, fleet, claim):
            iot = endpoint.iot
            thing = fleet.thing_name("SN2")
            iot.create_thing(thingName=thing)
            arn = iot.describe_certificate(
                certificateId=claim.certificate_id)["certificateDescription"]["certificateArn"]
            iot.attach_thing_principal(thingName=thing, principal=arn)
            assert False, "the scenario failed"

        @pytest.fixture
        def broken(fleet):
            fleet.create_claim()
            raise RuntimeError("fixture broke")

        def test_errors_in_a_fixture(broken):
            pass

        def test_clock(clock):
            assert clock.advance(1) > 0
    """)
    prefix = "fb-plugin1"
    result = run(pytester, "--endpoint-file", endpoint_file(emulator), "--device", "fake",
                                "--fleetbench-prefix", prefix)
    result.assert_outcomes(passed=2, failed=1, errors=1)
    result.stdout.fnmatch_lines(["*fleetbench cleanup*", f"{prefix}: removed * resources, "
                                 "0 leftovers"])
    iot = emulator.iot
    assert not [t for t in iot.list_things()["things"] if owned(t["thingName"], prefix)]
    assert not [p for p in iot.list_policies()["policies"] if owned(p["policyName"], prefix)]
    assert not [t for t in iot.list_provisioning_templates()["templates"]
                if owned(t["templateName"], prefix)]


def test_a_leftover_is_reported_never_silent(pytester: pytest.Pytester,
                                             emulator: LocalEndpoint) -> None:
    prefix = "fb-plugin2"
    iot = emulator.iot
    iot.create_thing(thingName="foreign-thing")
    pytester.makepyfile("""
        def test_shares_the_claim_with_a_foreign_thing(endpoint, claim):
            arn = endpoint.iot.describe_certificate(
                certificateId=claim.certificate_id)["certificateDescription"]["certificateArn"]
            endpoint.iot.attach_thing_principal(thingName="foreign-thing", principal=arn)
    """)
    try:
        result = run(pytester, "--endpoint-file", endpoint_file(emulator),
                                    "--fleetbench-prefix", prefix)
        result.assert_outcomes(passed=1, warnings=1)
        result.stdout.fnmatch_lines([
            "*FleetbenchLeftoverWarning*",
            f"{prefix}: removed * resources, 1 leftovers",
            "*LEFTOVER certificate *: attached to thing foreign-thing*",
            f"*fleetbench cleanup --prefix {prefix}*"])
    finally:
        for arn in iot.list_thing_principals(thingName="foreign-thing")["principals"]:
            iot.detach_thing_principal(thingName="foreign-thing", principal=arn)
        iot.delete_thing(thingName="foreign-thing")
        from harness.teardown import cleanup_prefix

        assert cleanup_prefix(iot, prefix, retry_timeout=1).ok


def test_a_certificate_a_device_never_registered_is_removed_too(
        pytester: pytest.Pytester, emulator: LocalEndpoint) -> None:
    pytester.makepyfile("""
        from devices.base import Step
        from harness.observer import StepKind

        def test_stops_after_the_certificate(device_factory, claim, observer, endpoint):
            device = device_factory(control={"stop_after": Step.CREATE_CERTIFICATE})
            inputs = device_factory.inputs(claim, serial="SN-stop")
            mark = observer.mark()
            device.provision(inputs)
            trace = observer.trace(client_id=inputs.client_id, since=mark,
                                   until=StepKind.CERTIFICATE_CREATED)
            created = trace.first(StepKind.CERTIFICATE_CREATED).certificate_id
            status = endpoint.iot.describe_certificate(certificateId=created)
            assert status["certificateDescription"]["status"] == "PENDING_ACTIVATION"
            open("created.txt", "w").write(created)  # the outer test reads it (cwd)
    """)
    prefix = "fb-plugin5"
    result = run(pytester, "--endpoint-file", endpoint_file(emulator), "--device", "virtual",
                 "--fleetbench-prefix", prefix)
    result.assert_outcomes(passed=1)
    result.stdout.fnmatch_lines([f"{prefix}: removed * resources, 0 leftovers"])
    created = (pytester.path / "created.txt").read_text()
    with pytest.raises(emulator.iot.exceptions.ResourceNotFoundException):
        emulator.iot.describe_certificate(certificateId=created)


def test_an_interrupted_run_still_removes_its_fleet(pytester: pytest.Pytester,
                                                    emulator: LocalEndpoint) -> None:
    pytester.makepyfile("""
        def test_interrupted(endpoint, fleet, claim):
            endpoint.iot.create_thing(thingName=fleet.thing_name("SN1"))
            raise KeyboardInterrupt  # Ctrl-C in the middle of a scenario

        def test_never_runs():
            pass
    """)
    prefix = "fb-plugin4"
    result = pytester.runpytest_subprocess(*ISOLATE, "--endpoint-file", endpoint_file(emulator),
                                           "--fleetbench-prefix", prefix, timeout=120)
    assert result.ret == pytest.ExitCode.INTERRUPTED
    result.stdout.fnmatch_lines([f"{prefix}: removed * resources, 0 leftovers"])
    iot = emulator.iot
    assert not [t for t in iot.list_things()["things"] if owned(t["thingName"], prefix)]
    assert not [p for p in iot.list_policies()["policies"] if owned(p["policyName"], prefix)]


def test_xdist_workers_get_their_own_fleets_under_one_run_prefix(
        pytester: pytest.Pytester, emulator: LocalEndpoint) -> None:
    pytester.makepyfile("""
        import json, pathlib, pytest

        @pytest.mark.parametrize("n", [1, 2, 3, 4])
        def test_fleet(fleet, fleetbench_prefix, n):
            with pathlib.Path("seen.txt").open("a") as fh:  # cwd: the outer test's directory
                fh.write(json.dumps([fleetbench_prefix, fleet.template_name]) + "\\n")
    """)
    prefix = "fb-xdist1"
    result = pytester.runpytest_subprocess(*ISOLATE, "-p", "xdist", "-n", "2", "--endpoint-file",
                                           endpoint_file(emulator), "--fleetbench-prefix",
                                           prefix, timeout=180)
    result.assert_outcomes(passed=4)
    seen = {tuple(json.loads(line))
            for line in (pytester.path / "seen.txt").read_text().splitlines()}
    prefixes = {p for p, _ in seen}
    assert prefixes and all(p.startswith(prefix + "-gw") for p in prefixes)
    assert len({t for _, t in seen}) == len(prefixes)  # one template per worker
    # the controller prints every worker's cleanup
    lines = [line for line in result.outlines if "leftovers" in line]
    assert len(lines) == len(prefixes) and all("0 leftovers" in line for line in lines)
    assert not [t for t in emulator.iot.list_provisioning_templates()["templates"]
                if owned(t["templateName"], prefix)]


# --------------------------------------------------------------------------- report


def test_report_option_writes_results_with_outcomes_and_devices(
        pytester: pytest.Pytester) -> None:
    pytester.makeconftest(FAKE_KINDS)
    pytester.makepyfile("""
        import pytest
        from devices.base import DeviceResult

        def test_passes(device_factory):
            device_factory.record(DeviceResult(ok=True, device_id="SN9", kind="fake",
                                               thing_name="fb-SN9"))

        def test_fails():
            assert False

        @pytest.mark.skip(reason="not today")
        def test_skipped():
            pass
    """)
    reports = pytester.path / "reports"
    result = run(pytester, "--device", "fake", "--fleetbench-report", str(reports))
    result.assert_outcomes(passed=1, failed=1, skipped=1)
    results = json.loads((reports / "latest" / "results.json").read_text())
    assert results["summary"]["passed"] == 1
    assert results["summary"]["failed"] == 1
    assert results["summary"]["skipped"] == 1
    outcomes = {o["name"]: o for o in results["outcomes"]}
    assert outcomes["test_passes[fake]"]["device_kind"] == "fake"
    assert outcomes["test_skipped"]["skip_reason"] == "not today"
    assert [d["device_id"] for d in results["devices"]] == ["SN9"]
    result.stdout.fnmatch_lines(["fleetbench report: *"])


def test_a_scenario_provisions_a_virtual_device_and_reports_the_endpoints_trace(
        pytester: pytest.Pytester, emulator: LocalEndpoint) -> None:
    pytester.makepyfile("""
        import pytest

        @pytest.mark.parametrize("how", ["claim", "trusted_user"])
        def test_provision(how, device, device_factory, claim, trusted_user, observer, fleet):
            chosen = claim if how == "claim" else trusted_user.claim()
            inputs = device_factory.inputs(chosen, serial=f"SN-{how}")
            mark = observer.mark()
            result = device.provision(inputs)
            trace = observer.trace(client_id=inputs.client_id, since=mark)
            device_factory.record(result, trace, inputs)
            trace.assert_provisioned()
            assert trace.thing_name == fleet.thing_name(f"SN-{how}") == result.thing_name
    """)
    prefix = "fb-plugin3"
    reports = pytester.path / "reports"
    result = run(pytester, "--endpoint-file", endpoint_file(emulator), "--device", "virtual",
                 "--fleetbench-prefix", prefix, "--fleetbench-report", str(reports))
    result.assert_outcomes(passed=2)
    result.stdout.fnmatch_lines([f"{prefix}: removed * resources, 0 leftovers"])
    results = json.loads((reports / "latest" / "results.json").read_text())
    devices = {d["device_id"]: d for d in results["devices"]}
    assert set(devices) == {"SN-claim", "SN-trusted_user"}
    steps = [s["name"] for s in devices["SN-claim"]["trace"]]
    assert steps[0] == "connected" and "reconnected" in steps
    assert devices["SN-trusted_user"]["inputs"]["temporary_claim"] is True
    assert not [t for t in emulator.iot.list_things()["things"] if owned(t["thingName"], prefix)]
