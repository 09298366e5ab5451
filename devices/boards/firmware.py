"""The simulated board's firmware: a console that provisions for real over MQTT.

It behaves like fleet provisioning demo firmware on a serial console: a boot banner,
a prompt, ``set`` commands that store the endpoint, CA, claim and parameters in flash,
``provision`` to run the flow, and ``[fp]`` log lines for each milestone::

    fp> set endpoint 127.0.0.1 8883 localhost
    ok
    fp> provision
    [fp] start template=demo flow=claim cert=csr format=json mqtt=3
    [fp] connected claim
    [fp] certificate created
    [fp] credentials saved cert=3f1c...
    [fp] registered thing demo-SN1
    [fp] connected device
    [fp] done thing=demo-SN1 cert=3f1c...

A rejection prints ``[fp] error <statusCode> <errorCode> <errorMessage>``; any other
failure ``[fp] failed <reason>``. ``halt-at <fault point>`` arms a debug trap: the next
flow stops there, prints ``[fp] halted at <point>`` and hangs until power is cut.

The flow is the reference virtual device's (:class:`devices.virtual.VirtualDevice`): a
simulated firmware may share the reference client. Its flash is a directory; the
supervisor (:mod:`devices.boards.simulator`) runs this program as the board's power
state says, and kills it for a power cut. The console is stdin/stdout (bytes); lines
end with CR, LF or CRLF. Claim keys are never printed.
"""

from __future__ import annotations

import argparse
import base64
import binascii
import json
import shutil
import sys
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import IO, Any

BANNER = "fleetbench board simulator 1.0 - fleet provisioning demo firmware"
PROMPT = "fp> "
#: Exit status that asks the supervisor for a reset (the ``reboot`` command).
EXIT_REBOOT = 3
CONFIG_DIR = "config"
SETTINGS = "settings.json"
_BLOBS = {"ca": "ca.pem", "claim-cert": "claim.pem", "claim-key": "claim.key"}
_SECRET_BLOBS = ("claim-key",)
HELP = """commands:
  set endpoint <host> <port> [<tls-name>]   MQTT endpoint
  set ca|claim-cert|claim-key <base64>      credentials (or PEM lines, ending -----END...)
  set template <name> | serial <s> | client-id <id>
  set flow claim|trusted-user | cert keys|csr | format json|cbor | mqtt 3|5
  set param <name> <value> | clear params
  show | status | provision | halt-at <fault point>|none | reboot | erase | help"""


@dataclass
class Settings:
    """What the console stored in flash (no key material: that is in its own file)."""

    host: str | None = None
    port: int | None = None
    server_name: str | None = None
    template: str | None = None
    serial: str | None = None
    client_id: str | None = None
    flow: str = "claim"
    cert: str = "keys"
    format: str = "json"
    mqtt: int = 3
    params: dict[str, str] = field(default_factory=dict)

    @classmethod
    def load(cls, path: Path) -> Settings:
        try:
            data = json.loads(path.read_text())
        except (OSError, ValueError):
            return cls()
        known = set(cls.__dataclass_fields__)
        return cls(**{k: v for k, v in data.items() if k in known})

    def save(self, path: Path) -> None:
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_name(path.name + ".tmp")
        tmp.write_text(json.dumps(self.__dict__, indent=2, sort_keys=True))
        tmp.replace(path)


class ConsoleError(Exception):
    """A command the firmware refuses (printed as ``error: ...``)."""


class Console:
    """Line I/O on the board's UART (stdin/stdout as bytes)."""

    def __init__(self, rx: IO[bytes], tx: IO[bytes]) -> None:
        self.rx, self.tx = rx, tx
        self._last_cr = False

    def write(self, text: str) -> None:
        self.tx.write(text.replace("\n", "\r\n").encode("utf-8", errors="replace"))
        self.tx.flush()

    def line(self, text: str) -> None:
        self.write(text + "\n")

    def lines(self) -> Iterator[str]:
        """Input lines; CR, LF and CRLF all end one."""
        buffer = bytearray()
        while True:
            byte = self.rx.read(1)
            if not byte:
                return
            if byte in (b"\r", b"\n"):
                if byte == b"\n" and self._last_cr and not buffer:
                    self._last_cr = False
                    continue
                self._last_cr = byte == b"\r"
                yield buffer.decode("utf-8", errors="replace")
                buffer.clear()
            else:
                self._last_cr = False
                buffer += byte


class Firmware:
    def __init__(self, flash: Path, console: Console) -> None:
        self.flash = flash
        self.config = flash / CONFIG_DIR
        self.console = console
        self.settings = Settings.load(self.config / SETTINGS)
        self.halt_at: str | None = None
        self._pem: tuple[str, list[str]] | None = None  # blob being received as PEM lines

    # -- boot --------------------------------------------------------------------------------
    def boot(self, reset_reason: str) -> None:
        self.console.line("")
        self.console.line(BANNER)
        self.console.line(f"[boot] reset reason: {reset_reason}")
        from devices.credentials import CredentialStore, CredentialStoreError

        try:
            state = CredentialStore(self.flash).load_state()
            self.console.line(f"[boot] flash: phase={state.phase.value}"
                              + (f" thing={state.thing_name}" if state.thing_name else ""))
        except CredentialStoreError as exc:
            self.console.line(f"[boot] flash: unreadable ({exc})")
        self.console.write(PROMPT)

    # -- command loop ------------------------------------------------------------------------
    def serve(self) -> int:
        for text in self.console.lines():
            if self._pem is not None:
                self._pem_line(text)
                if self._pem is None:
                    self.console.write(PROMPT)
                continue
            words = text.strip().split()
            if not words:
                self.console.write(PROMPT)
                continue
            try:
                status = self.command(words)
            except ConsoleError as exc:
                self.console.line(f"error: {exc}")
                status = None
            if status is not None:
                return status
            if self._pem is None:
                self.console.write(PROMPT)
        return 0

    def command(self, words: Sequence[str]) -> int | None:
        name, args = words[0], list(words[1:])
        handlers: dict[str, Callable[[list[str]], int | None]] = {
            "help": lambda a: self._print(HELP),
            "set": self._set,
            "clear": self._clear,
            "show": lambda a: self._show(),
            "status": lambda a: self._status(),
            "provision": lambda a: self._provision(),
            "halt-at": self._halt_at,
            "reboot": lambda a: self._reboot(),
            "erase": lambda a: self._erase(),
        }
        handler = handlers.get(name)
        if handler is None:
            raise ConsoleError(f"unknown command {name!r} (try help)")
        return handler(args)

    def _print(self, text: str) -> None:
        for line in text.splitlines():
            self.console.line(line)

    def _ok(self) -> None:
        self.console.line("ok")

    def _save(self) -> None:
        self.settings.save(self.config / SETTINGS)

    def _set(self, args: list[str]) -> None:
        if not args:
            raise ConsoleError("set what? (try help)")
        what, rest = args[0], args[1:]
        s = self.settings
        if what in _BLOBS:
            self._set_blob(what, rest)
            return
        if what == "endpoint":
            if len(rest) not in (2, 3) or not rest[1].isdigit():
                raise ConsoleError("usage: set endpoint <host> <port> [<tls-name>]")
            s.host, s.port = rest[0], int(rest[1])
            s.server_name = rest[2] if len(rest) == 3 else None
        elif what in ("template", "serial", "client-id"):
            if len(rest) != 1:
                raise ConsoleError(f"usage: set {what} <value>")
            setattr(s, what.replace("-", "_"), rest[0])
        elif what == "param":
            if len(rest) < 2:
                raise ConsoleError("usage: set param <name> <value>")
            s.params[rest[0]] = " ".join(rest[1:])
        elif what in ("flow", "cert", "format", "mqtt"):
            choices = {"flow": ("claim", "trusted-user"), "cert": ("keys", "csr"),
                       "format": ("json", "cbor"), "mqtt": ("3", "5")}[what]
            if len(rest) != 1 or rest[0] not in choices:
                raise ConsoleError(f"usage: set {what} {'|'.join(choices)}")
            setattr(s, what, int(rest[0]) if what == "mqtt" else rest[0])
        else:
            raise ConsoleError(f"unknown setting {what!r} (try help)")
        self._save()
        self._ok()

    def _set_blob(self, what: str, rest: list[str]) -> None:
        if not rest:
            raise ConsoleError(f"usage: set {what} <base64> (or PEM lines)")
        if rest[0].startswith("-----BEGIN"):
            self._pem = (what, [" ".join(rest)])
            return
        try:
            data = base64.b64decode("".join(rest), validate=True)
        except (binascii.Error, ValueError):
            raise ConsoleError(f"{what}: not base64") from None
        self._store_blob(what, data)

    def _pem_line(self, text: str) -> None:
        assert self._pem is not None
        what, lines = self._pem
        lines.append(text.strip())
        if text.strip().startswith("-----END"):
            self._pem = None
            self._store_blob(what, ("\n".join(lines) + "\n").encode())

    def _store_blob(self, what: str, data: bytes) -> None:
        from harness import pki

        if b"-----BEGIN" not in data:
            self.console.line(f"error: {what}: not a PEM document")
            return
        path = self.config / _BLOBS[what]
        self.config.mkdir(parents=True, exist_ok=True)
        text = data.decode("utf-8", errors="replace")
        if what in _SECRET_BLOBS:
            pki.write_secret(path, text)
        else:
            pki.write_public(path, text)
        self.console.line(f"ok {what} {len(data)} bytes")

    def _clear(self, args: list[str]) -> None:
        if args != ["params"]:
            raise ConsoleError("usage: clear params")
        self.settings.params.clear()
        self._save()
        self._ok()

    def _show(self) -> None:
        s = self.settings
        self.console.line(f"endpoint={s.host}:{s.port} tls-name={s.server_name or '-'}")
        self.console.line(f"template={s.template} serial={s.serial} client-id={s.client_id}")
        self.console.line(f"flow={s.flow} cert={s.cert} format={s.format} mqtt={s.mqtt}")
        self.console.line("params=" + ",".join(f"{k}={v}" for k, v in sorted(s.params.items())))
        blobs = " ".join(f"{k}={'yes' if (self.config / v).exists() else 'no'}"
                         for k, v in _BLOBS.items())
        self.console.line(blobs)

    def _status(self) -> None:
        from devices.credentials import CredentialStore

        state = CredentialStore(self.flash).load_state()
        self.console.line(f"phase={state.phase.value} thing={state.thing_name or '-'} "
                          f"cert={state.certificate_id or '-'}")

    def _halt_at(self, args: list[str]) -> None:
        from devices.base import FaultPoint

        choices = [p.value for p in FaultPoint]
        if len(args) != 1 or args[0] not in [*choices, "none"]:
            raise ConsoleError(f"usage: halt-at {'|'.join(choices)}|none")
        self.halt_at = None if args[0] == "none" else args[0]
        self._ok()

    def _reboot(self) -> int:
        self.console.line("[boot] rebooting")
        return EXIT_REBOOT

    def _erase(self) -> None:
        for child in self.flash.iterdir():
            if child.is_dir():
                shutil.rmtree(child, ignore_errors=True)
            else:
                child.unlink(missing_ok=True)
        self.settings = Settings()
        self._ok()

    # -- the flow ----------------------------------------------------------------------------
    def _inputs(self) -> Any:
        from devices.base import (
            CertApi,
            ClaimCredentials,
            DeviceInputs,
            EndpointParams,
            Flow,
            MqttVersion,
        )
        from harness.protocol import PayloadFormat

        s = self.settings
        missing = [name for name, value in (("endpoint", s.host), ("template", s.template))
                   if not value]
        missing += [k for k, v in _BLOBS.items() if not (self.config / v).exists()]
        if missing:
            raise ConsoleError(f"not configured: {', '.join(missing)}")
        assert s.host is not None and s.port is not None and s.template is not None
        claim = ClaimCredentials.from_files(self.config / _BLOBS["claim-cert"],
                                            self.config / _BLOBS["claim-key"],
                                            temporary=s.flow == "trusted-user")
        return DeviceInputs(
            endpoint=EndpointParams(s.host, s.port, self.config / _BLOBS["ca"], s.server_name),
            claim=claim, template_name=s.template, flow=Flow(s.flow), cert_api=CertApi(s.cert),
            payload_format=PayloadFormat(s.format), parameters=dict(s.params),
            client_id=s.client_id or (f"{s.serial}-claim" if s.serial else None),
            serial=s.serial, workdir=self.flash, mqtt_version=MqttVersion(s.mqtt),
            timeout_s=120.0)

    def _on_step(self, name: str, _duration: float, error_code: str | None) -> None:
        from devices.credentials import CredentialStore

        if error_code is not None:
            self.console.line(f"[fp] step {name} failed {error_code}")
            return
        state = CredentialStore(self.flash).load_state
        lines = {
            "resume": lambda: f"[fp] resume phase={state().phase.value}",
            "connect_claim": lambda: "[fp] connected claim",
            "create_certificate": lambda: "[fp] certificate created",
            "save_credentials": lambda: f"[fp] credentials saved cert={state().certificate_id}",
            "save_registration": lambda: f"[fp] registered thing {state().thing_name or '-'}",
            "probe_device": lambda: "[fp] stored certificate works",
            "connect_device": lambda: "[fp] connected device",
            "publish_telemetry": lambda: "[fp] telemetry published",
        }
        make = lines.get(name)
        if make is not None:
            self.console.line(make())

    def _provision(self) -> None:
        from devices.base import DeviceConfigError
        from devices.virtual import VirtualDevice, VirtualOptions

        try:
            inputs = self._inputs()
        except DeviceConfigError as exc:
            raise ConsoleError(str(exc)) from None
        s = self.settings
        self.console.line(f"[fp] start template={s.template} flow={s.flow} cert={s.cert} "
                          f"format={s.format} mqtt={s.mqtt}")
        device = VirtualDevice(VirtualOptions(on_step=self._on_step))
        halt, self.halt_at = self.halt_at, None
        if halt is not None:
            device.cut_at(halt)
        result = device.provision(inputs)
        if halt is not None and result.stopped_at is not None and not result.ok:
            self.console.line(f"[fp] halted at {halt}")
            while True:  # a debug trap: only a power cut gets the board out of here
                time.sleep(3600)
        if result.ok:
            self.console.line(f"[fp] done thing={result.thing_name or ''} "
                              f"cert={result.certificate_id}")
        elif result.error is not None:
            e = result.error
            self.console.line(f"[fp] error {e.status_code} {e.error_code} {e.error_message}")
        else:
            self.console.line(f"[fp] failed {result.failure or 'unknown'}")


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m devices.boards.firmware",
                                     description="The simulated board's firmware (run by "
                                                 "devices.boards.simulator).")
    parser.add_argument("--flash", type=Path, required=True, help="the board's flash directory")
    parser.add_argument("--reset-reason", default="power-on")
    args = parser.parse_args(argv)
    args.flash.mkdir(parents=True, exist_ok=True)
    console = Console(sys.stdin.buffer, sys.stdout.buffer)
    firmware = Firmware(args.flash, console)
    firmware.boot(args.reset_reason)
    return firmware.serve()


if __name__ == "__main__":
    sys.exit(main())


__all__ = ["BANNER", "EXIT_REBOOT", "PROMPT", "Console", "Firmware", "Settings", "main"]
