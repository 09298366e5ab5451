"""Short headless Locust runs against the emulator: every user class, the ``fleetbench load``
command, and distributed mode (a master and two workers on loopback) (issue 8).

Locust runs in subprocesses, as users run it: importing Locust here would patch this test
process with gevent. Each run is a few seconds at a low rate; the assertions read what a
user reads: the exit status, Locust's CSV files and the harness's ``results.json``.
"""

from __future__ import annotations

import csv
import importlib.util
import json
import os
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from harness.reporting.writer import load_run

LOCUSTFILE = Path(__file__).resolve().parent.parent / "loadtests" / "locustfile.py"
#: Seconds a short run may take end to end (emulator, Locust start, run, truth, teardown).
RUN_TIMEOUT_S = 120
STEP_ROWS = {"connect(claim)", "RegisterThing", "connect(device)", "flow"}


@pytest.fixture(scope="module")
def emulator() -> Iterator[Any]:
    """One emulator subprocess for the module's runs (each run makes its own fleet)."""
    from harness.endpoints.local import LocalEndpoint

    ep = LocalEndpoint.start()
    try:
        yield ep
    finally:
        ep.close()


def run(cmd: list[str], cwd: Path) -> subprocess.CompletedProcess[str]:
    env = {**os.environ, "GEVENT_RESOLVER": "block"}
    return subprocess.run(cmd, cwd=cwd, env=env, capture_output=True, text=True,
                          timeout=RUN_TIMEOUT_S, check=False)


def rows(path: Path) -> list[dict[str, str]]:
    with path.open(newline="") as fh:
        return list(csv.DictReader(fh))


def stats_by_name(run_dir: Path) -> dict[str, dict[str, str]]:
    return {r["Name"]: r for r in rows(run_dir / "locust_stats.csv")}


def results(run_dir: Path) -> dict[str, Any]:
    record = load_run(run_dir)  # validates results.json against its schema
    assert record.load is not None
    return dict(record.load.settings)


def test_each_user_class_runs_complete_flows_headless_in_cbor(emulator: Any,
                                                              tmp_path: Path) -> None:
    # a few seconds of each flow at once: by claim (keys, CSR) and by trusted user
    run_id = "every-user-class"
    done = run([sys.executable, "-m", "locust", "-f", str(LOCUSTFILE), "ClaimKeysUser",
                "ClaimCsrUser", "TrustedUserUser", "--headless", "--only-summary",
                "--fleet-endpoint-file", str(emulator.data_dir / "endpoint.json"),
                "--fleet-shape", "steady", "--fleet-rate", "6", "--fleet-duration", "4s",
                "--fleet-format", "cbor", "--csv", str(tmp_path / run_id / "locust"),
                "--csv-full-history", "--fleet-reports-dir", str(tmp_path),
                "--fleet-run-id", run_id], tmp_path)
    assert done.returncode == 0, done.stderr[-3000:]
    run_dir = tmp_path / run_id
    stats = stats_by_name(run_dir)
    for name in STEP_ROWS | {"CreateKeysAndCertificate", "CreateCertificateFromCsr",
                             "CreateProvisioningClaim"}:
        assert int(stats[name]["Request Count"]) > 0, name
        assert int(stats[name]["Failure Count"]) == 0, name
    assert stats["CreateProvisioningClaim"]["Type"] == "HTTPS"
    settings = results(run_dir)
    assert settings["flow"]["payload_format"] == "cbor"
    assert settings["flow"]["user_classes"] == ["ClaimCsrUser", "ClaimKeysUser",
                                                "TrustedUserUser"]
    truth = settings["truth"]
    assert truth["ok"] and truth["verified"] == truth["successes"] == settings["totals"]["ok"]
    assert settings["totals"]["ok"] == int(stats["flow"]["Request Count"])
    assert settings["cleanup"]["leftovers"] == []


QUOTAS = importlib.util.find_spec("harness.emulator.quotas") is not None


def test_fleetbench_load_writes_locust_csv_and_the_harness_results(tmp_path: Path) -> None:
    # fleetbench load --endpoint local starts (and stops) an emulator for the run; with a
    # RegisterThing quota below the rate, devices are throttled and back off (spec fleet §5)
    quota = ["--quota", "RegisterThing=2/s", "--max-attempts", "8"] if QUOTAS else []
    done = run([sys.executable, "-m", "harness.load_cli", "--endpoint", "local",
                "--flow", "claim-csr", "--rate", "4", "--duration", "3s", *quota,
                "--reports-dir", str(tmp_path), "--run-id", "cli-run"], tmp_path)
    settings = results(tmp_path / "cli-run")
    totals = settings["totals"]
    assert done.returncode == (1 if totals["failed"] else 0), done.stderr[-2000:]
    run_dir = tmp_path / "cli-run"
    stats = rows(run_dir / "locust_stats.csv")
    mqtt = {r["Name"]: r for r in stats if r["Type"] == "MQTT"}
    assert set(mqtt) == STEP_ROWS | {"CreateCertificateFromCsr"}
    assert stats[-1]["Name"] == "Aggregated"
    history = rows(run_dir / "locust_stats_history.csv")
    assert {r["Name"] for r in history} >= STEP_ROWS | {"CreateCertificateFromCsr",
                                                        "Aggregated"}
    assert (run_dir / "locust.html").is_file() and (run_dir / "report.html").is_file()
    flows = int(mqtt["flow"]["Request Count"])
    assert totals["ok"] + totals["failed"] == flows > 0
    assert totals["failed"] == totals["throttled_out"]  # throttling is the only failure
    assert settings["truth"]["ok"] and settings["truth"]["verified"] == totals["ok"]
    assert settings["shape"] == {"shape": "steady", "rate": 4.0, "duration_s": 3.0,
                                 "users": 8, "pacing_s": 2.0}
    assert settings["cpu"]["emulator_ms_per_flow"] > 0  # the emulator's own CPU, from /proc
    assert f"truth: {totals['ok']} of {totals['ok']} successful flows verified" in done.stdout
    if QUOTAS:
        throttled = {r["Name"]: r for r in stats if r["Type"] == "THROTTLE"}
        assert totals["throttles"]["RegisterThing"] == \
            int(throttled["RegisterThing"]["Request Count"]) > 0
        assert int(mqtt["RegisterThing"]["Failure Count"]) == totals["throttled_out"]
    data = json.loads((run_dir / "results.json").read_text())
    assert "PRIVATE KEY" not in json.dumps(data)


def test_distributed_mode_one_master_and_two_workers_on_loopback(emulator: Any,
                                                                 tmp_path: Path) -> None:
    done = run([sys.executable, "-m", "harness.load_cli",
                "--endpoint-file", str(emulator.data_dir / "endpoint.json"),
                "--workers", "2", "--flow", "claim-keys", "--rate", "6", "--duration", "4s",
                "--reports-dir", str(tmp_path), "--run-id", "distributed"], tmp_path)
    assert done.returncode == 0, done.stdout[-2000:] + done.stderr[-2000:]
    run_dir = tmp_path / "distributed"
    master_log = (run_dir / "locust-master.log").read_text()
    assert "2 workers" in master_log or "(2 total users)" in master_log or \
        master_log.count("Worker") >= 2
    for worker in (1, 2):
        assert (run_dir / f"locust-worker-{worker}.log").is_file()
    settings = results(run_dir)
    stats = stats_by_name(run_dir)
    flows = int(stats["flow"]["Request Count"])
    # every worker's flows reached the master: Locust's count, the harness's, the endpoint's
    assert settings["totals"]["ok"] == flows > 0
    assert settings["truth"]["ok"] and settings["truth"]["verified"] == flows
    assert settings["cpu"]["load_generator_processes"] == 3  # master + two final reports
    assert int(stats["CreateKeysAndCertificate"]["Failure Count"]) == 0
