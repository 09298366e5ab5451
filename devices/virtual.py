"""The reference virtual device: fleet provisioning as firmware does it, step by step.

Built on ``harness.protocol`` (topics, payloads, codecs: the one place they live) and
:mod:`devices.mqtt_transport` (paho). Three layers, so that a Locust user reuses the
protocol side without a second client (issue 8):

* :class:`ProvisioningClient`: the three MQTT operations over one transport, with
  AWS-style retries (exponential backoff, jitter) on throttling;
* :class:`VirtualDevice`: one boot of a device: read flash, claim connection,
  certificate, RegisterThing, reconnect with the new certificate, publish under the new
  policy. Every step is timed, recorded and reported through ``on_step``;
* :class:`StepControl`: what a negative scenario changes: stop after a step, skip
  subscribing, bad tokens, bad CSRs, a wrong template, malformed payloads, a publish
  outside the policy, reconnecting with the claim, and power cuts at fault points.

Credentials live in a per-device directory (:mod:`devices.credentials`); a later
``provision`` with the same workdir is a reboot that reuses, finishes or starts over.
"""

from __future__ import annotations

import base64
import json
import logging
import os
import random
import threading
import time
from collections.abc import Callable, Iterable, Iterator, Mapping
from contextlib import contextmanager
from dataclasses import dataclass, field, replace
from enum import Enum
from pathlib import Path
from types import MappingProxyType
from typing import Any, ClassVar, TextIO, TypeVar

import cbor2
from cryptography.hazmat.primitives import serialization
from cryptography.x509 import load_pem_x509_csr

from devices import flow_common as flow
from devices.base import (
    FAULT_POINT_AFTER,
    CertApi,
    DeviceConfigError,
    DeviceInputs,
    DeviceResult,
    FaultPoint,
    Step,
    StepRecord,
    coerce_enum,
    register_device_kind,
)
from devices.credentials import CredentialStore, CredentialStoreError, DeviceState
from devices.mqtt_transport import (
    ConnectRefused,
    LoopDriver,
    MqttTransport,
    TlsIdentity,
    TransportError,
)
from devices.provision_common import DefaultWorkdir, time_left
from harness import pki
from harness import protocol as fp
from harness.errors import ProvisioningError
from harness.protocol import Api, ErrorResponse, PayloadFormat

log = logging.getLogger("fleetbench.devices.virtual")

__all__ = [
    "TOKEN_LIFETIME_S",
    "BadReply",
    "CsrFault",
    "Jitter",
    "KeyType",
    "PayloadFault",
    "ProvisioningClient",
    "Recovery",
    "Rejected",
    "RetryPolicy",
    "StepControl",
    "TokenFault",
    "VirtualDevice",
    "VirtualOptions",
]

#: Ownership token lifetime (spec fleet §1.6); EXPIRED token faults wait this long + 1 s.
TOKEN_LIFETIME_S = 3600.0
#: What the device sends as a CreateKeysAndCertificate request. JSON: ``{}`` as the Python
#: SDK does; CBOR: a zero-length payload as the embedded C demos do (spec fleet §1.2, §7).
CREATE_KEYS_PAYLOAD: Mapping[PayloadFormat, bytes] = MappingProxyType({
    PayloadFormat.JSON: b"{}",
    PayloadFormat.CBOR: b"",
})


# --------------------------------------------------------------------------- settings


class KeyType(str, Enum):
    """Key the device generates for a CSR."""

    EC_P256 = "ec-p256"
    RSA_2048 = "rsa-2048"


class Recovery(str, Enum):
    """What a boot does when flash says credentials were saved but not registered."""

    FINISH = "finish"  # RegisterThing with the stored token (probe the certificate if spent)
    RESTART = "restart"  # forget them and start over with a new certificate


class Jitter(str, Enum):
    """Backoff jitter, as in AWS's "Exponential Backoff And Jitter" (SDK retry modes)."""

    FULL = "full"  # uniform(0, ceiling): AWS SDKs' default
    EQUAL = "equal"  # ceiling/2 + uniform(0, ceiling/2)
    NONE = "none"  # exactly the ceiling (deterministic; for tests)


class TokenFault(str, Enum):
    """A bad ``certificateOwnershipToken`` for RegisterThing (spec fleet §1.5, §1.6)."""

    EMPTY = "empty"  # "": 400 InvalidCertificateOwnershipToken, "cannot be empty"
    WRONG = "wrong"  # a well-formed token the endpoint never issued
    EXPIRED = "expired"  # the real token after StepControl.advance_clock(1 h + 1 s)
    REUSED = "reused"  # the real token again after RegisterThing accepted it


class CsrFault(str, Enum):
    """A bad CSR for CreateCertificateFromCsr (spec fleet §1.3)."""

    EMPTY = "empty"
    GARBAGE = "garbage"  # PEM armour around bytes that are not a CSR
    BAD_SIGNATURE = "bad-signature"  # a real CSR with its signature damaged
    WEAK_KEY = "weak-key"  # RSA-1024


class PayloadFault(str, Enum):
    """A malformed request payload (spec fleet §1.5 InvalidPayload)."""

    NOT_DECODABLE = "not-decodable"  # not JSON / not CBOR at all
    NOT_AN_OBJECT = "not-an-object"  # valid JSON/CBOR whose top level is an array
    WRONG_FIELD_TYPES = "wrong-field-types"  # an object whose fields have the wrong types


E = TypeVar("E", bound=Enum)


def _optional_enum(enum: type[E], value: object, what: str) -> E | None:
    return None if value is None else coerce_enum(enum, value, what)


@dataclass(frozen=True)
class RetryPolicy:
    """Retries with exponential backoff and jitter, for throttled requests and CONNECTs.

    Before retry ``n`` (1-based) the device waits ``delay(n)``: the ceiling is
    ``min(max_delay_s, base_delay_s * 2 ** (n - 1))``, jittered as ``jitter`` says.
    ``max_attempts`` counts the first try. Rejections whose ``statusCode`` is in
    ``retry_status_codes`` are retried (429 by default: spec fleet §5).
    """

    max_attempts: int = 5
    base_delay_s: float = 0.1
    max_delay_s: float = 5.0
    jitter: Jitter = Jitter.FULL
    retry_status_codes: frozenset[int] = frozenset({fp.STATUS_TOO_MANY_REQUESTS})

    def __post_init__(self) -> None:
        object.__setattr__(self, "jitter", coerce_enum(Jitter, self.jitter, "jitter"))
        object.__setattr__(self, "retry_status_codes", frozenset(self.retry_status_codes))
        if self.max_attempts < 1:
            raise DeviceConfigError("max_attempts must be at least 1")
        if self.base_delay_s < 0 or self.max_delay_s < 0:
            raise DeviceConfigError("retry delays must not be negative")

    def ceiling(self, retry: int) -> float:
        return min(self.max_delay_s, self.base_delay_s * (2 ** (retry - 1)))

    def delay(self, retry: int, rng: random.Random) -> float:
        """Seconds to wait before retry ``retry`` (1 = the second attempt)."""
        if retry < 1:
            raise ValueError("retries are numbered from 1")
        top = self.ceiling(retry)
        if self.jitter is Jitter.FULL:
            return rng.uniform(0.0, top)
        if self.jitter is Jitter.EQUAL:
            return top / 2 + rng.uniform(0.0, top / 2)
        return top

    def schedule(self, rng: random.Random) -> tuple[float, ...]:
        """Every wait of a request that is throttled each time."""
        return tuple(self.delay(n, rng) for n in range(1, self.max_attempts))

    def retries_status(self, status_code: int, attempt: int) -> bool:
        return status_code in self.retry_status_codes and attempt < self.max_attempts


@dataclass(frozen=True)
class StepControl:
    """Step-level control of one run, for negative scenarios. The default changes nothing.

    ``stop_after`` ends the run cleanly after a step; ``cut_at`` cuts power at a fault
    point (connections dropped without DISCONNECT, nothing more written to flash).
    ``template_name`` replaces the template named on the RegisterThing topic.
    ``publish_topic`` replaces the telemetry topic (to publish outside the policy).
    ``advance_clock(seconds)`` must be given for ``TokenFault.EXPIRED``: the scenario's way
    to let an hour pass (the emulator's admin clock, or ``time.sleep`` against AWS).
    ``before_step`` is called before each step runs.
    """

    stop_after: Step | None = None
    cut_at: FaultPoint | None = None
    skip_subscribe: bool = False
    token_fault: TokenFault | None = None
    csr_fault: CsrFault | None = None
    template_name: str | None = None
    malformed_certificate_request: PayloadFault | None = None
    malformed_register_request: PayloadFault | None = None
    publish_topic: str | None = None
    reconnect_with_claim: bool = False
    advance_clock: Callable[[float], None] | None = None
    before_step: Callable[[Step], None] | None = None

    def __post_init__(self) -> None:
        set_ = object.__setattr__
        set_(self, "stop_after", _optional_enum(Step, self.stop_after, "stop_after"))
        set_(self, "cut_at", _optional_enum(FaultPoint, self.cut_at, "cut_at"))
        set_(self, "token_fault", _optional_enum(TokenFault, self.token_fault, "token_fault"))
        set_(self, "csr_fault", _optional_enum(CsrFault, self.csr_fault, "csr_fault"))
        set_(self, "malformed_certificate_request", _optional_enum(
            PayloadFault, self.malformed_certificate_request, "malformed_certificate_request"))
        set_(self, "malformed_register_request", _optional_enum(
            PayloadFault, self.malformed_register_request, "malformed_register_request"))
        if self.template_name is not None and (
                not self.template_name or any(c in self.template_name for c in "/+#\0")):
            raise DeviceConfigError(f"template_name {self.template_name!r} cannot be used in "
                                    "a topic")
        if self.token_fault is TokenFault.EXPIRED and self.advance_clock is None:
            raise DeviceConfigError("token_fault 'expired' needs advance_clock (a way to let "
                                    "the token's hour pass)")


OnStep = Callable[[str, float, "str | None"], None]


@dataclass(frozen=True)
class VirtualOptions:
    """How a :class:`VirtualDevice` behaves (``create_device("virtual", **options)``).

    ``telemetry_topic`` is formatted with ``thing_name``, ``client_id`` and ``serial``
    (``None`` skips the publish). ``serial_parameter`` names the template parameter that
    carries ``DeviceInputs.serial`` when the inputs do not set it (``None``: never add).
    ``device_client_id`` is the client id of the connection with the new certificate
    (default: the thing name, as ``iot:Connection.Thing.ThingName`` policies expect).
    ``driver`` is the loop that does the socket I/O (default: the process-wide one);
    ``on_step(name, duration_s, error_code)`` is told about every step.
    """

    key_type: KeyType = KeyType.EC_P256
    recovery: Recovery = Recovery.FINISH
    telemetry_topic: str | None = "dt/{thing_name}/telemetry"
    serial_parameter: str | None = "SerialNumber"
    device_client_id: str | None = None
    connect_timeout_s: float = 10.0
    response_timeout_s: float = 10.0
    keepalive_s: int = 60
    retry: RetryPolicy = field(default_factory=RetryPolicy)
    rng_seed: int | None = None
    control: StepControl = field(default_factory=StepControl)
    on_step: OnStep | None = None
    driver: LoopDriver | None = None
    log_to_file: bool = True
    sleep: Callable[[float], None] | None = None

    def __post_init__(self) -> None:
        set_ = object.__setattr__
        set_(self, "key_type", coerce_enum(KeyType, self.key_type, "key_type"))
        set_(self, "recovery", coerce_enum(Recovery, self.recovery, "recovery"))
        if isinstance(self.retry, Mapping):
            set_(self, "retry", RetryPolicy(**self.retry))
        if isinstance(self.control, Mapping):
            set_(self, "control", StepControl(**self.control))
        if self.connect_timeout_s <= 0 or self.response_timeout_s <= 0:
            raise DeviceConfigError("timeouts must be positive")


# --------------------------------------------------------------------------- protocol side


class Rejected(Exception):
    """The endpoint answered on ``rejected`` (after any retries)."""

    def __init__(self, api: Api, response: ErrorResponse, attempts: int = 1) -> None:
        super().__init__(f"{api.value} rejected: {response.status_code} {response.error_code}: "
                         f"{response.error_message}")
        self.api = api
        self.response = response
        self.attempts = attempts


class BadReply(TransportError):
    """A reply the device cannot parse (the endpoint's fault, not a rejection)."""

    code = "BadReply"


class ProvisioningClient:
    """CreateKeysAndCertificate, CreateCertificateFromCsr and RegisterThing over one
    connection, in one payload format. Topics, payloads and parsing come from
    ``harness.protocol``; retries follow ``retry``. ``attempts`` is the number of tries
    the last call took."""

    def __init__(self, transport: MqttTransport, fmt: PayloadFormat | str, *,
                 timeout: float = 10.0, retry: RetryPolicy | None = None,
                 rng: random.Random | None = None,
                 sleep: Callable[[float], None] = time.sleep) -> None:
        self.transport = transport
        self.fmt = PayloadFormat(fmt)
        self.timeout = timeout
        self.retry = retry or RetryPolicy()
        self.rng = rng or random.Random()
        self.sleep = sleep
        self.attempts = 0

    def subscribe(self, api: Api, template: str | None = None) -> None:
        """Subscribe to the operation's ``accepted`` and ``rejected`` topics (QoS 1)."""
        self.subscribe_all([(api, template)])

    def subscribe_all(self, calls: Iterable[tuple[Api, str | None]]) -> None:
        """One SUBSCRIBE (QoS 1) to the ``accepted`` and ``rejected`` topics of each
        ``(api, template)``: a device that subscribes once, before its first call."""
        filters = [topic for api, template in calls
                   for topic in fp.subscription_filters(api, self.fmt, template)]
        self.transport.subscribe(filters, qos=1, timeout=self.timeout)

    def call(self, api: Api, payload: bytes, template: str | None = None) -> fp.Response:
        """Publish ``payload`` on the operation's request topic; return the parsed accepted
        response, or raise :class:`Rejected`. Throttled requests are retried."""
        topic = fp.request_topic(api, self.fmt, template)
        acc, rej = fp.accepted(topic), fp.rejected(topic)
        attempt = 0
        while True:
            attempt += 1
            self.attempts = attempt
            reply = self.transport.request(topic, payload, accepted=acc, rejected=rej,
                                           timeout=self.timeout)
            suffix: fp.Suffix = fp.ACCEPTED if reply.topic == acc else fp.REJECTED
            try:
                parsed = fp.parse_response(api, suffix, reply.payload, self.fmt)
            except ProvisioningError as exc:
                raise BadReply(f"unreadable {suffix} reply to {api.value}: {exc.message}") \
                    from None
            if isinstance(parsed, ErrorResponse):
                if self.retry.retries_status(parsed.status_code, attempt):
                    self.sleep(self.retry.delay(attempt, self.rng))
                    continue
                raise Rejected(api, parsed, attempt)
            return parsed

    def create_keys_and_certificate(
            self, payload: bytes | None = None) -> fp.CreateKeysAndCertificateResponse:
        body = CREATE_KEYS_PAYLOAD[self.fmt] if payload is None else payload
        response = self.call(Api.CREATE_KEYS_AND_CERTIFICATE, body)
        assert isinstance(response, fp.CreateKeysAndCertificateResponse)
        return response

    def create_certificate_from_csr(
            self, csr_pem: str, payload: bytes | None = None
    ) -> fp.CreateCertificateFromCsrResponse:
        body = payload if payload is not None else fp.encode(
            fp.CreateCertificateFromCsrRequest(csr_pem), self.fmt)
        response = self.call(Api.CREATE_CERTIFICATE_FROM_CSR, body)
        assert isinstance(response, fp.CreateCertificateFromCsrResponse)
        return response

    def register_thing(self, template: str, token: str, parameters: Mapping[str, str],
                       payload: bytes | None = None) -> fp.RegisterThingResponse:
        body = payload if payload is not None else fp.encode(
            fp.RegisterThingRequest(token, parameters), self.fmt)
        response = self.call(Api.REGISTER_THING, body, template)
        assert isinstance(response, fp.RegisterThingResponse)
        return response


# --------------------------------------------------------------------------- faults


def malformed_payload(fault: PayloadFault, api: Api, fmt: PayloadFormat,
                      token: str = "") -> bytes:
    """The bytes a device with ``fault`` sends for ``api``."""
    if fault is PayloadFault.NOT_DECODABLE:
        return b'{"certificateOwnershipToken": ' if fmt is PayloadFormat.JSON else b"\xa1\x78"
    if fault is PayloadFault.NOT_AN_OBJECT:
        return _encode_any([1, 2], fmt)
    wrong: dict[Api, dict[str, Any]] = {
        Api.CREATE_KEYS_AND_CERTIFICATE: {"unexpected": ["field"]},
        Api.CREATE_CERTIFICATE_FROM_CSR: {"certificateSigningRequest": 42},
        Api.REGISTER_THING: {"certificateOwnershipToken": token, "parameters": ["not", "a map"]},
    }
    return fp.encode(wrong[api], fmt)


def _encode_any(value: Any, fmt: PayloadFormat) -> bytes:
    """Encode any value (``harness.protocol.encode`` only takes objects)."""
    if fmt is PayloadFormat.JSON:
        return json.dumps(value).encode()
    return cbor2.dumps(value)


def bad_csr(fault: CsrFault, common_name: str) -> str:
    """A CSR the endpoint must refuse with 400 (spec fleet §1.3, §1.5)."""
    if fault is CsrFault.EMPTY:
        return ""
    if fault is CsrFault.GARBAGE:
        body = base64.encodebytes(b"this is not a certificate signing request").decode()
        return f"-----BEGIN CERTIFICATE REQUEST-----\n{body}-----END CERTIFICATE REQUEST-----\n"
    if fault is CsrFault.WEAK_KEY:
        return pki.make_csr(pki.generate_rsa_key(1024), common_name)
    pem = pki.make_csr(pki.generate_ec_key(), common_name)
    der = bytearray(load_pem_x509_csr(pem.encode()).public_bytes(serialization.Encoding.DER))
    der[-3] ^= 0xFF  # inside the signature's last INTEGER: still DER, no longer valid
    body = base64.encodebytes(bytes(der)).decode()
    return f"-----BEGIN CERTIFICATE REQUEST-----\n{body}-----END CERTIFICATE REQUEST-----\n"


def wrong_token() -> str:
    """An opaque token shaped like AWS's (base64 of a small JSON object) that no endpoint
    issued (spec fleet §1.6)."""
    cipher = base64.b64encode(os.urandom(240)).decode()
    return base64.b64encode(json.dumps({"version": "20191023", "cipher": cipher}).encode()) \
        .decode()


def generate_key(key_type: KeyType) -> pki.PrivateKey:
    return pki.generate_ec_key() if key_type is KeyType.EC_P256 else pki.generate_rsa_key(2048)


# --------------------------------------------------------------------------- the device


def _explain(exc: Exception) -> flow.StepError | None:
    """A step's failure as its record says it (see :func:`devices.flow_common.timed_step`)."""
    if isinstance(exc, Rejected):
        return flow.StepError(exc.response.error_code,
                              {"status_code": str(exc.response.status_code),
                               "attempts": str(exc.attempts)})
    if isinstance(exc, TransportError):
        return flow.StepError(exc.code, {"reason": str(exc)})
    return None


class _Stop(Exception):
    """A run ends early on purpose: stop_after (clean) or a power cut."""

    def __init__(self, step: Step, cut: bool, reason: str) -> None:
        super().__init__(reason)
        self.step = step
        self.cut = cut
        self.reason = reason


class _DeviceLog:
    """The device's console log: a file in its workdir (the evidence attached to the
    result) plus the ``fleetbench.devices.virtual`` logger. Never keys or tokens."""

    def __init__(self, device_id: str, path: Path | None) -> None:
        self.device_id = device_id
        self.path = path
        self._fh: TextIO | None = None
        if path is not None:
            path.parent.mkdir(parents=True, exist_ok=True)
            self._fh = path.open("a", encoding="utf-8", buffering=1)  # survives a crash
        self._lock = threading.Lock()

    def __call__(self, line: str) -> None:
        log.debug("device=%s %s", self.device_id, line)
        if self._fh is not None:
            stamp = time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime())
            with self._lock:
                self._fh.write(f"{stamp} {line}\n")

    def close(self) -> None:
        if self._fh is not None:
            self._fh.close()
            self._fh = None


@register_device_kind("virtual")
class VirtualDevice:
    """A device in this process: every flow variant, step control, flash, power.

    Capabilities: Provisioner, Power, FaultPoints. ``provision`` is one boot; call it again
    with the same ``workdir`` to reboot.
    """

    kind: ClassVar[str] = "virtual"
    options_type: ClassVar[type] = VirtualOptions

    def __init__(self, options: VirtualOptions | None = None) -> None:
        self.options = options or VirtualOptions()
        self._rng = random.Random(self.options.rng_seed)
        self._off = threading.Event()  # set while the power is off
        self._armed_cut: FaultPoint | None = None
        self._lock = threading.Lock()
        self._transports: set[MqttTransport] = set()
        self._workdirs = DefaultWorkdir("fleetbench-virtual-")

    # -- FaultPoints -------------------------------------------------------------------------
    @property
    def fault_points(self) -> tuple[FaultPoint, ...]:
        return tuple(FaultPoint)

    def cut_at(self, point: FaultPoint | str | None) -> None:
        """Cut power at ``point`` during the next run only."""
        self._armed_cut = None if point is None else coerce_enum(FaultPoint, point, "point")

    # -- Power -------------------------------------------------------------------------------
    def on(self) -> None:
        self._off.clear()

    def off(self) -> None:
        """Power cut: open connections are dropped without DISCONNECT, the run ends."""
        self._off.set()
        with self._lock:
            transports = list(self._transports)
        for transport in transports:
            transport.abort()

    def cycle(self) -> None:
        self.off()
        self.on()

    # -- Provisioner -------------------------------------------------------------------------
    def workdir_for(self, inputs: DeviceInputs) -> Path:
        return self._workdirs.for_run(inputs)

    def provision(self, inputs: DeviceInputs, control: StepControl | None = None) -> DeviceResult:
        """Boot once and run (or resume) the flow; the result is the device's account."""
        control = control or self.options.control
        if self._armed_cut is not None:
            control = replace(control, cut_at=self._armed_cut)
            self._armed_cut = None
        workdir = self.workdir_for(inputs)
        store = CredentialStore(workdir)
        store.ensure()
        device_log = _DeviceLog(inputs.device_id,
                                workdir / "device.log" if self.options.log_to_file else None)
        run = _Run(self, inputs, control, store, device_log)
        try:
            return run.execute()
        finally:
            device_log.close()

    # -- used by runs ------------------------------------------------------------------------
    def _track(self, transport: MqttTransport, add: bool) -> None:
        with self._lock:
            if add:
                self._transports.add(transport)
            else:
                self._transports.discard(transport)

    def _sleep(self, seconds: float) -> None:
        if self.options.sleep is not None:
            self.options.sleep(seconds)
        else:
            self._off.wait(seconds)  # a power cut ends the wait


@dataclass
class _Outcome:
    thing_name: str | None = None
    certificate_id: str | None = None
    device_configuration: Mapping[str, str] = field(default_factory=dict)


class _Run:
    """One boot of a :class:`VirtualDevice`."""

    def __init__(self, device: VirtualDevice, inputs: DeviceInputs, control: StepControl,
                 store: CredentialStore, device_log: _DeviceLog) -> None:
        self.device = device
        self.options = device.options
        self.inputs = inputs
        self.control = control
        self.store = store
        self.log = device_log
        self.steps: list[StepRecord] = []
        self.outcome = _Outcome()
        self.deadline = time.monotonic() + inputs.timeout_s
        self.open: list[MqttTransport] = []
        self.device_connection: MqttTransport | None = None  # the probe's, when it worked
        self.claim_client_id = flow.claim_client_id(inputs, "fleetbench-")

    # -- plumbing ----------------------------------------------------------------------------
    def budget(self, seconds: float) -> float:
        return time_left(self.deadline, seconds, lambda: TransportError(
            f"run exceeded its {self.inputs.timeout_s:.0f}s budget"))

    @contextmanager
    def step(self, step: Step) -> Iterator[dict[str, str]]:
        """Time and record ``step``; afterwards honour stop_after / cut_at / power."""
        if self.device._off.is_set():
            raise _Stop(step, True, "powered off")
        if self.control.before_step is not None:
            self.control.before_step(step)
        with flow.timed_step(step, _explain, self.record) as detail:
            yield detail
        if self.device._off.is_set():
            raise _Stop(step, True, f"powered off during {step.value}")
        if self.control.stop_after is step:
            raise _Stop(step, False, f"stopped after {step.value}")
        if self.control.cut_at is not None and FAULT_POINT_AFTER[self.control.cut_at] is step:
            raise _Stop(step, True, f"power cut at {self.control.cut_at.value}")

    def record(self, record: StepRecord) -> None:
        self.steps.append(record)
        self.log(flow.step_line(record, omit=("reason",)))
        if self.options.on_step is not None:
            try:
                self.options.on_step(record.name, record.duration, record.error_code)
            except Exception:  # a reporting hook must not change the flow
                log.exception("event=on_step_failed step=%s", record.name)

    def connect(self, client_id: str, cert: Path, key: Path, timeout: float) -> MqttTransport:
        """CONNECT, retrying with backoff while MQTT 5 says the connect rate is exceeded."""
        identity = TlsIdentity.for_endpoint(self.inputs.endpoint, cert, key)
        attempt = 0
        while True:
            attempt += 1
            transport = MqttTransport(client_id, self.inputs.endpoint, identity,
                                      version=self.inputs.mqtt_version,
                                      keepalive=self.options.keepalive_s,
                                      driver=self.options.driver, log_line=self.log)
            self.device._track(transport, True)
            self.open.append(transport)
            try:
                transport.connect(self.budget(timeout))
                return transport
            except ConnectRefused as exc:
                self.close(transport, clean=False)
                if exc.retryable and attempt < self.options.retry.max_attempts:
                    self.device._sleep(self.options.retry.delay(attempt, self.device._rng))
                    continue
                raise

    def close(self, transport: MqttTransport, clean: bool = True) -> None:
        try:
            if clean:
                transport.disconnect()
            else:
                transport.abort()
        finally:
            self.device._track(transport, False)
            if transport in self.open:
                self.open.remove(transport)

    def client(self, transport: MqttTransport) -> ProvisioningClient:
        return ProvisioningClient(transport, self.inputs.payload_format,
                                  timeout=self.budget(self.options.response_timeout_s),
                                  retry=self.options.retry, rng=self.device._rng,
                                  sleep=self.device._sleep)

    @property
    def template(self) -> str:
        return self.control.template_name or self.inputs.template_name

    def device_client_id(self, thing_name: str | None) -> str:
        return flow.device_client_id(self.options.device_client_id, thing_name,
                                     self.inputs, self.claim_client_id)

    # -- the run -----------------------------------------------------------------------------
    def execute(self) -> DeviceResult:
        self.log(f"event=boot device={self.inputs.device_id} flow={self.inputs.flow.value} "
                 f"cert={self.inputs.cert_api.value} format={self.inputs.payload_format.value} "
                 f"mqtt={int(self.inputs.mqtt_version)}")
        error: ErrorResponse | None = None
        failure: str | None = None
        stopped_at: str | None = None
        try:
            self.boot()
        except _Stop as stop:
            stopped_at, failure = stop.step.value, stop.reason
            for transport in list(self.open):
                self.close(transport, clean=not stop.cut)
        except Rejected as exc:
            error = exc.response
        except (TransportError, CredentialStoreError) as exc:
            if self.device._off.is_set() and self.steps:
                # The power went while a step was under way: its failure is the cut's doing.
                stopped_at = self.steps[-1].name
                failure = f"powered off during {stopped_at}"
            else:
                failure = str(exc) or type(exc).__name__
        finally:
            for transport in list(self.open):
                self.close(transport, clean=not self.device._off.is_set())
        ok = error is None and failure is None
        self.log(flow.done_line(error, failure))
        return DeviceResult(
            ok=ok, device_id=self.inputs.device_id, kind=self.device.kind,
            thing_name=self.outcome.thing_name, certificate_id=self.outcome.certificate_id,
            device_configuration=self.outcome.device_configuration, error=error,
            failure=failure, stopped_at=stopped_at, steps=tuple(self.steps),
            log_path=self.log.path, credentials_dir=self.store.directory)

    def boot(self) -> None:
        with self.step(Step.RESUME) as detail:
            state, action = flow.resume(self.store, self.inputs.claim, detail,
                                        may_finish=self.options.recovery is Recovery.FINISH)
        if action is flow.BootAction.REUSE:
            self.outcome = _Outcome(state.thing_name, state.certificate_id,
                                    state.device_configuration)
            self.use_device_identity(state.thing_name)
            return
        if action is flow.BootAction.RESTART:
            self.store.forget_progress()
        claim = self.connect_claim()
        registered = action is flow.BootAction.FINISH and self.finish_registration(claim, state)
        if not registered:
            self.obtain_and_register(claim)
        with self.step(Step.DISCONNECT_CLAIM):
            self.close(claim)
        self.use_device_identity(self.outcome.thing_name)

    def connect_claim(self) -> MqttTransport:
        claim = self.inputs.claim
        if claim.temporary and claim.expiration is not None and time.time() > claim.expiration:
            self.log("event=claim_expired_locally (connecting anyway: the endpoint decides)")
        with self.step(Step.CONNECT_CLAIM) as detail:
            detail.update(client_id=self.claim_client_id, certificate_id=claim.certificate_id,
                          temporary=str(claim.temporary).lower())
            return self.connect(self.claim_client_id, self.store.claim_cert,
                                self.store.claim_key, self.options.connect_timeout_s)

    def obtain_and_register(self, claim: MqttTransport) -> None:
        """Certificate, flash, RegisterThing, flash: the flow proper."""
        api = (Api.CREATE_CERTIFICATE_FROM_CSR if self.inputs.cert_api is CertApi.CSR
               else Api.CREATE_KEYS_AND_CERTIFICATE)
        fmt = self.inputs.payload_format
        client = self.client(claim)
        key_pem: str | None = None
        csr_pem = ""
        if api is Api.CREATE_CERTIFICATE_FROM_CSR:
            with self.step(Step.GENERATE_KEY) as detail:
                common_name = self.inputs.serial or self.claim_client_id
                key = generate_key(self.options.key_type)
                key_pem = pki.private_key_pem(key)
                csr_pem = (bad_csr(self.control.csr_fault, common_name) if self.control.csr_fault
                           else pki.make_csr(key, common_name))
                detail.update(key_type=self.options.key_type.value)
                if self.control.csr_fault:
                    detail.update(csr_fault=self.control.csr_fault.value)
        if not self.control.skip_subscribe:
            with self.step(Step.SUBSCRIBE_CERTIFICATE):
                client.subscribe(api)
        with self.step(Step.CREATE_CERTIFICATE) as detail:
            fault = self.control.malformed_certificate_request
            raw = malformed_payload(fault, api, fmt) if fault else None
            detail.update(api=api.value)
            try:
                if api is Api.CREATE_CERTIFICATE_FROM_CSR:
                    response: Any = client.create_certificate_from_csr(csr_pem, raw)
                else:
                    response = client.create_keys_and_certificate(raw)
                    key_pem = response.private_key
            finally:
                detail.update(attempts=str(client.attempts))
            detail.update(certificate_id=response.certificate_id)
            self.outcome.certificate_id = response.certificate_id
        certificate_id = response.certificate_id
        token = response.certificate_ownership_token
        assert key_pem is not None
        with self.step(Step.SAVE_CREDENTIALS):
            self.store.save_credentials(response.certificate_pem, key_pem, certificate_id,
                                        token, self.inputs.template_name, time.time())
        self.register(claim, client, token)

    def register(self, claim: MqttTransport, client: ProvisioningClient, token: str) -> None:
        fmt = self.inputs.payload_format
        if not self.control.skip_subscribe and \
                not _subscribed_to_register(claim, fmt, self.template):
            with self.step(Step.SUBSCRIBE_REGISTER):
                client.subscribe(Api.REGISTER_THING, self.template)
        sent_token = token
        fault = self.control.token_fault
        if fault is TokenFault.EMPTY:
            sent_token = ""
        elif fault is TokenFault.WRONG:
            sent_token = wrong_token()
        elif fault is TokenFault.EXPIRED:
            assert self.control.advance_clock is not None
            self.log(f"event=waiting_for_token_expiry seconds={TOKEN_LIFETIME_S + 1:.0f}")
            self.control.advance_clock(TOKEN_LIFETIME_S + 1)
        params = flow.template_parameters(self.inputs, self.options.serial_parameter)
        response = self._register_once(client, sent_token, params)
        self.outcome.thing_name = response.thing_name
        self.outcome.device_configuration = dict(response.device_configuration)
        with self.step(Step.SAVE_REGISTRATION):
            self.store.mark_registered(response.thing_name, response.device_configuration,
                                       time.time())
        if fault is TokenFault.REUSED:
            self._register_once(client, token, params, reuse=True)

    def _register_once(self, client: ProvisioningClient, token: str,
                       params: Mapping[str, str], reuse: bool = False) -> fp.RegisterThingResponse:
        with self.step(Step.REGISTER_THING) as detail:
            detail.update(template=self.template, parameters=",".join(sorted(params)))
            if reuse:
                detail.update(token="reused")
            fault = self.control.malformed_register_request
            raw = (malformed_payload(fault, Api.REGISTER_THING, self.inputs.payload_format,
                                     token) if fault else None)
            try:
                response = client.register_thing(self.template, token, params, raw)
            finally:
                detail.update(attempts=str(client.attempts))
            detail.update(thing_name=response.thing_name or "")
            return response

    def finish_registration(self, claim: MqttTransport, state: DeviceState) -> bool:
        """Recovery from CREDENTIALS_SAVED: RegisterThing with the stored token. If the token
        is spent, the cut came after the endpoint registered us: check that the stored
        certificate works. False means start over."""
        token = self.store.load_token()
        if token is None:
            return False
        self.outcome.certificate_id = state.certificate_id
        client = self.client(claim)
        try:
            self.register(claim, client, token)
            return True
        except Rejected as exc:
            if exc.response.error_code != fp.INVALID_TOKEN_CODE:
                raise
        with self.step(Step.PROBE_DEVICE) as detail:
            client_id = self.device_client_id(None)
            detail.update(client_id=client_id)
            try:
                probe = self.connect(client_id, self.store.device_cert, self.store.device_key,
                                     self.options.connect_timeout_s)
            except TransportError as exc:
                detail.update(outcome="refused", reason=str(exc))
                usable = False
            else:
                # Keep it: it is the device connection (a reconnect now would break the
                # one-CONNECT-per-second-per-client-id quota, spec broker §1.8).
                self.device_connection = probe
                detail.update(outcome="connected")
                usable = True
        if flow.probe_settled(self.store, usable):
            return True
        self.outcome = _Outcome()
        return False

    def use_device_identity(self, thing_name: str | None) -> None:
        """Reconnect with the new certificate and publish under the new policy."""
        client_id = self.device_client_id(thing_name)
        if self.control.reconnect_with_claim:
            cert, key = self.store.claim_cert, self.store.claim_key
        else:
            cert, key = self.store.device_cert, self.store.device_key
        transport = self.device_connection
        if transport is None or not transport.connected:
            with self.step(Step.CONNECT_DEVICE) as detail:
                detail.update(client_id=client_id, certificate=cert.stem)
                transport = self.connect(client_id, cert, key, self.options.connect_timeout_s)
        topic = self.control.publish_topic or flow.telemetry_topic(
            self.options.telemetry_topic, thing_name, client_id, self.inputs.serial)
        if topic is not None:
            with self.step(Step.PUBLISH_TELEMETRY) as detail:
                detail.update(topic=topic)
                payload = flow.telemetry_payload(self.inputs.serial, client_id)
                transport.publish(topic, payload, qos=1,
                                  timeout=self.budget(self.options.response_timeout_s))
        with self.step(Step.DISCONNECT_DEVICE):
            self.close(transport)


def _subscribed_to_register(transport: MqttTransport, fmt: PayloadFormat,
                            template: str) -> bool:
    wanted = set(fp.subscription_filters(Api.REGISTER_THING, fmt, template))
    return wanted <= transport.subscriptions
