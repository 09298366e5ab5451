"""Fleet provisioning load runs for Locust: ``locust -f loadtests/locustfile.py``.

Web UI, statistics, CSV, HTML and distributed mode are Locust's own. On test start the
fleet (template, claim policy, claim) is prepared through the control plane, once, on
the master; on test stop every flow is checked at the endpoint, the fleet is torn down,
and ``reports/<run-id>/results.json`` and ``report.html`` are written. See
README.md (Load testing); ``fleetbench load`` runs this file headless with an emulator.

    locust -f loadtests/locustfile.py                          # web UI, emulator started
    locust -f loadtests/locustfile.py ClaimCsrUser --headless \\
        --fleet-shape steady --fleet-rate 50 --fleet-duration 60s --csv reports/x/locust
    locust -f loadtests/locustfile.py --master --expect-workers 2 ...   # + N of:
    locust -f loadtests/locustfile.py --worker --master-host HOST

Only the names imported here are seen by Locust: the three user classes and one shape.
"""

from __future__ import annotations

from typing import Any

from locust import LoadTestShape, events

from loadtests.session import LoadSession, add_arguments
from loadtests.shapes import Schedule, build_schedule
from loadtests.users import ClaimCsrUser, ClaimKeysUser, TrustedUserUser

__all__ = ["ClaimCsrUser", "ClaimKeysUser", "FleetShape", "TrustedUserUser"]


@events.init_command_line_parser.add_listener
def _options(parser: Any, **_kw: Any) -> None:
    add_arguments(parser)


@events.init.add_listener
def _session(environment: Any, **_kw: Any) -> None:
    LoadSession(environment)


class FleetShape(LoadTestShape):
    """The ``--fleet-shape`` schedule (steady, ramp, spike, soak, factory), in flows/s;
    ``users`` (the default) follows Locust's own -u/-r/-t, so the web UI works as usual."""

    use_common_options = True

    def __init__(self) -> None:
        super().__init__()
        self._schedule: Schedule | None = None
        self._built_for = -1.0

    def tick(self) -> tuple[int, float] | None:
        if self._schedule is None or self._built_for != self.start_time:
            assert self.runner is not None
            self._schedule = build_schedule(self.runner.environment.parsed_options)
            self._built_for = self.start_time
        at = self._schedule.at(self.get_run_time())
        return None if at is None else at.as_locust()
