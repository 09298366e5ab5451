"""``ProcessDevice``: any host-built firmware or client program, run as a subprocess.

The command line, environment and working directory are templates filled with the
run's inputs (``{endpoint}``, ``{port}``, ``{ca_file}``, ``{claim_cert}``, ``{claim_key}``,
``{template}``, ``{serial}``, ``{param:NAME}``, ``{workdir}``... see
:data:`devices.placeholders.RUN_PLACEHOLDERS`; the process device adds ``{endpoint_file}``,
an ``endpoint.json`` it writes for programs that read one, and ``{cut_at}``). stdout and
stderr are captured, line by line with timestamps, as the device log. ``param_args`` are
repeated once per template parameter (``{name}``, ``{value}``), so that a command passes
every parameter the run gives, whatever their names. A timeout kills
the process group, so helpers the program started go too.

What the program reports: a program that prints a fleetbench JSON result on stdout (as
``python -m devices.virtual_main`` does) is read as such (``result: json``); any other
program is judged by its exit status and log patterns (``result: exit-code``), with
named groups ``certificate_id`` / ``thing_name`` in milestone patterns and
``status_code`` / ``error_code`` / ``error_message`` in failure patterns picked up as
facts. Either way it is the device's account; the verdict comes from the endpoint.

Fault points (issue 10): ``cut_args`` are appended when a cut is armed, for programs
that can stop themselves at a point (virtual_main's ``--cut-at``); ``fault_points`` map a
point to a log pattern on which the whole process group is killed (SIGKILL, no clean-up:
a power cut).

A configuration file (``examples/process-device/device.yaml``) holds the same options;
see :func:`load_process_options`.
"""

from __future__ import annotations

import json
import os
import shlex
import signal
import subprocess
import tempfile
import threading
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field, fields
from enum import Enum
from pathlib import Path
from types import MappingProxyType
from typing import IO, Any, ClassVar

from devices.base import (
    DeviceConfigError,
    DeviceInputs,
    DeviceResult,
    ErrorResponse,
    FaultPoint,
    StepRecord,
    coerce_enum,
    register_device_kind,
)
from devices.placeholders import RUN_PLACEHOLDERS, Template, Values
from devices.provision_common import DefaultWorkdir, arm_fault_point, error_from_groups
from devices.transcript import Expectation, ExpectTimeout, StreamClosed, Transcript
from devices.yaml_config import ConfigNode, load_config_file
from harness.endpoint_info import EndpointInfo

__all__ = [
    "PROCESS_PLACEHOLDERS",
    "ProcessDevice",
    "ProcessOptions",
    "ResultMode",
    "load_process_options",
]

#: Placeholders of a process device: the run's, plus two of its own.
PROCESS_PLACEHOLDERS: Mapping[str, str] = MappingProxyType({
    **RUN_PLACEHOLDERS,
    "endpoint_file": "an endpoint.json for the run, written into the workdir",
    "cut_at": "the armed fault point (empty when none is armed)",
})
#: The reference virtual device as a separate program: what ``--device process`` runs
#: when no command is configured.
DEFAULT_COMMAND: tuple[str, ...] = (
    "{python}", "-m", "devices.virtual_main",
    "--endpoint", "{endpoint}", "--port", "{port}", "--server-name", "{server_name}",
    "--ca-file", "{ca_file}", "--claim-cert", "{claim_cert}", "--claim-key", "{claim_key}",
    "--template", "{template}", "--serial", "{serial}", "--client-id", "{client_id}",
    "--workdir", "{workdir}", "--flow", "{flow}", "--cert", "{cert}", "--format", "{format}",
    "--mqtt", "{mqtt}", "--timeout", "{timeout}", "--log-level", "INFO",
)
DEFAULT_CUT_ARGS: tuple[str, ...] = ("--cut-at", "{cut_at}")
#: Placeholders of ``param_args``: the process device's, plus the parameter's.
PARAM_ARG_PLACEHOLDERS: Mapping[str, str] = MappingProxyType({
    **PROCESS_PLACEHOLDERS,
    "name": "the template parameter's name",
    "value": "the template parameter's value",
})
#: What the reference command repeats per template parameter (virtual_main's ``--param``).
DEFAULT_PARAM_ARGS: tuple[str, ...] = ("--param", "{name}={value}")
#: Seconds between SIGTERM and SIGKILL when a run times out.
KILL_GRACE_S = 2.0
#: Seconds to wait for the output pipes to close once the program has exited (a
#: background child may hold them); then the process group is killed.
PIPE_DRAIN_S = 2.0
LOG_NAME = "fleetbench-process.log"
ERROR_GROUPS = ("status_code", "error_code", "error_message")


class ResultMode(str, Enum):
    JSON = "json"  # the last JSON object line on stdout is a fleetbench DeviceResult
    EXIT_CODE = "exit-code"  # exit status 0 = success; facts from log patterns
    AUTO = "auto"  # JSON when the program printed one, else the exit status


def _pattern_map(value: Mapping[str, str], what: str) -> Mapping[str, str]:
    if not isinstance(value, Mapping):
        raise DeviceConfigError(f"{what} must map names to regular expressions")
    return MappingProxyType(dict(value))


@dataclass(frozen=True)
class ProcessOptions:
    """How a :class:`ProcessDevice` runs its program (``create_device("process", ...)``).

    ``command`` is a list of argument templates (no shell) or one shell string; empty means
    the reference virtual device (:data:`DEFAULT_COMMAND`). ``env`` adds templated variables
    to the inherited environment (``inherit_env=False``: only these and ``PATH``).
    ``cwd`` defaults to the run's workdir. ``milestones`` and ``failures`` map names to
    regular expressions over the program's output; ``fault_points`` map fault points to
    the pattern that triggers a kill; ``cut_args`` are added when a cut is armed;
    ``param_args`` are added once per template parameter, with ``{name}`` and ``{value}``
    (the reference command's default: :data:`DEFAULT_PARAM_ARGS`).
    ``timeout_s`` (default: the run's) bounds the program. ``config_file`` loads all of
    this from a YAML file instead (then give no other option).
    """

    command: tuple[str, ...] | str = ()
    env: Mapping[str, str] = field(default_factory=dict)
    cwd: str | None = None
    inherit_env: bool = True
    result: ResultMode = ResultMode.AUTO
    milestones: Mapping[str, str] = field(default_factory=dict)
    failures: Mapping[str, str] = field(default_factory=dict)
    fault_points: Mapping[str, str] = field(default_factory=dict)
    cut_args: tuple[str, ...] = ()
    param_args: tuple[str, ...] = ()
    timeout_s: float | None = None
    kill_grace_s: float = KILL_GRACE_S
    config_file: Path | None = None
    source: str | None = None  # where the options came from, for error messages

    def __post_init__(self) -> None:
        set_ = object.__setattr__
        if not isinstance(self.command, str):
            set_(self, "command", tuple(self.command))
        set_(self, "cut_args", tuple(self.cut_args))
        set_(self, "param_args", tuple(self.param_args))
        set_(self, "result", coerce_enum(ResultMode, self.result, "result"))
        set_(self, "env", _pattern_map(self.env, "env"))
        set_(self, "milestones", _pattern_map(self.milestones, "milestones"))
        set_(self, "failures", _pattern_map(self.failures, "failures"))
        set_(self, "fault_points", _pattern_map(self.fault_points, "fault_points"))
        if self.config_file is not None:
            set_(self, "config_file", Path(self.config_file))
        if self.timeout_s is not None and self.timeout_s <= 0:
            raise DeviceConfigError(f"timeout_s must be positive, got {self.timeout_s!r}")
        for name in self.fault_points:
            coerce_enum(FaultPoint, name, "fault point")


# --------------------------------------------------------------------------- config file

_FILE_KEYS = ("command", "env", "cwd", "inherit_env", "result", "milestones", "failures",
              "fault_points", "cut_args", "param_args", "timeout", "description")


def _regex_map(node: ConfigNode) -> dict[str, str]:
    out = {}
    for name, entry in node.mapping().items():
        entry.regex()  # validated here so the error names the line
        out[name] = entry.string(expand_env=False)
    return out


def load_process_options(path: Path | str) -> ProcessOptions:
    """Options from a YAML file; errors name the file, line and key."""
    root = load_config_file(path)
    entries = root.mapping(allowed=_FILE_KEYS)
    kwargs: dict[str, Any] = {"source": str(path)}
    if "command" in entries:
        kwargs["command"] = entries["command"].command()
    if "env" in entries:
        kwargs["env"] = {name: node.string(allow_empty=True)
                         for name, node in entries["env"].mapping().items()}
    if "cwd" in entries:
        kwargs["cwd"] = entries["cwd"].string()
    if "inherit_env" in entries:
        kwargs["inherit_env"] = entries["inherit_env"].boolean()
    if "result" in entries:
        kwargs["result"] = entries["result"].choice(tuple(m.value for m in ResultMode))
    for key in ("milestones", "failures"):
        if key in entries:
            kwargs[key] = _regex_map(entries[key])
    if "fault_points" in entries:
        node = entries["fault_points"]
        node.mapping(allowed=tuple(p.value for p in FaultPoint))
        kwargs["fault_points"] = _regex_map(node)
    for key in ("cut_args", "param_args"):
        if key in entries:
            kwargs[key] = tuple(n.string() for n in entries[key].sequence())
    if "timeout" in entries:
        kwargs["timeout_s"] = entries["timeout"].number(positive=True)
    try:
        options = ProcessOptions(**kwargs)
        _compile(options)  # parse every template now: errors name the file
    except DeviceConfigError as exc:
        if str(exc).startswith(str(path)):
            raise
        raise DeviceConfigError(f"{path}: {exc}") from None
    return options


# --------------------------------------------------------------------------- device


@dataclass(frozen=True)
class _Compiled:
    command: tuple[Template, ...]
    shell: bool
    env: Mapping[str, Template]
    cwd: Template | None
    cut_args: tuple[Template, ...]
    param_args: tuple[Template, ...]
    milestones: tuple[Expectation, ...]
    failures: tuple[Expectation, ...]
    faults: tuple[Expectation, ...]


def _compile(options: ProcessOptions) -> _Compiled:
    names = PROCESS_PLACEHOLDERS
    where = options.source or "process device"

    def template(text: str, key: str, allowed: Mapping[str, str] = names) -> Template:
        return Template(text, allowed, where=f"{where}: {key}")

    def expectations(patterns: Mapping[str, str], key: str) -> tuple[Expectation, ...]:
        out = []
        for name, regex in patterns.items():
            try:
                out.append(Expectation.of(name, regex))
            except Exception as exc:  # re.error
                raise DeviceConfigError(f"{where}: {key}.{name}: not a valid regular "
                                        f"expression ({exc})") from None
        return tuple(out)

    command: tuple[Template, ...]
    if isinstance(options.command, str):
        command, shell = (template(options.command, "command"),), True
    else:
        raw = options.command or DEFAULT_COMMAND
        command, shell = tuple(template(a, f"command[{i}]") for i, a in enumerate(raw)), False
    cut_args = options.cut_args or (DEFAULT_CUT_ARGS if not options.command else ())
    param_args = options.param_args or (DEFAULT_PARAM_ARGS if not options.command else ())
    return _Compiled(
        command=command,
        shell=shell,
        env={k: template(v, f"env.{k}") for k, v in options.env.items()},
        cwd=template(options.cwd, "cwd") if options.cwd else None,
        cut_args=tuple(template(a, f"cut_args[{i}]") for i, a in enumerate(cut_args)),
        param_args=tuple(template(a, f"param_args[{i}]", PARAM_ARG_PLACEHOLDERS)
                         for i, a in enumerate(param_args)),
        milestones=expectations(options.milestones, "milestones"),
        failures=expectations(options.failures, "failures"),
        faults=tuple(Expectation(f"fault:{e.name}", e.pattern)
                     for e in expectations(options.fault_points, "fault_points")),
    )


def _kill_group(process: subprocess.Popen[bytes], sig: int) -> None:
    try:
        os.killpg(process.pid, sig)
    except (ProcessLookupError, PermissionError):
        pass


def _pump(stream: IO[bytes], transcript: Transcript, name: str, keep: list[str] | None) -> None:
    """Reader thread: one line at a time into the transcript (and ``keep`` for stdout)."""
    try:
        for raw in iter(stream.readline, b""):
            text = raw.decode("utf-8", errors="replace")
            if keep is not None:
                keep.append(text)
            transcript.feed(text, name)
    except (OSError, ValueError):
        pass  # the pipe was closed under us: the program is gone


def _json_result(lines: Sequence[str]) -> Mapping[str, Any] | None:
    """The last stdout line, or trailing block, that is a JSON object with ``ok``."""
    text = "".join(lines)
    candidates = [line.strip() for line in reversed(lines) if line.strip().startswith("{")]
    start = text.rfind("\n{")
    if text.lstrip().startswith("{"):
        candidates.append(text.strip())
    if start >= 0:
        candidates.insert(0, text[start + 1:].strip())
    for candidate in candidates:
        try:
            data = json.loads(candidate)
        except ValueError:
            continue
        if isinstance(data, dict) and "ok" in data:
            return data
    return None


@register_device_kind("process")
class ProcessDevice:
    """A device program in a subprocess. Capabilities: Provisioner, FaultPoints.

    ``provision`` is one boot of the program; run it again with the same workdir to reboot.
    """

    kind: ClassVar[str] = "process"
    options_type: ClassVar[type] = ProcessOptions

    def __init__(self, options: ProcessOptions | None = None) -> None:
        options = options or ProcessOptions()
        if options.config_file is not None:
            defaults = ProcessOptions()
            given = [f.name for f in fields(options)
                     if f.name not in ("config_file", "source") and getattr(options, f.name) !=
                     getattr(defaults, f.name)]
            if given:
                raise DeviceConfigError(
                    f"give either config_file or the options ({', '.join(given)}), not both")
            options = load_process_options(options.config_file)
        self.options = options
        self._compiled = _compile(options)
        self._armed: FaultPoint | None = None
        self._workdirs = DefaultWorkdir("fleetbench-process-")

    # -- FaultPoints ---------------------------------------------------------------------------
    @property
    def fault_points(self) -> tuple[FaultPoint, ...]:
        if self._compiled.cut_args:
            return tuple(FaultPoint)
        return tuple(FaultPoint(name) for name in self.options.fault_points)

    def cut_at(self, point: FaultPoint | str | None) -> None:
        """Cut the program at ``point`` during the next run only."""
        self._armed = arm_fault_point(point, self.fault_points, lambda armed: (
            f"this process device cannot be cut at {armed.value}: configure "
            "fault_points (a log pattern) or cut_args for it"))

    # -- Provisioner ---------------------------------------------------------------------------
    def _values(self, inputs: DeviceInputs, workdir: Path, cut: FaultPoint | None) -> Values:
        endpoint_file = workdir / "endpoint.json"
        return Values.from_inputs(inputs, workdir=workdir, extra={
            "endpoint_file": str(endpoint_file),
            "cut_at": cut.value if cut else "",
        })

    def command_line(self, inputs: DeviceInputs, *, redacted: bool = False) -> list[str]:
        """The argument list a run with ``inputs`` would execute (raises on a placeholder
        the run cannot fill)."""
        workdir = inputs.workdir or Path(tempfile.gettempdir())
        return self._argv(self._values(inputs, workdir, self._armed), inputs.parameters,
                          self._armed, redacted)

    def _argv(self, values: Values, parameters: Mapping[str, str], cut: FaultPoint | None,
              redacted: bool) -> list[str]:
        c = self._compiled

        def render(template: Template, filled: Values) -> str:
            return template.render_redacted(filled) if redacted else template.render(filled)

        per_param = [render(t, values.extended(name=name, value=value))
                     for name, value in parameters.items() for t in c.param_args]
        if c.shell:
            extra = "".join(" " + shlex.quote(arg) for arg in per_param)
            if cut is not None and c.cut_args:
                extra += " " + " ".join(t.render(values) for t in c.cut_args)
            return ["/bin/sh", "-c", render(c.command[0], values) + extra]
        rendered = [render(t, values) for t in c.command] + per_param
        if cut is not None and c.cut_args:
            rendered += [render(t, values) for t in c.cut_args]
        return rendered

    def _environment(self, values: Values) -> dict[str, str]:
        base = dict(os.environ) if self.options.inherit_env else {
            "PATH": os.environ.get("PATH", "/usr/bin:/bin")}
        base.update({k: t.render(values) for k, t in self._compiled.env.items()})
        return base

    def provision(self, inputs: DeviceInputs) -> DeviceResult:
        """Run the program once; the result is its account (JSON) or what its log showed."""
        cut, self._armed = self._armed, None
        workdir = self._workdirs.for_run(inputs)
        values = self._values(inputs, workdir, cut)
        # Everything is rendered before anything starts: a placeholder the run cannot fill
        # raises PlaceholderError here.
        argv = self._argv(values, inputs.parameters, cut, redacted=False)
        shown = " ".join(self._argv(values, inputs.parameters, cut, redacted=True))
        env = self._environment(values)
        cwd = Path(self._compiled.cwd.render(values)) if self._compiled.cwd else workdir
        if not cwd.is_dir():
            raise DeviceConfigError(f"process device: working directory {cwd} does not exist")
        EndpointInfo(
            mqtt_host=inputs.endpoint.host, mqtt_port=inputs.endpoint.port, api_url="",
            ca_file=str(inputs.endpoint.ca_file), region="", account_id="",
            data_dir=str(workdir), mqtt_server_name=inputs.endpoint.tls_name,
        ).write(workdir / "endpoint.json")
        timeout = self.options.timeout_s or inputs.timeout_s
        transcript = Transcript(workdir / LOG_NAME, secrets=values.secrets())
        transcript.note(f"run {shown}" + (f" (cut armed at {cut.value})" if cut else ""))
        try:
            return self._run(inputs, argv, env, cwd, timeout, cut, transcript)
        finally:
            transcript.close()

    def _run(self, inputs: DeviceInputs, argv: list[str], env: dict[str, str], cwd: Path,
             timeout: float, cut: FaultPoint | None, transcript: Transcript) -> DeviceResult:
        started = time.time()
        try:
            process = subprocess.Popen(argv, env=env, cwd=cwd, stdin=subprocess.DEVNULL,
                                       stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                                       start_new_session=True)
        except OSError as exc:
            raise DeviceConfigError(
                f"process device: cannot start {argv[0]!r}: {exc.strerror}") from None
        assert process.stdout is not None and process.stderr is not None
        stdout_lines: list[str] = []
        readers = [
            threading.Thread(target=_pump, args=(process.stdout, transcript, "stdout",
                                                 stdout_lines), daemon=True),
            threading.Thread(target=_pump, args=(process.stderr, transcript, "stderr", None),
                             daemon=True),
        ]
        for reader in readers:
            reader.start()

        def drain() -> None:  # end the transcript when the output ends (or cannot)
            process.wait()
            for reader in readers:
                reader.join(PIPE_DRAIN_S)
            if any(r.is_alive() for r in readers):
                _kill_group(process, signal.SIGKILL)  # a child holds the pipes open
                for reader in readers:
                    reader.join(PIPE_DRAIN_S)
            transcript.end()

        drainer = threading.Thread(target=drain, daemon=True)
        drainer.start()
        watch = _Watch(self._compiled, cut, transcript, started)
        deadline = time.monotonic() + timeout
        timed_out = watch.run(deadline, lambda: _kill_group(process, signal.SIGKILL))
        if timed_out:
            transcript.note(f"timeout after {timeout:g}s: SIGTERM to the process group")
            _kill_group(process, signal.SIGTERM)
            try:
                process.wait(self.options.kill_grace_s)
            except subprocess.TimeoutExpired:
                transcript.note("still running: SIGKILL")
                _kill_group(process, signal.SIGKILL)
        returncode = process.wait()
        drainer.join(PIPE_DRAIN_S * 3)
        transcript.note(f"exit status {returncode}")
        for reader in readers:
            reader.join(1.0)
        return self._result(inputs, returncode, stdout_lines, watch, timed_out, timeout,
                            transcript)

    def _result(self, inputs: DeviceInputs, returncode: int, stdout_lines: list[str],
                watch: _Watch, timed_out: bool, timeout: float,
                transcript: Transcript) -> DeviceResult:
        mode = self.options.result
        data = _json_result(stdout_lines) if mode is not ResultMode.EXIT_CODE else None
        if mode is ResultMode.JSON and data is None and not (timed_out or watch.cut):
            return DeviceResult(
                ok=False, device_id=inputs.device_id, kind=self.kind, steps=watch.steps,
                failure=f"the program printed no JSON result (exit status {returncode})",
                log_path=transcript.log_path)
        if data is not None:
            try:
                own = DeviceResult.from_dict(data)
            except DeviceConfigError as exc:
                return DeviceResult(ok=False, device_id=inputs.device_id, kind=self.kind,
                                    steps=watch.steps, failure=f"unreadable result: {exc}",
                                    log_path=transcript.log_path)
            own_failure = own.failure
            if watch.cut is not None:
                own_failure = f"power cut at {watch.cut.value}"
            elif timed_out:
                own_failure = f"timeout after {timeout:g}s"
            return DeviceResult(
                ok=own.ok and not timed_out and not watch.cut, device_id=inputs.device_id,
                kind=self.kind, thing_name=own.thing_name, certificate_id=own.certificate_id,
                device_configuration=own.device_configuration, error=own.error,
                failure=own_failure,
                stopped_at=own.stopped_at or (watch.cut.value if watch.cut else None),
                steps=own.steps or watch.steps, log_path=transcript.log_path,
                credentials_dir=own.credentials_dir)
        failure: str | None = None
        if watch.cut is not None:
            failure = f"power cut at {watch.cut.value}"
        elif timed_out:
            failure = f"timeout after {timeout:g}s"
        elif watch.failure is not None:
            failure = watch.failure
        elif returncode != 0:
            failure = f"exit status {returncode}"
        ok = failure is None and watch.error is None
        return DeviceResult(
            ok=ok, device_id=inputs.device_id, kind=self.kind,
            thing_name=watch.facts.get("thing_name"),
            certificate_id=watch.facts.get("certificate_id"), error=watch.error,
            failure=failure if watch.error is None or failure != watch.failure else None,
            stopped_at=watch.cut.value if watch.cut else None, steps=watch.steps,
            log_path=transcript.log_path)


class _Watch:
    """Follows the program's output: milestones become steps, failure patterns become the
    error, an armed fault point's pattern kills the program."""

    def __init__(self, compiled: _Compiled, cut: FaultPoint | None, transcript: Transcript,
                 started: float) -> None:
        self.compiled = compiled
        self.armed = cut
        self.transcript = transcript
        self.last = started
        self.steps: tuple[StepRecord, ...] = ()
        self.facts: dict[str, str] = {}
        self.error: ErrorResponse | None = None
        self.failure: str | None = None
        self.cut: FaultPoint | None = None

    def run(self, deadline: float, kill: Callable[[], None]) -> bool:
        """Watch until the output ends; True if the deadline passed first."""
        faults = tuple(f for f in self.compiled.faults
                       if self.armed is not None and f.name == f"fault:{self.armed.value}")
        expectations = (*self.compiled.milestones, *self.compiled.failures, *faults)
        steps: list[StepRecord] = []
        milestone_names = {m.name for m in self.compiled.milestones}
        while True:
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                self.steps = tuple(steps)
                return True
            try:
                seen = self.transcript.expect(expectations or (_NEVER,), remaining)
            except StreamClosed:
                self.steps = tuple(steps)
                return False
            except ExpectTimeout:
                self.steps = tuple(steps)
                return True
            if seen.name.startswith("fault:"):
                kill()
                assert self.armed is not None
                self.cut = self.armed
                self.transcript.note(f"power cut at {self.armed.value}: SIGKILL to the "
                                     "process group")
                continue
            self.facts.update(seen.groups)
            if seen.name in milestone_names:
                steps.append(StepRecord(seen.name, self.last, max(seen.at - self.last, 0.0),
                                        True, dict(seen.groups)))
                self.last = seen.at
            else:
                groups = seen.groups
                error = error_from_groups(groups)
                if error is not None:
                    self.error = error
                self.failure = groups.get("reason") or f"{seen.name}: {seen.line.strip()}"
                steps.append(StepRecord(seen.name, self.last, max(seen.at - self.last, 0.0),
                                        False, dict(groups),
                                        error_code=groups.get("error_code") or seen.name))
                self.last = seen.at


_NEVER = Expectation.of("never", r"(?!x)x")
