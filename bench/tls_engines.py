"""CPU per mutual-TLS handshake, by side and TLS engine, plus the cost of presenting a new
client identity (what a load generator pays for every new device).

The two engines are Python's ``ssl`` (the system's OpenSSL 3.0 here) and
``harness.tls_engine`` (the OpenSSL inside the cryptography wheel, through pyOpenSSL).
Both sides of each handshake run in this one thread over memory BIOs, so no network or
scheduling is measured: only each side's own CPU (``time.thread_time``) around its calls.

    python -m bench.tls_engines [--handshakes 400] [--rounds 3]

Prints one table; medians over the rounds (this machine is shared: compare the rows of
one run, not runs of different days).
"""

from __future__ import annotations

import argparse
import ssl
import statistics
import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from harness import pki, tls_engine

ALPN = "x-amzn-mqtt-ca"


@dataclass(frozen=True)
class Material:
    ca: pki.CertificateAuthority
    server_key: Any
    server_cert: Any
    client_key: Any
    client_cert: Any
    client_file: Path  # key + certificate PEM, as a load slot writes it

    @classmethod
    def create(cls, directory: Path) -> Material:
        ca = pki.CertificateAuthority.create()
        sk = pki.generate_ec_key()
        ck = pki.generate_ec_key()
        cc = ca.issue_device_certificate(ck.public_key())
        path = directory / "device.pem"
        pki.write_secret(path, pki.private_key_pem(ck) + pki.certificate_pem(cc))
        return cls(ca, sk, ca.issue_server_certificate(sk, ["localhost"]), ck, cc, path)


def stdlib_server(m: Material, directory: Path) -> ssl.SSLContext:
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    ctx.minimum_version = ssl.TLSVersion.TLSv1_2
    ctx.options |= ssl.OP_NO_TICKET
    ctx.num_tickets = 0
    ctx.verify_mode = ssl.CERT_REQUIRED
    ctx.load_verify_locations(cadata=m.ca.pem)
    ctx.set_alpn_protocols([ALPN])
    path = directory / "server.pem"
    pki.write_secret(path, pki.private_key_pem(m.server_key) + pki.certificate_pem(m.server_cert))
    ctx.load_cert_chain(path)
    return ctx


def stdlib_client(m: Material) -> tuple[ssl.SSLContext, Callable[[], None]]:
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
    ctx.load_verify_locations(cadata=m.ca.pem)
    ctx.set_alpn_protocols([ALPN])
    return ctx, lambda: ctx.load_cert_chain(m.client_file)


def engine_server(m: Material) -> ssl.SSLContext:
    return tls_engine.server_context(anchors=[m.ca.pem], key=m.server_key,
                                     cert=m.server_cert, alpn=[ALPN])


def engine_client(m: Material) -> tuple[ssl.SSLContext, Callable[[], None]]:
    ctx = tls_engine.client_context(cadata=[m.ca.pem], alpn=[ALPN])
    return ctx, lambda: ctx.load_identity_files(m.client_file, m.client_file)


def _step(side: Any) -> tuple[bool, float]:
    """One ``do_handshake`` call: (finished, CPU seconds it took)."""
    t = time.thread_time()
    try:
        side.do_handshake()
        done = True
    except ssl.SSLWantReadError:
        done = False
    return done, time.thread_time() - t


def handshakes(server: ssl.SSLContext, client: ssl.SSLContext, load: Callable[[], None],
               n: int) -> tuple[float, float, float]:
    """(server ms, client handshake ms, client identity-load ms) per handshake."""
    ts = tc = tl = 0.0
    for _ in range(n):
        t = time.thread_time()
        load()
        tl += time.thread_time() - t
        s_in, s_out, c_in, c_out = (ssl.MemoryBIO() for _ in range(4))
        t = time.thread_time()
        so = server.wrap_bio(s_in, s_out, server_side=True)
        ts += time.thread_time() - t
        t = time.thread_time()
        co = client.wrap_bio(c_in, c_out, server_hostname="localhost")
        tc += time.thread_time() - t
        s_done = c_done = False
        while not (s_done and c_done):
            c_done, spent = _step(co)
            tc += spent
            s_in.write(c_out.read())
            s_done, spent = _step(so)
            ts += spent
            c_in.write(s_out.read())
        if not so.getpeercert(binary_form=True):
            raise RuntimeError("no client certificate on the server side")
    return ts / n * 1e3, tc / n * 1e3, tl / n * 1e3


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--handshakes", type=int, default=400)
    parser.add_argument("--rounds", type=int, default=3)
    args = parser.parse_args(argv)
    with tempfile.TemporaryDirectory(prefix="fleetbench-tls-bench-") as tmp:
        m = Material.create(Path(tmp))
        servers = {"stdlib": stdlib_server(m, Path(tmp)), "bundled": engine_server(m)}
        clients = {"stdlib": stdlib_client(m), "bundled": engine_client(m)}
        pairs = [(s, c) for s in servers for c in clients]
        results: dict[tuple[str, str], list[tuple[float, float, float]]] = {p: [] for p in pairs}
        for _ in range(args.rounds):  # interleaved, so drift hits every pair alike
            for s, c in pairs:
                ctx, load = clients[c]
                handshakes(servers[s], ctx, load, 20)  # warm-up
                results[(s, c)].append(handshakes(servers[s], ctx, load, args.handshakes))
    print(f"ssl: {ssl.OPENSSL_VERSION}; bundled: {tls_engine.bundled_openssl_version()}")
    print(f"{'server':>8} {'client':>8} | {'server ms':>9} {'client ms':>9} "
          f"{'identity ms':>11} | {'client total':>12}")
    for (s, c), rows in results.items():
        server_ms, client_ms, load_ms = (statistics.median(col) for col in zip(*rows, strict=True))
        print(f"{s:>8} {c:>8} | {server_ms:9.3f} {client_ms:9.3f} {load_ms:11.3f} | "
              f"{client_ms + load_ms:12.3f}")
    print("(client total = handshake + presenting a new device's key and certificate)")


if __name__ == "__main__":
    main()
