"""Steps as Locust request events, flows as records, throttles counted apart from failures.

The model is Locust's own MQTT user (``locust.contrib.mqtt``): every step fires
``environment.events.request`` with its latency and, on failure, an exception whose text
is AWS's ``errorCode`` (or the transport's failure name), so Locust's statistics, charts,
CSV and failure tables work unchanged. The names are the APIs a launch is planned by:
``connect(claim)``, ``CreateKeysAndCertificate`` / ``CreateCertificateFromCsr``,
``RegisterThing``, ``connect(device)``, ``CreateProvisioningClaim`` (trusted user) and the
whole ``flow``.

A throttled request that a device retries is not a failure: each ``ThrottlingException``
answer (and each CONNECT refused for rate) fires a separate ``THROTTLE`` event named after
the API, whose response time is the backoff the device then waited, and is counted per
API in :class:`FlowJournal`. Only a request still throttled after the last retry fails.

Nothing here imports Locust: ``fire`` is any callable with the request event's keywords,
so the accounting is tested without gevent.
"""

from __future__ import annotations

import random
import time
from collections import Counter
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass, field, replace
from enum import Enum
from typing import Any, Protocol

from harness.protocol import THROTTLING_CODE, Api

__all__ = [
    "CONTROL_PLANE_TYPE",
    "MQTT_TYPE",
    "THROTTLE_TYPE",
    "FlowJournal",
    "FlowOutcome",
    "RequestEvents",
    "StepFailure",
    "StepName",
    "StepSink",
    "ThrottleMeter",
]

#: Locust request types (the CSV's ``Type`` column).
MQTT_TYPE = "MQTT"
CONTROL_PLANE_TYPE = "HTTPS"
THROTTLE_TYPE = "THROTTLE"
#: Failed flows whose step records a run keeps as evidence, per process.
KEEP_FAILED_FLOWS = 20


class StepName(str, Enum):
    """Request names, as Locust's tables show them."""

    CREATE_PROVISIONING_CLAIM = "CreateProvisioningClaim"
    CONNECT_CLAIM = "connect(claim)"
    CREATE_KEYS_AND_CERTIFICATE = Api.CREATE_KEYS_AND_CERTIFICATE.value
    CREATE_CERTIFICATE_FROM_CSR = Api.CREATE_CERTIFICATE_FROM_CSR.value
    REGISTER_THING = Api.REGISTER_THING.value
    CONNECT_DEVICE = "connect(device)"
    FLOW = "flow"

    @property
    def request_type(self) -> str:
        return CONTROL_PLANE_TYPE if self is StepName.CREATE_PROVISIONING_CLAIM else MQTT_TYPE

    @classmethod
    def for_api(cls, api: Api) -> StepName:
        return cls(api.value)


class StepFailure(Exception):
    """What Locust records for a failed request: the text is the error code only, so its
    failure table groups by AWS's ``errorCode`` (never a payload, key or token)."""

    def __init__(self, code: str, step: StepName | None = None) -> None:
        super().__init__(code if step is None else f"{step.value}: {code}")
        self.code = code
        self.step = step


@dataclass(frozen=True)
class StepTiming:
    """One step of one flow as the device saw it (kept for failed flows' evidence)."""

    name: str
    started_at: float
    duration: float
    error_code: str | None = None

    def to_wire(self) -> list[Any]:
        return [self.name, self.started_at, self.duration, self.error_code]

    @classmethod
    def from_wire(cls, data: Sequence[Any]) -> StepTiming:
        return cls(str(data[0]), float(data[1]), float(data[2]),
                   None if data[3] is None else str(data[3]))


@dataclass(frozen=True)
class FlowOutcome:
    """One device's flow: what the truth check needs, and what the run's series is built of.

    ``ok`` is what Locust counted; ``interrupted`` flows were cut short by the end of the
    run (neither success nor failure in Locust's tables). ``thing_name`` and
    ``certificate_id`` are set as soon as the endpoint named them, failed flows included.
    """

    serial: str
    ok: bool
    started_at: float
    duration: float
    thing_name: str | None = None
    certificate_id: str | None = None
    error_code: str | None = None
    failed_step: str | None = None
    throttles: int = 0
    interrupted: bool = False
    steps: tuple[StepTiming, ...] = ()

    @property
    def failed(self) -> bool:
        return not self.ok and not self.interrupted

    @property
    def ended_at(self) -> float:
        return self.started_at + self.duration

    def to_wire(self, with_steps: bool = False) -> list[Any]:
        """A compact list (flows cross Locust's master/worker channel by the thousand)."""
        return [self.serial, self.ok, round(self.started_at, 4), round(self.duration, 5),
                self.thing_name, self.certificate_id, self.error_code, self.failed_step,
                self.throttles, self.interrupted,
                [s.to_wire() for s in self.steps] if with_steps else []]

    @classmethod
    def from_wire(cls, data: Sequence[Any]) -> FlowOutcome:
        return cls(serial=str(data[0]), ok=bool(data[1]), started_at=float(data[2]),
                   duration=float(data[3]), thing_name=data[4], certificate_id=data[5],
                   error_code=data[6], failed_step=data[7], throttles=int(data[8]),
                   interrupted=bool(data[9]),
                   steps=tuple(StepTiming.from_wire(s) for s in data[10] or ()))


class StepSink(Protocol):
    """Where a device flow reports (``RequestEvents`` in Locust; a list in tests)."""

    def step(self, name: StepName, duration_s: float, error_code: str | None = None) -> None:
        ...

    def throttle(self, name: StepName, wait_s: float) -> None: ...


Fire = Callable[..., None]


class RequestEvents:
    """Fires Locust request events (``fire`` is ``environment.events.request.fire``)."""

    def __init__(self, fire: Fire) -> None:
        self._fire = fire

    def step(self, name: StepName, duration_s: float, error_code: str | None = None) -> None:
        self._fire(request_type=name.request_type, name=name.value,
                   response_time=duration_s * 1000.0, response_length=0,
                   exception=StepFailure(error_code) if error_code else None, context={})

    def throttle(self, name: StepName, wait_s: float) -> None:
        self._fire(request_type=THROTTLE_TYPE, name=name.value, response_time=wait_s * 1000.0,
                   response_length=0, exception=None, context={})

    def flow(self, outcome: FlowOutcome) -> None:
        failure = None
        if outcome.failed:
            step = StepName(outcome.failed_step) if outcome.failed_step in \
                StepName._value2member_map_ else None
            failure = StepFailure(outcome.error_code or "Failed", step)
        self._fire(request_type=MQTT_TYPE, name=StepName.FLOW.value,
                   response_time=outcome.duration * 1000.0, response_length=0,
                   exception=failure, context={"serial": outcome.serial})


class ThrottleMeter:
    """The ``sleep`` a device's retry policy calls between attempts, counting each as a
    throttle of the step under way (AWS SDK retries only on throttling, spec fleet §5).

    ``current`` is set by the flow before each step; ``sleep`` is the real wait
    (``time.sleep``, cooperative under Locust's gevent).
    """

    def __init__(self, sink: StepSink, sleep: Callable[[float], None] = time.sleep) -> None:
        self._sink = sink
        self._sleep = sleep
        self.current: StepName = StepName.CONNECT_CLAIM
        self.count = 0

    def __call__(self, seconds: float) -> None:
        self.count += 1
        self._sink.throttle(self.current, seconds)
        self._sleep(seconds)


@dataclass
class _Totals:
    ok: int = 0
    failed: int = 0
    interrupted: int = 0
    throttled_out: int = 0


@dataclass
class FlowJournal:
    """Every flow of this process (or, on the master, of every worker), and the throttles.

    A worker's journal ``ships``: it keeps only what it has not yet :meth:`drain` ed into a
    stats report to the master. The master's (or the only process's) journal keeps every
    flow, added locally or :meth:`merge` d from workers, for the truth check.
    """

    ship: bool = False
    outcomes: list[FlowOutcome] = field(default_factory=list)
    throttles: Counter[str] = field(default_factory=Counter)
    totals: _Totals = field(default_factory=_Totals)
    _unsent: list[FlowOutcome] = field(default_factory=list)
    _unsent_throttles: Counter[str] = field(default_factory=Counter)
    _kept_steps: int = 0

    def add(self, outcome: FlowOutcome) -> None:
        if outcome.steps and not (not outcome.ok and self._kept_steps < KEEP_FAILED_FLOWS):
            outcome = replace(outcome, steps=())
        elif outcome.steps:
            self._kept_steps += 1
        (self._unsent if self.ship else self.outcomes).append(outcome)
        self._count(outcome)

    def _count(self, outcome: FlowOutcome) -> None:
        if outcome.ok:
            self.totals.ok += 1
        elif outcome.interrupted:
            self.totals.interrupted += 1
        else:
            self.totals.failed += 1
            if outcome.error_code == THROTTLING_CODE:
                self.totals.throttled_out += 1

    def throttle(self, name: StepName, _wait_s: float = 0.0) -> None:
        self.throttles[name.value] += 1
        if self.ship:
            self._unsent_throttles[name.value] += 1

    def drain(self) -> dict[str, Any]:
        """What is new since the last drain, as wire data (empty dict if nothing)."""
        if not self._unsent and not self._unsent_throttles:
            return {}
        data = {"flows": [o.to_wire(with_steps=bool(o.steps)) for o in self._unsent],
                "throttles": dict(self._unsent_throttles)}
        self._unsent = []
        self._unsent_throttles = Counter()
        return data

    def merge(self, data: Mapping[str, Any]) -> None:
        """Add a worker's drained batch (master side; nothing is re-sent from here)."""
        for wire in data.get("flows") or ():
            outcome = FlowOutcome.from_wire(wire)
            self.outcomes.append(outcome)
            self._count(outcome)
        for name, count in (data.get("throttles") or {}).items():
            self.throttles[str(name)] += int(count)

    def clear(self) -> None:
        self.outcomes.clear()
        self.throttles.clear()
        self.totals = _Totals()
        self._unsent.clear()
        self._unsent_throttles.clear()
        self._kept_steps = 0

    def successes(self) -> list[FlowOutcome]:
        return [o for o in self.outcomes if o.ok]

    def failures(self) -> list[FlowOutcome]:
        return [o for o in self.outcomes if o.failed]


class Tee:
    """A :class:`StepSink` that reports to several (Locust's events and the journal)."""

    def __init__(self, sinks: Iterable[Any]) -> None:
        self._sinks = tuple(sinks)

    def step(self, name: StepName, duration_s: float, error_code: str | None = None) -> None:
        for sink in self._sinks:
            if hasattr(sink, "step"):
                sink.step(name, duration_s, error_code)

    def throttle(self, name: StepName, wait_s: float) -> None:
        for sink in self._sinks:
            sink.throttle(name, wait_s)


def new_serial(rng: random.Random | None = None) -> str:
    """A device serial: 12 hex digits, unique across workers without coordination."""
    return f"{(rng or random.SystemRandom()).getrandbits(48):012x}"
