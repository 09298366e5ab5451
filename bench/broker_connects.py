"""Mutual-TLS connect rate: emulator vs mosquitto, side by side in one run (issue 2).

One cycle = TCP connect, TLS handshake with the client certificate, CONNECT (3.1.1,
a fresh client id each time: AWS allows one CONNECT per second per client id),
CONNACK, DISCONNECT, close. A load-generator process keeps ``--concurrency``
cycles going at once. Reported per broker: cycles per second, p50/p99 latency
from the TCP connect to the CONNACK, and the broker's CPU milliseconds per cycle
(from /proc). Target: the emulator reaches at least 0.8x mosquitto's rate.

    python -m bench.broker_connects [--concurrency 16] [--duration 6] [--repeats 3]
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
from bench.common import Target
from harness.emulator.mqtt.packets import Connack, Connect

NAME = "mutual-TLS connect + CONNACK + disconnect"
TARGET_RATIO = 0.8
#: Seconds after t1 that cycles still running get to finish before the worker gives up.
GRACE_S = 10.0
#: Seconds a CONNACK, and then the close, may take before the cycle counts as an error.
STEP_TIMEOUT_S = 10.0


async def worker(params: dict[str, Any]) -> dict[str, Any]:
    """Load-generator process: ``concurrency`` connect/disconnect loops until t1."""
    target = Target.from_dict(params["target"])
    ctx = common.client_context(target)
    prefix = params["client_prefix"]
    common.emit({"ready": True})
    t0, t1 = await common.wait_go()
    latencies: list[float] = []
    counts = {"ops": 0, "errors": 0}

    async def cycles(slot: int) -> None:
        n = 0
        while True:
            start = time.monotonic()
            if start >= t1:
                return
            n += 1
            ok = False
            link = None
            try:
                link = await common.open_link(target, ctx)
                link.send(Connect(common.MQTT_LEVEL, f"{prefix}-{slot}-{n}", keep_alive=60))
                packet = await asyncio.wait_for(link.next_packet(), STEP_TIMEOUT_S)
                ok = isinstance(packet, Connack) and packet.reason_code == 0
            except (OSError, ConnectionError, asyncio.TimeoutError):
                ok = False
            end = time.monotonic()
            if not ok:  # counted from go on, warm-up included: any failure is news
                counts["errors"] += 1
            elif t0 <= end < t1:
                counts["ops"] += 1
                latencies.append((end - start) * 1000)
            if link is not None:
                link.close(graceful=True)
                try:
                    await asyncio.wait_for(asyncio.shield(link.closed), STEP_TIMEOUT_S)
                except asyncio.TimeoutError:
                    link.close(graceful=False)

    tasks = [asyncio.ensure_future(cycles(i)) for i in range(params["concurrency"])]
    _, pending = await asyncio.wait(tasks, timeout=max(0.0, t1 - time.monotonic()) + GRACE_S)
    for task in pending:
        task.cancel()
    return {**counts, "latencies_ms": latencies}


def params_for(concurrency: int) -> Any:
    def make(broker: common.BrokerProcess, repeat: int) -> list[dict[str, Any]]:
        return [{"target": broker.target.to_dict(), "concurrency": concurrency,
                 "client_prefix": f"bench-c{os.getpid()}-{repeat}"}]
    return make


def run(options: common.Options, concurrency: int,
        started: Mapping[str, common.BrokerProcess] | None = None) -> common.BenchReport:
    """Measure the brokers back to back ``options.repeats`` times (``started``: brokers to use
    instead of starting a fresh pair)."""
    broker_cpus, load_cpus = common.cpu_plan(options.pinned)
    print(f"{NAME}: concurrency {concurrency}, {options.duration:g} s x {options.repeats} "
          f"repeats, pinned={broker_cpus is not None}", flush=True)
    with common.use_brokers(options, {}, broker_cpus, started) as brokers:
        tls = common.tls_note(brokers)
        runs = common.compare("bench.broker_connects", brokers, options,
                              params_for(concurrency), load_cpus)
    summaries = tuple(common.Summary.of([r for r in runs if r.broker == b])
                      for b in options.brokers)
    notes = (f"load: 1 process, {concurrency} concurrent cycles, MQTT 3.1.1, EC P-256 keys, "
             "latency = TCP connect to CONNACK", tls)
    return common.BenchReport(NAME, summaries, common.comparison_ratios(runs, TARGET_RATIO),
                              tuple(runs), notes)


def main(argv: Sequence[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if argv[:1] == ["worker"]:
        return common.worker_entry(worker, argv[1:])
    parser = argparse.ArgumentParser(prog="python -m bench.broker_connects", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    common.add_common_arguments(parser, duration=6.0)
    parser.add_argument("--concurrency", type=int, default=16)
    args = parser.parse_args(argv)
    if args.quick:
        args.concurrency, args.duration, args.warmup, args.repeats = 2, 0.3, 0.1, 1
    report = run(common.options_from(args), args.concurrency)
    print(report.render("connects"))
    common.write_json(args.json, report)
    return 0


if __name__ == "__main__":
    sys.exit(main())
