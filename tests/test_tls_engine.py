"""harness.tls_engine: TLS on the bundled OpenSSL behind the stdlib interfaces.

An echo server runs on a uvloop loop in a background thread (``create_server`` with an
engine server context); clients are stdlib ``ssl`` contexts and engine contexts, driven by
uvloop (the ``wrap_bio`` path), by hand over memory BIOs, or as paho does (``wrap_socket``).
"""

from __future__ import annotations

import asyncio
import datetime as dt
import functools
import ipaddress
import os
import queue
import socket
import ssl
import threading
import time
from collections.abc import Callable, Iterator, Mapping, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, cast

import pytest
import uvloop
from cryptography import x509
from cryptography.hazmat.backends.openssl import backend
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.x509.oid import NameOID
from hypothesis import given, settings
from hypothesis import strategies as st

from harness import pki, tls_engine
from harness.tls_engine import EngineContext, PeerCertificate, hostname_matches

ALPN = "x-amzn-mqtt-ca"
WAIT = 5.0
UTC = dt.timezone.utc
Identity = tuple[Any, x509.Certificate]


def issue(ca: pki.CertificateAuthority, key: Any, sans: Sequence[str] = ("localhost", "127.0.0.1"),
          *, cn: str = "cn.example", serial: int = 0x5A17C0DE,
          not_before: dt.datetime = dt.datetime(2024, 11, 15, 10, 20, 30, tzinfo=UTC),
          not_after: dt.datetime = dt.datetime(2099, 12, 25, 23, 0, 0, tzinfo=UTC),
          ) -> x509.Certificate:
    """A server certificate with every field chosen (pki's dates and serials are random)."""
    builder = (
        x509.CertificateBuilder()
        .subject_name(x509.Name([x509.NameAttribute(NameOID.ORGANIZATION_NAME, "fleetbench"),
                                 x509.NameAttribute(NameOID.COMMON_NAME, cn)]))
        .issuer_name(ca.cert.subject).public_key(key.public_key()).serial_number(serial)
        .not_valid_before(not_before).not_valid_after(not_after)
        .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
        .add_extension(x509.SubjectKeyIdentifier.from_public_key(key.public_key()), critical=False)
        .add_extension(x509.AuthorityKeyIdentifier.from_issuer_public_key(
            ca.key.public_key()), critical=False)
    )
    names: list[x509.GeneralName] = []
    for name in sans:
        try:
            names.append(x509.IPAddress(ipaddress.ip_address(name)))
        except ValueError:
            names.append(x509.DNSName(name))
    if names:
        builder = builder.add_extension(x509.SubjectAlternativeName(names), critical=False)
    return builder.sign(ca.key, hashes.SHA256())


@dataclass(frozen=True)
class Env:
    ca: pki.CertificateAuthority
    other_ca: pki.CertificateAuthority
    server: Identity
    device: Identity
    dir: Path

    def pem_file(self, identity: Identity, *, cert_first: bool = False) -> Path:
        """``identity`` as one PEM file (key then certificate unless ``cert_first``)."""
        key, cert = identity
        parts = [pki.private_key_pem(key), pki.certificate_pem(cert)]
        path = self.dir / f"{pki.certificate_id(cert)[:16]}-{cert_first}.pem"
        pki.write_secret(path, "".join(parts[::-1] if cert_first else parts))
        return path

    def new_device(self, ca: pki.CertificateAuthority | None = None, **validity: Any) -> Identity:
        key = pki.generate_ec_key()
        return key, (ca or self.ca).issue_device_certificate(key.public_key(), **validity)


@pytest.fixture(scope="module")
def env(tmp_path_factory: pytest.TempPathFactory) -> Env:
    ca, server_key = pki.CertificateAuthority.create(), pki.generate_ec_key()
    device_key = pki.generate_ec_key()
    return Env(ca=ca, other_ca=pki.CertificateAuthority.create("another CA"),
               server=(server_key, issue(ca, server_key)),
               device=(device_key, ca.issue_device_certificate(device_key.public_key())),
               dir=tmp_path_factory.mktemp("tls"))


# --------------------------------------------------------------------------- clients


def std_client(env: Env, *, alpn: Sequence[str] = (ALPN,), identity: Identity | None = None,
               anchors: str | None = None, use_identity: bool = True) -> ssl.SSLContext:
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
    ctx.load_verify_locations(cadata=anchors or env.ca.pem)
    if use_identity:
        ctx.load_cert_chain(env.pem_file(identity or env.device))
    if alpn:
        ctx.set_alpn_protocols(list(alpn))
    return ctx


def engine_client(env: Env, *, alpn: Sequence[str] = (ALPN,), identity: Identity | None = None,
                  anchors: str | None = None, use_identity: bool = True,
                  server_hostname: str | None = None) -> EngineContext:
    ctx = tls_engine.client_context(cadata=[anchors or env.ca.pem], alpn=alpn,
                                    server_hostname=server_hostname)
    if use_identity:
        ctx.use_identity(*(identity or env.device))
    return ctx


CLIENTS: dict[str, Callable[..., ssl.SSLContext]] = {"stdlib": std_client, "engine": engine_client}
MakeClient = Callable[..., ssl.SSLContext]


@pytest.fixture(params=list(CLIENTS))
def make_client(request: pytest.FixtureRequest, env: Env) -> MakeClient:
    return functools.partial(CLIENTS[request.param], env)


# --------------------------------------------------------------------------- echo server


@dataclass
class Conn:
    """What the server side of one connection saw."""

    alpn: str | None
    version: str | None
    peer_der: bytes | None
    eof: bool = False
    lost: threading.Event = field(default_factory=threading.Event)
    lost_exc: BaseException | None = None


class Echo(asyncio.Protocol):
    def __init__(self, conns: queue.Queue[Conn]) -> None:
        self.conns = conns

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = cast(asyncio.Transport, transport)
        tls = transport.get_extra_info("ssl_object")
        self.conn = Conn(tls.selected_alpn_protocol(), tls.version(),
                         tls.getpeercert(binary_form=True))
        self.conns.put(self.conn)

    def data_received(self, data: bytes) -> None:
        self.transport.write(data)

    def eof_received(self) -> None:
        self.conn.eof = True

    def connection_lost(self, exc: BaseException | None) -> None:
        self.conn.lost_exc = exc
        self.conn.lost.set()


class Server:
    """An engine echo server: connections, SNI names and handshake failures as queues."""

    def __init__(self, loop: asyncio.AbstractEventLoop, ctx: EngineContext) -> None:
        self.loop, self.ctx = loop, ctx
        self.conns: queue.Queue[Conn] = queue.Queue()
        self.names: queue.Queue[str | None] = queue.Queue()
        self.failures: queue.Queue[BaseException] = queue.Queue()
        ctx.on_server_name = lambda _tls, name: self.names.put(name)
        ctx.on_failure = lambda _tls, exc: self.failures.put(exc)
        start = loop.create_server(lambda: Echo(self.conns), "127.0.0.1", 0, ssl=ctx)
        self.server = asyncio.run_coroutine_threadsafe(start, loop).result(WAIT)
        self.port: int = self.server.sockets[0].getsockname()[1]

    def conn(self) -> Conn:
        return self.conns.get(timeout=WAIT)

    def failure(self) -> BaseException:
        return self.failures.get(timeout=WAIT)


@pytest.fixture(scope="module")
def loop() -> Iterator[asyncio.AbstractEventLoop]:
    loop = uvloop.new_event_loop()
    thread = threading.Thread(target=loop.run_forever, daemon=True)
    thread.start()
    yield loop
    loop.call_soon_threadsafe(loop.stop)
    thread.join(WAIT)
    loop.close()


@pytest.fixture
def serve(loop: asyncio.AbstractEventLoop, env: Env) -> Iterator[Callable[..., Server]]:
    servers: list[Server] = []

    def start(**options: Any) -> Server:
        key, cert = env.server
        options = {"anchors": [env.ca.pem], "key": key, "cert": cert, "alpn": [ALPN], **options}
        servers.append(Server(loop, tls_engine.server_context(**options)))
        return servers[-1]

    yield start
    for server in servers:
        loop.call_soon_threadsafe(server.server.close)


@pytest.fixture
def server(serve: Callable[..., Server]) -> Server:
    return serve()


# --------------------------------------------------------------------------- client drivers


@dataclass
class Seen:
    """What a uvloop client saw of one exchange."""

    alpn: str | None
    version: str | None
    data: bytes
    has_ticket: bool | None  # None: the client's TLS object has no session (engine)


def exchange(port: int, ctx: ssl.SSLContext, *messages: bytes,
             hostname: str = "localhost") -> Seen:
    """Connect with uvloop (``ctx.wrap_bio``), send ``messages``, read their echo, close."""

    async def main() -> Seen:
        reader, writer = await asyncio.open_connection(
            "127.0.0.1", port, ssl=ctx, server_hostname=hostname, ssl_handshake_timeout=WAIT)
        tls = writer.get_extra_info("ssl_object")
        for message in messages:
            writer.write(message)
        await writer.drain()
        data = await asyncio.wait_for(reader.readexactly(sum(map(len, messages))), WAIT)
        session = getattr(tls, "session", None)
        seen = Seen(tls.selected_alpn_protocol(), tls.version(), data,
                    None if session is None else session.has_ticket)
        writer.close()
        await asyncio.wait_for(writer.wait_closed(), WAIT)
        return seen

    return uvloop.run(main())


def refused(port: int, ctx: ssl.SSLContext) -> None:
    """A client the server must turn away: no echo, whichever way the refusal shows."""
    with pytest.raises((ssl.SSLError, ConnectionError, asyncio.IncompleteReadError)):
        exchange(port, ctx, b"ping")


def coalesced_exchange(port: int, ctx: ssl.SSLContext, messages: Sequence[bytes]) -> bytes:
    """Handshake over memory BIOs, then send the client's last flight *and* ``messages`` in
    one ``sendall``: the server gets application data in the same read as the handshake's
    end. Returns the echo (a stuck server shows as a socket timeout)."""
    incoming, outgoing = ssl.MemoryBIO(), ssl.MemoryBIO()
    tls: Any = ctx.wrap_bio(incoming, outgoing, server_hostname="localhost")
    with socket.create_connection(("127.0.0.1", port), timeout=WAIT) as sock:
        while True:
            try:
                tls.do_handshake()
                break
            except ssl.SSLWantReadError:
                sock.sendall(outgoing.read())
                data = sock.recv(65536)
                if data:
                    incoming.write(data)
                else:
                    incoming.write_eof()  # the handshake then fails instead of spinning
        for message in messages:
            tls.write(message)
        sock.sendall(outgoing.read())
        echoed, expected = b"", sum(map(len, messages))
        while len(echoed) < expected:
            try:
                echoed += tls.read(65536)
            except ssl.SSLWantReadError:
                data = sock.recv(65536)
                assert data, "server closed before echoing"
                incoming.write(data)
        return echoed


def memory_handshake(client_ctx: ssl.SSLContext, server_ctx: ssl.SSLContext,
                     hostname: str = "localhost") -> Any:
    """Run a handshake between two ``wrap_bio`` objects in memory; the client's object.
    Raises the client's handshake error (the server's is ignored: a client that gave up
    leaves the server waiting)."""
    bios = [ssl.MemoryBIO() for _ in range(4)]
    client = client_ctx.wrap_bio(bios[0], bios[1], server_hostname=hostname)
    server = server_ctx.wrap_bio(bios[2], bios[3], server_side=True)
    done = {client: False, server: False}
    for _ in range(10):
        for tls, out, into in ((client, bios[1], bios[2]), (server, bios[3], bios[0])):
            if not done[tls]:
                try:
                    tls.do_handshake()
                    done[tls] = True
                except ssl.SSLWantReadError:
                    pass
                except ssl.SSLError:
                    if tls is client:
                        raise
                    done[tls] = True
            into.write(out.read())
        if done[client]:
            return client
    raise AssertionError("handshake did not finish")


@contextmanager
def socket_tls(port: int, ctx: EngineContext, hostname: str = "localhost",
               *, handshake: bool = True) -> Iterator[Any]:
    """The paho path: a plain socket wrapped with ``do_handshake_on_connect=False``."""
    sock = socket.create_connection(("127.0.0.1", port), timeout=WAIT)
    with sock, ctx.wrap_socket(sock, do_handshake_on_connect=False,
                               server_hostname=hostname) as tls:
        if handshake:
            tls.do_handshake()
        yield tls


def der(cert: x509.Certificate) -> bytes:
    return cert.public_bytes(serialization.Encoding.DER)


# --------------------------------------------------------------------------- 1. echo server


def test_handshake_selects_alpn_and_tls13(server: Server, make_client: MakeClient) -> None:
    seen = exchange(server.port, make_client(), b"hello", b"world")
    conn = server.conn()
    assert (seen.alpn, seen.version, seen.data) == (ALPN, "TLSv1.3", b"helloworld")
    assert (conn.alpn, conn.version) == (ALPN, "TLSv1.3")
    assert server.failures.empty()


@pytest.mark.parametrize("alpn", [("mqtt",), ()], ids=["other-alpn", "no-alpn"])
def test_client_without_our_alpn_connects_without_alpn(
        server: Server, make_client: MakeClient, alpn: tuple[str, ...]) -> None:
    seen = exchange(server.port, make_client(alpn=alpn), b"ping")
    assert (seen.alpn, seen.data) == (None, b"ping")
    assert server.conn().alpn is None


def test_data_coalesced_with_last_handshake_flight_is_echoed(
        server: Server, make_client: MakeClient) -> None:
    # the bug this pins: records that arrived with the client's Finished sat in the
    # engine's BIO, invisible to uvloop, until more bytes came (they never did)
    assert coalesced_exchange(server.port, make_client(), [b"first|", b"second"]) == (
        b"first|second")


def test_large_message_round_trips(server: Server, make_client: MakeClient) -> None:
    message = os.urandom(200 * 1024)
    assert exchange(server.port, make_client(), message).data == message


def test_clean_close_is_eof_on_server(server: Server, make_client: MakeClient) -> None:
    exchange(server.port, make_client(), b"bye")
    conn = server.conn()
    assert conn.lost.wait(WAIT)
    assert conn.eof and conn.lost_exc is None


# --------------------------------------------------------------------------- 2. server failures


def test_client_certificate_from_another_ca_fails(
        env: Env, server: Server, make_client: MakeClient) -> None:
    refused(server.port, make_client(identity=env.new_device(env.other_ca)))
    failure = server.failure()
    assert isinstance(failure, ssl.SSLCertVerificationError)
    assert "issuer" in failure.verify_message
    assert exchange(server.port, make_client(), b"next").data == b"next"


@pytest.mark.parametrize("check_time", [True, False])
def test_expired_client_certificate(env: Env, serve: Callable[..., Server],
                                    make_client: MakeClient, check_time: bool) -> None:
    server = serve(check_time=check_time)
    now = dt.datetime.now(UTC)
    expired = env.new_device(not_before=now - dt.timedelta(days=10),
                             not_after=now - dt.timedelta(days=1))
    if check_time:
        refused(server.port, make_client(identity=expired))
        failure = server.failure()
        assert isinstance(failure, ssl.SSLCertVerificationError)
        assert "expired" in failure.verify_message
    else:
        assert exchange(server.port, make_client(identity=expired), b"late").data == b"late"
        assert server.conn().peer_der == der(expired[1])
    assert exchange(server.port, make_client(), b"next").data == b"next"


def test_client_without_certificate_fails(server: Server, make_client: MakeClient) -> None:
    refused(server.port, make_client(use_identity=False))
    failure = server.failure()
    assert isinstance(failure, ssl.SSLError)
    assert failure.reason == "PEER_DID_NOT_RETURN_A_CERTIFICATE"
    assert exchange(server.port, make_client(), b"next").data == b"next"


# --------------------------------------------------------------------------- 3. SNI


@pytest.mark.parametrize(("hostname", "sni"), [("localhost", "localhost"), ("127.0.0.1", None)])
def test_on_server_name_gets_the_sni(server: Server, make_client: MakeClient, hostname: str,
                                     sni: str | None) -> None:
    exchange(server.port, make_client(), b"x", hostname=hostname)
    assert server.names.get(timeout=WAIT) == sni


def test_forced_server_hostname_is_sent_and_checked(env: Env, server: Server) -> None:
    # what paho does: it passes its host (an address); the context names the server
    ctx = engine_client(env, server_hostname="localhost")
    with socket_tls(server.port, ctx, "127.0.0.1"):
        assert server.names.get(timeout=WAIT) == "localhost"
    ctx = engine_client(env, server_hostname="wrong.example")
    with pytest.raises(ssl.SSLCertVerificationError), socket_tls(server.port, ctx, "localhost"):
        pass


# --------------------------------------------------------------------------- 4. no tickets


def test_session_is_not_resumed(env: Env, server: Server) -> None:
    ctx = std_client(env)
    with ctx.wrap_socket(socket.create_connection(("127.0.0.1", server.port), timeout=WAIT),
                         server_hostname="localhost") as first:
        first.sendall(b"1")
        assert first.recv(1) == b"1"
        session = first.session
    with ctx.wrap_socket(socket.create_connection(("127.0.0.1", server.port), timeout=WAIT),
                         server_hostname="localhost", session=session) as second:
        second.sendall(b"2")
        assert second.recv(1) == b"2"
        assert not second.session_reused


# --------------------------------------------------------------------------- 5. client checks


@pytest.mark.parametrize("path", ["wrap_bio", "wrap_socket"])
def test_engine_client_rejects_wrong_hostname(env: Env, server: Server, path: str) -> None:
    with pytest.raises(ssl.SSLCertVerificationError) as info:
        if path == "wrap_bio":
            exchange(server.port, engine_client(env), b"x", hostname="wrong.example")
        else:
            with socket_tls(server.port, engine_client(env), "wrong.example"):
                pass
    assert "hostname mismatch" in str(info.value).lower()
    assert "hostname mismatch" in info.value.verify_message.lower()


@pytest.mark.parametrize("path", ["wrap_bio", "wrap_socket"])
def test_engine_client_rejects_server_of_another_ca(env: Env, server: Server,
                                                   path: str) -> None:
    ctx = engine_client(env, anchors=env.other_ca.pem)
    with pytest.raises(ssl.SSLCertVerificationError) as info:
        if path == "wrap_bio":
            exchange(server.port, ctx, b"x")
        else:
            with socket_tls(server.port, ctx):
                pass
    with pytest.raises(ssl.SSLCertVerificationError) as stdlib:
        memory_handshake(std_client(env, anchors=env.other_ca.pem), server.ctx)
    # the server sends its CA along (OpenSSL builds the chain from the trust store, as the
    # stdlib's does): that root is what the client cannot trust
    assert (info.value.verify_code, info.value.verify_message) == (
        stdlib.value.verify_code, stdlib.value.verify_message) == (
        19, "self-signed certificate in certificate chain")
    assert info.value.reason == "CERTIFICATE_VERIFY_FAILED"


def test_hostname_mismatch_message_matches_stdlib(env: Env, server: Server) -> None:
    errors = []
    for client in (std_client, engine_client):
        with pytest.raises(ssl.SSLCertVerificationError) as info:
            memory_handshake(client(env), server.ctx, "wrong.example")
        errors.append((info.value.verify_code, info.value.verify_message))
    assert errors[0] == errors[1]


# --------------------------------------------------------------------------- 6. SocketTls


def test_socket_tls_round_trip_pending_and_want_read(env: Env, server: Server) -> None:
    with socket_tls(server.port, engine_client(env)) as tls:
        assert (tls.version(), tls.selected_alpn_protocol()) == ("TLSv1.3", ALPN)
        message = bytes(range(100))
        tls.sendall(message)
        assert tls.recv(10) == message[:10]  # waits (socket timeout WAIT)
        assert tls.pending() == 90  # the rest of the record, decrypted, not yet read
        assert tls.recv(1000) == message[10:]
        assert tls.pending() == 0
        tls.setblocking(False)
        with pytest.raises(ssl.SSLWantReadError):
            tls.recv(10)


def test_socket_tls_recv_waits_up_to_the_socket_timeout(env: Env, server: Server) -> None:
    with socket_tls(server.port, engine_client(env)) as tls:
        tls.settimeout(0.3)
        start = time.monotonic()
        with pytest.raises(TimeoutError):
            tls.recv(10)  # nothing comes: the stdlib waits for the timeout too
        assert 0.25 <= time.monotonic() - start < 0.3 + 2
        tls.settimeout(WAIT)
        tls.sendall(b"still up")
        assert tls.recv(100) == b"still up"


def test_socket_tls_handshake_times_out(env: Env) -> None:
    silent = socket.create_server(("127.0.0.1", 0))
    with silent, socket.create_connection(silent.getsockname(), timeout=0.5) as sock:
        accepted, _ = silent.accept()  # accepted, never answered
        tls = engine_client(env).wrap_socket(sock, do_handshake_on_connect=False,
                                             server_hostname="localhost")
        start = time.monotonic()
        with accepted, pytest.raises(TimeoutError):
            tls.do_handshake()
        assert 0.4 <= time.monotonic() - start < 0.5 + 2


def test_identity_is_fixed_when_the_socket_is_wrapped(env: Env, server: Server) -> None:
    ctx = engine_client(env)
    later = env.new_device()
    with socket_tls(server.port, ctx, handshake=False) as tls:
        ctx.use_identity(*later)
        tls.do_handshake()
        assert server.conn().peer_der == der(env.device[1])
    with socket_tls(server.port, ctx):
        assert server.conn().peer_der == der(later[1])


# --------------------------------------------------------------------------- without native handles
# The engine reaches OpenSSL through handles pyOpenSSL keeps privately (harness.tls_engine
# ._native). Without them every path must still work through pyOpenSSL's public methods:
# a Python name check, public record I/O, public identity loading.


@pytest.fixture
def public_only(monkeypatch: pytest.MonkeyPatch) -> None:
    from harness.tls_engine import _native

    monkeypatch.setattr(_native, "handle_of", lambda _obj, _name: None)


@pytest.mark.usefixtures("public_only")
def test_without_native_handles_records_flow(env: Env, serve: Callable[..., Server]) -> None:
    server = serve()  # made after the patch: its connections use the public methods too
    ctx = engine_client(env)
    big = bytes(range(256)) * 800
    assert exchange(server.port, ctx, b"hello", big).data == b"hello" + big
    assert coalesced_exchange(server.port, ctx, [b"one", b"two"]) == b"onetwo"
    with socket_tls(server.port, ctx) as tls:
        assert tls._h is None and tls._python_name_check  # the public paths, really
        tls.sendall(b"ping")
        assert tls.recv(10) == b"ping"
        tls.setblocking(False)
        with pytest.raises(ssl.SSLWantReadError):
            tls.recv(10)


@pytest.mark.usefixtures("public_only")
def test_without_native_handles_checks_still_refuse(env: Env,
                                                    serve: Callable[..., Server]) -> None:
    server = serve()
    with pytest.raises(ssl.SSLCertVerificationError) as info:
        exchange(server.port, engine_client(env), b"x", hostname="wrong.example")
    assert info.value.verify_message == (
        "Hostname mismatch, certificate is not valid for 'wrong.example'.")
    refused(server.port, engine_client(env, identity=env.new_device(env.other_ca)))
    assert isinstance(server.failure(), ssl.SSLCertVerificationError)
    key_file, cert_file = env.dir / "public-other.key", env.dir / "public-device.pem"
    pki.write_secret(key_file, pki.private_key_pem(pki.generate_ec_key()))
    cert_file.write_text(pki.certificate_pem(env.device[1]))
    with pytest.raises(ssl.SSLError) as mismatch:
        engine_client(env, use_identity=False).load_identity_files(cert_file, key_file)
    assert mismatch.value.reason == "KEY_VALUES_MISMATCH"


# --------------------------------------------------------------------------- 7. identity files


def test_load_identity_files_rejects_mismatched_key(env: Env) -> None:
    key_file, cert_file = env.dir / "other.key", env.dir / "device.pem"
    pki.write_secret(key_file, pki.private_key_pem(pki.generate_ec_key()))
    cert_file.write_text(pki.certificate_pem(env.device[1]))
    for load in (engine_client(env, use_identity=False).load_identity_files,
                 ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT).load_cert_chain):  # same as stdlib
        with pytest.raises(ssl.SSLError) as info:
            load(cert_file, key_file)
        assert info.value.reason == "KEY_VALUES_MISMATCH"


@pytest.mark.parametrize("cert_first", [False, True], ids=["key+cert", "cert+key"])
def test_load_identity_files_from_one_file(env: Env, server: Server, cert_first: bool) -> None:
    identity = env.new_device()
    path = env.pem_file(identity, cert_first=cert_first)
    ctx = engine_client(env, use_identity=False)
    ctx.load_identity_files(path, path)
    with socket_tls(server.port, ctx):
        assert server.conn().peer_der == der(identity[1])


# --------------------------------------------------------------------------- 8. PeerCertificate


def peer_views(env: Env, cert: x509.Certificate, key: Any) -> tuple[dict[str, Any], Any]:
    """The stdlib client's ``getpeercert()`` of ``cert`` and the engine client's."""
    server_ctx = tls_engine.server_context(anchors=[env.ca.pem], key=key, cert=cert)
    std = memory_handshake(std_client(env), server_ctx).getpeercert()
    return std, memory_handshake(engine_client(env), server_ctx).getpeercert()


def test_peer_certificate_matches_stdlib_getpeercert(env: Env, server: Server) -> None:
    key, cert = env.server
    std, engine = peer_views(env, cert, key)
    assert isinstance(engine, PeerCertificate)
    assert std["subjectAltName"] == (("DNS", "localhost"), ("IP Address", "127.0.0.1"))
    assert dict(engine) == std
    assert engine == std and len(engine) == len(std)  # Mapping equality, lazily built
    # and over a socket, as paho reads it
    with std_client(env).wrap_socket(
            socket.create_connection(("127.0.0.1", server.port), timeout=WAIT),
            server_hostname="localhost") as sock:
        assert PeerCertificate(cert) == sock.getpeercert()


def test_peer_certificate_single_digit_days(env: Env) -> None:
    key, _ = env.server
    cert = issue(env.ca, key, not_before=dt.datetime(2024, 1, 5, tzinfo=UTC),
                 not_after=dt.datetime(2099, 2, 3, tzinfo=UTC))
    std, engine = peer_views(env, cert, key)
    assert (engine["notBefore"], engine["notAfter"]) == (std["notBefore"], std["notAfter"])


def test_peer_certificate_odd_length_serial(env: Env) -> None:
    key, _ = env.server
    std, engine = peer_views(env, issue(env.ca, key, serial=0xABC), key)
    assert engine["serialNumber"] == std["serialNumber"] == "0ABC"


def test_peer_certificate_san_order_and_ipv6(env: Env) -> None:
    key, _ = env.server
    std, engine = peer_views(env, issue(env.ca, key, ["127.0.0.1", "localhost", "::1"]), key)
    assert engine["subjectAltName"] == std["subjectAltName"]


def test_peer_certificate_is_a_mapping(env: Env) -> None:
    view = PeerCertificate(env.device[1])
    assert isinstance(view, Mapping)
    assert view["issuer"] == ((("organizationName", "fleetbench"),),
                              (("commonName", "fleetbench emulator root CA"),))
    assert "subjectAltName" not in view and view["version"] == 3



# --------------------------------------------------------------------------- 9. hostname_matches


def stdlib_accepts(env: Env, cert: x509.Certificate, key: Any, hostname: str) -> bool:
    """Whether the stdlib client's ``check_hostname`` (OpenSSL's X509_check_host/ip)
    accepts ``cert`` for ``hostname``."""
    server_ctx = tls_engine.server_context(anchors=[env.ca.pem], key=key, cert=cert)
    try:
        memory_handshake(std_client(env), server_ctx, hostname)
    except ssl.SSLCertVerificationError as exc:
        assert "mismatch" in exc.verify_message
        return False
    return True


@pytest.mark.parametrize(("sans", "hostname", "expected"), [
    (["example.com"], "example.com", True),
    (["Example.COM"], "eXample.com", True),
    (["example.com"], "www.example.com", False),
    (["*.example.com"], "a.example.com", True),
    (["*.example.com"], "A.Example.COM", True),
    (["*.example.com"], "example.com", False),
    (["*.example.com"], "a.b.example.com", False),
    (["a*.example.com"], "ab.example.com", False),  # no partial wildcards
    (["127.0.0.1"], "127.0.0.1", True),
    (["127.0.0.1"], "127.0.0.2", False),
    (["127.0.0.1"], "localhost", False),
    (["localhost"], "127.0.0.1", False),
    (["::1"], "::1", True),
    ([], "cn.example", True),  # no SAN: the CN counts
    (["127.0.0.1"], "cn.example", True),  # no DNS SAN: the CN counts
    (["other.example"], "cn.example", False),  # a DNS SAN: the CN does not
    (["*.com"], "example.com", False),  # OpenSSL wants two labels after '*.'
    (["localhost"], "localhost.", False),  # a trailing dot is not stripped
])
def test_hostname_matches(env: Env, sans: list[str], hostname: str, expected: bool) -> None:
    key = env.server[0]
    cert = issue(env.ca, key, sans, cn="cn.example")
    assert stdlib_accepts(env, cert, key, hostname) is expected  # the table is OpenSSL's
    assert hostname_matches(cert, hostname) is expected


LABEL = st.from_regex(r"[a-z]([a-z0-9-]{0,5}[a-z0-9])?", fullmatch=True)  # never an address


@settings(max_examples=40, deadline=None)
@given(suffix=st.lists(LABEL, min_size=2, max_size=3), prefix=st.lists(LABEL, max_size=2),
       upper=st.booleans())
def test_wildcard_covers_exactly_one_label(env: Env, suffix: list[str], prefix: list[str],
                                           upper: bool) -> None:
    cert = issue(env.ca, env.server[0], ["*." + ".".join(suffix)])
    hostname = ".".join(prefix + suffix)
    assert hostname_matches(cert, hostname.upper() if upper else hostname) is (
        len(prefix) == 1)


def test_bundled_openssl_version_is_the_wheels() -> None:
    assert tls_engine.bundled_openssl_version() == backend.openssl_version_text()
