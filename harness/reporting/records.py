"""The records a run leaves behind: immutable data that every report renders.

Modelled on OpenHTF's test record: the pytest plugin and the load runner build
one :class:`RunRecord`; ``results.json``, ``junit.xml`` and ``report.html`` are
renderers over it, and ``results.json`` turns back into the same record with
:meth:`RunRecord.from_dict`, so any report can be re-rendered later.

Units: timestamps are epoch seconds (float), durations seconds, latencies
milliseconds. Keys in ``to_dict`` output are snake_case (our own format);
AWS's names appear only inside the free-form ``inputs``, ``registry_state``
and ``detail`` mappings, as AWS spells them. The schema lives in
:mod:`harness.reporting.schema` and is documented in ``docs/results-schema.md``.
"""

from __future__ import annotations

import platform
import re
import secrets as _secrets
import time
from collections import Counter
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from enum import Enum
from importlib import metadata
from typing import Any

from harness.reporting.redact import redact
from harness.reporting.schema import SCHEMA_VERSION

_RUN_ID = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,127}$")


class RunKind(str, Enum):
    """What produced the run."""

    SCENARIOS = "scenarios"
    LOAD = "load"


class Outcome(str, Enum):
    """A scenario's result, as pytest names it."""

    PASSED = "passed"
    FAILED = "failed"
    SKIPPED = "skipped"
    ERROR = "error"

    @property
    def failing(self) -> bool:
        return self in (Outcome.FAILED, Outcome.ERROR)


class CertPath(str, Enum):
    """How the device got its certificate (spec fleet-provisioning §1.2, §1.3)."""

    KEYS = "keys"  # CreateKeysAndCertificate
    CSR = "csr"  # CreateCertificateFromCsr


def _opt_float(value: Any) -> float | None:
    return None if value is None else float(value)


@dataclass(frozen=True)
class TraceStep:
    """One step of a device's provisioning flow as observed (claim connect, certificate...).

    ``at`` is when the step started (epoch s), ``duration`` how long it took
    (s, None for an instant), ``detail`` extra evidence (no secrets).
    """

    name: str
    at: float
    duration: float | None = None
    ok: bool = True
    detail: Mapping[str, Any] = field(default_factory=dict)

    def to_dict(self) -> dict[str, Any]:
        return {
            "name": self.name,
            "at": self.at,
            "duration": self.duration,
            "ok": self.ok,
            "detail": dict(self.detail),
        }

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> TraceStep:
        return cls(
            name=str(data["name"]),
            at=float(data["at"]),
            duration=_opt_float(data.get("duration")),
            ok=bool(data.get("ok", True)),
            detail=dict(data.get("detail") or {}),
        )


@dataclass(frozen=True)
class DeviceRecord:
    """One device of the run: what it was given, what it did, what the endpoint holds.

    ``inputs`` are the device's settings with secrets stripped (writers redact
    again). ``log_path`` points at the full device log (relative to the report
    directory once written); ``log_excerpt`` is the part shown in reports.
    """

    device_id: str
    kind: str
    inputs: Mapping[str, Any] = field(default_factory=dict)
    trace: tuple[TraceStep, ...] = ()
    registry_state: Mapping[str, Any] = field(default_factory=dict)
    log_path: str | None = None
    log_excerpt: str | None = None
    thing_name: str | None = None
    certificate_id: str | None = None

    def __post_init__(self) -> None:
        object.__setattr__(self, "trace", tuple(self.trace))

    def to_dict(self) -> dict[str, Any]:
        return {
            "device_id": self.device_id,
            "kind": self.kind,
            "inputs": dict(self.inputs),
            "trace": [s.to_dict() for s in self.trace],
            "registry_state": dict(self.registry_state),
            "log_path": self.log_path,
            "log_excerpt": self.log_excerpt,
            "thing_name": self.thing_name,
            "certificate_id": self.certificate_id,
        }

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> DeviceRecord:
        return cls(
            device_id=str(data["device_id"]),
            kind=str(data["kind"]),
            inputs=dict(data.get("inputs") or {}),
            trace=tuple(TraceStep.from_dict(s) for s in data.get("trace") or ()),
            registry_state=dict(data.get("registry_state") or {}),
            log_path=data.get("log_path"),
            log_excerpt=data.get("log_excerpt"),
            thing_name=data.get("thing_name"),
            certificate_id=data.get("certificate_id"),
        )


@dataclass(frozen=True)
class ScenarioOutcome:
    """The result of one scenario (one pytest item) with the coordinates it ran at.

    ``flow`` is e.g. ``"claim"`` or ``"trusted_user"``, ``payload_format``
    ``"json"`` or ``"cbor"``; any coordinate may be None for scenarios that
    have none. ``error_code``/``error_message`` carry the AWS error (the
    ``rejected`` payload's ``errorCode``/``errorMessage`` or a control-plane
    error code) when the failure had one.
    """

    nodeid: str
    name: str
    outcome: Outcome
    duration: float = 0.0
    flow: str | None = None
    device_kind: str | None = None
    payload_format: str | None = None
    cert_path: CertPath | None = None
    error_code: str | None = None
    error_message: str | None = None
    skip_reason: str | None = None
    longrepr: str | None = None
    device_ids: tuple[str, ...] = ()

    def __post_init__(self) -> None:
        object.__setattr__(self, "outcome", Outcome(self.outcome))
        if self.cert_path is not None:
            object.__setattr__(self, "cert_path", CertPath(self.cert_path))
        object.__setattr__(self, "device_ids", tuple(self.device_ids))

    def to_dict(self) -> dict[str, Any]:
        return {
            "nodeid": self.nodeid,
            "name": self.name,
            "outcome": self.outcome.value,
            "duration": self.duration,
            "flow": self.flow,
            "device_kind": self.device_kind,
            "payload_format": self.payload_format,
            "cert_path": self.cert_path.value if self.cert_path else None,
            "error_code": self.error_code,
            "error_message": self.error_message,
            "skip_reason": self.skip_reason,
            "longrepr": self.longrepr,
            "device_ids": list(self.device_ids),
        }

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> ScenarioOutcome:
        cert_path = data.get("cert_path")
        return cls(
            nodeid=str(data["nodeid"]),
            name=str(data["name"]),
            outcome=Outcome(data["outcome"]),
            duration=float(data.get("duration") or 0.0),
            flow=data.get("flow"),
            device_kind=data.get("device_kind"),
            payload_format=data.get("payload_format"),
            cert_path=CertPath(cert_path) if cert_path else None,
            error_code=data.get("error_code"),
            error_message=data.get("error_message"),
            skip_reason=data.get("skip_reason"),
            longrepr=data.get("longrepr"),
            device_ids=tuple(data.get("device_ids") or ()),
        )


@dataclass(frozen=True)
class StepStats:
    """Totals for one step (API) of a load run; latencies in ms, None when count is 0."""

    name: str
    count: int
    failures: int = 0
    throttles: int = 0
    p50: float | None = None
    p95: float | None = None
    p99: float | None = None
    max: float | None = None
    rps: float = 0.0

    def to_dict(self) -> dict[str, Any]:
        return {
            "name": self.name,
            "count": self.count,
            "failures": self.failures,
            "throttles": self.throttles,
            "p50": self.p50,
            "p95": self.p95,
            "p99": self.p99,
            "max": self.max,
            "rps": self.rps,
        }

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> StepStats:
        return cls(
            name=str(data["name"]),
            count=int(data["count"]),
            failures=int(data.get("failures") or 0),
            throttles=int(data.get("throttles") or 0),
            p50=_opt_float(data.get("p50")),
            p95=_opt_float(data.get("p95")),
            p99=_opt_float(data.get("p99")),
            max=_opt_float(data.get("max")),
            rps=float(data.get("rps") or 0.0),
        )


@dataclass(frozen=True)
class SeriesPoint:
    """Whole flows per second and flow latency percentiles (ms) in the window ending at ``t``.

    ``t`` is seconds since the load run started; percentiles are None for a
    window without completed flows.
    """

    t: float
    flows_per_s: float
    p50: float | None = None
    p95: float | None = None
    p99: float | None = None

    def to_dict(self) -> dict[str, Any]:
        return {
            "t": self.t,
            "flows_per_s": self.flows_per_s,
            "p50": self.p50,
            "p95": self.p95,
            "p99": self.p99,
        }

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> SeriesPoint:
        return cls(
            t=float(data["t"]),
            flows_per_s=float(data["flows_per_s"]),
            p50=_opt_float(data.get("p50")),
            p95=_opt_float(data.get("p95")),
            p99=_opt_float(data.get("p99")),
        )


@dataclass(frozen=True)
class HistogramBucket:
    """Requests whose latency fell in ``[low, high)`` ms; ``high`` None means unbounded."""

    low: float
    high: float | None
    count: int

    def to_dict(self) -> dict[str, Any]:
        return {"low": self.low, "high": self.high, "count": self.count}

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> HistogramBucket:
        return cls(
            low=float(data["low"]),
            high=_opt_float(data.get("high")),
            count=int(data["count"]),
        )


@dataclass(frozen=True)
class Histogram:
    """Latency distribution of one API over the whole load run."""

    api: str
    buckets: tuple[HistogramBucket, ...]

    def __post_init__(self) -> None:
        object.__setattr__(self, "buckets", tuple(self.buckets))

    def to_dict(self) -> dict[str, Any]:
        return {"api": self.api, "buckets": [b.to_dict() for b in self.buckets]}

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> Histogram:
        return cls(
            api=str(data["api"]),
            buckets=tuple(HistogramBucket.from_dict(b) for b in data.get("buckets") or ()),
        )


@dataclass(frozen=True)
class LoadSummary:
    """What a load run measured: per-step totals, a time series and per-API histograms.

    ``settings`` holds the load shape (users, spawn rate, duration, profile).
    """

    steps: tuple[StepStats, ...] = ()
    series: tuple[SeriesPoint, ...] = ()
    histograms: tuple[Histogram, ...] = ()
    settings: Mapping[str, Any] = field(default_factory=dict)

    def __post_init__(self) -> None:
        object.__setattr__(self, "steps", tuple(self.steps))
        object.__setattr__(self, "series", tuple(self.series))
        object.__setattr__(self, "histograms", tuple(self.histograms))

    def to_dict(self) -> dict[str, Any]:
        return {
            "steps": [s.to_dict() for s in self.steps],
            "series": [p.to_dict() for p in self.series],
            "histograms": [h.to_dict() for h in self.histograms],
            "settings": dict(self.settings),
        }

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> LoadSummary:
        return cls(
            steps=tuple(StepStats.from_dict(s) for s in data.get("steps") or ()),
            series=tuple(SeriesPoint.from_dict(p) for p in data.get("series") or ()),
            histograms=tuple(Histogram.from_dict(h) for h in data.get("histograms") or ()),
            settings=dict(data.get("settings") or {}),
        )


@dataclass(frozen=True)
class Summary:
    """Outcome counts; derived from the outcomes, written for CI convenience."""

    total: int
    passed: int
    failed: int
    skipped: int
    error: int

    @classmethod
    def of(cls, outcomes: Iterable[ScenarioOutcome]) -> Summary:
        counts = Counter(o.outcome for o in outcomes)
        return cls(
            total=sum(counts.values()),
            passed=counts[Outcome.PASSED],
            failed=counts[Outcome.FAILED],
            skipped=counts[Outcome.SKIPPED],
            error=counts[Outcome.ERROR],
        )

    def to_dict(self) -> dict[str, int]:
        return {
            "total": self.total,
            "passed": self.passed,
            "failed": self.failed,
            "skipped": self.skipped,
            "error": self.error,
        }


@dataclass(frozen=True)
class RunRecord:
    """Everything one scenario run or load run leaves behind."""

    run_id: str
    kind: RunKind
    endpoint_kind: str
    region: str
    account: str | None
    versions: Mapping[str, str]
    started_at: float
    finished_at: float
    command_line: tuple[str, ...] = ()
    outcomes: tuple[ScenarioOutcome, ...] = ()
    devices: tuple[DeviceRecord, ...] = ()
    load: LoadSummary | None = None

    def __post_init__(self) -> None:
        if not _RUN_ID.match(self.run_id):
            raise ValueError(
                f"run_id {self.run_id!r} must be 1-128 of [A-Za-z0-9._-] and not start with . or -"
            )
        object.__setattr__(self, "kind", RunKind(self.kind))
        object.__setattr__(self, "command_line", tuple(self.command_line))
        object.__setattr__(self, "outcomes", tuple(self.outcomes))
        object.__setattr__(self, "devices", tuple(self.devices))

    @property
    def summary(self) -> Summary:
        return Summary.of(self.outcomes)

    @property
    def duration(self) -> float:
        return max(0.0, self.finished_at - self.started_at)

    def device(self, device_id: str) -> DeviceRecord | None:
        return next((d for d in self.devices if d.device_id == device_id), None)

    def redacted(self, secrets: Iterable[str] = ()) -> RunRecord:
        """The same record with every secret masked (see :mod:`harness.reporting.redact`)."""
        return RunRecord.from_dict(redact(self.to_dict(), secrets))

    def to_dict(self) -> dict[str, Any]:
        return {
            "schema_version": SCHEMA_VERSION,
            "run": {
                "run_id": self.run_id,
                "kind": self.kind.value,
                "endpoint_kind": self.endpoint_kind,
                "region": self.region,
                "account": self.account,
                "versions": dict(self.versions),
                "started_at": self.started_at,
                "finished_at": self.finished_at,
                "command_line": list(self.command_line),
            },
            "summary": self.summary.to_dict(),
            "outcomes": [o.to_dict() for o in self.outcomes],
            "devices": [d.to_dict() for d in self.devices],
            "load": self.load.to_dict() if self.load is not None else None,
        }

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> RunRecord:
        """Rebuild a record from ``to_dict`` output (validate it first for a clear error)."""
        run = data["run"]
        load = data.get("load")
        return cls(
            run_id=str(run["run_id"]),
            kind=RunKind(run["kind"]),
            endpoint_kind=str(run["endpoint_kind"]),
            region=str(run["region"]),
            account=run.get("account"),
            versions={str(k): str(v) for k, v in (run.get("versions") or {}).items()},
            started_at=float(run["started_at"]),
            finished_at=float(run["finished_at"]),
            command_line=tuple(str(a) for a in run.get("command_line") or ()),
            outcomes=tuple(ScenarioOutcome.from_dict(o) for o in data.get("outcomes") or ()),
            devices=tuple(DeviceRecord.from_dict(d) for d in data.get("devices") or ()),
            load=LoadSummary.from_dict(load) if load is not None else None,
        )


def new_run_id(now: float | None = None) -> str:
    """A sortable, unique run id such as ``20251129T161200Z-3f9a1c``."""
    stamp = time.strftime("%Y%m%dT%H%M%SZ", time.gmtime(time.time() if now is None else now))
    return f"{stamp}-{_secrets.token_hex(3)}"


DEFAULT_VERSION_PACKAGES: tuple[str, ...] = (
    "fleetbench",
    "boto3",
    "botocore",
    "paho-mqtt",
    "awsiotsdk",
    "awscrt",
    "cryptography",
    "locust",
)


def runtime_versions(packages: Sequence[str] = DEFAULT_VERSION_PACKAGES) -> dict[str, str]:
    """Python and installed package versions for :attr:`RunRecord.versions`."""
    versions = {"python": platform.python_version()}
    for name in packages:
        try:
            versions[name] = metadata.version(name)
        except metadata.PackageNotFoundError:
            continue
    return versions
