"""What every device kind's ``provision`` does alike, kept in one place.

A device's flash directory across boots, arming a fault point a device may refuse, the
run's time budget, and AWS's error fields read from a device log: the SDK, virtual,
process and serial devices differ in how they run the flow, not in these.
"""

from __future__ import annotations

import tempfile
import time
from collections.abc import Callable, Collection, Mapping
from pathlib import Path

from devices.base import DeviceConfigError, DeviceInputs, FaultPoint, coerce_enum
from harness.protocol import ErrorResponse

__all__ = ["DefaultWorkdir", "arm_fault_point", "error_from_groups", "time_left"]


class DefaultWorkdir:
    """Where a device keeps its flash: the run's ``workdir`` when the inputs give one, else
    a temporary directory made on first use and kept, so the next ``provision`` of the same
    device object is a reboot rather than a new device."""

    def __init__(self, prefix: str) -> None:
        self._prefix = prefix
        self._made: Path | None = None

    def for_run(self, inputs: DeviceInputs) -> Path:
        """The run's directory (created if missing)."""
        if inputs.workdir is not None:
            inputs.workdir.mkdir(parents=True, exist_ok=True)
            return inputs.workdir
        if self._made is None:
            self._made = Path(tempfile.mkdtemp(prefix=self._prefix))
        return self._made


def arm_fault_point(point: FaultPoint | str | None, allowed: Collection[FaultPoint],
                    refusal: Callable[[FaultPoint], str]) -> FaultPoint | None:
    """``point`` as the fault point to cut the next run at (``None`` disarms); a point this
    device cannot be cut at raises :class:`DeviceConfigError` with ``refusal(point)``."""
    if point is None:
        return None
    armed = coerce_enum(FaultPoint, point, "fault point")
    if armed not in allowed:
        raise DeviceConfigError(refusal(armed))
    return armed


def time_left(deadline: float, seconds: float, overrun: Callable[[], Exception]) -> float:
    """``seconds``, or less when the run's ``deadline`` (``time.monotonic``) comes sooner;
    once it has passed, raises ``overrun()`` (each device reports that its own way)."""
    remaining = deadline - time.monotonic()
    if remaining <= 0:
        raise overrun()
    return min(seconds, remaining)


def error_from_groups(groups: Mapping[str, str]) -> ErrorResponse | None:
    """AWS's error fields captured by a failure pattern (named groups ``status_code``,
    ``error_code``, ``error_message``); ``None`` when the pattern captured neither code."""
    if "error_code" not in groups and "status_code" not in groups:
        return None
    status = groups.get("status_code", "")
    return ErrorResponse(int(status) if status.isdigit() else 0,
                         groups.get("error_code", ""), groups.get("error_message", ""))
