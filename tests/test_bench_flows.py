"""Smoke run of the provisioning flow benchmark (bench/provisioning_flows.py, issue 3).

No speed assertions (speed is measured by benchmarks, not timed tests): the ``--quick``
configuration runs a few complete CSR flows against a stock emulator subprocess, once
with the emulator pinned apart from the load generator and once with both sharing every
CPU, and the report states both figures.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent


@pytest.mark.skipif(len(os.sched_getaffinity(0)) < 2, reason="pinning needs two CPUs")
def test_quick_csr_flows_are_measured_pinned_and_shared_and_reported_both_ways(
        tmp_path: Path) -> None:
    out = tmp_path / "flows.json"
    proc = subprocess.run([sys.executable, "-m", "bench.provisioning_flows", "--quick",
                           "--only", "csr", "--json", str(out)], cwd=ROOT, capture_output=True,
                          text=True, timeout=180, stdin=subprocess.DEVNULL)
    assert proc.returncode == 0, f"{proc.stdout[-3000:]}\n{proc.stderr[-3000:]}"
    measurements = json.loads(out.read_text())["measurements"]
    assert [m["cpus"] for m in measurements] == ["pinned", "shared"]
    for m in measurements:
        assert m["ops"] > 0 and m["errors"] == 0, m
        assert m["server_cpu_ms_per_op"] > 0 and m["client_cpu_ms_per_op"] > 0
        speed = m["reference_work_ms"]  # the machine's speed, read around each measurement
        assert speed["before"] > 0 and speed["after"] > 0
    assert "emulator capacity per core:" in proc.stdout
    cpus = len(os.sched_getaffinity(0))
    assert f"on {cpus} shared CPUs, load generator included:" in proc.stdout


def test_the_machine_speed_reference_is_positive_and_printed() -> None:
    from bench import machine_speed

    assert machine_speed.reference_ms(runs=1) > 0
    proc = subprocess.run([sys.executable, "-m", "bench.machine_speed", "--runs", "1"],
                          cwd=ROOT, capture_output=True, text=True, timeout=60,
                          stdin=subprocess.DEVNULL)
    assert proc.returncode == 0 and "reference work:" in proc.stdout, proc.stderr


def test_the_report_gives_a_verdict_for_each_target_it_measured() -> None:
    import argparse

    from bench import common
    from bench.provisioning_flows import CpuMode, Measurement, report

    def measured(name: str, ops: int, p99: float) -> Measurement:
        run = common.Run(broker="emulator", ops=ops, seconds=60.0, errors=0, p50_ms=30.0,
                         p99_ms=p99, server_cpu_s=0.4 * ops / 60, client_cpu_s=0.3 * ops / 60)
        return Measurement(name, run, {}, 100.0, CpuMode.SHARED, (30.0, 31.0))

    text = report({"measurements": [measured("csr x48", 9_600, 400.0),
                                    measured("csr-rate @ 100/s", 6_000, 260.0)]},
                  argparse.Namespace(rate=100.0))
    assert "load generator included: 160.0 (issue 3 target >= 150: meets target)" in text
    assert "CSR p99 at 100 flows/s (shared CPUs, load generator included): 260.0 ms " \
           "(target < 250 ms: MISSES target)" in text
    assert "30/31" in text  # the machine's speed around each measurement


def test_the_sdk_sample_shape_subscribing_before_each_call_still_runs(tmp_path: Path) -> None:
    out = tmp_path / "flows.json"
    proc = subprocess.run([sys.executable, "-m", "bench.provisioning_flows", "--quick",
                           "--only", "csr", "--cpus", "shared", "--subscribe", "per-call",
                           "--json", str(out)], cwd=ROOT, capture_output=True, text=True,
                          timeout=180, stdin=subprocess.DEVNULL)
    assert proc.returncode == 0, f"{proc.stdout[-3000:]}\n{proc.stderr[-3000:]}"
    [m] = json.loads(out.read_text())["measurements"]
    assert m["ops"] > 0 and m["errors"] == 0, m
