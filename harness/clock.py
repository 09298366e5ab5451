"""The one clock every expiry in the emulator reads.

Ownership tokens (1 h), trusted-user claims (5 min), persistent sessions and
quotas all compare against :meth:`Clock.now`. Tests move it forward with
:meth:`Clock.advance` so the five-minute and one-hour rules are checked in
milliseconds. The clock is real time plus an offset that only grows, so it
never runs backwards.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Callable


class Clock:
    """Wall-clock time (epoch seconds) plus a test-controlled forward offset."""

    def __init__(self, offset: float = 0.0) -> None:
        self._offset = float(offset)
        self._lock = threading.Lock()
        self._listeners: list[Callable[[float], None]] = []

    def now(self) -> float:
        """Current emulated time in epoch seconds."""
        return time.time() + self._offset

    def now_ms(self) -> int:
        """Current emulated time in epoch milliseconds (lifecycle events use this)."""
        return int(self.now() * 1000)

    @property
    def offset(self) -> float:
        return self._offset

    def advance(self, seconds: float) -> float:
        """Move the clock forward by ``seconds`` (>= 0); returns the new time.

        Listeners (for example the expiry sweeper) are called with the new time
        so that expiries take effect at once rather than on the next sweep.
        """
        if seconds < 0:
            raise ValueError("the clock only moves forward")
        with self._lock:
            self._offset += float(seconds)
            listeners = list(self._listeners)
        now = self.now()
        for listener in listeners:
            listener(now)
        return now

    def on_advance(self, listener: Callable[[float], None]) -> None:
        """Call ``listener(now)`` after every :meth:`advance` (from the caller's thread)."""
        with self._lock:
            self._listeners.append(listener)
