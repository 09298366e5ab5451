"""The Locust process's GC tuning while devices run (harness.gc_tuning)."""

from __future__ import annotations

import gc

from harness.gc_tuning import GC_GEN0_THRESHOLD, tune_gc, untune_gc


def test_gc_tuning_raises_the_young_threshold_and_is_undone() -> None:
    original = gc.get_threshold()
    try:
        restore = tune_gc()
        assert restore == original
        assert gc.get_threshold()[0] >= GC_GEN0_THRESHOLD
        assert gc.get_threshold()[1:] == original[1:]
        assert gc.get_freeze_count() > 0
    finally:
        untune_gc(original)
    assert gc.get_threshold() == original
    assert gc.get_freeze_count() == 0
