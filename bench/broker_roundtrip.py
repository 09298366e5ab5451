"""Publish-to-own-subscription round trips: emulator vs mosquitto, in one run (issue 2).

Each of ``--clients`` connections (mutual TLS, MQTT 3.1.1) subscribes at QoS 1 to
its own topic and keeps ``--inflight`` QoS 1 PUBLISHes of ``--payload`` bytes
(default 2 KB) to that topic outstanding; a round trip ends when the broker
delivers the message back (the client then PUBACKs it and publishes the next).
Reported per broker: round trips per second, p50/p99 round-trip latency, and the
broker's CPU milliseconds per round trip (from /proc). Target: the emulator
reaches at least a third of mosquitto's rate.

The emulator runs with AWS's 100 PUBLISH/s-per-connection quota lifted and its
per-message PUBLISH observation off (``common.THROUGHPUT_SETTINGS``); every other
setting, including policy checks on each publish and delivery, stays as AWS has it.

    python -m bench.broker_roundtrip [--clients 8] [--inflight 3] [--payload 2048]
"""

from __future__ import annotations

import argparse
import asyncio
import os
import sys
import time
from collections.abc import Mapping, Sequence
from typing import Any

from bench import common
from bench.common import MqttLink, Target
from harness.emulator.mqtt.packets import (
    Connack,
    Connect,
    Packet,
    Puback,
    Publish,
    Suback,
    Subscribe,
    Subscription,
)

NAME = "publish to own subscription, QoS 1 round trip"
TARGET_RATIO = 1 / 3
#: Seconds after t1 for messages still in flight to come back.
GRACE_S = 10.0
SETUP_TIMEOUT_S = 30.0


class RoundTripClient:
    """One connection publishing to its own topic and timing the way back."""

    def __init__(self, topic: str, payload_size: int, inflight: int,
                 latencies: list[float]) -> None:
        self.topic = topic
        self.filler = b"\x5a" * (payload_size - 8)
        self.inflight = inflight
        self.t0 = self.t1 = 0.0  # the measured window, set by start()
        self.latencies = latencies
        self.done = asyncio.Event()  # set when t1 passed and nothing is in flight
        self.link: MqttLink | None = None
        self.sent: dict[int, float] = {}
        self.seq = 0
        self.packet_id = 0
        self.ops = 0
        self.errors = 0
        self.setup: asyncio.Future[Packet] | None = None

    def on_packet(self, link: MqttLink, packet: Packet) -> None:
        kind = type(packet)
        if kind is Publish:
            assert isinstance(packet, Publish)
            now = time.monotonic()
            if packet.qos and packet.packet_id:
                link.send(Puback(packet.packet_id))
            sent = self.sent.pop(int.from_bytes(packet.payload[:8], "big"), None)
            if sent is not None and self.t0 <= now < self.t1:
                self.ops += 1
                self.latencies.append((now - sent) * 1000)
            if now < self.t1:
                self.publish()
            elif not self.sent:
                self.done.set()
        elif kind is Puback:
            pass  # the broker accepted one of ours; the round trip ends at the delivery
        elif self.setup is not None and not self.setup.done():
            self.setup.set_result(packet)

    def on_close(self, link: MqttLink) -> None:
        if self.sent:
            self.errors += len(self.sent)
            self.sent.clear()
        if self.setup is not None and not self.setup.done():
            self.setup.set_exception(ConnectionError("closed during setup"))
        self.done.set()

    def publish(self) -> None:
        assert self.link is not None
        self.seq += 1
        self.packet_id = self.packet_id % 65535 + 1
        self.sent[self.seq] = time.monotonic()
        self.link.send(Publish(self.topic, self.seq.to_bytes(8, "big") + self.filler, qos=1,
                               packet_id=self.packet_id))

    def start(self, t0: float, t1: float) -> None:
        """Count round trips ending in [t0, t1); stop publishing at t1."""
        self.t0, self.t1 = t0, t1
        for _ in range(self.inflight):
            self.publish()

    async def request(self, packet: Packet) -> Packet:
        assert self.link is not None
        self.setup = asyncio.get_running_loop().create_future()
        self.link.send(packet)
        return await asyncio.wait_for(self.setup, SETUP_TIMEOUT_S)


async def worker(params: dict[str, Any]) -> dict[str, Any]:
    """Load-generator process: connect and subscribe every client, then run until t1."""
    target = Target.from_dict(params["target"])
    ctx = common.client_context(target)
    prefix = params["client_prefix"]
    latencies: list[float] = []
    clients = []
    for i in range(params["clients"]):
        client = RoundTripClient(f"bench/rt/{prefix}-{i}", params["payload"], params["inflight"],
                                 latencies)
        client.link = await common.open_link(target, ctx, client.on_packet, client.on_close)
        connack = await client.request(Connect(common.MQTT_LEVEL, f"{prefix}-{i}",
                                               keep_alive=1200))
        if not isinstance(connack, Connack) or connack.reason_code != 0:
            raise RuntimeError(f"CONNECT refused: {connack}")
        suback = await client.request(Subscribe(1, [Subscription(client.topic, qos=1)]))
        if not isinstance(suback, Suback) or suback.reason_codes != [1]:
            raise RuntimeError(f"SUBSCRIBE refused: {suback}")
        clients.append(client)
    common.emit({"ready": len(clients)})
    t0, t1 = await common.wait_go()
    for client in clients:
        client.start(t0, t1)
    waits = [asyncio.ensure_future(c.done.wait()) for c in clients]
    _, pending = await asyncio.wait(waits, timeout=max(0.0, t1 - time.monotonic()) + GRACE_S)
    for task in pending:
        task.cancel()
    errors = sum(c.errors + len(c.sent) for c in clients)
    for client in clients:
        if client.link is not None:
            client.link.close(graceful=True)
    await asyncio.wait([asyncio.ensure_future(_closed(c.link)) for c in clients], timeout=5.0)
    return {"ops": sum(c.ops for c in clients), "errors": errors, "latencies_ms": latencies}


async def _closed(link: MqttLink | None) -> None:
    if link is not None:
        await link.closed


def params_for(clients: int, inflight: int, payload: int) -> Any:
    def make(broker: common.BrokerProcess, repeat: int) -> list[dict[str, Any]]:
        return [{"target": broker.target.to_dict(), "clients": clients, "inflight": inflight,
                 "payload": payload, "client_prefix": f"bench-rt{os.getpid()}-{repeat}"}]
    return make


def run(options: common.Options, clients: int, inflight: int, payload: int,
        aws_quotas: bool = False,
        started: Mapping[str, common.BrokerProcess] | None = None) -> common.BenchReport:
    """Measure the brokers back to back ``options.repeats`` times (``started``: brokers to use
    instead of starting a fresh pair; the emulator among them must have ``THROUGHPUT_SETTINGS``
    unless ``aws_quotas``)."""
    broker_cpus, load_cpus = common.cpu_plan(options.pinned)
    settings = {} if aws_quotas else dict(common.THROUGHPUT_SETTINGS)
    print(f"{NAME}: {clients} clients x {inflight} in flight, {payload} B payload, "
          f"{options.duration:g} s x {options.repeats} repeats, "
          f"pinned={broker_cpus is not None}, emulator settings {settings or 'AWS defaults'}",
          flush=True)
    with common.use_brokers(options, settings, broker_cpus, started) as brokers:
        tls = common.tls_note(brokers)
        runs = common.compare("bench.broker_roundtrip", brokers, options,
                              params_for(clients, inflight, payload), load_cpus)
    summaries = tuple(common.Summary.of([r for r in runs if r.broker == b])
                      for b in options.brokers)
    notes = (f"load: 1 process, {clients} clients x {inflight} QoS 1 in flight, {payload} B "
             "payload, MQTT 3.1.1; latency = PUBLISH written to own message delivered",
             f"emulator settings: {settings or 'AWS defaults'}", tls)
    return common.BenchReport(NAME, summaries, common.comparison_ratios(runs, TARGET_RATIO),
                              tuple(runs), notes)


def main(argv: Sequence[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if argv[:1] == ["worker"]:
        return common.worker_entry(worker, argv[1:])
    parser = argparse.ArgumentParser(prog="python -m bench.broker_roundtrip", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    common.add_common_arguments(parser, duration=6.0)
    parser.add_argument("--clients", type=int, default=8)
    parser.add_argument("--inflight", type=int, default=3, help="QoS 1 in flight per client")
    parser.add_argument("--payload", type=int, default=2048, help="payload bytes (>= 8)")
    parser.add_argument("--aws-quotas", action="store_true",
                        help="run the emulator with AWS's defaults (100 PUBLISH/s per "
                             "connection: most of the load is then discarded)")
    args = parser.parse_args(argv)
    if args.payload < 8:
        parser.error("--payload must be at least 8 bytes")
    if args.quick:
        args.clients, args.inflight, args.duration, args.warmup, args.repeats = 2, 1, 0.3, 0.1, 1
    report = run(common.options_from(args), args.clients, args.inflight, args.payload,
                 args.aws_quotas)
    print(report.render("round trips"))
    common.write_json(args.json, report)
    return 0


if __name__ == "__main__":
    sys.exit(main())
