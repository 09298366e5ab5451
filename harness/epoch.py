"""Timestamps from AWS answers as epoch seconds.

boto3 hands registry dates (``creationDate``, ``deprecationDate``) over as datetimes,
JSON and the emulator's answers as numbers; the harness compares them as seconds.
"""

from __future__ import annotations

import datetime as dt
from typing import Any

__all__ = ["epoch_seconds"]


def epoch_seconds(value: Any) -> float | None:
    """``value`` (a datetime or a number) as epoch seconds; ``None`` for anything else."""
    if isinstance(value, dt.datetime):
        return value.timestamp()
    if isinstance(value, (int, float)):
        return float(value)
    return None
