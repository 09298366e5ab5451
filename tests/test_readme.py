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


def test_readme_fault_plan_example_loads(tmp_path: Path) -> None:
    from harness.emulator.faults import load_fault_plan

    start = README.index("```yaml\nseed:")
    text = README[start + len("```yaml\n"):README.index("```", start + 7)]
    plan_file = tmp_path / "plan.yaml"
    plan_file.write_text(text)
    plan = load_fault_plan(plan_file)
    assert len(plan.rules) == 2
