"""AWS IoT topic names, topic filters and subscription matching (spec broker §1.5).

AWS deviates from plain MQTT in ways firmware notices, so these rules are AWS's:

* ``sensor/#`` matches ``sensor/`` and ``sensor/a`` but not ``sensor`` (``#`` never
  matches the parent level);
* a filter whose first level is a wildcard never matches a topic starting with ``$``;
* names and filters are at most 256 bytes and 7 slashes, not counting a Basic Ingest
  prefix ``$aws/rules/<rule>/`` nor a shared-subscription prefix ``$share/<name>/``
  (the way awslabs/aws-c-mqtt ``mqtt5_utils.c`` counts them); every other ``$aws/``
  topic counts in full.

Sans-I/O like the codec: pure functions plus :class:`SubscriptionTree`, a trie over
topic levels so that a PUBLISH is matched without scanning every filter.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Generic, TypeVar

from harness.emulator.mqtt.packets import ReasonCode

__all__ = [
    "MAX_SHARE_NAME_CHARS",
    "SubscriptionTree",
    "TopicError",
    "TopicLimits",
    "split_shared",
    "topic_matches",
    "validate_topic_filter",
    "validate_topic_name",
]

SHARE_PREFIX = "$share/"
RULES_PREFIX = "$aws/rules/"
#: ShareName length limit (spec broker §1.5).
MAX_SHARE_NAME_CHARS = 128

_MISSING = object()
_NAME_INVALID = int(ReasonCode.TOPIC_NAME_INVALID)
_FILTER_INVALID = int(ReasonCode.TOPIC_FILTER_INVALID)


@dataclass(frozen=True)
class TopicLimits:
    """AWS quotas "Topic size" and "Maximum number of slashes in topic and topic filter"."""

    max_bytes: int = 256
    max_slashes: int = 7


_DEFAULT_LIMITS = TopicLimits()


class TopicError(ValueError):
    """A topic name (``reason_code`` 0x90) or topic filter (0x8F) AWS would refuse."""

    def __init__(self, message: str, reason_code: int) -> None:
        super().__init__(message)
        self.reason_code = reason_code


def split_shared(topic_filter: str) -> tuple[str | None, str]:
    """``("group", "a/b")`` for ``"$share/group/a/b"``, ``(None, topic_filter)`` otherwise.

    A malformed shared filter splits too (``"$share/g"`` -> ``("g", "")``) so that
    :func:`validate_topic_filter` can say what is wrong with it.
    """
    if not topic_filter.startswith(SHARE_PREFIX):
        return None, topic_filter
    group, _, rest = topic_filter[len(SHARE_PREFIX) :].partition("/")
    return group, rest


def _without_rules_prefix(topic: str) -> str:
    """Drop ``$aws/rules/<rule>/``, which AWS does not count against the limits."""
    if topic.startswith(RULES_PREFIX):
        rule, sep, rest = topic[len(RULES_PREFIX) :].partition("/")
        if rule and sep:
            return rest
    return topic


def _check_limits(counted: str, limits: TopicLimits, what: str, reason_code: int) -> None:
    size = len(counted) if counted.isascii() else len(counted.encode("utf-8"))
    if size > limits.max_bytes:
        raise TopicError(f"{what} is {size} bytes, more than {limits.max_bytes}", reason_code)
    slashes = counted.count("/")
    if slashes > limits.max_slashes:
        raise TopicError(
            f"{what} has {slashes} slashes, more than {limits.max_slashes}", reason_code
        )


def validate_topic_name(name: str, limits: TopicLimits = _DEFAULT_LIMITS) -> None:
    """Raise :class:`TopicError` (0x90) unless AWS accepts ``name`` as a PUBLISH topic."""
    if not name:
        raise TopicError("topic name is empty", _NAME_INVALID)
    if "+" in name or "#" in name:
        raise TopicError("topic name contains a wildcard", _NAME_INVALID)
    if "\x00" in name:
        raise TopicError("topic name contains U+0000", _NAME_INVALID)
    _check_limits(_without_rules_prefix(name), limits, "topic name", _NAME_INVALID)


def validate_topic_filter(topic_filter: str, limits: TopicLimits = _DEFAULT_LIMITS) -> None:
    """Raise :class:`TopicError` (0x8F) unless AWS accepts ``topic_filter`` in a SUBSCRIBE."""
    if not topic_filter:
        raise TopicError("topic filter is empty", _FILTER_INVALID)
    if "\x00" in topic_filter:
        raise TopicError("topic filter contains U+0000", _FILTER_INVALID)
    group, inner = split_shared(topic_filter)
    if group is not None:
        if not group:
            raise TopicError("shared subscription with an empty ShareName", _FILTER_INVALID)
        if len(group) > MAX_SHARE_NAME_CHARS:
            raise TopicError(
                f"ShareName longer than {MAX_SHARE_NAME_CHARS} characters", _FILTER_INVALID
            )
        if "+" in group or "#" in group:
            raise TopicError("ShareName contains a wildcard", _FILTER_INVALID)
        if not inner:
            raise TopicError("shared subscription without a topic filter", _FILTER_INVALID)
    if "+" in inner or "#" in inner:
        levels = inner.split("/")
        last = len(levels) - 1
        for index, level in enumerate(levels):
            if "+" in level and level != "+":
                raise TopicError("'+' must occupy a whole level", _FILTER_INVALID)
            if "#" in level and (level != "#" or index != last):
                raise TopicError("'#' must be the whole last level", _FILTER_INVALID)
    _check_limits(_without_rules_prefix(inner), limits, "topic filter", _FILTER_INVALID)


def topic_matches(topic_filter: str, topic: str) -> bool:
    """Whether a valid ``topic_filter`` (shared or not) matches the topic name ``topic``."""
    _, inner = split_shared(topic_filter)
    if topic[:1] == "$" and inner[:1] in ("+", "#"):
        return False
    filter_levels = inner.split("/")
    topic_levels = topic.split("/")
    for index, level in enumerate(filter_levels):
        if level == "#":
            return len(topic_levels) > index  # AWS: at least one level below the parent
        if index >= len(topic_levels):
            return False
        if level != "+" and level != topic_levels[index]:
            return False
    return len(filter_levels) == len(topic_levels)


K = TypeVar("K")
V = TypeVar("V")


class _Node(Generic[K, V]):
    """One topic level. Wildcard children are kept apart from literal ones, so a
    literal ``+`` in a topic can never reach them by lookup."""

    __slots__ = ("children", "entries", "hash_entries", "plus")

    def __init__(self) -> None:
        self.children: dict[str, _Node[K, V]] = {}
        self.plus: _Node[K, V] | None = None
        # (key, full filter) -> value, for filters that end at this level ...
        self.entries: dict[tuple[K, str], V] = {}
        # ... and for filters that end with '#' below this level.
        self.hash_entries: dict[tuple[K, str], V] = {}

    def is_empty(self) -> bool:
        return not (self.children or self.plus or self.entries or self.hash_entries)


class SubscriptionTree(Generic[K, V]):
    """Subscriptions indexed by topic level: ``match`` costs O(levels x wildcards),
    not O(subscriptions).

    An entry is identified by (subscriber key, full filter string), so one client
    may hold ``a/+``, ``a/#`` and ``$share/g/a/+`` at once; ``match`` returns each
    matching entry and the broker decides (MQTT 5: deliver once with the highest
    QoS; shared filters: one member per group, found with :func:`split_shared`).
    Filters must already be valid (:func:`validate_topic_filter`).
    """

    def __init__(self) -> None:
        self._root: _Node[K, V] = _Node()
        self._count = 0

    def __len__(self) -> int:
        return self._count

    def _path(self, topic_filter: str) -> tuple[list[str], bool]:
        _, inner = split_shared(topic_filter)
        levels = inner.split("/")
        if levels[-1] == "#":
            return levels[:-1], True
        return levels, False

    def add(self, topic_filter: str, key: K, value: V) -> bool:
        """Store ``value`` for (``topic_filter``, ``key``); True if that pair is new."""
        levels, multi = self._path(topic_filter)
        node = self._root
        for level in levels:
            if level == "+":
                if node.plus is None:
                    node.plus = _Node()
                node = node.plus
            else:
                child = node.children.get(level)
                if child is None:
                    child = node.children[level] = _Node()
                node = child
        table = node.hash_entries if multi else node.entries
        ident = (key, topic_filter)
        is_new = ident not in table
        table[ident] = value
        if is_new:
            self._count += 1
        return is_new

    def remove(self, topic_filter: str, key: K) -> bool:
        """Forget (``topic_filter``, ``key``); True if it was there."""
        levels, multi = self._path(topic_filter)
        trail: list[tuple[_Node[K, V], str]] = []
        node: _Node[K, V] | None = self._root
        for level in levels:
            assert node is not None
            trail.append((node, level))
            node = node.plus if level == "+" else node.children.get(level)
            if node is None:
                return False
        assert node is not None
        table = node.hash_entries if multi else node.entries
        if table.pop((key, topic_filter), _MISSING) is _MISSING:
            return False
        self._count -= 1
        for parent, level in reversed(trail):  # prune levels nobody subscribes under
            if not node.is_empty():
                break
            if level == "+":
                parent.plus = None
            else:
                del parent.children[level]
            node = parent
        return True

    def match(self, topic: str) -> list[tuple[K, V, str]]:
        """Every (key, value, filter) whose filter matches the topic name ``topic``."""
        levels = topic.split("/")
        depth = len(levels)
        found: list[tuple[K, V, str]] = []
        root = self._root
        stack: list[tuple[_Node[K, V], int]] = []
        if topic[:1] != "$":  # wildcard-first filters never see '$' topics
            if root.hash_entries:
                found.extend((k, v, f) for (k, f), v in root.hash_entries.items())
            if root.plus is not None:
                stack.append((root.plus, 1))
        child = root.children.get(levels[0])
        if child is not None:
            stack.append((child, 1))
        while stack:
            node, index = stack.pop()
            if index == depth:
                if node.entries:
                    found.extend((k, v, f) for (k, f), v in node.entries.items())
                continue
            if node.hash_entries:
                found.extend((k, v, f) for (k, f), v in node.hash_entries.items())
            if node.plus is not None:
                stack.append((node.plus, index + 1))
            child = node.children.get(levels[index])
            if child is not None:
                stack.append((child, index + 1))
        return found

