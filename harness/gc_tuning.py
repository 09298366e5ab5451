"""Garbage collection in a long-running process that serves or runs provisioning flows.

A flow allocates thousands of short-lived objects, most of them acyclic; with CPython's
defaults a 20 s claim-csr run at 120 flows/s made ~450 young and 4 full collections in
the Locust process (0.65 s of CPU) and as many in the emulator (0.83 s for ~1,900 flows;
0.32 s for ~2,500 tuned). Setup's objects are frozen out of every collection and young
collections run less often; cyclic garbage is still collected, in larger batches. Used by
the load process while devices run and by the standalone emulator process (never by an
emulator embedded in someone else's process: the GC is the host's).
"""

from __future__ import annotations

import gc

__all__ = ["GC_GEN0_THRESHOLD", "tune_gc", "untune_gc"]

#: Allocations between young-generation collections in a tuned process (CPython's default
#: is 700: a flow allocates thousands of short-lived objects, most of them acyclic).
GC_GEN0_THRESHOLD = 20_000


def tune_gc() -> tuple[int, int, int]:
    """Fewer, cheaper collections while devices run: what setup built (modules, Locust,
    the fleet's clients) moves to the permanent generation, and young collections run
    less often. Cyclic garbage is still collected, only in larger batches. Returns the
    thresholds to restore (:func:`untune_gc`)."""
    before = gc.get_threshold()
    gc.collect()
    gc.freeze()
    gc.set_threshold(max(before[0], GC_GEN0_THRESHOLD), before[1], before[2])
    return before


def untune_gc(thresholds: tuple[int, int, int]) -> None:
    """Undo :func:`tune_gc` (a web UI run ends; the next test start tunes again)."""
    gc.unfreeze()
    gc.set_threshold(*thresholds)
