"""Bench files: the documented example loads, and every kind of mistake is reported with
the file, the line, the key and what was expected, before any board is touched."""

from __future__ import annotations

import re
from pathlib import Path

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from devices.base import DeviceConfigError, FaultPoint, create_device
from devices.bench import PowerKind, load_bench, parse_bench
from devices.placeholders import PlaceholderError
from devices.yaml_config import ConfigFileError

EXAMPLE = Path(__file__).resolve().parents[1] / "devices" / "benches" / "simulator.yaml"

MINIMAL = """\
version: 1
boards:
  b1:
    console:
      port: /dev/ttyUSB0
      prompt: '> '
    power:
      on: relay on 3
      off: relay off 3
    boot:
      ready: '> '
    setup:
      - set serial {serial}
    start: provision
    milestones:
      connect_claim: 'connected'
      done: 'done thing=(?P<thing_name>\\S+)'
"""


def bench_text(**replace: str) -> str:
    text = MINIMAL
    for old, new in replace.items():
        assert old in text, old
        text = text.replace(old, new)
    return text


def line_of(text: str, fragment: str) -> int:
    """1-based line of the first line containing ``fragment``."""
    return next(i for i, line in enumerate(text.splitlines(), 1) if fragment in line)


def error_of(text: str) -> ConfigFileError:
    with pytest.raises(ConfigFileError) as info:
        parse_bench(text, "lab.yaml")
    return info.value


def test_the_documented_example_bench_describes_two_simulated_boards(monkeypatch):
    monkeypatch.setenv("FLEETBENCH_SIM_DIR", "/srv/sim")
    bench = load_bench(EXAMPLE)
    assert set(bench.boards) == {"sim-1", "sim-2"}
    board = bench.board("sim-2")  # built from sim-1 with a YAML merge key
    assert board.console.port == "/srv/sim/sim-2/tty"
    assert board.power.kind is PowerKind.COMMAND and board.power.can_cut
    assert [m.name for m in board.milestones][:2] == ["connect_claim", "create_certificate"]
    assert board.done == "provisioned"
    assert set(board.fault_points) == set(FaultPoint)
    assert board.fault_points[FaultPoint.AFTER_REGISTER].arm is not None


def test_environment_defaults_fill_the_example_when_the_variable_is_unset(monkeypatch):
    monkeypatch.delenv("FLEETBENCH_SIM_DIR", raising=False)
    assert load_bench(EXAMPLE).board("sim-1").console.port == "/tmp/fleetbench-sim/sim-1/tty"


def test_a_minimal_bench_keeps_its_values():
    bench = parse_bench(MINIMAL, "lab.yaml")
    board = bench.board("b1")
    assert board.console.baud == 115200 and board.console.newline == "\r\n"
    assert board.power.on is not None and board.power.on.shell  # a string runs with /bin/sh
    assert board.start is not None and board.start.text == "provision"
    assert board.done == "done"
    match = board.milestones[1].pattern.search("done thing=t1")
    assert match is not None and match.group("thing_name") == "t1"


def test_yaml_1_1_booleans_are_names_and_text_in_a_bench():
    # `on:` and `off:` are YAML 1.1 booleans; a bench means the words.
    board = parse_bench(bench_text(**{"on: relay on 3": "on: [relay, 'on']"}), "x").board("b1")
    assert board.power.on is not None and not board.power.on.shell


def test_malformed_yaml_names_the_file_and_line():
    err = error_of(bench_text(**{"      prompt: '> '": "      prompt: [unclosed"}))
    assert err.path == Path("lab.yaml") and err.line is not None and err.line >= 6
    assert "not valid YAML" in str(err)


def test_an_unknown_key_names_its_line_and_the_expected_keys():
    text = bench_text(**{"    start: provision": "    strat: provision"})
    err = error_of(text)
    line = line_of(text, "strat:")
    assert err.line == line and err.key == "boards.b1.strat"
    assert "unknown key" in str(err) and "start" in str(err)
    assert str(err).startswith(f"lab.yaml:{line}: boards.b1.strat:")


def test_a_missing_serial_port_in_the_file_is_named():
    err = error_of(bench_text(**{"      port: /dev/ttyUSB0\n": ""}))
    assert err.key == "boards.b1.console" and "port" in str(err)


def test_a_missing_serial_port_on_the_machine_fails_when_the_device_is_made(tmp_path):
    bench = tmp_path / "lab.yaml"
    bench.write_text(bench_text(**{
        "/dev/ttyUSB0": str(tmp_path / "no-such-tty"),
        "      on: relay on 3\n      off: relay off 3\n": "      reset: dtr\n"}))
    device = create_device("serial", bench=bench, board="b1")
    with pytest.raises(DeviceConfigError, match=r"serial port .*no-such-tty does not exist"):
        device.on()


def test_an_unknown_placeholder_is_reported_at_load_with_its_line():
    text = bench_text(**{"set serial {serial}": "set serial {serail}"})
    with pytest.raises(PlaceholderError) as info:
        parse_bench(text, "lab.yaml")
    message = str(info.value)
    assert message.startswith(f"lab.yaml:{line_of(text, '{serail}')}: boards.b1.setup[0]:")
    assert "{serail}" in message and "{serial}" in message  # and the known ones


def test_power_commands_only_know_the_board_placeholders():
    with pytest.raises(PlaceholderError, match=r"\{template\}"):
        parse_bench(bench_text(**{"relay on 3": "relay on {template}"}), "lab.yaml")


def test_a_bad_regular_expression_names_its_key():
    err = error_of(bench_text(**{"'connected'": "'connected ('"}))
    assert err.key == "boards.b1.milestones.connect_claim"
    assert "regular expression" in str(err)


def test_fault_points_need_power_that_can_be_cut():
    text = bench_text(**{"    power:\n      on: relay on 3\n      off: relay off 3\n":
                         "    power: none\n"})
    text += "    fault_points:\n      after_register: 'registered'\n"
    err = error_of(text)
    assert err.key == "boards.b1.fault_points" and "cut" in str(err)


def test_an_unknown_fault_point_lists_the_real_ones():
    err = error_of(MINIMAL + "    fault_points:\n      after_lunch: 'x'\n")
    assert "after_register" in str(err) and err.key == "boards.b1.fault_points.after_lunch"


def test_done_must_name_a_milestone():
    err = error_of(MINIMAL + "    done: finished\n")
    assert err.key == "boards.b1.done" and "connect_claim" in str(err)


def test_duplicate_keys_are_refused():
    text = bench_text(**{"    start: provision": "    start: provision\n    start: go"})
    err = error_of(text)
    assert "duplicate key" in str(err) and f"line {line_of(text, 'start:')}" in str(err)
    assert err.line == line_of(text, "start: go")


def test_an_unset_environment_variable_without_default_is_named(monkeypatch):
    monkeypatch.delenv("FLEETBENCH_NO_SUCH_VAR", raising=False)
    err = error_of(bench_text(**{"/dev/ttyUSB0": "${FLEETBENCH_NO_SUCH_VAR}/tty"}))
    assert "FLEETBENCH_NO_SUCH_VAR" in str(err) and err.key == "boards.b1.console.port"


LABGRID_BOARD = """\
boards:
  b1:
    labgrid:
      env: {env}
    console:
      prompt: '> '
{extra}    boot:
      ready: '> '
    milestones:
      done: 'done'
"""


def test_a_labgrid_board_takes_neither_a_port_nor_power_commands(tmp_path):
    env = tmp_path / "env.yaml"
    env.write_text("targets: {}\n")
    board = parse_bench(LABGRID_BOARD.format(env=env, extra=""), "lab.yaml").board("b1")
    assert board.power.kind is PowerKind.LABGRID and board.labgrid is not None
    assert board.labgrid.env == env and board.labgrid.target == "main"
    err = error_of(LABGRID_BOARD.format(env=env, extra="    power:\n      on: relay on\n"))
    assert err.key == "boards.b1.power" and "labgrid" in str(err)
    with_port = LABGRID_BOARD.format(env=env, extra="").replace(
        "      prompt: '> '", "      port: /dev/ttyUSB0\n      prompt: '> '")
    err = error_of(with_port)
    assert err.key == "boards.b1.console.port" and "labgrid" in str(err)


def test_a_labgrid_environment_file_must_exist():
    err = error_of(LABGRID_BOARD.format(env="missing-env.yaml", extra=""))
    assert err.key == "boards.b1.labgrid.env" and "missing-env.yaml" in str(err)


def test_an_unknown_board_lists_the_bench_boards():
    bench = parse_bench(MINIMAL, "lab.yaml")
    with pytest.raises(DeviceConfigError, match=r"no board 'b9'.*b1"):
        bench.board("b9")


def test_an_empty_file_and_a_missing_file_are_named(tmp_path):
    empty = tmp_path / "empty.yaml"
    empty.write_text("")
    with pytest.raises(ConfigFileError, match="empty"):
        load_bench(empty)
    with pytest.raises(ConfigFileError, match="no such file"):
        load_bench(tmp_path / "absent.yaml")


def test_each_param_commands_may_use_name_and_value():
    text = bench_text(**{"      - set serial {serial}":
                         "      - each_param: set param {name} {value}"})
    step = parse_bench(text, "x").board("b1").setup[0]
    assert step.each_param is not None and step.send is None


@settings(max_examples=40, deadline=None)
@given(st.sampled_from(MINIMAL.splitlines()[1:]), st.sampled_from(["\t", ": : :", "- [", "{"]))
def test_any_corrupted_line_fails_with_a_located_error(line, junk):
    # Whatever line is damaged, the error is a DeviceConfigError naming the file.
    text = MINIMAL.replace(line, line + junk, 1)
    try:
        parse_bench(text, "lab.yaml")
    except DeviceConfigError as exc:
        assert str(exc).startswith("lab.yaml"), str(exc)
    # Some damage is still valid YAML with a valid meaning (a regex gaining a brace).


def test_the_example_documents_every_board_key():
    text = EXAMPLE.read_text()
    from devices.bench import _BOARD_KEYS

    for key in _BOARD_KEYS:
        if key != "description":
            assert re.search(rf"^#\s+{key}\b", text, re.MULTILINE), key
