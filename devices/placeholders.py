"""Command and console templates filled with a run's inputs: ``{endpoint}``, ``{param:NAME}``...

A process device's command line and environment, and a bench board's console commands
and flashing command, are written once and filled per run. Templates are parsed when the
configuration is loaded, so an unknown placeholder fails before any device is touched;
a placeholder the run cannot fill (``{serial}`` without a serial, ``{param:X}`` without
parameter X) fails before the device is started.

``{{`` and ``}}`` stand for literal braces. A file placeholder takes a form after a colon:
``{claim_cert}`` is the path, ``{claim_cert:b64}`` the file's content in base64 on one line
(what a serial console takes), ``{claim_cert:text}`` the content itself. The claim key's
content is secret: a rendered template that contains it is logged in its redacted form.
"""

from __future__ import annotations

import base64
import json
import re
import sys
import uuid
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from types import MappingProxyType

from devices.base import DeviceConfigError, DeviceInputs

__all__ = [
    "FILE_FORMS",
    "RUN_PLACEHOLDERS",
    "Field",
    "PlaceholderError",
    "Template",
    "Values",
    "claim_client_id",
    "describe_placeholders",
]

#: Placeholders every run provides, with what they stand for (shown in error messages
#: and the README).
RUN_PLACEHOLDERS: Mapping[str, str] = MappingProxyType({
    "endpoint": "MQTT host name or address",
    "port": "MQTT port",
    "server_name": "name the server certificate is checked against (TLS SNI)",
    "ca_file": "CA bundle the device trusts (path; :b64 or :text for its content)",
    "claim_cert": "claim certificate (path; :b64 or :text for its content)",
    "claim_key": "claim private key (path; :b64 or :text for its content, redacted in logs)",
    "claim_cert_id": "claim certificate id",
    "template": "provisioning template name",
    "serial": "device serial number",
    "client_id": "MQTT client id for the claim connection",
    "param": "{param:NAME}: the value of template parameter NAME",
    "params_json": "all template parameters as one JSON object",
    "workdir": "the device's working directory (its flash)",
    "flow": "claim or trusted-user",
    "cert": "keys (CreateKeysAndCertificate) or csr (CreateCertificateFromCsr)",
    "format": "json or cbor",
    "mqtt": "3 (MQTT 3.1.1) or 5",
    "timeout": "seconds the whole run may take",
    "python": "the Python interpreter running fleetbench (for Python device programs)",
})

#: The forms a file placeholder takes after a colon.
FILE_FORMS = ("b64", "text")
_FILE_PLACEHOLDERS = ("ca_file", "claim_cert", "claim_key")
_SECRET_FILES = ("claim_key",)
REDACTED = "<redacted>"

_TOKEN_RE = re.compile(r"\{\{|\}\}|\{([^{}]*)\}|[{}]")


class PlaceholderError(DeviceConfigError):
    """A template names a placeholder that does not exist, or the run cannot fill one."""


@dataclass(frozen=True)
class Field:
    """One ``{name}`` or ``{name:arg}`` in a template."""

    name: str
    arg: str | None = None

    def __str__(self) -> str:
        return "{" + self.name + (f":{self.arg}" if self.arg is not None else "") + "}"


def describe_placeholders(names: Mapping[str, str]) -> str:
    return ", ".join("{" + name + "}" for name in names)


def _parse(text: str, names: Mapping[str, str], where: str) -> tuple[str | Field, ...]:
    parts: list[str | Field] = []
    literal: list[str] = []
    position = 0
    prefix = f"{where}: " if where else ""
    for match in _TOKEN_RE.finditer(text):
        literal.append(text[position:match.start()])
        position = match.end()
        token = match.group(0)
        if token in ("{{", "}}"):
            literal.append(token[0])
            continue
        if token in ("{", "}"):
            raise PlaceholderError(
                f"{prefix}unmatched {token!r} in {text!r} (write {token * 2} for a literal brace)")
        name, _, arg = (match.group(1) or "").partition(":")
        found = Field(name, arg if _ else None)
        if name not in names:
            raise PlaceholderError(
                f"{prefix}unknown placeholder {found} in {text!r}; known placeholders: "
                f"{describe_placeholders(names)}")
        if name == "param":
            if not arg:
                raise PlaceholderError(f"{prefix}{{param}} needs a name: {{param:NAME}}")
        elif name in _FILE_PLACEHOLDERS:
            if found.arg is not None and found.arg not in FILE_FORMS:
                raise PlaceholderError(
                    f"{prefix}{found}: the form after ':' must be one of {', '.join(FILE_FORMS)}")
        elif found.arg is not None:
            raise PlaceholderError(f"{prefix}{found}: {{{name}}} takes no ':' form")
        if literal:
            parts.append("".join(literal))
            literal = []
        parts.append(found)
    literal.append(text[position:])
    tail = "".join(literal)
    if tail:
        parts.append(tail)
    return tuple(parts)


@dataclass(frozen=True)
class Template:
    """A parsed template. ``names`` are the placeholders allowed in this place (the run's by
    default); ``where`` prefixes error messages (``bench.yaml:12: boards.b1.setup[3]``)."""

    text: str
    names: Mapping[str, str] = field(default_factory=lambda: RUN_PLACEHOLDERS, repr=False,
                                     compare=False)
    where: str = field(default="", repr=False, compare=False)
    parts: tuple[str | Field, ...] = field(init=False, repr=False, compare=False)

    def __post_init__(self) -> None:
        object.__setattr__(self, "parts", _parse(self.text, self.names, self.where))

    @property
    def fields(self) -> tuple[Field, ...]:
        return tuple(p for p in self.parts if isinstance(p, Field))

    @property
    def secret(self) -> bool:
        """Whether a rendering carries secret content (and must be logged redacted)."""
        return any(f.name in _SECRET_FILES and f.arg is not None for f in self.fields)

    def render(self, values: Values) -> str:
        return "".join(p if isinstance(p, str) else values.lookup(p, self.where)
                       for p in self.parts)

    def render_redacted(self, values: Values) -> str:
        """The rendering with secret content replaced, for logs and transcripts."""
        out = []
        for part in self.parts:
            if isinstance(part, str):
                out.append(part)
            elif part.name in _SECRET_FILES and part.arg is not None:
                out.append(REDACTED)
            else:
                out.append(values.lookup(part, self.where))
        return "".join(out)

    def check(self, values: Values) -> None:
        """Fail now if ``values`` cannot fill every placeholder (before a device starts)."""
        for part in self.fields:
            values.lookup(part, self.where)


def claim_client_id(inputs: DeviceInputs) -> str:
    """The claim connection's client id: the run's, else ``<serial>-claim`` (the virtual
    device's choice too), else a random one."""
    if inputs.client_id:
        return inputs.client_id
    if inputs.serial:
        return f"{inputs.serial}-claim"
    return f"fleetbench-{uuid.uuid4().hex[:12]}"


class Values:
    """What placeholders stand for in one run. File contents are read on first use."""

    def __init__(self, plain: Mapping[str, str | None], files: Mapping[str, Path],
                 parameters: Mapping[str, str]) -> None:
        self._plain = dict(plain)
        self._files = dict(files)
        self._parameters = dict(parameters)
        self._contents: dict[str, bytes] = {}

    @classmethod
    def from_inputs(cls, inputs: DeviceInputs, *, workdir: Path,
                    extra: Mapping[str, str | None] | None = None) -> Values:
        plain: dict[str, str | None] = {
            "endpoint": inputs.endpoint.host,
            "port": str(inputs.endpoint.port),
            "server_name": inputs.endpoint.tls_name,
            "claim_cert_id": inputs.claim.certificate_id,
            "template": inputs.template_name,
            "serial": inputs.serial,
            "client_id": claim_client_id(inputs),
            "params_json": json.dumps(dict(inputs.parameters), sort_keys=True),
            "workdir": str(workdir),
            "flow": inputs.flow.value,
            "cert": inputs.cert_api.value,
            "format": inputs.payload_format.value,
            "mqtt": str(int(inputs.mqtt_version)),
            "timeout": f"{inputs.timeout_s:g}",
            "python": sys.executable,
        }
        plain.update(extra or {})
        files = {"ca_file": inputs.endpoint.ca_file, "claim_cert": inputs.claim.cert_path,
                 "claim_key": inputs.claim.key_path}
        return cls(plain, files, inputs.parameters)

    @classmethod
    def only(cls, **plain: str | None) -> Values:
        """Values for places that see no run (power commands: ``{board}``, ``{tty}``)."""
        return cls({"python": sys.executable, **plain}, {}, {})

    def extended(self, **plain: str | None) -> Values:
        """A copy with more plain values (``{name}``/``{value}`` of an ``each_param``)."""
        return Values({**self._plain, **plain}, self._files, self._parameters)

    def _content(self, name: str, where: str) -> bytes:
        if name not in self._contents:
            path = self._files[name]
            try:
                self._contents[name] = Path(path).read_bytes()
            except OSError as exc:
                raise PlaceholderError(
                    f"{where + ': ' if where else ''}{{{name}}}: cannot read {path} "
                    f"({exc.strerror})") from None
        return self._contents[name]

    def lookup(self, placeholder: Field, where: str = "") -> str:
        prefix = f"{where}: " if where else ""
        name = placeholder.name
        if name == "param":
            key = placeholder.arg or ""
            if key not in self._parameters:
                given = ", ".join(sorted(self._parameters)) or "none"
                raise PlaceholderError(
                    f"{prefix}{placeholder}: the run gives no parameter {key!r} "
                    f"(parameters given: {given})")
            return self._parameters[key]
        if name in self._files:
            if placeholder.arg is None:
                return str(self._files[name])
            content = self._content(name, where)
            if placeholder.arg == "b64":
                return base64.b64encode(content).decode("ascii")
            return content.decode("utf-8", errors="replace")
        if name not in self._plain:
            raise PlaceholderError(f"{prefix}{placeholder} is not available here")
        value = self._plain[name]
        if value is None:
            raise PlaceholderError(f"{prefix}{placeholder} has no value in this run "
                                   f"(give the device a {name.replace('_', ' ')})")
        return value

    def secrets(self) -> tuple[str, ...]:
        """Every form of secret content these values can produce (to scrub from logs)."""
        out: list[str] = []
        for name in _SECRET_FILES:
            if name not in self._files:
                continue
            try:
                content = Path(self._files[name]).read_bytes()
            except OSError:
                continue
            out.append(base64.b64encode(content).decode("ascii"))
            out.extend(line for line in content.decode("utf-8", errors="replace").splitlines()
                       if len(line) >= 16 and not line.startswith("-----"))
        return tuple(out)
