"""The plugin hands serial devices the bench's boards in turn (issue 6: `--bench`/`--board`)."""

from __future__ import annotations

from pathlib import Path

import pytest

pytest_plugins = ["pytester"]

BENCH = Path(__file__).resolve().parents[1] / "devices" / "benches" / "simulator.yaml"

TEST_FILE = """
def test_boards_in_turn(device_factory):
    first = device_factory.options()["board"]
    second = device_factory.options()["board"]
    third = device_factory.options()["board"]
    assert [first, second, third] == EXPECTED
"""


@pytest.mark.parametrize(
    ("extra", "expected"),
    [((), ["sim-1", "sim-2", "sim-1"]), (("--board", "sim-2"), ["sim-2", "sim-2", "sim-2"])],
)
def test_serial_devices_get_the_bench_boards_in_turn(
    pytester: pytest.Pytester, extra: tuple[str, ...], expected: list[str]
) -> None:
    pytester.makepyfile(TEST_FILE.replace("EXPECTED", repr(expected)))
    result = pytester.runpytest_subprocess(
        "--device", "serial", "--bench", str(BENCH), *extra, "-p", "no:labgrid",
        "-p", "no:cacheprovider",
    )
    result.assert_outcomes(passed=1)
