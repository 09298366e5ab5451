"""Registry events reach the broker's loop in order, whatever thread committed them, with
one wake-up of the loop for all that arrive before it takes them (a RegisterThing commit
emits several; each used to cost the loop a wake-up and a GIL hand-off)."""

from __future__ import annotations

import threading
import time
from pathlib import Path
from typing import Any

from tests.brokerkit import BrokerKit, MemEvent, kit_fixture

kit = kit_fixture()


def _record(kit: BrokerKit) -> tuple[list[tuple[Any, int]], list[int]]:
    """Replace the broker's per-event handler with a recorder; count the loop's drains."""
    handled: list[tuple[Any, int]] = []
    drains: list[int] = []
    broker: Any = kit.broker
    drain = broker._registry_events
    broker._registry_event = lambda event: handled.append((event, threading.get_ident()))

    def counted() -> None:
        drains.append(1)
        drain()

    broker._registry_events = counted
    return handled, drains


def _wait(condition: Any, timeout: float = 5.0) -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        assert time.monotonic() < deadline, "the loop did not take the events"
        time.sleep(0.01)


def test_a_burst_of_events_is_handled_in_order_on_the_loop_after_one_wake_up(
        kit: BrokerKit) -> None:
    handled, drains = _record(kit)
    loop: Any = kit.broker._loop
    loop_thread: list[int] = []
    release = threading.Event()

    def hold_the_loop() -> None:
        loop_thread.append(threading.get_ident())
        release.wait(5)

    loop.call_soon_threadsafe(hold_the_loop)
    _wait(lambda: loop_thread)
    events = [MemEvent("certificate", certificate_id=f"c{i}", status="ACTIVE")
              for i in range(50)]
    for event in events:  # as the registry's writer thread does, while the loop is busy
        kit.broker._registry_event_threadsafe(event)
    release.set()
    _wait(lambda: len(handled) == len(events))
    assert [event for event, _ in handled] == events
    assert {thread for _, thread in handled} == set(loop_thread)
    assert len(drains) == 1


def test_events_from_several_threads_all_arrive_each_thread_in_its_order(
        kit: BrokerKit, tmp_path: Path) -> None:
    handled, _ = _record(kit)

    def emit(name: str) -> None:
        for i in range(200):
            kit.broker._registry_event_threadsafe(MemEvent(name, certificate_id=str(i)))

    threads = [threading.Thread(target=emit, args=(f"t{n}",)) for n in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    _wait(lambda: len(handled) == 800)
    for n in range(4):
        mine = [int(e.certificate_id) for e, _ in handled if e.kind == f"t{n}"]
        assert mine == list(range(200))
