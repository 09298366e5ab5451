"""The harness's own record of a load run, next to Locust's CSV and HTML.

Locust writes ``locust_stats.csv`` (one row per step and one named ``flow``),
``locust_stats_history.csv`` and its HTML report; this module turns the same run into a
:class:`harness.reporting.RunRecord` (``results.json``, ``report.html``, ``junit.xml``
through :func:`harness.reporting.writer.write_run`), adding what Locust cannot know:
throttles per API apart from failures, the endpoint's verdict (:mod:`loadtests.truth`),
the teardown's leftovers, flows per second over time, and the CPU each side spent per
flow. Inputs are plain data (:class:`StepSample` is read from Locust's stats by the
caller), so nothing here imports Locust.
"""

from __future__ import annotations

import math
import sys
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from harness.reporting.records import (
    DeviceRecord,
    Histogram,
    HistogramBucket,
    LoadSummary,
    RunKind,
    RunRecord,
    SeriesPoint,
    StepStats,
    TraceStep,
    runtime_versions,
)
from harness.reporting.writer import write_run
from loadtests.events import THROTTLE_TYPE, FlowOutcome, StepName
from loadtests.truth import TruthReport

__all__ = ["CpuUsage", "RunFacts", "StepSample", "build_record", "summary_lines", "write"]

#: Histogram bucket edges (ms); the last bucket is unbounded.
HISTOGRAM_EDGES_MS = (0, 5, 10, 20, 50, 100, 200, 500, 1000, 2000, 5000, 10000)
#: Series points a long run is folded into, at most.
MAX_SERIES_POINTS = 300
#: Step rows in the order a flow runs them.
STEP_ORDER = tuple(s.value for s in StepName)


@dataclass(frozen=True)
class StepSample:
    """One row of Locust's statistics (read from ``environment.stats`` by the caller)."""

    name: str
    request_type: str
    count: int
    failures: int
    p50: float | None
    p95: float | None
    p99: float | None
    max: float | None
    rps: float
    response_times: Mapping[int, int] = field(default_factory=dict)


@dataclass(frozen=True)
class CpuUsage:
    """CPU seconds each side spent in the measured window (None: not measurable here)."""

    window_s: float
    load_generator_s: float
    load_generator_processes: int
    emulator_s: float | None = None
    #: Peak resident memory of each load-generator process (MiB).
    peak_rss_mib: tuple[float, ...] = ()

    def per_flow(self, flows: int) -> dict[str, Any]:
        def ms(seconds: float | None) -> float | None:
            return None if seconds is None or flows == 0 else round(1000 * seconds / flows, 3)

        load, emu = ms(self.load_generator_s), ms(self.emulator_s)
        return {
            "window_s": round(self.window_s, 3),
            "load_generator_cpu_s": round(self.load_generator_s, 3),
            "load_generator_processes": self.load_generator_processes,
            "emulator_cpu_s": None if self.emulator_s is None else round(self.emulator_s, 3),
            "load_generator_ms_per_flow": load,
            "emulator_ms_per_flow": emu,
            "load_to_emulator_ratio": round(load / emu, 3) if load and emu else None,
            "load_generator_peak_rss_mib": [round(m, 1) for m in self.peak_rss_mib],
        }


@dataclass(frozen=True)
class RunFacts:
    """Everything about the run that is not a flow or a Locust row."""

    run_id: str
    endpoint_kind: str
    region: str
    account: str | None
    started_at: float
    finished_at: float
    shape: Mapping[str, Any]
    flow: Mapping[str, Any]
    fleet: Mapping[str, Any]
    cpu: CpuUsage | None = None
    cleanup: Mapping[str, Any] | None = None
    command_line: tuple[str, ...] = ()
    notes: tuple[str, ...] = ()
    #: Most devices connected with their own certificate at once (sum of the processes'
    #: peaks; see ``--hold``).
    peak_connected: int = 0


def _percentile(values: Sequence[float], q: float) -> float | None:
    """Nearest-rank percentile of sorted ``values`` (None when empty)."""
    if not values:
        return None
    rank = max(1, math.ceil(q / 100 * len(values)))
    return values[rank - 1]


def series(outcomes: Sequence[FlowOutcome], start: float, end: float) -> list[SeriesPoint]:
    """Successful flows per second and flow latency percentiles, per window, by end time."""
    span = max(0.0, end - start)
    if span <= 0:
        return []
    bucket = max(1.0, math.ceil(span / MAX_SERIES_POINTS))
    count = max(1, math.ceil(span / bucket))
    windows: list[list[float]] = [[] for _ in range(count)]
    for o in outcomes:
        if not o.ok:
            continue
        index = int((o.ended_at - start) // bucket)
        if 0 <= index < count:
            windows[index].append(o.duration * 1000)
    points = []
    for i, durations in enumerate(windows):
        durations.sort()
        points.append(SeriesPoint(
            t=round(min(span, (i + 1) * bucket), 3),
            flows_per_s=round(len(durations) / bucket, 3),  # a short last window reads low
            p50=_percentile(durations, 50), p95=_percentile(durations, 95),
            p99=_percentile(durations, 99)))
    return points


def sustained_rate(outcomes: Sequence[FlowOutcome], start: float, end: float) -> float | None:
    """Successful flows per second over the middle 80% of the run (ramp-in and drain
    left out): the figure a launch is planned by."""
    span = end - start
    if span <= 0:
        return None
    lo, hi = start + 0.1 * span, end - 0.1 * span
    done = sum(1 for o in outcomes if o.ok and lo <= o.ended_at < hi)
    return round(done / (hi - lo), 3)


def histogram(sample: StepSample) -> Histogram:
    counts = [0] * len(HISTOGRAM_EDGES_MS)
    for ms, n in sample.response_times.items():
        index = 0
        for i, edge in enumerate(HISTOGRAM_EDGES_MS):
            if ms >= edge:
                index = i
        counts[index] += n
    buckets = []
    for i, low in enumerate(HISTOGRAM_EDGES_MS):
        high = HISTOGRAM_EDGES_MS[i + 1] if i + 1 < len(HISTOGRAM_EDGES_MS) else None
        buckets.append(HistogramBucket(float(low), None if high is None else float(high),
                                       counts[i]))
    return Histogram(sample.name, tuple(buckets))


def _ordered(samples: Iterable[StepSample]) -> list[StepSample]:
    def key(s: StepSample) -> tuple[int, str]:
        return (STEP_ORDER.index(s.name) if s.name in STEP_ORDER else len(STEP_ORDER), s.name)

    return sorted(samples, key=key)


def _device(outcome: FlowOutcome) -> DeviceRecord:
    return DeviceRecord(
        device_id=outcome.serial, kind="load",
        inputs={"serial": outcome.serial},
        trace=tuple(TraceStep(name=s.name, at=s.started_at, duration=s.duration,
                              ok=s.error_code is None,
                              detail={"error_code": s.error_code} if s.error_code else {})
                    for s in outcome.steps),
        thing_name=outcome.thing_name, certificate_id=outcome.certificate_id,
        log_excerpt=f"flow failed at {outcome.failed_step}: {outcome.error_code}")


def build_record(facts: RunFacts, samples: Iterable[StepSample],
                 outcomes: Sequence[FlowOutcome], throttles: Mapping[str, int],
                 truth: TruthReport | None) -> RunRecord:
    """The run as a :class:`RunRecord` of kind ``load``."""
    rows = _ordered(s for s in samples if s.request_type != THROTTLE_TYPE)
    steps = tuple(StepStats(name=s.name, count=s.count, failures=s.failures,
                            throttles=int(throttles.get(s.name, 0)), p50=s.p50, p95=s.p95,
                            p99=s.p99, max=s.max, rps=round(s.rps, 3)) for s in rows)
    ok = [o for o in outcomes if o.ok]
    first = min((o.started_at for o in outcomes), default=facts.started_at)
    last = max((o.ended_at for o in outcomes), default=facts.finished_at)
    points = series(outcomes, first, last)
    failed = [o for o in outcomes if o.failed]
    totals = {
        "flows": len(outcomes), "ok": len(ok), "failed": len(failed),
        "interrupted": sum(1 for o in outcomes if o.interrupted),
        "throttled_out": sum(1 for o in failed if o.error_code == "ThrottlingException"),
        "throttles": {k: int(v) for k, v in sorted(throttles.items())},
        "throttles_total": int(sum(throttles.values())),
        "errors": _error_counts(failed),
    }
    active = max(1e-9, last - first)
    settings: dict[str, Any] = {
        "shape": dict(facts.shape),
        "flow": dict(facts.flow),
        "fleet": dict(facts.fleet),
        "totals": totals,
        "rates": {
            "target_flows_per_s": facts.shape.get("rate"),
            "achieved_flows_per_s": round(len(ok) / active, 3) if ok else 0.0,
            "sustained_flows_per_s": sustained_rate(outcomes, first, last),
        },
        "cpu": facts.cpu.per_flow(len(ok)) if facts.cpu is not None else None,
        "peak_connected_devices": facts.peak_connected,
        "truth": truth.to_dict() if truth is not None else None,
        "cleanup": dict(facts.cleanup) if facts.cleanup is not None else None,
        "locust": {"stats_csv": "locust_stats.csv", "history_csv": "locust_stats_history.csv",
                   "html": "locust.html"},
        "notes": list(facts.notes),
    }
    kept = [o for o in failed if o.steps][:20]
    return RunRecord(
        run_id=facts.run_id, kind=RunKind.LOAD, endpoint_kind=facts.endpoint_kind,
        region=facts.region, account=facts.account, versions=runtime_versions(),
        started_at=facts.started_at, finished_at=facts.finished_at,
        command_line=facts.command_line or tuple(sys.argv),
        devices=tuple(_device(o) for o in kept),
        load=LoadSummary(steps=steps, series=tuple(points),
                         histograms=tuple(histogram(s) for s in rows if s.count),
                         settings=settings))


def _error_counts(failed: Iterable[FlowOutcome]) -> dict[str, int]:
    counts: dict[str, int] = {}
    for o in failed:
        key = f"{o.failed_step}: {o.error_code}"
        counts[key] = counts.get(key, 0) + 1
    return dict(sorted(counts.items(), key=lambda kv: -kv[1]))


def write(record: RunRecord, reports_dir: Path | str, secrets: Iterable[str] = ()) -> Path:
    """``results.json``, ``report.html`` and ``junit.xml`` in ``reports_dir/<run-id>/``."""
    return write_run(record, reports_dir, secrets=secrets)


def _fmt(value: Any, unit: str = "") -> str:
    if value is None:
        return "-"
    if isinstance(value, float):
        return f"{value:,.1f}{unit}"
    return f"{value}{unit}"


#: Issue 8's targets for CSR claim flows with the emulator and Locust on one machine.
TARGET_CSR_FLOWS_PER_S = 150.0
TARGET_LOAD_TO_EMULATOR = 1.5


def target_lines(settings: Mapping[str, Any]) -> list[str]:
    """Issue 8's verdicts, for a claim-csr run whose emulator's CPU was measured (a local
    emulator on this machine); nothing for any other run, where they mean nothing."""
    cpu = settings.get("cpu") or {}
    ratio = cpu.get("load_to_emulator_ratio")
    if (settings.get("flow") or {}).get("user_classes") != ["ClaimCsrUser"] or ratio is None:
        return []
    totals, rates = settings.get("totals") or {}, settings.get("rates") or {}
    sustained = float(rates.get("sustained_flows_per_s") or 0.0)
    failed = int(totals.get("failed") or 0)
    rate_ok = sustained >= TARGET_CSR_FLOWS_PER_S and failed == 0
    cpu_ok = ratio <= TARGET_LOAD_TO_EMULATOR
    return [f"issue 8 targets: >= {TARGET_CSR_FLOWS_PER_S:g} CSR flows/s sustained with no "
            f"failures: {'meets' if rate_ok else 'MISSES'} ({sustained:,.1f} flows/s, "
            f"{failed} failed); load generator CPU per flow <= {TARGET_LOAD_TO_EMULATOR:g}x "
            f"the emulator's: {'meets' if cpu_ok else 'MISSES'} ({ratio:.2f}x)"]


def summary_lines(record: RunRecord) -> list[str]:
    """The run's summary as the command prints it (from the record alone)."""
    load = record.load
    if load is None:
        return [f"run {record.run_id}: no load data"]
    s = load.settings
    totals, rates, cpu = s.get("totals") or {}, s.get("rates") or {}, s.get("cpu") or {}
    lines = [
        f"run {record.run_id}: {totals.get('flows', 0)} flows, {totals.get('ok', 0)} ok, "
        f"{totals.get('failed', 0)} failed, {totals.get('interrupted', 0)} interrupted; "
        f"{totals.get('throttles_total', 0)} throttled requests retried "
        f"({totals.get('throttled_out', 0)} flows failed on throttling)",
        f"rate: target {_fmt(rates.get('target_flows_per_s'))} flows/s, achieved "
        f"{_fmt(rates.get('achieved_flows_per_s'))}, sustained (middle 80%) "
        f"{_fmt(rates.get('sustained_flows_per_s'))}",
    ]
    header = f"{'step':<26}{'count':>8}{'fail':>7}{'thr':>7}{'p50':>10}{'p95':>10}{'p99':>10} ms"
    lines.append(header)
    for step in load.steps:
        lines.append(f"{step.name:<26}{step.count:>8}{step.failures:>7}{step.throttles:>7}"
                     f"{_fmt(step.p50):>10}{_fmt(step.p95):>10}{_fmt(step.p99):>10}")
    if cpu:
        lines.append(
            f"cpu per successful flow: load generator {_fmt(cpu.get('load_generator_ms_per_flow'))}"
            f" ms ({cpu.get('load_generator_processes')} process(es)), emulator "
            f"{_fmt(cpu.get('emulator_ms_per_flow'))} ms, ratio "
            f"{_fmt(cpu.get('load_to_emulator_ratio'))}")
        lines.extend(target_lines(s))
    if (s.get("flow") or {}).get("hold_s"):
        rss = cpu.get("load_generator_peak_rss_mib") or []
        lines.append(f"devices connected at once (--hold): {s['peak_connected_devices']}; "
                     f"load generator peak RSS {', '.join(f'{m:,.0f}' for m in rss)} MiB")
    for error, count in list((totals.get("errors") or {}).items())[:10]:
        lines.append(f"  failed: {count} x {error}")
    truth = s.get("truth")
    if truth:
        lines.append(f"truth: {truth['verified']} of {truth['checked']} successful flows "
                     f"verified at the endpoint (of {truth['successes']}); "
                     f"{truth['failed_with_active_certificate']} of {truth['failed_flows']} "
                     "failed flows left an ACTIVE certificate")
        for problem in truth.get("problems", [])[:10]:
            lines.append(f"  {problem['kind']}: {problem.get('thing_name') or problem['serial']}")
    cleanup = s.get("cleanup")
    if cleanup and cleanup.get("leftovers"):
        lines.append(f"cleanup left {len(cleanup['leftovers'])} resources: run "
                     f"`fleetbench cleanup --prefix {cleanup.get('prefix')}`")
    return lines
