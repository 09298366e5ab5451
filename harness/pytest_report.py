"""``--fleetbench-report DIR``: turn a pytest run into a :class:`RunRecord` and write it.

Outcomes come from the test reports, which pytest-xdist forwards to the controller;
device records and the endpoint's description travel the same way, as the reports'
``user_properties`` (``("fleetbench_device", {...})``, ``("fleetbench_endpoint", {...})``),
so the controller writes one report for all workers.

A report names each device once: a device recorded again (its second boot in a reboot
scenario, the same serial in two scenarios) gets ``#2``, ``#3``... on its id, in
``devices`` and in its scenario's ``device_ids`` alike. A report that cannot be written
is an error message and a non-zero exit status, never a crashed session.
"""

from __future__ import annotations

import dataclasses
import sys
import time
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import pytest

from harness.reporting.records import (
    CertPath,
    DeviceRecord,
    Outcome,
    RunKind,
    RunRecord,
    ScenarioOutcome,
    TraceStep,
    new_run_id,
    runtime_versions,
)

DEVICE_PROPERTY = "fleetbench_device"
ENDPOINT_PROPERTY = "fleetbench_endpoint"
PARAMS_PROPERTY = "fleetbench_params"


def _trace_steps(trace: Any) -> tuple[TraceStep, ...]:
    """An observer's ProvisioningTrace as report steps (rejections and failures not ok)."""
    from harness.observer import StepKind

    steps = []
    for step in getattr(trace, "steps", ()):
        detail = {k: v for k, v in step.to_dict().items()
                  if k not in ("step", "timestamp") and v is not None}
        ok = step.kind not in (StepKind.REJECTED, StepKind.CONNECT_FAILED)
        steps.append(TraceStep(name=step.kind.value, at=step.timestamp, ok=ok, detail=detail))
    return tuple(steps)


def _safe_inputs(inputs: Any) -> dict[str, Any]:
    """What a device was given, without key material (paths and ids only)."""
    if inputs is None:
        return {}
    return {
        "endpoint": f"{inputs.endpoint.host}:{inputs.endpoint.port}",
        "template_name": inputs.template_name,
        "flow": inputs.flow.value,
        "cert_api": inputs.cert_api.value,
        "payload_format": inputs.payload_format.value,
        "mqtt_version": int(inputs.mqtt_version),
        "parameters": dict(inputs.parameters),
        "client_id": inputs.client_id,
        "serial": inputs.serial,
        "claim_certificate_id": inputs.claim.certificate_id,
        "temporary_claim": inputs.claim.temporary,
    }


def device_record(result: Any, *, trace: Any = None, inputs: Any = None) -> DeviceRecord:
    """A report record for one device run: its own result as evidence, the endpoint's trace."""
    log_path = getattr(result, "log_path", None)
    excerpt = None
    if log_path is not None and Path(log_path).is_file():
        excerpt = Path(log_path).read_text(errors="replace")[-4000:]
    return DeviceRecord(
        device_id=str(getattr(result, "device_id", "device")),
        kind=str(getattr(result, "kind", "unknown")),
        inputs=_safe_inputs(inputs),
        trace=_trace_steps(trace),
        registry_state={"ok": getattr(result, "ok", None),
                        "failure": getattr(result, "failure", None)},
        log_path=str(log_path) if log_path else None,
        log_excerpt=excerpt,
        thing_name=getattr(result, "thing_name", None),
        certificate_id=getattr(result, "certificate_id", None),
    )


def _param(params: Mapping[str, Any], *names: str) -> str | None:
    for name in names:
        if name in params:
            return str(params[name])
    return None


class RunRecorder:
    """Collects outcomes and devices; writes the run at the end (controller only)."""

    def __init__(self, config: pytest.Config) -> None:
        self.config = config
        self.started_at = time.time()
        self.outcomes: dict[str, ScenarioOutcome] = {}
        self.devices: list[DeviceRecord] = []
        self.endpoint: dict[str, Any] = {}
        self.run_dir: Path | None = None
        self.error: str | None = None
        self._device_ids: set[str] = set()
        #: Per test: how many of its device records are taken, and the ids they got.
        self._taken: dict[str, int] = {}
        self._ids_of: dict[str, list[str]] = {}

    @pytest.hookimpl(hookwrapper=True)
    def pytest_runtest_makereport(self, item: pytest.Item, call: Any) -> Any:
        """Put the parametrisation and the endpoint where xdist carries them: the report."""
        names = {name for name, _ in item.user_properties}
        if PARAMS_PROPERTY not in names:
            callspec = getattr(item, "callspec", None)
            params = {k: str(getattr(v, "value", v)) for k, v in
                      (callspec.params.items() if callspec else ())}
            item.user_properties.append((PARAMS_PROPERTY, params))
        endpoint: Any = getattr(item, "funcargs", {}).get("endpoint")
        if ENDPOINT_PROPERTY not in names and hasattr(endpoint, "describe"):
            item.user_properties.append((ENDPOINT_PROPERTY, endpoint.describe()))
        yield

    def pytest_runtest_logreport(self, report: pytest.TestReport) -> None:
        props: list[tuple[str, Any]] = list(report.user_properties)
        params = dict(props).get(PARAMS_PROPERTY, {})
        for name, value in props:
            if name == ENDPOINT_PROPERTY:
                self.endpoint = dict(value)
        # Each phase's report carries every property so far: take only the new records.
        records = [value for name, value in props if name == DEVICE_PROPERTY]
        for value in records[self._taken.get(report.nodeid, 0):]:
            self._add_device(report.nodeid, DeviceRecord.from_dict(value))
        self._taken[report.nodeid] = max(len(records), self._taken.get(report.nodeid, 0))
        outcome = self._outcome(report, params)
        if outcome is not None:
            ids = tuple(self._ids_of.get(report.nodeid, ()))
            self.outcomes[report.nodeid] = dataclasses.replace(outcome, device_ids=ids)

    def _add_device(self, nodeid: str, device: DeviceRecord) -> None:
        """Record ``device`` under an id no other record of the run has (``id#2``...)."""
        base, n, unique = device.device_id, 1, device.device_id
        while unique in self._device_ids:
            n += 1
            unique = f"{base}#{n}"
        self._device_ids.add(unique)
        self.devices.append(dataclasses.replace(device, device_id=unique))
        self._ids_of.setdefault(nodeid, []).append(unique)

    def _outcome(self, report: pytest.TestReport,
                 params: Mapping[str, Any]) -> ScenarioOutcome | None:
        if report.when == "call" or (report.when == "setup" and not report.passed):
            state = Outcome.PASSED if report.passed else (
                Outcome.SKIPPED if report.skipped else (
                    Outcome.FAILED if report.when == "call" else Outcome.ERROR))
        elif report.when == "teardown" and report.failed:
            state = Outcome.ERROR
        else:
            return None
        skip_reason = None
        if report.skipped and isinstance(report.longrepr, tuple):
            skip_reason = str(report.longrepr[2]).removeprefix("Skipped: ")
        cert = _param(params, "cert_api", "cert_path")
        return ScenarioOutcome(
            nodeid=report.nodeid,
            name=report.nodeid.split("::")[-1],
            outcome=state,
            duration=float(report.duration),
            flow=_param(params, "flow"),
            device_kind=_param(params, "device_kind"),
            payload_format=_param(params, "payload_format"),
            cert_path=CertPath(cert) if cert in ("keys", "csr") else None,
            skip_reason=skip_reason,
            longrepr=None if report.passed or report.skipped else str(report.longrepr),
        )

    def pytest_sessionfinish(self, session: pytest.Session) -> None:
        if hasattr(self.config, "workerinput"):
            return  # the controller writes the report
        from harness.reporting.writer import write_run

        record = RunRecord(
            run_id=new_run_id(self.started_at),
            kind=RunKind.SCENARIOS,
            endpoint_kind=str(self.config.getoption("--endpoint")),
            region=str(self.endpoint.get("region", self.config.getoption("--aws-region") or "")),
            account=self.endpoint.get("account_id"),
            versions=runtime_versions(),
            started_at=self.started_at,
            finished_at=time.time(),
            command_line=tuple(sys.argv),
            outcomes=tuple(self.outcomes.values()),
            devices=tuple(self.devices),
        )
        reports = Path(self.config.getoption("--fleetbench-report"))
        try:
            self.run_dir = write_run(record, reports)
        except Exception as exc:  # the run's verdict stands; say why it has no report
            self.error = (f"fleetbench report: ERROR: could not write the run's report "
                          f"to {reports}: {type(exc).__name__}: {exc}")
            if session.exitstatus == pytest.ExitCode.OK:
                session.exitstatus = pytest.ExitCode.INTERNAL_ERROR

    def pytest_terminal_summary(self, terminalreporter: Any) -> None:
        if self.run_dir is not None:
            terminalreporter.write_line(f"fleetbench report: {self.run_dir}")
        elif self.error is not None:
            terminalreporter.write_line(self.error, red=True, bold=True)
