"""pyOpenSSL failures as the stdlib's exceptions, with its texts."""

from __future__ import annotations

import ssl

from OpenSSL import SSL

from harness.tls_engine import _native as native

#: X509_V_ERR_HOSTNAME_MISMATCH / X509_V_ERR_IP_ADDRESS_MISMATCH
NAME_MISMATCH = {62: "Hostname mismatch", 64: "IP address mismatch"}


def _tagged(err: OSError, library: str, reason: str) -> OSError:
    """``err`` with the ``library`` and ``reason`` attributes the stdlib's SSL errors carry."""
    err.library = library  # type: ignore[attr-defined]
    err.reason = reason  # type: ignore[attr-defined]
    return err


def name_mismatch_text(hostname: str, code: int = 62) -> str:
    """The stdlib's ``verify_message`` for a certificate that does not name ``hostname``."""
    return f"{NAME_MISMATCH[code]}, certificate is not valid for '{hostname}'."


def verify_failed(message: str, code: int, library: str = "SSL",
                  reason: str = "CERTIFICATE_VERIFY_FAILED",
                  text: str = "certificate verify failed") -> ssl.SSLCertVerificationError:
    """A certificate-verification failure as the stdlib raises it."""
    err = ssl.SSLCertVerificationError(1, f"[{library}: {reason}] {text}: {message}")
    err.verify_code = code
    err.verify_message = message
    _tagged(err, library, reason)
    return err


def key_mismatch() -> ssl.SSLError:
    """``load_cert_chain``'s error for a key that does not belong to the certificate."""
    err = ssl.SSLError(116, "[X509: KEY_VALUES_MISMATCH] key values mismatch")
    _tagged(err, "X509", "KEY_VALUES_MISMATCH")
    return err


def pem_lib() -> ssl.SSLError:
    """``load_cert_chain``'s error for a file that holds no usable PEM key or certificate."""
    err = ssl.SSLError(9, "[SSL] PEM lib")
    _tagged(err, "SSL", "PEM_LIB")
    return err


def ssl_error(exc: BaseException, verify_error: int | None = None,
               hostname: str | None = None) -> OSError:
    """The stdlib exception a pyOpenSSL failure corresponds to (same class and texts)."""
    if isinstance(exc, SSL.ZeroReturnError):
        return ssl.SSLZeroReturnError(6, "TLS/SSL connection has been closed (EOF)")
    if isinstance(exc, SSL.SysCallError):
        code, text = (*exc.args, None, None)[:2]
        if code == -1 or code == 0 or code is None:
            return _tagged(ssl.SSLEOFError(8, "EOF occurred in violation of protocol"), "SSL",
                           "UNEXPECTED_EOF_WHILE_READING")
        return OSError(code, text)
    details = exc.args[0] if exc.args and isinstance(exc.args[0], list) else []
    library, text = "SSL", str(exc) or type(exc).__name__
    if details:
        first = details[0]
        library = str(first[0] or "SSL").split(" ")[0].upper()
        text = str(first[-1])
    reason = text.upper().replace(" ", "_").replace("-", "_")
    if "verify failed" in text:
        if verify_error in NAME_MISMATCH and hostname:  # the stdlib's own wording
            message = name_mismatch_text(hostname, verify_error)
        else:
            message = native.verify_error_text(verify_error) if verify_error else text
        return verify_failed(message, verify_error or 0, library, reason, text)
    return _tagged(ssl.SSLError(1, f"[{library}: {reason}] {text}"), library, reason)


def wanted(code: int) -> ssl.SSLError | None:
    """The stdlib's "try again" exception for an ``SSL_get_error`` code (None: a failure)."""
    if code == native.WANT_READ:
        return want_read()
    if code == native.WANT_WRITE:
        return want_write()
    return None


def want_read() -> ssl.SSLWantReadError:
    return ssl.SSLWantReadError(2, "The operation did not complete (read)")


def want_write() -> ssl.SSLWantWriteError:
    return ssl.SSLWantWriteError(3, "The operation did not complete (write)")
