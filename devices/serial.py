"""``SerialDevice``: a real board on a lab bench, driven through its serial console.

The board is described in a bench file (:mod:`devices.bench`). One ``provision`` is one
boot of the board:

1. open the console and start capturing it (every line timestamped into the device log)
   *before* any flash, power or reset action, so early boot output is never lost;
2. flash, if the bench says credentials go on by flashing;
3. power-cycle or reset the board, wait for its console to be ready;
4. type the setup commands (endpoint, CA, claim, template, parameters) and wait for the
   prompt after each;
5. start the flow, then wait for the milestone patterns in order (a recovering board
   may skip some) while watching the failure patterns, each with its timeout;
6. report what the log showed: a :class:`DeviceResult` with one step per milestone, the
   certificate id and thing name the patterns captured, AWS's error fields from a
   failure pattern, and the log attached. The verdict is still the endpoint's.

A fault point armed with :meth:`SerialDevice.cut_at` cuts the board's power as soon as
the bench's pattern for it shows (after the optional ``arm`` command that makes debug
firmware halt there); the next ``provision`` boots it again, and it must recover.

Console and power come from pyserial and the bench's commands (DTR/RTS pulses, relay or
power-strip commands), or from labgrid when the board has a ``labgrid`` section
(:mod:`devices.labgrid_adapter`, the ``fleetbench[bench]`` extra).
"""

from __future__ import annotations

import subprocess
import threading
import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, ClassVar, Protocol

from devices.base import (
    DeviceConfigError,
    DeviceInputs,
    DeviceResult,
    ErrorResponse,
    FaultPoint,
    StepRecord,
    register_device_kind,
)
from devices.bench import (
    Bench,
    BoardSpec,
    CommandSpec,
    Milestone,
    PowerKind,
    PowerSpec,
    SetupStep,
    load_bench,
)
from devices.placeholders import Values
from devices.provision_common import DefaultWorkdir, arm_fault_point, error_from_groups, time_left
from devices.transcript import Expectation, ExpectFailed, ExpectTimeout, Seen, Transcript

__all__ = [
    "BenchError",
    "CommandPower",
    "LinePower",
    "NoPower",
    "SerialConsole",
    "SerialDevice",
    "SerialOptions",
    "open_board",
]

#: How long one console read waits (the capture thread's tick).
READ_TICK_S = 0.05


class BenchError(RuntimeError):
    """The bench did not do what it was told (a power command failed, the port vanished).
    Reported as the run's failure, not as a configuration error."""


class ConsolePort(Protocol):
    """What the adapter needs of a console (labgrid's ConsoleProtocol, trimmed)."""

    def read(self, size: int = 1, timeout: float = 0.0) -> bytes: ...

    def write(self, data: bytes) -> None: ...

    def close(self) -> None: ...


class PowerSwitch(Protocol):
    def on(self) -> None: ...

    def off(self) -> None: ...

    def cycle(self) -> None: ...


# --------------------------------------------------------------------------- pyserial


class SerialConsole:
    """A serial port through pyserial (a device path or a pyserial URL)."""

    def __init__(self, port: str, baud: int, *, where: str = "") -> None:
        import serial

        if "://" not in port and not Path(port).exists():
            raise DeviceConfigError(f"{where + ': ' if where else ''}serial port {port} does "
                                    "not exist (is the board plugged in, or the simulator "
                                    "running?)")
        try:
            self._serial = serial.serial_for_url(port, baudrate=baud, timeout=READ_TICK_S,
                                                 write_timeout=10)
        except (serial.SerialException, OSError, ValueError) as exc:
            raise DeviceConfigError(
                f"{where + ': ' if where else ''}cannot open serial port {port}: {exc}") \
                from None
        self.port = port
        # What the port buffered before we opened it is an earlier session's, not this
        # boot's (a boot is captured from here on).
        self._serial.reset_input_buffer()

    def read(self, size: int = 1, timeout: float = 0.0) -> bytes:
        self._serial.timeout = timeout
        waiting = getattr(self._serial, "in_waiting", 0) or 0
        return bytes(self._serial.read(max(size, waiting)))

    def write(self, data: bytes) -> None:
        self._serial.write(data)
        self._serial.flush()

    def set_line(self, line: str, asserted: bool) -> None:
        """Drive DTR or RTS (a reset circuit on many boards)."""
        if line == "dtr":
            self._serial.dtr = asserted
        else:
            self._serial.rts = asserted

    def close(self) -> None:
        self._serial.close()


# --------------------------------------------------------------------------- power


def _run_command(command: CommandSpec, values: Values, transcript: Transcript | None,
                 what: str) -> None:
    argv = command.render(values)
    if transcript is not None:
        transcript.note(f"power {what}: {command.render_redacted(values)}")
    try:
        done = subprocess.run(argv, stdin=subprocess.DEVNULL, capture_output=True,
                              timeout=command.timeout_s, check=False)
    except subprocess.TimeoutExpired:
        raise BenchError(f"{command.where}: power {what} did not finish within "
                         f"{command.timeout_s:g}s") from None
    except OSError as exc:
        raise BenchError(f"{command.where}: cannot run power {what} command: "
                         f"{exc.strerror}") from None
    if transcript is not None:
        for line in (done.stdout + done.stderr).decode(errors="replace").splitlines():
            transcript.note(line, "power")
    if done.returncode != 0:
        raise BenchError(f"{command.where}: power {what} command failed "
                         f"(exit status {done.returncode})")


class CommandPower:
    """Relay, USB hub or power strip commands from the bench file."""

    def __init__(self, spec: PowerSpec, values: Values,
                 transcript: Transcript | None = None) -> None:
        self.spec = spec
        self.values = values
        self.transcript = transcript

    def on(self) -> None:
        if self.spec.on is not None:
            _run_command(self.spec.on, self.values, self.transcript, "on")
        elif self.spec.cycle is not None:
            _run_command(self.spec.cycle, self.values, self.transcript, "cycle")

    def off(self) -> None:
        if self.spec.off is None:
            raise BenchError("the bench has no power off command for this board")
        _run_command(self.spec.off, self.values, self.transcript, "off")

    def cycle(self) -> None:
        if self.spec.cycle is not None:
            _run_command(self.spec.cycle, self.values, self.transcript, "cycle")
            return
        if self.spec.off is not None:
            self.off()
        self.on()


class LinePower:
    """A DTR or RTS line wired to the board's reset: asserted holds it in reset ("off")."""

    def __init__(self, console: SerialConsole, line: str, pulse_s: float,
                 transcript: Transcript | None = None) -> None:
        self.console = console
        self.line = line
        self.pulse_s = pulse_s
        self.transcript = transcript

    def _set(self, asserted: bool) -> None:
        if self.transcript is not None:
            self.transcript.note(f"{self.line.upper()} {'asserted' if asserted else 'released'}")
        self.console.set_line(self.line, asserted)

    def on(self) -> None:
        self._set(False)

    def off(self) -> None:
        self._set(True)

    def cycle(self) -> None:
        self._set(True)
        time.sleep(self.pulse_s)
        self._set(False)


class NoPower:
    """Nobody can switch the board: a "cycle" only pokes the console for a prompt."""

    def __init__(self, console: ConsolePort, newline: str) -> None:
        self.console = console
        self.newline = newline

    def on(self) -> None:
        pass

    def off(self) -> None:
        raise BenchError("the bench cannot switch this board off (power: none)")

    def cycle(self) -> None:
        self.console.write(self.newline.encode())


# --------------------------------------------------------------------------- capture


class _Capture:
    """Reads the console from the moment it opens, into the transcript."""

    def __init__(self, console: ConsolePort, transcript: Transcript) -> None:
        self.console = console
        self.transcript = transcript
        self._stop = threading.Event()
        self.error: str | None = None
        self._thread = threading.Thread(target=self._run, name="fleetbench-console",
                                        daemon=True)
        self._thread.start()

    def _run(self) -> None:
        decoder_tail = b""
        while not self._stop.is_set():
            try:
                data = self.console.read(4096, READ_TICK_S)
            except Exception as exc:  # the port went away (unplugged, closed)
                if not self._stop.is_set():
                    self.error = f"console read failed: {type(exc).__name__}: {exc}"
                    self.transcript.note(self.error)
                break
            if not data:
                continue
            data = decoder_tail + data
            try:  # keep a split multi-byte character for the next read
                text = data.decode("utf-8")
                decoder_tail = b""
            except UnicodeDecodeError as exc:
                if exc.start >= len(data) - 3 and exc.reason == "unexpected end of data":
                    text, decoder_tail = data[:exc.start].decode("utf-8"), data[exc.start:]
                else:
                    text, decoder_tail = data.decode("utf-8", errors="replace"), b""
            if text.endswith("\r"):  # the "\n" of a CRLF may be in the next read
                text, decoder_tail = text[:-1], b"\r" + decoder_tail
            self.transcript.feed(text.replace("\r\n", "\n"), "console")
        if decoder_tail:
            self.transcript.feed(decoder_tail.decode("utf-8", errors="replace"), "console")
        self.transcript.end()

    def stop(self) -> None:
        self._stop.set()
        self._thread.join(2.0)


# --------------------------------------------------------------------------- the device


@dataclass(frozen=True)
class SerialOptions:
    """``create_device("serial", bench="bench.yaml", board="b1")``."""

    bench: Path | str | None = None
    board: str | None = None

    def __post_init__(self) -> None:
        if self.bench is None or not self.board:
            raise DeviceConfigError("the serial device needs bench (a bench file) and board "
                                    "(a board name in it)")


def open_board(spec: BoardSpec, values: Values, transcript: Transcript | None,
               ) -> tuple[ConsolePort, PowerSwitch, Any]:
    """The board's console and power switch; the third item is closed with them."""
    if spec.labgrid is not None:
        from devices.labgrid_adapter import LabgridBoard

        board = LabgridBoard.open(spec.labgrid)
        return board.console, board.power, board
    assert spec.console.port is not None
    console = SerialConsole(spec.console.port, spec.console.baud, where=spec.where)
    power: PowerSwitch
    if spec.power.kind is PowerKind.COMMAND:
        power = CommandPower(spec.power, values, transcript)
    elif spec.power.kind is PowerKind.LINE:
        assert spec.power.line is not None
        power = LinePower(console, spec.power.line, spec.power.pulse_s, transcript)
    else:
        power = NoPower(console, spec.console.newline)
    return console, power, None


@register_device_kind("serial")
class SerialDevice:
    """A board from a bench file. Capabilities: Provisioner, Power, FaultPoints."""

    kind: ClassVar[str] = "serial"
    options_type: ClassVar[type] = SerialOptions

    def __init__(self, options: SerialOptions) -> None:
        assert options.bench is not None and options.board is not None
        self.bench: Bench = load_bench(options.bench)
        self.spec: BoardSpec = self.bench.board(options.board)
        self._armed: FaultPoint | None = None
        self._workdirs = DefaultWorkdir(f"fleetbench-{self.name}-")

    @property
    def name(self) -> str:
        return self.spec.name

    # -- FaultPoints ---------------------------------------------------------------------------
    @property
    def fault_points(self) -> tuple[FaultPoint, ...]:
        return tuple(self.spec.fault_points)

    def cut_at(self, point: FaultPoint | str | None) -> None:
        def refusal(armed: FaultPoint) -> str:
            known = ", ".join(p.value for p in self.spec.fault_points) or "none"
            return (f"{self.spec.where}: no fault point {armed.value} in the bench (fault "
                    f"points of this board: {known})")

        self._armed = arm_fault_point(point, self.spec.fault_points, refusal)

    # -- Power ---------------------------------------------------------------------------------
    def _switch(self, action: str) -> None:
        values = Values.only(board=self.spec.name, tty=self.spec.console.port or "")
        if self.spec.power.kind is PowerKind.COMMAND:  # a relay needs no console
            getattr(CommandPower(self.spec.power, values), action)()
            return
        console, power, extra = open_board(self.spec, values, None)
        try:
            getattr(power, action)()
        finally:
            console.close()
            if extra is not None:
                extra.close()

    def on(self) -> None:
        self._switch("on")

    def off(self) -> None:
        self._switch("off")

    def cycle(self) -> None:
        self._switch("cycle")

    # -- Provisioner ---------------------------------------------------------------------------
    def provision(self, inputs: DeviceInputs) -> DeviceResult:
        """One boot of the board through the bench (see the module docstring)."""
        cut, self._armed = self._armed, None
        workdir = self._workdirs.for_run(inputs)
        values = Values.from_inputs(inputs, workdir=workdir, extra={
            "board": self.spec.name, "tty": self.spec.console.port or ""})
        self._check(values, inputs, cut)  # fail fast, before the board is touched
        transcript = Transcript(workdir / f"fleetbench-console-{self.spec.name}.log",
                                secrets=values.secrets())
        try:
            console, power, extra = open_board(self.spec, values, transcript)
        except BaseException:
            transcript.close()
            raise
        capture = _Capture(console, transcript)
        run = _BoardRun(self, inputs, values, console, power, transcript, cut)
        try:
            return run.execute()
        finally:
            capture.stop()
            console.close()
            if extra is not None:
                extra.close()
            transcript.close()

    def _check(self, values: Values, inputs: DeviceInputs, cut: FaultPoint | None) -> None:
        spec = self.spec
        for step in spec.setup:
            if step.send is not None:
                step.send.check(values)
            if step.each_param is not None:
                for name, value in inputs.parameters.items():
                    step.each_param.check(_param_values(values, name, value))
        if spec.start is not None:
            spec.start.check(values)
        if spec.flash is not None:
            spec.flash.check(values)
        if cut is not None:
            arm = spec.fault_points[cut].arm
            if arm is not None:
                arm.check(values)


def _param_values(values: Values, name: str, value: str) -> Values:
    return values.extended(name=name, value=value)


class _Failed(Exception):
    def __init__(self, failure: str | None, error: ErrorResponse | None = None) -> None:
        super().__init__(failure or "rejected")
        self.failure = failure
        self.error = error


class _Cut(Exception):
    def __init__(self, point: FaultPoint) -> None:
        super().__init__(f"power cut at {point.value}")
        self.point = point


class _BoardRun:
    """One boot of a board on the bench."""

    def __init__(self, device: SerialDevice, inputs: DeviceInputs, values: Values,
                 console: ConsolePort, power: PowerSwitch, transcript: Transcript,
                 cut: FaultPoint | None) -> None:
        self.device = device
        self.spec = device.spec
        self.inputs = inputs
        self.values = values
        self.console = console
        self.power = power
        self.transcript = transcript
        self.cut = cut
        self.deadline = time.monotonic() + inputs.timeout_s
        self.steps: list[StepRecord] = []
        self.facts: dict[str, str] = {}
        self.last = time.time()
        self.failures = tuple(Expectation(f"failure:{m.name}", m.pattern)
                              for m in self.spec.failures)
        self.fault: tuple[Expectation, ...] = ()
        if cut is not None:
            self.fault = (Expectation("cut", self.spec.fault_points[cut].at),)

    # -- helpers ---------------------------------------------------------------------------------
    def remaining(self, timeout: float) -> float:
        return time_left(self.deadline, timeout, lambda: _Failed(
            f"run exceeded its {self.inputs.timeout_s:g}s budget"))

    def record(self, name: str, ok: bool, detail: dict[str, str], at: float | None = None,
               error_code: str | None = None) -> None:
        end = at if at is not None else time.time()
        self.steps.append(StepRecord(name, self.last, max(end - self.last, 0.0), ok, detail,
                                     error_code))
        self.last = end

    def send(self, text: str, shown: str) -> None:
        self.transcript.sent(shown)
        self.console.write((text + self.spec.console.newline).encode())
        if self.spec.console.line_delay_s:
            time.sleep(self.spec.console.line_delay_s)

    def expect(self, wanted: Sequence[Expectation], timeout: float, what: str) -> Seen:
        """Wait for one of ``wanted`` while watching failures and the armed fault point."""
        try:
            seen = self.transcript.expect((*wanted, *self.failures, *self.fault),
                                          self.remaining(timeout))
        except ExpectTimeout:
            raise _Failed(f"timeout after {timeout:g}s waiting for {what}") from None
        except ExpectFailed as exc:
            raise _Failed(f"console closed while waiting for {what} ({exc})") from None
        if seen.name == "cut":
            assert self.cut is not None
            self.transcript.note(f"fault point {self.cut.value}: cutting power")
            self.power.off()
            raise _Cut(self.cut)
        if seen.name.startswith("failure:"):
            self.failed(seen)
        return seen

    def failed(self, seen: Seen) -> None:
        groups = dict(seen.groups)
        name = seen.name.removeprefix("failure:")
        error = error_from_groups(groups)
        self.record(name, False, groups, seen.at,
                    error_code=(error.error_code if error else None) or name)
        failure = None if error is not None else (groups.get("reason") or seen.line.strip())
        raise _Failed(failure, error)

    # -- the run ---------------------------------------------------------------------------------
    def execute(self) -> DeviceResult:
        error: ErrorResponse | None = None
        failure: str | None = None
        stopped_at: str | None = None
        self.transcript.note(f"board {self.spec.name}: run for {self.inputs.device_id}"
                             + (f" (cut armed at {self.cut.value})" if self.cut else ""))
        try:
            self.boot()
            self.deliver()
            self.follow()
        except _Cut as cut:
            failure, stopped_at = str(cut), cut.point.value
        except _Failed as exc:
            failure, error = exc.failure, exc.error
        except BenchError as exc:
            failure = str(exc)
            self.transcript.note(failure)
        ok = failure is None and error is None
        self.transcript.note(f"result ok={str(ok).lower()}"
                             + (f" error={error.error_code}" if error else "")
                             + (f" failure={failure}" if failure else ""))
        return DeviceResult(
            ok=ok, device_id=self.inputs.device_id, kind=self.device.kind,
            thing_name=self.facts.get("thing_name") or None,
            certificate_id=self.facts.get("certificate_id") or None, error=error,
            failure=failure, stopped_at=stopped_at, steps=tuple(self.steps),
            log_path=self.transcript.log_path)

    def boot(self) -> None:
        spec = self.spec
        if spec.flash is not None:
            self.flash(spec.flash)
        self.transcript.note("power cycle")
        self.transcript.skip()  # the boot is what comes after this (all of it is logged)
        self.power.cycle()
        if spec.power.settle_s:
            time.sleep(spec.power.settle_s)
        seen = self.expect((Expectation("boot", spec.boot.ready),), spec.boot.timeout_s,
                           "the console to be ready")
        self.record("boot", True, {}, seen.at)

    def flash(self, command: CommandSpec) -> None:
        self.transcript.note(f"flash: {command.render_redacted(self.values)}")
        try:
            done = subprocess.run(command.render(self.values), stdin=subprocess.DEVNULL,
                                  capture_output=True,
                                  timeout=self.remaining(command.timeout_s), check=False)
        except subprocess.TimeoutExpired:
            raise _Failed(f"flash command did not finish within {command.timeout_s:g}s") \
                from None
        except OSError as exc:
            raise _Failed(f"cannot run the flash command: {exc.strerror}") from None
        self.transcript.feed((done.stdout + done.stderr).decode(errors="replace"), "flash")
        ok = done.returncode == 0
        self.record("flash", ok, {"exit_status": str(done.returncode)},
                    error_code=None if ok else "FlashFailed")
        if not ok:
            raise _Failed(f"flash command failed (exit status {done.returncode})")

    def command(self, text: str, shown: str, step: SetupStep | None) -> None:
        console = self.spec.console
        wanted = step.expect if step is not None and step.expect is not None else console.prompt
        assert wanted is not None
        self.send(text, shown)
        expectations = [Expectation("reply", wanted)]
        if console.command_error is not None:
            expectations.insert(0, Expectation("refused", console.command_error))
        timeout = step.timeout_s if step is not None and step.timeout_s else \
            console.command_timeout_s
        seen = self.expect(expectations, timeout, f"the reply to {shown!r}")
        if seen.name == "refused":
            reason = seen.groups.get("reason") or seen.line.strip()
            self.record("setup", False, {"command": shown, "reason": reason}, seen.at,
                        error_code="CommandRefused")
            raise _Failed(f"the board refused {shown!r}: {reason}")

    def deliver(self) -> None:
        """Setup commands (credentials, parameters), then the fault trap, then start."""
        sent = 0
        for step in self.spec.setup:
            if step.send is not None:
                self.command(step.send.render(self.values),
                             step.send.render_redacted(self.values), step)
                sent += 1
            if step.each_param is not None:
                for name, value in self.inputs.parameters.items():
                    values = _param_values(self.values, name, value)
                    self.command(step.each_param.render(values),
                                 step.each_param.render_redacted(values), step)
                    sent += 1
        if self.spec.setup:
            self.record("setup", True, {"commands": str(sent)})
        if self.cut is not None:
            arm = self.spec.fault_points[self.cut].arm
            if arm is not None:
                self.command(arm.render(self.values), arm.render_redacted(self.values), None)
        if self.spec.start is not None:
            start = self.spec.start
            self.send(start.render(self.values), start.render_redacted(self.values))

    def follow(self) -> None:
        """Milestones in order; a later one may come first (a resuming board skips some)."""
        pending: list[Milestone] = list(self.spec.milestones)
        while pending:
            expectations = [Expectation(m.name, m.pattern) for m in pending]
            names = ", ".join(m.name for m in pending)
            seen = self.expect(expectations, pending[0].timeout_s, f"milestone {names}")
            self.facts.update({k: v for k, v in seen.groups.items() if v})
            self.record(seen.name, True, dict(seen.groups), seen.at)
            index = next(i for i, m in enumerate(pending) if m.name == seen.name)
            del pending[:index + 1]
            if seen.name == self.spec.done:
                return
        raise _Failed(f"the board never showed milestone {self.spec.done}")
