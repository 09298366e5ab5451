"""A thin paho-mqtt wrapper: mutual TLS, acks awaited with timeouts, request/response.

Why it looks like this (perf-notes, "paho-mqtt traps"):

* one ``ssl.SSLContext`` per identity, shared by every connection that uses it
  (``tls_set()`` per client costs twice the memory and time);
* ``TCP_NODELAY`` is set on every socket once connected (paho never sets it; with Nagle on
  request/response latency suffers badly);
* no ``loop_start()``: every client's socket I/O runs in a :class:`LoopDriver`, one
  selectors loop calling paho's ``loop_read``/``loop_write``/``loop_misc``. A device
  uses the process-wide shared driver; a Locust user can own one and run it from its own
  greenlet, driving thousands of clients from one loop. paho's own loop would also
  reconnect on its own, which a test device must never do.

Callers block on ``threading.Condition`` waits with timeouts (cooperative under gevent).
Everything the transport raises is a :class:`TransportError` whose ``code`` is a short
name (``ConnectionLost``, ``Timeout``...) suitable for a step's error code.
"""

from __future__ import annotations

import functools
import logging
import selectors
import socket
import ssl
import threading
import time
from collections import OrderedDict, deque
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, ClassVar

import paho.mqtt.client as paho
from paho.mqtt.enums import CallbackAPIVersion, MQTTErrorCode

from devices.base import EndpointParams, MqttVersion
from harness import tls_engine

log = logging.getLogger("fleetbench.devices.mqtt")

__all__ = [
    "AckTimeout",
    "ConnectRefused",
    "ConnectionLost",
    "LoopDriver",
    "Message",
    "MqttTransport",
    "PublishRefused",
    "ResponseTimeout",
    "SlotContext",
    "SubscribeRefused",
    "TlsIdentity",
    "TransportError",
    "ssl_context",
]

#: MQTT 5 reason codes that mean "try again later" (Quota exceeded, Connection rate exceeded).
RETRYABLE_CONNECT_CODES = frozenset({0x97, 0x9F})


# --------------------------------------------------------------------------- errors


class TransportError(Exception):
    """The connection failed to do what was asked. Messages never carry payloads."""

    code: ClassVar[str] = "TransportError"


class ConnectRefused(TransportError):
    """No MQTT session: TLS failed, the socket closed before CONNACK, or CONNACK refused.
    ``reason_code`` is the CONNACK code when one came."""

    code = "ConnectRefused"

    def __init__(self, message: str, reason_code: int | None = None) -> None:
        super().__init__(message)
        self.reason_code = reason_code

    @property
    def retryable(self) -> bool:
        return self.reason_code in RETRYABLE_CONNECT_CODES


class ConnectionLost(TransportError):
    """The endpoint closed the connection (e.g. an unauthorized 3.1.1 publish, spec broker §1.9)."""

    code = "ConnectionLost"


class AckTimeout(TransportError):
    code = "Timeout"


class ResponseTimeout(TransportError):
    """No reply on ``accepted``/``rejected`` in time (e.g. not subscribed, spec fleet §1.1)."""

    code = "Timeout"


class SubscribeRefused(TransportError):
    """A SUBACK failure code (MQTT 5 0x87 for a denied filter, 3.1.1 0x80)."""

    code = "SubscribeRefused"

    def __init__(self, refused: Sequence[tuple[str, int]]) -> None:
        text = ", ".join(f"{flt} (0x{rc:02X})" for flt, rc in refused)
        super().__init__(f"subscription refused: {text}")
        self.refused = tuple(refused)


class PublishRefused(TransportError):
    """An MQTT 5 PUBACK failure code (0x87 Not authorized for a denied publish)."""

    code = "PublishRefused"

    def __init__(self, topic: str, reason_code: int) -> None:
        super().__init__(f"publish to {topic} refused (0x{reason_code:02X})")
        self.topic = topic
        self.reason_code = reason_code


# --------------------------------------------------------------------------- TLS


@dataclass(frozen=True)
class TlsIdentity:
    """Who a connection is: the CA it trusts, its certificate and key (paths), and how it
    names the server (``server_name``: SNI + hostname check; ``alpn``)."""

    ca_file: Path
    cert_file: Path
    key_file: Path
    server_name: str | None = None
    alpn: tuple[str, ...] = ()

    @classmethod
    def for_endpoint(cls, endpoint: EndpointParams, cert_file: Path,
                     key_file: Path) -> TlsIdentity:
        return cls(Path(endpoint.ca_file), Path(cert_file), Path(key_file),
                   endpoint.server_name, tuple(endpoint.alpn))


class _NamedContext(ssl.SSLContext):
    """An SSLContext that sends ``server_name`` as SNI and checks the server certificate
    against it, whatever host the socket connects to (paho passes its host)."""

    server_name: str | None = None

    def wrap_socket(self, sock: Any, *args: Any, **kwargs: Any) -> Any:  # type: ignore[override]
        if self.server_name:
            kwargs["server_hostname"] = self.server_name
        return super().wrap_socket(sock, *args, **kwargs)


def _stamp(path: Path) -> tuple[int, int, int]:
    try:
        st = path.stat()
    except OSError as exc:
        raise ConnectRefused(f"cannot read {path}: {exc.strerror}") from None
    return st.st_ino, st.st_mtime_ns, st.st_size


def ssl_context(identity: TlsIdentity) -> ssl.SSLContext:
    """The shared client context of ``identity`` (rebuilt when one of its files changes)."""
    stamps = tuple(_stamp(p) for p in (identity.ca_file, identity.cert_file,
                                       identity.key_file))
    return _build_context(identity, stamps)


@functools.lru_cache(maxsize=4096)
def _build_context(identity: TlsIdentity,
                   stamps: tuple[tuple[int, int, int], ...]) -> ssl.SSLContext:
    ctx = _trusting_context(identity.ca_file, identity.server_name, identity.alpn)
    _load_identity(ctx, identity.cert_file, identity.key_file)
    return ctx


def _trusting_context(ca_file: Path, server_name: str | None,
                      alpn: tuple[str, ...]) -> _NamedContext:
    """A client context that trusts ``ca_file`` and names the server, without an identity."""
    ctx = _NamedContext(ssl.PROTOCOL_TLS_CLIENT)
    ctx.minimum_version = ssl.TLSVersion.TLSv1_2
    try:
        ctx.load_verify_locations(cafile=str(ca_file))
    except (ssl.SSLError, OSError) as exc:
        raise _ca_refused(ca_file, exc) from None
    if alpn:
        ctx.set_alpn_protocols(list(alpn))
    ctx.server_name = server_name
    return ctx


def _ca_refused(ca_file: Path, exc: Exception) -> ConnectRefused:
    """A CA file that cannot be loaded, by either engine."""
    why = (getattr(exc, "reason", None) or getattr(exc, "strerror", None) or str(exc)
           or type(exc).__name__)
    return ConnectRefused(f"cannot load the CA {ca_file.name}: {why}")


def _load_identity(ctx: ssl.SSLContext, cert_file: Path, key_file: Path) -> None:
    """Present ``cert_file`` + ``key_file`` on ``ctx`` (either engine); failures as
    :class:`ConnectRefused` whose text names the failing step, never the key material."""
    try:
        if isinstance(ctx, tls_engine.EngineContext):
            ctx.load_identity_files(cert_file, key_file)
        else:
            ctx.load_cert_chain(str(cert_file), str(key_file))
    except (ssl.SSLError, OSError) as exc:
        raise ConnectRefused(
            f"cannot load TLS identity {cert_file.name}/{key_file.name}: "
            f"{getattr(exc, 'reason', None) or type(exc).__name__}") from None


class SlotContext:
    """One client context reused for the successive identities of one device slot.

    A load generator's slot is a new device every flow, each with its own certificate. On
    Python's ssl (OpenSSL 3.0 here) a fresh ``SSLContext`` per certificate costs ~1.1 ms
    of CPU and loading a key and certificate into one ~0.7 ms; the slot's context runs on
    the bundled OpenSSL instead (:mod:`harness.tls_engine`), built once (CA, SNI, ALPN),
    and takes each device's key and certificate in ~0.1 ms. An identity is applied to a
    connection when the connection is made (``wrap_socket``): a connection keeps the
    identity it was made with whatever the slot loads later, so the slot must make each
    connection (``MqttTransport.connect``) before it calls :meth:`load` for the next
    identity, which a slot running one flow at a time does.
    """

    def __init__(self, ca_file: Path, server_name: str | None = None,
                 alpn: tuple[str, ...] = ()) -> None:
        try:
            self._ctx = tls_engine.client_context([Path(ca_file)], server_hostname=server_name,
                                                  alpn=tuple(alpn))
        except (OSError, ValueError) as exc:
            raise _ca_refused(Path(ca_file), exc) from None

    @classmethod
    def for_endpoint(cls, endpoint: EndpointParams) -> SlotContext:
        return cls(Path(endpoint.ca_file), endpoint.server_name, tuple(endpoint.alpn))

    def load(self, identity: TlsIdentity) -> ssl.SSLContext:
        """The context, now presenting ``identity``'s certificate and key."""
        _load_identity(self._ctx, identity.cert_file, identity.key_file)
        return self._ctx


# --------------------------------------------------------------------------- loop driver


class LoopDriver:
    """One selectors loop doing the socket I/O of many paho clients.

    paho tells the driver about sockets through its ``on_socket_*`` callbacks (from any
    thread); the driver applies those registrations on its own thread, so the selector
    is only ever touched there. Use :meth:`shared` for the process-wide driver (started
    on first use), or build one and call :meth:`run_once` / :meth:`run_forever` from the
    thread or greenlet that should own the I/O (a Locust user).

    ``cooperative=True`` is for a driver whose callers all run on the driver's own OS
    thread (gevent greenlets, as in a Locust process): paho then writes each packet at
    once from the greenlet that queued it, instead of telling the driver to watch the
    socket for writing and waiting for the driver's next turn (three callbacks, a wake-up
    and two selector changes per packet). Only a write the socket could not take whole is
    left to the driver (:meth:`wrote`). Never use it with threads: an SSL socket must not
    be written from one thread while another reads it.
    """

    _shared: ClassVar[LoopDriver | None] = None
    _shared_lock: ClassVar[threading.Lock] = threading.Lock()

    def __init__(self, misc_interval: float = 1.0, *, cooperative: bool = False) -> None:
        self.cooperative = cooperative
        self._selector = selectors.DefaultSelector()
        self._ops: deque[Callable[[], None]] = deque()
        self._ops_lock = threading.Lock()
        self._wake_r, self._wake_w = socket.socketpair()
        self._wake_r.setblocking(False)
        self._wake_w.setblocking(False)
        self._selector.register(self._wake_r, selectors.EVENT_READ, None)
        self._socks: dict[paho.Client, Any] = {}
        self._writing: set[paho.Client] = set()  # registered for EVENT_WRITE (cooperative)
        self._misc_interval = misc_interval
        self._last_misc = time.monotonic()
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    @classmethod
    def shared(cls) -> LoopDriver:
        """The process-wide driver, running in a daemon thread."""
        with cls._shared_lock:
            if cls._shared is None or not cls._shared.running:
                cls._shared = cls()
                cls._shared.start()
            return cls._shared

    # -- paho callbacks (any thread) ---------------------------------------------------------
    def attach(self, client: paho.Client) -> None:
        """Route ``client``'s socket through this loop (before ``client.connect``)."""
        client.on_socket_open = self._on_open
        client.on_socket_close = self._on_close
        if not self.cooperative:  # without them, paho writes at once (see the class doc)
            client.on_socket_register_write = self._on_register_write
            client.on_socket_unregister_write = self._on_unregister_write

    def wrote(self, client: paho.Client) -> None:
        """``client`` just queued a packet (caller's thread). A cooperative driver watches
        its socket for writing if paho could not write it all at once."""
        if self.cooperative and client.want_write():
            self.call_soon(lambda: self._sync_write(client))

    def call_soon(self, fn: Callable[[], None]) -> None:
        """Run ``fn`` on the loop's thread at its next turn."""
        with self._ops_lock:
            self._ops.append(fn)
        try:
            self._wake_w.send(b"\0")
        except (BlockingIOError, OSError):
            pass  # a wake-up is already pending, or the driver is closed

    def _on_open(self, client: paho.Client, _userdata: Any, sock: Any) -> None:
        try:  # once connected (paho has done TCP + TLS): no Nagle for request/response
            sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        except OSError:
            pass
        self.call_soon(lambda: self._register(client, sock))

    def _on_close(self, client: paho.Client, _userdata: Any, sock: Any) -> None:
        self.call_soon(lambda: self._unregister(client, sock))

    def _on_register_write(self, client: paho.Client, _userdata: Any, sock: Any) -> None:
        self.call_soon(lambda: self._want_write(client, sock, True))

    def _on_unregister_write(self, client: paho.Client, _userdata: Any, sock: Any) -> None:
        self.call_soon(lambda: self._want_write(client, sock, False))

    # -- loop thread ---------------------------------------------------------------------------
    def _register(self, client: paho.Client, sock: Any) -> None:
        if sock.fileno() < 0:
            return
        try:
            stale = self._selector.get_key(sock.fileno())
        except KeyError:
            stale = None
        if stale is not None:
            self._selector.unregister(stale.fileobj)
        events = selectors.EVENT_READ | (selectors.EVENT_WRITE if client.want_write() else 0)
        try:
            self._selector.register(sock, events, client)
        except (ValueError, OSError):  # closed before we got to it: its close op follows
            return
        self._socks[client] = sock

    def _unregister(self, client: paho.Client, sock: Any) -> None:
        if self._socks.get(client) is sock:
            del self._socks[client]
            self._writing.discard(client)
        try:
            self._selector.unregister(sock)
        except (KeyError, ValueError, OSError):
            pass

    def _want_write(self, client: paho.Client, sock: Any, want: bool) -> None:
        current = self._socks.get(client)
        if current is None or current is not sock:
            return
        events = selectors.EVENT_READ | (selectors.EVENT_WRITE if want else 0)
        try:
            self._selector.modify(current, events, client)
        except (KeyError, ValueError, OSError):  # closed under us: its close op follows
            pass

    def _sync_write(self, client: paho.Client) -> None:
        """Cooperative mode: watch the socket for writing exactly while paho has bytes left."""
        sock = self._socks.get(client)
        if sock is None:
            return
        want = client.want_write()
        if want != (client in self._writing):
            if want:
                self._writing.add(client)
            else:
                self._writing.discard(client)
            self._want_write(client, sock, want)

    def _apply_ops(self) -> None:
        while True:
            with self._ops_lock:
                if not self._ops:
                    return
                op = self._ops.popleft()
            try:
                op()
            except Exception:  # one bad client must not stop the loop
                log.exception("event=driver_op_failed")

    def _guard(self, client: paho.Client, call: Callable[[], Any]) -> None:
        try:
            call()
        except Exception:  # a callback bug closes that client only
            log.exception("event=client_io_failed")
            sock = self._socks.get(client)
            if sock is not None:
                _hard_close(sock)

    def run_once(self, timeout: float = 0.5) -> None:
        """Apply pending registrations, wait up to ``timeout`` for I/O, serve it."""
        self._apply_ops()
        for key, mask in self._selector.select(timeout):
            if key.fileobj is self._wake_r:
                try:
                    while self._wake_r.recv(4096):
                        pass
                except (BlockingIOError, OSError):
                    pass
                continue
            client: paho.Client = key.data
            if mask & selectors.EVENT_WRITE:
                self._guard(client, client.loop_write)
            if mask & selectors.EVENT_READ:
                self._guard(client, client.loop_read)
                # TLS may hold whole packets in its buffer that select() cannot see.
                sock: Any = key.fileobj
                while client.socket() is sock and _pending(sock) > 0:
                    self._guard(client, client.loop_read)
            if self.cooperative and (mask & selectors.EVENT_WRITE or client.want_write()):
                self._sync_write(client)  # e.g. a PUBACK written from loop_read
        now = time.monotonic()
        if now - self._last_misc >= self._misc_interval:
            self._last_misc = now
            for client in list(self._socks):
                self._guard(client, client.loop_misc)
                if self.cooperative:
                    self._sync_write(client)
        self._apply_ops()

    def run_forever(self) -> None:
        """Serve until :meth:`stop` (call from the thread/greenlet that owns the I/O)."""
        while not self._stop.is_set():
            self.run_once(0.5)

    @property
    def running(self) -> bool:
        return self._thread is not None and self._thread.is_alive() and not self._stop.is_set()

    def start(self) -> None:
        """Serve from a daemon thread."""
        self._thread = threading.Thread(target=self.run_forever, name="fleetbench-mqtt-loop",
                                        daemon=True)
        self._thread.start()

    def stop(self, timeout: float = 5.0) -> None:
        self._stop.set()
        self.call_soon(lambda: None)
        if self._thread is not None and self._thread is not threading.current_thread():
            self._thread.join(timeout)


def _pending(sock: Any) -> int:
    """Decrypted bytes the TLS layer holds (0 for a plain or closed socket)."""
    try:
        return int(sock.pending())
    except (AttributeError, OSError, ValueError):
        return 0


def _hard_close(sock: Any) -> None:
    """Drop the TCP connection without an MQTT DISCONNECT (a power cut, seen from the
    endpoint). The base-class shutdown leaves the TLS object alone; paho's next read sees
    EOF and reports the loss through ``on_disconnect``."""
    try:
        socket.socket.shutdown(getattr(sock, "tcp_socket", sock), socket.SHUT_RDWR)
    except OSError:
        pass


# --------------------------------------------------------------------------- transport


def _debug_line(line: str) -> None:
    log.debug("%s", line)


@dataclass(frozen=True)
class Message:
    topic: str
    payload: bytes = field(repr=False)
    qos: int = 0
    retain: bool = False


@dataclass
class _Waiter:
    topics: frozenset[str]
    message: Message | None = None


class MqttTransport:
    """One MQTT connection of one device (clean session, QoS 0/1).

    Not reusable: after :meth:`disconnect` or a loss, make a new transport. ``log`` gets
    short secret-free lines (``event=connected client_id=...``) for the device's log.
    """

    def __init__(self, client_id: str, endpoint: EndpointParams, identity: TlsIdentity, *,
                 version: MqttVersion = MqttVersion.V3_1_1, keepalive: int = 60,
                 driver: LoopDriver | None = None,
                 log_line: Callable[[str], None] | None = None,
                 context: ssl.SSLContext | None = None) -> None:
        """``context`` is the client context to connect with, already presenting
        ``identity`` (a load slot's :class:`SlotContext`, or a context its caller shares);
        by default, :func:`ssl_context` of ``identity``."""
        self.client_id = client_id
        self.endpoint = endpoint
        self.identity = identity
        self.version = MqttVersion(version)
        self.keepalive = keepalive
        self._driver = driver
        self._context = context
        self._log = log_line or _debug_line
        #: Whether ``_log`` lines are worth formatting (a load run makes ~10 per flow).
        self._logging = log_line is not None or log.isEnabledFor(logging.DEBUG)
        self._cond = threading.Condition()
        self._client: paho.Client | None = None
        self._connack: int | None = None
        self._connected = False
        self._closed = False
        self._close_reason: str | None = None
        self._acks: OrderedDict[int, list[int]] = OrderedDict()
        self._waiters: list[_Waiter] = []
        self._inbox: deque[Message] = deque(maxlen=1000)
        self._subscribed: set[str] = set()

    def __repr__(self) -> str:
        return f"MqttTransport(client_id={self.client_id!r}, cert={self.identity.cert_file.name})"

    # -- state -------------------------------------------------------------------------------
    @property
    def connected(self) -> bool:
        with self._cond:
            return self._connected

    @property
    def close_reason(self) -> str | None:
        with self._cond:
            return self._close_reason

    @property
    def subscriptions(self) -> frozenset[str]:
        with self._cond:
            return frozenset(self._subscribed)

    def _wait(self, predicate: Callable[[], bool], deadline: float) -> bool:
        """Wait (lock held) until ``predicate`` or the deadline; True if it holds."""
        while not predicate():
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                return False
            self._cond.wait(remaining)
        return True

    def _lost(self, what: str) -> ConnectionLost:
        return ConnectionLost(f"{what}: {self._close_reason or 'connection closed'}")

    # -- paho callbacks (loop thread) ----------------------------------------------------------
    def _on_connect(self, _c: Any, _u: Any, _flags: Any, reason: Any, _props: Any) -> None:
        with self._cond:
            self._connack = int(reason.value)
            self._connected = not reason.is_failure
            self._cond.notify_all()

    def _on_disconnect(self, _c: Any, _u: Any, flags: Any, reason: Any, _props: Any) -> None:
        with self._cond:
            if not self._closed and self._close_reason is None:
                if getattr(flags, "is_disconnect_packet_from_server", False):
                    value = int(getattr(reason, "value", 0) or 0)
                    self._close_reason = (
                        f"closed by the endpoint (DISCONNECT 0x{value:02X} {reason})")
                else:
                    self._close_reason = "closed by the endpoint"
            self._connected = False
            self._closed = True
            self._cond.notify_all()

    def _on_subscribe(self, _c: Any, _u: Any, mid: int, codes: Any, _props: Any) -> None:
        self._ack(mid, [int(c.value) for c in codes])

    def _on_publish(self, _c: Any, _u: Any, mid: int, reason: Any, _props: Any) -> None:
        self._ack(mid, [int(getattr(reason, "value", 0) or 0)])

    def _ack(self, mid: int, codes: list[int]) -> None:
        with self._cond:
            self._acks[mid] = codes
            while len(self._acks) > 1024:  # QoS 0 "acks" nobody waits for
                self._acks.popitem(last=False)
            self._cond.notify_all()

    def _on_message(self, _c: Any, _u: Any, msg: Any) -> None:
        message = Message(msg.topic, bytes(msg.payload), int(msg.qos), bool(msg.retain))
        with self._cond:
            for waiter in self._waiters:
                if waiter.message is None and message.topic in waiter.topics:
                    waiter.message = message
                    break
            else:
                self._inbox.append(message)
            self._cond.notify_all()

    # -- operations (caller's thread) --------------------------------------------------------
    def connect(self, timeout: float = 10.0) -> None:
        """TCP + TLS (blocking, in this thread) then CONNECT; returns once CONNACK accepts."""
        if self._client is not None:
            raise TransportError("a transport connects once; make a new one")
        context = self._context or ssl_context(self.identity)
        v5 = self.version is MqttVersion.V5
        client = paho.Client(
            CallbackAPIVersion.VERSION2, client_id=self.client_id,
            protocol=paho.MQTTv5 if v5 else paho.MQTTv311,
            clean_session=None if v5 else True, reconnect_on_failure=False)
        client.tls_set_context(context)
        client.connect_timeout = timeout
        client.on_connect = self._on_connect
        client.on_disconnect = self._on_disconnect
        client.on_subscribe = self._on_subscribe
        client.on_publish = self._on_publish
        client.on_message = self._on_message
        driver = self._driver or LoopDriver.shared()
        driver.attach(client)
        self._client, self._driver = client, driver
        deadline = time.monotonic() + timeout
        target = f"{self.endpoint.host}:{self.endpoint.port}"
        try:
            if v5:
                client.connect(self.endpoint.host, self.endpoint.port, self.keepalive,
                               clean_start=True)
            else:
                client.connect(self.endpoint.host, self.endpoint.port, self.keepalive)
        except ssl.SSLError as exc:
            self._mark_closed(f"TLS handshake failed: {exc.reason or type(exc).__name__}")
            raise ConnectRefused(f"{target}: {self._close_reason}") from None
        except OSError as exc:
            self._mark_closed(f"cannot reach {target}: {exc.strerror or type(exc).__name__}")
            raise ConnectRefused(self._close_reason or "") from None
        self._wrote(client)  # CONNECT
        with self._cond:
            done = self._wait(lambda: self._connack is not None or self._closed, deadline)
            connack = self._connack
        if not done:
            self.abort()
            raise AckTimeout(f"no CONNACK from {target} within {timeout:.1f}s")
        if connack is None:
            raise ConnectRefused(f"{target} closed the connection without CONNACK "
                                 f"({self.close_reason})")
        if connack != 0:
            raise ConnectRefused(f"{target} refused CONNECT (0x{connack:02X})",
                                 reason_code=connack)
        if self._logging:
            self._log(f"event=connected client_id={self.client_id} "
                      f"mqtt={'5' if v5 else '3.1.1'} cert={self.identity.cert_file.name}")

    def _mark_closed(self, reason: str) -> None:
        with self._cond:
            self._closed = True
            self._connected = False
            self._close_reason = reason
            self._cond.notify_all()

    def _wrote(self, client: paho.Client) -> None:
        if self._driver is not None:
            self._driver.wrote(client)

    def _require_client(self) -> paho.Client:
        if self._client is None:
            raise TransportError("not connected yet")
        return self._client

    def _wait_ack(self, mid: int, timeout: float, what: str) -> list[int]:
        deadline = time.monotonic() + timeout
        with self._cond:
            self._wait(lambda: mid in self._acks or self._closed, deadline)
            if mid in self._acks:
                return self._acks.pop(mid)
            if self._closed:
                raise self._lost(what)
        raise AckTimeout(f"no ack for {what} within {timeout:.1f}s")

    def subscribe(self, filters: Iterable[str], qos: int = 1, timeout: float = 10.0) -> None:
        """SUBSCRIBE and wait for the SUBACK; any failure code raises SubscribeRefused."""
        client = self._require_client()
        wanted = list(filters)
        rc, mid = client.subscribe([(f, qos) for f in wanted])
        self._wrote(client)
        if rc != MQTTErrorCode.MQTT_ERR_SUCCESS or mid is None:
            with self._cond:
                raise self._lost(f"SUBSCRIBE {wanted}")
        codes = self._wait_ack(mid, timeout, f"SUBSCRIBE {wanted}")
        refused = [(f, c) for f, c in zip(wanted, codes, strict=False) if c >= 0x80]
        if refused:
            self._log(f"event=subscribe_refused filters={[f for f, _ in refused]}")
            raise SubscribeRefused(refused)
        with self._cond:
            self._subscribed.update(wanted)
        if self._logging:
            self._log(f"event=subscribed filters={wanted}")

    def publish(self, topic: str, payload: bytes, qos: int = 1, timeout: float = 10.0) -> None:
        """PUBLISH; at QoS 1 wait for the PUBACK (MQTT 5 failure codes raise PublishRefused;
        a 3.1.1 endpoint closes the connection instead, raising ConnectionLost)."""
        client = self._require_client()
        info = client.publish(topic, payload, qos=qos)
        self._wrote(client)
        if info.rc != MQTTErrorCode.MQTT_ERR_SUCCESS:
            with self._cond:
                raise self._lost(f"PUBLISH {topic}")
        if self._logging:
            self._log(f"event=publish topic={topic} bytes={len(payload)} qos={qos}")
        if qos == 0:
            return
        codes = self._wait_ack(info.mid, timeout, f"PUBLISH {topic}")
        code = codes[0] if codes else 0
        if code >= 0x80:
            self._log(f"event=publish_refused topic={topic} reason=0x{code:02X}")
            raise PublishRefused(topic, code)

    def request(self, topic: str, payload: bytes, *, accepted: str, rejected: str,
                timeout: float = 10.0) -> Message:
        """Publish a request and return the first reply on ``accepted`` or ``rejected``.

        Subscribing first is the caller's business (a device may skip it on purpose):
        without the subscription the endpoint drops the reply and this times out.
        """
        deadline = time.monotonic() + timeout
        waiter = _Waiter(frozenset({accepted, rejected}))
        with self._cond:
            self._waiters.append(waiter)
        try:
            self.publish(topic, payload, qos=1, timeout=timeout)
            with self._cond:
                self._wait(lambda: waiter.message is not None or self._closed, deadline)
                if waiter.message is not None:
                    reply = waiter.message
                elif self._closed:
                    raise self._lost(f"waiting for a reply to {topic}")
                else:
                    raise ResponseTimeout(f"no reply to {topic} within {timeout:.1f}s")
        finally:
            with self._cond:
                self._waiters.remove(waiter)
        if self._logging:
            self._log(f"event=reply topic={reply.topic} bytes={len(reply.payload)}")
        return reply

    def next_message(self, timeout: float = 10.0) -> Message:
        """The next message that no request was waiting for."""
        deadline = time.monotonic() + timeout
        with self._cond:
            if not self._wait(lambda: bool(self._inbox) or self._closed, deadline):
                raise ResponseTimeout(f"no message within {timeout:.1f}s")
            if self._inbox:
                return self._inbox.popleft()
            raise self._lost("waiting for a message")

    def disconnect(self, timeout: float = 5.0) -> None:
        """Send DISCONNECT and wait for the socket to close (falls back to :meth:`abort`)."""
        client = self._client
        if client is None or self._closed:
            return
        with self._cond:
            self._close_reason = "disconnected by the device"
        client.disconnect()
        self._wrote(client)
        deadline = time.monotonic() + timeout
        with self._cond:
            closed = self._wait(lambda: self._closed, deadline)
        if not closed:
            self.abort()
        if self._logging:
            self._log(f"event=disconnected client_id={self.client_id}")

    def abort(self, timeout: float = 5.0) -> None:
        """Drop the connection without DISCONNECT, as a power cut does."""
        client, driver = self._client, self._driver
        if client is None or driver is None:
            return
        with self._cond:
            if self._closed:
                return
            self._close_reason = "dropped by the device"
        sock = client.socket()
        if sock is not None:
            driver.call_soon(lambda: _hard_close(sock))
        deadline = time.monotonic() + timeout
        with self._cond:
            self._wait(lambda: self._closed, deadline)
        if self._logging:
            self._log(f"event=dropped client_id={self.client_id}")
