"""A pool of ready RSA-2048 key pairs, kept full by worker processes.

CreateKeysAndCertificate and CreateProvisioningClaim hand out a new RSA-2048 key
pair per call (spec fleet-provisioning.md §1.2, §2.1). Generating one costs ~37 ms
of CPU, p95 ~110 ms (perf-notes): far too long for the event loop, and under load
too long for a thread (it holds the GIL). So keys are made ahead of time in worker
processes and served from memory: :meth:`KeyPool.take` on the loop,
:meth:`KeyPool.take_blocking` from threads. A taker that finds the pool empty waits
for the next key off the loop, and the pool records one ``Kind.KEY_POOL_EMPTY``
observation per dry spell, so a load run shows that the endpoint, not the device,
was the bottleneck. :meth:`KeyPool.stats` reports how fast the workers refill it.

Workers are plain ``python -m harness.emulator.keypool --worker`` processes fed
one request line per key (not :mod:`multiprocessing`, whose spawn/forkserver
workers re-import the caller's ``__main__`` and whose fork is unsafe from the
emulator's threads). One thread per worker moves the requests and answers. Workers
run at a lower CPU priority so that, on a busy machine, the event loop wins; they
exit when the emulator closes their stdin or dies.

The private key never reaches a log, a repr or an observation.
"""

from __future__ import annotations

import asyncio
import base64
import collections
import concurrent.futures as cf
import json
import logging
import os
import signal
import subprocess
import sys
import threading
import time
from dataclasses import dataclass, field
from functools import partial
from typing import IO

from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import rsa

from harness.observations import Kind, ObservationLog

log = logging.getLogger("fleetbench.keypool")

#: Key size AWS issues (spec §1.2: ``Public-Key: (2048 bit)``).
KEY_BITS = 2048
#: Default number of ready keys and of worker processes (the app passes its own).
DEFAULT_SIZE = 32
DEFAULT_WORKERS = 1
#: Completions kept to measure the refill rate.
RATE_WINDOW = 64
#: Added to the workers' nice value: the event loop's process keeps priority.
WORKER_NICENESS = 5
#: Pause before a failed worker is restarted.
RESTART_DELAY_SECONDS = 0.5


@dataclass(frozen=True)
class KeyMaterial:
    """One RSA key pair: the PKCS#1 private key PEM (as AWS returns it, §1.2) and the
    public key as SubjectPublicKeyInfo DER and PEM."""

    private_key_pem: str = field(repr=False)
    public_key_der: bytes = field(repr=False)
    public_key_pem: str = field(repr=False)
    generation_seconds: float = 0.0

    def public_key(self) -> rsa.RSAPublicKey:
        key = serialization.load_der_public_key(self.public_key_der)
        assert isinstance(key, rsa.RSAPublicKey)
        return key

    def to_line(self) -> bytes:
        """The worker's answer: one JSON line."""
        return json.dumps({
            "private": self.private_key_pem,
            "public_der": base64.b64encode(self.public_key_der).decode(),
            "public_pem": self.public_key_pem,
            "seconds": self.generation_seconds,
        }).encode() + b"\n"

    @classmethod
    def from_line(cls, line: bytes) -> KeyMaterial:
        data = json.loads(line)
        return cls(str(data["private"]), base64.b64decode(data["public_der"]),
                   str(data["public_pem"]), float(data["seconds"]))


def generate_key_material(bits: int = KEY_BITS) -> KeyMaterial:
    """Make one key pair (what a worker does; also usable inline)."""
    started = time.perf_counter()
    key = rsa.generate_private_key(public_exponent=65537, key_size=bits)
    private_pem = key.private_bytes(
        serialization.Encoding.PEM,
        serialization.PrivateFormat.TraditionalOpenSSL,
        serialization.NoEncryption(),
    ).decode()
    public = key.public_key()
    der = public.public_bytes(serialization.Encoding.DER,
                              serialization.PublicFormat.SubjectPublicKeyInfo)
    pem = public.public_bytes(serialization.Encoding.PEM,
                              serialization.PublicFormat.SubjectPublicKeyInfo).decode()
    return KeyMaterial(private_pem, der, pem, time.perf_counter() - started)


class KeyPoolClosed(RuntimeError):
    """The pool was stopped while a taker waited (or before it asked)."""


@dataclass(frozen=True)
class KeyPoolStats:
    """A snapshot of the pool. ``refill_rate`` is keys per second delivered by the
    workers over the last :data:`RATE_WINDOW` completions (``None`` before two)."""

    size: int
    workers: int
    ready: int
    in_flight: int
    waiting: int
    generated: int
    taken: int
    dry_spells: int
    mean_generation_ms: float | None
    refill_rate: float | None


class KeyPool:
    """Ready RSA key pairs, refilled by ``workers`` processes up to ``size`` (+ waiters)."""

    def __init__(
        self,
        size: int = DEFAULT_SIZE,
        workers: int = DEFAULT_WORKERS,
        *,
        observations: ObservationLog | None = None,
        bits: int = KEY_BITS,
        niceness: int = WORKER_NICENESS,
    ) -> None:
        if size < 1 or workers < 1:
            raise ValueError("key pool size and workers must be at least 1")
        self.size = size
        self.workers = workers
        self.bits = bits
        self.niceness = niceness
        self._observations = observations
        self._lock = threading.Lock()
        self._changed = threading.Condition(self._lock)
        self._ready: collections.deque[KeyMaterial] = collections.deque()
        self._waiters: collections.deque[cf.Future[KeyMaterial]] = collections.deque()
        self._in_flight = 0
        self._threads: list[threading.Thread] = []
        self._processes: set[subprocess.Popen[bytes]] = set()
        self._closed = False
        self._dry = False
        self._generated = 0
        self._taken = 0
        self._dry_spells = 0
        self._generation_total = 0.0
        self._completions: collections.deque[float] = collections.deque(maxlen=RATE_WINDOW)

    # -- lifecycle ---------------------------------------------------------------------------
    def start(self) -> None:
        """Start the workers; returns at once, keys arrive in the background."""
        with self._lock:
            if self._closed:
                raise KeyPoolClosed("the key pool was stopped")
            if self._threads:
                return
            for index in range(self.workers):
                thread = threading.Thread(target=self._feed, args=(index,), daemon=True,
                                          name=f"fleetbench-keypool-{index}")
                self._threads.append(thread)
        for thread in self._threads:
            thread.start()

    def close(self, timeout: float = 5.0) -> None:
        """Stop the workers; waiting takers get :class:`KeyPoolClosed`. Blocks briefly:
        call it off the loop, or use :meth:`stop`."""
        with self._lock:
            self._closed = True
            waiters = list(self._waiters)
            self._waiters.clear()
            self._ready.clear()
            processes = list(self._processes)
            threads = list(self._threads)
            self._changed.notify_all()
        for waiter in waiters:
            if waiter.set_running_or_notify_cancel():
                waiter.set_exception(KeyPoolClosed("the key pool was stopped"))
        for proc in processes:
            _end(proc)
        for thread in threads:
            if thread is not threading.current_thread():
                thread.join(timeout)

    async def stop(self) -> None:
        """:meth:`close` without blocking the loop."""
        await asyncio.get_running_loop().run_in_executor(None, self.close)

    # -- taking ------------------------------------------------------------------------------
    def _take_or_wait(self) -> KeyMaterial | cf.Future[KeyMaterial]:
        """A ready key, or a future that the next key completes (starts the pool if needed)."""
        if not self._threads:
            self.start()
        with self._lock:
            if self._closed:
                raise KeyPoolClosed("the key pool was stopped")
            if self._ready:
                key = self._ready.popleft()
                self._taken += 1
                self._dry = False
                self._changed.notify_all()
                return key
            waiter: cf.Future[KeyMaterial] = cf.Future()
            self._waiters.append(waiter)
            first = not self._dry
            self._dry = True
            if first:
                self._dry_spells += 1
            waiting, in_flight = len(self._waiters), self._in_flight
            self._changed.notify_all()
        if first:
            log.info("event=key_pool_empty size=%d workers=%d in_flight=%d", self.size,
                     self.workers, in_flight)
            if self._observations is not None:
                self._observations.record(Kind.KEY_POOL_EMPTY, size=self.size,
                                          workers=self.workers, waiting=waiting,
                                          in_flight=in_flight)
        return waiter

    async def take(self) -> KeyMaterial:
        """A key pair, waiting off the loop when the pool is dry."""
        got = self._take_or_wait()
        if isinstance(got, KeyMaterial):
            return got
        # Cancelling the wrapper cancels the waiter; the next key goes to the next taker.
        return await asyncio.wrap_future(got)

    def take_blocking(self, timeout: float | None = None) -> KeyMaterial:
        """A key pair for a thread (never call this on the event loop)."""
        got = self._take_or_wait()
        if isinstance(got, KeyMaterial):
            return got
        try:
            return got.result(timeout)
        except cf.TimeoutError:
            if got.cancel():
                raise TimeoutError("no key pair became available in time") from None
            return got.result()  # a key was being handed over as the wait ended

    def wait_ready(self, count: int | None = None, timeout: float = 30.0) -> bool:
        """Block until ``count`` (default: ``size``) keys are ready; for warm-up and tests."""
        target = self.size if count is None else min(count, self.size)
        deadline = time.monotonic() + timeout
        with self._lock:
            while len(self._ready) < target and not self._closed:
                remaining = deadline - time.monotonic()
                if remaining <= 0:
                    return False
                self._changed.wait(remaining)
            return len(self._ready) >= target

    async def wait_ready_async(self, count: int | None = None, timeout: float = 30.0) -> bool:
        return await asyncio.get_running_loop().run_in_executor(
            None, partial(self.wait_ready, count, timeout))

    # -- refilling (one thread per worker process) -------------------------------------------
    def _wanted_locked(self) -> bool:
        return len(self._ready) + self._in_flight < self.size + len(self._waiters)

    def _feed(self, index: int) -> None:
        proc: subprocess.Popen[bytes] | None = None
        try:
            while True:
                with self._lock:
                    while not self._closed and not self._wanted_locked():
                        self._changed.wait()
                    if self._closed:
                        return
                    self._in_flight += 1
                key: KeyMaterial | None = None
                try:
                    if proc is None or proc.poll() is not None:
                        proc = self._spawn()
                    key = _request(proc)
                except (OSError, ValueError, KeyError) as exc:
                    if not self._closed:
                        log.warning("event=key_worker_failed worker=%d error=%s", index,
                                    type(exc).__name__)
                    if proc is not None:
                        self._forget(proc)
                        proc = None
                self._deliver(key)
                if key is None:
                    with self._lock:
                        self._changed.wait_for(lambda: self._closed, RESTART_DELAY_SECONDS)
        finally:
            if proc is not None:
                self._forget(proc)

    def _spawn(self) -> subprocess.Popen[bytes]:
        proc = subprocess.Popen(
            [sys.executable, "-m", "harness.emulator.keypool", "--worker", str(self.bits),
             str(self.niceness)],
            stdin=subprocess.PIPE, stdout=subprocess.PIPE, close_fds=True,
            # Own session: a terminal's Ctrl-C is the emulator's to handle; workers end
            # when their stdin closes, whichever way the emulator stops.
            start_new_session=True,
        )
        with self._lock:
            self._processes.add(proc)
            closed = self._closed
        if closed:
            self._forget(proc)
            raise OSError("key pool closed")
        return proc

    def _forget(self, proc: subprocess.Popen[bytes]) -> None:
        with self._lock:
            self._processes.discard(proc)
        _end(proc)

    def _deliver(self, key: KeyMaterial | None) -> None:
        handed: cf.Future[KeyMaterial] | None = None
        with self._lock:
            self._in_flight -= 1
            if key is not None and not self._closed:
                self._generated += 1
                self._generation_total += key.generation_seconds
                self._completions.append(time.monotonic())
                while self._waiters:
                    waiter = self._waiters.popleft()
                    if waiter.set_running_or_notify_cancel():  # else its taker gave up
                        self._taken += 1
                        handed = waiter
                        break
                if handed is None:
                    self._ready.append(key)
            self._changed.notify_all()
        if handed is not None and key is not None:
            handed.set_result(key)  # outside the lock: callbacks may call back into the pool

    # -- measuring ---------------------------------------------------------------------------
    def stats(self) -> KeyPoolStats:
        with self._lock:
            completions = list(self._completions)
            mean = (self._generation_total / self._generated * 1000) if self._generated else None
            rate = None
            if len(completions) >= 2 and completions[-1] > completions[0]:
                rate = (len(completions) - 1) / (completions[-1] - completions[0])
            return KeyPoolStats(
                size=self.size,
                workers=self.workers,
                ready=len(self._ready),
                in_flight=self._in_flight,
                waiting=len(self._waiters),
                generated=self._generated,
                taken=self._taken,
                dry_spells=self._dry_spells,
                mean_generation_ms=mean,
                refill_rate=rate,
            )


def _request(proc: subprocess.Popen[bytes]) -> KeyMaterial:
    assert proc.stdin is not None and proc.stdout is not None
    proc.stdin.write(b"\n")
    proc.stdin.flush()
    line = proc.stdout.readline()
    if not line:
        raise OSError(f"key worker exited (status {proc.poll()})")
    return KeyMaterial.from_line(line)


def _end(proc: subprocess.Popen[bytes]) -> None:
    for stream in (proc.stdin, proc.stdout):
        try:
            if stream is not None:
                stream.close()
        except OSError:
            pass
    if proc.poll() is None:
        proc.kill()
    try:
        proc.wait(timeout=5)
    except subprocess.TimeoutExpired:
        pass


def _worker(bits: int, niceness: int, requests: IO[bytes], answers: IO[bytes]) -> int:
    """Answer each request line with one key line until stdin closes.

    Workers run in their own session and also ignore SIGINT: a Ctrl-C is the emulator's
    to handle, and the worker ends when the emulator closes its stdin."""
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    if niceness:
        try:
            os.nice(niceness)
        except OSError:
            pass
    for _ in iter(requests.readline, b""):
        answers.write(generate_key_material(bits).to_line())
        answers.flush()
    return 0


if __name__ == "__main__":
    if len(sys.argv) == 4 and sys.argv[1] == "--worker":
        sys.exit(_worker(int(sys.argv[2]), int(sys.argv[3]), sys.stdin.buffer,
                         sys.stdout.buffer))
    print("usage: python -m harness.emulator.keypool --worker BITS NICENESS", file=sys.stderr)
    sys.exit(64)
