"""OpenSSL calls that pyOpenSSL does not offer, made on the handles it keeps.

pyOpenSSL exposes neither a connection's verify result, nor the name to verify, nor the
key-exchange groups. Those three are one OpenSSL call each on the handles pyOpenSSL keeps
(``Context._context``, ``Connection._ssl``), through the cffi binding pyOpenSSL itself
uses. Each is optional: without the handle the engine falls back to a Python check (name),
a generic text (verify result) or OpenSSL 4.0's default groups. The same handles serve
the per-record fast path (:func:`io_handles`).
"""

from __future__ import annotations

import ipaddress
from typing import Any

from OpenSSL import SSL, crypto

try:
    from cryptography.hazmat.bindings.openssl.binding import Binding as _Binding

    LIB: Any = _Binding.lib
    FFI: Any = _Binding.ffi
except Exception:  # pragma: no cover - the binding is there whenever pyOpenSSL is
    LIB = FFI = None

#: The key-exchange groups Python's ssl offers on OpenSSL 3.0 (its default list, without
#: finite-field DH): the bundled OpenSSL 4.0 would lead with X25519MLKEM768, which costs
#: a client ~0.1 ms more per handshake and which the stdlib engine never negotiated.
GROUPS = b"X25519:P-256:X448:P-521:P-384"


def handle_of(obj: Any, name: str) -> Any:
    handle = getattr(obj, name, None)
    return handle if LIB is not None and handle is not None else None


def set_groups(engine: SSL.Context) -> None:
    handle = handle_of(engine, "_context")
    if handle is not None and hasattr(LIB, "SSL_CTX_set1_curves_list"):
        LIB.SSL_CTX_set1_curves_list(handle, GROUPS)


def set_expected_name(conn: SSL.Connection, name: str) -> bool:
    """Have OpenSSL check the server certificate against ``name`` during the handshake,
    as the stdlib's ``check_hostname`` does (no partial wildcards). False if it cannot."""
    handle = handle_of(conn, "_ssl")
    if handle is None or not hasattr(LIB, "SSL_get0_param"):
        return False
    param = LIB.SSL_get0_param(handle)
    if is_ip(name):
        packed = ipaddress.ip_address(name).packed
        return bool(LIB.X509_VERIFY_PARAM_set1_ip(param, packed, len(packed)))
    LIB.X509_VERIFY_PARAM_set_hostflags(param, LIB.X509_CHECK_FLAG_NO_PARTIAL_WILDCARDS)
    encoded = name.encode("idna")
    return bool(LIB.X509_VERIFY_PARAM_set1_host(param, encoded, len(encoded)))


def present(conn: SSL.Connection, identity: tuple[crypto.PKey, crypto.X509]) -> bool:
    """Put a key + certificate on one connection: natively a few microseconds (pyOpenSSL's
    public calls take cryptography objects only and re-decode them, ~0.13 ms). False if the
    key does not match the certificate."""
    pkey, cert = identity
    handle = handle_of(conn, "_ssl")
    key_ptr, cert_ptr = getattr(pkey, "_pkey", None), getattr(cert, "_x509", None)
    if handle is not None and key_ptr is not None and cert_ptr is not None:
        if (LIB.SSL_use_certificate(handle, cert_ptr) == 1
                and LIB.SSL_use_PrivateKey(handle, key_ptr) == 1):
            return True
        LIB.ERR_clear_error()
        return False
    try:
        conn.use_certificate(cert.to_cryptography())
        conn.use_privatekey(pkey.to_cryptography_key())  # type: ignore[arg-type]
    except SSL.Error:
        return False
    return True


def verify_result(conn: SSL.Connection) -> int | None:
    handle = handle_of(conn, "_ssl")
    if handle is None or not hasattr(LIB, "SSL_get_verify_result"):
        return None
    code = int(LIB.SSL_get_verify_result(handle))
    return code or None


# SSL_get_error codes
WANT_READ, WANT_WRITE, ZERO_RETURN = 2, 3, 6
no_zero: Any = (FFI.new_allocator(should_clear_after_alloc=False)
                 if FFI is not None else None)


def io_handles(conn: SSL.Connection) -> tuple[Any, Any, Any] | None:
    """(SSL, read BIO, write BIO) of a connection for the per-record fast path, or None to
    use pyOpenSSL's public methods. The fast path makes the same OpenSSL calls as those
    methods, without a Python exception for every "nothing more to read" (two per record)
    and without a fresh buffer per call; errors still go through pyOpenSSL, which reads
    OpenSSL's error queue and raises its usual exception."""
    handle = handle_of(conn, "_ssl")
    if handle is None or not hasattr(conn, "_raise_ssl_error") or not all(
            hasattr(LIB, name) for name in ("SSL_read", "SSL_write", "SSL_do_handshake",
                                             "SSL_get_error", "SSL_pending", "BIO_read",
                                             "BIO_write")):
        return None
    return handle, getattr(conn, "_into_ssl", None), getattr(conn, "_from_ssl", None)


def error_of(conn: SSL.Connection, handle: Any, result: int) -> SSL.Error:
    """The pyOpenSSL exception for a failed call on ``handle`` (not raised)."""
    try:
        conn._raise_ssl_error(handle, result)
    except SSL.Error as exc:
        return exc
    return SSL.Error([])


def verify_error_text(code: int) -> str:
    """OpenSSL's text for a certificate-verification error code (``certificate has
    expired``...), as the stdlib puts it in ``SSLCertVerificationError.verify_message``."""
    try:
        return str(FFI.string(LIB.X509_verify_cert_error_string(code)).decode())
    except Exception:
        return f"certificate verify error {code}"


def is_ip(name: str) -> bool:
    try:
        ipaddress.ip_address(name)
    except ValueError:
        return False
    return True
