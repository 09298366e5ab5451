"""What every device adapter shares: capabilities, inputs, results and the kind registry.

A scenario never knows which device it drives. It asks the registry for a kind by name
(``create_device("virtual", key_type="rsa-2048")``, the model is Zephyr twister's
``DeviceFactory``), hands it :class:`DeviceInputs` and gets a :class:`DeviceResult` back.
Capabilities are small Protocols (the model is labgrid's): an adapter implements the ones
it has, and a scenario that needs one the device lacks skips with a reason
(:func:`missing_capability`). The result is the device's own account, kept as evidence:
the verdict is taken from the endpoint (design principle 2).

Records are frozen dataclasses; ``to_dict``/``from_dict`` are the only wire forms (the
JSON a device program prints and ``fleetbench provision`` emits).
"""

from __future__ import annotations

import dataclasses
import importlib
import json
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from enum import Enum, IntEnum
from pathlib import Path
from types import MappingProxyType
from typing import Any, ClassVar, Protocol, TypeVar, runtime_checkable

from harness import pki
from harness.endpoint_info import EndpointInfo
from harness.protocol import ErrorResponse, PayloadFormat

__all__ = [
    "BUILTIN_KINDS",
    "DEVICE_KINDS",
    "FAULT_POINT_AFTER",
    "CertApi",
    "ClaimCredentials",
    "Console",
    "DeviceConfigError",
    "DeviceInputs",
    "DeviceKind",
    "DeviceResult",
    "EndpointParams",
    "ErrorResponse",
    "FaultPoint",
    "FaultPoints",
    "Flow",
    "MqttVersion",
    "Power",
    "Provisioner",
    "Step",
    "StepRecord",
    "coerce_enum",
    "create_device",
    "device_class",
    "missing_capability",
    "option_names",
    "register_device_kind",
]


class DeviceConfigError(ValueError):
    """A device was asked for with an unknown kind, option or input value."""


# --------------------------------------------------------------------------- enums


class Flow(str, Enum):
    """How the device got its claim (design: by claim, or by trusted user)."""

    CLAIM = "claim"
    TRUSTED_USER = "trusted-user"


class CertApi(str, Enum):
    """Which MQTT operation obtains the device certificate."""

    KEYS = "keys"  # CreateKeysAndCertificate: the service makes the key pair
    CSR = "csr"  # CreateCertificateFromCsr: the key never leaves the device


class MqttVersion(IntEnum):
    """The MQTT version a device speaks; values are what users type (``3`` or ``5``)."""

    V3_1_1 = 3
    V5 = 5


class Step(str, Enum):
    """Standard step names, so reports line up across device kinds.

    An adapter reports the steps it can observe; one that sees less (a board on a serial
    line) reports fewer, and may add its own names.
    """

    RESUME = "resume"  # boot: read stored progress, decide to reuse, finish or start over
    CONNECT_CLAIM = "connect_claim"
    GENERATE_KEY = "generate_key"
    SUBSCRIBE_CERTIFICATE = "subscribe_certificate"
    CREATE_CERTIFICATE = "create_certificate"
    SAVE_CREDENTIALS = "save_credentials"
    SUBSCRIBE_REGISTER = "subscribe_register"
    REGISTER_THING = "register_thing"
    SAVE_REGISTRATION = "save_registration"
    DISCONNECT_CLAIM = "disconnect_claim"
    PROBE_DEVICE = "probe_device"  # recovery: does the stored certificate already work?
    CONNECT_DEVICE = "connect_device"
    PUBLISH_TELEMETRY = "publish_telemetry"
    DISCONNECT_DEVICE = "disconnect_device"


class FaultPoint(str, Enum):
    """Where a scenario may cut a device's power during a flow (issue 10).

    After the cut the device is booted again and must recover: finish or start over,
    and end provisioned exactly once.
    """

    AFTER_CONNECT = "after_connect"  # claim connection up, nothing asked yet
    AFTER_CERTIFICATE = "after_certificate"  # certificate received, nothing stored
    AFTER_CREDENTIALS_SAVED = "after_credentials_saved"  # key, certificate, token stored
    AFTER_REGISTER = "after_register"  # RegisterThing accepted, not yet recorded
    AFTER_REGISTRATION_SAVED = "after_registration_saved"  # recorded, not yet reconnected
    AFTER_RECONNECT = "after_reconnect"  # connected with the new certificate


#: The step each fault point follows.
FAULT_POINT_AFTER: Mapping[FaultPoint, Step] = MappingProxyType({
    FaultPoint.AFTER_CONNECT: Step.CONNECT_CLAIM,
    FaultPoint.AFTER_CERTIFICATE: Step.CREATE_CERTIFICATE,
    FaultPoint.AFTER_CREDENTIALS_SAVED: Step.SAVE_CREDENTIALS,
    FaultPoint.AFTER_REGISTER: Step.REGISTER_THING,
    FaultPoint.AFTER_REGISTRATION_SAVED: Step.SAVE_REGISTRATION,
    FaultPoint.AFTER_RECONNECT: Step.CONNECT_DEVICE,
})

E = TypeVar("E", bound=Enum)


def coerce_enum(enum: type[E], value: object, what: str) -> E:
    """``value`` as a member of ``enum`` (members, values and, for IntEnums, digit
    strings are accepted), or a :class:`DeviceConfigError` listing the choices."""
    if isinstance(value, enum):
        return value
    candidates: list[object] = [value]
    if isinstance(value, str) and value.isdigit():
        candidates.append(int(value))
    for candidate in candidates:
        try:
            return enum(candidate)
        except ValueError:
            continue
    choices = ", ".join(repr(m.value) for m in enum)
    raise DeviceConfigError(f"{what} must be one of {choices}, got {value!r}")


# --------------------------------------------------------------------------- inputs


@dataclass(frozen=True)
class EndpointParams:
    """Where the device connects: MQTT over mutual TLS.

    ``server_name`` is the TLS SNI and the name the server certificate must carry when
    it differs from ``host`` (the emulator listens on 127.0.0.1 with a ``localhost``
    certificate; AWS needs the account endpoint as SNI). ``alpn`` is ``("x-amzn-mqtt-ca",)``
    for MQTT on port 443 (spec broker §1.2).
    """

    host: str
    port: int
    ca_file: Path
    server_name: str | None = None
    alpn: tuple[str, ...] = ()

    def __post_init__(self) -> None:
        if not self.host:
            raise DeviceConfigError("endpoint host is empty")
        if not isinstance(self.port, int) or not 0 < self.port < 65536:
            raise DeviceConfigError(f"endpoint port must be 1-65535, got {self.port!r}")
        object.__setattr__(self, "ca_file", Path(self.ca_file))
        object.__setattr__(self, "alpn", tuple(self.alpn))

    @property
    def tls_name(self) -> str:
        """The name TLS checks the server certificate against (and sends as SNI)."""
        return self.server_name or self.host

    @classmethod
    def from_endpoint_info(cls, info: EndpointInfo) -> EndpointParams:
        return cls(host=info.mqtt_host, port=int(info.mqtt_port), ca_file=Path(info.ca_file),
                   server_name=info.mqtt_server_name or None)

    @classmethod
    def from_file(cls, path: Path | str) -> EndpointParams:
        """From an ``endpoint.json`` (what ``--endpoint-file`` names)."""
        return cls.from_endpoint_info(EndpointInfo.read(Path(path)))


@dataclass(frozen=True)
class ClaimCredentials:
    """The claim a device starts from: paths only, never key material in memory.

    ``temporary`` marks a trusted-user claim from CreateProvisioningClaim, valid until
    ``expiration`` (epoch seconds, spec fleet §2.2).
    """

    cert_path: Path
    key_path: Path
    certificate_id: str
    temporary: bool = False
    expiration: float | None = None

    def __post_init__(self) -> None:
        object.__setattr__(self, "cert_path", Path(self.cert_path))
        object.__setattr__(self, "key_path", Path(self.key_path))

    @classmethod
    def from_files(cls, cert_path: Path | str, key_path: Path | str, *, temporary: bool = False,
                   expiration: float | None = None) -> ClaimCredentials:
        """Read the certificate to learn its id (AWS's SHA-256 of the DER)."""
        cert = Path(cert_path)
        try:
            certificate_id = pki.certificate_id(cert.read_bytes())
        except (OSError, ValueError) as exc:
            raise DeviceConfigError(f"{cert}: not a readable PEM certificate ({exc})") from None
        return cls(cert, Path(key_path), certificate_id, temporary, expiration)


def _string_map(value: Mapping[str, Any], what: str) -> Mapping[str, str]:
    if not isinstance(value, Mapping):
        raise DeviceConfigError(f"{what} must be a mapping of strings")
    bad = [k for k, v in value.items() if not isinstance(k, str) or not isinstance(v, str)]
    if bad:
        raise DeviceConfigError(f"{what} must map strings to strings; bad entries: {bad}")
    return MappingProxyType(dict(value))


@dataclass(frozen=True)
class DeviceInputs:
    """Everything an adapter delivers to a device for one provisioning run.

    Strings are accepted for the enum fields (``flow="trusted-user"``, ``cert_api="csr"``,
    ``payload_format="cbor"``, ``mqtt_version=5``). ``flow`` must agree with
    ``claim.temporary``. ``client_id`` is the claim connection's MQTT client id (the
    adapter chooses one when ``None``). ``workdir`` is the device's flash: its credential
    store and logs live there, and a later run with the same workdir is a reboot.
    ``timeout_s`` bounds one whole run.
    """

    endpoint: EndpointParams
    claim: ClaimCredentials
    template_name: str
    flow: Flow = Flow.CLAIM
    cert_api: CertApi = CertApi.KEYS
    payload_format: PayloadFormat = PayloadFormat.JSON
    parameters: Mapping[str, str] = field(default_factory=dict)
    client_id: str | None = None
    serial: str | None = None
    workdir: Path | None = None
    mqtt_version: MqttVersion = MqttVersion.V3_1_1
    timeout_s: float = 60.0

    def __post_init__(self) -> None:
        set_ = object.__setattr__
        set_(self, "flow", coerce_enum(Flow, self.flow, "flow"))
        set_(self, "cert_api", coerce_enum(CertApi, self.cert_api, "cert_api"))
        set_(self, "payload_format",
             coerce_enum(PayloadFormat, self.payload_format, "payload_format"))
        set_(self, "mqtt_version", coerce_enum(MqttVersion, self.mqtt_version, "mqtt_version"))
        set_(self, "parameters", _string_map(self.parameters, "parameters"))
        if self.workdir is not None:
            set_(self, "workdir", Path(self.workdir))
        if not self.template_name:
            raise DeviceConfigError("template_name is empty")
        if self.timeout_s <= 0:
            raise DeviceConfigError(f"timeout_s must be positive, got {self.timeout_s!r}")
        if (self.flow is Flow.TRUSTED_USER) != self.claim.temporary:
            raise DeviceConfigError(
                f"flow {self.flow.value!r} needs a "
                f"{'temporary' if self.flow is Flow.TRUSTED_USER else 'permanent'} claim "
                "(ClaimCredentials.temporary)")

    @property
    def device_id(self) -> str:
        """How reports name this device: its serial, else its client id."""
        return self.serial or self.client_id or "unnamed-device"


# --------------------------------------------------------------------------- results


@dataclass(frozen=True)
class StepRecord:
    """One step as the device saw it. ``detail`` holds short, secret-free facts;
    ``error_code`` is AWS's ``errorCode`` on a rejection, else a transport failure name."""

    name: str
    started_at: float
    duration: float
    ok: bool
    detail: Mapping[str, str] = field(default_factory=dict)
    error_code: str | None = None

    def __post_init__(self) -> None:
        object.__setattr__(self, "detail",
                           MappingProxyType({str(k): str(v) for k, v in self.detail.items()}))

    def to_dict(self) -> dict[str, Any]:
        return {"name": self.name, "started_at": self.started_at, "duration": self.duration,
                "ok": self.ok, "detail": dict(self.detail), "error_code": self.error_code}

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> StepRecord:
        return cls(name=str(data["name"]), started_at=float(data["started_at"]),
                   duration=float(data["duration"]), ok=bool(data["ok"]),
                   detail=dict(data.get("detail") or {}), error_code=data.get("error_code"))


def _optional_path(value: Any) -> Path | None:
    return None if value in (None, "") else Path(value)


@dataclass(frozen=True)
class DeviceResult:
    """What the device reports after a run: evidence, not the verdict.

    ``error`` is the endpoint's ``rejected`` payload that ended the run; ``failure`` a short
    reason for any other ending (connection closed, timeout, stopped by step control,
    power cut). ``stopped_at`` names the step a stop or cut followed.
    """

    ok: bool
    device_id: str
    kind: str
    thing_name: str | None = None
    certificate_id: str | None = None
    device_configuration: Mapping[str, str] = field(default_factory=dict)
    error: ErrorResponse | None = None
    failure: str | None = None
    stopped_at: str | None = None
    steps: tuple[StepRecord, ...] = ()
    log_path: Path | None = None
    credentials_dir: Path | None = None

    def __post_init__(self) -> None:
        object.__setattr__(self, "device_configuration",
                           MappingProxyType(dict(self.device_configuration)))
        object.__setattr__(self, "steps", tuple(self.steps))

    def step(self, name: str | Step) -> StepRecord | None:
        """The last record of step ``name`` (``None`` when it did not run)."""
        key = name.value if isinstance(name, Step) else name
        for record in reversed(self.steps):
            if record.name == key:
                return record
        return None

    def to_dict(self) -> dict[str, Any]:
        """The JSON form; ``error`` keeps AWS's field names (``statusCode``...)."""
        return {
            "ok": self.ok,
            "device_id": self.device_id,
            "kind": self.kind,
            "thing_name": self.thing_name,
            "certificate_id": self.certificate_id,
            "device_configuration": dict(self.device_configuration),
            "error": self.error.to_wire() if self.error else None,
            "failure": self.failure,
            "stopped_at": self.stopped_at,
            "steps": [s.to_dict() for s in self.steps],
            "log_path": str(self.log_path) if self.log_path else None,
            "credentials_dir": str(self.credentials_dir) if self.credentials_dir else None,
        }

    def to_json(self, indent: int | None = None) -> str:
        """One line by default: device programs print it as the last line of stdout."""
        return json.dumps(self.to_dict(), indent=indent, sort_keys=True)

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> DeviceResult:
        """Parse a device program's printed result; a malformed one is a DeviceConfigError."""
        try:
            error = data.get("error")
            return cls(
                ok=bool(data["ok"]),
                device_id=str(data["device_id"]),
                kind=str(data["kind"]),
                thing_name=data.get("thing_name"),
                certificate_id=data.get("certificate_id"),
                device_configuration=_string_map(data.get("device_configuration") or {},
                                                 "device_configuration"),
                error=ErrorResponse.from_wire(error) if error else None,
                failure=data.get("failure"),
                stopped_at=data.get("stopped_at"),
                steps=tuple(StepRecord.from_dict(s) for s in data.get("steps") or ()),
                log_path=_optional_path(data.get("log_path")),
                credentials_dir=_optional_path(data.get("credentials_dir")),
            )
        except DeviceConfigError:
            raise
        except Exception as exc:  # any shape error in foreign output
            raise DeviceConfigError(f"not a device result: {type(exc).__name__}: {exc}") from None


# --------------------------------------------------------------------------- capabilities


@runtime_checkable
class Provisioner(Protocol):
    """Runs one provisioning flow (a boot of the device) and reports what it saw."""

    def provision(self, inputs: DeviceInputs) -> DeviceResult: ...


@runtime_checkable
class Console(Protocol):
    """A byte stream to the device's console (labgrid's ConsoleProtocol, trimmed)."""

    def read(self, size: int = 1, timeout: float = 0.0) -> bytes: ...

    def write(self, data: bytes) -> None: ...


@runtime_checkable
class Power(Protocol):
    """Switch the device. ``off`` during a run is a power cut, not a clean shutdown."""

    def on(self) -> None: ...

    def off(self) -> None: ...

    def cycle(self) -> None: ...


@runtime_checkable
class FaultPoints(Protocol):
    """Named places where the next run can be cut (issue 10)."""

    @property
    def fault_points(self) -> tuple[FaultPoint, ...]: ...

    def cut_at(self, point: FaultPoint | str | None) -> None:
        """Arm a cut for the next run only (``None`` disarms)."""
        ...


def missing_capability(device: object, capability: type) -> str | None:
    """``None`` when ``device`` has ``capability``, else a skip reason for the scenario."""
    if isinstance(device, capability):
        return None
    kind = getattr(device, "kind", type(device).__name__)
    return f"device kind {kind!r} has no {capability.__name__} capability"


# --------------------------------------------------------------------------- registry


class DeviceKind(Protocol):
    """What a registered class provides: its options dataclass and a one-argument
    constructor taking an instance of it."""

    kind: ClassVar[str]
    options_type: ClassVar[type]

    def __init__(self, options: Any) -> None: ...


#: Name → adapter class. Filled by :func:`register_device_kind` when a module is imported.
DEVICE_KINDS: dict[str, type[Any]] = {}

#: Where the built-in kinds live; imported on first use so that asking for ``virtual``
#: does not import the SDK, and a missing optional dependency only affects its kind.
BUILTIN_KINDS: Mapping[str, str] = MappingProxyType({
    "virtual": "devices.virtual",
    "sdk": "devices.sdk",
    "process": "devices.process",
    "serial": "devices.serial",
})

C = TypeVar("C", bound=type)


def register_device_kind(name: str) -> Callable[[C], C]:
    """Class decorator: register an adapter under ``name``.

    The class must define ``options_type`` (a dataclass; ``create_device`` builds it from
    keyword options) and take that instance as its only constructor argument.
    """

    def decorate(cls: C) -> C:
        options_type = getattr(cls, "options_type", None)
        if options_type is None or not dataclasses.is_dataclass(options_type):
            raise TypeError(f"{cls.__name__} must define options_type as a dataclass")
        existing = DEVICE_KINDS.get(name)
        if existing is not None and existing is not cls and \
                existing.__qualname__ != cls.__qualname__:
            raise TypeError(f"device kind {name!r} is already {existing.__qualname__}")
        cls.kind = name  # type: ignore[attr-defined]
        DEVICE_KINDS[name] = cls
        return cls

    return decorate


def device_class(kind: str) -> type[Any]:
    """The class registered as ``kind``, importing a built-in kind's module if needed."""
    if kind not in DEVICE_KINDS and kind in BUILTIN_KINDS:
        try:
            importlib.import_module(BUILTIN_KINDS[kind])
        except ImportError as exc:
            raise DeviceConfigError(f"device kind {kind!r} is not available: {exc}") from None
    try:
        return DEVICE_KINDS[kind]
    except KeyError:
        known = sorted(set(DEVICE_KINDS) | set(BUILTIN_KINDS))
        raise DeviceConfigError(
            f"unknown device kind {kind!r}; known kinds: {', '.join(known)}") from None


def option_names(kind: str) -> tuple[str, ...]:
    """The keyword options ``create_device(kind, ...)`` accepts."""
    return tuple(f.name for f in dataclasses.fields(device_class(kind).options_type))


def create_device(kind: str, **options: Any) -> Any:
    """Build a device of ``kind`` from keyword options.

    Unknown kinds, unknown option names and values the options dataclass refuses all
    raise :class:`DeviceConfigError` naming the kind and what was expected.
    """
    cls = device_class(kind)
    accepted: Sequence[str] = option_names(kind)
    unknown = sorted(set(options) - set(accepted))
    if unknown:
        raise DeviceConfigError(
            f"device kind {kind!r} has no option(s) {', '.join(unknown)}; "
            f"accepted: {', '.join(accepted) or '(none)'}")
    try:
        built = cls.options_type(**options)
    except DeviceConfigError as exc:
        raise DeviceConfigError(f"device kind {kind!r}: {exc}") from None
    except (TypeError, ValueError) as exc:
        raise DeviceConfigError(f"device kind {kind!r}: bad options: {exc}") from None
    return cls(built)
