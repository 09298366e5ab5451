"""Hand-built run records shared by the reporting tests (no tests in this module).

A scenario run covers flow x device kind x payload format with passes,
failures, an error and skips, and plants secrets where careless code would
leak them: a claim key and a ``keyPair.PrivateKey`` in device inputs, an
ownership token in a trace step, the registry state and the device log, an
AWS accepted payload with ``privateKey`` in the log (spec fleet-provisioning
§1.2, §1.6, §2.2). A load run has a time series and per-API histograms.
"""

from __future__ import annotations

import itertools
import random
from pathlib import Path

from harness.pki import generate_ec_key, private_key_pem
from harness.reporting.records import (
    CertPath,
    DeviceRecord,
    Histogram,
    HistogramBucket,
    LoadSummary,
    Outcome,
    RunKind,
    RunRecord,
    ScenarioOutcome,
    SeriesPoint,
    StepStats,
    TraceStep,
)

T0 = 1_764_432_000.0  # 2025-11-29T16:00:00Z
#: A planted ownership token (shape observed in spec §1.6: base64 of a JSON object).
TOKEN = ("eyJ2ZXJzaW9uIjoiMjAxOTEwMjMiLCJjaXBoZXIiOiJQbGFudGVkU2VjcmV0Q2lwaGVy"
         "VGV4dDEyMzQ1Njc4OTAifQ==")
#: A planted token that appears in free text with no key name beside it.
BARE_TOKEN = "bare-token-7f3a9c2e5b1d4e6f8a0b"
PEM = private_key_pem(generate_ec_key())
PEM_BODY_LINE = PEM.splitlines()[1]

FLOWS = ("claim", "trusted_user")
KINDS = ("virtual", "sdk")
FORMATS = ("json", "cbor")


def _trace(start: float, ok: bool) -> tuple[TraceStep, ...]:
    steps = [
        TraceStep("claim_connect", start, 0.012, True, {"certificateId": "c1aa" * 16}),
        TraceStep("subscribe", start + 0.013, 0.002, True),
        TraceStep("create_certificate", start + 0.016, 0.045, True,
                  {"certificateId": "d3ad" * 16, "certificateOwnershipToken": TOKEN}),
        TraceStep("register_thing", start + 0.062, 0.030, ok,
                  {} if ok else {"statusCode": 400,
                                 "errorCode": "InvalidCertificateOwnershipToken"}),
    ]
    if ok:
        steps.append(TraceStep("reconnect", start + 0.095, 0.011, True))
        steps.append(TraceStep("thing_registered", start + 0.107, None, True))
    return tuple(steps)


def device_log(device_id: str, lines: int = 20) -> str:
    """A device log with a leaked accepted payload and a raw PEM in it."""
    out = [f"[{i:04d}] event=step device={device_id} msg=working" for i in range(lines)]
    escaped_pem = PEM.replace("\n", "\\n")
    out.insert(3, f'rx $aws/certificates/create/json/accepted {{"certificateId": "d3ad", '
                  f'"privateKey": "{escaped_pem}", "certificateOwnershipToken": "{TOKEN}"}}')
    out.insert(5, "writing key:\n" + PEM.rstrip("\n"))
    out.insert(7, f"tx RegisterThing certificateOwnershipToken={TOKEN} parameters=...")
    return "\n".join(out) + "\n"


def scenario_record(tmp: Path, *, run_id: str = "run-a", big_log_chars: int = 0,
                    fail_cbor_sdk: bool = True) -> RunRecord:
    """A scenario run over flow x kind x format; device logs are written under ``tmp``."""
    outcomes: list[ScenarioOutcome] = []
    devices: list[DeviceRecord] = []
    for i, (flow, kind, fmt) in enumerate(itertools.product(FLOWS, KINDS, FORMATS)):
        device_id = f"{kind}-{flow}-{fmt}"
        failing = fail_cbor_sdk and kind == "sdk" and fmt == "cbor"
        log = device_log(device_id)
        if big_log_chars and failing:
            filler = "".join(f"line {n:06d} of a long device log\n" for n in
                             range(big_log_chars // 28 + 1))
            log = filler + log
        log_file = tmp / f"src-{device_id}.log"
        log_file.write_text(log, encoding="utf-8")
        devices.append(DeviceRecord(
            device_id=device_id,
            kind=kind,
            inputs={"template": "fleet-template", "serial": f"SN{i:04d}",
                    "claimKey": PEM, "keyPair": {"PublicKey": "-----BEGIN PUBLIC KEY-----x",
                                                 "PrivateKey": PEM}},
            trace=_trace(T0 + i, ok=not failing),
            registry_state={"thingName": f"thing-{i}", "certificateStatus": "ACTIVE",
                            "policies": ["device-policy"], "lastToken": TOKEN},
            log_path=str(log_file),
            thing_name=None if failing else f"thing-{i}",
            certificate_id="d3ad" * 16,
        ))
        outcomes.append(ScenarioOutcome(
            nodeid=f"scenarios/test_{flow}.py::test_provisions[{kind}-{fmt}]",
            name=f"test_provisions[{kind}-{fmt}]",
            outcome=Outcome.FAILED if failing else Outcome.PASSED,
            duration=0.25 + i / 10,
            flow=flow,
            device_kind=kind,
            payload_format=fmt,
            cert_path=CertPath.CSR if i % 2 else CertPath.KEYS,
            error_code="InvalidCertificateOwnershipToken" if failing else None,
            error_message="Certificate ownership token cannot be empty." if failing else None,
            longrepr=(f"AssertionError: RegisterThing rejected\n  token={TOKEN}\n"
                      f"  {BARE_TOKEN}") if failing else None,
            device_ids=(device_id,),
        ))
    outcomes.append(ScenarioOutcome(
        nodeid="scenarios/test_claim.py::test_on_board[esp32-json]",
        name="test_on_board[esp32-json]", outcome=Outcome.SKIPPED, flow="claim",
        device_kind="board", payload_format="json",
        skip_reason="no lab bench configured (--bench)"))
    outcomes.append(ScenarioOutcome(
        nodeid="scenarios/test_claim.py::test_hook_denies[virtual-json]",
        name="test_hook_denies[virtual-json]", outcome=Outcome.ERROR, duration=0.01,
        flow="claim", device_kind="virtual", payload_format="json", cert_path=CertPath.KEYS,
        longrepr="fixture 'hook_server' failed: address already in use"))
    outcomes.append(ScenarioOutcome(
        nodeid="scenarios/test_control_plane.py::test_list_templates",
        name="test_list_templates", outcome=Outcome.PASSED, duration=0.05))
    return RunRecord(
        run_id=run_id, kind=RunKind.SCENARIOS, endpoint_kind="emulator", region="us-east-1",
        account="123456789012", versions={"fleetbench": "0.1.0", "python": "3.11.2"},
        started_at=T0, finished_at=T0 + 42.5,
        command_line=("pytest", "scenarios", "--endpoint=emulator"),
        outcomes=tuple(outcomes), devices=tuple(devices))


def load_record(*, run_id: str = "load-a", rate: float = 150.0, p99: float = 40.0) -> RunRecord:
    """A load run: per-step stats, 60 s of series, histograms per API."""
    rng = random.Random(7)
    series = tuple(
        SeriesPoint(t=float(t), flows_per_s=0.0 if t == 0 else min(rate, rate * t / 10)
                    + rng.uniform(-5, 5),
                    p50=None if t == 0 else 8 + rng.uniform(0, 2),
                    p95=None if t == 0 else 20 + rng.uniform(0, 5),
                    p99=None if t == 0 else p99 + rng.uniform(0, 10))
        for t in range(0, 61, 2)
    )
    apis = ("connect", "CreateCertificateFromCsr", "RegisterThing")
    steps = tuple(
        StepStats(name=api, count=9000, failures=3 if api == "RegisterThing" else 0,
                  throttles=12 if api == "RegisterThing" else 0,
                  p50=2.0 + k, p95=6.0 + k, p99=p99 / 4 + k, max=120.0, rps=rate)
        for k, api in enumerate(apis)
    )
    bounds = (0, 1, 2, 5, 10, 20, 50, 100, 200)
    histograms = tuple(
        Histogram(api=api, buckets=tuple(
            HistogramBucket(low=float(lo), high=float(hi) if hi is not None else None,
                            count=int(9000 * w))
            for (lo, hi), w in zip(itertools.zip_longest(bounds, bounds[1:]),
                                   (0.05, 0.2, 0.4, 0.2, 0.1, 0.03, 0.015, 0.004, 0.001),
                                   strict=True)))
        for api in apis
    )
    return RunRecord(
        run_id=run_id, kind=RunKind.LOAD, endpoint_kind="emulator", region="us-east-1",
        account=None, versions={"locust": "2.31"}, started_at=T0, finished_at=T0 + 60,
        command_line=("fleetbench", "load", "--users", "300"),
        outcomes=(ScenarioOutcome(nodeid="loadtests/locustfile.py::p99_under_budget",
                                  name="p99_under_budget",
                                  outcome=Outcome.PASSED if p99 < 100 else Outcome.FAILED,
                                  duration=60.0),),
        load=LoadSummary(steps=steps, series=series, histograms=histograms,
                         settings={"users": 300, "spawn_rate": 50, "profile": "csr-json"}))
