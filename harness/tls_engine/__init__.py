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

from OpenSSL import SSL

from harness.tls_engine._native import GROUPS
from harness.tls_engine.connections import BioTls, SocketTls
from harness.tls_engine.contexts import (
    ALPN_NONE,
    NO_CHECK_TIME,
    PYTHON_DEFAULT_CIPHERS,
    EngineContext,
    client_context,
    server_context,
)
from harness.tls_engine.peer import PeerCertificate, hostname_matches

__all__ = [
    "ALPN_NONE",
    "GROUPS",
    "NO_CHECK_TIME",
    "PYTHON_DEFAULT_CIPHERS",
    "BioTls",
    "EngineContext",
    "PeerCertificate",
    "SocketTls",
    "bundled_openssl_version",
    "client_context",
    "hostname_matches",
    "server_context",
]


def bundled_openssl_version() -> str:
    """The version text of the OpenSSL this engine runs on."""
    return SSL.OpenSSL_version(SSL.OPENSSL_VERSION).decode()
