"""Load shapes in flows per second: what a launch looks like, as Locust user counts.

Locust runs a closed model (users), but a launch is planned in devices per second. The
bridge is *pacing*: every Locust user is one device slot that starts a fresh device's
flow every ``pacing_s`` seconds (Locust's ``constant_pacing``), so ``users = rate x
pacing`` holds as long as a flow takes less than ``pacing_s``. A flow that takes longer
(a throttled device backing off) lowers the rate, which the run's summary shows as the
achieved rate; raise ``--fleet-pacing`` to keep arrivals independent of slow flows.

Each schedule is pure: ``at(t)`` maps seconds since the start to the :class:`Tick`
(users, spawn rate) Locust should be at, or ``None`` when the run is over. The Locust
adapter (``FleetShape`` in ``loadtests/locustfile.py``) only calls ``at``; nothing here
imports Locust, so schedules are unit-tested as plain functions.
"""

from __future__ import annotations

import math
import re
from collections.abc import Mapping
from dataclasses import asdict, dataclass
from enum import Enum
from typing import Any, Protocol

__all__ = [
    "DEFAULT_PACING_S",
    "FactoryLine",
    "Ramp",
    "Schedule",
    "ShapeError",
    "ShapeKind",
    "Soak",
    "Spike",
    "SteadyRate",
    "Tick",
    "UserCount",
    "build_schedule",
    "parse_duration",
    "users_for",
]

#: Seconds between the starts of two flows of one user when nothing else says. Two
#: seconds keeps the rate exact for flows up to 2 s (a few throttled retries included).
DEFAULT_PACING_S = 2.0
#: Locust starts the users of one spawn step at the same instant; shapes with independent
#: arrivals delay each user's first flow by up to this much, so arrivals do not come in
#: bursts (spike and factory shapes want bursts: their spread is 0).
ARRIVAL_SPREAD_S = 1.0
#: Default length of a soak's ramp up.
DEFAULT_SOAK_RAMP_S = 60.0


class ShapeError(ValueError):
    """A shape's parameters make no sense (negative rates, zero periods...)."""


class ShapeKind(str, Enum):
    """The values of ``--fleet-shape`` / ``fleetbench load --shape``."""

    USERS = "users"  # plain Locust: -u/-r/-t (rate = users / pacing)
    STEADY = "steady"
    RAMP = "ramp"
    SPIKE = "spike"
    SOAK = "soak"
    FACTORY = "factory"


@dataclass(frozen=True)
class Tick:
    """Where Locust should be: this many users, started/stopped at ``spawn_rate`` per second."""

    users: int
    spawn_rate: float

    def as_locust(self) -> tuple[int, float]:
        return self.users, self.spawn_rate


class Schedule(Protocol):
    """A load shape: users over time, and the pacing that turns users into flows/s."""

    @property
    def pacing_s(self) -> float: ...

    @property
    def spread_s(self) -> float: ...

    def at(self, t: float) -> Tick | None: ...

    def describe(self) -> dict[str, Any]: ...


_DURATION_PART = re.compile(r"(\d+(?:\.\d+)?)(ms|h|m|s)?")


def parse_duration(text: str | float | int | None) -> float | None:
    """Seconds in ``60``, ``60s``, ``2m``, ``1h30m`` or ``250ms`` (None/"" stays None)."""
    if text is None or text == "":
        return None
    if isinstance(text, int | float):
        value = float(text)
    else:
        spec = text.strip().lower()
        pos, value, seen = 0, 0.0, False
        while pos < len(spec):
            match = _DURATION_PART.match(spec, pos)
            if match is None:
                raise ShapeError(f"not a duration: {text!r} (examples: 60, 60s, 2m, 1h30m)")
            amount, unit = float(match.group(1)), match.group(2) or "s"
            value += amount * {"h": 3600.0, "m": 60.0, "s": 1.0, "ms": 0.001}[unit]
            pos, seen = match.end(), True
        if not seen:
            raise ShapeError(f"not a duration: {text!r}")
    if value < 0 or not math.isfinite(value):
        raise ShapeError(f"durations must be non-negative, got {text!r}")
    return value


def users_for(rate: float, pacing_s: float) -> int:
    """Users that start ``rate`` flows per second when each starts one every ``pacing_s``."""
    if rate <= 0:
        return 0
    return max(1, round(rate * pacing_s))


def _positive(name: str, value: float) -> None:
    if not value > 0 or not math.isfinite(value):
        raise ShapeError(f"{name} must be a positive number, got {value!r}")


def _non_negative(name: str, value: float) -> None:
    if value < 0 or not math.isfinite(value):
        raise ShapeError(f"{name} must not be negative, got {value!r}")


def _over(t: float, duration_s: float | None) -> bool:
    return duration_s is not None and t >= duration_s


@dataclass(frozen=True)
class UserCount:
    """Plain Locust (``-u``/``-r``/``-t``): the rate is ``users / pacing_s``."""

    users: int
    spawn_rate: float
    duration_s: float | None = None
    pacing_s: float = DEFAULT_PACING_S

    def __post_init__(self) -> None:
        _non_negative("users", self.users)
        _positive("spawn_rate", self.spawn_rate)
        _positive("pacing_s", self.pacing_s)

    @property
    def spread_s(self) -> float:
        return ARRIVAL_SPREAD_S

    def at(self, t: float) -> Tick | None:
        if _over(t, self.duration_s):
            return None
        return Tick(self.users, self.spawn_rate)

    def describe(self) -> dict[str, Any]:
        return {"shape": ShapeKind.USERS.value, **asdict(self),
                "rate": self.users / self.pacing_s}


@dataclass(frozen=True)
class SteadyRate:
    """``rate`` flows per second until ``duration_s`` (None: until stopped).

    The pacing is adjusted to the rate so that rounding to whole users never changes it
    (0.3 flows/s is one user pacing 3.33 s, not one user pacing 2 s). Users are started
    over one pacing interval, so their flows are spread evenly in time.
    """

    rate: float
    duration_s: float | None = None
    base_pacing_s: float = DEFAULT_PACING_S

    def __post_init__(self) -> None:
        _positive("rate", self.rate)
        _positive("base_pacing_s", self.base_pacing_s)
        if self.duration_s is not None:
            _positive("duration_s", self.duration_s)

    @property
    def users(self) -> int:
        return users_for(self.rate, self.base_pacing_s)

    @property
    def pacing_s(self) -> float:
        return self.users / self.rate

    @property
    def spread_s(self) -> float:
        return ARRIVAL_SPREAD_S

    def at(self, t: float) -> Tick | None:
        if _over(t, self.duration_s):
            return None
        return Tick(self.users, max(1.0, self.users / self.pacing_s))

    def describe(self) -> dict[str, Any]:
        return {"shape": ShapeKind.STEADY.value, "rate": self.rate,
                "duration_s": self.duration_s, "users": self.users, "pacing_s": self.pacing_s}


@dataclass(frozen=True)
class Ramp:
    """From ``start_rate`` to ``end_rate`` flows/s linearly over ``ramp_s``, then hold
    ``end_rate`` for ``hold_s`` (None: until stopped)."""

    start_rate: float
    end_rate: float
    ramp_s: float
    hold_s: float | None = 0.0
    pacing_s: float = DEFAULT_PACING_S

    def __post_init__(self) -> None:
        _non_negative("start_rate", self.start_rate)
        _positive("end_rate", self.end_rate)
        _positive("ramp_s", self.ramp_s)
        _positive("pacing_s", self.pacing_s)
        if self.hold_s is not None:
            _non_negative("hold_s", self.hold_s)

    def rate_at(self, t: float) -> float:
        share = min(1.0, max(0.0, t / self.ramp_s))
        return self.start_rate + (self.end_rate - self.start_rate) * share

    @property
    def spread_s(self) -> float:
        return ARRIVAL_SPREAD_S

    def at(self, t: float) -> Tick | None:
        if self.hold_s is not None and t >= self.ramp_s + self.hold_s:
            return None
        users = users_for(self.rate_at(t), self.pacing_s)
        # fast enough to follow the ramp between two ticks, and to fill one pacing interval
        slope = abs(self.end_rate - self.start_rate) * self.pacing_s / self.ramp_s
        top = users_for(max(self.start_rate, self.end_rate), self.pacing_s)
        return Tick(users, max(1.0, 2 * slope, top / self.pacing_s))

    def describe(self) -> dict[str, Any]:
        return {"shape": ShapeKind.RAMP.value, **asdict(self), "rate": self.end_rate}


@dataclass(frozen=True)
class Spike:
    """A batch of ``devices`` switched on at once at ``at_s``, over a ``base_rate`` background.

    The batch's users are all started within a second and each runs exactly one flow: they
    are removed again half a pacing interval later, before a second flow would start.
    ``duration_s`` ends the run (None: until stopped).
    """

    devices: int
    at_s: float = 10.0
    base_rate: float = 0.0
    duration_s: float | None = None
    pacing_s: float = DEFAULT_PACING_S

    def __post_init__(self) -> None:
        _positive("devices", self.devices)
        _non_negative("at_s", self.at_s)
        _non_negative("base_rate", self.base_rate)
        _positive("pacing_s", self.pacing_s)
        if self.duration_s is not None and self.duration_s <= self.at_s + self.window_s:
            raise ShapeError(f"a spike at {self.at_s:g}s needs a duration beyond "
                             f"{self.at_s + self.window_s:g}s, got {self.duration_s:g}s")

    @property
    def window_s(self) -> float:
        return self.pacing_s / 2

    @property
    def spread_s(self) -> float:
        return 0.0

    def at(self, t: float) -> Tick | None:
        if _over(t, self.duration_s):
            return None
        base = users_for(self.base_rate, self.pacing_s)
        if self.at_s <= t < self.at_s + self.window_s:
            return Tick(base + self.devices, float(max(1, self.devices)))
        return Tick(base, float(max(1, self.devices, base)))

    def describe(self) -> dict[str, Any]:
        return {"shape": ShapeKind.SPIKE.value, **asdict(self), "window_s": self.window_s}


@dataclass(frozen=True)
class Soak:
    """``rate`` flows/s for a long time: a ``ramp_s`` ramp up, then steady to ``duration_s``."""

    rate: float
    duration_s: float | None = 3600.0
    ramp_s: float = DEFAULT_SOAK_RAMP_S
    pacing_s: float = DEFAULT_PACING_S

    def __post_init__(self) -> None:
        _positive("rate", self.rate)
        _positive("pacing_s", self.pacing_s)
        _non_negative("ramp_s", self.ramp_s)
        if self.duration_s is not None:
            _positive("duration_s", self.duration_s)

    @property
    def spread_s(self) -> float:
        return ARRIVAL_SPREAD_S

    def at(self, t: float) -> Tick | None:
        if _over(t, self.duration_s):
            return None
        share = 1.0 if self.ramp_s == 0 else min(1.0, max(0.0, t / self.ramp_s))
        top = users_for(self.rate, self.pacing_s)
        users = max(1, round(top * share)) if share > 0 else min(1, top)
        spread = self.ramp_s if self.ramp_s > 0 else self.pacing_s
        return Tick(users, max(1.0, top / spread))

    def describe(self) -> dict[str, Any]:
        return {"shape": ShapeKind.SOAK.value, **asdict(self)}


@dataclass(frozen=True)
class FactoryLine:
    """``devices`` devices switched on together every ``every_s`` seconds (a factory line
    releasing a tray, a shipping wave): ``devices`` users pacing ``every_s``, all started
    within a second so their flows stay in step."""

    devices: int
    every_s: float
    duration_s: float | None = None

    def __post_init__(self) -> None:
        _positive("devices", self.devices)
        _positive("every_s", self.every_s)
        if self.duration_s is not None:
            _positive("duration_s", self.duration_s)

    @property
    def pacing_s(self) -> float:
        return self.every_s

    @property
    def rate(self) -> float:
        return self.devices / self.every_s

    @property
    def spread_s(self) -> float:
        return 0.0

    def at(self, t: float) -> Tick | None:
        if _over(t, self.duration_s):
            return None
        return Tick(self.devices, float(self.devices))

    def describe(self) -> dict[str, Any]:
        return {"shape": ShapeKind.FACTORY.value, **asdict(self), "rate": self.rate}


def _get(options: Any, name: str, default: Any = None) -> Any:
    if isinstance(options, Mapping):
        value = options.get(name, default)
    else:
        value = getattr(options, name, default)
    return default if value is None else value


def build_schedule(options: Any) -> Schedule:
    """The schedule the ``fleet_*`` options describe (an argparse namespace or a mapping).

    ``fleet_shape`` picks the kind; ``fleet_rate``, ``fleet_duration``, ``fleet_pacing``,
    ``fleet_ramp_to``/``fleet_ramp_time``, ``fleet_devices``/``fleet_at``/``fleet_every``
    parameterise it; ``num_users``/``spawn_rate``/``run_time`` (Locust's own) drive the
    ``users`` kind.
    """
    try:
        kind = ShapeKind(_get(options, "fleet_shape", ShapeKind.USERS.value))
    except ValueError:
        raise ShapeError(f"unknown shape {_get(options, 'fleet_shape')!r}; choose one of "
                         f"{', '.join(k.value for k in ShapeKind)}") from None
    pacing = float(parse_duration(_get(options, "fleet_pacing", DEFAULT_PACING_S))
                   or DEFAULT_PACING_S)
    duration = parse_duration(_get(options, "fleet_duration")) or \
        parse_duration(_get(options, "run_time")) or None
    rate = float(_get(options, "fleet_rate", 1.0))
    if kind is ShapeKind.USERS:
        return UserCount(int(_get(options, "num_users", 1)),
                         float(_get(options, "spawn_rate", 1.0)), duration, pacing)
    if kind is ShapeKind.STEADY:
        return SteadyRate(rate, duration, pacing)
    if kind is ShapeKind.RAMP:
        ramp_time = parse_duration(_get(options, "fleet_ramp_time")) or \
            (duration / 2 if duration else 60.0)
        end = float(_get(options, "fleet_ramp_to", rate))
        start = float(_get(options, "fleet_ramp_from", 0.0))
        hold = None if duration is None else max(0.0, duration - ramp_time)
        return Ramp(start, end, ramp_time, hold, pacing)
    if kind is ShapeKind.SPIKE:
        return Spike(int(_get(options, "fleet_devices", 100)),
                     float(parse_duration(_get(options, "fleet_at", 10.0)) or 0.0),
                     float(_get(options, "fleet_base_rate", 0.0)), duration, pacing)
    if kind is ShapeKind.SOAK:
        return Soak(rate, duration or 3600.0,
                    float(parse_duration(_get(options, "fleet_ramp_time",
                                              DEFAULT_SOAK_RAMP_S)) or 0.0), pacing)
    return FactoryLine(int(_get(options, "fleet_devices", 10)),
                       float(parse_duration(_get(options, "fleet_every", 10.0)) or 10.0),
                       duration)
