"""The verdict comes from the endpoint (design principle 2): a device's provisioning trace.

A scenario asks ``endpoint.observer.trace(client_id=...)`` (or by the claim's
``certificate_id``) and asserts on typed steps: connected with the claim, certificate
created (by which API), thing registered, disconnected (why), reconnected with the new
certificate, and any ``rejected`` answers with AWS's ``statusCode``/``errorCode``.

Two sources give the same :class:`ProvisioningTrace`:

* :class:`EmulatorObserver` reads the emulator's observation log through the admin API
  (``GET /_fleetbench/events``), which sees everything, rejections included.
* :class:`AwsObserver` subscribes to AWS's lifecycle events
  (``$aws/events/presence/#``, spec broker §4) with an observer certificate it creates
  and removes, and reads the registry (DescribeCertificate, ListPrincipalThings) to find
  the certificate and thing a device got. AWS reports neither which API created a
  certificate nor the ``rejected`` answers, so those steps carry ``api=None`` and
  rejections are absent there: scenarios that need them are ``emulator_only``.

Both turn what they saw into :class:`harness.observations.Observation` records and share
one trace builder (:func:`build_trace`), so the linking rules are the same everywhere.
"""

from __future__ import annotations

import json
import logging
import os
import secrets
import shutil
import ssl
import tempfile
import threading
import time
from abc import ABC, abstractmethod
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass, field, fields
from enum import Enum
from pathlib import Path
from typing import Any, ClassVar, TypeVar

from harness.admin_client import AdminClient
from harness.epoch import epoch_seconds
from harness.observations import Kind, Observation

log = logging.getLogger("fleetbench.observer")

#: Default time a trace waits for the step it is waiting for.
DEFAULT_TRACE_TIMEOUT_S = 15.0
#: Longest a wait blocks between two checks of its condition.
WAIT_SLICE_S = 2.0

T = TypeVar("T")


class StepKind(str, Enum):
    """The steps of a provisioning trace (values are stable names for reports)."""

    CONNECTED = "connected"
    CONNECT_FAILED = "connect_failed"
    CERTIFICATE_CREATED = "certificate_created"
    THING_REGISTERED = "thing_registered"
    REJECTED = "rejected"
    DISCONNECTED = "disconnected"
    RECONNECTED = "reconnected"


@dataclass(frozen=True)
class TraceStep:
    """One thing the endpoint saw of a device; ``timestamp`` is the endpoint's epoch seconds."""

    kind: ClassVar[StepKind]
    timestamp: float
    client_id: str | None
    certificate_id: str | None

    def to_dict(self) -> dict[str, Any]:
        """Plain values only (``step`` is the kind's name): records cross process boundaries
        (pytest-xdist), which carry no enums."""
        out: dict[str, Any] = {"step": self.kind.value}
        for f in fields(self):  # instance fields: the ``kind`` ClassVar is not one
            out[f.name] = getattr(self, f.name)
        return out

    def describe(self) -> str:
        extras = {k: v for k, v in self.to_dict().items()
                  if k not in ("step", "timestamp") and v is not None}
        text = " ".join(f"{k}={v}" for k, v in extras.items())
        return f"{self.kind.value} {text}".strip()


@dataclass(frozen=True)
class Connected(TraceStep):
    """CONNECT accepted with the claim certificate (``certificate_id`` is the claim's)."""

    kind: ClassVar[StepKind] = StepKind.CONNECTED


@dataclass(frozen=True)
class ConnectFailed(TraceStep):
    kind: ClassVar[StepKind] = StepKind.CONNECT_FAILED
    reason: str | None = None


@dataclass(frozen=True)
class CertificateCreated(TraceStep):
    """A certificate created for the device; ``api`` is None where the endpoint cannot tell."""

    kind: ClassVar[StepKind] = StepKind.CERTIFICATE_CREATED
    api: str | None = None


@dataclass(frozen=True)
class ThingRegistered(TraceStep):
    kind: ClassVar[StepKind] = StepKind.THING_REGISTERED
    thing_name: str | None = None
    template: str | None = None


@dataclass(frozen=True)
class Rejected(TraceStep):
    """A ``rejected`` answer (spec fleet-provisioning §1.5); emulator only."""

    kind: ClassVar[StepKind] = StepKind.REJECTED
    api: str | None = None
    status_code: int | None = None
    error_code: str | None = None
    error_message: str | None = None


@dataclass(frozen=True)
class Disconnected(TraceStep):
    """A connection of the device ended; ``reason`` is AWS's ``disconnectReason``."""

    kind: ClassVar[StepKind] = StepKind.DISCONNECTED
    reason: str | None = None


@dataclass(frozen=True)
class Reconnected(TraceStep):
    """CONNECT accepted with the certificate the device was given."""

    kind: ClassVar[StepKind] = StepKind.RECONNECTED


@dataclass(frozen=True)
class ProvisioningTrace:
    """What the endpoint saw of one device, oldest step first."""

    steps: tuple[TraceStep, ...]
    source: str
    client_id: str | None = None
    claim_certificate_id: str | None = None

    @property
    def kinds(self) -> tuple[StepKind, ...]:
        return tuple(step.kind for step in self.steps)

    def of(self, kind: StepKind) -> list[TraceStep]:
        return [step for step in self.steps if step.kind is kind]

    def first(self, kind: StepKind) -> TraceStep | None:
        found = self.of(kind)
        return found[0] if found else None

    def has(self, kind: StepKind) -> bool:
        return any(step.kind is kind for step in self.steps)

    @property
    def certificate_id(self) -> str | None:
        """The device's own certificate (the created one, else the one it reconnected with)."""
        step = self.first(StepKind.CERTIFICATE_CREATED) or self.first(StepKind.RECONNECTED)
        return step.certificate_id if step else None

    @property
    def thing_name(self) -> str | None:
        step = self.first(StepKind.THING_REGISTERED)
        return step.thing_name if isinstance(step, ThingRegistered) else None

    @property
    def rejections(self) -> list[Rejected]:
        return [step for step in self.steps if isinstance(step, Rejected)]

    @property
    def provisioned(self) -> bool:
        """Claim connect, certificate, thing and a reconnect with that certificate were all seen."""
        created = {s.certificate_id for s in self.of(StepKind.CERTIFICATE_CREATED)}
        return (self.has(StepKind.CONNECTED) and self.has(StepKind.THING_REGISTERED)
                and any(s.certificate_id in created for s in self.of(StepKind.RECONNECTED)))

    def assert_provisioned(self) -> None:
        """Raise AssertionError with the whole trace when the device was not provisioned."""
        if not self.provisioned:
            raise AssertionError(f"the endpoint did not see a complete provisioning:\n{self}")

    def to_dicts(self) -> list[dict[str, Any]]:
        return [step.to_dict() for step in self.steps]

    def __str__(self) -> str:
        head = f"trace ({self.source}) client_id={self.client_id} claim={self.claim_certificate_id}"
        if not self.steps:
            return head + "\n  (no steps)"
        start = self.steps[0].timestamp
        lines = [f"  +{step.timestamp - start:7.3f}s {step.describe()}" for step in self.steps]
        return "\n".join([head, *lines])


@dataclass(frozen=True)
class Mark:
    """A point in the endpoint's event stream: pass it as ``since`` to ignore what came before."""

    seq: int | None
    timestamp: float


Since = Mark | float | None
#: What :meth:`Observer.trace` waits for: a step kind, a test of the trace, or nothing.
Until = StepKind | Callable[[ProvisioningTrace], bool] | None


# --------------------------------------------------------------------------- building a trace


def _first(detail: Mapping[str, Any], *keys: str) -> Any:
    for key in keys:
        value = detail.get(key)
        if value is not None:
            return value
    return None


def _rejection(obs: Observation) -> Rejected | None:
    """A Rejected step when ``obs`` is an API response that was rejected."""
    d = obs.detail
    outcome = str(_first(d, "outcome", "result", "response") or "").lower()
    status = _first(d, "statusCode", "status_code", "status")
    accepted = d.get("accepted")
    rejected = (outcome == "rejected" or accepted is False
                or (isinstance(status, int) and status >= 400 and outcome != "accepted"))
    if not rejected:
        return None
    return Rejected(
        timestamp=obs.timestamp, client_id=obs.client_id, certificate_id=obs.certificate_id,
        api=_first(d, "api", "operation"),
        status_code=int(status) if isinstance(status, (int, str)) and str(status).isdigit()
        else None,
        error_code=_first(d, "errorCode", "error_code"),
        error_message=_first(d, "errorMessage", "error_message"),
    )


def build_trace(observations: Iterable[Observation], *, client_id: str | None = None,
                certificate_id: str | None = None, source: str = "emulator") -> ProvisioningTrace:
    """Follow one device through the observations.

    The device is its claim connection: a CONNECT by ``client_id`` and/or with the claim
    ``certificate_id`` (both must match when both are given; with a claim shared by many
    devices, give the client id). Certificates created on a claim connection are the
    device's; a CONNECT with one of them is its reconnection, whatever its client id.
    """
    if client_id is None and certificate_id is None:
        raise ValueError("a trace needs a client_id or a certificate_id")
    claim = certificate_id
    claim_clients: set[str] = set()
    device_clients: set[str] = set()
    new_certs: set[str] = set()
    steps: list[TraceStep] = []

    def is_claim_connect(o: Observation) -> bool:
        return ((client_id is None or o.client_id == client_id)
                and (certificate_id is None or o.certificate_id == certificate_id))

    for o in sorted(observations, key=lambda o: (o.seq, o.timestamp)):
        at = (o.timestamp, o.client_id, o.certificate_id)
        if o.kind == Kind.CONNECT.value:
            if o.certificate_id is not None and o.certificate_id in new_certs:
                device_clients.add(o.client_id or "")
                steps.append(Reconnected(*at))
            elif is_claim_connect(o):
                claim = claim or o.certificate_id
                claim_clients.add(o.client_id or "")
                steps.append(Connected(*at))
        elif o.kind == Kind.CONNECT_FAILED.value:
            if is_claim_connect(o) or o.client_id in device_clients or (
                    o.certificate_id is not None and o.certificate_id in new_certs):
                steps.append(ConnectFailed(*at, reason=_first(o.detail, "reason")))
        elif o.kind == Kind.DISCONNECT.value:
            on_claim = o.client_id in claim_clients and o.certificate_id in (None, claim)
            if on_claim or (o.certificate_id is not None and o.certificate_id in new_certs):
                steps.append(Disconnected(*at, reason=_first(
                    o.detail, "reason", "disconnectReason")))
        elif o.kind == Kind.CERTIFICATE_CREATED.value:
            if o.client_id in claim_clients and o.certificate_id:
                new_certs.add(o.certificate_id)
                steps.append(CertificateCreated(*at, api=_first(o.detail, "api")))
        elif o.kind == Kind.THING_REGISTERED.value:
            if o.client_id in claim_clients or o.certificate_id in new_certs:
                steps.append(ThingRegistered(
                    *at, thing_name=_first(o.detail, "thingName", "thing_name", "thing"),
                    template=_first(o.detail, "template", "templateName", "template_name")))
        elif o.kind == Kind.API_RESPONSE.value and (
                o.client_id in claim_clients or o.client_id in device_clients):
            rejected = _rejection(o)
            if rejected is not None:
                steps.append(rejected)
    return ProvisioningTrace(tuple(steps), source, client_id, claim)


# --------------------------------------------------------------------------- observers


def _finished(until: Until) -> Callable[[ProvisioningTrace], bool]:
    """``trace(until=...)`` as a test of the trace."""
    if until is None:
        return lambda _trace: True
    if isinstance(until, StepKind):
        kind = until
        return lambda trace: trace.has(kind)
    return until


class Observer(ABC):
    """One interface over the emulator's log and AWS's lifecycle events."""

    source: ClassVar[str]

    @abstractmethod
    def mark(self) -> Mark:
        """The current position; events before it are ignored by ``since=mark``."""

    @abstractmethod
    def events(self, *, client_id: str | None = None, certificate_id: str | None = None,
               since: Since = None) -> list[Observation]:
        """What the endpoint saw, oldest first, filtered like the admin API."""

    @abstractmethod
    def _collect(self, client_id: str | None, certificate_id: str | None,
                 since: Since) -> list[Observation]:
        """Every observation that may belong to the device (a superset is fine)."""

    @abstractmethod
    def _wait_for_more(self, timeout: float) -> None:
        """Block until something new may have been observed, or ``timeout``."""

    def _poll(self, read: Callable[[], T], done: Callable[[T], bool], timeout: float) -> T:
        """``read()`` again whenever the endpoint may have seen more, until ``done`` or
        ``timeout``; its last value either way."""
        deadline = time.monotonic() + timeout
        while True:
            value = read()
            remaining = deadline - time.monotonic()
            if done(value) or remaining <= 0:
                return value
            # Capped: a check may also depend on what no event announces (the registry).
            self._wait_for_more(min(remaining, WAIT_SLICE_S))

    def wait_for(self, check: Callable[[], T],
                 timeout: float = DEFAULT_TRACE_TIMEOUT_S) -> T:
        """``check()``'s first truthy value, asked again each time the endpoint observes
        something new; its last (falsy) value after ``timeout``.

        Never raises for a timeout: the caller asserts on what it gets. ``check`` reads
        the endpoint itself (``observer.events(...)``, ``observer.trace(..., until=None)``).
        """
        return self._poll(check, bool, timeout)

    def trace(self, client_id: str | None = None, certificate_id: str | None = None,
              since: Since = None, timeout: float = DEFAULT_TRACE_TIMEOUT_S,
              until: Until = StepKind.RECONNECTED) -> ProvisioningTrace:
        """The device's provisioning trace, once ``until`` holds or after ``timeout``.

        ``until`` is a step kind the trace must show, or a test of the whole trace
        (``lambda t: len(t.of(StepKind.RECONNECTED)) >= 2``). Never raises for an
        incomplete trace: the scenario asserts on what it gets. ``until=None`` returns at
        once; ``until=StepKind.REJECTED`` suits negative flows.
        """
        return self._poll(
            lambda: build_trace(self._collect(client_id, certificate_id, since),
                                client_id=client_id, certificate_id=certificate_id,
                                source=self.source),
            _finished(until), timeout)

    def close(self) -> None:  # noqa: B027 - most observers hold nothing
        """Release what the observer holds (connections, credentials)."""

    def __enter__(self) -> Observer:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def _since_seq(since: Since) -> int | None:
    return since.seq if isinstance(since, Mark) else None


def _since_time(since: Since) -> float | None:
    if isinstance(since, Mark):
        return since.timestamp
    return float(since) if since is not None else None


class EmulatorObserver(Observer):
    """The emulator's observation log, read through the admin API (any emulator process)."""

    source: ClassVar[str] = "emulator"
    #: Observation kind no record uses: asks the admin API for its position only.
    _NOTHING = "_fleetbench_mark"

    def __init__(self, admin: AdminClient) -> None:
        self.admin = admin
        self._last_seq = 0

    def mark(self) -> Mark:
        page = self.admin.events_page(kinds=[self._NOTHING])
        return Mark(page.last_seq, self.admin.clock().now)

    def events(self, *, client_id: str | None = None, certificate_id: str | None = None,
               since: Since = None) -> list[Observation]:
        page = self.admin.events_page(client_id=client_id, certificate_id=certificate_id,
                                      since=_since_seq(since))
        self._last_seq = max(self._last_seq, page.last_seq)
        after = _since_time(since) if not isinstance(since, Mark) else None
        return [o for o in page.events if after is None or o.timestamp >= after]

    def _collect(self, client_id: str | None, certificate_id: str | None,
                 since: Since) -> list[Observation]:
        # Follow the links with filtered queries rather than reading the whole log: claim
        # connection -> its client ids -> certificates created there -> their connections.
        found: dict[int, Observation] = {}
        queried: set[tuple[str, str]] = set()
        todo: list[tuple[str, str]] = []
        if client_id is not None:
            todo.append(("client", client_id))
        if certificate_id is not None:
            todo.append(("cert", certificate_id))
        while todo:
            key = todo.pop()
            if key in queried:
                continue
            queried.add(key)
            by, value = key
            batch = (self.events(client_id=value, since=since) if by == "client"
                     else self.events(certificate_id=value, since=since))
            for o in batch:
                found[o.seq] = o
                if o.kind == Kind.CONNECT.value and o.client_id and by == "cert":
                    todo.append(("client", o.client_id))
                if o.kind == Kind.CERTIFICATE_CREATED.value and o.certificate_id:
                    todo.append(("cert", o.certificate_id))
        return list(found.values())

    def _wait_for_more(self, timeout: float) -> None:
        page = self.admin.events_page(since=self._last_seq, wait=max(0.05, min(timeout, 30.0)),
                                      limit=1)
        self._last_seq = max(self._last_seq, page.last_seq)


# --------------------------------------------------------------------------- AWS


PRESENCE_FILTER = "$aws/events/presence/#"
#: Lifecycle event timestamps are approximate (spec broker §4.2); creation times are
#: compared with them allowing this much skew.
EVENT_SKEW_S = 30.0
#: How long a new observer certificate may take to be usable on AWS (policy propagation).
OBSERVER_CONNECT_TIMEOUT_S = 30.0


def observer_policy_document(region: str, account_id: str, client_id: str) -> dict[str, Any]:
    """Connect as ``client_id``; subscribe to and receive presence events, nothing else."""
    arn = f"arn:aws:iot:{region}:{account_id}:"
    return {
        "Version": "2012-10-17",
        "Statement": [
            {"Effect": "Allow", "Action": "iot:Connect", "Resource": f"{arn}client/{client_id}"},
            {"Effect": "Allow", "Action": "iot:Subscribe",
             "Resource": f"{arn}topicfilter/$aws/events/presence/*"},
            {"Effect": "Allow", "Action": "iot:Receive",
             "Resource": f"{arn}topic/$aws/events/presence/*"},
        ],
    }


def presence_observation(seq: int, payload: Mapping[str, Any]) -> Observation | None:
    """A lifecycle presence event (spec broker §4.2) as an Observation; None if it is not one."""
    kinds = {"connected": Kind.CONNECT, "disconnected": Kind.DISCONNECT,
             "connect_failed": Kind.CONNECT_FAILED}
    kind = kinds.get(str(payload.get("eventType")))
    if kind is None:
        return None
    detail: dict[str, Any] = {}
    if kind is Kind.DISCONNECT:
        detail["reason"] = payload.get("disconnectReason")
        detail["clientInitiatedDisconnect"] = payload.get("clientInitiatedDisconnect")
    elif kind is Kind.CONNECT_FAILED:
        detail["reason"] = payload.get("connectFailureReason")
    if "versionNumber" in payload:
        detail["versionNumber"] = payload["versionNumber"]
    timestamp = payload.get("timestamp")
    return Observation(
        seq=seq,
        timestamp=float(timestamp) / 1000.0 if isinstance(timestamp, (int, float)) else time.time(),
        kind=kind.value,
        client_id=payload.get("clientId"),
        certificate_id=payload.get("principalIdentifier"),
        detail=detail,
    )


@dataclass
class _Credentials:
    certificate_id: str
    certificate_arn: str
    policy_name: str
    directory: Path
    cert_path: Path = field(init=False)
    key_path: Path = field(init=False)

    def __post_init__(self) -> None:
        self.cert_path = self.directory / "observer.pem"
        self.key_path = self.directory / "observer.key"


class AwsObserver(Observer):
    """Lifecycle events over MQTT plus registry reads: the observer for a real account.

    :meth:`start` creates a certificate and a policy named ``<prefix>-observer`` that only
    allows receiving presence events; :meth:`close` deletes both (``cleanup_prefix``
    removes them after a crash). Events that arrive while the observer is disconnected
    are lost, as they would be for any subscriber (AWS keeps no backlog for QoS 0).
    """

    source: ClassVar[str] = "aws"

    def __init__(self, iot: Any, credentials: _Credentials, client: Any, *,
                 owns_directory: bool) -> None:
        self._iot = iot
        self._credentials = credentials
        self._client = client
        self._owns_directory = owns_directory
        self._events: list[Observation] = []
        self._cond = threading.Condition()
        self._seq = 0
        self._waited_seq = 0
        self._closed = False
        self._cert_cache: dict[str, tuple[float | None, tuple[str, ...]]] = {}

    # -- lifecycle -----------------------------------------------------------------------------
    @classmethod
    def start(cls, iot: Any, *, host: str, port: int, ca_file: Path, region: str,
              account_id: str, prefix: str, workdir: Path | None = None,
              connect_timeout: float = OBSERVER_CONNECT_TIMEOUT_S) -> AwsObserver:
        """Create the observer's credentials, connect to ``host`` and subscribe to presence events.

        ``host`` is also the TLS server name (on AWS they are the same ATS host name).
        """
        owns = workdir is None
        directory = Path(tempfile.mkdtemp(prefix="fleetbench-observer-")) if workdir is None \
            else Path(workdir)
        directory.mkdir(parents=True, exist_ok=True)
        client_id = f"{prefix}-observer-{secrets.token_hex(3)}"
        policy_name = f"{prefix}-observer"
        creds: _Credentials | None = None
        try:
            creds = cls._create_credentials(iot, directory, policy_name,
                                            observer_policy_document(region, account_id,
                                                                     client_id))
            observer = cls(iot, creds, None, owns_directory=owns)
            observer._client = observer._connect(host, port, ca_file, client_id, connect_timeout)
            log.info("event=observer_started client_id=%s cert=%s", client_id,
                     creds.certificate_id)
            return observer
        except BaseException:
            if creds is not None:
                _delete_credentials(iot, creds)
            if owns:
                shutil.rmtree(directory, ignore_errors=True)
            raise

    @staticmethod
    def _create_credentials(iot: Any, directory: Path, policy_name: str,
                            document: Mapping[str, Any]) -> _Credentials:
        from harness.pki import write_public, write_secret

        try:
            iot.create_policy(policyName=policy_name, policyDocument=json.dumps(document))
        except iot.exceptions.ResourceAlreadyExistsException:
            # Another worker of the same run made it; make its default version ours.
            iot.create_policy_version(policyName=policy_name,
                                      policyDocument=json.dumps(document), setAsDefault=True)
        made = iot.create_keys_and_certificate(setAsActive=True)
        creds = _Credentials(made["certificateId"], made["certificateArn"], policy_name, directory)
        write_public(creds.cert_path, made["certificatePem"])
        write_secret(creds.key_path, made["keyPair"]["PrivateKey"])
        iot.attach_policy(policyName=policy_name, target=creds.certificate_arn)
        return creds

    def _connect(self, host: str, port: int, ca_file: Path, client_id: str,
                 timeout: float) -> Any:
        import paho.mqtt.client as mqtt
        from paho.mqtt.enums import CallbackAPIVersion

        context = ssl.create_default_context(cafile=str(ca_file))
        context.load_cert_chain(str(self._credentials.cert_path),
                                str(self._credentials.key_path))
        subscribed = threading.Event()
        deadline = time.monotonic() + timeout
        delay = 0.5
        while True:
            client = mqtt.Client(CallbackAPIVersion.VERSION2, client_id=client_id,
                                 protocol=mqtt.MQTTv311, clean_session=True)
            client.tls_set_context(context)
            client.on_connect = lambda c, _u, _f, rc, _p: (
                c.subscribe(PRESENCE_FILTER, qos=1) if not rc.is_failure else None)
            client.on_subscribe = lambda _c, _u, _m, codes, _p: (
                subscribed.set() if codes and not codes[0].is_failure else None)
            client.on_message = lambda _c, _u, msg: self._on_message(msg.payload)
            try:
                client.connect(host, port, keepalive=60)
                client.loop_start()
                if subscribed.wait(min(5.0, max(0.1, deadline - time.monotonic()))):
                    return client
            except OSError as exc:
                log.info("event=observer_connect_retry error=%s", type(exc).__name__)
            client.loop_stop()
            client.disconnect()
            if time.monotonic() + delay >= deadline:
                raise TimeoutError("the observer could not subscribe to presence events "
                                   f"within {timeout:.0f} s")
            time.sleep(delay)  # new credentials propagate on AWS; nothing to wait on
            delay = min(delay * 2, 5.0)

    def _on_message(self, payload: bytes | bytearray) -> None:
        try:
            data = json.loads(payload)
        except ValueError:
            return
        with self._cond:
            self._seq += 1
            obs = presence_observation(self._seq, data)
            if obs is not None:
                self._events.append(obs)
                self._cond.notify_all()

    def close(self) -> None:
        if self._closed:
            return
        self._closed = True
        if self._client is not None:
            self._client.disconnect()
            self._client.loop_stop()
        _delete_credentials(self._iot, self._credentials)
        if self._owns_directory:
            shutil.rmtree(self._credentials.directory, ignore_errors=True)

    # -- Observer ------------------------------------------------------------------------------
    def mark(self) -> Mark:
        with self._cond:
            return Mark(self._seq, time.time())

    def events(self, *, client_id: str | None = None, certificate_id: str | None = None,
               since: Since = None) -> list[Observation]:
        seq, after = _since_seq(since), _since_time(since) if not isinstance(since, Mark) \
            else None
        with self._cond:
            events = list(self._events)
        return [o for o in events
                if (client_id is None or o.client_id == client_id)
                and (certificate_id is None or o.certificate_id == certificate_id)
                and (seq is None or o.seq > seq) and (after is None or o.timestamp >= after)]

    def _wait_for_more(self, timeout: float) -> None:
        # Wait for an event newer than the last wait saw: one that came while the caller
        # was checking ends the wait at once instead of being slept through.
        with self._cond:
            seen = self._waited_seq
            self._cond.wait_for(lambda: self._seq != seen, timeout=min(timeout, WAIT_SLICE_S))
            self._waited_seq = self._seq

    def _certificate_facts(self, certificate_id: str) -> tuple[float | None, tuple[str, ...]]:
        """(creation time, names of attached things) from the registry, cached once a thing is."""
        cached = self._cert_cache.get(certificate_id)
        if cached is not None and cached[1]:
            return cached
        try:
            desc = self._iot.describe_certificate(certificateId=certificate_id)
            description = desc["certificateDescription"]
            arn = description["certificateArn"]
            things = tuple(self._iot.list_principal_things(principal=arn).get("things", []))
            facts = (epoch_seconds(description.get("creationDate")), things)
        except self._iot.exceptions.ResourceNotFoundException:
            facts = (None, ())
        self._cert_cache[certificate_id] = facts
        return facts

    def _collect(self, client_id: str | None, certificate_id: str | None,
                 since: Since) -> list[Observation]:
        events = self.events(since=since)
        claim_connects = [o for o in events if o.kind == Kind.CONNECT.value
                          and (client_id is None or o.client_id == client_id)
                          and (certificate_id is None or o.certificate_id == certificate_id)]
        if not claim_connects:
            return events
        claim = claim_connects[0]
        claim_end = next((o.timestamp for o in events if o.kind == Kind.DISCONNECT.value
                          and o.client_id == claim.client_id
                          and o.certificate_id == claim.certificate_id
                          and o.seq > claim.seq), None)
        synthesized: list[Observation] = []
        linked: set[str] = set()
        for o in events:
            cert = o.certificate_id
            if (o.kind != Kind.CONNECT.value or o.seq <= claim.seq or not cert
                    or cert == claim.certificate_id or cert in linked):
                continue
            created, things = self._certificate_facts(cert)
            if created is None or not things:
                continue
            made_during_claim = created >= claim.timestamp - EVENT_SKEW_S and (
                claim_end is None or created <= claim_end + EVENT_SKEW_S)
            same_device = o.client_id == claim.client_id or o.client_id in things
            if not (made_during_claim and same_device):
                continue
            linked.add(cert)
            synthesized.append(Observation(seq=0, timestamp=created,
                                           kind=Kind.CERTIFICATE_CREATED.value,
                                           client_id=claim.client_id, certificate_id=cert,
                                           detail={"api": None}))
            synthesized.append(Observation(seq=0, timestamp=created,
                                           kind=Kind.THING_REGISTERED.value,
                                           client_id=claim.client_id, certificate_id=cert,
                                           detail={"thingName": things[0]}))
        merged = sorted([*events, *synthesized],
                        key=lambda o: (o.timestamp, 0 if o.seq == 0 else 1, o.seq))
        return [Observation(seq=i + 1, timestamp=o.timestamp, kind=o.kind, client_id=o.client_id,
                            certificate_id=o.certificate_id, detail=o.detail)
                for i, o in enumerate(merged)]


def _delete_credentials(iot: Any, creds: _Credentials) -> None:
    """Detach, deactivate and delete the observer certificate, then its policy if unused.

    Best effort: a run's teardown may have removed them already (they carry the run
    prefix), and ``fleetbench cleanup`` reports anything left.
    """
    from harness.teardown import Teardown

    teardown = Teardown(iot, creds.policy_name, retry_timeout=5.0)
    teardown.certificate(creds.certificate_id)
    try:
        unused = not iot.list_targets_for_policy(policyName=creds.policy_name).get("targets")
    except Exception:  # already deleted (ResourceNotFound) or unreadable: leave it
        unused = False
    if unused:  # another observer of the same run may still use it otherwise
        teardown.policy(creds.policy_name, delete_certificates=False)
    for leftover in teardown.report().leftovers:
        log.warning("event=observer_cleanup_failed %s", leftover)
    for path in (creds.key_path, creds.cert_path):
        try:
            os.remove(path)
        except OSError:
            pass
