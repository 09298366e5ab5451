"""pyOpenSSL failures as the stdlib's exceptions, with its texts."""

from __future__ import annotations

import ssl

from OpenSSL import SSL

from harness.tls_engine import _native as native

#: X509_V_ERR_HOSTNAME_MISMATCH / X509_V_ERR_IP_ADDRESS_MISMATCH
NAME_MISMATCH = {62: "Hostname mismatch", 64: "IP address mismatch"}


def ssl_error(exc: BaseException, verify_error: int | None = None,
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
        if verify_error in NAME_MISMATCH and hostname:  # the stdlib's own wording
            message = (f"{NAME_MISMATCH[verify_error]}, certificate is not valid for "
                       f"'{hostname}'.")
        else:
            message = native.verify_error_text(verify_error) if verify_error else text
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


def want_read() -> ssl.SSLWantReadError:
    return ssl.SSLWantReadError(2, "The operation did not complete (read)")


def want_write() -> ssl.SSLWantWriteError:
    return ssl.SSLWantWriteError(3, "The operation did not complete (write)")
