"""Smoke runs of the broker benchmarks (bench/): the scripts work end to end.

No speed assertions (project rule: speed is measured by benchmarks, not timed
tests). Each run is the ``--quick`` configuration: a few connections for a fraction
of a second against mosquitto and the emulator, both started as subprocesses.
"""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest

ROOT = Path(__file__).resolve().parent.parent

pytestmark = pytest.mark.skipif(shutil.which("mosquitto") is None
                                and not Path("/usr/sbin/mosquitto").exists(),
                                reason="mosquitto is not installed")


def _run(module: str, *args: str, timeout: float = 120.0) -> subprocess.CompletedProcess[str]:
    proc = subprocess.run([sys.executable, "-m", module, *args], cwd=ROOT, capture_output=True,
                          text=True, timeout=timeout, stdin=subprocess.DEVNULL)
    assert proc.returncode == 0, f"{module} failed:\n{proc.stdout[-3000:]}\n{proc.stderr[-3000:]}"
    return proc


@pytest.fixture(scope="module")
def quick_report(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Any]:
    out = tmp_path_factory.mktemp("bench") / "report.json"
    proc = _run("bench.run_all", "--quick", "--json", str(out))
    assert "== summary" in proc.stdout
    report: dict[str, Any] = json.loads(out.read_text())
    return report


def _summary(report: dict[str, Any], broker: str) -> dict[str, Any]:
    return next(s for s in report["summaries"] if s["broker"] == broker)


# issue 2: mutual-TLS connects per second, p50/p99, broker CPU per connect, both brokers
def test_connect_benchmark_measures_both_brokers_over_mutual_tls(
        quick_report: dict[str, Any]) -> None:
    connects = quick_report["connects"]
    for broker in ("mosquitto", "emulator"):
        summary = _summary(connects, broker)
        assert summary["rate"] > 0 and summary["errors"] == 0
        assert summary["p50_ms"] <= summary["p99_ms"]
    assert connects["ratios"][0]["name"] == "rate ratio emulator/mosquitto"


# issue 2: publish-to-own-subscription 2 KB QoS 1 round trips, p50/p99, ratio
def test_round_trip_benchmark_gets_every_message_back_from_both_brokers(
        quick_report: dict[str, Any]) -> None:
    roundtrip = quick_report["roundtrip"]
    for broker in ("mosquitto", "emulator"):
        summary = _summary(roundtrip, broker)
        assert summary["rate"] > 0 and summary["errors"] == 0
    assert roundtrip["ratios"][0]["target"] == pytest.approx(1 / 3)


# issue 2: idle mutual-TLS connections held, broker RSS read from /proc
def test_idle_benchmark_holds_every_connection_and_reads_broker_memory(
        quick_report: dict[str, Any]) -> None:
    idle = quick_report["idle"]
    assert {r["broker"] for r in idle["runs"]} == {"mosquitto", "emulator"}
    for run in idle["runs"]:
        assert run["connections"] == 20 and run["errors"] == 0 and run["dropped"] == 0
        assert run["rss_after"] > 0
    assert idle["emulator_meets_target"] is True


def test_each_benchmark_script_documents_its_options() -> None:
    # the scripts also run on their own; run_all --quick above exercised their measuring code
    script = ("import contextlib, io, bench.broker_connects as c, bench.broker_roundtrip as r, "
              "bench.broker_idle as i, bench.run_all as a\n"
              "for m in (c, r, i, a):\n"
              "    out = io.StringIO()\n"
              "    with contextlib.redirect_stdout(out), contextlib.suppress(SystemExit):\n"
              "        m.main(['--help'])\n"
              "    assert '--quick' in out.getvalue() and '--brokers' in out.getvalue(), m\n")
    proc = subprocess.run([sys.executable, "-c", script], cwd=ROOT, capture_output=True,
                          text=True, timeout=60.0)
    assert proc.returncode == 0, proc.stderr[-3000:]
