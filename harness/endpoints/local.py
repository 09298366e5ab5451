"""The emulator on this machine: ``fleetbench emulator`` as a subprocess, or in-process.

The subprocess is the default because it is what a user runs (``fleetbench emulator``)
and because a crash or a hang in the emulator cannot take the test process with it.
In-process (:class:`harness.emulator.app.EmbeddedEmulator`) saves the interpreter start
for unit tests. Either way the emulator listens on free ports (0), and each pytest-xdist
worker starts its own.
"""

from __future__ import annotations

import logging
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from collections.abc import Sequence
from enum import Enum
from pathlib import Path
from typing import Any, ClassVar

from harness.endpoint_info import EndpointInfo
from harness.endpoints.base import EndpointError, EndpointKind
from harness.endpoints.emulated import EmulatedEndpoint

log = logging.getLogger("fleetbench.endpoints")

#: How long to wait for ``endpoint.json`` after starting the emulator.
STARTUP_TIMEOUT_S = 60.0
#: How long SIGTERM gets before SIGKILL.
STOP_TIMEOUT_S = 10.0
#: How much of the emulator's stderr a failure report carries.
STDERR_TAIL_BYTES = 8192


class EmulatorMode(str, Enum):
    """How a :class:`LocalEndpoint` runs the emulator."""

    SUBPROCESS = "subprocess"
    IN_PROCESS = "in-process"
    ATTACHED = "attached"  # started by someone else (``fleetbench emulator`` in CI)


def emulator_command(data_dir: Path, *, api_token: str | None = None,
                     extra_args: Sequence[str] = ()) -> list[str]:
    """A subprocess emulator on free ports that writes ``data_dir/endpoint.json``."""
    cmd = [sys.executable, "-m", "harness.cli", "emulator", "--mqtt-port", "0", "--api-port", "0",
           "--data-dir", str(data_dir), "--log-level", "WARNING"]
    if api_token:
        cmd += ["--api-token", api_token]
    return cmd + list(extra_args)


def wait_for_endpoint_file(path: Path, process: subprocess.Popen[bytes] | None, *,
                           timeout: float = STARTUP_TIMEOUT_S,
                           poll_interval: float = 0.05) -> EndpointInfo:
    """Wait until ``path`` holds a complete ``endpoint.json`` (written atomically by the emulator).

    Fails early, with :class:`EndpointError`, when ``process`` exits first. There is no
    event to wait on across processes short of inotify, so this polls the file.
    """
    deadline = time.monotonic() + timeout
    while True:
        if path.exists():
            try:
                return EndpointInfo.read(path)
            except (FileNotFoundError, ValueError):
                pass  # replaced between exists() and read(); try again
        if process is not None and process.poll() is not None:
            raise EndpointError(f"the emulator exited with status {process.returncode} "
                                "before writing endpoint.json")
        if time.monotonic() >= deadline:
            raise EndpointError(f"the emulator did not write {path} within {timeout:.0f} s")
        time.sleep(poll_interval)


def _tail(path: Path, limit: int = STDERR_TAIL_BYTES) -> str:
    try:
        with path.open("rb") as fh:
            fh.seek(0, os.SEEK_END)
            size = fh.tell()
            fh.seek(max(0, size - limit))
            return fh.read().decode(errors="replace")
    except OSError:
        return ""


class LocalEndpoint(EmulatedEndpoint):
    """A fleetbench emulator this object started and will stop."""

    kind: ClassVar[EndpointKind] = EndpointKind.LOCAL

    def __init__(self, info: EndpointInfo, *, mode: EmulatorMode, api_token: str | None,
                 process: subprocess.Popen[bytes] | None, embedded: Any,
                 data_dir: Path, owns_data_dir: bool, stderr_path: Path | None) -> None:
        super().__init__(info, api_token=api_token)
        self.mode = mode
        self.process = process
        self._embedded = embedded
        self.data_dir = data_dir
        self._owns_data_dir = owns_data_dir
        self.stderr_path = stderr_path

    @classmethod
    def start(cls, *, mode: EmulatorMode | str = EmulatorMode.SUBPROCESS,
              data_dir: Path | None = None, api_token: str | None = None,
              extra_args: Sequence[str] = (),
              startup_timeout: float = STARTUP_TIMEOUT_S) -> LocalEndpoint:
        """Start an emulator on free ports and return its endpoint once it listens.

        ``data_dir`` (kept afterwards) holds the CA, registry and ``endpoint.json``;
        without it a temporary directory is used and removed by :meth:`close`.
        ``extra_args`` are ``fleetbench emulator`` options (subprocess mode only).
        """
        mode = EmulatorMode(mode)
        owns = data_dir is None
        directory = Path(tempfile.mkdtemp(prefix="fleetbench-local-")) if data_dir is None \
            else Path(data_dir)
        directory.mkdir(parents=True, exist_ok=True)
        try:
            if mode is EmulatorMode.IN_PROCESS:
                if extra_args:
                    raise ValueError("extra_args need the subprocess mode")
                return cls._start_in_process(directory, owns, api_token, startup_timeout)
            return cls._start_subprocess(directory, owns, api_token, extra_args, startup_timeout)
        except BaseException:
            if owns:
                shutil.rmtree(directory, ignore_errors=True)
            raise

    @classmethod
    def attach(cls, endpoint_file: Path, *, api_token: str | None = None) -> LocalEndpoint:
        """An emulator that is already running, found by its ``endpoint.json``; :meth:`close`
        leaves it running."""
        info = EndpointInfo.read(Path(endpoint_file))
        return cls(info, mode=EmulatorMode.ATTACHED, api_token=api_token, process=None,
                   embedded=None, data_dir=Path(info.data_dir), owns_data_dir=False,
                   stderr_path=None)

    @classmethod
    def _start_in_process(cls, directory: Path, owns: bool, api_token: str | None,
                          timeout: float) -> LocalEndpoint:
        from harness.emulator.app import EmbeddedEmulator, EmulatorConfig

        embedded = EmbeddedEmulator(EmulatorConfig(mqtt_port=0, api_port=0, data_dir=directory,
                                                   api_token=api_token))
        info = embedded.start(timeout=timeout)
        return cls(info, mode=EmulatorMode.IN_PROCESS, api_token=api_token, process=None,
                   embedded=embedded, data_dir=directory, owns_data_dir=owns, stderr_path=None)

    @classmethod
    def _start_subprocess(cls, directory: Path, owns: bool, api_token: str | None,
                          extra_args: Sequence[str], timeout: float) -> LocalEndpoint:
        endpoint_file = directory / "endpoint.json"
        endpoint_file.unlink(missing_ok=True)  # a previous run's file must not be mistaken
        stderr_path = directory / "emulator.stderr.log"
        cmd = emulator_command(directory, api_token=api_token, extra_args=extra_args)
        with stderr_path.open("wb") as stderr:
            process = subprocess.Popen(cmd, stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL,
                                       stderr=stderr, start_new_session=True)
        try:
            info = wait_for_endpoint_file(endpoint_file, process, timeout=timeout)
        except EndpointError as exc:
            _stop_process(process)
            raise EndpointError(f"{exc}; emulator stderr:\n{_tail(stderr_path)}") from None
        except BaseException:
            _stop_process(process)
            raise
        log.info("event=emulator_started pid=%d mqtt=%s:%d api=%s", process.pid, info.mqtt_host,
                 info.mqtt_port, info.api_url)
        return cls(info, mode=EmulatorMode.SUBPROCESS, api_token=api_token, process=process,
                   embedded=None, data_dir=directory, owns_data_dir=owns, stderr_path=stderr_path)

    def stderr_tail(self, limit: int = STDERR_TAIL_BYTES) -> str:
        """The end of the subprocess emulator's stderr, for failure reports ('' in-process)."""
        return _tail(self.stderr_path, limit) if self.stderr_path is not None else ""

    def is_running(self) -> bool:
        if self._closed:
            return False
        return self.process is None or self.process.poll() is None  # attached: assumed

    def describe(self) -> dict[str, Any]:
        return {**super().describe(), "mode": self.mode.value}

    def _stop_emulator(self) -> None:
        """Stop the emulator (SIGTERM, then SIGKILL) and remove a temporary data dir."""
        if self.process is not None:
            code = _stop_process(self.process)
            if code not in (0, -signal.SIGTERM, None):
                log.warning("event=emulator_exit status=%s", code)
        if self._embedded is not None:
            self._embedded.stop()
        if self._owns_data_dir:
            shutil.rmtree(self.data_dir, ignore_errors=True)


def _stop_process(process: subprocess.Popen[bytes], timeout: float = STOP_TIMEOUT_S) -> int | None:
    """SIGTERM, wait, then SIGKILL; returns the exit status."""
    if process.poll() is not None:
        return process.returncode
    process.send_signal(signal.SIGTERM)
    try:
        return process.wait(timeout)
    except subprocess.TimeoutExpired:
        process.kill()
        return process.wait(timeout)
