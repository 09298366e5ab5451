"""``junit.xml`` for CI systems, rendered from a :class:`RunRecord`.

One ``testsuite`` per run with the run's coordinates as properties; one
``testcase`` per scenario outcome. A failing case carries the AWS error code
and message in its ``failure``/``error`` element and the logs of the devices
it used in ``system-out``, where CI systems show them beside the failure.
Text is redacted again and stripped of characters XML 1.0 cannot carry.
"""

from __future__ import annotations

import re
import time
import xml.etree.ElementTree as ET

from harness.reporting.records import Outcome, RunRecord, ScenarioOutcome

_XML_INVALID = re.compile("[\x00-\x08\x0b\x0c\x0e-\x1f\ufffe\uffff]")


def xml_text(text: str) -> str:
    """``text`` without characters XML 1.0 forbids (device logs may hold any byte)."""
    return _XML_INVALID.sub("\ufffd", text)


def classname(nodeid: str) -> str:
    """JUnit class name from a pytest node id: ``scenarios/test_claim.py::T::x`` ->
    ``scenarios.test_claim.T``."""
    parts = nodeid.split("::")
    module = parts[0].removesuffix(".py").replace("/", ".").replace("\\", ".")
    return ".".join([module, *parts[1:-1]]) if len(parts) > 1 else module


def device_logs(record: RunRecord, outcome: ScenarioOutcome) -> str:
    """The logs of the devices an outcome used, each under a header naming the full log."""
    chunks = []
    for device_id in outcome.device_ids:
        device = record.device(device_id)
        if device is None:
            continue
        where = f" (full log: {device.log_path})" if device.log_path else ""
        chunks.append(f"===== device {device.device_id} [{device.kind}]{where} =====\n"
                      f"{device.log_excerpt or '(no log captured)'}\n")
    return "\n".join(chunks)


def _failure_message(outcome: ScenarioOutcome) -> str:
    if outcome.error_code or outcome.error_message:
        return ": ".join(p for p in (outcome.error_code, outcome.error_message) if p)
    first = (outcome.longrepr or "").strip().splitlines()
    return first[-1] if first else outcome.outcome.value


def render_junit(record: RunRecord) -> str:
    """The JUnit XML document of a run (secrets masked)."""
    record = record.redacted()
    summary = record.summary
    suites = ET.Element("testsuites", {
        "name": "fleetbench",
        "tests": str(summary.total),
        "failures": str(summary.failed),
        "errors": str(summary.error),
        "skipped": str(summary.skipped),
        "time": f"{record.duration:.3f}",
    })
    suite = ET.SubElement(suites, "testsuite", {
        "name": f"fleetbench.{record.kind.value}",
        "tests": str(summary.total),
        "failures": str(summary.failed),
        "errors": str(summary.error),
        "skipped": str(summary.skipped),
        "time": f"{record.duration:.3f}",
        "timestamp": time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(record.started_at)),
    })
    props = ET.SubElement(suite, "properties")
    for name, value in (
        ("run_id", record.run_id),
        ("kind", record.kind.value),
        ("endpoint_kind", record.endpoint_kind),
        ("region", record.region),
        ("account", record.account or ""),
        ("command_line", " ".join(record.command_line)),
        *((f"version.{k}", v) for k, v in sorted(record.versions.items())),
    ):
        ET.SubElement(props, "property", {"name": name, "value": xml_text(value)})
    for outcome in record.outcomes:
        case = ET.SubElement(suite, "testcase", {
            "classname": classname(outcome.nodeid),
            "name": xml_text(outcome.name),
            "time": f"{outcome.duration:.3f}",
            "file": outcome.nodeid.split("::")[0],
        })
        if outcome.outcome is Outcome.SKIPPED:
            ET.SubElement(case, "skipped", {"message": xml_text(outcome.skip_reason or "")})
        elif outcome.outcome.failing:
            tag = "failure" if outcome.outcome is Outcome.FAILED else "error"
            element = ET.SubElement(case, tag, {
                "message": xml_text(_failure_message(outcome)),
                "type": outcome.error_code or tag,
            })
            element.text = xml_text(outcome.longrepr or "")
            logs = device_logs(record, outcome)
            if logs:
                ET.SubElement(case, "system-out").text = xml_text(logs)
    ET.indent(suites)
    return ET.tostring(suites, encoding="unicode", xml_declaration=True) + "\n"
