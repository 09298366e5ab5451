"""Resident memory of 10,000 idle mutual-TLS MQTT connections: emulator vs mosquitto (issue 2).

Several load-generator processes together open ``--connections`` connections
(mutual TLS, CONNECT 3.1.1 with keep-alive 1200 s, so nothing is sent while they
are held), then the broker's resident set size (VmRSS, and its peak VmHWM) is read
from /proc. RSS per connection = (RSS with the connections - RSS before) / count.
Target: the emulator (one process) holds 10,000 connections under 1 GB.
Each repeat starts fresh broker processes, so freed-but-kept allocator memory
from an earlier repeat does not count.

    python -m bench.broker_idle [--connections 10000] [--procs 2] [--concurrency 64]
"""

from __future__ import annotations

import argparse
import asyncio
import math
import os
import statistics
import sys
import time
from collections.abc import Mapping, Sequence
from dataclasses import asdict, dataclass
from typing import Any

from bench import common
from bench.common import MqttLink, Target
from harness.emulator.mqtt.packets import Connack, Connect

NAME = "idle mutual-TLS connections, broker resident memory"
TARGET_RSS_BYTES = 1 << 30  # 1 GiB
#: Seconds the connections are held before RSS is read (lets the broker settle).
SETTLE_S = 1.0
MIB = 1024 * 1024


async def worker(params: dict[str, Any]) -> dict[str, Any]:
    """Load-generator process: open ``count`` connections, report, hold them until go."""
    raise_to = common.raise_nofile()
    target = Target.from_dict(params["target"])
    ctx = common.client_context(target)
    prefix = params["client_prefix"]
    links: list[MqttLink] = []
    errors = 0
    next_index = iter(range(params["count"]))
    started = time.monotonic()

    async def opener() -> None:
        nonlocal errors
        for i in next_index:
            try:
                link = await common.open_link(target, ctx)
                link.send(Connect(common.MQTT_LEVEL, f"{prefix}-{i}", keep_alive=1200))
                packet = await asyncio.wait_for(link.next_packet(), 30.0)
            except (OSError, ConnectionError, asyncio.TimeoutError):
                errors += 1
                continue
            if isinstance(packet, Connack) and packet.reason_code == 0:
                links.append(link)
            else:
                errors += 1
                link.close(graceful=False)

    await asyncio.gather(*(opener() for _ in range(params["concurrency"])))
    elapsed = time.monotonic() - started
    common.emit({"ready": {"opened": len(links), "errors": errors, "seconds": elapsed,
                           "nofile": raise_to, "rss": common.rss_bytes(os.getpid())}})
    await common.wait_go()
    alive = sum(1 for link in links if not link.closed.done())
    for link in links:
        link.close(graceful=True)
    if links:
        await asyncio.wait([asyncio.ensure_future(_closed(link)) for link in links], timeout=30.0)
    return {"ops": len(links), "errors": errors, "alive_at_end": alive, "latencies_ms": []}


async def _closed(link: MqttLink) -> None:
    await link.closed


@dataclass(frozen=True)
class IdleRun:
    """One broker holding ``connections`` idle connections."""

    broker: str
    connections: int
    errors: int
    dropped: int  # connections the broker closed while they were held
    open_seconds: float
    rss_before: int
    rss_after: int
    rss_peak: int
    load_rss: int

    @property
    def rss_per_connection(self) -> float:
        return (self.rss_after - self.rss_before) / self.connections if self.connections \
            else math.nan

    @property
    def open_rate(self) -> float:
        return self.connections / self.open_seconds if self.open_seconds else math.nan


def peak_rss_bytes(pid: int) -> int:
    """VmHWM: the highest resident set size the process reached."""
    with open(f"/proc/{pid}/status") as fh:
        for line in fh:
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) * 1024
    return 0


def measure(broker: common.BrokerProcess, connections: int, procs: int, concurrency: int,
            load_cpus: Sequence[int] | None, repeat: int, settle: float = SETTLE_S) -> IdleRun:
    """Open ``connections`` to ``broker`` from ``procs`` processes and read its RSS."""
    rss_before = broker.rss_bytes()
    shares = [connections // procs + (1 if i < connections % procs else 0) for i in range(procs)]
    params = [{"target": broker.target.to_dict(), "count": n, "concurrency": concurrency,
               "client_prefix": f"bench-idle{os.getpid()}-{repeat}-{i}"}
              for i, n in enumerate(shares) if n]
    workers = common.Workers("bench.broker_idle", params, load_cpus)
    try:
        ready = workers.ready(timeout=600.0)
        time.sleep(settle)
        rss_after = broker.rss_bytes()
        rss_peak = peak_rss_bytes(broker.pid)
        workers.go(0.0, 0.0)
        results = workers.results(timeout=120.0)
    finally:
        workers.kill()
    opened = sum(r["opened"] for r in ready)
    return IdleRun(broker=broker.name, connections=opened,
                   errors=sum(r["errors"] for r in ready),
                   dropped=opened - sum(r["alive_at_end"] for r in results),
                   open_seconds=max(r["seconds"] for r in ready), rss_before=rss_before,
                   rss_after=rss_after, rss_peak=rss_peak,
                   load_rss=sum(r["rss"] for r in ready))


@dataclass(frozen=True)
class IdleReport:
    """Medians per broker over the repeats."""

    runs: tuple[IdleRun, ...]
    brokers: tuple[str, ...]
    target_connections: int

    def median(self, broker: str, attr: str) -> float:
        values = [float(getattr(r, attr)) for r in self.runs if r.broker == broker]
        return float(statistics.median(values)) if values else math.nan

    def emulator_meets_target(self) -> bool | None:
        if "emulator" not in self.brokers:
            return None
        return (self.median("emulator", "connections") >= self.target_connections
                and self.median("emulator", "rss_after") < TARGET_RSS_BYTES)

    def to_dict(self) -> dict[str, Any]:
        return {"name": NAME, "target_connections": self.target_connections,
                "runs": [{**asdict(r), "rss_per_connection": r.rss_per_connection,
                          "open_rate": r.open_rate} for r in self.runs],
                "emulator_meets_target": self.emulator_meets_target()}

    def render(self) -> str:
        rows = []
        for b in self.brokers:
            rows.append([b, self.median(b, "connections"), self.median(b, "errors"),
                         self.median(b, "dropped"), self.median(b, "rss_before") / MIB,
                         self.median(b, "rss_after") / MIB, self.median(b, "rss_peak") / MIB,
                         self.median(b, "rss_per_connection") / 1024,
                         self.median(b, "open_rate")])
        lines = [f"== {NAME} (medians of {len(self.runs) // max(1, len(self.brokers))}) ==",
                 common.table(["broker", "connections", "errors", "dropped", "RSS before MiB",
                               "RSS held MiB", "peak MiB", "KiB/connection", "opened/s"], rows)]
        if "emulator" in self.brokers and "mosquitto" in self.brokers:
            ratio = (self.median("emulator", "rss_per_connection")
                     / self.median("mosquitto", "rss_per_connection"))
            lines.append(f"per-connection memory emulator/mosquitto: {ratio:.2f}x")
        verdict = self.emulator_meets_target()
        if verdict is not None:
            held = self.median("emulator", "rss_after") / MIB
            lines.append(f"emulator holds {self.median('emulator', 'connections'):,.0f} "
                         f"connections in {held:,.0f} MiB (target: "
                         f"{self.target_connections:,} under 1024 MiB: "
                         f"{'meets target' if verdict else 'MISSES target'})")
        return "\n".join(lines)


def run(options: common.Options, connections: int, procs: int, concurrency: int,
        started: Mapping[str, common.BrokerProcess] | None = None,
        settle: float = SETTLE_S) -> IdleReport:
    """Fresh brokers per repeat, unless ``started`` (run_all --quick) is given."""
    broker_cpus, load_cpus = common.cpu_plan(options.pinned)
    print(f"{NAME}: {connections:,} connections from {procs} processes x {concurrency} "
          f"concurrent opens, {options.repeats} repeats", flush=True)
    runs: list[IdleRun] = []
    for repeat in range(options.repeats):
        order = list(options.brokers) if repeat % 2 == 0 else list(options.brokers)[::-1]
        with common.use_brokers(options, {}, broker_cpus, started) as brokers:
            for name in order:
                result = measure(brokers[name], connections, procs, concurrency, load_cpus,
                                 repeat, settle)
                runs.append(result)
                print(f"  repeat {repeat + 1}/{options.repeats} {name}: "
                      f"{result.connections:,} held, RSS {result.rss_after / MIB:,.0f} MiB "
                      f"({result.rss_per_connection / 1024:.1f} KiB/connection), "
                      f"errors {result.errors}, opened at {result.open_rate:,.0f}/s",
                      flush=True)
    return IdleReport(tuple(runs), tuple(options.brokers), connections)


def main(argv: Sequence[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if argv[:1] == ["worker"]:
        return common.worker_entry(worker, argv[1:])
    parser = argparse.ArgumentParser(prog="python -m bench.broker_idle", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    common.add_common_arguments(parser, duration=0.0, repeats=1)
    parser.add_argument("--connections", type=int, default=10_000)
    parser.add_argument("--procs", type=int, default=2, help="load-generator processes")
    parser.add_argument("--concurrency", type=int, default=64,
                        help="connections being opened at once per process")
    parser.add_argument("--settle", type=float, default=SETTLE_S,
                        help="seconds the connections are held before RSS is read")
    args = parser.parse_args(argv)
    if args.quick:
        args.connections, args.procs, args.concurrency, args.repeats = 20, 2, 4, 1
        args.settle = 0.1
    report = run(common.options_from(args), args.connections, args.procs, args.concurrency,
                 settle=args.settle)
    print(report.render())
    if args.json is not None:
        import json

        args.json.write_text(json.dumps(report.to_dict(), indent=2) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
