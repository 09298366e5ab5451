"""Reading YAML configuration files so that every error names the file, line and key.

Bench files and process-device files are written by hand at a lab bench; a mistake
must be reported as ``bench.yaml:14: boards.sim-1.power.on: expected a command (a
string or a list of strings), got a mapping``, not as a traceback. PyYAML's loader
forgets line numbers, so files are *composed* (``yaml.compose``) and read node by
node through :class:`ConfigNode`, which carries the node's mark and dotted key path.

String values may refer to the environment as ``${NAME}`` or ``${NAME:-default}``
(the board simulator's pseudo-terminal, for example, lives where the test put it).
"""

from __future__ import annotations

import os
import re
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import yaml
from yaml.constructor import ConstructorError, SafeConstructor

from devices.base import DeviceConfigError

__all__ = ["ConfigFileError", "ConfigNode", "load_config_file", "parse_config_text"]

_ENV_RE = re.compile(r"\$\{([A-Za-z_][A-Za-z0-9_]*)(?::-([^}]*))?\}")


class ConfigFileError(DeviceConfigError):
    """A configuration file is malformed. The message reads ``FILE:LINE: KEY: what was
    expected``; ``path``, ``line`` and ``key`` are kept for tools."""

    def __init__(self, path: Path | str, line: int | None, key: str, message: str) -> None:
        where = f"{path}:{line}" if line is not None else str(path)
        super().__init__(f"{where}: {key + ': ' if key else ''}{message}")
        self.path = Path(path)
        self.line = line
        self.key = key


def _describe(node: yaml.Node) -> str:
    if isinstance(node, yaml.MappingNode):
        return "a mapping"
    if isinstance(node, yaml.SequenceNode):
        return "a list"
    value = SafeConstructor().construct_object(node)
    if value is None:
        return "nothing (null)"
    return f"{type(value).__name__} {value!r}"


class ConfigNode:
    """One node of a composed YAML document, with where it came from."""

    def __init__(self, node: yaml.Node, path: Path, key: str = "") -> None:
        self.node = node
        self.path = path
        self.key = key

    def __repr__(self) -> str:
        return f"ConfigNode({self.key or '<root>'} at {self.path}:{self.line})"

    @property
    def line(self) -> int:
        """1-based line of the node."""
        return self.node.start_mark.line + 1

    def error(self, message: str) -> ConfigFileError:
        return ConfigFileError(self.path, self.line, self.key, message)

    def _child_key(self, name: str | int) -> str:
        if isinstance(name, int):
            return f"{self.key}[{name}]"
        return f"{self.key}.{name}" if self.key else name

    # -- kinds ----------------------------------------------------------------------------
    @property
    def is_mapping(self) -> bool:
        return isinstance(self.node, yaml.MappingNode)

    @property
    def is_sequence(self) -> bool:
        return isinstance(self.node, yaml.SequenceNode)

    @property
    def is_null(self) -> bool:
        return isinstance(self.node, yaml.ScalarNode) and self.node.tag.endswith(":null")

    def mapping(self, *, allowed: tuple[str, ...] | None = None,
                required: tuple[str, ...] = ()) -> dict[str, ConfigNode]:
        """The entries of a mapping, in file order. Duplicate keys, keys outside
        ``allowed`` and missing ``required`` keys are errors naming the line."""
        if not self.is_mapping:
            raise self.error(f"expected a mapping, got {_describe(self.node)}")
        assert isinstance(self.node, yaml.MappingNode)
        own: set[int] | None = getattr(self.node, "fleetbench_own_keys", None)
        if own is None:  # remember the node's own keys before merging (once per node)
            own = {id(k) for k, _ in self.node.value}
            self.node.fleetbench_own_keys = own  # type: ignore[attr-defined]
        try:  # YAML merge keys (``<<: *defaults``) put the shared entries first
            SafeConstructor().flatten_mapping(self.node)
        except ConstructorError as exc:
            raise self.error(f"bad merge key ({exc.problem})") from None
        out: dict[str, ConfigNode] = {}
        key_nodes: dict[str, yaml.Node] = {}
        for key_node, value_node in self.node.value:
            key_cfg = ConfigNode(key_node, self.path, self.key)
            if not isinstance(key_node, yaml.ScalarNode):
                raise key_cfg.error("mapping keys must be plain names")
            name = str(key_node.value)  # raw text: `on:` is a name here, not YAML 1.1's True
            if name in out and id(key_nodes[name]) in own:
                raise ConfigNode(key_node, self.path, self._child_key(name)).error(
                    f"duplicate key (first given on line {out[name].line})")
            key_nodes[name] = key_node
            if allowed is not None and name not in allowed:
                raise ConfigNode(key_node, self.path, self._child_key(name)).error(
                    f"unknown key; expected one of: {', '.join(allowed)}")
            out[name] = ConfigNode(value_node, self.path, self._child_key(name))
        missing = [k for k in required if k not in out]
        if missing:
            raise self.error(f"missing required key(s): {', '.join(missing)}")
        return out

    def sequence(self) -> list[ConfigNode]:
        if not self.is_sequence:
            raise self.error(f"expected a list, got {_describe(self.node)}")
        return [ConfigNode(n, self.path, self._child_key(i)) for i, n in enumerate(self.node.value)]

    def __iter__(self) -> Iterator[ConfigNode]:
        return iter(self.sequence())

    # -- scalars ---------------------------------------------------------------------------
    def _scalar(self) -> Any:
        if not isinstance(self.node, yaml.ScalarNode):
            raise self.error(f"expected a single value, got {_describe(self.node)}")
        try:
            return SafeConstructor().construct_object(self.node)
        except ConstructorError as exc:
            raise self.error(f"unreadable value ({exc.problem})") from None

    def string(self, *, expand_env: bool = True, allow_empty: bool = False) -> str:
        """A text value (numbers are accepted and turned into text); ``${VAR}`` expanded."""
        value = self._scalar()
        if isinstance(value, bool):  # YAML 1.1 reads on/off/yes/no as booleans: text here
            value = self.node.value
        if value is None or not isinstance(value, (str, int, float)):
            raise self.error(f"expected text, got {_describe(self.node)}")
        text = str(value)
        if expand_env:
            text = self._expand_env(text)
        if not text and not allow_empty:
            raise self.error("expected text, got an empty string")
        return text

    def _expand_env(self, text: str) -> str:
        def replace(match: re.Match[str]) -> str:
            name, default = match.group(1), match.group(2)
            value = os.environ.get(name)
            if value:
                return value
            if default is not None:
                return default
            raise self.error(f"environment variable {name} is not set (write "
                             f"${{{name}:-default}} to give a default)")

        return _ENV_RE.sub(replace, text)

    def number(self, *, minimum: float | None = None, positive: bool = False) -> float:
        value = self._scalar()
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise self.error(f"expected a number, got {_describe(self.node)}")
        if positive and value <= 0:
            raise self.error(f"expected a positive number, got {value!r}")
        if minimum is not None and value < minimum:
            raise self.error(f"expected a number >= {minimum}, got {value!r}")
        return float(value)

    def integer(self, *, minimum: int | None = None) -> int:
        value = self._scalar()
        if isinstance(value, bool) or not isinstance(value, int):
            raise self.error(f"expected a whole number, got {_describe(self.node)}")
        if minimum is not None and value < minimum:
            raise self.error(f"expected a whole number >= {minimum}, got {value!r}")
        return value

    def boolean(self) -> bool:
        value = self._scalar()
        if not isinstance(value, bool):
            raise self.error(f"expected true or false, got {_describe(self.node)}")
        return value

    def choice(self, choices: tuple[str, ...]) -> str:
        value = self.string()
        if value not in choices:
            raise self.error(f"expected one of {', '.join(choices)}, got {value!r}")
        return value

    def regex(self) -> re.Pattern[str]:
        """A regular expression (compiled with MULTILINE, so ``^``/``$`` mean a line)."""
        text = self.string(expand_env=False)
        try:
            return re.compile(text, re.MULTILINE)
        except re.error as exc:
            raise self.error(f"not a valid regular expression ({exc})") from None

    def command(self) -> tuple[str, ...] | str:
        """A command: a list of arguments (run without a shell) or one string (run with
        ``/bin/sh -c``, so pipes and redirections work)."""
        if self.is_sequence:
            items = tuple(item.string(allow_empty=True) for item in self.sequence())
            if not items or not items[0]:
                raise self.error("expected a non-empty command")
            return items
        if isinstance(self.node, yaml.ScalarNode) and not self.is_null:
            return self.string()
        raise self.error("expected a command (a string or a list of strings), got "
                         f"{_describe(self.node)}")


def parse_config_text(text: str, path: Path | str) -> ConfigNode:
    """Compose ``text`` (one YAML document) into its root node; syntax errors name the line."""
    path = Path(path)
    try:
        root = yaml.compose(text, Loader=yaml.SafeLoader)
    except yaml.MarkedYAMLError as exc:
        mark = exc.problem_mark or exc.context_mark
        line = mark.line + 1 if mark is not None else None
        raise ConfigFileError(path, line, "", f"not valid YAML: {exc.problem or exc}") from None
    except yaml.YAMLError as exc:
        raise ConfigFileError(path, None, "", f"not valid YAML: {exc}") from None
    if root is None:
        raise ConfigFileError(path, None, "", "the file is empty")
    return ConfigNode(root, path)


def load_config_file(path: Path | str) -> ConfigNode:
    """Read and compose a YAML file; a missing or unreadable file is a ConfigFileError."""
    path = Path(path)
    try:
        text = path.read_text(encoding="utf-8")
    except FileNotFoundError:
        raise ConfigFileError(path, None, "", "no such file") from None
    except (OSError, UnicodeDecodeError) as exc:
        raise ConfigFileError(path, None, "", f"cannot read the file ({exc})") from None
    return parse_config_text(text, path)
