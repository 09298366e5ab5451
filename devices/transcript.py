"""A device's output as evidence: timestamped log lines, and expect-style waits on them.

A board's console and a host program's stdout/stderr are both streams of text from a
device the harness cannot step. The :class:`Transcript` takes that text from a reader
thread (:meth:`Transcript.feed`), writes every line with its arrival time to the device
log, and lets the adapter wait for the first of several patterns
(:meth:`Transcript.expect`, the model is pexpect) with a timeout. The harness's own
actions (power, commands sent) go into the same log, so the log reads as what happened
at the bench, in order.

Secrets (the claim key's content) are scrubbed from every line before it is written.
"""

from __future__ import annotations

import bisect
import datetime as dt
import re
import threading
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from types import MappingProxyType
from typing import IO

__all__ = [
    "ExpectFailed",
    "ExpectTimeout",
    "Expectation",
    "LogLine",
    "Seen",
    "StreamClosed",
    "Transcript",
]

REDACTED = "<redacted>"


@dataclass(frozen=True)
class LogLine:
    at: float  # epoch seconds
    stream: str
    text: str


@dataclass(frozen=True)
class Expectation:
    """A named pattern to wait for (``re.MULTILINE``: ``^``/``$`` are line ends)."""

    name: str
    pattern: re.Pattern[str]

    @classmethod
    def of(cls, name: str, regex: str) -> Expectation:
        return cls(name, re.compile(regex, re.MULTILINE))


@dataclass(frozen=True)
class Seen:
    """A pattern that matched: its name, named groups, when the text arrived, and the
    (scrubbed) line it was on."""

    name: str
    at: float
    line: str
    groups: Mapping[str, str] = field(default_factory=dict)

    def __post_init__(self) -> None:
        object.__setattr__(self, "groups", MappingProxyType(dict(self.groups)))


class ExpectFailed(Exception):
    """None of the patterns turned up."""


class ExpectTimeout(ExpectFailed):
    def __init__(self, names: Sequence[str], timeout: float) -> None:
        super().__init__(f"none of {', '.join(names)} within {timeout:g}s")
        self.names = tuple(names)
        self.timeout = timeout


class StreamClosed(ExpectFailed):
    def __init__(self, names: Sequence[str]) -> None:
        super().__init__(f"the output ended before any of {', '.join(names)}")
        self.names = tuple(names)


class Transcript:
    """Thread-safe: one or more reader threads feed, the adapter's thread expects."""

    def __init__(self, log_path: Path | None = None, *, secrets: Sequence[str] = (),
                 clock: Callable[[], float] = time.time,
                 on_line: Callable[[LogLine], None] | None = None) -> None:
        self.log_path = log_path
        self._secrets = tuple(sorted((s for s in secrets if s), key=len, reverse=True))
        self._clock = clock
        self._on_line = on_line
        self._cond = threading.Condition()
        self._text: list[str] = []  # chunks of the searchable buffer
        self._joined = ""
        self._stale = False
        self._size = 0
        self._arrivals: list[tuple[int, float]] = []  # (end offset, time)
        self._cursor = 0
        self._pending: dict[str, str] = {}
        self._lines: list[LogLine] = []
        self._ended = False
        self.started_at = clock()
        self._file: IO[str] | None = None
        if log_path is not None:
            log_path.parent.mkdir(parents=True, exist_ok=True)
            self._file = log_path.open("a", encoding="utf-8")
            stamp = dt.datetime.fromtimestamp(self.started_at, dt.timezone.utc)
            self._file.write(f"# fleetbench device log, started {stamp.isoformat()}\n")
            self._file.flush()

    # -- scrubbing ----------------------------------------------------------------------------
    def scrub(self, text: str) -> str:
        for secret in self._secrets:
            if secret in text:
                text = text.replace(secret, REDACTED)
        return text

    # -- writing --------------------------------------------------------------------------------
    def _emit(self, at: float, stream: str, text: str) -> None:
        """Record one complete line (lock held)."""
        line = LogLine(at, stream, self.scrub(text.rstrip("\r")))
        self._lines.append(line)
        if self._file is not None:
            self._file.write(f"+{at - self.started_at:9.3f} {stream:>7} | {line.text}\n")
            self._file.flush()
        if self._on_line is not None:
            self._on_line(line)

    def feed(self, data: str, stream: str = "console") -> None:
        """Text as it arrived (any chunking). Searchable at once, logged line by line."""
        if not data:
            return
        now = self._clock()
        with self._cond:
            self._text.append(data)
            self._stale = True
            self._size += len(data)
            self._arrivals.append((self._size, now))
            pending = self._pending.get(stream, "") + data
            *complete, rest = pending.split("\n")
            for line in complete:
                self._emit(now, stream, line)
            self._pending[stream] = rest
            self._cond.notify_all()

    def note(self, text: str, marker: str = "##") -> None:
        """An action of the harness (``power off``, a command sent) in the device's log."""
        with self._cond:
            self._emit(self._clock(), marker, text)

    def sent(self, text: str) -> None:
        """A line the harness typed (give the redacted form when it carries a secret)."""
        self.note(text, ">>")

    def end(self) -> None:
        """No more output will come (EOF): pending partial lines are logged, waits end."""
        with self._cond:
            if self._ended:
                return
            self._ended = True
            now = self._clock()
            for stream, rest in self._pending.items():
                if rest:
                    self._emit(now, stream, rest)
            self._pending.clear()
            self._cond.notify_all()

    def close(self) -> None:
        self.end()
        with self._cond:
            if self._file is not None:
                self._file.close()
                self._file = None

    # -- reading --------------------------------------------------------------------------------
    @property
    def lines(self) -> tuple[LogLine, ...]:
        with self._cond:
            return tuple(self._lines)

    def text(self) -> str:
        """Everything received so far (scrubbed)."""
        with self._cond:
            return self.scrub(self._buffer())

    def _buffer(self) -> str:
        if self._stale:
            self._joined = "".join(self._text)
            self._text = [self._joined]
            self._stale = False
        return self._joined

    def _arrival(self, offset: int) -> float:
        index = bisect.bisect_left(self._arrivals, (offset, float("-inf")))
        if index >= len(self._arrivals):
            return self._arrivals[-1][1] if self._arrivals else self._clock()
        return self._arrivals[index][1]

    def skip(self) -> None:
        """Forget what arrived so far: the next expect only sees newer text."""
        with self._cond:
            self._cursor = self._size

    def expect(self, expectations: Sequence[Expectation], timeout: float) -> Seen:
        """Wait for the earliest match of any expectation after the last match.

        Raises :class:`ExpectTimeout` or, once the output has ended, :class:`StreamClosed`.
        """
        names = [e.name for e in expectations]
        deadline = time.monotonic() + timeout
        with self._cond:
            while True:
                buffer = self._buffer()
                best: tuple[int, Expectation, re.Match[str]] | None = None
                for exp in expectations:
                    match = exp.pattern.search(buffer, self._cursor)
                    if match is not None and (best is None or match.start() < best[0]):
                        best = (match.start(), exp, match)
                if best is not None:
                    _, exp, match = best
                    self._cursor = match.end()
                    line_start = buffer.rfind("\n", 0, match.start()) + 1
                    line_end = buffer.find("\n", match.end())
                    line = buffer[line_start:line_end if line_end >= 0 else len(buffer)]
                    groups = {k: v for k, v in match.groupdict().items() if v is not None}
                    return Seen(exp.name, self._arrival(max(match.end() - 1, 0)),
                                self.scrub(line.rstrip("\r")),
                                {k: self.scrub(v) for k, v in groups.items()})
                if self._ended:
                    raise StreamClosed(names)
                remaining = deadline - time.monotonic()
                if remaining <= 0:
                    raise ExpectTimeout(names, timeout)
                self._cond.wait(remaining)
