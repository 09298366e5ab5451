"""Test helpers for the emulated broker: a broker on port 0, devices, and MQTT clients.

Reusable by any test that needs MQTT over mutual TLS against the emulator:

* :class:`MemoryDirectory` — a tiny in-memory ``DeviceDirectory`` (certificates,
  statuses, policies, things) that fires registry-style events;
* :class:`BrokerKit` — a throwaway CA, a server certificate and a :class:`Broker`
  running on its own (uv)loop thread, bound to 127.0.0.1 port 0;
  ``kit.device("name", policy=...)`` issues and registers a device certificate;
  :func:`kit_fixture` makes a test module's ``kit`` fixture;
* clients: :class:`RawClient` (our codec over a TLS socket: exact packets,
  malformed bytes, slow senders), :class:`PahoClient` (paho-mqtt 2, 3.1.1 and 5,
  TCP_NODELAY), :func:`mosquitto_args` / :func:`mosquitto_pub` for the command-line
  clients, and :func:`crt_connection` / :func:`crt_mqtt5_client` for the AWS IoT
  Device SDK v2.

Everything waits with timeouts; nothing sleeps to let something happen.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import functools
import json
import queue
import shutil
import socket
import ssl
import subprocess
import threading
import time
from collections.abc import Callable, Coroutine, Iterable, Iterator, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, TypeVar

import pytest
from cryptography import x509

from harness import pki
from harness.clock import Clock
from harness.emulator.broker_settings import BrokerSettings
from harness.emulator.mqtt.codec import Decoder, encode
from harness.emulator.mqtt.packets import MQTT_5, Connack, Connect, Packet, Will
from harness.emulator.mqtt.server import Broker
from harness.observations import Observation, ObservationLog

T = TypeVar("T")

HOST = "127.0.0.1"
SERVER_NAME = "localhost"  # in the server certificate, for clients that verify the host name
ALLOW_ALL = json.dumps({"Version": "2012-10-17", "Statement": [
    {"Effect": "Allow", "Action": "iot:*", "Resource": "*"}]})


def policy(*statements: Mapping[str, Any]) -> str:
    """An IoT policy document from statements (``allow(...)`` / ``deny(...)``)."""
    return json.dumps({"Version": "2012-10-17", "Statement": list(statements)})


def allow(actions: str | Iterable[str], resources: str | Iterable[str]) -> dict[str, Any]:
    return {"Effect": "Allow", "Action": _listed(actions), "Resource": _listed(resources)}


def deny(actions: str | Iterable[str], resources: str | Iterable[str]) -> dict[str, Any]:
    return {"Effect": "Deny", "Action": _listed(actions), "Resource": _listed(resources)}


def _listed(value: str | Iterable[str]) -> str | list[str]:
    return value if isinstance(value, str) else list(value)


def arn(kind: str, name: str, region: str = "us-east-1", account: str = "123456789012") -> str:
    return f"arn:aws:iot:{region}:{account}:{kind}/{name}"


# -- an in-memory DeviceDirectory -----------------------------------------------------------------

@dataclass(frozen=True)
class MemCertificate:
    certificate_id: str
    certificate_pem: str
    status: str = "ACTIVE"
    certificate_mode: str = "DEFAULT"
    ca_certificate_id: str | None = None


@dataclass(frozen=True)
class MemThing:
    thing_name: str
    thing_type_name: str | None = None
    attributes: Mapping[str, str] = field(default_factory=dict)


@dataclass(frozen=True)
class MemView:
    certificate: MemCertificate
    thing: MemThing | None
    is_attached: bool
    exclusive: bool
    policy_documents: tuple[str, ...]


@dataclass(frozen=True)
class MemEvent:
    kind: str
    certificate_id: str | None = None
    status: str | None = None
    thing_name: str | None = None


class MemoryDirectory:
    """What the broker reads of the registry, held in dicts; mutations fire events the way
    the real registry does (synchronously, in the caller's thread)."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self.certificates: dict[str, MemCertificate] = {}
        self.policies: dict[str, list[str]] = {}  # certificate id -> documents
        self.things: dict[str, tuple[MemThing, bool]] = {}  # certificate id -> (thing, exclusive)
        self.anchors: list[str] = []
        self._listeners: list[Callable[[Any], None]] = []

    # the DeviceDirectory protocol
    def get_certificate(self, certificate_id: str) -> MemCertificate | None:
        return self.certificates.get(certificate_id)

    def connection_view(self, certificate_id: str, client_id: str) -> MemView:
        cert = self.certificates[certificate_id]
        thing, exclusive = self.things.get(certificate_id, (None, False))
        if thing is not None and not exclusive and thing.thing_name != client_id:
            thing = None  # spec §3.4: non-exclusive association needs client id = thing name
        return MemView(cert, thing, thing is not None, exclusive and thing is not None,
                       tuple(self.policies.get(certificate_id, ())))

    def add_listener(self, fn: Callable[[Any], None]) -> None:
        self._listeners.append(fn)

    def trust_anchors_pem(self) -> list[str]:
        return list(self.anchors)

    # mutations used by tests
    def _fire(self, event: MemEvent) -> None:
        for fn in list(self._listeners):
            fn(event)

    def register(self, certificate_pem: str, *, status: str = "ACTIVE", mode: str = "DEFAULT",
                 policies: Iterable[str] = ()) -> MemCertificate:
        cert = MemCertificate(pki.certificate_id(certificate_pem), certificate_pem, status, mode)
        with self._lock:
            self.certificates[cert.certificate_id] = cert
            self.policies[cert.certificate_id] = list(policies)
        return cert

    def set_status(self, certificate_id: str, status: str) -> None:
        with self._lock:
            cert = self.certificates[certificate_id]
            self.certificates[certificate_id] = MemCertificate(
                cert.certificate_id, cert.certificate_pem, status, cert.certificate_mode,
                cert.ca_certificate_id)
        self._fire(MemEvent("certificate_status", certificate_id, status))

    def delete(self, certificate_id: str) -> None:
        with self._lock:
            self.certificates.pop(certificate_id, None)
            self.policies.pop(certificate_id, None)
        self._fire(MemEvent("certificate_deleted", certificate_id))

    def set_policies(self, certificate_id: str, documents: Iterable[str]) -> None:
        with self._lock:
            self.policies[certificate_id] = list(documents)
        self._fire(MemEvent("policies_changed", certificate_id))

    def attach_thing(self, certificate_id: str, thing: MemThing, *,
                     exclusive: bool = False) -> None:
        with self._lock:
            self.things[certificate_id] = (thing, exclusive)
        self._fire(MemEvent("policies_changed", certificate_id, thing_name=thing.thing_name))

    def reset(self) -> None:
        """Empty the account, as the registry's admin reset does."""
        with self._lock:
            self.certificates.clear()
            self.policies.clear()
            self.things.clear()
            self.anchors.clear()
        self._fire(MemEvent("reset"))

    def add_trust_anchor(self, pem: str) -> None:
        with self._lock:
            self.anchors.append(pem)
        self._fire(MemEvent("trust_changed"))


# -- devices --------------------------------------------------------------------------------------

@dataclass(frozen=True)
class Device:
    """A device identity on disk: certificate, key (0600) and the CA that signed the server."""

    name: str
    certificate: x509.Certificate
    certificate_id: str
    cert_file: Path
    key_file: Path
    ca_file: Path

    @property
    def certificate_pem(self) -> str:
        return pki.certificate_pem(self.certificate)


def write_device(directory: Path, name: str, key: pki.PrivateKey, cert: x509.Certificate,
                 ca_file: Path) -> Device:
    directory.mkdir(parents=True, exist_ok=True)
    cert_file, key_file = directory / f"{name}.pem", directory / f"{name}.key"
    pki.write_public(cert_file, pki.certificate_pem(cert))
    pki.write_secret(key_file, pki.private_key_pem(key, pkcs1=False))
    return Device(name, cert, pki.certificate_id(cert), cert_file, key_file, ca_file)


# -- the broker on a loop thread ------------------------------------------------------------------

class LoopThread:
    """An event loop (uvloop when installed) running in a daemon thread."""

    def __init__(self) -> None:
        self.loop: asyncio.AbstractEventLoop
        try:
            import uvloop

            self.loop = uvloop.new_event_loop()
        except ImportError:  # pragma: no cover - uvloop is a dependency
            self.loop = asyncio.new_event_loop()
        self._thread = threading.Thread(target=self._run, name="brokerkit-loop", daemon=True)
        self._thread.start()

    def _run(self) -> None:
        asyncio.set_event_loop(self.loop)
        self.loop.run_forever()

    def run(self, coro: Coroutine[Any, Any, T], timeout: float = 10.0) -> T:
        """Run a coroutine on the loop and wait for its result."""
        return asyncio.run_coroutine_threadsafe(coro, self.loop).result(timeout)

    def call(self, fn: Callable[..., T], *args: Any, timeout: float = 10.0) -> T:
        """Call ``fn(*args)`` on the loop thread and wait for its result."""
        future: concurrent.futures.Future[T] = concurrent.futures.Future()

        def run() -> None:
            try:
                future.set_result(fn(*args))
            except BaseException as exc:  # handed back to the caller
                future.set_exception(exc)

        self.loop.call_soon_threadsafe(run)
        return future.result(timeout)

    def close(self) -> None:
        self.loop.call_soon_threadsafe(self.loop.stop)
        self._thread.join(10)
        self.loop.close()


class BrokerKit:
    """A started :class:`Broker` with a throwaway CA, on 127.0.0.1 port 0.

    Use as a context manager (or ``start()``/``stop()``). ``kit.settings`` are the
    broker's; pass ``BrokerSettings`` overrides as keyword arguments.
    """

    def __init__(self, workdir: Path, settings: BrokerSettings | None = None,
                 **overrides: Any) -> None:
        self.workdir = Path(workdir)
        self.settings = (settings or BrokerSettings()).replace(**overrides) if overrides \
            else (settings or BrokerSettings())
        self.clock = Clock()
        self.observations = ObservationLog(self.clock)
        self.ca = _kit_ca()
        self.ca_file = self.workdir / "ca.pem"
        pki.write_public(self.ca_file, self.ca.pem)
        self.server_key = pki.generate_ec_key()
        self.server_cert = self.ca.issue_server_certificate(self.server_key,
                                                            [SERVER_NAME, HOST])
        self.directory = MemoryDirectory()
        self.broker = Broker(directory=self.directory, ca=self.ca, server_key=self.server_key,
                             server_cert=self.server_cert, clock=self.clock,
                             observations=self.observations, settings=self.settings)
        self.loop: LoopThread | None = None
        self.port = 0

    def start(self) -> BrokerKit:
        self.loop = LoopThread()
        self.port = self.loop.run(self.broker.start(HOST, 0))
        return self

    def stop(self) -> None:
        if self.loop is not None:
            self.loop.run(self.broker.stop(), timeout=15)
            self.loop.close()
            self.loop = None

    def __enter__(self) -> BrokerKit:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()

    def run(self, coro: Coroutine[Any, Any, T], timeout: float = 10.0) -> T:
        assert self.loop is not None
        return self.loop.run(coro, timeout)

    def call(self, fn: Callable[..., T], *args: Any, timeout: float = 10.0) -> T:
        assert self.loop is not None
        return self.loop.call(fn, *args, timeout=timeout)

    def device(self, name: str, *, policies: Iterable[str] = (ALLOW_ALL,),
               status: str | None = "ACTIVE", mode: str = "DEFAULT",
               ca: pki.CertificateAuthority | None = None) -> Device:
        """Issue a device certificate (EC P-256) and register it with ``policies``;
        ``status=None`` leaves it unregistered."""
        key = pki.generate_ec_key()
        cert = (ca or self.ca).issue_device_certificate(key.public_key())
        device = write_device(self.workdir / "devices", name, key, cert, self.ca_file)
        if status is not None:
            self.directory.register(device.certificate_pem, status=status, mode=mode,
                                    policies=policies)
        return device

    def wait_for(self, kind: str, *, timeout: float = 5.0, client_id: str | None = None,
                 since: int | None = None, where: Callable[[Observation], bool] | None = None
                 ) -> Observation:
        """The first observation of ``kind`` (matching ``where``) recorded after ``since``."""
        deadline = time.monotonic() + timeout
        while True:
            found = [o for o in self.observations.query(kinds=[kind], client_id=client_id,
                                                        since=since)
                     if where is None or where(o)]
            if found:
                return found[0]
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                raise AssertionError(f"no {kind} observation within {timeout} s "
                                     f"(client_id={client_id})")
            self.observations.wait_sync(timeout=min(remaining, 0.2), kinds=[kind],
                                        since=self.observations.last_seq)

    def client(self, device: Device, **kwargs: Any) -> RawClient:
        return RawClient(HOST, self.port, device, **kwargs)


def kit_fixture(**overrides: Any) -> Any:
    """The function-scoped ``kit`` fixture: a started :class:`BrokerKit` in the test's
    ``tmp_path``, with ``overrides`` for its :class:`BrokerSettings`. In a test module:
    ``kit = kit_fixture()``."""

    @pytest.fixture(name="kit")
    def _kit(tmp_path: Path) -> Iterator[BrokerKit]:
        with BrokerKit(tmp_path, **overrides) as kit:
            yield kit

    return _kit


@functools.lru_cache(maxsize=1)
def _kit_ca() -> pki.CertificateAuthority:
    """One throwaway CA per test process (each kit still has its own server certificate)."""
    return pki.CertificateAuthority.create("brokerkit test CA")


# -- a raw client: our codec over a TLS socket ----------------------------------------------------

class RawClient:
    """An MQTT client that sends exactly the packets (or bytes) a test wants.

    ``recv()`` returns the next packet, ``None`` once the server closed the
    connection, and raises ``TimeoutError`` when nothing came in time.
    """

    def __init__(self, host: str, port: int, device: Device, *, sni: str | None = None,
                 alpn: list[str] | None = None, timeout: float = 5.0,
                 protocol_level: int = 4) -> None:
        ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
        ctx.check_hostname = False
        ctx.load_verify_locations(device.ca_file)
        ctx.load_cert_chain(device.cert_file, device.key_file)
        if alpn:
            ctx.set_alpn_protocols(alpn)
        raw = socket.create_connection((host, port), timeout=timeout)
        raw.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        self.sock = ctx.wrap_socket(raw, server_hostname=sni)
        self.sock.settimeout(timeout)
        self.timeout = timeout
        self.protocol_level = protocol_level
        self.decoder = Decoder(1 << 24, protocol_level=protocol_level)
        self._ready: list[Packet] = []
        self.eof = False

    def try_connect(self, client_id: str, *, protocol_level: int | None = None,
                    clean_start: bool = True, keep_alive: int = 60, will: Will | None = None,
                    properties: dict[str, Any] | None = None) -> Connack | None:
        """Send CONNECT; the CONNACK, or None if the server closed without one."""
        if protocol_level is not None:
            self.protocol_level = protocol_level
            self.decoder = Decoder(1 << 24, protocol_level=protocol_level)
        self.send(Connect(self.protocol_level, client_id, clean_start, keep_alive, will=will,
                          properties=properties or {}))
        packet = self.recv()
        if packet is None:
            return None
        assert isinstance(packet, Connack), packet
        return packet

    def connect(self, client_id: str, **kwargs: Any) -> Connack:
        """Like :meth:`try_connect` but a missing CONNACK is an ``AssertionError``."""
        connack = self.try_connect(client_id, **kwargs)
        assert connack is not None, f"{client_id}: closed without CONNACK"
        return connack

    def send(self, packet: Packet) -> None:
        self.send_bytes(encode(packet, self.protocol_level))

    def send_bytes(self, data: bytes) -> None:
        self.sock.sendall(data)

    def recv(self, timeout: float | None = None) -> Packet | None:
        deadline = time.monotonic() + (self.timeout if timeout is None else timeout)
        while not self._ready:
            if self.eof:
                return None
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                raise TimeoutError("no packet from the server")
            self.sock.settimeout(remaining)
            try:
                data = self.sock.recv(65536)
            except TimeoutError:
                raise TimeoutError("no packet from the server") from None
            except (ConnectionError, ssl.SSLError, OSError):
                data = b""
            if not data:
                self.eof = True
                continue
            self._ready.extend(self.decoder.feed(data))
        return self._ready.pop(0)

    def recv_until(self, kind: type[T], timeout: float | None = None) -> T:
        """Skip other packets until one of ``kind`` arrives."""
        deadline = time.monotonic() + (self.timeout if timeout is None else timeout)
        while True:
            packet = self.recv(max(0.01, deadline - time.monotonic()))
            if packet is None:
                raise ConnectionError(f"closed before a {kind.__name__}")
            if isinstance(packet, kind):
                return packet

    def closed(self, timeout: float | None = None) -> bool:
        """Whether the server closes the connection (other packets are discarded)."""
        try:
            while self.recv(timeout) is not None:
                pass
        except TimeoutError:
            return False
        return True

    def close(self) -> None:
        try:
            self.sock.close()
        except OSError:
            pass

    def __enter__(self) -> RawClient:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


# -- paho-mqtt ------------------------------------------------------------------------------------

@dataclass
class Received:
    topic: str
    payload: bytes
    qos: int
    retain: bool
    properties: Any = None


class PahoClient:
    """paho-mqtt 2 with TCP_NODELAY and its network loop in a thread; events as queues."""

    def __init__(self, kit: BrokerKit, device: Device, client_id: str, *, version: int = 4,
                 clean: bool = True, keep_alive: int = 60, session_expiry: int | None = None,
                 will: tuple[str, bytes, int, bool] | None = None) -> None:
        import paho.mqtt.client as mqtt
        from paho.mqtt.packettypes import PacketTypes
        from paho.mqtt.properties import Properties

        self.messages: queue.Queue[Received] = queue.Queue()
        self.connacks: queue.Queue[tuple[int, Any]] = queue.Queue()
        self.disconnects: queue.Queue[Any] = queue.Queue()
        self.acks: dict[int, threading.Event] = {}
        self.subacks: dict[int, list[Any]] = {}
        self.version = version
        protocol = mqtt.MQTTv5 if version == MQTT_5 else mqtt.MQTTv311
        kwargs: dict[str, Any] = {"protocol": protocol, "reconnect_on_failure": False}
        if version != MQTT_5:
            kwargs["clean_session"] = clean
        self.client = mqtt.Client(mqtt.CallbackAPIVersion.VERSION2, client_id, **kwargs)
        ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
        ctx.load_verify_locations(device.ca_file)
        ctx.load_cert_chain(device.cert_file, device.key_file)
        ctx.check_hostname = False
        self.client.tls_set_context(ctx)
        if will is not None:
            self.client.will_set(will[0], will[1], will[2], will[3])
        self.client.on_connect = self._on_connect
        self.client.on_disconnect = self._on_disconnect
        self.client.on_message = self._on_message
        self.client.on_publish = self._on_publish
        self.client.on_subscribe = self._on_subscribe
        self.client.on_unsubscribe = self._on_subscribe
        props = None
        connect_kwargs: dict[str, Any] = {}
        if version == MQTT_5:
            props = Properties(PacketTypes.CONNECT)
            if session_expiry is not None:
                props.SessionExpiryInterval = session_expiry
            connect_kwargs["clean_start"] = clean
        self.client.connect(HOST, kit.port, keep_alive, properties=props, **connect_kwargs)
        sock: Any = self.client.socket()
        if sock is not None:
            sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)  # perf-notes: paho trap
        self.client.loop_start()

    def _on_connect(self, _c: Any, _u: Any, flags: Any, reason: Any, props: Any) -> None:
        self.connacks.put((int(reason.value if hasattr(reason, "value") else reason), props))

    def _on_disconnect(self, _c: Any, _u: Any, _flags: Any, reason: Any, props: Any) -> None:
        self.disconnects.put(reason)

    def _on_message(self, _c: Any, _u: Any, msg: Any) -> None:
        self.messages.put(Received(msg.topic, msg.payload, msg.qos, bool(msg.retain),
                                   getattr(msg, "properties", None)))

    def _on_publish(self, _c: Any, _u: Any, mid: int, reason: Any, props: Any) -> None:
        self.acks.setdefault(mid, threading.Event()).set()

    def _on_subscribe(self, _c: Any, _u: Any, mid: int, codes: Any, props: Any) -> None:
        self.subacks[mid] = list(codes)
        self.acks.setdefault(mid, threading.Event()).set()

    def connack(self, timeout: float = 5.0) -> tuple[int, Any]:
        return self.connacks.get(timeout=timeout)

    def subscribe(self, topic_filter: str, qos: int = 1, timeout: float = 5.0) -> list[Any]:
        _, mid = self.client.subscribe(topic_filter, qos)
        assert mid is not None
        if not self.acks.setdefault(mid, threading.Event()).wait(timeout):
            raise TimeoutError(f"no SUBACK for {topic_filter}")
        return self.subacks[mid]

    def publish(self, topic: str, payload: bytes, qos: int = 1, retain: bool = False,
                timeout: float = 5.0) -> None:
        info = self.client.publish(topic, payload, qos, retain)
        if qos and not self.acks.setdefault(info.mid, threading.Event()).wait(timeout):
            raise TimeoutError(f"no PUBACK for {topic}")

    def expect(self, timeout: float = 5.0) -> Received:
        return self.messages.get(timeout=timeout)

    def nothing(self, timeout: float = 0.3) -> bool:
        """True if no message arrives within ``timeout`` (for checking a non-delivery)."""
        try:
            self.messages.get(timeout=timeout)
        except queue.Empty:
            return True
        return False

    def wait_disconnected(self, timeout: float = 5.0) -> Any:
        return self.disconnects.get(timeout=timeout)

    def close(self) -> None:
        try:
            self.client.disconnect()
        finally:
            self.client.loop_stop()


# -- mosquitto command-line clients ---------------------------------------------------------------

def mosquitto_available() -> bool:
    return shutil.which("mosquitto_pub") is not None and shutil.which("mosquitto_sub") is not None


def mosquitto_args(kit: BrokerKit, device: Device, *, version: str = "mqttv311",
                   client_id: str | None = None) -> list[str]:
    """Connection arguments for mosquitto_pub / mosquitto_sub (``version`` mqttv311 or
    mqttv5); the server certificate names ``localhost``."""
    args = ["-h", SERVER_NAME, "-p", str(kit.port), "--cafile", str(device.ca_file),
            "--cert", str(device.cert_file), "--key", str(device.key_file), "-V", version]
    if client_id is not None:
        args += ["-i", client_id]
    return args


def mosquitto_pub(kit: BrokerKit, device: Device, topic: str, message: str, *,
                  version: str = "mqttv311", client_id: str | None = None, qos: int = 1,
                  timeout: float = 10.0) -> subprocess.CompletedProcess[str]:
    cmd = ["mosquitto_pub", *mosquitto_args(kit, device, version=version, client_id=client_id),
           "-t", topic, "-m", message, "-q", str(qos)]
    return subprocess.run(cmd, capture_output=True, text=True, timeout=timeout, check=False)


def mosquitto_sub(kit: BrokerKit, device: Device, topic: str, *, version: str = "mqttv311",
                  client_id: str | None = None, count: int = 1, timeout: int = 10
                  ) -> subprocess.Popen[str]:
    """Start mosquitto_sub for ``count`` messages (``-W timeout``); read its stdout."""
    cmd = ["mosquitto_sub", *mosquitto_args(kit, device, version=version, client_id=client_id),
           "-t", topic, "-C", str(count), "-W", str(timeout), "-q", "1"]
    return subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)


# -- AWS IoT Device SDK v2 (awscrt) ---------------------------------------------------------------

def crt_connection(kit: BrokerKit, device: Device, client_id: str, *,
                   clean_session: bool = True, keep_alive_secs: int = 60) -> Any:
    """An ``awscrt.mqtt.Connection`` (MQTT 3.1.1) built the way the SDK samples do."""
    from awsiot import mqtt_connection_builder

    return mqtt_connection_builder.mtls_from_path(
        endpoint=SERVER_NAME, port=kit.port, cert_filepath=str(device.cert_file),
        pri_key_filepath=str(device.key_file), ca_filepath=str(device.ca_file),
        client_id=client_id, clean_session=clean_session, keep_alive_secs=keep_alive_secs)


def crt_mqtt5_client(kit: BrokerKit, device: Device, client_id: str, **kwargs: Any) -> Any:
    """An ``awscrt.mqtt5.Client`` from ``awsiot.mqtt5_client_builder`` (not started)."""
    from awsiot import mqtt5_client_builder

    return mqtt5_client_builder.mtls_from_path(
        endpoint=SERVER_NAME, port=kit.port, cert_filepath=str(device.cert_file),
        pri_key_filepath=str(device.key_file), ca_filepath=str(device.ca_file),
        client_id=client_id, **kwargs)
