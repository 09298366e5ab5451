"""The asyncio shell of the emulated AWS IoT message broker: TLS, bytes in and out, timers.

:class:`Broker` listens on one port for MQTT 3.1.1 and 5 over TLS 1.2/1.3 with a
client certificate, behaving as AWS's port 8883 and port 443 with ALPN
``x-amzn-mqtt-ca`` together (spec §1.2). Per-connection protocol rules live in
:mod:`~harness.emulator.mqtt.connection`; this module moves bytes, runs the timers
(CONNECT deadline, slow packets, keep-alive, backlog pacing, Will delay, session
expiry), routes messages between connections, and publishes lifecycle events.

Speed (perf-notes): asyncio Protocol API (uvloop when the loop is one), one
shared SSLContext, TCP_NODELAY (the loops set it), writes batched per loop iteration,
no executor hop and no observation payload copy per message.
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import logging
import socket
import ssl
import tempfile
import threading
import uuid
import weakref
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from cryptography import x509

from harness import pki, tls_engine
from harness.clock import Clock
from harness.emulator import lifecycle
from harness.emulator.auth import (
    Admission,
    Authentication,
    DeviceDirectory,
    Principal,
    PrincipalResolver,
)
from harness.emulator.broker_settings import BrokerSettings, RefusalPoint
from harness.emulator.lifecycle import DisconnectReason, VersionNumbers
from harness.emulator.mqtt.connection import (
    Closed,
    ConnectionState,
    ConnectRefusal,
    ConnectRequest,
    ConnectRequested,
    DeliveryStatus,
    MessageReceived,
    PublishDropped,
    Subscribed,
    Unsubscribed,
    WillMessage,
)
from harness.emulator.mqtt.connection import Connection as MqttConnection
from harness.emulator.mqtt.packets import ReasonCode
from harness.emulator.mqtt.sessions import (
    Delivery,
    Message,
    RetainedMessage,
    RetainedStore,
    SessionStore,
)
from harness.emulator.mqtt.topics import topic_matches
from harness.observations import Kind, ObservationLog

log = logging.getLogger("fleetbench.broker")

ALPN_MQTT_CA = "x-amzn-mqtt-ca"
_NO_CHECK_TIME = 0x200000  # X509_V_FLAG_NO_CHECK_TIME: accept expired client certificates


@dataclass(frozen=True)
class ConnectionInfo:
    """A live connection (for admin views and DeleteConnection)."""

    client_id: str
    certificate_id: str | None
    protocol_level: int
    since: float  # shared-clock time of the CONNACK
    ip_address: str
    sni: str | None
    principal_kind: str


@dataclass(frozen=True)
class ApiRequest:
    """A PUBLISH to a reserved-topic API (``register_api``); answer with :meth:`reply`.

    Replies go only to the requesting connection, only if it still holds a matching
    subscription, and only if its ``iot:Receive`` allows them (fleet-provisioning §1.1).
    """

    topic: str
    payload: bytes = field(repr=False)  # may carry an ownership token: never in a repr
    client_id: str
    certificate_id: str
    principal: Principal
    protocol_level: int
    received_at: float
    connected_at: float | None  # shared-clock time of the requesting connection's CONNACK
    _reply: Callable[[str, bytes], bool] = field(repr=False, compare=False)

    async def reply(self, topic: str, payload: bytes) -> bool:
        """Deliver ``payload`` on ``topic`` to the requester; False if it was dropped."""
        return self._reply(topic, payload)


ApiHandler = Callable[[ApiRequest], Awaitable[None]]


def _sni_of(ssl_object: Any) -> str | None:
    return getattr(ssl_object, "fleetbench_sni", None)


class _Link(asyncio.Protocol):
    """One accepted socket: transport, connection state machine and its timers."""

    __slots__ = ("admission", "alpn", "backlog_timer", "broker", "certificate_der", "conn",
                 "connect_failed_event", "dirty", "discard_session", "finished",
                 "keep_alive_limit", "last_touch", "made_at", "partial_since", "peer_ip", "quiet",
                 "sni", "timer", "timer_at", "tls_version", "transport", "version_number")

    def __init__(self, broker: Broker) -> None:
        self.broker = broker
        self.transport: Any = None
        self.conn: MqttConnection | None = None
        self.certificate_der: bytes | None = None
        self.admission: Admission | None = None
        self.sni: str | None = None
        self.alpn: str | None = None
        self.tls_version: str | None = None
        self.peer_ip = ""
        self.made_at = 0.0  # loop time
        self.last_touch = 0.0  # loop time of the last keep-alive-resetting packet
        self.keep_alive_limit = 0.0  # seconds of silence tolerated (keep-alive x grace)
        self.partial_since: float | None = None
        self.timer: asyncio.TimerHandle | None = None
        self.timer_at = 0.0
        self.backlog_timer: asyncio.TimerHandle | None = None
        self.dirty = False
        self.finished = False
        self.version_number = 0
        self.connect_failed_event = False
        self.discard_session = False
        self.quiet = False  # closing at server stop: no lifecycle events, no Will

    # -- asyncio.Protocol ------------------------------------------------------------------------
    def connection_made(self, transport: Any) -> None:  # type: ignore[override]
        self.transport = transport
        self.broker._on_made(self)

    def data_received(self, data: bytes) -> None:
        conn = self.conn
        if conn is None or self.finished:
            return
        broker = self.broker
        try:
            before = conn.packets
            events = conn.receive_data(data)
            if conn.touched:
                conn.touched = False
                self.last_touch = broker._loop_time()
            if conn.buffered:
                if self.partial_since is None or conn.packets != before:
                    self.partial_since = broker._loop_time()
                    broker._arm(self, self.partial_since + broker.settings.packet_timeout)
            else:
                self.partial_since = None
            if events:
                broker._process(self, events)
        except Exception:  # a broker bug ends this connection only (lifecycle SERVER_ERROR)
            log.exception("event=broker_error client_id=%s", conn.client_id)
            broker._close(self, DisconnectReason.SERVER_ERROR, ReasonCode.UNSPECIFIED_ERROR,
                          "internal error")

    def connection_lost(self, exc: Exception | None) -> None:
        conn = self.conn
        if conn is not None and not self.finished:
            closed = conn.connection_lost()
            if closed is not None:
                self.broker._finish(self, closed)
        self.broker._forget(self)

    def pause_writing(self) -> None:
        if self.conn is not None:
            self.conn.congested = True

    def resume_writing(self) -> None:
        if self.conn is not None:
            self.conn.congested = False


class Broker:
    """The emulated AWS IoT Core message broker (see the module docstring)."""

    def __init__(self, *, directory: DeviceDirectory, ca: pki.CertificateAuthority,
                 server_key: pki.PrivateKey, server_cert: x509.Certificate, clock: Clock,
                 observations: ObservationLog, settings: BrokerSettings | None = None,
                 region: str = "us-east-1", account_id: str = "123456789012") -> None:
        self.settings = settings = settings or BrokerSettings()
        self.directory = directory
        self.ca = ca
        self.clock = clock
        self.observations = observations
        self.region = region
        self.account_id = account_id
        self._server_key = server_key
        self._server_cert = server_cert
        self.auth = Authentication(directory, settings, region=region, account_id=account_id)
        self.sessions = SessionStore(expiry_slack=settings.session_expiry_slack)
        self.retained = RetainedStore()
        self.versions = VersionNumbers(settings.version_number_reset_after)
        self._apis: list[tuple[str, ApiHandler]] = []
        self._links: set[_Link] = set()
        self._by_client: dict[str, _Link] = {}
        self._by_cert: dict[str, set[_Link]] = {}
        self._dirty: list[_Link] = []
        self._flush_scheduled = False
        self._pending_wills: dict[str, tuple[asyncio.TimerHandle, WillMessage]] = {}
        self._last_connect: dict[str, float] = {}
        self._account_tokens = float(settings.account_connect_rate or 0.0)
        self._account_tokens_at = 0.0
        self._api_tasks: set[asyncio.Task[None]] = set()
        self._loop: asyncio.AbstractEventLoop | None = None
        self._server: asyncio.AbstractServer | None = None
        self._ssl_context: ssl.SSLContext | None = None
        self._anchors: tuple[str, ...] = ()
        self._expiry_timer: asyncio.TimerHandle | None = None
        self._stopped = False
        self._listener: Callable[[Any], None] | None = None
        # registry events from other threads, relayed to the loop in order, one wake-up for
        # all that arrive before the loop takes them (a RegisterThing commit emits several)
        self._events_lock = threading.Lock()
        self._events: list[Any] = []
        self._events_posted = False
        self._port = 0
        self._host = "127.0.0.1"
        self._watching_clock = False
        self._gate_socket: socket.socket | None = None
        self._stalled: dict[socket.socket, asyncio.TimerHandle] = {}
        self._handshakes: set[asyncio.Task[Any]] = set()
        #: Set before :meth:`start` to hold new connections' TLS handshakes back (fault
        #: injection): called with the peer's IP address, returns the seconds to wait
        #: (0: none). With a gate the broker accepts sockets itself and hands them to
        #: ``loop.connect_accepted_socket`` (same TLS and protocol path, no measurable cost).
        self.handshake_gate: Callable[[str], float] | None = None

    # -- public API ------------------------------------------------------------------------------

    @property
    def port(self) -> int:
        return self._port

    @property
    def ssl_context(self) -> ssl.SSLContext | None:
        """The context new handshakes use (rebuilt when the trust anchors change)."""
        return self._ssl_context

    async def start(self, host: str = "127.0.0.1", port: int = 0) -> int:
        """Listen on ``host:port`` (0 = a free port); returns the bound port. After
        :meth:`stop` it may be called again (see :meth:`restart`)."""
        loop = self._loop = asyncio.get_running_loop()
        self._stopped = False
        self.auth.invalidate()  # after a restart: registry events were not heard while down
        anchors = self._trust_anchors()
        self._ssl_context = await loop.run_in_executor(None, self._build_ssl_context, anchors)
        self._anchors = anchors
        on_event = weakref.WeakMethod(self._registry_event_threadsafe)
        self._listener = lambda event: _call_weak(on_event, event)
        self.directory.add_listener(self._listener)
        if not self._watching_clock:
            on_advance = weakref.WeakMethod(self._clock_advanced_threadsafe)
            self.clock.on_advance(lambda now: _call_weak(on_advance, now))
            self._watching_clock = True
        if self.handshake_gate is None:
            self._server = await loop.create_server(
                lambda: _Link(self), host, port, ssl=self._ssl_context, reuse_address=True,
                ssl_handshake_timeout=self.settings.tls_handshake_timeout,
                ssl_shutdown_timeout=5.0, backlog=1024,
            )
            self._port = self._server.sockets[0].getsockname()[1]
        else:
            self._port = await self._listen_gated(host, port)
        self._host = host
        self._schedule_expiry()
        log.info("event=broker_listening host=%s port=%d", host, self._port)
        return self._port

    async def restart(self, down_seconds: float = 0.0) -> int:
        """:meth:`stop`, stay down ``down_seconds``, listen again on the same host and port.

        Every connection is dropped (no Will, no lifecycle event, as in :meth:`stop`);
        persistent sessions, retained messages and the registry are kept.
        """
        await self.stop()
        if down_seconds > 0:
            await asyncio.sleep(down_seconds)
        log.info("event=broker_restart down_s=%.3f", down_seconds)
        return await self.start(self._host, self._port)

    async def stop(self) -> None:
        """Close the listener and every connection (SERVER_INITIATED_DISCONNECT, MQTT 5
        DISCONNECT 0x8B); no Will or lifecycle event is published while shutting down."""
        self._stopped = True
        remove = getattr(self.directory, "remove_listener", None)
        if remove is not None and self._listener is not None:
            remove(self._listener)
        if self._server is not None:
            self._server.close()
        self._close_gated()
        for link in list(self._links):
            link.quiet = True
            self._close(link, DisconnectReason.SERVER_INITIATED_DISCONNECT,
                        ReasonCode.SERVER_SHUTTING_DOWN, "server stopping", publish_will=False)
        for handle, _ in self._pending_wills.values():
            handle.cancel()
        self._pending_wills.clear()
        if self._expiry_timer is not None:
            self._expiry_timer.cancel()
        for task in list(self._api_tasks):
            task.cancel()
        for handshake in list(self._handshakes):
            handshake.cancel()
        if self._server is not None:
            with contextlib.suppress(asyncio.TimeoutError):
                await asyncio.wait_for(self._server.wait_closed(), 5.0)

    def register_api(self, topic_filter: str, handler: ApiHandler) -> None:
        """Hand authorized PUBLISHes matching ``topic_filter`` (a ``$aws/...`` filter) to
        ``handler`` instead of subscribers."""
        if not topic_filter.startswith("$aws/"):
            raise ValueError("reserved-topic APIs live under $aws/")
        self._apis.append((topic_filter, handler))

    def add_principal_resolver(self, resolver: PrincipalResolver) -> None:
        """Consulted before the directory (part 2: live temporary provisioning claims)."""
        self.auth.add_resolver(resolver)

    async def disconnect(self, client_id: str, reason: str = "API_INITIATED_DISCONNECT", *,
                         prevent_will: bool = False, clean_session: bool = False) -> bool:
        """DeleteConnection (spec §1.3): end ``client_id``'s connection; False if not connected."""
        link = self._by_client.get(client_id)
        if link is None or link.conn is None or link.finished:
            return False
        why = DisconnectReason(reason)
        link.discard_session = clean_session
        closed = link.conn.close(why, ReasonCode.ADMINISTRATIVE_ACTION,
                                 publish_will=why.fires_will and not prevent_will)
        if closed is not None:
            self._finish(link, closed)
        return True

    def connections(self) -> list[ConnectionInfo]:
        out = []
        for link in self._by_client.values():
            conn = link.conn
            assert conn is not None
            authz = conn.authz
            out.append(ConnectionInfo(conn.client_id, conn.certificate_id, conn.protocol_level,
                                      conn.connected_at or 0.0, link.peer_ip, link.sni,
                                      authz.principal.kind if authz is not None else ""))
        return out

    async def publish(self, topic: str, payload: bytes, *, qos: int = 0,
                      retain: bool = False) -> None:
        """A service-side publish (data-plane Publish): routed like a client's, no lifecycle."""
        self._route(Message(topic, payload, qos, retain), origin=None)

    def retained_message(self, topic: str) -> RetainedMessage | None:
        return self.retained.get(topic, self.clock.now())

    def retained_messages(self) -> list[RetainedMessage]:
        return list(self.retained.items(self.clock.now()))

    def reset(self) -> None:
        """Forget stored sessions and retained messages (the registry's "reset" event calls
        this; sessions of live connections stay until those connections end)."""
        for session in list(self.sessions.sessions.values()):
            if session.connection is None:
                self.sessions.discard(session)
        self.retained.clear()

    # -- TLS -------------------------------------------------------------------------------------

    def _trust_anchors(self) -> tuple[str, ...]:
        extra: list[str] = []
        getter = getattr(self.directory, "trust_anchors_pem", None)
        if getter is not None:
            try:
                extra = list(getter())
            except Exception as exc:  # a directory hiccup must not stop the listener
                log.warning("event=trust_anchors_failed error=%s", exc)
        return tuple(dict.fromkeys((self.ca.pem, *extra)))

    def _build_ssl_context(self, anchors: tuple[str, ...]) -> ssl.SSLContext:
        """One server context (0.8 ms, perf-notes): runs in an executor."""
        if self.settings.tls_engine == "bundled":
            return self._build_engine_context(anchors)
        settings = self.settings
        ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
        ctx.minimum_version = ssl.TLSVersion.TLSv1_2
        ctx.options |= ssl.OP_NO_TICKET  # spec §1.2: no SessionTicket resumption
        with contextlib.suppress(AttributeError, ValueError):
            ctx.num_tickets = 0
        ctx.verify_mode = ssl.CERT_REQUIRED
        flags = ctx.verify_flags | ssl.VERIFY_X509_PARTIAL_CHAIN  # SNI_ONLY leaves as anchors
        if not settings.reject_expired_certificates:
            flags |= _NO_CHECK_TIME
        ctx.verify_flags = flags
        for pem in anchors:
            try:
                ctx.load_verify_locations(cadata=pem)
            except ssl.SSLError as exc:
                log.warning("event=trust_anchor_unusable error=%s", exc)
        ctx.set_alpn_protocols([ALPN_MQTT_CA])
        key_pem = pki.private_key_pem(self._server_key, pkcs1=False)
        cert_pem = pki.certificate_pem(self._server_cert)
        with tempfile.TemporaryDirectory(prefix="fleetbench-tls-") as tmp:
            key_path, cert_path = Path(tmp) / "server.key", Path(tmp) / "server.pem"
            pki.write_secret(key_path, key_pem)
            pki.write_public(cert_path, cert_pem)
            ctx.load_cert_chain(cert_path, key_path)
        ctx.sni_callback = self._sni_callback
        ctx.sslobject_class = _observed_ssl_object(self)
        return ctx

    def _build_engine_context(self, anchors: tuple[str, ...]) -> ssl.SSLContext:
        """The same server context on the bundled OpenSSL (harness.tls_engine): the same
        TLS versions, suites, groups, ALPN and trust flags, no ticket resumption (TLS 1.3
        stateful tickets may be sent, none resumes), ~0.3 ms less per handshake."""
        ctx = tls_engine.server_context(
            anchors=anchors, key=self._server_key, cert=self._server_cert,
            alpn=[ALPN_MQTT_CA], check_time=self.settings.reject_expired_certificates,
            on_bad_anchor=lambda exc: log.warning("event=trust_anchor_unusable error=%s", exc))
        ref = weakref.ref(self)

        def server_name(tls: tls_engine.BioTls, name: str | None) -> None:
            tls.fleetbench_sni = name
            owner = ref()
            current = owner._ssl_context if owner is not None else None
            if isinstance(current, tls_engine.EngineContext) and current is not ctx:
                tls.switch(current)

        def failed(tls: tls_engine.BioTls, exc: BaseException) -> None:
            owner = ref()
            if owner is not None:
                owner._tls_failed(tls.fleetbench_sni, exc)

        ctx.on_server_name = server_name
        ctx.on_failure = failed
        return ctx

    def _sni_callback(self, ssl_object: Any, server_name: str | None, ctx: ssl.SSLContext
                      ) -> None:
        """Record SNI and move the handshake onto the current context (trust anchors may
        have changed since the listener started)."""
        with contextlib.suppress(AttributeError):
            ssl_object.fleetbench_sni = server_name
        current = self._ssl_context
        if current is not None and current is not ctx:
            ssl_object.context = current

    def _tls_failed(self, sni: str | None, exc: BaseException) -> None:
        reason = getattr(exc, "verify_message", None) or getattr(exc, "reason", None) or str(exc)
        self.observations.record(Kind.TLS_FAILED, reason=str(reason), sni=sni)

    def _rebuild_trust(self) -> None:
        anchors = self._trust_anchors()
        if anchors == self._anchors or self._loop is None:
            return
        self._anchors = anchors
        future = self._loop.run_in_executor(None, self._build_ssl_context, anchors)

        def installed(f: asyncio.Future[ssl.SSLContext]) -> None:
            if not f.cancelled() and f.exception() is None and self._anchors == anchors:
                self._ssl_context = f.result()

        future.add_done_callback(installed)

    # -- gated handshakes (handshake_gate) ------------------------------------------------------

    async def _listen_gated(self, host: str, port: int) -> int:
        """Listen on a socket of our own: each accepted socket may wait before its TLS
        handshake (its ClientHello stays unread in the kernel meanwhile)."""
        assert self._loop is not None
        infos = await self._loop.getaddrinfo(host or None, port, type=socket.SOCK_STREAM,
                                             flags=socket.AI_PASSIVE)
        family, kind, proto, _, address = infos[0]
        sock = socket.socket(family, kind, proto)
        try:
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            sock.bind(address)
            sock.listen(1024)
            sock.setblocking(False)
        except OSError:
            sock.close()
            raise
        self._gate_socket = sock
        self._loop.add_reader(sock.fileno(), self._accept_gated)
        return int(sock.getsockname()[1])

    def _accept_gated(self) -> None:
        listener = self._gate_socket
        gate = self.handshake_gate
        if listener is None or self._loop is None:
            return
        while True:
            try:
                sock, peer = listener.accept()
            except (BlockingIOError, InterruptedError):
                return
            except OSError as exc:  # e.g. EMFILE: leave it for the next readiness
                log.warning("event=accept_failed error=%s", exc)
                return
            sock.setblocking(False)
            try:
                wait = gate(str(peer[0])) if gate is not None else 0.0
            except Exception:  # a faulty gate must not stop the listener
                log.exception("event=handshake_gate_failed")
                wait = 0.0
            if wait > 0:
                self._stalled[sock] = self._loop.call_later(wait, self._start_tls, sock)
            else:
                self._start_tls(sock)

    def _start_tls(self, sock: socket.socket) -> None:
        self._stalled.pop(sock, None)
        if self._stopped or self._loop is None:
            sock.close()
            return
        task = self._loop.create_task(self._loop.connect_accepted_socket(
            lambda: _Link(self), sock, ssl=self._ssl_context,
            ssl_handshake_timeout=self.settings.tls_handshake_timeout,
            ssl_shutdown_timeout=5.0))
        self._handshakes.add(task)
        task.add_done_callback(self._handshake_done)

    def _handshake_done(self, task: asyncio.Task[Any]) -> None:
        self._handshakes.discard(task)
        if not task.cancelled() and task.exception() is not None:  # recorded by the SSL object
            log.debug("event=tls_failed error=%r", task.exception())

    def _close_gated(self) -> None:
        sock, self._gate_socket = self._gate_socket, None
        if sock is not None:
            if self._loop is not None and not self._loop.is_closed():
                self._loop.remove_reader(sock.fileno())
            sock.close()
        for waiting, handle in list(self._stalled.items()):
            handle.cancel()
            waiting.close()
        self._stalled.clear()

    # -- accepted sockets ------------------------------------------------------------------------

    def _loop_time(self) -> float:
        assert self._loop is not None
        return self._loop.time()

    def _on_made(self, link: _Link) -> None:
        transport = link.transport
        self._links.add(link)
        link.made_at = link.last_touch = self._loop_time()
        ssl_object = transport.get_extra_info("ssl_object")
        peer = transport.get_extra_info("peername")
        link.peer_ip = peer[0] if peer else ""
        # TCP_NODELAY is already on: asyncio and uvloop set it on every TCP transport (a
        # setsockopt through uvloop's pseudo-socket would cost ~13 µs per connection).
        transport.set_write_buffer_limits(high=self.settings.write_buffer_limit)
        certificate_id = None
        if ssl_object is not None:
            link.sni = _sni_of(ssl_object)
            link.alpn = ssl_object.selected_alpn_protocol()
            link.tls_version = ssl_object.version()
            link.certificate_der = ssl_object.getpeercert(binary_form=True)
            if link.certificate_der:
                certificate_id = self.auth.certificate_id(link.certificate_der)
        if self.settings.require_alpn and link.alpn != ALPN_MQTT_CA:
            self.observations.record(Kind.TLS_FAILED, certificate_id=certificate_id,
                                     reason="ALPN x-amzn-mqtt-ca required", sni=link.sni)
            self._drop(link)
            return
        if self.settings.refuse_certificates_at is RefusalPoint.HANDSHAKE:
            link.admission = self.auth.authenticate(link.certificate_der, link.sni,
                                                    self.clock.now(),
                                                    certificate_id=certificate_id)
            if link.admission.principal is None:
                refusal = link.admission.refusal
                self.observations.record(
                    Kind.CONNECT_FAILED, certificate_id=certificate_id, stage="handshake",
                    reason=refusal.value if refusal else "", ip=link.peer_ip, sni=link.sni)
                self._drop(link)
                return
        link.conn = MqttConnection(self.settings, self.sessions, now=self.clock.now,
                                   on_output=functools.partial(self._mark, link),
                                   peer_ip=link.peer_ip, sni=link.sni,
                                   certificate_id=certificate_id)
        self._arm(link, link.made_at + self.settings.connect_timeout)

    @staticmethod
    def _drop(link: _Link) -> None:
        """Close a link that never got an MQTT connection (refused right after TLS)."""
        link.finished = True
        link.transport.close()

    def _forget(self, link: _Link) -> None:
        self._links.discard(link)
        if link.timer is not None:
            link.timer.cancel()
            link.timer = None
        if link.backlog_timer is not None:
            link.backlog_timer.cancel()
            link.backlog_timer = None

    # -- output batching -------------------------------------------------------------------------

    def _mark(self, link: _Link, _conn: MqttConnection | None = None) -> None:
        """The link has output: flush it (with every other) at the end of this iteration."""
        if not link.dirty:
            link.dirty = True
            self._dirty.append(link)
            if not self._flush_scheduled and self._loop is not None:
                self._flush_scheduled = True
                self._loop.call_soon(self._flush)

    def _flush(self) -> None:
        self._flush_scheduled = False
        dirty, self._dirty = self._dirty, []
        for link in dirty:
            self._flush_link(link)

    @staticmethod
    def _flush_link(link: _Link) -> None:
        link.dirty = False
        conn = link.conn
        if conn is None or not conn.outbox:
            return
        outbox = conn.outbox
        data = outbox[0] if len(outbox) == 1 else b"".join(outbox)
        outbox.clear()
        transport = link.transport
        if transport is not None and not transport.is_closing():
            transport.write(data)

    # -- timers ----------------------------------------------------------------------------------

    def _arm(self, link: _Link, when: float) -> None:
        """Make sure the link's timer fires no later than ``when`` (loop time)."""
        if link.finished or self._loop is None:
            return
        if link.timer is not None:
            if link.timer_at <= when:
                return
            link.timer.cancel()
        link.timer_at = when
        link.timer = self._loop.call_at(when, self._tick, link)

    def _tick(self, link: _Link) -> None:
        link.timer = None
        conn = link.conn
        if link.finished or conn is None or conn.closed:
            return
        now = self._loop_time()
        settings = self.settings
        deadlines = []
        if link.partial_since is not None and conn.buffered:
            deadline = link.partial_since + settings.packet_timeout
            if now >= deadline:  # slow-loris: a packet that never completes
                self._close(link, DisconnectReason.CLIENT_ERROR, ReasonCode.PROTOCOL_ERROR,
                            f"packet incomplete after {settings.packet_timeout:g} s",
                            protocol_error=True)
                return
            deadlines.append(deadline)
        if conn.state in (ConnectionState.AWAIT_CONNECT, ConnectionState.AWAIT_ADMISSION):
            deadline = link.made_at + settings.connect_timeout
            if now >= deadline:
                self._close(link, DisconnectReason.CLIENT_ERROR, None,
                            f"no CONNECT within {settings.connect_timeout:g} s",
                            protocol_error=True)
                return
            deadlines.append(deadline)
        elif conn.state is ConnectionState.CONNECTED:
            deadline = link.last_touch + link.keep_alive_limit
            if now >= deadline:  # spec §1.3
                self._close(link, DisconnectReason.MQTT_KEEP_ALIVE_TIMEOUT,
                            ReasonCode.KEEP_ALIVE_TIMEOUT, "keep-alive timeout")
                return
            deadlines.append(deadline)
        if deadlines:
            self._arm(link, min(deadlines))

    def _close(self, link: _Link, reason: DisconnectReason, code: int | None, detail: str, *,
               protocol_error: bool = False, publish_will: bool | None = None) -> None:
        if link.conn is None:
            return
        closed = link.conn.close(reason, code, detail=detail, protocol_error=protocol_error,
                                 publish_will=publish_will)
        if closed is not None:
            self._finish(link, closed)

    # -- events from connections -----------------------------------------------------------------

    def _process(self, link: _Link, events: list[Any]) -> None:
        for event in events:
            kind = type(event)
            if kind is MessageReceived:
                self._route(event.message, origin=link)
            elif kind is Subscribed:
                self._subscribed(link, event)
            elif kind is Unsubscribed:
                self._unsubscribed(link, event)
            elif kind is PublishDropped:
                self._dropped(link, event)
            elif kind is ConnectRequested:
                self._admit(link, event.request)
            elif kind is Closed:
                self._finish(link, event)

    def _admit(self, link: _Link, request: ConnectRequest) -> None:
        """Spec §1.3, §1.9, §2.3: decide a CONNECT the protocol checks let through."""
        conn = link.conn
        assert conn is not None
        settings = self.settings
        now = self.clock.now()
        refusal = self._throttled(request.client_id, now)
        if refusal is not None:
            self._refuse(link, refusal, "connect rate exceeded")
            return
        admission = self.auth.authenticate(link.certificate_der, link.sni, now,
                                           certificate_id=conn.certificate_id)
        link.admission = admission
        if admission.principal is None:  # spec §2.3: looks like a policy refusal
            link.connect_failed_event = settings.connect_failed_for_refused_certificates
            self._refuse(link, ConnectRefusal.NOT_AUTHORIZED,
                         admission.refusal.value if admission.refusal else "")
            return
        authz = self.auth.authorization(admission.principal, request.client_id,
                                        source_ip=link.peer_ip, domain_name=link.sni,
                                        connect_attributes=request.connect_attributes)
        refusal = conn.authorize(authz)
        if refusal is not None:
            link.connect_failed_event = (refusal is ConnectRefusal.NOT_AUTHORIZED
                                         or settings.will_denied_emits_connect_failed)
            self._refuse(link, refusal, "policy")
            return
        client_id = request.client_id
        old = self._by_client.get(client_id)
        if old is not None and old is not link:  # spec §1.3 duplicate client id
            assert old.conn is not None
            closed = old.conn.close(DisconnectReason.DUPLICATE_CLIENTID,
                                    ReasonCode.SESSION_TAKEN_OVER)
            if closed is not None:
                self._finish(old, closed)
        pending = self._pending_wills.pop(client_id, None)
        if pending is not None:  # reconnected within the Will Delay: no Will (MQTT 5)
            pending[0].cancel()
        session, present = self.sessions.open(
            client_id, request.protocol_level, clean_start=request.clean_start,
            expiry_interval=request.session_expiry, now=now,
            keep_identifier=settings.session_identifier_survives_resume)
        link.version_number = self.versions.begin(client_id, now)
        self._by_client[client_id] = link
        cert_id = admission.certificate_id or ""
        self._by_cert.setdefault(cert_id, set()).add(link)
        link.keep_alive_limit = request.keep_alive * settings.keep_alive_grace
        link.last_touch = self._loop_time()
        events = conn.accept(session, present)
        self.observations.record(
            Kind.CONNECT, client_id=client_id, certificate_id=admission.certificate_id,
            protocol_level=request.protocol_level, clean_start=request.clean_start,
            keep_alive=request.keep_alive, session_present=present,
            session_expiry=request.session_expiry, ip=link.peer_ip, sni=link.sni,
            alpn=link.alpn, tls=link.tls_version, principal=admission.principal.kind,
            assigned_client_id=request.assigned_client_id)
        log.debug("event=connect client_id=%s cert=%s level=%d present=%s", client_id, cert_id,
                  request.protocol_level, present)
        if self._wants_event("connected", client_id):
            self._publish_event(lifecycle.connected(
                client_id, timestamp_ms=self.clock.now_ms(),
                session_identifier=session.session_identifier,
                principal_identifier=cert_id, ip_address=link.peer_ip,
                version_number=link.version_number, thing_name=authz.exclusive_thing_name))
        self._arm(link, link.last_touch + link.keep_alive_limit)
        expires_at = admission.principal.expires_at
        if expires_at is not None and settings.disconnect_at_principal_expiry:
            assert self._loop is not None
            self._loop.call_later(max(0.0, expires_at - now), self._recheck_link, link)
        if session.backlog and settings.backlog_delivery_rate:
            self._drain_backlog(link)
        if events:
            self._process(link, events)

    def _throttled(self, client_id: str, now: float) -> ConnectRefusal | None:
        settings = self.settings
        if settings.max_connections is not None and len(self._by_client) >= \
                settings.max_connections and client_id not in self._by_client:
            return ConnectRefusal.SERVER_BUSY
        rate = settings.account_connect_rate
        if rate is not None:
            tokens = min(rate, self._account_tokens + (now - self._account_tokens_at) * rate)
            self._account_tokens_at = now
            if tokens < 1.0:
                self._account_tokens = tokens
                return ConnectRefusal.THROTTLED
            self._account_tokens = tokens - 1.0
        rate = settings.connect_rate_per_client_id
        if rate is not None:  # spec §1.8: 1 CONNECT/s per client id
            last = self._last_connect.get(client_id)
            if last is not None and now - last < 1.0 / rate:
                return ConnectRefusal.THROTTLED
            self._last_connect[client_id] = now
        return None

    def _refuse(self, link: _Link, refusal: ConnectRefusal, detail: str) -> None:
        assert link.conn is not None
        self._finish(link, link.conn.refuse(refusal, detail))

    def _finish(self, link: _Link, closed: Closed) -> None:
        """Everything that follows the end of a connection, exactly once."""
        if link.finished:
            return
        link.finished = True
        conn = link.conn
        assert conn is not None
        self._flush_link(link)
        if link.transport is not None:
            link.transport.close()
        self._forget(link)
        now = self.clock.now()
        client_id = conn.client_id
        admission = link.admission
        cert_id = admission.certificate_id if admission else conn.certificate_id
        if closed.refusal is not None:
            self.observations.record(
                Kind.CONNECT_FAILED, client_id=client_id or None, certificate_id=cert_id,
                stage="connect", reason=closed.refusal.value, detail=closed.detail,
                protocol_level=conn.protocol_level, ip=link.peer_ip, sni=link.sni)
            if link.connect_failed_event and client_id and not client_id.startswith("$") \
                    and self._wants_event("connect_failed", client_id):
                self._publish_event(lifecycle.connect_failed(
                    client_id, timestamp_ms=self.clock.now_ms(),
                    session_identifier=str(uuid.uuid4()),
                    principal_identifier=cert_id or "", ip_address=link.peer_ip))
            return
        if not closed.was_connected:
            if closed.protocol_error or closed.detail:
                self.observations.record(Kind.PROTOCOL_ERROR, certificate_id=cert_id,
                                         reason=closed.detail, reason_code=closed.reason_code,
                                         ip=link.peer_ip, stage="before_connect")
            return
        if closed.protocol_error:
            self.observations.record(Kind.PROTOCOL_ERROR, client_id=client_id,
                                     certificate_id=cert_id, reason=closed.detail,
                                     reason_code=closed.reason_code)
        if self._by_client.get(client_id) is link:
            del self._by_client[client_id]
        links = self._by_cert.get(cert_id or "")
        if links is not None:
            links.discard(link)
            if not links:
                del self._by_cert[cert_id or ""]
        session = conn.session
        will = closed.will
        self.observations.record(
            Kind.DISCONNECT, client_id=client_id, certificate_id=cert_id,
            reason=closed.reason.value, client_initiated=closed.client_initiated,
            will=will is not None and not link.quiet, detail=closed.detail)
        log.debug("event=disconnect client_id=%s cert=%s reason=%s", client_id, cert_id,
                  closed.reason.value)
        self.versions.end(client_id, link.version_number, now)
        authz = conn.authz
        if not link.quiet and session is not None and \
                self._wants_event("disconnected", client_id):
            self._publish_event(lifecycle.disconnected(
                client_id, timestamp_ms=self.clock.now_ms(),
                session_identifier=session.session_identifier,
                principal_identifier=cert_id or "", version_number=link.version_number,
                client_initiated=closed.client_initiated, reason=closed.reason,
                thing_name=authz.exclusive_thing_name if authz is not None else None))
        kept = False
        if session is not None:
            kept = self.sessions.detach(session, now)
            if link.discard_session and kept:
                self.sessions.discard(session)
                kept = False
            if kept:
                self._schedule_expiry()
        if will is not None and not link.quiet:
            delay = will.delay if self.settings.honour_will_delay else 0
            if closed.reason is DisconnectReason.DUPLICATE_CLIENTID and \
                    self.settings.takeover_publishes_will_at_once:
                delay = 0
            # MQTT 5: the Will waits for its delay or the end of the session, whichever first
            delay = min(delay, session.expiry_interval) if kept and session is not None else 0
            if delay > 0 and self._loop is not None:
                handle = self._loop.call_later(delay, self._fire_will, client_id)
                self._pending_wills[client_id] = (handle, will)
            else:
                self._publish_will(will)

    def _fire_will(self, client_id: str) -> None:
        pending = self._pending_wills.pop(client_id, None)
        if pending is not None:
            self._publish_will(pending[1])

    def _publish_will(self, will: WillMessage) -> None:
        self._route(will.to_publish(self.clock.now()), origin=None)

    # -- routing ---------------------------------------------------------------------------------

    def _route(self, message: Message, origin: _Link | None) -> None:
        """Deliver a message to every matching session (spec §1.4-§1.6), or hand it to a
        reserved-topic API."""
        topic = message.topic
        if origin is not None and self.settings.observe_publishes:
            conn = origin.conn
            self.observations.record(
                Kind.PUBLISH, client_id=message.origin, certificate_id=conn.certificate_id
                if conn else None, topic=topic, qos=message.qos, retain=message.retain,
                bytes=len(message.payload))
        if self._apis and origin is not None and topic.startswith("$aws/"):
            for topic_filter, handler in self._apis:
                if topic_matches(topic_filter, topic):
                    self._call_api(origin, handler, message)
                    return
        now = self.clock.now()
        if message.retain:  # spec §1.6
            self.retained.apply(message, now)
        targets = self.sessions.route(topic)
        if not targets:
            return
        source = message.origin
        max_offline = self.settings.max_offline_messages
        for session, options in targets:
            if options.no_local and source == session.client_id:
                continue
            qos = message.qos if message.qos < options.qos else options.qos
            delivery = Delivery(message, qos, message.retain and options.retain_as_published)
            conn = session.connection
            if conn is not None:
                if conn.deliver(delivery) is DeliveryStatus.DENIED:
                    self._deliver_denied(conn, topic)
            elif qos and session.persistent:  # spec §1.3: QoS 1 stored while offline
                session.store(session.backlog, delivery, max_offline)

    def _deliver_denied(self, conn: MqttConnection, topic: str) -> None:
        self.observations.record(Kind.DELIVER_DENIED, client_id=conn.client_id,
                                 certificate_id=conn.certificate_id, topic=topic)

    def _wants_event(self, event_type: str, client_id: str) -> bool:
        """Whether a lifecycle event would reach anyone (payloads are built only then)."""
        return lifecycle.emits_events(client_id) and self.sessions.has_subscribers(
            lifecycle.event_topic(event_type, client_id))

    def _publish_event(self, event: lifecycle.LifecycleEvent) -> None:
        self._route(Message(event.topic, event.to_bytes(), self.settings.lifecycle_event_qos),
                    origin=None)

    def _subscribed(self, link: _Link, event: Subscribed) -> None:
        conn = link.conn
        assert conn is not None and conn.session is not None
        self.observations.record(Kind.SUBSCRIBE, client_id=conn.client_id,
                                 certificate_id=conn.certificate_id,
                                 filters=list(event.requested),
                                 reason_codes=list(event.reason_codes))
        now = self.clock.now()
        for topic_filter, options, is_new in event.granted:  # spec §1.6: exact filters only
            if "+" in topic_filter or "#" in topic_filter or topic_filter.startswith("$share/"):
                continue
            if options.retain_handling == 2 or (options.retain_handling == 1 and not is_new):
                continue
            entry = self.retained.get(topic_filter, now)
            if entry is None:
                continue
            m = entry.message
            status = conn.deliver(Delivery(m, min(m.qos, options.qos), True))
            if status is DeliveryStatus.DENIED:
                self._deliver_denied(conn, topic_filter)
        topics = [f for f, _, _ in event.granted] \
            if self.settings.subscribed_event_lists_granted_only else list(event.requested)
        if topics and self._wants_event("subscribed", conn.client_id):
            self._subscription_event(conn, "subscribed", topics)

    def _unsubscribed(self, link: _Link, event: Unsubscribed) -> None:
        conn = link.conn
        assert conn is not None
        self.observations.record(Kind.UNSUBSCRIBE, client_id=conn.client_id,
                                 certificate_id=conn.certificate_id, filters=list(event.filters))
        if event.filters and self._wants_event("unsubscribed", conn.client_id):
            self._subscription_event(conn, "unsubscribed", list(event.filters))

    def _subscription_event(self, conn: MqttConnection, kind: str, topics: list[str]) -> None:
        session = conn.session
        authz = conn.authz
        assert session is not None
        self._publish_event(lifecycle.subscription_event(
            kind, conn.client_id, timestamp_ms=self.clock.now_ms(),
            session_identifier=session.session_identifier,
            principal_identifier=conn.certificate_id or "", topics=topics,
            thing_name=authz.exclusive_thing_name if authz is not None else None))

    def _dropped(self, link: _Link, event: PublishDropped) -> None:
        conn = link.conn
        assert conn is not None
        kind = Kind.THROTTLED if event.why == "throttled" else Kind.PUBLISH
        self.observations.record(kind, client_id=conn.client_id,
                                 certificate_id=conn.certificate_id, topic=event.topic,
                                 qos=event.qos, dropped=event.why)

    def _drain_backlog(self, link: _Link) -> None:
        """Spec §1.3: a resumed session's backlog goes out at ≤ backlog_delivery_rate/s."""
        link.backlog_timer = None
        conn = link.conn
        rate = self.settings.backlog_delivery_rate
        if link.finished or conn is None or conn.session is None or not rate:
            return
        conn.drain_backlog(1)
        if conn.session.backlog and self._loop is not None:
            link.backlog_timer = self._loop.call_later(1.0 / rate, self._drain_backlog, link)

    # -- reserved-topic APIs ---------------------------------------------------------------------

    def _call_api(self, link: _Link, handler: ApiHandler, message: Message) -> None:
        conn = link.conn
        assert conn is not None and conn.authz is not None
        principal = conn.authz.principal
        self.observations.record(Kind.API_REQUEST, client_id=conn.client_id,
                                 certificate_id=principal.certificate_id, source="broker",
                                 topic=message.topic, bytes=len(message.payload))
        request = ApiRequest(
            topic=message.topic, payload=message.payload, client_id=conn.client_id,
            certificate_id=principal.certificate_id, principal=principal,
            protocol_level=conn.protocol_level, received_at=self.clock.now(),
            connected_at=conn.connected_at,
            _reply=lambda topic, payload: self._reply(link, topic, payload))
        assert self._loop is not None
        task = self._loop.create_task(self._run_api(handler, request))
        self._api_tasks.add(task)
        task.add_done_callback(self._api_tasks.discard)

    async def _run_api(self, handler: ApiHandler, request: ApiRequest) -> None:
        try:
            await handler(request)
        except asyncio.CancelledError:
            raise
        except Exception:
            log.exception("event=api_handler_failed topic=%s client_id=%s", request.topic,
                          request.client_id)

    def _reply(self, link: _Link, topic: str, payload: bytes) -> bool:
        """Deliver an API response to the requesting connection only."""
        conn = link.conn
        assert conn is not None
        outcome = "delivered"
        if link.finished or conn.session is None or conn.closed:
            outcome = "disconnected"
        else:
            granted = [o.qos for f, o in conn.session.subscriptions.items()
                       if topic_matches(f, topic)]
            if not granted:
                outcome = "no_subscription"
            else:
                delivery = Delivery(Message(topic, payload, 1), min(1, max(granted)))
                status = conn.deliver(delivery)
                if status is DeliveryStatus.DENIED:
                    outcome = "not_authorized"
                    self._deliver_denied(conn, topic)
                elif status is DeliveryStatus.DROPPED:
                    outcome = "dropped"
        self.observations.record(Kind.API_RESPONSE, client_id=conn.client_id,
                                 certificate_id=conn.certificate_id, source="broker",
                                 topic=topic, bytes=len(payload), outcome=outcome)
        return outcome == "delivered"

    # -- registry events and the clock -----------------------------------------------------------

    def _registry_event_threadsafe(self, event: Any) -> None:
        loop = self._loop
        if loop is None or self._stopped or loop.is_closed():
            return
        with self._events_lock:
            self._events.append(event)
            if self._events_posted:  # the loop has not taken the earlier ones yet
                return
            self._events_posted = True
        try:
            loop.call_soon_threadsafe(self._registry_events)
        except RuntimeError:  # the loop closed meanwhile: nobody to tell
            with self._events_lock:
                self._events.clear()
                self._events_posted = False

    def _registry_events(self) -> None:
        """On the loop: every registry event relayed so far, in the order they happened."""
        with self._events_lock:
            events, self._events = self._events, []
            self._events_posted = False
        for event in events:
            self._registry_event(event)

    def _registry_event(self, event: Any) -> None:
        if self._stopped:
            return
        reaction = self.auth.reaction(event)
        settings = self.settings
        assert self._loop is not None
        if getattr(event, "kind", None) == "reset":  # the account is empty again
            self.reset()
        if reaction.invalidate:
            certificates, things = reaction.invalidate_certificates, reaction.invalidate_things
            if settings.policy_cache_delay > 0:
                self._loop.call_later(settings.policy_cache_delay, self.auth.invalidate,
                                      certificates, things)
            else:
                self.auth.invalidate(certificates, things)
        if reaction.trust_changed:
            self._rebuild_trust()
        if reaction.recheck_all or reaction.recheck:
            if settings.certificate_revocation_delay > 0:
                self._loop.call_later(settings.certificate_revocation_delay, self._recheck,
                                      reaction.recheck_all, reaction.recheck)
            else:
                self._recheck(reaction.recheck_all, reaction.recheck)

    def _recheck(self, every: bool, certificate_ids: frozenset[str]) -> None:
        """Spec §2.3: close the connections of certificates that left ACTIVE."""
        if every:
            links = [link for group in self._by_cert.values() for link in group]
        else:
            links = [link for cid in certificate_ids for link in self._by_cert.get(cid, ())]
        for link in links:
            self._recheck_link(link)

    def _recheck_link(self, link: _Link) -> None:
        conn = link.conn
        if conn is None or conn.authz is None or link.finished:
            return
        if not self.auth.still_admitted(conn.authz.principal, self.clock.now()):
            self._close(link, DisconnectReason(self.settings.revoked_disconnect_reason),
                        ReasonCode.ADMINISTRATIVE_ACTION, "no longer admitted")

    def _clock_advanced_threadsafe(self, _now: float) -> None:
        loop = self._loop
        if loop is None or self._stopped or loop.is_closed():
            return
        with contextlib.suppress(RuntimeError):
            loop.call_soon_threadsafe(self._sweep)

    def _schedule_expiry(self) -> None:
        when = self.sessions.next_expiry()
        if when is None or self._loop is None or self._stopped:
            return
        if self._expiry_timer is not None:
            self._expiry_timer.cancel()
        self._expiry_timer = self._loop.call_later(max(0.0, when - self.clock.now()),
                                                   self._sweep)

    def _sweep(self) -> None:
        """Expire persistent sessions on the shared clock (spec §1.3)."""
        self._expiry_timer = None
        if self._stopped:
            return
        now = self.clock.now()
        for session in self.sessions.expire(now):
            self.versions.forget(session.client_id)
            pending = self._pending_wills.pop(session.client_id, None)
            if pending is not None:  # the session ended before the Will Delay
                pending[0].cancel()
                self._publish_will(pending[1])
        self.versions.prune(now)
        if self.settings.disconnect_at_principal_expiry:  # the clock may have jumped
            for link in list(self._by_client.values()):
                self._recheck_link(link)
        rate = self.settings.connect_rate_per_client_id
        if rate:
            window = 1.0 / rate
            for cid in [c for c, t in self._last_connect.items() if now - t >= window]:
                del self._last_connect[cid]
        self._schedule_expiry()


def _observed_ssl_object(broker: Broker) -> type[ssl.SSLObject]:
    """An SSLObject class that reports failed handshakes to ``broker`` (TLS_FAILED).

    Python's ssl offers no handshake-failure hook on a server created with
    ``create_server(ssl=...)``; the SSLObject's ``do_handshake`` is where the
    failure surfaces, on asyncio and on uvloop alike.
    """
    ref = weakref.ref(broker)

    class _ObservedSSLObject(ssl.SSLObject):
        def do_handshake(self) -> None:
            try:
                super().do_handshake()
            except (ssl.SSLWantReadError, ssl.SSLWantWriteError):
                raise
            except (ssl.SSLError, OSError) as exc:
                owner = ref()
                if owner is not None:
                    owner._tls_failed(getattr(self, "fleetbench_sni", None), exc)
                raise

    return _ObservedSSLObject


def _call_weak(method: weakref.WeakMethod[Any], arg: Any) -> None:
    """Call a weakly held bound method if its object is alive (listeners outlive brokers)."""
    fn = method()
    if fn is not None:
        fn(arg)
