"""write_run leaves results.json, junit.xml, report.html and logs/ that agree and leak nothing."""

from __future__ import annotations

import json
import os
import xml.etree.ElementTree as ET
from dataclasses import replace

import pytest

from harness.reporting import writer
from harness.reporting.html import render_html
from harness.reporting.redact import contains_secret
from harness.reporting.schema import validate
from harness.reporting.writer import (
    LOG_EXCERPT_LIMIT,
    ReportError,
    compare,
    load_run,
    log_file_name,
    rerender,
    write_run,
)
from tests.test_reporting_samples import (
    BARE_TOKEN,
    PEM_BODY_LINE,
    TOKEN,
    load_record,
    scenario_record,
)


@pytest.fixture
def scenario_dir(tmp_path):
    """A scenario run written under tmp_path/reports, one failing device log over the limit."""
    record = scenario_record(tmp_path, big_log_chars=LOG_EXCERPT_LIMIT * 2)
    return write_run(record, tmp_path / "reports", secrets=[BARE_TOKEN])


def test_write_run_lays_out_the_run_directory(scenario_dir):
    names = sorted(p.name for p in scenario_dir.iterdir())
    assert names == ["junit.xml", "logs", "report.html", "results.json"]
    assert len(list((scenario_dir / "logs").glob("*.log"))) == 8
    assert (scenario_dir / "results.json").stat().st_mode & 0o777 == 0o644


def test_results_json_follows_its_schema(scenario_dir):
    data = json.loads((scenario_dir / "results.json").read_text())
    validate(data)
    assert data["summary"] == {"total": 11, "passed": 7, "failed": 2, "skipped": 1, "error": 1}
    assert data["run"]["command_line"] == ["pytest", "scenarios", "--endpoint=emulator"]
    assert all(d["log_path"].startswith("logs/") for d in data["devices"])


def test_junit_xml_parses_with_counts_and_logs_of_failing_cases(scenario_dir):
    root = ET.parse(scenario_dir / "junit.xml").getroot()
    suite = root.find("testsuite")
    assert suite is not None
    assert (suite.get("tests"), suite.get("failures"), suite.get("errors"),
            suite.get("skipped")) == ("11", "2", "1", "1")
    cases = {f'{c.get("classname")}::{c.get("name")}': c for c in suite.iter("testcase")}
    failing = cases["scenarios.test_claim::test_provisions[sdk-cbor]"]
    failure = failing.find("failure")
    assert failure is not None
    # spec fleet-provisioning §1.5: the rejected payload's errorCode/errorMessage are shown
    assert failure.get("type") == "InvalidCertificateOwnershipToken"
    assert "Certificate ownership token cannot be empty." in (failure.get("message") or "")
    out = failing.findtext("system-out") or ""
    assert "===== device sdk-claim-cbor [sdk]" in out
    assert "event=step device=sdk-claim-cbor" in out
    assert cases["scenarios.test_claim::test_provisions[virtual-json]"].find("system-out") is None
    skipped = cases["scenarios.test_claim::test_on_board[esp32-json]"].find("skipped")
    assert skipped is not None and "no lab bench" in (skipped.get("message") or "")
    assert cases["scenarios.test_claim::test_hook_denies[virtual-json]"].find("error") is not None


def test_no_private_key_or_token_appears_in_any_written_file(scenario_dir):
    # spec fleet-provisioning §1.2 (privateKey), §1.6 (ownership token), §2.2 (keyPair)
    files = [p for p in scenario_dir.parent.rglob("*") if p.is_file()]
    assert len(files) >= 11
    for path in files:
        text = path.read_text(encoding="utf-8")
        assert not contains_secret(text, [TOKEN, PEM_BODY_LINE, BARE_TOKEN]), path


def test_a_long_log_is_truncated_with_a_note_and_a_link_to_the_full_file(scenario_dir):
    record = load_run(scenario_dir)
    device = record.device("sdk-claim-cbor")
    assert device is not None and device.log_excerpt is not None
    assert device.log_path == "logs/sdk-claim-cbor.log"
    assert device.log_excerpt.startswith("[log truncated: showing the last ")
    assert "full log: logs/sdk-claim-cbor.log]" in device.log_excerpt
    assert len(device.log_excerpt) <= LOG_EXCERPT_LIMIT + 200
    full = (scenario_dir / device.log_path).read_text()
    assert len(full) > LOG_EXCERPT_LIMIT * 2 and "line 000000 of a long device log" in full
    html = (scenario_dir / "report.html").read_text()
    assert '<a class="full-log" href="logs/sdk-claim-cbor.log">' in html
    assert "[log truncated: showing the last" in html
    short = record.device("virtual-claim-json")
    assert short is not None and short.log_excerpt is not None
    assert not short.log_excerpt.startswith("[log truncated")


def test_rerendering_from_results_json_gives_the_same_files(scenario_dir):
    html = (scenario_dir / "report.html").read_bytes()
    junit = (scenario_dir / "junit.xml").read_bytes()
    (scenario_dir / "report.html").unlink()
    assert rerender(scenario_dir) == scenario_dir / "report.html"
    assert (scenario_dir / "report.html").read_bytes() == html
    assert (scenario_dir / "junit.xml").read_bytes() == junit
    assert render_html(load_run(scenario_dir)) == html.decode()


def test_latest_points_at_the_newest_run(tmp_path):
    reports = tmp_path / "reports"
    write_run(load_record(run_id="load-1"), reports)
    second = write_run(load_record(run_id="load-2"), reports)
    latest = reports / "latest"
    assert latest.is_symlink() and os.readlink(latest) == "load-2"
    assert load_run(latest).run_id == "load-2" == second.name


def test_latest_is_a_copy_where_symlinks_fail(tmp_path, monkeypatch):
    def no_symlinks(*args, **kwargs):
        raise OSError("symlinks not supported here")

    reports = tmp_path / "reports"
    monkeypatch.setattr(writer.os, "symlink", no_symlinks)
    write_run(load_record(run_id="load-1"), reports)
    write_run(load_record(run_id="load-2"), reports)
    latest = reports / "latest"
    assert latest.is_dir() and not latest.is_symlink()
    assert load_run(latest).run_id == "load-2"
    assert (latest / "report.html").read_text() == (reports / "load-2" / "report.html").read_text()


def test_a_load_report_has_its_charts_and_step_table(tmp_path):
    run_dir = write_run(load_record(), tmp_path / "reports")
    html = (run_dir / "report.html").read_text()
    for chart in ("chart-flows", "chart-latency", "chart-hist-connect",
                  "chart-hist-CreateCertificateFromCsr", "chart-hist-RegisterThing"):
        assert f'<svg class="chart" id="{chart}"' in html
    assert '<table id="load-steps">' in html
    assert "https://" not in html.replace("http://www.w3.org/2000/svg", "")


def test_compare_names_newly_failing_scenarios_and_rate_changes(tmp_path):
    reports = tmp_path / "reports"
    a = write_run(scenario_record(tmp_path, run_id="base", fail_cbor_sdk=False), reports)
    b = write_run(scenario_record(tmp_path, run_id="new"), reports)
    text = compare(a, b)
    assert "Newly failing in B (2):" in text
    assert "FAILED  scenarios/test_claim.py::test_provisions[sdk-cbor]" in text
    assert "InvalidCertificateOwnershipToken" in text
    assert "Still failing (1):" in text  # the error is in both runs
    page = compare(a, b, fmt="html")
    assert '<table id="newly-failing">' in page and page.startswith("<!DOCTYPE html>")

    la = write_run(load_record(run_id="load-a", rate=150.0, p99=40.0), reports)
    lb = write_run(load_record(run_id="load-b", rate=100.0, p99=120.0), reports)
    text = compare(la, lb)
    assert "RegisterThing: req/s 150 → 100 (-33%)" in text
    assert "Newly failing in B (1):" in text and "p99_under_budget" in text
    assert "Flows per second (A → B): mean" in text


def test_reading_a_broken_results_json_names_the_file(tmp_path):
    run_dir = tmp_path / "broken"
    run_dir.mkdir()
    (run_dir / "results.json").write_text('{"schema_version": "1", "run": {}}')
    with pytest.raises(ReportError, match=r"broken/results.json: .*\$\.run"):
        load_run(run_dir)
    (run_dir / "results.json").write_text('{"schema_version": "99"}')
    with pytest.raises(ReportError, match="schema_version '99'"):
        load_run(run_dir)
    with pytest.raises(ReportError, match="not found"):
        load_run(tmp_path / "nowhere")


def test_log_file_names_are_safe_and_unique():
    assert log_file_name("thing/01:a") == "thing_01_a.log"
    assert log_file_name("../..") == "device.log"
    assert log_file_name("a", taken={"a.log"}) == "a-2.log"


def test_a_device_without_any_log_is_written_without_a_link(tmp_path):
    base = scenario_record(tmp_path)
    quiet = replace(base.devices[0], log_path=None, log_excerpt=None)
    run_dir = write_run(replace(base, devices=(quiet, *base.devices[1:])), tmp_path / "reports")
    again = load_run(run_dir)
    assert again.devices[0].log_path is None and again.devices[0].log_excerpt is None
    assert f'href="logs/{quiet.device_id}.log"' not in (run_dir / "report.html").read_text()
    assert not (run_dir / "logs" / f"{quiet.device_id}.log").exists()
