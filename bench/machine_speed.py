"""How fast this machine is right now: a fixed reference workload, timed in CPU ms.

The benchmark machines are shared VMs whose speed drifts by a third or more within
minutes (other tenants), so an absolute rate means little without the speed it was
measured at. The reference work is what a provisioning flow is made of: interpreted
Python and ECDSA P-256 signatures. Benchmarks time it just before and just after a
measurement; a rested machine here takes about 30 ms, a slowed one 45 ms or more.

    python -m bench.machine_speed          # prints the median of 5 runs
"""

from __future__ import annotations

import argparse
import statistics
import time

from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.asymmetric import ec

_LOOP = 300_000
_SIGNATURES = 200


def _once() -> float:
    started = time.thread_time()
    total = 0
    for i in range(_LOOP):
        total += i * i % 7
    key = ec.generate_private_key(ec.SECP256R1())
    for _ in range(_SIGNATURES):
        key.sign(b"fleetbench", ec.ECDSA(hashes.SHA256()))
    return (time.thread_time() - started) * 1000


def reference_ms(runs: int = 3) -> float:
    """Median CPU milliseconds of the reference work over ``runs`` runs (after one warm-up
    run); lower is faster."""
    _once()
    return float(statistics.median(_once() for _ in range(max(1, runs))))


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--runs", type=int, default=5)
    args = parser.parse_args(argv)
    print(f"reference work: {reference_ms(args.runs):.1f} ms CPU (about 30 on a rested "
          "machine here; higher is slower)")


if __name__ == "__main__":
    main()
