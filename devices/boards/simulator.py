"""A simulated board on a pseudo-terminal, with power control: hardware for the bench path.

``python -m devices.boards.simulator --pty [--dir DIR] [--power on|off]`` creates a
pseudo-terminal, prints the path of its serial end (``/dev/pts/N``) on the first line of
stdout and keeps running. Open that path with pyserial (or ``screen``) as if it were a
USB-serial adapter. Behind it, while the board is powered, runs the firmware
(:mod:`devices.boards.firmware`) as a child process; switching the power off kills it
(SIGKILL: whatever it had not written to flash is lost, as on a real board), and
switching it on boots it again from the same flash. The pseudo-terminal itself stays,
like the USB-serial adapter of an unpowered board; what is typed while the board is off
is lost.

The board's directory (``--dir``, a temporary one by default) holds::

    flash/   the firmware's flash (settings, claim, its own credentials)
    power/   the power control files (request, state)
    tty      a symlink to the pseudo-terminal (a stable path for bench files)

Power is switched through the control files, by a relay command in a bench file::

    python -m devices.boards.simulator power --dir DIR on|off|cycle

which returns once the board has switched (so after ``off`` the firmware is gone), or by
signals: SIGUSR1 presses the reset button. SIGTERM or SIGINT end the simulator.
"""

from __future__ import annotations

import argparse
import contextlib
import errno
import json
import os
import secrets
import selectors
import signal
import subprocess
import sys
import tempfile
import time
import tty
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from devices.boards.firmware import EXIT_REBOOT

__all__ = ["Board", "PowerControl", "PowerControlError", "main"]

POLL_S = 0.02
DEFAULT_POWER_TIMEOUT_S = 15.0
#: How much console output to hold for a slow reader before dropping the oldest.
MAX_PENDING = 1 << 20


class PowerControlError(RuntimeError):
    """The simulator did not apply a power request in time (is it running?)."""


class PowerControl:
    """The file protocol between a power command and the simulator.

    A request is ``<token> <on|off|cycle>`` in ``request``; the simulator answers with
    ``<token> <on|off>`` in ``state`` once it has switched. Both are written atomically.
    """

    def __init__(self, directory: Path) -> None:
        self.directory = Path(directory)
        self.request_file = self.directory / "request"
        self.state_file = self.directory / "state"
        self._seen: str | None = None
        self._stamp: tuple[int, int] | None = None

    @staticmethod
    def _write(path: Path, text: str) -> None:
        tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
        tmp.write_text(text)
        os.replace(tmp, path)

    # -- the command's side --------------------------------------------------------------------
    def request(self, action: str, timeout: float = DEFAULT_POWER_TIMEOUT_S) -> str:
        """Ask for ``action`` and wait until it is applied; returns the new state."""
        if action not in ("on", "off", "cycle"):
            raise ValueError(f"power action must be on, off or cycle, got {action!r}")
        if not self.directory.is_dir():
            raise PowerControlError(f"{self.directory}: no such power control directory")
        token = secrets.token_hex(8)
        self._write(self.request_file, f"{token} {action}\n")
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            try:
                seen, state = self.state_file.read_text().split()
            except (OSError, ValueError):
                seen = state = ""
            if seen == token:
                return state
            time.sleep(POLL_S)
        raise PowerControlError(f"the board simulator did not switch {action} within "
                                f"{timeout:g}s (control directory {self.directory})")

    # -- the simulator's side ------------------------------------------------------------------
    def poll(self) -> tuple[str, str] | None:
        """A new request, if one came since the last poll."""
        try:
            st = self.request_file.stat()
        except FileNotFoundError:
            return None
        stamp = (st.st_mtime_ns, st.st_ino)
        if stamp == self._stamp:
            return None
        self._stamp = stamp
        try:
            token, action = self.request_file.read_text().split()
        except (OSError, ValueError):
            return None
        if token == self._seen:
            return None
        self._seen = token
        return token, action

    def report(self, token: str | None, state: str) -> None:
        self._write(self.state_file, f"{token or 'initial'} {state}\n")


class Board:
    """The supervisor: a pseudo-terminal, the firmware behind it, and its power."""

    def __init__(self, flash: Path, control: PowerControl, *, link: Path | None = None,
                 firmware_cmd: Sequence[str] | None = None) -> None:
        self.flash = flash
        self.control = control
        self.link = link
        self.firmware_cmd = list(firmware_cmd or [sys.executable, "-m",
                                                  "devices.boards.firmware"])
        self.master, self._slave = os.openpty()
        tty.setraw(self._slave)  # a UART: no echo, no line discipline
        self.path = os.ttyname(self._slave)
        os.set_blocking(self.master, False)
        self.firmware: subprocess.Popen[bytes] | None = None
        self._pending = bytearray()
        self._selector = selectors.DefaultSelector()
        self._selector.register(self.master, selectors.EVENT_READ, "master")
        self._stop = False
        self._reset = False
        if link is not None:
            with contextlib.suppress(FileNotFoundError):
                link.unlink()
            link.symlink_to(self.path)

    @property
    def powered(self) -> bool:
        return self.firmware is not None

    def power_on(self, reason: str) -> None:
        if self.firmware is not None:
            return
        env = {**os.environ, "PYTHONUNBUFFERED": "1"}
        self.firmware = subprocess.Popen(
            [*self.firmware_cmd, "--flash", str(self.flash), "--reset-reason", reason],
            stdin=subprocess.PIPE, stdout=subprocess.PIPE, env=env)
        assert self.firmware.stdout is not None
        os.set_blocking(self.firmware.stdout.fileno(), False)
        self._selector.register(self.firmware.stdout, selectors.EVENT_READ, "firmware")

    def power_off(self) -> None:
        firmware, self.firmware = self.firmware, None
        if firmware is None:
            return
        assert firmware.stdout is not None
        self._selector.unregister(firmware.stdout)
        firmware.kill()  # a power cut: no clean-up in the firmware
        firmware.wait()
        for stream in (firmware.stdin, firmware.stdout):
            if stream is not None:
                with contextlib.suppress(OSError):
                    stream.close()

    def cycle(self, reason: str) -> None:
        self.power_off()
        self.power_on(reason)

    # -- I/O -----------------------------------------------------------------------------------
    def _from_firmware(self) -> None:
        firmware = self.firmware
        assert firmware is not None and firmware.stdout is not None
        try:
            data = os.read(firmware.stdout.fileno(), 65536)
        except BlockingIOError:
            return
        if data:
            self._to_console(data)
            return
        status = firmware.wait()  # the firmware ended by itself
        self.power_off()
        if status == EXIT_REBOOT:
            self.power_on("software reset")
        else:
            print(f"simulator: firmware exited with status {status}; the board is off until "
                  "power is cycled", file=sys.stderr, flush=True)

    def _to_console(self, data: bytes) -> None:
        self._pending += data
        if len(self._pending) > MAX_PENDING:
            del self._pending[:len(self._pending) - MAX_PENDING]
        self._flush_console()

    def _flush_console(self) -> None:
        while self._pending:
            try:
                written = os.write(self.master, self._pending)
            except BlockingIOError:
                break
            except OSError as exc:
                if exc.errno == errno.EIO:
                    break
                raise
            del self._pending[:written]
        events = selectors.EVENT_READ | (selectors.EVENT_WRITE if self._pending else 0)
        self._selector.modify(self.master, events, "master")

    def _from_console(self) -> None:
        try:
            data = os.read(self.master, 65536)
        except (BlockingIOError, OSError):
            return
        firmware = self.firmware
        if not data or firmware is None or firmware.stdin is None:
            return  # typed at an unpowered board: lost
        try:
            firmware.stdin.write(data)
            firmware.stdin.flush()
        except (BrokenPipeError, ValueError):
            pass

    def _apply_power(self) -> None:
        request = self.control.poll()
        if request is not None:
            token, action = request
            if action == "on":
                self.power_on("power-on")
            elif action == "off":
                self.power_off()
            elif action == "cycle":
                self.cycle("power-on")
            self.control.report(token, "on" if self.powered else "off")
        if self._reset:
            self._reset = False
            if self.powered:
                self.cycle("reset pin")
            self.control.report(None, "on" if self.powered else "off")

    def run(self) -> None:
        while not self._stop:
            for key, mask in self._selector.select(POLL_S):
                if key.data == "firmware" and self.firmware is not None:
                    self._from_firmware()
                elif key.data == "master":
                    if mask & selectors.EVENT_READ:
                        self._from_console()
                    if mask & selectors.EVENT_WRITE:
                        self._flush_console()
            self._apply_power()

    def stop(self, *_: Any) -> None:
        self._stop = True

    def press_reset(self, *_: Any) -> None:
        self._reset = True

    def close(self) -> None:
        self.power_off()
        if self.link is not None:
            with contextlib.suppress(FileNotFoundError):
                self.link.unlink()
        for fd in (self.master, self._slave):
            with contextlib.suppress(OSError):
                os.close(fd)


def _serve(args: argparse.Namespace) -> int:
    base = Path(args.dir) if args.dir else Path(tempfile.mkdtemp(prefix="fleetbench-board-"))
    flash = Path(args.flash) if args.flash else base / "flash"
    control_dir = Path(args.control) if args.control else base / "power"
    link = Path(args.link) if args.link else (base / "tty" if args.dir or not args.flash
                                              else None)
    for directory in (base, flash, control_dir):
        directory.mkdir(parents=True, exist_ok=True)
    control = PowerControl(control_dir)
    board = Board(flash, control, link=link)
    signal.signal(signal.SIGTERM, board.stop)
    signal.signal(signal.SIGINT, board.stop)
    signal.signal(signal.SIGUSR1, board.press_reset)
    try:
        control.poll()  # a request left from an earlier simulator is not for us
        if args.power == "on":
            board.power_on("power-on")
        control.report(None, "on" if board.powered else "off")
        print(board.path, flush=True)
        if args.info:
            Path(args.info).write_text(json.dumps({
                "pty": board.path, "dir": str(base), "flash": str(flash),
                "control": str(control_dir), "link": str(link) if link else None,
                "pid": os.getpid()}) + "\n")
        board.run()
    finally:
        board.close()
    return 0


def _power(args: argparse.Namespace) -> int:
    control_dir = Path(args.control) if args.control else Path(args.dir) / "power"
    try:
        state = PowerControl(control_dir).request(args.action, args.timeout)
    except PowerControlError as exc:
        print(f"simulator power: {exc}", file=sys.stderr)
        return 1
    print(state)
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="python -m devices.boards.simulator",
        description="A simulated fleet provisioning board behind a pseudo-terminal.")
    parser.add_argument("--pty", action="store_true",
                        help="serve the console on a pseudo-terminal (the only mode; prints "
                             "its path on the first line of stdout)")
    parser.add_argument("--dir", help="the board's directory (flash/, power/, tty)")
    parser.add_argument("--flash", help="flash directory (default DIR/flash)")
    parser.add_argument("--control", help="power control directory (default DIR/power)")
    parser.add_argument("--link", help="symlink to create to the pty (default DIR/tty)")
    parser.add_argument("--power", choices=("on", "off"), default="on",
                        help="power state at start (default on)")
    parser.add_argument("--info", help="also write the paths as JSON to this file")
    sub = parser.add_subparsers(dest="command")
    power = sub.add_parser("power", help="switch a running simulator's power")
    power.add_argument("--dir", help="the board's directory")
    power.add_argument("--control", help="its power control directory")
    power.add_argument("action", choices=("on", "off", "cycle"))
    power.add_argument("--timeout", type=float, default=DEFAULT_POWER_TIMEOUT_S)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    if args.command == "power":
        if not (args.dir or args.control):
            parser.error("power needs --dir or --control")
        return _power(args)
    return _serve(args)


if __name__ == "__main__":
    sys.exit(main())
