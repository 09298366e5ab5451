"""``fleetbench report``: re-render a run, compare two runs, fail clearly on bad input."""

from __future__ import annotations

import argparse
import os
import subprocess
import sys

import pytest

from harness.reporting.cli import (
    EXIT_OK,
    EXIT_REGRESSION,
    EXIT_USAGE,
    add_report_parser,
    run_report,
)
from harness.reporting.writer import write_run
from tests.test_reporting_samples import scenario_record


def _run(argv: list[str]) -> int:
    parser = argparse.ArgumentParser(prog="fleetbench")
    add_report_parser(parser.add_subparsers(dest="command", required=True))
    args = parser.parse_args(argv)
    assert args.func is run_report
    return run_report(args)


@pytest.fixture
def runs(tmp_path):
    reports = tmp_path / "reports"
    base = write_run(scenario_record(tmp_path, run_id="base", fail_cbor_sdk=False), reports)
    new = write_run(scenario_record(tmp_path, run_id="new"), reports)
    return reports, base, new


def test_report_dir_rerenders_the_page_from_results_json(runs, capsys):
    _, base, _ = runs
    html = (base / "report.html").read_bytes()
    (base / "report.html").unlink()
    assert _run(["report", str(base)]) == EXIT_OK
    assert (base / "report.html").read_bytes() == html
    assert str(base / "report.html") in capsys.readouterr().out


def test_report_without_dir_rerenders_latest(runs):
    reports, _, new = runs
    (new / "junit.xml").unlink()
    assert _run(["report", "--reports-dir", str(reports)]) == EXIT_OK
    assert (new / "junit.xml").is_file()


def test_compare_prints_newly_failing_scenarios_and_writes_a_page(runs, capsys, tmp_path):
    reports, _, _ = runs
    page = tmp_path / "cmp" / "compare.html"
    code = _run(["report", "--reports-dir", str(reports), "--compare", "base", "new",
                 "--html", str(page)])
    out = capsys.readouterr().out
    assert code == EXIT_OK
    assert "Newly failing in B (2):" in out
    assert "scenarios/test_trusted_user.py::test_provisions[sdk-cbor]" in out
    assert '<table id="newly-failing">' in page.read_text()


def test_compare_can_fail_a_ci_job_on_regressions(runs):
    _, base, new = runs
    assert _run(["report", "--compare", str(base), str(new), "--fail-on-regression"]) == (
        EXIT_REGRESSION)
    assert _run(["report", "--compare", str(new), str(base), "--fail-on-regression"]) == EXIT_OK


def test_a_missing_run_is_a_usage_error_naming_it(tmp_path, capsys):
    assert _run(["report", str(tmp_path / "nope"), "--reports-dir", str(tmp_path)]) == EXIT_USAGE
    assert "nope: no results.json" in capsys.readouterr().err


def test_dir_and_compare_together_are_refused(runs, capsys):
    _, base, new = runs
    assert _run(["report", str(base), "--compare", str(base), str(new)]) == EXIT_USAGE
    assert "not both" in capsys.readouterr().err


def test_the_module_entry_point_opens_the_page_in_the_configured_browser(runs, tmp_path):
    _, base, _ = runs
    opened = tmp_path / "opened.txt"
    browser = (f"{sys.executable} -c \"import sys; open(r'{opened}', 'w').write(sys.argv[1])\" %s")
    env = {**os.environ, "BROWSER": browser}
    done = subprocess.run([sys.executable, "-m", "harness.reporting.cli", "report", str(base),
                           "--open"], env=env, capture_output=True, text=True, timeout=60)
    assert done.returncode == 0, done.stderr
    assert opened.read_text() == (base / "report.html").resolve().as_uri()
