"""Load shapes as pure schedules: users and spawn rates over time, rates in flows/s (issue 8).

No Locust here: ``loadtests.shapes`` is plain Python, and importing Locust would patch this
test process with gevent.
"""

from __future__ import annotations

import math

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from loadtests.shapes import (
    DEFAULT_PACING_S,
    FactoryLine,
    Ramp,
    Schedule,
    ShapeError,
    Soak,
    Spike,
    SteadyRate,
    Tick,
    UserCount,
    build_schedule,
    parse_duration,
    users_for,
)


def users_at(shape: Schedule, t: float) -> int:
    tick = shape.at(t)
    assert tick is not None, f"the shape ended before {t}s"
    return tick.users


def test_a_steady_rate_is_users_times_pacing_until_the_duration_ends() -> None:
    shape = SteadyRate(rate=50, duration_s=60)
    assert shape.at(0) == Tick(100, 50.0)  # 50 flows/s = 100 users starting one every 2 s
    assert shape.at(59.9) == Tick(100, 50.0)
    assert shape.at(60) is None
    assert shape.pacing_s == DEFAULT_PACING_S


def test_a_low_steady_rate_stretches_the_pacing_instead_of_rounding_the_rate_up() -> None:
    shape = SteadyRate(rate=0.3, duration_s=None)
    assert shape.users == 1
    assert shape.pacing_s == pytest.approx(1 / 0.3)
    assert shape.at(1e6) == Tick(1, 1.0)  # no duration: until stopped


@settings(max_examples=60, deadline=None)
@given(rate=st.floats(0.05, 2000), pacing=st.floats(0.2, 30))
def test_users_over_pacing_gives_back_the_requested_steady_rate(rate: float, pacing: float) -> None:
    shape = SteadyRate(rate=rate, duration_s=10, base_pacing_s=pacing)
    assert shape.users >= 1
    assert shape.users / shape.pacing_s == pytest.approx(rate)


@settings(max_examples=60, deadline=None)
@given(rate=st.floats(0.5, 1000), pacing=st.floats(0.5, 10))
def test_rounding_users_never_misses_the_rate_by_more_than_half_a_user(rate: float,
                                                                      pacing: float) -> None:
    users = users_for(rate, pacing)
    assert abs(users / pacing - rate) <= 0.5 / pacing + 1e-9 or users == 1


def test_a_ramp_grows_linearly_then_holds_then_ends() -> None:
    ramp = Ramp(start_rate=0, end_rate=100, ramp_s=50, hold_s=10, pacing_s=1)
    assert ramp.at(0) == Tick(0, 100.0)
    assert users_at(ramp, 25) == 50  # halfway: 50 flows/s
    assert users_at(ramp, 50) == 100
    assert users_at(ramp, 59) == 100  # holding
    assert ramp.at(60) is None
    # spawning keeps up with the slope (2 users/s here) and fills a pacing interval
    assert all(t.spawn_rate >= 2 for t in (ramp.at(s) for s in range(60)) if t)


def test_a_spike_switches_a_batch_on_at_once_for_half_a_pacing_interval() -> None:
    spike = Spike(devices=500, at_s=10, base_rate=5, duration_s=30, pacing_s=2)
    assert spike.at(9.9) == Tick(10, 500.0)  # background: 5 flows/s = 10 users
    assert spike.at(10) == Tick(510, 500.0)  # the batch, all started within a second
    assert spike.at(10.9) == Tick(510, 500.0)
    assert spike.at(11) == Tick(10, 500.0)  # removed before a second flow would start
    assert spike.at(30) is None
    assert spike.spread_s == 0  # a batch is a burst: no arrival spreading


def test_a_spike_needs_a_duration_past_its_batch() -> None:
    with pytest.raises(ShapeError, match="needs a duration beyond"):
        Spike(devices=10, at_s=10, duration_s=10.5, pacing_s=2)


def test_a_factory_line_releases_n_devices_every_m_seconds_in_step() -> None:
    line = FactoryLine(devices=24, every_s=30, duration_s=300)
    assert line.pacing_s == 30
    assert line.rate == pytest.approx(0.8)
    assert line.at(0) == Tick(24, 24.0)  # all 24 started within a second: they stay aligned
    assert line.at(299) == Tick(24, 24.0)
    assert line.at(300) is None
    assert line.spread_s == 0


def test_a_soak_ramps_up_then_stays_at_its_rate_for_its_whole_duration() -> None:
    soak = Soak(rate=20, duration_s=3600, ramp_s=60, pacing_s=2)
    assert soak.at(0) == Tick(1, 1.0)  # one user to begin with, spawning at least 1/s
    assert users_at(soak, 30) == 20
    assert users_at(soak, 60) == 40
    assert users_at(soak, 3599) == 40
    assert soak.at(3600) is None


def test_plain_user_counts_keep_locusts_own_meaning() -> None:
    shape = UserCount(users=30, spawn_rate=5, duration_s=None, pacing_s=3)
    assert shape.at(1000) == Tick(30, 5.0)
    assert shape.describe()["rate"] == 10


@pytest.mark.parametrize(("text", "seconds"), [
    ("60", 60.0), ("60s", 60.0), ("2m", 120.0), ("1h30m", 5400.0), ("250ms", 0.25),
    (90, 90.0), (None, None), ("", None)])
def test_durations_read_like_locusts_run_time(text: object, seconds: float | None) -> None:
    assert parse_duration(text) == seconds  # type: ignore[arg-type]


@pytest.mark.parametrize("text", ["soon", "5x", "-3", "m"])
def test_a_malformed_duration_is_refused_with_examples(text: str) -> None:
    with pytest.raises(ShapeError):
        parse_duration(text)


def test_options_pick_the_shape_and_its_parameters() -> None:
    steady = build_schedule({"fleet_shape": "steady", "fleet_rate": 50, "fleet_duration": "60s"})
    assert isinstance(steady, SteadyRate) and steady.at(0) == Tick(100, 50.0)
    ramp = build_schedule({"fleet_shape": "ramp", "fleet_rate": 10, "fleet_ramp_to": 40,
                           "fleet_ramp_time": "20s", "fleet_duration": "30s"})
    assert isinstance(ramp, Ramp) and users_at(ramp, 20) == 80 and ramp.at(30) is None
    factory = build_schedule({"fleet_shape": "factory", "fleet_devices": 12,
                              "fleet_every": "15s", "fleet_duration": "1m"})
    assert isinstance(factory, FactoryLine) and factory.pacing_s == 15
    users = build_schedule({"fleet_shape": "users", "num_users": 7, "spawn_rate": 2,
                            "run_time": 40, "fleet_pacing": "4s"})
    assert users.at(0) == Tick(7, 2.0) and users.at(40) is None and users.pacing_s == 4


def test_an_unknown_shape_names_the_choices() -> None:
    with pytest.raises(ShapeError, match="steady"):
        build_schedule({"fleet_shape": "sawtooth"})


@pytest.mark.parametrize("bad", [
    lambda: SteadyRate(rate=0), lambda: SteadyRate(rate=math.inf),
    lambda: Ramp(start_rate=-1, end_rate=5, ramp_s=10), lambda: FactoryLine(devices=0, every_s=5),
    lambda: FactoryLine(devices=5, every_s=0)])
def test_nonsense_parameters_are_refused(bad: object) -> None:
    with pytest.raises(ShapeError):
        bad()  # type: ignore[operator]
