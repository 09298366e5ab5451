"""README.md is the user's manual: keep its lists of emulator guesses true."""

from __future__ import annotations

import dataclasses
from pathlib import Path

from harness.emulator.broker_settings import BrokerSettings

README = (Path(__file__).resolve().parents[1] / "README.md").read_text()


def test_readme_lists_every_broker_guess() -> None:
    guesses = [f.name for f in dataclasses.fields(BrokerSettings) if "guess" in f.metadata]
    assert guesses
    missing = [name for name in guesses if f"`{name}`" not in README]
    assert not missing, f"README lacks these BrokerSettings guesses: {missing}"


def test_readme_names_the_test_command_ci_runs() -> None:
    ci = (Path(__file__).resolve().parents[1] / ".ci" / "run").read_text()
    command = "python3 -m pytest -n auto -q"
    assert command in README
    assert command in ci
