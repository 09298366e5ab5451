"""fleetbench's pytest plugin (registered through the ``pytest11`` entry point).

Options, markers and fixtures that hand scenarios an endpoint, a provisioning setup
("fleet") and devices, wherever the endpoint is:

* ``endpoint`` (session, one per xdist worker): ``--endpoint local`` starts
  ``fleetbench emulator`` on free ports (``--emulator-mode in-process`` for speed),
  ``container`` runs the emulator image (skipped with the reason when no Docker engine
  answers), ``aws`` uses ``--aws-profile``/``--aws-region``.
* ``fleet_spec`` (session, override it in a conftest to change the template, groups,
  hook ...) and ``fleet`` (session): made at first use, torn down at the end even after
  failures; leftovers are printed in the terminal summary, never dropped.
* ``claim`` (a claim certificate per test), ``trusted_user`` (``trusted_user.claim()``
  gives a fresh temporary claim), ``observer``, ``clock`` (emulator only).
* ``device_factory`` / ``device``, parametrised over the ``--device`` kinds (ids = kind),
  built through ``devices.base.create_device``.

Markers: ``emulator_only`` (skipped on AWS), ``hardware`` (skipped without ``--bench``),
``slow``. The run prefix every resource carries is printed in the header, with the
``fleetbench cleanup`` command that removes a crashed run's leftovers.
"""

from __future__ import annotations

import dataclasses
import itertools
import secrets
import warnings
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from harness.endpoints.base import Endpoint, EndpointKind
from harness.fleet import ClaimCredentials, Fleet, FleetSpec
from harness.teardown import CleanupReport

#: Device kinds when ``--device`` is not given.
DEFAULT_DEVICE_KINDS = ("virtual",)
#: Where ``fleetbench`` keeps per-run values on the pytest config.
RUN_PREFIX_KEY = pytest.StashKey[str]()
CLEANUP_REPORTS_KEY = pytest.StashKey[list[dict[str, Any]]]()
#: Name of the value the xdist controller hands its workers.
WORKER_INPUT_PREFIX = "fleetbench_run_prefix"
WORKER_OUTPUT_CLEANUP = "fleetbench_cleanup"


class FleetbenchLeftoverWarning(UserWarning):
    """A run's teardown left resources behind (see the terminal summary)."""


# --------------------------------------------------------------------------- options


def pytest_addoption(parser: pytest.Parser) -> None:
    group = parser.getgroup("fleetbench")
    group.addoption("--endpoint", default="local", choices=("local", "container", "aws"),
                    help="where the endpoint is (default: a local emulator)")
    group.addoption("--aws-profile", default=None, help="AWS profile for --endpoint aws")
    group.addoption("--aws-region", default=None, help="AWS region for --endpoint aws")
    group.addoption("--device", action="append", default=None,
                    help="device kind: virtual, sdk, process, serial (repeatable)")
    group.addoption("--bench", default=None, help="lab bench file for physical boards")
    group.addoption("--board", action="append", default=None, metavar="NAME",
                    help="board(s) of the bench file to use, in turn (default: all, in file order)")
    group.addoption("--fleetbench-report", default=None, help="write the run's report here")
    group.addoption("--emulator-mode", default="subprocess", choices=("subprocess", "in-process"),
                    help="--endpoint local: run the emulator as a subprocess (default) or "
                         "in this process")
    group.addoption("--endpoint-file", default=None,
                    help="--endpoint local: use the running emulator this endpoint.json "
                         "describes instead of starting one")
    group.addoption("--provisioning-role-arn", default=None,
                    help="--endpoint aws: use this provisioning role instead of creating one")
    group.addoption("--fleetbench-prefix", default=None,
                    help="run prefix for every resource name (default: fb-<random>)")


def pytest_configure(config: pytest.Config) -> None:
    config.addinivalue_line("markers", "emulator_only: needs the emulator (clock, faults, trace)")
    config.addinivalue_line("markers", "hardware: needs a lab bench with physical boards")
    config.addinivalue_line("markers", "slow: long-running")
    worker_input = getattr(config, "workerinput", None)
    prefix = (worker_input or {}).get(WORKER_INPUT_PREFIX) \
        or config.getoption("--fleetbench-prefix") or f"fb-{secrets.token_hex(4)}"
    config.stash[RUN_PREFIX_KEY] = prefix
    config.stash[CLEANUP_REPORTS_KEY] = []
    if config.pluginmanager.hasplugin("xdist"):
        config.pluginmanager.register(_XdistHooks(), "fleetbench-xdist")
    if config.getoption("--fleetbench-report"):
        from harness.pytest_report import RunRecorder

        config.pluginmanager.register(RunRecorder(config), "fleetbench-report")


class _XdistHooks:
    """The controller shares one run prefix with its workers and gathers their cleanups."""

    @pytest.hookimpl(optionalhook=True)
    def pytest_configure_node(self, node: Any) -> None:
        node.workerinput[WORKER_INPUT_PREFIX] = node.config.stash[RUN_PREFIX_KEY]

    @pytest.hookimpl(optionalhook=True)
    def pytest_testnodedown(self, node: Any, error: Any) -> None:
        output = getattr(node, "workeroutput", None) or {}
        node.config.stash[CLEANUP_REPORTS_KEY].extend(output.get(WORKER_OUTPUT_CLEANUP, []))


def run_prefix(config: pytest.Config) -> str:
    """The run prefix; with xdist each worker adds its id so their fleets never collide."""
    prefix = config.stash[RUN_PREFIX_KEY]
    worker = getattr(config, "workerinput", {}).get("workerid")
    return f"{prefix}-{worker}" if worker else prefix


def pytest_report_header(config: pytest.Config) -> list[str]:
    prefix = config.stash[RUN_PREFIX_KEY]
    where = config.getoption("--endpoint")
    target = "--endpoint aws" if where == "aws" else "--endpoint-file <emulator endpoint.json>"
    kinds = ",".join(_device_kinds(config))
    return [f"fleetbench: endpoint={where} devices={kinds} run prefix={prefix}",
            f"fleetbench: after a crash: fleetbench cleanup --prefix {prefix} {target}"]


def _device_kinds(config: pytest.Config) -> list[str]:
    return list(dict.fromkeys(config.getoption("--device") or DEFAULT_DEVICE_KINDS))


def _endpoint_kind(config: pytest.Config) -> EndpointKind:
    return EndpointKind(config.getoption("--endpoint"))


# --------------------------------------------------------------------------- markers


def pytest_runtest_setup(item: pytest.Item) -> None:
    config = item.config
    if item.get_closest_marker("emulator_only") and _endpoint_kind(config) is EndpointKind.AWS:
        pytest.skip("emulator_only: needs the emulator's clock, faults or full trace "
                    "(not available with --endpoint aws)")
    if item.get_closest_marker("hardware") and not config.getoption("--bench"):
        pytest.skip("hardware: needs a lab bench; pass --bench FILE")


def pytest_generate_tests(metafunc: pytest.Metafunc) -> None:
    if "device_kind" in metafunc.fixturenames:
        kinds = _device_kinds(metafunc.config)
        metafunc.parametrize("device_kind", kinds, ids=kinds, scope="function")


# --------------------------------------------------------------------------- endpoint


def start_endpoint(config: pytest.Config, prefix: str) -> Endpoint:
    """The endpoint ``--endpoint`` asks for (skips when a container engine is missing)."""
    kind = _endpoint_kind(config)
    if kind is EndpointKind.LOCAL:
        from harness.endpoints.local import LocalEndpoint

        endpoint_file = config.getoption("--endpoint-file")
        if endpoint_file:
            return LocalEndpoint.attach(Path(endpoint_file))
        return LocalEndpoint.start(mode=config.getoption("--emulator-mode"))
    if kind is EndpointKind.CONTAINER:
        from harness.endpoints.container import ContainerEndpoint, docker_unavailable_reason

        reason = docker_unavailable_reason()
        if reason is not None:
            pytest.skip(f"--endpoint container: {reason}")
        return ContainerEndpoint.start()
    from harness.endpoints.aws import AwsEndpoint

    return AwsEndpoint.from_profile(config.getoption("--aws-profile"),
                                    config.getoption("--aws-region"), prefix=prefix)


@pytest.fixture(scope="session")
def fleetbench_prefix(pytestconfig: pytest.Config) -> str:
    """This process's run prefix (``fb-xxxxxxxx``, plus ``-gwN`` under xdist)."""
    return run_prefix(pytestconfig)


@pytest.fixture(scope="session")
def endpoint(pytestconfig: pytest.Config, fleetbench_prefix: str) -> Iterator[Endpoint]:
    """The endpoint under test; one per xdist worker, stopped at the end of the session."""
    started = start_endpoint(pytestconfig, fleetbench_prefix)
    try:
        yield started
    finally:
        started.close()


@pytest.fixture(scope="session")
def endpoint_params(endpoint: Endpoint) -> Any:
    """Where a device connects (``devices.base.EndpointParams``)."""
    from devices.base import EndpointParams

    return EndpointParams(host=endpoint.mqtt_host, port=endpoint.mqtt_port,
                          ca_file=endpoint.ca_file, server_name=endpoint.mqtt_server_name)


@pytest.fixture(scope="session")
def observer(endpoint: Endpoint) -> Any:
    """Reads the provisioning trace from the endpoint (design principle 2)."""
    return endpoint.observer


@pytest.fixture
def clock(endpoint: Endpoint) -> Any:
    """The emulated clock (``clock.advance(seconds)``); skips where time cannot be moved."""
    if endpoint.clock is None:
        pytest.skip(f"needs the emulator's clock (not available on {endpoint.kind.value})")
    return endpoint.clock


# --------------------------------------------------------------------------- fleet


@pytest.fixture(scope="session")
def fleet_spec(pytestconfig: pytest.Config, fleetbench_prefix: str,
               tmp_path_factory: pytest.TempPathFactory) -> FleetSpec:
    """The run's provisioning setup; override in a conftest for another template or hook."""
    role_arn = pytestconfig.getoption("--provisioning-role-arn")
    on_aws = _endpoint_kind(pytestconfig) is EndpointKind.AWS
    return FleetSpec(prefix=fleetbench_prefix, role_arn=role_arn,
                     create_role=on_aws and role_arn is None,
                     workdir=tmp_path_factory.mktemp("fleet"))


class FleetPool:
    """The session's fleets, one per distinct :class:`FleetSpec`.

    A conftest may override ``fleet_spec`` for its directory (``scenarios/`` adds groups);
    a session-scoped ``fleet`` would keep whichever spec asked first and so depend on test
    order. Each distinct spec gets its own fleet; the second and later ones get the run
    prefix plus ``-s<n>`` so their resources never collide. All are removed at the end.
    """

    def __init__(self, config: pytest.Config, endpoint: Endpoint) -> None:
        self._config = config
        self._endpoint = endpoint
        self._fleets: dict[str, tuple[Fleet, Any]] = {}

    def get(self, spec: FleetSpec) -> Fleet:
        key = repr(spec)
        if key not in self._fleets:
            if self._fleets:
                spec = dataclasses.replace(spec, prefix=f"{spec.prefix}-s{len(self._fleets) + 1}")
            made = Fleet.for_endpoint(self._endpoint, spec)
            mark = (self._endpoint.observer.mark()
                    if self._endpoint.supports_emulator_extensions else None)
            made.setup()
            self._fleets[key] = (made, mark)
        return self._fleets[key][0]

    def teardown(self) -> None:
        for made, mark in reversed(list(self._fleets.values())):
            if mark is not None:
                _track_created_certificates(self._endpoint, made, mark)
            _record_cleanup(self._config, made.teardown())
        self._fleets.clear()


@pytest.fixture(scope="session")
def fleet_pool(pytestconfig: pytest.Config, endpoint: Endpoint) -> Iterator[FleetPool]:
    """Every fleet of the session; removed at the end whatever happened."""
    pool = FleetPool(pytestconfig, endpoint)
    try:
        yield pool
    finally:
        pool.teardown()


@pytest.fixture
def fleet(fleet_pool: FleetPool, fleet_spec: FleetSpec) -> Fleet:
    """Template, role, groups and claim policy for the run (one per distinct ``fleet_spec``,
    set up once per session); removed at the end whatever happened, with the things,
    certificates and policies devices got from it."""
    return fleet_pool.get(fleet_spec)


def _track_created_certificates(endpoint: Endpoint, fleet: Fleet, mark: Any) -> None:
    """Certificates this fleet's devices made but never registered lead nowhere by name;
    the emulator's log has them (created on a connection with one of the fleet's claims)."""
    from harness.observations import Kind

    admin = getattr(endpoint, "admin", None)
    if admin is None:
        return
    claims = set(fleet.claim_certificate_ids)
    try:
        events = admin.events(kinds=[Kind.CERTIFICATE_CREATED], since=mark.seq)
    except Exception as exc:  # the emulator may be gone; teardown still runs
        warnings.warn(f"fleetbench: could not read created certificates: {exc}", stacklevel=1)
        return
    for event in events:
        if event.certificate_id and event.detail.get("claimCertificateId") in claims:
            fleet.track_certificate(event.certificate_id)


def _record_cleanup(config: pytest.Config, report: CleanupReport) -> None:
    entry = report.to_dict()
    config.stash[CLEANUP_REPORTS_KEY].append(entry)
    worker_output = getattr(config, "workeroutput", None)
    if worker_output is not None:
        worker_output.setdefault(WORKER_OUTPUT_CLEANUP, []).append(entry)
    if not report.ok:
        warnings.warn(FleetbenchLeftoverWarning(report.summary()), stacklevel=1)


def pytest_terminal_summary(terminalreporter: Any, exitstatus: int,
                            config: pytest.Config) -> None:
    reports = config.stash.get(CLEANUP_REPORTS_KEY, [])
    if not reports:
        return
    terminalreporter.section("fleetbench cleanup")
    for entry in reports:
        removed = len(entry["removed"])
        left = entry["leftovers"]
        terminalreporter.write_line(f"{entry['prefix']}: removed {removed} resources, "
                                    f"{len(left)} leftovers")
        for item in left:
            terminalreporter.write_line(f"  LEFTOVER {item['kind']} {item['name']}: "
                                        f"{item['reason']}", red=True)
        if left:
            terminalreporter.write_line(f"  remove them with: fleetbench cleanup --prefix "
                                        f"{entry['prefix']} ...", yellow=True)


@pytest.fixture
def claim(fleet: Fleet) -> ClaimCredentials:
    """A claim certificate with the run's claim policy (removed with the fleet)."""
    return fleet.create_claim()


class TrustedUser:
    """An installer's app: each :meth:`claim` is a new temporary claim (spec fleet §2)."""

    def __init__(self, fleet: Fleet) -> None:
        self.fleet = fleet

    def claim(self) -> ClaimCredentials:
        return self.fleet.create_trusted_user_claim()

    __call__ = claim


@pytest.fixture
def trusted_user(fleet: Fleet) -> TrustedUser:
    return TrustedUser(fleet)


# --------------------------------------------------------------------------- devices


class DeviceFactory:
    """Builds devices of one kind and the inputs for a provisioning run on this endpoint."""

    def __init__(self, kind: str, request: pytest.FixtureRequest, workdir: Path) -> None:
        self.kind = kind
        self._request = request
        self._workdir = workdir
        self._counter = itertools.count(1)
        self._board_turn = 0
        self.devices: list[Any] = []

    def _boards(self, bench: Path) -> list[str]:
        """The ``--board`` names, else every board of the bench file in file order."""
        chosen = self._request.config.getoption("--board")
        if chosen:
            return list(chosen)
        from devices.bench import load_bench

        return list(load_bench(bench).boards)

    def options(self, **options: Any) -> dict[str, Any]:
        """``options`` plus what the plugin knows and the kind accepts (workdir, bench)."""
        from devices.base import option_names

        accepted = option_names(self.kind)
        bench = self._request.config.getoption("--bench")
        defaults: dict[str, Any] = {}
        if "bench" in accepted and bench:
            defaults["bench"] = Path(bench)
            if "board" in accepted:
                boards = self._boards(Path(bench))
                defaults["board"] = boards[self._board_turn % len(boards)]
                self._board_turn += 1
        if "workdir" in accepted:
            defaults["workdir"] = self._workdir / f"{self.kind}-{next(self._counter)}"
        return {**defaults, **options}

    def __call__(self, **options: Any) -> Any:
        from devices.base import create_device

        device = create_device(self.kind, **self.options(**options))
        self.devices.append(device)
        return device

    def inputs(self, claim: ClaimCredentials, *, serial: str | None = None,
               **overrides: Any) -> Any:
        """``DeviceInputs`` for the run's template: endpoint, claim, flow from the claim,
        ``SerialNumber`` parameter and client id from ``serial`` (a fresh one by default)."""
        from devices.base import DeviceInputs, Flow
        from harness.fleet import SERIAL_PARAMETER

        fleet: Fleet = self._request.getfixturevalue("fleet")
        serial = serial or f"sn{secrets.token_hex(4)}"
        values: dict[str, Any] = {
            "endpoint": self._request.getfixturevalue("endpoint_params"),
            "claim": claim,
            "template_name": fleet.template_name,
            "flow": Flow.TRUSTED_USER if claim.temporary else Flow.CLAIM,
            "parameters": {SERIAL_PARAMETER: serial},
            "serial": serial,
            "client_id": serial,
            "workdir": self._workdir / f"{self.kind}-{serial}",
        }
        values.update(overrides)
        return DeviceInputs(**values)

    def record(self, result: Any, trace: Any = None, inputs: Any = None) -> None:
        """Attach a device's result (and the endpoint's trace) to the test's report."""
        from harness.pytest_report import device_record

        record = device_record(result, trace=trace, inputs=inputs)
        self._request.node.user_properties.append(("fleetbench_device", record.to_dict()))


@pytest.fixture
def device_kind(request: pytest.FixtureRequest) -> str:
    """The device kind of this test's parametrisation (from ``--device``)."""
    return str(getattr(request, "param", DEFAULT_DEVICE_KINDS[0]))


@pytest.fixture
def device_factory(request: pytest.FixtureRequest, device_kind: str,
                   tmp_path: Path) -> DeviceFactory:
    """``device_factory(**options)`` makes devices of this test's kind; ``.inputs(claim)``."""
    if device_kind == "serial" and not request.config.getoption("--bench"):
        pytest.skip("device kind serial needs a lab bench; pass --bench FILE")
    return DeviceFactory(device_kind, request, tmp_path)


@pytest.fixture
def device(device_factory: DeviceFactory) -> Any:
    """One device of this test's kind with default options."""
    return device_factory()
