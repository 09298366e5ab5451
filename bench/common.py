"""Shared pieces of the broker benchmarks (emulator vs mosquitto, issue 2).

The brokers run as subprocesses, and so do the load generators, so that the CPU
time and resident memory read from ``/proc/<pid>`` belong to one program each.
This module holds the throwaway PKI both brokers trust, the mosquitto config
writer, starting and stopping the two brokers, ``/proc`` readings, the cheapest
MQTT client asyncio offers (one ``asyncio.Protocol`` per connection over the
project's codec), and the ready/go/result plumbing between the orchestrating
process and its load-generator processes.

Worker protocol (one JSON object a line): a worker prints ``{"ready": ...}`` when
it is set up, waits for ``{"go": true, "t0": ..., "t1": ...}`` on stdin (times on
``time.monotonic()``, which is system-wide on Linux), runs, writes its result to the
file named on its command line and prints ``{"result": "<that file>"}``. The
orchestrator samples the broker's CPU time at t0 and t1.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import math
import os
import resource
import selectors
import shutil
import signal
import socket
import ssl
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Coroutine, Iterator, Mapping, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import IO, Any

from cryptography import x509
from cryptography.x509.oid import NameOID

from harness import pki, tls_engine
from harness.emulator.mqtt.codec import Decoder, encode
from harness.emulator.mqtt.packets import Connect, Disconnect, Packet

#: Repository root (``python -m bench.<name>`` must run from here).
ROOT = Path(__file__).resolve().parent.parent
#: MQTT 3.1.1: the smallest CONNECT/CONNACK, spoken by both brokers.
MQTT_LEVEL = 4
#: A policy allowing every IoT action on every resource (the benchmark's client only).
ALLOW_ALL_POLICY = json.dumps({
    "Version": "2012-10-17",
    "Statement": [{"Effect": "Allow", "Action": "iot:*", "Resource": "*"}],
})
POLICY_NAME = "fleetbench-bench-allow-all"
#: Open-file limit asked for in every process (the hard limit caps it).
NOFILE_WANTED = 65536
#: Seconds a broker has to start listening.
START_TIMEOUT_S = 60.0
#: Emulator settings lifted for throughput runs: AWS's 100 PUBLISH/s per connection quota
#: (spec broker §1.8) would discard most of the load, and ``observe_publishes`` is the
#: broker's own "off for load benchmarks" knob. Everything else stays at AWS's defaults.
THROUGHPUT_SETTINGS: Mapping[str, Any] = {
    "publish_rate_per_connection": None,
    "observe_publishes": False,
}


# -- /proc readings --------------------------------------------------------------------------

_CLK_TCK = os.sysconf("SC_CLK_TCK")


def cpu_seconds(pid: int) -> float:
    """User + system CPU seconds of process ``pid`` (all its threads), from /proc/<pid>/stat."""
    text = Path(f"/proc/{pid}/stat").read_text()
    fields = text[text.rindex(")") + 2:].split()
    return (int(fields[11]) + int(fields[12])) / _CLK_TCK  # utime, stime (fields 14, 15)


def rss_bytes(pid: int) -> int:
    """Resident set size of process ``pid`` (VmRSS in /proc/<pid>/status)."""
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) * 1024
    raise ValueError(f"no VmRSS for pid {pid}")


def raise_nofile(wanted: int = NOFILE_WANTED) -> int:
    """Raise RLIMIT_NOFILE as far as allowed (10,000 idle connections need it); the new limit."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    target = wanted if hard == resource.RLIM_INFINITY else min(wanted, hard)
    if target > soft:
        try:
            resource.setrlimit(resource.RLIMIT_NOFILE, (target, max(hard, target)))
        except (ValueError, OSError):
            resource.setrlimit(resource.RLIMIT_NOFILE, (min(target, hard), hard))
    return resource.getrlimit(resource.RLIMIT_NOFILE)[0]


def pin(pid: int, cpus: Sequence[int] | None) -> None:
    """Pin ``pid`` to ``cpus`` (None: leave it where the scheduler puts it)."""
    if cpus:
        with contextlib.suppress(OSError):
            os.sched_setaffinity(pid, set(cpus))


def pin_process_tree(pid: int, cpus: Sequence[int] | None) -> None:
    """Pin every thread of ``pid`` and of its descendants to ``cpus`` (None: to every CPU
    this process may use, i.e. unpin). :func:`pin` moves only the main thread, and a
    server started before it is pinned already has its executor threads and workers."""
    import psutil

    wanted = set(cpus) if cpus else os.sched_getaffinity(0)
    try:
        pids = [pid] + [c.pid for c in psutil.Process(pid).children(recursive=True)]
    except psutil.Error:
        return
    for proc in pids:
        try:
            tids = [int(t) for t in os.listdir(f"/proc/{proc}/task")]
        except OSError:
            continue  # exited
        for tid in tids:
            with contextlib.suppress(OSError):
                os.sched_setaffinity(tid, wanted)


def cpu_plan(pinned: bool) -> tuple[list[int] | None, list[int] | None]:
    """(broker CPUs, load-generator CPUs): broker on CPU 0, load on the rest, when pinning."""
    cpus = sorted(os.sched_getaffinity(0))
    if not pinned or len(cpus) < 2:
        return None, None
    return cpus[:1], cpus[1:]


# -- throwaway PKI ---------------------------------------------------------------------------

@dataclass(frozen=True)
class BenchPki:
    """Files of the benchmark's own CA: mosquitto's server identity and the one client identity
    used against both brokers (EC P-256 everywhere, like the emulator's server key)."""

    directory: Path
    ca_file: Path
    ca_key_file: Path
    server_cert: Path
    server_key: Path
    client_cert: Path
    client_key: Path

    def ca(self) -> pki.CertificateAuthority:
        return pki.CertificateAuthority(key=pki.load_private_key(self.ca_key_file.read_bytes()),
                                        cert=pki.load_certificate(self.ca_file.read_bytes()))


def make_pki(directory: Path) -> BenchPki:
    """Create a CA, a server certificate for localhost/127.0.0.1 and a client certificate."""
    directory.mkdir(parents=True, exist_ok=True)
    ca = pki.CertificateAuthority.create(common_name="fleetbench bench CA")
    out = BenchPki(directory, directory / "bench-ca.pem", directory / "bench-ca.key",
                   directory / "mosquitto-server.pem", directory / "mosquitto-server.key",
                   directory / "client.pem", directory / "client.key")
    pki.write_public(out.ca_file, ca.pem)
    pki.write_secret(out.ca_key_file, pki.private_key_pem(ca.key, pkcs1=False))
    server_key = pki.generate_ec_key()
    pki.write_public(out.server_cert, pki.certificate_pem(
        ca.issue_server_certificate(server_key, ["localhost", "127.0.0.1"])))
    pki.write_secret(out.server_key, pki.private_key_pem(server_key, pkcs1=False))
    client_key = pki.generate_ec_key()
    subject = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "fleetbench-bench-client")])
    pki.write_public(out.client_cert, pki.certificate_pem(
        ca.issue_device_certificate(client_key.public_key(), subject)))
    pki.write_secret(out.client_key, pki.private_key_pem(client_key, pkcs1=False))
    return out


# -- the brokers ---------------------------------------------------------------------------

@dataclass(frozen=True)
class Target:
    """Where and how a load generator connects (crosses the process boundary as JSON)."""

    broker: str
    host: str
    port: int
    server_name: str
    ca_files: tuple[str, ...]
    client_cert: str
    client_key: str

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> Target:
        return cls(**{**data, "ca_files": tuple(data["ca_files"])})


@dataclass
class BrokerProcess:
    """A broker running as a child process of the benchmark."""

    name: str
    process: subprocess.Popen[bytes]
    target: Target
    log_file: Path
    _log: IO[bytes] | None = field(default=None, repr=False)

    @property
    def pid(self) -> int:
        return self.process.pid

    def cpu_seconds(self) -> float:
        return cpu_seconds(self.pid)

    def rss_bytes(self) -> int:
        return rss_bytes(self.pid)

    def alive(self) -> bool:
        return self.process.poll() is None

    def log_tail(self, size: int = 4000) -> str:
        with contextlib.suppress(OSError):
            return self.log_file.read_bytes()[-size:].decode(errors="replace")
        return ""

    def stop(self, timeout: float = 10.0) -> None:
        """SIGTERM, then SIGKILL after ``timeout``."""
        if self.process.poll() is None:
            self.process.send_signal(signal.SIGTERM)
            try:
                self.process.wait(timeout)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait(timeout)
        if self._log is not None:
            self._log.close()
            self._log = None


def free_port(host: str = "127.0.0.1") -> int:
    """A port free right now (mosquitto cannot listen on port 0 and report it)."""
    with socket.socket() as s:
        s.bind((host, 0))
        return int(s.getsockname()[1])


def write_mosquitto_config(directory: Path, bench_pki: BenchPki, port: int,
                           host: str = "127.0.0.1") -> Path:
    """mosquitto.conf for one mutual-TLS listener, tuned like the emulator (TCP_NODELAY, 100
    outbound QoS 1 in flight, per-connection logging off, no persistence)."""
    lines = [
        "per_listener_settings false",
        "persistence false",
        "log_dest stderr",
        "log_type error",
        "log_type warning",
        "connection_messages false",
        "set_tcp_nodelay true",
        "max_inflight_messages 100",
        "max_queued_messages 1000",
        "allow_anonymous false",
        "user root",  # keep privileges: the key files are root's and mode 0600
        f"listener {port} {host}",
        f"cafile {bench_pki.ca_file}",
        f"certfile {bench_pki.server_cert}",
        f"keyfile {bench_pki.server_key}",
        "require_certificate true",
        "use_identity_as_username true",
        "tls_version tlsv1.2",  # the minimum: TLS 1.2 and 1.3 are accepted
    ]
    path = directory / "mosquitto.conf"
    path.write_text("\n".join(lines) + "\n")
    return path


def _raise_child_nofile() -> None:
    raise_nofile()


def _wait_until(check: Callable[[], bool], process: subprocess.Popen[bytes], what: str,
                timeout: float, log_file: Path) -> None:
    deadline = time.monotonic() + timeout
    while not check():
        if process.poll() is not None:
            tail = log_file.read_bytes()[-4000:].decode(errors="replace")
            raise RuntimeError(f"{what} exited with {process.returncode}:\n{tail}")
        if time.monotonic() > deadline:
            process.kill()
            raise TimeoutError(f"{what} did not start within {timeout:g} s")
        time.sleep(0.05)


def _port_open(host: str, port: int) -> bool:
    try:
        with socket.create_connection((host, port), timeout=0.5):
            return True
    except OSError:
        return False


def mosquitto_binary() -> str:
    found = shutil.which("mosquitto") or ("/usr/sbin/mosquitto"
                                          if Path("/usr/sbin/mosquitto").exists() else None)
    if found is None:
        raise FileNotFoundError("mosquitto is not installed (apt-get install mosquitto)")
    return found


def start_mosquitto(workdir: Path, bench_pki: BenchPki) -> BrokerProcess:
    """mosquitto on a free 127.0.0.1 port, configured for mutual TLS."""
    workdir.mkdir(parents=True, exist_ok=True)
    port = free_port()
    config = write_mosquitto_config(workdir, bench_pki, port)
    log_file = workdir / "mosquitto.log"
    log = log_file.open("wb")
    process = subprocess.Popen([mosquitto_binary(), "-c", str(config)], stdin=subprocess.DEVNULL,
                               stdout=log, stderr=subprocess.STDOUT,
                               preexec_fn=_raise_child_nofile)
    target = Target("mosquitto", "127.0.0.1", port, "localhost", (str(bench_pki.ca_file),),
                    str(bench_pki.client_cert), str(bench_pki.client_key))
    broker = BrokerProcess("mosquitto", process, target, log_file, log)
    try:
        _wait_until(lambda: _port_open("127.0.0.1", port), process, "mosquitto",
                    START_TIMEOUT_S, log_file)
    except BaseException:
        broker.stop()
        raise
    return broker


def emulator_command(data_dir: Path, settings: Mapping[str, Any]) -> list[str]:
    """``fleetbench emulator`` on free ports, with broker settings that differ from AWS's
    defaults passed as ``--broker-setting NAME=JSON``."""
    cmd = [sys.executable, "-m", "harness.cli", "emulator", "--mqtt-port", "0",
           "--api-port", "0", "--data-dir", str(data_dir), "--log-level", "WARNING"]
    for name, value in settings.items():
        cmd += ["--broker-setting", f"{name}={json.dumps(value)}"]
    return cmd


def start_emulator(workdir: Path, bench_pki: BenchPki,
                   settings: Mapping[str, Any] | None = None) -> BrokerProcess:
    """The emulator as a subprocess, with the benchmark's CA and client certificate registered
    through its control plane (boto3) and a policy allowing everything attached."""
    from harness.endpoint_info import EndpointInfo

    data_dir = workdir / "emulator-data"
    shutil.rmtree(data_dir, ignore_errors=True)  # a fresh account every start
    data_dir.mkdir(parents=True)
    endpoint_file = data_dir / "endpoint.json"
    endpoint_file.unlink(missing_ok=True)
    log_file = workdir / "emulator.log"
    log = log_file.open("wb")
    process = subprocess.Popen(emulator_command(data_dir, settings or {}), cwd=ROOT,
                               stdin=subprocess.DEVNULL, stdout=log, stderr=subprocess.STDOUT,
                               preexec_fn=_raise_child_nofile)
    broker: BrokerProcess | None = None
    try:
        _wait_until(endpoint_file.exists, process, "emulator", START_TIMEOUT_S, log_file)
        info = EndpointInfo.read(endpoint_file)
        target = Target("emulator", info.mqtt_host, info.mqtt_port, info.mqtt_server_name,
                        (info.ca_file,), str(bench_pki.client_cert), str(bench_pki.client_key))
        broker = BrokerProcess("emulator", process, target, log_file, log)
        register_client(info.api_url, info.region, bench_pki)
        wait_accepting(target, START_TIMEOUT_S)
    except BaseException:
        if broker is not None:
            broker.stop()
        else:
            process.kill()
            process.wait()
            log.close()
        raise
    return broker


def register_client(api_url: str, region: str, bench_pki: BenchPki) -> str:
    """Register the bench CA (DEFAULT mode, verification certificate) and the client certificate,
    ACTIVE, with an allow-all policy attached; returns the certificate ARN."""
    import boto3
    from botocore.config import Config

    iot = boto3.client("iot", endpoint_url=api_url, region_name=region,
                       aws_access_key_id="bench", aws_secret_access_key="bench",
                       config=Config(connect_timeout=5, read_timeout=30,
                                     retries={"mode": "standard", "max_attempts": 3}))
    ca = bench_pki.ca()
    code = iot.get_registration_code()["registrationCode"]
    verification_key = pki.generate_ec_key()
    verification = ca.issue_device_certificate(
        verification_key.public_key(), x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, code)]))
    iot.register_ca_certificate(caCertificate=ca.pem,
                                verificationCertificate=pki.certificate_pem(verification),
                                setAsActive=True)
    arn: str = iot.register_certificate(certificatePem=bench_pki.client_cert.read_text(),
                                        caCertificatePem=ca.pem, status="ACTIVE")["certificateArn"]
    iot.create_policy(policyName=POLICY_NAME, policyDocument=ALLOW_ALL_POLICY)
    iot.attach_policy(policyName=POLICY_NAME, target=arn)
    return arn


def wait_accepting(target: Target, timeout: float) -> None:
    """Until a CONNECT with the client certificate is accepted (a newly registered CA reaches
    the emulator's TLS context asynchronously)."""
    ctx = client_context(target)
    deadline = time.monotonic() + timeout
    attempt = 0
    last: BaseException | None = None
    while time.monotonic() < deadline:
        attempt += 1
        try:
            code = asyncio.run(probe_connect(target, ctx, f"bench-probe-{os.getpid()}-{attempt}"))
        except (OSError, ssl.SSLError, asyncio.TimeoutError, ConnectionError) as exc:
            last = exc
        else:
            if code == 0:
                return
            last = RuntimeError(f"CONNACK return code {code}")
        time.sleep(0.1)
    raise TimeoutError(f"{target.broker} refused the bench client for {timeout:g} s: {last}")


async def probe_connect(target: Target, ctx: ssl.SSLContext, client_id: str,
                        timeout: float = 5.0) -> int:
    """One connect/CONNACK/disconnect; the CONNACK return code (-1: closed without one)."""
    link = await asyncio.wait_for(open_link(target, ctx), timeout)
    try:
        link.send(Connect(MQTT_LEVEL, client_id, keep_alive=60))
        packet = await asyncio.wait_for(link.next_packet(), timeout)
        return int(getattr(packet, "reason_code", -1)) if packet is not None else -1
    finally:
        link.close(graceful=True)


def tls_parameters(target: Target) -> str:
    """``TLSv1.3 TLS_AES_256_GCM_SHA384``: what the bench client negotiates with ``target``."""
    async def probe() -> str:
        link = await open_link(target, client_context(target))
        try:
            ssl_object = link.transport.get_extra_info("ssl_object")
            cipher = ssl_object.cipher() if ssl_object is not None else None
            return f"{ssl_object.version()} {cipher[0] if cipher else '?'}" if ssl_object \
                else "no TLS"
        finally:
            link.close(graceful=False)

    return str(run_loop(probe()))


def tls_note(started: Mapping[str, BrokerProcess]) -> str:
    """One report line naming the negotiated TLS version and cipher per broker."""
    return "TLS: " + ", ".join(f"{name} {tls_parameters(b.target)}"
                               for name, b in started.items())


# -- the load generator's MQTT client ---------------------------------------------------------

def client_context(target: Target, engine: str = "bundled") -> ssl.SSLContext:
    """The one client context a load generator shares between all its connections."""
    ctx = trusting_context(target, engine)
    if isinstance(ctx, tls_engine.EngineContext):
        ctx.load_identity_files(Path(target.client_cert), Path(target.client_key))
    else:
        ctx.load_cert_chain(target.client_cert, target.client_key)
    return ctx


def trusting_context(target: Target, engine: str = "bundled") -> ssl.SSLContext:
    """A client context trusting ``target``'s CAs, without a client identity yet, on the
    bundled OpenSSL (harness.tls_engine: ~0.1 ms less per handshake and ~0.6 ms less per
    new identity than Python's ssl here) or, with ``engine="stdlib"``, on Python's ssl."""
    if engine == "bundled":
        return tls_engine.client_context(target.ca_files)
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
    ctx.minimum_version = ssl.TLSVersion.TLSv1_2
    for ca_file in target.ca_files:
        ctx.load_verify_locations(cafile=ca_file)
    return ctx


class MqttLink(asyncio.Protocol):
    """One client connection: decoded packets go to ``on_packet`` (or a queue when None).

    No streams, no tasks per connection: a callback per packet is the cheapest client
    asyncio has, so the load generator costs as little CPU as possible.
    """

    __slots__ = ("_queue", "_waiter", "closed", "decoder", "on_close", "on_packet", "transport")

    def __init__(self, on_packet: Callable[[MqttLink, Packet], None] | None = None,
                 on_close: Callable[[MqttLink], None] | None = None) -> None:
        self.decoder = Decoder(protocol_level=MQTT_LEVEL)
        self.on_packet = on_packet
        self.on_close = on_close
        self.transport: Any = None
        self.closed = asyncio.get_running_loop().create_future()
        self._queue: list[Packet | None] = []
        self._waiter: asyncio.Future[None] | None = None

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = transport  # uvloop's SSL transport is no asyncio.Transport subclass
        sock = transport.get_extra_info("socket")
        if sock is not None:
            with contextlib.suppress(OSError):
                sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)

    def data_received(self, data: bytes) -> None:
        try:
            packets = self.decoder.feed(data)
        except ValueError:
            self.close(graceful=False)
            return
        if self.on_packet is not None:
            for packet in packets:
                self.on_packet(self, packet)
        else:
            self._queue.extend(packets)
            self._wake()

    def connection_lost(self, exc: Exception | None) -> None:
        if not self.closed.done():
            self.closed.set_result(None)
        self._queue.append(None)
        self._wake()
        if self.on_close is not None:
            self.on_close(self)

    def _wake(self) -> None:
        if self._waiter is not None and not self._waiter.done():
            self._waiter.set_result(None)

    async def next_packet(self) -> Packet | None:
        """The next packet when no ``on_packet`` callback is set (None: connection closed)."""
        while not self._queue:
            self._waiter = asyncio.get_running_loop().create_future()
            await self._waiter
        return self._queue.pop(0)

    def send(self, packet: Packet) -> None:
        self.write(encode(packet, MQTT_LEVEL))

    def write(self, data: bytes) -> None:
        if self.transport is not None and not self.transport.is_closing():
            self.transport.write(data)

    def close(self, *, graceful: bool) -> None:
        """``graceful``: send DISCONNECT and close TLS politely; else abort the socket."""
        if self.transport is None or self.transport.is_closing():
            return
        if graceful:
            self.transport.write(DISCONNECT)
            self.transport.close()
        else:
            self.transport.abort()


DISCONNECT = encode(Disconnect(), MQTT_LEVEL)


async def open_link(target: Target, ctx: ssl.SSLContext,
                    on_packet: Callable[[MqttLink, Packet], None] | None = None,
                    on_close: Callable[[MqttLink], None] | None = None) -> MqttLink:
    """TCP connect and TLS handshake (returns once the handshake is done)."""
    loop = asyncio.get_running_loop()
    _, link = await loop.create_connection(lambda: MqttLink(on_packet, on_close), target.host,
                                           target.port, ssl=ctx, server_hostname=target.server_name,
                                           ssl_handshake_timeout=30.0)
    return link


def run_loop(coro: Coroutine[Any, Any, Any]) -> Any:
    """Run ``coro`` on uvloop when it is installed (it is here), else on asyncio's loop."""
    try:
        import uvloop
    except ImportError:
        return asyncio.run(coro)
    return uvloop.run(coro)


# -- worker processes -----------------------------------------------------------------------

def emit(message: Mapping[str, Any]) -> None:
    """Worker side: one JSON line to the orchestrator."""
    sys.stdout.write(json.dumps(message) + "\n")
    sys.stdout.flush()


async def wait_go() -> tuple[float, float]:
    """Worker side: block (off the loop) until the orchestrator says go; (t0, t1)."""
    line = await asyncio.get_running_loop().run_in_executor(None, sys.stdin.readline)
    if not line:
        raise SystemExit("orchestrator went away")
    message = json.loads(line)
    return float(message["t0"]), float(message["t1"])


def worker_entry(run: Callable[[dict[str, Any]], Coroutine[Any, Any, dict[str, Any]]],
                 argv: Sequence[str]) -> int:
    """``python -m bench.<module> worker '<json params>' RESULT_FILE``: run, write the result
    (latencies can be megabytes: a file, not the pipe), then say so on stdout."""
    raise_nofile()
    params = json.loads(argv[0])
    result = run_loop(run(params))
    if "latencies_ms" in result:  # microsecond resolution is plenty
        result["latencies_ms"] = [round(x, 3) for x in result["latencies_ms"]]
    path = Path(argv[1])
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(json.dumps(result))
    os.replace(tmp, path)
    emit({"result": str(path)})
    return 0


class Workers:
    """The orchestrator's handle on its load-generator processes."""

    def __init__(self, module: str, params: Sequence[Mapping[str, Any]],
                 cpus: Sequence[int] | None) -> None:
        self.procs: list[subprocess.Popen[str]] = []
        self._dir = tempfile.TemporaryDirectory(prefix="fleetbench-load-")
        for i, p in enumerate(params):
            result_file = str(Path(self._dir.name) / f"result-{i}.json")
            proc = subprocess.Popen([sys.executable, "-m", module, "worker", json.dumps(p),
                                     result_file], cwd=ROOT, stdin=subprocess.PIPE,
                                    stdout=subprocess.PIPE, text=True,
                                    preexec_fn=_raise_child_nofile)
            pin(proc.pid, cpus)
            self.procs.append(proc)

    @property
    def pids(self) -> list[int]:
        return [p.pid for p in self.procs]

    def _read(self, proc: subprocess.Popen[str], key: str, timeout: float) -> Any:
        assert proc.stdout is not None
        deadline = time.monotonic() + timeout
        with selectors.DefaultSelector() as sel:
            sel.register(proc.stdout, selectors.EVENT_READ)
            while True:
                left = deadline - time.monotonic()
                if left <= 0:
                    raise TimeoutError(f"load generator {proc.pid}: no {key!r} in {timeout:g} s")
                if not sel.select(left):
                    continue
                line = proc.stdout.readline()
                if not line.endswith("\n"):  # EOF: the process ended, maybe mid-line
                    raise RuntimeError(f"load generator {proc.pid} exited ({proc.wait()}) "
                                       f"before sending {key!r} ({len(line)} chars read)")
                message = json.loads(line)
                if key in message:
                    return message[key]

    def ready(self, timeout: float) -> list[Any]:
        return [self._read(p, "ready", timeout) for p in self.procs]

    def go(self, t0: float, t1: float) -> None:
        for p in self.procs:
            assert p.stdin is not None
            p.stdin.write(json.dumps({"go": True, "t0": t0, "t1": t1}) + "\n")
            p.stdin.flush()

    def results(self, timeout: float) -> list[dict[str, Any]]:
        files = [self._read(p, "result", timeout) for p in self.procs]
        for p in self.procs:
            p.wait(timeout)
        return [json.loads(Path(f).read_text()) for f in files]

    def kill(self) -> None:
        """End every load generator still running (they are ours: by pid) and clean up."""
        for p in self.procs:
            if p.poll() is None:
                p.kill()
                p.wait()
        self._dir.cleanup()


def sleep_until(t: float) -> None:
    """Orchestrator side: sleep until monotonic time ``t``."""
    delay = t - time.monotonic()
    if delay > 0:
        time.sleep(delay)


# -- figures -----------------------------------------------------------------------------

def percentile(values: Sequence[float], q: float) -> float:
    """Nearest-rank percentile (``q`` in 0..100) of unsorted ``values``; NaN when empty."""
    if not values:
        return math.nan
    ordered = sorted(values)
    rank = max(1, math.ceil(q / 100 * len(ordered)))
    return ordered[rank - 1]


@dataclass(frozen=True)
class Run:
    """One measured window of one broker under one load."""

    broker: str
    ops: int
    seconds: float
    errors: int
    p50_ms: float
    p99_ms: float
    server_cpu_s: float
    client_cpu_s: float

    @property
    def rate(self) -> float:
        return self.ops / self.seconds if self.seconds else 0.0

    @property
    def server_cpu_ms_per_op(self) -> float:
        return 1000 * self.server_cpu_s / self.ops if self.ops else math.nan

    @property
    def client_cpu_ms_per_op(self) -> float:
        return 1000 * self.client_cpu_s / self.ops if self.ops else math.nan

    def to_dict(self) -> dict[str, Any]:
        return {**asdict(self), "rate": self.rate,
                "server_cpu_ms_per_op": self.server_cpu_ms_per_op,
                "client_cpu_ms_per_op": self.client_cpu_ms_per_op}


def merge_latencies(results: Sequence[Mapping[str, Any]]) -> list[float]:
    return [x for r in results for x in r["latencies_ms"]]


def measured_run(broker: BrokerProcess, workers: Workers, duration: float, warmup: float,
                 ready_timeout: float = 120.0) -> Run:
    """Wait for the workers, start them, and sample CPU of broker and workers over [t0, t1]."""
    workers.ready(ready_timeout)
    t0 = time.monotonic() + warmup
    t1 = t0 + duration
    workers.go(t0, t1)
    sleep_until(t0)
    server0 = broker.cpu_seconds()
    client0 = sum(cpu_seconds(pid) for pid in workers.pids)
    sleep_until(t1)
    server1 = broker.cpu_seconds()
    client1 = sum(cpu_seconds(pid) for pid in workers.pids)
    results = workers.results(timeout=duration + 120)
    latencies = merge_latencies(results)
    return Run(broker=broker.name, ops=sum(r["ops"] for r in results), seconds=duration,
               errors=sum(r["errors"] for r in results), p50_ms=percentile(latencies, 50),
               p99_ms=percentile(latencies, 99), server_cpu_s=server1 - server0,
               client_cpu_s=client1 - client0)


@dataclass(frozen=True)
class Summary:
    """Medians over repeats for one broker."""

    broker: str
    repeats: int
    rate: float
    p50_ms: float
    p99_ms: float
    server_cpu_ms_per_op: float
    client_cpu_ms_per_op: float
    errors: int

    @classmethod
    def of(cls, runs: Sequence[Run]) -> Summary:
        def med(values: Iterator[float]) -> float:
            return float(statistics.median(list(values)))

        return cls(runs[0].broker, len(runs), med(r.rate for r in runs),
                   med(r.p50_ms for r in runs), med(r.p99_ms for r in runs),
                   med(r.server_cpu_ms_per_op for r in runs),
                   med(r.client_cpu_ms_per_op for r in runs), sum(r.errors for r in runs))

    @property
    def capacity(self) -> float:
        """Operations per second one core of broker CPU would sustain (1 / CPU per op)."""
        return 1000 / self.server_cpu_ms_per_op if self.server_cpu_ms_per_op > 0 else math.nan


def median_ratio(runs: Sequence[Run], num: str, den: str,
                 metric: Callable[[Run], float]) -> float:
    """Median over repeats of metric(num broker) / metric(den broker), pairing run i with run i
    (both measured back to back in the same repeat)."""
    a = [metric(r) for r in runs if r.broker == num]
    b = [metric(r) for r in runs if r.broker == den]
    ratios = [x / y for x, y in zip(a, b, strict=False) if y]
    return float(statistics.median(ratios)) if ratios else math.nan


@dataclass(frozen=True)
class Ratio:
    """emulator / mosquitto for one figure, against the issue's target (None: no target)."""

    name: str
    value: float
    target: float | None = None

    @property
    def verdict(self) -> str:
        if self.target is None or math.isnan(self.value):
            return ""
        return "meets target" if self.value >= self.target else "MISSES target"


@dataclass(frozen=True)
class BenchReport:
    """What one benchmark prints and what run_all's summary is built from."""

    name: str
    summaries: tuple[Summary, ...]
    ratios: tuple[Ratio, ...]
    runs: tuple[Run, ...] = ()
    notes: tuple[str, ...] = ()

    def summary(self, broker: str) -> Summary | None:
        return next((s for s in self.summaries if s.broker == broker), None)

    def to_dict(self) -> dict[str, Any]:
        return {
            "name": self.name,
            "summaries": [{**asdict(s), "capacity": s.capacity} for s in self.summaries],
            "ratios": [{**asdict(r), "verdict": r.verdict} for r in self.ratios],
            "runs": [r.to_dict() for r in self.runs],
            "notes": list(self.notes),
        }

    def render(self, unit: str) -> str:
        rows = [[s.broker, s.repeats, s.rate, s.p50_ms, s.p99_ms, s.server_cpu_ms_per_op,
                 s.capacity, s.client_cpu_ms_per_op, s.errors] for s in self.summaries]
        text = [f"== {self.name} (medians) ==", table(
            ["broker", "runs", f"{unit}/s", "p50 ms", "p99 ms", "srv CPU ms/op",
             "srv capacity/s", "load CPU ms/op", "errors"], rows)]
        text += [f"{r.name}: {r.value:.3f}" + (f" (target >= {r.target:.2f}: {r.verdict})"
                                               if r.target is not None else "")
                 for r in self.ratios]
        text += self.notes
        return "\n".join(text)


def comparison_ratios(runs: Sequence[Run], rate_target: float | None) -> tuple[Ratio, ...]:
    """Rate ratio emulator/mosquitto (the issue's figure) and the capacity ratio
    (mosquitto CPU per op / emulator CPU per op), medians of per-repeat ratios."""
    return (
        Ratio("rate ratio emulator/mosquitto",
              median_ratio(runs, "emulator", "mosquitto", lambda r: r.rate), rate_target),
        Ratio("capacity ratio emulator/mosquitto (inverse CPU ms per op)",
              median_ratio(runs, "mosquitto", "emulator", lambda r: r.server_cpu_ms_per_op)),
    )


def write_json(path: Path | None, report: BenchReport) -> None:
    if path is not None:
        path.write_text(json.dumps(report.to_dict(), indent=2) + "\n")


def table(headers: Sequence[str], rows: Sequence[Sequence[object]]) -> str:
    """A plain-text table with right-aligned columns."""
    def cell(value: object) -> str:
        if isinstance(value, float):
            if math.isnan(value):
                return "-"
            return f"{value:,.3f}" if abs(value) < 10 else f"{value:,.0f}"
        return str(value)

    cells = [[cell(v) for v in row] for row in rows]
    widths = [max(len(h), *(len(r[i]) for r in cells)) for i, h in enumerate(headers)]
    lines = ["  ".join(h.rjust(w) for h, w in zip(headers, widths, strict=True))]
    lines.append("  ".join("-" * w for w in widths))
    lines += ["  ".join(c.rjust(w) for c, w in zip(r, widths, strict=True)) for r in cells]
    return "\n".join(lines)


@dataclass(frozen=True)
class Options:
    """Options every throughput benchmark takes (see ``add_common_arguments``)."""

    brokers: tuple[str, ...]
    repeats: int
    duration: float
    warmup: float
    pinned: bool
    json_path: Path | None
    keep_dir: Path | None


def add_common_arguments(parser: Any, *, duration: float, repeats: int = 3) -> None:
    parser.add_argument("--brokers", default="mosquitto,emulator",
                        help="comma-separated, measured in this order (alternating per repeat)")
    parser.add_argument("--repeats", type=int, default=repeats, help="repeats (medians reported)")
    parser.add_argument("--duration", type=float, default=duration,
                        help="seconds measured per broker per repeat")
    parser.add_argument("--warmup", type=float, default=1.0, help="seconds of load before t0")
    parser.add_argument("--no-pin", action="store_true",
                        help="do not pin brokers to CPU 0 and load generators to the others")
    parser.add_argument("--json", type=Path, default=None, help="also write the report here")
    parser.add_argument("--keep-dir", type=Path, default=None,
                        help="keep PKI, configs and broker logs in this directory")
    parser.add_argument("--quick", action="store_true", help="a tiny smoke run")


def options_from(args: Any) -> Options:
    return Options(tuple(b for b in args.brokers.split(",") if b), args.repeats, args.duration,
                   args.warmup, not args.no_pin, args.json, args.keep_dir)


def compare(module: str, started: Mapping[str, BrokerProcess], options: Options,
            params_for: Callable[[BrokerProcess, int], list[dict[str, Any]]],
            load_cpus: Sequence[int] | None) -> list[Run]:
    """Measure every broker once per repeat, back to back, alternating which goes first."""
    runs: list[Run] = []
    names = list(started)
    for repeat in range(options.repeats):
        order = names if repeat % 2 == 0 else names[::-1]
        for name in order:
            broker = started[name]
            workers = Workers(module, params_for(broker, repeat), load_cpus)
            try:
                run = measured_run(broker, workers, options.duration, options.warmup)
            finally:
                workers.kill()
            if not broker.alive():
                raise RuntimeError(f"{name} died during the run:\n{broker.log_tail()}")
            runs.append(run)
            print(f"  repeat {repeat + 1}/{options.repeats} {name}: {run.rate:,.0f}/s "
                  f"p50 {run.p50_ms:.2f} ms p99 {run.p99_ms:.2f} ms "
                  f"srv {run.server_cpu_ms_per_op:.3f} ms/op errors {run.errors}", flush=True)
    return runs


@contextlib.contextmanager
def workdir(keep: Path | None = None) -> Iterator[Path]:
    """A scratch directory for PKI, configs and logs (kept when a path is given)."""
    if keep is not None:
        keep.mkdir(parents=True, exist_ok=True)
        yield keep
        return
    path = Path(tempfile.mkdtemp(prefix="fleetbench-bench-"))
    try:
        yield path
    finally:
        shutil.rmtree(path, ignore_errors=True)


@contextlib.contextmanager
def brokers(directory: Path, which: Sequence[str], *, emulator_settings: Mapping[str, Any],
            cpus: Sequence[int] | None) -> Iterator[dict[str, BrokerProcess]]:
    """Start the named brokers (``mosquitto``, ``emulator``), pinned to ``cpus``; stop them."""
    raise_nofile()
    bench_pki = make_pki(directory / "pki")
    started: dict[str, BrokerProcess] = {}
    try:
        for name in which:
            if name == "mosquitto":
                started[name] = start_mosquitto(directory / "mosquitto", bench_pki)
            elif name == "emulator":
                started[name] = start_emulator(directory / "emulator", bench_pki,
                                               emulator_settings)
            else:
                raise ValueError(f"unknown broker {name!r}")
            pin(started[name].pid, cpus)
        yield started
    finally:
        for broker in started.values():
            broker.stop()


@contextlib.contextmanager
def use_brokers(options: Options, settings: Mapping[str, Any], cpus: Sequence[int] | None,
                started: Mapping[str, BrokerProcess] | None = None
                ) -> Iterator[Mapping[str, BrokerProcess]]:
    """``started`` when given (run_all --quick shares one pair), else fresh brokers."""
    if started is not None:
        yield {name: started[name] for name in options.brokers}
        return
    with workdir(options.keep_dir) as directory, \
            brokers(directory, options.brokers, emulator_settings=settings, cpus=cpus) as fresh:
        yield fresh
