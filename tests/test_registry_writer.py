"""The registry writer thread: group commit of jobs from the event loop (design principle 5:
an acknowledged write is committed; the loop never waits for SQLite)."""

from __future__ import annotations

import asyncio
import sqlite3
import threading
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from harness import pki
from harness.emulator.registry import CertificateStatus, Registry
from harness.emulator.registry.writer import RegistryWriter
from harness.errors import InternalFailureException, ResourceAlreadyExistsException
from tests.test_registry_kit import (  # noqa: F401  (fixtures path and registry)
    EventLog,
    device_pem,
    file_registry,
    make_registry,
    registry_file,
    reopen,
)


@pytest.fixture
def writer(registry: Registry) -> Iterator[RegistryWriter]:
    w = RegistryWriter(registry)
    w.start()
    yield w
    w.stop()


def _create_thing(name: str) -> Any:
    return lambda reg: reg.create_thing(thing_name=name).thing_name


async def _one_batch(writer: RegistryWriter, fns: list[Any]) -> list[Any]:
    """Run ``fns`` as jobs queued together: behind a job that holds the writer until they
    are all queued, so that they make one batch. Outcomes in order (exceptions as values)."""
    started, gate = threading.Event(), threading.Event()

    def hold(_reg: Registry) -> None:
        started.set()
        gate.wait(10)

    blocker = asyncio.ensure_future(writer.run(hold))
    await asyncio.get_running_loop().run_in_executor(None, started.wait, 10)
    jobs = [asyncio.ensure_future(writer.run(fn)) for fn in fns]
    await asyncio.sleep(0)  # each job's task runs up to its await: all are queued now
    gate.set()
    await blocker
    return list(await asyncio.gather(*jobs, return_exceptions=True))


def test_jobs_waiting_together_are_committed_in_one_transaction(
        registry: Registry, writer: RegistryWriter, path: Path) -> None:
    outcomes = asyncio.run(_one_batch(writer, [_create_thing(f"t{i}") for i in range(5)]))
    assert outcomes == [f"t{i}" for i in range(5)]
    assert (writer.commits, writer.jobs) == (2, 6)  # the holding job's batch, then theirs
    again = reopen(registry, path)  # committed: on disk
    assert sorted(again.dump()["things"]) == [f"t{i}" for i in range(5)]
    again.close()


def test_a_failing_job_fails_alone_and_leaves_nothing(registry: Registry,
                                                       writer: RegistryWriter) -> None:
    def half_then_fail(reg: Registry) -> None:
        reg.create_thing(thing_name="half")
        reg.create_thing(thing_name="ok",  # made by the job before, differently: refused
                         attribute_payload={"attributes": {"a": "b"}})

    ok, failed, after = asyncio.run(_one_batch(
        writer, [_create_thing("ok"), half_then_fail, _create_thing("after")]))
    assert (ok, after) == ("ok", "after")
    assert isinstance(failed, ResourceAlreadyExistsException)
    assert sorted(registry.dump()["things"]) == ["after", "ok"]
    assert writer.commits == 2


def test_no_job_is_answered_before_its_commit(registry: Registry, writer: RegistryWriter,
                                              monkeypatch: pytest.MonkeyPatch) -> None:
    def broken_write(_changes: object) -> None:
        raise InternalFailureException("The registry could not be written: disk full")

    monkeypatch.setattr(registry._store, "write", broken_write)
    events = EventLog()
    registry.add_listener(events)

    async def main() -> list[Any]:
        jobs = [writer.run(_create_thing(f"t{i}")) for i in range(3)]
        return list(await asyncio.gather(*jobs, return_exceptions=True))

    outcomes = asyncio.run(main())
    assert all(isinstance(o, InternalFailureException) for o in outcomes)
    assert registry.dump()["things"] == {} and events.events == []


def test_a_job_reads_what_an_earlier_job_of_its_batch_wrote(registry: Registry,
                                                            writer: RegistryWriter) -> None:
    pem = device_pem()

    def insert(reg: Registry) -> str:
        return reg.insert_certificate(pem, status=CertificateStatus.PENDING_ACTIVATION
                                      ).certificate_id

    first, second = asyncio.run(_one_batch(writer, [insert, insert]))
    assert first == pki.certificate_id(pem)
    assert isinstance(second, ResourceAlreadyExistsException)
    assert writer.commits == 2


def test_listeners_hear_a_batch_after_its_commit(registry: Registry,
                                                 writer: RegistryWriter) -> None:
    seen: list[bool] = []

    def listener(_event: object) -> None:  # on the writer thread, after the commit
        db = sqlite3.connect(registry._store.path)
        seen.append(db.execute('SELECT count(*) FROM "things"').fetchone()[0] == 1)
        db.close()

    registry.add_listener(listener)

    async def main() -> None:
        await writer.run(_create_thing("heard"))

    asyncio.run(main())
    assert seen == [True]


def test_stop_commits_what_was_queued_and_refuses_new_jobs(registry: Registry) -> None:
    w = RegistryWriter(registry)
    w.start()

    async def main() -> None:
        job = asyncio.ensure_future(w.run(_create_thing("last")))
        await asyncio.sleep(0)  # the job's task runs up to its await: it is queued
        await asyncio.get_running_loop().run_in_executor(None, w.stop)
        assert await job == "last"
        with pytest.raises(RuntimeError):
            await w.run(_create_thing("late"))

    asyncio.run(main())
    assert list(registry.dump()["things"]) == ["last"]
