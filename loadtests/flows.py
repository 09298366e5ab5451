"""One fresh device's provisioning flow, as the load run's users run it, step by step.

The protocol side is the reference virtual device's (``devices.virtual``): its
:class:`~devices.virtual.ProvisioningClient` (topics, payloads, JSON/CBOR, AWS-style
retries with backoff and jitter) over :class:`~devices.mqtt_transport.MqttTransport`
(paho, shared TLS contexts, TCP_NODELAY, one selectors loop for every connection). What
this module adds is what a load run needs and a single device does not: a device slot
reused flow after flow (its directory holds only the current device's key and
certificate, no flash journal, no console log), request timing per API, throttles
counted as they happen, and a :class:`~loadtests.events.FlowOutcome` for the truth check.

Nothing here imports Locust or gevent: the same code runs in a test thread against the
embedded emulator and in a Locust greenlet (where ``time.sleep``, sockets and
``threading`` are gevent's).
"""

from __future__ import annotations

import logging
import os
import random
import ssl
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from botocore.exceptions import ClientError

from devices.base import CertApi, EndpointParams, Flow, MqttVersion, coerce_enum
from devices.mqtt_transport import (
    ConnectRefused,
    LoopDriver,
    MqttTransport,
    SlotContext,
    TlsIdentity,
)
from devices.mqtt_transport import TransportError as MqttTransportError
from devices.virtual import KeyType, ProvisioningClient, Rejected, RetryPolicy, generate_key
from harness import pki
from harness.protocol import THROTTLING_CODE, Api, PayloadFormat
from loadtests.events import FlowOutcome, StepName, StepSink, StepTiming, ThrottleMeter

log = logging.getLogger("fleetbench.load.flow")

__all__ = [
    "ClaimIssuer",
    "DeviceSlot",
    "FlowSettings",
    "FlowTarget",
]

#: The template parameter the default template names things after (harness.fleet).
SERIAL_PARAMETER = "SerialNumber"
#: Seconds a failed flow waits for a dropped connection to close (a connection still in
#: its TLS handshake has no socket to close yet: waiting longer would only delay the user).
ABORT_WAIT_S = 1.0
#: When a device subscribes to the replies: once for both calls, or before each call.
SUBSCRIBE_MODES = ("once", "per-call")
#: Failures whose reason a process logs (the rest are counted in Locust's tables).
MAX_LOGGED_FAILURES = 20
#: The slot's file holding the current device's private key and certificate (0600).
DEVICE_FILE = "device.pem"


@dataclass(frozen=True)
class FlowSettings:
    """How every device of a run behaves (the ``--fleet-*`` options).

    ``hold_s`` keeps the device connected with its new certificate that long before it
    disconnects (a device coming online; how connected-device counts are measured).
    """

    cert_api: CertApi = CertApi.CSR
    flow: Flow = Flow.CLAIM
    payload_format: PayloadFormat = PayloadFormat.JSON
    mqtt_version: MqttVersion = MqttVersion.V3_1_1
    key_type: KeyType = KeyType.EC_P256
    connect_timeout_s: float = 10.0
    response_timeout_s: float = 10.0
    keepalive_s: int = 60
    hold_s: float = 0.0
    retry: RetryPolicy = field(default_factory=RetryPolicy)
    serial_parameter: str = SERIAL_PARAMETER
    #: "once": one SUBSCRIBE to both calls' accepted/rejected topics before the first call;
    #: "per-call": a SUBSCRIBE before each call, as the SDK samples do (one more round trip)
    subscribe: str = "once"

    def __post_init__(self) -> None:
        set_ = object.__setattr__
        set_(self, "cert_api", coerce_enum(CertApi, self.cert_api, "cert_api"))
        set_(self, "flow", coerce_enum(Flow, self.flow, "flow"))
        set_(self, "payload_format",
             coerce_enum(PayloadFormat, self.payload_format, "payload_format"))
        set_(self, "mqtt_version", coerce_enum(MqttVersion, self.mqtt_version, "mqtt_version"))
        set_(self, "key_type", coerce_enum(KeyType, self.key_type, "key_type"))
        if self.connect_timeout_s <= 0 or self.response_timeout_s <= 0:
            raise ValueError("timeouts must be positive")
        if self.hold_s < 0:
            raise ValueError("hold_s must not be negative")
        if self.subscribe not in SUBSCRIBE_MODES:
            raise ValueError(f"subscribe must be one of {SUBSCRIBE_MODES}, not "
                             f"{self.subscribe!r}")

    @property
    def api(self) -> Api:
        return (Api.CREATE_CERTIFICATE_FROM_CSR if self.cert_api is CertApi.CSR
                else Api.CREATE_KEYS_AND_CERTIFICATE)


class ClaimIssuer:
    """The installer's app of the trusted-user flow: CreateProvisioningClaim through the
    control plane (spec fleet §2.1), retried on ``ThrottlingException`` like an AWS SDK.

    ``iot`` is the boto3 client, or a function that makes it on first use (building one
    takes ~0.5 s of CPU, which a Locust worker should not spend unless a trusted-user
    device needs it). It should have botocore's own retries off (``max_attempts=1``) so
    that every throttle is seen and counted here.
    """

    def __init__(self, iot: Any, template_name: str) -> None:
        self._iot = iot
        self._made = not callable(iot) or hasattr(iot, "create_provisioning_claim")
        self.template_name = template_name

    @property
    def iot(self) -> Any:
        if not self._made:
            self._iot, self._made = self._iot(), True
        return self._iot

    def issue(self, directory: Path, endpoint: EndpointParams, retry: RetryPolicy,
              rng: random.Random, sleep: Callable[[float], None]) -> TlsIdentity:
        """Write a fresh temporary claim into ``directory``; its TLS identity."""
        attempt = 0
        while True:
            attempt += 1
            try:
                made = self.iot.create_provisioning_claim(templateName=self.template_name)
                break
            except ClientError as exc:
                code = exc.response.get("Error", {}).get("Code")
                if code == THROTTLING_CODE and attempt < retry.max_attempts:
                    sleep(retry.delay(attempt, rng))
                    continue
                raise
        cert, key = directory / "claim.pem", directory / "claim.key"
        pki.write_secret(key, made["keyPair"]["PrivateKey"])
        pki.write_public(cert, made["certificatePem"])
        return TlsIdentity.for_endpoint(endpoint, cert, key)


@dataclass(frozen=True)
class FlowTarget:
    """What every flow of a process shares: where to connect, the template, the claim.

    ``claim`` is the claim certificate's TLS identity (claim flows); ``issuer`` makes a
    temporary claim per device (trusted-user flows). ``prefix`` names things
    (``<prefix>-<serial>``, the default template's rule) for the truth check.
    """

    endpoint: EndpointParams
    template_name: str
    prefix: str
    claim: TlsIdentity | None = None
    issuer: ClaimIssuer | None = None

    def thing_name(self, serial: str) -> str:
        return f"{self.prefix}-{serial}"


class _Failed(Exception):
    """A step failed; the flow ends (carries the step and the error code)."""

    def __init__(self, step: StepName, code: str) -> None:
        super().__init__(f"{step.value}: {code}")
        self.step = step
        self.code = code


def _error_code(exc: BaseException) -> str:
    if isinstance(exc, Rejected):
        return exc.response.error_code or f"HTTP{exc.response.status_code}"
    if isinstance(exc, MqttTransportError):
        return exc.code
    if isinstance(exc, ClientError):
        return str(exc.response.get("Error", {}).get("Code") or "ClientError")
    return type(exc).__name__


_logged_failures = 0


def _log_failure(serial: str, step: StepName, code: str, exc: BaseException) -> None:
    """The first failures of a process, with the reason; later ones only count. A
    rejection is logged by status and code only (its message is the endpoint's text)."""
    global _logged_failures
    if _logged_failures >= MAX_LOGGED_FAILURES:
        return
    _logged_failures += 1
    reason = (f"{exc.response.status_code} {exc.response.error_code}"
              if isinstance(exc, Rejected) else str(exc)[:300])
    log.warning("event=step_failed serial=%s step=%s error=%s reason=%s", serial, step.value,
                code, reason)


class DeviceSlot:
    """One Locust user's device slot: each :meth:`run` is a new device, from claim to
    its own certificate, in ``workdir`` (reused: it holds the current device's files)."""

    def __init__(self, target: FlowTarget, settings: FlowSettings, workdir: Path,
                 sink: StepSink, *, driver: LoopDriver | None = None,
                 rng: random.Random | None = None,
                 sleep: Callable[[float], None] = time.sleep,
                 online: Callable[[int], None] | None = None) -> None:
        """``online(+1/-1)`` is told when a device connects with its own certificate and
        when that connection ends (the process's connected-device gauge)."""
        self.target = target
        self.online = online
        self.settings = settings
        self.workdir = Path(workdir)
        self.sink = sink
        self.driver = driver
        self.rng = rng or random.Random()
        self._sleep = sleep
        #: The outcome of a flow cut short by a BaseException (set just before it propagates).
        self.interrupted: FlowOutcome | None = None
        if settings.flow is Flow.CLAIM and target.claim is None:
            raise ValueError("a claim flow needs the claim's TLS identity")
        if settings.flow is Flow.TRUSTED_USER and target.issuer is None:
            raise ValueError("a trusted-user flow needs a claim issuer (control plane)")
        self.workdir.mkdir(parents=True, exist_ok=True)
        os.chmod(self.workdir, 0o700)  # it holds the current device's key
        # TLS contexts (see SlotContext): the shared claim's is built on first use; a new
        # device's certificate (and a trusted user's temporary claim) is loaded into a
        # context the slot reuses, each connection made before the next identity is loaded
        # (one flow at a time).
        self._claim_context: ssl.SSLContext | None = None
        self.device_context = SlotContext.for_endpoint(target.endpoint)
        self.temporary_claim_context = (SlotContext.for_endpoint(target.endpoint)
                                        if target.issuer is not None else None)

    def claim_context(self) -> ssl.SSLContext:
        """The shared claim's context (claim flows), built once per slot."""
        if self._claim_context is None:
            assert self.target.claim is not None
            self._claim_context = SlotContext.for_endpoint(self.target.endpoint).load(
                self.target.claim)
        return self._claim_context

    def device_identity(self, key_pem: str, certificate_pem: str) -> TlsIdentity:
        """The current device's key and certificate as one 0600 file in the slot's private
        directory (a load slot keeps no flash: this file only feeds the TLS context)."""
        path = self.workdir / DEVICE_FILE
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
        with os.fdopen(fd, "w") as fh:
            fh.write(key_pem)
            fh.write(certificate_pem)
        return TlsIdentity.for_endpoint(self.target.endpoint, path, path)

    # -- one flow ------------------------------------------------------------------------------
    def run(self, serial: str) -> FlowOutcome:
        """Provision one new device; the outcome says how far it got. A ``BaseException``
        (the greenlet killed at the end of the run) marks it interrupted and propagates."""
        self.interrupted = None
        return _FlowRun(self, serial).execute()


class _FlowRun:
    def __init__(self, slot: DeviceSlot, serial: str) -> None:
        self.slot = slot
        self.settings = slot.settings
        self.target = slot.target
        self.serial = serial
        self.meter = ThrottleMeter(slot.sink, slot._sleep)
        self.steps: list[StepTiming] = []
        self.open: list[MqttTransport] = []
        self.thing_name: str | None = None
        self.certificate_id: str | None = None

    @contextmanager
    def step(self, name: StepName) -> Iterator[None]:
        self.meter.current = name
        started, t0 = time.time(), time.perf_counter()
        try:
            yield
        except Exception as exc:
            code = _error_code(exc)
            self._record(name, started, time.perf_counter() - t0, code)
            if isinstance(exc, _Failed):
                raise
            _log_failure(self.serial, name, code, exc)
            raise _Failed(name, code) from None
        self._record(name, started, time.perf_counter() - t0, None)

    def _record(self, name: StepName, started: float, duration: float,
                code: str | None) -> None:
        self.steps.append(StepTiming(name.value, started, duration, code))
        self.slot.sink.step(name, duration, code)

    def connect(self, client_id: str, identity: TlsIdentity,
                context: ssl.SSLContext) -> MqttTransport:
        """CONNECT with ``context`` (presenting ``identity``); retried with backoff while
        MQTT 5 says the connect rate is exceeded."""
        settings = self.settings
        attempt = 0
        while True:
            attempt += 1
            transport = MqttTransport(client_id, self.target.endpoint, identity,
                                      version=settings.mqtt_version,
                                      keepalive=settings.keepalive_s, driver=self.slot.driver,
                                      context=context)
            self.open.append(transport)
            try:
                transport.connect(settings.connect_timeout_s)
                return transport
            except ConnectRefused as exc:
                self.close(transport, clean=False)
                if exc.retryable and attempt < settings.retry.max_attempts:
                    self.meter(settings.retry.delay(attempt, self.slot.rng))
                    continue
                raise

    def close(self, transport: MqttTransport, clean: bool = True,
              timeout: float = ABORT_WAIT_S) -> None:
        try:
            if clean:
                transport.disconnect()
            else:
                transport.abort(timeout)
        finally:
            if transport in self.open:
                self.open.remove(transport)

    def client(self, transport: MqttTransport) -> ProvisioningClient:
        return ProvisioningClient(transport, self.settings.payload_format,
                                  timeout=self.settings.response_timeout_s,
                                  retry=self.settings.retry, rng=self.slot.rng, sleep=self.meter)

    def execute(self) -> FlowOutcome:
        started, t0 = time.time(), time.perf_counter()
        error: _Failed | None = None
        try:
            self.provision()
        except _Failed as failed:
            error = failed
        except Exception as exc:  # a local fault (disk, a bug): the flow fails, the user goes on
            error = _Failed(self.meter.current, _error_code(exc))
            log.warning("event=flow_error serial=%s step=%s error=%s", self.serial,
                        self.meter.current.value, error.code)
        except BaseException:
            # the greenlet is being killed (the run is over): neither success nor failure
            self.slot.interrupted = self.outcome(started, time.perf_counter() - t0, None,
                                                 interrupted=True)
            self.abort_all(timeout=0.0)  # a dying greenlet must not wait for the close
            raise
        finally:
            if self.open:
                self.abort_all()
        return self.outcome(started, time.perf_counter() - t0, error)

    def outcome(self, started: float, duration: float, error: _Failed | None,
                interrupted: bool = False) -> FlowOutcome:
        return FlowOutcome(
            serial=self.serial, ok=error is None and not interrupted, started_at=started,
            duration=duration, thing_name=self.thing_name, certificate_id=self.certificate_id,
            error_code=error.code if error else None,
            failed_step=error.step.value if error else None,
            throttles=self.meter.count, interrupted=interrupted, steps=tuple(self.steps))

    def abort_all(self, timeout: float = ABORT_WAIT_S) -> None:
        for transport in list(self.open):
            try:
                self.close(transport, clean=False, timeout=timeout)
            except Exception:  # dropping a dead connection cannot fail the flow
                log.debug("event=abort_failed client_id=%s", transport.client_id)

    def provision(self) -> None:
        settings, target, slot = self.settings, self.target, self.slot
        claim = target.claim
        if settings.flow is Flow.TRUSTED_USER:
            assert target.issuer is not None
            with self.step(StepName.CREATE_PROVISIONING_CLAIM):
                claim = target.issuer.issue(slot.workdir, target.endpoint, settings.retry,
                                            slot.rng, self.meter)
        assert claim is not None
        with self.step(StepName.CONNECT_CLAIM):
            if settings.flow is Flow.TRUSTED_USER:
                assert slot.temporary_claim_context is not None
                claim_context = slot.temporary_claim_context.load(claim)
            else:
                claim_context = slot.claim_context()
            claim_conn = self.connect(f"{self.serial}-claim", claim, claim_context)
        client = self.client(claim_conn)
        api = settings.api
        key_pem: str | None = None
        csr = ""
        if api is Api.CREATE_CERTIFICATE_FROM_CSR:  # the device's own key never leaves it
            key = generate_key(settings.key_type)
            csr = pki.make_csr(key, self.serial)
            key_pem = pki.private_key_pem(key)
        per_call = settings.subscribe == "per-call"
        with self.step(StepName.for_api(api)):  # SUBSCRIBE accepted/rejected, then the call
            if per_call:
                client.subscribe(api)
            else:  # both calls' replies, so the first step carries the one SUBSCRIBE
                client.subscribe_all([(api, None), (Api.REGISTER_THING, target.template_name)])
            if api is Api.CREATE_CERTIFICATE_FROM_CSR:
                issued: Any = client.create_certificate_from_csr(csr)
            else:
                issued = client.create_keys_and_certificate()
                key_pem = issued.private_key
        self.certificate_id = issued.certificate_id
        with self.step(StepName.REGISTER_THING):
            if per_call:
                client.subscribe(Api.REGISTER_THING, target.template_name)
            registered = client.register_thing(
                target.template_name, issued.certificate_ownership_token,
                {settings.serial_parameter: self.serial})
        self.thing_name = registered.thing_name or target.thing_name(self.serial)
        self.close(claim_conn)
        assert key_pem is not None
        identity = slot.device_identity(key_pem, issued.certificate_pem)
        with self.step(StepName.CONNECT_DEVICE):
            device_conn = self.connect(self.thing_name, identity,
                                       slot.device_context.load(identity))
        online = self.slot.online or (lambda _delta: None)
        online(+1)
        try:
            if settings.hold_s > 0:  # online for a while; keep-alives run in the loop driver
                self.slot._sleep(settings.hold_s)
                if not device_conn.connected:
                    raise _Failed(StepName.CONNECT_DEVICE, "ConnectionLost")
            self.close(device_conn)
        finally:
            online(-1)
