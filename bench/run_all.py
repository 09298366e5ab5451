"""Run the three broker benchmarks (emulator vs mosquitto) and print one summary table.

    python -m bench.run_all            # full run: 3 repeats of connects and round trips,
                                       # 10,000 idle connections (a few minutes in all)
    python -m bench.run_all --quick    # smoke run: a few connections, seconds
    python -m bench.run_all --only connects,roundtrip --json bench-report.json
"""

from __future__ import annotations

import argparse
import contextlib
import json
import math
import sys
import time
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

from bench import broker_connects, broker_idle, broker_roundtrip, common

BENCHES = ("connects", "roundtrip", "idle")


def _options(args: argparse.Namespace, *, duration: float, warmup: float,
             repeats: int) -> common.Options:
    return common.Options(tuple(b for b in args.brokers.split(",") if b), repeats, duration,
                          warmup, not args.no_pin, None, args.keep_dir)


def summary_rows(connects: common.BenchReport | None, roundtrip: common.BenchReport | None,
                 idle: broker_idle.IdleReport | None) -> list[list[object]]:
    """[figure, mosquitto, emulator, emulator/mosquitto, target, verdict] rows."""
    rows: list[list[object]] = []

    def pair(report: common.BenchReport, attr: str) -> tuple[float, float]:
        m, e = report.summary("mosquitto"), report.summary("emulator")
        return (getattr(m, attr) if m else math.nan, getattr(e, attr) if e else math.nan)

    for label, report in (("connect", connects), ("round trip", roundtrip)):
        if report is None:
            continue
        rate_ratio, capacity_ratio = report.ratios
        m, e = pair(report, "rate")
        rows.append([f"{label}s/s", m, e, rate_ratio.value,
                     f">= {rate_ratio.target:.2f}" if rate_ratio.target else "",
                     rate_ratio.verdict])
        for attr, name in (("p50_ms", "p50 ms"), ("p99_ms", "p99 ms")):
            m, e = pair(report, attr)
            rows.append([f"{label} {name}", m, e, e / m if m else math.nan, "", ""])
        m, e = pair(report, "server_cpu_ms_per_op")
        rows.append([f"{label} broker CPU ms", m, e, capacity_ratio.value,
                     "(ratio = mosquitto/emulator)", ""])
    if idle is not None:
        m_rss = idle.median("mosquitto", "rss_after") / broker_idle.MIB
        e_rss = idle.median("emulator", "rss_after") / broker_idle.MIB
        verdict = idle.emulator_meets_target()
        rows.append([f"RSS MiB, {idle.target_connections:,} idle", m_rss, e_rss,
                     e_rss / m_rss if m_rss else math.nan, "emulator < 1024",
                     "" if verdict is None else ("meets target" if verdict
                                                 else "MISSES target")])
        m_kib = idle.median("mosquitto", "rss_per_connection") / 1024
        e_kib = idle.median("emulator", "rss_per_connection") / 1024
        rows.append(["KiB per idle connection", m_kib, e_kib,
                     e_kib / m_kib if m_kib else math.nan, "", ""])
    return rows


def _run(args: argparse.Namespace, only: Sequence[str],
         shared: Mapping[str, common.BrokerProcess] | None
         ) -> tuple[common.BenchReport | None, common.BenchReport | None,
                    broker_idle.IdleReport | None]:
    quick = args.quick
    connects = roundtrip = None
    idle = None
    if "connects" in only:
        opts = _options(args, duration=0.3 if quick else 6.0, warmup=0.1 if quick else 1.0,
                        repeats=1 if quick else args.repeats)
        connects = broker_connects.run(opts, concurrency=2 if quick else 16, started=shared)
        print(connects.render("connects"), flush=True)
    if "roundtrip" in only:
        opts = _options(args, duration=0.3 if quick else 6.0, warmup=0.1 if quick else 1.0,
                        repeats=1 if quick else args.repeats)
        roundtrip = broker_roundtrip.run(opts, clients=2 if quick else 8,
                                         inflight=1 if quick else 3, payload=2048,
                                         started=shared)
        print(roundtrip.render("round trips"), flush=True)
    if "idle" in only:
        opts = _options(args, duration=0.0, warmup=0.0, repeats=1)
        idle = broker_idle.run(opts, connections=20 if quick else 10_000, procs=2,
                               concurrency=4 if quick else 64, started=shared,
                               settle=0.1 if quick else broker_idle.SETTLE_S)
        print(idle.render(), flush=True)
    return connects, roundtrip, idle


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench.run_all", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true", help="tiny smoke configuration")
    parser.add_argument("--only", default=",".join(BENCHES),
                        help=f"comma-separated subset of {','.join(BENCHES)}")
    parser.add_argument("--brokers", default="mosquitto,emulator")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--no-pin", action="store_true")
    parser.add_argument("--json", type=Path, default=None, help="write every figure here")
    parser.add_argument("--keep-dir", type=Path, default=None)
    args = parser.parse_args(argv)
    only = [b for b in args.only.split(",") if b]
    unknown = set(only) - set(BENCHES)
    if unknown:
        parser.error(f"unknown benchmark(s): {', '.join(sorted(unknown))}")
    quick = args.quick
    started = time.monotonic()
    with contextlib.ExitStack() as stack:
        shared = None
        if quick:  # one broker pair for all three: the smoke run stays within seconds
            directory = stack.enter_context(common.workdir(args.keep_dir))
            shared = stack.enter_context(common.brokers(
                directory, [b for b in args.brokers.split(",") if b],
                emulator_settings=common.THROUGHPUT_SETTINGS,
                cpus=common.cpu_plan(not args.no_pin)[0]))
        connects, roundtrip, idle = _run(args, only, shared)
    print(f"\n== summary (medians; emulator vs mosquitto, measured back to back; "
          f"{time.monotonic() - started:.0f} s) ==")
    print(common.table(["figure", "mosquitto", "emulator", "emulator/mosquitto", "target",
                        "verdict"], summary_rows(connects, roundtrip, idle)))
    print("rate and CPU rows: the ratio is the median of per-repeat ratios (each repeat measures "
          "both brokers back to back), so it may differ from the ratio of the two medians")
    if args.json is not None:
        out: dict[str, Any] = {
            "connects": connects.to_dict() if connects else None,
            "roundtrip": roundtrip.to_dict() if roundtrip else None,
            "idle": idle.to_dict() if idle else None,
        }
        args.json.write_text(json.dumps(out, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
