"""TLS on the OpenSSL inside ``cryptography`` (through pyOpenSSL), behind the stdlib
interfaces that asyncio/uvloop and paho call.

Python's ``ssl`` module here links the system's OpenSSL 3.0, whose handshakes and key
loading are slow: a mutual-TLS handshake costs ~1.2-1.5 ms of CPU on each side, and loading
a client's key and certificate into a context ~1.2 ms (a load generator does that for every
new device). The OpenSSL 4.0 that ships inside the ``cryptography`` wheel does the same
handshake in ~0.9 ms and takes a key object already in memory in ~0.03 ms
(``python -m bench.tls_engines`` measures both). The project's TLS traffic goes through
two small interfaces, which this module serves on that OpenSSL:

* ``SSLContext.wrap_bio``: asyncio's and uvloop's SSL transports (the emulator's listener,
  the benchmark's load generator) drive the returned object with memory BIOs;
  :class:`BioTls` is that object.
* ``SSLContext.wrap_socket``: paho wraps each client connection's socket;
  :class:`SocketTls` is the socket it gets back (OpenSSL reads and writes the descriptor).

:class:`EngineContext` subclasses ``ssl.SSLContext`` (uvloop checks the type; paho reads
``check_hostname``) but carries its own pyOpenSSL context; the stdlib half is never used
for a handshake. Failures surface as the stdlib's exception types (``ssl.SSLWantReadError``,
``ssl.SSLCertVerificationError``, ``ssl.SSLEOFError``...) with the same reason texts, so
callers cannot tell the engines apart.

Both engines offer and accept the same TLS versions (1.2+), TLS 1.2 suites (Python's
default list), key-exchange groups (:data:`GROUPS`, set natively), ALPN and trust flags,
and a client checks the server's name inside the handshake (natively; in Python after it,
before any application byte, if the handle is missing). One known difference: pyOpenSSL
cannot set ``num_tickets``, so a TLS 1.3 server on this engine may send stateful session
tickets after the handshake; with the session cache off none of them resumes a session,
so, as before and as AWS states, there is no ticket resumption.
"""

from __future__ import annotations

import datetime as dt
import ipaddress
import select
import socket
import ssl
import sys
import time
from collections.abc import Callable, Iterable, Iterator, Mapping
from pathlib import Path
from typing import Any

from cryptography import x509
from cryptography.x509.oid import NameOID
from OpenSSL import SSL, crypto

from harness import pki

__all__ = [
    "ALPN_NONE",
    "BioTls",
    "EngineContext",
    "SocketTls",
    "client_context",
    "server_context",
]

#: The cipher list Python's ``ssl`` sets on every context (3.10+): the engine offers and
#: accepts the same TLS 1.2 suites as the stdlib engine did.
PYTHON_DEFAULT_CIPHERS = ("@SECLEVEL=2:ECDH+AESGCM:ECDH+CHACHA20:ECDH+AES:DHE+AES:!aNULL:"
                          "!eNULL:!aDSS:!SHA1:!AESCCM")
#: X509_V_FLAG_NO_CHECK_TIME (pyOpenSSL names no constant for it).
NO_CHECK_TIME = 0x200000
#: What an ALPN selection callback returns to go on without ALPN (the stdlib's behaviour
#: when the client offers nothing the server speaks).
ALPN_NONE = SSL.NO_OVERLAPPING_PROTOCOLS
_RECORD = 16 * 1024 + 256  # one TLS record's plaintext, with room
_OUT_CHUNK = 16 * 1024  # one buffer of what the engine wrote, drained in a loop
_READ_CHUNK = 64 * 1024  # most plaintext one read returns (uvloop asks for 256 KiB)


#: X509_V_ERR_HOSTNAME_MISMATCH / X509_V_ERR_IP_ADDRESS_MISMATCH
_NAME_MISMATCH = {62: "Hostname mismatch", 64: "IP address mismatch"}


def _ssl_error(exc: BaseException, verify_error: int | None = None,
               hostname: str | None = None) -> OSError:
    """The stdlib exception a pyOpenSSL failure corresponds to (same class and texts)."""
    if isinstance(exc, SSL.ZeroReturnError):
        return ssl.SSLZeroReturnError(6, "TLS/SSL connection has been closed (EOF)")
    if isinstance(exc, SSL.SysCallError):
        code, text = (*exc.args, None, None)[:2]
        if code == -1 or code == 0 or code is None:
            err: OSError = ssl.SSLEOFError(8, "EOF occurred in violation of protocol")
            err.reason = "UNEXPECTED_EOF_WHILE_READING"  # type: ignore[attr-defined]
            err.library = "SSL"  # type: ignore[attr-defined]
            return err
        return OSError(code, text)
    details = exc.args[0] if exc.args and isinstance(exc.args[0], list) else []
    library, text = "SSL", str(exc) or type(exc).__name__
    if details:
        first = details[0]
        library = str(first[0] or "SSL").split(" ")[0].upper()
        text = str(first[-1])
    reason = text.upper().replace(" ", "_").replace("-", "_")
    if "verify failed" in text:
        if verify_error in _NAME_MISMATCH and hostname:  # the stdlib's own wording
            message = (f"{_NAME_MISMATCH[verify_error]}, certificate is not valid for "
                       f"'{hostname}'.")
        else:
            message = _verify_error_text(verify_error) if verify_error else text
        verr = ssl.SSLCertVerificationError(1, f"[{library}: {reason}] {text}: {message}")
        verr.verify_code = verify_error or 0
        verr.verify_message = message
        verr.reason = reason  # type: ignore[attr-defined]
        verr.library = library  # type: ignore[attr-defined]
        return verr
    out = ssl.SSLError(1, f"[{library}: {reason}] {text}")
    out.reason = reason  # type: ignore[attr-defined]
    out.library = library  # type: ignore[attr-defined]
    return out


def _want_read() -> ssl.SSLWantReadError:
    return ssl.SSLWantReadError(2, "The operation did not complete (read)")


def _want_write() -> ssl.SSLWantWriteError:
    return ssl.SSLWantWriteError(3, "The operation did not complete (write)")


# --------------------------------------------------------------------------- native calls
# pyOpenSSL exposes neither a connection's verify result, nor the name to verify, nor the
# key-exchange groups. Those three are one OpenSSL call each on the handles pyOpenSSL keeps
# (``Context._context``, ``Connection._ssl``), through the cffi binding pyOpenSSL itself
# uses. Each is optional: without the handle the engine falls back to a Python check (name),
# a generic text (verify result) or OpenSSL 4.0's default groups.

try:
    from cryptography.hazmat.bindings.openssl.binding import Binding as _Binding

    _LIB: Any = _Binding.lib
    _FFI: Any = _Binding.ffi
except Exception:  # pragma: no cover - the binding is there whenever pyOpenSSL is
    _LIB = _FFI = None

#: The key-exchange groups Python's ssl offers on OpenSSL 3.0 (its default list, without
#: finite-field DH): the bundled OpenSSL 4.0 would lead with X25519MLKEM768, which costs
#: a client ~0.1 ms more per handshake and which the stdlib engine never negotiated.
GROUPS = b"X25519:P-256:X448:P-521:P-384"


def _handle(obj: Any, name: str) -> Any:
    handle = getattr(obj, name, None)
    return handle if _LIB is not None and handle is not None else None


def _set_groups(engine: SSL.Context) -> None:
    handle = _handle(engine, "_context")
    if handle is not None and hasattr(_LIB, "SSL_CTX_set1_curves_list"):
        _LIB.SSL_CTX_set1_curves_list(handle, GROUPS)


def _set_expected_name(conn: SSL.Connection, name: str) -> bool:
    """Have OpenSSL check the server certificate against ``name`` during the handshake,
    as the stdlib's ``check_hostname`` does (no partial wildcards). False if it cannot."""
    handle = _handle(conn, "_ssl")
    if handle is None or not hasattr(_LIB, "SSL_get0_param"):
        return False
    param = _LIB.SSL_get0_param(handle)
    if _is_ip(name):
        packed = ipaddress.ip_address(name).packed
        return bool(_LIB.X509_VERIFY_PARAM_set1_ip(param, packed, len(packed)))
    _LIB.X509_VERIFY_PARAM_set_hostflags(param, _LIB.X509_CHECK_FLAG_NO_PARTIAL_WILDCARDS)
    encoded = name.encode("idna")
    return bool(_LIB.X509_VERIFY_PARAM_set1_host(param, encoded, len(encoded)))


def _present(conn: SSL.Connection, identity: tuple[crypto.PKey, crypto.X509]) -> None:
    """Put a key + certificate on one connection: natively a few microseconds (pyOpenSSL's
    public calls take cryptography objects only and re-decode them, ~0.13 ms). A key that
    does not match the certificate raises the stdlib's ``KEY_VALUES_MISMATCH``."""
    pkey, cert = identity
    handle = _handle(conn, "_ssl")
    key_ptr, cert_ptr = getattr(pkey, "_pkey", None), getattr(cert, "_x509", None)
    if handle is not None and key_ptr is not None and cert_ptr is not None:
        ok = (_LIB.SSL_use_certificate(handle, cert_ptr) == 1
              and _LIB.SSL_use_PrivateKey(handle, key_ptr) == 1)
        if not ok:
            _LIB.ERR_clear_error()
    else:
        try:
            conn.use_certificate(cert.to_cryptography())
            conn.use_privatekey(pkey.to_cryptography_key())  # type: ignore[arg-type]
            ok = True
        except SSL.Error:
            ok = False
    if not ok:
        err = ssl.SSLError(116, "[X509: KEY_VALUES_MISMATCH] key values mismatch")
        err.reason = "KEY_VALUES_MISMATCH"  # type: ignore[attr-defined]
        raise err


def _verify_result(conn: SSL.Connection) -> int | None:
    handle = _handle(conn, "_ssl")
    if handle is None or not hasattr(_LIB, "SSL_get_verify_result"):
        return None
    code = int(_LIB.SSL_get_verify_result(handle))
    return code or None


# SSL_get_error codes
_WANT_READ, _WANT_WRITE, _ZERO_RETURN = 2, 3, 6
_WANTS = (_WANT_READ, _WANT_WRITE)
_no_zero: Any = (_FFI.new_allocator(should_clear_after_alloc=False)
                 if _FFI is not None else None)


def _io_handles(conn: SSL.Connection) -> tuple[Any, Any, Any] | None:
    """(SSL, read BIO, write BIO) of a connection for the per-record fast path, or None to
    use pyOpenSSL's public methods. The fast path makes the same OpenSSL calls as those
    methods, without a Python exception for every "nothing more to read" (two per record)
    and without a fresh buffer per call; errors still go through pyOpenSSL, which reads
    OpenSSL's error queue and raises its usual exception."""
    handle = _handle(conn, "_ssl")
    if handle is None or not hasattr(conn, "_raise_ssl_error") or not all(
            hasattr(_LIB, name) for name in ("SSL_read", "SSL_write", "SSL_do_handshake",
                                             "SSL_get_error", "SSL_pending", "BIO_read",
                                             "BIO_write")):
        return None
    return handle, getattr(conn, "_into_ssl", None), getattr(conn, "_from_ssl", None)


def _error_of(conn: SSL.Connection, handle: Any, result: int) -> SSL.Error:
    """The pyOpenSSL exception for a failed call on ``handle`` (not raised)."""
    try:
        conn._raise_ssl_error(handle, result)
    except SSL.Error as exc:
        return exc
    return SSL.Error([])


def _verify_error_text(code: int) -> str:
    """OpenSSL's text for a certificate-verification error code (``certificate has
    expired``...), as the stdlib puts it in ``SSLCertVerificationError.verify_message``."""
    try:
        return str(_FFI.string(_LIB.X509_verify_cert_error_string(code)).decode())
    except Exception:
        return f"certificate verify error {code}"


def _is_ip(name: str) -> bool:
    try:
        ipaddress.ip_address(name)
    except ValueError:
        return False
    return True


# --------------------------------------------------------------------------- peer certificate


def _name_tuple(name: x509.Name) -> tuple[tuple[tuple[str, str], ...], ...]:
    short = {NameOID.COMMON_NAME: "commonName", NameOID.ORGANIZATION_NAME: "organizationName",
             NameOID.ORGANIZATIONAL_UNIT_NAME: "organizationalUnitName",
             NameOID.COUNTRY_NAME: "countryName", NameOID.LOCALITY_NAME: "localityName",
             NameOID.STATE_OR_PROVINCE_NAME: "stateOrProvinceName",
             NameOID.SERIAL_NUMBER: "serialNumber"}
    return tuple(tuple((short.get(a.oid, a.oid.dotted_string), str(a.value)) for a in rdn)
                 for rdn in name.rdns)


def _asn1_time(when: dt.datetime) -> str:
    """OpenSSL's ASN1_TIME_print form, as the stdlib returns it: ``Jan  5 09:03:00 2026 GMT``."""
    return f"{when:%b} {when.day:2d} {when:%H:%M:%S %Y} GMT"


def _ip_text(ip: ipaddress.IPv4Address | ipaddress.IPv6Address) -> str:
    """An address as the stdlib prints a SAN: IPv6 as eight uncompressed hex groups."""
    if isinstance(ip, ipaddress.IPv6Address):
        return ":".join(f"{int.from_bytes(ip.packed[i:i + 2], 'big'):X}" for i in range(0, 16, 2))
    return str(ip)


def _alt_names(cert: x509.Certificate) -> list[tuple[str, str]]:
    """The subject alternative names in certificate order, named as the stdlib names them."""
    try:
        san = cert.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    except x509.ExtensionNotFound:
        return []
    names: list[tuple[str, str]] = []
    for general in san:
        if isinstance(general, x509.DNSName):
            names.append(("DNS", general.value))
        elif isinstance(general, x509.IPAddress) and not isinstance(
                general.value, (ipaddress.IPv4Network, ipaddress.IPv6Network)):
            names.append(("IP Address", _ip_text(general.value)))
        elif isinstance(general, x509.UniformResourceIdentifier):
            names.append(("URI", general.value))
        elif isinstance(general, x509.RFC822Name):
            names.append(("email", general.value))
    return names


def _serial_text(serial: int) -> str:
    """Upper-case hex in whole bytes (``0ABC``), as the stdlib prints a serial number."""
    text = f"{serial:X}"
    return "0" + text if len(text) % 2 else text


class PeerCertificate(Mapping[str, Any]):
    """``getpeercert()``'s dictionary, computed on first use (uvloop asks for it on every
    handshake and nobody in the project reads it), from a certificate or its DER."""

    __slots__ = ("_cert", "_dict")

    def __init__(self, cert: x509.Certificate | bytes) -> None:
        self._cert = cert
        self._dict: dict[str, Any] | None = None

    def _data(self) -> dict[str, Any]:
        if self._dict is None:
            cert = self._cert
            if isinstance(cert, bytes):
                cert = x509.load_der_x509_certificate(cert)
            data: dict[str, Any] = {
                "subject": _name_tuple(cert.subject), "issuer": _name_tuple(cert.issuer),
                "version": cert.version.value + 1, "serialNumber": _serial_text(cert.serial_number),
                "notBefore": _asn1_time(cert.not_valid_before_utc),
                "notAfter": _asn1_time(cert.not_valid_after_utc)}
            alt = _alt_names(cert)
            if alt:
                data["subjectAltName"] = tuple(alt)
            self._dict = data
        return self._dict

    def __getitem__(self, key: str) -> Any:
        return self._data()[key]

    def __iter__(self) -> Iterator[str]:
        return iter(self._data())

    def __len__(self) -> int:
        return len(self._data())


def hostname_matches(cert: x509.Certificate, hostname: str) -> bool:
    """RFC 6125 as OpenSSL applies it for the stdlib's ``check_hostname``: an IP address
    matches a SAN IP entry; a name matches a SAN DNS entry, a wildcard only as the whole
    left-most label; the subject CN counts only when the certificate has no DNS SAN."""
    alt = _alt_names(cert)
    try:
        ip = ipaddress.ip_address(hostname)
    except ValueError:
        ip = None
    if ip is not None:
        return any(kind == "IP Address" and ipaddress.ip_address(v) == ip for kind, v in alt)
    host = hostname.lower()
    dns = [v.lower() for kind, v in alt if kind == "DNS"]
    if not dns:
        dns = [str(a.value).lower()
               for a in cert.subject.get_attributes_for_oid(NameOID.COMMON_NAME)]
    for pattern in dns:
        if pattern == host:
            return True
        suffix = pattern[2:]
        # a wildcard needs two labels after it (``*.com`` matches nothing)
        if pattern.startswith("*.") and "*" not in suffix and "." in suffix.strip("."):
            head, _, rest = host.partition(".")
            if head and rest == suffix:
                return True
    return False


# --------------------------------------------------------------------------- contexts


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
            err = ssl.SSLError(9, "[SSL] PEM lib")
            err.reason = "PEM_LIB"  # type: ignore[attr-defined]
            raise err from exc
        _present(SSL.Connection(self.engine, None), identity)  # refuses a mismatched pair
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
                if not _is_ip(server_hostname):  # no SNI for an address, as the stdlib
                    conn.set_tlsext_host_name(server_hostname.encode("idna"))
                if check:
                    python_check = not _set_expected_name(conn, server_hostname)
            if self.identity is not None:
                _present(conn, self.identity)
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


def _base_engine(method: int, cadata: Iterable[str], *, verify: int,
                 alpn: Iterable[str] = (), store_flags: int = 0,
                 on_bad_anchor: Callable[[Exception], None] | None = None) -> SSL.Context:
    engine = SSL.Context(method)
    engine.set_min_proto_version(SSL.TLS1_2_VERSION)
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
    _set_groups(engine)
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


# --------------------------------------------------------------------------- connections


class _TlsCommon:
    """What both connection kinds answer about a finished handshake."""

    _conn: SSL.Connection
    context: EngineContext
    server_hostname: str | None
    _python_name_check: bool
    _der: bytes | None

    def getpeercert(self, binary_form: bool = False) -> Any:
        der = self._der
        if der is None:  # once per connection: uvloop and the broker both ask
            cert = self._conn.get_peer_certificate()
            if cert is None:
                return None
            der = self._der = crypto.dump_certificate(crypto.FILETYPE_ASN1, cert)
        return der if binary_form else PeerCertificate(der)

    def selected_alpn_protocol(self) -> str | None:
        proto = self._conn.get_alpn_proto_negotiated()
        return proto.decode() if proto else None

    def version(self) -> str | None:
        name = self._conn.get_protocol_version_name()
        return name if name and name != "Unknown" else None

    def cipher(self) -> tuple[str, str, int] | None:
        name = self._conn.get_cipher_name()
        if name is None:
            return None
        return name, str(self._conn.get_cipher_version()), int(self._conn.get_cipher_bits()
                                                               or 0)

    def compression(self) -> None:
        return None

    def pending(self) -> int:
        return int(self._conn.pending())

    def _check_server_name(self) -> None:
        """Client side: the server certificate must name ``server_hostname`` (the stdlib's
        ``check_hostname``); checked before any application byte is sent."""
        name = self.server_hostname
        if not self._python_name_check or not name:
            return
        cert = self._conn.get_peer_certificate(as_cryptography=True)
        if cert is None or not hostname_matches(cert, name):
            message = f"Hostname mismatch, certificate is not valid for '{name}'."
            err = ssl.SSLCertVerificationError(
                1, f"[SSL: CERTIFICATE_VERIFY_FAILED] certificate verify failed: {message}")
            err.verify_code = 62
            err.verify_message = message
            err.reason = "CERTIFICATE_VERIFY_FAILED"  # type: ignore[attr-defined]
            err.library = "SSL"  # type: ignore[attr-defined]
            raise err

    def _failed(self, exc: BaseException) -> OSError:
        err = exc if isinstance(exc, ssl.SSLError) else _ssl_error(
            exc, _verify_result(self._conn), self.server_hostname)
        hook = self.context.on_failure
        if hook is not None:
            hook(self, err)  # type: ignore[arg-type]
        return err


class BioTls(_TlsCommon):
    """``ssl.SSLObject``'s interface over a pyOpenSSL connection with memory BIOs.

    asyncio/uvloop feed ``incoming`` and drain ``outgoing`` (stdlib ``MemoryBIO``s); each
    call moves what is new into the engine's own BIO and what the engine produced out.
    uvloop judges "more to read" by ``incoming.pending`` and :meth:`pending`; records
    already handed to the engine (a request that arrived with the handshake's last flight)
    are invisible to both, so :meth:`pending` also counts "fed since the engine last ran
    dry", and :meth:`read` decrypts every complete record available.
    """

    __slots__ = (
        "_conn",
        "_der",
        "_eof_fed",
        "_eof_pending",
        "_h",
        "_incoming",
        "_outgoing",
        "_python_name_check",
        "_unread",
        "context",
        "fleetbench_sni",
        "server_hostname",
        "server_side",
    )

    def __init__(self, context: EngineContext, incoming: ssl.MemoryBIO,
                 outgoing: ssl.MemoryBIO, server_hostname: str | None) -> None:
        self.context = context
        self.server_side = context.engine_server_side
        self.server_hostname = server_hostname
        self.fleetbench_sni: str | None = None
        self._der: bytes | None = None
        self._incoming = incoming
        self._outgoing = outgoing
        self._eof_fed = False
        self._eof_pending = False
        self._unread = False  # bytes given to the engine that no read has drained yet
        self._conn, self._python_name_check = context._new_connection(None, server_hostname)
        self._conn.set_app_data(self)
        self._h = _io_handles(self._conn)
        if self._h is not None and None in self._h:  # memory BIOs expected
            self._h = None

    def switch(self, context: EngineContext) -> None:
        """Continue this handshake on ``context`` (from an SNI callback)."""
        self._conn.set_context(context.engine)

    # -- BIO shuttling ------------------------------------------------------------------------
    def _pull(self) -> None:
        incoming = self._incoming
        if incoming.pending:
            data = incoming.read()
            if self._h is not None:
                _LIB.BIO_write(self._h[1], data, len(data))
            else:
                self._conn.bio_write(data)
            self._unread = True
        if incoming.eof and not self._eof_fed:
            self._eof_fed = True
            self._conn.bio_shutdown()

    def _push(self) -> None:
        outgoing = self._outgoing
        if self._h is not None:
            out = self._h[2]
            buf = _no_zero("char[]", _OUT_CHUNK)
            while True:
                got = _LIB.BIO_read(out, buf, _OUT_CHUNK)
                if got <= 0:
                    return
                outgoing.write(_FFI.buffer(buf, got))
                if got < _OUT_CHUNK:
                    return
        conn = self._conn
        try:
            while True:
                data = conn.bio_read(_OUT_CHUNK)
                outgoing.write(data)
                if len(data) < _OUT_CHUNK:
                    return
        except SSL.WantReadError:
            return

    # -- SSLObject interface --------------------------------------------------------------------
    def do_handshake(self) -> None:
        self._pull()
        failure: SSL.Error | None = None
        if self._h is not None:
            handle = self._h[0]
            result = _LIB.SSL_do_handshake(handle)
            if result != 1:
                code = _LIB.SSL_get_error(handle, result)
                if code == _WANT_READ:
                    self._unread = False
                    self._push()
                    raise _want_read()
                if code == _WANT_WRITE:
                    self._push()
                    raise _want_write()
                failure = _error_of(self._conn, handle, result)
        else:
            try:
                self._conn.do_handshake()
            except SSL.WantReadError:
                self._unread = False
                self._push()
                raise _want_read() from None
            except SSL.WantWriteError:
                self._push()
                raise _want_write() from None
            except SSL.Error as exc:
                failure = exc
        self._push()  # the next flight, or the alert
        if failure is not None:
            raise self._failed(failure) from None
        try:
            self._check_server_name()
        except ssl.SSLError as exc:
            raise self._failed(exc) from None

    def read(self, n: int = 1024, buffer: Any = None) -> Any:
        self._pull()
        if self._eof_pending:
            self._eof_pending = False
            return 0 if buffer is not None else b""
        if self._h is None:
            return self._read_public(n, buffer)
        handle = self._h[0]
        if buffer is not None:
            cap = min(n or len(buffer), len(buffer))
            base = _FFI.from_buffer(buffer, require_writable=True)
        else:
            cap = min(n, _READ_CHUNK)
            base = _no_zero("char[]", cap)
        total = code = result = 0
        while total < cap:  # every complete record there is (see the class doc)
            result = _LIB.SSL_read(handle, base + total, cap - total)
            if result <= 0:
                code = _LIB.SSL_get_error(handle, result)
                break
            total += result
        if total >= cap:
            self._unread = True  # stopped by the caller's limit: maybe more
        else:
            self._unread = False
            if code == _ZERO_RETURN:
                self._eof_pending = total > 0  # report the close_notify on the next read
            elif not total:
                self._push()
                if code == _WANT_READ:
                    raise _want_read()
                if code == _WANT_WRITE:
                    raise _want_write()
                raise _ssl_error(_error_of(self._conn, handle, result),
                                 _verify_result(self._conn))
        self._push()
        if buffer is not None:
            return total
        return _FFI.buffer(base, total)[:]

    def _read_public(self, n: int, buffer: Any) -> Any:
        conn = self._conn
        limit = n if buffer is None else min(n or len(buffer), len(buffer))
        chunks: list[bytes] = []
        total = 0
        try:
            while total < limit:
                chunk = conn.recv(min(limit - total, _RECORD))
                chunks.append(chunk)
                total += len(chunk)
            self._unread = True
        except SSL.WantReadError:
            self._unread = False
            if not total:
                self._push()
                raise _want_read() from None
        except SSL.ZeroReturnError:
            self._unread = False
            if total:
                self._eof_pending = True
        except SSL.Error as exc:
            if not total:
                self._push()
                raise _ssl_error(exc, _verify_result(conn)) from None
        self._push()
        data = chunks[0] if len(chunks) == 1 else b"".join(chunks)
        if buffer is not None:
            buffer[:total] = data
            return total
        return data

    def write(self, data: Any) -> int:
        size = len(data)
        if not size:
            return 0
        if self._h is not None:
            handle = self._h[0]
            count = _LIB.SSL_write(handle, _FFI.from_buffer(data), size)
            if count <= 0:
                code = _LIB.SSL_get_error(handle, count)
                if code == _WANT_READ:
                    raise _want_read()
                if code == _WANT_WRITE:
                    raise _want_write()
                raise _ssl_error(_error_of(self._conn, handle, count))
        else:
            try:
                count = self._conn.send(data)
            except SSL.WantReadError:
                raise _want_read() from None
            except SSL.WantWriteError:
                raise _want_write() from None
            except SSL.Error as exc:
                raise _ssl_error(exc) from None
        self._push()
        return int(count)

    def pending(self) -> int:
        if self._h is not None:
            pending = int(_LIB.SSL_pending(self._h[0]))
        else:
            pending = int(self._conn.pending())
        return pending or int(self._unread or self._eof_pending)

    def unwrap(self) -> None:
        self._pull()
        try:
            done = self._conn.shutdown()
        except SSL.WantReadError:
            done = False
        except SSL.Error as exc:
            self._push()
            raise _ssl_error(exc) from None
        self._push()
        if not done:
            raise _want_read()


def _cooperative_waiter(write: bool) -> Callable[..., Any] | None:
    """gevent's wait for a descriptor when gevent has patched the process's sockets."""
    monkey = sys.modules.get("gevent.monkey")
    if monkey is None or not monkey.is_module_patched("socket"):
        return None
    from gevent import socket as gsocket

    return gsocket.wait_write if write else gsocket.wait_read  # type: ignore[no-any-return]


def _wait_fd(fd: int, *, write: bool, timeout: float | None, what: str) -> None:
    """Block (cooperatively under gevent) until ``fd`` is ready; ``TimeoutError`` after
    ``timeout`` seconds (None: no limit), worded as the stdlib words it."""
    expired = TimeoutError(f"The {what} operation timed out")
    waiter = _cooperative_waiter(write)
    if waiter is not None:
        waiter(fd, timeout=timeout, timeout_exc=expired)
        return
    poller = select.poll()
    poller.register(fd, select.POLLOUT if write else select.POLLIN)
    if not poller.poll(None if timeout is None else max(0, int(timeout * 1000))):
        raise expired


class SocketTls(_TlsCommon):
    """``ssl.SSLSocket``'s interface (what paho uses of it) over a pyOpenSSL connection
    on the socket's descriptor. The handshake blocks the caller (cooperatively under
    gevent) up to the socket's timeout; afterwards reads and writes follow the socket's
    blocking mode, raising ``ssl.SSLWantReadError``/``SSLWantWriteError`` when it is
    non-blocking, as paho expects."""

    def __init__(self, context: EngineContext, sock: socket.socket,
                 server_hostname: str | None) -> None:
        self.context = context
        self.server_hostname = server_hostname
        self.tcp_socket = sock
        self._der: bytes | None = None
        self._conn, self._python_name_check = context._new_connection(sock, server_hostname)
        self._conn.set_app_data(self)
        handles = _io_handles(self._conn)
        self._h = handles[0] if handles is not None else None

    def _io(self, call: Callable[[], Any], what: str) -> Any:
        """``call()``, retried as the socket's mode says when OpenSSL wants the descriptor
        ready: non-blocking (timeout 0) raises ``SSLWantReadError``/``SSLWantWriteError``
        (paho's case); with a timeout it waits (cooperatively under gevent) up to it, then
        raises ``TimeoutError``; without one it waits for as long as it takes."""
        deadline: float | None = None
        while True:
            try:
                return call()
            except (SSL.WantReadError, SSL.WantWriteError) as want:
                write = isinstance(want, SSL.WantWriteError)
                timeout = self.tcp_socket.gettimeout()
                if timeout == 0.0:
                    raise (_want_write() if write else _want_read()) from None
                left = None
                if timeout is not None:
                    if deadline is None:
                        deadline = time.monotonic() + timeout
                    left = deadline - time.monotonic()
                    if left <= 0:
                        raise TimeoutError(f"The {what} operation timed out") from None
                _wait_fd(self.tcp_socket.fileno(), write=write, timeout=left, what=what)

    def do_handshake(self) -> None:
        try:
            self._io(self._conn.do_handshake, "handshake")
            self._check_server_name()
        except (SSL.Error, ssl.SSLError) as exc:
            raise self._failed(exc) from None

    def recv(self, bufsize: int, flags: int = 0) -> bytes:
        handle = self._h
        if handle is not None:  # the fast path: paho reads a packet in three small recvs
            buf = _no_zero("char[]", bufsize)
            got = _LIB.SSL_read(handle, buf, bufsize)
            if got > 0:
                return _FFI.buffer(buf, got)[:]  # type: ignore[no-any-return]
            code = _LIB.SSL_get_error(handle, got)
            if code == _ZERO_RETURN:
                return b""
            if code not in _WANTS:
                raise _ssl_error(_error_of(self._conn, handle, got)) from None
            if self.tcp_socket.gettimeout() == 0.0:
                raise _want_read() if code == _WANT_READ else _want_write()
            # a blocking or timed socket: wait as below (SSL_read is simply called again)
        try:
            return self._io(lambda: self._conn.recv(bufsize), "read")  # type: ignore[no-any-return]
        except SSL.ZeroReturnError:
            return b""
        except SSL.Error as exc:
            raise _ssl_error(exc) from None

    def send(self, data: Any, flags: int = 0) -> int:
        size = len(data)
        if not size:
            return 0  # SSL_write of nothing is an error; the stdlib sends nothing
        handle = self._h
        if handle is not None:
            got = _LIB.SSL_write(handle, _FFI.from_buffer(data), size)
            if got > 0:
                return int(got)
            code = _LIB.SSL_get_error(handle, got)
            if code not in _WANTS:
                raise _ssl_error(_error_of(self._conn, handle, got)) from None
            if self.tcp_socket.gettimeout() == 0.0:
                raise _want_read() if code == _WANT_READ else _want_write()
        try:
            return int(self._io(lambda: self._conn.send(data), "write"))
        except SSL.Error as exc:
            raise _ssl_error(exc) from None

    def sendall(self, data: Any, flags: int = 0) -> None:
        view = memoryview(data)
        while view:
            view = view[self.send(view):]

    def fileno(self) -> int:
        return self.tcp_socket.fileno()

    def setblocking(self, flag: bool) -> None:
        self.tcp_socket.setblocking(flag)

    def settimeout(self, value: float | None) -> None:
        self.tcp_socket.settimeout(value)

    def gettimeout(self) -> float | None:
        return self.tcp_socket.gettimeout()

    def setsockopt(self, *args: Any) -> None:
        self.tcp_socket.setsockopt(*args)

    def getsockopt(self, *args: Any) -> Any:
        return self.tcp_socket.getsockopt(*args)

    def getpeername(self) -> Any:
        return self.tcp_socket.getpeername()

    def getsockname(self) -> Any:
        return self.tcp_socket.getsockname()

    def shutdown(self, how: int) -> None:
        self.tcp_socket.shutdown(how)

    def close(self) -> None:
        self.tcp_socket.close()

    def __enter__(self) -> SocketTls:
        return self

    def __exit__(self, *_exc: object) -> None:
        self.close()


def identity_from_pem(key_pem: str | bytes, cert_pem: str | bytes) -> tuple[Any, x509.Certificate]:
    """A key + certificate pair for :meth:`EngineContext.use_identity` from PEM text."""
    key = pki.load_private_key(key_pem)
    return key, pki.load_certificate(cert_pem)


def bundled_openssl_version() -> str:
    """The version text of the OpenSSL this engine runs on."""
    return SSL.OpenSSL_version(SSL.OPENSSL_VERSION).decode()
