"""Engine contexts: a stdlib ``SSLContext`` outside, a pyOpenSSL context inside."""

from __future__ import annotations

import socket
import ssl
from collections.abc import Callable, Iterable
from pathlib import Path
from typing import Any

from cryptography import x509
from OpenSSL import SSL, crypto

from harness.tls_engine import _errors as errors
from harness.tls_engine import _native as native
from harness.tls_engine.connections import BioTls, SocketTls

#: The cipher list Python's ``ssl`` sets on every context (3.10+): the engine offers and
#: accepts the same TLS 1.2 suites as the stdlib engine did.
PYTHON_DEFAULT_CIPHERS = ("@SECLEVEL=2:ECDH+AESGCM:ECDH+CHACHA20:ECDH+AES:DHE+AES:!aNULL:"
                          "!eNULL:!aDSS:!SHA1:!AESCCM")
#: X509_V_FLAG_NO_CHECK_TIME (pyOpenSSL names no constant for it).
NO_CHECK_TIME = 0x200000
#: What an ALPN selection callback returns to go on without ALPN (the stdlib's behaviour
#: when the client offers nothing the server speaks).
ALPN_NONE = SSL.NO_OVERLAPPING_PROTOCOLS


class EngineContext(ssl.SSLContext):
    """A stdlib ``SSLContext`` on the outside, a pyOpenSSL context (``engine``) inside.

    ``server_hostname``: for clients, the name sent as SNI and checked against the server's
    certificate whatever host the socket connects to (paho passes its host). ``identity``:
    for clients, the key and certificate applied to each connection when it is made
    (:meth:`use_identity`). ``on_server_name(tls, name)``: for servers, called with each
    ClientHello's SNI (it may :meth:`BioTls.switch` context). ``on_failure(tls, exc)``:
    called with each failed handshake's stdlib exception.
    """

    engine: SSL.Context
    forced_server_hostname: str | None
    identity: tuple[crypto.PKey, crypto.X509] | None
    on_server_name: Callable[[BioTls, str | None], None] | None
    on_failure: Callable[[BioTls, BaseException], None] | None

    def __new__(cls, engine: SSL.Context, *, server_side: bool) -> EngineContext:
        self = super().__new__(cls, ssl.PROTOCOL_TLS_SERVER if server_side
                               else ssl.PROTOCOL_TLS_CLIENT)
        return self

    def __init__(self, engine: SSL.Context, *, server_side: bool) -> None:
        self.engine = engine
        self.engine_server_side = server_side
        self.forced_server_hostname = None
        self.identity = None
        self.on_server_name = None
        self.on_failure = None

    def use_identity(self, key: Any, cert: x509.Certificate) -> None:
        """Present ``key`` + ``cert`` (cryptography objects) on connections made from now."""
        self.identity = (crypto.PKey.from_cryptography_key(key),
                         crypto.X509.from_cryptography(cert))

    def load_identity_files(self, cert_file: Path, key_file: Path) -> None:
        """:meth:`use_identity` from PEM files (a key and certificate may share one file),
        decoded once into the engine's own objects (~0.07 ms): every connection then takes
        them in a few microseconds."""
        key_pem = Path(key_file).read_bytes()
        cert_pem = key_pem if Path(cert_file) == Path(key_file) else Path(cert_file).read_bytes()
        try:
            identity = (crypto.load_privatekey(crypto.FILETYPE_PEM, key_pem),
                        crypto.load_certificate(crypto.FILETYPE_PEM, cert_pem))
        except crypto.Error as exc:
            raise errors.pem_lib() from exc
        if not native.present(SSL.Connection(self.engine, None), identity):
            raise errors.key_mismatch()
        self.identity = identity

    def _new_connection(self, sock: socket.socket | None,
                        server_hostname: str | None) -> tuple[SSL.Connection, bool]:
        """A connection, and whether Python must still check the server's name."""
        conn = SSL.Connection(self.engine, sock)
        python_check = False
        if self.engine_server_side:
            conn.set_accept_state()
        else:
            conn.set_connect_state()
            check = self.check_hostname
            if check and not server_hostname:
                raise ValueError("check_hostname requires server_hostname")
            if server_hostname:
                if not native.is_ip(server_hostname):  # no SNI for an address, as the stdlib
                    conn.set_tlsext_host_name(server_hostname.encode("idna"))
                if check:
                    python_check = not native.set_expected_name(conn, server_hostname)
            if self.identity is not None and not native.present(conn, self.identity):
                raise errors.key_mismatch()
        return conn, python_check

    def wrap_bio(self, incoming: ssl.MemoryBIO, outgoing: ssl.MemoryBIO,  # type: ignore[override]
                 server_side: bool = False, server_hostname: str | None = None,
                 session: Any = None) -> BioTls:
        if server_side != self.engine_server_side:
            raise ValueError("this context is for the other side of the connection")
        name = self.forced_server_hostname or server_hostname
        return BioTls(self, incoming, outgoing, name)

    def wrap_socket(self, sock: socket.socket, server_side: bool = False,  # type: ignore[override]
                    do_handshake_on_connect: bool = True, suppress_ragged_eofs: bool = True,
                    server_hostname: str | None = None, session: Any = None) -> SocketTls:
        if server_side or self.engine_server_side:
            raise ValueError("the socket interface is for clients only")
        tls = SocketTls(self, sock, self.forced_server_hostname or server_hostname)
        if do_handshake_on_connect:
            tls.do_handshake()
        return tls


def _base_engine(method: int, cadata: Iterable[str], *, verify: int, store_flags: int = 0,
                 on_bad_anchor: Callable[[Exception], None] | None = None) -> SSL.Context:
    engine = SSL.Context(method)
    engine.set_min_proto_version(SSL.TLS1_2_VERSION)
    # As Python's ssl does: an idle connection holds no 16 KiB record buffers (10,000 idle
    # emulator connections: 735 MiB without, the stdlib engine's ~490 MiB with)
    engine.set_mode(SSL.MODE_RELEASE_BUFFERS)
    engine.set_cipher_list(PYTHON_DEFAULT_CIPHERS.encode())
    engine.set_options(SSL.OP_NO_COMPRESSION | SSL.OP_CIPHER_SERVER_PREFERENCE)
    store = engine.get_cert_store()
    assert store is not None
    for pem in cadata:
        try:
            for cert in x509.load_pem_x509_certificates(pem.encode()):
                store.add_cert(crypto.X509.from_cryptography(cert))
        except (ValueError, SSL.Error, crypto.Error) as exc:
            if on_bad_anchor is None:
                raise ValueError(f"unusable CA certificate: {exc}") from None
            on_bad_anchor(exc)
    if store_flags:
        store.set_flags(store_flags)
    engine.set_verify(verify)
    native.set_groups(engine)
    return engine


def server_context(*, anchors: Iterable[str], key: Any, cert: x509.Certificate,
                   alpn: Iterable[str] = (), check_time: bool = True,
                   partial_chain: bool = True,
                   on_bad_anchor: Callable[[Exception], None] | None = None) -> EngineContext:
    """A mutual-TLS server context: TLS 1.2+, client certificate required and verified
    against ``anchors`` (PEM texts; with ``partial_chain`` any of them may end a chain),
    no session tickets (AWS offers no SessionTicket resumption), ALPN protocols in
    ``alpn`` selected when the client offers them."""
    flags = (crypto.X509StoreFlags.PARTIAL_CHAIN if partial_chain else 0) | (
        0 if check_time else NO_CHECK_TIME)
    engine = _base_engine(SSL.TLS_SERVER_METHOD, anchors,
                          verify=SSL.VERIFY_PEER | SSL.VERIFY_FAIL_IF_NO_PEER_CERT,
                          store_flags=flags, on_bad_anchor=on_bad_anchor)
    engine.set_options(SSL.OP_NO_TICKET)
    engine.set_session_cache_mode(SSL.SESS_CACHE_OFF)
    engine.use_certificate(cert)
    engine.use_privatekey(key)
    engine.check_privatekey()
    ctx = EngineContext(engine, server_side=True)
    offered = [p.encode() for p in alpn]
    if offered:
        def select_alpn(_conn: SSL.Connection, protos: list[bytes]) -> bytes | object:
            for proto in offered:
                if proto in protos:
                    return proto
            return ALPN_NONE

        engine.set_alpn_select_callback(select_alpn)  # type: ignore[arg-type]

    def servername(conn: SSL.Connection) -> None:
        tls = conn.get_app_data()
        if tls is not None and ctx.on_server_name is not None:
            ctx.on_server_name(tls, _server_name(conn.get_servername()))

    engine.set_tlsext_servername_callback(servername)
    return ctx


def _server_name(raw: bytes | None) -> str | None:
    """The SNI as the stdlib hands it to ``sni_callback`` (IDNA-decoded)."""
    if not raw:
        return None
    try:
        return raw.decode("idna")
    except UnicodeError:
        return raw.decode("ascii", "replace")


def client_context(ca_files: Iterable[Path | str] = (), *, cadata: Iterable[str] = (),
                   server_hostname: str | None = None,
                   alpn: Iterable[str] = ()) -> EngineContext:
    """A client context trusting ``ca_files`` / ``cadata`` (server certificate and name
    verified), TLS 1.2+, offering ``alpn``; without an identity until :meth:`use_identity`."""
    pems = [Path(f).read_text() for f in ca_files] + list(cadata)
    engine = _base_engine(SSL.TLS_CLIENT_METHOD, pems, verify=SSL.VERIFY_PEER)
    protos = [p.encode() for p in alpn]
    if protos:
        engine.set_alpn_protos(protos)
    ctx = EngineContext(engine, server_side=False)
    ctx.forced_server_hostname = server_hostname
    return ctx
