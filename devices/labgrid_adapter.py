"""Console and power through labgrid, for labs that already run it (``fleetbench[bench]``).

Shared labs spread boards over many hosts with labgrid's coordinator and exporters,
with reservations and dozens of power-switch drivers; fleetbench does not rebuild that.
A bench entry with a ``labgrid`` section names either

* ``env``: a labgrid environment file whose target (``target``, default ``main``) binds a
  ``ConsoleProtocol`` driver (``SerialDriver`` on a ``RawSerialPort`` or
  ``NetworkSerialPort``...) and a ``PowerProtocol`` driver (``ExternalPowerDriver``,
  ``NetworkPowerDriver``...); or
* ``place``: a remote place reserved through the coordinator (``coordinator``, default
  labgrid's ``LG_COORDINATOR``); its exported serial port gets a ``SerialDriver`` and its
  power port a ``NetworkPowerDriver``.

Either way the serial adapter sees a console (``read``/``write``) and a power switch
(``on``/``off``/``cycle``) and runs the same flow as with pyserial.
"""

from __future__ import annotations

import os
import tempfile
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

from devices.base import DeviceConfigError
from devices.bench import LabgridSpec

__all__ = ["LabgridBoard", "LabgridConsole", "LabgridPower", "Turns", "place_environment"]


class Turns:
    """One labgrid call at a time (labgrid's step stack assumes one thread), with the
    console reader giving way to anyone else waiting: a plain lock would let the reader,
    which asks again at once, starve a command or a power switch."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._waiting = 0
        self._count = threading.Lock()

    @contextmanager
    def call(self) -> Iterator[None]:
        """Any call but a console read."""
        with self._count:
            self._waiting += 1
        with self._lock:
            with self._count:
                self._waiting -= 1
            yield

    @contextmanager
    def read(self) -> Iterator[None]:
        while self._waiting:
            time.sleep(0.001)
        with self._lock:
            yield


def _labgrid() -> Any:
    try:
        import labgrid
    except ImportError as exc:
        raise DeviceConfigError(
            "this board is reached through labgrid, which is not installed "
            f"(pip install 'fleetbench[bench]'): {exc}") from None
    return labgrid


class LabgridConsole:
    """labgrid's ConsoleProtocol as the serial adapter's console.

    labgrid records every driver call as a step on one stack that assumes one thread;
    the adapter reads the console from a capture thread while it switches power from
    another, so every call into labgrid goes through ``lock``.
    """

    def __init__(self, driver: Any, turns: Turns) -> None:
        self.driver = driver
        self.turns = turns

    def read(self, size: int = 1, timeout: float = 0.0) -> bytes:
        from pexpect import TIMEOUT

        with self.turns.read():
            try:
                return bytes(self.driver.read(size=size, timeout=timeout, max_size=65536))
            except TIMEOUT:  # labgrid raises where pyserial returns nothing
                return b""

    def write(self, data: bytes) -> None:
        with self.turns.call():
            self.driver.write(data)

    def close(self) -> None:
        """Closed with the target (:meth:`LabgridBoard.close`)."""


class LabgridPower:
    """labgrid's PowerProtocol as the serial adapter's power switch (see
    :class:`LabgridConsole` for ``turns``; the console's unread input waits in the port)."""

    def __init__(self, driver: Any, turns: Turns) -> None:
        self.driver = driver
        self.turns = turns

    def on(self) -> None:
        with self.turns.call():
            self.driver.on()

    def off(self) -> None:
        with self.turns.call():
            self.driver.off()

    def cycle(self) -> None:
        with self.turns.call():
            self.driver.cycle()


def place_environment(spec: LabgridSpec) -> str:
    """A labgrid environment (YAML text) for a remote place."""
    import yaml

    target = {
        "resources": {"RemotePlace": {"name": spec.place}},
        "drivers": {"SerialDriver": {}, "NetworkPowerDriver": {}},
    }
    data: dict[str, Any] = {"targets": {spec.target: target}}
    if spec.coordinator:
        data["options"] = {"coordinator_address": spec.coordinator}
    return yaml.safe_dump(data)


class LabgridBoard:
    """An activated labgrid target: its console and power, closed together."""

    def __init__(self, environment: Any, target: Any, console: LabgridConsole,
                 power: LabgridPower, temp_file: Path | None = None) -> None:
        self.environment = environment
        self.target = target
        self.console = console
        self.power = power
        self._temp_file = temp_file

    @classmethod
    def open(cls, spec: LabgridSpec) -> LabgridBoard:
        labgrid = _labgrid()
        temp_file: Path | None = None
        if spec.env is not None:
            env_file = spec.env
        else:
            fd, name = tempfile.mkstemp(prefix="fleetbench-labgrid-", suffix=".yaml")
            with os.fdopen(fd, "w") as fh:
                fh.write(place_environment(spec))
            env_file = temp_file = Path(name)
        try:
            environment = labgrid.Environment(config_file=str(env_file))
            target = environment.get_target(spec.target)
            if target is None:
                raise DeviceConfigError(f"{spec.where}: labgrid environment {env_file} has no "
                                        f"target {spec.target!r}")
            console = target.get_driver("ConsoleProtocol")
            power = target.get_driver("PowerProtocol")
            target.activate(console)
            target.activate(power)
        except DeviceConfigError:
            raise
        except Exception as exc:  # labgrid's own errors: configuration or an absent board
            if temp_file is not None:
                temp_file.unlink(missing_ok=True)
            raise DeviceConfigError(f"{spec.where}: labgrid could not provide the board's "
                                    f"console and power: {type(exc).__name__}: {exc}") from None
        turns = Turns()
        return cls(environment, target, LabgridConsole(console, turns),
                   LabgridPower(power, turns), temp_file)

    def close(self) -> None:
        try:
            with self.console.turns.call():
                self.target.deactivate_all_drivers()
        finally:
            if self._temp_file is not None:
                self._temp_file.unlink(missing_ok=True)
