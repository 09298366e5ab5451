"""fleetbench's pytest plugin (registered through the ``pytest11`` entry point).

Options, markers and fixtures that hand scenarios an endpoint, a fleet and devices.
"""

from __future__ import annotations

import pytest


def pytest_addoption(parser: pytest.Parser) -> None:
    group = parser.getgroup("fleetbench")
    group.addoption("--endpoint", default="local", choices=("local", "container", "aws"),
                    help="where the endpoint is (default: the embedded emulator)")
    group.addoption("--aws-profile", default=None, help="AWS profile for --endpoint aws")
    group.addoption("--aws-region", default=None, help="AWS region for --endpoint aws")
    group.addoption("--device", action="append", default=None,
                    help="device kind: virtual, sdk, process, serial (repeatable)")
    group.addoption("--bench", default=None, help="lab bench file for physical boards")
    group.addoption("--fleetbench-report", default=None, help="write the run's report here")


def pytest_configure(config: pytest.Config) -> None:
    config.addinivalue_line("markers", "emulator_only: needs the emulator (clock, faults, trace)")
    config.addinivalue_line("markers", "hardware: needs a lab bench with physical boards")
    config.addinivalue_line("markers", "slow: long-running")
