"""Bench files: the YAML description of the boards on a lab bench.

A bench file names each board and says, per board, how to reach its console (serial
port and baud rate, or a labgrid environment/place), how to switch or reset it (a
DTR/RTS pulse, or commands for a relay, USB hub or power strip), how credentials and
parameters get onto it (console commands with placeholders, or a flashing command),
and the log patterns that mark each milestone and each failure, with timeouts. The
documented example is ``devices/benches/simulator.yaml``; the format is described there.

Everything is checked on load: an error names the file, the line, the key and what was
expected (``bench.yaml:14: boards.b1.power.on: expected a command ...``), and templates
are parsed then, so an unknown placeholder is reported before any board is touched.
"""

from __future__ import annotations

import re
from collections.abc import Mapping
from dataclasses import dataclass, field
from enum import Enum
from pathlib import Path
from types import MappingProxyType

from devices.base import DeviceConfigError, FaultPoint
from devices.placeholders import RUN_PLACEHOLDERS, Template, Values
from devices.yaml_config import ConfigFileError, ConfigNode, load_config_file, parse_config_text

__all__ = [
    "BENCH_VERSION",
    "POWER_PLACEHOLDERS",
    "Bench",
    "BoardSpec",
    "BootSpec",
    "CommandSpec",
    "ConsoleSpec",
    "FaultPointSpec",
    "LabgridSpec",
    "Milestone",
    "PowerKind",
    "PowerSpec",
    "SetupStep",
    "load_bench",
    "parse_bench",
]

BENCH_VERSION = 1
DEFAULT_BAUD = 115200
DEFAULT_NEWLINE = "\r\n"
DEFAULT_BOOT_TIMEOUT_S = 30.0
DEFAULT_COMMAND_TIMEOUT_S = 10.0
DEFAULT_MILESTONE_TIMEOUT_S = 30.0
DEFAULT_POWER_TIMEOUT_S = 30.0
DEFAULT_FLASH_TIMEOUT_S = 300.0
DEFAULT_PULSE_S = 0.1
#: The failure-pattern groups that become AWS's error fields in the result.
ERROR_GROUPS = ("status_code", "error_code", "error_message")

#: Placeholders of power commands, which run without a provisioning run.
POWER_PLACEHOLDERS: Mapping[str, str] = MappingProxyType({
    "board": "the board's name in the bench file",
    "tty": "the board's serial port",
    "python": "the Python interpreter running fleetbench",
})
#: Placeholders of a flashing command: the run's, plus the board's.
FLASH_PLACEHOLDERS: Mapping[str, str] = MappingProxyType({**RUN_PLACEHOLDERS,
                                                          **POWER_PLACEHOLDERS})
#: Placeholders of an ``each_param`` console command.
PARAM_PLACEHOLDERS: Mapping[str, str] = MappingProxyType({
    **RUN_PLACEHOLDERS, "name": "the parameter's name", "value": "the parameter's value"})

_NAME_RE = re.compile(r"^[A-Za-z0-9_.-]+$")
_MILESTONE_RE = re.compile(r"^[a-z][a-z0-9_]*$")


class PowerKind(str, Enum):
    NONE = "none"  # nobody can switch it: no power cuts, no resets
    COMMAND = "command"  # commands for a relay, USB hub, power strip
    LINE = "line"  # a DTR or RTS pulse on the serial port resets the board
    LABGRID = "labgrid"  # labgrid's PowerProtocol


@dataclass(frozen=True)
class CommandSpec:
    """A command with placeholders: an argument list (no shell) or a shell string."""

    parts: tuple[Template, ...]
    shell: bool
    timeout_s: float
    where: str

    def render(self, values: Values) -> list[str]:
        rendered = [part.render(values) for part in self.parts]
        return ["/bin/sh", "-c", rendered[0]] if self.shell else rendered

    def render_redacted(self, values: Values) -> str:
        return " ".join(part.render_redacted(values) for part in self.parts)

    def check(self, values: Values) -> None:
        for part in self.parts:
            part.check(values)


@dataclass(frozen=True)
class PowerSpec:
    kind: PowerKind = PowerKind.NONE
    on: CommandSpec | None = None
    off: CommandSpec | None = None
    cycle: CommandSpec | None = None
    line: str | None = None  # "dtr" or "rts" for PowerKind.LINE
    pulse_s: float = DEFAULT_PULSE_S
    settle_s: float = 0.0  # wait after switching on, before expecting boot output

    @property
    def can_cut(self) -> bool:
        """Whether the harness can take power away (needed for fault points)."""
        return self.kind in (PowerKind.LINE, PowerKind.LABGRID) or (
            self.kind is PowerKind.COMMAND and self.off is not None)


@dataclass(frozen=True)
class ConsoleSpec:
    port: str | None
    baud: int = DEFAULT_BAUD
    newline: str = DEFAULT_NEWLINE
    prompt: re.Pattern[str] | None = None
    command_error: re.Pattern[str] | None = None
    command_timeout_s: float = DEFAULT_COMMAND_TIMEOUT_S
    line_delay_s: float = 0.0  # pause between lines for boards with small UART buffers


@dataclass(frozen=True)
class BootSpec:
    ready: re.Pattern[str]
    timeout_s: float = DEFAULT_BOOT_TIMEOUT_S


@dataclass(frozen=True)
class SetupStep:
    """One console command of the credential/parameter delivery. ``each_param`` sends
    its template once per run parameter (``{name}``, ``{value}``)."""

    send: Template | None
    each_param: Template | None = None
    expect: re.Pattern[str] | None = None  # default: the console prompt
    timeout_s: float | None = None
    where: str = ""


@dataclass(frozen=True)
class Milestone:
    name: str
    pattern: re.Pattern[str]
    timeout_s: float = DEFAULT_MILESTONE_TIMEOUT_S
    where: str = ""


@dataclass(frozen=True)
class FaultPointSpec:
    """Where the harness cuts the board: after ``at`` is seen. ``arm`` is a console
    command that makes debug firmware halt there, so the cut lands exactly."""

    point: FaultPoint
    at: re.Pattern[str]
    arm: Template | None = None


@dataclass(frozen=True)
class LabgridSpec:
    """Console and power through labgrid: an environment file or a remote place."""

    env: Path | None = None
    place: str | None = None
    target: str = "main"
    coordinator: str | None = None
    where: str = ""


@dataclass(frozen=True)
class BoardSpec:
    name: str
    source: Path
    line: int
    console: ConsoleSpec
    power: PowerSpec
    boot: BootSpec
    milestones: tuple[Milestone, ...]
    done: str
    setup: tuple[SetupStep, ...] = ()
    start: Template | None = None
    failures: tuple[Milestone, ...] = ()
    fault_points: Mapping[FaultPoint, FaultPointSpec] = field(default_factory=dict)
    flash: CommandSpec | None = None
    labgrid: LabgridSpec | None = None

    def __post_init__(self) -> None:
        object.__setattr__(self, "fault_points", MappingProxyType(dict(self.fault_points)))

    @property
    def where(self) -> str:
        return f"{self.source}:{self.line}: boards.{self.name}"


@dataclass(frozen=True)
class Bench:
    path: Path
    boards: Mapping[str, BoardSpec]

    def __post_init__(self) -> None:
        object.__setattr__(self, "boards", MappingProxyType(dict(self.boards)))

    def board(self, name: str) -> BoardSpec:
        try:
            return self.boards[name]
        except KeyError:
            raise DeviceConfigError(
                f"{self.path}: no board {name!r}; boards on this bench: "
                f"{', '.join(self.boards) or '(none)'}") from None


# --------------------------------------------------------------------------- parsing


def _template(node: ConfigNode, names: Mapping[str, str] = RUN_PLACEHOLDERS) -> Template:
    text = node.string(expand_env=True)
    return Template(text, names, where=f"{node.path}:{node.line}: {node.key}")


def _command(node: ConfigNode, names: Mapping[str, str], timeout_s: float) -> CommandSpec:
    where = f"{node.path}:{node.line}: {node.key}"
    value = node.command()
    if isinstance(value, str):
        return CommandSpec((Template(value, names, where=where),), True, timeout_s, where)
    return CommandSpec(tuple(Template(v, names, where=where) for v in value), False,
                       timeout_s, where)


def _command_entry(node: ConfigNode, names: Mapping[str, str],
                   default_timeout: float) -> CommandSpec:
    """``CMD`` or ``{command: CMD, timeout: S}``."""
    if node.is_mapping:
        entries = node.mapping(allowed=("command", "timeout"), required=("command",))
        timeout = entries["timeout"].number(positive=True) if "timeout" in entries \
            else default_timeout
        return _command(entries["command"], names, timeout)
    return _command(node, names, default_timeout)


def _power(node: ConfigNode | None, has_labgrid: bool) -> PowerSpec:
    if node is None or node.is_null:
        return PowerSpec(PowerKind.LABGRID if has_labgrid else PowerKind.NONE)
    if not node.is_mapping:
        kind = node.choice(("none", "labgrid"))
        if kind == "labgrid" and not has_labgrid:
            raise node.error("power: labgrid needs a labgrid section on the board")
        return PowerSpec(PowerKind(kind))
    if has_labgrid:
        raise node.error("a board with a labgrid section is switched through labgrid; "
                         "remove the power commands (or write power: labgrid)")
    entries = node.mapping(allowed=("on", "off", "cycle", "reset", "pulse", "settle",
                                    "timeout"))
    timeout = entries["timeout"].number(positive=True) if "timeout" in entries \
        else DEFAULT_POWER_TIMEOUT_S
    settle = entries["settle"].number(minimum=0) if "settle" in entries else 0.0
    pulse = entries["pulse"].number(positive=True) if "pulse" in entries else DEFAULT_PULSE_S
    if "reset" in entries:
        conflicting = [k for k in ("on", "off", "cycle") if k in entries]
        if conflicting:
            raise entries["reset"].error(
                f"reset: dtr/rts cannot be combined with {', '.join(conflicting)} commands")
        line = entries["reset"].choice(("dtr", "rts"))
        return PowerSpec(PowerKind.LINE, line=line, pulse_s=pulse, settle_s=settle)
    commands = {k: _command_entry(entries[k], POWER_PLACEHOLDERS, timeout)
                for k in ("on", "off", "cycle") if k in entries}
    if "on" not in commands and "cycle" not in commands:
        raise node.error("expected power commands: on (with off) or cycle, or "
                         "reset: dtr|rts, or power: none")
    if "off" in commands and "on" not in commands:
        raise node.error("an off command needs an on command")
    return PowerSpec(PowerKind.COMMAND, on=commands.get("on"), off=commands.get("off"),
                     cycle=commands.get("cycle"), settle_s=settle)


def _console(node: ConfigNode | None, board: ConfigNode, has_labgrid: bool) -> ConsoleSpec:
    if node is None:
        if has_labgrid:
            return ConsoleSpec(port=None)
        raise board.error("missing required key: console (with the serial port)")
    allowed = ("port", "baud", "newline", "prompt", "command_error", "command_timeout",
               "line_delay")
    entries = node.mapping(allowed=allowed)
    if has_labgrid:
        clash = [k for k in ("port", "baud") if k in entries]
        if clash:
            raise entries[clash[0]].error(
                "a board with a labgrid section reaches its console through labgrid; "
                "remove port/baud")
        port = None
    else:
        if "port" not in entries:
            raise node.error("missing required key: port (the board's serial port, e.g. "
                             "/dev/ttyUSB0)")
        port = entries["port"].string()
    newline = DEFAULT_NEWLINE
    if "newline" in entries:
        newline = entries["newline"].string(expand_env=False)
        if newline not in ("\r\n", "\n", "\r"):
            raise entries["newline"].error(r'expected "\r\n", "\n" or "\r"')
    return ConsoleSpec(
        port=port,
        baud=entries["baud"].integer(minimum=50) if "baud" in entries else DEFAULT_BAUD,
        newline=newline,
        prompt=entries["prompt"].regex() if "prompt" in entries else None,
        command_error=entries["command_error"].regex() if "command_error" in entries else None,
        command_timeout_s=entries["command_timeout"].number(positive=True)
        if "command_timeout" in entries else DEFAULT_COMMAND_TIMEOUT_S,
        line_delay_s=entries["line_delay"].number(minimum=0) if "line_delay" in entries
        else 0.0,
    )


def _setup(node: ConfigNode | None, console: ConsoleSpec) -> tuple[SetupStep, ...]:
    if node is None:
        return ()
    steps = []
    for item in node.sequence():
        where = f"{item.path}:{item.line}: {item.key}"
        if item.is_mapping:
            entries = item.mapping(allowed=("send", "each_param", "expect", "timeout"))
            if ("send" in entries) == ("each_param" in entries):
                raise item.error("expected exactly one of send or each_param")
            step = SetupStep(
                send=_template(entries["send"]) if "send" in entries else None,
                each_param=_template(entries["each_param"], PARAM_PLACEHOLDERS)
                if "each_param" in entries else None,
                expect=entries["expect"].regex() if "expect" in entries else None,
                timeout_s=entries["timeout"].number(positive=True) if "timeout" in entries
                else None,
                where=where)
        else:
            step = SetupStep(send=_template(item), where=where)
        if step.expect is None and console.prompt is None:
            raise item.error("console commands wait for the prompt: set console.prompt, or "
                             "give this step an expect pattern")
        steps.append(step)
    return tuple(steps)


def _pattern_entry(name: str, node: ConfigNode, default_timeout: float) -> Milestone:
    where = f"{node.path}:{node.line}: {node.key}"
    if node.is_mapping:
        entries = node.mapping(allowed=("pattern", "timeout"), required=("pattern",))
        timeout = entries["timeout"].number(positive=True) if "timeout" in entries \
            else default_timeout
        return Milestone(name, entries["pattern"].regex(), timeout, where)
    return Milestone(name, node.regex(), default_timeout, where)


def _named_patterns(node: ConfigNode, default_timeout: float) -> tuple[Milestone, ...]:
    out = []
    for name, entry in node.mapping().items():
        if not _MILESTONE_RE.match(name):
            raise entry.error("names are lower_case_with_underscores (like the standard "
                              "steps: connect_claim, create_certificate, register_thing, "
                              "connect_device)")
        out.append(_pattern_entry(name, entry, default_timeout))
    return tuple(out)


def _fault_points(node: ConfigNode | None, power: PowerSpec,
                  ) -> dict[FaultPoint, FaultPointSpec]:
    if node is None:
        return {}
    out: dict[FaultPoint, FaultPointSpec] = {}
    if not power.can_cut:
        raise node.error("fault points need power the harness can cut (power off command, "
                         "reset: dtr|rts, or labgrid)")
    choices = tuple(p.value for p in FaultPoint)
    for name, entry in node.mapping(allowed=choices).items():
        point = FaultPoint(name)
        if entry.is_mapping:
            fields = entry.mapping(allowed=("at", "arm"), required=("at",))
            out[point] = FaultPointSpec(point, fields["at"].regex(),
                                        _template(fields["arm"]) if "arm" in fields else None)
        else:
            out[point] = FaultPointSpec(point, entry.regex())
    return out


def _labgrid(node: ConfigNode | None, bench_path: Path) -> LabgridSpec | None:
    if node is None:
        return None
    entries = node.mapping(allowed=("env", "place", "target", "coordinator"))
    where = f"{node.path}:{node.line}: {node.key}"
    if ("env" in entries) == ("place" in entries):
        raise node.error("expected exactly one of env (a labgrid environment file) or "
                         "place (a remote place)")
    env = None
    if "env" in entries:
        env = Path(entries["env"].string())
        if not env.is_absolute():
            env = bench_path.parent / env
        if not env.exists():
            raise entries["env"].error(f"no labgrid environment file at {env}")
    return LabgridSpec(
        env=env,
        place=entries["place"].string() if "place" in entries else None,
        target=entries["target"].string() if "target" in entries else "main",
        coordinator=entries["coordinator"].string() if "coordinator" in entries else None,
        where=where)


_BOARD_KEYS = ("console", "power", "labgrid", "flash", "boot", "setup", "start", "milestones",
               "milestone_timeout", "done", "failures", "fault_points", "description")


def _board(name: str, node: ConfigNode, bench_path: Path) -> BoardSpec:
    if not _NAME_RE.match(name):
        raise node.error("board names use letters, digits, '.', '_' and '-'")
    entries = node.mapping(allowed=_BOARD_KEYS, required=("boot", "milestones"))
    labgrid = _labgrid(entries.get("labgrid"), bench_path)
    console = _console(entries.get("console"), node, labgrid is not None)
    power = _power(entries.get("power"), labgrid is not None)
    boot_entries = entries["boot"].mapping(allowed=("ready", "timeout"), required=("ready",))
    boot = BootSpec(boot_entries["ready"].regex(),
                    boot_entries["timeout"].number(positive=True) if "timeout" in boot_entries
                    else DEFAULT_BOOT_TIMEOUT_S)
    milestone_timeout = entries["milestone_timeout"].number(positive=True) \
        if "milestone_timeout" in entries else DEFAULT_MILESTONE_TIMEOUT_S
    milestones = _named_patterns(entries["milestones"], milestone_timeout)
    if not milestones:
        raise entries["milestones"].error("expected at least one milestone")
    names = [m.name for m in milestones]
    done = names[-1]
    if "done" in entries:
        done = entries["done"].choice(tuple(names))
    failures = _named_patterns(entries["failures"], milestone_timeout) \
        if "failures" in entries else ()
    clash = set(names) & {f.name for f in failures}
    if clash:
        raise entries["failures"].error(
            f"{', '.join(sorted(clash))} is both a milestone and a failure")
    flash = _command_entry(entries["flash"], FLASH_PLACEHOLDERS, DEFAULT_FLASH_TIMEOUT_S) \
        if "flash" in entries else None
    return BoardSpec(
        name=name,
        source=bench_path,
        line=node.line,
        console=console,
        power=power,
        boot=boot,
        milestones=milestones,
        done=done,
        setup=_setup(entries.get("setup"), console),
        start=_template(entries["start"]) if "start" in entries else None,
        failures=failures,
        fault_points=_fault_points(entries.get("fault_points"), power),
        flash=flash,
        labgrid=labgrid,
    )


def _bench(root: ConfigNode) -> Bench:
    entries = root.mapping(allowed=("version", "boards", "description"), required=("boards",))
    if "version" in entries:
        version = entries["version"].integer()
        if version != BENCH_VERSION:
            raise entries["version"].error(
                f"this fleetbench reads bench files of version {BENCH_VERSION}, got {version}")
    boards_node = entries["boards"]
    boards = {name: _board(name, node, root.path)
              for name, node in boards_node.mapping().items()}
    if not boards:
        raise boards_node.error("expected at least one board")
    return Bench(root.path, boards)


def parse_bench(text: str, path: Path | str = "<bench>") -> Bench:
    """A bench from YAML text (``path`` is used in error messages and for relative paths)."""
    return _bench(parse_config_text(text, Path(path)))


def load_bench(path: Path | str) -> Bench:
    """Read and validate a bench file. Raises :class:`ConfigFileError` (a
    :class:`DeviceConfigError`) naming the file, line, key and what was expected."""
    return _bench(load_config_file(path))


__all__ += ["ConfigFileError"]
