"""Connections on the engine: ``BioTls`` for asyncio/uvloop, ``SocketTls`` for paho."""

from __future__ import annotations

import select
import socket
import ssl
import sys
import time
from collections.abc import Callable
from typing import TYPE_CHECKING, Any

from OpenSSL import SSL, crypto

from harness.tls_engine import _errors as errors
from harness.tls_engine import _native as native
from harness.tls_engine.peer import PeerCertificate, hostname_matches

if TYPE_CHECKING:
    from harness.tls_engine.contexts import EngineContext

_RECORD = 16 * 1024 + 256  # one TLS record's plaintext, with room
_OUT_CHUNK = 16 * 1024  # one buffer of what the engine wrote, drained in a loop
_READ_CHUNK = 64 * 1024  # most plaintext one read returns (uvloop asks for 256 KiB)


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
            raise errors.verify_failed(errors.name_mismatch_text(name), 62)

    def _failed(self, exc: BaseException) -> OSError:
        err = exc if isinstance(exc, ssl.SSLError) else errors.ssl_error(
            exc, native.verify_result(self._conn), self.server_hostname)
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
        self._h = native.io_handles(self._conn)
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
                native.LIB.BIO_write(self._h[1], data, len(data))
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
            buf = native.no_zero("char[]", _OUT_CHUNK)
            while True:
                got = native.LIB.BIO_read(out, buf, _OUT_CHUNK)
                if got <= 0:
                    return
                outgoing.write(native.FFI.buffer(buf, got))
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
            result = native.LIB.SSL_do_handshake(handle)
            if result != 1:
                code = native.LIB.SSL_get_error(handle, result)
                want = errors.wanted(code)
                if want is not None:
                    if code == native.WANT_READ:
                        self._unread = False
                    self._push()
                    raise want
                failure = native.error_of(self._conn, handle, result)
        else:
            try:
                self._conn.do_handshake()
            except SSL.WantReadError:
                self._unread = False
                self._push()
                raise errors.want_read() from None
            except SSL.WantWriteError:
                self._push()
                raise errors.want_write() from None
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
            base = native.FFI.from_buffer(buffer, require_writable=True)
        else:
            cap = min(n, _READ_CHUNK)
            base = native.no_zero("char[]", cap)
        total = code = result = 0
        while total < cap:  # every complete record there is (see the class doc)
            result = native.LIB.SSL_read(handle, base + total, cap - total)
            if result <= 0:
                code = native.LIB.SSL_get_error(handle, result)
                break
            total += result
        if total >= cap:
            self._unread = True  # stopped by the caller's limit: maybe more
        else:
            self._unread = False
            if code == native.ZERO_RETURN:
                self._eof_pending = total > 0  # report the close_notify on the next read
            elif not total:
                self._push()
                raise errors.wanted(code) or errors.ssl_error(
                    native.error_of(self._conn, handle, result), native.verify_result(self._conn))
        self._push()
        if buffer is not None:
            return total
        return native.FFI.buffer(base, total)[:]

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
                raise errors.want_read() from None
        except SSL.ZeroReturnError:
            self._unread = False
            if total:
                self._eof_pending = True
        except SSL.Error as exc:
            if not total:
                self._push()
                raise errors.ssl_error(exc, native.verify_result(conn)) from None
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
            count = native.LIB.SSL_write(handle, native.FFI.from_buffer(data), size)
            if count <= 0:
                raise errors.wanted(native.LIB.SSL_get_error(handle, count)) or errors.ssl_error(
                    native.error_of(self._conn, handle, count))
        else:
            try:
                count = self._conn.send(data)
            except SSL.WantReadError:
                raise errors.want_read() from None
            except SSL.WantWriteError:
                raise errors.want_write() from None
            except SSL.Error as exc:
                raise errors.ssl_error(exc) from None
        self._push()
        return int(count)

    def pending(self) -> int:
        if self._h is not None:
            pending = int(native.LIB.SSL_pending(self._h[0]))
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
            raise errors.ssl_error(exc) from None
        self._push()
        if not done:
            raise errors.want_read()


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
        handles = native.io_handles(self._conn)
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
                    raise (errors.want_write() if write else errors.want_read()) from None
                left = None
                if timeout is not None:
                    if deadline is None:
                        deadline = time.monotonic() + timeout
                    left = deadline - time.monotonic()
                    if left <= 0:
                        raise TimeoutError(f"The {what} operation timed out") from None
                _wait_fd(self.tcp_socket.fileno(), write=write, timeout=left, what=what)

    def _retry_or_raise(self, code: int, result: int) -> None:
        """After a fast-path call that did not complete: raise its failure, or, on a
        non-blocking socket, the "try again" paho expects; return to wait and retry."""
        want = errors.wanted(code)
        if want is None:
            raise errors.ssl_error(native.error_of(self._conn, self._h, result))
        if self.tcp_socket.gettimeout() == 0.0:
            raise want

    def do_handshake(self) -> None:
        try:
            self._io(self._conn.do_handshake, "handshake")
            self._check_server_name()
        except (SSL.Error, ssl.SSLError) as exc:
            raise self._failed(exc) from None

    def recv(self, bufsize: int, flags: int = 0) -> bytes:
        handle = self._h
        if handle is not None:  # the fast path: paho reads a packet in three small recvs
            buf = native.no_zero("char[]", bufsize)
            got = native.LIB.SSL_read(handle, buf, bufsize)
            if got > 0:
                return native.FFI.buffer(buf, got)[:]  # type: ignore[no-any-return]
            code = native.LIB.SSL_get_error(handle, got)
            if code == native.ZERO_RETURN:
                return b""
            self._retry_or_raise(code, got)  # a blocking or timed socket: wait as below
        try:
            return self._io(lambda: self._conn.recv(bufsize), "read")  # type: ignore[no-any-return]
        except SSL.ZeroReturnError:
            return b""
        except SSL.Error as exc:
            raise errors.ssl_error(exc) from None

    def send(self, data: Any, flags: int = 0) -> int:
        size = len(data)
        if not size:
            return 0  # SSL_write of nothing is an error; the stdlib sends nothing
        handle = self._h
        if handle is not None:
            got = native.LIB.SSL_write(handle, native.FFI.from_buffer(data), size)
            if got > 0:
                return int(got)
            self._retry_or_raise(native.LIB.SSL_get_error(handle, got), got)
        try:
            return int(self._io(lambda: self._conn.send(data), "write"))
        except SSL.Error as exc:
            raise errors.ssl_error(exc) from None

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
