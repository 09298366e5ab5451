"""bench/tls_engines.py runs every pairing of the two TLS engines and prints its table."""

from __future__ import annotations

import pytest

from bench import tls_engines


def test_tls_engines_benchmark_prints_every_pairing(capsys: pytest.CaptureFixture[str]) -> None:
    tls_engines.main(["--handshakes", "3", "--rounds", "1"])
    out = capsys.readouterr().out
    assert "bundled: OpenSSL" in out
    rows = [line.split() for line in out.splitlines() if "|" in line][1:]
    assert sorted((row[0], row[1]) for row in rows) == [
        ("bundled", "bundled"), ("bundled", "stdlib"), ("stdlib", "bundled"),
        ("stdlib", "stdlib")]
    for row in rows:  # server, client, identity and total costs, all measured
        assert all(float(value) > 0 for value in (row[3], row[4], row[5], row[7]))
