"""report.html opens from disk in headless Chromium, cleanly, with its counts and charts.

How a clean render is judged (two independent signals, both must hold):

1. The page checks itself. A script in ``<head>`` counts script errors,
   ``console.error`` calls, failed resource loads and Content-Security-Policy
   violations into ``<html data-js-errors>``; the page's CSP forbids every
   fetch, so any network access is such a violation. A script at the end of
   ``<body>`` sets ``data-render-ok="1"`` once everything before it ran.
   ``--dump-dom`` prints the DOM after the load event, attributes included.
2. Chromium itself logs every console message of the page to stderr as
   ``...:CONSOLE...`` lines under ``--enable-logging=stderr``; there must be none.

The last test breaks a copy of the page on purpose to prove both signals fire.
Screenshots go to the test's tmp dir and to ``reports/artifacts/``.
"""

from __future__ import annotations

import re
import shutil
import subprocess
from pathlib import Path

import pytest

from harness.reporting.writer import write_run
from tests.test_reporting_samples import load_record, scenario_record

CHROMIUM = shutil.which("chromium") or shutil.which("chromium-browser")
ARTIFACTS = Path(__file__).resolve().parents[1] / "reports" / "artifacts"

pytestmark = pytest.mark.skipif(
    CHROMIUM is None,
    reason="Chromium not found on PATH (Debian package 'chromium'; .ci/run installs it)",
)


def open_in_chromium(page: Path, profile: Path, screenshot: Path) -> tuple[str, list[str]]:
    """Load ``page`` headless; returns the DOM after load and the page's console lines."""
    assert CHROMIUM is not None
    done = subprocess.run(
        [CHROMIUM, "--headless", "--no-sandbox", "--disable-gpu", "--disable-dev-shm-usage",
         "--no-first-run", "--disable-background-networking", "--disable-component-update",
         "--disable-sync", f"--user-data-dir={profile}", "--enable-logging=stderr", "--v=0",
         "--hide-scrollbars", "--window-size=1280,2400", f"--screenshot={screenshot}",
         "--dump-dom", page.resolve().as_uri()],
        capture_output=True, text=True, timeout=120, check=False,
    )
    assert done.returncode == 0, done.stderr[-2000:]
    console = [line for line in done.stderr.splitlines() if ":CONSOLE" in line]
    return done.stdout, console


def _root_attrs(dom: str) -> dict[str, str]:
    match = re.search(r"<html([^>]*)>", dom)
    assert match, dom[:500]
    return dict(re.findall(r'([\w-]+)="([^"]*)"', match.group(1)))


def _keep(screenshot: Path, name: str) -> None:
    assert screenshot.is_file() and screenshot.stat().st_size > 10_000
    ARTIFACTS.mkdir(parents=True, exist_ok=True)
    shutil.copyfile(screenshot, ARTIFACTS / name)


@pytest.fixture(scope="module")
def written(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("chromium-reports")
    reports = tmp / "reports"
    scenario = write_run(scenario_record(tmp, big_log_chars=20_000), reports)
    load = write_run(load_record(), reports)
    return tmp, scenario, load


def test_the_scenario_report_renders_cleanly_with_its_summary_counts(written):
    tmp, run_dir, _ = written
    shot = tmp / "report-scenarios.png"
    dom, console = open_in_chromium(run_dir / "report.html", tmp / "profile-s", shot)
    attrs = _root_attrs(dom)
    assert attrs.get("data-render-ok") == "1"
    assert attrs.get("data-js-errors") == "0"
    assert console == []
    for name, count in (("total", 11), ("passed", 7), ("failed", 2), ("error", 1),
                        ("skipped", 1)):
        assert f'<span class="n" id="count-{name}">{count}</span>' in dom
    assert 'id="matrix"' in dom
    # failing cases come first, with the AWS error (spec fleet-provisioning §1.5)
    assert dom.index('id="failing"') < dom.index('id="devices"')
    assert "InvalidCertificateOwnershipToken" in dom
    assert dom.count('<svg class="chart" id="timeline-') == 8
    _keep(shot, "report-scenarios.png")


def test_the_load_report_renders_its_charts(written):
    tmp, _, run_dir = written
    shot = tmp / "report-load.png"
    dom, console = open_in_chromium(run_dir / "report.html", tmp / "profile-l", shot)
    attrs = _root_attrs(dom)
    assert attrs.get("data-render-ok") == "1" and attrs.get("data-js-errors") == "0"
    assert console == []
    assert attrs.get("data-charts") == "5"
    for chart in ("chart-flows", "chart-latency", "chart-hist-connect",
                  "chart-hist-CreateCertificateFromCsr", "chart-hist-RegisterThing"):
        assert f'id="{chart}"' in dom
    assert dom.count('class="series"') >= 4 and dom.count('class="bar"') == 27
    _keep(shot, "report-load.png")


def test_a_broken_page_is_caught_by_both_checks(written):
    tmp, _, run_dir = written
    broken = run_dir / "broken.html"
    html = (run_dir / "report.html").read_text()
    broken.write_text(html.replace(
        "<main>", '<main><img src="http://127.0.0.1:9/x.png"><script>noSuchFunction();</script>',
        1))
    dom, console = open_in_chromium(broken, tmp / "profile-b", tmp / "broken.png")
    attrs = _root_attrs(dom)
    assert attrs.get("data-render-ok") == "1"
    assert int(attrs.get("data-js-errors", "0")) >= 2
    assert any("noSuchFunction" in line for line in console)
