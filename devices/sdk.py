"""``SdkDevice``: the flows through the AWS IoT Device SDK v2 (awsiotsdk on awscrt).

Teams' companion apps and gateways use this SDK, so the harness runs the flows through
its identity clients the way AWS's own fleet provisioning samples do:

* MQTT 3.1.1: ``awsiot.mqtt_connection_builder`` and ``iotidentity.IotIdentityClient``:
  subscribe to ``accepted``/``rejected`` with callbacks, publish the request, wait;
* MQTT 5: ``awsiot.mqtt5_client_builder`` and ``iotidentity.IotIdentityClientV2`` on
  ``awscrt.mqtt_request_response``: one future per operation.

The SDK speaks JSON only (its topics are hard-wired to ``.../json``), so a CBOR run is a
configuration error. It connects to ``EndpointParams.host`` and awscrt checks the server
certificate against that name (there is no separate SNI setting).

Like the virtual device, it keeps its credentials in the run's workdir
(:mod:`devices.credentials`), so another ``provision`` with the same workdir is a reboot:
registered → reconnect only; credentials saved but not registered → RegisterThing with
the stored token; otherwise start over. A cut at a fault point (issue 10) ends the flow
right after that point's step and leaves flash as it is; the SDK has no way to drop a
connection without sending DISCONNECT, so the endpoint sees a clean close there.
"""

from __future__ import annotations

import concurrent.futures
import logging
import threading
import time
from collections.abc import Callable, Iterator, Mapping
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, ClassVar

from devices import flow_common as flow
from devices.base import (
    FAULT_POINT_AFTER,
    CertApi,
    DeviceConfigError,
    DeviceInputs,
    DeviceResult,
    ErrorResponse,
    FaultPoint,
    MqttVersion,
    Step,
    StepRecord,
    coerce_enum,
    register_device_kind,
)
from devices.credentials import CredentialStore, CredentialStoreError
from devices.provision_common import DefaultWorkdir, time_left
from harness import pki
from harness.protocol import INVALID_TOKEN_CODE, PayloadFormat

log = logging.getLogger("fleetbench.devices.sdk")

__all__ = ["SdkDevice", "SdkOptions"]

#: What the SDK device's CSR keys are ("ec-p256" or "rsa-2048", as the virtual device's).
KEY_TYPES = ("ec-p256", "rsa-2048")
LOG_NAME = "device.log"


@dataclass(frozen=True)
class SdkOptions:
    """How an :class:`SdkDevice` behaves (``create_device("sdk", **options)``).

    ``telemetry_topic`` (formatted with ``thing_name``, ``client_id``, ``serial``; ``None``
    skips it) is published once connected with the new certificate. ``serial_parameter``
    names the template parameter that carries ``DeviceInputs.serial`` when the inputs do
    not set it. ``request_timeout_s`` bounds each request (whole seconds for the V2 client).
    """

    key_type: str = "ec-p256"
    connect_timeout_s: float = 10.0
    request_timeout_s: float = 10.0
    keep_alive_s: int = 60
    telemetry_topic: str | None = "dt/{thing_name}/telemetry"
    serial_parameter: str | None = "SerialNumber"
    device_client_id: str | None = None
    enable_metrics: bool = True

    def __post_init__(self) -> None:
        if self.key_type not in KEY_TYPES:
            raise DeviceConfigError(f"key_type must be one of {', '.join(KEY_TYPES)}, "
                                    f"got {self.key_type!r}")
        if self.connect_timeout_s <= 0 or self.request_timeout_s <= 0:
            raise DeviceConfigError("timeouts must be positive")


# --------------------------------------------------------------------------- errors


class _Failure(Exception):
    """A step failed for a reason other than a rejection; ``code`` names it."""

    def __init__(self, code: str, message: str) -> None:
        super().__init__(message)
        self.code = code


class _Rejected(Exception):
    def __init__(self, response: ErrorResponse) -> None:
        super().__init__(f"{response.status_code} {response.error_code}: "
                         f"{response.error_message}")
        self.response = response


class _Stop(Exception):
    def __init__(self, point: FaultPoint) -> None:
        super().__init__(f"power cut at {point.value}")
        self.point = point


def _crt_failure(what: str, exc: BaseException) -> _Failure:
    """An awscrt/SDK exception as a short, secret-free failure."""
    if isinstance(exc, concurrent.futures.TimeoutError):
        return _Failure("Timeout", f"{what}: no answer in time")
    name = getattr(exc, "name", None) or type(exc).__name__
    inner = getattr(exc, "inner_error", None)
    if inner is not None:
        name = getattr(inner, "name", None) or type(inner).__name__
    return _Failure("ConnectionLost" if "HANGUP" in str(name) else str(name),
                    f"{what}: {name}")


def _explain(exc: Exception) -> flow.StepError | None:
    """A step's failure as its record says it (see :func:`devices.flow_common.timed_step`)."""
    if isinstance(exc, _Rejected):
        return flow.StepError(exc.response.error_code,
                              {"status_code": str(exc.response.status_code)})
    if isinstance(exc, _Failure):
        return flow.StepError(exc.code, {"reason": str(exc)})
    return None


def _error_response(modeled: Any) -> ErrorResponse:
    status = getattr(modeled, "status_code", None)
    return ErrorResponse(int(status) if isinstance(status, int) else 0,
                         str(getattr(modeled, "error_code", "") or ""),
                         str(getattr(modeled, "error_message", "") or ""))


# --------------------------------------------------------------------------- sessions


@dataclass(frozen=True)
class _Issued:
    certificate_id: str
    certificate_pem: str
    private_key: str | None = field(repr=False)
    token: str = field(repr=False)


class _Session:
    """One MQTT connection through the SDK, with the identity operations on it."""

    steps_subscribe: ClassVar[bool] = False  # whether subscribing is a step of its own

    def subscribe_certificate(self, csr: bool) -> None:
        """Subscribe to the certificate operation's replies (3.1.1 only)."""

    def subscribe_register(self, template: str) -> None:
        """Subscribe to RegisterThing's replies (3.1.1 only)."""

    def create_certificate(self, csr_pem: str | None) -> _Issued:
        raise NotImplementedError

    def register(self, template: str, token: str,
                 parameters: Mapping[str, str]) -> tuple[str | None, dict[str, str]]:
        raise NotImplementedError

    def publish(self, topic: str, payload: bytes) -> None:
        raise NotImplementedError

    def close(self) -> None:
        raise NotImplementedError


class _Box:
    """The first callback result (the 3.1.1 client answers through callbacks)."""

    def __init__(self) -> None:
        self._event = threading.Event()
        self.value: Any = None
        self.rejected = False

    def accept(self, value: Any) -> None:
        if not self._event.is_set():
            self.value, self.rejected = value, False
            self._event.set()

    def reject(self, value: Any) -> None:
        if not self._event.is_set():
            self.value, self.rejected = value, True
            self._event.set()

    def wait(self, timeout: float, what: str) -> Any:
        if not self._event.wait(timeout):
            raise _Failure("Timeout", f"{what}: no reply within {timeout:g}s")
        if self.rejected:
            raise _Rejected(_error_response(self.value))
        return self.value


class _Mqtt3Session(_Session):
    """``IotIdentityClient`` on an MQTT 3.1.1 connection (the SDK's classic sample)."""

    steps_subscribe = True

    def __init__(self, endpoint: Any, client_id: str, cert: Path, key: Path,
                 options: SdkOptions, timeout: float) -> None:
        from awscrt import mqtt
        from awsiot import iotidentity, mqtt_connection_builder

        self._iotidentity = iotidentity
        self._qos = mqtt.QoS.AT_LEAST_ONCE
        self._timeout = options.request_timeout_s
        self._connection = mqtt_connection_builder.mtls_from_path(
            endpoint=endpoint.host, port=endpoint.port, cert_filepath=str(cert),
            pri_key_filepath=str(key), ca_filepath=str(endpoint.ca_file), client_id=client_id,
            clean_session=True, keep_alive_secs=options.keep_alive_s,
            tcp_connect_timeout_ms=int(timeout * 1000),
            enable_metrics_collection=options.enable_metrics)
        try:
            self._connection.connect().result(timeout)
        except BaseException as exc:
            raise _crt_failure("CONNECT", exc) from None
        self._identity = iotidentity.IotIdentityClient(self._connection)
        self._boxes: dict[str, _Box] = {}

    def _subscribe(self, what: str, subscribe: Callable[..., Any], request: Any,
                   box: _Box, accepted: bool) -> None:
        callback = box.accept if accepted else box.reject
        try:
            future, _ = subscribe(request=request, qos=self._qos, callback=callback)
            result = future.result(self._timeout)
        except BaseException as exc:
            raise _crt_failure(f"SUBSCRIBE {what}", exc) from None
        # The SDK resolves to the granted QoS (awscrt's own subscribe: a dict holding it).
        qos = result.get("qos") if isinstance(result, dict) else result
        if qos is None or int(qos) >= 0x80:
            raise _Failure("SubscribeRefused", f"SUBSCRIBE {what}: refused")

    def subscribe_certificate(self, csr: bool) -> None:
        ident, box = self._iotidentity, _Box()
        self._boxes["certificate"] = box
        if csr:
            request = ident.CreateCertificateFromCsrSubscriptionRequest()
            self._subscribe("create-from-csr/json/accepted",
                            self._identity.subscribe_to_create_certificate_from_csr_accepted,
                            request, box, True)
            self._subscribe("create-from-csr/json/rejected",
                            self._identity.subscribe_to_create_certificate_from_csr_rejected,
                            request, box, False)
        else:
            request = ident.CreateKeysAndCertificateSubscriptionRequest()
            self._subscribe("create/json/accepted",
                            self._identity.subscribe_to_create_keys_and_certificate_accepted,
                            request, box, True)
            self._subscribe("create/json/rejected",
                            self._identity.subscribe_to_create_keys_and_certificate_rejected,
                            request, box, False)

    def subscribe_register(self, template: str) -> None:
        box = _Box()
        self._boxes["register"] = box
        request = self._iotidentity.RegisterThingSubscriptionRequest(template_name=template)
        self._subscribe("provision/json/accepted",
                        self._identity.subscribe_to_register_thing_accepted, request, box, True)
        self._subscribe("provision/json/rejected",
                        self._identity.subscribe_to_register_thing_rejected, request, box,
                        False)

    def _publish(self, what: str, future: Any) -> None:
        try:
            future.result(self._timeout)
        except BaseException as exc:
            raise _crt_failure(f"PUBLISH {what}", exc) from None

    def create_certificate(self, csr_pem: str | None) -> _Issued:
        ident = self._iotidentity
        box = self._boxes.setdefault("certificate", _Box())
        if csr_pem is None:
            self._publish("CreateKeysAndCertificate", self._identity.
                          publish_create_keys_and_certificate(
                              request=ident.CreateKeysAndCertificateRequest(), qos=self._qos))
            reply = box.wait(self._timeout, "CreateKeysAndCertificate")
            return _Issued(reply.certificate_id, reply.certificate_pem, reply.private_key,
                           reply.certificate_ownership_token)
        self._publish("CreateCertificateFromCsr", self._identity.
                      publish_create_certificate_from_csr(
                          request=ident.CreateCertificateFromCsrRequest(
                              certificate_signing_request=csr_pem), qos=self._qos))
        reply = box.wait(self._timeout, "CreateCertificateFromCsr")
        return _Issued(reply.certificate_id, reply.certificate_pem, None,
                       reply.certificate_ownership_token)

    def register(self, template: str, token: str,
                 parameters: Mapping[str, str]) -> tuple[str | None, dict[str, str]]:
        box = self._boxes.setdefault("register", _Box())
        request = self._iotidentity.RegisterThingRequest(
            template_name=template, certificate_ownership_token=token,
            parameters=dict(parameters))
        self._publish("RegisterThing",
                      self._identity.publish_register_thing(request=request, qos=self._qos))
        reply = box.wait(self._timeout, "RegisterThing")
        return reply.thing_name, dict(reply.device_configuration or {})

    def publish(self, topic: str, payload: bytes) -> None:
        try:
            future, _ = self._connection.publish(topic=topic, payload=payload, qos=self._qos)
        except BaseException as exc:
            raise _crt_failure(f"PUBLISH {topic}", exc) from None
        self._publish(topic, future)

    def close(self) -> None:
        try:
            self._connection.disconnect().result(self._timeout)
        except BaseException:  # already gone
            pass


class _Mqtt5Session(_Session):
    """``IotIdentityClientV2`` on an MQTT 5 client (the SDK's current samples)."""

    def __init__(self, endpoint: Any, client_id: str, cert: Path, key: Path,
                 options: SdkOptions, timeout: float) -> None:
        from awscrt import mqtt5, mqtt_request_response
        from awsiot import iotidentity, mqtt5_client_builder

        self._mqtt5 = mqtt5
        self._iotidentity = iotidentity
        self._timeout = options.request_timeout_s
        connected: concurrent.futures.Future[bool] = concurrent.futures.Future()
        self._stopped: concurrent.futures.Future[bool] = concurrent.futures.Future()

        def settle(future: concurrent.futures.Future[Any], value: Any = None,
                   error: BaseException | None = None) -> None:
            if future.done():
                return
            if error is not None:
                future.set_exception(error)
            else:
                future.set_result(value)

        def on_failure(event: Any) -> None:
            settle(connected, error=_crt_failure("CONNECT", event.exception)
                   if getattr(event, "exception", None) else
                   _Failure("ConnectRefused", "CONNECT refused"))

        self._client = mqtt5_client_builder.mtls_from_path(
            endpoint=endpoint.host, port=endpoint.port, cert_filepath=str(cert),
            pri_key_filepath=str(key), ca_filepath=str(endpoint.ca_file), client_id=client_id,
            session_behavior=mqtt5.ClientSessionBehaviorType.CLEAN,
            keep_alive_interval_sec=options.keep_alive_s,
            connack_timeout_ms=int(timeout * 1000),
            min_reconnect_delay_ms=60_000, max_reconnect_delay_ms=120_000,
            enable_metrics_collection=options.enable_metrics,
            on_lifecycle_connection_success=lambda event: settle(connected, True),
            on_lifecycle_connection_failure=on_failure,
            on_lifecycle_stopped=lambda event: settle(self._stopped, True))
        self._client.start()
        try:
            connected.result(timeout)
        except _Failure:
            self.close()
            raise
        except BaseException as exc:
            self.close()
            raise _crt_failure("CONNECT", exc) from None
        rr_options = mqtt_request_response.ClientOptions(
            max_request_response_subscriptions=2, max_streaming_subscriptions=1,
            operation_timeout_in_seconds=max(1, round(self._timeout)))
        self._identity = iotidentity.IotIdentityClientV2(self._client, rr_options)

    def _result(self, what: str, future: Any) -> Any:
        import awsiot

        try:
            return future.result(self._timeout + 1)
        except awsiot.V2ServiceException as exc:
            if exc.modeled_error is not None:
                raise _Rejected(_error_response(exc.modeled_error)) from None
            raise _crt_failure(what, exc) from None
        except BaseException as exc:
            raise _crt_failure(what, exc) from None

    def create_certificate(self, csr_pem: str | None) -> _Issued:
        ident = self._iotidentity
        if csr_pem is None:
            reply = self._result("CreateKeysAndCertificate", self._identity
                                 .create_keys_and_certificate(
                                     ident.CreateKeysAndCertificateRequest()))
            return _Issued(reply.certificate_id, reply.certificate_pem, reply.private_key,
                           reply.certificate_ownership_token)
        reply = self._result("CreateCertificateFromCsr", self._identity
                             .create_certificate_from_csr(ident.CreateCertificateFromCsrRequest(
                                 certificate_signing_request=csr_pem)))
        return _Issued(reply.certificate_id, reply.certificate_pem, None,
                       reply.certificate_ownership_token)

    def register(self, template: str, token: str,
                 parameters: Mapping[str, str]) -> tuple[str | None, dict[str, str]]:
        request = self._iotidentity.RegisterThingRequest(
            template_name=template, certificate_ownership_token=token,
            parameters=dict(parameters))
        reply = self._result("RegisterThing", self._identity.register_thing(request))
        return reply.thing_name, dict(reply.device_configuration or {})

    def publish(self, topic: str, payload: bytes) -> None:
        packet = self._mqtt5.PublishPacket(topic=topic, payload=payload,
                                           qos=self._mqtt5.QoS.AT_LEAST_ONCE)
        result = self._result(f"PUBLISH {topic}", self._client.publish(packet))
        puback = getattr(result, "puback", None)
        code = int(getattr(getattr(puback, "reason_code", 0), "value", 0) or 0)
        if code >= 0x80:
            raise _Failure("PublishRefused", f"PUBLISH {topic}: refused (0x{code:02X})")

    def close(self) -> None:
        try:
            self._client.stop()
            self._stopped.result(self._timeout)
        except BaseException:  # already stopped
            pass


# --------------------------------------------------------------------------- the device


class _DeviceLog:
    """Short secret-free lines in ``<workdir>/device.log`` (the evidence) and the logger."""

    def __init__(self, path: Path) -> None:
        self.path = path
        path.parent.mkdir(parents=True, exist_ok=True)
        self._fh = path.open("a", encoding="utf-8")

    def __call__(self, line: str) -> None:
        log.debug("%s", line)
        stamp = time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime())
        self._fh.write(f"{stamp} {line}\n")
        self._fh.flush()

    def close(self) -> None:
        self._fh.close()


@register_device_kind("sdk")
class SdkDevice:
    """A device driven through awsiotsdk. Capabilities: Provisioner, FaultPoints."""

    kind: ClassVar[str] = "sdk"
    options_type: ClassVar[type] = SdkOptions

    def __init__(self, options: SdkOptions | None = None) -> None:
        try:
            import awsiot  # noqa: F401 - fail at creation, not mid-run, without the extra
        except ImportError as exc:
            raise DeviceConfigError(
                f"the sdk device needs awsiotsdk (pip install 'fleetbench[sdk]'): {exc}") \
                from None
        self.options = options or SdkOptions()
        self._armed: FaultPoint | None = None
        self._workdirs = DefaultWorkdir("fleetbench-sdk-")

    @property
    def fault_points(self) -> tuple[FaultPoint, ...]:
        return tuple(FaultPoint)

    def cut_at(self, point: FaultPoint | str | None) -> None:
        """Cut the next run at ``point`` (see the module docstring for what a cut is)."""
        self._armed = None if point is None else coerce_enum(FaultPoint, point, "fault point")

    def provision(self, inputs: DeviceInputs) -> DeviceResult:
        """One boot: resume from flash or run the flow, then connect with the new certificate."""
        if inputs.payload_format is not PayloadFormat.JSON:
            raise DeviceConfigError("the sdk device speaks JSON only: the AWS IoT Device SDK's "
                                    "identity clients use the .../json topics")
        cut, self._armed = self._armed, None
        store = CredentialStore(self._workdirs.for_run(inputs))
        store.ensure()
        device_log = _DeviceLog(store.directory / LOG_NAME)
        try:
            return _SdkRun(self, inputs, store, device_log, cut).execute()
        finally:
            device_log.close()


class _SdkRun:
    """One boot of an :class:`SdkDevice`."""

    def __init__(self, device: SdkDevice, inputs: DeviceInputs, store: CredentialStore,
                 device_log: _DeviceLog, cut: FaultPoint | None) -> None:
        self.device = device
        self.options = device.options
        self.inputs = inputs
        self.store = store
        self.log = device_log
        self.cut = cut
        self.steps: list[StepRecord] = []
        self.sessions: list[_Session] = []
        self.deadline = time.monotonic() + inputs.timeout_s
        self.claim_client_id = flow.claim_client_id(inputs, "fleetbench-sdk-")
        self.thing_name: str | None = None
        self.certificate_id: str | None = None
        self.device_configuration: dict[str, str] = {}

    # -- plumbing ------------------------------------------------------------------------------
    def budget(self, seconds: float) -> float:
        return time_left(self.deadline, seconds, lambda: _Failure(
            "Timeout", f"run exceeded its {self.inputs.timeout_s:g}s budget"))

    @contextmanager
    def step(self, step: Step) -> Iterator[dict[str, str]]:
        with flow.timed_step(step, _explain, self.record) as detail:
            yield detail
        if self.cut is not None and FAULT_POINT_AFTER[self.cut] is step:
            raise _Stop(self.cut)

    def record(self, record: StepRecord) -> None:
        self.steps.append(record)
        self.log(flow.step_line(record))

    def open(self, client_id: str, cert: Path, key: Path) -> _Session:
        kind = _Mqtt5Session if self.inputs.mqtt_version is MqttVersion.V5 else _Mqtt3Session
        session = kind(self.inputs.endpoint, client_id, cert, key, self.options,
                       self.budget(self.options.connect_timeout_s))
        self.sessions.append(session)
        return session

    def close(self, session: _Session) -> None:
        if session in self.sessions:
            self.sessions.remove(session)
        session.close()

    # -- the run -------------------------------------------------------------------------------
    def execute(self) -> DeviceResult:
        self.log(f"event=boot device={self.inputs.device_id} sdk=awsiotsdk "
                 f"mqtt={int(self.inputs.mqtt_version)} flow={self.inputs.flow.value} "
                 f"cert={self.inputs.cert_api.value}")
        error: ErrorResponse | None = None
        failure: str | None = None
        stopped_at: str | None = None
        try:
            self.boot()
        except _Stop as stop:
            failure, stopped_at = str(stop), stop.point.value
        except _Rejected as exc:
            error = exc.response
        except (_Failure, CredentialStoreError) as exc:
            failure = str(exc)
        finally:
            for session in list(self.sessions):
                self.close(session)
        ok = error is None and failure is None
        self.log(flow.done_line(error, failure))
        return DeviceResult(
            ok=ok, device_id=self.inputs.device_id, kind=self.device.kind,
            thing_name=self.thing_name, certificate_id=self.certificate_id,
            device_configuration=self.device_configuration, error=error, failure=failure,
            stopped_at=stopped_at, steps=tuple(self.steps), log_path=self.log.path,
            credentials_dir=self.store.directory)

    def boot(self) -> None:
        with self.step(Step.RESUME) as detail:
            state, action = flow.resume(self.store, self.inputs.claim, detail, may_finish=True)
        if action is flow.BootAction.REUSE:
            self.thing_name, self.certificate_id = state.thing_name, state.certificate_id
            self.device_configuration = dict(state.device_configuration)
            self.use_device_identity()
            return
        if action is flow.BootAction.RESTART:
            self.store.forget_progress()
        with self.step(Step.CONNECT_CLAIM) as detail:
            detail.update(client_id=self.claim_client_id,
                          certificate_id=self.inputs.claim.certificate_id)
            claim = self.open(self.claim_client_id, self.store.claim_cert, self.store.claim_key)
        token = self.store.load_token() if action is flow.BootAction.FINISH else None
        if token is not None:
            self.certificate_id = state.certificate_id
            if not self.finish(claim, token):
                self.obtain_and_register(claim)
        else:
            self.obtain_and_register(claim)
        with self.step(Step.DISCONNECT_CLAIM):
            self.close(claim)
        self.use_device_identity()

    def obtain_and_register(self, claim: _Session) -> None:
        csr = self.inputs.cert_api is CertApi.CSR
        key_pem: str | None = None
        csr_pem: str | None = None
        if csr:
            with self.step(Step.GENERATE_KEY) as detail:
                key = pki.generate_ec_key() if self.options.key_type == "ec-p256" \
                    else pki.generate_rsa_key(2048)
                key_pem = pki.private_key_pem(key)
                csr_pem = pki.make_csr(key, self.inputs.serial or self.claim_client_id)
                detail.update(key_type=self.options.key_type)
        if claim.steps_subscribe:
            with self.step(Step.SUBSCRIBE_CERTIFICATE):
                claim.subscribe_certificate(csr)
        with self.step(Step.CREATE_CERTIFICATE) as detail:
            detail.update(api="CreateCertificateFromCsr" if csr else "CreateKeysAndCertificate")
            issued = claim.create_certificate(csr_pem)
            detail.update(certificate_id=issued.certificate_id)
        self.certificate_id = issued.certificate_id
        key_pem = key_pem if csr else issued.private_key
        if key_pem is None:
            raise _Failure("BadReply", "CreateKeysAndCertificate returned no private key")
        with self.step(Step.SAVE_CREDENTIALS):
            self.store.save_credentials(issued.certificate_pem, key_pem, issued.certificate_id,
                                        issued.token, self.inputs.template_name, time.time())
        self.register(claim, issued.token)

    def register(self, claim: _Session, token: str) -> None:
        template = self.inputs.template_name
        if claim.steps_subscribe:
            with self.step(Step.SUBSCRIBE_REGISTER):
                claim.subscribe_register(template)
        params = flow.template_parameters(self.inputs, self.options.serial_parameter)
        with self.step(Step.REGISTER_THING) as detail:
            detail.update(template=template, parameters=",".join(sorted(params)))
            thing_name, configuration = claim.register(template, token, params)
            detail.update(thing_name=thing_name or "")
        self.thing_name, self.device_configuration = thing_name, configuration
        with self.step(Step.SAVE_REGISTRATION):
            self.store.mark_registered(thing_name, configuration, time.time())

    def finish(self, claim: _Session, token: str) -> bool:
        """Recovery: RegisterThing with the stored token. A spent token means the cut came
        after the endpoint registered us; then the stored certificate must work."""
        try:
            self.register(claim, token)
            return True
        except _Rejected as exc:
            if exc.response.error_code != INVALID_TOKEN_CODE:
                raise
        with self.step(Step.PROBE_DEVICE) as detail:
            client_id = flow.device_client_id(self.options.device_client_id, None,
                                              self.inputs, self.claim_client_id)
            detail.update(client_id=client_id)
            try:
                probe = self.open(client_id, self.store.device_cert, self.store.device_key)
            except _Failure as exc:
                detail.update(outcome="refused", reason=str(exc))
                usable = False
            else:
                self.close(probe)
                detail.update(outcome="connected")
                usable = True
        if flow.probe_settled(self.store, usable):
            return True
        self.certificate_id = None
        return False

    def use_device_identity(self) -> None:
        """Reconnect with the new certificate (client id = thing name) and publish."""
        client_id = flow.device_client_id(self.options.device_client_id, self.thing_name,
                                          self.inputs, self.claim_client_id)
        with self.step(Step.CONNECT_DEVICE) as detail:
            detail.update(client_id=client_id)
            session = self.open(client_id, self.store.device_cert, self.store.device_key)
        topic = flow.telemetry_topic(self.options.telemetry_topic, self.thing_name,
                                     client_id, self.inputs.serial)
        if topic is not None:
            with self.step(Step.PUBLISH_TELEMETRY) as detail:
                detail.update(topic=topic)
                session.publish(topic, flow.telemetry_payload(self.inputs.serial, client_id))
        with self.step(Step.DISCONNECT_DEVICE):
            self.close(session)
