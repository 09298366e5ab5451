"""One registry writer thread with group commit, for writes that come from the event loop.

The provisioning service commits twice per device (the new certificate, then
RegisterThing's transaction), always before it answers, and never on the event loop.
Through a thread pool each commit cost a Future, a Condition, a pool thread's wake-up
and a contended writer lock; here each write is a *job* (a function of the registry)
put on a queue, and one thread runs every job that is waiting in one transaction:

* each job runs in its own savepoint, so a job that raises leaves no trace and fails
  alone, with its own exception;
* the batch is then committed to SQLite once (one ``BEGIN … COMMIT`` for several
  devices' writes) and only then is any job's awaiting coroutine resumed: a job is
  acknowledged only after its commit (if the commit fails, every job of the batch
  fails with that error and none of their writes is visible);
* results go back to the loop in one ``call_soon_threadsafe`` per batch.

Jobs run in commit order, one after the other, on this thread (inside the registry's
writer lock, like any other write), so they may read what earlier jobs of the same
batch wrote. Writers on other threads (the control plane) keep using the registry's
own transactions and simply take turns with the batches.
"""

from __future__ import annotations

import asyncio
import logging
import queue
import threading
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, Generic, TypeVar

from harness.emulator.registry.registry import Registry

log = logging.getLogger("fleetbench.registry")

T = TypeVar("T")

#: Jobs per transaction at most: bounds how long one commit keeps the writer lock.
MAX_BATCH = 64


@dataclass(slots=True)
class _Job(Generic[T]):
    fn: Callable[[Registry], T]
    loop: asyncio.AbstractEventLoop
    future: asyncio.Future[T]


class RegistryWriter:
    """``await writer.run(fn)``: ``fn(registry)`` committed in a group, off the loop.

    :meth:`start` before the first job, :meth:`stop` before the registry closes.
    """

    def __init__(self, registry: Registry, *, max_batch: int = MAX_BATCH,
                 name: str = "fleetbench-registry-writer") -> None:
        self.registry = registry
        self.max_batch = max_batch
        self._queue: queue.SimpleQueue[_Job[Any] | None] = queue.SimpleQueue()
        self._thread = threading.Thread(target=self._serve, name=name, daemon=True)
        self._started = False
        self._stopping = False
        #: Transactions committed and jobs run (diagnostics and tests).
        self.commits = 0
        self.jobs = 0

    def start(self) -> None:
        if not self._started:
            self._started = True
            self._thread.start()

    def stop(self, timeout: float = 30.0) -> None:
        """Finish every job already queued, then end the thread."""
        if self._started and not self._stopping:
            self._stopping = True
            self._queue.put(None)
            self._thread.join(timeout)

    async def run(self, fn: Callable[[Registry], T]) -> T:
        """Run ``fn(registry)`` in the writer's next transaction; return (or raise) what it
        did once that transaction is committed."""
        if not self._started or self._stopping:
            raise RuntimeError("the registry writer is not running")
        loop = asyncio.get_running_loop()
        future: asyncio.Future[T] = loop.create_future()
        self._queue.put(_Job(fn, loop, future))
        return await future

    # -- the writer thread ---------------------------------------------------------------------
    def _serve(self) -> None:
        while True:
            job = self._queue.get()
            if job is None:
                return
            batch = [job]
            last = False
            while len(batch) < self.max_batch:
                try:
                    more = self._queue.get_nowait()
                except queue.Empty:
                    break
                if more is None:
                    last = True
                    break
                batch.append(more)
            self._commit(batch)
            if last:
                return

    def _commit(self, batch: list[_Job[Any]]) -> None:
        outcomes: list[tuple[bool, Any]] = []
        try:
            with self.registry.transaction() as registry:
                for job in batch:
                    try:
                        with registry.transaction():  # a savepoint: fails alone
                            outcomes.append((True, job.fn(registry)))
                    except Exception as error:
                        outcomes.append((False, error))
        except Exception as error:  # the commit itself failed: nothing of the batch stands
            log.error("event=registry_group_commit_failed jobs=%d error=%s", len(batch),
                      type(error).__name__)
            outcomes = [(False, error)] * len(batch)
        self.commits += 1
        self.jobs += len(batch)
        by_loop: dict[asyncio.AbstractEventLoop, list[tuple[_Job[Any], bool, Any]]] = {}
        for job, (ok, value) in zip(batch, outcomes, strict=True):
            by_loop.setdefault(job.loop, []).append((job, ok, value))
        for loop, results in by_loop.items():
            try:
                loop.call_soon_threadsafe(_deliver, results)
            except RuntimeError:  # that loop is closed: nobody is waiting any more
                pass


def _deliver(results: list[tuple[_Job[Any], bool, Any]]) -> None:
    """On the loop: resume each job's caller (unless it gave up waiting)."""
    for job, ok, value in results:
        if job.future.done():
            continue
        if ok:
            job.future.set_result(value)
        else:
            job.future.set_exception(value)
