"""The RSA key pool: worker processes keep it full, takers never block the event loop."""

from __future__ import annotations

import asyncio
import concurrent.futures
import time

import pytest
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import rsa

from harness.clock import Clock
from harness.emulator.keypool import KeyPool, KeyPoolClosed
from harness.observations import Kind, ObservationLog


def test_keys_are_rsa_2048_with_a_pkcs1_private_key() -> None:
    # spec fleet §1.2: RSA 2048, private key observed as PKCS#1 "BEGIN RSA PRIVATE KEY"
    pool = KeyPool(1, 1, niceness=0)
    pool.start()
    try:
        key = pool.take_blocking(timeout=30)
    finally:
        pool.close()
    assert key.private_key_pem.startswith("-----BEGIN RSA PRIVATE KEY-----")
    private = serialization.load_pem_private_key(key.private_key_pem.encode(), None)
    assert isinstance(private, rsa.RSAPrivateKey) and private.key_size == 2048
    assert key.public_key().public_numbers() == private.public_key().public_numbers()
    assert "PRIVATE" not in repr(key)


def test_taking_twenty_keys_never_blocks_the_event_loop() -> None:
    # task: a concurrent asyncio.sleep(0) ticker keeps ticking while 20 keys are taken.
    # The loop thread's own CPU time between two ticks is measured (time.thread_time), so
    # a key generated on the loop (~30-100 ms of CPU) would show even on a busy machine,
    # where the wall-clock gaps also include the OS running other processes.
    async def scenario() -> tuple[int, float, int]:
        pool = KeyPool(4, 2, niceness=0)
        pool.start()
        stop = asyncio.Event()
        ticks = 0
        longest = 0.0

        async def ticker() -> None:
            nonlocal ticks, longest
            last = time.thread_time()
            while not stop.is_set():
                await asyncio.sleep(0)
                now = time.thread_time()
                longest = max(longest, now - last)
                last = now
                ticks += 1

        task = asyncio.create_task(ticker())
        try:
            keys = await asyncio.wait_for(asyncio.gather(*(pool.take() for _ in range(20))), 60)
        finally:
            stop.set()
            await task
            await pool.stop()
        return ticks, longest, len({k.public_key_der for k in keys})

    ticks, longest, distinct = asyncio.run(scenario())
    assert distinct == 20
    assert ticks > 1000
    assert longest < 0.015, f"the loop thread ran {longest * 1000:.1f} ms without yielding"


def test_a_dry_pool_is_observed_once_per_dry_spell() -> None:
    # task: say in the endpoint's observation log when the pool ran dry
    clock = Clock()
    observations = ObservationLog(clock)
    pool = KeyPool(1, 1, observations=observations, niceness=0)
    pool.start()
    try:
        with concurrent.futures.ThreadPoolExecutor(3) as threads:
            keys = list(threads.map(lambda _: pool.take_blocking(timeout=30), range(3)))
        stats = pool.stats()
    finally:
        pool.close()
    assert len(keys) == 3
    dry = observations.query(kinds=[Kind.KEY_POOL_EMPTY.value])
    assert 1 <= len(dry) <= 3 and stats.dry_spells == len(dry)
    assert dry[0].detail["size"] == 1
    assert set(dry[0].detail) == {"size", "workers", "waiting", "in_flight"}  # no key material


def test_the_refill_rate_is_measured() -> None:
    # task: refill rate measurable
    pool = KeyPool(3, 1, niceness=0)
    pool.start()
    try:
        assert pool.wait_ready(3, timeout=30)
        stats = pool.stats()
    finally:
        pool.close()
    assert stats.ready == 3 and stats.generated >= 3
    assert stats.refill_rate is not None and stats.refill_rate > 0
    assert stats.mean_generation_ms is not None and stats.mean_generation_ms > 1


def test_stopping_the_pool_releases_a_waiting_taker() -> None:
    # 8192-bit keys take seconds: the taker is sure to be waiting when the pool stops
    pool = KeyPool(1, 1, bits=8192, niceness=0)
    pool.start()
    with concurrent.futures.ThreadPoolExecutor(1) as threads:
        waiting = threads.submit(pool.take_blocking, 30)
        deadline = time.monotonic() + 10
        while pool.stats().waiting == 0 and time.monotonic() < deadline:
            time.sleep(0.001)
        assert pool.stats().waiting == 1
        pool.close()
        with pytest.raises(KeyPoolClosed):
            waiting.result(10)
    with pytest.raises(KeyPoolClosed):
        pool.take_blocking(timeout=1)


def test_a_taker_that_gives_up_does_not_lose_a_key() -> None:
    async def scenario() -> int:
        pool = KeyPool(1, 1, niceness=0)
        pool.start()
        try:
            await pool.take()
            impatient = asyncio.create_task(pool.take())
            await asyncio.sleep(0)
            impatient.cancel()
            await asyncio.gather(impatient, return_exceptions=True)
            await asyncio.wait_for(pool.take(), 30)
            return pool.stats().taken
        finally:
            await pool.stop()

    assert asyncio.run(scenario()) >= 2
